"""A guest's disk served from Ceph RBD: ``vblk serve rbd:POOL/IMAGE`` against the test cluster.

Two boots. The first runs the integrity workload (fio verify, ext4, discard,
write-zeroes, a 2 MiB pattern at 240 MiB) and the host then reads the pattern
back from the cluster with ``rbd export``; while it is served, a second
``vblk serve`` on the same image must fail at once on the exclusive lock. The
second boot runs fio verify while the host SIGKILLs ``vblk serve`` with
requests in flight and starts a new one, which waits for the dead one's lock
(``lock_wait``) and resubmits what QEMU's inflight region says was pending.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import guest as guest_tool
import pytest
from ceph_cluster import CephCluster
from e2e_backend import KIND, Backend, Boot, workload
from test_restart import in_flight, region, resubmitted, stopped

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(KIND != "vblk", reason="serves RBD with vblk serve"),
]

SIZE = 512 << 20
PATTERN_OFFSET = 240 << 20
PATTERN_SIZE = 2 << 20
QUEUE_SIZE = 128

VBLK_SERVE = (sys.executable, "-m", "vblk", "serve")
TOPOLOGY = """
Q=/sys/block/vda/queue
echo "opt_io=$(cat $Q/optimal_io_size) discard_gran=$(cat $Q/discard_granularity)"
"""


def serve(ceph: CephCluster, image: str, tmp: Path, log: str, *extra: str) -> Backend:
    """``vblk serve rbd:POOL/IMAGE`` on ``tmp/IMAGE.sock`` with the test cluster's conf."""
    conf = ("--opt", f"conf={ceph.conf}", "--opt", "timeout=20")
    return Backend(
        ceph.conf,  # no image file: the spec names the image
        tmp / f"{image}.sock",
        tmp / f"{log}.log",
        num_queues=2,
        extra=("--queue-size", str(QUEUE_SIZE), *conf, *extra),
        spec=f"rbd:{ceph.pool}/{image}",
    )


@dataclass
class Served:
    backend: Backend
    result: guest_tool.GuestResult
    second_rc: int
    second_err: str
    rc: int


@pytest.fixture(scope="module")
def served(ceph: CephCluster, boot: Boot, tmp_path_factory: pytest.TempPathFactory) -> Served:
    tmp = tmp_path_factory.mktemp("rbd")
    ceph.create_image("e2e-rw", SIZE)
    backend = serve(ceph, "e2e-rw", tmp, "rw")
    try:
        # A second server on the image the first one holds: refused, one line, at once.
        sock = ("--socket", str(tmp / "second.sock"))
        second = subprocess.run(
            [*VBLK_SERVE, f"rbd:{ceph.pool}/e2e-rw", "--opt", f"conf={ceph.conf}", *sock],
            capture_output=True,
            text=True,
            timeout=60,
        )
        result = boot(backend, TOPOLOGY + workload("rw.sh"), num_queues=2, smp=2)
    finally:
        rc = backend.stop()
    return Served(backend, result, second.returncode, second.stderr, rc)


def test_guest_integrity_on_rbd(served: Served) -> None:
    v, out = served.result.values, served.result.output
    assert served.result.rc == 0, out
    assert int(v["size"]) * 512 == SIZE
    assert (v["ro"], v["wc"]) == ("0", "write_back")
    assert v.get("fio_verify") == "ok" and v.get("fio_errors") == "err=0,", out
    assert [v.get(k) for k in ("mkfs", "mount", "files", "fsck")] == ["ok", "ok", "ok", "clean"]
    assert v.get("wz_before_zero") == "no" and v.get("write_zeroes") == "ok", out
    assert v.get("discard_before_zero") == "no" and v.get("discard") == "ok", out


def test_topology_from_the_object_size(served: Served) -> None:
    v = served.result.values
    assert v["opt_io"] == str(4 << 20), served.result.output
    assert v["discard_gran"] == str(4 << 20), served.result.output


