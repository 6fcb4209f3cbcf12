"""Device side of the split ring, fed by hand-built (often hostile) rings."""

from __future__ import annotations

import mmap
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vblk.blk.config import min_direct_ring, seg_max_for
from vblk.errors import QueueError
from vblk.memory import GuestMemory
from vblk.virtio import defs as vdefs
from vblk.virtio.defs import MAX_QUEUE_SIZE
from vblk.virtio.inflight import QueueInflight, queue_region_size
from vblk.virtio.queue import Chain, DeviceQueue

NEXT = vdefs.VIRTQ_DESC_F_NEXT
WRITE = vdefs.VIRTQ_DESC_F_WRITE
INDIRECT = vdefs.VIRTQ_DESC_F_INDIRECT

GPA = 0x100000  # RAM starts here: gpa 0 is unmapped
RAM = 0x40000
RING = GPA  # ring area at the start of RAM
DATA = GPA + 0x20000  # buffers and indirect tables from here
UADDR = 0x7F12_0000_0000


class MockRing:
    """A split ring laid out by hand in bytearray-backed guest memory.

    Plays a driver that writes whatever the test says, valid or not, much like
    rust-vmm's MockSplitQueue.
    """

    def __init__(
        self,
        size: int,
        *,
        event_idx: bool = False,
        indirect: bool = True,
        start_idx: int = 0,
    ) -> None:
        self.size = size
        self.ram = bytearray(RAM)
        self.mem = GuestMemory()
        self.mem.add(GPA, RAM, UADDR, memoryview(self.ram))
        lay = vdefs.ring_layout(size)
        assert lay.total <= DATA - GPA
        self.desc_off, self.avail_off, self.used_off = lay.desc, lay.avail, lay.used
        self.avail_idx = start_idx
        self.put16(self.avail_off + 2, start_idx)
        self.put16(self.used_off + 2, start_idx)
        self.q = DeviceQueue(
            self.mem,
            size,
            self.mem.translate(RING + lay.desc, vdefs.desc_table_bytes(size)),
            self.mem.translate(RING + lay.avail, vdefs.avail_ring_bytes(size)),
            self.mem.translate(RING + lay.used, vdefs.used_ring_bytes(size)),
            event_idx=event_idx,
            last_avail_idx=start_idx,
            indirect=indirect,
        )

    def restart(self, last_avail_idx: int, inflight: QueueInflight | None) -> DeviceQueue:
        """A new DeviceQueue over the same ring, as a restarted backend would build it."""
        lay = vdefs.ring_layout(self.size)
        self.q = DeviceQueue(
            self.mem,
            self.size,
            self.mem.translate(RING + lay.desc, vdefs.desc_table_bytes(self.size)),
            self.mem.translate(RING + lay.avail, vdefs.avail_ring_bytes(self.size)),
            self.mem.translate(RING + lay.used, vdefs.used_ring_bytes(self.size)),
            event_idx=False,
            last_avail_idx=last_avail_idx,
            inflight=inflight,
        )
        return self.q

    def put16(self, off: int, v: int) -> None:
        struct.pack_into("<H", self.ram, off, v)

    def get16(self, off: int) -> int:
        return int(struct.unpack_from("<H", self.ram, off)[0])

    def desc(self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0) -> None:
        struct.pack_into("<QIHH", self.ram, self.desc_off + 16 * i, addr, length, flags, nxt)

    def table(self, gpa: int, entries: list[tuple[int, int, int, int]]) -> None:
        """Write an indirect table at ``gpa``."""
        for k, e in enumerate(entries):
            struct.pack_into("<QIHH", self.ram, gpa - GPA + 16 * k, *e)

    def publish(self, *heads: int) -> None:
        for h in heads:
            self.put16(self.avail_off + 4 + 2 * (self.avail_idx % self.size), h)
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.put16(self.avail_off + 2, self.avail_idx)

    def used_idx(self) -> int:
        return self.get16(self.used_off + 2)

    def used_elem(self, n: int) -> tuple[int, int]:
        off = self.used_off + 4 + 8 * (n % self.size)
        return tuple(struct.unpack_from("<II", self.ram, off))  # type: ignore[return-value]

    def set_used_event(self, v: int) -> None:
        self.put16(self.avail_off + 4 + 2 * self.size, v)

    def avail_event(self) -> int:
        return self.get16(self.used_off + 4 + 8 * self.size)

    def pop_checked(self) -> Chain | None:
        """pop(), asserting it writes nothing to guest memory."""
        before = bytes(self.ram)
        chain = self.q.pop()
        assert bytes(self.ram) == before
        return chain


