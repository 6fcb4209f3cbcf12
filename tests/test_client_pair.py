"""Driver and device over one bytearray: no sockets, no eventfds, no threads.

The client's RequestRing (its request layout on the driver's DriverQueue) and
the backend's DeviceQueue + BlockDevice share one piece of memory, as a guest
and ``vblk serve`` would. Each side is built from the same ``vblk.virtio``
code, so this proves the ring from both ends and the request layout the
client builds is the one the device model parses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from vblk.blk.defs import ID_BYTES, ReqType, Status
from vblk.blk.device import BlockDevice, Stats
from vblk.client import GPA_BASE, SLOT_BYTES, RequestRing, pack_segment
from vblk.memory import GuestMemory
from vblk.storage.file import FileStorage
from vblk.virtio import defs as vdefs
from vblk.virtio.queue import DeviceQueue

IMAGE_SIZE = 1 << 20
UADDR = 0x7F00_0000_0000


class Pair:
    """A RequestRing (driver) and a DeviceQueue + BlockDevice (device) over one bytearray."""

    def __init__(
        self, tmp: Path, *, size: int = 16, event_idx: bool = True, read_only: bool = False
    ) -> None:
        img = tmp / "pair.img"
        if not img.exists():
            with open(img, "wb") as f:
                f.truncate(IMAGE_SIZE)
        self.path = str(img)
        self.read_only = read_only
        self.image = FileStorage(self.path, read_only=read_only, aio="sync")
        self.device = BlockDevice(self.image, read_only=read_only, serial="pair-serial")
        layout = vdefs.ring_layout(size)
        ring_bytes = -(-layout.total // 4096) * 4096
        slot_bytes = -(-size * SLOT_BYTES // 4096) * 4096
        self.data_off = ring_bytes + slot_bytes
        total = self.data_off + (256 << 10)
        self.mem = memoryview(bytearray(total))
        self.guest = GuestMemory()
        self.guest.add(GPA_BASE, total, UADDR, self.mem)
        self.driver = RequestRing(
            size,
            self.mem[:ring_bytes],
            self.mem[ring_bytes : ring_bytes + slot_bytes],
            GPA_BASE + ring_bytes,
            event_idx=event_idx,
        )
        # The device finds the rings the way a backend does: by translating addresses.
        self.dq = DeviceQueue(
            self.guest,
            size,
            self.guest.translate_uaddr(UADDR + layout.desc, vdefs.desc_table_bytes(size)),
            self.guest.translate_uaddr(UADDR + layout.avail, vdefs.avail_ring_bytes(size)),
            self.guest.translate_uaddr(UADDR + layout.used, vdefs.used_ring_bytes(size)),
            event_idx=event_idx,
        )

    def use_engine(self, engine: str) -> None:
        """Serve the image through ``engine`` (``--aio``) from now on."""
        if self.image.aio != engine:
            self.device.close()
            self.image.close()
            self.image = FileStorage(self.path, read_only=self.read_only, aio=engine, io_threads=2)
            self.device = BlockDevice(self.image, read_only=self.read_only, serial="pair-serial")

    def gpa(self, off: int) -> int:
        return GPA_BASE + self.data_off + off

    def data(self, off: int, n: int) -> memoryview:
        return self.mem[self.data_off + off : self.data_off + off + n]

    def serve(self) -> int:
        """What a queue worker does: pop, handle, push, until the avail ring is empty."""
        n = 0
        while (chain := self.dq.pop()) is not None:
            written = self.device.handle(chain, Stats())
            assert written is not None, chain.error
            self.dq.push(chain.head, written)
            n += 1
        return n

    def one(self, rtype: int, sector: int, out: Any = (), in_: Any = ()) -> int:
        """Submit one request, let the device run it, reap its status."""
        self.driver.submit(rtype, sector, out, in_, tag="x")
        assert self.serve() == 1
        done: list[tuple[Any, int]] = []
        assert self.driver.reap(done) == 1
        assert done[0][0] == "x"
        return done[0][1]


@pytest.fixture
def pair(tmp_path: Path) -> Pair:
    return Pair(tmp_path)


def test_write_then_read(pair: Pair) -> None:
    pair.data(0, 8192)[:] = bytes(range(256)) * 32
    pair.driver.submit_write(16, pair.gpa(0), 8192, tag=1)
    assert pair.serve() == 1
    done: list[tuple[Any, int]] = []
    assert pair.driver.reap(done) == 1 and done == [(1, Status.OK)]
    assert pair.one(ReqType.IN, 16, (), [(pair.gpa(65536), 8192)]) == Status.OK
    assert bytes(pair.data(65536, 8192)) == bytes(range(256)) * 32
    assert pair.driver.in_flight == 0


def test_image_holds_what_the_driver_wrote(tmp_path: Path) -> None:
    p = Pair(tmp_path)
    p.data(0, 512)[:] = b"\xab" * 512
    assert p.one(ReqType.OUT, 3, [(p.gpa(0), 512)]) == Status.OK
    assert p.one(ReqType.FLUSH, 0) == Status.OK
    raw = (tmp_path / "pair.img").read_bytes()
    assert raw[3 * 512 : 4 * 512] == b"\xab" * 512


def test_scattered_buffers(pair: Pair) -> None:
    """Data split over several descriptors, as size_max makes the client do."""
    for i in range(4):
        pair.data(i * 4096, 1024)[:] = bytes([i + 1]) * 1024
    out = [(pair.gpa(i * 4096), 1024) for i in range(4)]
    assert pair.one(ReqType.OUT, 0, out) == Status.OK
    assert pair.one(ReqType.IN, 0, (), [(pair.gpa(100_000), 4096)]) == Status.OK
    assert bytes(pair.data(100_000, 4096)) == b"".join(bytes([i + 1]) * 1024 for i in range(4))


def test_get_id(pair: Pair) -> None:
    assert pair.one(ReqType.GET_ID, 0, (), [(pair.gpa(0), ID_BYTES)]) == Status.OK
    assert bytes(pair.data(0, ID_BYTES)).rstrip(b"\0") == b"pair-serial"


def test_discard_and_write_zeroes(pair: Pair) -> None:
    pair.data(0, 16384)[:] = b"\xff" * 16384
    assert pair.one(ReqType.OUT, 0, [(pair.gpa(0), 16384)]) == Status.OK
    seg = pair.data(32768, 16)
    pack_segment(seg, 4096, 4096)
    assert pair.one(ReqType.WRITE_ZEROES, 0, [(pair.gpa(32768), 16)]) == Status.OK
    pack_segment(seg, 8192, 4096)
    assert pair.one(ReqType.DISCARD, 0, [(pair.gpa(32768), 16)]) == Status.OK
    assert pair.one(ReqType.IN, 0, (), [(pair.gpa(65536), 16384)]) == Status.OK
    got = bytes(pair.data(65536, 16384))
    assert got[:4096] == b"\xff" * 4096 and got[4096:8192] == bytes(4096)
    pack_segment(seg, 0, 4096, flags=0x80)
    assert pair.one(ReqType.WRITE_ZEROES, 0, [(pair.gpa(32768), 16)]) == Status.UNSUPP


def test_device_errors(pair: Pair) -> None:
    sectors = IMAGE_SIZE // 512
    assert pair.one(ReqType.IN, sectors, (), [(pair.gpa(0), 512)]) == Status.IOERR
    assert pair.one(ReqType.IN, sectors - 1, (), [(pair.gpa(0), 1024)]) == Status.IOERR
    assert pair.one(99, 0, (), [(pair.gpa(0), 512)]) == Status.UNSUPP
    # A read with its data in a device-readable buffer is malformed.
    assert pair.one(ReqType.IN, 0, [(pair.gpa(0), 512)]) == Status.IOERR


def test_read_only(tmp_path: Path) -> None:
    p = Pair(tmp_path, read_only=True)
    assert p.one(ReqType.OUT, 0, [(p.gpa(0), 512)]) == Status.IOERR
    assert p.one(ReqType.IN, 0, (), [(p.gpa(0), 512)]) == Status.OK


@pytest.mark.parametrize("event_idx", [True, False])
def test_many_in_flight_across_index_wrap(tmp_path: Path, event_idx: bool) -> None:
    """Fill the ring, drain, repeat past 65536 so both 16-bit indexes wrap."""
    p = Pair(tmp_path, size=8, event_idx=event_idx)
    done: list[tuple[Any, int]] = []
    total = 0
    kicks = 0
    while total < 66_000:
        batch = 0
        while p.driver.ring.num_free >= 2:  # a flush is header + status
            p.driver.submit(ReqType.FLUSH, 0, tag=total + batch)
            batch += 1
        kicks += p.driver.ring.kick_needed()
        assert p.serve() == batch
        assert p.driver.reap(done) == batch
        assert [t for t, _ in done] == list(range(total, total + batch))
        assert all(s == Status.OK for _, s in done)
        done.clear()
        total += batch
    assert p.driver.in_flight == 0
    assert kicks > 0


def test_out_of_order_completion(pair: Pair) -> None:
    """The device may complete in any order; tags follow their own requests."""
    for i in range(4):
        pair.data(i * 512, 512)[:] = bytes([i]) * 512
        pair.driver.submit_write(i, pair.gpa(i * 512), 512, tag=i)
    chains = []
    while (c := pair.dq.pop()) is not None:
        chains.append(c)
    for c in reversed(chains):
        pair.dq.push(c.head, pair.device.handle(c, Stats()) or 0)
    done: list[tuple[Any, int]] = []
    assert pair.driver.reap(done) == 4
    assert [t for t, _ in done] == [3, 2, 1, 0]
    assert pair.one(ReqType.IN, 0, (), [(pair.gpa(8192), 2048)]) == Status.OK
    assert bytes(pair.data(8192, 2048)) == b"".join(bytes([i]) * 512 for i in range(4))
