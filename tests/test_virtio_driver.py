"""Driver side of the split ring, alone and paired with the device side over shared bytes."""

from __future__ import annotations

import mmap
import os
import struct
import time
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vblk.errors import QueueError
from vblk.memory import GuestMemory
from vblk.virtio import defs as vdefs
from vblk.virtio.driver import DriverQueue, QueueFullError
from vblk.virtio.queue import Chain, DeviceQueue

GPA = 0x4000_0000
UADDR = 0x7F00_0000_0000
SLOT = 1024  # data bytes per request slot
MAX_BUFS = 6  # per side; 64 bytes at most each, so a slot always fits
SIZES = [1 << n for n in range(11)]  # 1 .. 1024


class Pair:
    """A DriverQueue and a DeviceQueue sharing one bytearray of 'guest RAM'."""

    def __init__(self, size: int, *, event_idx: bool) -> None:
        lay = vdefs.ring_layout(size)
        self.ring_bytes = (lay.total + 4095) & ~4095
        self.ram = bytearray(self.ring_bytes + size * SLOT)
        self.mem = GuestMemory()
        self.mem.add(GPA, len(self.ram), UADDR, memoryview(self.ram))
        view = memoryview(self.ram)
        self.lay = lay
        self.drv = DriverQueue(
            size,
            *lay.views(view),
            event_idx=event_idx,
        )
        t = self.mem.translate_uaddr
        self.dev = DeviceQueue(
            self.mem,
            size,
            t(UADDR + lay.desc, vdefs.desc_table_bytes(size)),
            t(UADDR + lay.avail, vdefs.avail_ring_bytes(size)),
            t(UADDR + lay.used, vdefs.used_ring_bytes(size)),
            event_idx=event_idx,
        )

    def slot_gpa(self, slot: int) -> int:
        return GPA + self.ring_bytes + slot * SLOT

    def read(self, gpa: int, n: int) -> bytes:
        return bytes(self.ram[gpa - GPA : gpa - GPA + n])

    def write(self, gpa: int, data: bytes) -> None:
        self.ram[gpa - GPA : gpa - GPA + len(data)] = data


@dataclass
class Request:
    slot: int
    out: list[tuple[int, bytes]]  # (gpa, data the device must read)
    in_: list[tuple[int, int]]  # (gpa, len) the device fills
    fill: bytes = b""


@dataclass
class Model:
    """The test's driver: request slots, what is in flight, what the device holds."""

    pair: Pair
    free_slots: list[int]
    requests: dict[int, Request] = field(default_factory=dict)  # by head
    held: list[tuple[Chain, int]] = field(default_factory=list)  # device side, popped
    serial: int = 0

    def submit(self, outs: list[int], ins: list[int]) -> bool:
        """Add one request; False if the ring refused it for lack of descriptors."""
        p, drv = self.pair, self.pair.drv
        free_before = drv.num_free
        slot = self.free_slots.pop()
        gpa = p.slot_gpa(slot)
        out: list[tuple[int, bytes]] = []
        in_: list[tuple[int, int]] = []
        for n in outs:
            self.serial += 1
            data = bytes((self.serial + k) & 0xFF for k in range(n))
            p.write(gpa, data)
            out.append((gpa, data))
            gpa += n
        for n in ins:
            in_.append((gpa, n))
            gpa += n
        try:
            head = drv.add([(g, len(d)) for g, d in out], in_)
        except QueueFullError:
            assert len(outs) + len(ins) > free_before or not outs + ins
            assert drv.num_free == free_before
            self.free_slots.append(slot)
            return False
        assert head not in self.requests
        assert drv.num_free == free_before - len(outs) - len(ins)
        self.requests[head] = Request(slot, out, in_)
        return True

    def device_pop(self, limit: int) -> int:
        n = 0
        while n < limit and (c := self.pair.dev.pop()) is not None:
            assert c.error is None, c.error
            req = self.requests[c.head]
            assert [bytes(v) for v in c.readable] == [d for _, d in req.out]
            assert [len(v) for v in c.writable] == [ln for _, ln in req.in_]
            self.serial += 1
            fill = bytes((self.serial * 7 + k) & 0xFF for k in range(c.writable_len))
            off = 0
            for v in c.writable:
                v[:] = fill[off : off + len(v)]
                off += len(v)
            req.fill = fill
            self.held.append((c, len(fill)))
            n += 1
        return n

    def device_push(self, order: list[int]) -> None:
        held = self.held
        for i in order:
            c, written = held[i % len(held)]
            held.remove((c, written))
            self.pair.dev.push(c.head, written)
            if not held:
                break

    def reap(self) -> int:
        p = self.pair
        n = 0
        while (u := p.drv.pop_used()) is not None:
            head, written = u
            req = self.requests.pop(head)
            assert written == sum(ln for _, ln in req.in_)
            got = b"".join(p.read(g, ln) for g, ln in req.in_)
            assert got == req.fill
            self.free_slots.append(req.slot)
            n += 1
        return n


