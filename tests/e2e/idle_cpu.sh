#!/bin/bash
# An idle appliance burns ~0% CPU: the daemon on two cores with its default volume and an open
# but idle NBD connection must use less than 1% of a CPU over 10 s, and still serve afterwards;
# and after a queue-depth-1 stream (which the polling policy serves spinning) stops, the cores
# go back to sleep at once: under 0.5% of a CPU over the next 10 s; after a polling NVMe/TCP
# initiator's QD1 stream, at most 0.1% of a core over the next 30 s.
. "$(dirname "$0")/../lib.sh"
start_ballast --cores 2 || finish
# The daemon's CPU time in nanoseconds, from its threads' schedstat: exact, where the 10 ms
# ticks of /proc/PID/stat charge a whole tick to a thread that ran a few µs when one fell (and
# nothing to one that slipped between them). A thread that ends within a window is not counted.
run_ns() { cat /proc/"$PID"/task/*/schedstat | awk '{ s += $1 } END { printf "%.0f", s }'; }
seconds_since() { awk -v n="$(($(run_ns) - $1))" 'BEGIN { printf "%.6f", n / 1e9 }'; }
# cpu_while CMD...: the daemon's CPU seconds while CMD runs
cpu_while() {
    local t0
    t0=$(run_ns)
    "$@"
    seconds_since "$t0"
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

# Issue 12's bar: a polling NVMe/TCP initiator at QD1 for 3 s — a request every ~10 µs, which
# the polling policy serves spinning — then 30 s of nothing: at most 0.1% of a core.
PERF_BIN=$(ballast_perf_bin)
NVMF_ADDR=$(nvmf_addr)
if [[ -x $PERF_BIN && -n $NVMF_ADDR ]]; then
    polled_qd1() {
        "$PERF_BIN" --addr "$NVMF_ADDR" --nqn nqn.2026-11.dev.ballast:vol0 --rw randread \
            --qd 1 --size 64m --runtime 3 --poll >"$TEST_TMP/qd1-poll.out" 2>&1
    }
    busy=$(cpu_while polled_qd1)
    echo "CPU used by the daemon during 3 s of polled NVMe/TCP QD1: ${busy} s"
    echo "  $(grep -m1 'read:' "$TEST_TMP/qd1-poll.out")"
    check "the polled QD1 stream ran" grep -q 'read: IOPS=[1-9]' "$TEST_TMP/qd1-poll.out"
    check "the core spun while it ran (daemon CPU ${busy} s of 3 s)" \
        awk -v u="$busy" 'BEGIN { exit !(u > 1.0) }'
    sleep 0.2
    used=$(cpu_while sleep 30)
    echo "CPU used over 30 s idle after the polled QD1 stream: ${used} s"
    check "after a polled QD1 stream: <= 0.1% of a core over 30 s (used ${used} s)" \
        awk -v u="$used" 'BEGIN { exit !(u <= 0.03) }'
else
    echo "SKIP: no ballast-perf ($PERF_BIN) or no NVMe/TCP listener: no polled QD1 phase"
fi
stop_ballast
finish
