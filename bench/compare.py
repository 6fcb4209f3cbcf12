#!/usr/bin/env python3
"""Side by side: vblk serve, qemu-storage-daemon and QEMU's built-in virtio-blk, in one run.

One image serves them all, one backend at a time:

* ``vblk``: ``python3 -m vblk serve IMG --num-queues N`` (plus ``--vblk-args``, default
  ``--direct``, so that it does O_DIRECT I/O like the other two);
* ``vblk-cache``: the same without ``--direct``: vblk serve as it runs by default, on
  the page cache (FLUSH is still fdatasync);
* ``qsd``: ``qemu-storage-daemon`` exporting vhost-user-blk (``aio=io_uring``,
  ``cache.direct=on``): vblk's counterpart;
* ``qsd-cache``: the same with ``cache.direct=off``: vblk-cache's counterpart;
* ``qemu``: QEMU's own ``virtio-blk-pci`` on ``-drive aio=io_uring,cache=none``;
* ``vblk-qcow2`` / ``qsd-qcow2``: the same data in a qcow2 image (converted from the raw
  one), served by vblk serve (through its child qemu-nbd, ``--opt cache=none --opt
  aio=io_uring``) and by qemu-storage-daemon's qcow2 driver (``cache.direct=on``);
* ``vblk-nbd`` / ``qsd-nbd``: one NBD server (``qemu-nbd --cache=none --aio=io_uring`` on
  the raw image), reached by vblk serve (``nbd+unix://``) and by qemu-storage-daemon's
  nbd driver.
* with ``--rbd`` (``make compare`` passes it): ``vblk-rbd`` and ``qsd-rbd``, one RBD
  image in a throwaway single-node Ceph (tests/ceph_cluster.py, memstore OSD), served by
  ``vblk serve rbd:...`` and by qemu-storage-daemon's ``driver=rbd`` (``cache.direct=on``,
  like vblk's ``rbd_cache=false``).

Ratios are like for like only: each vblk row against its qsd counterpart (``PAIRS``).

For each backend and queue count the test guest (tools/guest.py: QEMU TCG, 2 vCPUs)
boots once per round and runs the same fio jobs (4k randread/randwrite QD32, 1M
sequential read/write QD8). There is one fio job per queue, each pinned to its own vCPU,
so ``QD`` is per queue. The workload prints ``@@JOB name start|end`` around each job.
The host streams the console and reads the backend's utime+stime from ``/proc/PID/stat``
at those markers. That, divided by the I/Os fio reports, is the backend's CPU time per
I/O. Then ``vblk bench`` (the userspace driver, no VM) drives vblk and qsd directly.

Each round visits the backends in a rotated order, so drifting noise from a shared
machine hits each alike. The figures are medians over rounds. Output goes to
``--out``: results.json (every sample, the machine, the exact commands), results.md
(the tables) and results.png (a bar chart).

    python3 bench/compare.py                 # the full run: 3 rounds of 8 s jobs
    python3 bench/compare.py --quick         # CI: 1 round, 2 s jobs
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import guest as guest_tool  # noqa: E402

BACKENDS = (
    "vblk", "vblk-cache", "qsd", "qsd-cache", "qemu",
    "vblk-qcow2", "qsd-qcow2", "vblk-nbd", "qsd-nbd",
)  # fmt: skip
LABELS = {
    "vblk": "vblk serve --direct",
    "vblk-cache": "vblk serve (page cache)",
    "qsd": "qemu-storage-daemon",
    "qsd-cache": "qsd (page cache)",
    "qemu": "QEMU virtio-blk",
    "vblk-qcow2": "vblk serve qcow2",
    "qsd-qcow2": "qsd qcow2",
    "vblk-nbd": "vblk serve nbd",
    "qsd-nbd": "qsd nbd",
    "vblk-rbd": "vblk serve rbd",
    "qsd-rbd": "qsd rbd",
}
#: Rows on a Ceph RBD image (--rbd), outside the default set: they start a cluster.
RBD_BACKENDS = ("vblk-rbd", "qsd-rbd")
ALL_BACKENDS = (*BACKENDS, *RBD_BACKENDS)
#: Each vblk variant and its like-for-like qemu-storage-daemon counterpart.
PAIRS = {
    "vblk": "qsd",
    "vblk-cache": "qsd-cache",
    "vblk-qcow2": "qsd-qcow2",
    "vblk-nbd": "qsd-nbd",
    "vblk-rbd": "qsd-rbd",
}
RATIO_LABELS = {
    "vblk": "vblk / qsd",
    "vblk-cache": "vblk (cache) / qsd (cache)",
    "vblk-qcow2": "qcow2: vblk / qsd",
    "vblk-nbd": "nbd: vblk / qsd",
    "vblk-rbd": "rbd: vblk / qsd",
}
VBLK_BACKENDS = tuple(PAIRS)
#: Backends that run as their own process, so their CPU time can be read; QEMU's
#: built-in device shares its process with the emulated vCPUs.
CPU_BACKENDS = (*(b for b in BACKENDS if b != "qemu"), *RBD_BACKENDS)
#: Backends ``vblk bench`` can drive (vhost-user sockets).
DEVICE_BACKENDS = CPU_BACKENDS
#: Rows that serve another storage than the raw file; --quick runs them with 1 queue only.
STORAGE_BACKENDS = ("vblk-qcow2", "qsd-qcow2", "vblk-nbd", "qsd-nbd")

MiB = 1 << 20


@dataclass(frozen=True)
class Job:
    """One fio job; ``iodepth`` is per queue (one fio job per queue)."""

    name: str
    rw: str
    bs: str
    iodepth: int
    title: str


JOBS = {
    j.name: j
    for j in (
        Job("randread", "randread", "4k", 32, "4k randread QD32"),
        Job("randwrite", "randwrite", "4k", 32, "4k randwrite QD32"),
        Job("seqread", "read", "1M", 8, "1M seq read QD8"),
        Job("seqwrite", "write", "1M", 8, "1M seq write QD8"),
    )
}
#: The jobs ``vblk bench`` runs device-side (when also chosen with --jobs).
DEVICE_JOBS = ("randread", "randwrite")


@dataclass
class Settings:
    rounds: int = 3
    runtime: int = 8
    queues: list[int] = field(default_factory=lambda: [1, 2])
    jobs: list[str] = field(default_factory=lambda: list(JOBS))
    backends: list[str] = field(default_factory=lambda: list(BACKENDS))
    vblk_args: list[str] = field(default_factory=lambda: ["--direct"])
    image_size: int = 1 << 30
    span: int = 256 * MiB  # the region fio and vblk bench touch, pre-filled
    smp: int = 2
    device: bool = True
    quick: bool = False

    @property
    def device_jobs(self) -> list[str]:
        return [j for j in DEVICE_JOBS if j in self.jobs]

    @property
    def device_backends(self) -> list[str]:
        return [b for b in self.backends if b in DEVICE_BACKENDS] if self.device else []


@dataclass
class Sample:
    """One job's figures from one round."""

    side: str  # "guest" (fio in the VM) or "device" (vblk bench, no VM)
    backend: str
    job: str
    queues: int
    round: int
    ios: int
    iops: float
    mb_s: float
    p99_us: float
    seconds: float  # the job's length as the host saw it (markers or bench process)
    cpu_ticks: int | None = None  # the backend's utime+stime over the job
    cpu_us_per_io: float | None = None