lengths = st.lists(st.integers(0, 64), max_size=MAX_BUFS)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), lengths, lengths),
        st.tuples(st.just("pop"), st.integers(1, 8)),
        st.tuples(st.just("push"), st.lists(st.integers(0, 1000), min_size=1, max_size=8)),
        st.tuples(st.just("reap")),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(size=st.sampled_from(SIZES), event_idx=st.booleans(), steps=ops)
def test_random_interleavings(size: int, event_idx: bool, steps: list[tuple[object, ...]]) -> None:
    p = Pair(size, event_idx=event_idx)
    m = Model(p, list(range(size)))
    for step in steps:
        match step:
            case ("add", outs, ins):
                assert isinstance(outs, list) and isinstance(ins, list)
                if m.free_slots:
                    m.submit(outs, ins)
            case ("pop", limit):
                assert isinstance(limit, int)
                m.device_pop(limit)
            case ("push", order):
                assert isinstance(order, list)
                if m.held:
                    m.device_push(order)
            case ("reap",):
                m.reap()
        assert p.drv.in_flight == len(m.requests)
    # drain: everything comes back and every descriptor is free again
    m.device_pop(size)
    m.device_push(list(range(len(m.held))))
    m.reap()
    assert not m.requests and p.drv.in_flight == 0 and p.drv.num_free == size
    assert p.dev.broken is None


@settings(max_examples=100, deadline=None)
@given(
    size=st.sampled_from(SIZES[:8]),
    event_idx=st.booleans(),
    script=st.lists(st.tuples(st.integers(0, 4), st.booleans()), max_size=80),
)
def test_no_lost_wakeups(size: int, event_idx: bool, script: list[tuple[int, bool]]) -> None:
    """Both sides sleep whenever suppression lets them; nothing is ever stranded.

    The device sleeps after enable_notifications() says the ring is empty and
    is woken only by a kick the driver decided it needed; the driver sleeps
    after enable_interrupts() and is woken only by should_notify(). Sequential,
    so it checks the index arithmetic, not memory ordering.
    """
    p = Pair(size, event_idx=event_idx)
    m = Model(p, list(range(size)))
    dev_awake = False
    drv_awake = False
    kicks = interrupts = 0
    assert p.dev.enable_notifications() is False
    assert p.drv.enable_interrupts() is False

    def device_run() -> None:
        nonlocal drv_awake, interrupts
        while True:
            p.dev.disable_notifications()
            m.device_pop(size)
            m.device_push(list(range(len(m.held))))
            if p.dev.should_notify():
                interrupts += 1
                drv_awake = True
            if not p.dev.enable_notifications():
                return

    def driver_reap() -> None:
        while True:
            p.drv.disable_interrupts()
            m.reap()
            if not p.drv.enable_interrupts():
                return

    for n_add, device_first in script:
        for _ in range(n_add):
            if not m.free_slots or not m.submit([16], [1]):
                break
        if p.drv.kick_needed():
            kicks += 1
            dev_awake = True
        if device_first and dev_awake:
            device_run()
            dev_awake = False
        if drv_awake:
            driver_reap()
            drv_awake = False
        if dev_awake:
            device_run()
            dev_awake = False
        # asleep device: nothing published that it has not taken
        assert p.dev.last_avail_idx == p.drv._avail_idx
        if drv_awake:
            driver_reap()
            drv_awake = False
        # asleep driver: nothing used that it has not reaped
        assert p.drv._last_used == p.dev.used_idx
    assert not m.requests
    assert kicks <= len(script) and interrupts <= len(script)


# -- driver in isolation ----------------------------------------------------------


