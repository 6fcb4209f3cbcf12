"""Fuzz the backend session state machine: a valid handshake prefix, then hostile messages.

Each case replays some prefix of what QEMU sends (features, memory table,
ring setup, enable), so later messages land in deep states: rings running,
memory mapped. Then come messages with near-valid and hostile fields: queue
indexes out of range, ring sizes that are not powers of two, ring addresses
at and past a region's edge, memory regions overlapping, huge, or with
offsets past the end of their memfd, fds of the wrong kind, missing or extra
fds, malformed payloads, messages out of order, while a driver keeps
publishing chains (good and bad) on whatever ring runs.

Invariants: handle() never raises; every reply is a well-formed reply to its
request, and a request the frontend waits on always gets one; every fd is
closed unless a ring keeps it; regions never overlap; a running ring has
everything it needs; close() releases everything.
"""

from __future__ import annotations

import gc
import os
import socket
import struct
from collections.abc import Iterator

import pytest
from fuzzing import DESC, case, fuzz_settings, put16
from hypothesis import event, given
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from vblk.blk.defs import ReqType
from vblk.blk.device import BlockDevice, Stats
from vblk.errors import GuestMemoryError
from vblk.io.image import Image
from vblk.storage.file import FileStorage
from vblk.vhost_user.backend import MAX_MEM_SLOTS, PROTOCOL_FEATURES, BackendSession, Vring
from vblk.vhost_user.codec import (
    U64,
    Config,
    Empty,
    Inflight,
    Malformed,
    MemRegion,
    MemRegionMsg,
    MemTable,
    Message,
    Payload,
    Raw,
    VringAddr,
    VringState,
    encode,
)
from vblk.vhost_user.defs import FLAG_NEED_REPLY, FLAG_VERSION, ProtocolFeature, Request
from vblk.virtio import defs as vdefs
from vblk.virtio.inflight import queue_region_size, region_size

NUM_QUEUES = 2
GPA = 0x100000
MEM = 0x20000  # the good memfd
SMALL = 0x1000  # a memfd too small for most regions
UADDR = 0x7F00_0000_0000
QSIZE = 64
RING = [0x0, 0x4000]  # ring area of queue i, offset in the region
MEMFD_SIZES = {"mem": MEM, "small": SMALL}
INFLIGHT_SIZE = region_size(NUM_QUEUES, QSIZE)

#: Requests the frontend blocks on: a reply must come, success or not.
_WAITED_ON = {
    Request.GET_FEATURES,
    Request.GET_PROTOCOL_FEATURES,
    Request.GET_QUEUE_NUM,
    Request.GET_MAX_MEM_SLOTS,
    Request.GET_VRING_BASE,
    Request.GET_CONFIG,
    Request.GET_INFLIGHT_FD,
}


class Host:
    """A QueueHost that runs nothing; the test pops rings itself, as a worker would."""

    def __init__(self) -> None:
        self.running: set[int] = set()

    def start_queue(self, vring: Vring) -> None:
        assert vring.queue is not None and vring.index not in self.running
        self.running.add(vring.index)

    def stop_queue(self, vring: Vring) -> None:
        assert vring.index in self.running
        self.running.remove(vring.index)


def _make_fd(kind: str, inflight: bytes = b"") -> int:
    if kind == "inflight":  # what QEMU hands a restarted backend: sealable, maybe not zero
        fd = os.memfd_create("fuzz-inflight", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, INFLIGHT_SIZE)
        os.pwrite(fd, inflight[:INFLIGHT_SIZE], 0)
        return fd
    if kind in MEMFD_SIZES:
        fd = os.memfd_create(f"fuzz-{kind}", os.MFD_CLOEXEC)
        os.ftruncate(fd, MEMFD_SIZES[kind])
        return fd
    if kind == "event":
        return os.eventfd(0, os.EFD_CLOEXEC)
    if kind == "pipe":
        r, w = os.pipe()
        os.close(w)
        return r
    a, b = socket.socketpair()
    b.close()
    return a.detach()


