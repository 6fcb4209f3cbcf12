"""examples/faulty.py: chosen ranges fail, the rest passes through to the wrapped spec."""

from __future__ import annotations

import errno
import time
from pathlib import Path

import pytest

from vblk.storage.sync import open_disk

FAULTY = Path(__file__).parent.parent / "examples" / "faulty.py"


def test_failing_and_slow_ranges(tmp_path: Path) -> None:
    base = tmp_path / "base.img"
    base.write_bytes(b"\x11" * (1 << 20))
    spec = f"python:{FAULTY}:Faulty"
    with open_disk(spec, spec=str(base), fail="64K-128K", delay="0-4K:150", ops="read") as disk:
        buf = bytearray(4096)
        with pytest.raises(OSError) as e:
            disk.pread(65536 + 4096, buf)
        assert e.value.errno == errno.EIO
        disk.pwrite(65536, b"w" * 4096)  # writes are not among the ops hit
        t0 = time.monotonic()
        disk.pread(0, buf)
        assert time.monotonic() - t0 >= 0.14 and buf == b"\x11" * 4096
        disk.pread(1 << 19, buf)  # elsewhere: plain and fast
        assert buf == b"\x11" * 4096
    assert base.read_bytes()[65536 : 65536 + 4096] == b"w" * 4096


def test_fail_rate_and_base_options(tmp_path: Path) -> None:
    inner = tmp_path / "ram.py"
    inner.write_text(
        "class R:\n def __init__(self, size): self.d = bytearray(int(size))\n"
        " def size(self): return len(self.d)\n"
        " def pread(self, o, b): b[:] = self.d[o:o+len(b)]\n"
    )
    spec = f"python:{FAULTY}:Faulty"
    with open_disk(
        spec, spec=f"python:{inner}:R", fail_rate="0.5", seed="7", **{"base.size": "65536"}
    ) as disk:
        assert disk.size() == 65536 and not disk.writable  # the base cannot write: neither can it
        failed = 0
        for _ in range(200):
            try:
                disk.pread(0, bytearray(512))
            except OSError:
                failed += 1
        assert 50 < failed < 150
    with pytest.raises(Exception, match="unknown option 'bogus'"):
        open_disk(spec, spec=f"python:{inner}:R", bogus="1")