def lens(views: list[memoryview]) -> list[int]:
    return [len(v) for v in views]


# -- well-formed chains ----------------------------------------------------------


def test_simple_chain_roundtrip() -> None:
    r = MockRing(8)
    r.ram[DATA - GPA : DATA - GPA + 4] = b"head"
    r.desc(3, DATA, 4, NEXT, 5)
    r.desc(5, DATA + 0x100, 16, NEXT | WRITE, 1)
    r.desc(1, DATA + 0x200, 1, WRITE)
    r.publish(3)
    chain = r.pop_checked()
    assert chain is not None and chain.error is None
    assert chain.head == 3
    assert [bytes(v) for v in chain.readable] == [b"head"]
    assert lens(chain.writable) == [16, 1]
    assert chain.readable_len == 4 and chain.writable_len == 17
    chain.writable[1][0] = 0x42
    assert r.ram[DATA + 0x200 - GPA] == 0x42
    assert r.pop_checked() is None
    r.q.push(3, 17)
    assert r.used_idx() == 1 and r.used_elem(0) == (3, 17)
    assert r.q.used_idx == 1


def test_empty_ring_and_many_chains() -> None:
    r = MockRing(4)
    assert r.q.pop() is None
    for i in range(4):
        r.desc(i, DATA + 0x100 * i, 8, WRITE)
    r.publish(2, 0, 3, 1)
    heads = []
    while (c := r.q.pop()) is not None:
        assert c.error is None and lens(c.writable) == [8]
        heads.append(c.head)
    assert heads == [2, 0, 3, 1]
    for h in heads:
        r.q.push(h, 8)
    assert r.used_idx() == 4
    assert [r.used_elem(n)[0] for n in range(4)] == heads


def test_zero_length_descriptors_are_empty_segments() -> None:
    r = MockRing(4)
    r.desc(0, DATA, 0, NEXT, 1)
    r.desc(1, DATA + 8, 0, WRITE)
    r.publish(0)
    c = r.pop_checked()
    assert c is not None and c.error is None
    assert lens(c.readable) == [0] and lens(c.writable) == [0]


def test_indirect_chain() -> None:
    r = MockRing(4)
    tbl = DATA + 0x1000
    r.table(
        tbl,
        [
            (DATA, 16, NEXT, 2),
            (DATA + 0x300, 1, WRITE, 0),
            (DATA + 0x100, 512, NEXT | WRITE, 1),
        ],
    )
    r.desc(0, DATA + 0x800, 4, NEXT, 2)  # direct descriptors may precede the table
    r.desc(2, tbl, 3 * 16, INDIRECT | WRITE)  # WRITE on the table descriptor is ignored
    r.publish(0)
    c = r.pop_checked()
    assert c is not None and c.error is None
    assert lens(c.readable) == [4, 16] and lens(c.writable) == [512, 1]


def test_full_length_chain_is_not_a_loop() -> None:
    n = 16
    r = MockRing(n)
    for i in range(n):
        r.desc(i, DATA + i, 1, NEXT if i < n - 1 else 0, i + 1)
    r.publish(0)
    c = r.pop_checked()
    assert c is not None and c.error is None and len(c.readable) == n


