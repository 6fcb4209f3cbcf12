"""``vblk serve`` facing a hostile frontend over a real socket: it answers, drops or breaks a
queue, and always keeps serving the next connection."""

from __future__ import annotations

import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import need_io_uring

import vblk.client
from vblk.blk.defs import ReqType, Status
from vblk.vhost_user.codec import U64, MessageReader, VringState, encode, request
from vblk.vhost_user.defs import FLAG_NEED_REPLY, FLAG_VERSION, ProtocolFeature, Request
from vblk.virtio import defs as vdefs

IMG_SIZE = 16 << 20


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, Path, subprocess.Popen[str]]]:
    img = tmp_path / "disk.img"
    sock = tmp_path / "s.sock"
    with open(img, "wb") as f:
        f.truncate(IMG_SIZE)
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vblk",
            "serve",
            str(img),
            "--socket",
            str(sock),
            "--num-queues",
            "2",
        ],
        stderr=log,
        text=True,
    )
    deadline = time.monotonic() + 15
    while not sock.exists():
        assert proc.poll() is None, (tmp_path / "serve.log").read_text()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    yield img, sock, proc
    proc.send_signal(signal.SIGINT)
    assert proc.wait(20) == 0, (tmp_path / "serve.log").read_text()
    log.close()


def raw_connect(sock: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(sock))
    return s


def call(s: socket.socket, data: bytes) -> object:
    """Send bytes, read one reply message."""
    s.sendall(data)
    reader = MessageReader()
    while (msg := reader.next()) is None:
        chunk = s.recv(4096)
        assert chunk, "backend hung up instead of replying"
        reader.feed(chunk)
    return msg


def ack_session(s: socket.socket) -> None:
    feats = call(s, encode(request(Request.GET_FEATURES)))
    assert isinstance(feats.payload, U64)  # type: ignore[attr-defined]
    s.sendall(encode(request(Request.SET_FEATURES, U64(feats.payload.value))))  # type: ignore[attr-defined]
    s.sendall(encode(request(Request.SET_PROTOCOL_FEATURES, U64(1 << ProtocolFeature.REPLY_ACK))))


def still_serves(sock: Path) -> None:
    with vblk.client.connect(str(sock), num_queues=2, timeout=10) as dev:
        dev.write(4096, b"\x5a" * 4096)
        assert dev.read(4096, 4096) == b"\x5a" * 4096


def test_bad_version_drops_the_connection_only(
    served: tuple[Path, Path, subprocess.Popen[str]],
) -> None:
    _, sock, proc = served
    s = raw_connect(sock)
    s.sendall(struct.pack("<III", Request.GET_FEATURES, 0x2, 0))  # version bits 2
    assert s.recv(64) == b""  # dropped
    s.close()
    assert proc.poll() is None
    still_serves(sock)


def test_oversized_payload_drops_the_connection_only(
    served: tuple[Path, Path, subprocess.Popen[str]],
) -> None:
    _, sock, proc = served
    s = raw_connect(sock)
    s.sendall(struct.pack("<III", Request.SET_MEM_TABLE, FLAG_VERSION, 1 << 30))
    assert s.recv(64) == b""
    s.close()
    assert proc.poll() is None
    still_serves(sock)


def test_unknown_and_malformed_requests_get_nacks(
    served: tuple[Path, Path, subprocess.Popen[str]],
) -> None:
    _, sock, proc = served
    s = raw_connect(sock)
    ack_session(s)
    flags = FLAG_VERSION | FLAG_NEED_REPLY
    unknown = call(s, struct.pack("<III", 99, flags, 8) + bytes(8))
    assert unknown.payload.data == struct.pack("<Q", 1)  # type: ignore[attr-defined]  # Raw: unknown code
    short_addr = call(s, struct.pack("<III", Request.SET_VRING_ADDR, flags, 4) + bytes(4))
    assert short_addr.payload == U64(1)  # type: ignore[attr-defined]
    bad_index = call(s, encode(request(Request.SET_VRING_NUM, VringState(9, 128), need_reply=True)))
    assert bad_index.payload == U64(1)  # type: ignore[attr-defined]
    ok = call(s, encode(request(Request.SET_VRING_NUM, VringState(0, 128), need_reply=True)))
    assert ok.payload == U64(0)  # type: ignore[attr-defined]
    s.close()
    assert proc.poll() is None
    still_serves(sock)


