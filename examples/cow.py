"""A copy-on-write overlay: reads come from a read-only base until written; writes stay in RAM.

Try a change to a disk without touching it::

    vblk serve python:examples/cow.py:Cow --opt spec=golden.qcow2 --socket ...

``spec`` is any spec ``vblk serve`` takes, opened read-only; ``chunk`` is the
copy granularity in bytes (default 64K). Whatever the guest writes is lost
when vblk exits.
"""

from __future__ import annotations

from vblk.io.image import parse_size
from vblk.storage.sync import open_disk


class Cow:
    def __init__(self, spec: str, chunk: str = "64K") -> None:
        self.base = open_disk(spec, read_only=True)
        self.chunk = parse_size(chunk)
        if self.chunk < 512 or self.chunk & (self.chunk - 1):
            raise ValueError(f"chunk {chunk} is not a power of two of at least 512")
        self.block_size = self.base.block_size
        self.chunks: dict[int, bytearray] = {}  # chunk index -> its bytes, once written

    def size(self) -> int:
        return self.base.size()

    def _pieces(self, offset: int, length: int) -> list[tuple[int, int, int, int]]:
        """(chunk index, offset in chunk, offset in buffer, length) for each chunk touched."""
        out, pos = [], 0
        while pos < length:
            idx, within = divmod(offset + pos, self.chunk)
            n = min(self.chunk - within, length - pos)
            out.append((idx, within, pos, n))
            pos += n
        return out

    def pread(self, offset: int, buf: memoryview) -> None:
        for idx, within, pos, n in self._pieces(offset, len(buf)):
            own = self.chunks.get(idx)
            if own is None:
                self.base.pread(offset + pos, buf[pos : pos + n])  # straight into guest memory
            else:
                buf[pos : pos + n] = memoryview(own)[within : within + n]

    def _own(self, idx: int) -> bytearray:
        own = self.chunks.get(idx)
        if own is None:
            start = idx * self.chunk
            own = bytearray(min(self.chunk, self.size() - start))
            self.base.pread(start, own)
            self.chunks[idx] = own
        return own

    def pwrite(self, offset: int, buf: memoryview) -> None:
        for idx, within, pos, n in self._pieces(offset, len(buf)):
            memoryview(self._own(idx))[within : within + n] = buf[pos : pos + n]

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        for idx, within, _, n in self._pieces(offset, length):
            if within == 0 and n == self.chunk:
                self.chunks[idx] = bytearray(n)  # no need to read what is overwritten whole
            else:
                memoryview(self._own(idx))[within : within + n] = bytes(n)

    def close(self) -> None:
        self.base.close()
