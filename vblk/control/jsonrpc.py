"""JSON-RPC 2.0, one object per line, with no I/O in it.

:func:`parse_line` turns one received line into a :class:`Call` or an
:class:`RpcError` to answer with; :func:`result_line` and :func:`error_line`
encode the answers. Batches are refused: one line, one request, so a
client's mistakes stay its own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "EXPORT_EXISTS",
    "EXPORT_FAILED",
    "EXPORT_NOT_FOUND",
    "INTERNAL_ERROR",
    "INVALID_PARAMS",
    "INVALID_REQUEST",
    "METHOD_NOT_FOUND",
    "PARSE_ERROR",
    "RESIZE_REFUSED",
    "SOCKET_IN_USE",
    "STORAGE_ERROR",
    "Call",
    "RpcError",
    "error_line",
    "parse_line",
    "result_line",
]

# The codes of the JSON-RPC 2.0 specification.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
# Application codes (the range -32000..-32099 is the server's to define).
EXPORT_NOT_FOUND = -32001
EXPORT_EXISTS = -32002
SOCKET_IN_USE = -32003
STORAGE_ERROR = -32004
RESIZE_REFUSED = -32005
EXPORT_FAILED = -32006

#: Request ids a client may use: JSON-RPC allows strings, numbers and null.
RequestId = str | int | float | None


class RpcError(Exception):
    """An error to answer with: a JSON-RPC code and a message meant for a person."""

    def __init__(self, code: int, message: str, request_id: RequestId = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


@dataclass(frozen=True)
class Call:
    """One well-formed request; ``notification`` calls get no answer."""

    method: str
    params: dict[str, Any] = field(default_factory=dict)
    request_id: RequestId = None
    notification: bool = False


def parse_line(line: bytes) -> Call | RpcError:
    """Decode one line; anything that is not a single valid request is an RpcError."""
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError) as e:
        return RpcError(PARSE_ERROR, f"parse error: not valid JSON ({e})")
    if isinstance(obj, list):
        return RpcError(INVALID_REQUEST, "invalid request: batches are not supported")
    if not isinstance(obj, dict):
        return RpcError(INVALID_REQUEST, "invalid request: expected a JSON object")
    rid = obj.get("id")
    if isinstance(rid, bool) or not isinstance(rid, str | int | float | None):
        return RpcError(INVALID_REQUEST, "invalid request: id must be a string, number or null")
    if obj.get("jsonrpc") != "2.0":
        return RpcError(INVALID_REQUEST, 'invalid request: "jsonrpc" must be "2.0"', rid)
    method = obj.get("method")
    if not isinstance(method, str):
        return RpcError(INVALID_REQUEST, 'invalid request: "method" must be a string', rid)
    extra = set(obj) - {"jsonrpc", "method", "params", "id"}
    if extra:
        return RpcError(INVALID_REQUEST, f"invalid request: unknown member(s) {sorted(extra)}", rid)
    params = obj.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        return RpcError(INVALID_PARAMS, "invalid params: params must be an object (by name)", rid)
    return Call(method, params, rid, notification="id" not in obj)


def _dump(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode() + b"\n"


def result_line(request_id: RequestId, result: Any) -> bytes:
    return _dump({"jsonrpc": "2.0", "id": request_id, "result": result})


def error_line(error: RpcError) -> bytes:
    return _dump(
        {
            "jsonrpc": "2.0",
            "id": error.request_id,
            "error": {"code": error.code, "message": error.message},
        }
    )