def test_abrupt_disconnect_mid_io_then_reconnect(
    served: tuple[Path, Path, subprocess.Popen[str]],
) -> None:
    _, sock, proc = served
    dev = vblk.client.connect(str(sock), num_queues=2, timeout=10)
    q = dev.queues[0]
    buf = dev.alloc(1 << 20)
    for i in range(16):
        q.submit_write(i * 128, buf.gpa + (i % 16) * 65536, 65536)
    q.kick()
    dev._sock.close()  # vanish without GET_VRING_BASE: the backend must clean up alone
    time.sleep(0.5)
    assert proc.poll() is None
    still_serves(sock)


def test_hostile_chains_get_ioerr_and_the_queue_keeps_working(
    served: tuple[Path, Path, subprocess.Popen[str]],
) -> None:
    _, sock, proc = served
    with vblk.client.connect(str(sock), num_queues=1, timeout=10) as dev:
        q = dev.queues[0]
        buf = dev.alloc(4096)
        status_gpa = buf.gpa + 4095
        cases = [
            [(0xDEAD_0000_0000, 16)],  # header outside every region
            [(buf.gpa, 8)],  # header too short
            [(buf.gpa + 4096 - 8, 16)],  # header straddling the buffer end is fine memory-wise...
        ]
        struct.pack_into("<IIQ", buf.view, 0, ReqType.IN, 0, 0)
        for out in cases[:2]:
            buf.view[4095] = 0xEE
            head = q.ring.add(out, [(status_gpa, 1)])
            q.kick()
            deadline = time.monotonic() + 10
            while (used := q.ring.pop_used()) is None:
                assert time.monotonic() < deadline, "no completion for a hostile chain"
                time.sleep(0.01)
            assert used[0] == head
            assert buf.view[4095] == Status.IOERR
        # A read far past capacity, unchecked: IOERR, and the device lives on.
        r = dev.submit_raw(ReqType.IN, IMG_SIZE // 512 + 10, in_len=512)
        assert r.status == Status.IOERR
        dev.write(0, b"ok" * 256)
        assert dev.read(0, 512) == b"ok" * 256
    assert proc.poll() is None


def test_chain_with_no_status_byte_breaks_only_that_queue(
    served: tuple[Path, Path, subprocess.Popen[str]],
) -> None:
    _, sock, proc = served
    with vblk.client.connect(str(sock), num_queues=2, timeout=3) as dev:
        buf = dev.alloc(4096)
        struct.pack_into("<IIQ", buf.view, 0, ReqType.IN, 0, 0)
        dev.queues[0].ring.add([(buf.gpa, 16)], [])  # nothing writable: nowhere to report
        dev.queues[0].kick()
        time.sleep(0.5)
        assert proc.poll() is None
        r = dev.submit_raw(ReqType.GET_ID, in_len=20, queue=1)
        assert r.status == Status.OK
    still_serves(sock)


def test_event_idx_suppresses_interrupts(served: tuple[Path, Path, subprocess.Popen[str]]) -> None:
    """Batches of requests with EVENT_IDX on: far fewer interrupts than requests."""
    _, sock, _ = served
    with vblk.client.connect(str(sock), num_queues=1, timeout=10) as dev:
        assert dev.features & (1 << vdefs.VIRTIO_F_RING_EVENT_IDX)
        q = dev.queues[0]
        buf = dev.alloc(64 * 4096)
        done: list[tuple[object, int]] = []
        waits_before = q.waits
        for _ in range(20):
            for i in range(64):
                q.submit_read(i * 8, buf.gpa + i * 4096, 4096)
            q.kick()
            while q.in_flight:
                q.complete(done)
        assert len(done) == 20 * 64 and all(st == Status.OK for _, st in done)
        assert q.waits - waits_before < 20 * 64 // 4
        assert q.kicks <= 20 + 1
    assert os.path.exists(sock)


def test_hangup_mid_header_is_only_that_connection(
    served: tuple[Path, Path, subprocess.Popen[str]],
) -> None:
    _, sock, proc = served
    s = raw_connect(sock)
    s.sendall(struct.pack("<III", Request.GET_FEATURES, FLAG_VERSION, 0)[:5])
    s.close()
    time.sleep(0.3)
    assert proc.poll() is None
    still_serves(sock)


def test_sigint_is_prompt_even_with_a_stalled_frontend(tmp_path: Path) -> None:
    img = tmp_path / "d.img"
    with open(img, "wb") as f:
        f.truncate(1 << 20)
    sock = tmp_path / "s.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vblk", "serve", str(img), "--socket", str(sock)],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 15
    while not sock.exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    s = raw_connect(sock)
    s.sendall(struct.pack("<III", Request.SET_FEATURES, FLAG_VERSION, 8) + b"\0\0")  # 6 of 8 bytes
    time.sleep(0.3)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert time.monotonic() - t0 < 5
    assert not sock.exists()
    s.close()


