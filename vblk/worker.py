"""Queue workers and the I/O threads that run them.

A :class:`QueueWorker` is one virtqueue's work, with no thread of its own: it
joins the sans-IO pieces at run time (the ring of :mod:`vblk.virtio.queue`
yields chains, the device model of :mod:`vblk.blk.device` checks them, the
storage queue of :mod:`vblk.storage` carries them out) and puts completions
back on the used ring, with an interrupt when EVENT_IDX asks for one.

An :class:`IOThread` is one thread with one ``poll()`` loop over the kick and
storage-queue fds of every queue it serves, as QEMU's IOThread (and so
qemu-storage-daemon) does. Under CPython the queues of one process share one
GIL anyway: a thread per queue adds only the hand-offs between them, so by
default ``vblk serve`` runs every queue on one IOThread, and one wake-up
serves whichever queues kicked.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from collections import deque
from typing import Any, cast

from vblk.blk.defs import HEADER_SIZE, SECTOR_SHIFT, ReqType
from vblk.blk.device import BlockDevice, DataRequest, Pending, Stats
from vblk.blk.request import HEADER
from vblk.io.timer import Timer
from vblk.io.uring import clear_eventfd
from vblk.procname import set_thread_name
from vblk.qos import Throttle
from vblk.stats.stages import (
    DEFAULT_SAMPLE_EVERY,
    KIND_DISCARD,
    KIND_FLUSH,
    KIND_GET_ID,
    KIND_OTHER,
    KIND_READ,
    KIND_WRITE,
    KIND_WRITE_ZEROES,
    QueueStages,
)
from vblk.vhost_user.backend import Vring
from vblk.virtio.coalesce import Coalescer
from vblk.virtio.queue import Chain

log = logging.getLogger(__name__)

#: Completions signalled to the driver at least this often within one long batch.
NOTIFY_BATCH = 16
#: How long a stopping queue may take to finish its in-flight requests.
STOP_TIMEOUT = 60.0
#: Adaptive polling starts at this window and doubles while it pays off (as QEMU's IOThreads).
POLL_START_NS = 4_000
#: Requests one queue may pop in a row while other queues on its thread wait.
DRAIN_BUDGET = 256

__all__ = ["IOThread", "QueueWorker"]

_HANGUP = select.POLLERR | select.POLLHUP | select.POLLNVAL
#: ``sample_every`` that times no request (the countdown never reaches zero).
NEVER_SAMPLE = 1 << 62


class QueueWorker:
    """One virtqueue's work: pop, check, submit, reap, push, notify.

    The storage queue (:meth:`vblk.storage.base.Storage.open_queue`) decides
    how the queue's operations overlap. Everything else stays on the
    :class:`IOThread` that runs the worker, which also reaps every
    completion, so the used ring has one writer and the hot path takes no lock.
    """

    def __init__(
        self,
        vring: Vring,
        device: BlockDevice,
        coalesce_us: int = 0,
        sample_every: int = DEFAULT_SAMPLE_EVERY,
    ) -> None:
        assert vring.queue is not None
        self.vring = vring
        self.queue = vring.queue
        self.device = device
        self.engine = device.storage.open_queue(vring.index, self.queue.size)
        # What the driver asked of us and what we asked of it: with EVENT_IDX
        # both kicks and interrupts stay well below the request count.
        self.kicks = 0
        self.interrupts = 0
        self.batches = 0
        self.polled = 0  # wake-ups that polling saved
        self.polling = False  # whether its thread polls (set by the IOThread)
        self.stats = Stats()
        self.coalescer = Coalescer(coalesce_us * 1000)
        self._pushed = self.queue.used_idx  # used index when completions were last counted
        self._told = False  # the first decision always signals (a resumed ring may need it)
        # Stage timing of one request in ``sample_every`` (vblk.stats.stages); the others
        # cost one countdown in drain() and one check per reap and per interrupt decision.
        self.stages = QueueStages(self.queue.size, sample_every)
        self._countdown = sample_every
        self.clock = time.monotonic_ns  # the stages' clock (tests use a fake one)
        # The export's rate limits, shared by its queues (None: unlimited, one check per pop).
        self.throttle: Throttle | None = None
        self.throttled_until = 0  # monotonic ns the throttle asked us to wait until; 0: not
        self.throttle_waits = 0
        self.read_ops = 0
        self.write_ops = 0

    @property
    def index(self) -> int:
        return self.vring.index

    def drain(self, budget: int = DRAIN_BUDGET) -> bool:
        """Pop until the ring is empty with kicks re-enabled; True if work is left.

        After ``budget`` requests the worker stops with kicks still off, so
        other queues on the thread get their turn; the caller must come back.
        """
        q = self.queue
        start = self.device.start
        engine = self.engine
        submit = engine.submit
        stats = self.stats
        st = self.stages
        clock = self.clock
        # A trace may have lowered sample_every since the last drain.
        countdown = min(self._countdown, st.sample_every)
        self.batches += 1
        n = 0
        while True:
            q.disable_notifications()
            st.wake_ns = clock()  # queue_wait of what this pass pops counts from here
            while True:
                throttle = self.throttle
                if throttle is not None and self._throttled(throttle):
                    self._countdown = countdown
                    return False  # kicks stay off: the IOThread's timer brings us back
                chain = q.pop()
                if chain is None:
                    break
                countdown -= 1
                if not countdown:
                    countdown = st.sample_every
                    if not self._timed(chain, throttle):
                        break
                else:
                    started = start(chain, stats)
                    if isinstance(started, DataRequest):
                        if started.op:
                            self.write_ops += 1
                        else:
                            self.read_ops += 1
                        if throttle is not None:
                            throttle.account(started.op == 1, started.nbytes, time.monotonic_ns())
                        submit(started.op, started.offset, started.nbytes, started.bufs, 0, started)
                    elif isinstance(started, int):
                        q.push(chain.head, started)
                    elif started is None:
                        q.mark_broken(f"request {chain.head} has no status byte: {chain.error}")
                        break
                    else:
                        self.device.begin(started, engine)
                n += 1
                if n % NOTIFY_BATCH == 0:
                    # A long batch: let the first requests start and finish early.
                    engine.commit()
                    self.complete()
                    if n >= budget:
                        self._countdown = countdown
                        return q.broken is None
            self._countdown = countdown
            engine.commit()
            self.complete()
            if q.broken is not None:
                log.error("queue %d is broken: %s", self.vring.index, q.broken)
                self.vring.signal_err()
                return False
            if not q.enable_notifications():
                return False

    def _timed(self, chain: Chain, throttle: Throttle | None) -> bool:
        """:meth:`drain`'s work for one sampled chain, with its stage timestamps; False: broken."""
        st = self.stages
        clock = self.clock
        q = self.queue
        head = chain.head
        popped = clock()
        started = self.device.start(chain, self.stats)
        if started is None:
            q.mark_broken(f"request {head} has no status byte: {chain.error}")
            return False
        st.popped(head, popped)
        if isinstance(started, DataRequest):
            if started.op:
                self.write_ops += 1
            else:
                self.read_ops += 1
            if throttle is not None:
                throttle.account(started.op == 1, started.nbytes, time.monotonic_ns())
            kind = KIND_WRITE if started.op else KIND_READ
            st.submitted(head, clock(), kind, started.offset, started.nbytes)
            self.engine.submit(started.op, started.offset, started.nbytes, started.bufs, 0, started)
        elif isinstance(started, int):
            st.inline(head, clock(), _kind_of(chain), 0, 0)
            q.push(head, started)
            st.pushed(head, clock())
        else:
            st.submitted(head, clock(), *_pending_args(started))
            self.device.begin(started, self.engine)
        return True

    def _throttled(self, throttle: Throttle) -> bool:
        """Whether the rate limits hold the next request back; if so, until when."""
        now = time.monotonic_ns()
        wait = throttle.delay_ns(now)
        if not wait:
            return False
        self.engine.commit()
        self.complete()
        self.throttled_until = now + wait
        self.throttle_waits += 1
        return True

    def snapshot(self) -> dict[str, Any]:
        """The queue's counters so far (read from any thread; each value is one int read)."""
        st = self.stats
        return {
            "queue": self.vring.index,
            "requests": st.requests,
            "read_ops": self.read_ops,
            "write_ops": self.write_ops,
            "read_bytes": st.read_bytes,
            "write_bytes": st.write_bytes,
            "flushes": st.flushes,
            "discards": st.discards,
            "write_zeroes": st.write_zeroes,
            "errors": st.ioerr + st.unsupp,
            "kicks": self.kicks,
            "interrupts": self.interrupts,
            "inflight": self.engine.inflight,
            "held": self.coalescer.held,
            "throttle_waits": self.throttle_waits,
            "stages": self.stages.snapshot(),
        }

    def complete(self) -> None:
        """Reap the storage queue: status bytes, used ring, and an interrupt now or soon.

        The interrupt goes out when the driver wants one (EVENT_IDX) and the
        coalescer (:mod:`vblk.virtio.coalesce`) does not hold it for company;
        a held one is the :class:`IOThread`'s to release by its deadline.
        A request with more to do (a short transfer, a writethrough flush,
        the next step of a flush or discard) is resubmitted by ``finish``.
        """
        q = self.queue
        finish = self.device.finish
        stats = self.stats
        engine = self.engine
        st = self.stages
        timed_pop = st.pop_ns  # nonzero at a head while it is a sampled request in flight
        clock = self.clock
        more = True
        while more:
            more = False
            timed = st.inflight
            reaped = clock() if timed else 0  # host_io ends when the backend sees it done
            for token, res in engine.reap():
                data = cast(DataRequest, token)  # the only tokens drain submits; no check per I/O
                n = finish(data, res, stats, engine)
                if n >= 0:
                    head = data.head
                    if timed and timed_pop[head]:
                        st.completed(head, reaped)
                        q.push(head, n)
                        st.pushed(head, clock())
                    else:
                        q.push(head, n)
                else:
                    more = True
            if more:
                engine.commit()
                more = engine.ready()
        used = q.used_idx
        n = (used - self._pushed) & 0xFFFF
        self._pushed = used
        if self.coalescer.completed(n, time.monotonic_ns()) or not self._told:
            self._told = True
            self.notify()

    def notify(self) -> None:
        """Interrupt the driver if it asked to hear of what was pushed since the last decision."""
        signalled = self.queue.should_notify()
        if signalled:
            self.interrupts += 1
            self.vring.signal_call()
        st = self.stages
        if st.pending or st.trace is not None:
            st.notified(self.clock(), signalled)

    def flush(self) -> None:
        """Release a held interrupt at once (the queue is stopping)."""
        if self.coalescer.flush():
            self.notify()

    def close(self) -> None:
        """Release the engine (nothing may be in flight) and log what the queue did."""
        self.engine.close()
        st = self.stats
        co = self.coalescer
        log.info(
            "queue %d: %d requests in %d batches, %d kicks, %d interrupts%s%s; "
            "%d MiB read, %d MiB written, %d flushes, %d discards, %d write-zeroes, "
            "%d IOERR, %d UNSUPP",
            self.vring.index,
            st.requests,
            self.batches,
            self.kicks,
            self.interrupts,
            f" ({co.held} held, {co.timeouts} released by the clock)" if co.hold_ns else "",
            f", {self.polled} found by polling" if self.polling else "",
            st.read_bytes >> 20,
            st.write_bytes >> 20,
            st.flushes,
            st.discards,
            st.write_zeroes,
            st.ioerr,
            st.unsupp,
        )


