#!/usr/bin/env python3
"""Multi-export scaling: N exports of one ``vblk daemon`` driven at once by N ``vblk bench``.

Each export runs in its own worker process (its own GIL), so the exports' total IOPS
should grow with the exports until the host runs out of cores. For N in ``--exports``
(default 1 2 4) this starts one daemon with N exports (raw files on the page cache,
one queue each), runs N ``vblk bench --json`` processes at once (4k randread, QD32,
one per export) and reports their total IOPS against one export alone. It also reads
the CPU time the export workers (``/proc/PID/stat``) and the bench processes
(``RUSAGE_CHILDREN``) used, so the CPU cost per I/O on each side says what more cores
would give: with the cores to spare, N exports need N x (backend + driver) CPU per I/O.

    python3 bench/scaling.py                   # 1, 2 and 4 exports, 5 s each
    python3 bench/scaling.py --exports 1 2 --runtime 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MiB = 1 << 20
TICK = os.sysconf("SC_CLK_TCK")


def _call(control: Path, method: str, **params: Any) -> Any:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(60)
        s.connect(str(control))
        req = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}
        s.sendall(json.dumps(req).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                raise RuntimeError(f"{method}: the daemon hung up")
            buf += chunk
    ans = json.loads(buf)
    if "error" in ans:
        raise RuntimeError(f"{method}: {ans['error']['message']}")
    return ans["result"]


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_once(tmp: Path, n: int, runtime: float, iodepth: int) -> dict[str, Any]:
    """One daemon with ``n`` exports, ``n`` bench processes at once; totals and CPU."""
    control = tmp / f"ctl{n}"
    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    daemon = subprocess.Popen(
        [sys.executable, "-m", "vblk", "daemon", "--control", str(control),
         "--log-level", "warning"],
        env=env,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not control.exists():
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the daemon did not start")
            time.sleep(0.05)
        socks = []
        for i in range(n):
            img = tmp / f"d{i}.img"
            with open(img, "wb") as f:
                f.truncate(64 * MiB)
            sock = tmp / f"d{n}-{i}.sock"
            _call(control, "export-add", id=f"d{i}", spec=str(img), socket=str(sock),
                  num_queues=1, queue_size=256)  # fmt: skip
            socks.append(sock)
        pids = [e["pid"] for e in _call(control, "export-list")]
        cpu0 = sum(_cpu_seconds(p) for p in pids)
        drv0 = _children_cpu()
        t0 = time.monotonic()
        benches = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "vblk",
                    "bench",
                    "--socket",
                    str(s),
                    "--rw",
                    "randread",
                    "--bs",
                    "4k",
                    "--iodepth",
                    str(iodepth),
                    "--runtime",
                    str(runtime),
                    "--json",
                ],
                stdout=subprocess.PIPE,
                env=env,
            )
            for s in socks
        ]
        results = []
        for b in benches:
            out, _ = b.communicate(timeout=runtime + 120)
            if b.returncode != 0:
                raise RuntimeError(f"vblk bench exited {b.returncode}")
            results.append(json.loads(out))
        wall = time.monotonic() - t0
        backend_cpu = sum(_cpu_seconds(p) for p in pids) - cpu0
        driver_cpu = _children_cpu() - drv0
        _call(control, "daemon-shutdown")
        daemon.wait(60)
    finally:
        if daemon.poll() is None:
            daemon.terminate()
            daemon.wait(30)
    iops = [float(r["iops"]) for r in results]
    ios = sum(i * runtime for i in iops)
    return {
        "exports": n,
        "iops_each": [round(i) for i in iops],
        "iops_total": round(sum(iops)),
        "backend_cpu_us_per_io": round(backend_cpu / ios * 1e6, 1) if ios else None,
        "driver_cpu_us_per_io": round(driver_cpu / ios * 1e6, 1) if ios else None,
        "cpu_busy_cores": round((backend_cpu + driver_cpu) / wall, 2),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--exports", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--runtime", type=float, default=5.0)
    p.add_argument("--iodepth", type=int, default=32)
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="vblk-scaling-") as d:
        for n in args.exports:
            rows.append(run_once(Path(d), n, args.runtime, args.iodepth))
            print(json.dumps(rows[-1]), file=sys.stderr)
    base = rows[0]["iops_total"] / rows[0]["exports"]
    print(f"{os.cpu_count()} CPU(s), 4k randread QD{args.iodepth}, {args.runtime:g} s\n")
    print("| exports | total IOPS | vs one export | backend CPU/IO | driver CPU/IO | cores busy |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['exports']} | {r['iops_total']} | {r['iops_total'] / base:.2f}x "
            f"| {r['backend_cpu_us_per_io']} us | {r['driver_cpu_us_per_io']} us "
            f"| {r['cpu_busy_cores']} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
