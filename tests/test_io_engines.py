"""The I/O engines behind ``--aio``: same interface, same bytes, errors as -errno."""

from __future__ import annotations

import errno
import os
import select
import time
from pathlib import Path

import pytest
from helpers import need_io_uring

from vblk.io import uring
from vblk.io.engines import ENGINES, Engine, default_engine, make_engine

#: io_uring over a page-cached file takes shortcuts (RWF_NOWAIT reads, inline writes).
VARIANTS = [*ENGINES, "io_uring-buffered"]


def _engine(name: str, entries: int = 64) -> Engine:
    if name.startswith("io_uring"):
        need_io_uring()
    if name == "io_uring-buffered":
        return make_engine("io_uring", queue_size=entries, io_threads=3, direct=False)
    return make_engine(name, queue_size=entries, io_threads=3)


def _wait_all(engine: Engine, timeout: float = 10.0) -> dict[object, int]:
    """Commit, then reap until nothing is in flight (polling the engine's fd when it has one)."""
    engine.commit()
    out: dict[object, int] = {}
    deadline = time.monotonic() + timeout
    while True:
        for token, res in engine.reap():
            assert token not in out, "a completion came back twice"
            out[token] = res
        if not engine.inflight:
            return out
        assert time.monotonic() < deadline, f"{engine.inflight} requests never completed"
        if engine.fd is not None:
            select.select([engine.fd], [], [], 0.5)


@pytest.mark.parametrize("name", VARIANTS)
def test_writes_then_reads_move_the_right_bytes(tmp_path: Path, name: str) -> None:
    engine = _engine(name)
    fd = os.open(tmp_path / "img", os.O_RDWR | os.O_CREAT)
    os.ftruncate(fd, 1 << 20)
    try:
        data = [os.urandom(4096) for _ in range(40)]
        for i, d in enumerate(data):  # two buffers per request: the iovec path
            m = memoryview(bytearray(d))  # guest memory is always writable
            engine.submit(fd, True, [m[:1000], m[1000:]], i * 8192, i)
        assert _wait_all(engine) == {i: 4096 for i in range(40)}
        bufs = [bytearray(4096) for _ in data]
        for i, b in enumerate(bufs):
            engine.submit(fd, False, [memoryview(b)], i * 8192, ("r", i))
        assert _wait_all(engine) == {("r", i): 4096 for i in range(40)}
        assert [bytes(b) for b in bufs] == data
        assert os.pread(fd, 4096, 39 * 8192) == data[39]
    finally:
        engine.close()
        os.close(fd)


@pytest.mark.parametrize("name", VARIANTS)
def test_errors_come_back_as_negative_errno(tmp_path: Path, name: str) -> None:
    engine = _engine(name)
    fd = os.open(tmp_path / "ro", os.O_RDONLY | os.O_CREAT)
    try:
        engine.submit(fd, True, [memoryview(bytearray(512))], 0, "w")
        assert _wait_all(engine) == {"w": -errno.EBADF}
        # A read at the end of the file moves nothing: 0, for the device to call short.
        engine.submit(fd, False, [memoryview(bytearray(512))], 0, "eof")
        assert _wait_all(engine) == {"eof": 0}
    finally:
        engine.close()
        os.close(fd)


def test_io_uring_buffered_read_of_uncached_data_goes_through_the_ring(tmp_path: Path) -> None:
    engine = _engine("io_uring-buffered")
    path = tmp_path / "img"
    data = os.urandom(1 << 20)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # RWF_NOWAIT now says EAGAIN
        bufs = [bytearray(65536) for _ in range(16)]
        for i, b in enumerate(bufs):
            engine.submit(fd, False, [memoryview(b)], i * 65536, i)
        assert _wait_all(engine) == {i: 65536 for i in range(16)}
        assert b"".join(bufs) == data
    finally:
        engine.close()
        os.close(fd)


def test_io_uring_more_requests_than_ring_entries(tmp_path: Path) -> None:
    engine = _engine("io_uring", entries=8)
    fd = os.open(tmp_path / "img", os.O_RDWR | os.O_CREAT)
    os.ftruncate(fd, 1 << 20)
    try:
        bufs = [bytearray(512) for _ in range(50)]
        for i, b in enumerate(bufs):  # no commit in between: the SQ fills and must drain itself
            engine.submit(fd, False, [memoryview(b)], i * 512, i)
        assert _wait_all(engine) == {i: 512 for i in range(50)}
    finally:
        engine.close()
        os.close(fd)


@pytest.mark.parametrize("name", ["threads", "io_uring"])
def test_ready_and_fd_signal_waiting_completions(tmp_path: Path, name: str) -> None:
    engine = _engine(name)
    fd = os.open(tmp_path / "img", os.O_RDWR | os.O_CREAT)
    os.ftruncate(fd, 4096)
    try:
        assert not engine.ready()
        engine.submit(fd, False, [memoryview(bytearray(4096))], 0, "x")
        engine.commit()
        assert engine.fd is not None
        assert select.select([engine.fd], [], [], 5)[0], "completion never signalled"
        assert engine.ready()
        engine.clear_signal()
        assert engine.reap() == [("x", 4096)]
        assert not select.select([engine.fd], [], [], 0)[0], "signal not consumed"
        assert not engine.ready() and engine.inflight == 0
    finally:
        engine.close()
        os.close(fd)


def test_default_and_unknown_engines() -> None:
    assert default_engine() == ("io_uring" if uring.available() else "threads")
    with pytest.raises(ValueError, match="unknown I/O engine 'aio'"):
        make_engine("aio", queue_size=8, io_threads=1)
