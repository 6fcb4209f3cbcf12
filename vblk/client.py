"""A userspace virtio-blk driver speaking vhost-user as the frontend (QEMU's role).

``connect()`` shares a memfd with the backend, lays split rings and request
headers out in it, and hands back a :class:`Device`. Requests are built here
and executed by whatever backend is on the other end (``vblk serve``,
qemu-storage-daemon, SPDK); the ring code is the same ``vblk.virtio`` the
backend uses, seen from the driver's side.

Two levels of API:

* blocking calls on :class:`Device` (``read``, ``write``, ``flush``, ...):
  thread-safe, one request in flight per queue, arguments checked locally;
* :class:`Queue`, a ring driven by one thread at a time: ``submit_*`` many
  requests, ``kick()`` once, ``wait()`` for the call eventfd, ``reap()``
  completions. Data lives in :class:`Buffer` objects allocated from the
  shared region, so reads land where the caller looks (zero copy).

Offsets and lengths are in bytes; the wire speaks 512-byte sectors.
"""

from __future__ import annotations

import array
import ctypes
import errno
import itertools
import logging
import mmap
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from vblk.blk.config import CONFIG_SIZE, WRITEBACK_OFFSET, BlkConfig
from vblk.blk.defs import (
    HEADER_SIZE,
    ID_BYTES,
    SECTOR_SHIFT,
    SECTOR_SIZE,
    SEGMENT_SIZE,
    WRITE_ZEROES_FLAG_UNMAP,
    Feature,
    ReqType,
    Status,
)
from vblk.errors import ProtocolError, VblkError
from vblk.vhost_user import frontend
from vblk.vhost_user.codec import (
    ANCILLARY_SPACE,
    U64,
    Config,
    Empty,
    Malformed,
    MemRegion,
    MemTable,
    Message,
    MessageReader,
    Payload,
    VringAddr,
    VringState,
    encode,
    request,
    unpack_fds,
)
from vblk.vhost_user.defs import HEADER_SIZE as MSG_HEADER_SIZE
from vblk.vhost_user.defs import ProtocolFeature, Request
from vblk.virtio import defs as vdefs
from vblk.virtio.driver import DriverQueue, QueueFullError

__all__ = [
    "Buffer",
    "ClientTimeout",
    "Device",
    "DeviceIOError",
    "Disconnected",
    "Queue",
    "QueueFullError",
    "RawResult",
    "RequestRing",
    "UnsupportedRequest",
    "VirtioBlkError",
    "connect",
]

log = logging.getLogger(__name__)

#: Guest-physical base of the shared region. Any value works as long as the
#: descriptors agree with SET_MEM_TABLE; 4 GiB keeps it clear of zero.
GPA_BASE = 0x1_0000_0000
DEFAULT_TIMEOUT = 30.0
DEFAULT_MEM_SIZE = 64 << 20
#: Per-request area: 16-byte header, then the status byte, padded.
SLOT_BYTES = 32
_STATUS_OFF = HEADER_SIZE
_STATUS_UNSET = 0xFF
_PAGE = mmap.PAGESIZE
#: Largest data payload of one request the blocking API sends; bigger calls are split.
MAX_REQUEST_BYTES = 1 << 20

_HEADER = struct.Struct("<IIQ")
_SEGMENT = struct.Struct("<QII")
_EMPTY = Empty()


# -- errors ---------------------------------------------------------------------


class VirtioBlkError(VblkError, OSError):
    """The device completed a request with a status other than OK."""

    def __init__(self, status: int, what: str) -> None:
        try:
            name = Status(status).name
        except ValueError:
            name = f"status {status}"
        code = errno.EOPNOTSUPP if status == Status.UNSUPP else errno.EIO
        super().__init__(code, f"{what}: {name}")
        self.status = status

    def __str__(self) -> str:
        return str(self.strerror)

    @staticmethod
    def for_status(status: int, what: str) -> VirtioBlkError:
        if status == Status.IOERR:
            return DeviceIOError(status, what)
        if status == Status.UNSUPP:
            return UnsupportedRequest(status, what)
        return VirtioBlkError(status, what)


class DeviceIOError(VirtioBlkError):
    """VIRTIO_BLK_S_IOERR: the request failed (bad range, read-only, media error)."""


class UnsupportedRequest(VirtioBlkError):
    """VIRTIO_BLK_S_UNSUPP: the device does not implement this request type."""


class Disconnected(ProtocolError, ConnectionError):
    """The backend closed the control socket."""


class ClientTimeout(VblkError, TimeoutError):
    """The backend did not answer in time; the message names what was awaited."""


# -- shared memory ----------------------------------------------------------------


