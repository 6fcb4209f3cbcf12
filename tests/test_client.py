"""The client's own logic: feature choice, allocator, errors, and misbehaving backends.

Backends here are scripted over a real unix socket in a thread, so each
failure the client must survive (silence, hang-up, wrong reply, NACK, stuck
rings) is produced on purpose and must end in a clear exception, not a hang.
"""

from __future__ import annotations

import array
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vblk import client
from vblk.blk.defs import Feature, Status
from vblk.blk.device import BlockDevice
from vblk.errors import ProtocolError, VblkError
from vblk.storage.file import FileStorage
from vblk.vhost_user import frontend
from vblk.vhost_user.backend import BackendSession, Vring
from vblk.vhost_user.codec import U64, Malformed, Message, MessageReader, encode, reply
from vblk.vhost_user.defs import FLAG_REPLY, FLAG_VERSION, ProtocolFeature, Request
from vblk.virtio import defs as vdefs

# -- sans-IO pieces ----------------------------------------------------------------


def test_select_features_takes_what_we_understand() -> None:
    offered = (
        1 << vdefs.VIRTIO_F_VERSION_1
        | 1 << vdefs.VHOST_USER_F_PROTOCOL_FEATURES
        | 1 << vdefs.VIRTIO_F_RING_EVENT_IDX
        | 1 << vdefs.VIRTIO_F_RING_INDIRECT_DESC
        | 1 << Feature.FLUSH
        | 1 << Feature.DISCARD
        | 1 << 40  # something we do not know
    )
    got = frontend.select_features(offered)
    assert got == offered & ~(1 << 40) & ~(1 << vdefs.VIRTIO_F_RING_INDIRECT_DESC)
    assert not frontend.select_features(offered, event_idx=False) >> 29 & 1


@pytest.mark.parametrize(
    "missing", [vdefs.VIRTIO_F_VERSION_1, vdefs.VHOST_USER_F_PROTOCOL_FEATURES]
)
def test_select_features_insists(missing: int) -> None:
    offered = 1 << vdefs.VIRTIO_F_VERSION_1 | 1 << vdefs.VHOST_USER_F_PROTOCOL_FEATURES
    with pytest.raises(ProtocolError):
        frontend.select_features(offered & ~(1 << missing))


def test_select_protocol_features() -> None:
    every = (1 << 17) - 1
    assert frontend.select_protocol_features(every) == frontend.WANTED_PROTOCOL_FEATURES
    with pytest.raises(ProtocolError, match="CONFIG"):
        frontend.select_protocol_features(every & ~(1 << ProtocolFeature.CONFIG))


def test_feature_names() -> None:
    names = frontend.feature_names(1 << Feature.FLUSH | 1 << 32 | 1 << 63)
    assert names == ["FLUSH", "VERSION_1", "bit63"]
    assert frontend.protocol_feature_names(1 << 3 | 1 << 9) == ["REPLY_ACK", "CONFIG"]


def test_allocator_first_fit_and_coalescing() -> None:
    a = client.Allocator(4096, 4096 * 9)
    assert a.capacity == 4096 * 8
    x = a.alloc(1)
    y = a.alloc(4097)
    z = a.alloc(4096)
    assert (x, y, z) == (4096, 8192, 4096 * 4)
    with pytest.raises(MemoryError):
        a.alloc(4096 * 5)
    a.free(y, 4097)
    assert a.alloc(4096) == 8192  # first fit reuses the hole
    a.free(8192, 4096)
    a.free(x, 1)
    a.free(z, 4096)
    assert a.free_bytes == 4096 * 8
    assert a.alloc(4096 * 8) == 4096  # everything coalesced back into one extent
    with pytest.raises(ValueError):
        a.alloc(0)


