"""A real Linux guest under QEMU (TCG) drives ``vblk serve`` with its own virtio-blk driver.

Boots are expensive (~7 s of TCG each), so one boot runs several checks and
each test asserts its own part of what the guest printed.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import guest as guest_tool
import pytest
from conftest import Served, boot

pytestmark = pytest.mark.e2e

SERIAL = "vblk-e2e-0001"
PATTERN_OFFSET = 240 << 20
PATTERN_SIZE = 2 << 20

RW_WORKLOAD = r"""
D=/dev/vda
Q=/sys/block/vda/queue
echo "size=$(cat /sys/block/vda/size) ro=$(cat /sys/block/vda/ro) serial=$(cat /sys/block/vda/serial)"
echo "queues=$(ls /sys/block/vda/mq | wc -l) cpus=$(grep -c ^processor /proc/cpuinfo)"
echo "discard_max=$(cat $Q/discard_max_bytes) wz_max=$(cat $Q/write_zeroes_max_bytes) wc=$(cat $Q/write_cache | tr ' ' _)"

# fio: random writes of mixed sizes at depth 16, crc32c-verified, one job per vCPU.
fio --name=verify --filename=$D --rw=randwrite --bsrange=512-64k --iodepth=16 --ioengine=libaio \
    --direct=1 --size=32M --offset=16M --verify=crc32c --verify_fatal=1 --do_verify=1 \
    --numjobs=2 --offset_increment=32M --cpus_allowed=0-1 --cpus_allowed_policy=split \
    --group_reporting > /tmp/fio.out 2>&1 && echo fio_verify=ok || { echo fio_verify=FAIL; tail -20 /tmp/fio.out; }

# ext4: make, fill, remount, compare, fsck.
mkfs.ext4 -q -F -E nodiscard $D >/tmp/mkfs.out 2>&1 && echo mkfs=ok || { echo mkfs=FAIL; cat /tmp/mkfs.out; }
mount -t ext4 $D /mnt && echo mount=ok
i=0; while [ $i -lt 24 ]; do dd if=/dev/urandom of=/mnt/f$i bs=64k count=$((i % 7 + 1)) 2>/dev/null; i=$((i+1)); done
md5sum /mnt/f* > /tmp/sum1; sync
umount /mnt; mount -t ext4 $D /mnt; md5sum /mnt/f* > /tmp/sum2; umount /mnt
cmp -s /tmp/sum1 /tmp/sum2 && echo files=ok || echo files=FAIL
e2fsck -f -n $D > /tmp/fsck.out 2>&1 && echo fsck=clean || { echo fsck=FAIL; tail -5 /tmp/fsck.out; }

# discard and write-zeroes over random data must read back as zeroes.
Z=$(dd if=/dev/zero bs=1M count=4 2>/dev/null | md5sum | cut -c1-32)
dd if=/dev/urandom of=$D bs=1M count=4 seek=200 oflag=direct 2>/dev/null
/usr/sbin/blkdiscard -f -z -o $((200 << 20)) -l $((4 << 20)) $D 2>/dev/null && echo wz_cmd=ok || echo wz_cmd=FAIL
[ "$(dd if=$D bs=1M count=4 skip=200 iflag=direct 2>/dev/null | md5sum | cut -c1-32)" = "$Z" ] && echo write_zeroes=ok || echo write_zeroes=FAIL
dd if=/dev/urandom of=$D bs=1M count=4 seek=220 oflag=direct 2>/dev/null
/usr/sbin/blkdiscard -f -o $((220 << 20)) -l $((4 << 20)) $D 2>/dev/null && echo discard_cmd=ok || echo discard_cmd=FAIL
[ "$(dd if=$D bs=1M count=4 skip=220 iflag=direct 2>/dev/null | md5sum | cut -c1-32)" = "$Z" ] && echo discard=ok || echo discard=FAIL

