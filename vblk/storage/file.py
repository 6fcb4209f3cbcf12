"""The raw backend: a regular file or a block device, through the ``--aio`` engines.

Data moves with preadv/pwritev (or io_uring READV/WRITEV) straight between
the file and memoryviews of guest memory. Each queue gets its own engine
(:mod:`vblk.io.engines`); the :class:`~vblk.io.image.Image` they share only
holds the fd and the discard/zeroing fallbacks.
"""

from __future__ import annotations

import os

from vblk.io.engines import ENGINES, default_engine, make_engine
from vblk.io.image import SECTOR, Image, ImageError
from vblk.io.uring import available as uring_available
from vblk.storage.base import Capabilities, StorageError, StorageQueue

__all__ = ["FileStorage", "create_raw"]


def create_raw(path: str, size: int) -> bool:
    """Make a sparse raw file of ``size`` bytes unless ``path`` exists; True if it was made."""
    if os.path.exists(path):
        return False
    try:
        Image.create(path, size)
    except ImageError as e:
        raise StorageError(str(e)) from None
    return True


class FileStorage:
    """A raw image file or block device, served by one engine per queue."""

    def __init__(
        self,
        path: str,
        *,
        read_only: bool = False,
        direct: bool = False,
        aio: str | None = None,
        io_threads: int = 4,
    ) -> None:
        if aio is None:
            aio = default_engine()
        elif aio not in ENGINES:
            raise StorageError(f"unknown --aio {aio!r} (choose from {', '.join(ENGINES)})")
        elif aio == "io_uring" and not uring_available():
            raise StorageError("--aio io_uring: io_uring is not available here (kernel or seccomp)")
        if io_threads < 1:
            raise StorageError(f"--io-threads must be at least 1, got {io_threads}")
        try:
            self.image = Image(path, read_only=read_only, direct=direct)
        except ImageError as e:
            raise StorageError(str(e)) from None
        self.aio = aio
        self.io_threads = io_threads
        self.caps = self._caps()
        kind = "block device" if self.image.is_block_device else "raw file"
        self.description = f"{kind} {path}{' (O_DIRECT)' if direct else ''}, --aio {aio}" + (
            f" ({io_threads} threads per queue)" if aio == "threads" else ""
        )

    def _caps(self) -> Capabilities:
        img = self.image
        return Capabilities(
            size=img.size,
            block_size=SECTOR,
            writable=not img.read_only,
            flush=True,
            discard=True,
            write_zeroes=True,
            zeroes_unmap=True,
            discard_granularity=4096,
        )

    def open_queue(self, index: int, depth: int) -> StorageQueue:
        label = f"vblk-queue{index}-io" if index >= 0 else "vblk-control-io"
        return make_engine(
            self.aio, self.image, queue_size=depth, io_threads=self.io_threads, label=label
        )

    def resize(self, size: int) -> Capabilities:
        """Grow or shrink a regular file (never a block device: its size is its own)."""
        img = self.image
        if img.is_block_device:
            raise StorageError(f"{img.path}: a block device cannot be resized by vblk")
        if img.read_only:
            raise StorageError(f"{img.path}: read-only")
        if size <= 0 or size % SECTOR:
            raise StorageError(f"size {size} must be a positive multiple of {SECTOR} bytes")
        try:
            os.ftruncate(img.fd, size)
        except OSError as e:
            raise StorageError(f"{img.path}: cannot resize: {e.strerror}") from None
        img.size = size
        self.caps = self._caps()
        return self.caps

    def close(self) -> None:
        self.image.close()
