"""tools/guest.py's QEMU command line, without booting anything (tests/e2e boots it)."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import guest as guest_tool

G = guest_tool.Guest(Path("/k"), Path("/i"))


def _arg(cmd: list[str], flag: str, contains: str) -> str:
    return next(v for f, v in itertools.pairwise(cmd) if f == flag and contains in v)


def test_builtin_virtio_blk_takes_the_aio_mode_and_queue_count() -> None:
    cmd = guest_tool.qemu_command(G, "/i", image="/d.img", num_queues=2, smp=2, aio="io_uring")
    drive = _arg(cmd, "-drive", "file=/d.img")
    assert "cache=none" in drive.split(",") and "aio=io_uring" in drive.split(",")
    assert _arg(cmd, "-device", "virtio-blk-pci") == "virtio-blk-pci,drive=d0,num-queues=2"
    default = guest_tool.qemu_command(G, "/i", image="/d.img")
    assert "aio=threads" in _arg(default, "-drive", "file=/d.img").split(",")


def test_vhost_user_disk_shares_guest_memory() -> None:
    cmd = guest_tool.qemu_command(G, "/i", socket="/s", num_queues=2, mem="256M")
    assert _arg(cmd, "-object", "memfd") == "memory-backend-memfd,id=mem,size=256M,share=on"
    assert _arg(cmd, "-device", "vhost-user-blk") == "vhost-user-blk-pci,chardev=c0,num-queues=2"
    with pytest.raises(ValueError):
        guest_tool.qemu_command(G, "/i")
