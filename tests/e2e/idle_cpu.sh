#!/bin/bash
# An idle appliance burns ~0% CPU: the daemon on two cores with its default volume and an open
# but idle NBD connection must use less than 1% of a CPU over 10 s, and still serve afterwards;
# and after a queue-depth-1 stream (which the polling policy serves spinning) stops, the cores
# go back to sleep at once: under 0.5% of a CPU over the next 10 s.
. "$(dirname "$0")/../lib.sh"
start_ballast --cores 2 || finish
cpu_ticks() { awk '{print $14 + $15}' "/proc/$PID/stat"; }
hz=$(getconf CLK_TCK)
# cpu_while CMD...: the daemon's CPU seconds while CMD runs
cpu_while() {
    local t0 t1
    t0=$(cpu_ticks)
    "$@"
    t1=$(cpu_ticks)
    awk -v t="$((t1 - t0))" -v hz="$hz" 'BEGIN { printf "%.3f", t / hz }'
}

# An idle NBD client holding its connection open.
$SYS_PY -c "
import nbd, time
h = nbd.NBD(); h.connect_uri('$NBD_URI/vol0'); h.pwrite(b'x' * 4096, 0); time.sleep(14)
" & nbd_client=$!
add_cleanup "kill $nbd_client 2>/dev/null"
sleep 2
used=$(cpu_while sleep 10)
echo "CPU used over 10 s idle: ${used} s"
check "idle daemon uses < 1% CPU over 10 s (used ${used} s)" awk -v u="$used" 'BEGIN { exit !(u < 0.1) }'
check "idle NBD connection still serves" $SYS_PY -c "
import nbd; h = nbd.NBD(); h.connect_uri('$NBD_URI/vol0'); assert h.pread(4096, 0) == b'x' * 4096"
wait $nbd_client 2>/dev/null

# A QD1 stream for 3 s (the cores spin while it runs), then 10 s of nothing.
if fio --enghelp=nbd >/dev/null 2>&1; then
    busy=$(cpu_while fio --name=qd1 --ioengine=nbd --uri="$NBD_URI/vol0" --rw=randread \
        --bs=4k --iodepth=1 --size=64M --time_based --runtime=3 --output=/dev/null)
    echo "CPU used by the daemon during 3 s of QD1: ${busy} s"
    sleep 0.2
    used=$(cpu_while sleep 10)
    echo "CPU used over 10 s idle after the QD1 stream: ${used} s"
    check "after a QD1 stream the daemon sleeps again: < 0.5% CPU over 10 s (used ${used} s)" \
        awk -v u="$used" 'BEGIN { exit !(u < 0.05) }'
else
    echo "SKIP: fio without the nbd engine: no QD1 phase"
fi
stop_ballast
finish
