"""The backend side of a vhost-user session, as a state machine with no sockets.

``BackendSession.handle`` takes one decoded message and returns the reply to
send, if any. What needs threads (running a queue) is delegated to a
:class:`QueueHost`; mapping memory fds is an injected function, so tests can
drive the whole protocol with bytearrays. Every field the frontend sends is
checked here; a bad one is logged and answered with an error, never raised.

Inflight tracking (GET/SET_INFLIGHT_FD) works the same way: the memfd is
created by an injected function and mapped by another, and each started
queue gets its part of the region (:mod:`vblk.virtio.inflight`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from vblk.blk.config import BlkConfig, min_direct_ring
from vblk.errors import GuestMemoryError, QueueError, VblkError
from vblk.memory import GuestMemory, create_memfd, map_fd, map_sealed
from vblk.vhost_user.backend_channel import BackendChannel
from vblk.vhost_user.codec import (
    U64,
    Config,
    Empty,
    Inflight,
    Malformed,
    MemRegionMsg,
    MemTable,
    Message,
    Payload,
    VringAddr,
    VringState,
    reply,
)
from vblk.vhost_user.defs import (
    FLAG_NEED_REPLY,
    VRING_IDX_MASK,
    VRING_NOFD_MASK,
    ProtocolFeature,
    Request,
)
from vblk.virtio import defs as vdefs
from vblk.virtio.inflight import QueueInflight, queue_region_size, region_size
from vblk.virtio.queue import DeviceQueue

log = logging.getLogger(__name__)

#: Protocol features this backend implements.
PROTOCOL_FEATURES = (
    1 << ProtocolFeature.MQ
    | 1 << ProtocolFeature.REPLY_ACK
    | 1 << ProtocolFeature.CONFIG
    | 1 << ProtocolFeature.CONFIGURE_MEM_SLOTS
    | 1 << ProtocolFeature.INFLIGHT_SHMFD
    | 1 << ProtocolFeature.BACKEND_REQ
)
#: Memory slots offered with CONFIGURE_MEM_SLOTS (libvhost-user offers 32 too).
MAX_MEM_SLOTS = 32
#: Largest ring served unless capped (vblk serve --queue-size): every size the split ring allows.
MAX_QUEUE_SIZE = vdefs.MAX_QUEUE_SIZE

MapRegion = Callable[[int, int, int], tuple[memoryview, Callable[[], None]]]
CreateMemfd = Callable[[int, str], int]


class Device(Protocol):
    """What the session needs of a device model (BlockDevice is one)."""

    @property
    def features(self) -> int: ...

    @property
    def config(self) -> BlkConfig: ...

    def read_config(self, offset: int, size: int) -> bytes | None: ...

    def write_config(self, offset: int, data: bytes) -> bool: ...


class QueueHost(Protocol):
    """The I/O shell's part: run a started queue, stop it (draining in-flight work)."""

    def start_queue(self, vring: Vring) -> None: ...

    def stop_queue(self, vring: Vring) -> None: ...


@dataclass
class Vring:
    """Per-queue state as the frontend configured it."""

    index: int
    num: int = 0
    addr: VringAddr | None = None
    base: int = 0
    kick_fd: int = -1
    call_fd: int = -1
    err_fd: int = -1
    enabled: bool = False
    queue: DeviceQueue | None = None
    #: What the frontend set that the session refused, by request name: while any is
    #: left the ring never runs as configured (it fails every request, see _maybe_start).
    refused: dict[str, str] = field(default_factory=dict)
    #: The ring size the frontend last asked for, accepted or not.
    wanted_num: int = 0
    _call_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def running(self) -> bool:
        return self.queue is not None

    def signal_call(self) -> None:
        """Interrupt the driver; the lock keeps SET_VRING_CALL from closing the fd under us."""
        with self._call_lock:
            if self.call_fd >= 0:
                _signal(self.call_fd)

    def signal_err(self) -> None:
        with self._call_lock:
            if self.err_fd >= 0:
                _signal(self.err_fd)

    def set_call_fd(self, fd: int) -> None:
        with self._call_lock:
            _close(self.call_fd)
            self.call_fd = fd

    def set_err_fd(self, fd: int) -> None:
        with self._call_lock:
            _close(self.err_fd)
            self.err_fd = fd

    def close_fds(self) -> None:
        _close(self.kick_fd)
        self.kick_fd = -1
        self.set_call_fd(-1)
        self.set_err_fd(-1)


