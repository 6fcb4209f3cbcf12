"""GuestMemory bounds checking and fd mapping."""

from __future__ import annotations

import gc
import mmap
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vblk.errors import GuestMemoryError
from vblk.memory import GuestMemory, map_fd
from vblk.virtio import defs as vdefs

BASE = 0x10000
SIZE = 0x1000
UBASE = 0x7F00_0000_0000


def one_region() -> tuple[GuestMemory, bytearray]:
    ram = bytearray(SIZE)
    mem = GuestMemory()
    mem.add(BASE, SIZE, UBASE, memoryview(ram))
    return mem, ram


def test_translate_inside_is_a_writable_view() -> None:
    mem, ram = one_region()
    v = mem.translate(BASE + 0x10, 4)
    assert v.format == "B" and len(v) == 4 and not v.readonly
    v[:] = b"abcd"
    assert ram[0x10:0x14] == b"abcd"
    assert bytes(mem.translate(BASE + SIZE - 4, 4)) == b"\0" * 4
    assert len(mem.translate(BASE, SIZE)) == SIZE


def test_zero_length_needs_a_mapped_address() -> None:
    mem, _ = one_region()
    assert len(mem.translate(BASE, 0)) == 0
    assert len(mem.translate(BASE + SIZE - 1, 0)) == 0
    with pytest.raises(GuestMemoryError):
        mem.translate(BASE + SIZE, 0)
    with pytest.raises(GuestMemoryError):
        mem.translate(BASE - 1, 0)


@pytest.mark.parametrize(
    ("gpa", "length"),
    [
        (BASE - 1, 1),  # just before
        (BASE + SIZE, 1),  # just after
        (BASE + SIZE - 4, 5),  # straddles the end
        (BASE - 4, 8),  # straddles the start
        (BASE, SIZE + 1),  # too long
        (-1, 1),
        (BASE, -1),
        (BASE + 8, -8),
        (2**64 - 1, 2),  # would wrap in u64
        (BASE, 2**64),
        (0, 0),
    ],
)
def test_translate_out_of_range(gpa: int, length: int) -> None:
    mem, _ = one_region()
    mem.translate(BASE, 1)  # prime the last-hit cache
    with pytest.raises(GuestMemoryError, match=hex(gpa) if gpa >= 0 else "gpa"):
        mem.translate(gpa, length)


def test_two_regions_no_straddling() -> None:
    a, b = bytearray(SIZE), bytearray(SIZE)
    mem = GuestMemory()
    mem.add(BASE, SIZE, UBASE, memoryview(a))
    mem.add(BASE + SIZE, SIZE, UBASE + 0x100000, memoryview(b))  # adjacent in gpa space
    mem.translate(BASE + SIZE + 1, 1)[0] = 0xBB
    mem.translate(BASE + 1, 1)[0] = 0xAA
    assert a[1] == 0xAA and b[1] == 0xBB
    # adjacent but distinct mappings: a range across the seam is refused
    with pytest.raises(GuestMemoryError):
        mem.translate(BASE + SIZE - 2, 4)
    assert [r.gpa for r in mem.regions] == [BASE, BASE + SIZE]


def test_uaddr_path() -> None:
    mem, ram = one_region()
    mem.translate_uaddr(UBASE + 0x20, 2)[:] = b"hi"
    assert ram[0x20:0x22] == b"hi"
    assert mem.uaddr_to_gpa(UBASE + 0x20) == BASE + 0x20
    with pytest.raises(GuestMemoryError, match=hex(UBASE + SIZE)):
        mem.translate_uaddr(UBASE + SIZE, 1)
    with pytest.raises(GuestMemoryError):
        mem.translate_uaddr(UBASE + SIZE - 1, 2)
    with pytest.raises(GuestMemoryError):
        mem.uaddr_to_gpa(UBASE - 1)


def test_add_rejects_bad_regions() -> None:
    mem, _ = one_region()
    with pytest.raises(GuestMemoryError):
        mem.add(BASE + SIZE, 0, 0, memoryview(bytearray(1)))
    with pytest.raises(GuestMemoryError):
        mem.add(BASE + SIZE, 16, 0, memoryview(bytearray(8)))  # buffer too short
    with pytest.raises(GuestMemoryError):
        mem.add(BASE + SIZE - 1, 16, 0, memoryview(bytearray(16)))  # gpa overlap
    with pytest.raises(GuestMemoryError):
        mem.add(0, 16, UBASE + SIZE - 1, memoryview(bytearray(16)))  # uaddr overlap
    with pytest.raises(GuestMemoryError):
        mem.add(0, 16, 0, memoryview(bytes(16)))  # read-only
    assert len(mem.regions) == 1


def test_add_flattens_buffer_and_trims() -> None:
    mem = GuestMemory()
    arr = memoryview(bytearray(32)).cast("I")
    r = mem.add(0, 16, 0, arr)
    assert r.buf.format == "B" and len(r.buf) == 16


def test_remove_and_clear_call_close() -> None:
    closed: list[int] = []
    mem = GuestMemory()
    for i in range(3):
        mem.add(
            i * SIZE,
            SIZE,
            UBASE + i * SIZE,
            memoryview(bytearray(SIZE)),
            lambda i=i: closed.append(i),
        )
    mem.translate(SIZE, 1)
    mem.remove(SIZE, SIZE, UBASE + SIZE)
    assert closed == [1]
    with pytest.raises(GuestMemoryError):
        mem.translate(SIZE, 1)  # the cached hit is gone too
    with pytest.raises(GuestMemoryError):
        mem.remove(SIZE, SIZE, UBASE + SIZE)
    with pytest.raises(GuestMemoryError):
        mem.remove(0, SIZE, UBASE + 1)  # not exact
    mem.clear()
    assert sorted(closed) == [0, 1, 2] and mem.regions == ()
    with pytest.raises(GuestMemoryError):
        mem.translate(0, 1)


