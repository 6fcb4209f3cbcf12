"""I/O engines: how one queue's operations reach a raw image, as :class:`StorageQueue` s.

These are the queues of :class:`vblk.storage.file.FileStorage`. A queue
thread hands an engine checked operations (:meth:`submit`), pushes them on
with :meth:`commit` once per batch, and collects ``(token, result)`` pairs
with :meth:`reap`, where ``result`` is the number of bytes moved (READ,
WRITE), 0 (FLUSH, DISCARD, WRITE_ZEROES) or ``-errno``. Every completion is
reaped on the queue thread, so the used ring has a single writer whatever
the engine. Flushes, discards and zeroing take the same path as data, so a
slow fdatasync never stalls the queue thread (except with ``sync``).

- :class:`SyncEngine` runs each operation inside ``submit``: no overlap, the
  lowest cost per request when the page cache answers.
- :class:`ThreadEngine` runs operations on a pool and signals an eventfd;
  it works everywhere.
- :class:`UringEngine` submits to io_uring, one syscall per batch (READV,
  WRITEV, FSYNC, FALLOCATE); what O_DIRECT on a real disk needs, and the
  default where the kernel allows it.
"""

from __future__ import annotations

import errno
import os
import select
import threading
from collections import deque
from queue import SimpleQueue

from vblk.io import uring as _uring
from vblk.io.image import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    Image,
)
from vblk.storage.base import FLAG_UNMAP, Completion, Op, StorageQueue

__all__ = [
    "ENGINES",
    "SyncEngine",
    "ThreadEngine",
    "UringEngine",
    "default_engine",
    "make_engine",
]

#: Engine names as ``vblk serve --aio`` takes them.
ENGINES = ("io_uring", "threads", "sync")

_RWF_NOWAIT: int = getattr(os, "RWF_NOWAIT", 8)
_READ, _WRITE, _FLUSH, _DISCARD, _ZEROES = (int(o) for o in Op)
#: fallocate answers meaning "not this way here": the engine falls back to :class:`Image`.
_UNSUPPORTED = (-errno.EOPNOTSUPP, -errno.EINVAL, -errno.ENOSYS)


def _transfer(fd: int, write: int, bufs: list[memoryview], offset: int) -> int:
    """One preadv/pwritev; bytes moved or -errno (short transfers are the caller's)."""
    try:
        return os.pwritev(fd, bufs, offset) if write else os.preadv(fd, bufs, offset)
    except OSError as e:
        return -(e.errno or errno.EIO)


def _control(image: Image, op: int, offset: int, length: int, flags: int) -> int:
    """FLUSH, DISCARD or WRITE_ZEROES, synchronously, with the image's fallbacks; 0 or -errno."""
    try:
        if op == _FLUSH:
            os.fdatasync(image.fd)
        elif op == _DISCARD:
            image.discard(offset, length)
        elif op == _ZEROES:
            image.write_zeroes(offset, length, unmap=bool(flags & FLAG_UNMAP))
        else:
            return -errno.EINVAL
    except OSError as e:
        return -(e.errno or errno.EIO)
    return 0


def _run(
    image: Image, op: int, offset: int, length: int, bufs: list[memoryview], flags: int
) -> int:
    if op <= _WRITE:
        return _transfer(image.fd, op, bufs, offset)
    return _control(image, op, offset, length, flags)


class SyncEngine:
    """Runs each operation at once on the calling (queue) thread."""

    fd: int | None = None

    def __init__(self, image: Image) -> None:
        self._image = image
        self._fd = image.fd
        self._done: list[Completion] = []

    def submit(
        self,
        op: int,
        offset: int,
        length: int,
        bufs: list[memoryview],
        flags: int,
        token: object,
    ) -> None:
        if op <= _WRITE:
            self._done.append((token, _transfer(self._fd, op, bufs, offset)))
        else:
            self._done.append((token, _control(self._image, op, offset, length, flags)))

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


_Work = tuple[int, int, int, list[memoryview], int, object]


class ThreadEngine:
    """A pool of threads doing the operations; completions come back through an eventfd.

    The pool is a bare :class:`queue.SimpleQueue` and daemon threads rather
    than an executor: no future per request, about a third of the cost.
    """

    def __init__(self, image: Image, threads: int, name: str = "vblk-io") -> None:
        self._image = image
        self._work: SimpleQueue[_Work | None] = SimpleQueue()
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
        get, done, image = self._work.get, self._done, self._image
        while (item := get()) is not None:
            op, offset, length, bufs, flags, token = item
            done.append((token, _run(image, op, offset, length, bufs, flags)))  # atomic append
            os.eventfd_write(efd, 1)

    def submit(
        self,
        op: int,
        offset: int,
        length: int,
        bufs: list[memoryview],
        flags: int,
        token: object,
    ) -> None:
        self._inflight += 1
        self._work.put((op, offset, length, bufs, flags, token))

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
        """Let queued operations finish, then stop the threads."""
        for _ in self._threads:
            self._work.put(None)
        for t in self._threads:
            t.join()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class _Falloc:
    """A discard or zeroing in the ring: what to redo if the kernel refuses that fallocate mode."""

    __slots__ = ("flags", "length", "offset", "op", "token")

    def __init__(self, op: int, offset: int, length: int, flags: int, token: object) -> None:
        self.op = op
        self.offset = offset
        self.length = length
        self.flags = flags
        self.token = token