_KINDS: dict[int, int] = {
    ReqType.IN: KIND_READ,
    ReqType.OUT: KIND_WRITE,
    ReqType.FLUSH: KIND_FLUSH,
    ReqType.DISCARD: KIND_DISCARD,
    ReqType.WRITE_ZEROES: KIND_WRITE_ZEROES,
    ReqType.GET_ID: KIND_GET_ID,
}


def _kind_of(chain: Chain) -> int:
    """The request kind a chain's header names (other when it has no readable header)."""
    readable = chain.readable
    if readable and len(readable[0]) >= HEADER_SIZE:
        return _KINDS.get(HEADER.unpack_from(readable[0])[0], KIND_OTHER)
    return KIND_OTHER


def _pending_args(p: Pending) -> tuple[int, int, int]:
    """Kind, offset and length of a multi-step request, for a trace."""
    req = p.req
    length = sum(step[2] for step in p.steps)
    return _KINDS.get(req.type, KIND_OTHER), req.sector << SECTOR_SHIFT, length


class _Leaving:
    """A worker being removed: its in-flight requests finish before it goes."""

    def __init__(self, worker: QueueWorker, done: threading.Event) -> None:
        self.worker = worker
        self.done = done
        self.deadline = time.monotonic() + STOP_TIMEOUT


