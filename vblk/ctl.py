"""``vblk ctl``: call one method on a daemon's control socket.

``vblk ctl --control PATH METHOD [key=value ...]``: each value is parsed as
JSON where it parses (numbers, true/false, objects) and taken as a string
otherwise. export-list and export-stats print tables; every other method,
or any with ``--json``, prints the result as JSON. An error is one line on
stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from vblk.cli import positive_float_upto
from vblk.control.methods import METHODS
from vblk.errors import VblkError

__all__ = ["add_parser", "parse_assignments"]


class CtlError(VblkError):
    """The command line asks for something the client cannot send."""


def parse_assignments(items: list[str]) -> dict[str, Any]:
    """``key=value`` words as params; values are JSON where they parse, else strings."""
    params: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise CtlError(f"{item!r}: expected key=value")
        try:
            value: Any = json.loads(text)
        except ValueError:
            value = text
        params[key] = value
    return params


_timeout = positive_float_upto(86400, "seconds")


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "ctl",
        help="call a method on a vblk daemon's control socket",
        description="Call METHOD on the daemon's control socket. Methods: " + ", ".join(METHODS),
    )
    p.add_argument("--control", required=True, metavar="PATH", help="the daemon's control socket")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument(
        "--timeout", type=_timeout, default=120.0, metavar="S", help="answer timeout (default 120)"
    )
    p.add_argument(
        "--svg",
        metavar="FILE",
        help="export-stats only: also write the path picture with one export's numbers "
        "(id=ID, else the first) as an SVG",
    )
    p.add_argument("method", metavar="METHOD")
    p.add_argument("params", nargs="*", metavar="KEY=VALUE")
    p.set_defaults(func=cmd_ctl)


def cmd_ctl(args: argparse.Namespace) -> int:
    from vblk.stats.rpc import call

    params = parse_assignments(args.params)
    if args.svg and args.method != "export-stats":
        raise CtlError("--svg goes with export-stats only")
    result = call(args.control, args.method, params, timeout=args.timeout)
    if args.svg:
        _write_svg(args.svg, result, params.get("id"))
    if args.json or args.method not in ("export-list", "export-stats"):
        print(json.dumps(result, indent=2))
        return 0
    from rich.console import Console

    console = Console()
    if args.method == "export-list":
        console.print(list_table(result))
    else:
        from vblk.stats.table import stage_table

        console.print(stats_table(result))
        console.print(stage_table(result))
    return 0


def _write_svg(path: str, result: Any, export: Any) -> None:
    from vblk.stats.table import export_svg

    try:
        svg = export_svg(result, export if isinstance(export, str) else None)
    except ValueError as e:
        raise CtlError(f"--svg: {e}") from None
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(svg)
    except OSError as e:
        raise CtlError(f"--svg {path}: {e.strerror}") from None


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f}"


def list_table(exports: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    t = Table(title="exports")
    for col in ("id", "state", "pid", "restarts", "size", "queues", "socket", "spec", "qos"):
        t.add_column(col)
    for e in exports:
        qos = {k: v for k, v in e.get("qos", {}).items() if v and k != "burst_seconds"}
        t.add_row(
            e["id"],
            e["state"],
            str(e["pid"] or "-"),
            str(e["restarts"]),
            f"{e['size'] / (1 << 20):.0f} MiB",
            str(e["num_queues"]),
            e["socket"],
            e["spec"],
            " ".join(f"{k}={v}" for k, v in qos.items()) or "-",
        )
    return t


def stats_table(stats: dict[str, Any]) -> Any:
    from rich.table import Table

    t = Table(title="export stats")
    cols = (
        "export",
        "queue",
        "state",
        "requests",
        "reads",
        "writes",
        "MiB read",
        "MiB written",
        "flushes",
        "discards",
        "errors",
        "kicks",
        "interrupts",
        "inflight",
    )
    for col in cols:
        t.add_column(col, justify="left" if col in ("export", "state") else "right")
    for e in stats.get("exports", []):
        rows = [(str(q["queue"]), q) for q in e.get("queues", [])] + [("all", e["total"])]
        for name, q in rows:
            t.add_row(
                e["id"], name, e["state"], str(q.get("requests", 0)), str(q.get("read_ops", 0)),
                str(q.get("write_ops", 0)), _mib(q.get("read_bytes", 0)),
                _mib(q.get("write_bytes", 0)), str(q.get("flushes", 0)),
                str(q.get("discards", 0)), str(q.get("errors", 0)), str(q.get("kicks", 0)),
                str(q.get("interrupts", 0)), str(q.get("inflight", 0)),
            )  # fmt: skip
    return t
