"""The backend session state machine, driven message by message with no sockets."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vblk.blk.defs import ReqType, Status
from vblk.blk.device import BlockDevice, Stats
from vblk.io.image import Image
from vblk.storage.file import FileStorage
from vblk.vhost_user.backend import PROTOCOL_FEATURES, BackendSession, Vring
from vblk.vhost_user.codec import (
    U64,
    Config,
    Inflight,
    Malformed,
    MemRegion,
    MemRegionMsg,
    MemTable,
    Message,
    VringAddr,
    VringState,
    request,
)
from vblk.vhost_user.defs import FLAG_REPLY, ProtocolFeature, Request
from vblk.virtio import defs as vdefs
from vblk.virtio.driver import DriverQueue
from vblk.virtio.inflight import region_size

GPA = 0x10000
UADDR = 0x7F0000000000
MEM = 1 << 20
QSIZE = 64


class RecordingHost:
    """A QueueHost that only records what the session asks for."""

    def __init__(self) -> None:
        self.started: list[int] = []
        self.stopped: list[int] = []

    def start_queue(self, vring: Vring) -> None:
        assert vring.queue is not None
        self.started.append(vring.index)

    def stop_queue(self, vring: Vring) -> None:
        self.stopped.append(vring.index)


@pytest.fixture
def guest_ram() -> bytearray:
    return bytearray(MEM)


@pytest.fixture
def device(tmp_path: Path) -> Iterator[BlockDevice]:
    p = tmp_path / "d.img"
    Image.create(str(p), 4 << 20)
    img = FileStorage(str(p), aio="sync")
    yield BlockDevice(img, num_queues=2, serial="sess")
    img.close()


def fake_map(ram: bytearray) -> Callable[[int, int, int], tuple[memoryview, Callable[[], None]]]:
    closed: list[bool] = []

    def map_region(fd: int, size: int, offset: int) -> tuple[memoryview, Callable[[], None]]:
        return memoryview(ram)[offset : offset + size], lambda: closed.append(True)

    return map_region


@pytest.fixture
def session(device: BlockDevice, guest_ram: bytearray) -> tuple[BackendSession, RecordingHost]:
    host = RecordingHost()
    return BackendSession(
        device, host, num_queues=2, max_queue_size=256, map_region=fake_map(guest_ram)
    ), host


def send(
    s: BackendSession,
    req: Request,
    payload: object = None,
    *,
    need_reply: bool = False,
    fds: tuple[int, ...] = (),
) -> Message | None:
    msg = (
        request(req, payload, need_reply=need_reply, fds=fds)
        if payload is not None
        else request(req, need_reply=need_reply, fds=fds)
    )  # type: ignore[arg-type]
    return s.handle(msg)


def negotiate(s: BackendSession) -> int:
    r = send(s, Request.GET_FEATURES)
    assert r is not None and isinstance(r.payload, U64)
    feats = r.payload.value
    send(s, Request.SET_FEATURES, U64(feats))
    send(s, Request.SET_PROTOCOL_FEATURES, U64(PROTOCOL_FEATURES))
    return feats


def setup_ring(
    s: BackendSession, index: int, ram: bytearray, size: int = QSIZE, *, base: int | None = None
) -> DriverQueue:
    """Lay a ring in guest RAM and hand it to the session as QEMU would."""
    layout = vdefs.ring_layout(size)
    if base is None:
        base = index * 0x10000  # ring area offset in RAM
    view = memoryview(ram)
    drv = DriverQueue(
        size,
        *layout.views(view[base:]),
        event_idx=True,
    )
    send(s, Request.SET_VRING_NUM, VringState(index, size))
    send(s, Request.SET_VRING_BASE, VringState(index, 0))
    send(
        s,
        Request.SET_VRING_ADDR,
        VringAddr(
            index,
            0,
            UADDR + base + layout.desc,
            UADDR + base + layout.used,
            UADDR + base + layout.avail,
            0,
        ),
    )
    send(s, Request.SET_VRING_CALL, U64(index), fds=(os.eventfd(0),))
    send(s, Request.SET_VRING_KICK, U64(index), fds=(os.eventfd(0),))
    return drv


def set_mem(s: BackendSession) -> None:
    fd = os.eventfd(0)  # stands in for the memfd: the fake mapper ignores it, the session closes it
    send(s, Request.SET_MEM_TABLE, MemTable((MemRegion(GPA, MEM, UADDR, 0),)), fds=(fd,))
    with pytest.raises(OSError):
        os.fstat(fd)  # closed: mapped regions do not keep their fd


def test_feature_negotiation(session: tuple[BackendSession, RecordingHost]) -> None:
    s, _ = session
    feats = negotiate(s)
    assert feats & (1 << vdefs.VHOST_USER_F_PROTOCOL_FEATURES)
    assert feats & (1 << vdefs.VIRTIO_F_RING_EVENT_IDX)
    r = send(s, Request.GET_PROTOCOL_FEATURES)
    assert r is not None and isinstance(r.payload, U64)
    for bit in (
        ProtocolFeature.MQ,
        ProtocolFeature.REPLY_ACK,
        ProtocolFeature.CONFIG,
        ProtocolFeature.CONFIGURE_MEM_SLOTS,
        ProtocolFeature.INFLIGHT_SHMFD,
    ):
        assert r.payload.value & (1 << bit)
    r = send(s, Request.GET_QUEUE_NUM)
    assert r is not None and r.payload == U64(2)
    assert r.flags & FLAG_REPLY


def test_unoffered_features_are_refused_with_nack(
    session: tuple[BackendSession, RecordingHost],
) -> None:
    s, _ = session
    negotiate(s)
    r = send(s, Request.SET_FEATURES, U64(1 << 63), need_reply=True)
    assert r is not None and r.payload == U64(1)


def test_ring_starts_only_when_enabled_and_round_trips_a_read(
    session: tuple[BackendSession, RecordingHost], guest_ram: bytearray, device: BlockDevice
) -> None:
    s, host = session
    negotiate(s)
    set_mem(s)
    drv = setup_ring(s, 0, guest_ram)
    assert host.started == []  # protocol features negotiated: rings start disabled
    r = send(s, Request.SET_VRING_ENABLE, VringState(0, 1), need_reply=True)
    assert r is not None and r.payload == U64(0)
    assert host.started == [0]
    # One GET_ID request through the real rings, processed by the real device.
    hdr_off, data_off, st_off = 0x40000, 0x40100, 0x40200
    struct.pack_into("<IIQ", guest_ram, hdr_off, ReqType.GET_ID, 0, 0)
    guest_ram[st_off] = 0xFF
    head = drv.add([(GPA + hdr_off, 16)], [(GPA + data_off, 20), (GPA + st_off, 1)])
    q = s.vrings[0].queue
    assert q is not None
    chain = q.pop()
    assert chain is not None and chain.head == head
    used = device.handle(chain, Stats())
    assert used == 21
    q.push(chain.head, used)
    assert drv.pop_used() == (head, 21)
    assert guest_ram[st_off] == Status.OK
    assert bytes(guest_ram[data_off : data_off + 4]) == b"sess"
    # GET_VRING_BASE stops the ring and reports where the device got to.
    r = send(s, Request.GET_VRING_BASE, VringState(0, 0))
    assert r is not None and r.payload == VringState(0, 1)
    assert host.stopped == [0]
    assert s.vrings[0].kick_fd == -1


def test_bad_messages_get_error_replies_not_exceptions(
    session: tuple[BackendSession, RecordingHost],
) -> None:
    s, host = session
    negotiate(s)
    cases = [
        (Request.SET_VRING_NUM, VringState(7, 64)),  # queue index out of range
        (Request.SET_VRING_NUM, VringState(0, 100)),  # not a power of two
        (Request.SET_VRING_NUM, VringState(0, 4096)),  # too large
        (Request.SET_VRING_NUM, VringState(0, 512)),  # above --queue-size
        (Request.SET_VRING_BASE, VringState(0, 1 << 20)),
        (Request.SET_VRING_ENABLE, VringState(0, 5)),
        (Request.SET_CONFIG, Config(0, 8, 0, bytes(8))),  # capacity is not writable
        (Request.REM_MEM_REG, MemRegionMsg(MemRegion(0, 4096, 0, 0))),  # never added
    ]
    for req, payload in cases:
        r = send(s, req, payload, need_reply=True)
        assert r is not None and r.payload == U64(1), req
    r = s.handle(Message(200, 0x1 | 0x8, U64(0)))  # unknown request
    assert r is not None and r.payload == U64(1)
    r = s.handle(Malformed(Request.SET_VRING_ADDR, 0x1 | 0x8, "short", ()))
    assert r is not None and r.payload == U64(1)
    r = send(s, Request.GET_CONFIG, Config(250, 100, 0, bytes(100)))
    assert r is not None and isinstance(r.payload, Config) and r.payload.size == 0
    # The kick fd of a ring with no addresses and no memory: refused, not crashed.
    fd = os.eventfd(0)
    send(s, Request.SET_VRING_NUM, VringState(1, 64))
    send(s, Request.SET_VRING_ADDR, VringAddr(1, 0, 0xDEAD0000, 0xDEAD2000, 0xDEAD1000, 0))
    send(s, Request.SET_VRING_ENABLE, VringState(1, 1))
    r = send(s, Request.SET_VRING_KICK, U64(1), need_reply=True, fds=(fd,))
    assert r is not None and r.payload == U64(1)
    assert host.started == []


def test_unkept_fds_are_closed(session: tuple[BackendSession, RecordingHost]) -> None:
    s, _ = session
    negotiate(s)
    fd = os.eventfd(0)
    send(s, Request.SET_OWNER, fds=(fd,))  # an fd nobody wants
    with pytest.raises(OSError):
        os.fstat(fd)


@pytest.mark.parametrize(
    "req", [Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR]
)
def test_ring_fds_must_be_eventfds(
    session: tuple[BackendSession, RecordingHost], req: Request
) -> None:
    """A pipe or memfd as kick/call fd could hang a queue thread in read() or write()."""
    s, _ = session
    negotiate(s)
    r, w = os.pipe()
    m = os.memfd_create("not-an-eventfd")
    for fd in (r, m):
        reply = send(s, req, U64(0), need_reply=True, fds=(fd,))
        assert reply is not None and reply.payload == U64(1)
        with pytest.raises(OSError):
            os.fstat(fd)  # refused fds are closed, not kept
    os.close(w)
    assert (s.vrings[0].kick_fd, s.vrings[0].call_fd, s.vrings[0].err_fd) == (-1, -1, -1)


def test_signalling_a_saturated_eventfd_does_not_block(
    session: tuple[BackendSession, RecordingHost],
) -> None:
    """The frontend owns its eventfds: one it filled up must not stall the queue thread."""
    s, _ = session
    negotiate(s)
    call, err = os.eventfd(0), os.eventfd(0)  # blocking, as a hostile frontend may send them
    peer_call, peer_err = os.dup(call), os.dup(err)
    send(s, Request.SET_VRING_CALL, U64(0), fds=(call,))
    send(s, Request.SET_VRING_ERR, U64(0), fds=(err,))
    for fd in (peer_call, peer_err):
        os.eventfd_write(fd, 0xFFFF_FFFF_FFFF_FFFE)  # the counter's maximum
    s.vrings[0].signal_call()  # would block forever on a blocking eventfd
    s.vrings[0].signal_err()
    assert os.eventfd_read(peer_call) == 0xFFFF_FFFF_FFFF_FFFE
    os.close(peer_call)
    os.close(peer_err)
    s.close()


def test_config_read_and_writeback_toggle(
    session: tuple[BackendSession, RecordingHost], device: BlockDevice
) -> None:
    s, _ = session
    negotiate(s)
    r = send(s, Request.GET_CONFIG, Config(0, 60, 0, bytes(60)))
    assert r is not None and isinstance(r.payload, Config)
    assert struct.unpack_from("<Q", r.payload.data)[0] == (4 << 20) // 512
    r = send(s, Request.SET_CONFIG, Config(32, 1, 0, b"\0"), need_reply=True)
    assert r is not None and r.payload == U64(0) and device.config.writeback == 0


def test_add_and_remove_memory_regions(session: tuple[BackendSession, RecordingHost]) -> None:
    s, _ = session
    negotiate(s)
    r = send(s, Request.GET_MAX_MEM_SLOTS)
    assert r is not None and isinstance(r.payload, U64) and r.payload.value >= 8
    region = MemRegion(GPA, 4096, UADDR, 0)
    send(s, Request.ADD_MEM_REG, MemRegionMsg(region), fds=(os.eventfd(0),))
    assert len(s.memory.regions) == 1
    r = send(
        s,
        Request.ADD_MEM_REG,
        MemRegionMsg(MemRegion(GPA, 4096, UADDR, 0)),
        need_reply=True,
        fds=(os.eventfd(0),),
    )
    assert r is not None and r.payload == U64(1)  # overlaps
    send(s, Request.REM_MEM_REG, MemRegionMsg(region))
    assert s.memory.regions == ()


def test_close_stops_running_queues(
    session: tuple[BackendSession, RecordingHost], guest_ram: bytearray
) -> None:
    s, host = session
    negotiate(s)
    set_mem(s)
    setup_ring(s, 1, guest_ram)
    send(s, Request.SET_VRING_ENABLE, VringState(1, 1))
    assert host.started == [1]
    s.close()
    assert host.stopped == [1]
    assert s.memory.regions == ()


# -- inflight tracking: GET/SET_INFLIGHT_FD ----------------------------------------------


def get_inflight(s: BackendSession, num_queues: int = 2, queue_size: int = QSIZE) -> Message:
    r = send(s, Request.GET_INFLIGHT_FD, Inflight(0, 0, num_queues, queue_size))
    assert r is not None and isinstance(r.payload, Inflight)
    return r


def set_inflight(
    s: BackendSession, fd: int, size: int, *, offset: int = 0, nq: int = 2, qs: int = QSIZE
) -> Message | None:
    """SET_INFLIGHT_FD with a copy of ``fd``, as QEMU passes its own."""
    return send(
        s,
        Request.SET_INFLIGHT_FD,
        Inflight(size, offset, nq, qs),
        need_reply=True,
        fds=(os.dup(fd),),
    )


def test_get_inflight_fd_creates_a_sealed_zeroed_memfd(
    session: tuple[BackendSession, RecordingHost],
) -> None:
    import fcntl

    s, _ = session
    negotiate(s)
    r = get_inflight(s)
    assert r.is_reply and len(r.fds) == 1
    assert r.payload == Inflight(region_size(2, QSIZE), 0, 2, QSIZE)
    fd = r.fds[0]
    assert os.fstat(fd).st_size == region_size(2, QSIZE)
    seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW
    assert os.pread(fd, 64, 0) == bytes(64)
    # The session holds the fd until the reply went out and the frontend set it.
    assert set_inflight(s, fd, region_size(2, QSIZE)) == reply_ok()
    assert s.inflight is not None
    with pytest.raises(OSError):
        os.fstat(fd)
    s.close()
    assert s.inflight is None


def reply_ok() -> Message:
    return Message(Request.SET_INFLIGHT_FD, 0x5, U64(0))


def test_inflight_needs_the_protocol_feature(
    session: tuple[BackendSession, RecordingHost],
) -> None:
    s, _ = session
    send(s, Request.SET_PROTOCOL_FEATURES, U64(PROTOCOL_FEATURES & ~(1 << 12)))
    r = get_inflight(s)
    assert r.payload == Inflight(0, 0, 0, 0) and r.fds == ()  # QEMU: no inflight tracking


@pytest.mark.parametrize(("nq", "qs"), [(0, QSIZE), (3, QSIZE), (2, 0), (2, 512), (0xFFFF, 0xFFFF)])
def test_get_inflight_fd_with_a_bad_geometry_is_refused(
    session: tuple[BackendSession, RecordingHost], nq: int, qs: int
) -> None:
    s, _ = session
    negotiate(s)
    r = get_inflight(s, nq, qs)
    assert r.payload == Inflight(0, 0, 0, 0) and r.fds == ()


def test_set_inflight_fd_refuses_what_does_not_fit(
    session: tuple[BackendSession, RecordingHost],
) -> None:
    s, _ = session
    negotiate(s)
    size = region_size(2, QSIZE)
    fd = get_inflight(s).fds[0]
    nack = Message(Request.SET_INFLIGHT_FD, 0x5, U64(1))
    assert set_inflight(s, fd, size - 64) == nack  # mmap_size below what 2 x 64 need
    assert set_inflight(s, fd, size, offset=64) == nack  # runs past the memfd's end
    assert set_inflight(s, fd, size * 2) == nack  # claims more than the memfd has
    assert set_inflight(s, fd, 1 << 62, offset=1 << 62) == nack
    assert set_inflight(s, fd, size, nq=3) == nack  # more queues than the device
    assert set_inflight(s, fd, size, qs=1024) == nack  # beyond --queue-size
    assert set_inflight(s, fd, size, qs=0) == nack
    r, w = os.pipe()
    assert set_inflight(s, r, size) == nack  # not a memfd
    os.close(r)
    os.close(w)
    two = (os.dup(fd), os.dup(fd))
    r2 = send(s, Request.SET_INFLIGHT_FD, Inflight(size, 0, 2, QSIZE), need_reply=True, fds=two)
    assert r2 == nack
    for extra in two:
        with pytest.raises(OSError):
            os.fstat(extra)  # refused fds are closed, not leaked
    assert s.inflight is None
    assert set_inflight(s, fd, size) == reply_ok()


def test_a_restarted_session_resubmits_what_the_dead_one_had_in_flight(
    device: BlockDevice, guest_ram: bytearray
) -> None:
    """Two sessions over the same guest RAM and inflight memfd: the first dies mid-request."""
    host = RecordingHost()
    first = BackendSession(
        device, host, num_queues=2, max_queue_size=256, map_region=fake_map(guest_ram)
    )
    negotiate(first)
    offered = get_inflight(first)
    memfd = os.dup(offered.fds[0])  # what QEMU keeps
    size = region_size(2, QSIZE)
    set_inflight(first, memfd, size)
    set_mem(first)
    drv = setup_ring(first, 0, guest_ram)
    send(first, Request.SET_VRING_ENABLE, VringState(0, 1))
    q = first.vrings[0].queue
    assert q is not None and q.recovery is not None and q.recovery.fresh
    heads = [drv.add([(GPA + 0x40000 + 0x100 * i, 16)], [(GPA + 0x48000 + i, 1)]) for i in range(3)]
    popped = [c.head for c in iter(q.pop, None)]
    assert popped == heads
    q.push(heads[1], 1)  # one of three completes; then the process is killed
    first.close()

    second = BackendSession(
        device, RecordingHost(), num_queues=2, max_queue_size=256, map_region=fake_map(guest_ram)
    )
    negotiate(second)
    assert set_inflight(second, memfd, size) == reply_ok()  # no GET: QEMU reuses its region
    set_mem(second)
    base = 1  # QEMU's fallback after a broken connection: last_avail_idx = used->idx
    send(second, Request.SET_VRING_NUM, VringState(0, QSIZE))
    send(second, Request.SET_VRING_BASE, VringState(0, base))
    layout = vdefs.ring_layout(QSIZE)
    addr = VringAddr(0, 0, UADDR + layout.desc, UADDR + layout.used, UADDR + layout.avail, 0)
    send(second, Request.SET_VRING_ADDR, addr)
    send(second, Request.SET_VRING_CALL, U64(0), fds=(os.eventfd(0),))
    send(second, Request.SET_VRING_KICK, U64(0), fds=(os.eventfd(0),))
    send(second, Request.SET_VRING_ENABLE, VringState(0, 1))
    q2 = second.vrings[0].queue
    assert q2 is not None and q2.recovery is not None
    assert q2.recovery.resubmit == (heads[0], heads[2])
    assert q2.last_avail_idx == 3
    assert [c.head for c in iter(q2.pop, None)] == [heads[0], heads[2]]
    second.close()
    os.close(memfd)


# -- any sequence of messages: answered or refused, never raised -----------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_u64 = st.one_of(st.integers(0, 8), st.integers(0, 2**64 - 1))
_u32 = st.one_of(
    st.integers(0, 4), st.sampled_from([64, 128, 1024, 4096]), st.integers(0, 2**32 - 1)
)
_addr = st.one_of(
    st.sampled_from([UADDR, UADDR + 0x1000, UADDR + MEM - 8, GPA, 0]), st.integers(0, 2**64 - 1)
)
_region = st.builds(
    MemRegion,
    gpa=st.sampled_from([GPA, 0, GPA + 0x1000, 2**64 - 4096]),
    size=st.sampled_from([MEM, 4096, 0, 2**63]),
    uaddr=st.sampled_from([UADDR, UADDR + 0x2000, 0]),
    mmap_offset=st.sampled_from([0, 4096, 2**40]),
)
_NO_PAYLOAD = [
    Request.GET_FEATURES,
    Request.GET_PROTOCOL_FEATURES,
    Request.GET_QUEUE_NUM,
    Request.SET_OWNER,
    Request.RESET_OWNER,
    Request.GET_MAX_MEM_SLOTS,
]
_STATE = [
    Request.SET_VRING_NUM,
    Request.SET_VRING_BASE,
    Request.GET_VRING_BASE,
    Request.SET_VRING_ENABLE,
]
_FD = [Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR]
_vring_addr = st.builds(VringAddr, _u32, st.integers(0, 1), _addr, _addr, _addr, st.just(0))
_config = st.builds(
    lambda o, n: Config(o, n, 0, bytes(n)), st.integers(0, 300), st.integers(0, 256)
)
_message = st.one_of(
    st.tuples(st.sampled_from(_NO_PAYLOAD), st.just(None)),
    st.tuples(
        st.sampled_from([Request.SET_FEATURES, Request.SET_PROTOCOL_FEATURES]), _u64.map(U64)
    ),
    st.tuples(st.sampled_from(_STATE), st.builds(VringState, _u32, _u32)),
    st.tuples(st.just(Request.SET_VRING_ADDR), _vring_addr),
    st.tuples(st.sampled_from(_FD), _u64.map(U64)),
    st.tuples(
        st.just(Request.SET_MEM_TABLE), st.lists(_region, max_size=3).map(tuple).map(MemTable)
    ),
    st.tuples(
        st.sampled_from([Request.ADD_MEM_REG, Request.REM_MEM_REG]), _region.map(MemRegionMsg)
    ),
    st.tuples(st.sampled_from([Request.GET_CONFIG, Request.SET_CONFIG]), _config),
    st.tuples(
        st.sampled_from([Request.GET_INFLIGHT_FD, Request.SET_INFLIGHT_FD]),
        st.builds(
            Inflight,
            st.sampled_from([0, region_size(2, QSIZE), 1 << 62]),
            st.sampled_from([0, 64, 1 << 62]),
            st.integers(0, 3),
            st.sampled_from([0, 1, QSIZE, 256, 1024, 0xFFFF]),
        ),
    ),
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    msgs=st.lists(st.tuples(_message, st.booleans(), st.integers(0, 2)), max_size=25),
    running=st.booleans(),
)
def test_any_message_sequence_is_answered_or_refused(
    msgs: list[tuple[tuple[Request, object], bool, int]], running: bool, device: BlockDevice
) -> None:
    ram = bytearray(MEM)
    host = RecordingHost()
    s = BackendSession(device, host, num_queues=2, max_queue_size=256, map_region=fake_map(ram))
    sent: list[int] = []
    if running:  # start from a live session: memory mapped, queue 0 running
        negotiate(s)
        set_mem(s)
        setup_ring(s, 0, ram)
        send(s, Request.SET_VRING_ENABLE, VringState(0, 1))
        assert host.started == [0]
    try:
        for (req, payload), need_reply, nfds in msgs:
            fds = tuple(os.eventfd(0) for _ in range(nfds))
            sent += fds
            r = send(s, req, payload, need_reply=need_reply, fds=fds)
            if r is not None:
                assert r.is_reply and r.request == req
                sent += r.fds  # a GET_INFLIGHT_FD memfd: the session's, released by close()
            assert len(host.started) - len(host.stopped) <= 2
    finally:
        s.close()
    # Every fd handed over was either closed at once or released by close().
    for fd in sent:
        with pytest.raises(OSError):
            os.fstat(fd)


# -- ring sizes, queue counts and refusals (issue 12) ------------------------------------


def default_session(
    device: BlockDevice, ram: bytearray, num_queues: int = 2
) -> tuple[BackendSession, RecordingHost]:
    """A session as vblk serve makes it with no flags: no cap below the spec's."""
    host = RecordingHost()
    return BackendSession(device, host, num_queues=num_queues, map_region=fake_map(ram)), host


