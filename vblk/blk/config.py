"""The virtio-blk configuration space (struct virtio_blk_config), as bytes.

The frontend reads it with GET_CONFIG at any offset and length, and writes one
field (``writeback``) with SET_CONFIG, so the layout lives here in one place.
"""

from __future__ import annotations

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
