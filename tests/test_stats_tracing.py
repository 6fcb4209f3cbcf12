"""Tests of vblk.stats.tracing.run_trace with a fake clock whose sleeps serve requests."""

from __future__ import annotations

import pytest

from vblk.stats.stages import KIND_READ, QueueStages
from vblk.stats.tracing import run_trace, sample_every


class FakeExport:
    """Two queues that serve ``rate`` requests per second of (fake) sleep."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.now = 0.0
        self.ns = 10**9
        self.cpu_s = 0.0
        self.requests = 0
        self.queues = [(0, QueueStages(8, sample_every=32)), (1, QueueStages(8, sample_every=32))]
        self._countdown = [32, 32]

    def sleep(self, s: float) -> None:
        for i in range(int(self.rate * s)):
            qi = i % 2
            st = self.queues[qi][1]
            self.requests += 1
            # As the worker: a lower sampling period applies from the next request.
            self._countdown[qi] = min(self._countdown[qi], st.sample_every) - 1
            timed = self._countdown[qi] <= 0
            if timed:
                self._countdown[qi] = st.sample_every
                self.ns += 1000
                st.woke(self.ns)
                st.pass_started(self.ns)
                st.popped(0, self.ns + 100)
                st.submitted(0, self.ns + 200, KIND_READ, 0, 4096)
                st.completed(0, self.ns + 300)
                st.pushed(0, self.ns + 400)
                st.notified(self.ns + 500)
            self.cpu_s += 2e-6 if st.trace is not None else 1e-6
        self.now += s


def test_traces_every_request_and_reports_its_cost() -> None:
    ex = FakeExport(rate=1000)
    result = run_trace(
        ex.queues,
        2.0,
        1.0,
        lambda: ex.requests,
        sleep=ex.sleep,
        clock=lambda: ex.now,
        cpu=lambda: ex.cpu_s,
    )
    cost = result["cost"]
    assert result["duration_s"] == 2.0 and result["sample_every"] == 1
    assert cost["requests_traced"] == cost["requests_during"] == cost["timed_during"] == 2000
    assert cost["dropped"] == 0
    assert cost["baseline_iops"] == cost["tracing_iops"] == 1000
    assert cost["baseline_cpu_us_per_request"] == pytest.approx(1.0)
    assert cost["tracing_cpu_us_per_request"] == pytest.approx(2.0)
    assert [q["queue"] for q in result["queues"]] == [0, 1]
    # Tracing stopped by itself: the default sampling is back.
    assert all(st.trace is None and st.sample_every == 32 for _, st in ex.queues)


def test_sampled_trace_and_limit() -> None:
    ex = FakeExport(rate=1000)
    result = run_trace(
        ex.queues,
        1.0,
        0.1,
        lambda: ex.requests,
        limit=20,
        sleep=ex.sleep,
        clock=lambda: ex.now,
        cpu=lambda: ex.cpu_s,
    )
    assert result["sample_every"] == 10
    assert result["cost"]["requests_traced"] == 40  # 20 per queue
    assert result["cost"]["dropped"] == 100 - 40
    assert all(q["dropped_events"] > 0 for q in result["queues"])


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        run_trace([], 0, 1.0, lambda: 0)
    with pytest.raises(ValueError):
        run_trace([], 61, 1.0, lambda: 0)
    with pytest.raises(ValueError):
        sample_every(0)
    assert sample_every(0.3) == 3
