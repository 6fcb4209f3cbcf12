"""The virtio-blk device model: features, config space, and request execution.

It knows nothing of vhost-user or threads. The shell hands it descriptor
chains and gets back the number of bytes written into each; every check the
guest's input needs (range, alignment, limits, direction, read-only) is here.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import threading
from dataclasses import dataclass

from vblk.blk.config import CONFIG_SIZE, WRITEBACK_OFFSET, BlkConfig, seg_max_for
from vblk.blk.defs import (
    HEADER_SIZE,
    ID_BYTES,
    SECTOR_SHIFT,
    SECTOR_SIZE,
    SEGMENT_SIZE,
    WRITE_ZEROES_FLAG_UNMAP,
    Feature,
    ReqType,
    Status,
)
from vblk.blk.request import HEADER, BlkRequest, RequestError, parse_request
from vblk.io.image import Image, advance
from vblk.virtio import defs as vdefs
from vblk.virtio.queue import Chain

log = logging.getLogger(__name__)

# Plain ints for the per-request path: enum member lookups cost more than the work.
_IN, _OUT, _GET_ID = int(ReqType.IN), int(ReqType.OUT), int(ReqType.GET_ID)
_OK, _IOERR, _UNSUPP = int(Status.OK), int(Status.IOERR), int(Status.UNSUPP)

_SEGMENT = struct.Struct("<QII")
_SECTOR_MASK = SECTOR_SIZE - 1

#: Per-request cap on discard and write-zeroes (32 MiB), like QEMU's export.
MAX_DISCARD_SECTORS = 1 << 16
MAX_WRITE_ZEROES_SECTORS = 1 << 16
MAX_DISCARD_SEG = 16
#: Discards are aligned to 4 KiB, the hole granularity of common filesystems.
DISCARD_ALIGNMENT_SECTORS = 8


@dataclass(slots=True)
class DataRequest:
    """A checked read or write waiting for an I/O engine: where, which buffers, which way."""

    head: int
    write: bool
    offset: int
    bufs: list[memoryview]
    nbytes: int
    status: memoryview

    def request(self) -> BlkRequest:
        """The request as parsed, for the rare paths (errors, short transfers, tracing)."""
        sector = self.offset >> SECTOR_SHIFT
        if self.write:
            return BlkRequest(_OUT, sector, self.bufs, self.nbytes, [], 0, self.status)
        return BlkRequest(_IN, sector, [], 0, self.bufs, self.nbytes, self.status)


@dataclass
class Stats:
    """What one queue asked of the device; each queue thread owns one, so no locking."""

    requests: int = 0
    read_bytes: int = 0
    write_bytes: int = 0
    flushes: int = 0
    discards: int = 0
    write_zeroes: int = 0
    ioerr: int = 0
    unsupp: int = 0


class BlockDevice:
    """A virtio-blk device over an :class:`Image`."""

    def __init__(
        self,
        image: Image,
        *,
        num_queues: int = 1,
        queue_size: int = vdefs.MAX_QUEUE_SIZE,
        read_only: bool = False,
        serial: str = "",
    ) -> None:
        if len(serial.encode()) > ID_BYTES:
            raise ValueError(f"serial {serial!r} is longer than {ID_BYTES} bytes")
        self.image = image
        self.read_only = read_only or image.read_only
        self.serial = serial.encode()
        self.num_queues = num_queues
        self.queue_size = queue_size
        self.capacity = image.size >> SECTOR_SHIFT
        self.trace = log.isEnabledFor(logging.DEBUG)
        self._wce_lock = threading.Lock()
        self.config = BlkConfig(
            capacity=self.capacity,
            # queue_size is the largest ring served; seg_max must suit all of them.
            seg_max=seg_max_for(queue_size),
            blk_size=SECTOR_SIZE,
            min_io_size=1,
            writeback=1,
            num_queues=num_queues,
            max_discard_sectors=MAX_DISCARD_SECTORS,
            max_discard_seg=MAX_DISCARD_SEG,
            discard_sector_alignment=DISCARD_ALIGNMENT_SECTORS,
            max_write_zeroes_sectors=MAX_WRITE_ZEROES_SECTORS,
            max_write_zeroes_seg=1,
            write_zeroes_may_unmap=1,
        )

    @property
    def features(self) -> int:
        """Device feature bits offered to the driver (transport bits included)."""
        bits = [
            Feature.SEG_MAX,
            Feature.BLK_SIZE,
            Feature.TOPOLOGY,
            Feature.FLUSH,
            Feature.CONFIG_WCE,
            Feature.MQ,
            vdefs.VIRTIO_F_VERSION_1,
            vdefs.VIRTIO_F_RING_INDIRECT_DESC,
            vdefs.VIRTIO_F_RING_EVENT_IDX,
        ]
        if self.read_only:
            bits.append(Feature.RO)
        else:
            bits += [Feature.DISCARD, Feature.WRITE_ZEROES]
        return sum(1 << int(b) for b in bits)

    # -- config space ---------------------------------------------------------

    def read_config(self, offset: int, size: int) -> bytes | None:
        """GET_CONFIG: bytes of the config space; past its end reads as zero."""
        if offset < 0 or size < 0 or offset + size > 256:
            return None
        return self.config.pack().ljust(max(CONFIG_SIZE, offset + size), b"\0")[
            offset : offset + size
        ]

    def write_config(self, offset: int, data: bytes) -> bool:
        """SET_CONFIG: only ``writeback`` is writable (the CONFIG_WCE toggle)."""
        if offset != WRITEBACK_OFFSET or len(data) != 1 or data[0] > 1:
            return False
        with self._wce_lock:
            was = self.config.writeback
            self.config.writeback = data[0]
            if was and not data[0]:
                # Switching to writethrough: flush what is cached. After the
                # switch, so a write that saw writeback on (and skipped its own
                # flush) has already written, and this flush covers it.
                self.image.flush()
        log.info("write cache %s", "enabled (writeback)" if data[0] else "disabled (writethrough)")
        return True

    # -- requests -------------------------------------------------------------

    def handle(self, chain: Chain, stats: Stats) -> int | None:
        """Execute one chain now; returns the used length, or None when no status could be written.

        None means the chain had nowhere to put a status byte: the caller marks
        the queue broken, because the driver cannot learn what happened.
        """
        started = self.start(chain, stats)
        if not isinstance(started, DataRequest):
            return started
        try:
            if started.write:
                self.image.writev(started.bufs, started.offset)
            else:
                self.image.readv(started.bufs, started.offset)
        except OSError as e:
            return self.finish(started, -(e.errno or errno.EIO), stats)
        return self.finish(started, started.nbytes, stats)

    def start(self, chain: Chain, stats: Stats) -> DataRequest | int | None:
        """Parse and check a chain; run it unless it is a read or write.

        A valid IN/OUT comes back as a :class:`DataRequest` for an I/O engine to
        carry out and hand to :meth:`finish`. Anything else is done here and
        its used length returned (None: no status byte, see :meth:`handle`).

        The usual shape of a read or write (a 16-byte header descriptor, the
        data, a 1-byte status descriptor) is accepted on a short path with the
        same checks; anything else, and every refusal, takes the full one.
        """
        stats.requests += 1
        readable = chain.readable
        writable = chain.writable
        if chain.error is None and readable and writable:
            sbuf = writable[-1]
            if len(readable[0]) == HEADER_SIZE and len(sbuf) == 1:
                rtype, _, sector = HEADER.unpack_from(readable[0])
                if rtype == _IN and len(readable) == 1:
                    bufs, write = writable[:-1], False
                elif rtype == _OUT and len(writable) == 1 and not self.read_only:
                    bufs, write = readable[1:], True
                else:
                    bufs = None
                if bufs:
                    nbytes = sum(map(len, bufs))
                    cap = self.capacity
                    if (
                        nbytes
                        and not nbytes & _SECTOR_MASK
                        and sector <= cap
                        and nbytes >> SECTOR_SHIFT <= cap - sector
                    ):
                        return DataRequest(
                            chain.head, write, sector << SECTOR_SHIFT, bufs, nbytes, sbuf
                        )
        try:
            req = parse_request(chain)
        except RequestError as e:
            log.warning("request at descriptor %d rejected: %s", chain.head, e.reason)
            if e.status_buf is None:
                return None
            stats.ioerr += 1
            e.status_buf[0] = e.status
            return 1
        try:
            t = req.type
            if t == _IN or t == _OUT:
                return self._data_request(req, chain.head)
            status = self._execute(req, stats)
        except RequestError as e:
            log.warning("request type %d sector %d: %s", req.type, req.sector, e.reason)
            status = e.status
        except OSError as e:
            log.error("request type %d sector %d: I/O error: %s", req.type, req.sector, e)
            status = Status.IOERR
        return self._complete(req, chain.head, status, stats)

    def finish(self, data: DataRequest, result: int, stats: Stats) -> int:
        """Complete a read or write whose I/O moved ``result`` bytes (or failed with -errno)."""
        if result == data.nbytes and not self.trace:
            # The common case, kept short: all bytes moved, nothing to log or flush.
            if not data.write:
                stats.read_bytes += result
                data.status[0] = _OK
                return result + 1
            if self.config.writeback:
                stats.write_bytes += result
                data.status[0] = _OK
                return 1
        req = data.request()
        status = Status.OK
        try:
            if 0 <= result < data.nbytes:
                # Short transfer (a signal, a resized file): finish it synchronously.
                done = result
                rest = advance(data.bufs, done)
                if data.write:
                    self.image.writev(rest, data.offset + done)
                else:
                    self.image.readv(rest, data.offset + done)
            elif result < 0:
                raise OSError(-result, os.strerror(-result))
            if data.write:
                stats.write_bytes += data.nbytes
                if not self.config.writeback:
                    self.image.flush()
            else:
                stats.read_bytes += data.nbytes
        except OSError as e:
            log.error("request type %d sector %d: I/O error: %s", req.type, req.sector, e)
            status = Status.IOERR
        return self._complete(req, data.head, status, stats)

    def _complete(self, req: BlkRequest, head: int, status: Status, stats: Stats) -> int:
        """Write the status byte; returns the used length."""
        if status == Status.IOERR:
            stats.ioerr += 1
        elif status == Status.UNSUPP:
            stats.unsupp += 1
        if self.trace:
            log.debug(
                "desc %d: %s sector %d out %d in %d -> %s",
                head,
                _type_name(req.type),
                req.sector,
                req.out_len,
                req.in_len,
                Status(status).name,
            )
        req.status[0] = status
        if status != Status.OK:
            return 1
        if req.type == ReqType.IN:
            return req.in_len + 1
        if req.type == ReqType.GET_ID:
            return min(req.in_len, ID_BYTES) + 1
        return 1

    def _data_request(self, req: BlkRequest, head: int) -> DataRequest:
        """The checked I/O of an IN (else OUT) request."""
        if req.type == _IN:
            if req.out_len:
                raise self._fail("IN request carries device-readable data")
            offset = self._check_range(req.sector, req.in_len)
            return DataRequest(head, False, offset, req.in_, req.in_len, req.status)
        if req.in_len:
            raise self._fail("OUT request carries device-writable data")
        if self.read_only:
            raise self._fail("write to a read-only disk")
        offset = self._check_range(req.sector, req.out_len)
        return DataRequest(head, True, offset, req.out, req.out_len, req.status)

    def _fail(self, reason: str, status: Status = Status.IOERR) -> RequestError:
        return RequestError(reason, status, None)

    def _check_range(self, sector: int, nbytes: int) -> int:
        if nbytes % SECTOR_SIZE:
            raise self._fail(f"length {nbytes} is not a multiple of {SECTOR_SIZE}")
        if sector > self.capacity or (nbytes >> SECTOR_SHIFT) > self.capacity - sector:
            raise self._fail(f"{nbytes} bytes at sector {sector} run past capacity {self.capacity}")
        return sector << SECTOR_SHIFT

    def _execute(self, req: BlkRequest, stats: Stats) -> Status:
        """Requests other than IN/OUT: small, rare, run synchronously."""
        t = req.type
        if t == ReqType.FLUSH:
            if req.out_len or req.in_len:
                raise self._fail("FLUSH request carries data")
            stats.flushes += 1
            if not self.read_only:
                self.image.flush()
            return Status.OK
        if t == ReqType.GET_ID:
            if req.out_len:
                raise self._fail("GET_ID request carries device-readable data")
            self._get_id(req)
            return Status.OK
        if t == ReqType.DISCARD or t == ReqType.WRITE_ZEROES:
            self._discard_or_zero(req, stats)
            return Status.OK
        return Status.UNSUPP

    def _get_id(self, req: BlkRequest) -> None:
        answer = self.serial.ljust(ID_BYTES, b"\0")
        pos = 0
        for buf in req.in_:
            n = min(len(buf), ID_BYTES - pos)
            buf[:n] = answer[pos : pos + n]
            pos += n
            if pos >= ID_BYTES:
                break

    def _discard_or_zero(self, req: BlkRequest, stats: Stats) -> None:
        zero = req.type == ReqType.WRITE_ZEROES
        if req.in_len:
            raise self._fail("discard/write-zeroes request carries device-writable data")
        if self.read_only:
            raise self._fail("discard/write-zeroes on a read-only disk")
        if req.out_len == 0 or req.out_len % SEGMENT_SIZE:
            raise self._fail(f"segment data of {req.out_len} bytes is not a multiple of 16")
        nseg = req.out_len // SEGMENT_SIZE
        max_seg = self.config.max_write_zeroes_seg if zero else self.config.max_discard_seg
        if nseg > max_seg:
            raise self._fail(f"{nseg} segments exceed the limit of {max_seg}")
        raw = b"".join(req.out)
        max_sectors = (
            self.config.max_write_zeroes_sectors if zero else self.config.max_discard_sectors
        )
        segments = []
        for i in range(nseg):
            sector, num, flags = _SEGMENT.unpack_from(raw, i * SEGMENT_SIZE)
            allowed = WRITE_ZEROES_FLAG_UNMAP if zero else 0
            if flags & ~allowed:
                raise RequestError(f"unsupported segment flags {flags:#x}", Status.UNSUPP, None)
            if num > max_sectors:
                raise self._fail(f"{num} sectors exceed the limit of {max_sectors}")
            offset = self._check_range(sector, num << SECTOR_SHIFT)
            segments.append((offset, num << SECTOR_SHIFT, bool(flags & WRITE_ZEROES_FLAG_UNMAP)))
        for offset, length, unmap in segments:
            if not length:
                continue
            if zero:
                self.image.write_zeroes(offset, length, unmap=unmap)
                stats.write_zeroes += 1
            else:
                self.image.discard(offset, length)
                stats.discards += 1
        if zero and segments and not self.config.writeback:
            self.image.flush()  # writethrough: zeroes are data, durable before completion


def _type_name(rtype: int) -> str:
    try:
        return ReqType(rtype).name
    except ValueError:
        return f"type-{rtype}"
