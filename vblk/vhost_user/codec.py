"""vhost-user message codec, sans-IO: bytes and fds in, typed messages out.

Nothing here touches a socket, so the backend session, the userspace frontend
and the tests share one parser. A payload that does not fit its request is
returned as :class:`Malformed` with its bytes consumed, so one bad message
costs an error reply rather than the connection; only a header that leaves no
way to find the next message raises :class:`~vblk.errors.ProtocolError`.
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
import struct
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from vblk.errors import ProtocolError
from vblk.vhost_user.defs import (
    CONFIG_SPACE_MAX,
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    FLAG_VERSION,
    HEADER_SIZE,
    MAX_FDS,
    MAX_PAYLOAD,
    MEM_TABLE_MAX_REGIONS,
    VERSION_MASK,
    Request,
)

_HEADER = struct.Struct("<III")  # request, flags, size
_U64 = struct.Struct("<Q")
_VRING_STATE = struct.Struct("<II")  # index, num
_VRING_ADDR = struct.Struct("<IIQQQQ")  # index, flags, desc, used, avail, log
_MEM_REGION = struct.Struct("<QQQQ")  # gpa, size, uaddr, mmap_offset
_MEM_TABLE_HEAD = struct.Struct("<II")  # nregions, padding
_MEM_REG_PAD = struct.Struct("<Q")
_CONFIG_HEAD = struct.Struct("<III")  # offset, size, flags
_LOG = struct.Struct("<QQ")  # mmap_size, mmap_offset
_INFLIGHT = struct.Struct("<QQHH4x")  # mmap_size, mmap_offset, num_queues, queue_size, padding


class _Invalid(Exception):
    """A payload does not decode; becomes a Malformed, never escapes."""


def _expect(data: bytes, size: int, what: str) -> None:
    if len(data) != size:
        raise _Invalid(f"{what} payload is {len(data)} bytes, expected {size}")


# -- payloads ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Empty:
    """No payload (size 0): GET_* requests, SET_OWNER, RESET_OWNER."""

    def pack(self) -> bytes:
        return b""

    @classmethod
    def unpack(cls, data: bytes) -> Empty:
        _expect(data, 0, "empty")
        return cls()


@dataclass(frozen=True, slots=True)
class U64:
    """One u64: feature masks, counts, REPLY_ACK status, vring fd index words."""

    value: int

    def pack(self) -> bytes:
        return _U64.pack(self.value)

    @classmethod
    def unpack(cls, data: bytes) -> U64:
        _expect(data, _U64.size, "u64")
        return cls(*_U64.unpack(data))


@dataclass(frozen=True, slots=True)
class VringState:
    """``struct vhost_vring_state``: a queue index and a number (size, base, enable)."""

    index: int
    num: int

    def pack(self) -> bytes:
        return _VRING_STATE.pack(self.index, self.num)

    @classmethod
    def unpack(cls, data: bytes) -> VringState:
        _expect(data, _VRING_STATE.size, "vring state")
        return cls(*_VRING_STATE.unpack(data))


@dataclass(frozen=True, slots=True)
class VringAddr:
    """``struct vhost_vring_addr``; ring addresses are front-end user addresses."""

    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int

    def pack(self) -> bytes:
        return _VRING_ADDR.pack(self.index, self.flags, self.desc, self.used, self.avail, self.log)

    @classmethod
    def unpack(cls, data: bytes) -> VringAddr:
        _expect(data, _VRING_ADDR.size, "vring address")
        return cls(*_VRING_ADDR.unpack(data))


@dataclass(frozen=True, slots=True)
class MemRegion:
    """One guest RAM region; its fd travels in the message's ancillary data."""

    gpa: int
    size: int
    uaddr: int
    mmap_offset: int

    SIZE: ClassVar[int] = _MEM_REGION.size

    def pack(self) -> bytes:
        return _MEM_REGION.pack(self.gpa, self.size, self.uaddr, self.mmap_offset)

    @classmethod
    def unpack(cls, data: bytes) -> MemRegion:
        _expect(data, _MEM_REGION.size, "memory region")
        return cls(*_MEM_REGION.unpack(data))


