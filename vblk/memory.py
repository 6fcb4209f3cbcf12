"""Guest memory: the one place a guest address becomes bytes.

Everything the guest hands us (ring addresses, descriptor addresses, lengths)
is untrusted, so every access goes through :meth:`GuestMemory.translate`,
which only returns a view when the whole range lies inside one mapped region.
Views are zero-copy slices of the mapping, so device code can hand them to
``preadv``/``pwritev`` directly.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass

from vblk.errors import GuestMemoryError

__all__ = ["GuestMemory", "Region", "create_memfd", "map_fd", "map_sealed", "seal_shrink"]


@dataclass(frozen=True)
class Region:
    """One contiguous piece of guest RAM, known by guest-physical and user address."""

    gpa: int
    size: int
    uaddr: int
    buf: memoryview  # writable, format 'B', len == size


def _as_bytes(buf: memoryview, size: int) -> memoryview:
    """A flat, writable byte view of the first ``size`` bytes of ``buf``."""
    if buf.readonly:
        raise GuestMemoryError("guest memory buffer is read-only")
    if buf.format != "B" or buf.ndim != 1:
        buf = buf.cast("B")
    if len(buf) < size:
        raise GuestMemoryError(f"buffer of {len(buf)} bytes is smaller than region size {size:#x}")
    return buf[:size]


class GuestMemory:
    """A set of non-overlapping regions with bounds-checked translation.

    Lookups first try the region that answered last: guests usually have one
    to three regions and a chain's buffers cluster, so the hot path is a
    couple of integer comparisons.
    """

    def __init__(self) -> None:
        self._regions: list[Region] = []
        self._closers: dict[int, Callable[[], None] | None] = {}  # id(region) -> close
        # Last-hit caches: (start, end, buf) of the region that answered last.
        self._hit: tuple[int, int, memoryview] | None = None
        self._uhit: tuple[int, int, memoryview] | None = None

    @property
    def regions(self) -> tuple[Region, ...]:
        return tuple(self._regions)

    def add(
        self,
        gpa: int,
        size: int,
        uaddr: int,
        buf: memoryview,
        close: Callable[[], None] | None = None,
    ) -> Region:
        """Register a region; ``close`` runs when it is removed (e.g. to unmap)."""
        if size <= 0:
            raise GuestMemoryError(f"region at gpa {gpa:#x} has size {size}")
        if gpa < 0 or uaddr < 0:
            raise GuestMemoryError(f"region gpa {gpa:#x} / uaddr {uaddr:#x} is negative")
        for r in self._regions:
            if gpa < r.gpa + r.size and r.gpa < gpa + size:
                raise GuestMemoryError(
                    f"region gpa {gpa:#x}+{size:#x} overlaps gpa {r.gpa:#x}+{r.size:#x}"
                )
            if uaddr < r.uaddr + r.size and r.uaddr < uaddr + size:
                raise GuestMemoryError(
                    f"region uaddr {uaddr:#x}+{size:#x} overlaps uaddr {r.uaddr:#x}+{r.size:#x}"
                )
        # Only now take a view: a refused region leaves no export behind, so its
        # mapping can be closed at once.
        region = Region(gpa, size, uaddr, _as_bytes(buf, size))
        self._regions.append(region)
        self._regions.sort(key=lambda r: r.gpa)
        self._closers[id(region)] = close
        return region

    def remove(self, gpa: int, size: int, uaddr: int) -> None:
        """Remove the region with exactly these bounds and release it."""
        for r in self._regions:
            if r.gpa == gpa and r.size == size and r.uaddr == uaddr:
                self._regions.remove(r)
                self._hit = self._uhit = None
                self._release(r)
                return
        raise GuestMemoryError(f"no region gpa {gpa:#x} size {size:#x} uaddr {uaddr:#x}")

    def clear(self) -> None:
        """Remove and release every region."""
        regions, self._regions = self._regions, []
        self._hit = self._uhit = None
        for r in regions:
            self._release(r)

    def _release(self, r: Region) -> None:
        close = self._closers.pop(id(r), None)
        if close is not None:
            close()

    def translate(self, gpa: int, length: int) -> memoryview:
        """A writable view of guest bytes [gpa, gpa+length), inside a single region.

        A zero length is valid when ``gpa`` itself is mapped, so empty
        descriptors still point somewhere real.
        """
        hit = self._hit
        if hit is not None:
            start, end, buf = hit
            if start <= gpa < end and 0 <= length <= end - gpa:
                off = gpa - start
                return buf[off : off + length]
        for r in self._regions:
            end = r.gpa + r.size
            if r.gpa <= gpa < end:
                if 0 <= length <= end - gpa:
                    self._hit = (r.gpa, end, r.buf)
                    off = gpa - r.gpa
                    return r.buf[off : off + length]
                break
        raise GuestMemoryError(f"guest range gpa {gpa:#x} len {length:#x} is not mapped")

    def translate_uaddr(self, uaddr: int, length: int) -> memoryview:
        """Like :meth:`translate`, by the frontend's user address (how rings are given).

        Only ring setup uses it, so it goes through the one bounds-checked path:
        the region that holds ``uaddr`` is the one that holds its gpa.
        """
        return self.translate(self.uaddr_to_gpa(uaddr), length)

    def uaddr_to_gpa(self, uaddr: int) -> int:
        """The guest-physical address behind a frontend user address."""
        for r in self._regions:
            if r.uaddr <= uaddr < r.uaddr + r.size:
                return r.gpa + (uaddr - r.uaddr)
        raise GuestMemoryError(f"user address {uaddr:#x} is not mapped")


def map_fd(fd: int, size: int, mmap_offset: int) -> tuple[memoryview, Callable[[], None]]:
    """Map a shared memory fd read/write; returns the region's view and an unmapper.

    The whole prefix [0, mmap_offset+size) is mapped from file offset 0, as
    libvhost-user does, because ``mmap_offset`` need not be page aligned. A
    range past the fd's end is refused (ValueError). The unmapper never
    raises: while views of the region are still alive (a ring being torn
    down), Python refuses to unmap, so the mapping is left to the garbage
    collector, which unmaps once the last view is gone.
    """
    if size <= 0 or mmap_offset < 0:
        raise ValueError(f"bad mapping: size {size:#x}, offset {mmap_offset:#x}")
    # Touching a page past the end of the file would kill the process with
    # SIGBUS, so the whole range must lie inside the fd (memfd, shm, hugetlbfs),
    # and stay there: a memfd that still allows seals is sealed against
    # shrinking first. (QEMU's memory-backend-memfd is sealed already; an fd
    # that refuses seals stays a risk only to the process that maps it.)
    seal_shrink(fd)
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        raise ValueError("guest memory fd is a block device")
    if stat.S_ISREG(st.st_mode) and mmap_offset + size > st.st_size:
        raise ValueError(
            f"region of {size:#x} bytes at offset {mmap_offset:#x} runs past the end "
            f"of its fd ({st.st_size:#x} bytes)"
        )
    mm = mmap.mmap(
        fd, size + mmap_offset, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE
    )
    base = memoryview(mm)
    view = base[mmap_offset : mmap_offset + size]
    held = [(mm, base, view)]

    def close() -> None:
        if not held:
            return
        mm_, base_, view_ = held.pop()
        try:
            view_.release()
            base_.release()
            mm_.close()
        except BufferError:
            pass  # views still exported: the mmap goes away with its last view

    return view, close


def seal_shrink(fd: int) -> bool:
    """Seal a memfd against shrinking if it allows it; whether it is sealed now."""
    try:
        if not fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        return True
    except OSError:
        return False  # not a memfd, or one created without MFD_ALLOW_SEALING


def map_sealed(fd: int, size: int, mmap_offset: int) -> tuple[memoryview, Callable[[], None]]:
    """:func:`map_fd` for a memfd that can never be shorter than the range mapped.

    Touching a mapping beyond the end of its file raises SIGBUS, which would
    kill the process. So the file must hold the whole range now (fstat) and
    be sealed against shrinking (the seal is added if the memfd still allows
    it); otherwise ValueError, before anything is mapped.
    """
    if size <= 0 or mmap_offset < 0:
        raise ValueError(f"bad mapping: size {size:#x}, offset {mmap_offset:#x}")
    try:  # seal first, then measure: nothing can shrink it in between
        if not fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    except OSError as e:
        raise ValueError(
            f"not a memfd that can be sealed against shrinking: {e.strerror}"
        ) from None
    st = os.fstat(fd)
    if mmap_offset + size > st.st_size:
        raise ValueError(
            f"range {mmap_offset:#x}+{size:#x} does not fit the memfd's {st.st_size:#x} bytes"
        )
    return map_fd(fd, size, mmap_offset)


def create_memfd(size: int, name: str) -> int:
    """A zero-filled memfd of ``size`` bytes, for sharing with the frontend.

    It is sealed against shrinking and growing, so nobody it is passed to
    (and back from) can truncate it under a mapping. The caller owns the fd.
    """
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(
            fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL
        )
    except BaseException:
        os.close(fd)
        raise
    return fd
