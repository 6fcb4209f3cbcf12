# A VM against a read-only backend: the disk says ro, reads work, a direct write fails.
echo "ro=$(cat /sys/block/vda/ro) size=$(cat /sys/block/vda/size)"
echo "head_md5=$(dd if=/dev/vda bs=64k count=1 iflag=direct 2>/dev/null | md5sum | cut -c1-32)"
if dd if=/dev/zero of=/dev/vda bs=4k count=1 oflag=direct 2>/tmp/dd.err; then echo write=succeeded; else echo write=failed; fi
echo "write_error=$(tr ' ' _ < /tmp/dd.err | head -1)"
