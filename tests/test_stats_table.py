"""Tests of vblk.stats.table: the stage percentile table and the SVG of export-stats."""

from __future__ import annotations

from typing import Any

import pytest

from vblk.stats.histogram import Histogram
from vblk.stats.stages import STAGES
from vblk.stats.table import export_svg, stage_rows, stage_table


def _stages(ns: int, n: int) -> dict[str, Any]:
    out = {}
    for stage in STAGES:
        h = Histogram()
        for i in range(n):
            h.record(ns * (10 if i == n - 1 else 1))
        out[stage] = h.snapshot()
    return out


def _stats() -> dict[str, Any]:
    q0 = {"queue": 0, "requests": 100, "stages": _stages(2_000, 1000)}
    return {
        "exports": [
            {"id": "disk", "state": "attached", "queues": [q0], "total": dict(q0)},
            {"id": "idle", "state": "listening", "queues": [], "total": {}},
        ]
    }


def test_rows_hold_p50_p99_p999_per_stage() -> None:
    rows = stage_rows(_stats())
    n = len(STAGES)
    assert len(rows) == 3 * n
    assert [r[:4] for r in rows[:n]] == [["disk", "0", s, "1000"] for s in STAGES]
    assert [r[:2] for r in rows[n::n]] == [["disk", "all"], ["idle", "all"]]
    cells = rows[0][4:]
    assert all(c.endswith(" µs") for c in cells), cells
    p50, p99, p999 = (float(c.split()[0]) for c in cells)
    assert 1.5 <= p50 <= p99 <= p999 <= 2.5  # the one 20 µs value is above p99.9
    assert rows[-1][3:] == ["0", "-", "-", "-"]
    assert stage_table(_stats()).row_count == 3 * n


def test_malformed_stats_read_as_empty() -> None:
    rows = stage_rows({"exports": [{"id": "x", "queues": [{"stages": {"backend": [1]}}]}]})
    assert len(rows) == 2 * len(STAGES)
    assert all(r[3:] == ["0", "-", "-", "-"] for r in rows)
    assert stage_rows("nonsense") == []


def test_svg_of_one_export() -> None:
    svg = export_svg(_stats(), "disk")
    assert svg.startswith("<svg") and "vblk export disk" in svg and "p50 1.92 µs" in svg
    with pytest.raises(ValueError, match="no export 'nope'"):
        export_svg(_stats(), "nope")
