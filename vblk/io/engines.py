"""I/O engines: how one queue's reads and writes reach the image, behind one interface.

A queue thread hands an engine checked reads and writes (:meth:`Engine.submit`),
pushes them on with :meth:`Engine.commit` once per batch, and collects
``(token, result)`` pairs with :meth:`Engine.reap`, where ``result`` is the
number of bytes moved or ``-errno``. Every completion is reaped on the queue
thread, so the used ring has a single writer whatever the engine.

- :class:`SyncEngine` runs each request inside ``submit``: no overlap, the
  lowest cost per request when the page cache answers.
- :class:`ThreadEngine` runs requests on a pool with preadv/pwritev and
  signals an eventfd; it works everywhere.
- :class:`UringEngine` submits to io_uring, one syscall per batch; what
  O_DIRECT on a real disk needs, and the default where the kernel allows it.
"""

from __future__ import annotations

import errno
import os
import select
import threading
from collections import deque
from collections.abc import Sequence
from queue import SimpleQueue
from typing import Protocol

from vblk.io import uring as _uring

__all__ = [
    "ENGINES",
    "Engine",
    "SyncEngine",
    "ThreadEngine",
    "UringEngine",
    "default_engine",
    "make_engine",
]

#: Engine names as ``vblk serve --aio`` takes them.
ENGINES = ("io_uring", "threads", "sync")

Completion = tuple[object, int]
_RWF_NOWAIT: int = getattr(os, "RWF_NOWAIT", 8)


class Engine(Protocol):
    """What a queue worker needs from an I/O engine."""

    #: Readable when completions wait to be reaped; None if they never wait.
    fd: int | None

    def submit(
        self, fd: int, write: bool, bufs: Sequence[memoryview], offset: int, token: object
    ) -> None: ...

    def commit(self) -> None: ...

    def reap(self) -> list[Completion]: ...

    def ready(self) -> bool:
        """Cheap check, for polling: are completions waiting?"""
        ...

    def clear_signal(self) -> None:
        """Consume the wake-up on :attr:`fd` (before reaping, so none is lost)."""
        ...

    @property
    def inflight(self) -> int: ...

    def close(self) -> None: ...


def _transfer(fd: int, write: bool, bufs: Sequence[memoryview], offset: int) -> int:
    """One preadv/pwritev; bytes moved or -errno (short transfers are the caller's)."""
    try:
        return os.pwritev(fd, bufs, offset) if write else os.preadv(fd, bufs, offset)
    except OSError as e:
        return -(e.errno or errno.EIO)


class SyncEngine:
    """Runs each request at once on the calling (queue) thread."""

    fd: int | None = None

    def __init__(self) -> None:
        self._done: list[Completion] = []

    def submit(
        self, fd: int, write: bool, bufs: Sequence[memoryview], offset: int, token: object
    ) -> None:
        self._done.append((token, _transfer(fd, write, bufs, offset)))

    def commit(self) -> None:
        pass

    def reap(self) -> list[Completion]:
        done, self._done = self._done, []
        return done

    def ready(self) -> bool:
        return bool(self._done)

    def clear_signal(self) -> None:
        pass

    @property
    def inflight(self) -> int:
        return len(self._done)

    def close(self) -> None:
        pass