@dataclass(frozen=True, slots=True)
class MemTable:
    """SET_MEM_TABLE: u32 nregions, u32 padding, then exactly nregions regions."""

    regions: tuple[MemRegion, ...]

    def pack(self) -> bytes:
        if len(self.regions) > MEM_TABLE_MAX_REGIONS:
            raise ValueError(f"{len(self.regions)} regions, at most {MEM_TABLE_MAX_REGIONS}")
        head = _MEM_TABLE_HEAD.pack(len(self.regions), 0)
        return head + b"".join(r.pack() for r in self.regions)

    @classmethod
    def unpack(cls, data: bytes) -> MemTable:
        if len(data) < _MEM_TABLE_HEAD.size:
            raise _Invalid(f"memory table payload is {len(data)} bytes, too short")
        nregions, _ = _MEM_TABLE_HEAD.unpack_from(data)
        if nregions > MEM_TABLE_MAX_REGIONS:
            raise _Invalid(f"memory table has {nregions} regions, at most {MEM_TABLE_MAX_REGIONS}")
        _expect(data, _MEM_TABLE_HEAD.size + nregions * MemRegion.SIZE, "memory table")
        body = data[_MEM_TABLE_HEAD.size :]
        return cls(
            tuple(
                MemRegion(*_MEM_REGION.unpack_from(body, i * MemRegion.SIZE))
                for i in range(nregions)
            )
        )


@dataclass(frozen=True, slots=True)
class MemRegionMsg:
    """ADD_MEM_REG / REM_MEM_REG: u64 padding, then one region."""

    region: MemRegion

    def pack(self) -> bytes:
        return _MEM_REG_PAD.pack(0) + self.region.pack()

    @classmethod
    def unpack(cls, data: bytes) -> MemRegionMsg:
        _expect(data, _MEM_REG_PAD.size + MemRegion.SIZE, "memory region message")
        return cls(MemRegion(*_MEM_REGION.unpack_from(data, _MEM_REG_PAD.size)))


@dataclass(frozen=True, slots=True)
class Config:
    """GET/SET_CONFIG: u32 offset, u32 size, u32 flags, then ``size`` bytes of config space.

    ``size`` is kept apart from ``data`` because it is what the wire says; the
    codec insists they agree, so a consumer may trust either.
    """

    offset: int
    size: int
    flags: int
    data: bytes

    def pack(self) -> bytes:
        if self.size != len(self.data) or self.size > CONFIG_SPACE_MAX:
            raise ValueError(f"config size {self.size} with {len(self.data)} bytes of data")
        return _CONFIG_HEAD.pack(self.offset, self.size, self.flags) + bytes(self.data)

    @classmethod
    def unpack(cls, data: bytes) -> Config:
        if len(data) < _CONFIG_HEAD.size:
            raise _Invalid(f"config payload is {len(data)} bytes, too short")
        offset, size, flags = _CONFIG_HEAD.unpack_from(data)
        if size > CONFIG_SPACE_MAX:
            raise _Invalid(f"config size {size} exceeds {CONFIG_SPACE_MAX}")
        _expect(data, _CONFIG_HEAD.size + size, "config")
        return cls(offset, size, flags, bytes(data[_CONFIG_HEAD.size :]))


@dataclass(frozen=True, slots=True)
class Log:
    """SET_LOG_BASE as QEMU really sends it: mmap size and offset of the log fd.

    The spec's table says u64, but QEMU always sends this 16-byte form; both decode.
    """

    mmap_size: int
    mmap_offset: int

    def pack(self) -> bytes:
        return _LOG.pack(self.mmap_size, self.mmap_offset)

    @classmethod
    def unpack(cls, data: bytes) -> Log:
        _expect(data, _LOG.size, "log")
        return cls(*_LOG.unpack(data))


@dataclass(frozen=True, slots=True)
class Inflight:
    """GET/SET_INFLIGHT_FD: the inflight tracking area (its fd travels beside).

    QEMU sends its C struct as is, so the two u16 fields are followed by 4
    bytes of padding: 24 bytes on the wire, and QEMU checks that size in the
    reply. A zero ``mmap_size`` in a GET reply means "no area".
    """

    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int

    def pack(self) -> bytes:
        return _INFLIGHT.pack(self.mmap_size, self.mmap_offset, self.num_queues, self.queue_size)

    @classmethod
    def unpack(cls, data: bytes) -> Inflight:
        _expect(data, _INFLIGHT.size, "inflight")
        return cls(*_INFLIGHT.unpack(data))


@dataclass(frozen=True, slots=True)
class Raw:
    """The undecoded payload of a request this codec has no layout for."""

    data: bytes

    def pack(self) -> bytes:
        return bytes(self.data)


Payload = (
    Empty | U64 | VringState | VringAddr | MemTable | MemRegionMsg | Config | Log | Inflight | Raw
)