class CompareError(RuntimeError):
    """The benchmark could not run or produced unusable output."""


# -- parsing (no guest needed; tests/test_compare.py) -------------------------------


@dataclass(frozen=True)
class FioResult:
    ios: int
    iops: float
    mb_s: float
    runtime_s: float
    p99_us: float


def _first_json(text: str) -> Any:
    """The first JSON object in ``text``; console noise before or after it is ignored."""
    start = text.find("{")
    if start < 0:
        raise CompareError("no JSON object in the output")
    try:
        obj, _ = json.JSONDecoder().raw_decode(text, start)
    except json.JSONDecodeError as e:
        raise CompareError(f"malformed JSON output: {e}") from None
    return obj  # a dict: decoding started at a "{"


def _num(d: Any, key: str) -> float:
    v = d.get(key) if isinstance(d, dict) else None
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise CompareError(f"fio output: {key!r} is missing or not a number")
    return float(v)


def parse_fio_json(text: str) -> FioResult:
    """Totals of fio's ``--output-format=json`` (all jobs, reads and writes)."""
    doc = _first_json(text)
    jobs = doc.get("jobs")
    if not isinstance(jobs, list) or not jobs:
        raise CompareError("fio output has no jobs")
    ios = 0
    iops = bw = runtime = p99 = 0.0
    for job in jobs:
        if _num(job, "error"):
            raise CompareError(f"fio job {job.get('jobname')!r} failed: error {job['error']}")
        for ddir in ("read", "write"):
            d = job.get(ddir)
            n = int(_num(d, "total_ios"))
            if not n:
                continue
            ios += n
            iops += _num(d, "iops")
            bw += _num(d, "bw_bytes")
            runtime = max(runtime, _num(d, "runtime") / 1000)
            pct = d.get("clat_ns", {}).get("percentile", {})
            if isinstance(pct, dict) and isinstance(pct.get("99.000000"), int | float):
                p99 = max(p99, pct["99.000000"] / 1000)
    if ios <= 0:
        raise CompareError("fio did no I/O")
    return FioResult(ios, iops, bw / 1e6, runtime, p99)


def parse_bench_json(text: str) -> FioResult:
    """``vblk bench --json``'s figures, in the same shape as fio's."""
    doc = _first_json(text)
    if _num(doc, "errors"):
        raise CompareError(f"vblk bench saw {int(_num(doc, 'errors'))} I/O errors")
    ios = int(_num(doc, "ios"))
    if ios <= 0:
        raise CompareError("vblk bench did no I/O")
    return FioResult(
        ios,
        _num(doc, "iops"),
        _num(doc, "mb_per_s"),
        _num(doc, "elapsed_s"),
        _num(doc.get("lat_us"), "p99"),
    )


def split_marked(output: str, tag: str) -> dict[str, str]:
    """The text between ``@@<tag> name begin`` and ``@@<tag> name end`` lines, by name."""
    pat = rf"^@@{tag} (\S+) begin$\n(.*?)^@@{tag} \1 end$"
    return {m.group(1): m.group(2) for m in re.finditer(pat, output, re.M | re.S)}


def parse_proc_stat(text: str) -> int:
    """utime + stime (fields 14 and 15, clock ticks) of a ``/proc/PID/stat`` line.

    The command name (field 2) is in parentheses and may hold spaces or parentheses
    itself, so the fields are counted from the last ``)``.
    """
    head, sep, rest = text.rpartition(")")
    fields = rest.split()
    if not sep or "(" not in head or len(fields) < 13:
        raise CompareError(f"not a /proc/PID/stat line: {text[:80]!r}")
    try:
        return int(fields[11]) + int(fields[12])  # field n is fields[n - 3]
    except ValueError:
        raise CompareError(f"bad utime/stime in /proc/PID/stat: {text[:80]!r}") from None


def cpu_ticks(pid: int) -> int:
    """The CPU time so far (all threads) of the process and its live children, in ticks.

    Children count because ``vblk serve`` on a qcow2 image does the format's work in
    its child qemu-nbd, where qemu-storage-daemon does it in-process.
    """
    try:
        total = parse_proc_stat(Path(f"/proc/{pid}/stat").read_text())
    except OSError as e:
        raise CompareError(f"cannot read /proc/{pid}/stat: {e}") from None
    for child in _children(pid):
        with contextlib.suppress(OSError, CompareError):
            total += cpu_ticks(child)
    return total


