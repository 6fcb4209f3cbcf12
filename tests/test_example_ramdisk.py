"""examples/ramdisk.py, through the plugin loader and the blocking facade."""

from __future__ import annotations

from pathlib import Path

from vblk.storage.sync import open_disk

RAMDISK = Path(__file__).parent.parent / "examples" / "ramdisk.py"


def test_ramdisk_keeps_what_is_written() -> None:
    with open_disk(f"python:{RAMDISK}:RamDisk", size="1M") as disk:
        caps = disk.storage.caps
        assert caps.size == 1 << 20 and caps.writable and caps.write_zeroes and caps.discard
        assert not caps.flush
        disk.pwrite(4096, b"\xab" * 8192)
        buf = bytearray(8192)
        disk.pread(4096, buf)
        assert buf == b"\xab" * 8192
        disk.write_zeroes(8192, 4096)
        disk.pread(4096, buf)
        assert buf == b"\xab" * 4096 + bytes(4096)
        disk.discard(4096, 4096)
        disk.pread(4096, buf)
        assert buf == bytes(8192)
