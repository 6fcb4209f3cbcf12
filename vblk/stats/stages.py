"""Per-request stage timestamps of one virtqueue, and the histograms they feed.

The backend sees six moments of a request: the wake-up on its queue's kick
(or poll), the pop of its chain, its submission to the storage, the
storage's completion, the used-ring push and the interrupt. The stages are
the spans between them::

    queue_wait  wake   -> pop
    device      pop    -> submit     (parse and checks)
    host_io     submit -> completion (the host I/O stack, or the network)
    complete    completion -> push
    notify      push   -> interrupt  (including any coalescing hold)
    backend     pop    -> interrupt  (= device + host_io + complete + notify, exactly)

"Wake" is the start of the pass over the avail ring that finds the request:
the first pass after a kick or a poll hit, or a later pass of the same drain
(with EVENT_IDX the driver does not kick while the backend drains, so the
last kick can be long past). The backend cannot see when the driver put the
chain on the ring; queue_wait is the wait behind the chains popped before it.

"Interrupt" is the moment the backend decides the driver has been told: the
call eventfd was signalled, or EVENT_IDX said the driver did not ask (it is
still processing the ring and will see the entry).

This module is pure: the worker passes ``time.monotonic_ns`` readings in.
Timestamps live in preallocated lists indexed by descriptor head until the
push, then in a preallocated ring until the interrupt, where all six stages
of each request are recorded together (so a snapshot taken between two
batches is consistent: the stage sums add up to the backend sum).

Timing every request costs far more than the 5%-of-IOPS budget in CPython
(about 3 us per timed request, against about 5 us of CPU for a whole 4k read
from the page cache), so by default one request in
:data:`DEFAULT_SAMPLE_EVERY` is timed; the others cost the worker one
countdown. A trace (:meth:`QueueStages.start_trace`) may
raise the rate to every request while it runs.
"""

from __future__ import annotations

from typing import TypedDict

from vblk.stats.histogram import Histogram, StageSnapshot

#: Stage names in path order; ``backend`` is the total of the four after ``queue_wait``.
STAGES = ("queue_wait", "device", "host_io", "complete", "notify", "backend")
#: The stages that add up to ``backend``.
BACKEND_PARTS = ("device", "host_io", "complete", "notify")
#: One request in this many is timed when no trace asks for more.
DEFAULT_SAMPLE_EVERY = 32

#: Request kinds as a trace names them (index = the ``kind`` argument of :meth:`submitted`).
KINDS = ("read", "write", "flush", "discard", "write_zeroes", "get_id", "other")
KIND_READ, KIND_WRITE, KIND_FLUSH, KIND_DISCARD, KIND_WRITE_ZEROES, KIND_GET_ID, KIND_OTHER = range(
    len(KINDS)
)

#: A traced request: wake, pop, submit, done, push, irq (ns), kind, offset, length.
TraceRecord = tuple[int, int, int, int, int, int, int, int, int]
#: A traced instant: ("kick" | "irq", ns).
TraceEvent = tuple[str, int]


class TraceResult(TypedDict):
    """What one trace of one queue collected."""

    queue: int
    requests: list[TraceRecord]
    events: list[TraceEvent]
    dropped: int
    dropped_events: int
    sample_every: int


class _Trace:
    """A bounded in-memory ring of traced requests and instants; full means dropped."""

    __slots__ = ("dropped", "dropped_events", "events", "limit", "requests")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.requests: list[TraceRecord] = []
        self.events: list[TraceEvent] = []
        self.dropped = 0
        self.dropped_events = 0

    def event(self, name: str, ns: int) -> None:
        if len(self.events) < self.limit:
            self.events.append((name, ns))
        else:
            self.dropped_events += 1


