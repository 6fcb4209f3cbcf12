"""Device side of a split virtqueue (virtio 1.2, section 2.7).

The driver is untrusted: every index it writes is range checked, every
address goes through :class:`~vblk.memory.GuestMemory`, and a chain that
breaks the rules comes back with :attr:`Chain.error` set instead of raising,
so the device can fail that one request (or the queue) and carry on.

Concurrency: the other side runs in another process and reads the ring while
we write it. The u16 fields (indexes, flags, event indexes) therefore go
through 16-bit memoryview items, which CPython moves with one load or store.
``struct.pack_into`` must not be used for them: it zeroes its target before
writing, so a peer can read an index of 0 (this broke real runs). CPython has
no fence primitive either; stores stay in program order on x86, so the only
reordering that matters there is a store followed by a load (the notification
handshakes), and :func:`_fence` orders those with a lock round-trip, whose
locked read-modify-write is a full barrier.
"""

from __future__ import annotations

import logging
import struct
import sys
import threading
from dataclasses import dataclass

from vblk.errors import GuestMemoryError, QueueError
from vblk.memory import GuestMemory
from vblk.virtio.defs import (
    MAX_QUEUE_SIZE,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    avail_ring_bytes,
    desc_table_bytes,
    need_event,
    used_ring_bytes,
)
from vblk.virtio.inflight import QueueInflight, Recovery

__all__ = [
    "MAX_CHAIN_BYTES",
    "MAX_INDIRECT_ENTRIES",
    "Chain",
    "DeviceQueue",
    "get16",
    "put16",
    "ring_views",
]

log = logging.getLogger(__name__)

# Descriptors and used elements are never read while being written, so struct
# is fine for them; native order on little-endian hosts is the fastest codec.
_BO = "@" if sys.byteorder == "little" else "<"
_DESC = struct.Struct(_BO + "QIHH")  # addr, len, flags, next
_USED_ELEM = struct.Struct(_BO + "II")  # id, len
#: Ring u16 views hold host-order items; the ring is little-endian.
_BIG_ENDIAN = sys.byteorder == "big"
_FENCE_LOCK = threading.Lock()

#: A chain may describe at most this many bytes, since the used length is u32
#: (virtio 1.2, 2.7.5.2: no chain longer than 2**32 bytes).
MAX_CHAIN_BYTES = 0xFFFFFFFF
#: Upper bound on an indirect table; nothing sensible needs more than a ring's worth.
MAX_INDIRECT_ENTRIES = MAX_QUEUE_SIZE


def _fence() -> None:
    """A full barrier between a ring store and the following load, as far as Python allows."""
    with _FENCE_LOCK:
        pass


def _swap16(v: int) -> int:
    return (v & 0xFF) << 8 | v >> 8


def get16(ring: memoryview, i: int) -> int:
    """u16 number ``i`` of a ring part viewed by :func:`ring_views`, in one load."""
    v: int = ring[i]
    return _swap16(v) if _BIG_ENDIAN else v


def put16(ring: memoryview, i: int, v: int) -> None:
    """Store u16 number ``i`` of a ring part in one store, never torn for a reader."""
    ring[i] = _swap16(v) if _BIG_ENDIAN else v


def ring_views(
    size: int, desc: memoryview, avail: memoryview, used: memoryview
) -> tuple[memoryview, memoryview, memoryview]:
    """Validate a ring and return (desc bytes, avail u16s, used u16s), trimmed to size.

    QueueError unless ``size`` is a power of two the spec allows and each view
    is writable and long enough.
    """
    if not 0 < size <= MAX_QUEUE_SIZE or size & (size - 1):
        raise QueueError(f"queue size {size} is not a power of two in 1..{MAX_QUEUE_SIZE}")
    out = []
    for name, view, need in (
        ("descriptor table", desc, desc_table_bytes(size)),
        ("avail ring", avail, avail_ring_bytes(size)),
        ("used ring", used, used_ring_bytes(size)),
    ):
        if view.nbytes < need:
            raise QueueError(f"{name} is {view.nbytes} bytes, needs {need} for size {size}")
        if view.readonly:
            raise QueueError(f"{name} is read-only")
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        out.append(view[:need])
    return out[0], out[1].cast("H"), out[2].cast("H")