def _prefix(features: int) -> list[tuple[int, Payload, tuple[str, ...]]]:
    """What QEMU sends to bring up both rings, as (request, payload, fd kinds)."""
    msgs: list[tuple[int, Payload, tuple[str, ...]]] = [
        (Request.GET_FEATURES, Empty(), ()),
        (Request.GET_PROTOCOL_FEATURES, Empty(), ()),
        (Request.SET_PROTOCOL_FEATURES, U64(PROTOCOL_FEATURES), ()),
        (Request.SET_OWNER, Empty(), ()),
        (Request.SET_FEATURES, U64(features), ()),
        (Request.SET_MEM_TABLE, MemTable((MemRegion(GPA, MEM, UADDR, 0),)), ("mem",)),
        (Request.GET_INFLIGHT_FD, Inflight(0, 0, NUM_QUEUES, QSIZE), ()),
        (Request.SET_INFLIGHT_FD, Inflight(INFLIGHT_SIZE, 0, NUM_QUEUES, QSIZE), ("inflight",)),
    ]
    layout = vdefs.ring_layout(QSIZE)
    for i in range(NUM_QUEUES):
        ua = UADDR + RING[i]
        msgs += [
            (Request.SET_VRING_NUM, VringState(i, QSIZE), ()),
            (Request.SET_VRING_BASE, VringState(i, 0), ()),
            (
                Request.SET_VRING_ADDR,
                VringAddr(i, 0, ua + layout.desc, ua + layout.used, ua + layout.avail, 0),
                (),
            ),
            (Request.SET_VRING_CALL, U64(i), ("event",)),
            (Request.SET_VRING_KICK, U64(i), ("event",)),
            (Request.SET_VRING_ENABLE, VringState(i, 1), ()),
        ]
    return msgs


PREFIX_LEN = len(_prefix(0))