@pytest.mark.parametrize("size", [1, 128, 1024, 32768])
def test_every_ring_size_is_served_and_tracked_by_default(
    device: BlockDevice, guest_ram: bytearray, size: int
) -> None:
    s, host = default_session(device, guest_ram)
    negotiate(s)
    set_mem(s)
    r = get_inflight(s, 2, size)
    assert r.payload == Inflight(region_size(2, size), 0, 2, size)
    assert set_inflight(s, r.fds[0], region_size(2, size), qs=size) == reply_ok()
    setup_ring(s, 1, guest_ram, size, base=0)
    send(s, Request.SET_VRING_ENABLE, VringState(1, 1))
    q = s.vrings[1].queue
    assert host.started == [1] and q is not None
    assert q.size == size and q.failed is None and q.tracks_inflight
    s.close()


def test_unused_queues_allocate_nothing(device: BlockDevice, guest_ram: bytearray) -> None:
    s, host = default_session(device, guest_ram, num_queues=64)
    negotiate(s)
    r = send(s, Request.GET_QUEUE_NUM)
    assert r is not None and r.payload == U64(64)
    set_mem(s)
    assert s.vrings == {}
    setup_ring(s, 5, guest_ram)
    send(s, Request.SET_VRING_ENABLE, VringState(5, 1))
    assert list(s.vrings) == [5] and host.started == [5]
    s.close()


