"""Fuzz the descriptor-chain walker and GuestMemory, the one translation layer.

Guest RAM is one arena cut into regions with canaries between them (regions
may be adjacent in guest-physical space, so a buffer straddling two is
contiguous to the guest but not to us). A hostile driver lays chains out:
valid ones, then damaged ones: loops, addresses outside every region or
wrapping 2**64, lengths past a region's end or summing past 4 GiB, indirect
tables misaligned, nested, of odd length or unmapped, heads and avail indexes
out of range. Every popped chain is compared with a reference walk written
from the spec, and every view it holds must point exactly where its
descriptor says, inside one region. The device then writes every writable
byte and completes the chain: nothing outside those bytes and the used ring
may change, and the canaries must survive.
"""

from __future__ import annotations

from dataclasses import dataclass

from fuzzing import DESC, Arena, case, changed_outside, fuzz_settings, get16, put16
from hypothesis import event, given
from hypothesis import strategies as st

from vblk.errors import GuestMemoryError
from vblk.virtio import defs as vdefs
from vblk.virtio.queue import MAX_CHAIN_BYTES, MAX_INDIRECT_ENTRIES, Chain, DeviceQueue

NEXT = vdefs.VIRTQ_DESC_F_NEXT
WRITE = vdefs.VIRTQ_DESC_F_WRITE
INDIRECT = vdefs.VIRTQ_DESC_F_INDIRECT

RAM0 = 0x10000  # region 0: the ring, then data and indirect tables
RAM0_SIZE = 0x6000
DATA0 = RAM0 + 0x1000
LAYOUTS = [
    [(RAM0, RAM0_SIZE)],
    [(RAM0, RAM0_SIZE), (RAM0 + RAM0_SIZE, 0x1000)],  # adjacent in gpa, apart in the arena
    [(RAM0, RAM0_SIZE), (0x40000, 0x2000), (2**40, 0x1000)],
    [(RAM0, RAM0_SIZE), (2**64 - 0x1000, 0x1000)],  # the top of the address space
]


# -- the reference walk, straight from virtio 1.2 2.7.5 and the Chain contract ----------


@dataclass
class Ref:
    error: bool
    readable: list[tuple[int, int]]
    writable: list[tuple[int, int]]


def ref_walk(arena: Arena, table: bytes, size: int, head: int, indirect: bool) -> Ref:
    """Walk like the spec says; on a bad buffer, keep only the salvaged status byte."""
    r: list[tuple[int, int]] = []
    w: list[tuple[int, int]] = []
    limit = ttl = size
    in_table = False
    total = 0
    i = head
    while True:
        if ttl == 0:
            return Ref(True, r, w)
        ttl -= 1
        addr, length, flags, nxt = DESC.unpack_from(table, i * 16)
        if flags & INDIRECT:
            ok = (
                indirect
                and not in_table
                and not flags & NEXT
                and length
                and not length % 16
                and length <= MAX_INDIRECT_ENTRIES * 16
                and arena.mapped(addr, length)
            )
            if not ok:
                return Ref(True, r, w)
            table = bytes(arena.view(addr, length))
            in_table = True
            limit = ttl = length // 16
            i = 0
            continue
        total += length
        bad = total > MAX_CHAIN_BYTES or not arena.mapped(addr, length)
        if not bad and not flags & WRITE and w:
            bad = True
        if bad:
            return Ref(True, [], salvage(arena, table, i, limit, ttl))
        (w if flags & WRITE else r).append((addr, length))
        if not flags & NEXT:
            return Ref(False, r, w)
        if nxt >= limit:
            return Ref(True, r, w)
        i = nxt


