#!/usr/bin/env python3
"""Guest-side throughput of vblk serve against qemu-storage-daemon, in the same run.

Both backends serve copies of one image; the test guest (QEMU TCG, 2 vCPUs,
2 queues) runs the same fio jobs against each, alternating, ``--rounds`` times.
Prints the median of each figure and the vblk/qsd ratio; ``--json`` for tools.
Absolute numbers depend on the machine (TCG is the ceiling here); the ratio is
what to compare across changes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import guest as guest_tool  # noqa: E402

WORKLOAD = r"""
dd if=/dev/urandom of=/dev/vda bs=1M count=128 oflag=direct 2>/dev/null
fio --name=rr --filename=/dev/vda --rw=randread --bs=4k --iodepth=32 --ioengine=libaio --direct=1 --runtime=%(rt)d --time_based --size=128M --output-format=terse --terse-version=3 | awk -F';' '{print "randread4k_iops="$8" randread4k_clat_us="$16}'
fio --name=rw --filename=/dev/vda --rw=randwrite --bs=4k --iodepth=32 --ioengine=libaio --direct=1 --runtime=%(rt)d --time_based --size=128M --output-format=terse --terse-version=3 | awk -F';' '{print "randwrite4k_iops="$49}'
fio --name=sr --filename=/dev/vda --rw=read --bs=1M --iodepth=8 --ioengine=libaio --direct=1 --runtime=%(rt)d --time_based --size=128M --output-format=terse --terse-version=3 | awk -F';' '{print "seqread1m_kbps="$7}'
"""
KEYS = ("randread4k_iops", "randwrite4k_iops", "seqread1m_kbps", "randread4k_clat_us")


def start(cmd: list[str], sock: Path, log: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    deadline = time.monotonic() + 20
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"bench: {cmd[0]} did not start; see {log}")
        time.sleep(0.05)
    return proc


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runtime", type=int, default=8, help="seconds per fio job")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if not shutil.which("qemu-storage-daemon"):
        raise SystemExit(
            "bench: qemu-storage-daemon is missing (apt-get install qemu-system-common)"
        )
    g = guest_tool.build()
    tmp = Path(tempfile.mkdtemp(prefix="vblk-bench-"))
    procs = []
    try:
        for name in ("vblk", "qsd"):
            with open(tmp / f"{name}.img", "wb") as f:
                f.truncate(1 << 30)
        vsock, qsock = tmp / "vblk.sock", tmp / "qsd.sock"
        procs.append(
            start(
                [
                    sys.executable,
                    "-m",
                    "vblk",
                    "serve",
                    str(tmp / "vblk.img"),
                    "--socket",
                    str(vsock),
                    "--num-queues",
                    "2",
                    "--log-level",
                    "warning",
                ],
                vsock,
                tmp / "vblk.log",
            )
        )
        procs.append(start(["qemu-storage-daemon", "--blockdev", f"driver=file,node-name=f0,filename={tmp / 'qsd.img'}",
                            "--blockdev", "driver=raw,node-name=d0,file=f0",
                            "--export", f"type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path={qsock},writable=on,num-queues=2"],
                           qsock, tmp / "qsd.log"))  # fmt: skip
        results: dict[str, list[dict[str, float]]] = {"vblk": [], "qsd": []}
        for r in range(a.rounds):
            for name, sock in (("vblk", vsock), ("qsd", qsock)):
                res = guest_tool.run(
                    WORKLOAD % {"rt": a.runtime},
                    socket=str(sock),
                    num_queues=2,
                    smp=2,
                    guest=g,
                    timeout=60 + 4 * a.runtime,
                )
                vals = {k: float(res.values[k]) for k in KEYS if res.values.get(k)}
                results[name].append(vals)
                print(
                    f"round {r + 1} {name:4}: " + " ".join(f"{k}={v:.0f}" for k, v in vals.items()),
                    file=sys.stderr,
                    flush=True,
                )
        med = {
            n: {k: statistics.median(x[k] for x in rs) for k in KEYS} for n, rs in results.items()
        }
        ratio = {k: med["vblk"][k] / med["qsd"][k] for k in KEYS if med["qsd"][k]}
        if a.json:
            print(
                json.dumps(
                    {"median": med, "ratio_vblk_over_qsd": ratio, "rounds": results}, indent=2
                )
            )
        else:
            print(f"{'median of ' + str(a.rounds):20} {'vblk':>12} {'qsd':>12} {'vblk/qsd':>9}")
            for k in KEYS:
                print(f"{k:20} {med['vblk'][k]:12.0f} {med['qsd'][k]:12.0f} {ratio[k]:9.2f}")
    finally:
        for p in procs:
            p.send_signal(signal.SIGINT)
            p.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
