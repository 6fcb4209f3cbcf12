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