def _log_base(data: bytes) -> Payload:
    if len(data) == _U64.size:
        return U64.unpack(data)
    if len(data) == _LOG.size:
        return Log.unpack(data)
    raise _Invalid(f"log base payload is {len(data)} bytes, expected 8 or 16")


_Decoder = Callable[[bytes], Payload]

#: Payload layout of each request the front-end sends.
_REQUESTS: dict[int, _Decoder] = {
    **dict.fromkeys(
        (
            Request.GET_FEATURES,
            Request.GET_PROTOCOL_FEATURES,
            Request.GET_QUEUE_NUM,
            Request.GET_MAX_MEM_SLOTS,
            Request.GET_STATUS,
            Request.SET_OWNER,
            Request.RESET_OWNER,
            Request.RESET_DEVICE,
            Request.SET_BACKEND_REQ_FD,
        ),
        Empty.unpack,
    ),
    **dict.fromkeys(
        (
            Request.SET_FEATURES,
            Request.SET_PROTOCOL_FEATURES,
            Request.SET_VRING_KICK,
            Request.SET_VRING_CALL,
            Request.SET_VRING_ERR,
            Request.SET_STATUS,
        ),
        U64.unpack,
    ),
    **dict.fromkeys(
        (
            Request.SET_VRING_NUM,
            Request.SET_VRING_BASE,
            Request.GET_VRING_BASE,
            Request.SET_VRING_ENABLE,
            Request.SET_VRING_ENDIAN,
            Request.VRING_KICK,
        ),
        VringState.unpack,
    ),
    Request.SET_LOG_BASE: _log_base,
    Request.SET_VRING_ADDR: VringAddr.unpack,
    Request.SET_MEM_TABLE: MemTable.unpack,
    Request.ADD_MEM_REG: MemRegionMsg.unpack,
    Request.REM_MEM_REG: MemRegionMsg.unpack,
    Request.GET_CONFIG: Config.unpack,
    Request.SET_CONFIG: Config.unpack,
    Request.GET_INFLIGHT_FD: Inflight.unpack,
    Request.SET_INFLIGHT_FD: Inflight.unpack,
}

#: Replies whose layout is not the REPLY_ACK u64 every other known request gets.
_REPLIES: dict[int, _Decoder] = {
    Request.GET_VRING_BASE: VringState.unpack,
    Request.GET_CONFIG: Config.unpack,
    Request.GET_INFLIGHT_FD: Inflight.unpack,
}


# -- messages ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Message:
    """One decoded message. Whoever receives it owns (and must close) ``fds``."""

    request: int
    flags: int
    payload: Payload
    fds: tuple[int, ...] = ()

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & FLAG_REPLY)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)


@dataclass(frozen=True, slots=True)
class Malformed:
    """A well-framed message whose payload made no sense; its fds still need closing."""

    request: int
    flags: int
    reason: str
    fds: tuple[int, ...]


def _code(request: int) -> int:
    """Known codes become Request members, so logs and reprs show names."""
    try:
        return Request(request)
    except ValueError:
        return request


def decode(
    request: int, flags: int, payload: bytes, fds: Sequence[int] = ()
) -> Message | Malformed:
    """Type one framed message's payload by (request, REPLY flag); never raises."""
    request, fds = _code(request), tuple(fds)
    if len(fds) > MAX_FDS:
        return Malformed(request, flags, f"{len(fds)} fds, at most {MAX_FDS}", fds)
    decoder: _Decoder | None
    if flags & FLAG_REPLY:
        known = isinstance(request, Request)
        decoder = _REPLIES.get(request, U64.unpack if known else None)
    else:
        decoder = _REQUESTS.get(request)
    if decoder is None:
        return Message(request, flags, Raw(bytes(payload)), fds)
    try:
        return Message(request, flags, decoder(bytes(payload)), fds)
    except _Invalid as e:
        return Malformed(request, flags, str(e), fds)


def encode(msg: Message) -> bytes:
    """Header plus payload; the caller sends ``msg.fds`` beside the first byte.

    Raises ValueError for a message the peer could not accept (a field out of
    range, a payload over MAX_PAYLOAD, more than MAX_FDS fds).
    """
    if len(msg.fds) > MAX_FDS:
        raise ValueError(f"{len(msg.fds)} fds, at most {MAX_FDS}")
    try:
        body = msg.payload.pack()
        if len(body) > MAX_PAYLOAD:
            raise ValueError(f"payload of {len(body)} bytes exceeds {MAX_PAYLOAD}")
        return _HEADER.pack(msg.request, msg.flags, len(body)) + body
    except struct.error as e:
        raise ValueError(f"cannot encode {msg!r}: {e}") from None


