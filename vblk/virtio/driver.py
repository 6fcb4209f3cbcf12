"""Driver side of a split virtqueue, as Linux's ``virtio_ring.c`` does it.

Used by the userspace vhost-user client and by tests that play the guest.
The device is not trusted either: the free list lives in Python (the ring's
``next`` fields are only written, never read back), and a used entry naming a
descriptor we did not hand out raises :class:`~vblk.errors.QueueError`
instead of corrupting our bookkeeping.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from vblk.errors import QueueError
from vblk.virtio.defs import (
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    need_event,
)
from vblk.virtio.queue import _DESC, _USED_ELEM, _fence, get16, put16, ring_views

__all__ = ["DriverQueue", "QueueFullError"]


class QueueFullError(QueueError):
    """Not enough free descriptors for the chain (or an empty chain): retry after pop_used."""


class DriverQueue:
    """The driver's half of one split ring over caller-provided memory.

    The ring parts are zeroed on construction: the queue must not be live on
    the device yet. ``num_free`` descriptors are left, ``in_flight`` chains
    are with the device.
    """

    def __init__(
        self,
        size: int,
        desc: memoryview,
        avail: memoryview,
        used: memoryview,
        *,
        event_idx: bool,
    ) -> None:
        self._desc, self._avail, self._used = ring_views(size, desc, avail, used)
        self.size = size
        self.event_idx = event_idx
        self._used_bytes = self._used.cast("B")  # for the 8-byte used elements
        for view in (self._desc, self._avail.cast("B"), self._used_bytes):
            view[:] = bytes(len(view))
        self._mask = size - 1
        self._used_event = 2 + size  # u16 index in avail
        self._avail_event = 2 + 4 * size  # u16 index in used
        # Free list: _next[i] is the free descriptor after i (Linux's desc_extra).
        self._next = list(range(1, size + 1))
        self._free_head = 0
        self.num_free = size
        self.in_flight = 0
        # Per head of an in-flight chain: its descriptor count (0 = not in flight)
        # and last descriptor, so freeing is O(1) and never reads the ring.
        self._count = [0] * size
        self._tail = [0] * size
        self._avail_idx = 0  # our avail->idx
        self._kicked_idx = 0  # avail idx at the last kick decision
        self._last_used = 0  # next used entry to consume
        self._interrupts = True

    def add(self, out: Sequence[tuple[int, int]], in_: Sequence[tuple[int, int]]) -> int:
        """Publish a chain of device-readable ``out`` then device-writable ``in_``
        (gpa, length) buffers; returns its head. The device may see it at once.
        """
        bufs = [*out, *in_]
        n = len(bufs)
        if n == 0:
            raise QueueFullError("a chain needs at least one buffer")
        if n > self.num_free:
            raise QueueFullError(f"{n} descriptors needed, {self.num_free} free")
        n_out = len(out)
        nxt = self._next
        desc = self._desc
        head = i = self._free_head
        last = head
        try:
            for k, (gpa, length) in enumerate(bufs):
                flags = VIRTQ_DESC_F_WRITE if k >= n_out else 0
                last = i
                i = nxt[i]
                if k < n - 1:
                    _DESC.pack_into(desc, last << 4, gpa, length, flags | VIRTQ_DESC_F_NEXT, i)
                else:
                    _DESC.pack_into(desc, last << 4, gpa, length, flags, 0)
        except struct.error:
            raise ValueError(f"buffer {bufs[k]} does not fit a descriptor") from None
        # Only now commit: a bad buffer above leaves the free list untouched.
        self._free_head = i
        self.num_free -= n
        self.in_flight += 1
        self._count[head] = n
        self._tail[head] = last
        idx = self._avail_idx
        put16(self._avail, 2 + (idx & self._mask), head)
        # The ring entry (and the descriptors) must be visible before the index.
        idx = (idx + 1) & 0xFFFF
        put16(self._avail, 1, idx)
        self._avail_idx = idx
        return head

    def kick_needed(self) -> bool:
        """Whether the device wants a kick for the chains added since the last call."""
        _fence()  # our avail->idx store before the device's flag / avail_event load
        new = self._avail_idx
        old = self._kicked_idx
        self._kicked_idx = new
        if self.event_idx:
            return need_event(get16(self._used, self._avail_event), new, old)
        if new == old:
            return False
        return not get16(self._used, 0) & VIRTQ_USED_F_NO_NOTIFY

    def pop_used(self) -> tuple[int, int] | None:
        """The next completed chain as (head, bytes written), freeing its descriptors."""
        last = self._last_used
        idx = get16(self._used, 1)
        if idx == last:
            return None
        if (idx - last) & 0xFFFF > self.in_flight:
            raise QueueError(
                f"used index {idx} is {(idx - last) & 0xFFFF} ahead of {last}, "
                f"but only {self.in_flight} chain(s) are in flight"
            )
        head, written = _USED_ELEM.unpack_from(self._used_bytes, 4 + 8 * (last & self._mask))
        if head >= self.size or not self._count[head]:
            raise QueueError(f"device returned descriptor {head}, which is not in flight")
        self._last_used = last = (last + 1) & 0xFFFF
        self._next[self._tail[head]] = self._free_head
        self._free_head = head
        self.num_free += self._count[head]
        self._count[head] = 0
        self.in_flight -= 1
        if self.event_idx and self._interrupts:
            # Ask for an interrupt at the next completion, like virtqueue_get_buf.
            put16(self._avail, self._used_event, last)
        return head, written

    def disable_interrupts(self) -> None:
        """Ask the device not to interrupt; a hint, so spurious interrupts stay possible.

        With EVENT_IDX, used_event is simply no longer advanced, so the device
        interrupts at most once more.
        """
        self._interrupts = False
        if not self.event_idx:
            put16(self._avail, 0, get16(self._avail, 0) | VIRTQ_AVAIL_F_NO_INTERRUPT)

    def enable_interrupts(self) -> bool:
        """Ask for interrupts again; True if completions are already pending (poll them)."""
        self._interrupts = True
        if self.event_idx:
            put16(self._avail, self._used_event, self._last_used)
        else:
            put16(self._avail, 0, get16(self._avail, 0) & ~VIRTQ_AVAIL_F_NO_INTERRUPT)
        _fence()  # our store before the used->idx load
        return get16(self._used, 1) != self._last_used
