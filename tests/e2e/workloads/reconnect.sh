# The second VM, against the same still-running backend: what the first one wrote is there.
echo "queues=$(ls /sys/block/vda/mq | wc -l)"
echo "pattern_md5=$(dd if=/dev/vda bs=1M count=2 skip=240 iflag=direct 2>/dev/null | md5sum | cut -c1-32)"
e2fsck -f -n /dev/vda > /tmp/fsck.out 2>&1 && echo fsck=clean || { echo fsck=FAIL; tail -5 /tmp/fsck.out; }
mount -t ext4 -o ro /dev/vda /mnt && (cd /mnt && md5sum f* d/e/small) | md5sum | cut -c1-32 | sed 's/^/files_md5=/'
umount /mnt 2>/dev/null || true
