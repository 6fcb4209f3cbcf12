#!/usr/bin/env python3
"""`make demo`: serve a disk with vblk and let a real guest run fio on it.

1. creates demo/disk.img (1 GiB, sparse) with ``vblk serve --create 1G``,
2. serves it on demo/vblk.sock with two queues, and a control socket demo/ctl,
3. boots the small test guest (QEMU TCG, 2 vCPUs, vhost-user-blk-pci num-queues=2)
   whose own virtio-blk driver runs fio against /dev/vda: 4k random read/write with
   crc32c verification for 10 s, then 4k random read at queue depth 32,
4. prints fio's result lines, and for the second run the guest's completion latency
   beside the backend's ``backend`` stage (pop to interrupt) over the same requests
   (export-stats before and after it): the difference is the guest driver, the kick
   and the interrupt delivery, and the wait in the ring,
5. stops the server with SIGINT and shows its exit status.

Exit status 0 only when fio succeeded (verification included) and vblk serve exited 0.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))

import guest as guest_tool  # noqa: E402

# Two fio runs; each prints "@@ title" first and "fio_rc=N" last. One job per vCPU
# (pinned), so both virtqueues carry I/O. verify_backlog makes a time-based run verify
# as it goes (without it, fio skips verification when the time runs out).
WORKLOAD = r"""
echo "@@ guest: /dev/vda is $(($(cat /sys/block/vda/size) / 2048)) MiB, $(ls /sys/block/vda/mq | wc -l) queues, $(grep -c ^processor /proc/cpuinfo) vCPUs, serial '$(cat /sys/block/vda/serial 2>/dev/null)'"
echo "@@ fio 1/2: 4k random read+write, 2 jobs x iodepth 16, crc32c verify, 10 s"
fio --filename=/dev/vda --rw=randrw --bs=4k --iodepth=16 --ioengine=libaio --direct=1 --size=64M \
    --runtime=10 --time_based --group_reporting --verify=crc32c --verify_backlog=256 \
    --verify_fatal=1 --eta=never \
    --name=randrw-verify-cpu0 --cpus_allowed=0 --offset=0 \
    --name=randrw-verify-cpu1 --cpus_allowed=1 --offset=64M 2>&1
echo "fio_rc=$?"
echo "@@ fio 2/2: 4k random read, iodepth 32, 5 s"
rc=0
fio --name=randread-qd32 --filename=/dev/vda --rw=randread --bs=4k --iodepth=32 --ioengine=libaio \
    --direct=1 --size=128M --runtime=5 --time_based --eta=never --output-format=json \
    --output=/tmp/f.json || rc=$?
echo "STAGES-END"
echo "FIO-JSON-BEGIN"; cat /tmp/f.json; echo "FIO-JSON-END"
echo "fio_rc=$rc"
"""

# fio's summary lines worth showing (the rest is percentiles and histograms).
RESULT_LINE = re.compile(
    r"^\s*(read|write): IOPS=|^\s*clat \(|^\s*(READ|WRITE): bw=|err=\s*\d+|fio: .*(error|fail|bad)",
    re.I,
)


def show(output: str) -> list[int]:
    """Print the workload's headers and fio's result lines; return each fio's exit status."""
    rcs: list[int] = []
    for line in output.splitlines():
        if line.startswith("@@ "):
            print(f"\n{line[3:]}")
        elif m := re.fullmatch(r"fio_rc=(\d+)", line.strip()):
            rcs.append(int(m.group(1)))
            print(
                f"    fio exit status {rcs[-1]}"
                + (" (verify ok)" if len(rcs) == 1 and rcs[-1] == 0 else "")
            )
        elif RESULT_LINE.search(line):
            print("    " + line.strip())
    return rcs


class StageWatch:
    """export-stats when the second fio starts and when it ends (called from console lines)."""

    def __init__(self, ctl: Path) -> None:
        self.ctl = ctl
        self.snaps: list[Any] = []

    def on_line(self, line: str) -> None:
        if line.startswith("@@ fio 2/2") or line.strip() == "STAGES-END":
            from vblk.stats.rpc import call

            try:
                self.snaps.append(call(str(self.ctl), "export-stats", {"id": "disk"}))
            except Exception as e:  # the comparison is skipped, the demo goes on
                print(f"demo: export-stats failed: {e}", file=sys.stderr)


def _fio_json(output: str) -> Any:
    text = output.split("FIO-JSON-BEGIN", 1)[-1].split("FIO-JSON-END", 1)[0]
    try:
        return json.loads(text[text.index("{") :])
    except ValueError:
        return None


