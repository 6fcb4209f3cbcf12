"""Tests of vblk.top's pure rendering (the live loop runs against a real export in e2e)."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from tests.test_stats_view import _queue, _stats
from vblk.top import render


def _text(renderable: Any) -> str:
    console = Console(width=250, record=True, color_system=None)
    console.print(renderable)
    return console.export_text()


def test_shows_rates_depth_and_stage_percentiles() -> None:
    text = _text(render(_stats(1000, 10_000), _stats(3000, 50_000), 2.0))
    assert "vblk top" in text
    row = next(line for line in text.splitlines() if line.startswith("│ d "))
    assert " 1000 " in row  # read IOPS
    assert " 4.1 " in row  # read MB/s
    assert " 0.50 " in row and " 0.25 " in row  # kicks, interrupts per request
    assert "µs" in row


def test_multi_queue_export_has_a_total_row() -> None:
    stats = {
        "exports": [
            {
                "id": "two",
                "state": "running",
                "queues": [_queue(100, 1000, 0), _queue(100, 1000, 1)],
                "total": _queue(200, 1000),
            }
        ]
    }
    text = _text(render(None, stats, 0.0))
    assert sum(1 for line in text.splitlines() if line.startswith("│ two ")) == 3
    assert " all " in text


def test_no_exports() -> None:
    assert "no exports" in _text(render(None, {"exports": []}, 1.0))
