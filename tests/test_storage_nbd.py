"""The NBD storage against real servers: nbdkit (memory, file, python) and qemu-nbd on images.

Every operation goes through the storage queue's submit/commit/poll/reap
cycle, as the I/O thread drives it, with bytearray-backed memoryviews
standing in for guest memory.
"""

from __future__ import annotations

import errno
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import stop

from vblk.storage import FLAG_FUA, FLAG_UNMAP, Completion, Op, StorageError
from vblk.storage.nbd import NbdQueue, NbdStorage, SharedNbdQueue, open_image, open_nbd

pytestmark = pytest.mark.interop

MiB = 1 << 20


def _need(tool: str) -> None:
    if shutil.which(tool) is None:
        if os.environ.get("CI"):
            pytest.fail(f"{tool} is not installed (required in CI)")
        pytest.skip(f"{tool} is not installed")


def _wait_socket(path: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while not path.exists():
        assert proc.poll() is None, f"server exited: {proc.stderr.read() if proc.stderr else ''!r}"
        assert time.monotonic() < deadline, "server did not create its socket"
        time.sleep(0.02)


@pytest.fixture
def nbdkit(tmp_path: Path) -> Iterator[object]:
    """Start ``nbdkit ARGS...`` on a unix socket; yields a starter returning the nbd+unix URI."""
    _need("nbdkit")
    procs: list[subprocess.Popen[bytes]] = []

    def start(*args: str) -> str:
        sock = tmp_path / f"nbdkit{len(procs)}.sock"
        proc = subprocess.Popen(
            ["nbdkit", "--exit-with-parent", "-f", "-U", str(sock), *args],
            stderr=subprocess.PIPE,
        )
        procs.append(proc)
        _wait_socket(sock, proc)
        return f"nbd+unix:///?socket={sock}"

    yield start
    for p in procs:
        stop(p)


def run(q: NbdQueue | SharedNbdQueue, ops: list[tuple[int, int, int, list[memoryview], int]]
        ) -> list[int]:
    """Submit every op at once, commit, then poll and reap as the I/O thread does."""
    for i, (op, offset, length, bufs, flags) in enumerate(ops):
        q.submit(op, offset, length, bufs, flags, i)
    q.commit()
    results = collect(q, len(ops))
    return [results[i] for i in range(len(ops))]


def collect(q: NbdQueue | SharedNbdQueue, n: int) -> dict[object, int]:
    """Poll and reap until ``n`` operations have completed; nothing may be left in flight."""
    assert q.fd is not None
    results: dict[object, int] = {}
    deadline = time.monotonic() + 30
    while len(results) < n:
        assert time.monotonic() < deadline, f"only {len(results)} of {n} completed"
        r, _, _ = select.select([q.fd], [], [], 1.0)
        if r:
            q.clear_signal()
        done: list[Completion] = q.reap()
        for token, res in done:
            assert token not in results
            results[token] = res
    assert q.inflight == 0
    return results


def pattern(seed: int, n: int) -> bytes:
    return bytes((seed + i * 7) & 0xFF for i in range(256)) * (n // 256)


def exercise(storage: NbdStorage, size: int) -> None:
    """Reads, writes (multi-segment, FUA), flush, discard and write-zeroes, 64 in flight."""
    q = storage.open_queue(0, 128)
    try:
        n, bs = 64, 16384
        src = bytearray(b"".join(pattern(i, bs) for i in range(n)))
        mv = memoryview(src)
        writes = []
        for i in range(n):
            seg = mv[i * bs : (i + 1) * bs]
            # Two segments per request, as a guest's scatter-gather list.
            flags = FLAG_FUA if i % 2 else 0
            writes.append((Op.WRITE, i * bs, bs, [seg[:4096], seg[4096:]], flags))
        assert run(q, writes) == [bs] * n
        assert run(q, [(Op.FLUSH, 0, 0, [], 0)]) == [0]
        dst = bytearray(n * bs)
        dv = memoryview(dst)
        reads = [(Op.READ, i * bs, bs, [dv[i * bs : (i + 1) * bs]], 0) for i in range(n)]
        assert run(q, reads) == [bs] * n
        assert dst == src
        # Write-zeroes (with and without unmap) and discard, then read back.
        ops = [(Op.WRITE_ZEROES, 0, bs, [], 0), (Op.WRITE_ZEROES, bs, bs, [], FLAG_UNMAP)]
        assert run(q, ops) == [0, 0]
        back = bytearray(2 * bs)
        assert run(q, [(Op.READ, 0, 2 * bs, [memoryview(back)], 0)]) == [2 * bs]
        assert back == bytes(2 * bs)
        if storage.caps.discard:
            assert run(q, [(Op.DISCARD, 4 * bs, 4 * bs, [], 0)]) == [0]
        # Beyond the end: the server's EINVAL (or libnbd's) for that request alone.
        res = run(q, [(Op.READ, size, 512, [memoryview(bytearray(512))], 0),
                      (Op.READ, 0, 512, [memoryview(bytearray(512))], 0)])
        assert res[0] < 0 and res[1] == 512
    finally:
        q.close()


def test_nbdkit_memory(nbdkit: object) -> None:
    uri = nbdkit("memory", "64M")  # type: ignore[operator]
    s = open_nbd(uri, {}, read_only=False)
    try:
        c = s.caps
        assert c.size == 64 * MiB and c.writable and c.flush and c.discard and c.write_zeroes
        assert c.fua and s.multi_conn
        assert s.description == f"nbd {uri}"
        exercise(s, 64 * MiB)
    finally:
        s.close()


def test_nbdkit_file_reaches_the_file(nbdkit: object, tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(8 * MiB))
    uri = nbdkit("file", str(img))  # type: ignore[operator]
    s = open_nbd(uri, {}, read_only=False)
    try:
        exercise(s, 8 * MiB)
        # Two queues, two connections: what one writes, the other reads (multi-conn).
        q0, q1 = s.open_queue(0, 8), s.open_queue(1, 8)
        data = bytearray(b"\xa5" * 65536)
        assert run(q0, [(Op.WRITE, MiB, 65536, [memoryview(data)], 0),
                        ]) == [65536]
        assert run(q0, [(Op.FLUSH, 0, 0, [], 0)]) == [0]
        out = bytearray(65536)
        assert run(q1, [(Op.READ, MiB, 65536, [memoryview(out)], 0)]) == [65536]
        assert out == data
        q0.close()
        q1.close()
    finally:
        s.close()
    raw = img.read_bytes()
    assert raw[MiB : MiB + 65536] == data
    assert raw[:16384] == bytes(16384)  # zeroed
    assert raw[2 * 16384 : 3 * 16384] == pattern(2, 16384)


def test_read_only(nbdkit: object) -> None:
    uri = nbdkit("memory", "4M")  # type: ignore[operator]
    s = open_nbd(uri, {}, read_only=True)
    try:
        assert not s.caps.writable and not s.caps.discard and not s.caps.write_zeroes
        qs = [s.open_queue(i, 4) for i in range(3)]
        for q in qs:
            q.close()
    finally:
        s.close()


PLUGIN = textwrap.dedent(
    """
    import nbdkit
    API_VERSION = 2
    disk = bytearray(4 * 1024 * 1024)
    def open(readonly):
        return 1
    def get_size(h):
        return len(disk)
    def pread(h, buf, offset, flags):
        if offset >= 1024 * 1024 and offset < 2 * 1024 * 1024:
            nbdkit.set_error(5)
            raise Exception("bad sector")
        buf[:] = disk[offset:offset + len(buf)]
    def pwrite(h, buf, offset, flags):
        disk[offset:offset + len(buf)] = buf
    """
)


def test_nbdkit_python_errors_fail_one_request(nbdkit: object, tmp_path: Path) -> None:
    plugin = tmp_path / "plugin.py"
    plugin.write_text(PLUGIN)
    uri = nbdkit("python", str(plugin))  # type: ignore[operator]
    s = open_nbd(uri, {}, read_only=False)
    try:
        # nbdkit emulates zeroing with pwrite; the plugin has no trim and no flush.
        assert s.caps.writable and not s.caps.discard and not s.caps.flush
        q = s.open_queue(0, 16)
        data = bytearray(b"x" * 4096)
        bufs = [memoryview(bytearray(4096)) for _ in range(3)]
        res = run(q, [(Op.WRITE, 0, 4096, [memoryview(data)], 0),
                      (Op.READ, MiB + 4096, 4096, [bufs[0]], 0),
                      (Op.READ, 0, 4096, [bufs[1]], 0)])
        assert res == [4096, -errno.EIO, 4096]
        assert bytes(bufs[1]) == bytes(data)
        q.close()
    finally:
        s.close()


@pytest.mark.parametrize("multi_conn", [True, False], ids=["own-connection", "shared"])
def test_server_death_fails_requests_and_never_hangs(tmp_path: Path, multi_conn: bool) -> None:
    _need("nbdkit")
    sock = tmp_path / "k.sock"
    mc = ([], []) if multi_conn else (["--filter=multi-conn"], ["multi-conn-mode=disable"])
    proc = subprocess.Popen(["nbdkit", "--exit-with-parent", "-f", "-U", str(sock), *mc[0],
                             "--filter=delay", "memory", "4M", "rdelay=1", *mc[1]],
                            stderr=subprocess.PIPE)
    try:
        _wait_socket(sock, proc)
        s = open_nbd(f"nbd+unix:///?socket={sock}", {}, read_only=False)
        assert s.multi_conn == multi_conn
        q = s.open_queue(0, 8)
        bufs = [memoryview(bytearray(4096)) for _ in range(4)]
        for i, b in enumerate(bufs):
            q.submit(Op.READ, i * 4096, 4096, [b], 0, i)
        q.commit()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        got: list[Completion] = []
        deadline = time.monotonic() + 10
        while len(got) < 4:
            assert time.monotonic() < deadline
            assert q.fd is not None
            select.select([q.fd], [], [], 1.0)
            q.clear_signal()
            got += q.reap()
        assert all(res < 0 for _, res in got)
        # Later requests fail at once, and the fd stays quiet (no busy loop).
        assert run(q, [(Op.READ, 0, 4096, [bufs[0]], 0)]) == [-errno.EIO]
        r, _, _ = select.select([q.fd], [], [], 0.2)
        assert not r
        q.close()
        s.close()
    finally:
        stop(proc)


def test_open_errors_are_one_line(tmp_path: Path, nbdkit: object) -> None:
    with pytest.raises(StorageError, match="No such file"):
        open_nbd(f"nbd+unix:///?socket={tmp_path}/none.sock", {}, read_only=False)
    with pytest.raises(StorageError, match="not an NBD URI"):
        open_nbd("http://example.com/x", {}, read_only=False)
    with pytest.raises(StorageError, match="unknown option 'bogus'"):
        open_nbd("nbd://localhost/x", {"bogus": "1"}, read_only=False)
    with pytest.raises(StorageError, match="timeout"):
        open_nbd("nbd://localhost/x", {"timeout": "soon"}, read_only=False)
    # A server that accepts and never answers: bounded by the timeout.
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.bind(str(tmp_path / "silent.sock"))
    silent.listen(1)
    t0 = time.monotonic()
    with pytest.raises(StorageError, match=r"no answer from the server within 0\.5 s"):
        open_nbd(f"nbd+unix:///?socket={tmp_path}/silent.sock", {"timeout": "0.5"}, False)
    assert time.monotonic() - t0 < 5
    silent.close()
    # A missing export on a server with named exports.
    _need("qemu-nbd")
    img = tmp_path / "x.img"
    img.write_bytes(bytes(MiB))
    sock = tmp_path / "q.sock"
    proc = subprocess.Popen(["qemu-nbd", "-t", "-f", "raw", "-x", "real", "-k", str(sock),
                             str(img)], stderr=subprocess.PIPE)
    try:
        _wait_socket(sock, proc)
        with pytest.raises(StorageError) as e:
            open_nbd(f"nbd+unix:///wrong?socket={sock}", {}, read_only=False)
        assert "\n" not in str(e.value) and "nbd+unix:///wrong" in str(e.value)
    finally:
        stop(proc)


def test_no_multi_conn_shares_one_connection_between_queues(tmp_path: Path) -> None:
    """qemu-nbd (writable, one client, no multi-conn): many queues in flight at once on threads."""
    _need("qemu-nbd")
    img = tmp_path / "x.img"
    img.write_bytes(bytes(16 * MiB))
    sock = tmp_path / "q.sock"
    # qemu-nbd advertises multi-conn only when it may have several clients; here one only,
    # so a second connection would wait forever in its handshake. Without --persistent it
    # exits when that client goes.
    proc = subprocess.Popen(["qemu-nbd", "-f", "raw", "-k", str(sock), str(img)],
                            stderr=subprocess.PIPE)
    try:
        _wait_socket(sock, proc)
        s = open_nbd(f"nbd+unix:///?socket={sock}", {}, read_only=False)
        try:
            assert not s.multi_conn
            queues = [s.open_queue(i, 64) for i in range(4)]
            control = s.open_queue(0, 8)  # the device's control queue, beside queue 0
            assert all(isinstance(q, SharedNbdQueue) for q in queues)
            n, bs = 48, 65536
            blocks = [[pattern(q * n + i, bs) for i in range(n)] for q in range(4)]
            # Two queues with commands in flight at once, from one thread.
            for i in range(n):
                queues[0].submit(Op.WRITE, i * bs, bs, [memoryview(blocks[0][i])], 0, i)
                queues[1].submit(Op.WRITE, (n + i) * bs, bs, [memoryview(blocks[1][i])], 0, i)
            queues[0].commit()
            queues[1].commit()
            assert queues[0].inflight == queues[1].inflight == n
            for q in queues[:2]:
                assert collect(q, n) == {i: bs for i in range(n)}
            # Four queues driven by four I/O threads at once.
            errors: list[BaseException] = []

            def worker(q: int) -> None:
                try:
                    if q >= 2:
                        base = q * n
                        writes = [(Op.WRITE, (base + i) * bs, bs, [memoryview(blocks[q][i])], 0)
                                  for i in range(n)]
                        assert run(queues[q], writes) == [bs] * n
                    back = [bytearray(bs) for _ in range(n)]
                    reads = [(Op.READ, (q * n + i) * bs, bs, [memoryview(back[i])], 0)
                             for i in range(n)]
                    if q < 2:
                        assert run(queues[q], reads) == [bs] * n
                        assert [bytes(b) for b in back] == blocks[q]
                except BaseException as e:
                    errors.append(e)

            threads = [threading.Thread(target=worker, args=(q,)) for q in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert not errors, errors
            # One flush, on the control queue, covers every queue's writes: they share a
            # connection (qemu-nbd's file is then up to date).
            assert run(control, [(Op.FLUSH, 0, 0, [], 0)]) == [0]
            raw = img.read_bytes()
            for q in range(4):
                for i in range(0, n, 7):
                    at = (q * n + i) * bs
                    assert raw[at : at + bs] == blocks[q][i], (q, i)
            for q in [*queues, control]:
                q.close()
        finally:
            s.close()
        assert proc.wait(10) == 0, "vblk's connection outlived the storage"
    finally:
        stop(proc)


# --- qemu-img formats through a child qemu-nbd ---


def _qemu_img(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], check=True, capture_output=True,
                          text=True, timeout=60).stdout


@pytest.mark.parametrize("fmt", ["qcow2", "vmdk", "vhdx", "vpc"])
def test_image_formats(tmp_path: Path, fmt: str) -> None:
    _need("qemu-nbd")
    img = tmp_path / f"disk.{fmt}"
    _qemu_img("create", "-f", fmt, str(img), "16M")
    s = open_image(str(img), fmt, {}, read_only=False)
    child = s._child
    assert child is not None
    try:
        assert s.caps.size >= 16 * MiB and s.caps.writable and s.caps.flush
        exercise(s, s.caps.size)
    finally:
        s.close()
    assert child.proc.poll() is not None, "qemu-nbd outlived the storage"
    assert not os.path.exists(child.socket)
    if fmt in ("qcow2", "vmdk", "vhdx"):
        _qemu_img("check", "-f", fmt, str(img))
    raw = tmp_path / "out.raw"
    _qemu_img("convert", "-f", fmt, "-O", "raw", str(img), str(raw))
    data = raw.read_bytes()
    assert data[:32768] == bytes(32768)
    assert data[2 * 16384 : 3 * 16384] == pattern(2, 16384)
    assert data[63 * 16384 : 64 * 16384] == pattern(63, 16384)


def test_qcow2_discard_deallocates_and_check_is_clean(tmp_path: Path) -> None:
    _need("qemu-nbd")
    img = tmp_path / "d.qcow2"
    _qemu_img("create", "-f", "qcow2", str(img), "16M")
    s = open_image(str(img), "qcow2", {}, read_only=False)
    try:
        q0, q1 = s.open_queue(0, 32), s.open_queue(1, 32)
        data = memoryview(bytearray(b"\x5a" * (4 * MiB)))
        assert run(q0, [(Op.WRITE, 0, 4 * MiB, [data], 0), (Op.FLUSH, 0, 0, [], 0)]) == [
            4 * MiB, 0]
        assert run(q1, [(Op.DISCARD, 0, 2 * MiB, [], 0), (Op.FLUSH, 0, 0, [], 0)]) == [0, 0]
        q0.close()
        q1.close()
    finally:
        s.close()
    _qemu_img("check", str(img))
    import json

    m = json.loads(_qemu_img("map", "--output=json", str(img)))
    data_ranges = [e for e in m if e["data"]]
    assert data_ranges and min(e["start"] for e in data_ranges) >= 2 * MiB


def test_qcow2_read_only(tmp_path: Path) -> None:
    _need("qemu-nbd")
    img = tmp_path / "r.qcow2"
    _qemu_img("create", "-f", "qcow2", str(img), "4M")
    s = open_image(str(img), "qcow2", {}, read_only=True)
    try:
        assert not s.caps.writable
    finally:
        s.close()


def test_corrupt_qcow2_is_one_clear_line(tmp_path: Path) -> None:
    _need("qemu-nbd")
    img = tmp_path / "bad.qcow2"
    _qemu_img("create", "-f", "qcow2", str(img), "4M")
    head = bytearray(img.read_bytes()[:512])
    head[4:72] = os.urandom(68)  # garbage after the magic
    img.write_bytes(bytes(head))
    with pytest.raises(StorageError) as e:
        open_image(str(img), "qcow2", {}, read_only=False)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"qcow2 image {img}: qemu-nbd: "), msg
    with pytest.raises(StorageError, match="no such file"):
        open_image(str(tmp_path / "none.qcow2"), "qcow2", {}, read_only=False)
    with pytest.raises(StorageError, match="unknown option 'x'"):
        open_image(str(img), "qcow2", {"x": "1"}, read_only=False)
    # Nothing is left behind.
    left = subprocess.run(["pgrep", "-f", str(img)], capture_output=True)
    assert left.returncode == 1


CHILD = textwrap.dedent(
    """
    import sys, time
    from vblk.storage.nbd import open_image
    s = open_image(sys.argv[1], "qcow2", {}, read_only=False)
    q = s.open_queue(0, 4)
    print(s._child.proc.pid, flush=True)
    time.sleep(60)
    """
)


def test_qemu_nbd_dies_with_a_killed_vblk(tmp_path: Path) -> None:
    _need("qemu-nbd")
    img = tmp_path / "k.qcow2"
    _qemu_img("create", "-f", "qcow2", str(img), "4M")
    holder = subprocess.Popen([sys.executable, "-c", CHILD, str(img)], stdout=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert holder.stdout is not None
        pid = int(holder.stdout.readline())
        os.kill(pid, 0)  # qemu-nbd runs
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        deadline = time.monotonic() + 10
        while True:
            # It is vblk's child, now reparented: gone once it exited and was reaped by init,
            # or a zombie of nobody's (state Z).
            try:
                state = Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0]
            except FileNotFoundError:
                break
            if state == "Z":
                break
            assert time.monotonic() < deadline, "qemu-nbd outlived vblk's SIGKILL"
            time.sleep(0.05)
    finally:
        stop(holder)


def test_large_writes_fill_the_socket_and_keep_flowing(tmp_path: Path) -> None:
    """64 MiB of 1 MiB writes at once: libnbd blocks mid-payload and the queue keeps going."""
    _need("qemu-nbd")
    img = tmp_path / "big.qcow2"
    _qemu_img("create", "-f", "qcow2", str(img), "64M")
    s = open_image(str(img), "qcow2", {}, read_only=False)
    try:
        q = s.open_queue(0, 64)
        bufs = [memoryview(bytearray([i]) * MiB) for i in range(64)]
        t0 = time.monotonic()
        assert run(q, [(Op.WRITE, i * MiB, MiB, [bufs[i]], 0) for i in range(64)]) == [MiB] * 64
        # A stall waits for replies that cannot come (seconds per command); flowing is ~1 s.
        assert time.monotonic() - t0 < 20
        back = memoryview(bytearray(MiB))
        assert run(q, [(Op.READ, 37 * MiB, MiB, [back], 0)]) == [MiB]
        assert bytes(back) == bytes([37]) * MiB
        q.close()
    finally:
        s.close()


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.parametrize(
    "sig,guest", [(signal.SIGINT, True), (signal.SIGTERM, False)], ids=["SIGINT-guest", "SIGTERM"]
)
def test_serve_qcow2_stops_cleanly_on_a_signal_to_its_process_group(
    tmp_path: Path, sig: signal.Signals, guest: bool
) -> None:
    """A terminal's Ctrl-C reaches the whole group: vblk still flushes, stops qemu-nbd, exits 0."""
    _need("qemu-nbd")
    from vblk import client

    img = tmp_path / "g.qcow2"
    _qemu_img("create", "-f", "qcow2", str(img), "16M")
    sock = tmp_path / "vblk.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vblk", "serve", str(img), "--socket", str(sock),
         "--num-queues", "2"],
        stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        _wait_socket(sock, proc)
        (qemu_nbd,) = _children(proc.pid)
        data = bytes(range(256)) * 256
        if guest:
            dev = client.connect(str(sock), num_queues=2, timeout=20)
            dev.write(MiB, data)  # no flush: the final flush must make it durable
        os.killpg(proc.pid, sig)
        assert proc.stderr is not None
        rc, err = proc.wait(30), proc.stderr.read().decode()
        if guest:
            dev.close()
    finally:
        stop(proc)
    assert rc == 0, err
    assert "error" not in err.lower(), err
    with pytest.raises(ProcessLookupError):
        os.kill(qemu_nbd, 0)
    _qemu_img("check", str(img))
    if guest:
        raw = tmp_path / "g.raw"
        _qemu_img("convert", "-O", "raw", str(img), str(raw))
        assert raw.read_bytes()[MiB : MiB + len(data)] == data
