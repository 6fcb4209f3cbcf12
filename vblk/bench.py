"""``vblk bench``: a small fio for vhost-user-blk backends, on :mod:`vblk.client`.

One thread per queue drives its own ring: fill every free slot, kick once,
sleep on the call eventfd, reap the batch. Buffers, request slots and the
latency histogram are set up before the clock starts, so the hot loop
allocates nothing per I/O beyond a tuple. Latency is measured from the batch
submit to the reap that saw the completion, as a driver sees it.
"""

from __future__ import annotations

import argparse
import json
import random
import struct
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from vblk.blk.defs import SECTOR_SHIFT, SECTOR_SIZE, ReqType
from vblk.cli import queue_size_arg
from vblk.errors import VblkError
from vblk.virtio.defs import MAX_QUEUE_SIZE

RW_MODES = ("read", "write", "randread", "randwrite", "randrw", "rw")

# -- latency histogram ----------------------------------------------------------

#: Log-linear buckets: 32 per power of two, so a percentile is within ~3%.
_SUB_BITS = 5
_SUB = 1 << _SUB_BITS
_BUCKETS = 64 * _SUB


def bucket_of(ns: int) -> int:
    """Histogram bucket of a latency in nanoseconds (exact below 64 ns)."""
    shift = ns.bit_length() - _SUB_BITS - 1
    if shift <= 0:
        return ns
    return (shift << _SUB_BITS) + (ns >> shift)


def bucket_value(idx: int) -> float:
    """The midpoint of bucket ``idx``, in nanoseconds."""
    shift = (idx >> _SUB_BITS) - 1
    if shift <= 0:
        return float(idx)
    lo = (idx - (shift << _SUB_BITS)) << shift
    return lo + ((1 << shift) - 1) / 2