def salvage(arena: Arena, table: bytes, i: int, limit: int, ttl: int) -> list[tuple[int, int]]:
    """The status byte of a chain whose links are sound: the last byte of its last descriptor."""
    while True:
        addr, length, flags, nxt = DESC.unpack_from(table, i * 16)
        if not flags & NEXT:
            break
        if ttl == 0 or nxt >= limit:
            return []
        ttl -= 1
        i = nxt
    if flags & WRITE and not flags & INDIRECT and length and arena.mapped(addr + length - 1, 1):
        return [(addr + length - 1, 1)]
    return []


# -- a hostile driver ------------------------------------------------------------------------


def _addr_len(region: tuple[int, int]) -> st.SearchStrategy[tuple[int, int]]:
    gpa, size = region
    inside = st.tuples(
        st.sampled_from([0, 1, 16, size // 2, size - 16, size - 1, size]),
        st.sampled_from([0, 1, 15, 16, 17, 512, 4096, size, 2**32 - 1]),
    ).map(lambda ol: ((gpa + ol[0]) % 2**64, ol[1]))  # a u64 wraps, as the guest's does
    return inside


_OUTSIDE = st.sampled_from(
    [(0, 16), (RAM0 - 1, 2), (RAM0 - 16, 16), (2**64 - 1, 1), (2**64 - 8, 16), (0x30000, 1)]
)
_FLAGS = st.one_of(
    st.sampled_from([0, NEXT, WRITE, NEXT | WRITE]),
    st.sampled_from([INDIRECT, INDIRECT | NEXT, INDIRECT | WRITE]),
    st.integers(0, 0xFFFF),
)


@st.composite
def _ring(draw: st.DrawFn) -> dict[str, object]:
    layout = draw(st.sampled_from(LAYOUTS))
    size = 1 << draw(st.integers(0, 5))
    addr_len = st.one_of(*[_addr_len(reg) for reg in layout], _OUTSIDE)
    # Well-formed chains first (so walks reach deep), laid out in the ring table ...
    descs: list[tuple[int, int, int, int]] = []
    heads: list[int] = []
    for _ in range(draw(st.integers(1, 4))):
        n = draw(st.integers(1, 4))
        if len(descs) + n > size:
            break
        heads.append(len(descs))
        n_write = draw(st.integers(0, n))
        for k in range(n):
            flags = (NEXT if k < n - 1 else 0) | (WRITE if k >= n - n_write else 0)
            off = draw(st.integers(0, 0x4000 - 64))
            length = draw(st.sampled_from([0, 1, 16, 512, 4096 - off % 4096]))
            descs.append((DATA0 + off, length, flags, len(descs) + 1))
    # ... an indirect table in region 0, aimed at by a ring descriptor (maybe misaligned) ...
    table_off = 0x5000 + draw(st.sampled_from([0, 0, 1, 8, 15]))
    n = draw(st.integers(1, 6))
    n_write = draw(st.integers(0, n))
    data = st.builds(
        lambda o, n: (DATA0 + o, n), st.integers(0, 0x3000), st.sampled_from([1, 16, 512])
    )
    table = [
        (
            *draw(st.one_of(data, data, data, addr_len)),
            (NEXT if k < n - 1 else 0) | (WRITE if k >= n - n_write else 0),
            k + 1,
        )
        for k in range(n)
    ]
    if len(descs) < size:
        tlen = 16 * len(table) + draw(st.sampled_from([0, 0, 0, 0, 0, -16, 1, 8, 16 * 4096]))
        heads.append(len(descs))
        descs.append((RAM0 + table_off, max(0, tlen), INDIRECT, 0))
    descs += [(0, 0, 0, 0)] * (size - len(descs))
    # ... then damage: any field of any descriptor, in the ring or in the table.
    for _ in range(draw(st.integers(0, 3))):
        which = draw(st.integers(0, size - 1))
        a, n, f, x = descs[which]
        field = draw(st.integers(0, 3))
        if field == 0:
            a, n = draw(addr_len)
        elif field == 1:
            n = draw(st.sampled_from([0, 1, 2**31, 2**32 - 1, 0x4000]))
        elif field == 2:
            f = draw(_FLAGS)
        else:
            x = draw(st.sampled_from([0, which, which + 1, size - 1, size, 0xFFFF]))
        descs[which] = (a, n, f, x)
    if table and draw(st.booleans()):
        k = draw(st.integers(0, len(table) - 1))
        a, n, f, x = table[k]
        table[k] = (a, n, draw(_FLAGS), draw(st.sampled_from([0, k, k + 1, 0xFFFF])))
    heads += draw(st.lists(st.integers(0, size + 2), max_size=3))
    return {
        "layout": layout,
        "size": size,
        "descs": descs,
        "table": table,
        "table_off": table_off,
        "heads": draw(st.permutations(heads)),
        "avail_jump": draw(st.sampled_from([0, 0, 0, 1, size + 1, 0x8000])),
        "event_idx": draw(st.booleans()),
        "indirect": draw(st.sampled_from([True, True, True, False])),
        "start": draw(st.sampled_from([0, 0xFFFF - 1, 0x7FFF])),
    }


@fuzz_settings(1500)
@given(_ring())
def test_chains_match_the_reference_walk_and_stay_in_their_regions(spec: dict[str, object]) -> None:
    with case("chain-walker"):
        run_ring(spec)


def run_ring(spec: dict[str, object]) -> None:
    layout = spec["layout"]
    size = spec["size"]
    assert isinstance(layout, list) and isinstance(size, int)
    arena = Arena(layout)
    lay = vdefs.ring_layout(size)
    ring = arena.view(RAM0, lay.total)
    descs = spec["descs"]
    assert isinstance(descs, list)
    for i, d in enumerate(descs):
        DESC.pack_into(ring, lay.desc + 16 * i, *d)
    table = spec["table"]
    assert isinstance(table, list)
    tview = arena.view(RAM0 + int(spec["table_off"]), 16 * len(table))  # type: ignore[call-overload]
    for k, d in enumerate(table):
        DESC.pack_into(tview, 16 * k, *d)
    start = int(spec["start"])  # type: ignore[call-overload]
    heads = spec["heads"]
    assert isinstance(heads, list)
    avail = start
    for h in heads:
        put16(ring, lay.avail + 4 + 2 * (avail % size), h)
        avail = (avail + 1) & 0xFFFF
    if len(heads) > size:  # a driver cannot have more than a ring's worth outstanding
        avail = (start + size) & 0xFFFF
    avail = (avail + int(spec["avail_jump"])) & 0xFFFF  # type: ignore[call-overload]
    put16(ring, lay.avail + 2, avail)
    put16(ring, lay.used + 2, start)
    q = DeviceQueue(
        arena.mem,
        size,
        arena.mem.translate(RAM0 + lay.desc, vdefs.desc_table_bytes(size)),
        arena.mem.translate(RAM0 + lay.avail, vdefs.avail_ring_bytes(size)),
        arena.mem.translate(RAM0 + lay.used, vdefs.used_ring_bytes(size)),
        event_idx=bool(spec["event_idx"]),
        last_avail_idx=start,
        indirect=bool(spec["indirect"]),
    )
    before = bytes(arena.buf)
    used_off = arena.windows[0].offset + lay.used
    allowed = [(used_off, used_off + vdefs.used_ring_bytes(size))]
    pending = (avail - start) & 0xFFFF
    popped = 0
    while True:
        chain = q.pop()
        if chain is None:
            break
        popped += 1
        indirect = descs[chain.head][2] & INDIRECT if chain.head < len(descs) else 0
        event(("indirect " if indirect else "") + _outcome(chain))
        check_chain(arena, q, chain, bytes(arena.view(RAM0 + lay.desc, 16 * size)), size)
        written = 0
        for seg in chain.writable:  # the device fills every writable byte ...
            seg[:] = b"\xa5" * len(seg)
            written += len(seg)
            start_off = arena.offset(seg)
            allowed.append((start_off, start_off + len(seg)))
        q.push(chain.head, min(written, 0xFFFFFFFF))  # ... and completes the chain
        q.should_notify()
    if pending > size:
        assert q.broken is not None and "ahead" in q.broken
    else:
        assert popped <= pending
        if q.broken is None:
            assert popped == pending and q.last_avail_idx == avail
    assert arena.canaries_intact(), "a canary between regions was overwritten"
    assert changed_outside(before, arena.buf, allowed) == 0, "bytes changed outside the chains"
    assert get16(ring, lay.used + 2) == (start + popped) & 0xFFFF


def _outcome(chain: Chain) -> str:
    """Statistics label: which rule, if any, stopped the walk (--hypothesis-show-statistics)."""
    if chain.error is None:
        return f"chain ok ({len(chain.readable)}r/{len(chain.writable)}w)"
    reason = chain.error.split(": ", 1)[-1].split(" ")[:3]
    return f"chain error: {' '.join(reason)} (status {'kept' if chain.writable else 'lost'})"


def check_chain(arena: Arena, q: DeviceQueue, chain: Chain, table: bytes, size: int) -> None:
    assert 0 <= chain.head < size
    ref = ref_walk(arena, table, size, chain.head, q.indirect)
    got_r = [arena.locate(v) for v in chain.readable]
    got_w = [arena.locate(v) for v in chain.writable]
    assert (chain.error is not None) == ref.error, (chain.error, ref)
    assert (got_r, got_w) == (ref.readable, ref.writable), (chain.error, ref)
    if chain.error is None:
        assert sum(n for _, n in got_r + got_w) <= MAX_CHAIN_BYTES
    for v in chain.readable + chain.writable:
        assert not v.readonly and v.ndim == 1 and v.format == "B"


# -- GuestMemory alone: no view ever escapes a region -------------------------------------------

_BIG = st.one_of(
    st.integers(-(2**65), 2**65),
    st.sampled_from([0, 1, 2**32 - 1, 2**32, 2**63, 2**64 - 1, 2**64, 2**64 + 1, -1]),
)


@fuzz_settings(600)
@given(
    layout=st.sampled_from(LAYOUTS),
    probes=st.lists(
        st.tuples(
            st.one_of(
                _BIG,
                st.sampled_from([RAM0, RAM0 + RAM0_SIZE - 1, RAM0 + RAM0_SIZE, 2**64 - 1, 2**40]),
            ),
            st.one_of(_BIG, st.sampled_from([0, 1, RAM0_SIZE, 2**64 - RAM0, 0x1000])),
            st.booleans(),
        ),
        min_size=1,
        max_size=30,
    ),
)
def test_translate_never_returns_a_view_past_a_region(
    layout: list[tuple[int, int]], probes: list[tuple[int, int, bool]]
) -> None:
    with case("guest-memory"):
        arena = Arena(layout)
        for addr, length, by_uaddr in probes:
            if by_uaddr:  # aim near region k in the frontend's address space
                k = addr % len(layout)
                size = layout[k][1]
                off = (addr >> 8) % (size + 2) - 1  # -1 .. size
                gpa = layout[k][0] + off
                uaddr = arena.uaddr(k, off)
                expect = 0 <= off < size and 0 <= length <= size - off
                try:
                    v = arena.mem.translate_uaddr(uaddr, length)
                except GuestMemoryError:
                    assert not expect, (hex(uaddr), length)
                    continue
            else:
                gpa = addr
                expect = length >= 0 and gpa >= 0 and arena.mapped(gpa, length)
                try:
                    v = arena.mem.translate(gpa, length)
                except GuestMemoryError:
                    assert not expect, (hex(gpa), length)
                    continue
            assert expect, (hex(gpa), length)
            assert len(v) == length and arena.locate(v) == (gpa, length)
            v[:] = bytes(length)  # writable, and the write lands inside the region
        assert arena.canaries_intact()
