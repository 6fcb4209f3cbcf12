"""Small pieces shared by test modules."""

from __future__ import annotations

import errno
import os
import subprocess
from typing import Any

import pytest


def need_io_uring() -> None:
    """Skip a test that needs io_uring where the kernel forbids it; never on CI, which has it."""
    from vblk.io import uring

    if not uring.available():
        assert not os.environ.get("CI"), "io_uring must work on the CI machine"
        pytest.skip("io_uring not allowed here")


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Terminate a helper process (qemu-storage-daemon, a server); kill it if it lingers."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class MemStorage:
    """An in-memory Storage (no fds, no threads) that records every operation it is given.

    ``short``: READ/WRITE move at most this many bytes per operation (0: all), so
    callers' handling of short transfers can be tested.
    """

    def __init__(self, size: int = 1 << 20, *, short: int = 0, **caps: Any) -> None:
        from vblk.storage.base import Capabilities

        self.data = bytearray(size)
        self.caps = Capabilities(size=size, **caps)
        self.description = "memory"
        self.short = short
        self.ops: list[tuple[int, int, int, int]] = []  # (op, offset, length, flags)
        self.fail: set[int] = set()  # ops that fail with -EIO
        self.closed = False

    def open_queue(self, index: int, depth: int) -> MemQueue:
        return MemQueue(self)

    def resize(self, size: int) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        self.closed = True

    def run(self, op: int, offset: int, length: int, bufs: list[memoryview], flags: int) -> int:
        self.ops.append((op, offset, length, flags))
        if op in self.fail:
            return -errno.EIO
        if op in (0, 1):
            n = min(length, self.short) if self.short else length
            pos, left = offset, n
            for b in bufs:
                k = min(len(b), left)
                if op == 0:
                    b[:k] = self.data[pos : pos + k]
                else:
                    self.data[pos : pos + k] = b[:k]
                pos += k
                left -= k
                if not left:
                    break
            return n
        if op in (3, 4):
            self.data[offset : offset + length] = bytes(length)
        return 0


class MemQueue:
    """Completes each operation inside submit; reap hands the results back."""

    fd: int | None = None

    def __init__(self, storage: MemStorage) -> None:
        self.storage = storage
        self.done: list[tuple[object, int]] = []
        self.closed = False

    def submit(
        self, op: int, offset: int, length: int, bufs: list[memoryview], flags: int, token: object
    ) -> None:
        self.done.append((token, self.storage.run(op, offset, length, bufs, flags)))

    def commit(self) -> None:
        pass

    def reap(self) -> list[tuple[object, int]]:
        out, self.done = self.done, []
        return out

    def ready(self) -> bool:
        return bool(self.done)

    def clear_signal(self) -> None:
        pass

    @property
    def inflight(self) -> int:
        return len(self.done)

    def close(self) -> None:
        self.closed = True