class IOThread:
    """One thread serving any number of queue workers from one poll loop.

    :meth:`add` and :meth:`remove` may be called from any thread; they hand
    the change to the loop through a wake-up eventfd and wait for it, so a
    worker's state is only ever touched by the loop thread.

    ``poll_us`` > 0 turns on adaptive polling: before sleeping, the thread
    watches its avail rings (and engines) for up to that long, with guest
    kicks suppressed. The window grows while events arrive within it and
    collapses when they do not, so an idle thread costs no CPU.
    """

    def __init__(self, name: str = "vblk-iothread", poll_us: int = 0) -> None:
        self.name = name
        self.poll_max_ns = max(0, poll_us) * 1000
        self.poll_ns = 0
        self.budget = DRAIN_BUDGET
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._requests: deque[tuple[bool, QueueWorker, threading.Event]] = deque()
        self._closing = False
        self._poller = select.poll()
        self._poller.register(self._wake, select.POLLIN)
        self._fds: dict[int, tuple[QueueWorker, bool]] = {}  # fd -> (worker, is its kick fd)
        self._serving: list[QueueWorker] = []  # workers whose kicks are watched
        self._leaving: list[_Leaving] = []
        self._busy: list[QueueWorker] = []  # stopped on their budget with work left
        self._throttled: list[QueueWorker] = []  # held back by rate limits until a deadline
        self._timer = Timer()  # wakes the loop when a held interrupt is due
        self._poller.register(self._timer.fd, select.POLLIN)
        self._coalescing = False  # some worker may hold interrupts
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    @property
    def workers(self) -> list[QueueWorker]:
        """The workers this thread serves or is still finishing (a snapshot)."""
        return list(self._serving) + [lv.worker for lv in self._leaving]

    def start(self) -> None:
        self.thread.start()

    def add(self, worker: QueueWorker) -> None:
        """Serve ``worker`` from now on; it drains at once (a resumed ring may hold work)."""
        self._ask(True, worker, STOP_TIMEOUT)

    def remove(self, worker: QueueWorker) -> None:
        """Stop popping ``worker``'s ring, finish and signal what it has in flight, close it."""
        if not self._ask(False, worker, STOP_TIMEOUT + 5):
            log.error("queue %d did not stop within %.0fs", worker.index, STOP_TIMEOUT)

    def stop(self) -> None:
        """End the thread once every worker is removed (the callers' duty)."""
        self._closing = True
        os.eventfd_write(self._wake, 1)
        if self.thread.is_alive():
            self.thread.join(STOP_TIMEOUT)
        if not self.thread.is_alive():
            os.close(self._wake)
            self._timer.close()

    def _ask(self, add: bool, worker: QueueWorker, timeout: float) -> bool:
        done = threading.Event()
        self._requests.append((add, worker, done))
        os.eventfd_write(self._wake, 1)
        if not self.thread.is_alive():
            self._refuse_requests()  # not started, or failed: no one else will take it
        return done.wait(timeout)

    def _refuse_requests(self) -> None:
        """No loop runs: a queue to add is broken at once, one to remove is closed as it is."""
        while self._requests:
            add, worker, done = self._requests.popleft()
            if add:
                worker.queue.mark_broken(f"{self.name} is not running")
                worker.vring.signal_err()
            elif not worker.engine.inflight:
                worker.close()
            done.set()

    # -- the loop ----------------------------------------------------------------

    def _run(self) -> None:
        set_thread_name(self.name)
        try:
            self._loop()
        except Exception:
            log.exception("%s failed; its queues stopped", self.name)
            for w in self._serving:
                w.queue.mark_broken("I/O thread failed")
                w.vring.signal_err()
        finally:
            for lv in self._leaving:
                lv.done.set()
            self._refuse_requests()

    def _loop(self) -> None:
        poll = self._poller.poll
        now = time.monotonic_ns
        while not (self._closing and not self._serving and not self._leaving):
            if self._requests:
                self._apply_requests()
            due = self._release_due(now()) if self._coalescing else 0
            if self._throttled:
                resume = self._resume_throttled(now())
                if resume and (not due or resume < due):
                    due = resume
            if self._busy:
                ready = self._busy
                reaped: list[QueueWorker] = []
                self._busy = []
                self._dispatch(poll(0), ready, reaped)
                self._serve(ready, reaped)
                if self._leaving:
                    self._finish_leaving()
                continue
            t0 = now()
            if self.poll_ns and self._serving:
                found = self._poll(min(t0 + self.poll_ns, due or t0 + self.poll_ns))
                if found:
                    for w in found:
                        w.polled += 1
                        if w.stages.trace is not None:
                            w.stages.woke(now())
                    self._serve(found, [])
                    continue
            ready = []
            reaped = []
            if due and due != self._timer.armed_at:
                self._timer.arm(due)
            events = poll(100 if self._leaving else None)
            if self.poll_max_ns:
                self._adapt(now() - t0)
            self._dispatch(events, ready, reaped)
            self._serve(ready, reaped)
            if self._leaving:
                self._finish_leaving()

    def _dispatch(
        self,
        events: list[tuple[int, int]],
        ready: list[QueueWorker],
        reaped: list[QueueWorker],
    ) -> None:
        """Consume each wake-up: kicked workers go in ``ready``, completing ones in ``reaped``.

        A worker whose engine alone woke us needs no pop: its kicks are on, so
        anything new in its ring comes with a kick of its own.
        """
        fds = self._fds
        for fd, ev in events:
            entry = fds.get(fd)
            if entry is None:
                if fd == self._wake:
                    clear_eventfd(fd)
                elif fd == self._timer.fd:
                    self._timer.clear()
                continue
            worker, is_kick = entry
            if is_kick:
                if ev & _HANGUP:
                    log.warning("queue %d: kick fd closed", worker.index)
                    self._unwatch_kick(worker)
                    continue
                worker.kicks += os.eventfd_read(fd)
                if worker.stages.trace is not None:
                    worker.stages.woke(time.monotonic_ns())
                if worker not in ready:
                    ready.append(worker)
            else:
                worker.engine.clear_signal()
                reaped.append(worker)

    def _serve(self, ready: list[QueueWorker], reaped: list[QueueWorker]) -> None:
        """Drain each kicked queue (which reaps its engine too), then reap the others."""
        serving = self._serving
        for w in ready:
            try:
                if w not in serving:
                    w.complete()
                elif w.drain(self.budget):
                    self._busy.append(w)
                elif w.throttled_until:
                    if w not in self._throttled:
                        self._throttled.append(w)
                elif w.queue.broken is not None:
                    self._unwatch_kick(w)
            except Exception:
                self._failed(w)
        for w in reaped:
            if w not in ready:
                try:
                    w.complete()
                except Exception:
                    self._failed(w)

    def _failed(self, w: QueueWorker) -> None:
        log.exception("queue %d: worker failed; queue stopped", w.index)
        w.queue.mark_broken("worker failed")
        w.vring.signal_err()
        self._unwatch_kick(w)

    def _release_due(self, now: int) -> int:
        """Signal the held interrupts whose time has come; the next deadline (0 if none)."""
        next_at = 0
        for w in self._serving[:]:  # a failed worker leaves the list
            c = w.coalescer
            at = c.deadline
            if not at:
                continue
            if at <= now:
                if c.expire(now):
                    try:
                        w.notify()
                    except Exception:
                        self._failed(w)
            elif not next_at or at < next_at:
                next_at = at
        return next_at

    def _resume_throttled(self, now: int) -> int:
        """Queue the rate-limited workers whose wait is over; the next deadline (0 if none)."""
        next_at = 0
        for w in self._throttled[:]:
            at = w.throttled_until
            if at <= now:
                w.throttled_until = 0
                self._throttled.remove(w)
                if w in self._serving and w not in self._busy:
                    self._busy.append(w)
            elif not next_at or at < next_at:
                next_at = at
        return next_at

    def _poll(self, deadline: int) -> list[QueueWorker]:
        """Spin until a driver adds work or an engine completes some, or ``deadline``.

        Kicks are off meanwhile (the guests save their exits). Returns the
        workers with work; none means the window passed and kicks are back on.
        """
        serving = self._serving
        now = time.monotonic_ns
        for w in serving:
            w.queue.disable_notifications()
        found: list[QueueWorker] = []
        while now() < deadline and not self._requests:
            found = [w for w in serving if w.queue.avail_pending() or w.engine.ready()]
            if found:
                break
        # Kicks back on for every queue not about to be drained (draining re-enables them).
        found += [w for w in serving if w not in found and w.queue.enable_notifications()]
        return found

    def _adapt(self, block_ns: int) -> None:
        """Grow the polling window when events come soon after it, drop it when they do not."""
        if block_ns <= self.poll_ns:
            return
        if block_ns > self.poll_max_ns:
            self.poll_ns = 0
        elif self.poll_ns < self.poll_max_ns:
            self.poll_ns = min(self.poll_max_ns, max(POLL_START_NS, self.poll_ns * 2))

    # -- adding and removing workers --------------------------------------------

    def _apply_requests(self) -> None:
        while self._requests:
            add, worker, done = self._requests.popleft()
            if add:
                self._watch(worker)
                done.set()
                self._serve([worker], [])
            else:
                self._start_leaving(worker, done)

    def _watch(self, worker: QueueWorker) -> None:
        worker.polling = self.poll_max_ns > 0
        self._coalescing = self._coalescing or worker.coalescer.hold_ns > 0
        self._serving.append(worker)
        kick = worker.vring.kick_fd
        self._fds[kick] = (worker, True)
        self._poller.register(kick, select.POLLIN)
        efd = worker.engine.fd
        if efd is not None:
            self._fds[efd] = (worker, False)
            self._poller.register(efd, select.POLLIN)

    def _unwatch_kick(self, worker: QueueWorker) -> None:
        """Stop popping: the ring broke, its kick fd hung up, or the queue is stopping."""
        if worker in self._serving:
            self._serving.remove(worker)
            kick = worker.vring.kick_fd
            if self._fds.pop(kick, None) is not None:
                self._poller.unregister(kick)
        if worker in self._busy:
            self._busy.remove(worker)
        if worker in self._throttled:
            self._throttled.remove(worker)
            worker.throttled_until = 0
        try:
            worker.flush()  # no deadline is watched from now on: what is held goes now
        except Exception:
            log.exception("queue %d: signalling held completions failed", worker.index)

    def _start_leaving(self, worker: QueueWorker, done: threading.Event) -> None:
        self._unwatch_kick(worker)
        self._leaving.append(_Leaving(worker, done))
        self._finish_leaving()

    def _finish_leaving(self) -> None:
        """Close the leaving workers whose requests have all completed (or timed out)."""
        for lv in list(self._leaving):
            w = lv.worker
            try:
                w.complete()
                w.flush()  # a stopping queue holds nothing back
            except Exception:
                log.exception("queue %d: completing in-flight requests failed", w.index)
            if w.engine.inflight and time.monotonic() < lv.deadline:
                continue
            self._leaving.remove(lv)
            efd = w.engine.fd
            if efd is not None and self._fds.pop(efd, None) is not None:
                self._poller.unregister(efd)
            if w.engine.inflight:
                log.error("queue %d: %d requests never completed", w.index, w.engine.inflight)
            else:
                w.close()
            lv.done.set()