_index = st.sampled_from([0, 1, 2, 255, 256, 2**32 - 1])
_num = st.sampled_from([0, 1, 2, 64, 100, 256, 512, 1024, 2048, 0xFFFF, 0x10000, 2**32 - 1])
_uaddr = st.one_of(
    st.sampled_from(
        [UADDR, UADDR + 0x10, UADDR + 1, UADDR + MEM - 0x10, UADDR + MEM, UADDR - 0x1000, 0]
    ),
    st.integers(0, 2**64 - 1),
)
_region = st.builds(
    MemRegion,
    gpa=st.sampled_from([GPA, GPA + 0x1000, GPA + MEM, 0, 2**64 - 0x1000]),
    size=st.sampled_from([MEM, SMALL, 0x800, 0, MEM + 1, 2**63, 2**64 - 1]),
    uaddr=st.sampled_from([UADDR, UADDR + 0x1000, UADDR + MEM, 0x1000]),
    mmap_offset=st.sampled_from([0, 0x1000, MEM, MEM - 1, 2**40, 2**64 - 1]),
)
_fd_kinds = st.lists(
    st.sampled_from(["mem", "small", "event", "pipe", "sock", "inflight"]), max_size=3
)
_message = st.one_of(
    st.tuples(
        st.sampled_from(
            [
                Request.GET_FEATURES,
                Request.GET_PROTOCOL_FEATURES,
                Request.GET_QUEUE_NUM,
                Request.SET_OWNER,
                Request.RESET_OWNER,
                Request.GET_MAX_MEM_SLOTS,
                Request.RESET_DEVICE,
                Request.GET_STATUS,
            ]
        ),
        st.just(Empty()),
    ),
    st.tuples(
        st.sampled_from([Request.SET_FEATURES, Request.SET_PROTOCOL_FEATURES]),
        st.sampled_from([0, 2**64 - 1, PROTOCOL_FEATURES, 1 << 30, 1 << 63]).map(U64),
    ),
    st.tuples(
        st.sampled_from(
            [
                Request.SET_VRING_NUM,
                Request.SET_VRING_BASE,
                Request.GET_VRING_BASE,
                Request.SET_VRING_ENABLE,
            ]
        ),
        st.builds(VringState, _index, _num),
    ),
    st.tuples(
        st.just(Request.SET_VRING_ADDR),
        st.builds(VringAddr, _index, st.sampled_from([0, 1]), _uaddr, _uaddr, _uaddr, st.just(0)),
    ),
    st.tuples(
        st.sampled_from([Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR]),
        st.one_of(_index, st.sampled_from([0x100, 0x101, 0x1FF])).map(U64),
    ),
    st.tuples(
        st.just(Request.SET_MEM_TABLE),
        st.lists(_region, max_size=3).map(lambda r: MemTable(tuple(r))),
    ),
    st.tuples(
        st.sampled_from([Request.ADD_MEM_REG, Request.REM_MEM_REG]), _region.map(MemRegionMsg)
    ),
    st.tuples(
        st.sampled_from([Request.GET_CONFIG, Request.SET_CONFIG]),
        st.builds(
            lambda off, data: Config(off, len(data), 0, data),
            st.sampled_from([0, 32, 33, 60, 255, 256, 2**32 - 1]),
            st.sampled_from([b"", b"\0", b"\1", b"\2", bytes(8), bytes(256)]),
        ),
    ),
    st.tuples(
        st.sampled_from([Request.GET_INFLIGHT_FD, Request.SET_INFLIGHT_FD]),
        st.builds(
            Inflight,
            st.sampled_from([0, INFLIGHT_SIZE, INFLIGHT_SIZE - 1, 2**40, 2**64 - 1]),
            st.sampled_from([0, 64, 4096, 2**63]),
            st.sampled_from([0, 1, NUM_QUEUES, 3, 0xFFFF]),
            st.sampled_from([0, 1, 32, QSIZE, 100, 1024, 0xFFFF]),
        ),
    ),
    st.tuples(st.sampled_from([0, 41, 200]), st.binary(max_size=16).map(Raw)),
)
#: One step: a message (with fds and NEED_REPLY), a malformed one, or guest activity.
_step = st.one_of(
    st.tuples(st.just("msg"), _message, _fd_kinds, st.booleans()),
    st.tuples(
        st.just("malformed"),
        st.sampled_from([Request.SET_MEM_TABLE, Request.SET_VRING_ADDR, Request.GET_CONFIG]),
        _fd_kinds,
        st.booleans(),
    ),
    st.tuples(  # a good GET_ID, so rings also see real work between hostile messages
        st.just("guest"),
        st.just([(GPA + 0x8000, 16, 1, 1), (GPA + 0x8100, 21, 2, 0)]),
        st.just([0]),
        st.just(True),
    ),
    st.tuples(
        st.just("guest"),
        st.lists(
            st.tuples(
                st.sampled_from([GPA + 0x8000, GPA + MEM - 1, GPA + MEM, 0, 2**64 - 1, GPA]),
                st.sampled_from([0, 1, 16, 512, 0x1000, 2**32 - 1]),
                st.integers(0, 7),
                st.integers(0, QSIZE + 1),
            ),
            min_size=1,
            max_size=4,
        ),
        st.lists(st.integers(0, QSIZE + 1), min_size=1, max_size=4),
        st.booleans(),
    ),
)


@st.composite
def _inflight_content(draw: st.DrawFn) -> bytes:
    """An inflight region as a crashed backend (or a hostile frontend) may leave it."""
    kind = draw(st.sampled_from(["zero", "random", "used", "used"]))
    if kind == "zero":
        return bytes(INFLIGHT_SIZE)
    if kind == "random":
        return draw(st.binary(min_size=INFLIGHT_SIZE, max_size=INFLIGHT_SIZE))
    region = bytearray(INFLIGHT_SIZE)
    part = queue_region_size(QSIZE)
    for q in range(NUM_QUEUES):
        base = q * part
        struct.pack_into(
            "<QHHHH",
            region,
            base,
            0,
            draw(st.sampled_from([1, 1, 2, 0xFFFF])),  # version
            draw(st.sampled_from([QSIZE, QSIZE, 32, 0xFFFF])),  # desc_num
            draw(st.sampled_from([0, 1, QSIZE - 1, QSIZE, 0xFFFF])),  # last batch head
            draw(st.sampled_from([0, 0, 1, 5, 0xFFFF])),  # used idx
        )
        for head in draw(st.lists(st.integers(0, QSIZE - 1), max_size=8)):
            off = base + 16 + 16 * head
            region[off] = draw(st.sampled_from([1, 1, 1, 2, 255]))
            struct.pack_into("<Q", region, off + 8, draw(st.integers(0, 2**64 - 1)))
    return bytes(region)