@pytest.mark.parametrize("engine", ["sync", "io_uring", "threads"])
@pytest.mark.parametrize("direct", [False, True])
@pytest.mark.parametrize("poll_us", [0, 200])
@pytest.mark.parametrize("queue_threads", [1, 2])
def test_io_engines_move_the_right_bytes(
    tmp_path: Path, engine: str, direct: bool, poll_us: int, queue_threads: int
) -> None:
    if engine == "io_uring":
        need_io_uring()
    img = tmp_path / "e.img"
    with open(img, "wb") as f:
        f.truncate(IMG_SIZE)
    sock = tmp_path / "e.sock"
    args = ["--aio", engine, "--num-queues", "2", "--poll-us", str(poll_us)]
    args += ["--queue-threads", str(queue_threads)]
    args += ["--direct"] if direct else []
    proc = subprocess.Popen(
        [sys.executable, "-m", "vblk", "serve", str(img), "--socket", str(sock), *args],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 15
        while not sock.exists():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        pattern = os.urandom(1 << 20)
        with vblk.client.connect(str(sock), num_queues=2, timeout=10) as dev:
            for qi, q in enumerate(dev.queues):  # 64 writes in flight per queue
                buf = dev.alloc(1 << 20)
                buf.view[:] = pattern
                base = qi * (2 << 20)
                for i in range(64):
                    q.submit_write((base + i * 16384) >> 9, buf.gpa + i * 16384, 16384)
                q.kick()
                done: list[tuple[object, int]] = []
                while q.in_flight:
                    q.complete(done)
                assert [st for _, st in done] == [Status.OK] * 64
            dev.flush()
            assert dev.read(2 << 20, 1 << 20) == pattern
            r = dev.submit_raw(ReqType.IN, IMG_SIZE // 512, in_len=512)  # past the end
            assert r.status == Status.IOERR
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    data = img.read_bytes()
    assert data[: 1 << 20] == pattern and data[2 << 20 : 3 << 20] == pattern
    assert f"--aio {engine}" in err
    assert f"with 2 queue(s) on {queue_threads} thread(s)" in err
    assert "coalescing interrupts up to 200 us" in err  # on by default
    if poll_us:
        assert "found by polling" in err


# -- access: socket mode, one frontend at a time, stale sockets -------------------------


def _serve(tmp_path: Path, *args: str, umask: int | None = None) -> subprocess.Popen[str]:
    img = tmp_path / "a.img"
    if not img.exists():
        with open(img, "wb") as f:
            f.truncate(IMG_SIZE)
    sock = tmp_path / "a.sock"
    with open(tmp_path / "a.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vblk", "serve", str(img), "--socket", str(sock), *args],
            stderr=log,
            text=True,
            umask=-1 if umask is None else umask,
        )
    deadline = time.monotonic() + 15
    while not sock.exists():
        assert proc.poll() is None, (tmp_path / "a.log").read_text()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return proc


def _stop(proc: subprocess.Popen[str], tmp_path: Path) -> str:
    proc.send_signal(signal.SIGINT)
    assert proc.wait(20) == 0, (tmp_path / "a.log").read_text()
    return (tmp_path / "a.log").read_text()


@pytest.mark.parametrize(
    ("args", "umask", "mode"),
    [
        ((), 0, 0o600),  # a permissive umask does not widen the default
        (("--socket-mode", "0660"), 0o077, 0o660),  # nor does a strict one narrow the option
        (("--socket-mode", "0o666"), 0o022, 0o666),
    ],
)
def test_socket_mode(tmp_path: Path, args: tuple[str, ...], umask: int, mode: int) -> None:
    proc = _serve(tmp_path, *args, umask=umask)
    try:
        assert stat.S_IMODE(os.lstat(tmp_path / "a.sock").st_mode) == mode
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".vblk-")] == []
        still_serves_one(tmp_path / "a.sock")
    finally:
        _stop(proc, tmp_path)


