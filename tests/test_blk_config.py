"""The virtio-blk config space layout and the seg_max rule."""

from __future__ import annotations

import pytest

from vblk.blk.config import (
    CHAIN_OVERHEAD,
    CONFIG_SIZE,
    DEFAULT_FRONTEND_RING,
    LINUX_MAX_CHAIN,
    BlkConfig,
    min_direct_ring,
    seg_max_for,
)
from vblk.virtio.defs import MAX_QUEUE_SIZE
from vblk.virtio.queue import MAX_INDIRECT_ENTRIES

RING_SIZES = [1 << k for k in range(16)]  # 1 .. 32768


def test_pack_unpack_round_trip() -> None:
    cfg = BlkConfig(capacity=1 << 21, seg_max=126, num_queues=64, writeback=0)
    data = cfg.pack()
    assert len(data) == CONFIG_SIZE
    assert BlkConfig.unpack(data) == cfg


@pytest.mark.parametrize("cap", RING_SIZES)
def test_seg_max_suits_every_ring_up_to_the_cap(cap: int) -> None:
    seg_max = seg_max_for(cap)
    assert seg_max >= 1
    longest = min(seg_max, LINUX_MAX_CHAIN - CHAIN_OVERHEAD) + CHAIN_OVERHEAD
    # INDIRECT_DESC: one ring slot and a table the device walks, at every ring size.
    assert longest <= MAX_INDIRECT_ENTRIES
    # Without it, every ring from min_direct_ring up holds the longest request...
    assert min_direct_ring(seg_max) == longest
    for ring in RING_SIZES:
        if min_direct_ring(seg_max) <= ring <= cap:
            assert longest <= ring
    # ...and that includes QEMU's default ring, or the cap itself when it is smaller
    # (a request needs 3 descriptors at least: rings of 1 and 2 need INDIRECT_DESC).
    if cap >= DEFAULT_FRONTEND_RING:
        assert min_direct_ring(seg_max) == DEFAULT_FRONTEND_RING
    elif cap >= 1 + CHAIN_OVERHEAD:
        assert min_direct_ring(seg_max) == cap


def test_seg_max_by_default_is_the_default_ring_less_header_and_status() -> None:
    assert seg_max_for(MAX_QUEUE_SIZE) == 126
    assert seg_max_for(1024) == 126
    assert seg_max_for(16) == 14
    assert seg_max_for(2) == 1
    assert seg_max_for(1) == 1  # a guest needs one segment, whatever the device says