@pytest.mark.parametrize("size", [1, 2, 4, 64, 128, 256, 2048])
def test_the_longest_request_a_guest_builds_walks_at_every_ring_size(size: int) -> None:
    """seg_max data segments plus header and status: indirect at any size, direct if it fits."""
    seg_max = seg_max_for(MAX_QUEUE_SIZE)
    longest = [(DATA, 16, NEXT, 1)]  # header
    longest += [(DATA + 0x100 + 512 * k, 512, NEXT, 2 + k) for k in range(seg_max)]
    longest += [(DATA + 0x100 + 512 * seg_max, 1, WRITE, 0)]  # status
    r = MockRing(size)
    tbl = DATA + 0x10000
    r.table(tbl, longest)
    r.desc(0, tbl, 16 * len(longest), INDIRECT)
    r.publish(0)
    c = r.pop_checked()
    assert c is not None and c.error is None
    assert len(c.readable) == 1 + seg_max and lens(c.writable) == [1]
    if size < min_direct_ring(seg_max):
        return  # the session refuses such rings without INDIRECT_DESC
    r = MockRing(size, indirect=False)
    for i, (addr, length, flags, nxt) in enumerate(longest):
        r.desc(i, addr, length, flags, nxt)
    r.publish(0)
    c = r.pop_checked()
    assert c is not None and c.error is None
    assert len(c.readable) == 1 + seg_max and lens(c.writable) == [1]


def test_a_failed_queue_answers_every_chain_with_its_reason() -> None:
    r = MockRing(8)
    r.q.failed = "queue 0: ring size 1024 refused"
    r.desc(3, DATA, 16, NEXT, 4)
    r.desc(4, DATA + 0x200, 1, WRITE)
    r.publish(3)
    c = r.pop_checked()
    assert c is not None and c.error == "queue 0: ring size 1024 refused"
    assert lens(c.writable) == [1]  # the status byte, for an IOERR
    r.q.push(3, 1)
    assert r.used_elem(0) == (3, 1)


# -- malicious chains: a Chain with error, consumed, never an exception --------


def bad_chain(r: MockRing, head: int = 0) -> Chain:
    r.publish(head)
    c = r.pop_checked()
    assert c is not None and c.error is not None, c
    assert r.q.broken is None
    assert r.q.last_avail_idx == r.avail_idx  # consumed
    return c


def test_loop() -> None:
    r = MockRing(8)
    r.desc(0, DATA, 4, NEXT, 1)
    r.desc(1, DATA, 4, NEXT, 0)
    c = bad_chain(r)
    assert "loop" in (c.error or "")
    assert len(c.readable) == 8  # stopped after a ring's worth


def test_self_loop_size_one() -> None:
    r = MockRing(1)
    r.desc(0, DATA, 4, NEXT, 0)
    c = bad_chain(r)
    assert len(c.readable) == 1


def test_next_out_of_range() -> None:
    r = MockRing(8)
    r.desc(0, DATA, 4, NEXT, 8)
    c = bad_chain(r)
    assert "next 8" in (c.error or "") and lens(c.readable) == [4]


@pytest.mark.parametrize(
    ("addr", "length"),
    [
        (0, 4),  # below RAM
        (GPA + RAM, 1),  # just past RAM
        (GPA + RAM - 4, 8),  # straddles the end
        (GPA - 4, 8),  # straddles the start
        (GPA + RAM, 0),  # zero length, but unmapped
        (2**64 - 8, 16),  # wraps u64
        (DATA, 0xFFFF_0000),  # longer than the region
    ],
)
def test_unmapped_buffer(addr: int, length: int) -> None:
    r = MockRing(4)
    r.desc(0, DATA, 2, WRITE | NEXT, 1)
    r.desc(1, addr, length, WRITE)
    c = bad_chain(r)
    # The bad descriptor is the last one. Only its own last byte can be the status
    # (when that byte is mapped); the earlier data buffer is never mistaken for one.
    assert c.readable == [] and lens(c.writable) in ([], [1])
    assert "not mapped" in (c.error or "")


def test_unmapped_data_buffer_salvages_the_status_byte() -> None:
    r = MockRing(4)
    r.desc(0, DATA, 16, NEXT, 1)  # header
    r.desc(1, 0xDEAD_0000_0000, 4096, WRITE | NEXT, 2)  # data: unmapped
    r.desc(2, DATA + 100, 1, WRITE)  # status
    c = bad_chain(r)
    assert "not mapped" in (c.error or "")
    assert lens(c.writable) == [1] and c.readable == []
    c.writable[0][0] = 0x55
    assert r.mem.translate(DATA + 100, 1)[0] == 0x55


def test_unmapped_buffer_salvage_does_not_follow_loops() -> None:
    r = MockRing(4)
    r.desc(0, 0xDEAD_0000_0000, 16, NEXT, 1)
    r.desc(1, DATA, 1, WRITE | NEXT, 2)
    r.desc(2, DATA, 1, WRITE | NEXT, 1)  # 1 -> 2 -> 1 ...
    c = bad_chain(r)
    assert c.error is not None and c.writable == []


