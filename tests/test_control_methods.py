"""Control method parameters: every method with every wrong parameter type is refused."""

from __future__ import annotations

from typing import Any

import pytest

from vblk.control.jsonrpc import INVALID_PARAMS, METHOD_NOT_FOUND, RpcError
from vblk.control.methods import DEFAULT_NUM_QUEUES, METHODS, validate

ADD = {"id": "d0", "spec": "/tmp/a.img", "socket": "/tmp/a.sock"}


def test_export_add_fills_defaults() -> None:
    p = validate("export-add", dict(ADD))
    assert p == {
        **ADD,
        "num_queues": DEFAULT_NUM_QUEUES,
        "queue_size": 32768,
        "read_only": False,
        "serial": "",
        "direct": False,
        "aio": None,
        "opts": {},
        "format": None,
    }


def test_optional_qos_keys_are_left_out_when_absent() -> None:
    assert validate("export-set-qos", {"id": "d0", "iops": 0}) == {"id": "d0", "iops": 0}
    assert validate("export-stats", {}) == {}


def test_unknown_method() -> None:
    with pytest.raises(RpcError) as e:
        validate("export-explode", {})
    assert e.value.code == METHOD_NOT_FOUND and "export-explode" in e.value.message


def _refused(method: str, params: dict[str, Any], needle: str) -> None:
    with pytest.raises(RpcError) as e:
        validate(method, params)
    assert e.value.code == INVALID_PARAMS
    assert needle in e.value.message


@pytest.mark.parametrize("method", sorted(METHODS))
def test_unknown_parameter(method: str) -> None:
    _refused(method, {"bogus": 1}, "bogus")


#: Values of every JSON type; each parameter accepts at most one of these types.
WRONG: list[Any] = ["s", 1, 1.5, True, None, [1], {"a": 1}]


def _valid_for(method: str) -> dict[str, Any]:
    base: dict[str, dict[str, Any]] = {
        "export-add": dict(ADD),
        "export-remove": {"id": "d0"},
        "export-stats": {},
        "export-resize": {"id": "d0", "size": 1 << 20},
        "export-set-qos": {"id": "d0"},
        "export-trace": {"id": "d0"},
    }
    return dict(base.get(method, {}))


@pytest.mark.parametrize(
    ("method", "name"), [(m, n) for m, s in sorted(METHODS.items()) for n in s]
)
def test_every_parameter_refuses_wrong_types(method: str, name: str) -> None:
    refused = 0
    for value in WRONG:
        params = _valid_for(method) | {name: value}
        try:
            validate(method, params)
        except RpcError as e:
            assert e.code == INVALID_PARAMS and name in e.message
            refused += 1
    # aio and format accept null and strings only; every other parameter takes one type.
    assert refused >= len(WRONG) - 2


@pytest.mark.parametrize(
    ("method", "params", "needle"),
    [
        ("export-add", {"spec": "x", "socket": "s"}, "id is required"),
        ("export-add", {"id": "d0", "socket": "s"}, "spec is required"),
        ("export-add", ADD | {"id": ""}, "not an export id"),
        ("export-add", ADD | {"id": "a b"}, "not an export id"),
        ("export-add", ADD | {"id": "x" * 33}, "not an export id"),
        ("export-add", ADD | {"id": "../etc"}, "not an export id"),
        ("export-add", ADD | {"spec": ""}, "must not be empty"),
        ("export-add", ADD | {"socket": "/" + "s" * 200}, "longer than"),
        ("export-add", ADD | {"socket": "a\0b"}, "NUL"),
        ("export-add", ADD | {"num_queues": 0}, "between 1 and 1024"),
        ("export-add", ADD | {"num_queues": 1025}, "between 1 and 1024"),
        ("export-add", ADD | {"queue_size": 100}, "power of two"),
        ("export-add", ADD | {"queue_size": 65536}, "between"),
        ("export-add", ADD | {"format": "Q C"}, "not a format name"),
        ("export-add", ADD | {"serial": "x" * 21}, "longer than 20"),
        ("export-add", ADD | {"aio": "posix"}, "one of"),
        ("export-add", ADD | {"opts": {"a": [1]}}, "opts.a"),
        ("export-resize", {"id": "d0", "size": 0}, "between"),
        ("export-resize", {"id": "d0", "size": 1000}, "multiple of 512"),
        ("export-resize", {"id": "d0"}, "size is required"),
        ("export-set-qos", {"id": "d0", "iops": -1}, "between 0"),
        ("export-set-qos", {"id": "d0", "burst_seconds": 0}, "between 0.001"),
        ("export-trace", {"id": "d0", "duration": 0}, "in (0, 60]"),
        ("export-trace", {"id": "d0", "duration": 61}, "in (0, 60]"),
        ("export-trace", {"id": "d0", "duration": float("nan")}, "in (0, 60]"),
        ("export-trace", {"id": "d0", "sample": 0}, "fraction"),
        ("export-trace", {"id": "d0", "sample": 1.5}, "fraction"),
        ("export-trace", {"duration": 1}, "id is required"),
    ],
)
def test_ranges_and_required(method: str, params: dict[str, Any], needle: str) -> None:
    _refused(method, params, needle)
