"""The I/O engines behind ``--aio``: same interface, same bytes, errors as -errno, every op."""

from __future__ import annotations

import errno
import os
import select
import time
from pathlib import Path

import pytest
from helpers import need_io_uring

from vblk.io import uring
from vblk.io.engines import ENGINES, UringEngine, default_engine, make_engine
from vblk.io.image import Image
from vblk.storage.base import FLAG_UNMAP, Op, StorageQueue

#: io_uring over a page-cached file takes shortcuts (RWF_NOWAIT reads, inline writes);
#: "io_uring" here sends everything through the ring, as with O_DIRECT.
VARIANTS = [*ENGINES, "io_uring-buffered"]


def _image(tmp: Path, size: int = 1 << 20, data: bytes | None = None, **kw: bool) -> Image:
    p = tmp / "img"
    if not p.exists():
        if data is not None:
            p.write_bytes(data)
        else:
            with open(p, "wb") as f:
                f.truncate(size)
    return Image(str(p), **kw)


def _engine(name: str, image: Image, entries: int = 64) -> StorageQueue:
    if name.startswith("io_uring"):
        need_io_uring()
    if name == "io_uring":
        return UringEngine(image, entries, direct=True)
    if name == "io_uring-buffered":
        return UringEngine(image, entries, direct=False)
    return make_engine(name, image, queue_size=entries, io_threads=3)


def _wait_all(engine: StorageQueue, timeout: float = 10.0) -> dict[object, int]:
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
    img = _image(tmp_path)
    engine = _engine(name, img)
    try:
        data = [os.urandom(4096) for _ in range(40)]
        for i, d in enumerate(data):
            m = memoryview(bytearray(d))
            engine.submit(Op.WRITE, i * 8192, 4096, [m[:1000], m[1000:]], 0, i)
        assert _wait_all(engine) == {i: 4096 for i in range(40)}
        bufs = [bytearray(4096) for _ in range(40)]
        for i, b in enumerate(bufs):
            engine.submit(Op.READ, i * 8192, 4096, [memoryview(b)], 0, ("r", i))
        assert _wait_all(engine) == {("r", i): 4096 for i in range(40)}
        assert [bytes(b) for b in bufs] == data
    finally:
        engine.close()
        img.close()


@pytest.mark.parametrize("name", VARIANTS)
def test_flush_discard_and_write_zeroes_take_the_same_path(tmp_path: Path, name: str) -> None:
    img = _image(tmp_path, data=b"\xff" * (1 << 20))
    engine = _engine(name, img)
    try:
        engine.submit(Op.DISCARD, 0, 65536, [], 0, "discard")
        engine.submit(Op.WRITE_ZEROES, 65536, 65536, [], 0, "zero")
        engine.submit(Op.WRITE_ZEROES, 131072, 65536, [], FLAG_UNMAP, "zero-unmap")
        engine.submit(Op.FLUSH, 0, 0, [], 0, "flush")
        assert _wait_all(engine) == {"discard": 0, "zero": 0, "zero-unmap": 0, "flush": 0}
        raw = (tmp_path / "img").read_bytes()
        assert raw[: 3 * 65536] == bytes(3 * 65536) and raw[3 * 65536 :] == b"\xff" * (
            (1 << 20) - 3 * 65536
        )
    finally:
        engine.close()
        img.close()


