"""``vblk ctl export-stats``'s stage table and SVG: percentiles since each queue started.

One row per export, queue (and the export's total) and stage: its
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


def stage_rows(stats: Any) -> list[list[str]]:
    """Rows of export, queue, stage, timed count, p50, p99 and p99.9."""
    rows: list[list[str]] = []
    for e in export_views(None, stats, 0):
        for q in [*e["queues"], e["total"]]:
            for stage in STAGES:
                v = q["stages"].get(stage)
                if v is None or v["count"] <= 0:
                    rows.append([e["id"], q["queue"], stage, "0", "-", "-", "-"])
                    continue
                cells = (fmt_ns(v[k]) for k in ("p50_ns", "p99_ns", "p999_ns"))
                rows.append([e["id"], q["queue"], stage, str(v["count"]), *cells])
    return rows


def stage_table(stats: Any) -> Table:
    """The rich table of :func:`stage_rows`, one section per queue."""
    t = Table(title="stage latency of the timed (sampled) requests since start")
    for col in ("export", "queue", "stage", "timed", "p50", "p99", "p99.9"):
        t.add_column(col, justify="left" if col in ("export", "stage") else "right")
    for i, row in enumerate(stage_rows(stats)):
        t.add_row(*row, end_section=(i + 1) % len(STAGES) == 0)
    return t


def export_svg(stats: Any, export: str | None = None) -> str:
    """The path picture labelled with ``export``'s total (the first export by default)."""
    views: list[ExportView] = export_views(None, stats, 0)
    chosen = [v for v in views if export is None or v["id"] == export]
    if not chosen:
        raise ValueError(f"no export {export!r} in the stats" if export else "no exports")
    v = chosen[0]
    return path_svg(path_labels(v["total"], f"vblk export {v['id']}: the virtio-blk path"))
