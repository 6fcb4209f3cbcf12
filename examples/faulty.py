"""A fault injector: another spec, with failures and delays where you choose.

For testing how a guest copes with a bad disk::

    vblk serve python:examples/faulty.py:Faulty --opt spec=disk.img \\
        --opt fail=1M-2M --opt fail_rate=0.001 --opt delay=0-64K:200 --socket ...

Options (all optional but ``spec``):

- ``spec``: what to wrap (any spec ``vblk serve`` takes); ``base.KEY=VALUE``
  options are passed to it as ``KEY=VALUE``;
- ``fail``: byte ranges ``START-END`` (comma separated, K/M/G suffixes) where
  every request that touches them fails with EIO;
- ``fail_rate``: the fraction of requests (0..1) that fail anywhere;
- ``delay``: ``START-END:MS`` ranges where requests first sleep MS milliseconds;
- ``delay_ms``: a delay added to every request;
- ``ops``: which operations the faults hit (default ``read,write,flush,discard,zeroes``);
- ``seed``: makes ``fail_rate`` reproducible.
"""

from __future__ import annotations

import errno
import logging
import random
import threading
import time

from vblk.io.image import parse_size
from vblk.storage.sync import open_disk

log = logging.getLogger("vblk.examples.faulty")
OPS = ("read", "write", "flush", "discard", "zeroes")


def _range(text: str) -> tuple[int, int]:
    start, sep, end = text.partition("-")
    if not sep:
        raise ValueError(f"{text!r} is not a range START-END")
    lo, hi = parse_size(start), parse_size(end)
    if hi <= lo:
        raise ValueError(f"range {text!r} is empty")
    return lo, hi


class Faulty:
    thread_model = "parallel"  # delays overlap, as a slow disk's requests do

    def __init__(
        self,
        spec: str,
        fail: str = "",
        fail_rate: str = "0",
        delay: str = "",
        delay_ms: str = "0",
        ops: str = ",".join(OPS),
        seed: str = "",
        **base_opts: str,
    ) -> None:
        self.fail = [_range(r) for r in fail.split(",") if r]
        self.delays = []
        for item in filter(None, delay.split(",")):
            where, sep, ms = item.rpartition(":")
            if not sep:
                raise ValueError(f"delay {item!r} is not START-END:MS")
            self.delays.append((*_range(where), float(ms) / 1000))
        self.fail_rate = float(fail_rate)
        if not 0 <= self.fail_rate <= 1:
            raise ValueError(f"fail_rate {fail_rate} is not in 0..1")
        self.delay_all = float(delay_ms) / 1000
        self.ops = set(filter(None, ops.split(",")))
        if self.ops - set(OPS):
            raise ValueError(f"ops {sorted(self.ops - set(OPS))} are not among {OPS}")
        self.random = random.Random(int(seed) if seed else None)
        self.lock = threading.Lock()
        extra = {}
        for key, value in base_opts.items():
            if not key.startswith("base."):
                raise ValueError(f"unknown option {key!r} (options of the base spec: base.KEY)")
            extra[key[5:]] = value
        self.base = open_disk(spec, opts=extra)
        self.block_size = self.base.block_size
        caps = self.base.storage.caps
        # A feature the base lacks stays off: an attribute set to None is no method.
        offered = {"pwrite": caps.writable, "flush": caps.flush, "discard": caps.discard}
        for name, has in offered.items():
            if not has:
                setattr(self, name, None)

    def _maybe_fault(self, op: str, offset: int, length: int) -> None:
        if op not in self.ops:
            return
        end = offset + max(length, 1)
        pause = self.delay_all + sum(d for lo, hi, d in self.delays if offset < hi and lo < end)
        if pause:
            time.sleep(pause)
        with self.lock:
            unlucky = self.fail_rate and self.random.random() < self.fail_rate
        if unlucky or any(offset < hi and lo < end for lo, hi in self.fail):
            raise OSError(errno.EIO, f"injected {op} failure at {offset} (+{length})")

    def size(self) -> int:
        return self.base.size()

    def pread(self, offset: int, buf: memoryview) -> None:
        self._maybe_fault("read", offset, len(buf))
        self.base.pread(offset, buf)

    def pwrite(self, offset: int, buf: memoryview) -> None:
        self._maybe_fault("write", offset, len(buf))
        self.base.pwrite(offset, buf)

    def flush(self) -> None:
        self._maybe_fault("flush", 0, 0)
        self.base.flush()

    def discard(self, offset: int, length: int) -> None:
        self._maybe_fault("discard", offset, length)
        self.base.discard(offset, length)

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        self._maybe_fault("zeroes", offset, length)
        self.base.write_zeroes(offset, length, unmap)

    def close(self) -> None:
        self.base.close()
