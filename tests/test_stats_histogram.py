"""Tests of vblk.stats.histogram: the bucket table, indexing, percentiles, merge and snapshots."""

from __future__ import annotations

import bisect
import itertools
import json
import random

import pytest

from vblk.stats.histogram import (
    BOUNDS_NS,
    BOUNDS_SECONDS,
    NBUCKETS,
    SUB_BUCKETS,
    Histogram,
    bucket_index,
    delta_snapshot,
    merge_snapshots,
    percentile_of,
)


def test_bounds_cover_128ns_to_30s_increasing() -> None:
    assert BOUNDS_NS[0] == 128
    assert BOUNDS_NS[-1] >= 30 * 10**9
    assert all(a < b for a, b in itertools.pairwise(BOUNDS_NS))
    assert NBUCKETS == len(BOUNDS_NS) + 1
    assert BOUNDS_SECONDS == tuple(b / 1e9 for b in BOUNDS_NS)
    # Each bucket is at most 1/SUB_BUCKETS wide relative to its lower bound.
    for lo, hi in itertools.pairwise(BOUNDS_NS):
        assert (hi - lo) * SUB_BUCKETS <= lo


def _reference_index(ns: int) -> int:
    """Upper-inclusive bucket by bisection: the first bound >= ns."""
    return bisect.bisect_left(BOUNDS_NS, ns)


@pytest.mark.parametrize(
    "ns", [-5, 0, 1, 127, 128, 129, 159, 160, 161, 1000, 2**20, 2**35, 2**35 + 1]
)
def test_bucket_index_edges(ns: int) -> None:
    assert bucket_index(ns) == _reference_index(ns)


def test_bucket_index_matches_bisection_everywhere() -> None:
    rng = random.Random(7)
    values = [b + d for b in BOUNDS_NS for d in (-1, 0, 1)]
    values += [int(2 ** rng.uniform(0, 37)) for _ in range(5000)]
    for ns in values:
        assert bucket_index(ns) == _reference_index(ns), ns


def test_record_counts_sum_and_bucket() -> None:
    hist = Histogram()
    for ns in (100, 1000, 1000, 10**12):
        hist.record(ns)
    assert hist.count == 4
    assert hist.sum_ns == 100 + 2000 + 10**12
    assert hist.buckets[0] == 1
    assert hist.buckets[bucket_index(1000)] == 2
    assert hist.buckets[NBUCKETS - 1] == 1
    assert sum(hist.buckets) == hist.count


def test_record_keeps_the_same_list() -> None:
    hist = Histogram()
    buckets = hist.buckets
    for ns in range(0, 10**7, 997):
        hist.record(ns)
    assert hist.buckets is buckets
    hist.reset()
    assert hist.buckets is buckets and hist.count == 0 and sum(buckets) == 0


def test_percentile_empty_is_zero() -> None:
    assert Histogram().percentile(99) == 0


def test_percentile_within_bucket_of_true_value() -> None:
    rng = random.Random(1)
    values = [int(rng.lognormvariate(11, 1)) for _ in range(20000)]  # around 60 us
    hist = Histogram()
    for v in values:
        hist.record(v)
    values.sort()
    for p in (50.0, 90.0, 99.0, 99.9):
        true = values[int(len(values) * p / 100) - 1]
        got = hist.percentile(p)
        # The estimate lies in the true value's bucket, or at one of its edges.
        idx = bucket_index(true)
        lo = BOUNDS_NS[idx - 1] if idx else 0
        assert lo <= got <= BOUNDS_NS[idx], (p, true, got)


def test_percentile_interpolates_inside_one_bucket() -> None:
    hist = Histogram()
    for _ in range(4):
        hist.record(1000)
    idx = bucket_index(1000)
    lo, hi = BOUNDS_NS[idx - 1], BOUNDS_NS[idx]
    assert hist.percentile(50) == lo + (hi - lo) // 2
    assert hist.percentile(100) == hi


def test_percentile_in_overflow_is_last_bound() -> None:
    hist = Histogram()
    hist.record(10**12)
    assert hist.percentile(50) == BOUNDS_NS[-1]


def test_percentile_is_monotonic_in_p() -> None:
    hist = Histogram()
    rng = random.Random(3)
    for _ in range(1000):
        hist.record(rng.randrange(100, 10**8))
    ps = [hist.percentile(p) for p in (1, 10, 50, 90, 99, 99.9, 100)]
    assert ps == sorted(ps)


def test_merge_equals_recording_all() -> None:
    a, b, both = Histogram(), Histogram(), Histogram()
    for i, ns in enumerate(range(50, 10**6, 1013)):
        (a if i % 3 else b).record(ns)
        both.record(ns)
    a.merge(b)
    assert a.buckets == both.buckets
    assert (a.count, a.sum_ns) == (both.count, both.sum_ns)


def test_snapshot_is_json_and_round_trips() -> None:
    hist = Histogram()
    for ns in (200, 5000, 70000, 70000):
        hist.record(ns)
    snap = json.loads(json.dumps(hist.snapshot()))
    assert set(snap) == {"count", "sum_ns", "buckets", "p50_ns", "p99_ns", "p999_ns"}
    assert snap["count"] == 4 and len(snap["buckets"]) == NBUCKETS
    assert snap["p50_ns"] == hist.percentile(50)
    assert snap["p50_ns"] <= snap["p99_ns"] <= snap["p999_ns"]
    again = Histogram.from_snapshot(snap)
    assert again.buckets == hist.buckets and again.sum_ns == hist.sum_ns


def test_from_snapshot_rejects_another_table() -> None:
    snap = Histogram().snapshot()
    snap["buckets"] = [0] * 3
    with pytest.raises(ValueError, match="buckets"):
        Histogram.from_snapshot(snap)


def test_merge_snapshots_and_delta() -> None:
    a, b = Histogram(), Histogram()
    a.record(1000)
    b.record(2000)
    merged = merge_snapshots([a.snapshot(), b.snapshot()])
    assert merged["count"] == 2 and merged["sum_ns"] == 3000
    before = a.snapshot()
    for _ in range(10):
        a.record(10**6)
    delta = delta_snapshot(before, a.snapshot())
    assert delta["count"] == 10 and delta["sum_ns"] == 10**7
    idx = bucket_index(10**6)
    assert BOUNDS_NS[idx - 1] <= delta["p50_ns"] <= BOUNDS_NS[idx]
    # A restarted export (counters went back) yields the new snapshot as is.
    fresh = Histogram()
    fresh.record(5)
    assert delta_snapshot(a.snapshot(), fresh.snapshot())["count"] == 1


def test_percentile_of_plain_list() -> None:
    buckets = [0] * NBUCKETS
    buckets[0] = 10
    assert 0 <= percentile_of(buckets, 50) <= BOUNDS_NS[0]
