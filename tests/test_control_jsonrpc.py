"""JSON-RPC line codec: every malformed shape gets its specified error code."""

from __future__ import annotations

import json

import pytest

from vblk.control import jsonrpc as rpc


def test_parses_a_request_with_named_params() -> None:
    c = rpc.parse_line(b'{"jsonrpc":"2.0","id":7,"method":"export-list","params":{"a":1}}\n')
    assert c == rpc.Call("export-list", {"a": 1}, 7, notification=False)


def test_missing_id_is_a_notification_and_params_default_to_empty() -> None:
    c = rpc.parse_line(b'{"jsonrpc":"2.0","method":"export-list"}')
    assert isinstance(c, rpc.Call) and c.notification and c.params == {}


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"{not json", rpc.PARSE_ERROR),
        (b"\xff\xfe", rpc.PARSE_ERROR),
        (b"", rpc.PARSE_ERROR),
        (b"[]", rpc.INVALID_REQUEST),
        (b'[{"jsonrpc":"2.0","method":"x","id":1}]', rpc.INVALID_REQUEST),
        (b"42", rpc.INVALID_REQUEST),
        (b'"export-list"', rpc.INVALID_REQUEST),
        (b'{"method":"export-list","id":1}', rpc.INVALID_REQUEST),
        (b'{"jsonrpc":"1.0","method":"export-list","id":1}', rpc.INVALID_REQUEST),
        (b'{"jsonrpc":"2.0","method":5,"id":1}', rpc.INVALID_REQUEST),
        (b'{"jsonrpc":"2.0","method":"x","id":{}}', rpc.INVALID_REQUEST),
        (b'{"jsonrpc":"2.0","method":"x","id":true}', rpc.INVALID_REQUEST),
        (b'{"jsonrpc":"2.0","method":"x","id":1,"extra":1}', rpc.INVALID_REQUEST),
        (b'{"jsonrpc":"2.0","method":"x","id":1,"params":[1]}', rpc.INVALID_PARAMS),
        (b'{"jsonrpc":"2.0","method":"x","id":1,"params":"p"}', rpc.INVALID_PARAMS),
    ],
)
def test_malformed_lines_are_errors(line: bytes, code: int) -> None:
    e = rpc.parse_line(line)
    assert isinstance(e, rpc.RpcError) and e.code == code


def test_error_keeps_the_request_id_when_known() -> None:
    e = rpc.parse_line(b'{"jsonrpc":"2.0","method":3,"id":"abc"}')
    assert isinstance(e, rpc.RpcError)
    out = json.loads(rpc.error_line(e))
    assert out["id"] == "abc" and out["error"]["code"] == rpc.INVALID_REQUEST


def test_answers_are_single_lines() -> None:
    line = rpc.result_line(1, {"x": "a\nb"})
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line) == {"jsonrpc": "2.0", "id": 1, "result": {"x": "a\nb"}}
    err = json.loads(rpc.error_line(rpc.RpcError(rpc.EXPORT_NOT_FOUND, "no such export", 2)))
    assert err == {
        "jsonrpc": "2.0",
        "id": 2,
        "error": {"code": -32001, "message": "no such export"},
    }