class QueueStages:
    """Stage timestamps and histograms of one queue (written by its I/O thread only).

    The worker's calls, for a sampled request with descriptor ``head``:
    ``woke(now)`` once per wake-up, ``popped(head, now)``, then
    ``submitted(head, now, ...)`` (or ``inline(head, now, ...)`` when the
    device answered without the storage), ``completed(head, now)``,
    ``pushed(head, now)``, and ``notified(now)`` once per interrupt decision.
    Which requests are sampled is the worker's countdown of ``sample_every``.
    """

    def __init__(self, size: int, sample_every: int = DEFAULT_SAMPLE_EVERY) -> None:
        if size < 1 or sample_every < 1:
            raise ValueError(f"size {size} and sample_every {sample_every} must be >= 1")
        self.size = size
        self.sample_every = sample_every
        self.default_every = sample_every
        self.hists = {name: Histogram() for name in STAGES}
        self._h = tuple(self.hists[name] for name in STAGES)
        self.wake_ns = 0
        self.inflight = 0  # sampled requests popped and not yet pushed
        self.generation = 0  # odd while notified() records (see snapshot())
        # By descriptor head, from pop to push.
        self._wake = [0] * size
        self._pop = [0] * size
        self._submit = [0] * size
        self._done = [0] * size
        self._kind = [0] * size
        self._offset = [0] * size
        self._length = [0] * size
        # Pushed and waiting for the interrupt: a ring of the six timestamps and the args.
        cap = 2 * size
        self._cap = cap
        self._pend: list[list[int]] = [[0] * cap for _ in range(8)]
        self.pending = 0
        self.trace: _Trace | None = None

    # -- the request's path ----------------------------------------------------------

    def woke(self, now: int) -> None:
        """The queue's thread read a kick (a trace shows it; the next pass sets the wake)."""
        if self.trace is not None:
            self.trace.event("kick", now)

    def pass_started(self, now: int) -> None:
        """A pass over the avail ring begins: queue_wait of what it pops counts from here."""
        self.wake_ns = now

    def popped(self, head: int, now: int) -> None:
        self._wake[head] = self.wake_ns or now
        self._pop[head] = now
        self.inflight += 1

    def submitted(self, head: int, now: int, kind: int, offset: int, length: int) -> None:
        self._submit[head] = now
        self._kind[head] = kind
        self._offset[head] = offset
        self._length[head] = length

    def inline(self, head: int, now: int, kind: int, offset: int, length: int) -> None:
        """The device completed the request itself: no host_io."""
        self.submitted(head, now, kind, offset, length)
        self._done[head] = now

    def completed(self, head: int, now: int) -> None:
        self._done[head] = now

    def is_timed(self, head: int) -> bool:
        """Whether ``head`` is a sampled request between pop and push."""
        return self._pop[head] != 0

    def pushed(self, head: int, now: int) -> None:
        if self.pending == self._cap:
            self.notified(now)  # cannot happen with one push per head per interrupt
        i = self.pending
        p = self._pend
        p[0][i] = self._wake[head]
        p[1][i] = self._pop[head]
        p[2][i] = self._submit[head]
        p[3][i] = self._done[head]
        p[4][i] = now
        p[5][i] = self._kind[head]
        p[6][i] = self._offset[head]
        p[7][i] = self._length[head]
        self.pending = i + 1
        self._pop[head] = 0
        self.inflight -= 1

    def notified(self, now: int, signalled: bool = True) -> None:
        """The driver was told (or did not ask): record every pending request's stages."""
        if signalled and self.trace is not None:
            self.trace.event("irq", now)
        n = self.pending
        if not n:
            return
        self.generation += 1
        qw, dev, hio, cpl, ntf, be = self._h
        wake, pop, sub, done, push, kind, off, length = self._pend
        trace = self.trace
        for i in range(n):
            p = pop[i]
            s = sub[i]
            d = done[i]
            u = push[i]
            qw.record(p - wake[i])
            dev.record(s - p)
            hio.record(d - s)
            cpl.record(u - d)
            ntf.record(now - u)
            be.record(now - p)
            if trace is not None:
                if len(trace.requests) < trace.limit:
                    trace.requests.append((wake[i], p, s, d, u, now, kind[i], off[i], length[i]))
                else:
                    trace.dropped += 1
        self.pending = 0
        self.generation += 1

    # -- reading ---------------------------------------------------------------------

    def snapshot(self) -> dict[str, StageSnapshot]:
        """Every stage's histogram, taken between two interrupt decisions.

        Safe from another thread: a copy that raced a recording is taken again.
        """
        for _ in range(100):
            gen = self.generation
            if gen & 1:
                continue
            snap = {name: hist.snapshot() for name, hist in self.hists.items()}
            if self.generation == gen:
                return snap
        return snap

    # -- tracing ---------------------------------------------------------------------

    def start_trace(self, sample_every: int, limit: int) -> None:
        """Keep every traced request (one in ``sample_every``), up to ``limit``."""
        if sample_every < 1 or limit < 1:
            raise ValueError("sample_every and limit must be >= 1")
        self.trace = _Trace(limit)
        self.sample_every = sample_every

    def stop_trace(self, queue: int) -> TraceResult:
        """End the trace and hand over what it holds; the default sampling resumes."""
        trace = self.trace or _Trace(1)
        self.trace = None
        every = self.sample_every
        self.sample_every = self.default_every
        return {
            "queue": queue,
            "requests": trace.requests,
            "events": trace.events,
            "dropped": trace.dropped,
            "dropped_events": trace.dropped_events,
            "sample_every": every,
        }