@pytest.fixture(scope="module")
def device(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BlockDevice]:
    p = tmp_path_factory.mktemp("fuzz-session") / "d.img"
    Image.create(str(p), 1 << 20)
    img = FileStorage(str(p), aio="sync")
    dev = BlockDevice(img, num_queues=NUM_QUEUES, queue_size=256, serial="fuzz")
    yield dev
    img.close()


@fuzz_settings(1500)
@given(
    prefix_len=st.one_of(st.just(PREFIX_LEN), st.integers(0, PREFIX_LEN)),
    steps=st.lists(_step, max_size=20),
    inflight=_inflight_content(),
)
def test_any_message_after_any_handshake_prefix(
    device: BlockDevice, prefix_len: int, steps: list[tuple[object, ...]], inflight: bytes
) -> None:
    with case("session"):
        device.config.writeback = 1
        host = Host()
        s = BackendSession(device, host, num_queues=NUM_QUEUES, max_queue_size=256)
        passed: list[tuple[int, tuple[int, int]]] = []  # (fd, its file's identity)
        try:
            for req, payload, kinds in _prefix(_offered(device))[:prefix_len]:
                deliver(s, host, Message(req, FLAG_VERSION, payload), kinds, passed, inflight)
            if prefix_len == PREFIX_LEN:
                assert host.running == {0, 1}, "the valid handshake must start both rings"
                for v in s.vrings.values():
                    r = v.queue.recovery if v.queue is not None else None
                    _event(
                        "ring tracks inflight: "
                        + ("fresh" if r is None or r.fresh else f"{len(r.resubmit)} to resubmit")
                    )
            for step in steps:
                if step[0] == "msg":
                    (req, payload), kinds, need_reply = step[1], step[2], step[3]
                    flags = FLAG_VERSION | (FLAG_NEED_REPLY if need_reply else 0)
                    deliver(s, host, Message(req, flags, payload), kinds, passed, inflight)  # type: ignore[arg-type]
                elif step[0] == "malformed":
                    req, kinds, need_reply = step[1], step[2], step[3]
                    flags = FLAG_VERSION | (FLAG_NEED_REPLY if need_reply else 0)
                    deliver(s, host, Malformed(req, flags, "fuzzed", ()), kinds, passed, inflight)  # type: ignore[arg-type]
                else:
                    drive_guest(s, device, step[1], step[2], bool(step[3]))  # type: ignore[arg-type]
        finally:
            s.close()
        assert host.running == set()
        assert s.memory.regions == ()
        for v in s.vrings.values():
            assert (v.kick_fd, v.call_fd, v.err_fd, v.queue) == (-1, -1, -1, None)
        if any(_still(fd, ident) for fd, ident in passed):
            # A mapping whose views were still exported at close goes with the garbage
            # collector (and with it the fd CPython's mmap keeps); then nothing is left.
            gc.collect()
        for fd, ident in passed:
            assert not _still(fd, ident), f"fd {fd} leaked: {os.readlink(f'/proc/self/fd/{fd}')}"


def _event(what: str) -> None:
    """A statistics label (--hypothesis-show-statistics); a no-op outside hypothesis."""
    try:
        event(what)
    except InvalidArgument:
        pass


def _offered(device: BlockDevice) -> int:
    return device.features | 1 << vdefs.VHOST_USER_F_PROTOCOL_FEATURES


def _identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _still(fd: int, ident: tuple[int, int]) -> bool:
    """Whether ``fd`` is still open on the same file (numbers get reused)."""
    try:
        return _identity(fd) == ident
    except OSError:
        return False


