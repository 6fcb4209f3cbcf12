"""``vblk ctl export-stats``'s stage table and SVG: percentiles since each queue started.

One row per export and queue (and the export's total): each stage's
p50/p99/p99.9 over every request timed so far, with the timed count. The
SVG is the path picture of :mod:`vblk.stats.svg` labelled with one export's
total. Input is untrusted JSON; anything malformed reads as missing.
"""

from __future__ import annotations

from typing import Any

from rich.table import Table

from vblk.stats.stages import STAGES
from vblk.stats.svg import path_labels, path_svg
from vblk.stats.view import ExportView, export_views, fmt_ns


def _cell(view_stage: Any) -> str:
    if not view_stage or view_stage["count"] <= 0:
        return "-"
    return " / ".join(fmt_ns(view_stage[k]) for k in ("p50_ns", "p99_ns", "p999_ns"))


def stage_rows(stats: Any) -> list[list[str]]:
    """Rows of export, queue, timed count, then p50 / p99 / p99.9 of each stage."""
    rows: list[list[str]] = []
    for e in export_views(None, stats, 0):
        for q in [*e["queues"], e["total"]]:
            st = q["stages"]
            count = st["backend"]["count"] if "backend" in st else 0
            rows.append([e["id"], q["queue"], str(count), *(_cell(st.get(s)) for s in STAGES)])
    return rows


def stage_table(stats: Any) -> Table:
    """The rich table of :func:`stage_rows`."""
    t = Table(title="stage latency since start, p50 / p99 / p99.9 (sampled requests)")
    for col in ("export", "queue", "timed", *STAGES):
        t.add_column(col, justify="left" if col == "export" else "right")
    for row in stage_rows(stats):
        t.add_row(*row)
    return t


def export_svg(stats: Any, export: str | None = None) -> str:
    """The path picture labelled with ``export``'s total (the first export by default)."""
    views: list[ExportView] = export_views(None, stats, 0)
    chosen = [v for v in views if export is None or v["id"] == export]
    if not chosen:
        raise ValueError(f"no export {export!r} in the stats" if export else "no exports")
    v = chosen[0]
    return path_svg(path_labels(v["total"], f"vblk export {v['id']}: the virtio-blk path"))
