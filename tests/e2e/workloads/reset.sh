# The guest driver resets the device (as on a reboot) while QEMU and the backend stay up:
# every ring is stopped (GET_VRING_BASE) and set up afresh; data and service survive.
dd if=/dev/urandom of=/tmp/pat bs=64k count=4 2>/dev/null
dd if=/tmp/pat of=/dev/vda bs=64k seek=10 oflag=direct 2>/dev/null
echo "before_md5=$(md5sum < /tmp/pat | cut -c1-32)"
rmmod virtio_blk && echo rmmod=ok
insmod /modules/virtio_blk.ko && echo insmod=ok
n=0; while [ ! -e /dev/vda ] && [ $n -lt 40 ]; do sleep 0.25; n=$((n+1)); done
echo "after_md5=$(dd if=/dev/vda bs=64k skip=10 count=4 iflag=direct 2>/dev/null | md5sum | cut -c1-32)"
fio --name=after --filename=/dev/vda --rw=randrw --bs=4k --iodepth=8 --ioengine=libaio --direct=1 \
    --size=16M --offset=32M --verify=crc32c --verify_fatal=1 > /tmp/fio.out 2>&1 && echo fio_after_reset=ok || { echo fio_after_reset=FAIL; tail -5 /tmp/fio.out; }
