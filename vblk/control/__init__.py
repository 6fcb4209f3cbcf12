"""The daemon's control plane: JSON-RPC 2.0 over a unix socket (codec, methods, client)."""
