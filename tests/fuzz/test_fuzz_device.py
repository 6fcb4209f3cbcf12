"""Fuzz the request parser and the device model through the real ring, then the queue worker.

A driver lays out virtio-blk requests, mostly well-formed so they reach the
device's checks, then bends them: headers shorter than 16 bytes or split
across descriptors, sectors at and past capacity, lengths that are not whole
sectors, data in the wrong direction, a status descriptor that is empty or
not writable, DISCARD/WRITE_ZEROES with segment counts over the limit and
bad flags, unknown types, indirect tables, buffers outside every region or
straddling two regions that are adjacent in guest-physical space, loops.

The oracle is a model of the disk (a bytearray) and of the spec: every chain
either gets exactly the status the model predicts, in its status byte, with
the used length it predicts, or has no status byte and is refused; the image
equals the model after every request; guest bytes change only inside the
chain's device-writable buffers and the used ring; the canaries between
regions survive. The worker target runs the same kind of chains through a
QueueWorker on an IOThread with each I/O engine, interrupt coalescing off and at
its default: every chain is answered or the queue is broken with a logged
reason, and no exception escapes the worker.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fuzzing import DESC, Arena, case, changed_outside, fuzz_settings, get16, put16
from hypothesis import event, given
from hypothesis import strategies as st

from vblk.blk.defs import ID_BYTES, SECTOR_SIZE, ReqType, Status
from vblk.blk.device import (
    MAX_DISCARD_SECTORS,
    MAX_DISCARD_SEG,
    MAX_WRITE_ZEROES_SECTORS,
    BlockDevice,
    DataRequest,
    Stats,
)
from vblk.io import uring
from vblk.storage.base import StorageQueue
from vblk.storage.file import FileStorage
from vblk.storage.sync import wait
from vblk.vhost_user.backend import Vring
from vblk.virtio import defs as vdefs
from vblk.virtio.coalesce import DEFAULT_HOLD_US
from vblk.virtio.queue import Chain, DeviceQueue
from vblk.worker import IOThread, QueueWorker

NEXT = vdefs.VIRTQ_DESC_F_NEXT
WRITE = vdefs.VIRTQ_DESC_F_WRITE
INDIRECT = vdefs.VIRTQ_DESC_F_INDIRECT

IMAGE_SIZE = 64 << 10
CAPACITY = IMAGE_SIZE // SECTOR_SIZE
SERIAL = "fuzz-serial-0123"
QSIZE = 64  # room for every descriptor of a case: nothing is overwritten before it is popped
R0 = 0x100000  # region 0: ring, then buffers
R0_SIZE = 0x60000
R1 = R0 + R0_SIZE  # region 1: adjacent in gpa, apart in the arena
R1_SIZE = 0x2000
HEAP = R0 + 0x1000
OUTSIDE = [0, R0 - 16, 2**64 - 16, R1 + R1_SIZE]

_TYPES = [
    *[ReqType.IN, ReqType.OUT] * 3,
    *[ReqType.FLUSH, ReqType.GET_ID, ReqType.DISCARD, ReqType.WRITE_ZEROES] * 2,
    ReqType.GET_LIFETIME,
    ReqType.SECURE_ERASE,
    99,
    2**32 - 1,
]
_SECTORS = st.one_of(
    st.integers(0, CAPACITY - 1),
    st.sampled_from([0, CAPACITY - 8, CAPACITY - 1, CAPACITY, CAPACITY + 1, 2**63, 2**64 - 1]),
)
_LENGTHS = st.sampled_from([512, 512, 1024, 4096, 8192, 0, 1, 511])


@dataclass
class Plan:
    """One request as the driver lays it out: (data, device-writable) buffers, in order."""

    bufs: list[tuple[bytes, bool]] = field(default_factory=list)
    indirect: int = -1  # -1: direct; else the table's misalignment in bytes
    damage: str = ""


@st.composite
def _segments(draw: st.DrawFn, zero: bool) -> bytes:
    """Valid segments, at most one of them bad, so each limit is what decides."""
    count = draw(st.sampled_from([0, 1, 1, 2, 3, MAX_DISCARD_SEG, MAX_DISCARD_SEG + 1, 20]))
    bad = draw(st.integers(-count, count - 1)) if count else -1  # >= 0: that one is bad
    out = b""
    for k in range(count):
        num = draw(st.sampled_from([0, 1, 8, 16]))
        sector = draw(st.integers(0, CAPACITY - num))
        flags = draw(st.sampled_from([0, 1])) if zero else 0
        if k == bad:
            which = draw(st.integers(0, 2))
            if which == 0:
                sector = draw(_SECTORS)
            elif which == 1:
                num = draw(st.sampled_from([MAX_DISCARD_SECTORS + 1, 2**32 - 1, 8]))
            else:
                flags = draw(st.sampled_from([1, 2, 2**32 - 1]))
        out += struct.pack("<QII", sector, num, flags)
    return out + draw(st.sampled_from([b"", b"", b"", b"\0" * 8]))


@st.composite
def _plan(draw: st.DrawFn) -> Plan:
    """Half the chains are well-formed rings-wise, so the request checks decide their fate;
    the other half are also bent at the descriptor level."""
    hostile = draw(st.booleans())
    rtype = draw(st.sampled_from(_TYPES))
    header = struct.pack("<IIQ", rtype, draw(st.sampled_from([0, 1, 2**32 - 1])), draw(_SECTORS))
    p = Plan()
    splits = ["one", "8+8", "+data"]
    if hostile:
        splits += ["4+12", "1+15", "short8", "short0"]
    split = draw(st.sampled_from(splits))
    if split == "one":
        p.bufs.append((header, False))
    elif split == "+data":  # header and OUT data in one descriptor
        p.bufs.append((header + os.urandom(draw(_LENGTHS)), False))
    elif split.startswith("short"):
        p.bufs.append((header[: int(split[5:])], False))
    else:
        a = int(split.split("+")[0])
        p.bufs += [(header[:a], False), (header[a:], False)]
    if rtype in (ReqType.DISCARD, ReqType.WRITE_ZEROES):
        p.bufs.append((draw(_segments(rtype == ReqType.WRITE_ZEROES)), False))
    data = rtype in (ReqType.IN, ReqType.OUT, ReqType.GET_ID)
    for _ in range(draw(st.integers(0, 3) if data else st.sampled_from([0, 0, 0, 1]))):
        n = draw(_LENGTHS)
        writable = rtype in (ReqType.IN, ReqType.GET_ID)
        if hostile and draw(st.booleans()):
            writable = not writable  # data the wrong way round
        p.bufs.append((os.urandom(n) if not writable else b"\xee" * n, writable))
    if rtype == ReqType.GET_ID and draw(st.booleans()):
        p.bufs.append((b"\xee" * ID_BYTES, True))
    statuses = ["byte", "wide"] + (["empty", "readonly", "none"] if hostile else [])
    status = draw(st.sampled_from(statuses))
    if status == "byte":
        p.bufs.append((b"\xee", True))
    elif status == "wide":
        p.bufs.append((b"\xee" * 4, True))
    elif status == "empty":
        p.bufs.append((b"", True))
    elif status == "readonly":
        p.bufs.append((b"\xee", False))
    # Writable buffers must come last; a driver that breaks this gets IOERR or a broken queue.
    if not hostile or draw(st.booleans()):
        p.bufs = [b for b in p.bufs if not b[1]] + [b for b in p.bufs if b[1]]
    p.indirect = draw(st.sampled_from([-1, 0, 8] if hostile else [-1, 0]))
    if hostile:
        p.damage = draw(st.sampled_from(["", "outside", "straddle", "loop", "nested"]))
    return p


class Ring:
    """A split ring in region 0 and a bump allocator for buffers, as a hostile driver."""

    def __init__(self, arena: Arena, *, event_idx: bool) -> None:
        self.arena = arena
        self.lay = vdefs.ring_layout(QSIZE)
        self.ring = arena.view(R0, self.lay.total)
        self.heap = HEAP
        self.next_desc = 0
        self.avail = 0
        self.event_idx = event_idx

    def queue(self) -> DeviceQueue:
        t = self.arena.mem.translate
        return DeviceQueue(
            self.arena.mem,
            QSIZE,
            t(R0 + self.lay.desc, vdefs.desc_table_bytes(QSIZE)),
            t(R0 + self.lay.avail, vdefs.avail_ring_bytes(QSIZE)),
            t(R0 + self.lay.used, vdefs.used_ring_bytes(QSIZE)),
            event_idx=self.event_idx,
        )

    def alloc(self, data: bytes, align: int = 16) -> int:
        gpa = -(-self.heap // align) * align
        self.heap = gpa + max(len(data), 1)
        assert self.heap <= R0 + R0_SIZE, "test bug: heap exhausted"
        self.arena.view(gpa, len(data))[:] = data
        return gpa

    def add(self, p: Plan) -> tuple[int, list[tuple[int, int, int]]]:
        """Lay a plan out; returns the head and its descriptors (gpa, len, flags)."""
        descs = []
        for data, writable in p.bufs:
            gpa = self.alloc(data)
            descs.append((gpa, len(data), WRITE if writable else 0))
        if p.damage == "outside" and descs:
            k = len(descs) // 2
            descs[k] = (OUTSIDE[k % len(OUTSIDE)], max(descs[k][1], 1), descs[k][2])
        elif p.damage == "straddle" and descs:
            gpa, n, f = descs[-1]
            descs[-1] = (R1 - 1, max(n, 2), f)  # one byte in region 0, the rest in region 1
        entries = [
            (g, n, f | (NEXT if k < len(descs) - 1 else 0), k + 1)
            for k, (g, n, f) in enumerate(descs)
        ]
        if p.damage == "loop" and entries:
            g, n, f, _ = entries[-1]
            entries[-1] = (g, n, f | NEXT, 0)
        if p.indirect >= 0 and entries:
            if p.damage == "nested":
                entries[0] = (self.alloc(bytes(16)), 16, INDIRECT, 1)
            table = b"".join(DESC.pack(*e) for e in entries)
            self.heap = -(-self.heap // 16) * 16 + p.indirect  # aligned, or misaligned on purpose
            entries = [(self.alloc(table, align=1), len(table), INDIRECT, 0)]
        if not entries:
            entries = [(HEAP, 0, 0, 0)]
        head = self.next_desc
        assert head + len(entries) <= QSIZE, "test bug: ring too small for the case"
        for k, (g, n, f, nxt) in enumerate(entries):
            nxt = head + nxt if f & NEXT else 0
            DESC.pack_into(self.ring, self.lay.desc + 16 * (head + k), g, n, f, nxt)
        self.next_desc = head + len(entries)
        put16(self.ring, self.lay.avail + 4 + 2 * (self.avail % QSIZE), head)
        self.avail = (self.avail + 1) & 0xFFFF
        put16(self.ring, self.lay.avail + 2, self.avail)
        return head, [(g, n, f) for g, n, f, _ in entries]


# -- the oracle -------------------------------------------------------------------------


def expect(
    arena: Arena, chain: Chain, model: bytearray, read_only: bool
) -> tuple[int | None, int, list[tuple[int, int, bool]]]:
    """(used length or None, status, model changes as (offset, length, zero)).

    Straight from the spec (5.2.6) and the device's documented limits.
    """
    w = chain.writable
    if not w or len(w[-1]) == 0:
        return None, -1, []
    if chain.error is not None:
        return 1, Status.IOERR, []
    readable = b"".join(bytes(v) for v in chain.readable)
    in_len = sum(len(v) for v in w) - 1
    if len(readable) < 16:
        return 1, Status.IOERR, []
    rtype, _, sector = struct.unpack_from("<IIQ", readable)
    out = readable[16:]
    ioerr: tuple[int | None, int, list[tuple[int, int, bool]]] = (1, Status.IOERR, [])

    def in_range(sector: int, nbytes: int) -> bool:
        return (
            nbytes % SECTOR_SIZE == 0 and sector <= CAPACITY and nbytes // 512 <= CAPACITY - sector
        )

    if rtype == ReqType.IN:
        if out or not in_range(sector, in_len):
            return ioerr
        return in_len + 1, Status.OK, []
    if rtype == ReqType.OUT:
        if in_len or read_only or not in_range(sector, len(out)):
            return ioerr
        return 1, Status.OK, [(sector * 512, len(out), False)] if out else []
    if rtype == ReqType.FLUSH:
        return ioerr if out or in_len else (1, Status.OK, [])
    if rtype == ReqType.GET_ID:
        return ioerr if out else (min(in_len, ID_BYTES) + 1, Status.OK, [])
    if rtype in (ReqType.DISCARD, ReqType.WRITE_ZEROES):
        zero = rtype == ReqType.WRITE_ZEROES
        if in_len or read_only or not out or len(out) % 16:
            return ioerr
        if len(out) // 16 > (1 if zero else MAX_DISCARD_SEG):
            return ioerr
        changes = []
        for k in range(len(out) // 16):
            s, n, flags = struct.unpack_from("<QII", out, 16 * k)
            if flags & ~(1 if zero else 0):
                return 1, Status.UNSUPP, []
            if n > (MAX_WRITE_ZEROES_SECTORS if zero else MAX_DISCARD_SECTORS):
                return ioerr
            if not in_range(s, n * 512):
                return ioerr
            if n:
                changes.append((s * 512, n * 512, True))
        return 1, Status.OK, changes
    return 1, Status.UNSUPP, []


def apply(model: bytearray, chain: Chain, changes: list[tuple[int, int, bool]]) -> None:
    readable = b"".join(bytes(v) for v in chain.readable)
    for off, n, zero in changes:
        model[off : off + n] = bytes(n) if zero else readable[16 : 16 + n]


# -- the device target ------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("fuzz-device") / "d.img"
    p.write_bytes(os.urandom(IMAGE_SIZE))
    return p


@pytest.fixture(scope="module")
def devices(image_path: Path) -> Iterator[dict[bool, BlockDevice]]:
    rw = FileStorage(str(image_path), aio="sync")
    ro = FileStorage(str(image_path), read_only=True, aio="sync")
    yield {
        False: BlockDevice(rw, queue_size=QSIZE, serial=SERIAL),
        True: BlockDevice(ro, queue_size=QSIZE, serial=SERIAL, read_only=True),
    }
    rw.close()
    ro.close()


@fuzz_settings(700)
@given(
    plans=st.lists(_plan(), min_size=1, max_size=6),
    read_only=st.booleans(),
    event_idx=st.booleans(),
    split_io=st.sampled_from(["handle", "handle", "full", "short", "eio"]),
)
def test_every_chain_gets_the_status_the_spec_says(
    devices: dict[bool, BlockDevice],
    image_path: Path,
    plans: list[Plan],
    read_only: bool,
    event_idx: bool,
    split_io: str,
) -> None:
    with case("device"):
        device = devices[read_only]
        model = bytearray(image_path.read_bytes())
        arena = Arena([(R0, R0_SIZE), (R1, R1_SIZE)])
        ring = Ring(arena, event_idx=event_idx)
        q = ring.queue()
        for p in plans:
            ring.add(p)
        stats = Stats()
        used_off = arena.windows[0].offset + ring.lay.used
        used_span = (used_off, used_off + vdefs.used_ring_bytes(QSIZE))
        while (chain := q.pop()) is not None:
            before = bytes(arena.buf)
            want_used, want_status, changes = expect(arena, chain, model, device.read_only)
            status_view = chain.writable[-1][-1:] if chain.writable else None
            used = run(device, chain, stats, split_io)
            if split_io == "eio" and want_status == Status.OK and _is_data(chain):
                want_used, want_status, changes = 1, Status.IOERR, []
            event(
                f"{_name(_type(chain))}: status {want_status if want_used is not None else 'none'}"
            )
            assert used == want_used, (chain.error, used, want_used, want_status)
            if used is None:
                q.mark_broken("no status byte")  # as the worker does
                assert bytes(arena.buf) == before, "a chain with no status byte changed memory"
                break
            assert status_view is not None and status_view[0] == want_status
            apply(model, chain, changes)
            if want_status == Status.OK and _type(chain) == ReqType.IN:
                data = b"".join(bytes(v) for v in chain.writable)[: used - 1]
                sector = struct.unpack_from("<Q", b"".join(bytes(v) for v in chain.readable), 8)[0]
                assert data == model[sector * 512 : sector * 512 + used - 1]
            if want_status == Status.OK and _type(chain) == ReqType.GET_ID:
                data = b"".join(bytes(v) for v in chain.writable)[: used - 1]
                assert data == SERIAL.encode().ljust(ID_BYTES, b"\0")[: used - 1]
            q.push(chain.head, used)
            allowed = [used_span] + [
                (arena.offset(v), arena.offset(v) + len(v)) for v in chain.writable
            ]
            assert changed_outside(before, arena.buf, allowed) == 0, "guest bytes changed outside"
            assert image_path.read_bytes() == model, "the image differs from the model"
        assert arena.canaries_intact()


def _name(rtype: int) -> str:
    try:
        return ReqType(rtype).name
    except ValueError:
        return "other" if rtype >= 0 else "no header"


def _type(chain: Chain) -> int:
    readable = b"".join(bytes(v) for v in chain.readable)
    return int(struct.unpack_from("<I", readable)[0]) if len(readable) >= 16 else -1


def _is_data(chain: Chain) -> bool:
    return chain.error is None and _type(chain) in (ReqType.IN, ReqType.OUT)


def run(device: BlockDevice, chain: Chain, stats: Stats, how: str) -> int | None:
    """handle(), or start() then the I/O (whole, short, or failed) then finish()."""
    if how == "handle":
        return device.handle(chain, stats)
    started = device.start(chain, stats)
    if not isinstance(started, DataRequest):
        if started is None or isinstance(started, int):
            return started
        q = device.storage.open_queue(0, 8)
        try:
            device.begin(started, q)
            return _settle(device, q, -1, stats)
        finally:
            q.close()
    q = device.storage.open_queue(0, 8)
    try:
        if how == "eio":
            return device.finish(started, -errno.EIO, stats, q)
        return _settle(device, q, _partly(device, started, how, stats, q), stats)
    finally:
        q.close()


def _settle(device: BlockDevice, q: StorageQueue, n: int, stats: Stats) -> int:
    """Run what finish() resubmitted until the request completes."""
    while n < 0:
        q.commit()
        for token, res in wait(q):
            n = device.finish(token, res, stats, q)  # type: ignore[arg-type]
    return n


def _partly(
    device: BlockDevice, started: DataRequest, how: str, stats: Stats, q: StorageQueue
) -> int:
    """Move all or half of a request's bytes by hand, then finish() it."""
    done = started.nbytes if how == "full" else started.nbytes // 2
    rw = os.pwritev if started.write else os.preadv
    moved = 0
    bufs: list[memoryview] = []
    left = done
    for b in started.bufs:
        if left <= 0:
            break
        bufs.append(b[: min(len(b), left)])
        left -= len(bufs[-1])
    if bufs:
        fd = device.storage.image.fd  # type: ignore[attr-defined]
        moved = rw(fd, bufs, started.offset)
    return device.finish(started, moved, stats, q)


