"""``vblk top``: a live terminal view of every export's queues, from ``export-stats``.

:func:`render` is pure (two stats results and the seconds between them in, a
rich renderable out) so it is tested without a terminal; :func:`cmd_top` is
the loop that polls the control socket once a second and redraws.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from rich.console import Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from vblk.stats.rpc import call
from vblk.stats.stages import STAGES
from vblk.stats.view import QueueView, export_views, fmt_ns

#: Seconds between two refreshes.
INTERVAL = 1.0


def _row(export: str, q: QueueView) -> list[str]:
    cells = [
        export,
        q["queue"],
        f"{q['read_iops']:.0f}",
        f"{q['write_iops']:.0f}",
        f"{q['read_mbps']:.1f}",
        f"{q['write_mbps']:.1f}",
        str(q["inflight"]),
        f"{q['kicks_per_req']:.2f}",
        f"{q['irqs_per_req']:.2f}",
        f"{q['held']:.0f}",
        str(q["errors"]),
    ]
    for name in STAGES:
        st = q["stages"][name]
        cells.append(f"{fmt_ns(st['p50_ns'])}\n{fmt_ns(st['p99_ns'])}" if st["count"] else "-")
    return cells


def render(before: Any, after: Any, dt: float) -> RenderableType:
    """The view of ``after`` with rates since ``before`` (None: since the start)."""
    table = Table(title="vblk top", expand=False, show_lines=False)
    for name in ("export", "queue", "r IOPS", "w IOPS", "r MB/s", "w MB/s", "depth"):
        table.add_column(name, justify="right" if name != "export" else "left")
    for name in ("kicks/req", "irqs/req", "held/s", "errors"):
        table.add_column(name, justify="right")
    for name in STAGES:
        table.add_column(f"{name}\np50 / p99", justify="right")
    views = export_views(before, after, dt)
    for view in views:
        for q in view["queues"]:
            table.add_row(*_row(view["id"], q))
        if len(view["queues"]) != 1:
            table.add_row(*_row(view["id"], view["total"]), style="bold")
    note = Text(
        f"{len(views)} exports · rates over {dt:.1f}s · stage percentiles over the requests "
        "timed in that interval",
        style="dim",
    )
    if not views:
        note = Text("no exports", style="dim")
    return Group(table, note)


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "top",
        help="live view of the daemon's exports: IOPS, MB/s, depth, stage latencies",
        description="Poll export-stats once a second and show, per export and queue, "
        "read/write IOPS and MB/s, in-flight depth, kicks and interrupts per request, "
        "held interrupts, errors and p50/p99 of each stage.",
    )
    p.add_argument("--control", required=True, metavar="PATH", help="the daemon's control socket")
    p.add_argument(
        "--iterations", type=int, default=0, metavar="N", help="stop after N refreshes (0: never)"
    )
    p.set_defaults(func=cmd_top)


def cmd_top(args: argparse.Namespace) -> int:
    before = None
    t_before = time.monotonic()
    after = call(args.control, "export-stats")
    t_after = time.monotonic()
    n = 0
    with Live(render(None, after, 0.0), auto_refresh=False, screen=False) as live:
        try:
            while not args.iterations or n < args.iterations:
                time.sleep(INTERVAL)
                before, t_before = after, t_after
                after = call(args.control, "export-stats")
                t_after = time.monotonic()
                live.update(render(before, after, t_after - t_before), refresh=True)
                n += 1
        except KeyboardInterrupt:
            pass
    return 0
