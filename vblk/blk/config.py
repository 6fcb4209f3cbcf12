"""The virtio-blk configuration space (struct virtio_blk_config), as bytes.

The frontend reads it with GET_CONFIG at any offset and length, and writes one
field (``writeback``) with SET_CONFIG, so the layout lives here in one place.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

# capacity, size_max, seg_max, geometry(cyl, heads, sectors), blk_size,
# topology(phys_exp, align_off, min_io, opt_io), writeback, unused0, num_queues,
# max_discard_sectors, max_discard_seg, discard_sector_alignment,
# max_write_zeroes_sectors, max_write_zeroes_seg, write_zeroes_may_unmap, unused1[3],
# max_secure_erase_sectors, max_secure_erase_seg, secure_erase_sector_alignment
_LAYOUT = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3xIII")

CONFIG_SIZE = _LAYOUT.size
#: Offset of the only field a driver may write.
WRITEBACK_OFFSET = 32

#: Descriptors of a request besides its data: the header and the status byte.
CHAIN_OVERHEAD = 2
#: The ring QEMU gives vhost-user-blk-pci unless told otherwise (queue-size=128).
DEFAULT_FRONTEND_RING = 128
#: Queues a backend may offer: QEMU's VIRTIO_QUEUE_MAX, the most vhost-user-blk-pci can use.
MAX_NUM_QUEUES = 1024
#: Queues offered by default: QEMU gives a guest one per vCPU unless told otherwise, and a
#: queue the frontend never starts costs nothing, so enough for any guest on this host.
DEFAULT_NUM_QUEUES = min(MAX_NUM_QUEUES, max(64, os.cpu_count() or 1))
#: Linux's VIRTIO_BLK_MAX_SG_ELEMS: no request of a Linux guest has more descriptors.
LINUX_MAX_CHAIN = 32768


def seg_max_for(max_ring: int) -> int:
    """The seg_max to state when the frontend may pick any ring of up to ``max_ring`` entries.

    The frontend reads seg_max (GET_CONFIG) before any ring size is set, so
    it must suit every ring the device serves. A Linux guest (6.1) caps a
    request at seg_max data segments, plus header and status:

    - with INDIRECT_DESC the request takes one ring slot and an indirect table
      of seg_max + 2 entries, so every ring size works (the device walks
      tables of up to :data:`LINUX_MAX_CHAIN` entries);
    - without it the request takes seg_max + 2 ring slots, and a request
      longer than the ring can never be added: the guest waits forever.

    So seg_max is the largest value that keeps a direct request inside
    QEMU's default ring, or inside ``max_ring`` when that is smaller. Rings
    below :func:`min_direct_ring` are then served only with INDIRECT_DESC.
    """
    ring = min(max_ring, DEFAULT_FRONTEND_RING)
    return max(1, ring - CHAIN_OVERHEAD)


def min_direct_ring(seg_max: int) -> int:
    """The smallest ring that holds every request of a guest without INDIRECT_DESC."""
    return min(seg_max, LINUX_MAX_CHAIN - CHAIN_OVERHEAD) + CHAIN_OVERHEAD


@dataclass
class BlkConfig:
    """Field values of the config space; unused fields stay zero."""

    capacity: int  # in 512-byte sectors
    seg_max: int
    blk_size: int = 512
    physical_block_exp: int = 0
    alignment_offset: int = 0
    min_io_size: int = 1  # in logical blocks
    opt_io_size: int = 0
    writeback: int = 1
    num_queues: int = 1
    max_discard_sectors: int = 0
    max_discard_seg: int = 0
    discard_sector_alignment: int = 0
    max_write_zeroes_sectors: int = 0
    max_write_zeroes_seg: int = 0
    write_zeroes_may_unmap: int = 0
    size_max: int = 0

    def pack(self) -> bytes:
        """The config space as the driver sees it (little-endian)."""
        return _LAYOUT.pack(
            self.capacity,
            self.size_max,
            self.seg_max,
            0,
            0,
            0,
            self.blk_size,
            self.physical_block_exp,
            self.alignment_offset,
            self.min_io_size,
            self.opt_io_size,
            self.writeback,
            0,
            self.num_queues,
            self.max_discard_sectors,
            self.max_discard_seg,
            self.discard_sector_alignment,
            self.max_write_zeroes_sectors,
            self.max_write_zeroes_seg,
            self.write_zeroes_may_unmap,
            0,
            0,
            0,
        )

    @classmethod
    def unpack(cls, data: bytes) -> BlkConfig:
        """Parse a config space read from a device; short reads are zero padded."""
        f = _LAYOUT.unpack(bytes(data[:CONFIG_SIZE]).ljust(CONFIG_SIZE, b"\0"))
        return cls(
            capacity=f[0],
            size_max=f[1],
            seg_max=f[2],
            blk_size=f[6],
            physical_block_exp=f[7],
            alignment_offset=f[8],
            min_io_size=f[9],
            opt_io_size=f[10],
            writeback=f[11],
            num_queues=f[13],
            max_discard_sectors=f[14],
            max_discard_seg=f[15],
            discard_sector_alignment=f[16],
            max_write_zeroes_sectors=f[17],
            max_write_zeroes_seg=f[18],
            write_zeroes_may_unmap=f[19],
        )

    def read(self, offset: int, size: int) -> bytes | None:
        """Bytes [offset, offset+size) of the space, or None when out of range."""
        if offset < 0 or size < 0 or offset + size > CONFIG_SIZE:
            return None
        return self.pack()[offset : offset + size]
