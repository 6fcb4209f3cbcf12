"""The virtio-blk device model over a raw file storage: every request type and every refusal."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import MemStorage

from vblk.blk.config import CONFIG_SIZE, WRITEBACK_OFFSET, BlkConfig
from vblk.blk.defs import Feature, ReqType, Status
from vblk.blk.device import MAX_DISCARD_SECTORS, BlockDevice, Stats
from vblk.io.image import Image
from vblk.storage.base import FLAG_UNMAP, Op
from vblk.storage.file import FileStorage
from vblk.virtio.queue import Chain

SIZE = 8 << 20


@pytest.fixture
def image_path(tmp_path: Path) -> Path:
    p = tmp_path / "disk.img"
    Image.create(str(p), SIZE)
    return p


@pytest.fixture
def dev(image_path: Path) -> Iterator[BlockDevice]:
    img = FileStorage(str(image_path), aio="sync")
    d = BlockDevice(img, num_queues=2, queue_size=128, serial="vblk-serial-1")
    yield d
    d.close()
    img.close()


def mv(data: bytes | int) -> memoryview:
    return memoryview(bytearray(data))


def request(
    dev: BlockDevice,
    rtype: int,
    sector: int,
    out: bytes = b"",
    in_len: int = 0,
    stats: Stats | None = None,
) -> tuple[int, bytes, int | None]:
    """Run one request; returns (status, data written by the device, used length)."""
    readable = [mv(struct.pack("<IIQ", rtype, 0, sector) + out)]
    data = mv(in_len)
    status = mv(b"\xee")
    writable = ([data] if in_len else []) + [status]
    used = dev.handle(Chain(0, readable, writable), stats or Stats())
    return status[0], bytes(data), used


def test_write_then_read_round_trips_through_the_file(dev: BlockDevice, image_path: Path) -> None:
    payload = os.urandom(4096)
    assert request(dev, ReqType.OUT, 10, payload)[0] == Status.OK
    st, got, used = request(dev, ReqType.IN, 10, in_len=4096)
    assert (st, got, used) == (Status.OK, payload, 4097)
    with open(image_path, "rb") as f:
        f.seek(10 * 512)
        assert f.read(4096) == payload


def test_scatter_gather_read_fills_every_buffer(dev: BlockDevice) -> None:
    payload = os.urandom(3 * 512)
    request(dev, ReqType.OUT, 0, payload)
    bufs = [mv(512), mv(1024)]
    status = mv(1)
    stats = Stats()
    used = dev.handle(Chain(0, [mv(struct.pack("<IIQ", ReqType.IN, 0, 0))], [*bufs, status]), stats)
    assert (stats.requests, stats.read_bytes) == (1, 1536)
    assert used == 1537 and bytes(bufs[0]) + bytes(bufs[1]) == payload


@pytest.mark.parametrize(
    ("rtype", "sector", "nbytes"),
    [
        (ReqType.IN, SIZE // 512, 512),  # starts at capacity
        (ReqType.IN, SIZE // 512 - 1, 1024),  # runs past capacity
        (ReqType.IN, 2**64 - 1, 512),  # sector overflow
        (ReqType.IN, 0, 100),  # not a sector multiple
        (ReqType.OUT, SIZE // 512, 512),
        (ReqType.OUT, 0, 700),
    ],
)
def test_out_of_range_or_misaligned_is_ioerr(
    dev: BlockDevice, rtype: int, sector: int, nbytes: int
) -> None:
    if rtype == ReqType.IN:
        st = request(dev, rtype, sector, in_len=nbytes)[0]
    else:
        st = request(dev, rtype, sector, out=b"z" * nbytes)[0]
    assert st == Status.IOERR


def test_wrong_buffer_directions_are_ioerr(dev: BlockDevice) -> None:
    assert request(dev, ReqType.IN, 0, out=b"x" * 512, in_len=512)[0] == Status.IOERR
    assert request(dev, ReqType.OUT, 0, out=b"x" * 512, in_len=512)[0] == Status.IOERR
    assert request(dev, ReqType.FLUSH, 0, out=b"x" * 512)[0] == Status.IOERR


def test_unknown_type_is_unsupp(dev: BlockDevice) -> None:
    for t in (2, 3, 99, ReqType.GET_LIFETIME, ReqType.SECURE_ERASE):
        assert request(dev, t, 0, in_len=16)[0] == Status.UNSUPP


def test_flush_and_get_id(dev: BlockDevice) -> None:
    assert request(dev, ReqType.FLUSH, 0)[0] == Status.OK
    st, data, used = request(dev, ReqType.GET_ID, 0, in_len=20)
    assert st == Status.OK and data == b"vblk-serial-1".ljust(20, b"\0") and used == 21


def seg(sector: int, num: int, flags: int = 0) -> bytes:
    return struct.pack("<QII", sector, num, flags)


def test_discard_reads_back_zero_and_punches_a_hole(dev: BlockDevice, image_path: Path) -> None:
    request(dev, ReqType.OUT, 0, os.urandom(1 << 20))
    used_before = os.stat(image_path).st_blocks
    assert request(dev, ReqType.DISCARD, 0, seg(0, 2048))[0] == Status.OK
    assert request(dev, ReqType.IN, 0, in_len=1 << 20)[1] == bytes(1 << 20)
    assert os.stat(image_path).st_blocks < used_before


@pytest.mark.parametrize("flags", [0, 1])
def test_write_zeroes_with_and_without_unmap(dev: BlockDevice, flags: int) -> None:
    request(dev, ReqType.OUT, 64, os.urandom(65536))
    assert request(dev, ReqType.WRITE_ZEROES, 0, seg(64, 128, flags))[0] == Status.OK
    assert request(dev, ReqType.IN, 64, in_len=65536)[1] == bytes(65536)


def test_discard_refusals(dev: BlockDevice) -> None:
    assert (
        request(dev, ReqType.DISCARD, 0, seg(0, 8, flags=1))[0] == Status.UNSUPP
    )  # unmap on discard
    assert request(dev, ReqType.WRITE_ZEROES, 0, seg(0, 8, flags=2))[0] == Status.UNSUPP
    assert request(dev, ReqType.DISCARD, 0, seg(SIZE // 512 - 4, 8))[0] == Status.IOERR
    assert request(dev, ReqType.DISCARD, 0, seg(0, MAX_DISCARD_SECTORS + 1))[0] == Status.IOERR
    assert request(dev, ReqType.DISCARD, 0, b"short")[0] == Status.IOERR
    assert (
        request(dev, ReqType.WRITE_ZEROES, 0, seg(0, 8) + seg(8, 8))[0] == Status.IOERR
    )  # 1 segment max


def test_read_only_refuses_every_write(image_path: Path) -> None:
    img = FileStorage(str(image_path), read_only=True, aio="sync")
    dev = BlockDevice(img, read_only=True)
    try:
        assert dev.features & (1 << Feature.RO)
        assert not dev.features & (1 << Feature.DISCARD)
        assert request(dev, ReqType.OUT, 0, b"x" * 512)[0] == Status.IOERR
        assert request(dev, ReqType.DISCARD, 0, seg(0, 8))[0] == Status.IOERR
        assert request(dev, ReqType.WRITE_ZEROES, 0, seg(0, 8))[0] == Status.IOERR
        assert request(dev, ReqType.IN, 0, in_len=512)[0] == Status.OK
    finally:
        img.close()
    with open(image_path, "rb") as f:
        assert f.read(512) == bytes(512)


def test_config_space_fields(dev: BlockDevice) -> None:
    raw = dev.read_config(0, CONFIG_SIZE)
    assert raw is not None and len(raw) == CONFIG_SIZE
    cfg = BlkConfig.unpack(raw)
    assert cfg.capacity == SIZE // 512
    assert (cfg.num_queues, cfg.seg_max, cfg.blk_size, cfg.writeback) == (2, 126, 512, 1)
    assert cfg.max_discard_sectors == MAX_DISCARD_SECTORS and cfg.write_zeroes_may_unmap == 1
    assert struct.unpack_from("<Q", raw)[0] == SIZE // 512
    assert dev.read_config(8, 4) == raw[8:12]
    assert dev.read_config(0, 300) is None
    assert dev.read_config(0, 100) == raw + bytes(100 - CONFIG_SIZE)


def test_config_writeback_toggle_only(dev: BlockDevice) -> None:
    assert dev.write_config(WRITEBACK_OFFSET, b"\0")
    assert dev.config.writeback == 0
    assert request(dev, ReqType.OUT, 0, b"w" * 512)[0] == Status.OK  # writethrough path
    assert not dev.write_config(0, b"\0" * 8)  # capacity is read-only
    assert not dev.write_config(WRITEBACK_OFFSET, b"\x05")


def test_switch_to_writethrough_flushes_after_the_switch(
    dev: BlockDevice, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that finished just before the switch saw writeback on and skipped its
    flush; only a flush issued after writeback reads 0 is sure to cover it."""
    seen: list[int] = []
    real_flush = os.fdatasync

    def flush(fd: int) -> None:
        seen.append(dev.config.writeback)
        real_flush(fd)

    monkeypatch.setattr(os, "fdatasync", flush)
    assert dev.write_config(WRITEBACK_OFFSET, b"\0")
    assert seen == [0]
    assert dev.write_config(WRITEBACK_OFFSET, b"\1")  # back to writeback: nothing to flush
    assert seen == [0]


