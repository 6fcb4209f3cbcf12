# fio randwrite + crc32c verify while the host kills and restarts the backend under us.
# One run, or runs back to back (a fresh seed each) until @SECONDS@ seconds have passed.
D=/dev/vda
END=$(( $(date +%s) + @SECONDS@ ))
runs=0; fails=0; verify_errors=0
while :; do
    fio --name=verify --filename=$D --rw=randwrite --bsrange=4k-64k --iodepth=16 --ioengine=libaio \
        --direct=1 --size=96M --randseed=$((1000 + runs)) --verify=crc32c --verify_fatal=1 \
        --do_verify=1 --numjobs=2 --offset_increment=128M --cpus_allowed=0-1 \
        --cpus_allowed_policy=split --group_reporting > /tmp/fio.out 2>&1 || {
        fails=$((fails + 1)); echo "fio run $runs FAILED:"; tail -20 /tmp/fio.out; }
    verify_errors=$((verify_errors + $(grep -ci 'verify.*fail\|bad magic\|crc32c.*wanted' /tmp/fio.out || true)))
    errs=$(grep -o 'err= *[0-9]*' /tmp/fio.out | tr -d ' ' | sort -u | tr '\n' ,)
    [ "$errs" = "err=0," ] || { fails=$((fails + 1)); echo "fio run $runs: $errs"; }
    runs=$((runs + 1))
    [ "$(date +%s)" -lt "$END" ] || break
done
echo "fio_runs=$runs fio_failures=$fails fio_verify_errors=$verify_errors"
[ "$fails" = 0 ] && echo fio_verify=ok || echo fio_verify=FAIL
# Any I/O error the guest's block layer saw, e.g. "I/O error, dev vda, sector ...".
echo "dmesg_errors=$(dmesg | grep -ci 'error' || true)"
dmesg | grep -i 'error' | tail -5 || true