def _children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                out += [int(x) for x in (task / "children").read_text().split()]
    return out


CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_us_per_io(ticks: int, ios: int, clk_tck: int = CLK_TCK) -> float:
    return ticks / clk_tck * 1e6 / ios


class CpuMarks:
    """A console hook: on ``@@JOB name start|end`` lines, note the time and the CPU ticks
    of process ``pid`` (None: time only)."""

    MARK = re.compile(r"@@JOB (\S+) (start|end)\b")

    def __init__(
        self,
        pid: int | None,
        read: Callable[[int], int] = cpu_ticks,
        say: Callable[[str], None] | None = None,
    ) -> None:
        self.pid, self._read, self._say = pid, read, say
        self.marks: dict[tuple[str, str], tuple[float, int | None]] = {}

    def __call__(self, line: str) -> None:
        m = self.MARK.search(line)
        if m is None:
            return
        ticks = None if self.pid is None else self._read(self.pid)
        self.marks[(m.group(1), m.group(2))] = (time.monotonic(), ticks)
        if self._say is not None and m.group(2) == "start":
            self._say(f"  fio {m.group(1)} ...")

    def span(self, job: str) -> tuple[float, int | None]:
        """Seconds between the job's markers and the ticks the backend used meanwhile."""
        try:
            t0, c0 = self.marks[(job, "start")]
            t1, c1 = self.marks[(job, "end")]
        except KeyError:
            raise CompareError(f"the guest never printed both markers of job {job}") from None
        return t1 - t0, None if c0 is None or c1 is None else c1 - c0


# -- summaries and reports -----------------------------------------------------------

FIGURES = ("iops", "mb_s", "p99_us", "cpu_us_per_io")