@pytest.mark.parametrize(
    ("rtype", "writeback", "flushes"),
    [
        (ReqType.OUT, 1, 0),
        (ReqType.OUT, 0, 1),
        (ReqType.WRITE_ZEROES, 1, 0),
        (ReqType.WRITE_ZEROES, 0, 1),  # zeroes are data: durable in writethrough mode too
        (ReqType.DISCARD, 0, 0),  # discarded data has no value to keep
    ],
)
def test_writethrough_makes_writes_durable_before_completion(
    dev: BlockDevice, rtype: ReqType, writeback: int, flushes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real_flush = os.fdatasync
    dev.config.writeback = writeback

    def flush(fd: int) -> None:
        calls.append(1)
        real_flush(fd)

    monkeypatch.setattr(os, "fdatasync", flush)
    out = b"w" * 512 if rtype == ReqType.OUT else struct.pack("<QII", 8, 8, 0)
    assert request(dev, rtype, 0, out)[0] == Status.OK
    assert len(calls) == flushes


def test_chain_without_status_byte_returns_none(dev: BlockDevice) -> None:
    assert dev.handle(Chain(0, [mv(16)], []), Stats()) is None


def test_serial_too_long_is_refused(image_path: Path) -> None:
    img = FileStorage(str(image_path), aio="sync")
    try:
        with pytest.raises(ValueError):
            BlockDevice(img, serial="x" * 21)
    finally:
        img.close()


def test_stats_count_what_each_queue_asked(dev: BlockDevice) -> None:
    st = Stats()
    request(dev, ReqType.OUT, 0, b"a" * 4096, stats=st)
    request(dev, ReqType.IN, 0, in_len=1024, stats=st)
    request(dev, ReqType.FLUSH, 0, stats=st)
    request(dev, ReqType.DISCARD, 0, seg(0, 8), stats=st)
    request(dev, ReqType.WRITE_ZEROES, 0, seg(8, 8), stats=st)
    request(dev, ReqType.IN, SIZE // 512, in_len=512, stats=st)  # IOERR
    request(dev, 77, 0, stats=st)  # UNSUPP
    assert (st.requests, st.write_bytes, st.read_bytes, st.flushes) == (7, 4096, 1024, 1)
    assert (st.discards, st.write_zeroes, st.ioerr, st.unsupp) == (1, 1, 1, 1)


def test_start_finish_split_and_short_or_failed_transfers(
    dev: BlockDevice, image_path: Path
) -> None:
    from vblk.blk.device import DataRequest, Pending
    from vblk.storage.base import Op

    payload = os.urandom(8192)
    request(dev, ReqType.OUT, 0, payload)
    data, status = mv(8192), mv(b"\xee")
    st = Stats()
    chain = Chain(5, [mv(struct.pack("<IIQ", ReqType.IN, 0, 0))], [data, status])
    started = dev.start(chain, st)
    assert isinstance(started, DataRequest) and not started.write and started.nbytes == 8192
    assert status[0] == 0xEE  # nothing completed yet
    # The storage moved only 1000 bytes: finish submits the rest to the queue.
    q = dev.storage.open_queue(0, 8)
    os.preadv(os.open(image_path, os.O_RDONLY), [data[:1000]], 0)
    assert dev.finish(started, 1000, st, q) == -1
    assert status[0] == 0xEE
    [(token, res)] = q.reap()
    assert token is not started and res == 8192 - 1000
    assert dev.finish(token, res, st, q) == 8193  # type: ignore[arg-type]
    assert status[0] == Status.OK and bytes(data) == payload
    # A failed transfer (-EIO) is IOERR with used length 1; nothing moved (0) is IOERR too.
    for bad in (-5, 0):
        started = dev.start(chain, st)
        assert isinstance(started, DataRequest)
        assert dev.finish(started, bad, st, q) == 1 and status[0] == Status.IOERR
    # A flush goes to the storage too, as a Pending of one step.
    flush = Chain(6, [mv(struct.pack("<IIQ", ReqType.FLUSH, 0, 0))], [mv(b"\xee")])
    pending = dev.start(flush, st)
    assert isinstance(pending, Pending) and pending.steps == [(Op.FLUSH, 0, 0, [], 0)]
    dev.begin(pending, q)
    [(token, res)] = q.reap()
    assert token is pending and dev.finish(pending, res, st, q) == 1
    q.close()


def _hdr(rtype: int, sector: int) -> bytes:
    return struct.pack("<IIQ", rtype, 0, sector)


@pytest.mark.parametrize(
    "shape",
    [
        "in",  # header | data | status: the usual shape, short path
        "in-2bufs",
        "out",
        "out-2bufs",
        "header+data",  # header and OUT data in one descriptor: full path
        "data+status",  # IN data and status in one descriptor: full path
        "in-misaligned",
        "in-past-end",
        "in-at-end",
        "out-read-only",
        "in-with-out-data",
        "out-with-in-data",
        "in-empty-buffer",
        "huge-sector",
    ],
)
@pytest.mark.parametrize("read_only", [False, True])
def test_short_path_matches_the_full_parse(image_path: Path, shape: str, read_only: bool) -> None:
    """start()'s short path for plain reads and writes gives what parse_request + checks give."""
    from vblk.blk.device import DataRequest
    from vblk.blk.request import RequestError, parse_request

    img = FileStorage(str(image_path), read_only=read_only, aio="sync")
    dev = BlockDevice(img, read_only=read_only)
    end = SIZE // 512
    r, w = ReqType.IN, ReqType.OUT
    chains = {
        "in": ([_hdr(r, 8)], [4096, 1]),
        "in-2bufs": ([_hdr(r, 8)], [512, 3584, 1]),
        "out": ([_hdr(w, 8), b"x" * 4096], [1]),
        "out-2bufs": ([_hdr(w, 8), b"x" * 512, b"y" * 1024], [1]),
        "header+data": ([_hdr(w, 8) + b"x" * 512], [1]),
        "data+status": ([_hdr(r, 8)], [4097]),
        "in-misaligned": ([_hdr(r, 8)], [1000, 1]),
        "in-past-end": ([_hdr(r, end - 1)], [1024, 1]),
        "in-at-end": ([_hdr(r, end - 2)], [1024, 1]),
        "out-read-only": ([_hdr(w, 0), b"x" * 512], [1]),
        "in-with-out-data": ([_hdr(r, 0), b"x" * 512], [512, 1]),
        "out-with-in-data": ([_hdr(w, 0), b"x" * 512], [512, 1]),
        "in-empty-buffer": ([_hdr(r, 0)], [0, 1]),
        "huge-sector": ([_hdr(r, 2**64 - 1)], [512, 1]),
    }
    readable, writable = chains[shape]

    def chain() -> Chain:
        return Chain(3, [mv(b) for b in readable], [mv(n) for n in writable])

    c = chain()
    got = dev.start(c, Stats())
    ref_chain = chain()
    try:
        req = parse_request(ref_chain)
        want: DataRequest | int | None = dev._data_request(req, 3)
    except RequestError:
        want = None
    if isinstance(want, DataRequest):
        assert isinstance(got, DataRequest), f"{shape}: full path accepts, short path refused"
        assert (got.head, got.write, got.offset, got.nbytes) == (
            want.head,
            want.write,
            want.offset,
            want.nbytes,
        )
        assert [len(b) for b in got.bufs] == [len(b) for b in want.bufs]
        # The status view is the last byte of the chain's last writable buffer.
        got.status[0] = 0x5A
        assert c.writable[-1][-1] == 0x5A
    else:
        assert not isinstance(got, DataRequest), f"{shape}: refused by the full path only"
        assert c.writable[-1][-1] == Status.IOERR
    img.close()


# -- what the device derives from the storage's capabilities ------------------------------


def _mem_device(**kw: Any) -> tuple[BlockDevice, MemStorage]:
    short = kw.pop("short", 0)
    mem = MemStorage(1 << 20, short=short, **kw)
    return BlockDevice(mem), mem


def test_features_follow_the_capabilities() -> None:
    def has(dev: BlockDevice, f: Feature) -> bool:
        return bool(dev.features & (1 << f))

    dev, _ = _mem_device(discard=True, write_zeroes=True, zeroes_unmap=True)
    assert has(dev, Feature.FLUSH) and has(dev, Feature.CONFIG_WCE) and has(dev, Feature.DISCARD)
    assert has(dev, Feature.WRITE_ZEROES) and not has(dev, Feature.RO)
    assert dev.config.write_zeroes_may_unmap == 1
    dev, _ = _mem_device(flush=False)
    assert not has(dev, Feature.FLUSH) and not has(dev, Feature.CONFIG_WCE)
    assert not has(dev, Feature.DISCARD) and dev.config.max_discard_sectors == 0
    assert has(dev, Feature.WRITE_ZEROES) and dev.config.write_zeroes_may_unmap == 0
    dev, _ = _mem_device(writable=False)
    assert has(dev, Feature.RO) and not has(dev, Feature.WRITE_ZEROES) and dev.read_only
    dev, _ = _mem_device(
        block_size=4096, opt_io_size=65536, discard=True, discard_granularity=1 << 20
    )
    cfg = dev.config
    assert (cfg.blk_size, cfg.opt_io_size, cfg.discard_sector_alignment) == (4096, 16, 2048)
    with pytest.raises(ValueError, match="power of two"):
        _mem_device(block_size=1000)


def test_block_size_alignment_is_enforced() -> None:
    dev, mem = _mem_device(block_size=4096)
    assert request(dev, ReqType.IN, 8, in_len=4096)[0] == Status.OK
    assert request(dev, ReqType.IN, 1, in_len=4096)[0] == Status.IOERR  # 512-aligned only
    assert request(dev, ReqType.IN, 8, in_len=512)[0] == Status.IOERR
    assert request(dev, ReqType.OUT, 8, b"x" * 1024)[0] == Status.IOERR
    assert [op[:3] for op in mem.ops] == [(Op.READ, 4096, 4096)]


def test_write_zeroes_without_storage_support_writes_zero_buffers() -> None:
    mem = MemStorage(4 << 20, write_zeroes=False)
    mem.data[:] = b"\xff" * len(mem.data)
    dev = BlockDevice(mem)
    n = 3 << 20  # three chunks of the shared zero buffer, and a bit
    assert request(dev, ReqType.WRITE_ZEROES, 0, seg(8, (n + 4096) >> 9))[0] == Status.OK
    assert mem.ops == [(Op.WRITE, 4096, n + 4096, 0)]
    assert mem.data[4096 : 8192 + n] == bytes(n + 4096)
    assert mem.data[:4096] == b"\xff" * 4096 and mem.data[8192 + n] == 0xFF


def test_write_zeroes_unmap_flag_reaches_the_storage_only_where_offered() -> None:
    dev, mem = _mem_device(write_zeroes=True, zeroes_unmap=True)
    assert request(dev, ReqType.WRITE_ZEROES, 0, seg(0, 8, 1))[0] == Status.OK
    assert mem.ops[-1] == (Op.WRITE_ZEROES, 0, 4096, FLAG_UNMAP)
    dev, mem = _mem_device(write_zeroes=True, zeroes_unmap=False)
    assert request(dev, ReqType.WRITE_ZEROES, 0, seg(0, 8, 1))[0] == Status.OK
    assert mem.ops[-1] == (Op.WRITE_ZEROES, 0, 4096, 0)


def test_discard_not_offered_is_unsupp_and_flush_not_needed_is_ok() -> None:
    dev, mem = _mem_device(discard=False, flush=False)
    assert request(dev, ReqType.DISCARD, 0, seg(0, 8))[0] == Status.UNSUPP
    assert request(dev, ReqType.FLUSH, 0)[0] == Status.OK
    assert mem.ops == []  # no flush to do: writes are durable at once


def test_short_transfers_are_resubmitted_until_done() -> None:
    dev, mem = _mem_device(short=1000)
    payload = os.urandom(8192)
    assert request(dev, ReqType.OUT, 0, payload)[0] == Status.OK
    assert mem.data[:8192] == payload
    assert [o[1] for o in mem.ops] == list(range(0, 8192, 1000))
    st, got, used = request(dev, ReqType.IN, 0, in_len=8192)
    assert (st, got, used) == (Status.OK, payload, 8193)


def test_storage_failures_are_ioerr_for_that_request_alone() -> None:
    dev, mem = _mem_device(discard=True)
    mem.fail = {Op.FLUSH, Op.DISCARD}
    assert request(dev, ReqType.FLUSH, 0)[0] == Status.IOERR
    assert request(dev, ReqType.DISCARD, 0, seg(0, 8))[0] == Status.IOERR
    assert request(dev, ReqType.OUT, 0, b"k" * 512)[0] == Status.OK
    dev.config.writeback = 0  # writethrough: the write's own flush fails, so does the write
    assert request(dev, ReqType.OUT, 0, b"k" * 512)[0] == Status.IOERR


def test_discard_segments_run_one_after_another() -> None:
    dev, mem = _mem_device(discard=True)
    assert request(dev, ReqType.DISCARD, 0, seg(0, 8) + seg(64, 0) + seg(128, 16))[0] == Status.OK
    assert mem.ops == [(Op.DISCARD, 0, 4096, 0), (Op.DISCARD, 128 * 512, 8192, 0)]
