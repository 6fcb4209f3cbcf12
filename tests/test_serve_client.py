"""The client against our own ``vblk serve``, started as a real process.

Covers every request type end to end through the socket, eventfds and
threads of the server, plus what only a process shows: read-only mode,
reconnecting after a clean close, and a clean exit on SIGINT.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vblk import client
from vblk.blk.defs import Feature, ReqType, Status

IMAGE_SIZE = 16 << 20
SERIAL = "vblk-test-serial"


class Served:
    def __init__(self, proc: subprocess.Popen[bytes], img: Path, sock: Path) -> None:
        self.proc, self.img, self.sock = proc, img, sock

    @property
    def path(self) -> str:
        return str(self.sock)


def serve(tmp: Path, *extra: str, name: str = "disk", queues: str | None = "2") -> Served:
    """``vblk serve`` with ``--num-queues queues`` (None: its default) and ``extra``."""
    img = tmp / f"{name}.img"
    if not img.exists():
        with open(img, "wb") as f:
            f.truncate(IMAGE_SIZE)
    sock = tmp / f"{name}.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vblk", "serve", str(img), "--socket", str(sock),
         *(["--num-queues", queues] if queues else []), "--serial", SERIAL,
         "--log-level", "warning", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 15
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            _, err = proc.communicate()
            pytest.fail(f"vblk serve did not start: {err.decode(errors='replace')}")
        time.sleep(0.02)
    return Served(proc, img, sock)


def shutdown(s: Served) -> int:
    if s.proc.poll() is None:
        s.proc.send_signal(signal.SIGINT)
    try:
        return s.proc.wait(15)
    except subprocess.TimeoutExpired:
        s.proc.kill()
        s.proc.wait()
        return -9


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    s = serve(tmp_path)
    try:
        yield s
    finally:
        shutdown(s)


def test_every_request_type(served: Served) -> None:
    data = os.urandom(128 << 10)
    with client.connect(served.path, num_queues=2, timeout=10) as dev:
        assert dev.capacity == IMAGE_SIZE and dev.sectors == IMAGE_SIZE // 512
        assert dev.num_queues == 2 and not dev.read_only
        assert dev.get_id() == SERIAL
        dev.write(1 << 20, data)
        assert dev.read(1 << 20, len(data)) == data
        dev.flush()
        dev.write_zeroes(1 << 20, 4096)
        dev.write_zeroes((1 << 20) + 8192, 4096, unmap=True)
        got = dev.read(1 << 20, 16384)
        assert got[:4096] == bytes(4096) and got[4096:8192] == data[4096:8192]
        assert got[8192:12288] == bytes(4096)
        dev.discard(2 << 20, 1 << 20)
        dev.flush()
    host = served.img.read_bytes()
    assert host[(1 << 20) + 4096 : (1 << 20) + 8192] == data[4096:8192]
    assert host[1 << 20 : (1 << 20) + 4096] == bytes(4096)


def test_device_answers_errors(served: Served) -> None:
    with client.connect(served.path, timeout=10) as dev:
        with pytest.raises(ValueError):
            dev.read(IMAGE_SIZE - 512, 1024)
        with pytest.raises(client.DeviceIOError) as e:
            dev.read(IMAGE_SIZE - 512, 1024, check=False)
        assert e.value.status == Status.IOERR
        assert dev.submit_raw(ReqType.IN, dev.sectors, in_len=512).status == Status.IOERR
        assert dev.submit_raw(ReqType.OUT, dev.sectors - 1, out=bytes(1024)).status == Status.IOERR
        assert dev.submit_raw(99, 0, in_len=512).status == Status.UNSUPP
        assert dev.submit_raw(ReqType.GET_LIFETIME, 0, in_len=8).status == Status.UNSUPP
        assert dev.read(0, 512) == bytes(512)  # and the queue still works


def test_both_queues_carry_io(served: Served) -> None:
    with client.connect(served.path, num_queues=2, timeout=10) as dev:
        statuses: dict[int, list[int]] = {}

        def drive(q: client.Queue) -> None:
            buf = dev.alloc(16 * 4096)
            done: list[tuple[Any, int]] = []
            got: list[int] = []
            n = 0
            while n < 300 or q.in_flight:
                while n < 300 and q.in_flight < 16:
                    q.submit_read(n * 8 % 2048, buf.gpa + (n % 16) * 4096, 4096, n)
                    n += 1
                q.kick()
                q.complete(done, 10)
                got += [s for _, s in done]
                done.clear()
            statuses[q.index] = got
            buf.free()

        threads = [threading.Thread(target=drive, args=(q,)) for q in dev.queues]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert statuses == {0: [0] * 300, 1: [0] * 300}


def test_the_client_uses_every_queue_and_ring_size_a_default_backend_offers(
    tmp_path: Path,
) -> None:
    from vblk.cli import DEFAULT_NUM_QUEUES

    s = serve(tmp_path, queues=None)
    try:
        with client.connect(s.path, timeout=10) as dev:
            offered = dev.max_queues
        assert offered == DEFAULT_NUM_QUEUES >= 64
        data = os.urandom(8192)
        with client.connect(s.path, num_queues=offered, queue_size=1024, timeout=10) as dev:
            assert len(dev.queues) == offered
            buf = dev.alloc(8192)
            buf.view[:] = data
            last = dev.queues[-1]
            last.submit_write(0, buf.gpa, 8192, "w")
            last.kick()
            done: list[tuple[Any, int]] = []
            while not done:
                last.complete(done, 10)
            assert done == [("w", 0)]
            assert dev.read(0, 8192) == data
        with client.connect(s.path, queue_size=32768, timeout=10) as dev:
            assert dev.queue_size == 32768 and dev.read(0, 8192) == data
    finally:
        assert shutdown(s) == 0


def test_read_only(tmp_path: Path) -> None:
    s = serve(tmp_path, "--read-only", name="ro")
    try:
        with client.connect(s.path, timeout=10) as dev:
            assert dev.read_only and dev.has(Feature.RO)
            assert "RO" in dev.info()["features"]
            with pytest.raises(client.DeviceIOError) as e:
                dev.write(0, bytes(512))
            assert e.value.status == Status.IOERR
            assert dev.read(0, 512) == bytes(512)
    finally:
        assert shutdown(s) == 0


def test_reconnect(served: Served) -> None:
    with client.connect(served.path, timeout=10) as dev:
        dev.write(0, b"\x77" * 4096)
    with client.connect(served.path, num_queues=2, timeout=10) as dev:
        assert dev.read(0, 4096) == b"\x77" * 4096
    with client.connect(served.path, timeout=10) as dev:
        assert dev.get_id() == SERIAL


def test_verify_bench(served: Served) -> None:
    p = subprocess.run(
        [sys.executable, "-m", "vblk", "bench", "--socket", served.path, "--verify", "--json",
         "--rw", "randrw", "--size", "4M", "--queues", "2", "--iodepth", "8"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["errors"] == 0 and r["verify_errors"] == 0 and r["reads"] == 1024


def test_sigint_exits_zero(tmp_path: Path) -> None:
    s = serve(tmp_path, name="sig")
    with client.connect(s.path, timeout=10) as dev:
        dev.write(0, b"\x01" * 512)
    assert shutdown(s) == 0
    assert not s.sock.exists()
    assert s.img.read_bytes()[:512] == b"\x01" * 512