# -- the worker target: real threads, every engine --------------------------------------


class _Errors(logging.Handler):
    """Collects log records: reasons for broken queues, and any exception a worker logged."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


ENGINES = ["sync", "threads"] + (["io_uring"] if uring.available() else [])


@pytest.mark.parametrize("engine", ENGINES)
def test_worker_engines_answer_or_break_with_a_reason(engine: str, image_path: Path) -> None:
    if os.environ.get("CI") == "true":
        assert "io_uring" in ENGINES, "io_uring must be available in CI"

    reached = {"answered": 0, "broken": 0}
    storage = FileStorage(str(image_path), aio=engine, io_threads=3)
    device = BlockDevice(storage, queue_size=QSIZE, serial=SERIAL)

    @fuzz_settings(60)
    @given(
        plans=st.lists(_plan(), min_size=1, max_size=8),
        event_idx=st.booleans(),
        coalesce_us=st.sampled_from([0, DEFAULT_HOLD_US]),
    )
    def run_worker(plans: list[Plan], event_idx: bool, coalesce_us: int) -> None:
        with case(f"worker-{engine}"):
            answered, broken = worker_case(
                engine, device, image_path, plans, event_idx, coalesce_us
            )
        reached["answered"] += answered
        reached["broken"] += broken

    try:
        run_worker()
    finally:
        device.close()
        storage.close()
    # The cases reached both outcomes: real work done, and queues broken by bad chains.
    assert reached["answered"] > 0 and reached["broken"] > 0, reached


def worker_case(
    engine: str,
    device: BlockDevice,
    image_path: Path,
    plans: list[Plan],
    event_idx: bool,
    coalesce_us: int = 0,
) -> tuple[int, bool]:
    """Run the plans through a QueueWorker; returns (chains answered, queue broken)."""
    before_image = image_path.read_bytes()
    arena = Arena([(R0, R0_SIZE), (R1, R1_SIZE)])
    ring = Ring(arena, event_idx=event_idx)
    laid = [ring.add(p) for p in plans]
    plain = {head for (head, _), p in zip(laid, plans, strict=True) if not p.damage}
    vring = Vring(0, num=QSIZE)
    vring.queue = ring.queue()
    kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    vring.kick_fd = os.dup(kick)
    call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    vring.call_fd = os.dup(call)
    errors = _Errors()
    logging.getLogger("vblk").addHandler(errors)
    worker = QueueWorker(vring, device, coalesce_us=coalesce_us)
    thread = IOThread()
    thread.start()
    try:
        thread.add(worker)
        os.eventfd_write(kick, 1)
        deadline = time.monotonic() + 20
        q = vring.queue
        while q.broken is None and get16(ring.ring, ring.lay.used + 2) != len(plans):
            assert time.monotonic() < deadline, "chains neither answered nor refused"
            select.select([call], [], [], 0.05)
    finally:
        thread.remove(worker)
        thread.stop()
        logging.getLogger("vblk").removeHandler(errors)
        vring.close_fds()
        os.close(kick)
        os.close(call)
    crashed = [r for r in errors.records if r.exc_info]
    assert not crashed, f"an exception escaped into the worker: {crashed[0].getMessage()}"
    if q.broken is not None:
        assert any("broken" in r.getMessage() for r in errors.records), "broken without a log line"
        event(f"{engine}: queue broken")
    else:
        event(f"{engine}: all answered")
    n_used = get16(ring.ring, ring.lay.used + 2)
    answered = set()
    for k in range(n_used):
        head, _ = struct.unpack_from("<II", ring.ring, ring.lay.used + 4 + 8 * (k % QSIZE))
        answered.add(head)
    allowed: list[tuple[int, int]] = []
    for head, descs in laid:
        if head not in answered or head not in plain:
            continue
        last = _status_desc(arena, descs)
        assert last is None or arena.view(last, 1)[0] in (0, 1, 2), "answered without a status"
    for off, n in _written_ranges(arena, laid, answered):
        allowed.append((off, off + n))
    after = image_path.read_bytes()
    assert changed_outside(before_image, after, allowed) == 0, "image changed outside requests"
    assert arena.canaries_intact()
    return n_used, q.broken is not None


def _status_desc(arena: Arena, descs: list[tuple[int, int, int]]) -> int | None:
    """The status byte's gpa when the chain is a plain direct one, else None (not tracked)."""
    g, n, f = descs[-1]
    if f & INDIRECT or not f & WRITE or not n or not arena.mapped(g, n):
        return None
    return g + n - 1