class UringEngine:
    """io_uring: operations queue up as SQEs and go to the kernel in one syscall per batch.

    On a page-cached image (``direct=False``) two shortcuts keep the cost of
    a request at that of a plain syscall: a read first tries ``preadv`` with
    RWF_NOWAIT, which succeeds at once when the page cache has the data and
    only otherwise goes to the ring; a write runs inline, because filesystems
    such as ext4 cannot write buffered data without blocking, so io_uring
    would hand every write to a kernel worker thread (three times the CPU,
    measured). With O_DIRECT every read and write goes through the ring.

    FLUSH is an IORING_OP_FSYNC (datasync); DISCARD and WRITE_ZEROES are
    IORING_OP_FALLOCATE (punch hole, zero range). Where the kernel or the
    filesystem refuses that mode, the operation is redone by :class:`Image`
    with its fallbacks, and later ones of that kind run inline (rare setups:
    a block device without write-zeroes-unmap, a filesystem without holes).
    """

    def __init__(self, image: Image, entries: int, *, direct: bool = True) -> None:
        self._image = image
        self._fd = image.fd
        self._ring = _uring.Uring(max(8, entries))
        self.fd: int | None = self._ring.eventfd
        self._inline = not direct
        self._done: list[Completion] = []  # finished inline, or while waiting for SQ space
        self._fallocs = 0  # _Falloc tokens in the ring
        self._falloc_refused: set[int] = set()  # ops whose fallocate mode failed once

    def submit(
        self,
        op: int,
        offset: int,
        length: int,
        bufs: list[memoryview],
        flags: int,
        token: object,
    ) -> None:
        fd = self._fd
        if op > _WRITE:
            self._submit_control(op, offset, length, flags, token)
            return
        if self._inline:
            if op:
                self._done.append((token, _transfer(fd, op, bufs, offset)))
                return
            try:
                n = os.preadv(fd, bufs, offset, _RWF_NOWAIT)
            except BlockingIOError:
                n = -1
            except OSError as e:
                self._done.append((token, -(e.errno or errno.EIO)))
                return
            if n >= 0 and n == length:
                self._done.append((token, n))
                return
            # Not (all) cached: the whole read goes to the ring.
        uop = _uring.OP_WRITEV if op else _uring.OP_READV
        try:
            self._ring.prep_rw(uop, fd, bufs, offset, token)
        except _uring.RingFull:
            # Only if more is in flight than the ring holds; stay correct anyway.
            self._wait_for_space()
            self._ring.prep_rw(uop, fd, bufs, offset, token)

    def _submit_control(self, op: int, offset: int, length: int, flags: int, token: object) -> None:
        ring = self._ring
        if ring.space == 0:
            self._wait_for_space()
        if op == _FLUSH:
            ring.prep_fsync(self._fd, token)
            return
        if op in self._falloc_refused or op not in (_DISCARD, _ZEROES):
            self._done.append((token, _control(self._image, op, offset, length, flags)))
            return
        if op == _ZEROES and not flags & FLAG_UNMAP:
            mode = FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE
        else:
            mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        wrapped = _Falloc(op, offset, length, flags, token)
        ring.prep_fallocate(self._fd, mode, offset, length, wrapped)
        self._fallocs += 1

    def _wait_for_space(self) -> None:
        ring = self._ring
        while ring.space == 0:
            ring.submit()
            select.select([ring.eventfd], [], [], 1.0)
            _uring.clear_eventfd(ring.eventfd)
            self._done.extend(self._unwrap(ring.reap()) if self._fallocs else ring.reap())

    def _unwrap(self, out: list[Completion]) -> list[Completion]:
        """Hand back the callers' tokens of fallocates, redoing the refused ones by fallback."""
        fixed: list[Completion] = []
        for token, res in out:
            if type(token) is _Falloc:
                self._fallocs -= 1
                t = token
                if res in _UNSUPPORTED:
                    self._falloc_refused.add(t.op)
                    res = _control(self._image, t.op, t.offset, t.length, t.flags)
                fixed.append((t.token, res))
            else:
                fixed.append((token, res))
        return fixed

    def commit(self) -> None:
        self._ring.submit()

    def reap(self) -> list[Completion]:
        out = self._ring.reap()
        if self._fallocs:
            out = self._unwrap(out)
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
    name: str,
    image: Image,
    *,
    queue_size: int,
    io_threads: int,
    label: str = "vblk-io",
) -> StorageQueue:
    """A fresh engine for one queue of ``image`` (O_DIRECT or not, as the image was opened)."""
    if name == "io_uring":
        return UringEngine(image, queue_size, direct=image.direct)
    if name == "threads":
        return ThreadEngine(image, io_threads, label)
    if name == "sync":
        return SyncEngine(image)
    raise ValueError(f"unknown I/O engine {name!r} (choose from {', '.join(ENGINES)})")