def still_serves_one(sock: Path) -> None:
    with vblk.client.connect(str(sock), num_queues=1, timeout=10, mem_size=1 << 20) as dev:
        dev.write(0, b"\x33" * 512)
        assert dev.read(0, 512) == b"\x33" * 512


@pytest.mark.parametrize("first_state", ["idle", "mid-message"])
def test_second_frontend_is_refused_and_the_first_keeps_working(
    tmp_path: Path, first_state: str
) -> None:
    proc = _serve(tmp_path)
    sock = str(tmp_path / "a.sock")
    try:
        with vblk.client.connect(sock, timeout=10, mem_size=1 << 20) as first:
            first.write(0, b"\x01" * 4096)
            stalled = None
            if first_state == "mid-message":
                # A third peer cannot be mid-message while the first is attached; instead
                # the first's own control socket carries half a header while the second
                # knocks, so the refusal happens inside the server's per-message wait.
                stalled = first._sock
                stalled.sendall(struct.pack("<III", Request.GET_FEATURES, FLAG_VERSION, 0)[:6])
            t0 = time.monotonic()
            with pytest.raises(vblk.client.Disconnected, match="another frontend"):
                vblk.client.connect(sock, timeout=5, mem_size=1 << 20)
            assert time.monotonic() - t0 < 5  # refused at once, not timed out
            if stalled is not None:
                stalled.sendall(struct.pack("<III", Request.GET_FEATURES, FLAG_VERSION, 0)[6:])
                reply = b""
                while len(reply) < 20:
                    chunk = stalled.recv(20 - len(reply))
                    assert chunk, "first frontend was dropped"
                    reply += chunk
            for i in range(8):  # the first frontend is undisturbed
                first.write(i * 4096, bytes([i]) * 4096)
                assert first.read(i * 4096, 4096) == bytes([i]) * 4096
        still_serves_one(tmp_path / "a.sock")  # and the slot is free again afterwards
    finally:
        log = _stop(proc, tmp_path)
    assert log.count("refused a second frontend: a frontend is already attached") == 1, log