@given(
    gpa=st.integers(min_value=-(2**65), max_value=2**65),
    length=st.integers(min_value=-(2**65), max_value=2**65),
)
def test_translate_never_escapes(gpa: int, length: int) -> None:
    mem, _ = one_region()
    inside = BASE <= gpa < BASE + SIZE and 0 <= length <= BASE + SIZE - gpa
    try:
        v = mem.translate(gpa, length)
    except GuestMemoryError:
        assert not inside
    else:
        assert inside and len(v) == length


@given(st.lists(st.tuples(st.integers(0, 3 * SIZE), st.integers(0, 64)), max_size=30))
def test_translate_matches_reference(ops: list[tuple[int, int]]) -> None:
    """The last-hit cache never changes an answer."""
    rams = [bytearray(SIZE) for _ in range(2)]
    mem = GuestMemory()
    mem.add(0, SIZE, UBASE, memoryview(rams[0]))
    mem.add(2 * SIZE, SIZE, UBASE + 2 * SIZE, memoryview(rams[1]))
    for gpa, length in ops:
        ok = any(s <= gpa < s + SIZE and gpa + length <= s + SIZE for s in (0, 2 * SIZE))
        try:
            mem.translate(gpa, length)
        except GuestMemoryError:
            assert not ok
        else:
            assert ok


def test_map_fd_unaligned_offset_is_shared() -> None:
    fd = os.memfd_create("vblk-test", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 3 * mmap.PAGESIZE)
        off = mmap.PAGESIZE + 123
        view, close = map_fd(fd, mmap.PAGESIZE, off)
        assert len(view) == mmap.PAGESIZE and not view.readonly
        view[0:5] = b"hello"
        view[-1] = 0x5A
        assert os.pread(fd, 5, off) == b"hello"
        assert os.pread(fd, 1, off + mmap.PAGESIZE - 1) == b"\x5a"
        os.pwrite(fd, b"back", off + 8)
        assert bytes(view[8:12]) == b"back"
        close()
        close()  # idempotent
    finally:
        os.close(fd)


def test_map_fd_close_tolerates_live_views() -> None:
    fd = os.memfd_create("vblk-test", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, mmap.PAGESIZE)
        view, close = map_fd(fd, 64, 0)
        mem = GuestMemory()
        mem.add(0, 64, 0, view, close)
        ring = mem.translate(0, 16)  # a queue still holds this
        mem.clear()  # must not raise
        ring[0] = 1  # still mapped until the last view dies
        assert os.pread(fd, 1, 0) == b"\x01"
        del ring, view
        gc.collect()
    finally:
        os.close(fd)


def test_map_fd_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        map_fd(-1, 0, 0)
    with pytest.raises(ValueError):
        map_fd(-1, 16, -1)


@pytest.mark.parametrize(
    ("size", "offset"),
    [
        (3 * mmap.PAGESIZE, 0),
        (mmap.PAGESIZE, mmap.PAGESIZE + 1),
        (1, 2 * mmap.PAGESIZE),
        (1 << 62, 0),
    ],
)
def test_map_fd_refuses_a_range_past_the_end_of_the_fd(size: int, offset: int) -> None:
    """Mapped pages past EOF would SIGBUS the backend on first touch."""
    fd = os.memfd_create("vblk-test", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 2 * mmap.PAGESIZE)
        with pytest.raises(ValueError, match="past the end"):
            map_fd(fd, size, offset)
        view, close = map_fd(fd, mmap.PAGESIZE, mmap.PAGESIZE)  # exactly to the end is fine
        view[-1] = 1
        close()
    finally:
        os.close(fd)


def test_ring_layout() -> None:
    for n in (1, 2, 256, 1024, vdefs.MAX_QUEUE_SIZE):
        lay = vdefs.ring_layout(n)
        assert lay.desc == 0 and lay.avail == 16 * n
        assert lay.used % 4 == 0 and lay.used >= lay.avail + vdefs.avail_ring_bytes(n)
        assert lay.used - (lay.avail + vdefs.avail_ring_bytes(n)) < 4
        assert lay.total == lay.used + vdefs.used_ring_bytes(n)
    with pytest.raises(ValueError):
        vdefs.ring_layout(0)


def test_need_event_wraps() -> None:
    assert vdefs.need_event(0, 1, 0)
    assert not vdefs.need_event(1, 1, 0)
    assert vdefs.need_event(65535, 0, 65534)  # crossing the wrap
    assert vdefs.need_event(65534, 2, 65530)
    assert not vdefs.need_event(3, 2, 65530)
    assert not vdefs.need_event(5, 5, 5)  # nothing moved


def test_map_fd_seals_a_sealable_memfd_against_shrinking() -> None:
    import fcntl

    from vblk.memory import map_fd

    fd = os.memfd_create("t", os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, 8192)
        view, close = map_fd(fd, 4096, 0)
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 0)
        os.ftruncate(fd, 16384)  # growing stays allowed
        view.release()
        close()
    finally:
        os.close(fd)


def test_map_fd_still_maps_an_unsealable_memfd() -> None:
    from vblk.memory import map_fd, seal_shrink

    fd = os.memfd_create("t")  # no MFD_ALLOW_SEALING: F_SEAL_SEAL is set
    try:
        os.ftruncate(fd, 4096)
        assert not seal_shrink(fd)
        view, close = map_fd(fd, 4096, 0)
        view.release()
        close()
    finally:
        os.close(fd)
