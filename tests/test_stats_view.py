"""Tests of vblk.stats.view: rates and windowed stage percentiles from two stats results."""

from __future__ import annotations

from typing import Any

from vblk.stats.histogram import BOUNDS_NS, Histogram, bucket_index
from vblk.stats.stages import STAGES
from vblk.stats.view import export_views, fmt_ns, fmt_rate


def _queue(requests: int, latency_ns: int, qi: int = 0) -> dict[str, Any]:
    stages = {}
    for name in STAGES:
        h = Histogram()
        for _ in range(requests // 10):
            h.record(latency_ns)
        stages[name] = h.snapshot()
    return {
        "queue": qi,
        "requests": requests,
        "read_ops": requests,
        "write_ops": 0,
        "read_bytes": requests * 4096,
        "write_bytes": 0,
        "kicks": requests // 2,
        "interrupts": requests // 4,
        "inflight": 3,
        "held": requests // 8,
        "errors": 1,
        "stages": stages,
    }


def _stats(requests: int, latency_ns: int) -> dict[str, Any]:
    q = _queue(requests, latency_ns)
    return {"exports": [{"id": "d", "state": "running", "queues": [q], "total": q}]}


def test_rates_over_the_interval() -> None:
    (view,) = export_views(_stats(1000, 10_000), _stats(3000, 10_000), 2.0)
    q = view["queues"][0]
    assert q["iops"] == 1000 and q["read_iops"] == 1000 and q["write_iops"] == 0
    assert q["read_mbps"] == 1000 * 4096 / 1e6
    assert q["kicks_per_req"] == 0.5 and q["irqs_per_req"] == 0.25
    assert q["inflight"] == 3 and q["errors"] == 1 and q["held"] == 125


def test_stage_percentiles_cover_only_the_interval() -> None:
    before = _stats(1000, 10_000)
    after = _stats(1000, 10_000)
    # 100 more timed requests, all at 1 ms.
    for name in STAGES:
        h = Histogram.from_snapshot(after["exports"][0]["queues"][0]["stages"][name])
        for _ in range(100):
            h.record(1_000_000)
        after["exports"][0]["queues"][0]["stages"][name] = h.snapshot()
    (view,) = export_views(before, after, 1.0)
    st = view["queues"][0]["stages"]["host_io"]
    idx = bucket_index(1_000_000)
    assert st["count"] == 100
    assert BOUNDS_NS[idx - 1] <= st["p50_ns"] <= BOUNDS_NS[idx]


def test_without_before_everything_since_the_start_and_no_rates() -> None:
    (view,) = export_views(None, _stats(500, 20_000), 1.0)
    q = view["total"]
    assert q["iops"] == 0 and q["stages"]["backend"]["count"] == 50
    assert q["kicks_per_req"] == 0.5


def test_restart_reads_as_a_fresh_start() -> None:
    (view,) = export_views(_stats(5000, 1000), _stats(100, 1000), 1.0)
    assert view["total"]["iops"] == 0 and view["total"]["stages"]["device"]["count"] == 10


def test_malformed_input_reads_as_zero() -> None:
    bad = {"exports": [{"id": "x", "queues": ["no", {"queue": "1", "stages": {"device": 5}}]}, 7]}
    (view,) = export_views({"exports": "nonsense"}, bad, 1.0)
    assert view["id"] == "x" and view["state"] == "?"
    assert view["queues"][0]["stages"]["device"]["count"] == 0
    assert export_views(None, None, 1.0) == []
    assert export_views(None, {"exports": [{"id": 3}]}, 1.0) == []


def test_formatting() -> None:
    assert fmt_ns(0) == "-"
    assert fmt_ns(850) == "850 ns"
    assert fmt_ns(12_345) == "12.3 µs"
    assert fmt_ns(4_560_000) == "4.56 ms"
    assert fmt_ns(1_200_000_000) == "1.2 s"
    assert fmt_rate(950) == "950/s"
    assert fmt_rate(12_345) == "12.3k/s"
    assert fmt_rate(1_200_000) == "1.2M/s"
