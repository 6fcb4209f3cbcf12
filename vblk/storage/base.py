"""The storage interface every backend implements (raw file, NBD, qemu-img formats, RBD, Python).

A :class:`Storage` is one open disk, shared by all queues of a device. It
declares its :class:`Capabilities`, from which the device derives the
virtio-blk features it offers, and opens one :class:`StorageQueue` per
running virtqueue. A storage queue is used only on that virtqueue's I/O
thread: the thread submits operations, commits them once per batch, waits
for :attr:`StorageQueue.fd` to become readable, and reaps ``(token,
result)`` pairs. So every completion is reaped on the I/O thread and the
used ring keeps a single writer, whatever threads the backend runs.

Results: for READ and WRITE the number of bytes moved (fewer than asked is
a short transfer; the device submits the rest again); for the other
operations 0; a failure is ``-errno``. ``bufs`` are memoryviews of guest
memory, valid until the operation is reaped; backends read and write them
in place (no copies) wherever their library allows.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol

from vblk.errors import VblkError

__all__ = [
    "FLAG_FUA",
    "FLAG_UNMAP",
    "Capabilities",
    "ChannelQueue",
    "Completion",
    "CompletionChannel",
    "Op",
    "Storage",
    "StorageError",
    "StorageQueue",
]


class StorageError(VblkError):
    """A storage spec cannot be opened or an operation cannot be set up; one line for the user."""


class Op(IntEnum):
    """What a storage queue is asked to do."""

    READ = 0
    WRITE = 1
    FLUSH = 2
    DISCARD = 3
    WRITE_ZEROES = 4


#: WRITE_ZEROES may deallocate the range (virtio-blk's UNMAP flag).
FLAG_UNMAP = 1
#: WRITE must be durable when it completes (only offered where ``Capabilities.fua``).
FLAG_FUA = 2

#: (token, result): result >= 0 is success (bytes moved for READ/WRITE), < 0 is -errno.
Completion = tuple[object, int]


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do; the device offers the matching virtio-blk features only."""

    size: int  # bytes, a multiple of block_size
    block_size: int = 512  # logical block size in bytes (power of two, >= 512)
    writable: bool = True  # False: the device sets VIRTIO_BLK_F_RO
    flush: bool = True  # FLUSH reaches stable storage; False: writes are durable at once
    discard: bool = False
    write_zeroes: bool = False  # False: the device writes zero buffers itself
    zeroes_unmap: bool = False  # WRITE_ZEROES may deallocate (FLAG_UNMAP honoured)
    fua: bool = False
    opt_io_size: int = 0  # bytes; 0: unknown (topology's opt_io_size)
    discard_granularity: int = 4096  # bytes; discards are aligned to this


class StorageQueue(Protocol):
    """One virtqueue's path to the storage; used only on that queue's I/O thread."""

    #: Readable when completions wait to be reaped; None if they never wait
    #: (each submit completes before it returns, and reap hands it back).
    fd: int | None

    def submit(
        self,
        op: int,
        offset: int,
        length: int,
        bufs: list[memoryview],
        flags: int,
        token: object,
    ) -> None:
        """Start one operation; ``bufs`` only for READ/WRITE (sum of lengths == ``length``)."""
        ...

    def commit(self) -> None:
        """Push what was submitted since the last commit to the storage (once per batch)."""
        ...

    def reap(self) -> list[Completion]: ...

    def ready(self) -> bool:
        """Cheap check, for polling: are completions waiting?"""
        ...

    def clear_signal(self) -> None:
        """Consume the wake-up on :attr:`fd` (before reaping, so none is lost)."""
        ...

    @property
    def inflight(self) -> int:
        """Operations submitted and not yet reaped."""
        ...

    def close(self) -> None:
        """Release the queue; nothing may be in flight."""
        ...


class Storage(Protocol):
    """One open disk, shared by every queue of a device."""

    caps: Capabilities
    #: For logs and ``export-list``: what is served (``raw file disk.img``, ``nbd://...``).
    description: str

    def open_queue(self, index: int, depth: int) -> StorageQueue:
        """A queue for virtqueue ``index`` with up to ``depth`` operations in flight."""
        ...

    def resize(self, size: int) -> Capabilities:
        """Grow (or shrink) to ``size`` bytes and return the new capabilities.

        StorageError where the backend cannot resize.
        """
        ...

    def close(self) -> None: ...


class CompletionChannel:
    """Completions handed to the I/O thread from other threads: a deque and an eventfd.

    :meth:`put` may be called from any thread, at any time, even after
    :meth:`close` (a library's callback that arrives after its queue stopped):
    then the completion is dropped, and never written to a closed fd.
    """

    def __init__(self) -> None:
        self.fd: int | None = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._done: deque[Completion] = deque()
        self._lock = threading.Lock()

    def put(self, token: object, result: int) -> None:
        with self._lock:
            if self.fd is None:
                return
            self._done.append((token, result))
            os.eventfd_write(self.fd, 1)

    def take(self) -> list[Completion]:
        out: list[Completion] = []
        done = self._done
        while done:
            out.append(done.popleft())
        return out

    def ready(self) -> bool:
        return bool(self._done)

    def clear(self) -> None:
        fd = self.fd
        if fd is not None:
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                pass

    def close(self) -> None:
        with self._lock:
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None


class ChannelQueue:
    """The reaping half of a StorageQueue whose completions all come through one channel.

    A subclass adds ``submit`` and ``commit``, counts each submission in
    ``_inflight``, and has its threads or callbacks ``channel.put`` results.
    """

    def __init__(self) -> None:
        self.channel = CompletionChannel()
        self.fd: int | None = self.channel.fd
        self._inflight = 0

    def reap(self) -> list[Completion]:
        out = self.channel.take()
        self._inflight -= len(out)
        return out

    def ready(self) -> bool:
        return self.channel.ready()

    def clear_signal(self) -> None:
        self.channel.clear()

    @property
    def inflight(self) -> int:
        return self._inflight

    def close(self) -> None:
        self.channel.close()
        self.fd = None