def test_init_zeroes_ring_and_lays_descriptors() -> None:
    p = Pair(4, event_idx=False)
    assert not any(p.ram[: p.lay.total])
    head = p.drv.add([(GPA + 0x100, 8), (GPA + 0x200, 4)], [(GPA + 0x300, 1)])
    assert head == 0
    descs = [struct.unpack_from("<QIHH", p.ram, 16 * i) for i in range(3)]
    nxt1, nxt2 = descs[0][3], descs[1][3]
    assert descs[0] == (GPA + 0x100, 8, vdefs.VIRTQ_DESC_F_NEXT, nxt1)
    d1 = struct.unpack_from("<QIHH", p.ram, 16 * nxt1)
    assert d1 == (GPA + 0x200, 4, vdefs.VIRTQ_DESC_F_NEXT, nxt2)
    d2 = struct.unpack_from("<QIHH", p.ram, 16 * nxt2)
    assert d2[:3] == (GPA + 0x300, 1, vdefs.VIRTQ_DESC_F_WRITE)
    assert struct.unpack_from("<HHH", p.ram, p.lay.avail) == (0, 1, 0)
    assert p.drv.num_free == 1 and p.drv.in_flight == 1 and p.drv.size == 4


def test_full_and_empty_chains() -> None:
    p = Pair(4, event_idx=False)
    with pytest.raises(QueueFullError):
        p.drv.add([], [])
    with pytest.raises(QueueFullError):
        p.drv.add([(GPA, 1)] * 5, [])
    p.drv.add([(GPA, 1)] * 3, [])
    with pytest.raises(QueueFullError):
        p.drv.add([(GPA, 1)], [(GPA, 1)])
    p.drv.add([], [(GPA, 1)])
    assert p.drv.num_free == 0
    with pytest.raises(QueueFullError):
        p.drv.add([(GPA, 1)], [])
    assert issubclass(QueueFullError, QueueError)


def test_bad_buffer_leaves_queue_intact() -> None:
    p = Pair(4, event_idx=False)
    with pytest.raises(ValueError):
        p.drv.add([(GPA, 1), (-1, 1)], [])
    with pytest.raises(ValueError):
        p.drv.add([(GPA, 1 << 32)], [])
    assert p.drv.num_free == 4 and p.drv.in_flight == 0
    assert p.dev.pop() is None


def test_descriptors_recycle() -> None:
    p = Pair(2, event_idx=False)
    for _ in range(100):
        a = p.drv.add([(GPA, 1)], [])
        b = p.drv.add([], [(GPA, 1)])
        for _ in range(2):
            c = p.dev.pop()
            assert c is not None
            p.dev.push(c.head, 0)
        assert p.drv.pop_used() == (a, 0)
        assert p.drv.pop_used() == (b, 0)
        assert p.drv.pop_used() is None
    assert p.drv.num_free == 2


def test_device_scribbling_next_fields_cannot_corrupt_free_list() -> None:
    p = Pair(4, event_idx=False)
    head = p.drv.add([(GPA, 1)] * 2, [])
    for i in range(4):
        struct.pack_into("<H", p.ram, 16 * i + 14, 0)  # every next -> 0
    c = p.dev.pop()
    assert c is not None
    p.dev.push(head, 0)
    assert p.drv.pop_used() == (head, 0)
    heads = {p.drv.add([(GPA, 1)], []) for _ in range(4)}
    assert heads == {0, 1, 2, 3}


def test_misbehaving_device() -> None:
    p = Pair(4, event_idx=False)
    head = p.drv.add([(GPA, 1)], [])
    used = p.lay.used
    struct.pack_into("<IIH", p.ram, used + 4, head + 1, 0, 0)  # not in flight
    struct.pack_into("<H", p.ram, used + 2, 1)
    with pytest.raises(QueueError, match="not in flight"):
        p.drv.pop_used()
    struct.pack_into("<I", p.ram, used + 4, 99)  # out of range
    with pytest.raises(QueueError, match="not in flight"):
        p.drv.pop_used()
    struct.pack_into("<H", p.ram, used + 2, 2)  # more used than in flight
    with pytest.raises(QueueError, match="in flight"):
        p.drv.pop_used()
    assert p.drv.num_free == 3  # nothing was freed


def test_kick_suppression_without_event_idx() -> None:
    p = Pair(8, event_idx=False)
    assert not p.drv.kick_needed()  # nothing added
    p.drv.add([(GPA, 1)], [])
    assert p.drv.kick_needed()
    assert not p.drv.kick_needed()  # nothing new since
    p.dev.disable_notifications()
    p.drv.add([(GPA, 1)], [])
    assert not p.drv.kick_needed()
    assert p.dev.enable_notifications() is True
    p.drv.add([(GPA, 1)], [])
    assert p.drv.kick_needed()