@pytest.mark.parametrize("name", ["io_uring", "threads", "sync"])
def test_refused_fallocate_falls_back_to_writing_zeroes(
    tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file system that cannot punch holes or zero ranges (EOPNOTSUPP) still gets zeroes."""
    import vblk.io.image as image_mod

    img = _image(tmp_path, data=b"\xff" * 65536)
    engine = _engine(name, img)
    calls: list[int] = []

    def refuse(fd: int, mode: int, offset: int, length: int) -> None:
        calls.append(mode)
        raise OSError(errno.EOPNOTSUPP, "no")

    monkeypatch.setattr(image_mod, "fallocate", refuse)
    if name == "io_uring":
        # The kernel refuses a mode with unknown bits (EOPNOTSUPP), as a file system would.
        ring = engine._ring  # type: ignore[attr-defined]
        real_prep = ring.prep_fallocate
        monkeypatch.setattr(
            ring, "prep_fallocate", lambda fd, mode, *a: real_prep(fd, mode | 1 << 30, *a)
        )
    try:
        for i in range(2):
            engine.submit(Op.WRITE_ZEROES, 4096 + i * 16384, 8192, [], 0, i)
            assert _wait_all(engine) == {i: 0}
        raw = (tmp_path / "img").read_bytes()
        assert raw[4096:12288] == bytes(8192) and raw[:4096] == b"\xff" * 4096
        assert raw[12288:20480] == b"\xff" * 8192 and raw[20480:28672] == bytes(8192)
        assert calls, "the fallocate fallbacks were never tried"
        if name == "io_uring":  # refused once: the second went straight to the fallback
            assert engine._falloc_refused == {Op.WRITE_ZEROES}  # type: ignore[attr-defined]
    finally:
        engine.close()
        img.close()


@pytest.mark.parametrize("name", VARIANTS)
def test_errors_come_back_as_negative_errno(tmp_path: Path, name: str) -> None:
    img = _image(tmp_path, size=4096, read_only=True)
    engine = _engine(name, img)
    try:
        engine.submit(Op.WRITE, 0, 512, [memoryview(bytearray(512))], 0, "w")
        assert _wait_all(engine) == {"w": -errno.EBADF}
        engine.submit(Op.READ, 8192, 512, [memoryview(bytearray(512))], 0, "eof")
        assert _wait_all(engine) == {"eof": 0}
    finally:
        engine.close()
        img.close()


def test_io_uring_buffered_read_of_uncached_data_goes_through_the_ring(tmp_path: Path) -> None:
    data = os.urandom(1 << 20)
    img = _image(tmp_path, data=data)
    engine = _engine("io_uring-buffered", img)
    try:
        os.fsync(img.fd)
        os.posix_fadvise(img.fd, 0, 0, os.POSIX_FADV_DONTNEED)  # RWF_NOWAIT now says EAGAIN
        bufs = [bytearray(65536) for _ in range(16)]
        for i, b in enumerate(bufs):
            engine.submit(Op.READ, i * 65536, 65536, [memoryview(b)], 0, i)
        assert _wait_all(engine) == {i: 65536 for i in range(16)}
        assert b"".join(bufs) == data
    finally:
        engine.close()
        img.close()


def test_io_uring_more_requests_than_ring_entries(tmp_path: Path) -> None:
    img = _image(tmp_path)
    engine = _engine("io_uring", img, entries=8)
    try:
        bufs = [bytearray(512) for _ in range(50)]
        for i, b in enumerate(bufs):  # no commit in between: the SQ fills and must drain itself
            engine.submit(Op.READ, i * 512, 512, [memoryview(b)], 0, i)
        for i in range(50, 60):
            engine.submit(Op.FLUSH, 0, 0, [], 0, i)
        assert _wait_all(engine) == {i: 512 if i < 50 else 0 for i in range(60)}
    finally:
        engine.close()
        img.close()


@pytest.mark.parametrize("name", ["threads", "io_uring"])
def test_ready_and_fd_signal_waiting_completions(tmp_path: Path, name: str) -> None:
    img = _image(tmp_path, size=4096)
    engine = _engine(name, img)
    try:
        assert not engine.ready()
        engine.submit(Op.READ, 0, 4096, [memoryview(bytearray(4096))], 0, "x")
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
        img.close()


def test_default_and_unknown_engines(tmp_path: Path) -> None:
    assert default_engine() == ("io_uring" if uring.available() else "threads")
    img = _image(tmp_path)
    try:
        with pytest.raises(ValueError, match="unknown I/O engine 'aio'"):
            make_engine("aio", img, queue_size=8, io_threads=1)
    finally:
        img.close()