def _open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def deliver(
    s: BackendSession,
    host: Host,
    msg: Message | Malformed,
    kinds: tuple[str, ...] | list[str],
    passed: list[tuple[int, tuple[int, int]]],
    inflight: bytes = b"",
) -> None:
    fds = tuple(_make_fd(k, inflight) for k in kinds)
    passed += [(fd, _identity(fd)) for fd in fds]
    if isinstance(msg, Message):
        msg = Message(msg.request, msg.flags, msg.payload, fds)
    else:
        msg = Malformed(msg.request, msg.flags, msg.reason, fds)
    answer = s.handle(msg)
    _event(f"rings running after a message: {len(host.running)}")
    if answer is not None:
        assert answer.is_reply and answer.request == msg.request
        # Only GET_INFLIGHT_FD answers with an fd: the session's own memfd, which it
        # keeps until SET_INFLIGHT_FD or close (checked closed after close, like ours).
        assert len(answer.fds) <= (msg.request == Request.GET_INFLIGHT_FD)
        passed += [(fd, _identity(fd)) for fd in answer.fds]
        encode(answer)  # the server must be able to send it
    waited = msg.request in _WAITED_ON or (
        msg.flags & FLAG_NEED_REPLY and s.acked_protocol_features & (1 << ProtocolFeature.REPLY_ACK)
    )
    if waited:
        assert answer is not None, f"{msg.request!r}: the frontend would wait forever"
    kept = {fd for v in s.vrings.values() for fd in (v.kick_fd, v.call_fd, v.err_fd) if fd >= 0}
    for fd in fds:
        assert fd in kept or not _open(fd), f"fd {fd} of {msg.request!r} neither kept nor closed"
    regions = s.memory.regions
    assert len(regions) <= MAX_MEM_SLOTS
    for i, a in enumerate(regions):
        assert a.size > 0 and len(a.buf) == a.size
        for b in regions[i + 1 :]:
            assert a.gpa + a.size <= b.gpa or b.gpa + b.size <= a.gpa
            assert a.uaddr + a.size <= b.uaddr or b.uaddr + b.size <= a.uaddr
    for v in s.vrings.values():
        assert v.running == (v.index in host.running)
        if v.running:
            assert v.enabled and v.kick_fd >= 0 and v.addr is not None and v.num > 0


def drive_guest(
    s: BackendSession,
    device: BlockDevice,
    descs: list[tuple[int, int, int, int]],
    heads: list[int],
    request: bool,
) -> None:
    """Play the driver on every running ring: publish chains, then drain as a worker would."""
    for v in s.vrings.values():
        q = v.queue
        if q is None or v.addr is None:
            continue
        try:
            table = s.memory.translate_uaddr(v.addr.desc, 16 * q.size)
            avail = s.memory.translate_uaddr(v.addr.avail, vdefs.avail_ring_bytes(q.size))
            hdr = s.memory.translate(GPA + 0x8000, 16)
        except GuestMemoryError:
            continue  # memory changed under the ring's feet: the session restarts it or not
        if request:
            struct.pack_into("<IIQ", hdr, 0, ReqType.GET_ID, 0, 0)
        for i, d in enumerate(descs):
            DESC.pack_into(table, 16 * (i % q.size), d[0], d[1], d[2], d[3])
        idx = struct.unpack_from("<H", avail, 2)[0]
        for h in heads:
            put16(avail, 4 + 2 * (idx % q.size), h)
            idx += 1
        put16(avail, 2, idx)
        stats = Stats()
        for _ in range(2 * q.size):
            chain = q.pop()
            if chain is None:
                break
            _event("guest chain popped" + (" (bad)" if chain.error else ""))
            used = device.handle(chain, stats)
            if used is None:
                q.mark_broken("no status byte")
                break
            q.push(chain.head, used)


def test_prefix_alone_brings_both_rings_up(device: BlockDevice) -> None:
    """The fuzz's starting point is real: the full prefix runs both rings and serves a GET_ID."""
    host = Host()
    s = BackendSession(device, host, num_queues=NUM_QUEUES, max_queue_size=256)
    passed: list[tuple[int, tuple[int, int]]] = []
    try:
        for req, payload, kinds in _prefix(_offered(device)):
            deliver(s, host, Message(req, FLAG_VERSION, payload), kinds, passed)
        assert host.running == {0, 1}
        mm_region = s.memory.regions[0].buf
        layout = vdefs.ring_layout(QSIZE)
        struct.pack_into("<IIQ", mm_region, 0x8000, ReqType.GET_ID, 0, 0)
        drive_guest(
            s,
            device,
            [(GPA + 0x8000, 16, 1, 1), (GPA + 0x8100, 21, 2, 0)],
            [0],
            request=True,
        )
        assert bytes(mm_region[0x8100:0x8104]) == b"fuzz" and mm_region[0x8100 + 20] == 0
        used_idx = struct.unpack_from("<H", mm_region, RING[0] + layout.used + 2)[0]
        assert used_idx == 1
        del mm_region
    finally:
        s.close()