@dataclass(slots=True)
class Chain:
    """One request as the device sees it: guest buffers, device-readable first.

    ``error`` set means the walk stopped at a rule violation; the lists keep
    the segments validated before it, so a device can still find a status
    byte to report the failure in.
    """

    head: int
    readable: list[memoryview]
    writable: list[memoryview]
    error: str | None = None

    @property
    def readable_len(self) -> int:
        return sum(len(b) for b in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(len(b) for b in self.writable)


class DeviceQueue:
    """The device's view of one split ring in guest memory.

    ``desc``/``avail``/``used`` are views of the three ring parts (already
    translated, at least as long as the sizes in :mod:`vblk.virtio.defs`).
    ``last_avail_idx`` is where the previous owner stopped (vhost-user
    SET_VRING_BASE); the used index is resumed from the ring itself.

    With ``inflight`` (this queue's part of the vhost-user inflight region)
    every pop marks its head and every push clears it, so a later process
    can tell what was in flight. A part a previous process used is
    recovered first (:attr:`recovery`): the queue then resumes past the
    requests that were in flight, and :meth:`pop` hands those out again,
    oldest first, before anything new.
    """

    def __init__(
        self,
        mem: GuestMemory,
        size: int,
        desc: memoryview,
        avail: memoryview,
        used: memoryview,
        *,
        event_idx: bool,
        last_avail_idx: int = 0,
        indirect: bool = True,
        inflight: QueueInflight | None = None,
        failed: str | None = None,
    ) -> None:
        self._desc, self._avail, self._used = ring_views(size, desc, avail, used)
        if not 0 <= last_avail_idx <= 0xFFFF:
            raise QueueError(f"avail index {last_avail_idx} is not a u16")
        self.mem = mem
        self.size = size
        self.event_idx = event_idx
        self.indirect = indirect
        #: Set: every chain popped comes back with this as its error (so it gets IOERR).
        self.failed = failed
        self._used_bytes = self._used.cast("B")  # for the 8-byte used elements
        self._mask = size - 1
        self._used_event = 2 + size  # u16 index in avail
        self._avail_event = 2 + 4 * size  # u16 index in used
        self.last_avail_idx = last_avail_idx
        # avail->idx as last read: while we are behind it there is no need to
        # read (and re-validate) the shared field again.
        self._shadow_avail_idx = last_avail_idx
        self.used_idx = get16(self._used, 1)
        # used idx at the last notification decision; None until the first one,
        # which must signal since we do not know what the driver has seen.
        self._signalled: int | None = None
        self.broken: str | None = None
        # Inflight tracking: None (nothing to do per request) unless negotiated.
        self.recovery: Recovery | None = None
        self._resubmit: list[int] = []  # heads to hand out again, oldest last
        self._if_flags: memoryview | None = None
        self._if_u16 = self._if_u64 = self._used  # placeholders; only read when tracking
        self._if_counter = 0
        if inflight is not None:
            self._track(inflight)

    def _track(self, inflight: QueueInflight) -> None:
        if inflight.desc_num < self.size:
            raise QueueError(
                f"inflight region tracks {inflight.desc_num} descriptors, the ring has {self.size}"
            )
        rec = self.recovery = inflight.recover(self.used_idx, self.size)
        if not rec.fresh:
            self.last_avail_idx = self._shadow_avail_idx = rec.last_avail_idx
            self._resubmit = list(reversed(rec.resubmit))
        self._if_counter = rec.counter
        self._if_u16, self._if_u64 = inflight.u16, inflight.u64
        self._if_flags = inflight.bytes

    @property
    def tracks_inflight(self) -> bool:
        """Pops and pushes are recorded in an inflight region."""
        return self._if_flags is not None

    # -- consuming requests ------------------------------------------------------

    def pop(self) -> Chain | None:
        """The next available chain, or None when the ring is empty or broken."""
        if self.broken is not None:
            return None
        last = self.last_avail_idx
        if last == self._shadow_avail_idx:
            if self._resubmit:  # recovered requests go first; their marks stay set
                return self._walk(self._resubmit.pop())
            idx: int = self._avail[1]
            if _BIG_ENDIAN:
                idx = _swap16(idx)
            if (idx - last) & 0xFFFF > self.size:
                self.mark_broken(f"avail index {idx} is more than {self.size} ahead of {last}")
                return None
            self._shadow_avail_idx = idx
            if idx == last:
                return None
        head: int = self._avail[2 + (last & self._mask)]
        if _BIG_ENDIAN:
            head = _swap16(head)
        self.last_avail_idx = (last + 1) & 0xFFFF
        if head >= self.size:
            self.mark_broken(f"avail entry {last} names descriptor {head} of {self.size}")
            return None
        flags = self._if_flags
        if flags is not None:  # counter first: a set flag always has its counter
            c = self._if_counter
            self._if_u64[3 + (head << 1)] = c  # inflight.counter_item(head)
            self._if_counter = c + 1
            flags[16 + (head << 4)] = 1  # inflight.flag_offset(head)
        if self.failed is not None:
            return self._fail(head)
        return self._walk(head)

    def _fail(self, head: int) -> Chain:
        """A chain of a failed ring, walked as usual but with :attr:`failed` as its error."""
        chain = self._walk(head)
        if chain.error is None:
            chain.error = self.failed
        return chain

    def _walk(self, head: int) -> Chain:
        """Follow a chain from ``head``, validating as it goes."""
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        chain = Chain(head, readable, writable)
        translate = self.mem.translate
        unpack = _DESC.unpack_from
        table = self._desc
        limit = ttl = self.size  # a direct chain visits each descriptor at most once
        in_table = False
        total = 0
        i = head
        while True:
            if ttl == 0:
                chain.error = f"chain longer than {limit} descriptors (loop?)"
                return chain
            ttl -= 1
            addr, length, flags, nxt = unpack(table, i << 4)
            if flags & VIRTQ_DESC_F_INDIRECT:
                # The WRITE flag of this descriptor is meaningless and ignored (2.7.5.3.2).
                if not self.indirect:
                    chain.error = f"descriptor {i}: indirect descriptors not negotiated"
                elif in_table:
                    chain.error = f"descriptor {i}: indirect descriptor in an indirect table"
                elif flags & VIRTQ_DESC_F_NEXT:
                    chain.error = f"descriptor {i}: INDIRECT together with NEXT"
                elif not length or length & 15 or length > MAX_INDIRECT_ENTRIES << 4:
                    chain.error = f"descriptor {i}: bad indirect table length {length}"
                else:
                    try:
                        table = translate(addr, length)
                    except GuestMemoryError as e:
                        chain.error = f"descriptor {i}: indirect table: {e}"
                if chain.error is not None:
                    return chain
                in_table = True
                limit = ttl = length >> 4
                i = 0
                continue
            total += length
            if total > MAX_CHAIN_BYTES:
                chain.error = f"descriptor {i}: chain exceeds {MAX_CHAIN_BYTES} bytes"
                return self._salvage(chain, table, i, limit, ttl)
            try:
                buf = translate(addr, length)
            except GuestMemoryError as e:
                chain.error = f"descriptor {i}: {e}"
                return self._salvage(chain, table, i, limit, ttl)
            if flags & VIRTQ_DESC_F_WRITE:
                writable.append(buf)
            elif writable:
                chain.error = f"descriptor {i}: device-readable after device-writable"
                return self._salvage(chain, table, i, limit, ttl)
            else:
                readable.append(buf)
            if not flags & VIRTQ_DESC_F_NEXT:
                return chain
            if nxt >= limit:
                chain.error = f"descriptor {i}: next {nxt} out of range {limit}"
                return chain
            i = nxt

    def _salvage(self, chain: Chain, table: memoryview, i: int, limit: int, ttl: int) -> Chain:
        """Find the status byte of a chain whose data is bad but whose links are sound.

        The guest deserves an IOERR rather than a broken queue when only a
        buffer address is wrong. Follow NEXT (same ttl and bounds as the walk)
        to the last descriptor; if it is device-writable and mapped, its last
        byte becomes the chain's only writable segment. Otherwise none is left
        and the caller treats the chain as unanswerable.
        """
        chain.readable.clear()
        chain.writable.clear()
        unpack = _DESC.unpack_from
        while True:
            addr, length, flags, nxt = unpack(table, i << 4)
            if not flags & VIRTQ_DESC_F_NEXT:
                break
            if ttl == 0 or nxt >= limit:
                return chain
            ttl -= 1
            i = nxt
        if flags & VIRTQ_DESC_F_WRITE and not flags & VIRTQ_DESC_F_INDIRECT and length:
            try:
                chain.writable.append(self.mem.translate(addr + length - 1, 1))
            except GuestMemoryError:
                pass
        return chain

    def avail_pending(self) -> bool:
        """Whether the driver has published chains we have not popped (one load; for polling)."""
        if self.broken is not None:
            return False
        return get16(self._avail, 1) != self.last_avail_idx

    # -- completing requests -----------------------------------------------------

    def push(self, head: int, written: int) -> None:
        """Return chain ``head`` to the driver with ``written`` bytes filled in."""
        if not 0 <= head < self.size:
            raise QueueError(f"push of descriptor {head} outside queue of {self.size}")
        idx = self.used_idx
        flags = self._if_flags
        if flags is not None:
            self._if_u16[6] = head  # last_batch_head: recovery's fix-up if we die mid-push
        _USED_ELEM.pack_into(self._used_bytes, 4 + 8 * (idx & self._mask), head, written)
        # The element must be visible before the index that publishes it; stores
        # are not reordered with each other on x86, and there is no fence to issue.
        idx = (idx + 1) & 0xFFFF
        self._used[1] = _swap16(idx) if _BIG_ENDIAN else idx
        self.used_idx = idx
        if flags is not None:
            flags[16 + (head << 4)] = 0
            self._if_u16[7] = idx  # the region's used_idx: this push is complete

    def should_notify(self) -> bool:
        """Whether to interrupt the driver for what was pushed since the last decision.

        With EVENT_IDX the driver says, through used_event, which used index it
        wants to hear about; otherwise it can only switch interrupts off with
        NO_INTERRUPT. In both cases, nothing new since the last decision needs
        no interrupt.
        """
        _fence()  # our used->idx store before the driver's flag / used_event load
        new = self.used_idx
        old = self._signalled
        self._signalled = new
        if old is None:
            return True
        if self.event_idx:
            return need_event(get16(self._avail, self._used_event), new, old)
        if new == old:
            return False
        return not get16(self._avail, 0) & VIRTQ_AVAIL_F_NO_INTERRUPT

    # -- kick suppression ------------------------------------------------------

    def disable_notifications(self) -> None:
        """Ask the driver not to kick while we are draining the ring anyway.

        With EVENT_IDX this writes nothing, as rust-vmm and Linux vhost do:
        avail_event keeps the value from the last enable, so the driver kicks at
        most once more (when it crosses that index) and then stays quiet.
        Updating avail_event on every pop, as libvhost-user does, would instead
        keep kicks coming while we are busy.
        """
        if not self.event_idx:
            put16(self._used, 0, get16(self._used, 0) | VIRTQ_USED_F_NO_NOTIFY)

    def enable_notifications(self) -> bool:
        """Ask for kicks again; True if the driver added work meanwhile (keep draining).

        The re-check after the store closes the race with a driver that
        published a chain just before it could see kicks were wanted.
        """
        if self.event_idx:
            put16(self._used, self._avail_event, self.last_avail_idx)
        else:
            put16(self._used, 0, get16(self._used, 0) & ~VIRTQ_USED_F_NO_NOTIFY)
        _fence()  # our store before the avail->idx load
        if self.broken is not None:
            return False
        return get16(self._avail, 1) != self.last_avail_idx

    def mark_broken(self, reason: str) -> None:
        """Stop serving this ring; the first reason sticks."""
        if self.broken is None:
            self.broken = reason
            log.error("virtqueue broken: %s", reason)