def test_error_classes() -> None:
    e = client.VirtioBlkError.for_status(Status.IOERR, "read of 512 bytes at 0")
    assert isinstance(e, client.DeviceIOError) and isinstance(e, OSError)
    assert isinstance(e, VblkError) and e.status == Status.IOERR
    assert "IOERR" in str(e) and "read of 512" in str(e)
    u = client.VirtioBlkError.for_status(Status.UNSUPP, "x")
    assert isinstance(u, client.UnsupportedRequest) and u.status == Status.UNSUPP
    assert issubclass(client.Disconnected, ConnectionError)
    assert issubclass(client.Disconnected, ProtocolError)
    assert issubclass(client.ClientTimeout, TimeoutError)


# -- scripted backends -----------------------------------------------------------------


def _recv(conn: socket.socket, reader: MessageReader) -> Message | Malformed | None:
    while (msg := reader.next()) is None:
        data, anc, _, _ = conn.recvmsg(4096, socket.CMSG_SPACE(8 * 4))
        fds: list[int] = []
        for _, _, cdata in anc:
            a = array.array("i")
            a.frombytes(cdata[: len(cdata) - len(cdata) % 4])
            fds.extend(a)
        if not data:
            return None
        reader.feed(data, fds)
    return msg


Script = Callable[[socket.socket, MessageReader], None]


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[Callable[[Script], str]]:
    """Run one scripted backend connection; yields a function taking the script, giving the path."""
    threads: list[threading.Thread] = []
    listeners: list[socket.socket] = []

    def start(script: Script) -> str:
        path = str(tmp_path / f"b{len(threads)}.sock")
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lsock.bind(path)
        lsock.listen(1)
        listeners.append(lsock)

        def run() -> None:
            conn, _ = lsock.accept()
            reader = MessageReader()
            try:
                script(conn, reader)
            except OSError:
                pass
            finally:
                reader.close()
                conn.close()

        t = threading.Thread(target=run, daemon=True)
        t.start()
        threads.append(t)
        return path

    yield start
    for s in listeners:
        s.close()
    for t in threads:
        t.join(5)


def test_connect_to_nothing(tmp_path: Path) -> None:
    with pytest.raises(client.Disconnected, match="cannot connect"):
        client.connect(str(tmp_path / "none.sock"))


def test_silent_backend_times_out(backend: Callable[[Script], str]) -> None:
    gone = threading.Event()

    def silent(conn: socket.socket, reader: MessageReader) -> None:
        gone.wait(5)

    path = backend(silent)
    t0 = time.monotonic()
    with pytest.raises(client.ClientTimeout, match="GET_FEATURES"):
        client.connect(path, timeout=0.3)
    assert time.monotonic() - t0 < 3
    gone.set()


def test_backend_hangs_up(backend: Callable[[Script], str]) -> None:
    def hang_up(conn: socket.socket, reader: MessageReader) -> None:
        _recv(conn, reader)

    with pytest.raises(client.Disconnected, match="GET_FEATURES"):
        client.connect(backend(hang_up), timeout=5)


def test_wrong_reply(backend: Callable[[Script], str]) -> None:
    def wrong(conn: socket.socket, reader: MessageReader) -> None:
        _recv(conn, reader)
        conn.sendall(encode(Message(Request.GET_QUEUE_NUM, FLAG_VERSION | FLAG_REPLY, U64(1))))
        _recv(conn, reader)

    with pytest.raises(ProtocolError, match="expected a reply to GET_FEATURES"):
        client.connect(backend(wrong), timeout=5)


def test_garbage_reply(backend: Callable[[Script], str]) -> None:
    def garbage(conn: socket.socket, reader: MessageReader) -> None:
        _recv(conn, reader)
        conn.sendall(b"\x01\x00\x00\x00\x07\x00\x00\x00\x00\x00\x00\x00")  # version 3
        _recv(conn, reader)

    with pytest.raises(ProtocolError, match="version"):
        client.connect(backend(garbage), timeout=5)


def _device(tmp_path: Path, **kw: object) -> BlockDevice:
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(1 << 20)
    return BlockDevice(FileStorage(str(img), aio="sync"), **kw)  # type: ignore[arg-type]


class _Idle:
    """A QueueHost that starts nothing: rings are set up but never served."""

    def start_queue(self, vring: Vring) -> None:
        pass

    def stop_queue(self, vring: Vring) -> None:
        pass


