"""Rate limits for an export's requests: token buckets as QEMU's throttling has them.

Each limit (total, read or write; operations or bytes per second) is a leaky
bucket: a request adds its cost to the bucket's level, which drains at the
limit's rate. While a level is above the bucket's size (``burst_seconds`` of
its rate, at least one request's worth), new requests wait; the one that went
over is never held back, so a request larger than the bucket still passes.
Only reads and writes are counted, as in QEMU. 0 means unlimited.

A held-back queue waits at least :data:`MIN_WAIT_NS` (at most half the
bucket), then starts every request the drained bucket allows in one go.
The rate is the same (the bucket drains with real time, so waiting longer
than needed is made up by the next batch), but a queue at 1500 IOPS wakes
250 times a second instead of 1500, and the driver gets a handful of
completions per interrupt: under a busy host, the wake-up per request cost
a throttled guest most of its limit.

Pure: time is passed in (monotonic nanoseconds), so it is tested with a
fake clock. The worker asks :meth:`Throttle.delay_ns` before popping and
calls :meth:`Throttle.account` for each read or write it starts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["DEFAULT_BURST_SECONDS", "Limits", "Throttle"]

#: QEMU's default bucket: a tenth of a second of the rate.
DEFAULT_BURST_SECONDS = 0.1
_NS = 1_000_000_000
#: The shortest wait of a held-back queue (see above).
MIN_WAIT_NS = 4_000_000


@dataclass(frozen=True)
class Limits:
    """Per-second limits; 0 is unlimited."""

    iops: int = 0
    bps: int = 0
    read_iops: int = 0
    write_iops: int = 0
    read_bps: int = 0
    write_bps: int = 0
    burst_seconds: float = DEFAULT_BURST_SECONDS

    @property
    def unlimited(self) -> bool:
        return not any(
            (self.iops, self.bps, self.read_iops, self.write_iops, self.read_bps, self.write_bps)
        )

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


class _Bucket:
    """One leaky bucket: ``level`` units, draining at ``rate`` units per second."""

    __slots__ = ("bytes", "level", "rate", "reads", "size", "writes")

    def __init__(self, rate: int, burst_seconds: float, reads: bool, writes: bool, nbytes: bool):
        self.rate = rate
        self.size = max(1.0, rate * burst_seconds)
        self.level = 0.0
        self.reads = reads
        self.writes = writes
        self.bytes = nbytes

    def leak(self, elapsed_ns: int) -> None:
        self.level = max(0.0, self.level - self.rate * elapsed_ns / _NS)

    def wait_ns(self) -> int:
        over = self.level - self.size
        return 0 if over <= 0 else int(over * _NS / self.rate) + 1


class Throttle:
    """The buckets of one set of :class:`Limits`, shared by all queues of an export."""

    def __init__(self, limits: Limits, now_ns: int) -> None:
        self.limits = limits
        b = limits.burst_seconds
        spec = (
            (limits.iops, True, True, False),
            (limits.bps, True, True, True),
            (limits.read_iops, True, False, False),
            (limits.write_iops, False, True, False),
            (limits.read_bps, True, False, True),
            (limits.write_bps, False, True, True),
        )
        self._buckets = [_Bucket(r, b, rd, wr, by) for r, rd, wr, by in spec if r > 0]
        # Never so long that the bucket could empty meanwhile: its drain would be lost.
        self.min_wait_ns = min(MIN_WAIT_NS, int(b * _NS) // 2)
        self._last = now_ns
        self.waits = 0  # times a queue was told to wait (for the stats)

    def _leak(self, now_ns: int) -> None:
        elapsed = now_ns - self._last
        if elapsed > 0:
            self._last = now_ns
            for bk in self._buckets:
                bk.leak(elapsed)

    def delay_ns(self, now_ns: int) -> int:
        """How long a new request must wait (0: it may start now)."""
        self._leak(now_ns)
        wait = 0
        for bk in self._buckets:
            w = bk.wait_ns()
            if w > wait:
                wait = w
        if wait:
            self.waits += 1
            if wait < self.min_wait_ns:
                wait = self.min_wait_ns
        return wait

    def account(self, write: bool, nbytes: int, now_ns: int) -> None:
        """A read or write of ``nbytes`` has started: charge it to the buckets it counts in."""
        self._leak(now_ns)
        for bk in self._buckets:
            if bk.writes if write else bk.reads:
                bk.level += nbytes if bk.bytes else 1