def test_stale_socket_of_another_kind_is_not_taken(tmp_path: Path) -> None:
    """A datagram socket answers no stream connect, but it is not stale: refuse, keep it."""
    path = tmp_path / "dgram.sock"
    d = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    d.bind(str(path))
    try:
        img = tmp_path / "b.img"
        img.write_bytes(bytes(1 << 20))
        p = subprocess.run(
            [sys.executable, "-m", "vblk", "serve", str(img), "--socket", str(path)],
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert p.returncode == 1 and "cannot be probed" in p.stderr, p.stderr
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
    finally:
        d.close()


def test_shutdown_leaves_a_socket_that_is_no_longer_ours(tmp_path: Path) -> None:
    proc = _serve(tmp_path)
    sock = tmp_path / "a.sock"
    os.unlink(sock)
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(str(sock))
    other.listen(1)
    try:
        log = _stop(proc, tmp_path)
        assert sock.exists() and "no longer our socket" in log
    finally:
        other.close()


@pytest.mark.parametrize("engine", ["sync", "io_uring", "threads"])
def test_zero_length_data_descriptor_is_served_by_every_engine(tmp_path: Path, engine: str) -> None:
    """A zero-length buffer inside a read once stopped the io_uring engine's queue (fuzz find)."""
    if engine == "io_uring":
        need_io_uring()
    proc = _serve(tmp_path, "--aio", engine)
    try:
        with vblk.client.connect(str(tmp_path / "a.sock"), timeout=10, mem_size=1 << 20) as dev:
            dev.write(0, b"\x42" * 512)
            q = dev.queues[0]
            buf = dev.alloc(4096)
            struct.pack_into("<IIQ", buf.view, 0, ReqType.IN, 0, 0)
            buf.view[4095] = 0xEE
            head = q.ring.add(
                [(buf.gpa, 16)], [(buf.gpa + 512, 0), (buf.gpa + 1024, 512), (buf.gpa + 4095, 1)]
            )
            q.kick()
            deadline = time.monotonic() + 10
            while (used := q.ring.pop_used()) is None:
                assert time.monotonic() < deadline, "no completion"
                time.sleep(0.01)
            assert used == (head, 513) and buf.view[4095] == Status.OK
            assert bytes(buf.view[1024:1536]) == b"\x42" * 512
            assert dev.read(0, 512) == b"\x42" * 512  # the queue still works
    finally:
        log = _stop(proc, tmp_path)
    assert "worker failed" not in log, log


def test_frontend_that_stops_reading_replies_is_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A peer that floods requests and never reads the answers cannot wedge the server."""
    import threading

    from vblk import server as server_mod
    from vblk.blk.device import BlockDevice
    from vblk.io.image import Image
    from vblk.storage.file import FileStorage

    monkeypatch.setattr(server_mod, "MESSAGE_TIMEOUT", 0.5)
    img_path = tmp_path / "f.img"
    Image.create(str(img_path), 1 << 20)
    image = FileStorage(str(img_path), aio="sync")
    srv = server_mod.Server(BlockDevice(image), str(tmp_path / "f.sock"), num_queues=1)
    thread = threading.Thread(target=srv.serve_forever)
    thread.start()
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(tmp_path / "f.sock"))
        s.setblocking(False)
        flood = encode(request(Request.GET_FEATURES)) * 4096
        deadline = time.monotonic() + 30
        dropped = False
        while not dropped and time.monotonic() < deadline:
            try:
                s.send(flood)
            except BlockingIOError:
                time.sleep(0.05)
            except (BrokenPipeError, ConnectionResetError):
                dropped = True
        s.close()
        assert dropped, "the server kept a frontend that never reads"
        assert any("has not read its replies" in r.getMessage() for r in caplog.records)
        still_serves_one(tmp_path / "f.sock")
    finally:
        srv.request_shutdown()
        thread.join(30)
        image.close()
    assert not thread.is_alive()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_any_thread_takes_still_stops_the_server(tmp_path: Path, sig: int) -> None:
    """Queue threads must not swallow SIGTERM/SIGINT while the main thread sleeps in poll.

    Sent to a stopped process, the signal is taken by whichever thread wakes first on
    SIGCONT; only the main thread runs Python handlers, so the queue and pool threads
    must block these signals or the shutdown waits for the next frontend message.
    """
    img = tmp_path / "t.img"
    with open(img, "wb") as f:
        f.truncate(IMG_SIZE)
    sock = tmp_path / "t.sock"
    cmd = [sys.executable, "-m", "vblk", "serve", str(img), "--socket", str(sock)]
    proc = subprocess.Popen(
        [*cmd, "--num-queues", "2", "--aio", "threads"], stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 15
    while not sock.exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    with vblk.client.connect(str(sock), num_queues=2, timeout=10) as dev:
        for _ in range(8):  # start every queue thread and its pool threads
            for q in dev.queues:
                buf = dev.alloc(4096)
                for i in range(4):
                    q.submit_read(i * 8, buf.gpa, 4096)
                q.kick()
                done: list[tuple[object, int]] = []
                while q.in_flight:
                    q.complete(done)
        threads = len(os.listdir(f"/proc/{proc.pid}/task"))
        assert threads > 4
        try:
            os.kill(proc.pid, signal.SIGSTOP)
            os.kill(proc.pid, sig)
            os.kill(proc.pid, signal.SIGCONT)
            _, err = proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            pytest.fail(f"{signal.Signals(sig).name} ignored by a server with {threads} threads")
    assert proc.returncode == 0, err
