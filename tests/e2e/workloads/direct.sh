# vblk serve --direct (O_DIRECT image, io_uring engine): verified random I/O of mixed sizes.
fio --name=direct --filename=/dev/vda --rw=randrw --bsrange=512-128k --iodepth=32 --ioengine=libaio \
    --direct=1 --size=64M --numjobs=2 --offset_increment=64M --cpus_allowed=0-1 --cpus_allowed_policy=split \
    --verify=crc32c --verify_fatal=1 --do_verify=1 > /tmp/fio.out 2>&1 && echo fio_verify=ok || { echo fio_verify=FAIL; tail -10 /tmp/fio.out; }
dd if=/dev/urandom of=/tmp/pat bs=1M count=2 2>/dev/null
dd if=/tmp/pat of=/dev/vda bs=1M seek=240 oflag=direct conv=fsync 2>/dev/null
echo "pattern_md5=$(md5sum < /tmp/pat | cut -c1-32)"