def _written_ranges(
    arena: Arena, laid: list[tuple[int, list[tuple[int, int, int]]]], answered: set[int]
) -> list[tuple[int, int]]:
    """Image ranges the answered writes, discards and write-zeroes may touch."""
    out: list[tuple[int, int]] = []
    for head, descs in laid:
        if head not in answered:
            continue
        payload = b""
        for g, n, f in descs:
            if f & INDIRECT and arena.mapped(g, n):
                table = bytes(arena.view(g, n))
                for k in range(n // 16):
                    tg, tn, tf, _ = DESC.unpack_from(table, 16 * k)
                    if not tf & WRITE and arena.mapped(tg, tn):
                        payload += bytes(arena.view(tg, tn))
            elif not f & WRITE and arena.mapped(g, n):
                payload += bytes(arena.view(g, n))
        if len(payload) < 16:
            continue
        rtype, _, sector = struct.unpack_from("<IIQ", payload)
        if rtype == ReqType.OUT and sector < CAPACITY:
            out.append((sector * 512, len(payload) - 16))
        elif rtype in (ReqType.DISCARD, ReqType.WRITE_ZEROES):
            for k in range((len(payload) - 16) // 16):
                s, n, _ = struct.unpack_from("<QII", payload, 16 + 16 * k)
                if s < CAPACITY:
                    out.append((s * 512, n * 512))
    return out
