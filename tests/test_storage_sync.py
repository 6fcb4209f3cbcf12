"""Blocking helpers over a storage queue: run(), wait(), ControlQueue and the plugin facade Disk."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from helpers import MemStorage

from vblk.storage.base import Op
from vblk.storage.file import FileStorage
from vblk.storage.sync import ControlQueue, Disk, open_disk, run


def test_run_resubmits_short_transfers_and_raises_on_failure() -> None:
    mem = MemStorage(1 << 16, short=700)
    q = mem.open_queue(0, 4)
    data = memoryview(bytearray(os.urandom(4096)))
    assert run(q, Op.WRITE, 512, 4096, [data[:100], data[100:]]) == 4096
    assert mem.data[512 : 512 + 4096] == data
    assert len(mem.ops) == 6  # 700 bytes at a time
    mem.fail = {Op.FLUSH}
    with pytest.raises(OSError) as e:
        run(q, Op.FLUSH, 0, 0, [])
    assert e.value.errno == errno.EIO


@pytest.mark.parametrize("aio", ["sync", "threads", "io_uring"])
def test_control_queue_over_every_engine(tmp_path: Path, aio: str) -> None:
    if aio == "io_uring":
        from helpers import need_io_uring

        need_io_uring()
    p = tmp_path / "d.img"
    p.write_bytes(b"\xff" * 65536)
    st = FileStorage(str(p), aio=aio, io_threads=2)
    ctl = ControlQueue(st)
    try:
        assert ctl.run(Op.FLUSH, 0, 0, [], 0) == 0
        assert ctl.run(Op.WRITE_ZEROES, 0, 4096, [], 0) == 0
        buf = bytearray(8192)
        assert ctl.run(Op.READ, 0, 8192, [memoryview(buf)], 0) == 8192
        assert buf == bytes(4096) + b"\xff" * 4096
    finally:
        ctl.close()
        st.close()


def test_disk_facade_has_the_plugin_methods() -> None:
    mem = MemStorage(1 << 16, discard=True, write_zeroes=False)
    disk = Disk(mem)
    assert disk.size() == 1 << 16 and disk.block_size == 512 and disk.writable
    disk.pwrite(1024, b"hello" + bytes(507))
    buf = bytearray(512)
    disk.pread(1024, buf)
    assert buf.startswith(b"hello")
    disk.write_zeroes(1024, 512)  # no zeroing in the storage: written as zero buffers
    disk.pread(1024, buf)
    assert buf == bytes(512) and mem.ops[-2][0] == Op.WRITE
    disk.flush()
    disk.discard(0, 4096)
    assert [o[0] for o in mem.ops[-2:]] == [Op.FLUSH, Op.DISCARD]
    disk.close()
    assert mem.closed


def test_open_disk_on_a_raw_file(tmp_path: Path) -> None:
    p = tmp_path / "d.img"
    p.write_bytes(bytes(8192))
    with open_disk(str(p)) as disk:
        disk.pwrite(0, b"x" * 512)
        disk.flush()
    assert p.read_bytes()[:512] == b"x" * 512
    with open_disk(str(p), read_only=True) as disk:
        assert not disk.writable
        with pytest.raises(OSError):
            disk.pwrite(0, b"y" * 512)
