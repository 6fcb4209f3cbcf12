"""Fuzz the vhost-user message codec: valid messages, mutated ones, any split, fds anywhere.

The stream is built from real encodings of every request the codec knows, then
some messages are damaged: truncated, resized, re-versioned, payload bytes
flipped, garbage spliced in. The invariants: only ProtocolError ever escapes
(and it sticks), every fd is handed out exactly once or closed by close(), a
damage that keeps the framing costs one Malformed and never desynchronises
the messages after it, and whatever decodes re-encodes to the same message.
"""

from __future__ import annotations

import os
import socket
import struct

from fuzzing import case, fuzz_settings
from hypothesis import given
from hypothesis import strategies as st

from vblk.errors import ProtocolError
from vblk.vhost_user.codec import (
    U64,
    Config,
    Empty,
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
    unpack_fds,
)
from vblk.vhost_user.defs import (
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    FLAG_VERSION,
    HEADER_SIZE,
    MAX_FDS,
    MAX_PAYLOAD,
    Request,
)

_u32 = st.one_of(
    st.sampled_from([0, 1, 255, 256, 1024, 2**31, 2**32 - 1]), st.integers(0, 2**32 - 1)
)
_u64 = st.one_of(st.sampled_from([0, 1, 2**32, 2**63, 2**64 - 1]), st.integers(0, 2**64 - 1))
_region = st.builds(MemRegion, _u64, _u64, _u64, _u64)

#: (request, payload strategy) for every request with a layout, as a frontend sends them.
_PAYLOADS: list[tuple[Request, st.SearchStrategy[Payload]]] = [
    *[
        (r, st.just(Empty()))
        for r in (
            Request.GET_FEATURES,
            Request.GET_PROTOCOL_FEATURES,
            Request.GET_QUEUE_NUM,
            Request.GET_MAX_MEM_SLOTS,
            Request.SET_OWNER,
            Request.RESET_OWNER,
        )
    ],
    *[
        (r, _u64.map(U64))
        for r in (
            Request.SET_FEATURES,
            Request.SET_PROTOCOL_FEATURES,
            Request.SET_VRING_KICK,
            Request.SET_VRING_CALL,
            Request.SET_VRING_ERR,
        )
    ],
    *[
        (r, st.builds(VringState, _u32, _u32))
        for r in (
            Request.SET_VRING_NUM,
            Request.SET_VRING_BASE,
            Request.GET_VRING_BASE,
            Request.SET_VRING_ENABLE,
        )
    ],
    (Request.SET_VRING_ADDR, st.builds(VringAddr, _u32, _u32, _u64, _u64, _u64, _u64)),
    (Request.SET_MEM_TABLE, st.lists(_region, max_size=8).map(lambda r: MemTable(tuple(r)))),
    (Request.ADD_MEM_REG, _region.map(MemRegionMsg)),
    (Request.REM_MEM_REG, _region.map(MemRegionMsg)),
    (Request.SET_LOG_BASE, st.builds(Log, _u64, _u64)),
    *[
        (
            r,
            st.builds(
                lambda off, data, flags: Config(off, len(data), flags, data),
                _u32,
                st.binary(max_size=256),
                _u32,
            ),
        )
        for r in (Request.GET_CONFIG, Request.SET_CONFIG)
    ],
    (Request.VRING_KICK, st.builds(VringState, _u32, _u32)),
    (99, st.binary(max_size=64).map(Raw)),  # an unknown request carries any bytes
]


@st.composite
def _message(draw: st.DrawFn) -> Message:
    req, payload = draw(st.sampled_from(_PAYLOADS))
    flags = FLAG_VERSION | draw(st.sampled_from([0, FLAG_NEED_REPLY, 0x10, 0xFFFF_FFF0]))
    return Message(req, flags, draw(payload))


#: Damage that keeps the header's framing (size, version) intact: one Malformed at most.
_KEEPS_FRAMING = ("flip_payload", "request", "flags")
_BREAKS_FRAMING = ("truncate", "size", "version", "garbage", "oversize")


@st.composite
def _damaged(draw: st.DrawFn, wire: bytes) -> tuple[bytes, str]:
    how = draw(st.sampled_from(_KEEPS_FRAMING + _BREAKS_FRAMING))
    b = bytearray(wire)
    if how == "flip_payload":
        if len(b) == HEADER_SIZE:
            return bytes(b), how
        i = draw(st.integers(HEADER_SIZE, len(b) - 1))
        b[i] ^= draw(st.integers(1, 255))
    elif how == "request":
        struct.pack_into("<I", b, 0, draw(st.sampled_from([0, 31, 32, 41, 2**32 - 1])))
    elif how == "flags":
        flags = struct.unpack_from("<I", b, 4)[0]
        struct.pack_into("<I", b, 4, (flags & 3) | draw(st.integers(0, 2**32 - 1)) & ~3)
    elif how == "truncate":
        b = b[: draw(st.integers(0, len(b) - 1))]
    elif how == "size":
        size = struct.unpack_from("<I", b, 8)[0]
        struct.pack_into("<I", b, 8, max(0, min(MAX_PAYLOAD, size + draw(st.integers(-16, 16)))))
    elif how == "version":
        flags = struct.unpack_from("<I", b, 4)[0]
        struct.pack_into("<I", b, 4, flags & ~3 | draw(st.sampled_from([0, 2, 3])))
    elif how == "garbage":
        b = bytearray(draw(st.binary(min_size=1, max_size=40)))
    else:  # oversize
        struct.pack_into("<I", b, 8, draw(st.integers(MAX_PAYLOAD + 1, 2**32 - 1)))
    return bytes(b), how