def test_salvaged_status_must_be_writable_and_mapped() -> None:
    r = MockRing(4)
    r.desc(0, 0xDEAD_0000_0000, 16, NEXT, 1)
    r.desc(1, DATA, 1, 0)  # last descriptor is device-readable: no status
    assert bad_chain(r).writable == []
    r2 = MockRing(4)
    r2.desc(0, 0xDEAD_0000_0000, 16, NEXT, 1)
    r2.desc(1, 0xBEEF_0000_0000, 1, WRITE)  # last descriptor unmapped: no status
    assert bad_chain(r2).writable == []


def test_readable_after_writable() -> None:
    r = MockRing(4)
    r.desc(0, DATA, 4, WRITE | NEXT, 1)
    r.desc(1, DATA, 4, 0)
    c = bad_chain(r)
    assert "readable after" in (c.error or "")
    assert c.writable == [] and c.readable == []  # last descriptor is not writable: no status


def test_readable_after_writable_across_indirect() -> None:
    r = MockRing(4)
    tbl = DATA + 0x1000
    r.table(tbl, [(DATA, 4, 0, 0)])
    r.desc(0, DATA, 1, WRITE | NEXT, 1)
    r.desc(1, tbl, 16, INDIRECT)
    assert "readable after" in (bad_chain(r).error or "")


def test_chain_longer_than_4g() -> None:
    """Total length is checked before the buffers, so >4 GiB needs a big (untouched) region."""
    big = 0x1000_0000
    mm = mmap.mmap(-1, big)
    r = MockRing(32)
    r.mem.add(0x1_0000_0000, big, UADDR + 0x1_0000_0000, memoryview(mm))
    for i in range(17):  # 17 * 256 MiB > 4 GiB - 1
        r.desc(i, 0x1_0000_0000, big, NEXT, i + 1)
    r.desc(16, 0x1_0000_0000, big, 0)
    c = bad_chain(r)
    assert "exceeds" in (c.error or "") and c.readable == [] and c.writable == []
    del c
    r.mem.clear()


def test_indirect_in_indirect() -> None:
    r = MockRing(4)
    tbl = DATA + 0x1000
    r.table(tbl, [(DATA, 4, NEXT, 1), (tbl, 32, INDIRECT, 0)])
    r.desc(0, tbl, 32, INDIRECT)
    c = bad_chain(r)
    assert "indirect table" in (c.error or "") and lens(c.readable) == [4]


def test_indirect_with_next() -> None:
    r = MockRing(4)
    r.table(DATA + 0x1000, [(DATA, 4, 0, 0)])
    r.desc(0, DATA + 0x1000, 16, INDIRECT | NEXT, 1)
    r.desc(1, DATA, 4, 0)
    assert "NEXT" in (bad_chain(r).error or "")


@pytest.mark.parametrize("length", [0, 8, 17, 24, (32768 + 1) * 16, 0xFFFFFFF0])
def test_indirect_bad_table_length(length: int) -> None:
    r = MockRing(4)
    r.desc(0, DATA, length, INDIRECT)
    assert "table length" in (bad_chain(r).error or "")


def test_indirect_table_unmapped() -> None:
    r = MockRing(4)
    r.desc(0, GPA + RAM - 16, 32, INDIRECT)
    assert "not mapped" in (bad_chain(r).error or "")


def test_indirect_not_negotiated() -> None:
    r = MockRing(4, indirect=False)
    r.table(DATA + 0x1000, [(DATA, 4, 0, 0)])
    r.desc(0, DATA + 0x1000, 16, INDIRECT)
    assert "not negotiated" in (bad_chain(r).error or "")


def test_indirect_loop_and_next_out_of_table() -> None:
    r = MockRing(4)
    tbl = DATA + 0x1000
    r.table(tbl, [(DATA, 1, NEXT, 1), (DATA, 1, NEXT, 0)])
    r.desc(0, tbl, 32, INDIRECT)
    c = bad_chain(r)
    assert "loop" in (c.error or "") and len(c.readable) == 2
    r.table(tbl, [(DATA, 1, NEXT, 2), (DATA, 1, 0, 0)])  # next beyond the table's 2
    c = bad_chain(r)
    assert "next 2" in (c.error or "")