def test_a_queue_beyond_num_queues_is_refused_naming_both_settings(
    session: tuple[BackendSession, RecordingHost], caplog: pytest.LogCaptureFixture
) -> None:
    s, _ = session
    negotiate(s)
    r = send(s, Request.SET_VRING_NUM, VringState(2, 64), need_reply=True)
    assert r is not None and r.payload == U64(1)
    assert 2 not in s.vrings
    line = caplog.records[-1].getMessage()
    assert "vhost-user-blk-pci num-queues" in line and "--num-queues" in line


def test_a_refused_ring_size_never_starts_with_the_previous_one(
    session: tuple[BackendSession, RecordingHost],
    guest_ram: bytearray,
    device: BlockDevice,
    caplog: pytest.LogCaptureFixture,
) -> None:
    s, host = session  # --queue-size 256
    negotiate(s)
    set_mem(s)
    assert send(s, Request.SET_VRING_NUM, VringState(0, 256), need_reply=True) == Message(
        Request.SET_VRING_NUM, 0x5, U64(0)
    )
    err = os.eventfd(0, os.EFD_NONBLOCK)
    send(s, Request.SET_VRING_ERR, U64(0), fds=(os.dup(err),))
    caplog.clear()
    # QEMU ignores the NACK (it does not wait for one) and sets the ring up for 1024.
    drv = setup_ring(s, 0, guest_ram, 1024)
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 1
    assert "vhost-user-blk-pci queue-size=1024" in refusals[0]
    assert "vblk serve --queue-size 256" in refusals[0]
    send(s, Request.SET_VRING_ENABLE, VringState(0, 1))
    q = s.vrings[0].queue
    assert host.started == [0] and q is not None
    # Not a ring of 256 over the guest's 1024 entries: the 1024 it laid out, failing.
    assert q.size == 1024 and q.failed is not None and not q.tracks_inflight
    assert os.eventfd_read(err) == 1
    hdr, st = 0x40000, 0x40200
    struct.pack_into("<IIQ", guest_ram, hdr, ReqType.IN, 0, 0)
    guest_ram[st] = 0xFF
    head = drv.add([(GPA + hdr, 16)], [(GPA + 0x40400, 512), (GPA + st, 1)])
    chain = q.pop()
    assert chain is not None and chain.head == head
    assert device.handle(chain, Stats()) == 1
    assert guest_ram[st] == Status.IOERR
    # A valid size clears the refusal: the ring then starts as configured.
    send(s, Request.GET_VRING_BASE, VringState(0, 0))
    setup_ring(s, 0, guest_ram, 256)
    q = s.vrings[0].queue
    assert q is not None and q.size == 256 and q.failed is None
    assert s.vrings[0].refused == {}
    os.close(err)
    s.close()


