"""The disk image a backend serves: a regular file or a block device.

All data moves with preadv/pwritev straight between the image and memoryviews
of guest memory, so no guest data is copied in Python. Discard and zeroing map
to the cheapest primitive the image supports, falling back when the
filesystem refuses one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import mmap
import os
import re
import stat
import struct
from collections.abc import Callable, Sequence

from vblk.errors import VblkError

SECTOR = 512
# IOV_MAX on Linux: preadv/pwritev take at most this many buffers per call.
_IOV_MAX = 1024

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_BLKGETSIZE64 = 0x80081272
_BLKDISCARD = 0x1277
_BLKZEROOUT = 0x127F
_BLKSSZGET = 0x1268

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int

# Page-aligned (anonymous mmap is zero-filled), so it also satisfies O_DIRECT.
_ZERO_CHUNK = memoryview(mmap.mmap(-1, 1 << 20))


class ImageError(VblkError):
    """The image cannot be opened or used as given."""


_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgtp]?)(i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Parse ``512M``, ``1G``, ``4096``, ``2GiB`` into bytes (binary units)."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"bad size {text!r}: expected a number with an optional K/M/G/T suffix")
    return int(m.group(1)) << (10 * " kmgtp".index(m.group(2).lower() or " "))


def advance(bufs: Sequence[memoryview], n: int) -> list[memoryview]:
    """``bufs`` without their first ``n`` bytes (what is left after a short transfer)."""
    out: list[memoryview] = []
    for b in bufs:
        if n >= len(b):
            n -= len(b)
            continue
        out.append(b[n:] if n else b)
        n = 0
    return out


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with its mode flags, which os.posix_fallocate lacks."""
    if _fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


class Image:
    """An open image: size, read/write/flush/discard/zero, by byte offsets."""

    def __init__(self, path: str, *, read_only: bool = False, direct: bool = False) -> None:
        flags = os.O_RDONLY if read_only else os.O_RDWR
        if direct:
            flags |= os.O_DIRECT
        try:
            self.fd = os.open(path, flags | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ImageError(f"{path}: no such image (use --create SIZE to make one)") from None
        except IsADirectoryError:
            raise ImageError(f"{path}: is a directory, not an image") from None
        except OSError as e:
            if direct and e.errno == errno.EINVAL:
                raise ImageError(
                    f"{path}: this filesystem does not support --direct (O_DIRECT)"
                ) from None
            raise ImageError(f"{path}: cannot open: {e.strerror}") from None
        try:
            st = os.fstat(self.fd)
            self.path = path
            self.read_only = read_only
            self.direct = direct
            self.is_block_device = stat.S_ISBLK(st.st_mode)
            if self.is_block_device:
                buf = fcntl.ioctl(self.fd, _BLKGETSIZE64, b"\0" * 8)
                self.size: int = struct.unpack("<Q", buf)[0]
            elif stat.S_ISREG(st.st_mode):
                self.size = st.st_size
            else:
                raise ImageError(f"{path}: not a regular file or block device")
            if self.size == 0:
                raise ImageError(f"{path}: image is empty")
            if self.size % SECTOR:
                raise ImageError(f"{path}: size {self.size} is not a multiple of {SECTOR} bytes")
        except BaseException:
            os.close(self.fd)
            raise

    @classmethod
    def create(cls, path: str, size: int) -> None:
        """Make a sparse raw image of ``size`` bytes; refuses to touch an existing path."""
        if size <= 0 or size % SECTOR:
            raise ImageError(f"--create size {size} must be a positive multiple of {SECTOR} bytes")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            return
        except OSError as e:
            raise ImageError(f"{path}: cannot create: {e.strerror}") from None
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)

    @property
    def sectors(self) -> int:
        return self.size // SECTOR

    def readv(self, bufs: Sequence[memoryview], offset: int) -> None:
        """Fill ``bufs`` from ``offset``; short reads are retried, EOF is an error."""
        self._rw(os.preadv, bufs, offset)

    def writev(self, bufs: Sequence[memoryview], offset: int) -> None:
        """Write ``bufs`` at ``offset``; short writes are retried."""
        self._rw(os.pwritev, bufs, offset)

    def _rw(
        self,
        fn: Callable[[int, list[memoryview], int], int],
        bufs: Sequence[memoryview],
        offset: int,
    ) -> None:
        pending = [b for b in bufs if len(b)]
        while pending:
            batch = pending[:_IOV_MAX]
            want = sum(len(b) for b in batch)
            done = fn(self.fd, batch, offset)
            if done <= 0:
                raise OSError(errno.EIO, "unexpected end of image")
            offset += done
            if done == want:
                pending = pending[_IOV_MAX:]
                continue
            pending = advance(pending, done)  # short transfer: resume mid-buffer

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def discard(self, offset: int, length: int) -> None:
        """Deallocate a range: a hole in a file, BLKDISCARD on a device."""
        if self.is_block_device:
            fcntl.ioctl(self.fd, _BLKDISCARD, struct.pack("<QQ", offset, length))
        else:
            fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)

    def write_zeroes(self, offset: int, length: int, *, unmap: bool) -> None:
        """Make a range read as zeroes, deallocating it when ``unmap`` allows."""
        if self.is_block_device:
            if unmap:
                try:
                    self.discard(offset, length)
                    if self._reads_zero(offset, min(length, SECTOR)):
                        return
                except OSError:
                    pass
            fcntl.ioctl(self.fd, _BLKZEROOUT, struct.pack("<QQ", offset, length))
            return
        modes = [FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE] if unmap else []
        modes += [
            FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
            FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
        ]
        for mode in modes:
            try:
                fallocate(self.fd, mode, offset, length)
                return
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
        self._write_zero_bytes(offset, length)

    def _reads_zero(self, offset: int, length: int) -> bool:
        buf = bytearray(length)
        self.readv([memoryview(buf)], offset)
        return not any(buf)

    def _write_zero_bytes(self, offset: int, length: int) -> None:
        while length:
            n = min(length, len(_ZERO_CHUNK))
            os.pwrite(self.fd, _ZERO_CHUNK[:n], offset)
            offset += n
            length -= n

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
