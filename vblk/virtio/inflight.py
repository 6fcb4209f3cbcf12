"""In-flight request tracking for split rings, kept in memory the frontend holds on to.

A backend that dies with requests in flight cannot learn from the ring alone
which of them it had finished: it completes out of order, so the used ring
says how many, not which. vhost-user's "Inflight I/O tracking"
(VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD) fixes that with a shared region the
backend updates as it pops and pushes; the frontend (QEMU) only keeps the fd
and hands it to the next backend process, which resubmits what is marked.

Layout, per queue, regions laid end to end (QEMU docs/interop/vhost-user.rst;
native byte order, since only backends read it)::

    header, 16 bytes: u64 features, u16 version, u16 desc_num,
                      u16 last_batch_head, u16 used_idx
    desc_num entries of 16 bytes: u8 inflight, u8 pad[5], u16 next, u64 counter

each queue's part rounded up to 64 bytes. :class:`QueueInflight` is one
queue's part; :class:`~vblk.virtio.queue.DeviceQueue` stores into it per
request, and :meth:`QueueInflight.recover` reads it when a queue starts. The
region comes from the frontend, so recovery trusts nothing in it: indexes are
range checked, loops are bounded by the queue size, and a bad entry is
dropped with a warning rather than resubmitted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from vblk.errors import QueueError

__all__ = [
    "ALIGNMENT",
    "ENTRY_SIZE",
    "HEADER_SIZE",
    "VERSION",
    "QueueInflight",
    "Recovery",
    "queue_region_size",
    "region_size",
]

log = logging.getLogger(__name__)

VERSION = 1
HEADER_SIZE = 16
ENTRY_SIZE = 16
ALIGNMENT = 64

# Header fields as u16 item numbers (bytes 8..15), and the u64 item of entry 0's counter.
_VERSION, _DESC_NUM, _LAST_BATCH_HEAD, _USED_IDX = 4, 5, 6, 7
_COUNTER0 = (HEADER_SIZE + 8) // 8


def queue_region_size(queue_size: int) -> int:
    """Bytes one queue's part takes: header and entries, rounded up to 64.

    Equal to libvhost-user's size for every queue size, so a region one of
    them wrote has the same layout for the other.
    """
    raw = HEADER_SIZE + ENTRY_SIZE * queue_size
    return (raw + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def region_size(num_queues: int, queue_size: int) -> int:
    """Bytes the whole region takes for ``num_queues`` queues of ``queue_size``."""
    return num_queues * queue_region_size(queue_size)


def flag_offset(head: int) -> int:
    """Byte offset of entry ``head``'s inflight flag within a queue's part."""
    return HEADER_SIZE + ENTRY_SIZE * head


def counter_item(head: int) -> int:
    """u64 item number of entry ``head``'s counter within a queue's part."""
    return _COUNTER0 + 2 * head


@dataclass(frozen=True)
class Recovery:
    """What a queue's part said when the queue started.

    ``fresh``: nobody had used it (version 0); the queue starts where the
    frontend says and resubmits nothing. Otherwise the queue resumes at
    ``last_avail_idx`` (used->idx plus what was in flight) and resubmits
    ``resubmit``, heads oldest first. ``dropped`` counts entries ignored as
    corrupt.
    """

    fresh: bool
    last_avail_idx: int = 0
    resubmit: tuple[int, ...] = ()
    counter: int = 0
    dropped: int = 0


class QueueInflight:
    """One queue's part of the region, with the views per-request stores go through.

    ``bytes``, ``u16`` and ``u64`` view the same memory; every field is
    written with a single item store, like the ring's own indexes.
    """

    def __init__(self, region: memoryview, desc_num: int) -> None:
        if not 0 < desc_num <= 0xFFFF:
            raise QueueError(f"inflight region for {desc_num} descriptors")
        need = queue_region_size(desc_num)
        if region.readonly:
            raise QueueError("inflight region is read-only")
        if region.format != "B" or region.ndim != 1:
            region = region.cast("B")
        if region.nbytes < need:
            raise QueueError(f"inflight region is {region.nbytes} bytes, needs {need}")
        self.desc_num = desc_num
        self.bytes = region[:need]
        self.u16 = self.bytes.cast("H")
        self.u64 = self.bytes.cast("Q")

    @property
    def version(self) -> int:
        return int(self.u16[_VERSION])

    @property
    def used_idx(self) -> int:
        return int(self.u16[_USED_IDX])

    @property
    def last_batch_head(self) -> int:
        return int(self.u16[_LAST_BATCH_HEAD])

    def inflight_heads(self) -> list[int]:
        """Heads whose inflight flag is set (any non-zero value), lowest first."""
        flags = self.bytes[HEADER_SIZE::ENTRY_SIZE][: self.desc_num]
        return [i for i, f in enumerate(flags.tobytes()) if f]

    def recover(self, used_idx: int, ring_size: int) -> Recovery:
        """Read (and repair) this part for a queue starting at used->idx ``used_idx``.

        Follows the spec's "When reconnecting" steps: if the last push was cut
        between publishing used->idx and clearing its flag, clear it now; then
        everything still flagged was popped and never completed. Those come
        back oldest first (by counter), renumbered 0..n-1 so counters stay
        small whatever the region held. A fresh part is claimed instead.
        """
        u16, flags = self.u16, self.bytes
        if u16[_VERSION] == 0:
            self._claim(used_idx)
            return Recovery(fresh=True)
        if u16[_DESC_NUM] != self.desc_num:
            # Written for another queue size: its entries mean nothing here.
            log.warning(
                "inflight region has %d descriptors, the frontend says %d: ignoring its contents",
                u16[_DESC_NUM],
                self.desc_num,
            )
            self.bytes[:] = bytes(len(self.bytes))
            self._claim(used_idx)
            return Recovery(fresh=True, dropped=1)
        dropped = 0
        if u16[_VERSION] != VERSION:
            log.warning("inflight region version %d, reading it as %d", u16[_VERSION], VERSION)
        if u16[_USED_IDX] != used_idx:
            last = u16[_LAST_BATCH_HEAD]
            if last < self.desc_num:
                flags[flag_offset(last)] = 0
            else:
                log.warning("inflight region: last batch head %d out of range", last)
                dropped += 1
            u16[_USED_IDX] = used_idx
        found: list[tuple[int, int]] = []
        for head in self.inflight_heads():
            flag = flags[flag_offset(head)]
            if flag != 1 or head >= ring_size:
                log.warning(
                    "inflight region: dropping entry %d (flag %d, ring of %d)",
                    head,
                    flag,
                    ring_size,
                )
                flags[flag_offset(head)] = 0
                dropped += 1
                continue
            found.append((int(self.u64[counter_item(head)]), head))
        found.sort()
        heads = tuple(head for _, head in found)
        for rank, head in enumerate(heads):
            self.u64[counter_item(head)] = rank
        return Recovery(
            fresh=False,
            last_avail_idx=(used_idx + len(heads)) & 0xFFFF,
            resubmit=heads,
            counter=len(heads),
            dropped=dropped,
        )

    def _claim(self, used_idx: int) -> None:
        """Initialise an unused part; the version goes last, as it marks the part valid."""
        self.u64[0] = 0  # features
        self.u16[_DESC_NUM] = self.desc_num
        self.u16[_LAST_BATCH_HEAD] = 0
        self.u16[_USED_IDX] = used_idx
        self.u16[_VERSION] = VERSION