class ThreadEngine:
    """A pool of threads doing preadv/pwritev; completions come back through an eventfd.

    The pool is a bare :class:`queue.SimpleQueue` and daemon threads rather
    than an executor: no future per request, about a third of the cost.
    """

    def __init__(self, threads: int, name: str = "vblk-io") -> None:
        self._work: SimpleQueue[tuple[int, bool, Sequence[memoryview], int, object] | None] = (
            SimpleQueue()
        )
        self._done: deque[Completion] = deque()
        self._inflight = 0
        self.fd: int | None = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._threads = [
            threading.Thread(target=self._serve, args=(self.fd,), name=f"{name}-{i}", daemon=True)
            for i in range(threads)
        ]
        for t in self._threads:
            t.start()

    def _serve(self, efd: int) -> None:
        get, done = self._work.get, self._done
        while (item := get()) is not None:
            fd, write, bufs, offset, token = item
            done.append((token, _transfer(fd, write, bufs, offset)))  # deque.append is atomic
            os.eventfd_write(efd, 1)

    def submit(
        self, fd: int, write: bool, bufs: Sequence[memoryview], offset: int, token: object
    ) -> None:
        self._inflight += 1
        self._work.put((fd, write, bufs, offset, token))

    def commit(self) -> None:
        pass

    def clear_signal(self) -> None:
        if self.fd is not None:
            _uring.clear_eventfd(self.fd)

    def reap(self) -> list[Completion]:
        out: list[Completion] = []
        done = self._done
        while done:
            out.append(done.popleft())
        self._inflight -= len(out)
        return out

    def ready(self) -> bool:
        return bool(self._done)

    @property
    def inflight(self) -> int:
        return self._inflight

    def close(self) -> None:
        """Let queued requests finish, then stop the threads."""
        for _ in self._threads:
            self._work.put(None)
        for t in self._threads:
            t.join()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class UringEngine:
    """io_uring: requests queue up as SQEs and go to the kernel in one syscall per batch.

    On a page-cached image (``direct=False``) two shortcuts keep the cost of
    a request at that of a plain syscall: a read first tries ``preadv`` with
    RWF_NOWAIT, which succeeds at once when the page cache has the data and
    only otherwise goes to the ring; a write runs inline, because filesystems
    such as ext4 cannot write buffered data without blocking, so io_uring
    would hand every write to a kernel worker thread (three times the CPU,
    measured). With O_DIRECT everything goes through the ring.
    """

    def __init__(self, entries: int, *, direct: bool = True) -> None:
        self._ring = _uring.Uring(max(8, entries))
        self.fd: int | None = self._ring.eventfd
        self._inline = not direct
        self._done: list[Completion] = []  # finished inline, or while waiting for SQ space

    def submit(
        self, fd: int, write: bool, bufs: Sequence[memoryview], offset: int, token: object
    ) -> None:
        if self._inline:
            if write:
                self._done.append((token, _transfer(fd, True, bufs, offset)))
                return
            try:
                n = os.preadv(fd, bufs, offset, _RWF_NOWAIT)
            except BlockingIOError:
                n = -1
            except OSError as e:
                self._done.append((token, -(e.errno or errno.EIO)))
                return
            if n >= 0 and n == sum(map(len, bufs)):
                self._done.append((token, n))
                return
            # Not (all) cached: the whole read goes to the ring.
        op = _uring.OP_WRITEV if write else _uring.OP_READV
        try:
            self._ring.prep_rw(op, fd, bufs, offset, token)
        except _uring.RingFull:
            # Only if more is in flight than the ring holds; stay correct anyway.
            self._wait_for_space()
            self._ring.prep_rw(op, fd, bufs, offset, token)

    def _wait_for_space(self) -> None:
        ring = self._ring
        while ring.space == 0:
            ring.submit()
            select.select([ring.eventfd], [], [], 1.0)
            _uring.clear_eventfd(ring.eventfd)
            self._done.extend(ring.reap())

    def commit(self) -> None:
        self._ring.submit()

    def reap(self) -> list[Completion]:
        out = self._ring.reap()
        if self._done:
            out = self._done + out
            self._done = []
        return out

    def ready(self) -> bool:
        return bool(self._done) or self._ring.cq_ready()

    def clear_signal(self) -> None:
        _uring.clear_eventfd(self._ring.eventfd)

    @property
    def inflight(self) -> int:
        return self._ring.inflight + len(self._done)

    def close(self) -> None:
        self._ring.close()
        self.fd = None


def default_engine() -> str:
    """io_uring where the kernel (and any seccomp policy) allows it, else the thread pool."""
    return "io_uring" if _uring.available() else "threads"


def make_engine(
    name: str, *, queue_size: int, io_threads: int, direct: bool = True, label: str = "vblk-io"
) -> Engine:
    """A fresh engine for one queue; ``direct``: the image is opened with O_DIRECT."""
    if name == "io_uring":
        return UringEngine(queue_size, direct=direct)
    if name == "threads":
        return ThreadEngine(io_threads, label)
    if name == "sync":
        return SyncEngine()
    raise ValueError(f"unknown I/O engine {name!r} (choose from {', '.join(ENGINES)})")