def _session_script(
    session: BackendSession,
    tweak: Callable[[Message, Message | None], Message | None] | None = None,
    hang_up_after: Request | None = None,
) -> Script:
    """Serve the lead's BackendSession, optionally rewriting replies or hanging up."""

    def run(conn: socket.socket, reader: MessageReader) -> None:
        try:
            while (msg := _recv(conn, reader)) is not None:
                answer = session.handle(msg)
                if tweak is not None and isinstance(msg, Message):
                    answer = tweak(msg, answer)
                if answer is not None:
                    conn.sendall(encode(answer))
                if hang_up_after is not None and msg.request == hang_up_after:
                    return
        finally:
            session.close()

    return run


def test_nacked_set_message(tmp_path: Path, backend: Callable[[Script], str]) -> None:
    session = BackendSession(_device(tmp_path), _Idle(), num_queues=1)

    def nack_mem_table(msg: Message, answer: Message | None) -> Message | None:
        if msg.request == Request.SET_MEM_TABLE:
            return reply(msg, U64(1))
        return answer

    with pytest.raises(ProtocolError, match="rejected SET_MEM_TABLE"):
        client.connect(backend(_session_script(session, nack_mem_table)), timeout=5)


def test_too_many_queues(tmp_path: Path, backend: Callable[[Script], str]) -> None:
    session = BackendSession(_device(tmp_path, num_queues=1), _Idle(), num_queues=1)
    with pytest.raises(ProtocolError, match="2 queues requested"):
        client.connect(backend(_session_script(session)), num_queues=2, timeout=5)


def test_stuck_ring_times_out(tmp_path: Path, backend: Callable[[Script], str]) -> None:
    session = BackendSession(_device(tmp_path), _Idle(), num_queues=1)
    with client.connect(backend(_session_script(session)), timeout=0.3) as dev:
        assert dev.capacity == 1 << 20
        t0 = time.monotonic()
        with pytest.raises(client.ClientTimeout, match="queue 0: no completion"):
            dev.read(0, 512)
        assert time.monotonic() - t0 < 3


def test_disconnect_while_waiting(tmp_path: Path, backend: Callable[[Script], str]) -> None:
    session = BackendSession(_device(tmp_path), _Idle(), num_queues=1)

    def run(conn: socket.socket, reader: MessageReader) -> None:
        while (msg := _recv(conn, reader)) is not None:
            answer = session.handle(msg)
            if answer is not None:
                conn.sendall(encode(answer))
            if msg.request == Request.SET_VRING_ENABLE:
                time.sleep(0.3)
                return  # hang up while the client waits for a completion

    with client.connect(backend(run), timeout=10) as dev:
        t0 = time.monotonic()
        with pytest.raises(client.Disconnected, match="closed"):
            dev.read(0, 512)
        assert time.monotonic() - t0 < 5


def test_closed_device_refuses_io(tmp_path: Path, backend: Callable[[Script], str]) -> None:
    session = BackendSession(_device(tmp_path), _Idle(), num_queues=1)
    dev = client.connect(backend(_session_script(session)), timeout=5)
    dev.close()
    dev.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        dev.flush()


def test_region_layout_is_consistent(tmp_path: Path, backend: Callable[[Script], str]) -> None:
    """Every queue's rings and slots sit before the allocator's first byte."""
    session = BackendSession(_device(tmp_path, num_queues=2), _Idle(), num_queues=2)
    with client.connect(
        backend(_session_script(session)), num_queues=2, queue_size=128, mem_size=1 << 20, timeout=5
    ) as dev:
        mem = session.memory
        (region,) = mem.regions
        assert region.gpa == client.GPA_BASE and region.uaddr == dev.uaddr_base
        buf = dev.alloc(4096)
        assert buf.offset >= dev._meta
        # What the backend maps is what we see: same bytes through its view.
        buf.view[:4] = b"ping"
        assert bytes(mem.translate(buf.gpa, 4)) == b"ping"
        buf.free()
        assert os.fstat(dev._memfd).st_size == dev.mem_size