_EMPTY = Empty()


def request(
    req: int, payload: Payload = _EMPTY, *, need_reply: bool = False, fds: Sequence[int] = ()
) -> Message:
    """A front-end request, version 1, optionally asking for a REPLY_ACK."""
    flags = FLAG_VERSION | (FLAG_NEED_REPLY if need_reply else 0)
    return Message(_code(req), flags, payload, tuple(fds))


def reply(to: Message, payload: Payload, *, fds: Sequence[int] = ()) -> Message:
    """The back-end's answer to ``to``: same request code, version 1, REPLY set."""
    return Message(to.request, FLAG_VERSION | FLAG_REPLY, payload, tuple(fds))


# -- stream reassembly ---------------------------------------------------------


class MessageReader:
    """Reassembles messages from stream bytes and the fds received beside them.

    Fd attribution: fds handed to :meth:`feed` are placed at the stream position
    of the first byte fed with them, and a message takes every pending fd placed
    before the end of its header. QEMU sends each message with one sendmsg and
    its fds ride with the header's first byte, so this matches however the
    bytes were split across reads; fds that arrive with payload bytes only go to
    the next message. Until a message takes them, the reader owns the fds:
    :meth:`close` closes those still pending (after a ProtocolError, or when
    the peer hangs up mid-message).
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._base = 0  # stream offset of _buf[0]
        self._fds: deque[tuple[int, int]] = deque()  # (stream offset, fd)
        self._error: ProtocolError | None = None
        self._closed = False

    def feed(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Append received bytes and the fds that came with them (taking ownership)."""
        if self._closed:
            _close_all(fds)
            return
        at = self._base + len(self._buf)
        self._fds.extend((at, fd) for fd in fds)
        if self._error is None:
            self._buf += data

    def next(self) -> Message | Malformed | None:
        """The next complete message, or None until more bytes arrive.

        Raises ProtocolError if the header is unusable (wrong version, size over
        MAX_PAYLOAD); the stream cannot be resynchronised, so every later call
        raises it again.
        """
        if self._error is not None:
            raise self._error
        if len(self._buf) < HEADER_SIZE:
            return None
        req, flags, size = _HEADER.unpack_from(self._buf)
        if flags & VERSION_MASK != FLAG_VERSION:
            self._fail(f"request {req}: version {flags & VERSION_MASK}, expected 1")
        if size > MAX_PAYLOAD:
            self._fail(f"request {req}: payload of {size} bytes exceeds {MAX_PAYLOAD}")
        end = HEADER_SIZE + size
        if len(self._buf) < end:
            return None
        header_end = self._base + HEADER_SIZE
        fds: list[int] = []
        while self._fds and self._fds[0][0] < header_end:
            fds.append(self._fds.popleft()[1])
        payload = bytes(self._buf[HEADER_SIZE:end])
        del self._buf[:end]
        self._base += end
        return decode(req, flags, payload, fds)

    def _fail(self, reason: str) -> None:
        self._error = ProtocolError(reason)
        self._buf.clear()
        raise self._error

    @property
    def pending_fds(self) -> tuple[int, ...]:
        """Fds fed but not yet handed out with a message."""
        return tuple(fd for _, fd in self._fds)

    def close(self) -> None:
        """Close every fd still pending; later feeds close their fds at once."""
        self._closed = True
        self._buf.clear()
        fds = self.pending_fds
        self._fds.clear()
        _close_all(fds)


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


#: recvmsg ancillary buffer size that holds the most fds one message may carry.
ANCILLARY_SPACE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)


def pack_fds(fds: Sequence[int]) -> list[tuple[int, int, bytes]]:
    """The ancillary data (for sendmsg) that passes ``fds`` as one SCM_RIGHTS message."""
    if not fds:
        return []
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]


def unpack_fds(ancdata: Sequence[tuple[int, int, bytes]]) -> list[int]:
    """The fds an SCM_RIGHTS control message carried (recvmsg's ancdata), in order.

    Pure: both I/O shells (server and client) hand what recvmsg returned here.
    """
    fds: list[int] = []
    for level, kind, cdata in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(cdata[: len(cdata) - len(cdata) % arr.itemsize])
            fds.extend(arr)
    return fds