@st.composite
def _stream(draw: st.DrawFn) -> tuple[list[tuple[Message, bytes, str]], list[int], list[int]]:
    """Messages with their (possibly damaged) wire bytes, chunk cut points, fds per chunk."""
    items = []
    for msg in draw(st.lists(_message(), min_size=1, max_size=12)):
        wire = encode(msg)
        how = ""
        if draw(st.integers(0, 3)) == 0:
            wire, how = draw(_damaged(wire))
        items.append((msg, wire, how))
    total = sum(len(w) for _, w, _ in items)
    cuts = sorted(set(draw(st.lists(st.integers(0, max(0, total)), max_size=10))))
    nfds = draw(
        st.lists(
            st.sampled_from([0, 0, 1, 2, MAX_FDS + 1]),
            min_size=len(cuts) + 1,
            max_size=len(cuts) + 1,
        )
    )
    return items, cuts, nfds


@fuzz_settings(1500)
@given(_stream())
def test_any_stream_decodes_or_fails_cleanly(
    stream: tuple[list[tuple[Message, bytes, str]], list[int], list[int]],
) -> None:
    items, cuts, nfds = stream
    with case("codec-stream"):
        data = b"".join(w for _, w, _ in items)
        bounds = [0, *cuts, len(data)]
        reader = MessageReader()
        fed: list[int] = []
        out: list[Message | Malformed] = []
        failed: ProtocolError | None = None
        try:
            for k in range(len(bounds) - 1):
                fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(nfds[k])]
                fed += fds
                reader.feed(data[bounds[k] : bounds[k + 1]], fds)
                try:
                    while (m := reader.next()) is not None:
                        assert failed is None, "a message after a ProtocolError"
                        out.append(m)
                except ProtocolError as e:
                    failed = e
            if failed is not None:
                try:
                    reader.next()
                except ProtocolError:
                    pass
                else:
                    raise AssertionError("ProtocolError did not stick")
            handed = [fd for m in out for fd in m.fds]
            assert len(handed) == len(set(handed))
            assert set(handed) | set(reader.pending_fds) == set(fed)
            assert not set(handed) & set(reader.pending_fds)
            for m in out:
                assert len(m.fds) <= MAX_FDS or isinstance(m, Malformed)
                if isinstance(m, Message):  # what decodes re-encodes to the same message
                    again = MessageReader()
                    again.feed(encode(m))
                    assert again.next() == Message(m.request, m.flags, m.payload)
            damage = {how for _, _, how in items} - {""}
            if not damage & set(_BREAKS_FRAMING):
                # Framing intact: one item per message, the undamaged ones exactly as sent.
                assert failed is None
                assert len(out) == len(items)
                for (msg, _, how), got in zip(items, out, strict=True):
                    if not how and len(got.fds) <= MAX_FDS:  # over MAX_FDS: Malformed
                        assert isinstance(got, Message)
                        assert (got.request, got.flags, got.payload) == (
                            msg.request,
                            msg.flags,
                            msg.payload,
                        )
        finally:
            reader.close()
            for m in out:
                for fd in m.fds:
                    os.close(fd)
        for fd in fed:  # nothing leaked: every fd was handed out (and closed above) or closed
            try:
                os.fstat(fd)
            except OSError:
                continue
            raise AssertionError(f"fd {fd} leaked")


@fuzz_settings(1500)
@given(
    request=st.one_of(st.integers(0, 45), st.integers(0, 2**32 - 1)),
    flags=st.one_of(st.sampled_from([1, 5, 9, 13, 0, 2, 3]), st.integers(0, 2**32 - 1)),
    payload=st.one_of(
        st.binary(max_size=300),
        st.sampled_from([struct.pack("<II", 9, 0), struct.pack("<III", 0, 2**32 - 1, 0)]),
    ),
    nfds=st.integers(0, 12),
)
def test_decode_never_raises(request: int, flags: int, payload: bytes, nfds: int) -> None:
    with case("codec-decode"):
        fds = tuple(range(1000, 1000 + nfds))  # never touched by decode
        m = decode(request, flags, payload, fds)
        assert isinstance(m, Message | Malformed)
        assert m.fds == fds  # ownership passes through, whatever the verdict
        if nfds > MAX_FDS:
            assert isinstance(m, Malformed)
        if isinstance(m, Message) and not flags & FLAG_REPLY:
            encode(Message(m.request, m.flags, m.payload))  # a decoded request always re-encodes


@fuzz_settings(500)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([socket.SOL_SOCKET, 0, 41]),
            st.sampled_from([socket.SCM_RIGHTS, socket.SCM_CREDENTIALS, 0]),
            st.binary(max_size=40),
        ),
        max_size=4,
    )
)
def test_unpack_fds_never_raises(ancdata: list[tuple[int, int, bytes]]) -> None:
    with case("codec-ancillary"):
        fds = unpack_fds(ancdata)
        want = sum(
            len(d) // 4
            for level, kind, d in ancdata
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS
        )
        assert len(fds) == want and all(isinstance(fd, int) for fd in fds)
