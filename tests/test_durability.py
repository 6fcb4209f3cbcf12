"""Durability: what the guest was told is on disk survives a SIGKILL of ``vblk serve``.

A SIGKILL alone cannot lose data that reached the page cache, so surviving it
only proves that completions come after the data moved. That writes are also
*durable* (what a power cut needs) is checked in the page cache itself with
cachestat(2): after a FLUSH completes, and after every write in writethrough
mode, none of the image's pages is dirty or under writeback, while before the
FLUSH they are. strace proves the mechanism: FLUSH is one fdatasync of the
image with every I/O engine, with and without O_DIRECT.

The ordering rule tested here is virtio's: a FLUSH covers every write the
driver saw complete before it submitted the FLUSH, on any queue, even while
later writes are still in flight around it.
"""

from __future__ import annotations

import ctypes
import errno
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import vblk.client
from vblk.blk.defs import ReqType, Status
from vblk.io import uring

IMG_SIZE = 16 << 20
BLOCK = 4096
BATCH = 64  # writes in flight per queue

# -- cachestat(2) (Linux 6.5): dirty and writeback pages of a file range -------------------

_SYS_CACHESTAT = 451  # x86_64 and the generic syscall table agree


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _CacheStat(ctypes.Structure):
    _fields_ = [
        ("nr_cache", ctypes.c_uint64),
        ("nr_dirty", ctypes.c_uint64),
        ("nr_writeback", ctypes.c_uint64),
        ("nr_evicted", ctypes.c_uint64),
        ("nr_recently_evicted", ctypes.c_uint64),
    ]


_libc = ctypes.CDLL(None, use_errno=True)


def unsynced_pages(path: Path, off: int = 0, length: int = 0) -> int:
    """Pages of [off, off+length) that are dirty or being written back (length 0: to EOF)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        st = _CacheStat()
        rng = _Range(off, length)
        if _libc.syscall(_SYS_CACHESTAT, fd, ctypes.byref(rng), ctypes.byref(st), 0) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        return int(st.nr_dirty + st.nr_writeback)
    finally:
        os.close(fd)


def _cachestat_works(tmp: Path) -> bool:
    p = tmp / "probe"
    p.write_bytes(b"x")
    try:
        unsynced_pages(p)
    except OSError as e:
        if e.errno == errno.ENOSYS:
            return False
        raise
    return True


@pytest.fixture
def cachestat(tmp_path: Path) -> None:
    if not _cachestat_works(tmp_path):
        if os.environ.get("CI") == "true":
            pytest.fail("cachestat(2) is missing (Linux < 6.5): durability cannot be checked")
        pytest.skip("cachestat(2) needs Linux 6.5")


# -- a server on a random image, a model of what it must hold ------------------------------


def make_image(path: Path) -> bytearray:
    """A random image, synced, so that every dirty page later is the server's doing."""
    data = bytearray(os.urandom(IMG_SIZE))
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return data


def serve(tmp: Path, *args: str, wrap: list[str] | None = None) -> subprocess.Popen[bytes]:
    sock = tmp / "d.sock"
    log = open(tmp / "serve.log", "wb")
    cmd = [sys.executable, "-m", "vblk", "serve", str(tmp / "d.img"), "--socket", str(sock)]
    proc = subprocess.Popen([*(wrap or []), *cmd, "--num-queues", "2", *args], stderr=log)
    log.close()
    deadline = time.monotonic() + 20
    while not sock.exists():
        assert proc.poll() is None, (tmp / "serve.log").read_text()
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    return proc


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:  # whatever a failed test left running
        if p.poll() is None:
            p.kill()
            p.wait()


