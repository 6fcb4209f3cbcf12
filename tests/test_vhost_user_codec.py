"""The vhost-user codec against hand-packed bytes, split streams and garbage."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vblk.errors import ProtocolError
from vblk.vhost_user.codec import (
    U64,
    Config,
    Empty,
    Inflight,
    Log,
    Malformed,
    MemRegion,
    MemRegionMsg,
    MemTable,
    Message,
    MessageReader,
    Payload,
    Raw,
    VringAddr,
    VringState,
    decode,
    encode,
    reply,
    request,
)
from vblk.vhost_user.defs import (
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    FLAG_VERSION,
    HEADER_SIZE,
    MAX_FDS,
    MAX_PAYLOAD,
    ProtocolFeature,
    Request,
)

U32 = st.integers(0, 2**32 - 1)
U64S = st.integers(0, 2**64 - 1)
REGIONS = st.builds(MemRegion, U64S, U64S, U64S, U64S)


def header(req: int, flags: int, size: int) -> bytes:
    return struct.pack("<III", req, flags, size)


def read_all(reader: MessageReader) -> list[Message | Malformed]:
    out = []
    while (m := reader.next()) is not None:
        out.append(m)
    return out


def one(data: bytes, fds: tuple[int, ...] = ()) -> Message | Malformed:
    reader = MessageReader()
    reader.feed(data, fds)
    [msg] = read_all(reader)
    return msg


@pytest.fixture
def pipe_fds() -> Iterator[list[int]]:
    """Real fds, so close() can be observed; whatever the test leaves open is closed."""
    fds: list[int] = []
    for _ in range(5):
        fds.extend(os.pipe())
    yield fds
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


# -- constants -----------------------------------------------------------------


def test_request_codes_match_the_spec() -> None:
    assert [r.value for r in Request] == list(range(1, 41))
    assert Request.SET_MEM_TABLE.value == 5
    assert Request.SET_BACKEND_REQ_FD.value == 21
    assert Request.RESET_DEVICE.value == 34
    assert Request.REM_MEM_REG.value == 38
    assert Request.GET_STATUS.value == 40


def test_protocol_feature_bits_match_the_spec() -> None:
    assert [f.value for f in ProtocolFeature] == list(range(17))
    assert ProtocolFeature.REPLY_ACK.value == 3
    assert ProtocolFeature.CONFIG.value == 9
    assert ProtocolFeature.CONFIGURE_MEM_SLOTS.value == 15


# -- exact layouts -------------------------------------------------------------


def test_header_layout() -> None:
    msg = request(Request.SET_FEATURES, U64(0x1_0000_0003), need_reply=True)
    assert encode(msg) == bytes.fromhex("0200000009000000080000000300000001000000")


def test_empty_request_layout() -> None:
    assert encode(request(Request.GET_FEATURES)) == bytes.fromhex("01000000 01000000 00000000")


def test_reply_layout_and_flags() -> None:
    r = reply(request(Request.GET_QUEUE_NUM, need_reply=True), U64(2))
    assert r.flags == FLAG_VERSION | FLAG_REPLY
    assert r.is_reply and not r.need_reply
    assert r.request == Request.GET_QUEUE_NUM
    assert encode(r) == header(17, 5, 8) + (2).to_bytes(8, "little")


def test_vring_addr_layout() -> None:
    addr = VringAddr(index=1, flags=0, desc=0x1000, used=0x3000, avail=0x2000, log=0xDEAD)
    wire = encode(request(Request.SET_VRING_ADDR, addr))
    body = struct.pack("<IIQQQQ", 1, 0, 0x1000, 0x3000, 0x2000, 0xDEAD)
    assert len(body) == 40
    assert wire == header(9, 1, 40) + body
    assert one(wire) == Message(Request.SET_VRING_ADDR, 1, addr)


def test_mem_table_layout_two_regions() -> None:
    r0 = MemRegion(gpa=0, size=0xA0000, uaddr=0x7F00_0000_0000, mmap_offset=0)
    r1 = MemRegion(gpa=0x100000, size=0x3FF00000, uaddr=0x7F00_0010_0000, mmap_offset=0x100000)
    wire = encode(request(Request.SET_MEM_TABLE, MemTable((r0, r1)), fds=(7, 8)))
    body = (
        struct.pack("<II", 2, 0)
        + struct.pack("<QQQQ", 0, 0xA0000, 0x7F00_0000_0000, 0)
        + struct.pack("<QQQQ", 0x100000, 0x3FF00000, 0x7F00_0010_0000, 0x100000)
    )
    assert wire == header(5, 1, 72) + body
    msg = one(wire)
    assert isinstance(msg, Message)
    assert msg.payload == MemTable((r0, r1))


def test_mem_region_msg_layout() -> None:
    region = MemRegion(gpa=0x2000, size=0x1000, uaddr=0x9000, mmap_offset=0x10)
    wire = encode(request(Request.ADD_MEM_REG, MemRegionMsg(region)))
    assert wire == header(37, 1, 40) + bytes(8) + struct.pack("<QQQQ", 0x2000, 0x1000, 0x9000, 0x10)


def test_config_layout() -> None:
    cfg = Config(offset=0, size=4, flags=1, data=b"\x01\x02\x03\x04")
    wire = encode(reply(request(Request.GET_CONFIG), cfg))
    assert wire == header(24, 5, 16) + struct.pack("<III", 0, 4, 1) + b"\x01\x02\x03\x04"
    msg = one(wire)
    assert isinstance(msg, Message) and msg.is_reply
    assert msg.payload == cfg


def test_vring_state_layout() -> None:
    wire = encode(request(Request.SET_VRING_NUM, VringState(index=1, num=256)))
    assert wire == header(8, 1, 8) + struct.pack("<II", 1, 256)


def test_inflight_layout_is_qemus_padded_struct() -> None:
    # struct VhostUserInflight { u64 mmap_size, mmap_offset; u16 num_queues, queue_size; }
    # is 24 bytes in C (4 bytes of tail padding), and QEMU checks the reply is that size.
    wire = encode(request(Request.SET_INFLIGHT_FD, Inflight(0x1080, 0x40, 2, 128)))
    assert wire == header(32, 1, 24) + struct.pack("<QQHH", 0x1080, 0x40, 2, 128) + bytes(4)
    for size in (20, 23, 25, 32):
        got = decode(Request.GET_INFLIGHT_FD, FLAG_VERSION, bytes(size))
        assert isinstance(got, Malformed) and "inflight" in got.reason


def test_a_reply_can_carry_fds() -> None:
    to = request(Request.GET_INFLIGHT_FD, Inflight(0, 0, 1, 128))
    r = reply(to, Inflight(4160, 0, 1, 128), fds=(7,))
    assert r.is_reply and r.fds == (7,) and r.request == Request.GET_INFLIGHT_FD
    assert reply(to, U64(0)).fds == ()


# -- round trips ---------------------------------------------------------------

ROUND_TRIPS: list[tuple[int, int, Payload]] = [
    (Request.GET_FEATURES, FLAG_VERSION, Empty()),
    (Request.SET_OWNER, FLAG_VERSION, Empty()),
    (Request.GET_STATUS, FLAG_VERSION, Empty()),
    (Request.SET_FEATURES, FLAG_VERSION, U64(1 << 32 | 1 << 30)),
    (Request.SET_VRING_CALL, FLAG_VERSION, U64(0x101)),
    (Request.SET_STATUS, FLAG_VERSION | FLAG_NEED_REPLY, U64(0xF)),
    (Request.SET_LOG_BASE, FLAG_VERSION, U64(0x1234)),
    (Request.SET_LOG_BASE, FLAG_VERSION, Log(mmap_size=0x8000, mmap_offset=0)),
    (Request.SET_VRING_NUM, FLAG_VERSION, VringState(0, 128)),
    (Request.SET_VRING_BASE, FLAG_VERSION, VringState(1, 0xFFFF)),
    (Request.GET_VRING_BASE, FLAG_VERSION, VringState(1, 0)),
    (Request.SET_VRING_ENABLE, FLAG_VERSION, VringState(0, 1)),
    (Request.SET_VRING_ADDR, FLAG_VERSION, VringAddr(0, 1, 2**64 - 1, 3, 4, 5)),
    (Request.SET_MEM_TABLE, FLAG_VERSION, MemTable(())),
    (Request.SET_MEM_TABLE, FLAG_VERSION, MemTable((MemRegion(1, 2, 3, 4),) * 8)),
    (Request.ADD_MEM_REG, FLAG_VERSION, MemRegionMsg(MemRegion(0x1000, 0x2000, 0x3000, 0))),
    (Request.REM_MEM_REG, FLAG_VERSION, MemRegionMsg(MemRegion(0x1000, 0x2000, 0x3000, 0))),
    (Request.GET_CONFIG, FLAG_VERSION, Config(0, 60, 0, bytes(60))),
    (Request.SET_CONFIG, FLAG_VERSION, Config(20, 1, 0, b"\x01")),
    (Request.SET_CONFIG, FLAG_VERSION, Config(0, 256, 0, bytes(range(256)))),
    (Request.GET_INFLIGHT_FD, FLAG_VERSION, Inflight(0, 0, 2, 128)),
    (Request.SET_INFLIGHT_FD, FLAG_VERSION, Inflight(8448, 0, 4, 128)),
    (Request.GET_INFLIGHT_FD, FLAG_VERSION | FLAG_REPLY, Inflight(2 << 40, 4096, 0xFFFF, 1)),
    (99, FLAG_VERSION, Raw(b"whatever")),
    (99, FLAG_VERSION | FLAG_REPLY, Raw(b"")),
    # replies
    (Request.GET_FEATURES, FLAG_VERSION | FLAG_REPLY, U64(0x1_7000_0000)),
    (Request.GET_MAX_MEM_SLOTS, FLAG_VERSION | FLAG_REPLY, U64(32)),
    (Request.GET_VRING_BASE, FLAG_VERSION | FLAG_REPLY, VringState(0, 77)),
    (Request.GET_CONFIG, FLAG_VERSION | FLAG_REPLY, Config(0, 0, 0, b"")),
    (Request.SET_MEM_TABLE, FLAG_VERSION | FLAG_REPLY, U64(0)),
    (Request.SET_VRING_ADDR, FLAG_VERSION | FLAG_REPLY, U64(1)),
]


@pytest.mark.parametrize(("req", "flags", "payload"), ROUND_TRIPS)
def test_round_trip(req: int, flags: int, payload: Payload) -> None:
    msg = Message(req, flags, payload, ())
    assert one(encode(msg)) == msg


@given(
    st.one_of(
        st.builds(U64, U64S),
        st.builds(VringState, U32, U32),
        st.builds(VringAddr, U32, U32, U64S, U64S, U64S, U64S),
        st.builds(MemTable, st.lists(REGIONS, max_size=8).map(tuple)),
        st.builds(MemRegionMsg, REGIONS),
        st.builds(Inflight, U64S, U64S, st.integers(0, 0xFFFF), st.integers(0, 0xFFFF)),
        st.binary(max_size=256).flatmap(
            lambda d: st.builds(Config, U32, st.just(len(d)), U32, st.just(d))
        ),
    )
)
def test_round_trip_any_payload(payload: Payload) -> None:
    req = {
        U64: Request.SET_FEATURES,
        VringState: Request.SET_VRING_NUM,
        VringAddr: Request.SET_VRING_ADDR,
        MemTable: Request.SET_MEM_TABLE,
        MemRegionMsg: Request.ADD_MEM_REG,
        Inflight: Request.SET_INFLIGHT_FD,
        Config: Request.SET_CONFIG,
    }[type(payload)]
    msg = request(req, payload)
    assert one(encode(msg)) == msg


def test_decoded_codes_are_request_members() -> None:
    msg = one(encode(request(Request.SET_OWNER)))
    assert type(msg.request) is Request and msg.request is Request.SET_OWNER
    assert type(one(header(200, 1, 0)).request) is int


def test_encode_rejects_what_the_peer_would_refuse() -> None:
    with pytest.raises(ValueError):
        encode(request(Request.SET_CONFIG, Config(0, 3, 0, b"ab")))
    with pytest.raises(ValueError):
        encode(request(Request.SET_MEM_TABLE, MemTable((MemRegion(0, 1, 0, 0),) * 9)))
    with pytest.raises(ValueError):
        encode(request(Request.SET_FEATURES, U64(1 << 64)))
    with pytest.raises(ValueError):
        encode(request(Request.SET_VRING_NUM, VringState(-1, 0)))
    with pytest.raises(ValueError):
        encode(request(99, Raw(bytes(MAX_PAYLOAD + 1))))
    with pytest.raises(ValueError):
        encode(request(Request.SET_MEM_TABLE, MemTable(()), fds=range(MAX_FDS + 1)))


# -- reassembly and fds --------------------------------------------------------


def test_byte_by_byte_feed_reassembles() -> None:
    msgs = [
        request(Request.GET_FEATURES),
        request(Request.SET_VRING_ADDR, VringAddr(0, 0, 1, 2, 3, 4)),
        request(Request.SET_CONFIG, Config(8, 3, 0, b"abc"), need_reply=True),
    ]
    stream = b"".join(encode(m) for m in msgs)
    reader = MessageReader()
    got: list[Message | Malformed] = []
    for i in range(len(stream)):
        reader.feed(stream[i : i + 1])
        got.extend(read_all(reader))
    assert got == msgs
    assert reader.next() is None


def test_partial_header_yields_nothing_yet() -> None:
    reader = MessageReader()
    wire = encode(request(Request.SET_FEATURES, U64(5)))
    reader.feed(wire[: HEADER_SIZE - 1])
    assert reader.next() is None
    reader.feed(wire[HEADER_SIZE - 1 : -1])
    assert reader.next() is None
    reader.feed(wire[-1:])
    assert reader.next() == request(Request.SET_FEATURES, U64(5))


def test_fds_attach_to_the_message_whose_header_they_came_with() -> None:
    kick = encode(request(Request.SET_VRING_KICK, U64(0)))
    call = encode(request(Request.SET_VRING_CALL, U64(0)))
    get = encode(request(Request.GET_FEATURES))
    reader = MessageReader()
    reader.feed(kick, [10])
    reader.feed(get)
    reader.feed(call[:3], [11])  # fds ride with the first byte, header still incomplete
    reader.feed(call[3:])
    got = read_all(reader)
    assert [(m.request, m.fds) for m in got] == [
        (Request.SET_VRING_KICK, (10,)),
        (Request.GET_FEATURES, ()),
        (Request.SET_VRING_CALL, (11,)),
    ]


def test_fds_fed_while_a_message_is_buffered_go_to_that_message() -> None:
    table = encode(request(Request.SET_MEM_TABLE, MemTable((MemRegion(0, 4096, 0, 0),) * 2)))
    reader = MessageReader()
    reader.feed(table[:5])
    reader.feed(b"", [20, 21])  # ancillary data with no bytes, before the header ended
    assert reader.next() is None
    reader.feed(table[5:] + encode(request(Request.GET_FEATURES)))
    first, second = read_all(reader)
    assert first.fds == (20, 21)
    assert second.fds == ()


def test_fds_after_the_header_belong_to_the_next_message() -> None:
    addr = encode(request(Request.SET_VRING_ADDR, VringAddr(0, 0, 1, 2, 3, 4)))
    reader = MessageReader()
    reader.feed(addr[:HEADER_SIZE])
    reader.feed(addr[HEADER_SIZE:], [30])
    reader.feed(encode(request(Request.SET_VRING_KICK, U64(0))))
    first, second = read_all(reader)
    assert (first.fds, second.fds) == ((), (30,))


def test_too_many_fds_is_malformed_and_keeps_them_all() -> None:
    fds = tuple(range(100, 100 + MAX_FDS + 1))
    msg = one(encode(request(Request.SET_MEM_TABLE, MemTable(()))), fds)
    assert isinstance(msg, Malformed)
    assert msg.fds == fds
    assert msg.request == Request.SET_MEM_TABLE


def test_close_closes_only_pending_fds(pipe_fds: list[int]) -> None:
    taken, pending_a, pending_b = pipe_fds[:3]
    reader = MessageReader()
    reader.feed(encode(request(Request.SET_VRING_KICK, U64(0))), [taken])
    reader.feed(encode(request(Request.SET_VRING_CALL, U64(0)))[:4], [pending_a, pending_b])
    [msg] = read_all(reader)
    assert msg.fds == (taken,)
    assert reader.pending_fds == (pending_a, pending_b)
    reader.close()
    assert is_open(taken)
    assert not is_open(pending_a) and not is_open(pending_b)
    late = pipe_fds[3]
    reader.feed(b"x", [late])  # a closed reader takes nothing and leaks nothing
    assert not is_open(late)
    assert reader.next() is None


def test_fds_of_a_rejected_header_are_closed_by_close(pipe_fds: list[int]) -> None:
    reader = MessageReader()
    reader.feed(header(Request.SET_VRING_KICK, 2, 8) + bytes(8), [pipe_fds[0]])
    with pytest.raises(ProtocolError):
        reader.next()
    assert is_open(pipe_fds[0])
    reader.close()
    assert not is_open(pipe_fds[0])


# -- malformed and hostile input -----------------------------------------------

MALFORMED: list[tuple[str, bytes]] = [
    ("u64 short", header(Request.SET_FEATURES, 1, 4) + bytes(4)),
    ("u64 long", header(Request.SET_VRING_KICK, 1, 12) + bytes(12)),
    ("empty with bytes", header(Request.GET_FEATURES, 1, 8) + bytes(8)),
    ("vring state short", header(Request.SET_VRING_NUM, 1, 4) + bytes(4)),
    ("vring addr short", header(Request.SET_VRING_ADDR, 1, 32) + bytes(32)),
    ("mem table no head", header(Request.SET_MEM_TABLE, 1, 4) + bytes(4)),
    ("mem table 9 regions", header(5, 1, 8 + 9 * 32) + struct.pack("<II", 9, 0) + bytes(9 * 32)),
    ("mem table count mismatch", header(5, 1, 8 + 32) + struct.pack("<II", 2, 0) + bytes(32)),
    ("mem table trailing", header(5, 1, 8 + 40) + struct.pack("<II", 1, 0) + bytes(40)),
    ("mem reg short", header(Request.ADD_MEM_REG, 1, 32) + bytes(32)),
    ("config no head", header(Request.GET_CONFIG, 1, 8) + bytes(8)),
    ("config too big", header(25, 1, 12 + 257) + struct.pack("<III", 0, 257, 0) + bytes(257)),
    ("config size mismatch", header(25, 1, 12 + 4) + struct.pack("<III", 0, 8, 0) + bytes(4)),
    ("log base odd", header(Request.SET_LOG_BASE, 1, 12) + bytes(12)),
    ("u64 reply short", header(Request.GET_FEATURES, 5, 4) + bytes(4)),
    ("ack reply empty", header(Request.SET_MEM_TABLE, 5, 0)),
    ("vring base reply short", header(Request.GET_VRING_BASE, 5, 8 + 4) + bytes(12)),
]


@pytest.mark.parametrize(("name", "wire"), MALFORMED, ids=[n for n, _ in MALFORMED])
def test_malformed_is_reported_and_the_stream_stays_in_sync(name: str, wire: bytes) -> None:
    reader = MessageReader()
    follow = request(Request.SET_VRING_BASE, VringState(0, 9))
    reader.feed(wire, [40])
    reader.feed(encode(follow))
    bad, good = read_all(reader)
    assert isinstance(bad, Malformed)
    assert bad.request == struct.unpack_from("<I", wire)[0]
    assert bad.flags == struct.unpack_from("<I", wire, 4)[0]
    assert bad.fds == (40,)
    assert bad.reason
    assert good == follow


def test_unknown_request_is_raw() -> None:
    msg = one(header(77, 1, 3) + b"abc", (5,))
    assert msg == Message(77, 1, Raw(b"abc"), (5,))


def test_known_request_without_layout_is_raw() -> None:
    msg = one(header(Request.IOTLB_MSG, 1, 4) + b"\x01\x02\x03\x04")
    assert msg == Message(Request.IOTLB_MSG, 1, Raw(b"\x01\x02\x03\x04"))


@pytest.mark.parametrize("flags", [0, 2, 3, 0x5 & ~1, 0xFFFFFFFE])
def test_bad_version_is_a_protocol_error_and_stays_one(flags: int) -> None:
    reader = MessageReader()
    reader.feed(header(Request.GET_FEATURES, flags, 0))
    with pytest.raises(ProtocolError, match="version"):
        reader.next()
    reader.feed(encode(request(Request.GET_FEATURES)))
    with pytest.raises(ProtocolError):
        reader.next()


def test_oversize_is_a_protocol_error_before_the_payload_arrives() -> None:
    reader = MessageReader()
    reader.feed(header(Request.SET_CONFIG, 1, MAX_PAYLOAD + 1))
    with pytest.raises(ProtocolError, match="exceeds"):
        reader.next()


def test_max_payload_itself_is_accepted() -> None:
    msg = one(header(99, 1, MAX_PAYLOAD) + bytes(MAX_PAYLOAD))
    assert msg == Message(99, 1, Raw(bytes(MAX_PAYLOAD)))


def test_unknown_flag_bits_pass_through() -> None:
    msg = one(header(Request.SET_OWNER, 0x1 | 0x10 | FLAG_NEED_REPLY, 0))
    assert isinstance(msg, Message)
    assert msg.flags == 0x19 and msg.need_reply and not msg.is_reply


def test_decode_never_raises_for_short_payload_of_each_known_request() -> None:
    for req in Request:
        for flags in (FLAG_VERSION, FLAG_VERSION | FLAG_REPLY):
            for size in (0, 1, 7, 8, 12, 16, 40, 300):
                out = decode(req, flags, bytes(size))
                assert isinstance(out, Message | Malformed)


@settings(max_examples=300)
@given(st.lists(st.binary(max_size=64), max_size=20))
def test_arbitrary_streams_only_raise_protocol_error(chunks: list[bytes]) -> None:
    reader = MessageReader()
    try:
        for chunk in chunks:
            reader.feed(chunk)
            read_all(reader)
    except ProtocolError:
        pass


@settings(max_examples=300)
@given(
    st.lists(
        st.tuples(st.sampled_from([*Request, 0, 41, 2**32 - 1]), st.binary(max_size=80)),
        max_size=8,
    ),
    st.integers(1, 16),
)
def test_framed_garbage_never_desynchronises(parts: list[tuple[int, bytes]], step: int) -> None:
    """Well-framed messages with random payloads: one result per frame, in order."""
    stream = b"".join(header(req, FLAG_VERSION, len(p)) + p for req, p in parts)
    reader = MessageReader()
    got: list[Message | Malformed] = []
    for i in range(0, len(stream), step):
        reader.feed(stream[i : i + step])
        got.extend(read_all(reader))
    assert [int(m.request) for m in got] == [req for req, _ in parts]


def test_unpack_fds_from_a_real_scm_rights_message() -> None:
    import socket

    from vblk.vhost_user.codec import ANCILLARY_SPACE, pack_fds, unpack_fds

    assert pack_fds([]) == []
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    r, w = os.pipe()
    try:
        a.sendmsg([b"x"], pack_fds([r, w]))
        _, anc, _, _ = b.recvmsg(1, ANCILLARY_SPACE)
        got = unpack_fds(anc)
        assert len(got) == 2 and all(
            os.path.sameopenfile(x, y) for x, y in zip(got, (r, w), strict=True)
        )
        for fd in got:
            os.close(fd)
        assert unpack_fds([]) == []
        assert unpack_fds([(socket.SOL_SOCKET, 99, b"\0" * 8)]) == []  # not SCM_RIGHTS
    finally:
        for fd in (r, w):
            os.close(fd)
        a.close()
        b.close()
