"""virtio constants and split-ring geometry (virtio 1.2, section 2.7).

Shared by the device side (:mod:`vblk.virtio.queue`) and the driver side
(:mod:`vblk.virtio.driver`) so both agree on every byte offset.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "MAX_QUEUE_SIZE",
    "VHOST_USER_F_PROTOCOL_FEATURES",
    "VIRTIO_F_ANY_LAYOUT",
    "VIRTIO_F_NOTIFY_ON_EMPTY",
    "VIRTIO_F_RING_EVENT_IDX",
    "VIRTIO_F_RING_INDIRECT_DESC",
    "VIRTIO_F_VERSION_1",
    "VIRTQ_AVAIL_F_NO_INTERRUPT",
    "VIRTQ_DESC_F_INDIRECT",
    "VIRTQ_DESC_F_NEXT",
    "VIRTQ_DESC_F_WRITE",
    "VIRTQ_USED_F_NO_NOTIFY",
    "RingLayout",
    "avail_ring_bytes",
    "desc_table_bytes",
    "is_queue_size",
    "need_event",
    "ring_layout",
    "used_ring_bytes",
]

# Feature bit numbers.
VIRTIO_F_NOTIFY_ON_EMPTY = 24
VIRTIO_F_ANY_LAYOUT = 27
VIRTIO_F_RING_INDIRECT_DESC = 28
VIRTIO_F_RING_EVENT_IDX = 29
VHOST_USER_F_PROTOCOL_FEATURES = 30
VIRTIO_F_VERSION_1 = 32

# Descriptor flags.
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4

# Ring flags: the driver asks for no interrupts, the device for no kicks.
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

#: Largest split-ring size the spec allows; sizes are powers of two.
MAX_QUEUE_SIZE = 32768


def is_queue_size(size: int) -> bool:
    """Whether ``size`` is a split-ring size: a power of two in 1..MAX_QUEUE_SIZE.

    The 16-bit free-running ring indexes wrap cleanly only for powers of two,
    and Linux refuses any other length.
    """
    return 0 < size <= MAX_QUEUE_SIZE and not size & (size - 1)


#: Bytes of one descriptor (le64 addr, le32 len, le16 flags, le16 next).
DESC_SIZE = 16
#: Bytes of one used element (le32 id, le32 len).
USED_ELEM_SIZE = 8


def need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """Whether moving an index from ``old_idx`` to ``new_idx`` crossed ``event_idx``.

    The event index names the entry the other side wants to hear about; all
    arithmetic is modulo 2**16 because ring indexes are free-running u16.
    """
    return (new_idx - event_idx - 1) & 0xFFFF < (new_idx - old_idx) & 0xFFFF


def desc_table_bytes(n: int) -> int:
    """Descriptor table of ``n`` entries."""
    return DESC_SIZE * n


def avail_ring_bytes(n: int) -> int:
    """Avail ring: flags, idx, ``n`` heads and used_event."""
    return 6 + 2 * n


def used_ring_bytes(n: int) -> int:
    """Used ring: flags, idx, ``n`` elements and avail_event."""
    return 6 + USED_ELEM_SIZE * n


@dataclass(frozen=True)
class RingLayout:
    """Byte offsets of the three parts of a ring laid out in one area.

    ``desc`` is 0 (16-aligned if the area is), ``avail`` follows the table
    (2-aligned), ``used`` starts at the next 4-byte boundary: virtio 1.x sets
    each part's address separately, so the legacy 4096 alignment is not needed.
    ``total`` is the area size including the used ring.
    """

    size: int
    desc: int
    avail: int
    used: int
    total: int

    def views(self, area: memoryview) -> tuple[memoryview, memoryview, memoryview]:
        """The (desc, avail, used) parts of a ring laid out at the start of ``area``."""
        n = self.size
        return (
            area[self.desc : self.desc + desc_table_bytes(n)],
            area[self.avail : self.avail + avail_ring_bytes(n)],
            area[self.used : self.used + used_ring_bytes(n)],
        )


def ring_layout(size: int) -> RingLayout:
    """Compact layout for a ring of ``size`` entries."""
    if not 0 < size <= MAX_QUEUE_SIZE:
        raise ValueError(f"queue size {size} out of range 1..{MAX_QUEUE_SIZE}")
    avail = desc_table_bytes(size)
    used = (avail + avail_ring_bytes(size) + 3) & ~3
    return RingLayout(size, 0, avail, used, used + used_ring_bytes(size))
