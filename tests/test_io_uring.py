"""The minimal io_uring: scattered reads and gathered writes against a real file."""

from __future__ import annotations

import os
import select
from pathlib import Path

import pytest

from vblk.io import uring
from vblk.io.uring import OP_READV, OP_WRITEV, Uring, clear_eventfd

pytestmark = pytest.mark.skipif(not uring.available(), reason="io_uring not allowed here")


def wait_reap(r: Uring, n: int) -> dict[int, int]:
    got: dict[int, int] = {}
    p = select.poll()
    p.register(r.eventfd, select.POLLIN)
    while len(got) < n:
        assert p.poll(5000), "no completion within 5 s"
        clear_eventfd(r.eventfd)
        got.update(r.reap())
    return got


def test_writev_then_readv_round_trip(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o644)
    os.ftruncate(fd, 1 << 20)
    r = Uring(8)
    try:
        a, b = os.urandom(4096), os.urandom(512)
        r.prep_rw(OP_WRITEV, fd, [memoryview(bytearray(a)), memoryview(bytearray(b))], 8192, 7)
        assert r.submit() == 1
        assert wait_reap(r, 1) == {7: 4608}
        out = bytearray(4608)
        view = memoryview(out)
        r.prep_rw(OP_READV, fd, [view[:1000], view[1000:]], 8192, 8)
        r.prep_rw(OP_READV, fd, [memoryview(bytearray(512))], 4 << 20, 9)  # past EOF
        r.prep_rw(OP_READV, 10_000, [memoryview(bytearray(512))], 0, 10)  # bad fd
        assert r.submit() == 3
        assert wait_reap(r, 3) == {8: 4608, 9: 0, 10: -9}  # -EBADF
        assert bytes(out) == a + b
    finally:
        r.close()
        os.close(fd)


def test_empty_buffers_are_fine(tmp_path: Path) -> None:
    """A guest may hand zero-length descriptors; they cost nothing, and never the queue."""
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o644)
    os.ftruncate(fd, 1 << 20)
    r = Uring(8)
    try:
        data = memoryview(bytearray(os.urandom(512)))
        empty = memoryview(bytearray(16))[16:]
        r.prep_rw(OP_WRITEV, fd, [empty, data, empty], 0, 1)
        r.prep_rw(OP_READV, fd, [empty], 0, 2)
        r.submit()
        assert wait_reap(r, 2) == {1: 512, 2: 0}
        assert os.pread(fd, 512, 0) == bytes(data)
    finally:
        r.close()
        os.close(fd)


def test_space_and_full_queue() -> None:
    r = Uring(4)
    try:
        assert r.space == r.entries >= 4
        fd = os.open("/dev/zero", os.O_RDONLY)
        for i in range(r.entries):
            r.prep_rw(OP_READV, fd, [memoryview(bytearray(16))], 0, i)
        assert r.space == 0
        with pytest.raises(uring.UringError):
            r.prep_rw(OP_READV, fd, [memoryview(bytearray(16))], 0, 99)
        r.submit()
        assert set(wait_reap(r, r.entries).values()) == {16}
        assert r.space == r.entries
        os.close(fd)
    finally:
        r.close()
