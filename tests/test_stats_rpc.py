"""Tests of vblk.stats.rpc against a one-shot unix socket peer."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import pytest

from vblk.stats.rpc import RpcCallError, call


def _peer(path: Path, answer: bytes) -> threading.Thread:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)

    def serve() -> None:
        conn, _ = srv.accept()
        with conn, srv:
            req = json.loads(conn.makefile("rb").readline())
            assert req["method"] == "export-stats"
            conn.sendall(answer)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t


def test_result(tmp_path: Path) -> None:
    t = _peer(tmp_path / "c.sock", b'{"jsonrpc":"2.0","id":1,"result":{"exports":[]}}\n')
    assert call(str(tmp_path / "c.sock"), "export-stats") == {"exports": []}
    t.join(5)


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (
            b'{"jsonrpc":"2.0","id":1,"error":{"code":-32001,"message":"no export x"}}\n',
            "no export x",
        ),
        (b"garbage\n", "not JSON"),
        (b"[1]\n", "not a JSON-RPC response"),
        (b'{"jsonrpc":"2.0","id":1}\n', "no result"),
    ],
)
def test_errors(tmp_path: Path, answer: bytes, message: str) -> None:
    t = _peer(tmp_path / "c.sock", answer)
    with pytest.raises(RpcCallError, match=message):
        call(str(tmp_path / "c.sock"), "export-stats")
    t.join(5)


def test_no_daemon(tmp_path: Path) -> None:
    with pytest.raises(RpcCallError, match="control socket"):
        call(str(tmp_path / "none.sock"), "export-stats")
