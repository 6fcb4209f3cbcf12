"""One JSON-RPC call over the daemon's control socket, for ``vblk ctl``, ``top`` and ``trace``.

One request line out, one answer line back (the daemon's framing). Errors
become :class:`RpcCallError` with the server's message, ready for a
one-line ``vblk: error: ...``.
"""

from __future__ import annotations

import json
import socket
from typing import Any

from vblk.errors import VblkError

#: The longest answer accepted (a stats snapshot of many exports and queues fits easily).
MAX_ANSWER = 64 << 20


class RpcCallError(VblkError):
    """The call failed: no daemon, a broken answer, or a JSON-RPC error."""


def call(
    path: str, method: str, params: dict[str, Any] | None = None, timeout: float = 10.0
) -> Any:
    """The result of ``method`` on the control socket at ``path``."""
    line = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params or {}})
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.sendall(line.encode() + b"\n")
            buf = bytearray()
            while b"\n" not in buf:
                chunk = sock.recv(1 << 16)
                if not chunk:
                    break
                buf += chunk
                if len(buf) > MAX_ANSWER:
                    raise RpcCallError(f"{method}: answer longer than {MAX_ANSWER} bytes")
    except OSError as e:
        raise RpcCallError(f"control socket {path}: {e.strerror or e}") from None
    try:
        answer = json.loads(bytes(buf).split(b"\n", 1)[0])
    except ValueError:
        raise RpcCallError(f"{method}: the daemon's answer is not JSON") from None
    if not isinstance(answer, dict):
        raise RpcCallError(f"{method}: the daemon's answer is not a JSON-RPC response")
    err = answer.get("error")
    if isinstance(err, dict):
        raise RpcCallError(f"{method}: {err.get('message', 'error')} (code {err.get('code')})")
    if "result" not in answer:
        raise RpcCallError(f"{method}: the daemon's answer has no result")
    return answer["result"]