def test_kick_suppression_with_event_idx() -> None:
    p = Pair(8, event_idx=True)
    assert p.dev.enable_notifications() is False  # avail_event = 0
    p.drv.add([(GPA, 1)], [])
    assert p.drv.kick_needed()  # crossed avail_event 0
    p.dev.disable_notifications()  # a no-op with EVENT_IDX
    p.drv.add([(GPA, 1)], [])
    p.drv.add([(GPA, 1)], [])
    assert not p.drv.kick_needed()  # device said "kick me at 0", long past
    while p.dev.pop() is not None:
        pass
    assert p.dev.enable_notifications() is False  # avail_event = 3
    p.drv.add([(GPA, 1)], [])
    assert p.drv.kick_needed()


def test_interrupt_suppression() -> None:
    for event_idx in (False, True):
        p = Pair(8, event_idx=event_idx)
        p.drv.disable_interrupts()
        for _ in range(3):
            p.drv.add([(GPA, 1)], [])
        while (c := p.dev.pop()) is not None:
            p.dev.push(c.head, 0)
        # The first decision always signals; after that the hint holds.
        p.dev.should_notify()
        c = None
        p.drv.add([(GPA, 1)], [])
        c = p.dev.pop()
        assert c is not None
        p.dev.push(c.head, 0)
        assert not p.dev.should_notify(), event_idx
        assert p.drv.enable_interrupts() is True  # four are waiting
        while p.drv.pop_used() is not None:
            pass
        assert p.drv.enable_interrupts() is False
        p.drv.add([(GPA, 1)], [])
        c = p.dev.pop()
        assert c is not None
        p.dev.push(c.head, 0)
        assert p.dev.should_notify(), event_idx


def test_event_idx_used_event_tracks_reaping() -> None:
    p = Pair(8, event_idx=True)
    assert p.drv.enable_interrupts() is False
    for _ in range(4):
        p.drv.add([(GPA, 1)], [])
    used_event = p.lay.avail + 4 + 2 * 8
    for n in range(4):
        c = p.dev.pop()
        assert c is not None
        p.dev.push(c.head, 0)
        assert p.drv.pop_used() is not None
        assert struct.unpack_from("<H", p.ram, used_event)[0] == n + 1


def test_u16_wraparound_pair() -> None:
    """70000 chains through a ring of 4: both free-running indexes wrap."""
    p = Pair(4, event_idx=True)
    for i in range(70000):
        head = p.drv.add([(GPA, 4)], [(GPA + 8, 2)])
        c = p.dev.pop()
        assert c is not None and c.head == head
        p.dev.push(c.head, i & 0xFF)
        assert p.drv.pop_used() == (head, i & 0xFF)
    assert p.dev.last_avail_idx == 70000 & 0xFFFF == p.dev.used_idx


def test_cross_process_indexes_never_tear() -> None:
    """Device in a child process, driver here, busy-polling one shared mapping.

    Regression: ``struct.pack_into`` zeroes its target before writing, so the
    peer sometimes read an index of 0 (used index "49408 ahead"). Ring u16s
    must be single stores.
    """
    size, total = 4, 100_000
    lay = vdefs.ring_layout(size)
    mm = mmap.mmap(-1, 0x10000)
    view = memoryview(mm)
    parts = (*lay.views(view),)
    drv = DriverQueue(size, *parts, event_idx=False)
    pid = os.fork()
    if pid == 0:  # the device
        code = 3
        try:
            mem = GuestMemory()
            mem.add(GPA, len(mm), UADDR, view)
            dev = DeviceQueue(mem, size, *parts, event_idx=False)
            done = 0
            deadline = time.monotonic() + 60
            while done < total and dev.broken is None and time.monotonic() < deadline:
                c = dev.pop()
                if c is not None:
                    if c.error is not None:
                        break
                    c.writable[0][0] = done & 0xFF
                    dev.push(c.head, 1)
                    done += 1
            code = 0 if done == total else 1
        finally:
            os._exit(code)
    try:
        sent = got = 0
        deadline = time.monotonic() + 60
        while got < total and time.monotonic() < deadline:
            while sent < total and drv.num_free >= 2:
                drv.add([(GPA + 0x8000, 16)], [(GPA + 0x9000 + sent % size, 1)])
                sent += 1
            while (u := drv.pop_used()) is not None:
                assert u[1] == 1
                got += 1
        assert got == total
    finally:
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
