"""Blocking use of a storage, off the I/O threads: control flushes and the plugin facade.

A storage queue is asynchronous (submit, commit, wait for its fd, reap).
The few callers that must wait for one operation (the final flush of
``vblk serve``, the flush on a switch to writethrough, a Python plugin
that wraps another spec) use :func:`run` over a queue of their own, never
an I/O thread's. :func:`open_disk` gives plugin authors the same methods
their own class has (``pread``, ``pwrite``, ``flush``, ...) over any spec.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import threading
from collections.abc import Mapping
from types import TracebackType
from typing import Any

from vblk.storage.base import FLAG_UNMAP, Completion, Op, Storage, StorageQueue

__all__ = ["ControlQueue", "Disk", "open_disk", "run", "wait"]

#: Signals the main thread handles; threads a storage starts for a queue must not take them.
_MAIN_SIGNALS = {signal.SIGINT, signal.SIGTERM}
#: How long one blocking operation may take before it is reported as failed.
TIMEOUT = 120.0
#: Operations a control queue may have in flight (one at a time, with room for backends' needs).
CONTROL_DEPTH = 8


def wait(queue: StorageQueue, timeout: float = TIMEOUT) -> list[Completion]:
    """Block until ``queue`` has completions and reap them (TimeoutError after ``timeout``)."""
    poller = None
    while True:
        if queue.ready():
            queue.clear_signal()
            out = queue.reap()
            if out:
                return out
        fd = queue.fd
        if fd is None:
            out = queue.reap()
            if out:
                return out
            raise OSError(errno.EIO, "the storage queue completed nothing")
        if poller is None:
            poller = select.poll()
            poller.register(fd, select.POLLIN)
        if not poller.poll(int(timeout * 1000)):
            raise TimeoutError(f"no completion from the storage within {timeout:.0f}s")
        queue.clear_signal()
        out = queue.reap()
        if out:
            return out


def run(
    queue: StorageQueue,
    op: int,
    offset: int,
    length: int,
    bufs: list[memoryview],
    flags: int = 0,
) -> int:
    """Run one operation to its end (short transfers resubmitted); OSError on failure.

    ``queue`` must have nothing else in flight.
    """
    token = object()
    done = 0
    while True:
        queue.submit(op, offset + done, length - done, _advance(bufs, done), flags, token)
        queue.commit()
        res = 0
        got = False
        while not got:
            for t, r in wait(queue):
                if t is token:
                    res, got = r, True
        if res < 0:
            raise OSError(-res, os.strerror(-res))
        if op > Op.WRITE:
            return 0
        if res == 0 and length > done:
            raise OSError(errno.EIO, "unexpected end of storage")
        done += res
        if done >= length:
            return done


def _advance(bufs: list[memoryview], n: int) -> list[memoryview]:
    if not n:
        return bufs
    out: list[memoryview] = []
    for b in bufs:
        if n >= len(b):
            n -= len(b)
            continue
        out.append(b[n:] if n else b)
        n = 0
    return out


class ControlQueue:
    """One storage queue for blocking callers, opened on first use, one operation at a time."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.lock = threading.Lock()
        self._queue: StorageQueue | None = None

    def queue(self) -> StorageQueue:
        """The queue (open it if needed); call with :attr:`lock` held."""
        if self._queue is None:
            # Threads the backend starts for it inherit this mask (see server.start_queue).
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, _MAIN_SIGNALS)
            try:
                self._queue = self.storage.open_queue(0, CONTROL_DEPTH)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        return self._queue

    def run(self, op: int, offset: int, length: int, bufs: list[memoryview], flags: int) -> int:
        with self.lock:
            return run(self.queue(), op, offset, length, bufs, flags)

    def close(self) -> None:
        with self.lock:
            if self._queue is not None:
                self._queue.close()
                self._queue = None


class Disk:
    """A storage with the methods of a Python plugin, blocking; for plugins that wrap a spec.

    Buffers are read into and written from in place (no copies where the
    backend allows). Thread-safe: operations run one at a time.
    """

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self._control = ControlQueue(storage)

    @property
    def block_size(self) -> int:
        return self.storage.caps.block_size

    @property
    def writable(self) -> bool:
        return self.storage.caps.writable

    def size(self) -> int:
        return self.storage.caps.size

    def pread(self, offset: int, buf: memoryview | bytearray) -> None:
        """Fill ``buf`` from ``offset``."""
        view = memoryview(buf)
        self._control.run(Op.READ, offset, len(view), [view], 0)

    def pwrite(self, offset: int, buf: memoryview | bytes | bytearray) -> None:
        """Write all of ``buf`` at ``offset``."""
        view = memoryview(buf)
        self._control.run(Op.WRITE, offset, len(view), [view], 0)

    def flush(self) -> None:
        if self.storage.caps.flush:
            self._control.run(Op.FLUSH, 0, 0, [], 0)

    def discard(self, offset: int, length: int) -> None:
        """Deallocate a range if the storage can (a discard is only ever a hint)."""
        if self.storage.caps.discard:
            self._control.run(Op.DISCARD, offset, length, [], 0)

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        """Make a range read as zeroes (written as zero buffers where the storage cannot zero)."""
        caps = self.storage.caps
        if caps.write_zeroes:
            flags = FLAG_UNMAP if unmap and caps.zeroes_unmap else 0
            self._control.run(Op.WRITE_ZEROES, offset, length, [], flags)
            return
        from vblk.blk.device import zero_buffers

        self._control.run(Op.WRITE, offset, length, zero_buffers(length), 0)

    def close(self) -> None:
        self._control.close()
        self.storage.close()

    def __enter__(self) -> Disk:
        return self

    def __exit__(
        self,
        et: type[BaseException] | None,
        ev: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def open_disk(
    spec: str,
    /,
    *,
    read_only: bool = False,
    format: str | None = None,
    opts: Mapping[str, str] | None = None,
    **kw: Any,
) -> Disk:
    """Open any spec ``vblk serve`` takes, as a blocking :class:`Disk`; StorageError if it cannot.

    The spec's ``--opt`` pairs come as ``opts`` and/or keywords (values are
    turned into strings). Raw files are used without threads of their own.
    """
    from vblk.storage.spec import open_storage

    pairs = {**(opts or {}), **kw}
    storage = open_storage(
        spec,
        opts={k: str(v) for k, v in pairs.items()},
        read_only=read_only,
        direct=False,
        fmt=format,
        aio="sync",
        io_threads=1,
        create=None,
    )
    return Disk(storage)
