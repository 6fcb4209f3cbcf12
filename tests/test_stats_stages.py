"""Tests of vblk.stats.stages on a fake clock: stage spans, sums, snapshots and traces."""

from __future__ import annotations

import pytest

from vblk.stats.histogram import bucket_index
from vblk.stats.stages import BACKEND_PARTS, KIND_READ, KIND_WRITE, STAGES, QueueStages


class FakeClock:
    """A monotonic clock the test advances by hand."""

    def __init__(self) -> None:
        self.ns = 1_000_000

    def __call__(self, step: int = 0) -> int:
        self.ns += step
        return self.ns


def _one_request(st: QueueStages, clock: FakeClock, head: int, spans: tuple[int, ...]) -> None:
    """Drive one request through the stages with the given spans (ns), no interrupt yet."""
    qw, dev, hio, cpl = spans
    st.popped(head, clock(qw))
    st.submitted(head, clock(dev), KIND_READ, 4096 * head, 4096)
    st.completed(head, clock(hio))
    st.pushed(head, clock(cpl))


def test_stage_spans_of_one_request() -> None:
    clock = FakeClock()
    st = QueueStages(8, sample_every=1)
    st.woke(clock())
    st.pass_started(clock.ns)
    _one_request(st, clock, 3, (1_000, 2_000, 50_000, 3_000))
    assert st.snapshot()["backend"]["count"] == 0  # nothing recorded before the interrupt
    st.notified(clock(7_000))
    snap = st.snapshot()
    want = {
        "queue_wait": 1_000,
        "device": 2_000,
        "host_io": 50_000,
        "complete": 3_000,
        "notify": 7_000,
        "backend": 62_000,
    }
    for stage, ns in want.items():
        assert snap[stage]["count"] == 1, stage
        assert snap[stage]["sum_ns"] == ns, stage
        assert snap[stage]["buckets"][bucket_index(ns)] == 1, stage


def test_parts_add_up_to_backend_over_many_requests() -> None:
    clock = FakeClock()
    st = QueueStages(4, sample_every=1)
    for batch in range(50):
        st.woke(clock(10_000))
        st.pass_started(clock.ns)
        for head in range(4):
            _one_request(st, clock, head, (100 + head, 300 * batch, 9_000 + head, 50))
        st.notified(clock(batch * 11), signalled=batch % 2 == 0)
    snap = st.snapshot()
    assert {snap[s]["count"] for s in STAGES} == {200}
    assert sum(snap[s]["sum_ns"] for s in BACKEND_PARTS) == snap["backend"]["sum_ns"]


def test_inline_request_has_no_host_io() -> None:
    clock = FakeClock()
    st = QueueStages(2, sample_every=1)
    st.popped(0, clock())
    st.inline(0, clock(500), KIND_WRITE, 0, 0)
    st.pushed(0, clock(200))
    st.notified(clock(100))
    snap = st.snapshot()
    assert snap["host_io"]["sum_ns"] == 0 and snap["host_io"]["count"] == 1
    assert snap["backend"]["sum_ns"] == 800


def test_queue_wait_without_a_wake_is_zero() -> None:
    clock = FakeClock()
    st = QueueStages(2, sample_every=1)
    _one_request(st, clock, 1, (0, 10, 10, 10))
    st.notified(clock(10))
    assert st.snapshot()["queue_wait"]["sum_ns"] == 0


def test_head_reused_before_the_interrupt_keeps_both_requests() -> None:
    clock = FakeClock()
    st = QueueStages(1, sample_every=1)
    _one_request(st, clock, 0, (0, 1_000, 1_000, 1_000))
    assert not st.is_timed(0)
    _one_request(st, clock, 0, (0, 2_000, 2_000, 2_000))
    st.notified(clock(1))
    snap = st.snapshot()
    assert snap["device"]["sum_ns"] == 3_000
    assert snap["backend"]["sum_ns"] == (3_000 + 6_000 + 1) + (6_000 + 1)


def test_pending_ring_full_records_instead_of_overwriting() -> None:
    clock = FakeClock()
    st = QueueStages(1, sample_every=1)
    for _ in range(5):  # more pushes than the ring holds, no interrupt
        _one_request(st, clock, 0, (0, 1, 1, 1))
    st.notified(clock(1))
    assert st.snapshot()["backend"]["count"] == 5


def test_inflight_counts_popped_not_pushed() -> None:
    clock = FakeClock()
    st = QueueStages(4, sample_every=1)
    st.popped(2, clock())
    assert st.inflight == 1 and st.is_timed(2)
    st.submitted(2, clock(1), KIND_READ, 0, 512)
    st.completed(2, clock(1))
    st.pushed(2, clock(1))
    assert st.inflight == 0 and not st.is_timed(2)


def test_trace_keeps_records_events_and_drops_beyond_limit() -> None:
    clock = FakeClock()
    st = QueueStages(4, sample_every=32)
    st.start_trace(sample_every=1, limit=3)
    assert st.sample_every == 1
    st.woke(clock(5))
    st.pass_started(clock.ns)
    for head in range(4):
        _one_request(st, clock, head, (10, 20, 30, 40))
    st.notified(clock(50))
    result = st.stop_trace(queue=7)
    assert result["queue"] == 7 and result["sample_every"] == 1
    assert len(result["requests"]) == 3 and result["dropped"] == 1
    wake, pop, sub, done, push, irq, kind, offset, length = result["requests"][1]
    assert (pop - wake, sub - pop, done - sub, push - done) == (10 + 100, 20, 30, 40)
    assert irq == clock.ns and kind == KIND_READ and offset == 4096 and length == 4096
    assert [name for name, _ in result["events"]] == ["kick", "irq"]
    assert st.trace is None and st.sample_every == 32


def test_untraced_interrupt_decision_adds_no_event() -> None:
    clock = FakeClock()
    st = QueueStages(2, sample_every=1)
    st.start_trace(1, 10)
    st.notified(clock(1), signalled=False)
    assert st.stop_trace(0)["events"] == []


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        QueueStages(0)
    with pytest.raises(ValueError):
        QueueStages(4, sample_every=0)
    with pytest.raises(ValueError):
        QueueStages(4).start_trace(0, 10)


def test_queue_wait_counts_from_the_pass_not_the_kick() -> None:
    clock = FakeClock()
    st = QueueStages(2, sample_every=1)
    st.woke(clock())
    st.pass_started(clock(1_000_000))  # a later pass of the drain, long after the kick
    _one_request(st, clock, 0, (300, 1, 1, 1))
    st.notified(clock(1))
    assert st.snapshot()["queue_wait"]["sum_ns"] == 300
