#!/usr/bin/env python3
"""`make ceph-demo`: a guest's disk served from Ceph RBD by ``vblk serve rbd:...``.

1. starts a throwaway single-node Ceph (1 mon, 1 mgr, 1 memstore OSD) in a
   temporary directory on a free loopback port (tests/ceph_cluster.py),
2. creates a fresh 1 GiB RBD image ``rbd/demo``,
3. runs ``vblk serve rbd:rbd/demo --opt conf=CEPH.CONF`` with two queues,
4. boots the test guest, which runs the same fio jobs as ``make demo``
   (4k random read+write with crc32c verify, then 4k random read at depth 32),
5. stops vblk serve (SIGINT), reads the image's usage back from the cluster
   (``rbd du``) and stops the cluster's daemons by their PIDs.

Exit status 0 only when fio succeeded (verification included) and vblk serve exited 0.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))

import ceph_cluster  # noqa: E402
import guest as guest_tool  # noqa: E402
from demo import WORKLOAD, show  # noqa: E402


def main() -> int:
    demo = ROOT / "demo"
    demo.mkdir(exist_ok=True)
    sock, log = demo / "vblk-rbd.sock", demo / "vblk-rbd.log"
    sock.unlink(missing_ok=True)
    print("building the test guest (cached in ~/.cache/vblk/guest after the first time)...")
    g = guest_tool.build()
    t0 = time.monotonic()
    print("starting a single-node Ceph (1 mon, 1 mgr, 1 memstore OSD)...", flush=True)
    cluster = ceph_cluster.start()
    rc: int | None = None
    fio_rcs: list[int] = []
    res: guest_tool.GuestResult | None = None
    try:
        print(f"    up in {time.monotonic() - t0:.1f} s: conf {cluster.conf}, pool {cluster.pool}")
        spec = cluster.create_image("demo", 1 << 30)
        print(f"$ rbd create {spec} --size 1G")
        args = ["serve", f"rbd:{spec}", "--opt", f"conf={cluster.conf}"]
        args += ["--socket", str(sock.relative_to(ROOT)), "--num-queues", "2"]
        vblk = shutil.which("vblk")
        cmd = [vblk, *args] if vblk else [sys.executable, "-m", "vblk", *args]
        print(f"$ vblk {' '.join(args)}    (log: {log.relative_to(ROOT)})", flush=True)
        with open(log, "w") as logf:
            server = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stderr=logf)
            try:
                deadline = time.monotonic() + 30
                while not sock.exists():
                    if server.poll() is not None or time.monotonic() > deadline:
                        print(log.read_text(), file=sys.stderr)
                        print("ceph-demo: vblk serve did not start", file=sys.stderr)
                        return 1
                    time.sleep(0.05)
                print("booting a guest against it: QEMU TCG, 2 vCPUs, num-queues=2")
                res = guest_tool.run_guest(
                    sock, WORKLOAD, num_queues=2, smp=2, mem="512M", timeout=300, guest=g
                )
            except guest_tool.GuestError as e:
                print(f"ceph-demo: {str(e).splitlines()[0]}", file=sys.stderr)
            finally:
                server.send_signal(signal.SIGINT)
                try:
                    rc = server.wait(30)
                except subprocess.TimeoutExpired:
                    server.kill()
                    rc = server.wait()
        fio_rcs = show(res.output) if res is not None else []
        print(f"\n$ kill -INT <vblk serve>  ->  vblk serve exited with status {rc}")
        print(f"$ rbd du {spec}\n" + cluster.run("rbd", "du", spec).rstrip())
    finally:
        cluster.stop()
        print("ceph cluster stopped")
    ok = res is not None and res.rc == 0 and fio_rcs == [0, 0] and rc == 0
    print("\nceph-demo: OK" if ok else "\nceph-demo: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
