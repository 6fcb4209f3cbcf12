"""examples/cow.py: writes land in the overlay, the base never changes."""

from __future__ import annotations

import os
from pathlib import Path

from vblk.storage.sync import open_disk

COW = Path(__file__).parent.parent / "examples" / "cow.py"


def test_overlay_over_a_read_only_base(tmp_path: Path) -> None:
    base = tmp_path / "base.img"
    original = os.urandom(1 << 20)
    base.write_bytes(original)
    with open_disk(f"python:{COW}:Cow", spec=str(base), chunk="4K") as disk:
        assert disk.size() == 1 << 20 and disk.writable
        disk.pwrite(6144, b"N" * 1024)  # inside one chunk: read-modify-write from the base
        disk.write_zeroes(65536, 8192)  # two whole chunks
        buf = bytearray(1 << 20)
        disk.pread(0, buf)
    want = bytearray(original)
    want[6144:7168] = b"N" * 1024
    want[65536 : 65536 + 8192] = bytes(8192)
    assert buf == want
    assert base.read_bytes() == original  # the base is untouched
