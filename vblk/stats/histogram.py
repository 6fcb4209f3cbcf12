"""Fixed log-linear latency histograms, cheap enough to record every request.

The bucket table is a module constant shared by every histogram, the control
socket's snapshots and the Prometheus exposition, so snapshots from any export
or queue merge by adding lists. Buckets are upper-inclusive, like Prometheus'
``le``: bucket ``i`` holds ``BOUNDS_NS[i-1] < ns <= BOUNDS_NS[i]``, bucket 0
holds everything up to ``BOUNDS_NS[0]`` and the last bucket (index
``len(BOUNDS_NS)``) is the overflow above ``BOUNDS_NS[-1]``.

Between 128 ns and 2**35 ns (34 s) each power of two is cut into
``SUB_BUCKETS`` equal parts, so a bucket is at most 1/SUB_BUCKETS (25%) wide
relative to its lower edge; percentiles interpolate inside it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict

#: log2 of the linear sub-buckets per power of two.
SUB_BITS = 2
SUB_BUCKETS = 1 << SUB_BITS
#: The smallest bound: 2**MIN_EXP ns; everything at or below it shares bucket 0.
MIN_EXP = 7
#: The largest finite bound: 2**MAX_EXP ns (about 34 s).
MAX_EXP = 35


def _bounds() -> tuple[int, ...]:
    bounds = [1 << MIN_EXP]
    for exp in range(MIN_EXP, MAX_EXP):
        shift = exp - SUB_BITS
        for sub in range(SUB_BUCKETS):
            bounds.append((SUB_BUCKETS + sub + 1) << shift)
    return tuple(bounds)


#: Upper bounds of the finite buckets, in nanoseconds, strictly increasing.
BOUNDS_NS: tuple[int, ...] = _bounds()
#: The same bounds in seconds, for a Prometheus histogram's ``buckets``.
BOUNDS_SECONDS: tuple[float, ...] = tuple(b / 1e9 for b in BOUNDS_NS)
#: Number of buckets in a histogram: the finite ones plus the overflow.
NBUCKETS = len(BOUNDS_NS) + 1

_MIN_NS = 1 << MIN_EXP
_MAX_NS = 1 << MAX_EXP
_OVERFLOW = NBUCKETS - 1
# Index of value v (in (2**e, 2**(e+1)]) is 1 + (e - MIN_EXP) * SUB + sub, where
# e and sub come from v - 1; folding the constants: (e << SUB_BITS) + (m >> shift) - _BASE.
_BASE = (MIN_EXP << SUB_BITS) + SUB_BUCKETS - 1


def bucket_index(ns: int) -> int:
    """The bucket of a latency in nanoseconds (negative values count as 0)."""
    if ns <= _MIN_NS:
        return 0
    if ns > _MAX_NS:
        return _OVERFLOW
    m = ns - 1
    exp = m.bit_length() - 1
    return (exp << SUB_BITS) + (m >> (exp - SUB_BITS)) - _BASE


class StageSnapshot(TypedDict):
    """One histogram as it travels in ``export-stats`` (JSON-ready)."""

    count: int
    sum_ns: int
    buckets: list[int]
    p50_ns: int
    p99_ns: int
    p999_ns: int


def percentile_of(buckets: Sequence[int], p: float) -> int:
    """The latency (ns) below which ``p`` percent of the counted values fall.

    Linear interpolation inside the bucket holding the rank, between its lower
    and upper bound (as Prometheus' ``histogram_quantile`` does); 0 for an
    empty histogram, and the last finite bound for a rank in the overflow.
    """
    total = sum(buckets)
    if total <= 0:
        return 0
    rank = total * min(max(p, 0.0), 100.0) / 100.0
    seen = 0
    for idx, count in enumerate(buckets):
        if count <= 0:
            continue
        if seen + count >= rank:
            if idx >= _OVERFLOW:
                return BOUNDS_NS[-1]
            lo = BOUNDS_NS[idx - 1] if idx else 0
            hi = BOUNDS_NS[idx]
            return int(lo + (hi - lo) * (rank - seen) / count)
        seen += count
    return BOUNDS_NS[-1]


class Histogram:
    """Counts of latencies by bucket, with their count and sum.

    ``record`` touches only preallocated state: one list slot and two ints.
    A histogram is written by one thread; readers take ``snapshot()``, which
    may be a request behind on a busy queue (the GIL keeps each slot whole).
    """

    __slots__ = ("buckets", "count", "sum_ns")

    def __init__(self) -> None:
        self.buckets: list[int] = [0] * NBUCKETS
        self.count = 0
        self.sum_ns = 0

    def record(self, ns: int) -> None:
        """Count one latency of ``ns`` nanoseconds."""
        if ns <= _MIN_NS:
            self.buckets[0] += 1
        elif ns > _MAX_NS:
            self.buckets[_OVERFLOW] += 1
        else:
            m = ns - 1
            exp = m.bit_length() - 1
            self.buckets[(exp << SUB_BITS) + (m >> (exp - SUB_BITS)) - _BASE] += 1
        self.count += 1
        self.sum_ns += ns

    def merge(self, other: Histogram) -> None:
        """Add ``other``'s counts into this histogram."""
        mine = self.buckets
        for idx, count in enumerate(other.buckets):
            if count:
                mine[idx] += count
        self.count += other.count
        self.sum_ns += other.sum_ns

    def reset(self) -> None:
        """Forget every value (the list is kept, not reallocated)."""
        buckets = self.buckets
        for idx in range(NBUCKETS):
            buckets[idx] = 0
        self.count = 0
        self.sum_ns = 0

    def percentile(self, p: float) -> int:
        """See :func:`percentile_of`."""
        return percentile_of(self.buckets, p)

    def snapshot(self) -> StageSnapshot:
        """A JSON-ready copy: counts, sum, buckets and p50/p99/p99.9."""
        buckets = list(self.buckets)
        return {
            "count": self.count,
            "sum_ns": self.sum_ns,
            "buckets": buckets,
            "p50_ns": percentile_of(buckets, 50.0),
            "p99_ns": percentile_of(buckets, 99.0),
            "p999_ns": percentile_of(buckets, 99.9),
        }

    @classmethod
    def from_snapshot(cls, snap: StageSnapshot) -> Histogram:
        """Rebuild a histogram from a snapshot (e.g. one read over the control socket).

        Raises ValueError if the bucket list does not have this table's length.
        """
        buckets = snap["buckets"]
        if len(buckets) != NBUCKETS:
            raise ValueError(f"histogram has {len(buckets)} buckets, expected {NBUCKETS}")
        hist = cls()
        hist.buckets = [int(c) for c in buckets]
        hist.count = int(snap["count"])
        hist.sum_ns = int(snap["sum_ns"])
        return hist


def merge_snapshots(snaps: Sequence[StageSnapshot]) -> StageSnapshot:
    """One snapshot summing several (e.g. an export's queues)."""
    total = Histogram()
    for snap in snaps:
        total.merge(Histogram.from_snapshot(snap))
    return total.snapshot()


def delta_snapshot(before: StageSnapshot, after: StageSnapshot) -> StageSnapshot:
    """The values recorded between two snapshots of one histogram, with their percentiles.

    A counter that went backwards (the export restarted) gives ``after`` as is.
    """
    if after["count"] < before["count"] or len(before["buckets"]) != len(after["buckets"]):
        return after
    hist = Histogram()
    hist.buckets = [max(0, a - b) for a, b in zip(after["buckets"], before["buckets"], strict=True)]
    hist.count = after["count"] - before["count"]
    hist.sum_ns = after["sum_ns"] - before["sum_ns"]
    return hist.snapshot()
