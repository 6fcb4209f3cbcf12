"""The client against qemu-storage-daemon: a backend we did not write.

If the client and ``vblk serve`` shared a misreading of the spec, their own
tests would pass together; QEMU's libvhost-user export keeps both honest.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import stop

from vblk import client
from vblk.blk.defs import Feature, ReqType, Status

pytestmark = pytest.mark.interop

QSD = shutil.which("qemu-storage-daemon")
IMAGE_SIZE = 32 << 20


def _require_qsd() -> str:
    if QSD is None:
        if os.environ.get("CI") == "true":
            pytest.fail("qemu-storage-daemon is not installed (required in CI)")
        pytest.skip("qemu-storage-daemon is not installed")
    return QSD


def start_qsd(
    tmp: Path, *, writable: bool = True, num_queues: int = 2, size: int = IMAGE_SIZE
) -> tuple[subprocess.Popen[bytes], Path, Path]:
    qsd = _require_qsd()
    img = tmp / "qsd.img"
    with open(img, "wb") as f:
        f.truncate(size)
    sock = tmp / "qsd.sock"
    proc = subprocess.Popen(
        [
            qsd,
            "--blockdev",
            f"driver=file,node-name=file0,filename={img},discard=unmap",
            "--blockdev",
            "driver=raw,node-name=disk0,file=file0,discard=unmap",
            "--export",
            "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,"
            f"addr.path={sock},writable={'on' if writable else 'off'},num-queues={num_queues}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 10
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out = proc.communicate()[0].decode(errors="replace")
            pytest.fail(f"qemu-storage-daemon did not start: {out}")
        time.sleep(0.02)
    return proc, img, sock


@pytest.fixture
def qsd(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(image, socket) of a writable qsd export with 2 queues; the image is 32 MiB of zeros."""
    proc, img, sock = start_qsd(tmp_path)
    try:
        yield img, sock
    finally:
        stop(proc)


def test_negotiation_and_config(qsd: tuple[Path, Path]) -> None:
    img, sock = qsd
    with client.connect(str(sock), num_queues=2, timeout=10) as dev:
        assert dev.capacity == IMAGE_SIZE == img.stat().st_size
        assert dev.sectors == IMAGE_SIZE // 512
        assert dev.block_size == 512
        assert not dev.read_only
        assert dev.num_queues == 2 and dev.max_queues == 2
        assert dev.config.num_queues == 2
        for f in (Feature.FLUSH, Feature.DISCARD, Feature.WRITE_ZEROES, Feature.MQ):
            assert dev.has(f), f.name
        assert dev.has(32)  # VERSION_1
        assert dev.max_discard_sectors > 0 and dev.max_write_zeroes_sectors > 0
        assert "REPLY_ACK" in dev.info()["protocol_features"]


def test_read_write_reach_the_image(qsd: tuple[Path, Path]) -> None:
    img, sock = qsd
    a = os.urandom(64 << 10)
    b = os.urandom(3 << 20)  # over MAX_REQUEST_BYTES: split into several requests
    with client.connect(str(sock), timeout=10) as dev:
        dev.write(0, a)
        dev.write(5 << 20, b)
        dev.write(IMAGE_SIZE - 512, b"\xee" * 512)
        dev.flush()
        assert dev.read(0, len(a)) == a
        assert dev.read(5 << 20, len(b)) == b
        assert dev.read(IMAGE_SIZE - 1024, 1024) == bytes(512) + b"\xee" * 512
    host = img.read_bytes()
    assert host[: len(a)] == a
    assert host[5 << 20 : (5 << 20) + len(b)] == b
    assert host[-512:] == b"\xee" * 512


def test_zero_copy_buffers(qsd: tuple[Path, Path]) -> None:
    _, sock = qsd
    with client.connect(str(sock), timeout=10) as dev:
        with dev.alloc(8192) as buf:
            buf.view[:] = b"\x5a" * 8192
            dev.write_from(1 << 20, buf)
            buf.view[:] = bytes(8192)
            dev.read_into(1 << 20, buf)
            assert bytes(buf.view) == b"\x5a" * 8192


