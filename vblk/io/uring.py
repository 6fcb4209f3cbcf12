"""A minimal io_uring, by raw syscalls: readv/writev submitted in batches, reaped by eventfd.

Why: with O_DIRECT every request waits for the disk, and a queue thread that
does one preadv at a time gets queue depth 1. io_uring lets one thread keep a
whole virtqueue's worth of I/O in flight without a thread per request. Only
what vblk needs is here: setup, SQE/CQE rings, READV, WRITEV, FSYNC and
FALLOCATE (so flushes, discards and zeroing never block the queue thread
either), an eventfd for completions. The iovec arrays point straight at guest memory, so data still
moves with no copy.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
from collections.abc import Sequence

_SYS_SETUP, _SYS_ENTER, _SYS_REGISTER = 425, 426, 427
_OFF_SQ_RING, _OFF_CQ_RING, _OFF_SQES = 0, 0x8000000, 0x10000000
_FEAT_SINGLE_MMAP = 1
_FEAT_RW_CUR_POS = 8  # arrived with READ/WRITE (Linux 5.6): the sign they are there
_ENTER_GETEVENTS = 1
_REGISTER_EVENTFD = 4
OP_READV, OP_WRITEV = 1, 2
OP_READ, OP_WRITE = 22, 23  # one buffer, no iovec array (Linux 5.6)
OP_FSYNC = 3
OP_FALLOCATE = 17  # Linux 5.6
FSYNC_DATASYNC = 1
_SINGLE = {OP_READV: OP_READ, OP_WRITEV: OP_WRITE}

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long

# struct io_uring_params: 10 u32, then io_sqring_offsets and io_cqring_offsets (40 bytes each).
_PARAMS = struct.Struct("<10I" + "7IIQ" + "8IQ")
_SQE_SIZE = 64
# The fields we set, up to user_data; the SQE's last 24 bytes stay zero from the mmap.
_SQE_HEAD = struct.Struct("<BBHiQQIIQ")
_CQE = struct.Struct("<QiI")  # 16 bytes


class Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class UringError(OSError):
    """io_uring is unavailable or failed."""


class RingFull(UringError):
    """No free SQE until the kernel consumes some (submit) or completions are reaped."""


def _check(ret: int, what: str) -> int:
    if ret < 0:
        e = ctypes.get_errno()
        raise UringError(e, f"{what}: {os.strerror(e)}")
    return ret


def clear_eventfd(fd: int) -> None:
    """Consume whatever a non-blocking eventfd has counted, if anything."""
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass


def address_of(view: memoryview) -> int:
    """The address of a writable memoryview's first byte (guest memory is mapped read/write).

    Empty views get 0: a guest may hand us a zero-length descriptor, and the
    kernel never touches a zero-length iovec.
    """
    if not len(view):
        return 0
    return int(ctypes.addressof(ctypes.c_char.from_buffer(view)))


class Uring:
    """One submission/completion ring pair, driven by a single thread."""

    def __init__(self, entries: int) -> None:
        params = bytearray(_PARAMS.size)
        buf = (ctypes.c_char * len(params)).from_buffer(params)
        self.fd = _check(_syscall(_SYS_SETUP, ctypes.c_uint(entries), buf), "io_uring_setup")
        try:
            f = _PARAMS.unpack(params)
            sq_entries, cq_entries, features = f[0], f[1], f[5]
            sq_off, cq_off = f[10:19], f[19:28]
            if not features & _FEAT_SINGLE_MMAP:
                raise UringError(0, "io_uring without SINGLE_MMAP (kernel < 5.4) is not supported")
            sq_size = sq_off[6] + sq_entries * 4
            cq_size = cq_off[5] + cq_entries * _CQE.size
            self._ring = mmap.mmap(self.fd, max(sq_size, cq_size), offset=_OFF_SQ_RING)
            self._sqes = mmap.mmap(self.fd, sq_entries * _SQE_SIZE, offset=_OFF_SQES)
        except BaseException:
            os.close(self.fd)
            raise
        self._single = bool(features & _FEAT_RW_CUR_POS)
        ring = memoryview(self._ring)
        self._u32 = ring.cast("I")  # every ring field is a u32 at a 4-byte aligned offset
        self._sq_head, self._sq_tail = sq_off[0] // 4, sq_off[1] // 4
        self._sq_mask = self._u32[sq_off[2] // 4]
        self._sq_array = sq_off[6] // 4
        self._cq_head, self._cq_tail = cq_off[0] // 4, cq_off[1] // 4
        self._cq_mask = self._u32[cq_off[2] // 4]
        self._cqes = cq_off[5]
        self._ring_view = ring
        self._sqe_view = memoryview(self._sqes)
        self.entries: int = sq_entries
        self._tail: int = self._u32[self._sq_tail]
        self._pending = 0  # SQEs written but not yet handed to the kernel
        # user_data -> (token, iovec array if any, buffers): all alive until the CQE.
        self._inflight: dict[
            int, tuple[object, ctypes.Array[Iovec] | None, Sequence[memoryview]]
        ] = {}
        self._key = 0
        self.eventfd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        efd = ctypes.c_int(self.eventfd)
        _check(
            _syscall(_SYS_REGISTER, self.fd, _REGISTER_EVENTFD, ctypes.byref(efd), 1),
            "register eventfd",
        )

    @property
    def space(self) -> int:
        """SQEs that can be prepared before the next submit."""
        head: int = self._u32[self._sq_head]
        return self.entries - ((self._tail - head) & 0xFFFFFFFF)

    def prep_rw(
        self, op: int, fd: int, bufs: Sequence[memoryview], offset: int, token: object
    ) -> None:
        """Queue a READV/WRITEV of ``bufs`` at ``offset``; :meth:`reap` hands back ``token``.

        A single buffer goes as a plain READ/WRITE: no iovec array to build,
        which is most of this method's cost.
        """
        tail = self._tail
        if (tail - self._u32[self._sq_head]) & 0xFFFFFFFF >= self.entries:
            raise RingFull(0, "submission queue full")
        if len(bufs) == 1 and self._single:
            b = bufs[0]
            addr, n = address_of(b), len(b)
            op = _SINGLE.get(op, op)
            keep: tuple[object, ctypes.Array[Iovec] | None, Sequence[memoryview]] = (
                token,
                None,
                bufs,
            )
        else:
            iov = (Iovec * len(bufs))()
            for i, b in enumerate(bufs):
                iov[i].base = address_of(b)
                iov[i].len = len(b)
            keep = (token, iov, bufs)
            addr, n = ctypes.addressof(iov), len(bufs)
        self._key = user_data = (self._key + 1) & 0xFFFFFFFFFFFFFFFF
        self._inflight[user_data] = keep
        index = tail & self._sq_mask
        _SQE_HEAD.pack_into(
            self._sqe_view, index * _SQE_SIZE, op, 0, 0, fd, offset, addr, n, 0, user_data
        )
        self._u32[self._sq_array + index] = index
        self._tail = (tail + 1) & 0xFFFFFFFF
        self._pending += 1

    def prep_fsync(self, fd: int, token: object, *, datasync: bool = True) -> None:
        """Queue an fsync (fdatasync with ``datasync``) of ``fd``."""
        self._prep(OP_FSYNC, fd, 0, 0, 0, FSYNC_DATASYNC if datasync else 0, token)

    def prep_fallocate(self, fd: int, mode: int, offset: int, length: int, token: object) -> None:
        """Queue a fallocate(2) with ``mode`` (the kernel takes the length in the addr field)."""
        self._prep(OP_FALLOCATE, fd, offset, length, mode, 0, token)

    def _prep(
        self, op: int, fd: int, offset: int, addr: int, n: int, op_flags: int, token: object
    ) -> None:
        tail = self._tail
        if (tail - self._u32[self._sq_head]) & 0xFFFFFFFF >= self.entries:
            raise RingFull(0, "submission queue full")
        self._key = user_data = (self._key + 1) & 0xFFFFFFFFFFFFFFFF
        self._inflight[user_data] = (token, None, ())
        index = tail & self._sq_mask
        _SQE_HEAD.pack_into(
            self._sqe_view, index * _SQE_SIZE, op, 0, 0, fd, offset, addr, n, op_flags, user_data
        )
        self._u32[self._sq_array + index] = index
        self._tail = (tail + 1) & 0xFFFFFFFF
        self._pending += 1

    def submit(self) -> int:
        """Hand every prepared SQE to the kernel in one syscall."""
        if not self._pending:
            return 0
        # A u32 store through a memoryview is one store; x86 keeps it after the SQE stores.
        self._u32[self._sq_tail] = self._tail
        n = self._pending
        done = _check(_syscall(_SYS_ENTER, self.fd, n, 0, 0, None, 0), "io_uring_enter")
        self._pending -= done
        return done

    def reap(self) -> list[tuple[object, int]]:
        """Completed (token, result) pairs; result is bytes moved or -errno."""
        out: list[tuple[object, int]] = []
        u32 = self._u32
        head = u32[self._cq_head]
        tail = u32[self._cq_tail]
        if head == tail:
            return out
        view, mask, base = self._ring_view, self._cq_mask, self._cqes
        inflight = self._inflight
        unpack = _CQE.unpack_from
        while head != tail:
            user_data, res, _ = unpack(view, base + (head & mask) * 16)
            keep = inflight.pop(user_data, None)
            if keep is not None:  # the kernel echoes our keys; never trust, never fail
                out.append((keep[0], res))
            head = (head + 1) & 0xFFFFFFFF
        u32[self._cq_head] = head
        return out

    @property
    def inflight(self) -> int:
        """Requests prepared and not yet reaped."""
        return len(self._inflight)

    def cq_ready(self) -> bool:
        """Whether completions wait in the CQ ring (two loads, no syscall)."""
        u32 = self._u32
        return bool(u32[self._cq_head] != u32[self._cq_tail])

    def close(self) -> None:
        if self.fd < 0:
            return
        self._inflight.clear()
        for v in (self._u32, self._ring_view, self._sqe_view):
            v.release()
        self._ring.close()
        self._sqes.close()
        os.close(self.eventfd)
        os.close(self.fd)
        self.fd = -1


def available() -> bool:
    """Whether this kernel and sandbox allow io_uring (seccomp may forbid it)."""
    try:
        Uring(2).close()
    except (UringError, OSError):
        return False
    return True