class Buffer:
    """A piece of the shared region: ``view`` for Python, ``gpa`` for descriptors."""

    __slots__ = ("_alloc", "gpa", "offset", "size", "view")

    def __init__(self, alloc: Allocator | None, offset: int, view: memoryview) -> None:
        self._alloc = alloc
        self.offset = offset
        self.gpa = GPA_BASE + offset
        self.size = len(view)
        self.view = view

    def __len__(self) -> int:
        return self.size

    def free(self) -> None:
        """Give the space back; the view must not be used afterwards."""
        if self._alloc is not None:
            self._alloc.free(self.offset, self.size)
            self._alloc = None
            self.view.release()

    def __enter__(self) -> Buffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.free()


class Allocator:
    """First-fit allocator over a byte range, coalescing on free.

    Requests are long-lived (bench slots) or short (one blocking call), so a
    sorted free list is plenty; it is thread-safe for the blocking API.
    """

    def __init__(self, start: int, end: int, align: int = 4096) -> None:
        self.align = align
        start = -(-start // align) * align
        self._free: list[list[int]] = [[start, end - start]] if end > start else []
        self._lock = threading.Lock()
        self.capacity = max(0, end - start)

    def alloc(self, size: int) -> int:
        if size <= 0:
            raise ValueError(f"cannot allocate {size} bytes")
        size = -(-size // self.align) * self.align
        with self._lock:
            for i, (start, length) in enumerate(self._free):
                if length >= size:
                    if length == size:
                        del self._free[i]
                    else:
                        self._free[i] = [start + size, length - size]
                    return start
        raise MemoryError(
            f"shared region exhausted: no {size} contiguous bytes free "
            f"(pass a larger mem_size to connect())"
        )

    def free(self, start: int, size: int) -> None:
        size = -(-size // self.align) * self.align
        with self._lock:
            fl = self._free
            lo, hi = 0, len(fl)
            while lo < hi:
                mid = (lo + hi) // 2
                if fl[mid][0] < start:
                    lo = mid + 1
                else:
                    hi = mid
            fl.insert(lo, [start, size])
            if lo + 1 < len(fl) and start + size == fl[lo + 1][0]:
                fl[lo][1] += fl[lo + 1][1]
                del fl[lo + 1]
            if lo > 0 and fl[lo - 1][0] + fl[lo - 1][1] == start:
                fl[lo - 1][1] += fl[lo][1]
                del fl[lo]

    @property
    def free_bytes(self) -> int:
        with self._lock:
            return sum(length for _, length in self._free)


@dataclass(frozen=True)
class RawResult:
    """What the device answered to a raw request: status, written length, IN data."""

    status: int
    written: int
    data: bytes


# -- one virtqueue ------------------------------------------------------------------


class RequestRing:
    """The sans-IO half of a queue: request slots over a :class:`DriverQueue`.

    Each request gets a slot (16-byte header + status byte) in the shared
    region, so nothing is allocated per I/O. Kicking and waiting are the
    :class:`Queue`'s business; tests drive this half directly against a
    DeviceQueue over the same bytes.
    """

    def __init__(
        self,
        size: int,
        ring: memoryview,
        slots: memoryview,
        slots_gpa: int,
        *,
        event_idx: bool,
        size_max: int = 0,
    ) -> None:
        layout = vdefs.ring_layout(size)
        self.size = size
        self.ring = DriverQueue(size, *layout.views(ring), event_idx=event_idx)
        self._slots = slots
        self._slots_gpa = slots_gpa
        self._free_slots = list(range(size - 1, -1, -1))
        self._slot_of = [0] * size  # descriptor head -> slot
        self._tag_of: list[object] = [None] * size  # slot -> caller's tag
        self.in_flight = 0
        self._size_max = size_max
        self.index = 0

    def _split(self, gpa: int, length: int) -> list[tuple[int, int]]:
        m = self._size_max
        if not m or length <= m:
            return [(gpa, length)]
        return [(gpa + o, min(m, length - o)) for o in range(0, length, m)]

    def submit(
        self,
        rtype: int,
        sector: int,
        out: Sequence[tuple[int, int]] = (),
        in_: Sequence[tuple[int, int]] = (),
        tag: object = None,
    ) -> None:
        """Queue one request: header + ``out`` (device-readable) + ``in_`` + status.

        ``out``/``in_`` are (gpa, length) pairs inside the shared region. No
        checks: this is what ``check=False`` and the bench use. The device may
        see it at once; call ``kick()`` after a batch.
        """
        if not self._free_slots:
            raise QueueFullError(f"queue {self.index}: all {self.size} request slots in use")
        slot = self._free_slots.pop()
        off = slot * SLOT_BYTES
        slots = self._slots
        _HEADER.pack_into(slots, off, rtype, 0, sector)
        slots[off + _STATUS_OFF] = _STATUS_UNSET
        gpa = self._slots_gpa + off
        try:
            head = self.ring.add([(gpa, HEADER_SIZE), *out], [*in_, (gpa + _STATUS_OFF, 1)])
        except BaseException:
            self._free_slots.append(slot)
            raise
        self._slot_of[head] = slot
        self._tag_of[slot] = tag
        self.in_flight += 1

    def submit_read(self, sector: int, gpa: int, length: int, tag: object = None) -> None:
        self.submit(ReqType.IN, sector, (), self._split(gpa, length), tag)

    def submit_write(self, sector: int, gpa: int, length: int, tag: object = None) -> None:
        self.submit(ReqType.OUT, sector, self._split(gpa, length), (), tag)

    def reap(self, out: list[tuple[Any, int]]) -> int:
        """Append (tag, status) for every completed request; returns how many.

        A status byte the device never wrote reads as 0xFF: the caller treats
        it as an error like any other non-OK status.
        """
        n = 0
        pop = self.ring.pop_used
        slots = self._slots
        while (used := pop()) is not None:
            slot = self._slot_of[used[0]]
            out.append((self._tag_of[slot], slots[slot * SLOT_BYTES + _STATUS_OFF]))
            self._tag_of[slot] = None
            self._free_slots.append(slot)
            n += 1
        self.in_flight -= n
        return n


class Queue(RequestRing):
    """One virtqueue of a connected device: submit many, kick once, wait, reap.

    Not thread-safe: one thread drives a queue at a time. The Device's
    blocking calls take :attr:`lock`; hold it too when driving a queue by
    hand alongside them.
    """

    def __init__(
        self,
        dev: Device,
        index: int,
        size: int,
        ring: memoryview,
        slots: memoryview,
        slots_gpa: int,
        *,
        event_idx: bool,
    ) -> None:
        super().__init__(size, ring, slots, slots_gpa, event_idx=event_idx, size_max=dev._size_max)
        self.dev = dev
        self.index = index
        self.lock = threading.Lock()
        self.kick_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.call_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._poller = select.poll()
        self._poller.register(self.call_fd, select.POLLIN)
        self._poller.register(dev._sock.fileno(), select.POLLIN)
        self.kicks = 0
        self.waits = 0

    def kick(self) -> None:
        """Notify the device of new requests, unless it said it is polling anyway."""
        if self.ring.kick_needed():
            self.kicks += 1
            os.eventfd_write(self.kick_fd, 1)

    def wait(self, timeout: float | None = DEFAULT_TIMEOUT) -> bool:
        """Sleep until the device signals a completion; False if it is already there.

        Raises ClientTimeout after ``timeout`` seconds and Disconnected if the
        backend hangs up meanwhile: a dead backend must not hang the caller.
        """
        if self.ring.enable_interrupts():
            self.ring.disable_interrupts()
            return False
        self.waits += 1
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                ms = None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
                events = self._poller.poll(ms)
                if not events:
                    raise ClientTimeout(
                        f"queue {self.index}: no completion within {timeout:g}s "
                        f"({self.in_flight} request(s) in flight)"
                    )
                for fd, _ in events:
                    if fd == self.call_fd:
                        try:
                            os.eventfd_read(self.call_fd)
                        except BlockingIOError:
                            continue
                        return True
                self.dev._check_alive()
        finally:
            self.ring.disable_interrupts()

    def complete(self, out: list[tuple[Any, int]], timeout: float | None = DEFAULT_TIMEOUT) -> int:
        """Reap, waiting first if nothing completed; at least one unless nothing is in flight."""
        while self.in_flight:
            n = self.reap(out)
            if n:
                return n
            self.wait(timeout)
        return 0

    def close(self) -> None:
        for fd in (self.kick_fd, self.call_fd):
            try:
                os.close(fd)
            except OSError:
                pass


# -- the device -----------------------------------------------------------------------


class Device:
    """A connected virtio-blk device. Use :func:`connect` to make one."""

    capacity: int
    """Size in bytes (``sectors * 512``)."""

    def __init__(
        self,
        path: str,
        *,
        num_queues: int = 1,
        queue_size: int = 256,
        mem_size: int = DEFAULT_MEM_SIZE,
        timeout: float = DEFAULT_TIMEOUT,
        event_idx: bool = True,
    ) -> None:
        if num_queues < 1:
            raise ValueError(f"num_queues must be at least 1, got {num_queues}")
        if not vdefs.is_queue_size(queue_size):
            raise ValueError(
                f"queue_size must be a power of two in 1..{vdefs.MAX_QUEUE_SIZE}, got {queue_size}"
            )
        self.path = path
        self.timeout = timeout
        self.queue_size = queue_size
        self.queues: list[Queue] = []
        self._ctl_lock = threading.Lock()
        self._reader = MessageReader()
        self._closed = False
        self._mm: mmap.mmap | None = None
        self._memfd = -1
        self._rr = itertools.count()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._sock.settimeout(timeout)
        try:
            try:
                self._sock.connect(path)
            except TimeoutError:
                raise ClientTimeout(f"connecting to {path} took over {timeout:g}s") from None
            except OSError as e:
                raise Disconnected(f"cannot connect to {path}: {e.strerror}") from None
            try:
                self._negotiate(num_queues, event_idx)
            except Disconnected as e:
                # vblk serve hangs up at once on a frontend that comes second.
                raise Disconnected(
                    f"{path}: backend hung up during negotiation ({e}); "
                    "is another frontend already attached?"
                ) from None
            self._setup_memory(mem_size, num_queues, queue_size)
            self._start_queues(event_idx)
        except BaseException:
            self._teardown(stop_rings=False)
            raise

    # -- control channel ------------------------------------------------------------

    def _send(self, msg: Message) -> None:
        data = encode(msg)
        try:
            if msg.fds:
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", msg.fds).tobytes())]
                sent = self._sock.sendmsg([data], anc)
                if sent < len(data):
                    self._sock.sendall(data[sent:])
            else:
                self._sock.sendall(data)
        except TimeoutError:
            raise ClientTimeout(
                f"sending {_req_name(msg.request)} took over {self.timeout:g}s"
            ) from None
        except (BrokenPipeError, ConnectionResetError) as e:
            raise Disconnected(
                f"backend hung up while sending {_req_name(msg.request)}: {e.strerror}"
            ) from None

    def _recv_exact(self, n: int, what: str) -> tuple[bytes, list[int]]:
        buf = bytearray()
        fds: list[int] = []
        while len(buf) < n:
            try:
                data, anc, _, _ = self._sock.recvmsg(
                    n - len(buf), ANCILLARY_SPACE, socket.MSG_CMSG_CLOEXEC
                )
            except TimeoutError:
                raise ClientTimeout(f"no reply to {what} within {self.timeout:g}s") from None
            except ConnectionResetError:
                data, anc = b"", []
            fds += unpack_fds(anc)
            if not data:
                for fd in fds:
                    os.close(fd)
                raise Disconnected(f"backend closed the connection (awaiting reply to {what})")
            buf += data
        return bytes(buf), fds

    def _call(self, msg: Message, *, reply: bool, empty_ok: bool = False) -> Payload | None:
        """Send ``msg``; with ``reply`` (or need_reply) read and check the answer.

        ``empty_ok``: a reply with no payload means "refused" (libvhost-user's
        way of failing GET_CONFIG) and returns None instead of raising.
        """
        name = _req_name(msg.request)
        with self._ctl_lock:
            self._send(msg)
            if not reply and not msg.need_reply:
                return None
            header, fds = self._recv_exact(MSG_HEADER_SIZE, name)
            size = int.from_bytes(header[8:12], "little")
            payload = b""
            if 0 < size <= 1 << 16:
                payload, more = self._recv_exact(size, name)
                fds += more
            self._reader.feed(header + payload, fds)
            answer = self._reader.next()
        for fd in answer.fds if answer is not None else fds:
            os.close(fd)  # the client expects no fds in replies
        if answer is None:
            raise ProtocolError(f"incomplete reply to {name} ({size} byte payload)")
        if empty_ok and size == 0 and answer.request == msg.request:
            return None
        if isinstance(answer, Malformed):
            raise ProtocolError(f"malformed reply to {name}: {answer.reason}")
        if not answer.is_reply or answer.request != msg.request:
            raise ProtocolError(
                f"expected a reply to {name}, got {_req_name(answer.request)} "
                f"(flags {answer.flags:#x})"
            )
        if msg.need_reply and not reply:
            code = answer.payload.value if isinstance(answer.payload, U64) else None
            if code != 0:
                raise ProtocolError(f"backend rejected {name} (REPLY_ACK {code})")
        return answer.payload

    def _get_u64(self, req: Request) -> int:
        payload = self._call(request(req), reply=True)
        if not isinstance(payload, U64):
            raise ProtocolError(f"reply to {_req_name(req)} is not a u64: {payload!r}")
        return payload.value

    def _set(self, req: Request, payload: Payload = _EMPTY, fds: tuple[int, ...] = ()) -> None:
        """A SET_* message; acked when REPLY_ACK is negotiated, so errors surface here."""
        self._call(request(req, payload, need_reply=self._reply_ack, fds=fds), reply=False)

    def _check_alive(self) -> None:
        """Raise Disconnected if the control socket shows EOF (called when it polls readable)."""
        try:
            data = self._sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError as e:
            raise Disconnected(f"backend connection failed: {e.strerror}") from None
        if not data:
            raise Disconnected("backend closed the connection")
        if self._ctl_lock.locked():
            time.sleep(0.001)  # a control reply (close() from another thread) is arriving
            return
        raise ProtocolError("backend sent an unsolicited message on the control socket")

    # -- setup ------------------------------------------------------------------------

    def _negotiate(self, num_queues: int, event_idx: bool) -> None:
        self._reply_ack = False
        self.device_features = self._get_u64(Request.GET_FEATURES)
        features = frontend.select_features(self.device_features, event_idx=event_idx)
        self.device_protocol_features = self._get_u64(Request.GET_PROTOCOL_FEATURES)
        self.protocol_features = frontend.select_protocol_features(self.device_protocol_features)
        self._call(request(Request.SET_PROTOCOL_FEATURES, U64(self.protocol_features)), reply=False)
        self._reply_ack = bool(self.protocol_features >> ProtocolFeature.REPLY_ACK & 1)
        self.max_queues = 1
        if self.protocol_features >> ProtocolFeature.MQ & 1:
            self.max_queues = self._get_u64(Request.GET_QUEUE_NUM)
        self._set(Request.SET_OWNER)
        self.config = self._read_config()
        if features >> Feature.MQ & 1 and self.config.num_queues:
            self.max_queues = min(self.max_queues, self.config.num_queues)
        elif not features >> Feature.MQ & 1:
            self.max_queues = 1
        if num_queues > self.max_queues:
            raise ProtocolError(
                f"{num_queues} queues requested, the device offers {self.max_queues}"
            )
        self.features = features
        self.num_queues = num_queues
        self._set(Request.SET_FEATURES, U64(features))
        cfg = self.config
        self.sectors = cfg.capacity
        self.capacity = cfg.capacity << SECTOR_SHIFT
        self.block_size = (
            cfg.blk_size if self.has(Feature.BLK_SIZE) and cfg.blk_size else SECTOR_SIZE
        )
        self.read_only = self.has(Feature.RO)
        self._size_max = cfg.size_max if self.has(Feature.SIZE_MAX) else 0
        self.seg_max = cfg.seg_max if self.has(Feature.SEG_MAX) else 0
        self.max_discard_sectors = cfg.max_discard_sectors if self.has(Feature.DISCARD) else 0
        self.max_discard_seg = cfg.max_discard_seg if self.has(Feature.DISCARD) else 0
        self.discard_alignment = cfg.discard_sector_alignment if self.has(Feature.DISCARD) else 0
        wz = self.has(Feature.WRITE_ZEROES)
        self.max_write_zeroes_sectors = cfg.max_write_zeroes_sectors if wz else 0
        self.max_write_zeroes_seg = cfg.max_write_zeroes_seg if wz else 0
        self.write_zeroes_may_unmap = bool(cfg.write_zeroes_may_unmap) if wz else False

    def _read_config(self) -> BlkConfig:
        """GET_CONFIG the whole blk config; older backends know a shorter struct.

        libvhost-user backends answer with an empty payload when asked for
        more than their ``struct virtio_blk_config``, so step down through the
        sizes the struct had before secure erase (60) and before discard (36).
        """
        for size in (CONFIG_SIZE, 60, 36):
            payload = self._call(
                request(Request.GET_CONFIG, Config(0, size, 0, bytes(size))),
                reply=True,
                empty_ok=True,
            )
            if isinstance(payload, Config) and payload.size >= 8:
                return BlkConfig.unpack(payload.data)
        raise ProtocolError("backend refused GET_CONFIG of the virtio-blk config space")

    def _setup_memory(self, mem_size: int, num_queues: int, queue_size: int) -> None:
        ring_bytes = _round_up(vdefs.ring_layout(queue_size).total, _PAGE)
        slot_bytes = _round_up(queue_size * SLOT_BYTES, _PAGE)
        meta = num_queues * (ring_bytes + slot_bytes)
        size = _round_up(meta + max(mem_size, 1 << 20), 2 << 20)
        self._memfd = os.memfd_create("vblk-client", os.MFD_CLOEXEC)
        os.ftruncate(self._memfd, size)
        self._mm = mmap.mmap(self._memfd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.mem = memoryview(self._mm)
        probe = ctypes.c_char.from_buffer(self._mm)
        self.uaddr_base = ctypes.addressof(probe)
        del probe
        self.mem_size = size
        self._ring_bytes = ring_bytes
        self._slot_bytes = slot_bytes
        self._meta = meta
        self.allocator = Allocator(meta, size)
        region = MemRegion(gpa=GPA_BASE, size=size, uaddr=self.uaddr_base, mmap_offset=0)
        self._set(Request.SET_MEM_TABLE, MemTable((region,)), fds=(self._memfd,))

    def _start_queues(self, event_idx: bool) -> None:
        ev = bool(self.features >> vdefs.VIRTIO_F_RING_EVENT_IDX & 1) and event_idx
        n, rb, sb = self.queue_size, self._ring_bytes, self._slot_bytes
        for i in range(self.num_queues):
            ring_off = i * (rb + sb)
            slots_off = ring_off + rb
            q = Queue(
                self,
                i,
                n,
                self.mem[ring_off : ring_off + rb],
                self.mem[slots_off : slots_off + sb],
                GPA_BASE + slots_off,
                event_idx=ev,
            )
            self.queues.append(q)
            layout = vdefs.ring_layout(n)
            ua = self.uaddr_base + ring_off
            self._set(Request.SET_VRING_NUM, VringState(i, n))
            self._set(Request.SET_VRING_BASE, VringState(i, 0))
            self._set(
                Request.SET_VRING_ADDR,
                VringAddr(i, 0, ua + layout.desc, ua + layout.used, ua + layout.avail, 0),
            )
            self._set(Request.SET_VRING_CALL, U64(i), fds=(q.call_fd,))
            self._set(Request.SET_VRING_KICK, U64(i), fds=(q.kick_fd,))
            self._set(Request.SET_VRING_ENABLE, VringState(i, 1))
        log.debug(
            "connected to %s: %d queue(s) of %d, features %#x",
            self.path,
            self.num_queues,
            n,
            self.features,
        )

    # -- teardown ---------------------------------------------------------------------

    def close(self) -> None:
        """Stop every ring (GET_VRING_BASE), hang up, unmap. Idempotent."""
        if self._closed:
            return
        self._teardown(stop_rings=True)

    def _teardown(self, *, stop_rings: bool) -> None:
        self._closed = True
        if stop_rings:
            try:
                for q in self.queues:
                    self._call(request(Request.GET_VRING_BASE, VringState(q.index, 0)), reply=True)
            except (VblkError, OSError) as e:
                log.debug("stopping rings of %s: %s", self.path, e)
        self._sock.close()
        for q in self.queues:
            q.close()
        self._reader.close()
        if self._memfd >= 0:
            os.close(self._memfd)
            self._memfd = -1
        if self._mm is not None:
            for q in self.queues:
                del q.ring  # its views pin the mapping
                q._slots.release()
            try:
                self.mem.release()
                self._mm.close()
            except BufferError:
                # Buffers the caller still holds keep the mapping; it goes with them.
                log.debug("shared region still referenced; unmapped when released")
            self._mm = None

    def __enter__(self) -> Device:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- properties ---------------------------------------------------------------------

    def has(self, feature: int) -> bool:
        """True if feature bit ``feature`` was negotiated."""
        return bool(self.features >> int(feature) & 1)

    def alloc(self, size: int) -> Buffer:
        """A buffer in the shared region (page aligned), for zero-copy I/O."""
        off = self.allocator.alloc(size)
        return Buffer(self.allocator, off, self.mem[off : off + size])

    # -- blocking API -------------------------------------------------------------------

    def _pick(self) -> Queue:
        """A free queue if any (round robin), else wait for the next in turn."""
        start = next(self._rr)
        n = len(self.queues)
        for i in range(n):
            q = self.queues[(start + i) % n]
            if q.lock.acquire(blocking=False):
                return q
        q = self.queues[start % n]
        q.lock.acquire()
        return q

    def _run(
        self,
        rtype: int,
        sector: int,
        out: Sequence[tuple[int, int]],
        in_: Sequence[tuple[int, int]],
        queue: int | None = None,
    ) -> int:
        """Submit one request and wait for its status (one in flight per queue)."""
        if self._closed:
            raise ValueError("device is closed")
        if queue is None:
            q = self._pick()
        else:
            q = self.queues[queue]
            q.lock.acquire()
        try:
            done: list[tuple[Any, int]] = []
            q.submit(rtype, sector, out, in_, tag=True)
            q.kick()
            while not done:
                q.complete(done, self.timeout)
            return done[0][1]
        finally:
            q.lock.release()

    def _check(self, offset: int, length: int, what: str) -> None:
        if offset < 0 or length < 0:
            raise ValueError(f"{what}: negative offset or length ({offset}, {length})")
        if offset % SECTOR_SIZE or length % SECTOR_SIZE:
            raise ValueError(
                f"{what}: offset {offset} and length {length} must be multiples of {SECTOR_SIZE}"
            )
        if offset + length > self.capacity:
            raise ValueError(
                f"{what}: {length} bytes at {offset} run past the end ({self.capacity} bytes)"
            )

    def _raise(self, status: int, what: str) -> None:
        if status != Status.OK:
            raise VirtioBlkError.for_status(status, what)

    def read_into(
        self, offset: int, buf: Buffer, length: int | None = None, *, check: bool = True
    ) -> None:
        """Read into ``buf`` (from :meth:`alloc`) directly: no copy on our side."""
        self._transfer(ReqType.IN, offset, buf, length, check)

    def write_from(
        self, offset: int, buf: Buffer, length: int | None = None, *, check: bool = True
    ) -> None:
        """Write ``buf`` (from :meth:`alloc`) directly."""
        self._transfer(ReqType.OUT, offset, buf, length, check)

    def _transfer(
        self, rtype: int, offset: int, buf: Buffer, length: int | None, check: bool
    ) -> None:
        """Move ``length`` bytes between ``buf`` and the disk in requests of at most 1 MiB."""
        what = "read" if rtype == ReqType.IN else "write"
        length = buf.size if length is None else length
        if check:
            self._check(offset, length, what)
        if length > buf.size:
            raise ValueError(f"{what} of {length} bytes with a {buf.size} byte buffer")
        split = self.queues[0]._split
        for pos in range(0, length, MAX_REQUEST_BYTES):
            n = min(MAX_REQUEST_BYTES, length - pos)
            segs = split(buf.gpa + pos, n)
            out, in_ = ((), segs) if rtype == ReqType.IN else (segs, ())
            status = self._run(rtype, (offset + pos) >> SECTOR_SHIFT, out, in_)
            self._raise(status, f"{what} of {n} bytes at {offset + pos}")

    def read(self, offset: int, length: int, *, check: bool = True) -> bytes:
        """Read ``length`` bytes at byte ``offset``; both multiples of 512."""
        if check:
            self._check(offset, length, "read")
        if length == 0:
            return b""
        with self.alloc(min(length, MAX_REQUEST_BYTES)) as buf:
            parts = []
            for pos in range(0, length, buf.size):
                n = min(buf.size, length - pos)
                self.read_into(offset + pos, buf, n, check=False)
                parts.append(bytes(buf.view[:n]))
            return b"".join(parts)

    def write(
        self, offset: int, data: bytes | bytearray | memoryview, *, check: bool = True
    ) -> None:
        """Write ``data`` at byte ``offset``; both offset and len(data) multiples of 512."""
        data = memoryview(data).cast("B")
        length = len(data)
        if check:
            self._check(offset, length, "write")
        if length == 0:
            return
        with self.alloc(min(length, MAX_REQUEST_BYTES)) as buf:
            for pos in range(0, length, buf.size):
                n = min(buf.size, length - pos)
                buf.view[:n] = data[pos : pos + n]
                self.write_from(offset + pos, buf, n, check=False)

    def flush(self) -> None:
        """Make completed writes durable (a no-op on devices without FLUSH)."""
        if not self.has(Feature.FLUSH):
            return
        self._raise(self._run(ReqType.FLUSH, 0, (), ()), "flush")

    def set_writeback(self, enabled: bool) -> None:
        """Switch the device's write cache (CONFIG_WCE) on or off.

        With it off (writethrough), every write is durable once it completes,
        without a flush. The config space is read back to confirm the change.
        """
        if not self.has(Feature.CONFIG_WCE):
            raise UnsupportedRequest(
                Status.UNSUPP, "set-writeback: device does not offer CONFIG_WCE"
            )
        self._set(Request.SET_CONFIG, Config(WRITEBACK_OFFSET, 1, 0, bytes([int(enabled)])))
        self.config = self._read_config()
        if bool(self.config.writeback) != enabled:
            raise ProtocolError(f"backend left writeback at {self.config.writeback}")

    def get_id(self) -> str:
        """The device serial (GET_ID), NUL padding stripped."""
        with self.alloc(ID_BYTES) as buf:
            status = self._run(ReqType.GET_ID, 0, (), [(buf.gpa, ID_BYTES)])
            self._raise(status, "get-id")
            return bytes(buf.view[:ID_BYTES]).split(b"\0", 1)[0].decode("utf-8", "replace")

    def _segments(
        self,
        rtype: ReqType,
        feature: Feature,
        offset: int,
        length: int,
        flags: int,
        check: bool,
        max_sectors: int,
    ) -> None:
        what = rtype.name.lower().replace("_", "-")
        if check:
            self._check(offset, length, what)
            if not self.has(feature):
                raise UnsupportedRequest(
                    Status.UNSUPP, f"{what}: device does not offer {feature.name}"
                )
        if length == 0:
            return
        step = (max_sectors << SECTOR_SHIFT) if (check and max_sectors) else length
        with self.alloc(SEGMENT_SIZE) as seg:
            for pos in range(0, length, step):
                n = min(step, length - pos)
                pack_segment(seg.view, offset + pos, n, flags)
                status = self._run(rtype, 0, [(seg.gpa, SEGMENT_SIZE)], ())
                self._raise(status, f"{what} of {n} bytes at {offset + pos}")

    def discard(self, offset: int, length: int, *, check: bool = True) -> None:
        """Tell the device the range is unused (it may deallocate it)."""
        self._segments(
            ReqType.DISCARD, Feature.DISCARD, offset, length, 0, check, self.max_discard_sectors
        )

    def write_zeroes(
        self, offset: int, length: int, unmap: bool = False, *, check: bool = True
    ) -> None:
        """Zero the range; ``unmap`` lets the device deallocate it while doing so."""
        flags = WRITE_ZEROES_FLAG_UNMAP if unmap else 0
        self._segments(
            ReqType.WRITE_ZEROES,
            Feature.WRITE_ZEROES,
            offset,
            length,
            flags,
            check,
            self.max_write_zeroes_sectors,
        )

    def submit_raw(
        self,
        rtype: int,
        sector: int = 0,
        out: bytes = b"",
        in_len: int = 0,
        *,
        queue: int | None = None,
    ) -> RawResult:
        """Send any request unchecked and return the device's answer, never raising on status.

        For tests and diagnostics: out-of-range sectors, unknown types,
        odd lengths all go to the device as given.
        """
        size = max(len(out) + in_len, 1)
        with self.alloc(size) as buf:
            buf.view[: len(out)] = out
            o = [(buf.gpa, len(out))] if out else []
            i = [(buf.gpa + len(out), in_len)] if in_len else []
            status = self._run(rtype, sector, o, i, queue)
            return RawResult(status, 0, bytes(buf.view[len(out) : len(out) + in_len]))

    def info(self) -> dict[str, Any]:
        """Everything ``vblk info`` prints, as plain data."""
        cfg = self.config
        return {
            "socket": self.path,
            "capacity": self.capacity,
            "sectors": self.sectors,
            "block_size": self.block_size,
            "read_only": self.read_only,
            "num_queues": self.num_queues,
            "max_queues": self.max_queues,
            "queue_size": self.queue_size,
            "features": frontend.feature_names(self.features),
            "device_features": frontend.feature_names(self.device_features),
            "protocol_features": frontend.protocol_feature_names(self.protocol_features),
            "device_protocol_features": frontend.protocol_feature_names(
                self.device_protocol_features
            ),
            "config": {
                "capacity": cfg.capacity,
                "size_max": cfg.size_max,
                "seg_max": cfg.seg_max,
                "blk_size": cfg.blk_size,
                "physical_block_exp": cfg.physical_block_exp,
                "alignment_offset": cfg.alignment_offset,
                "min_io_size": cfg.min_io_size,
                "opt_io_size": cfg.opt_io_size,
                "writeback": cfg.writeback,
                "num_queues": cfg.num_queues,
                "max_discard_sectors": cfg.max_discard_sectors,
                "max_discard_seg": cfg.max_discard_seg,
                "discard_sector_alignment": cfg.discard_sector_alignment,
                "max_write_zeroes_sectors": cfg.max_write_zeroes_sectors,
                "max_write_zeroes_seg": cfg.max_write_zeroes_seg,
                "write_zeroes_may_unmap": cfg.write_zeroes_may_unmap,
            },
        }


def connect(
    path: str,
    *,
    num_queues: int = 1,
    queue_size: int = 256,
    mem_size: int = DEFAULT_MEM_SIZE,
    timeout: float = DEFAULT_TIMEOUT,
    event_idx: bool = True,
) -> Device:
    """Connect to the vhost-user-blk backend at ``path`` and start ``num_queues`` rings.

    ``mem_size`` is the data area shared with the backend (buffers come from
    it); ``timeout`` bounds every control reply and completion wait.
    """
    return Device(
        path,
        num_queues=num_queues,
        queue_size=queue_size,
        mem_size=mem_size,
        timeout=timeout,
        event_idx=event_idx,
    )


def pack_segment(view: memoryview, offset: int, length: int, flags: int = 0) -> None:
    """A discard/write-zeroes segment for ``length`` bytes at byte ``offset``."""
    _SEGMENT.pack_into(view, 0, offset >> SECTOR_SHIFT, length >> SECTOR_SHIFT, flags)


def _round_up(n: int, align: int) -> int:
    return -(-n // align) * align


def _req_name(req: int) -> str:
    try:
        return Request(req).name
    except ValueError:
        return f"request {req}"
