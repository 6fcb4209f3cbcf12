"""Token buckets with a fake clock: rate, burst, read/write split, unlimited."""

from __future__ import annotations

from vblk.qos import MIN_WAIT_NS, Limits, Throttle

S = 1_000_000_000


def _run(
    t: Throttle, seconds: float, write: bool = False, nbytes: int = 4096, late_ns: int = 0
) -> int:
    """Start requests as fast as the throttle allows (waking ``late_ns`` late); how many."""
    now, end, n = 0, int(seconds * S), 0
    while now < end:
        d = t.delay_ns(now)
        if d:
            now += d + late_ns
            continue
        t.account(write, nbytes, now)
        n += 1
    return n


def test_unlimited_never_waits() -> None:
    t = Throttle(Limits(), 0)
    assert Limits().unlimited
    for _ in range(10000):
        assert t.delay_ns(0) == 0
        t.account(False, 1 << 20, 0)


def test_iops_limit_holds_the_rate_with_a_small_burst() -> None:
    t = Throttle(Limits(iops=1500), 0)
    n = _run(t, 10)
    # 10 s at 1500/s plus the bucket (0.1 s of rate).
    assert 15000 <= n <= 15000 + 150 + 2


def test_burst_seconds_sizes_the_bucket() -> None:
    t = Throttle(Limits(iops=100, burst_seconds=2), 0)
    for _ in range(201):  # the bucket holds 200, and the one that fills it past goes too
        assert t.delay_ns(0) == 0
        t.account(False, 512, 0)
    assert t.delay_ns(0) > 0


def test_bps_counts_bytes_and_a_big_request_still_passes() -> None:
    t = Throttle(Limits(bps=1 << 20), 0)
    assert t.delay_ns(0) == 0
    t.account(True, 8 << 20, 0)  # far larger than the bucket: it goes, then others wait
    wait = t.delay_ns(0)
    assert 7.8 * S < wait < 8 * S
    assert t.delay_ns(wait) == 0


def test_read_limit_leaves_writes_alone() -> None:
    t2 = Throttle(Limits(read_iops=10), 0)
    for _ in range(1000):
        t2.account(True, 4096, 0)
    assert t2.delay_ns(0) == 0
    assert 10 <= _run(t2, 1, write=False) <= 12


def test_the_tightest_bucket_decides() -> None:
    t = Throttle(Limits(iops=1000, write_iops=100), 0)
    assert 100 <= _run(t, 1, write=True) <= 112
    t = Throttle(Limits(iops=1000, write_iops=100), 0)
    assert 1000 <= _run(t, 1, write=False) <= 1102


def test_time_going_backwards_is_ignored() -> None:
    t = Throttle(Limits(iops=10), S)
    t.account(False, 1, S)
    assert t.delay_ns(0) == 0


def test_late_wake_ups_are_made_up_and_waits_are_batched() -> None:
    # Every wake-up 0.3 ms late (a busy host): the rate still holds.
    t = Throttle(Limits(iops=1500), 0)
    assert 15000 <= _run(t, 10, late_ns=300_000) <= 15000 + 150 + 8
    # A held-back queue waits at least MIN_WAIT_NS, then starts several requests.
    t = Throttle(Limits(iops=1500), 0)
    _run(t, 0.2)
    assert t.waits <= 0.2 * S / MIN_WAIT_NS + 1  # not one per request (about 150)
    # But never so long that a small bucket empties meanwhile.
    t = Throttle(Limits(iops=1000, burst_seconds=0.002), 0)
    assert t.min_wait_ns == 1_000_000
    assert 1000 <= _run(t, 1, late_ns=100_000) <= 1000 + 4
