"""IOThread and QueueWorker over in-memory rings: several queues on one poll loop."""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import need_io_uring
from test_client_pair import Pair

from vblk.blk.defs import ReqType, Status
from vblk.io.uring import clear_eventfd
from vblk.stats.stages import KINDS
from vblk.vhost_user.backend import Vring
from vblk.virtio import defs as vdefs
from vblk.worker import IOThread, QueueWorker


class Queue:
    """A Pair (driver ring + device queue) wired to a Vring with real eventfds."""

    def __init__(self, tmp: Path, index: int, size: int = 64) -> None:
        d = tmp / f"q{index}"
        d.mkdir()
        self.pair = Pair(d, size=size)
        self.vring = Vring(index, num=size)
        self.vring.queue = self.pair.dq
        self.kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.vring.kick_fd = os.dup(self.kick)
        self.vring.call_fd = os.dup(self.call)
        self.done: list[tuple[Any, int]] = []

    def worker(self, engine: str = "sync") -> QueueWorker:
        self.pair.use_engine(engine)
        return QueueWorker(self.vring, self.pair.device)

    def submit_writes(self, n: int, pattern: int) -> None:
        for i in range(n):
            self.pair.data(i * 4096, 4096)[:] = bytes([pattern + i & 0xFF]) * 4096
            self.pair.driver.submit_write(i * 8, self.pair.gpa(i * 4096), 4096, tag=i)
        os.eventfd_write(self.kick, 1)

    def wait(self, n: int, timeout: float = 10.0) -> None:
        """Reap until ``n`` requests are done, sleeping on the call eventfd in between."""
        deadline = time.monotonic() + timeout
        while len(self.done) < n:
            self.pair.driver.reap(self.done)
            if len(self.done) >= n:
                break
            assert time.monotonic() < deadline, f"{len(self.done)} of {n} requests completed"
            select.select([self.call], [], [], 0.05)

    def close(self) -> None:
        self.vring.close_fds()
        os.close(self.kick)
        os.close(self.call)


@pytest.fixture
def queues(tmp_path: Path) -> Any:
    made: list[Queue] = []

    def make(n: int, size: int = 64) -> list[Queue]:
        made.extend(Queue(tmp_path, len(made) + i, size) for i in range(n))
        return made[-n:]

    yield make
    for q in made:
        q.close()


@pytest.mark.parametrize("engine", ["sync", "threads", "io_uring"])
def test_one_thread_serves_every_queue(queues: Any, engine: str) -> None:
    if engine == "io_uring":
        need_io_uring()
    qs = queues(3)
    thread = IOThread("test-iothread")
    thread.start()
    workers = [q.worker(engine) for q in qs]
    for w in workers:
        thread.add(w)
    assert thread.workers == workers
    for k, q in enumerate(qs):
        q.submit_writes(16, pattern=k * 16)
    for q in qs:
        q.wait(16)
        assert sorted(q.done) == [(i, Status.OK) for i in range(16)]
    for k, q in enumerate(qs):
        assert q.pair.one(ReqType.FLUSH, 0) == Status.OK
        raw = q.pair.image.image.fd
        assert os.pread(raw, 4096, 5 * 4096) == bytes([k * 16 + 5]) * 4096
    for w in workers:
        thread.remove(w)
    assert thread.workers == []
    thread.stop()
    assert not thread.thread.is_alive()
    assert sum(w.stats.requests for w in workers) == 48
    assert all(w.kicks >= 1 and w.interrupts >= 1 for w in workers)


def test_a_queue_over_its_budget_comes_back_without_a_kick(queues: Any) -> None:
    """A worker that stops on its budget keeps kicks off, so the loop must return to it."""
    a, b = queues(2, size=128)
    thread = IOThread("test-iothread")
    thread.budget = 3  # checked every NOTIFY_BATCH requests, so in effect 16
    thread.start()
    wa, wb = a.worker(), b.worker()
    thread.add(wa)
    thread.add(wb)
    a.submit_writes(40, pattern=1)
    b.submit_writes(40, pattern=2)
    a.wait(40)
    b.wait(40)
    # The drains handed over after 16 requests each: more batches than kicks.
    assert wa.batches >= 3 and wa.kicks <= 2
    thread.remove(wa)
    thread.remove(wb)
    thread.stop()


