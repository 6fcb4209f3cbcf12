"""One trace of an export: every queue records (a fraction of) its requests for a while.

:func:`run_trace` is what the export's ``export-trace`` control method runs
in the export's process: it measures a baseline window, turns tracing on in
every queue's :class:`~vblk.stats.stages.QueueStages`, sleeps, turns it off
and returns the records (compact integer tuples; ``vblk trace`` turns them
into Chrome trace JSON on the client side) with the trace's cost: requests
traced and dropped, and CPU per request and IOPS with tracing against the
baseline just before. The clocks and the sleep are parameters, for tests.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from vblk.stats.stages import QueueStages

#: Requests one queue keeps in a trace; beyond it requests are counted as dropped.
TRACE_LIMIT = 100_000
#: The longest trace (seconds); its records stay in memory until it ends.
MAX_DURATION = 60.0
#: The longest baseline window measured before a trace starts (seconds).
BASELINE_S = 1.0


def sample_every(fraction: float) -> int:
    """The sampling period for ``--sample`` (a fraction in (0, 1])."""
    if not 0 < fraction <= 1:
        raise ValueError(f"sample {fraction} is not in (0, 1]")
    return max(1, round(1 / fraction))


def run_trace(
    queues: Sequence[tuple[int, QueueStages]],
    duration: float,
    fraction: float,
    requests: Callable[[], int],
    *,
    limit: int = TRACE_LIMIT,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    cpu: Callable[[], float] = time.process_time,
) -> dict[str, Any]:
    """Trace ``queues`` for ``duration`` seconds; ``requests()`` is the export's request counter."""
    if not 0 < duration <= MAX_DURATION:
        raise ValueError(f"duration {duration} is not in (0, {MAX_DURATION:g}]")
    every = sample_every(fraction)
    base_s = min(BASELINE_S, duration)
    r0, c0, t0 = requests(), cpu(), clock()
    sleep(base_s)
    r1, c1, t1 = requests(), cpu(), clock()
    backend0 = [st.hists["backend"].count for _, st in queues]
    for _, st in queues:
        st.start_trace(every, limit)
    sleep(duration)
    results = [st.stop_trace(qi) for qi, st in queues]
    r2, c2, t2 = requests(), cpu(), clock()
    backend2 = [st.hists["backend"].count for _, st in queues]
    traced = sum(len(r["requests"]) for r in results)

    def per_req(dc: float, dr: int) -> float:
        return dc * 1e6 / dr if dr > 0 else 0.0

    return {
        "duration_s": t2 - t1,
        "sample_every": every,
        "queues": results,
        "cost": {
            "requests_traced": traced,
            "dropped": sum(r["dropped"] for r in results),
            "requests_during": r2 - r1,
            "timed_during": sum(b - a for a, b in zip(backend0, backend2, strict=True)),
            "baseline_iops": (r1 - r0) / (t1 - t0) if t1 > t0 else 0.0,
            "tracing_iops": (r2 - r1) / (t2 - t1) if t2 > t1 else 0.0,
            "baseline_cpu_us_per_request": per_req(c1 - c0, r1 - r0),
            "tracing_cpu_us_per_request": per_req(c2 - c1, r2 - r1),
        },
    }
