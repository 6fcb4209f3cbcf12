"""The inflight region of one queue: layout, claiming, recovery, and corrupt contents."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vblk.errors import QueueError
from vblk.virtio.inflight import (
    VERSION,
    QueueInflight,
    queue_region_size,
    region_size,
)

HDR = struct.Struct("=QHHHH")  # features, version, desc_num, last_batch_head, used_idx
ENTRY = struct.Struct("=B5xHQ")  # inflight, pad, next, counter


def header(buf: bytearray) -> tuple[int, int, int, int, int]:
    return HDR.unpack_from(buf, 0)  # type: ignore[return-value]


def entry(buf: bytearray, i: int) -> tuple[int, int, int]:
    return ENTRY.unpack_from(buf, 16 + 16 * i)  # type: ignore[return-value]


def written(
    desc_num: int,
    entries: dict[int, tuple[int, int]],
    *,
    used_idx: int = 0,
    last_batch_head: int = 0,
    version: int = VERSION,
    header_desc_num: int | None = None,
) -> bytearray:
    """A region as a previous process left it: ``entries`` maps head -> (flag, counter)."""
    buf = bytearray(queue_region_size(desc_num))
    n = desc_num if header_desc_num is None else header_desc_num
    HDR.pack_into(buf, 0, 0, version, n, last_batch_head, used_idx)
    for head, (flag, counter) in entries.items():
        ENTRY.pack_into(buf, 16 + 16 * head, flag, 0, counter)
    return buf


def test_sizes_match_libvhost_user_for_every_queue_size() -> None:
    # libvhost-user: ALIGN_UP(sizeof(VuDescStateSplit) * queue_size + sizeof(uint16_t), 64).
    # The same stride means a region either of us wrote reads right for the other.
    for qs in range(1, 1025):
        assert queue_region_size(qs) == (16 * qs + 2 + 63) // 64 * 64
        assert queue_region_size(qs) >= 16 + 16 * qs
    assert region_size(2, 128) == 2 * 2112


def test_a_fresh_region_is_claimed_and_resubmits_nothing() -> None:
    buf = bytearray(queue_region_size(128))
    rec = QueueInflight(memoryview(buf), 128).recover(used_idx=700, ring_size=128)
    assert rec.fresh and rec.resubmit == () and rec.counter == 0
    assert header(buf) == (0, VERSION, 128, 0, 700)


def test_flagged_entries_come_back_oldest_first_renumbered() -> None:
    buf = written(8, {5: (1, 900), 2: (1, 17), 7: (1, 400), 3: (0, 5)}, used_idx=10)
    region = QueueInflight(memoryview(buf), 8)
    assert region.inflight_heads() == [2, 5, 7]
    rec = region.recover(used_idx=10, ring_size=8)
    assert not rec.fresh
    assert rec.resubmit == (2, 7, 5)  # by counter: 17, 400, 900
    assert rec.last_avail_idx == 13 and rec.counter == 3 and rec.dropped == 0
    assert [entry(buf, h)[2] for h in (2, 7, 5)] == [0, 1, 2]
    assert [entry(buf, h)[0] for h in (2, 7, 5)] == [1, 1, 1]  # still in flight


def test_a_push_cut_after_publishing_is_completed_by_recovery() -> None:
    # The process died after used->idx became 11 but before it cleared head 4's flag.
    buf = written(8, {4: (1, 3), 6: (1, 2)}, used_idx=10, last_batch_head=4)
    rec = QueueInflight(memoryview(buf), 8).recover(used_idx=11, ring_size=8)
    assert rec.resubmit == (6,)
    assert rec.last_avail_idx == 12
    assert entry(buf, 4)[0] == 0 and header(buf)[4] == 11


def test_the_avail_index_wraps() -> None:
    buf = written(4, {0: (1, 0), 1: (1, 1)}, used_idx=0xFFFF)
    rec = QueueInflight(memoryview(buf), 4).recover(used_idx=0xFFFF, ring_size=4)
    assert rec.last_avail_idx == 1


def test_bad_entries_are_dropped_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    # flag 7 is no flag; head 6 is outside a 4-entry ring; the batch head is out of range.
    buf = written(8, {1: (7, 0), 6: (1, 1), 2: (1, 2)}, used_idx=0, last_batch_head=999)
    rec = QueueInflight(memoryview(buf), 8).recover(used_idx=5, ring_size=4)
    assert rec.resubmit == (2,)
    assert rec.dropped == 3
    assert entry(buf, 1)[0] == 0 and entry(buf, 6)[0] == 0  # cleared, so not met again
    assert caplog.text.count("inflight region") == 3


def test_a_region_for_another_queue_size_is_not_trusted() -> None:
    buf = written(8, {1: (1, 0)}, header_desc_num=16)
    rec = QueueInflight(memoryview(buf), 8).recover(used_idx=3, ring_size=8)
    assert rec.fresh and rec.resubmit == () and rec.dropped == 1
    assert header(buf) == (0, VERSION, 8, 0, 3) and entry(buf, 1)[0] == 0


def test_a_region_too_small_or_read_only_is_refused() -> None:
    with pytest.raises(QueueError, match="needs"):
        QueueInflight(memoryview(bytearray(100)), 8)
    with pytest.raises(QueueError, match="read-only"):
        QueueInflight(memoryview(bytes(queue_region_size(8))), 8)
    with pytest.raises(QueueError):
        QueueInflight(memoryview(bytearray(64)), 0)


@settings(max_examples=300, deadline=None)
@given(
    data=st.binary(min_size=queue_region_size(16), max_size=queue_region_size(16)),
    used_idx=st.integers(0, 0xFFFF),
    ring_size=st.sampled_from([1, 2, 8, 16]),
)
def test_any_region_contents_recover_to_something_sane(
    data: bytes, used_idx: int, ring_size: int
) -> None:
    buf = bytearray(data)
    rec = QueueInflight(memoryview(buf), 16).recover(used_idx, ring_size)
    heads = rec.resubmit
    assert len(set(heads)) == len(heads) <= ring_size
    assert all(0 <= h < ring_size for h in heads)
    assert rec.counter == len(heads)
    if rec.fresh:
        assert heads == ()  # the frontend's base stands
    else:
        assert rec.last_avail_idx == (used_idx + len(heads)) & 0xFFFF
    # Recovering again (a second restart before any progress) gives the same answer.
    again = QueueInflight(memoryview(buf), 16).recover(used_idx, ring_size)
    if not rec.fresh:
        assert again.resubmit == heads and again.dropped == 0
