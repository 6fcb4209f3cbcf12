#!/usr/bin/env python3
"""`make demo`: serve a disk with vblk and let a real guest run fio on it.

Creates demo/disk.img (1 GiB, sparse), starts `vblk serve` with two queues,
boots the small test guest (QEMU TCG, 2 vCPUs) whose own virtio-blk driver
runs fio against /dev/vda, prints fio's results, then stops the server with
SIGINT and shows it exits cleanly.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import guest as guest_tool  # noqa: E402

WORKLOAD = r"""
echo "guest sees /dev/vda: $(($(cat /sys/block/vda/size) / 2048)) MiB, $(ls /sys/block/vda/mq | wc -l) queues, serial $(cat /sys/block/vda/serial)"
echo "--- fio: 4k random read/write, 2 jobs, depth 16, crc32c verify (10 s)"
fio --name=demo --filename=/dev/vda --rw=randrw --bs=4k --iodepth=16 --ioengine=libaio --direct=1 \
    --size=64M --numjobs=2 --offset_increment=64M --runtime=10 --time_based --group_reporting \
    --verify=crc32c --verify_fatal=1 2>&1 | grep -E "^ *(read|write|lat|clat) *[:(]|IOPS|err=" | grep -v "slat" | head -12
echo "--- fio: 4k random read, depth 32 (8 s)"
fio --name=rr --filename=/dev/vda --rw=randread --bs=4k --iodepth=32 --ioengine=libaio --direct=1 \
    --size=128M --runtime=8 --time_based --output-format=terse --terse-version=3 \
    | awk -F';' '{printf "randread 4k QD32: %d IOPS, mean completion latency %.0f us\n", $8, $16}'
"""


def main() -> int:
    demo = ROOT / "demo"
    demo.mkdir(exist_ok=True)
    image, sock, log = demo / "disk.img", demo / "vblk.sock", demo / "vblk.log"
    print("building the test guest (cached after the first time)...", flush=True)
    g = guest_tool.build()
    cmd = [sys.executable, "-m", "vblk", "serve", str(image), "--socket", str(sock)]
    cmd += ["--create", "1G", "--num-queues", "2", "--serial", "vblk-demo"]
    print("$ vblk " + " ".join(cmd[3:]))
    with open(log, "w") as logf:
        server = subprocess.Popen(cmd, stderr=logf)
        try:
            deadline = time.monotonic() + 20
            while not sock.exists():
                if server.poll() is not None or time.monotonic() > deadline:
                    print(log.read_text(), file=sys.stderr)
                    print("demo: vblk serve did not start", file=sys.stderr)
                    return 1
                time.sleep(0.05)
            print(
                "booting a guest against it (QEMU TCG, 2 vCPUs, vhost-user-blk-pci num-queues=2)..."
            )
            res = guest_tool.run(
                WORKLOAD, socket=str(sock), num_queues=2, smp=2, guest=g, timeout=300
            )
            print(res.output)
            print(f"--- guest exited with status {res.rc} after {res.wall:.1f} s")
        except guest_tool.GuestError as e:
            print(f"demo: {e}", file=sys.stderr)
            res = None
        finally:
            server.send_signal(signal.SIGINT)
            rc = server.wait(30)
    print(f"--- vblk serve stopped on SIGINT with exit status {rc}; its log: {log}")
    for line in log.read_text().splitlines():
        if " queue " in line and "requests" in line:
            print("   ", line.split(": ", 1)[1])
    ok = res is not None and res.rc == 0 and rc == 0
    print("demo: OK" if ok else "demo: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
