"""A RAM disk: ``vblk serve python:examples/ramdisk.py:RamDisk --opt size=64M --socket ...``."""

from vblk.io.image import parse_size


class RamDisk:
    thread_model = "parallel"  # each call touches its own bytes; the GIL does the rest

    def __init__(self, size: str = "64M") -> None:
        self.data = bytearray(parse_size(size))
        self.view = memoryview(self.data)

    def size(self) -> int:
        return len(self.data)

    def pread(self, offset: int, buf: memoryview) -> None:
        buf[:] = self.view[offset : offset + len(buf)]

    def pwrite(self, offset: int, buf: memoryview) -> None:
        self.view[offset : offset + len(buf)] = buf

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        self.view[offset : offset + length] = bytes(length)

    def discard(self, offset: int, length: int) -> None:
        self.write_zeroes(offset, length, True)
