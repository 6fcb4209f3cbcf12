# A disk whose bytes 1M..2M fail on read (examples/faulty.py): the guest gets EIO there only.
D=/dev/vda
dd if=$D of=/dev/null bs=4k count=1 skip=384 iflag=direct 2>/dev/null && echo bad_read=ok || echo bad_read=EIO
dd if=$D of=/dev/null bs=4k count=1 skip=0 iflag=direct 2>/dev/null && echo good_read=ok || echo good_read=FAIL
dd if=/dev/urandom of=/tmp/p bs=64k count=16 2>/dev/null
dd if=/tmp/p of=$D bs=64k seek=64 oflag=direct conv=fsync 2>/dev/null && echo write=ok || echo write=FAIL
[ "$(dd if=$D bs=64k count=16 skip=64 iflag=direct 2>/dev/null | md5sum)" = "$(md5sum < /tmp/p)" ] && echo readback=ok || echo readback=FAIL
dd if=$D of=/dev/null bs=4k count=1 skip=300 iflag=direct 2>/dev/null && echo bad_read_again=ok || echo bad_read_again=EIO
echo "after_md5=$(md5sum < /tmp/p | cut -c1-32)"