def test_a_refused_ring_base_is_remembered_too(
    session: tuple[BackendSession, RecordingHost], guest_ram: bytearray
) -> None:
    s, _ = session
    negotiate(s)
    set_mem(s)
    send(s, Request.SET_VRING_BASE, VringState(0, 7))
    setup_ring(s, 0, guest_ram)  # sends base 0: accepted
    r = send(s, Request.SET_VRING_BASE, VringState(0, 1 << 20), need_reply=True)
    assert r is not None and r.payload == U64(1)
    send(s, Request.SET_VRING_ENABLE, VringState(0, 1))
    q = s.vrings[0].queue
    assert q is not None and q.failed is not None and "ring base" in q.failed


def test_a_small_ring_without_indirect_descriptors_is_refused(
    device: BlockDevice, guest_ram: bytearray, caplog: pytest.LogCaptureFixture
) -> None:
    s, _ = default_session(device, guest_ram)
    r = send(s, Request.GET_FEATURES)
    assert r is not None and isinstance(r.payload, U64)
    send(s, Request.SET_FEATURES, U64(r.payload.value & ~(1 << vdefs.VIRTIO_F_RING_INDIRECT_DESC)))
    send(s, Request.SET_PROTOCOL_FEATURES, U64(PROTOCOL_FEATURES))
    # seg_max 126: a request of 128 descriptors never fits a ring of 64.
    r = send(s, Request.SET_VRING_NUM, VringState(0, 64), need_reply=True)
    assert r is not None and r.payload == U64(1)
    line = caplog.records[-1].getMessage()
    assert "queue-size=64,indirect_desc=off" in line and "--queue-size 64" in line
    r = send(s, Request.SET_VRING_NUM, VringState(0, 128), need_reply=True)
    assert r is not None and r.payload == U64(0)
    # With --queue-size 64, seg_max is 62 and a ring of 64 holds every request.
    capped = BlockDevice(device.storage, num_queues=2, queue_size=64)
    s2 = BackendSession(capped, RecordingHost(), num_queues=2, max_queue_size=64)
    send(s2, Request.SET_FEATURES, U64(1 << vdefs.VIRTIO_F_VERSION_1))
    send(s2, Request.SET_PROTOCOL_FEATURES, U64(PROTOCOL_FEATURES))
    r = send(s2, Request.SET_VRING_NUM, VringState(0, 64), need_reply=True)
    assert r is not None and r.payload == U64(0)