def test_head_out_of_range_breaks_queue() -> None:
    r = MockRing(8)
    r.publish(8)
    assert r.pop_checked() is None
    assert r.q.broken is not None and "descriptor 8" in r.q.broken
    r.desc(0, DATA, 1)
    r.publish(0)
    assert r.pop_checked() is None  # stays broken
    assert r.q.enable_notifications() is False


@pytest.mark.parametrize("jump", [9, 100, 0x8000, 0xFFFF])
def test_avail_idx_jump_breaks_queue(jump: int) -> None:
    r = MockRing(8)
    r.put16(r.avail_off + 2, jump)
    assert r.pop_checked() is None
    assert r.q.broken is not None and "avail index" in r.q.broken


def test_avail_idx_full_ring_is_fine() -> None:
    r = MockRing(8)
    for i in range(8):
        r.desc(i, DATA, 1)
    r.publish(*range(8))
    assert all(r.q.pop() is not None for _ in range(8))
    assert r.q.pop() is None and r.q.broken is None


def test_bad_construction() -> None:
    mem = GuestMemory()
    buf = memoryview(bytearray(0x10000))
    for size in (0, 3, 6, 65536):
        with pytest.raises(QueueError):
            DeviceQueue(mem, size, buf, buf, buf, event_idx=False)
    with pytest.raises(QueueError):
        DeviceQueue(mem, 8, buf[:127], buf, buf, event_idx=False)
    with pytest.raises(QueueError):
        DeviceQueue(mem, 8, buf, buf[:21], buf, event_idx=False)
    with pytest.raises(QueueError):
        DeviceQueue(mem, 8, buf, buf, buf[:69], event_idx=False)
    with pytest.raises(QueueError):
        DeviceQueue(mem, 8, buf, buf, buf, event_idx=False, last_avail_idx=65536)
    q = DeviceQueue(mem, 8, buf[:128], buf[:22], buf[:70], event_idx=False)
    with pytest.raises(QueueError):
        q.push(8, 0)


@settings(max_examples=300, deadline=None)
@given(
    size_log=st.integers(0, 5),
    descs=st.lists(
        st.tuples(
            st.sampled_from([0, DATA, DATA + 0x1000, GPA + RAM - 8, 2**64 - 1]),
            st.sampled_from([0, 1, 16, 32, 0x1000, 0xFFFFFFFF]),
            st.integers(0, 7),
            st.integers(0, 40),
        ),
        min_size=32,
        max_size=32,
    ),
    table=st.lists(
        st.tuples(
            st.sampled_from([DATA, DATA + 0x1000, GPA + RAM]),
            st.sampled_from([0, 1, 16, 48]),
            st.integers(0, 7),
            st.integers(0, 4),
        ),
        min_size=3,
        max_size=3,
    ),
    heads=st.lists(st.integers(0, 40), min_size=1, max_size=40),
)
def test_random_rings_never_raise(
    size_log: int,
    descs: list[tuple[int, int, int, int]],
    table: list[tuple[int, int, int, int]],
    heads: list[int],
) -> None:
    size = 1 << size_log
    r = MockRing(size)
    for i, d in enumerate(descs[:size]):
        r.desc(i, *d)
    r.table(DATA + 0x1000, table)
    for h in heads:
        r.publish(h)
        c = r.pop_checked()
        if c is None:
            assert r.q.broken is not None or h >= size
            break
        # a chain never yields more segments than the ring's descriptors plus one
        # indirect table (the largest length drawn above is 0x1000: 256 entries)
        assert len(c.readable) + len(c.writable) <= size + 0x1000 // 16
        if c.error is None:
            r.q.push(c.head, 0)


# -- notification suppression ----------------------------------------------------


