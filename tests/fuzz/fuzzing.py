"""What every fuzz target shares: case counting, bounded settings, canaried guest memory.

Each target wraps one generated case in :func:`case`; the counts end up in the
pytest summary (``conftest.py``), so the CI log shows how much was fuzzed and
that nothing crashed. A crash is any exception escaping a case (an assertion
on an invariant included); it also fails the test, and hypothesis shrinks it.
"""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from hypothesis import HealthCheck, settings
from hypothesis.errors import HypothesisException

from vblk.memory import GuestMemory

#: target name -> [cases, crashes]
COUNTS: dict[str, list[int]] = {}

#: Multiplies every target's example count (e.g. VBLK_FUZZ_SCALE=20 for a long local run).
SCALE = float(os.environ.get("VBLK_FUZZ_SCALE", "1"))


def fuzz_settings(examples: int) -> settings:
    """Bounded, deadline-free settings: CI time is set by ``examples``, not by a clock."""
    return settings(
        max_examples=max(1, int(examples * SCALE)),
        deadline=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
            HealthCheck.function_scoped_fixture,
        ],
    )


@contextmanager
def case(target: str) -> Iterator[None]:
    """Count one case of ``target``; an exception out of it is a crash (and re-raised)."""
    counts = COUNTS.setdefault(target, [0, 0])
    counts[0] += 1
    try:
        yield
    except HypothesisException:
        raise  # hypothesis steering itself, not a finding
    except Exception:
        counts[1] += 1
        raise


def address(view: memoryview) -> int:
    """The address of a writable view's first byte (works for empty views too)."""
    return ctypes.addressof((ctypes.c_char * 0).from_buffer(view))


# -- guest memory as windows of one arena, with canaries between them -------------------

CANARY = 64
_PATTERN = bytes((0xC3 + 7 * i) & 0xFF for i in range(251))  # a prime period: no alignment hides


@dataclass(frozen=True)
class Window:
    gpa: int
    size: int
    offset: int  # of the region's first byte in the arena


@dataclass
class Arena:
    """Guest RAM regions cut from one bytearray, each fenced by CANARY bytes.

    A view escaping its region would have to cover a canary, so the canaries
    prove the absence of stray writes, and :meth:`locate` proves where each
    view handed out by the code under test really points.
    """

    regions: Sequence[tuple[int, int]]  # (gpa, size)
    buf: bytearray = field(init=False)
    windows: list[Window] = field(init=False)
    mem: GuestMemory = field(init=False)
    uaddr_base: int = 0x7F00_0000_0000

    def __post_init__(self) -> None:
        total = CANARY + sum(size + CANARY for _, size in self.regions)
        self.buf = bytearray(total)
        self._canary = (_PATTERN * (total // len(_PATTERN) + 1))[:total]
        self.buf[:] = self._canary
        self.windows = []
        self.mem = GuestMemory()
        off = CANARY
        view = memoryview(self.buf)
        for k, (gpa, size) in enumerate(self.regions):
            w = Window(gpa, size, off)
            self.windows.append(w)
            self.buf[off : off + size] = bytes(size)
            self.mem.add(gpa, size, self.uaddr(k, 0), view[off : off + size])
            off += size + CANARY
        self._base = address(view)

    def uaddr(self, k: int, offset: int) -> int:
        return self.uaddr_base + (k << 32) + offset

    def canaries_intact(self) -> bool:
        spans = [(0, CANARY)] + [
            (w.offset + w.size, w.offset + w.size + CANARY) for w in self.windows
        ]
        return all(self.buf[a:b] == self._canary[a:b] for a, b in spans)

    def view(self, gpa: int, length: int) -> memoryview:
        """Test-side access by gpa (must be mapped); the code under test uses ``mem``."""
        for w in self.windows:
            if w.gpa <= gpa and gpa + length <= w.gpa + w.size:
                off = w.offset + gpa - w.gpa
                return memoryview(self.buf)[off : off + length]
        raise AssertionError(f"test bug: gpa {gpa:#x}+{length} is not in a region")

    def mapped(self, gpa: int, length: int) -> bool:
        """The reference rule: the whole range inside one region; empty needs a mapped gpa."""
        return any(
            w.gpa <= gpa < w.gpa + w.size and gpa + length <= w.gpa + w.size for w in self.windows
        )

    def offset(self, view: memoryview) -> int:
        """Where a view of the arena starts, as an offset into ``buf``."""
        return address(view) - self._base

    def locate(self, view: memoryview) -> tuple[int, int]:
        """(gpa, length) of a view the code under test handed out; asserts it is in one region."""
        off = self.offset(view)
        n = len(view)
        for w in self.windows:
            if w.offset <= off and off + n <= w.offset + w.size and (n or off < w.offset + w.size):
                return w.gpa + off - w.offset, n
        raise AssertionError(f"view at arena offset {off} (+{n}) is outside every region")


def changed_outside(before: bytes, after: bytes | bytearray, allowed: list[tuple[int, int]]) -> int:
    """How many bytes differ outside the allowed [start, end) spans (arena offsets)."""
    masked = bytearray(before)
    for a, b in allowed:
        masked[a:b] = after[a:b]
    if masked == after:
        return 0
    return sum(1 for x, y in zip(masked, after, strict=True) if x != y)


# -- split ring writing, as a (hostile) driver does -----------------------------------------

DESC = struct.Struct("<QIHH")


def put16(buf: bytearray | memoryview, off: int, v: int) -> None:
    struct.pack_into("<H", buf, off, v & 0xFFFF)


def get16(buf: bytearray | memoryview, off: int) -> int:
    return int(struct.unpack_from("<H", buf, off)[0])
