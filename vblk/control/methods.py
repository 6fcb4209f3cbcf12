"""The control methods and their parameters, checked before anything runs.

:func:`validate` takes a method name and the params object a client sent and
returns the params with defaults filled in, or raises an
:class:`~vblk.control.jsonrpc.RpcError` that names the parameter at fault:
wrong type, out of range, missing, or unknown. The daemon only ever sees
checked values.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vblk.blk.config import DEFAULT_NUM_QUEUES, MAX_NUM_QUEUES
from vblk.control.jsonrpc import INVALID_PARAMS, METHOD_NOT_FOUND, RpcError
from vblk.io.engines import ENGINES
from vblk.virtio.defs import MAX_QUEUE_SIZE, is_queue_size

__all__ = ["ENGINES", "MAX_NUM_QUEUES", "METHODS", "QOS_KEYS", "validate"]

#: Export ids: short, printable, safe in a log line, a metric label and a thread name.
ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
FORMAT_RE = re.compile(r"[a-z0-9][a-z0-9_-]*")
#: A unix socket path must fit sun_path (108 bytes with its NUL).
MAX_SOCKET_PATH = 107
#: The rate limits of export-set-qos; 0 is unlimited.
QOS_KEYS = ("iops", "bps", "read_iops", "write_iops", "read_bps", "write_bps")
#: Limits beyond these are typos, not limits (1e9 ops/s, 1 PB/s).
MAX_IOPS = 10**9
MAX_BPS = 10**15
MAX_SIZE = 1 << 60

Check = Callable[[str, Any], Any]


def _bad(name: str, why: str) -> RpcError:
    return RpcError(INVALID_PARAMS, f"invalid params: {name}: {why}")


def _int(lo: int, hi: int) -> Check:
    def check(name: str, v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise _bad(name, f"expected an integer, got {type(v).__name__}")
        if not lo <= v <= hi:
            raise _bad(name, f"must be between {lo} and {hi}, got {v}")
        return v

    return check


def _bool(name: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise _bad(name, f"expected true or false, got {type(v).__name__}")
    return v


def _str(max_bytes: int) -> Check:
    def check(name: str, v: Any) -> str:
        if not isinstance(v, str):
            raise _bad(name, f"expected a string, got {type(v).__name__}")
        if len(v.encode()) > max_bytes:
            raise _bad(name, f"longer than {max_bytes} bytes")
        if "\0" in v:
            raise _bad(name, "contains a NUL character")
        return v

    return check


def _nonempty(max_bytes: int) -> Check:
    base = _str(max_bytes)

    def check(name: str, v: Any) -> str:
        s: str = base(name, v)
        if not s:
            raise _bad(name, "must not be empty")
        return s

    return check


def _export_id(name: str, v: Any) -> str:
    if not isinstance(v, str):
        raise _bad(name, f"expected a string, got {type(v).__name__}")
    if not ID_RE.fullmatch(v):
        raise _bad(name, f"{v[:40]!r} is not an export id (1-32 of A-Z a-z 0-9 _ . -)")
    return v


def _queue_size(name: str, v: Any) -> int:
    n: int = _int(1, MAX_QUEUE_SIZE)(name, v)
    if not is_queue_size(n):
        raise _bad(name, f"must be a power of two, got {n}")
    return n


def _format(name: str, v: Any) -> str | None:
    if v is None:
        return None
    s: str = _str(32)(name, v)
    if not FORMAT_RE.fullmatch(s):
        raise _bad(name, f"{s!r} is not a format name")
    return s


def _engine(name: str, v: Any) -> str | None:
    if v is None:
        return None
    if v not in ENGINES:
        raise _bad(name, f"must be one of {', '.join(ENGINES)}, got {str(v)[:40]!r}")
    return str(v)


def _opts(name: str, v: Any) -> dict[str, str | int | bool]:
    if not isinstance(v, dict):
        raise _bad(name, f"expected an object, got {type(v).__name__}")
    out: dict[str, str | int | bool] = {}
    for k, val in v.items():
        if not isinstance(val, str | int | bool):
            raise _bad(
                f"{name}.{k}", f"expected a string, number or boolean, got {type(val).__name__}"
            )
        out[k] = val
    return out


def _seconds(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise _bad(name, f"expected a number, got {type(v).__name__}")
    if not 0.001 <= v <= 3600:
        raise _bad(name, f"must be between 0.001 and 3600 seconds, got {v}")
    return float(v)


def _size(name: str, v: Any) -> int:
    n: int = _int(1, MAX_SIZE)(name, v)
    if n % 512:
        raise _bad(name, f"must be a multiple of 512 bytes, got {n}")
    return n


def _trace_duration(name: str, v: Any) -> float:
    from vblk.stats.tracing import MAX_DURATION

    if isinstance(v, bool) or not isinstance(v, int | float):
        raise _bad(name, f"expected a number, got {type(v).__name__}")
    if not 0 < v <= MAX_DURATION:
        raise _bad(name, f"must be in (0, {MAX_DURATION:g}] seconds, got {v}")
    return float(v)


def _fraction(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise _bad(name, f"expected a number, got {type(v).__name__}")
    if not 0 < v <= 1:
        raise _bad(name, f"must be a fraction in (0, 1], got {v}")
    return float(v)


#: A Param default meaning "leave it out of the checked params".
OMIT: Any = object()


@dataclass(frozen=True)
class Param:
    check: Check
    required: bool = False
    default: Any = OMIT


_ID = Param(_export_id, required=True)

METHODS: dict[str, dict[str, Param]] = {
    "export-add": {
        "id": _ID,
        "spec": Param(_nonempty(4096), required=True),
        "socket": Param(_nonempty(MAX_SOCKET_PATH), required=True),
        "num_queues": Param(_int(1, MAX_NUM_QUEUES), default=DEFAULT_NUM_QUEUES),
        "queue_size": Param(_queue_size, default=MAX_QUEUE_SIZE),
        "read_only": Param(_bool, default=False),
        "serial": Param(_str(20), default=""),
        "direct": Param(_bool, default=False),
        "aio": Param(_engine, default=None),
        "opts": Param(_opts, default={}),  # never mutated
        "format": Param(_format, default=None),
    },
    "export-remove": {"id": _ID},
    "export-list": {},
    "export-stats": {"id": Param(_export_id)},
    "export-resize": {
        "id": _ID,
        "size": Param(_size, required=True),
        "force": Param(_bool, default=False),
    },
    "export-set-qos": {
        "id": _ID,
        **{k: Param(_int(0, MAX_BPS if k.endswith("bps") else MAX_IOPS)) for k in QOS_KEYS},
        "burst_seconds": Param(_seconds),
    },
    "export-trace": {
        "id": _ID,
        "duration": Param(_trace_duration, default=5.0),
        "sample": Param(_fraction, default=1.0),
    },
    "daemon-shutdown": {},
}


def validate(method: str, params: dict[str, Any]) -> dict[str, Any]:
    """Checked params of ``method`` with defaults; RpcError for anything wrong."""
    schema = METHODS.get(method)
    if schema is None:
        shown = method[:60]
        raise RpcError(
            METHOD_NOT_FOUND,
            f"method not found: {shown!r} (methods: {', '.join(METHODS)})",
        )
    unknown = [k for k in params if k not in schema]
    if unknown:
        raise RpcError(
            INVALID_PARAMS,
            f"invalid params: unknown parameter(s) {', '.join(repr(k[:40]) for k in unknown)} "
            f"for {method}",
        )
    out: dict[str, Any] = {}
    for name, p in schema.items():
        if name in params:
            out[name] = p.check(name, params[name])
        elif p.required:
            raise RpcError(INVALID_PARAMS, f"invalid params: {name} is required for {method}")
        elif p.default is not OMIT:
            out[name] = p.default
    return out