def test_pattern_read_back_with_rbd_export(served: Served, ceph: CephCluster) -> None:
    v = served.result.values
    assert v.get("pattern_write") == "ok", served.result.output
    exported = ceph.export("e2e-rw", served.backend.log_path.parent / "e2e-rw.raw")
    with open(exported, "rb") as f:
        f.seek(PATTERN_OFFSET)
        host = hashlib.md5(f.read(PATTERN_SIZE)).hexdigest()
    exported.unlink()
    assert host == v["pattern_md5"]


def test_second_server_on_a_held_image_fails_cleanly(served: Served) -> None:
    assert served.second_rc != 0
    lines = served.second_err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vblk: error: "), served.second_err
    assert "in use" in lines[0] and "exclusive lock" in lines[0], lines[0]


def test_sigint_exits_zero(served: Served) -> None:
    assert served.rc == 0, served.backend.log[-3000:]
    assert "Traceback" not in served.backend.log


def test_sigkill_restart_under_fio_verify(
    ceph: CephCluster, boot: Boot, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One SIGKILL with requests in flight; the next server waits for the lock and resubmits."""
    ceph.create_image("e2e-restart", SIZE)
    gens = [serve(ceph, "e2e-restart", tmp_path, "restart-0", "--opt", "lock_wait=90")]
    out: dict[str, guest_tool.GuestResult] = {}
    errors: list[BaseException] = []
    failed: list[str] = []

    def guest() -> None:
        try:
            out["r"] = boot(
                gens[-1],
                workload("restart.sh").replace("@SECONDS@", "0"),
                num_queues=2,
                smp=2,
                reconnect=1,
                timeout=400,
                alive=lambda: not failed,
            )
        except BaseException as e:  # pytest.fail raises outside Exception
            errors.append(e)

    thread = threading.Thread(target=guest, name="guest")
    thread.start()
    marked: int | None = None
    try:
        used = 0  # requests completed since the guest's driver last reset the queues
        last: list[int] | None = None
        while thread.is_alive() and marked is None:
            time.sleep(0.05)
            parts = region(gens[0].proc.pid, QUEUE_SIZE)
            now = [p.used_idx for p in parts or []]
            steps = [(n - o) & 0xFFFF for n, o in zip(now, last or now, strict=False)]
            last = now
            # A reset (firmware, then the kernel's driver) sets used_idx back: start over.
            used = 0 if any(s > 4 * QUEUE_SIZE for s in steps) else used + sum(steps)
            if sum(steps) == 0 or used < 700:
                continue
            pid = gens[0].proc.pid
            for _ in range(20):  # freeze until some requests are in flight
                os.kill(pid, signal.SIGSTOP)
                deadline = time.monotonic() + 5
                while not stopped(pid) and time.monotonic() < deadline:
                    time.sleep(0.001)
                marked = in_flight(pid, QUEUE_SIZE) or 0
                if marked:
                    break
                os.kill(pid, signal.SIGCONT)
                time.sleep(0.01)
            os.kill(pid, signal.SIGKILL)
            os.kill(pid, signal.SIGCONT)
            gens[0].stop(timeout=30)
            try:
                gens.append(
                    serve(ceph, "e2e-restart", tmp_path, "restart-1", "--opt", "lock_wait=90")
                )
            except RuntimeError as e:
                failed.append(str(e))
    finally:
        thread.join()
        final_rc = gens[-1].stop()
    if errors:
        raise errors[0]
    assert not failed, failed
    result = out["r"]
    v = result.values
    with capsys.disabled():
        print(
            f"\nrbd restart: in flight when killed {marked}, resubmitted {resubmitted(gens[-1].log)}"
        )
    assert marked, "the server was never killed with requests in flight"
    assert result.rc == 0, result.output
    assert v.get("fio_verify") == "ok", result.output
    assert (v.get("fio_failures"), v.get("fio_verify_errors")) == ("0", "0"), result.output
    assert v.get("dmesg_errors") == "0", result.output
    log = gens[-1].log
    assert "inflight region set" in log, log[-3000:]
    assert resubmitted(log) in (marked, marked - 1), (marked, log[-3000:])
    assert final_rc == 0, log[-3000:]
    assert "Traceback" not in log