def test_no_event_idx_flags() -> None:
    r = MockRing(8)
    r.q.disable_notifications()
    assert r.get16(r.used_off) & vdefs.VIRTQ_USED_F_NO_NOTIFY
    assert r.q.enable_notifications() is False
    assert not r.get16(r.used_off) & vdefs.VIRTQ_USED_F_NO_NOTIFY
    r.desc(0, DATA, 1)
    r.q.disable_notifications()
    r.publish(0)
    assert r.q.enable_notifications() is True  # added while we were not listening
    c = r.q.pop()
    assert c is not None
    r.q.push(c.head, 0)
    assert r.q.should_notify()
    assert not r.q.should_notify()  # nothing new since
    r.put16(r.avail_off, vdefs.VIRTQ_AVAIL_F_NO_INTERRUPT)
    r.publish(0)
    c = r.q.pop()
    assert c is not None
    r.q.push(c.head, 0)
    assert not r.q.should_notify()


def test_event_idx_used_event() -> None:
    r = MockRing(8, event_idx=True)
    for i in range(8):
        r.desc(i, DATA, 1)
    r.publish(*range(6))
    assert r.q.should_notify()  # first decision always signals
    r.set_used_event(2)  # driver: "interrupt me once entry 2 is used"
    for expect in (False, False, True, False, False):
        c = r.q.pop()
        assert c is not None
        r.q.push(c.head, 1)
        assert r.q.should_notify() is expect, r.q.used_idx
    # batched pushes that cross the event still signal once
    r.set_used_event(5)
    c = r.q.pop()
    assert c is not None
    r.q.push(c.head, 1)
    assert r.q.should_notify()


def test_event_idx_avail_event() -> None:
    r = MockRing(8, event_idx=True)
    before = bytes(r.ram)
    r.q.disable_notifications()
    assert bytes(r.ram) == before  # nothing written: avail_event just goes stale
    r.desc(0, DATA, 1)
    r.publish(0, 0, 0)
    assert r.q.enable_notifications() is True
    assert r.avail_event() == 0
    for _ in range(3):
        assert r.q.pop() is not None
    assert r.q.enable_notifications() is False
    assert r.avail_event() == 3


def test_u16_wraparound() -> None:
    start = 65530
    r = MockRing(4, event_idx=True, start_idx=start)
    for i in range(4):
        r.desc(i, DATA + i, 1, WRITE)
    seen = []
    for _ in range(4):  # 16 chains, crossing 65535 -> 0
        r.publish(0, 1, 2, 3)
        while (c := r.q.pop()) is not None:
            assert c.error is None
            seen.append(c.head)
            r.q.push(c.head, 1)
    assert seen == [0, 1, 2, 3] * 4
    assert r.q.last_avail_idx == (start + 16) & 0xFFFF == r.avail_idx
    assert r.used_idx() == (start + 16) & 0xFFFF
    assert r.used_elem((start + 15) & 0xFFFF) == (3, 1)


def test_event_idx_across_wrap() -> None:
    r = MockRing(8, event_idx=True, start_idx=65533)
    r.desc(0, DATA, 1)
    assert r.q.should_notify()  # first decision; remembers 65533
    r.set_used_event(1)  # wants to hear when entry 1 (after the wrap) is used
    got = []
    for _ in range(5):
        r.publish(0)
        c = r.q.pop()
        assert c is not None
        r.q.push(c.head, 1)
        got.append((r.q.used_idx, r.q.should_notify()))
    assert got == [(65534, False), (65535, False), (0, False), (1, False), (2, True)]


# -- inflight tracking -----------------------------------------------------------


def tracked(size: int = 8) -> tuple[MockRing, bytearray]:
    """A ring whose queue tracks into a fresh inflight region (a bytearray)."""
    r = MockRing(size)
    region = bytearray(queue_region_size(size))
    for i in range(size):
        r.desc(i, DATA + 16 * i, 1, WRITE)
    r.restart(0, QueueInflight(memoryview(region), size))
    return r, region


def flag(region: bytearray, head: int) -> int:
    return region[16 + 16 * head]


def counter(region: bytearray, head: int) -> int:
    return int(struct.unpack_from("=Q", region, 24 + 16 * head)[0])


def region_header(region: bytearray) -> tuple[int, int, int, int]:
    """version, desc_num, last_batch_head, used_idx"""
    return struct.unpack_from("=HHHH", region, 8)  # type: ignore[return-value]


def test_untracked_queue_has_no_recovery_and_pop_writes_nothing() -> None:
    r = MockRing(4)
    r.desc(0, DATA, 1, WRITE)
    r.publish(0)
    assert r.q.recovery is None
    assert r.pop_checked() is not None