def compare(output: str, watch: StageWatch) -> None:
    """Print the guest's completion latency beside the backend stage of the same requests."""
    from vblk.stats.histogram import delta_snapshot
    from vblk.stats.stages import STAGES

    fio = _fio_json(output)
    if fio is None or len(watch.snaps) != 2:
        print("\n(no guest/backend comparison: fio's JSON or export-stats is missing)")
        return
    clat = fio["jobs"][0]["read"]["clat_ns"]
    pct = clat.get("percentile", {})
    before, after = (s["exports"][0]["total"]["stages"] for s in watch.snaps)
    d = {name: delta_snapshot(before[name], after[name]) for name in STAGES}
    be = d["backend"]
    reqs = fio["jobs"][0]["read"]["total_ios"]

    def us(ns: float) -> str:
        return f"{ns / 1000:8.1f}"

    print("\nthe same requests (fio 2/2) from both ends, in µs:")
    print("                                             mean      p50      p99")
    print(
        f"    guest: fio completion latency (clat) {us(clat['mean'])} "
        f"{us(pct.get('50.000000', 0))} {us(pct.get('99.000000', 0))}   ({reqs} reads)"
    )
    mean_be = be["sum_ns"] / be["count"] if be["count"] else 0
    print(
        f"    vblk:  backend stage (pop→interrupt)  {us(mean_be)} {us(be['p50_ns'])} "
        f"{us(be['p99_ns'])}   ({be['count']} timed, one request in the sample rate)"
    )
    print(
        f"    difference (guest driver, kick, interrupt delivery, wait in the ring) "
        f"{(clat['mean'] - mean_be) / 1000:.1f} µs mean"
    )
    print(
        "    backend stage by stage, mean: "
        + ", ".join(
            f"{n} {d[n]['sum_ns'] / d[n]['count'] / 1000:.1f}"
            for n in STAGES
            if n != "backend" and d[n]["count"]
        )
    )


def main() -> int:
    demo = ROOT / "demo"
    demo.mkdir(exist_ok=True)
    image, sock, log = demo / "disk.img", demo / "vblk.sock", demo / "vblk.log"
    ctl = demo / "ctl"
    if sock.exists() and stat.S_ISSOCK(sock.stat().st_mode):
        sock.unlink()  # left by an earlier run that was killed
    print("building the test guest (cached in ~/.cache/vblk/guest after the first time)...")
    g = guest_tool.build()

    args = ["serve", str(image.relative_to(ROOT)), "--socket", str(sock.relative_to(ROOT))]
    args += ["--create", "1G", "--num-queues", "2", "--serial", "vblk-demo"]
    args += ["--control", str(ctl.relative_to(ROOT))]
    vblk = shutil.which("vblk")
    cmd = [vblk, *args] if vblk else [sys.executable, "-m", "vblk", *args]
    print(f"$ vblk {' '.join(args)}    (log: {log.relative_to(ROOT)})", flush=True)
    res: guest_tool.GuestResult | None = None
    with open(log, "w") as logf:
        server = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stderr=logf)
        try:
            deadline = time.monotonic() + 20
            while not sock.exists():
                if server.poll() is not None or time.monotonic() > deadline:
                    print(log.read_text(), file=sys.stderr)
                    print("demo: vblk serve did not start", file=sys.stderr)
                    return 1
                time.sleep(0.05)
            print("booting a guest against it: QEMU TCG, 2 vCPUs, vhost-user-blk-pci num-queues=2")
            watch = StageWatch(ctl)
            res = guest_tool.run_guest(
                sock,
                WORKLOAD,
                num_queues=2,
                smp=2,
                mem="512M",
                timeout=300,
                guest=g,
                on_line=watch.on_line,
            )
        except guest_tool.GuestError as e:
            print(f"demo: {str(e).splitlines()[0]}", file=sys.stderr)
        finally:
            server.send_signal(signal.SIGINT)
            try:
                rc = server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
                rc = server.wait()
                print("demo: vblk serve ignored SIGINT for 30 s; killed", file=sys.stderr)

    fio_rcs = show(res.output) if res is not None else []
    if res is not None:
        compare(res.output, watch)
    if res is not None:
        print(f"\nguest powered off after {res.wall:.1f} s (workload status {res.rc})")
    print(f"\n$ kill -INT <vblk serve>  ->  vblk serve exited with status {rc}")
    last: dict[str, str] = {}  # each queue's counters from the last guest session
    for line in log.read_text().splitlines():
        if m := re.search(r"(queue (\d+): \d+ requests.*)", line):
            last[m.group(2)] = m.group(1)
    for q in sorted(last):
        print(f"    {last[q]}")
    print(f"    socket removed: {'yes' if not sock.exists() else 'NO'}")
    ok = res is not None and res.rc == 0 and fio_rcs == [0, 0] and rc == 0
    print("\ndemo: OK" if ok else "\ndemo: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