def test_write_zeroes_and_discard(qsd: tuple[Path, Path]) -> None:
    img, sock = qsd
    with client.connect(str(sock), timeout=10) as dev:
        dev.write(0, b"\x11" * (2 << 20))
        dev.write_zeroes(4096, 8192)
        dev.write_zeroes(1 << 20, 64 << 10, unmap=True)
        got = dev.read(0, 2 << 20)
        assert got[:4096] == b"\x11" * 4096
        assert got[4096 : 4096 + 8192] == bytes(8192)
        assert got[1 << 20 : (1 << 20) + (64 << 10)] == bytes(64 << 10)
        # Larger than max_discard_sectors: the client splits it.
        dev.discard(0, 2 << 20)
        dev.flush()
        assert dev.read(0, 4096) == bytes(4096)  # a punched hole in a raw file reads as zeros
    assert img.read_bytes()[: 2 << 20] == bytes(2 << 20)


def test_get_id(qsd: tuple[Path, Path]) -> None:
    _, sock = qsd
    with client.connect(str(sock), timeout=10) as dev:
        serial = dev.get_id()
        assert isinstance(serial, str)
        assert len(serial.encode()) <= 20


def test_device_errors(qsd: tuple[Path, Path]) -> None:
    _, sock = qsd
    with client.connect(str(sock), timeout=10) as dev:
        with pytest.raises(ValueError):
            dev.read(dev.capacity, 512)
        with pytest.raises(ValueError):
            dev.write(100, b"x" * 512)
        with pytest.raises(client.DeviceIOError) as e:
            dev.read(dev.capacity, 512, check=False)
        assert e.value.status == Status.IOERR
        r = dev.submit_raw(ReqType.IN, dev.sectors + 8, in_len=512)
        assert r.status == Status.IOERR
        r = dev.submit_raw(99, 0, in_len=512)
        assert r.status == Status.UNSUPP
        # The device is still usable afterwards.
        assert dev.read(0, 512) == bytes(512)


def _drive(q: client.Queue, buf: client.Buffer, n: int, results: dict[int, Any]) -> None:
    try:
        done: list[tuple[Any, int]] = []
        bs = 4096
        slots = len(buf) // bs
        submitted = 0
        statuses = []
        while submitted < n or q.in_flight:
            while submitted < n and q.in_flight < slots:
                i = submitted % slots
                q.submit_read((submitted * 8) % 4096, buf.gpa + i * bs, bs, tag=i)
                submitted += 1
            q.kick()
            q.complete(done, 10)
            statuses += [s for _, s in done]
            done.clear()
        results[q.index] = statuses
    except BaseException as e:
        results[q.index] = e


def test_multiqueue(qsd: tuple[Path, Path]) -> None:
    _, sock = qsd
    with client.connect(str(sock), num_queues=2, timeout=10) as dev:
        bufs = [dev.alloc(16 * 4096) for _ in dev.queues]
        results: dict[int, Any] = {}
        threads = [
            threading.Thread(target=_drive, args=(q, b, 500, results))
            for q, b in zip(dev.queues, bufs, strict=True)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        for qi in (0, 1):
            assert not isinstance(results[qi], BaseException), results[qi]
            assert results[qi] == [0] * 500
        for b in bufs:
            b.free()
        # Blocking calls from several threads spread over both queues.
        data = os.urandom(4096)
        dev.write(0, data)
        out: list[bytes] = []
        ts = [threading.Thread(target=lambda: out.append(dev.read(0, 4096))) for _ in range(8)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(30)
        assert out == [data] * 8


def test_reconnect(qsd: tuple[Path, Path]) -> None:
    _, sock = qsd
    with client.connect(str(sock), timeout=10) as dev:
        dev.write(0, b"\x42" * 512)
    with client.connect(str(sock), num_queues=2, timeout=10) as dev:
        assert dev.read(0, 512) == b"\x42" * 512


def test_read_only_export(tmp_path: Path) -> None:
    proc, _, sock = start_qsd(tmp_path, writable=False, num_queues=1)
    try:
        with client.connect(str(sock), timeout=10) as dev:
            assert dev.read_only and dev.has(Feature.RO)
            with pytest.raises(client.DeviceIOError):
                dev.write(0, bytes(512))
            assert dev.read(0, 512) == bytes(512)
    finally:
        stop(proc)


def test_bench_verify(qsd: tuple[Path, Path]) -> None:
    _, sock = qsd
    p = subprocess.run(
        [sys.executable, "-m", "vblk", "bench", "--socket", str(sock), "--verify", "--json",
         "--rw", "randwrite", "--size", "8M", "--queues", "2", "--iodepth", "16"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["errors"] == 0 and r["verify_errors"] == 0
    assert r["writes"] == r["reads"] == (8 << 20) // 4096