class Histogram:
    """Counts of latencies by bucket; mergeable, percentiles without storing samples."""

    def __init__(self) -> None:
        self.counts = [0] * _BUCKETS
        self.total = 0
        self.sum = 0
        self.min = 0
        self.max = 0

    def merge(self, other: Histogram) -> None:
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        if other.total:
            self.min = min(self.min, other.min) if self.total else other.min
            self.max = max(self.max, other.max)
        self.total += other.total
        self.sum += other.sum

    def percentile(self, p: float) -> float:
        """Latency (ns) at or below which ``p`` percent of samples fall."""
        if not self.total:
            return 0.0
        rank = max(1, int(-(-self.total * p // 100)))
        seen = 0
        for idx, c in enumerate(self.counts):
            seen += c
            if seen >= rank:
                return min(max(bucket_value(idx), self.min), self.max)
        return float(self.max)


# -- per-queue workers ----------------------------------------------------------


@dataclass
class Job:
    rw: str
    bs: int
    iodepth: int
    queues: int
    runtime: float
    offset: int
    size: int
    rwmixread: int
    verify: bool
    seed: int
    queue_size: int = 0  # ring entries per queue; 0: the smallest from 256 up that fits iodepth


@dataclass
class Stats:
    """One worker's counters; the progress line reads them without locking."""

    ios: int = 0
    reads: int = 0
    writes: int = 0
    bytes: int = 0
    errors: int = 0
    verify_errors: int = 0
    hist: Histogram = field(default_factory=Histogram)
    error: BaseException | None = None


def _pattern(offset: int, seed: int, bs: int) -> bytes:
    """What --verify writes at ``offset``: (offset, seed) repeated, unique per block."""
    return struct.pack("<QQ", offset, seed) * (bs // 16)


class Worker:
    """Drives one queue: keeps ``iodepth`` requests in flight until told to stop."""

    def __init__(self, dev: Any, qi: int, job: Job, stats: Stats) -> None:
        self.dev = dev
        self.q = dev.queues[qi]
        self.qi = qi
        self.job = job
        self.stats = stats
        self.stop = False
        self.bufs = [dev.alloc(job.bs) for _ in range(job.iodepth)]
        nblocks = job.size // job.bs
        # Each queue owns a contiguous share for sequential and one-pass jobs.
        self.first = nblocks * qi // job.queues
        self.last = nblocks * (qi + 1) // job.queues
        self.nblocks = nblocks
        self.rng = random.Random(job.seed * 1000003 + qi)

    def close(self) -> None:
        for b in self.bufs:
            b.free()

    def _blocks(self, random_order: bool, one_pass: bool) -> Iterator[int]:
        first, last = self.first, self.last
        if one_pass:
            order = list(range(first, last))
            if random_order:
                self.rng.shuffle(order)
            yield from order
            return
        if random_order:
            rand = self.rng.randrange
            n = self.nblocks
            while True:
                yield rand(n)
        while True:
            yield from range(first, last)

    def run(self, mode: str, one_pass: bool, deadline: float) -> None:
        try:
            self._run(mode, one_pass, deadline)
        except BaseException as e:
            self.stats.error = e

    def _run(self, mode: str, one_pass: bool, deadline: float) -> None:
        job, q, st = self.job, self.q, self.stats
        bs, base, seed = job.bs, job.offset, job.seed
        verify = job.verify
        hist = st.hist
        counts = hist.counts
        random_order = mode.startswith("rand")
        writes = {"read": 0.0, "randread": 0.0, "write": 1.0, "randwrite": 1.0}.get(
            mode, 1.0 - job.rwmixread / 100
        )
        blocks = self._blocks(random_order, one_pass)
        gpas = [b.gpa for b in self.bufs]
        views = [b.view for b in self.bufs]
        offsets = [0] * job.iodepth
        is_write = [False] * job.iodepth
        started = [0] * job.iodepth
        free = list(range(job.iodepth))
        done: list[tuple[Any, int]] = []
        rnd = self.rng.random
        submit = q.submit
        now_ns = time.perf_counter_ns
        deadline_ns = int(deadline * 1e9) if deadline else 0
        timeout = self.dev.timeout
        in_flight = 0
        exhausted = False
        lat_sum = 0
        lat_min = 1 << 62
        lat_max = 0
        while True:
            # Fill every free slot, then one kick for the batch.
            if free and not (self.stop or exhausted):
                now = now_ns()
                while free:
                    blk = next(blocks, None)
                    if blk is None:
                        exhausted = True
                        break
                    i = free.pop()
                    off = base + blk * bs
                    offsets[i] = off
                    w = writes == 1.0 or (writes > 0.0 and rnd() < writes)
                    is_write[i] = w
                    if w:
                        if verify:
                            views[i][:] = _pattern(off, seed, bs)
                        submit(ReqType.OUT, off >> SECTOR_SHIFT, ((gpas[i], bs),), (), i)
                    else:
                        submit(ReqType.IN, off >> SECTOR_SHIFT, (), ((gpas[i], bs),), i)
                    started[i] = now
                    in_flight += 1
                q.kick()
            if not in_flight:
                break
            if not q.reap(done):
                q.wait(timeout)
                q.reap(done)
            now = now_ns()
            for i, status in done:
                lat = now - started[i]
                lat_sum += lat
                if lat < lat_min:
                    lat_min = lat
                if lat > lat_max:
                    lat_max = lat
                shift = lat.bit_length() - 6
                counts[lat if shift <= 0 else (shift << 5) + (lat >> shift)] += 1
                if status:
                    st.errors += 1
                elif verify and not is_write[i]:
                    if views[i] != _pattern(offsets[i], seed, bs):
                        st.verify_errors += 1
                if is_write[i]:
                    st.writes += 1
                else:
                    st.reads += 1
                free.append(i)
            n = len(done)
            in_flight -= n
            st.ios += n
            st.bytes += n * bs
            done.clear()
            if deadline_ns and now >= deadline_ns:
                self.stop = True
        hist.total = st.ios
        hist.sum = lat_sum
        hist.min = lat_min if st.ios else 0
        hist.max = lat_max


# -- the run --------------------------------------------------------------------


def _run_phase(
    dev: Any, job: Job, mode: str, one_pass: bool, progress: bool, label: str
) -> tuple[list[Stats], float]:
    stats = [Stats() for _ in range(job.queues)]
    workers = [Worker(dev, qi, job, stats[qi]) for qi in range(job.queues)]
    try:
        start = time.perf_counter()
        deadline = 0.0 if one_pass else start + job.runtime
        threads = [
            threading.Thread(
                target=w.run, args=(mode, one_pass, deadline), name=f"bench-q{w.qi}", daemon=True
            )
            for w in workers
        ]
        for t in threads:
            t.start()
        try:
            last_t, last_ios, last_bytes = start, 0, 0
            running = True
            while running:  # at least one progress line, even for a run shorter than a tick
                threads[0].join(0.5) if len(threads) == 1 else time.sleep(0.5)
                running = any(t.is_alive() for t in threads)
                if progress:
                    now = time.perf_counter()
                    ios = sum(s.ios for s in stats)
                    nbytes = sum(s.bytes for s in stats)
                    dt = max(now - last_t, 1e-9)
                    sys.stderr.write(
                        f"\r{label} {now - start:6.1f}s  {(ios - last_ios) / dt:10.0f} IOPS  "
                        f"{(nbytes - last_bytes) / dt / 1e6:9.1f} MB/s  "
                        f"errors {sum(s.errors for s in stats)}   "
                    )
                    sys.stderr.flush()
                    last_t, last_ios, last_bytes = now, ios, nbytes
        except KeyboardInterrupt:
            for w in workers:
                w.stop = True
            for t in threads:
                t.join()
        elapsed = time.perf_counter() - start
        if progress:
            sys.stderr.write("\n")
        for s in stats:
            if s.error is not None:
                raise s.error
        return stats, elapsed
    finally:
        for w in workers:
            w.close()


def summarize(job: Job, stats: list[Stats], elapsed: float) -> dict[str, Any]:
    hist = Histogram()
    for s in stats:
        hist.merge(s.hist)
    ios = sum(s.ios for s in stats)
    nbytes = sum(s.bytes for s in stats)

    def us(ns: float) -> float:
        return round(ns / 1000, 2)

    return {
        "rw": job.rw,
        "bs": job.bs,
        "iodepth": job.iodepth,
        "queues": job.queues,
        "offset": job.offset,
        "size": job.size,
        "verify": job.verify,
        "elapsed_s": round(elapsed, 3),
        "ios": ios,
        "reads": sum(s.reads for s in stats),
        "writes": sum(s.writes for s in stats),
        "bytes": nbytes,
        "iops": round(ios / elapsed, 1) if elapsed else 0.0,
        "mb_per_s": round(nbytes / elapsed / 1e6, 2) if elapsed else 0.0,
        "errors": sum(s.errors for s in stats),
        "verify_errors": sum(s.verify_errors for s in stats),
        "lat_us": {
            "mean": us(hist.sum / hist.total) if hist.total else 0.0,
            "min": us(hist.min),
            "p50": us(hist.percentile(50)),
            "p90": us(hist.percentile(90)),
            "p99": us(hist.percentile(99)),
            "p99.9": us(hist.percentile(99.9)),
            "max": us(hist.max),
        },
        "per_queue_iops": [round(s.ios / elapsed, 1) if elapsed else 0.0 for s in stats],
    }


def run(
    socket_path: str, job: Job, *, progress: bool = False, timeout: float = 30.0
) -> dict[str, Any]:
    """Run ``job`` against the backend at ``socket_path``; returns the summary dict."""
    from vblk.client import connect

    per_req = 2 + 1  # header, data, status: bs never exceeds size_max in practice
    need = job.iodepth * per_req
    queue_size = job.queue_size
    if not queue_size:
        queue_size = 256
        while queue_size < need and queue_size < MAX_QUEUE_SIZE:
            queue_size *= 2
    if need > queue_size:
        raise BenchError(
            f"--iodepth {job.iodepth} needs {need} descriptors per queue, "
            f"more than a ring of {queue_size} holds"
        )
    mem = job.queues * job.iodepth * job.bs + (1 << 20)
    with connect(
        socket_path, num_queues=job.queues, queue_size=queue_size, mem_size=mem, timeout=timeout
    ) as dev:
        if dev._size_max and job.bs > dev._size_max:
            raise BenchError(f"--bs {job.bs} exceeds the device's size_max {dev._size_max}")
        if not job.size:
            job.size = dev.capacity - job.offset
        if job.offset % SECTOR_SIZE or job.offset >= dev.capacity:
            raise BenchError(f"--offset {job.offset} is unaligned or past the end ({dev.capacity})")
        job.size = min(job.size, dev.capacity - job.offset) // job.bs * job.bs
        if job.size < job.bs * job.queues:
            raise BenchError(f"range of {job.size} bytes is too small for --bs {job.bs}")
        writes = job.rw not in ("read", "randread")
        if (writes or job.verify) and dev.read_only:
            raise BenchError("the device is read-only; use --rw read/randread without --verify")
        if job.verify:
            wmode = "randwrite" if job.rw.startswith("rand") else "write"
            rmode = "randread" if job.rw.startswith("rand") else "read"
            ws, we = _run_phase(dev, job, wmode, True, progress, "verify: write")
            rs, re = _run_phase(dev, job, rmode, True, progress, "verify: read ")
            for a, b in zip(ws, rs, strict=True):
                a.hist.merge(b.hist)
                a.ios += b.ios
                a.reads += b.reads
                a.writes += b.writes
                a.bytes += b.bytes
                a.errors += b.errors
                a.verify_errors += b.verify_errors
            return summarize(job, ws, we + re)
        stats, elapsed = _run_phase(dev, job, job.rw, job.runtime <= 0, progress, job.rw)
        return summarize(job, stats, elapsed)


class BenchError(VblkError):
    """The job cannot run as asked."""


# -- command line ---------------------------------------------------------------


def _size(text: str) -> int:
    from vblk.io.image import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmark a vhost-user-blk backend (a small fio)",
        description="Drive a vhost-user-blk backend from userspace and report IOPS, "
        "bandwidth and latency percentiles.",
    )
    p.add_argument("--socket", required=True, metavar="PATH", help="backend's unix socket")
    p.add_argument("--rw", choices=RW_MODES, default="randread", help="pattern (default randread)")
    p.add_argument("--bs", type=_size, default=4096, metavar="SIZE", help="block size (default 4k)")
    p.add_argument("--iodepth", type=int, default=32, metavar="N", help="per queue (default 32)")
    p.add_argument("--queues", type=int, default=1, metavar="N", help="queues, one thread each")
    p.add_argument(
        "--queue-size",
        type=queue_size_arg,
        default=0,
        metavar="N",
        help="ring entries per queue, a power of two up to 32768 "
        "(default: the smallest from 256 up that holds --iodepth requests)",
    )
    p.add_argument(
        "--runtime",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds to run (default 10); 0 = one pass over the range",
    )
    p.add_argument(
        "--size", type=_size, default=0, metavar="SIZE", help="range to use (default: whole disk)"
    )
    p.add_argument("--offset", type=_size, default=0, metavar="BYTES", help="start of the range")
    p.add_argument(
        "--rwmixread", type=int, default=50, metavar="PCT", help="reads in randrw/rw (default 50)"
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="write a pattern over the range, read it back and compare (ignores --runtime)",
    )
    p.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    p.add_argument("--timeout", type=float, default=30.0, metavar="S", help="completion timeout")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument(
        "--progress", action="store_true", help="live progress line even if stderr is not a tty"
    )
    p.set_defaults(func=cmd_bench)


def format_text(r: dict[str, Any]) -> str:
    lat = r["lat_us"]
    lines = [
        f"{r['rw']} bs={r['bs']} iodepth={r['iodepth']} queues={r['queues']}"
        + (" verify" if r["verify"] else ""),
        f"  IOPS {r['iops']:.0f}  BW {r['mb_per_s']:.1f} MB/s  "
        f"({r['ios']} I/Os, {r['reads']} reads, {r['writes']} writes in {r['elapsed_s']:.2f}s)",
        f"  lat (us): mean {lat['mean']:.1f}  min {lat['min']:.1f}  p50 {lat['p50']:.1f}  "
        f"p99 {lat['p99']:.1f}  p99.9 {lat['p99.9']:.1f}  max {lat['max']:.1f}",
        f"  errors {r['errors']}"
        + (f"  verify mismatches {r['verify_errors']}" if r["verify"] else ""),
    ]
    return "\n".join(lines)


def cmd_bench(args: argparse.Namespace) -> int:
    if args.bs <= 0 or args.bs % SECTOR_SIZE:
        raise BenchError(f"--bs {args.bs} is not a positive multiple of {SECTOR_SIZE}")
    if args.iodepth < 1 or args.queues < 1:
        raise BenchError("--iodepth and --queues must be at least 1")
    if not 0 <= args.rwmixread <= 100:
        raise BenchError(f"--rwmixread {args.rwmixread} is not a percentage")
    job = Job(
        rw=args.rw,
        bs=args.bs,
        iodepth=args.iodepth,
        queues=args.queues,
        runtime=args.runtime,
        offset=args.offset,
        size=args.size,
        rwmixread=args.rwmixread,
        verify=args.verify,
        seed=args.seed,
        queue_size=args.queue_size,
    )
    progress = args.progress or sys.stderr.isatty()
    result = run(args.socket, job, progress=progress, timeout=args.timeout)
    print(json.dumps(result, indent=2) if args.json else format_text(result))
    return 1 if result["errors"] or result["verify_errors"] else 0