# A pattern the host will look for in the image after the VM is gone.
dd if=/dev/urandom of=/tmp/pat bs=1M count=2 2>/dev/null
dd if=/tmp/pat of=$D bs=1M seek=240 oflag=direct conv=fsync 2>/dev/null
echo "pattern_md5=$(md5sum < /tmp/pat | cut -c1-32)"
"""

# The second VM, against the same still-running backend.
REBOOT_WORKLOAD = r"""
echo "pattern_md5=$(dd if=/dev/vda bs=1M count=2 skip=240 iflag=direct 2>/dev/null | md5sum | cut -c1-32)"
e2fsck -f -n /dev/vda > /tmp/fsck.out 2>&1 && echo fsck=clean || { echo fsck=FAIL; tail -5 /tmp/fsck.out; }
"""

RO_WORKLOAD = r"""
echo "ro=$(cat /sys/block/vda/ro) size=$(cat /sys/block/vda/size)"
echo "head_md5=$(dd if=/dev/vda bs=64k count=1 iflag=direct 2>/dev/null | md5sum | cut -c1-32)"
if dd if=/dev/zero of=/dev/vda bs=4k count=1 oflag=direct 2>/dev/null; then echo write=succeeded; else echo write=failed; fi
"""


@dataclass
class RwRun:
    first: guest_tool.GuestResult
    second: guest_tool.GuestResult
    served: Served
    rc: int


@pytest.fixture(scope="module")
def rw(guest: guest_tool.Guest, tmp_module: Path) -> RwRun:
    served = Served(tmp_module, "rw", "--num-queues", "2", "--serial", SERIAL)
    try:
        first = boot(guest, served, RW_WORKLOAD, num_queues=2, smp=2)
        second = boot(guest, served, REBOOT_WORKLOAD, num_queues=2, smp=2)
    finally:
        rc = served.stop()
    return RwRun(first, second, served, rc)


def test_guest_sees_the_disk(rw: RwRun) -> None:
    v = rw.first.values
    assert v["size"] == str((1 << 30) // 512)
    assert v["ro"] == "0"
    assert v["wc"] == "write_back"
    assert int(v["discard_max"]) > 0 and int(v["wz_max"]) > 0


def test_serial(rw: RwRun) -> None:
    assert rw.first.values["serial"] == SERIAL


def test_fio_random_write_verify(rw: RwRun) -> None:
    assert rw.first.values.get("fio_verify") == "ok", rw.first.output


def test_ext4_mkfs_remount_fsck(rw: RwRun) -> None:
    v = rw.first.values
    assert (v.get("mkfs"), v.get("mount"), v.get("files"), v.get("fsck")) == (
        "ok",
        "ok",
        "ok",
        "clean",
    ), rw.first.output


def test_discard_and_write_zeroes_read_back_zero(rw: RwRun) -> None:
    v = rw.first.values
    assert (v.get("wz_cmd"), v.get("write_zeroes")) == ("ok", "ok"), rw.first.output
    assert (v.get("discard_cmd"), v.get("discard")) == ("ok", "ok"), rw.first.output


def test_two_queues_both_used(rw: RwRun) -> None:
    assert rw.first.values["queues"] == "2" and rw.first.values["cpus"] == "2"
    # The backend logs each queue's request count when the ring stops.
    counts: dict[int, int] = {}
    for q, n in re.findall(r"queue (\d+): (\d+) requests", rw.served.log):
        counts[int(q)] = max(counts.get(int(q), 0), int(n))
    assert counts.get(0, 0) > 100 and counts.get(1, 0) > 100, counts


def test_pattern_lands_in_the_image_at_the_right_offset(rw: RwRun) -> None:
    with open(rw.served.image, "rb") as f:
        f.seek(PATTERN_OFFSET)
        host = hashlib.md5(f.read(PATTERN_SIZE)).hexdigest()
    assert host == rw.first.values["pattern_md5"]


def test_backend_listens_again_for_a_second_vm(rw: RwRun) -> None:
    assert rw.second.rc == 0, rw.second.output
    assert rw.second.values["pattern_md5"] == rw.first.values["pattern_md5"]
    assert rw.second.values["fsck"] == "clean"


def test_sigint_exits_zero_and_removes_the_socket(rw: RwRun) -> None:
    assert rw.rc == 0, rw.served.log[-2000:]
    assert not rw.served.socket.exists()
    assert "Traceback" not in rw.served.log


def test_read_only(guest: guest_tool.Guest, tmp_module: Path) -> None:
    content = bytes(range(256)) * 256
    image = tmp_module / "ro.img"
    with open(image, "wb") as f:
        f.write(content)
        f.truncate(64 << 20)
    before = hashlib.md5(image.read_bytes()).hexdigest()
    ro = Served(tmp_module, "ro", "--read-only")  # --create leaves an existing image alone
    try:
        res = boot(guest, ro, RO_WORKLOAD)
    finally:
        assert ro.stop() == 0
    assert res.values["ro"] == "1"
    assert res.values["write"] == "failed"
    assert res.values["head_md5"] == hashlib.md5(content[: 64 << 10]).hexdigest()
    assert hashlib.md5(image.read_bytes()).hexdigest() == before
