"""What format an image file is, from its first bytes; never from its name.

A guest can write any bytes to a raw disk, including a qcow2 header, so
the caller decides whether detection may be trusted (``--format raw``
skips it). The magics are those QEMU's block drivers probe for.
"""

from __future__ import annotations

import struct

__all__ = ["HEADER_BYTES", "detect_format", "probe"]

#: How much of the file :func:`probe` needs.
HEADER_BYTES = 512

# (format, offset, magic), checked in order.
_MAGICS: tuple[tuple[str, int, bytes], ...] = (
    ("qed", 0, b"QED\x00"),
    ("vmdk", 0, b"KDMV"),
    ("vmdk", 0, b"COWD"),
    ("vmdk", 0, b"# Disk DescriptorFile"),
    ("vhdx", 0, b"vhdxfile"),
    ("vpc", 0, b"conectix"),
    ("luks", 0, b"LUKS\xba\xbe"),
    ("parallels", 0, b"WithoutFreeSpace"),
    ("parallels", 0, b"WithouFreSpacExt"),
    ("bochs", 0, b"Bochs Virtual HD Image"),
    ("cloop", 0, b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0"),
)
_QCOW_MAGIC = b"QFI\xfb"
_VDI_SIGNATURE = 0xBEDA107F


def probe(header: bytes) -> str:
    """The format whose magic ``header`` starts with; ``raw`` when none matches."""
    if header[:4] == _QCOW_MAGIC and len(header) >= 8:
        (version,) = struct.unpack_from(">I", header, 4)
        return "qcow" if version == 1 else "qcow2"
    for fmt, off, magic in _MAGICS:
        if header[off : off + len(magic)] == magic:
            return fmt
    if len(header) >= 0x44 and struct.unpack_from("<I", header, 0x40)[0] == _VDI_SIGNATURE:
        return "vdi"
    return "raw"


def detect_format(path: str) -> str:
    """The format of the image at ``path`` (OSError if it cannot be read)."""
    with open(path, "rb", buffering=0) as f:
        return probe(f.read(HEADER_BYTES))