def _signal(fd: int) -> None:
    """Add one to a (non-blocking) eventfd; a saturated counter already means "signalled"."""
    try:
        os.eventfd_write(fd, 1)
    except BlockingIOError:
        pass


def _is_eventfd(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
    except OSError:
        return True  # no /proc to ask: trust the frontend, as every backend does


def _close(fd: int) -> None:
    if fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass


class _Reject(Exception):
    """A request the session refuses; the reason is logged and NACKed."""


@dataclass
class _InflightArea:
    """The inflight region the frontend set: one part per queue, end to end."""

    view: memoryview
    unmap: Callable[[], None]
    num_queues: int
    queue_size: int

    def part(self, index: int) -> QueueInflight:
        step = queue_region_size(self.queue_size)
        return QueueInflight(self.view[index * step : (index + 1) * step], self.queue_size)


class BackendSession:
    """One frontend connection's protocol state."""

    def __init__(
        self,
        device: Device,
        host: QueueHost,
        *,
        num_queues: int,
        max_queue_size: int = MAX_QUEUE_SIZE,
        map_region: MapRegion = map_fd,
        create_inflight: CreateMemfd = create_memfd,
        map_inflight: MapRegion = map_sealed,
    ) -> None:
        self.device = device
        self.host = host
        self.num_queues = num_queues
        self.max_queue_size = min(max_queue_size, MAX_QUEUE_SIZE)
        self.map_region = map_region
        self.create_inflight = create_inflight
        self.map_inflight = map_inflight
        self.memory = GuestMemory()
        # Created by the first message naming a queue: unused queues cost nothing.
        self.vrings: dict[int, Vring] = {}
        self.acked_features = 0
        self.acked_protocol_features = 0
        self._enable_all = False  # rings start enabled (no protocol features)
        self.owner = False
        self.inflight: _InflightArea | None = None
        self._offered_fd = -1  # the last GET_INFLIGHT_FD memfd, held until its reply is sent
        self._handlers: dict[int, Callable[[Message], Payload | Message | None]] = {
            Request.GET_FEATURES: self._get_features,
            Request.SET_FEATURES: self._set_features,
            Request.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            Request.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            Request.SET_OWNER: self._set_owner,
            Request.RESET_OWNER: self._reset_owner,
            Request.GET_QUEUE_NUM: self._get_queue_num,
            Request.SET_MEM_TABLE: self._set_mem_table,
            Request.SET_VRING_NUM: self._set_vring_num,
            Request.SET_VRING_ADDR: self._set_vring_addr,
            Request.SET_VRING_BASE: self._set_vring_base,
            Request.GET_VRING_BASE: self._get_vring_base,
            Request.SET_VRING_KICK: self._set_vring_kick,
            Request.SET_VRING_CALL: self._set_vring_call,
            Request.SET_VRING_ERR: self._set_vring_err,
            Request.SET_VRING_ENABLE: self._set_vring_enable,
            Request.GET_CONFIG: self._get_config,
            Request.SET_CONFIG: self._set_config,
            Request.GET_MAX_MEM_SLOTS: self._get_max_mem_slots,
            Request.ADD_MEM_REG: self._add_mem_reg,
            Request.REM_MEM_REG: self._rem_mem_reg,
            Request.GET_INFLIGHT_FD: self._get_inflight_fd,
            Request.SET_INFLIGHT_FD: self._set_inflight_fd,
            Request.SET_BACKEND_REQ_FD: self._set_backend_req_fd,
        }
        self.backend_channel: BackendChannel | None = None
        # fds a handler decided to keep; every other fd of a message is closed.
        self._kept: set[int] = set()

    # -- entry point ----------------------------------------------------------

    def handle(self, msg: Message | Malformed) -> Message | None:
        """Apply one message; returns the reply to send, or None."""
        self._kept = set()
        if log.isEnabledFor(logging.DEBUG):
            detail = msg.reason if isinstance(msg, Malformed) else msg.payload
            log.debug("<- %s %s fds=%d", _name(msg.request), detail, len(msg.fds))
        try:
            if isinstance(msg, Malformed):
                log.warning("malformed %s: %s", _name(msg.request), msg.reason)
                return self._error_reply(msg.request, msg.flags)
            handler = self._handlers.get(msg.request)
            if handler is None:
                log.warning("unsupported request %s", _name(msg.request))
                return self._error_reply(msg.request, msg.flags)
            try:
                payload = handler(msg)
            except (_Reject, VblkError) as e:
                log.warning("%s refused: %s", _name(msg.request), e)
                return self._error_reply(msg.request, msg.flags)
            if isinstance(payload, Message):
                return payload  # a reply carrying fds
            if payload is not None:
                return reply(msg, payload)
            if self._reply_ack and msg.need_reply:
                return reply(msg, U64(0))
            return None
        finally:
            for fd in msg.fds:
                if fd not in self._kept:
                    _close(fd)

    @property
    def _reply_ack(self) -> bool:
        return bool(self.acked_protocol_features & (1 << ProtocolFeature.REPLY_ACK))

    def _error_reply(self, request: int, flags: int) -> Message | None:
        """The frontend waits for replies to GET_* and to NEED_REPLY requests: answer a failure."""
        stub = Message(request, flags, Empty())
        if request == Request.GET_CONFIG:
            return reply(stub, Config(0, 0, 0, b""))  # a zero size tells QEMU it failed
        if request == Request.GET_VRING_BASE:
            return reply(stub, VringState(0, 0))
        if request == Request.GET_INFLIGHT_FD:
            return reply(stub, Inflight(0, 0, 0, 0))  # a zero size: no inflight tracking
        if request in _U64_REPLIES or (flags & FLAG_NEED_REPLY and self._reply_ack):
            return reply(stub, U64(1 if request not in _U64_REPLIES else 0))
        return None

    def close(self) -> None:
        """The connection is gone: stop every queue, release fds and memory."""
        for vring in self.vrings.values():
            self._stop(vring)
            vring.close_fds()
        self.memory.clear()
        self._drop_inflight()
        self._drop_offer()
        self._drop_backend_channel()

    # -- features -------------------------------------------------------------

    def _get_features(self, msg: Message) -> Payload:
        return U64(self.device.features | 1 << vdefs.VHOST_USER_F_PROTOCOL_FEATURES)

    def _set_features(self, msg: Message) -> None:
        value = _u64(msg)
        offered = self.device.features | 1 << vdefs.VHOST_USER_F_PROTOCOL_FEATURES
        if value & ~offered:
            raise _Reject(f"features {value & ~offered:#x} were never offered")
        self.acked_features = value
        if not value & (1 << vdefs.VHOST_USER_F_PROTOCOL_FEATURES):
            # Without protocol features there is no SET_VRING_ENABLE: rings start enabled.
            self._enable_all = True
            for vring in self.vrings.values():
                vring.enabled = True

    def _get_protocol_features(self, msg: Message) -> Payload:
        return U64(PROTOCOL_FEATURES)

    def _set_protocol_features(self, msg: Message) -> None:
        value = _u64(msg)
        if value & ~PROTOCOL_FEATURES:
            log.info("ignoring unoffered protocol features %#x", value & ~PROTOCOL_FEATURES)
        self.acked_protocol_features = value & PROTOCOL_FEATURES

    def _set_owner(self, msg: Message) -> None:
        self.owner = True

    def _reset_owner(self, msg: Message) -> None:
        for vring in self.vrings.values():
            self._stop(vring)
            vring.close_fds()
        self.vrings = {}
        self.acked_features = 0
        self._enable_all = False
        self.owner = False

    def _get_queue_num(self, msg: Message) -> Payload:
        return U64(self.num_queues)

    # -- memory ---------------------------------------------------------------

    def _set_mem_table(self, msg: Message) -> None:
        table = msg.payload
        assert isinstance(table, MemTable)
        if len(msg.fds) != len(table.regions):
            raise _Reject(f"{len(table.regions)} regions but {len(msg.fds)} fds")
        with self._paused():
            self.memory.clear()
            for region, fd in zip(table.regions, msg.fds, strict=True):
                self._map(region.gpa, region.size, region.uaddr, region.mmap_offset, fd)

    def _map(self, gpa: int, size: int, uaddr: int, offset: int, fd: int) -> None:
        try:
            view, unmap = self.map_region(fd, size, offset)
        except (OSError, ValueError, OverflowError) as e:
            raise _Reject(f"cannot map region gpa={gpa:#x} size={size:#x}: {e}") from None
        try:
            self.memory.add(gpa, size, uaddr, view, unmap)
        except GuestMemoryError:
            unmap()
            raise
        log.debug("mapped gpa=%#x size=%#x uaddr=%#x", gpa, size, uaddr)

    def _get_max_mem_slots(self, msg: Message) -> Payload:
        return U64(MAX_MEM_SLOTS)

    def _add_mem_reg(self, msg: Message) -> None:
        payload = msg.payload
        assert isinstance(payload, MemRegionMsg)
        if len(msg.fds) != 1:
            raise _Reject(f"ADD_MEM_REG needs one fd, got {len(msg.fds)}")
        if len(self.memory.regions) >= MAX_MEM_SLOTS:
            raise _Reject("all memory slots are in use")
        r = payload.region
        self._map(r.gpa, r.size, r.uaddr, r.mmap_offset, msg.fds[0])

    def _rem_mem_reg(self, msg: Message) -> None:
        payload = msg.payload
        assert isinstance(payload, MemRegionMsg)
        r = payload.region
        with self._paused():
            self.memory.remove(r.gpa, r.size, r.uaddr)

    # -- inflight tracking ------------------------------------------------------

    def _inflight_geometry(self, p: Inflight) -> None:
        if not self.acked_protocol_features & (1 << ProtocolFeature.INFLIGHT_SHMFD):
            raise _Reject("INFLIGHT_SHMFD was not negotiated")
        if not 0 < p.num_queues <= self.num_queues:
            raise _Reject(
                f"{p.num_queues} queues, vblk serve offers {self.num_queues} (--num-queues; "
                f"vhost-user-blk-pci num-queues={p.num_queues})"
            )
        if not 0 < p.queue_size <= self.max_queue_size:
            raise _Reject(
                f"queues of {p.queue_size}, vblk serve serves at most {self.max_queue_size} "
                f"(--queue-size; vhost-user-blk-pci queue-size={p.queue_size})"
            )

    def _get_inflight_fd(self, msg: Message) -> Message:
        """Create a zeroed region for the frontend to keep across our restarts."""
        p = msg.payload
        assert isinstance(p, Inflight)
        self._inflight_geometry(p)
        size = region_size(p.num_queues, p.queue_size)
        try:
            fd = self.create_inflight(size, "vblk-inflight")
        except OSError as e:
            raise _Reject(f"cannot create a {size}-byte memfd: {e}") from None
        self._drop_offer()
        self._offered_fd = fd
        log.info(
            "inflight region created: %d queues of %d, %d bytes", p.num_queues, p.queue_size, size
        )
        return reply(msg, Inflight(size, 0, p.num_queues, p.queue_size), fds=(fd,))

    def _set_inflight_fd(self, msg: Message) -> None:
        """Map the region to track in (ours, or one a previous process filled)."""
        p = msg.payload
        assert isinstance(p, Inflight)
        self._inflight_geometry(p)
        if len(msg.fds) != 1:
            raise _Reject(f"expected one fd, got {len(msg.fds)}")
        need = region_size(p.num_queues, p.queue_size)
        if p.mmap_size < need:
            raise _Reject(
                f"mmap_size {p.mmap_size} is below the {need} bytes {p.num_queues} queues "
                f"of {p.queue_size} need"
            )
        try:
            # The whole claimed range must exist (map_sealed checks it); parts use `need`.
            view, unmap = self.map_inflight(msg.fds[0], p.mmap_size, p.mmap_offset)
        except (OSError, ValueError, OverflowError) as e:
            raise _Reject(f"cannot map the inflight region: {e}") from None
        with self._paused():
            self._drop_inflight()
            self.inflight = _InflightArea(view, unmap, p.num_queues, p.queue_size)
        self._drop_offer()  # the frontend has it (this is it, or a newer one)
        log.info("inflight region set: %d queues of %d", p.num_queues, p.queue_size)

    def _drop_inflight(self) -> None:
        if self.inflight is not None:
            self.inflight.unmap()
            self.inflight = None

    def _drop_offer(self) -> None:
        _close(self._offered_fd)
        self._offered_fd = -1

    def _queue_inflight(self, vring: Vring) -> QueueInflight | None:
        """This ring's part of the inflight region, or None to run untracked."""
        area = self.inflight
        if area is None or not self.acked_protocol_features & (1 << ProtocolFeature.INFLIGHT_SHMFD):
            return None
        if vring.index >= area.num_queues or vring.num > area.queue_size:
            log.warning(
                "queue %d of size %d is outside the inflight region (%d queues of %d): not tracked",
                vring.index,
                vring.num,
                area.num_queues,
                area.queue_size,
            )
            return None
        return area.part(vring.index)

    # -- rings ----------------------------------------------------------------

    def _vring(self, index: int) -> Vring:
        if not 0 <= index < self.num_queues:
            raise _Reject(
                f"queue {index} refused: vblk serve offers {self.num_queues} queues "
                f"(--num-queues); vhost-user-blk-pci num-queues must not exceed it"
            )
        vring = self.vrings.get(index)
        if vring is None:
            vring = self.vrings[index] = Vring(index, enabled=self._enable_all)
        return vring

    def _refuse(self, vring: Vring, request: Request, reason: str) -> _Reject:
        """Remember a refused setting, so the ring never runs without it; the error to raise."""
        vring.refused[request.name] = reason
        if vring.running:
            self._stop(vring)
            with contextlib.suppress(_Reject):
                self._maybe_start(vring)  # as a failed ring
        return _Reject(reason)

    def _accept(self, vring: Vring, request: Request, apply: Callable[[], None]) -> None:
        """Apply a valid setting; it replaces a refused one, and a ring failed for it restarts."""
        if vring.running and request.name in vring.refused:
            self._stop(vring)
            apply()
            del vring.refused[request.name]
            self._maybe_start(vring)
        else:
            apply()
            vring.refused.pop(request.name, None)

    def _ring_size_refusal(self, index: int, n: int) -> str | None:
        """Why a ring of ``n`` entries cannot be served, naming the settings involved; or None."""
        if not vdefs.is_queue_size(n):
            return (
                f"queue {index}: ring size {n} refused: not a power of two in "
                f"1..{vdefs.MAX_QUEUE_SIZE} (vhost-user-blk-pci queue-size={n})"
            )
        if n > self.max_queue_size:
            return (
                f"queue {index}: ring size {n} refused: vhost-user-blk-pci queue-size={n} "
                f"exceeds vblk serve --queue-size {self.max_queue_size}; raise --queue-size "
                f"(or drop it) or lower queue-size"
            )
        indirect = self.acked_features & (1 << vdefs.VIRTIO_F_RING_INDIRECT_DESC)
        seg_max = self._seg_max()
        if self.acked_features and not indirect and n < min_direct_ring(seg_max):
            return (
                f"queue {index}: ring size {n} refused: without indirect descriptors a request "
                f"of seg_max {seg_max} segments needs {min_direct_ring(seg_max)} ring entries "
                f"(vhost-user-blk-pci queue-size={n},indirect_desc=off); use indirect_desc=on, "
                f"queue-size>={min_direct_ring(seg_max)}, or vblk serve --queue-size {n}"
            )
        return None

    def _seg_max(self) -> int:
        return self.device.config.seg_max

    def _set_vring_num(self, msg: Message) -> None:
        state = _state(msg)
        vring = self._vring(state.index)
        n = state.num
        vring.wanted_num = n
        reason = self._ring_size_refusal(vring.index, n)
        if reason is not None:
            raise self._refuse(vring, Request.SET_VRING_NUM, reason)
        if vring.running and n != vring.num:
            self._stop(vring)  # a running ring never changes size under its queue
        self._accept(vring, Request.SET_VRING_NUM, lambda: setattr(vring, "num", n))
        self._maybe_start(vring)

    def _set_vring_addr(self, msg: Message) -> None:
        addr = msg.payload
        assert isinstance(addr, VringAddr)
        vring = self._vring(addr.index)
        vring.addr = addr
        if vring.running:
            self._stop(vring)
            self._maybe_start(vring)

    def _set_vring_base(self, msg: Message) -> None:
        state = _state(msg)
        vring = self._vring(state.index)
        if state.num > 0xFFFF:
            raise self._refuse(
                vring,
                Request.SET_VRING_BASE,
                f"queue {vring.index}: ring base {state.num} refused: it does not fit 16 bits",
            )
        self._accept(vring, Request.SET_VRING_BASE, lambda: setattr(vring, "base", state.num))

    def _get_vring_base(self, msg: Message) -> Payload:
        state = _state(msg)
        vring = self._vring(state.index)
        self._stop(vring)
        _close(vring.kick_fd)
        vring.kick_fd = -1
        vring.set_call_fd(-1)
        return VringState(vring.index, vring.base)

    def _fd_arg(self, msg: Message) -> tuple[Vring, int]:
        value = _u64(msg)
        vring = self._vring(value & VRING_IDX_MASK)
        if value & VRING_NOFD_MASK:
            return vring, -1
        if len(msg.fds) != 1:
            raise _Reject(f"expected one fd, got {len(msg.fds)}")
        fd = msg.fds[0]
        # Kick/call/err fds are eventfds (QEMU's are non-blocking too). Anything
        # else, or a blocking eventfd the frontend filled up, could hang a queue
        # thread in read() or write(), so refuse the one and unblock the other.
        if not _is_eventfd(fd):
            raise _Reject(f"queue {vring.index}: the fd is not an eventfd")
        os.set_blocking(fd, False)
        self._kept.add(fd)
        return vring, fd

    def _set_vring_kick(self, msg: Message) -> None:
        vring, fd = self._fd_arg(msg)
        if fd < 0:
            raise _Reject("polling mode (no kick fd) is not supported")
        self._stop(vring)
        _close(vring.kick_fd)
        vring.kick_fd = fd
        self._maybe_start(vring)

    def _set_vring_call(self, msg: Message) -> None:
        vring, fd = self._fd_arg(msg)
        vring.set_call_fd(fd)

    def _set_vring_err(self, msg: Message) -> None:
        vring, fd = self._fd_arg(msg)
        vring.set_err_fd(fd)

    def _set_vring_enable(self, msg: Message) -> None:
        state = _state(msg)
        vring = self._vring(state.index)
        if state.num > 1:
            raise _Reject(f"enable value {state.num} is not 0 or 1")
        if bool(state.num) == vring.enabled:
            return
        vring.enabled = bool(state.num)
        if vring.enabled:
            self._maybe_start(vring)
        else:
            self._stop(vring)

    def _maybe_start(self, vring: Vring) -> None:
        """Start a ring once it has size, addresses, memory, a kick fd and is enabled.

        A ring with a refused setting (:attr:`Vring.refused`) never runs with
        the settings it had before: its error fd is signalled and, when the
        ring size the frontend asked for can be laid out, the ring runs failed,
        answering every request IOERR, so the guest sees an error, not a hang.
        """
        if vring.running or vring.kick_fd < 0 or vring.addr is None or not vring.enabled:
            return
        failed: str | None = None
        if not vring.refused and vring.num:
            failed = self._ring_size_refusal(vring.index, vring.num)  # features came later
            if failed is not None:
                vring.refused[Request.SET_VRING_NUM.name] = failed
                log.warning("%s", failed)
        if vring.refused:
            failed = "; ".join(vring.refused.values())
            vring.signal_err()
            n = vring.wanted_num if Request.SET_VRING_NUM.name in vring.refused else vring.num
            if not vdefs.is_queue_size(n):
                raise _Reject(f"queue {vring.index}: not started, a setting was refused")
        elif vring.num == 0:
            raise _Reject(f"queue {vring.index}: started before SET_VRING_NUM")
        else:
            n = vring.num
        a = vring.addr
        try:
            desc = self.memory.translate_uaddr(a.desc, vdefs.desc_table_bytes(n))
            avail = self.memory.translate_uaddr(a.avail, vdefs.avail_ring_bytes(n))
            used = self.memory.translate_uaddr(a.used, vdefs.used_ring_bytes(n))
            if a.desc % 16 or a.avail % 2 or a.used % 4:
                raise QueueError("ring addresses are misaligned")
            vring.queue = DeviceQueue(
                self.memory,
                n,
                desc,
                avail,
                used,
                event_idx=bool(self.acked_features & (1 << vdefs.VIRTIO_F_RING_EVENT_IDX)),
                last_avail_idx=vring.base,
                inflight=None if failed else self._queue_inflight(vring),
                failed=failed,
            )
        except (GuestMemoryError, QueueError) as e:
            raise _Reject(f"queue {vring.index}: cannot start: {e}") from None
        q = vring.queue
        log.info(
            "queue %d started: size %d, base %d, inflight %s%s",
            vring.index,
            n,
            vring.base,
            "off" if q.recovery is None else "fresh" if q.recovery.fresh else "recovered",
            ", FAILED: every request gets IOERR" if failed else "",
        )
        rec = q.recovery
        if rec is not None and not rec.fresh:
            log.info(
                "queue %d: resubmitting %d in-flight requests %s; avail index %d "
                "(the frontend said %d)",
                vring.index,
                len(rec.resubmit),
                list(rec.resubmit),
                q.last_avail_idx,
                vring.base,
            )
        self.host.start_queue(vring)

    def _stop(self, vring: Vring) -> None:
        """Stop a running ring, keeping its position so it can resume or be reported."""
        if vring.queue is None:
            return
        self.host.stop_queue(vring)
        vring.base = vring.queue.last_avail_idx
        vring.queue = None
        log.info("queue %d stopped at avail index %d", vring.index, vring.base)

    @contextlib.contextmanager
    def _paused(self) -> Iterator[None]:
        """Stop running rings while memory changes under them, then restart them."""
        running = [v for v in self.vrings.values() if v.running]
        for v in running:
            self._stop(v)
        try:
            yield
        finally:
            for v in running:
                try:
                    self._maybe_start(v)
                except _Reject as e:
                    log.error("%s", e)

    # -- config space ---------------------------------------------------------

    def _get_config(self, msg: Message) -> Payload:
        cfg = msg.payload
        assert isinstance(cfg, Config)
        data = self.device.read_config(cfg.offset, cfg.size)
        if data is None:
            raise _Reject(f"config read of {cfg.size} bytes at {cfg.offset} is out of range")
        return Config(cfg.offset, len(data), cfg.flags, data)

    def _set_config(self, msg: Message) -> None:
        cfg = msg.payload
        assert isinstance(cfg, Config)
        if not self.device.write_config(cfg.offset, cfg.data):
            raise _Reject(f"config write of {cfg.size} bytes at {cfg.offset} is not allowed")

    # -- back-end request channel ---------------------------------------------

    def _set_backend_req_fd(self, msg: Message) -> None:
        """Keep the socket on which we tell the frontend of config changes."""
        if not self.acked_protocol_features & (1 << ProtocolFeature.BACKEND_REQ):
            raise _Reject("BACKEND_REQ was not negotiated")
        if len(msg.fds) != 1:
            raise _Reject(f"expected one fd, got {len(msg.fds)}")
        try:
            channel = BackendChannel(msg.fds[0], reply_ack=self._reply_ack)
        except (OSError, VblkError) as e:
            raise _Reject(str(e)) from None
        self._kept.add(msg.fds[0])
        self._drop_backend_channel()
        self.backend_channel = channel
        log.info("backend request channel set")

    def _drop_backend_channel(self) -> None:
        channel, self.backend_channel = self.backend_channel, None
        if channel is not None:
            channel.close()


_U64_REPLIES = frozenset(
    {
        Request.GET_FEATURES,
        Request.GET_PROTOCOL_FEATURES,
        Request.GET_QUEUE_NUM,
        Request.GET_MAX_MEM_SLOTS,
    }
)


def _u64(msg: Message) -> int:
    p = msg.payload
    if not isinstance(p, U64):
        raise _Reject("expected a u64 payload")
    return p.value


def _state(msg: Message) -> VringState:
    p = msg.payload
    if not isinstance(p, VringState):
        raise _Reject("expected a vring state payload")
    return p


def _name(request: int) -> str:
    try:
        return Request(request).name
    except ValueError:
        return f"request {request}"
