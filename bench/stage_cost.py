#!/usr/bin/env python3
"""The cost of stage timing: vblk serve at several ``--stage-sample`` rates under vblk bench.

For each rate (0 = no timing, 32 = the default, 1 = every request) and each
repetition, in alternating order, it starts ``vblk serve`` on a page-cached
image, runs ``vblk bench`` against it and reads the server's utime+stime from
``/proc/PID/stat`` around the run: the backend's CPU per I/O, which a loaded
machine disturbs less than IOPS. Prints one line per run and the medians.

    python3 bench/stage_cost.py [--reps 3] [--runtime 4] [--rates 0,32,1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def one_run(tmp: str, rate: int, args: argparse.Namespace) -> dict[str, float]:
    sock = os.path.join(tmp, f"s{rate}.sock")
    img = os.path.join(tmp, "disk.img")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vblk",
            "serve",
            img,
            "--socket",
            sock,
            "--num-queues",
            "1",
            *(["--aio", args.aio] if args.aio else []),
            "--stage-sample",
            str(rate),
            "--log-level",
            "warning",
        ],
    )
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("vblk serve did not start")
            time.sleep(0.05)
        c0 = cpu_s(server.pid)
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "vblk",
                "bench",
                "--socket",
                sock,
                "--rw",
                args.rw,
                "--iodepth",
                str(args.iodepth),
                "--runtime",
                str(args.runtime),
                "--json",
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=args.runtime + 60,
        )
        c1 = cpu_s(server.pid)
    finally:
        server.terminate()
        server.wait(30)
    r = json.loads(out.stdout)
    return {
        "iops": r["iops"],
        "cpu_us_per_io": (c1 - c0) * 1e6 / r["ios"],
        "p50_us": r["lat_us"]["p50"],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--runtime", type=float, default=4.0)
    p.add_argument("--rates", default="0,32,1")
    p.add_argument("--rw", default="randread")
    p.add_argument("--iodepth", type=int, default=32)
    p.add_argument("--aio", default="", help="vblk serve --aio (default: its own choice)")
    args = p.parse_args()
    rates = [int(x) for x in args.rates.split(",")]
    runs: dict[int, list[dict[str, float]]] = {r: [] for r in rates}
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "disk.img"), "wb") as f:
            f.write(os.urandom(1 << 20) * 64)  # 64 MiB, soon in the page cache
        for rep in range(args.reps):
            order = rates if rep % 2 == 0 else rates[::-1]
            for rate in order:
                r = one_run(tmp, rate, args)
                runs[rate].append(r)
                print(
                    f"rep {rep} sample 1/{rate or 'none'}: {r['iops']:.0f} IOPS, "
                    f"{r['cpu_us_per_io']:.2f} CPU us/IO, p50 {r['p50_us']:.0f} us",
                    flush=True,
                )
    base = statistics.median(x["cpu_us_per_io"] for x in runs[rates[0]])
    base_iops = statistics.median(x["iops"] for x in runs[rates[0]])
    aio = args.aio or "default"
    print(f"medians over {args.reps} runs ({args.rw} 4k QD{args.iodepth}, --aio {aio}):")
    for rate in rates:
        cpu = statistics.median(x["cpu_us_per_io"] for x in runs[rate])
        iops = statistics.median(x["iops"] for x in runs[rate])
        print(
            f"  --stage-sample {rate}: {iops:.0f} IOPS ({(iops / base_iops - 1) * 100:+.1f}%), "
            f"{cpu:.2f} CPU us/IO ({(cpu / base - 1) * 100:+.1f}%)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