def write_batches(
    dev: vblk.client.Device, model: bytearray, batches: int, rng: random.Random, area: range
) -> None:
    """Random 4 KiB writes, BATCH in flight per queue; returns when all completed."""
    buf = dev.alloc(2 * BATCH * BLOCK)
    blocks = list(area)
    for _ in range(batches):
        chosen = rng.sample(blocks, 2 * BATCH)  # distinct: no two in flight overlap
        for qi, q in enumerate(dev.queues):
            for k in range(BATCH):
                slot = qi * BATCH + k
                data = rng.randbytes(BLOCK)
                buf.view[slot * BLOCK : (slot + 1) * BLOCK] = data
                blk = chosen[slot]
                model[blk * BLOCK : (blk + 1) * BLOCK] = data
                q.submit_write(blk * BLOCK // 512, buf.gpa + slot * BLOCK, BLOCK)
            q.kick()
        for q in dev.queues:
            done: list[tuple[object, int]] = []
            while q.in_flight:
                q.complete(done)
            assert all(st == Status.OK for _, st in done)
    buf.free()


def sigkill_and_compare(proc: subprocess.Popen[bytes], img: Path, model: bytearray) -> None:
    proc.kill()
    assert proc.wait(10) == -signal.SIGKILL
    on_disk = img.read_bytes()
    assert len(on_disk) == len(model)
    bad = [i for i in range(0, IMG_SIZE, BLOCK) if on_disk[i : i + BLOCK] != model[i : i + BLOCK]]
    assert not bad, f"{len(bad)} blocks differ after SIGKILL, first at byte {bad[0]}"


MODES = {"buffered": (), "direct": ("--direct",)}


@pytest.mark.parametrize("mode", MODES)
def test_flushed_writes_survive_sigkill(
    tmp_path: Path, mode: str, cachestat: None, procs: list[subprocess.Popen[bytes]]
) -> None:
    img = tmp_path / "d.img"
    model = make_image(img)
    procs.append(proc := serve(tmp_path, *MODES[mode]))
    rng = random.Random(1)
    dev = vblk.client.connect(str(tmp_path / "d.sock"), num_queues=2, timeout=20)
    write_batches(dev, model, 4, rng, range(IMG_SIZE // BLOCK))
    if mode == "buffered":  # the control: without a flush, completed writes are not durable
        assert unsynced_pages(img) > 0
    dev.flush()
    assert unsynced_pages(img) == 0, "FLUSH completed with pages still unsynced"
    sigkill_and_compare(proc, img, model)
    dev.close()  # the server is gone: closing only releases our side


@pytest.mark.parametrize("mode", MODES)
def test_writethrough_writes_survive_sigkill_without_a_flush(
    tmp_path: Path, mode: str, cachestat: None, procs: list[subprocess.Popen[bytes]]
) -> None:
    img = tmp_path / "d.img"
    model = make_image(img)
    procs.append(proc := serve(tmp_path, *MODES[mode]))
    dev = vblk.client.connect(str(tmp_path / "d.sock"), num_queues=2, timeout=20)
    dev.set_writeback(False)
    assert dev.config.writeback == 0
    write_batches(dev, model, 2, random.Random(2), range(IMG_SIZE // BLOCK))
    assert unsynced_pages(img) == 0, "a writethrough write completed before it was durable"
    dev.write_zeroes(BLOCK, 4 * BLOCK)  # zeroes are data too
    model[BLOCK : 5 * BLOCK] = bytes(4 * BLOCK)
    assert unsynced_pages(img) == 0, "a writethrough write-zeroes completed before it was durable"
    sigkill_and_compare(proc, img, model)
    dev.close()


ENGINES = [
    ("sync", ()),
    ("threads", ()),
    ("io_uring", ()),
    ("io_uring", ("--direct",)),
    ("threads", ("--direct",)),
]
ENGINE_IDS = [e + ("-direct" if x else "") for e, x in ENGINES]


def _need(engine: str) -> None:
    if engine == "io_uring" and not uring.available():
        pytest.skip("io_uring not allowed here")


@pytest.mark.parametrize(("engine", "extra"), ENGINES, ids=ENGINE_IDS)
def test_flush_covers_every_write_completed_before_it(
    tmp_path: Path,
    engine: str,
    extra: tuple[str, ...],
    cachestat: None,
    procs: list[subprocess.Popen[bytes]],
) -> None:
    """Writes completed on both queues, then a FLUSH in the middle of a batch of new
    writes: when the FLUSH completes, the earlier writes are durable, whatever order the
    engine completes the batch in."""
    _need(engine)
    img = tmp_path / "d.img"
    model = make_image(img)
    procs.append(proc := serve(tmp_path, "--aio", engine, *extra))
    half = IMG_SIZE // BLOCK // 2
    with vblk.client.connect(str(tmp_path / "d.sock"), num_queues=2, timeout=20) as dev:
        rng = random.Random(3)
        write_batches(dev, model, 2, rng, range(half))  # area A, all completed
        if not extra:
            assert unsynced_pages(img, 0, half * BLOCK) > 0  # the control
        q = dev.queues[1]
        buf = dev.alloc(BATCH * BLOCK)
        buf.view[:] = rng.randbytes(len(buf.view))
        for k in range(BATCH):  # area B, in flight around the FLUSH
            if k == BATCH // 2:
                q.submit(ReqType.FLUSH, 0, tag="flush")
            q.submit_write((half + k) * BLOCK // 512, buf.gpa + k * BLOCK, BLOCK, tag=k)
        q.kick()
        done: list[tuple[object, int]] = []
        while not any(tag == "flush" for tag, _ in done):
            q.complete(done)
        assert unsynced_pages(img, 0, half * BLOCK) == 0, "FLUSH overtook completed writes"
        while q.in_flight:
            q.complete(done)
        assert all(st == Status.OK for _, st in done)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(20) == 0


# -- strace: FLUSH is an fdatasync of the image (io_uring: an FSYNC in the ring) ------------


def _child_of(pid: int) -> int:
    deadline = time.monotonic() + 10
    while True:
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except FileNotFoundError:
            children = []
        if children:
            return int(children[0])
        assert time.monotonic() < deadline, "strace did not start the server"
        time.sleep(0.05)


@pytest.mark.parametrize(("engine", "extra"), ENGINES, ids=ENGINE_IDS)
def test_flush_is_one_fdatasync_of_the_image(
    tmp_path: Path, engine: str, extra: tuple[str, ...], procs: list[subprocess.Popen[bytes]]
) -> None:
    _need(engine)
    strace = shutil.which("strace")
    if strace is None:
        if os.environ.get("CI") == "true":
            pytest.fail("strace is not installed (required in CI)")
        pytest.skip("strace is not installed")
    make_image(tmp_path / "d.img")
    trace = tmp_path / "trace"
    wrap = [strace, "-f", "-qq", "-e", "trace=fdatasync,openat", "-o", str(trace)]
    procs.append(tracer := serve(tmp_path, "--aio", engine, *extra, wrap=wrap))
    server = _child_of(tracer.pid)
    writes = 5
    with vblk.client.connect(str(tmp_path / "d.sock"), num_queues=2, timeout=30) as dev:
        dev.write(0, b"a" * BLOCK)
        for _ in range(3):
            dev.flush()
        dev.set_writeback(False)  # one fdatasync as the cache goes away ...
        for i in range(writes):  # ... then one per write
            dev.write(i * BLOCK, b"b" * BLOCK)
    os.kill(server, signal.SIGINT)  # and one at shutdown
    assert tracer.wait(30) == 0
    text = trace.read_text()
    opened = re.search(r'openat\(AT_FDCWD, "[^"]*d\.img", [^)]*\) = (\d+)', text)
    assert opened, text[-2000:]
    syncs = re.findall(r"fdatasync\((\d+)", text)  # calls, even if strace split a line
    assert not re.search(r"fdatasync(\(\d+\)| resumed>\)).*= -1", text), "an fdatasync failed"
    if engine == "io_uring":
        # IORING_OP_FSYNC: the flushes never block the queue thread in a syscall of its own;
        # that they are durable is what the unsynced-pages tests above check.
        assert syncs == [], text[-2000:]
    else:
        assert syncs == [opened.group(1)] * (3 + 1 + writes + 1), text[-2000:]