def test_pop_marks_in_counter_order_and_push_clears() -> None:
    r, region = tracked()
    assert r.q.recovery is not None and r.q.recovery.fresh
    assert region_header(region) == (1, 8, 0, 0)
    r.publish(5, 2, 7)
    heads = [c.head for c in iter(r.q.pop, None)]
    assert heads == [5, 2, 7]
    assert [flag(region, h) for h in range(8)] == [0, 0, 1, 0, 0, 1, 0, 1]
    assert [counter(region, h) for h in (5, 2, 7)] == [0, 1, 2]
    r.q.push(2, 1)  # out of order
    assert flag(region, 2) == 0 and flag(region, 5) == 1
    assert region_header(region) == (1, 8, 2, 1)  # last batch head 2, used_idx 1
    r.q.push(7, 1)
    r.q.push(5, 1)
    assert not any(flag(region, h) for h in range(8))
    assert region_header(region)[2:] == (5, 3)


def test_restart_resumes_past_in_flight_requests_and_resubmits_them_first() -> None:
    r, region = tracked()
    r.publish(3, 1, 6, 4)
    popped = [c.head for c in iter(r.q.pop, None)]
    assert popped == [3, 1, 6, 4]
    r.q.push(1, 1)
    r.q.push(4, 1)
    # SIGKILL: QEMU restores last_avail_idx = used->idx (2) and sends it as the base.
    r.publish(0)  # and the guest goes on submitting meanwhile
    q = r.restart(r.used_idx(), QueueInflight(memoryview(region), 8))
    assert q.recovery is not None and not q.recovery.fresh
    assert q.recovery.resubmit == (3, 6)
    assert q.last_avail_idx == 4  # past the four popped, not at the frontend's 2
    got = [c.head for c in iter(q.pop, None)]
    assert got == [3, 6, 0]  # the in-flight ones, oldest first, then the new one
    for h in got:
        q.push(h, 1)
    assert r.used_idx() == 5
    assert sorted(r.used_elem(i)[0] for i in range(5)) == [0, 1, 3, 4, 6]  # each once
    assert not any(flag(region, h) for h in range(8))


def test_restart_after_a_clean_stop_resubmits_nothing() -> None:
    r, region = tracked()
    r.publish(1, 2)
    for c in list(iter(r.q.pop, None)):
        r.q.push(c.head, 1)
    q = r.restart(2, QueueInflight(memoryview(region), 8))
    assert q.recovery is not None and q.recovery.resubmit == ()
    assert q.last_avail_idx == 2 and q.pop() is None


def test_resubmitted_requests_are_marked_until_pushed_across_two_restarts() -> None:
    r, region = tracked()
    r.publish(2, 3)
    list(iter(r.q.pop, None))
    q = r.restart(0, QueueInflight(memoryview(region), 8))
    first = q.pop()
    assert first is not None and first.head == 2
    q.push(2, 1)
    # Killed again with 3 handed out a second time but never completed.
    q = r.restart(r.used_idx(), QueueInflight(memoryview(region), 8))
    assert q.recovery is not None and q.recovery.resubmit == (3,)
    assert q.last_avail_idx == 2
    c = q.pop()
    assert c is not None and c.head == 3 and q.pop() is None
    r.publish(5)
    c2 = q.pop()
    assert c2 is not None and c2.head == 5
    assert counter(region, 5) > counter(region, 3)


def test_a_region_smaller_than_the_ring_is_refused() -> None:
    r = MockRing(8)
    with pytest.raises(QueueError, match="inflight"):
        r.restart(0, QueueInflight(memoryview(bytearray(queue_region_size(4))), 4))


def test_a_corrupt_region_is_survived() -> None:
    r, region = tracked()
    region[16:] = b"\xff" * (len(region) - 16)  # every flag 0xff, every counter maxed
    q = r.restart(0, QueueInflight(memoryview(region), 8))
    assert q.recovery is not None and q.recovery.resubmit == () and q.recovery.dropped >= 8
    r.publish(1)
    c = q.pop()
    assert c is not None and c.head == 1
    q.push(1, 1)  # counters were bounded again: no overflow on the next pop
    assert flag(region, 1) == 0
