"""The Prometheus collector from a stats snapshot, parsed back with prometheus_client's parser."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from vblk.metrics import MetricsError, StatsCollector, parse_address
from vblk.stats.histogram import BOUNDS_SECONDS, NBUCKETS


def _snapshot() -> dict[str, Any]:
    buckets = [0] * NBUCKETS
    buckets[10] = 3
    buckets[20] = 1
    stage = {"count": 4, "sum_ns": 4000, "buckets": buckets, "p50_ns": 1, "p99_ns": 2, "p999_ns": 3}
    q = {"queue": 0, "requests": 7, "read_ops": 5, "write_ops": 2, "read_bytes": 20480,
         "write_bytes": 8192, "flushes": 1, "discards": 0, "write_zeroes": 0, "errors": 0,
         "kicks": 3, "interrupts": 4, "inflight": 1, "held": 0,
         "stages": {"backend": stage}}  # fmt: skip
    return {"exports": [{"id": "d0", "state": "attached", "restarts": 2, "size": 1 << 20,
                         "queues": [q]}]}  # fmt: skip


def test_families_names_and_values() -> None:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(StatsCollector(_snapshot))
    text = generate_latest(reg).decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }
    lab = (("export", "d0"), ("queue", "0"))
    assert samples[("vblk_requests_total", lab)] == 7
    assert samples[("vblk_read_bytes_total", lab)] == 20480
    assert samples[("vblk_inflight_requests", lab)] == 1
    assert samples[("vblk_export_restarts_total", (("export", "d0"),))] == 2
    assert samples[("vblk_export_attached", (("export", "d0"),))] == 1
    hl = (*lab, ("stage", "backend"))
    le10 = (
        ("export", "d0"),
        ("le", repr(BOUNDS_SECONDS[10])),
        ("queue", "0"),
        ("stage", "backend"),
    )
    assert samples[("vblk_stage_seconds_bucket", le10)] == 3
    assert samples[("vblk_stage_seconds_count", hl)] == 4
    assert samples[("vblk_stage_seconds_sum", hl)] == pytest.approx(4e-6)


def test_parse_address() -> None:
    assert parse_address("127.0.0.1:9100") == ("127.0.0.1", 9100)
    assert parse_address(":9100") == ("", 9100)
    assert parse_address("[::1]:9100") == ("::1", 9100)
    with pytest.raises(MetricsError):
        parse_address("localhost")
