# The first VM against a writable backend (2 vCPUs, num-queues=2). Prints key=value lines.
D=/dev/vda
Q=/sys/block/vda/queue
NCPU=$(grep -c ^processor /proc/cpuinfo)
echo "size=$(cat /sys/block/vda/size) ro=$(cat /sys/block/vda/ro) serial=$(cat /sys/block/vda/serial 2>/dev/null)"
echo "queues=$(ls /sys/block/vda/mq | wc -l) cpus=$NCPU"
for q in /sys/block/vda/mq/*; do echo "cpu_list_q${q##*/}=$(cat $q/cpu_list | tr -d ' ')"; done
echo "discard_max=$(cat $Q/discard_max_bytes) wz_max=$(cat $Q/write_zeroes_max_bytes) wc=$(cat $Q/write_cache | tr ' ' _)"

# Interrupts per request queue, summed over CPUs.
irqs() { awk -v n="$NCPU" -v p="$1" '/virtio[0-9]+-req\./ { s = 0; for (i = 2; i <= n + 1; i++) s += $i; q = $NF; sub(/.*req\./, "", q); print p q "=" s }' /proc/interrupts; }
irqs irq_before_q

# fio: random writes of 512 B..64 KiB at depth 16, crc32c-verified; one job pinned to each vCPU,
# so each job's requests go down its own CPU's queue.
fio --name=verify --filename=$D --rw=randwrite --bsrange=512-64k --iodepth=16 --ioengine=libaio \
    --direct=1 --size=32M --offset=16M --verify=crc32c --verify_fatal=1 --do_verify=1 \
    --numjobs=2 --offset_increment=32M --cpus_allowed=0-1 --cpus_allowed_policy=split \
    --group_reporting > /tmp/fio.out 2>&1 && echo fio_verify=ok || { echo fio_verify=FAIL; tail -20 /tmp/fio.out; }
echo "fio_errors=$(grep -o 'err= *[0-9]*' /tmp/fio.out | tr -d ' ' | sort -u | tr '\n' ,)"
echo "fio_verify_errors=$(grep -ci 'verify.*fail\|bad magic\|crc32c.*wanted' /tmp/fio.out)"
irqs irq_after_q

# ext4: make, fill, remount, compare, fsck.
mkfs.ext4 -q -F -E nodiscard $D >/tmp/mkfs.out 2>&1 && echo mkfs=ok || { echo mkfs=FAIL; cat /tmp/mkfs.out; }
mount -t ext4 $D /mnt && echo mount=ok || echo mount=FAIL
i=0; while [ $i -lt 24 ]; do dd if=/dev/urandom of=/mnt/f$i bs=64k count=$((i % 7 + 1)) 2>/dev/null; i=$((i+1)); done
mkdir -p /mnt/d/e; echo hello > /mnt/d/e/small
(cd /mnt && md5sum f* d/e/small) > /tmp/sum1; sync
umount /mnt && mount -t ext4 $D /mnt && (cd /mnt && md5sum f* d/e/small) > /tmp/sum2; umount /mnt
echo "files_count=$(wc -l < /tmp/sum2) files_md5=$(md5sum < /tmp/sum2 | cut -c1-32)"
cmp -s /tmp/sum1 /tmp/sum2 && echo files=ok || echo files=FAIL
e2fsck -f -n $D > /tmp/fsck.out 2>&1 && echo fsck=clean || { echo fsck=FAIL; tail -5 /tmp/fsck.out; }

# Write-zeroes (blkdiscard -z) and discard over random data must read back as zeroes.
Z=$(dd if=/dev/zero bs=1M count=4 2>/dev/null | md5sum | cut -c1-32)
dd if=/dev/urandom of=$D bs=1M count=4 seek=200 oflag=direct 2>/dev/null
echo "wz_before_zero=$([ "$(dd if=$D bs=1M count=4 skip=200 iflag=direct 2>/dev/null | md5sum | cut -c1-32)" = "$Z" ] && echo yes || echo no)"
/usr/sbin/blkdiscard -f -z -o $((200 << 20)) -l $((4 << 20)) $D && echo wz_cmd=ok || echo wz_cmd=FAIL
[ "$(dd if=$D bs=1M count=4 skip=200 iflag=direct 2>/dev/null | md5sum | cut -c1-32)" = "$Z" ] && echo write_zeroes=ok || echo write_zeroes=FAIL
dd if=/dev/urandom of=$D bs=1M count=4 seek=220 oflag=direct 2>/dev/null
echo "discard_before_zero=$([ "$(dd if=$D bs=1M count=4 skip=220 iflag=direct 2>/dev/null | md5sum | cut -c1-32)" = "$Z" ] && echo yes || echo no)"
/usr/sbin/blkdiscard -f -o $((220 << 20)) -l $((4 << 20)) $D && echo discard_cmd=ok || echo discard_cmd=FAIL
[ "$(dd if=$D bs=1M count=4 skip=220 iflag=direct 2>/dev/null | md5sum | cut -c1-32)" = "$Z" ] && echo discard=ok || echo discard=FAIL

# A 2 MiB random pattern at 240 MiB that the host checks in the image after this VM is gone,
# and the next VM reads back through the same, still-running backend.
dd if=/dev/urandom of=/tmp/pat bs=1M count=2 2>/dev/null
dd if=/tmp/pat of=$D bs=1M seek=240 oflag=direct conv=fsync 2>/dev/null && echo pattern_write=ok || echo pattern_write=FAIL
echo "pattern_md5=$(md5sum < /tmp/pat | cut -c1-32)"
