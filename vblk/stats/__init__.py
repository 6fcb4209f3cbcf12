"""Observability of the request path: stage histograms, traces and pictures of the path.

Everything here is pure (no sockets, no threads): the data path feeds it
integers from ``time.monotonic_ns`` and the shells (control socket, metrics
server, ``vblk top``/``trace``) read snapshots of it.
"""
