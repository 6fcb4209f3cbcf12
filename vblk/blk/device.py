"""The virtio-blk device model: features, config space, and request execution.

It knows nothing of vhost-user or threads. The shell hands it descriptor
chains and gets back the number of bytes written into each; every check the
guest's input needs (range, alignment, limits, direction, read-only) is here.
What it offers follows the storage's :class:`~vblk.storage.base.Capabilities`,
and every operation, flushes and discards included, goes through a
:class:`~vblk.storage.base.StorageQueue`: the shell submits what :meth:`start`
returns and hands each completion to :meth:`finish`.
"""

from __future__ import annotations

import errno
import logging
import mmap
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
from vblk.io.image import advance
from vblk.storage.base import FLAG_UNMAP, Capabilities, Op, Storage, StorageQueue
from vblk.storage.sync import ControlQueue, wait
from vblk.virtio import defs as vdefs
from vblk.virtio.queue import Chain

log = logging.getLogger(__name__)

# Plain ints for the per-request path: enum member lookups cost more than the work.
_IN, _OUT, _GET_ID = int(ReqType.IN), int(ReqType.OUT), int(ReqType.GET_ID)
_OK, _IOERR, _UNSUPP = int(Status.OK), int(Status.IOERR), int(Status.UNSUPP)
_READ, _WRITE, _FLUSH, _DISCARD, _ZEROES = (int(o) for o in Op)

_SEGMENT = struct.Struct("<QII")

#: Per-request cap on discard and write-zeroes (32 MiB), like QEMU's export.
MAX_DISCARD_SECTORS = 1 << 16
MAX_WRITE_ZEROES_SECTORS = 1 << 16
MAX_DISCARD_SEG = 16
#: Chunk of the shared zero buffer a write-zeroes is written with, where the storage cannot zero.
ZERO_CHUNK = 1 << 20
# Page-aligned and zero-filled (anonymous mmap), so fit for O_DIRECT; only ever written from.
_ZEROS = memoryview(mmap.mmap(-1, ZERO_CHUNK))
#: A result no operation returns: a Pending never takes DataRequest's short path.
_NEVER = -(1 << 62)

#: One step of a Pending: op, offset, length, buffers, flags.
Step = tuple[int, int, int, list[memoryview], int]


@dataclass(slots=True)
class DataRequest:
    """A checked read or write waiting for the storage: where, which buffers, which way.

    ``op`` is ``Op.READ`` (0) or ``Op.WRITE`` (1) as a plain int; the
    worker submits it as it is, and it comes back as the completion's token.
    """

    head: int
    op: int
    offset: int
    bufs: list[memoryview]
    nbytes: int
    status: memoryview

    @property
    def write(self) -> bool:
        return self.op == _WRITE

    def request(self) -> BlkRequest:
        """The request as parsed, for the rare paths (errors, short transfers, tracing)."""
        sector = self.offset >> SECTOR_SHIFT
        if self.op:
            return BlkRequest(_OUT, sector, self.bufs, self.nbytes, [], 0, self.status)
        return BlkRequest(_IN, sector, [], 0, self.bufs, self.nbytes, self.status)