def test_a_broken_queue_does_not_stop_its_neighbours(
    queues: Any, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = queues(2)
    thread = IOThread("test-iothread")
    thread.start()
    wa, wb = a.worker(), b.worker()
    thread.add(wa)
    thread.add(wb)
    # The driver claims more chains than the ring holds: the ring cannot be trusted.
    with caplog.at_level(logging.ERROR, logger="vblk"):
        avail = vdefs.ring_layout(64).avail
        a.pair.mem[avail + 2 : avail + 4] = (64 + 5).to_bytes(2, "little")
        os.eventfd_write(a.kick, 1)
        deadline = time.monotonic() + 10
        while a.pair.dq.broken is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    assert any("broken" in r.getMessage() for r in caplog.records)
    assert wa not in thread._serving  # its kicks are no longer watched
    b.submit_writes(8, pattern=3)
    b.wait(8)
    assert sorted(b.done) == [(i, Status.OK) for i in range(8)]
    thread.remove(wa)
    thread.remove(wb)
    thread.stop()


class HeldEngine:
    """An engine whose completions wait until the test releases them."""

    def __init__(self, image_fd: int) -> None:
        self.image_fd = image_fd
        self.fd: int | None = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.held: list[tuple[object, int]] = []
        self.released: list[tuple[object, int]] = []
        self.lock = threading.Lock()
        self.closed = False

    def submit(
        self, op: int, offset: int, length: int, bufs: Any, flags: int, token: object
    ) -> None:
        fd = self.image_fd
        n = os.pwritev(fd, bufs, offset) if op else os.preadv(fd, bufs, offset)
        with self.lock:
            self.held.append((token, n))

    def release(self) -> None:
        with self.lock:
            self.released += self.held
            self.held = []
        assert self.fd is not None
        os.eventfd_write(self.fd, 1)

    def commit(self) -> None:
        pass

    def reap(self) -> list[tuple[object, int]]:
        with self.lock:
            out, self.released = self.released, []
        return out

    def ready(self) -> bool:
        return bool(self.released)

    def clear_signal(self) -> None:
        assert self.fd is not None
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            pass

    @property
    def inflight(self) -> int:
        return len(self.held) + len(self.released)

    def close(self) -> None:
        self.closed = True
        assert self.fd is not None
        os.close(self.fd)
        self.fd = None


def test_remove_finishes_in_flight_requests_first(queues: Any) -> None:
    (a,) = queues(1)
    thread = IOThread("test-iothread")
    thread.start()
    w = a.worker()
    engine = HeldEngine(a.pair.image.image.fd)
    w.engine.close()
    w.engine = engine
    thread.add(w)
    a.submit_writes(4, pattern=9)
    deadline = time.monotonic() + 10
    while len(engine.held) < 4:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    removed = threading.Event()
    remover = threading.Thread(target=lambda: (thread.remove(w), removed.set()))
    remover.start()
    time.sleep(0.2)
    assert not removed.is_set(), "remove returned with requests still in flight"
    assert not engine.closed
    engine.release()
    remover.join(10)
    assert removed.is_set() and engine.closed
    a.wait(4)  # every request was completed and signalled before the queue went
    assert sorted(a.done) == [(i, Status.OK) for i in range(4)]
    thread.stop()


def test_adding_to_a_thread_that_is_not_running_breaks_the_queue(queues: Any) -> None:
    (a,) = queues(1)
    thread = IOThread("never-started")
    thread.add(a.worker())
    assert a.pair.dq.broken is not None and "not running" in a.pair.dq.broken
    thread.stop()


def _coalescing_worker(q: Queue, thread: IOThread, hold_us: int) -> QueueWorker:
    """A worker on ``thread`` whose coalescer has learned to wait for two completions."""
    w = QueueWorker(q.vring, q.pair.device, coalesce_us=hold_us)
    thread.add(w)
    q.submit_writes(2, pattern=4)  # one kick, two chains: they complete together
    q.wait(2)
    assert w.coalescer.goal == 2
    clear_eventfd(q.call)
    return w


def _hold_one(q: Queue, thread: IOThread) -> QueueWorker:
    """A coalescing worker holding one completion's interrupt, for ten seconds if left alone."""
    w = _coalescing_worker(q, thread, hold_us=10_000_000)
    q.pair.driver.submit_write(0, q.pair.gpa(0), 4096, tag=7)
    os.eventfd_write(q.kick, 1)
    deadline = time.monotonic() + 5
    while not w.coalescer.pending:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    assert not _signalled(q.call, 0.05)
    return w


def _signalled(fd: int, timeout: float) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def test_a_held_interrupt_goes_out_by_its_deadline(queues: Any) -> None:
    (a,) = queues(1)
    thread = IOThread("test-iothread")
    thread.start()
    w = _coalescing_worker(a, thread, hold_us=150_000)
    t0 = time.monotonic()
    a.pair.driver.submit_write(0, a.pair.gpa(0), 4096, tag=7)
    os.eventfd_write(a.kick, 1)
    deadline = t0 + 5
    while a.pair.dq.used_idx != 3:  # completed and published at once ...
        assert time.monotonic() < deadline
        time.sleep(0.001)
    assert not _signalled(a.call, 0.05)  # ... but its interrupt waits for company
    assert _signalled(a.call, 5)
    assert time.monotonic() - t0 >= 0.14
    assert w.coalescer.timeouts == 1 and w.interrupts >= 2
    a.wait(3)
    assert (7, Status.OK) in a.done
    thread.remove(w)
    thread.stop()


def test_removing_a_queue_releases_its_held_interrupt(queues: Any) -> None:
    (a,) = queues(1)
    thread = IOThread("test-iothread")
    thread.start()
    w = _hold_one(a, thread)
    thread.remove(w)
    assert _signalled(a.call, 0)  # at once, not after ten seconds
    assert w.coalescer.timeouts == 0
    thread.stop()


def test_a_queue_that_breaks_releases_its_held_interrupt(queues: Any) -> None:
    (a,) = queues(1)
    thread = IOThread("test-iothread")
    thread.start()
    w = _hold_one(a, thread)
    avail = vdefs.ring_layout(64).avail  # then the driver breaks the ring
    a.pair.mem[avail + 2 : avail + 4] = (3 + 64 + 5).to_bytes(2, "little")
    os.eventfd_write(a.kick, 1)
    assert _signalled(a.call, 2)  # the completion it already had is not left unannounced
    assert a.pair.dq.broken is not None
    thread.remove(w)
    thread.stop()


# -- stage timing ------------------------------------------------------------------

#: What one storage operation takes on the fake clock.
STORAGE_NS = 1_000
#: What every other clock reading advances it by.
TICK_NS = 10


class FakeClock:
    """A monotonic ns clock that moves by TICK_NS per reading, or by hand."""

    def __init__(self) -> None:
        self.ns = 1_000_000

    def __call__(self) -> int:
        self.ns += TICK_NS
        return self.ns


class ClockedQueue:
    """A storage queue whose every operation takes STORAGE_NS of the fake clock."""

    def __init__(self, inner: Any, clock: FakeClock) -> None:
        self.inner = inner
        self.clock = clock
        self.submits = 0
        self.fd = inner.fd

    def submit(
        self, op: int, offset: int, length: int, bufs: Any, flags: int, token: object
    ) -> None:
        self.submits += 1
        self.clock.ns += STORAGE_NS
        self.inner.submit(op, offset, length, bufs, flags, token)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _timed_worker(q: Queue, sample_every: int) -> tuple[QueueWorker, FakeClock, ClockedQueue]:
    """A worker with no thread (the test calls drain()) on a fake clock."""
    q.pair.use_engine("sync")
    w = QueueWorker(q.vring, q.pair.device, sample_every=sample_every)
    clock = FakeClock()
    w.clock = clock
    engine = ClockedQueue(w.engine, clock)
    w.engine = engine
    return w, clock, engine


def _one_at_a_time(q: Queue, w: QueueWorker, submit: Any, n: int) -> None:
    """Submit and drain ``n`` requests, one per drain, and reap them."""
    for i in range(n):
        submit(i)
        assert w.drain() is False
    q.pair.driver.reap(q.done)
    assert len(q.done) == n and all(s == Status.OK for _, s in q.done)


def test_every_request_timed_and_its_stages_add_up_to_backend(queues: Any) -> None:
    (a,) = queues(1)
    w, _, _ = _timed_worker(a, sample_every=1)
    drv = a.pair.driver
    _one_at_a_time(a, w, lambda i: drv.submit_read(i * 8, a.pair.gpa(0), 4096, tag=i), 10)
    snap = w.stages.snapshot()
    assert all(snap[s]["count"] == 10 for s in snap), {s: snap[s]["count"] for s in snap}
    parts = sum(snap[s]["sum_ns"] for s in ("device", "host_io", "complete", "notify"))
    assert parts == snap["backend"]["sum_ns"]
    # host_io is the storage's time plus the one reading that saw it done.
    assert snap["host_io"]["sum_ns"] == 10 * (STORAGE_NS + TICK_NS)
    assert w.stages.inflight == 0 and w.stages.pending == 0
    assert w.snapshot()["stages"]["backend"]["count"] == 10
    w.close()


def test_one_request_in_sample_every_is_timed(queues: Any) -> None:
    (a,) = queues(1, size=128)
    w, _, _ = _timed_worker(a, sample_every=4)
    a.submit_writes(16, pattern=1)
    assert w.drain() is False
    a.pair.driver.reap(a.done)
    assert len(a.done) == 16
    assert w.stages.snapshot()["backend"]["count"] == 4
    a.submit_writes(3, pattern=1)  # the countdown carries over from drain to drain
    w.drain()
    assert w.stages.snapshot()["backend"]["count"] == 4
    a.submit_writes(1, pattern=1)
    w.drain()
    assert w.stages.snapshot()["backend"]["count"] == 5
    assert not any(w.stages.pop_ns)
    w.close()


def test_host_io_of_a_write_runs_to_its_writethrough_flush(queues: Any) -> None:
    """A request of several storage steps: host_io is first submit to last completion."""
    (a,) = queues(1)
    w, _, engine = _timed_worker(a, sample_every=1)
    a.pair.device.config.writeback = 0
    drv = a.pair.driver
    _one_at_a_time(a, w, lambda i: drv.submit_write(i * 8, a.pair.gpa(0), 4096, tag=i), 4)
    assert engine.submits == 8  # each write went on with its flush
    snap = w.stages.snapshot()
    assert snap["host_io"]["count"] == 4
    assert snap["host_io"]["sum_ns"] >= 4 * 2 * STORAGE_NS
    assert snap["host_io"]["sum_ns"] < 4 * 2 * (STORAGE_NS + 4 * TICK_NS)
    parts = sum(snap[s]["sum_ns"] for s in ("device", "host_io", "complete", "notify"))
    assert parts == snap["backend"]["sum_ns"]
    w.close()


def test_a_trace_names_each_request_kind_with_its_range(queues: Any) -> None:
    (a,) = queues(1)
    w, _, _ = _timed_worker(a, sample_every=32)
    w.stages.start_trace(1, 100)
    drv = a.pair.driver
    _one_at_a_time(a, w, lambda i: drv.submit_write(8, a.pair.gpa(0), 4096, tag=i), 1)
    a.done.clear()
    requests = [
        lambda i: drv.submit_read(16, a.pair.gpa(0), 8192, tag=i),
        lambda i: drv.submit(ReqType.FLUSH, 0, tag=i),
        lambda i: drv.submit(ReqType.GET_ID, 0, (), [(a.pair.gpa(0), 20)], tag=i),
    ]
    _one_at_a_time(a, w, lambda i: requests[i](i), 3)
    result = w.stages.stop_trace(0)
    kinds = [(KINDS[r[6]], r[7], r[8]) for r in result["requests"]]
    assert kinds == [
        ("write", 4096, 4096),
        ("read", 8192, 8192),
        ("flush", 0, 0),
        ("get_id", 0, 0),
    ]
    get_id = result["requests"][-1]
    assert get_id[3] == get_id[2]  # answered by the device: no host_io
    assert w.stages.sample_every == 32
    w.close()


def test_a_sampled_interrupt_held_by_the_coalescer_counts_in_notify(queues: Any) -> None:
    (a,) = queues(1)
    a.pair.use_engine("sync")
    w = QueueWorker(a.vring, a.pair.device, coalesce_us=10_000_000, sample_every=1)
    clock = FakeClock()
    w.clock = clock
    a.submit_writes(2, pattern=4)  # two together: the coalescer learns to wait for two
    w.drain()
    assert w.coalescer.goal == 2
    before = w.stages.snapshot()["notify"]
    a.pair.driver.submit_write(0, a.pair.gpa(0), 4096, tag=9)
    w.drain()
    assert w.coalescer.pending and w.stages.pending == 1  # pushed, interrupt held
    clock.ns += 5_000_000
    w.flush()
    after = w.stages.snapshot()["notify"]
    assert after["count"] == before["count"] + 1
    assert after["sum_ns"] - before["sum_ns"] >= 5_000_000
    w.close()
