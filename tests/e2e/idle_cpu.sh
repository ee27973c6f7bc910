#!/bin/bash
# An idle appliance burns ~0% CPU: the daemon on two cores with its default volume and an open
# but idle NBD connection must use less than 1% of a CPU over 10 s, and still serve afterwards.
. "$(dirname "$0")/../lib.sh"
start_ballast --cores 2 || finish
cpu_ticks() { awk '{print $14 + $15}' "/proc/$PID/stat"; }
hz=$(getconf CLK_TCK)

# An idle NBD client holding its connection open.
$SYS_PY -c "
import nbd, time
h = nbd.NBD(); h.connect_uri('$NBD_URI/vol0'); h.pwrite(b'x' * 4096, 0); time.sleep(14)
" & nbd_client=$!
add_cleanup "kill $nbd_client 2>/dev/null"
sleep 2
t0=$(cpu_ticks)
sleep 10
t1=$(cpu_ticks)
used=$(awk -v t="$((t1 - t0))" -v hz="$hz" 'BEGIN { printf "%.3f", t / hz }')
echo "CPU used over 10 s idle: ${used} s"
check "idle daemon uses < 1% CPU over 10 s (used ${used} s)" awk -v u="$used" 'BEGIN { exit !(u < 0.1) }'
check "idle NBD connection still serves" $SYS_PY -c "
import nbd; h = nbd.NBD(); h.connect_uri('$NBD_URI/vol0'); assert h.pread(4096, 0) == b'x' * 4096"
wait $nbd_client 2>/dev/null
stop_ballast
finish