def median(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def rotated(items: Sequence[str], k: int) -> list[str]:
    """``items`` starting at position ``k`` (mod len): round k's backend order."""
    if not items:
        return []
    k %= len(items)
    return [*items[k:], *items[:k]]


def summarize(samples: Sequence[Sample]) -> list[dict[str, Any]]:
    """Medians over rounds, one row per (side, job, queues, backend), in first-seen order."""
    groups: dict[tuple[str, str, int, str], list[Sample]] = {}
    for s in samples:
        groups.setdefault((s.side, s.job, s.queues, s.backend), []).append(s)
    rows = []
    for (side, job, queues, backend), ss in groups.items():
        row: dict[str, Any] = {"side": side, "job": job, "queues": queues, "backend": backend}
        for f in FIGURES:
            row[f] = median([getattr(s, f) for s in ss])
        row["rounds"] = len(ss)
        row["iops_min"] = min(s.iops for s in ss)
        row["iops_max"] = max(s.iops for s in ss)
        rows.append(row)
    return rows


def ratios(summary: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """vblk / its qsd counterpart (PAIRS) for each figure of each (side, job, queues)."""
    by = {(r["side"], r["job"], r["queues"], r["backend"]): r for r in summary}
    out = []
    for (side, job, queues, backend), v in by.items():
        if backend not in PAIRS:
            continue
        q = by.get((side, job, queues, PAIRS[backend]))
        if q is None:
            continue
        row: dict[str, Any] = {"side": side, "job": job, "queues": queues, "backend": backend}
        row.update({f: ratio(v[f], q[f]) for f in FIGURES})
        out.append(row)
    return out


def _fmt(value: float | None, figure: str) -> str:
    if value is None:
        return "—"
    if figure == "iops":
        return f"{value:,.0f}"
    if figure == "ratio":
        return f"{value:.2f}"
    return f"{value:,.1f}"


def metric_table(
    results: dict[str, Any], side: str, figure: str, backends: Sequence[str]
) -> list[str]:
    """A Markdown table: rows job x queues, a column per backend, then each vblk / qsd."""
    mine = [r for r in results["summary"] if r["side"] == side]
    rows = {(r["job"], r["queues"], r["backend"]): r for r in mine}
    rat = {
        (r["job"], r["queues"], r.get("backend", "vblk")): r
        for r in results["ratios"]
        if r["side"] == side
    }
    keys = list(dict.fromkeys((r["job"], r["queues"]) for r in mine))
    ratio_of = [b for b in VBLK_BACKENDS if b in backends and PAIRS[b] in backends]
    head = ["job", "queues", *(LABELS[b] for b in backends)] + [RATIO_LABELS[b] for b in ratio_of]
    lines = ["| " + " | ".join(head) + " |", "| --- | ---: |" + " ---: |" * (len(head) - 2)]
    for job, queues in keys:
        cells = [JOBS[job].title if job in JOBS else job, str(queues)]
        for b in backends:
            r = rows.get((job, queues, b))
            cells.append(_fmt(None if r is None else r[figure], figure))
        for b in ratio_of:
            ra = rat.get((job, queues, b))
            cells.append(_fmt(None if ra is None else ra[figure], "ratio"))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render_markdown(results: dict[str, Any]) -> str:
    s, m = results["settings"], results["machine"]
    backends = [b for b in ALL_BACKENDS if b in s["backends"]]
    cpu_backends = [b for b in backends if b in CPU_BACKENDS]
    dev_backends = [b for b in backends if b in DEVICE_BACKENDS]
    rounds = f"median of {s['rounds']} round{'s' * (s['rounds'] != 1)}"
    out = [
        "## vblk serve vs qemu-storage-daemon vs QEMU's built-in virtio-blk",
        "",
        f"{m['date']} on {m['cpu_model']} ({m['nproc']} CPUs), Linux {m['kernel']}, "
        f"{m['qemu']}. {rounds}, {s['runtime']} s per job, a {s['span'] // MiB} MiB "
        f"region of a {s['image_size'] // MiB} MiB image. vblk serve args: "
        f"`{' '.join(s['vblk_args']) or '(none)'}`. Load average {m['loadavg_start']} at "
        f"the start, {m['loadavg_end']} at the end.",
        "",
    ]
    sections = [
        ("guest", "iops", backends, "Guest fio IOPS"),
        ("guest", "mb_s", backends, "Guest fio MB/s"),
        ("guest", "cpu_us_per_io", cpu_backends, "Backend CPU µs per I/O, guest fio"),
        ("device", "iops", dev_backends, "`vblk bench` (no VM) IOPS"),
        ("device", "p99_us", dev_backends, "`vblk bench` (no VM) p99 latency, µs"),
        ("device", "cpu_us_per_io", dev_backends, "Backend CPU µs per I/O, `vblk bench`"),
    ]
    for side, figure, bs, title in sections:
        if not bs or not any(r["side"] == side for r in results["summary"]):
            continue
        out += [f"**{title}** ({rounds})", "", *metric_table(results, side, figure, bs), ""]
    out += [f"- {n}" for n in results["notes"]]
    return "\n".join(out) + "\n"


def render_chart(results: dict[str, Any], path: Path) -> None:
    """A PNG of grouped bars, one panel per figure (matplotlib, Agg: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = results["settings"]
    backends = [b for b in ALL_BACKENDS if b in s["backends"]]
    panels = [
        ("guest", "iops", ("randread", "randwrite"), backends, "guest fio, 4k QD32: IOPS"),
        ("guest", "mb_s", ("seqread", "seqwrite"), backends, "guest fio, 1M QD8: MB/s"),
        (
            "guest",
            "cpu_us_per_io",
            tuple(JOBS),
            [b for b in backends if b in CPU_BACKENDS],
            "backend CPU µs per I/O (guest fio)",
        ),
        (
            "device",
            "iops",
            DEVICE_JOBS,
            [b for b in backends if b in DEVICE_BACKENDS],
            "vblk bench (no VM), 4k QD32: IOPS",
        ),
    ]
    rows = {(r["side"], r["job"], r["queues"], r["backend"]): r for r in results["summary"]}
    todo = []
    for side, figure, jobs, bs, title in panels:
        groups = list(
            dict.fromkeys((j, q) for (sd, j, q, b) in rows if sd == side and j in jobs and b in bs)
        )
        if groups and bs:
            todo.append((side, figure, groups, bs, title))
    if not todo:
        raise CompareError("nothing to plot")
    fig, axes = plt.subplots(len(todo), 1, figsize=(9, 3.2 * len(todo)), squeeze=False)
    colors = {
        "vblk": "#2a7ab9", "vblk-cache": "#7fb8e0", "qsd": "#e08a2c", "qsd-cache": "#f2c48d",
        "qemu": "#7a7a7a", "vblk-qcow2": "#1f5f3a", "qsd-qcow2": "#b5542a",
        "vblk-nbd": "#57a773", "qsd-nbd": "#d98a6a", "vblk-rbd": "#1b4f72", "qsd-rbd": "#a04000",
    }  # fmt: skip
    for ax, (side, figure, groups, bs, title) in zip(axes[:, 0], todo, strict=True):
        width = min(0.8 / len(bs), 0.3)
        for i, b in enumerate(bs):
            vals = [(rows.get((side, j, q, b)) or {}).get(figure) or 0.0 for j, q in groups]
            xs = [g + (i - (len(bs) - 1) / 2) * width for g in range(len(groups))]
            bars = ax.bar(xs, vals, width, label=LABELS[b], color=colors[b])
            fmt = "{:,.0f}" if figure != "cpu_us_per_io" else "{:.1f}"
            ax.bar_label(bars, fmt=fmt, fontsize=6, padding=1)
        ax.margins(y=0.12)
        ax.set_xticks(range(len(groups)))
        # "4k randread QD32" -> "4k randread\nQD32, 2 queues": narrow enough for 8 groups.
        ax.set_xticklabels(
            [
                "{}\n{}, {} queue{}".format(*JOBS[j].title.rsplit(" ", 1), q, "s" * (q != 1))
                for j, q in groups
            ],
            fontsize=8 if len(groups) <= 4 else 7,
        )
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    m = results["machine"]
    fig.suptitle(
        f"{m['date'][:10]}, {m['cpu_model']} ({m['nproc']} CPUs), "
        f"median of {s['rounds']}, {s['runtime']} s jobs",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- running the backends ------------------------------------------------------------


def _first_line(cmd: Sequence[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.splitlines()[0].strip() if out.strip() else "unknown"


def machine_info() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    commit = _first_line(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    # Uncommitted changes to the package mean the figures belong to no commit.
    dirty = _first_line(["git", "-C", str(ROOT), "status", "--porcelain", "--", "vblk"])
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu_model": model,
        "nproc": os.cpu_count(),
        "kernel": platform.release(),
        "qemu": _first_line(["qemu-system-x86_64", "--version"]),
        "qemu_storage_daemon": _first_line(["qemu-storage-daemon", "--version"]),
        "python": platform.python_version(),
        "vblk_commit": commit + ("" if dirty == "unknown" else "+dirty"),
        "clk_tck": CLK_TCK,
        "loadavg_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def qcow2_path(image: Path) -> Path:
    """The qcow2 copy of the raw image that the qcow2 rows serve."""
    return image.with_suffix(".qcow2")


def nbd_socket(image: Path) -> Path:
    """The unix socket of the NBD server that the nbd rows reach."""
    return image.with_name("nbd.sock")


def nbd_server_command(image: Path) -> list[str]:
    """The NBD server the nbd rows share: qemu-nbd on the raw image, O_DIRECT + io_uring."""
    return ["qemu-nbd", "--format", "raw", "--persistent", "--shared", "0",
            "--cache", "none", "--aio", "io_uring", "--discard", "unmap",
            "--socket", str(nbd_socket(image)), str(image)]  # fmt: skip


def _qsd(file_or_node: list[str], sock: Path, queues: int) -> list[str]:
    return [
        "qemu-storage-daemon", *file_or_node,
        "--export",
        "type=vhost-user-blk,id=exp,node-name=disk,addr.type=unix,"
        f"addr.path={sock},writable=on,num-queues={queues}",
    ]  # fmt: skip


def backend_command(kind: str, image: Path, sock: Path, queues: int, s: Settings) -> list[str]:
    if kind in RBD_BACKENDS:
        return rbd_backend_command(kind, sock, queues, s)
    serve = [sys.executable, "-m", "vblk", "serve"]
    at = ["--socket", str(sock), "--num-queues", str(queues)]
    cached = [a for a in s.vblk_args if a != "--direct"]
    if kind in ("vblk", "vblk-cache"):
        return [*serve, str(image), *at, *(s.vblk_args if kind == "vblk" else cached)]
    if kind == "vblk-qcow2":
        direct = ["--opt", "cache=none", "--opt", "aio=io_uring"]
        return [*serve, str(qcow2_path(image)), *at, *direct, *cached]
    if kind == "vblk-nbd":
        return [*serve, f"nbd+unix:///?socket={nbd_socket(image)}", *at, *cached]
    if kind in ("qsd", "qsd-cache"):
        mode = "on" if kind == "qsd" else "off"
        return _qsd([
            "--blockdev",
            f"driver=file,node-name=file,filename={image},cache.direct={mode},aio=io_uring",
            "--blockdev", "driver=raw,node-name=disk,file=file",
        ], sock, queues)  # fmt: skip
    if kind == "qsd-qcow2":
        return _qsd([
            "--blockdev", f"driver=file,node-name=file,filename={qcow2_path(image)},"
            "cache.direct=on,aio=io_uring",
            "--blockdev", "driver=qcow2,node-name=disk,file=file",
        ], sock, queues)  # fmt: skip
    if kind == "qsd-nbd":
        return _qsd([
            "--blockdev", "driver=nbd,node-name=disk,server.type=unix,"
            f"server.path={nbd_socket(image)}",
        ], sock, queues)  # fmt: skip
    raise ValueError(f"{kind} is not a separate backend process")


# -- RBD rows: one image in a throwaway Ceph cluster, started at the first RBD step ------


@dataclass
class RbdTarget:
    cluster: Any  # tests/ceph_cluster.CephCluster
    spec: str  # POOL/IMAGE


_rbd: RbdTarget | None = None


def rbd_target(s: Settings) -> RbdTarget:
    """The cluster and image the RBD rows share (started once, stopped at exit).

    The image gets the same pre-filled ``span`` as the raw file, so no read hits an
    object that does not exist (librbd answers those itself, with zeroes).
    """
    global _rbd
    if _rbd is None:
        import atexit
        import importlib

        sys.path.insert(0, str(ROOT / "tests"))
        ceph_cluster = importlib.import_module("ceph_cluster")
        cluster = ceph_cluster.start(store_bytes=s.span + 2 * s.image_size)
        atexit.register(cluster.stop)
        spec = cluster.create_image("compare", s.image_size)
        chunk = os.urandom(4 * MiB)
        import rados
        import rbd

        with rados.Rados(conffile=str(cluster.conf)) as r, r.open_ioctx(cluster.pool) as io:
            with rbd.Image(io, "compare") as img:
                for off in range(0, s.span, 4 * MiB):
                    img.write(chunk[: min(4 * MiB, s.span - off)], off)
        _rbd = RbdTarget(cluster, spec)
    return _rbd


def rbd_backend_command(kind: str, sock: Path, queues: int, s: Settings) -> list[str]:
    t = rbd_target(s)
    conf = str(t.cluster.conf)
    if kind == "vblk-rbd":
        return [sys.executable, "-m", "vblk", "serve", f"rbd:{t.spec}", "--opt", f"conf={conf}",
                "--socket", str(sock), "--num-queues", str(queues)]  # fmt: skip
    pool, image = t.spec.split("/")
    return [
        "qemu-storage-daemon",
        "--blockdev",
        f"driver=rbd,node-name=disk,pool={pool},image={image},conf={conf},cache.direct=on",
        "--export",
        "type=vhost-user-blk,id=exp,node-name=disk,addr.type=unix,"
        f"addr.path={sock},writable=on,num-queues={queues}",
    ]  # fmt: skip


@contextlib.contextmanager
def backend_process(cmd: list[str], sock: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """The backend, listening on ``sock``; SIGINT (then SIGKILL) when the block ends."""
    with contextlib.suppress(FileNotFoundError):
        sock.unlink()
    with open(log, "ab") as logf:
        # No shell or wrapper in between: the Popen's pid is the process doing the I/O.
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise CompareError(
                    f"{cmd[0]} did not start listening on {sock} (exit {proc.poll()}); "
                    f"log {log}:\n{_tail(log)}"
                )
            time.sleep(0.05)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def make_image(path: Path, size: int, span: int) -> None:
    """A sparse image whose first ``span`` bytes hold random data, so no read hits a hole."""
    chunk = os.urandom(MiB)
    with open(path, "wb") as f:
        for off in range(0, span, MiB):
            f.write(chunk[: min(MiB, span - off)])
        f.truncate(size)
        f.flush()
        os.fsync(f.fileno())


def make_qcow2(raw: Path, qcow2: Path) -> None:
    """The raw image's data in a qcow2 image (allocated where the raw one has data)."""
    p = subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if p.returncode != 0:
        raise CompareError(f"qemu-img convert to qcow2 failed: {p.stderr.strip()}")


def fio_command(job: Job, queues: int, s: Settings) -> str:
    part = s.span // queues // MiB * MiB
    cpus = "0" if queues == 1 else f"0-{queues - 1}"
    return (
        f"fio --name={job.name} --filename=/dev/vda --rw={job.rw} --bs={job.bs} "
        f"--iodepth={job.iodepth} --numjobs={queues} --group_reporting "
        f"--cpus_allowed={cpus} --cpus_allowed_policy=split "
        f"--size={part} --offset_increment={part} --ioengine=libaio --direct=1 "
        f"--time_based --runtime={s.runtime} --output-format=json --output=/tmp/{job.name}.json"
    )


def guest_workload(queues: int, s: Settings) -> str:
    """The guest's script: markers around each fio job, then its JSON between tags."""
    lines = ['echo "queues_seen=$(ls /sys/block/vda/mq | wc -l)"']
    for name in s.jobs:
        lines += [
            f'echo "@@JOB {name} start"',
            fio_command(JOBS[name], queues, s),
            f'echo "@@JOB {name} end"',
            f'echo "@@FIO {name} begin"; cat /tmp/{name}.json; echo "@@FIO {name} end"',
        ]
    return "\n".join(lines) + "\n"


class Runner:
    """Runs the plan: every (round, backend, queues) step, keeping samples and commands."""

    def __init__(self, s: Settings, work: Path, logs: Path) -> None:
        self.s, self.work, self.logs = s, work, logs
        self.image = work / "disk.img"
        self.samples: list[Sample] = []
        self.commands: dict[str, Any] = {"backends": {}, "guest_qemu": {}, "device_bench": {}}
        self.t0 = time.monotonic()
        self.steps_done = 0
        self.steps_total = 0
        self.guest: guest_tool.Guest | None = None

    def say(self, msg: str) -> None:
        el = time.monotonic() - self.t0
        print(f"[{int(el) // 60:02d}:{int(el) % 60:02d}] {msg}", file=sys.stderr, flush=True)

    def plan(self) -> list[tuple[int, str, str, int]]:
        """(round, side, backend, queues) in run order: backends rotate each round."""
        steps = []
        for r in range(self.s.rounds):
            for q in self.s.queues:
                steps += [
                    (r, "guest", b, q) for b in rotated(self.s.backends, r) if self._runs(b, q)
                ]
            if self.s.device_jobs:
                for q in self.s.queues:
                    steps += [
                        (r, "device", b, q)
                        for b in rotated(self.s.device_backends, r)
                        if self._runs(b, q) and not (self.s.quick and b in STORAGE_BACKENDS)
                    ]
        return steps

    def _runs(self, backend: str, q: int) -> bool:
        """--quick keeps to one queue count for the qcow2 and nbd rows (they only need to work)."""
        return not (self.s.quick and backend in STORAGE_BACKENDS and q != self.s.queues[0])

    def peers(self, stack: contextlib.ExitStack, backend: str, tag: str) -> None:
        """Start what ``backend`` serves from, if anything: the NBD server for the nbd rows."""
        if backend in ("vblk-nbd", "qsd-nbd"):
            cmd = nbd_server_command(self.image)
            self.commands["backends"]["nbd server"] = shlex.join(cmd)
            stack.enter_context(
                backend_process(cmd, nbd_socket(self.image), self.logs / f"nbd-{tag}.log")
            )

    def run(self) -> None:
        self.guest = guest_tool.build()
        self.say(
            f"image {self.image} ({self.s.image_size // MiB} MiB, "
            f"first {self.s.span // MiB} MiB filled)"
        )
        make_image(self.image, self.s.image_size, self.s.span)
        if any(b in ("vblk-qcow2", "qsd-qcow2") for b in self.s.backends):
            make_qcow2(self.image, qcow2_path(self.image))
        steps = self.plan()
        self.steps_total = len(steps)
        for r, side, backend, q in steps:
            left = ""
            if self.steps_done:
                per = (time.monotonic() - self.t0) / self.steps_done
                left = f", ~{per * (self.steps_total - self.steps_done) / 60:.0f} min left"
            self.say(
                f"step {self.steps_done + 1}/{self.steps_total}{left}: round {r + 1}/"
                f"{self.s.rounds}, {side} side, {backend}, {q} queue{'s' * (q != 1)}"
            )
            if side == "guest":
                self.guest_step(r, backend, q)
            else:
                self.device_step(r, backend, q)
            self.steps_done += 1

    def _record(self, sample: Sample) -> None:
        self.samples.append(sample)
        cpu = "" if sample.cpu_us_per_io is None else f", {sample.cpu_us_per_io:.1f} µs CPU/IO"
        self.say(
            f"  {sample.job}: {sample.iops:,.0f} IOPS, {sample.mb_s:,.1f} MB/s, "
            f"p99 {sample.p99_us:,.0f} µs{cpu}"
        )

    def guest_step(self, r: int, backend: str, q: int) -> None:
        s, g = self.s, self.guest
        assert g is not None
        script = guest_workload(q, s)
        self.commands.setdefault("guest_workload", {})[f"q{q}"] = script
        timeout = 120 + len(s.jobs) * (s.runtime + 30)
        sock = self.work / f"{backend}.sock"
        with contextlib.ExitStack() as stack:
            pid = None
            alive = None
            self.peers(stack, backend, f"{backend}-q{q}-r{r + 1}")
            if backend in CPU_BACKENDS:
                cmd = backend_command(backend, self.image, sock, q, s)
                self.commands["backends"][f"{backend} q{q}"] = shlex.join(cmd)
                proc = stack.enter_context(
                    backend_process(cmd, sock, self.logs / f"{backend}-q{q}-r{r + 1}.log")
                )
                pid, alive = proc.pid, (lambda: proc.poll() is None)
            marks = CpuMarks(pid, say=self.say)
            try:
                res = guest_tool.run_guest(
                    None if backend == "qemu" else sock, script, guest=g, num_queues=q,
                    smp=s.smp, timeout=timeout, alive=alive, on_line=marks,
                    image=self.image if backend == "qemu" else None, aio="io_uring",
                )  # fmt: skip
            except guest_tool.GuestError as e:
                raise CompareError(f"{backend}, {q} queues: {e}") from None
        self.commands["guest_qemu"][f"{backend} q{q}"] = shlex.join(res.command)
        if res.rc != 0:
            raise CompareError(
                f"{backend}, {q} queues: the guest workload failed "
                f"(status {res.rc}):\n{res.output[-2000:]}"
            )
        seen = res.values.get("queues_seen")
        if seen != str(q):
            raise CompareError(f"{backend}: the guest sees {seen} queues, not {q}")
        outputs = split_marked(res.output, "FIO")
        for name in s.jobs:
            if name not in outputs:
                raise CompareError(f"{backend}, {q} queues: no fio output for {name}")
            fio = parse_fio_json(outputs[name])
            seconds, ticks = marks.span(name)
            self._record(
                Sample(
                    "guest",
                    backend,
                    name,
                    q,
                    r + 1,
                    fio.ios,
                    fio.iops,
                    fio.mb_s,
                    fio.p99_us,
                    round(seconds, 3),
                    ticks,
                    None if ticks is None else cpu_us_per_io(ticks, fio.ios),
                )
            )

    def device_step(self, r: int, backend: str, q: int) -> None:
        s = self.s
        sock = self.work / f"{backend}.sock"
        cmd = backend_command(backend, self.image, sock, q, s)
        self.commands["backends"][f"{backend} q{q}"] = shlex.join(cmd)
        log = self.logs / f"{backend}-q{q}-r{r + 1}-device.log"
        with contextlib.ExitStack() as stack:
            self.peers(stack, backend, f"{backend}-q{q}-r{r + 1}-device")
            proc = stack.enter_context(backend_process(cmd, sock, log))
            for name in s.device_jobs:
                job = JOBS[name]
                bench = [sys.executable, "-m", "vblk", "bench", "--socket", str(sock),
                         "--rw", job.rw, "--bs", job.bs, "--iodepth", str(job.iodepth),
                         "--queues", str(q), "--runtime", str(s.runtime),
                         "--size", str(s.span), "--json"]  # fmt: skip
                self.commands["device_bench"][f"{name} q{q}"] = shlex.join(bench)
                self.say(f"  vblk bench {name} ...")
                t0, c0 = time.monotonic(), cpu_ticks(proc.pid)
                try:
                    p = subprocess.run(
                        bench, capture_output=True, text=True, timeout=s.runtime + 60
                    )
                except subprocess.TimeoutExpired:
                    raise CompareError(f"vblk bench {name} against {backend} hung") from None
                t1, c1 = time.monotonic(), cpu_ticks(proc.pid)
                if p.returncode != 0:
                    raise CompareError(
                        f"vblk bench {name} against {backend} failed "
                        f"(exit {p.returncode}): {p.stderr[-1500:]}"
                    )
                b = parse_bench_json(p.stdout)
                self._record(
                    Sample(
                        "device",
                        backend,
                        name,
                        q,
                        r + 1,
                        b.ios,
                        b.iops,
                        b.mb_s,
                        b.p99_us,
                        round(t1 - t0, 3),
                        c1 - c0,
                        cpu_us_per_io(c1 - c0, b.ios),
                    )
                )


def notes(s: Settings, samples: Sequence[Sample]) -> list[str]:
    ticks = [x for x in samples if x.cpu_ticks is not None and x.ios]
    worst = max((1e6 / CLK_TCK / x.ios for x in ticks), default=0.0)
    out = [
        "Guest: QEMU TCG (no KVM), so the guest's emulated CPUs are the ceiling; compare the "
        "backends within one run, not across machines.",
        f"fio: one job per queue, each pinned to its own vCPU (guest has {s.smp}); QD is per "
        "queue. libaio, O_DIRECT, on /dev/vda.",
        "CPU µs per I/O = the backend process's utime+stime (all threads, /proc/PID/stat) "
        "between the job's start and end markers, divided by the I/Os fio (or vblk bench) "
        f"counted. /proc counts in {1000 // CLK_TCK} ms ticks; the coarsest job here "
        f"had ±{worst:.2f} µs per I/O per tick. QEMU's built-in device shares QEMU's process "
        "with the emulated vCPUs, so it has no separate figure.",
        "vblk bench runs on the same host CPUs as the backend it drives.",
        "Ratios set each vblk row against qemu-storage-daemon in the same mode: O_DIRECT "
        "against cache.direct=on, page cache against cache.direct=off, the same qcow2 image "
        "(both O_DIRECT), the same NBD server. A backend's CPU includes its child processes "
        "(vblk's qemu-nbd for qcow2), not the shared NBD server's.",
    ]
    if (spread := spread_note(samples)) is not None:
        out.append(spread)
    if s.quick:
        out.append("--quick: a smoke run (short jobs, one round); the figures are not meaningful.")
    return out


def spread_note(samples: Sequence[Sample]) -> str | None:
    """How far rounds disagreed: the yardstick for which ratios mean anything."""
    groups: dict[tuple[str, str, int, str], list[float]] = {}
    for x in samples:
        groups.setdefault((x.side, x.job, x.queues, x.backend), []).append(x.iops)
    spreads = {
        k: (max(v) - min(v)) / statistics.median(v)
        for k, v in groups.items()
        if len(v) > 1 and statistics.median(v) > 0
    }
    if not spreads:
        return None
    side, job, queues, backend = max(spreads, key=lambda k: spreads[k])
    title = JOBS[job].title if job in JOBS else job
    return (
        f"Rounds disagreed: IOPS (max - min) / median was {statistics.median(spreads.values()):.0%}"
        f" for the typical figure, up to {max(spreads.values()):.0%} ({LABELS[backend]}, {side}"
        f" {title}, {queues} queue{'s' * (queues != 1)}). A ratio inside that band is noise."
    )


def load_results(path: Path) -> dict[str, Any]:
    """A results.json written earlier, its notes recomputed (for --render)."""
    try:
        results: dict[str, Any] = json.loads(path.read_text())
        settings = Settings(**results["settings"])
        samples = [Sample(**x) for x in results["samples"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CompareError(f"{path} is not a results.json from bench/compare.py: {e}") from None
    results["notes"] = notes(settings, samples)
    return results


def write_results(results: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (out / "results.md").write_text(render_markdown(results))
    render_chart(results, out / "results.png")


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


@dataclass
class Options:
    settings: Settings
    out: Path
    workdir: Path | None
    render: Path | None


def parse_args(argv: Sequence[str] | None) -> Options:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rounds", type=int, help="boots per backend and queue count (default 3)")
    ap.add_argument("--runtime", type=int, help="seconds per fio / vblk bench job (default 8)")
    ap.add_argument("--queues", default="1,2", help="queue counts (default 1,2)")
    ap.add_argument("--jobs", default=",".join(JOBS), help=f"fio jobs (default {','.join(JOBS)})")
    ap.add_argument(
        "--backends",
        default=",".join(BACKENDS),
        help=f"backends, from {','.join(BACKENDS)} (default all)",
    )
    ap.add_argument(
        "--vblk-args",
        default="--direct",
        help="extra vblk serve arguments for the vblk backend (default --direct, like the "
        "others' O_DIRECT); vblk-cache gets the same minus --direct",
    )
    ap.add_argument(
        "--span", type=int, default=None, help="MiB fio touches, pre-filled (default 256)"
    )
    ap.add_argument("--no-device", action="store_true", help="skip the vblk bench part")
    ap.add_argument(
        "--rbd",
        action="store_true",
        help=f"add the RBD rows ({','.join(RBD_BACKENDS)}): starts a single-node Ceph",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=ROOT / "build" / "compare",
        help="directory for results.json/.md/.png (default build/compare)",
    )
    ap.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where the image goes (default a temporary directory in /var/tmp)",
    )
    ap.add_argument(
        "--quick", action="store_true", help="CI smoke run: 1 round, 2 s jobs, 64 MiB region"
    )
    ap.add_argument(
        "--render",
        type=Path,
        metavar="JSON",
        help="run nothing: redraw results.md/.png (and notes) in --out from a results.json",
    )
    a = ap.parse_args(argv)
    s = Settings(quick=a.quick, device=not a.no_device, vblk_args=shlex.split(a.vblk_args))
    s.rounds = a.rounds if a.rounds is not None else (1 if a.quick else 3)
    s.runtime = a.runtime if a.runtime is not None else (2 if a.quick else 8)
    s.span = a.span * MiB if a.span is not None else (64 if a.quick else 256) * MiB
    try:
        s.queues = [int(x) for x in _csv(a.queues)]
    except ValueError:
        ap.error(f"--queues {a.queues!r}: give numbers, e.g. 1,2")
    s.jobs, s.backends = _csv(a.jobs), _csv(a.backends)
    if a.rbd:
        s.backends += [b for b in RBD_BACKENDS if b not in s.backends]
    if bad := [j for j in s.jobs if j not in JOBS]:
        ap.error(f"unknown job(s) {bad}; choose from {list(JOBS)}")
    if bad := [b for b in s.backends if b not in ALL_BACKENDS]:
        ap.error(f"unknown backend(s) {bad}; choose from {list(ALL_BACKENDS)}")
    if not s.jobs or not s.backends or not s.queues:
        ap.error("--jobs, --backends and --queues must not be empty")
    if s.rounds < 1 or s.runtime < 1 or any(q < 1 for q in s.queues):
        ap.error("--rounds, --runtime and --queues must be at least 1")
    if not MiB * max(s.queues) <= s.span <= s.image_size:
        ap.error(f"--span must be between {max(s.queues)} and {s.image_size // MiB} MiB")
    s.smp = max(2, *s.queues)
    return Options(s, a.out, a.workdir, a.render)


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    s, out, workdir = opts.settings, opts.out, opts.workdir
    if opts.render is not None:
        try:
            earlier = load_results(opts.render)
            write_results(earlier, out)
        except CompareError as e:
            print(f"compare: error: {e}", file=sys.stderr)
            return 1
        print(render_markdown(earlier))
        return 0
    need = ["qemu-system-x86_64"]
    if any(b.startswith("qsd") for b in s.backends):
        need.append("qemu-storage-daemon")
    if any(b in STORAGE_BACKENDS for b in s.backends):
        need += ["qemu-img", "qemu-nbd"]
    if any(b in RBD_BACKENDS for b in s.backends):
        need += ["qemu-storage-daemon", "ceph-mon", "ceph-osd", "ceph-mgr"]
    if missing := [t for t in need if shutil.which(t) is None]:
        print(
            f"compare: error: {', '.join(missing)} missing: bash scripts/install-deps.sh",
            file=sys.stderr,
        )
        return 2
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    machine = machine_info()
    work = Path(tempfile.mkdtemp(prefix="vblk-compare-", dir=workdir or "/var/tmp"))
    runner = Runner(s, work, logs)
    try:
        runner.run()
    except (CompareError, guest_tool.GuestError) as e:
        print(f"compare: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("compare: interrupted", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(work, ignore_errors=True)
    machine["loadavg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    summary = summarize(runner.samples)
    results: dict[str, Any] = {
        "machine": machine,
        "settings": asdict(s),
        "commands": runner.commands,
        "summary": summary,
        "ratios": ratios(summary),
        "samples": [asdict(x) for x in runner.samples],
        "notes": notes(s, runner.samples),
        "wall_s": round(time.monotonic() - runner.t0, 1),
    }
    write_results(results, out)
    runner.say(f"done in {results['wall_s'] / 60:.1f} min: {out}/results.{{json,md,png}}")
    print(render_markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
