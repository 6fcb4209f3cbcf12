# One compatibility-matrix case: what the guest sees of /dev/vda, then a short fio verify.
# Prints key=value lines. fio runs under a timeout: a chain that never fits the ring hangs it.
B=/sys/block/vda
Q=$B/queue
echo "queues=$(ls $B/mq | wc -l) cpus=$(grep -c ^processor /proc/cpuinfo)"
echo "nr_tags=$(cat $B/mq/0/nr_tags) max_segments=$(cat $Q/max_segments)"
echo "discard_max=$(cat $Q/discard_max_bytes) wz_max=$(cat $Q/write_zeroes_max_bytes)"
echo "cache_type=$(cat $B/cache_type 2>/dev/null | tr ' ' _)"
# CONFIG_WCE: the guest may switch the cache to write through (then writes are synchronous).
if echo "write through" > $B/cache_type 2>/dev/null; then echo cache_switch=ok; else echo cache_switch=no; fi
echo "cache_type_after=$(cat $B/cache_type 2>/dev/null | tr ' ' _)"
# Large blocks from fresh buffers: each 1 MiB bio has up to max_segments segments, the longest
# chains the driver builds. Then mixed small random writes on every vCPU's queue.
timeout -s KILL 60 fio --name=big --filename=/dev/vda --rw=write --bs=1M --size=8M --iodepth=4 \
    --ioengine=libaio --direct=1 --verify=crc32c --verify_fatal=1 --do_verify=1 \
    > /tmp/fio1.out 2>&1 && echo fio_big=ok || { echo fio_big=FAIL; tail -5 /tmp/fio1.out; }
timeout -s KILL 60 fio --name=small --filename=/dev/vda --rw=randwrite --bsrange=512-64k \
    --iodepth=16 --ioengine=libaio --direct=1 --size=4M --offset=16M --offset_increment=4M \
    --numjobs=2 --cpus_allowed=0-1 --cpus_allowed_policy=split --verify=crc32c --verify_fatal=1 \
    --do_verify=1 > /tmp/fio2.out 2>&1 && echo fio_small=ok || { echo fio_small=FAIL; tail -5 /tmp/fio2.out; }
echo "dmesg_errors=$(dmesg | grep -ci 'i/o error\|blk_update_request\|virtio.*error')"
