"""A real Linux guest under QEMU (TCG) drives the backend with its own virtio-blk driver.

Boots are expensive (~5-15 s of TCG each), so one boot runs several checks and
each test asserts its own part of what the guest printed (``key=value`` lines).
The backend is ``vblk serve``, or qemu-storage-daemon with ``VBLK_E2E_BACKEND=qsd``.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import guest as guest_tool
import pytest
from e2e_backend import KIND, Backend, Boot, StartBackend, vblk_only, workload

pytestmark = pytest.mark.e2e

SERIAL = "vblk-e2e-0001"
SIZE = 1 << 30
PATTERN_OFFSET = 240 << 20
PATTERN_SIZE = 2 << 20


@dataclass
class RwRun:
    backend: Backend
    first: guest_tool.GuestResult
    second: guest_tool.GuestResult
    rc: int  # the backend's exit status on SIGINT
    socket_left: bool


@pytest.fixture(scope="module")
def rw(start_backend: StartBackend, boot: Boot) -> RwRun:
    """Two VMs in turn (2 vCPUs, num-queues=2) against one backend, which is then stopped."""
    options: dict[str, object] = {"num_queues": 2}
    if KIND == "vblk":
        options["serial"] = SERIAL
    backend = start_backend("rw", size=SIZE, **options)
    first = boot(backend, workload("rw.sh"), num_queues=2, smp=2)
    second = boot(backend, workload("reconnect.sh"), num_queues=2, smp=2)
    rc = backend.stop()
    return RwRun(backend, first, second, rc, backend.socket.exists())


def _values(run: guest_tool.GuestResult) -> dict[str, str]:
    return guest_tool.parse_values(run.output)


def test_first_vm_ran_its_workload(rw: RwRun) -> None:
    assert rw.first.rc == 0, rw.first.output


def test_guest_sees_the_disk(rw: RwRun) -> None:
    v = _values(rw.first)
    assert v["size"] == str(SIZE // 512)
    assert v["ro"] == "0"
    if KIND == "vblk":
        assert v["wc"] == "write_back"  # vblk serve offers VIRTIO_BLK_F_FLUSH; qsd's export doesn't
    assert int(v["discard_max"]) > 0, "no VIRTIO_BLK_F_DISCARD"
    assert int(v["wz_max"]) > 0, "no VIRTIO_BLK_F_WRITE_ZEROES"


def test_fio_random_write_verify(rw: RwRun) -> None:
    v = _values(rw.first)
    assert v.get("fio_verify") == "ok", rw.first.output
    assert v.get("fio_errors") == "err=0,", rw.first.output
    assert v.get("fio_verify_errors") == "0", rw.first.output


def test_ext4_mkfs_write_remount_fsck(rw: RwRun) -> None:
    v = _values(rw.first)
    got = [v.get(k) for k in ("mkfs", "mount", "files", "fsck")]
    assert got == ["ok", "ok", "ok", "clean"], rw.first.output
    assert v["files_count"] == "25"


def test_write_zeroes_reads_back_zero(rw: RwRun) -> None:
    v = _values(rw.first)
    assert v.get("wz_before_zero") == "no"  # the range really held random data first
    assert (v.get("wz_cmd"), v.get("write_zeroes")) == ("ok", "ok"), rw.first.output


def test_discard_reads_back_zero(rw: RwRun) -> None:
    v = _values(rw.first)
    assert v.get("discard_before_zero") == "no"
    assert (v.get("discard_cmd"), v.get("discard")) == ("ok", "ok"), rw.first.output


@vblk_only
def test_serial(rw: RwRun) -> None:
    assert _values(rw.first)["serial"] == SERIAL


def test_two_queues_one_per_vcpu_both_used(rw: RwRun) -> None:
    v = _values(rw.first)
    assert (v["queues"], v["cpus"]) == ("2", "2")
    assert (v["cpu_list_q0"], v["cpu_list_q1"]) == ("0", "1")
    # fio ran one job pinned to each vCPU: each queue's interrupts grew a lot.
    for q in (0, 1):
        grew = int(v[f"irq_after_q{q}"]) - int(v[f"irq_before_q{q}"])
        assert grew > 100, f"queue {q}: {grew} interrupts during fio\n{rw.first.output}"
    if KIND == "vblk":
        # vblk serve also logs each queue's request count when the ring stops.
        counts: dict[int, int] = {}
        for q, n in re.findall(r"queue (\d+): (\d+) requests", rw.backend.log):
            counts[int(q)] = max(counts.get(int(q), 0), int(n))
        assert counts.get(0, 0) > 100 and counts.get(1, 0) > 100, counts


def test_pattern_lands_in_the_image_at_the_right_offset(rw: RwRun) -> None:
    v = _values(rw.first)
    assert v.get("pattern_write") == "ok", rw.first.output
    with open(rw.backend.image, "rb") as f:
        f.seek(PATTERN_OFFSET)
        host = hashlib.md5(f.read(PATTERN_SIZE)).hexdigest()
    assert host == v["pattern_md5"]


def test_backend_listens_again_for_a_second_vm(rw: RwRun) -> None:
    first, second = _values(rw.first), _values(rw.second)
    assert rw.second.rc == 0, rw.second.output
    assert second["queues"] == "2"
    assert second["pattern_md5"] == first["pattern_md5"]
    assert second["files_md5"] == first["files_md5"]
    assert second["fsck"] == "clean", rw.second.output


def test_sigint_exits_zero_and_removes_the_socket(rw: RwRun) -> None:
    assert rw.rc == 0, rw.backend.log[-3000:]
    assert not rw.socket_left
    assert "Traceback" not in rw.backend.log


@vblk_only
def test_read_only(start_backend: StartBackend, boot: Boot) -> None:
    head = bytes(range(256)) * 256  # 64 KiB the guest must read back
    ro = start_backend("ro", size=64 << 20, head=head, read_only=True, num_queues=1)
    before = hashlib.md5(ro.image.read_bytes()).hexdigest()
    res = boot(ro, workload("ro.sh"))
    assert ro.stop() == 0, ro.log[-3000:]
    assert not ro.socket.exists()
    v = _values(res)
    assert v["ro"] == "1"
    assert v["size"] == str((64 << 20) // 512)
    assert v["write"] == "failed", res.output
    assert v["head_md5"] == hashlib.md5(head).hexdigest()
    assert hashlib.md5(ro.image.read_bytes()).hexdigest() == before


def test_guest_driver_reset_keeps_data_and_service(start_backend: StartBackend, boot: Boot) -> None:
    backend = start_backend("reset", size=256 << 20, num_queues=2)
    res = boot(backend, workload("reset.sh"), num_queues=2, smp=2)
    assert backend.stop() == 0, backend.log[-3000:]
    v = _values(res)
    assert (v.get("rmmod"), v.get("insmod")) == ("ok", "ok"), res.output
    assert v["after_md5"] == v["before_md5"]
    assert v.get("fio_after_reset") == "ok", res.output


@vblk_only
def test_direct_io_uring(start_backend: StartBackend, boot: Boot) -> None:
    backend = start_backend("direct", size=SIZE, num_queues=2, extra=("--direct",))
    res = boot(backend, workload("direct.sh"), num_queues=2, smp=2)
    assert backend.stop() == 0, backend.log[-3000:]
    assert re.search(r"--aio (io_uring|threads)\b", backend.log), backend.log[-3000:]
    v = _values(res)
    assert v.get("fio_verify") == "ok", res.output
    with open(backend.image, "rb") as f:
        f.seek(PATTERN_OFFSET)
        assert hashlib.md5(f.read(PATTERN_SIZE)).hexdigest() == v["pattern_md5"]
