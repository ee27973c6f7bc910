#!/bin/bash
# Concurrency stress of the volume data path with real clients: four fio jobs (ioengine=nbd)
# hammer overlapping ranges of one volume with reads, aligned and 512-byte-aligned writes
# (read-modify-write), trims and write-zeroes, while the control API snapshots, clones,
# rolls back and deletes under them. Nothing here checks data (the writes race by design):
# it checks that the daemon never panics or trips an engine assertion, that every client
# request gets an answer, and that reference counts and free space are exact afterwards, online
# (bdev_lvol_check) and offline (`pool check`). Then a verify pass proves the volume still
# stores data exactly.
. "$(dirname "$0")/../lib.sh"
MiB=1048576
POOL=$TEST_TMP/pool.img
new_data_dir() { DATA_DIR=$(mktemp -d "$TEST_TMP/data.XXXX"); export DATA_DIR; }
check "pool create (512 MiB)" "$(ballast_bin)" pool create "$POOL" --size 512M
start_ballast --pool "$POOL" || finish
check "volume create s 64M" ballast_ctl volume create s 64M

fio_job() { # fio_job NAME extra args...
    local name=$1; shift
    timeout 120 fio --name="$name" --ioengine=nbd --uri="$NBD_URI/s" --size=16M --offset=0 \
        --time_based --runtime=12 --iodepth=16 --output-format=terse "$@" >"$TEST_TMP/$name.out" 2>&1
}
fio_job rw4k --rw=randrw --bs=4k &
p1=$!
fio_job rmw --rw=randwrite --bsrange=512-12k --blockalign=512 &
p2=$!
fio_job trim --rw=randtrim --bs=8k --iodepth=4 &
p3=$!
fio_job big --rw=randrw --bs=128k --iodepth=4 &
p4=$!
ops=0 bad=0
end=$((SECONDS + 10))
i=0
while ((SECONDS < end)); do
    i=$((i + 1))
    ballast_ctl snapshot create s "s$i" >>"$TEST_TMP/ctl.log" 2>&1 || bad=$((bad + 1))
    ((i % 2)) && { ballast_ctl clone create "s$i" "c$i" >>"$TEST_TMP/ctl.log" 2>&1 || bad=$((bad + 1)); }
    ((i % 3 == 0)) && { ballast_ctl volume rollback s "s$((i - 1))" >>"$TEST_TMP/ctl.log" 2>&1 || bad=$((bad + 1)); }
    ((i > 2)) && { ballast_ctl volume delete "s$((i - 2))" >>"$TEST_TMP/ctl.log" 2>&1 || bad=$((bad + 1)); }
    ((i > 3 && i % 2 == 0)) && { ballast_ctl volume delete "c$((i - 3))" >>"$TEST_TMP/ctl.log" 2>&1 || bad=$((bad + 1)); }
    ops=$((ops + 1))
    sleep 0.2
done
rc=0
for p in $p1 $p2 $p3 $p4; do wait "$p" || rc=$?; done
check_eq "four fio jobs (randrw 4k, 512-byte-aligned RMW writes, trims, 128k) finish without I/O errors" 0 "$rc"
[[ $rc == 0 ]] || tail -n 3 "$TEST_TMP"/*.out
check_eq "control operations during the load all succeed ($ops rounds)" 0 "$bad"
[[ $bad == 0 ]] || grep -i -m5 "error\|ballast:" "$TEST_TMP/ctl.log"
out=$(ballast_ctl rpc bdev_lvol_check '{}' 2>&1)
if grep -q '"ok": true' <<<"$out"; then pass "online check: refcounts exact, nothing leaked"
else fail "online check" "$(tr '\n' ' ' <<<"$out" | head -c 400)"; fi
check "a verify pass over the hammered volume (4k-64k writes, crc32c)" timeout 120 fio --name=verify \
    --ioengine=nbd --uri="$NBD_URI/s" --rw=randwrite --bsrange=4k-64k --size=16M --iodepth=8 \
    --verify=crc32c --verify_fatal=1 --output-format=terse
# Thousands of flush commits fill the journal ring: checkpoints are written by the helper
# thread while writes go on; then kill -9, and every flushed write must verify (fio flushes
# after each write but the last: --end_fsync covers that one).
check "volume create j 32M" ballast_ctl volume create j 32M
check "fio: 5000 4k writes, each followed by a flush (fills the journal, forces checkpoints)" \
    timeout 300 fio --name=sync --ioengine=nbd --uri="$NBD_URI/j" --rw=randwrite --bs=4k \
    --size=32M --number_ios=5000 --iodepth=1 --fsync=1 --end_fsync=1 --verify=crc32c --do_verify=0 \
    --verify_state_save=0 --output-format=terse
n=$(grep -c "checkpoint written" "$BALLAST_LOG")
check "a checkpoint was written during the run ($n)" test "$n" -ge 1
check "flush after fio" timeout 60 nbdsh -u "$NBD_URI/j" -c "h.flush()"
kill -KILL "$PID"; wait "$PID" 2>/dev/null
start_ballast --pool "$POOL" || finish
check "after kill -9: every write of the fsync'd run verifies" timeout 300 fio --name=sync \
    --ioengine=nbd --uri="$NBD_URI/j" --rw=randwrite --bs=4k --size=32M --number_ios=5000 \
    --iodepth=1 --verify=crc32c --verify_only --verify_state_save=0 --output-format=terse
stop_ballast
check "pool check after the stress: exact" "$(ballast_bin)" pool check "$POOL"
if grep -E "panicked|assertion" "$BALLAST_LOG" >/dev/null; then
    fail "no panic or assertion in the log" "$(grep -m3 -E 'panicked|assertion' "$BALLAST_LOG")"
else
    pass "no panic or assertion in the log"
fi
finish