class Pending:
    """A request of several storage operations, run one after another.

    Flush, discard and write-zeroes requests, a write followed by its
    writethrough flush, the rest of a short transfer: each step is
    submitted when the one before it completes, with this object as token.
    """

    __slots__ = ("head", "pos", "read_bytes", "req", "steps", "write_bytes")
    #: Never equal to a result, so :meth:`BlockDevice.finish` goes straight to its slow path.
    nbytes = _NEVER
    op = -1

    def __init__(self, req: BlkRequest, head: int, steps: list[Step]) -> None:
        self.req = req
        self.head = head
        self.steps = steps
        self.pos = 0
        self.read_bytes = 0  # counted in Stats once the whole request succeeds
        self.write_bytes = 0

    @property
    def status(self) -> memoryview:
        return self.req.status


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
    """A virtio-blk device over a :class:`~vblk.storage.base.Storage`.

    The features and config space follow the storage's capabilities: RO
    when it cannot write; FLUSH and CONFIG_WCE when flushing means
    something; DISCARD when it can discard; WRITE_ZEROES whenever it can
    write (zero buffers are written where it cannot zero by itself);
    blk_size, opt_io_size and the discard alignment from its geometry.
    """

    def __init__(
        self,
        storage: Storage,
        *,
        num_queues: int = 1,
        queue_size: int = vdefs.MAX_QUEUE_SIZE,
        read_only: bool = False,
        serial: str = "",
    ) -> None:
        if len(serial.encode()) > ID_BYTES:
            raise ValueError(f"serial {serial!r} is longer than {ID_BYTES} bytes")
        caps = storage.caps
        bs = caps.block_size
        if bs < SECTOR_SIZE or bs & (bs - 1):
            raise ValueError(f"block size {bs} is not a power of two of at least {SECTOR_SIZE}")
        self.storage = storage
        self.caps = caps
        self.read_only = read_only or not caps.writable
        self.serial = serial.encode()
        self.num_queues = num_queues
        self.queue_size = queue_size
        self.capacity = caps.size >> SECTOR_SHIFT
        # Offsets and lengths of data requests must be multiples of the logical block.
        self._block_mask = bs - 1
        self._flushes = caps.flush and not self.read_only
        self._discards = caps.discard and not self.read_only
        self.trace = log.isEnabledFor(logging.DEBUG)
        self._wce_lock = threading.Lock()
        self.control = ControlQueue(storage)
        bs_sectors = bs >> SECTOR_SHIFT
        self.config = BlkConfig(
            capacity=self.capacity,
            # queue_size is the largest ring served; seg_max must suit all of them.
            seg_max=seg_max_for(queue_size),
            blk_size=bs,
            min_io_size=1,
            opt_io_size=caps.opt_io_size // bs,
            writeback=1,
            num_queues=num_queues,
            max_discard_sectors=MAX_DISCARD_SECTORS if self._discards else 0,
            max_discard_seg=MAX_DISCARD_SEG if self._discards else 0,
            discard_sector_alignment=(
                max(bs_sectors, caps.discard_granularity >> SECTOR_SHIFT) if self._discards else 0
            ),
            max_write_zeroes_sectors=0 if self.read_only else MAX_WRITE_ZEROES_SECTORS,
            max_write_zeroes_seg=0 if self.read_only else 1,
            write_zeroes_may_unmap=int(caps.write_zeroes and caps.zeroes_unmap),
        )

    @property
    def features(self) -> int:
        """Device feature bits offered to the driver (transport bits included)."""
        bits = [
            Feature.SEG_MAX,
            Feature.BLK_SIZE,
            Feature.TOPOLOGY,
            Feature.MQ,
            vdefs.VIRTIO_F_VERSION_1,
            vdefs.VIRTIO_F_RING_INDIRECT_DESC,
            vdefs.VIRTIO_F_RING_EVENT_IDX,
        ]
        if self.caps.flush:
            bits += [Feature.FLUSH, Feature.CONFIG_WCE]
        if self.read_only:
            bits.append(Feature.RO)
        else:
            bits.append(Feature.WRITE_ZEROES)
            if self._discards:
                bits.append(Feature.DISCARD)
        return sum(1 << int(b) for b in bits)

    def resized(self, caps: Capabilities) -> None:
        """The storage changed size: capacity and config space follow (the features do not)."""
        self.caps = caps
        self.capacity = caps.size >> SECTOR_SHIFT
        self.config.capacity = self.capacity

    def flush_now(self) -> None:
        """Flush the storage and wait (never on an I/O thread); OSError if it fails."""
        if self._flushes:
            self.control.run(_FLUSH, 0, 0, [], 0)

    def close(self) -> None:
        """Release the control queue (the queues' workers are gone by now)."""
        self.control.close()

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
                try:
                    self.flush_now()
                except OSError as e:
                    log.error("flush on the switch to writethrough failed: %s", e)
        log.info("write cache %s", "enabled (writeback)" if data[0] else "disabled (writethrough)")
        return True

    # -- requests -------------------------------------------------------------

    def handle(self, chain: Chain, stats: Stats) -> int | None:
        """Execute one chain and wait: the used length, or None when no status could be written.

        None means the chain had nowhere to put a status byte: the caller marks
        the queue broken, because the driver cannot learn what happened. This
        is the synchronous path (tests, tools); queue workers use
        :meth:`start` and :meth:`finish` over their own storage queue.
        """
        started = self.start(chain, stats)
        if started is None or isinstance(started, int):
            return started
        with self.control.lock:
            q = self.control.queue()
            if isinstance(started, DataRequest):
                q.submit(started.op, started.offset, started.nbytes, started.bufs, 0, started)
            else:
                self.begin(started, q)
            while True:
                q.commit()
                for token, res in wait(q):
                    n = self.finish(token, res, stats, q)  # type: ignore[arg-type]
                    if n >= 0:
                        return n

    def start(self, chain: Chain, stats: Stats) -> DataRequest | Pending | int | None:
        """Parse and check a chain.

        A valid IN/OUT comes back as a :class:`DataRequest` for the storage
        queue to carry out (op, offset, nbytes, bufs, flags 0, itself as
        token); a flush, discard or write-zeroes as a :class:`Pending` to
        :meth:`begin`. Each completion goes to :meth:`finish`. Anything else
        is answered here and its used length returned (None: no status byte,
        see :meth:`handle`).

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
                    bufs, write = writable[:-1], _READ
                elif rtype == _OUT and len(writable) == 1 and not self.read_only:
                    bufs, write = readable[1:], _WRITE
                else:
                    bufs = None
                if bufs:
                    nbytes = sum(map(len, bufs))
                    cap = self.capacity
                    offset = sector << SECTOR_SHIFT
                    if (
                        nbytes
                        and not (nbytes | offset) & self._block_mask
                        and sector <= cap
                        and nbytes >> SECTOR_SHIFT <= cap - sector
                    ):
                        return DataRequest(chain.head, write, offset, bufs, nbytes, sbuf)
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
            steps = self._execute(req, stats)
            if steps is None:
                status = Status.UNSUPP
            elif steps:
                return Pending(req, chain.head, steps)
            else:
                status = Status.OK
        except RequestError as e:
            log.warning("request type %d sector %d: %s", req.type, req.sector, e.reason)
            status = e.status
        return self._complete(req, chain.head, status, stats)

    def begin(self, pending: Pending, queue: StorageQueue) -> None:
        """Submit the first step of ``pending`` (what :meth:`start` returned) to ``queue``."""
        op, offset, length, bufs, flags = pending.steps[0]
        queue.submit(op, offset, length, bufs, flags, pending)

    def finish(
        self, data: DataRequest | Pending, result: int, stats: Stats, queue: StorageQueue
    ) -> int:
        """Take one completion: the used length, or -1 if the request went on in ``queue``.

        ``result`` is what the storage answered for ``data`` (bytes moved,
        0, or -errno). A short transfer, a writethrough flush and the next
        step of a :class:`Pending` are submitted to ``queue`` (the caller
        commits it) and the request completes later.
        """
        if result == data.nbytes and not self.trace:
            # The common case, kept short: all bytes moved, nothing to log or flush.
            if not data.op:
                stats.read_bytes += result
                data.status[0] = _OK
                return result + 1
            if self.config.writeback:
                stats.write_bytes += result
                data.status[0] = _OK
                return 1
        if type(data) is Pending:
            return self._advance(data, result, stats, queue)
        assert isinstance(data, DataRequest)
        req = data.request()
        if result < 0 or (result == 0 and data.nbytes):
            err = -result if result < 0 else errno.EIO
            log.error(
                "request type %d sector %d: I/O error: %s", req.type, req.sector, os.strerror(err)
            )
            return self._complete(req, data.head, Status.IOERR, stats)
        steps: list[Step] = []
        if result < data.nbytes:
            # Short transfer (a signal, a resized file, a backend's limit): submit the rest.
            rest = advance(data.bufs, result)
            steps.append((data.op, data.offset + result, data.nbytes - result, rest, 0))
        if data.op and self._flushes and not self.config.writeback:
            steps.append((_FLUSH, 0, 0, [], 0))
        if not steps:
            if data.op:
                stats.write_bytes += data.nbytes
            else:
                stats.read_bytes += data.nbytes
            return self._complete(req, data.head, Status.OK, stats)
        pending = Pending(req, data.head, steps)
        if data.op:
            pending.write_bytes = data.nbytes
        else:
            pending.read_bytes = data.nbytes
        self.begin(pending, queue)
        return -1

    def _advance(self, p: Pending, result: int, stats: Stats, queue: StorageQueue) -> int:
        """One step of ``p`` completed: submit the next (or the rest of a short one), or finish."""
        op, offset, length, bufs, flags = p.steps[p.pos]
        req = p.req
        if result < 0 or (op <= _WRITE and result == 0 and length):
            err = -result if result < 0 else errno.EIO
            log.error(
                "request type %d sector %d: %s failed: %s",
                req.type,
                req.sector,
                Op(op).name,
                os.strerror(err),
            )
            return self._complete(req, p.head, Status.IOERR, stats)
        if op <= _WRITE and result < length:
            p.steps[p.pos] = (op, offset + result, length - result, advance(bufs, result), flags)
        else:
            p.pos += 1
            if p.pos == len(p.steps):
                stats.read_bytes += p.read_bytes
                stats.write_bytes += p.write_bytes
                return self._complete(req, p.head, Status.OK, stats)
        op, offset, length, bufs, flags = p.steps[p.pos]
        queue.submit(op, offset, length, bufs, flags, p)
        return -1

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
            return DataRequest(head, _READ, offset, req.in_, req.in_len, req.status)
        if req.in_len:
            raise self._fail("OUT request carries device-writable data")
        if self.read_only:
            raise self._fail("write to a read-only disk")
        offset = self._check_range(req.sector, req.out_len)
        return DataRequest(head, _WRITE, offset, req.out, req.out_len, req.status)

    def _fail(self, reason: str, status: Status = Status.IOERR) -> RequestError:
        return RequestError(reason, status, None)

    def _check_range(self, sector: int, nbytes: int) -> int:
        bs = self._block_mask + 1
        if nbytes % bs:
            raise self._fail(f"length {nbytes} is not a multiple of the block size {bs}")
        if (sector << SECTOR_SHIFT) % bs:
            raise self._fail(f"sector {sector} is not aligned to the block size {bs}")
        if sector > self.capacity or (nbytes >> SECTOR_SHIFT) > self.capacity - sector:
            raise self._fail(f"{nbytes} bytes at sector {sector} run past capacity {self.capacity}")
        return sector << SECTOR_SHIFT

    def _execute(self, req: BlkRequest, stats: Stats) -> list[Step] | None:
        """Check a request other than IN/OUT; the storage operations it needs.

        An empty list: done already. None: a type this device does not know.
        """
        t = req.type
        if t == ReqType.FLUSH:
            if req.out_len or req.in_len:
                raise self._fail("FLUSH request carries data")
            stats.flushes += 1
            return [(_FLUSH, 0, 0, [], 0)] if self._flushes else []
        if t == ReqType.GET_ID:
            if req.out_len:
                raise self._fail("GET_ID request carries device-readable data")
            self._get_id(req)
            return []
        if t == ReqType.DISCARD or t == ReqType.WRITE_ZEROES:
            return self._discard_or_zero(req, stats)
        return None

    def _get_id(self, req: BlkRequest) -> None:
        answer = self.serial.ljust(ID_BYTES, b"\0")
        pos = 0
        for buf in req.in_:
            n = min(len(buf), ID_BYTES - pos)
            buf[:n] = answer[pos : pos + n]
            pos += n
            if pos >= ID_BYTES:
                break

    def _discard_or_zero(self, req: BlkRequest, stats: Stats) -> list[Step]:
        zero = req.type == ReqType.WRITE_ZEROES
        if req.in_len:
            raise self._fail("discard/write-zeroes request carries device-writable data")
        if self.read_only:
            raise self._fail("discard/write-zeroes on a read-only disk")
        if not zero and not self._discards:
            raise RequestError("discard is not offered", Status.UNSUPP, None)
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
        caps = self.caps
        steps: list[Step] = []
        for i in range(nseg):
            sector, num, flags = _SEGMENT.unpack_from(raw, i * SEGMENT_SIZE)
            allowed = WRITE_ZEROES_FLAG_UNMAP if zero else 0
            if flags & ~allowed:
                raise RequestError(f"unsupported segment flags {flags:#x}", Status.UNSUPP, None)
            if num > max_sectors:
                raise self._fail(f"{num} sectors exceed the limit of {max_sectors}")
            length = num << SECTOR_SHIFT
            offset = self._check_range(sector, length)
            if not length:
                continue
            if not zero:
                steps.append((_DISCARD, offset, length, [], 0))
                stats.discards += 1
                continue
            stats.write_zeroes += 1
            if caps.write_zeroes:
                unmap = FLAG_UNMAP if flags & WRITE_ZEROES_FLAG_UNMAP and caps.zeroes_unmap else 0
                steps.append((_ZEROES, offset, length, [], unmap))
            else:
                steps.append((_WRITE, offset, length, zero_buffers(length), 0))
        if zero and steps and self._flushes and not self.config.writeback:
            steps.append((_FLUSH, 0, 0, [], 0))  # writethrough: zeroes are data, durable first
        return steps


def zero_buffers(length: int) -> list[memoryview]:
    """``length`` bytes of zeroes as views of one shared buffer (no allocation per chunk)."""
    full, rest = divmod(length, ZERO_CHUNK)
    bufs = [_ZEROS] * full
    if rest:
        bufs.append(_ZEROS[:rest])
    return bufs


def _type_name(rtype: int) -> str:
    try:
        return ReqType(rtype).name
    except ValueError:
        return f"type-{rtype}"
