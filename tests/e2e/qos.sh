#!/bin/bash
# Rate limits per export (SPDK's bdev_set_qos_limit), set with SPDK's own client (spdk-rpc)
# and measured with fio (ioengine=nbd: libnbd) and, over NVMe/TCP, ballast-perf:
#   1  a limit set and read back (bdev_get_bdevs' assigned_rate_limits), and with `ballast
#      export limit`; SPDK's refusals:
#      not a multiple of 1000 (-32602, the limit kept), no limit given (-22), no such bdev (-19)
#   2  export a limited to 2000 I/Os per second runs at its limit while export b, read by the
#      same fio at the same time, runs free (>= 10x); over NVMe/TCP too
#   3  a read bandwidth limit (8 MiB/s) holds for 128 KiB reads while writes to the same
#      export beside them are not charged by it; then a write limit (4 MiB/s) holds
#   4  every limit lifted, while reads wait for their slots (seconds of it): they go at once,
#      and the export runs free again
#   5  a stop while I/O waits for its slot (seconds of it) exits 0 at once (what waits goes)
#   6  a volume's limit is kept in its pool: back after a restart (and held), gone with the
#      volume (a new volume of that name starts without it)
set -u -o pipefail
. "$(dirname "$0")/../lib.sh"

T=$TEST_TMP
need_spdk_rpc
if ! command -v fio >/dev/null; then
    fail "fio installed"
    finish
fi
METRICS_PORT=$(free_port)
start_ballast --cores 2 --export a=ram:256M --export b=ram:256M \
    --metrics-listen "127.0.0.1:$METRICS_PORT" || finish
# metric NAME EXPORT: the sample of NAME{export="EXPORT"} on /metrics
metric() {
    "$SYS_PY" -c 'import sys, urllib.request
t = urllib.request.urlopen("http://127.0.0.1:%s/metrics" % sys.argv[1], timeout=10).read().decode()
want = "%s{export=\"%s\"} " % (sys.argv[2], sys.argv[3])
print(next((l.split()[-1] for l in t.splitlines() if l.startswith(want)), "absent"))' \
        "$METRICS_PORT" "$1" "$2"
}

limits() { # limits BDEV: its assigned_rate_limits, "IOS RW R W"
    rpc bdev_get_bdevs -b "$1" | py '" ".join(str(j[0]["assigned_rate_limits"][k]) for k in
        ["rw_ios_per_sec", "rw_mbytes_per_sec", "r_mbytes_per_sec", "w_mbytes_per_sec"])'
}

# fio_jobs SECONDS JOB... (JOB: NAME:EXPORT:RW:BS:QD): the jobs at once, one connection each;
# prints "NAME IOPS KIB_PER_S" per job.
fio_jobs() {
    local secs=$1 job name export rw bs qd
    shift
    {
        printf '[global]\nioengine=nbd\ntime_based=1\nruntime=%s\nsize=256m\n' "$secs"
        for job in "$@"; do
            IFS=: read -r name export rw bs qd <<<"$job"
            printf '[%s]\nuri=%s/%s\nrw=%s\nbs=%s\niodepth=%s\n' "$name" "$NBD_URI" "$export" \
                "$rw" "$bs" "$qd"
        done
    } >"$T/jobs.fio"
    timeout $((secs + 60)) fio --output-format=json --output="$T/fio.json" "$T/jobs.fio" \
        >"$T/fio.out" 2>&1 || { tail -5 "$T/fio.out" >&2; return 1; }
    py '"\n".join("%s %d %d" % (x["jobname"], x["read"]["iops"] + x["write"]["iops"],
        x["read"]["bw"] + x["write"]["bw"]) for x in j["jobs"])' <"$T/fio.json"
}
# reads_in_background NAME FIO-ARGS...: 1 MiB reads of a, 16 in flight, in the background
# (PID in $BG, output in $T/NAME.out).
reads_in_background() {
    local name=$1
    shift
    fio --name="$name" --ioengine=nbd --uri="$NBD_URI/a" --bs=1m --iodepth=16 "$@" \
        >"$T/$name.out" 2>&1 &
    BG=$!
}
field() { awk -v n="$1" -v f="$2" '$1 == n { print $f }' "$T/rates"; }
# within X LO HI: LO <= X <= HI
within() { (($1 >= $2 && $1 <= $3)); }
# limited_rates NAME COL LOW SECONDS JOB...: fio_jobs into $T/rates, measured once more where
# NAME's column COL came out below LOW. A limiter does not give back the slots a stall of the
# client or the server on a shared machine took (nor should it: a tenant gets no burst for
# our hiccup), so one short run can fall under the band; two in a row do not. A rate above
# the band is never measured again: no stall makes a limit let more through.
limited_rates() {
    local name=$1 col=$2 low=$3 v
    shift 3
    fio_jobs "$@" >"$T/rates" || return 1
    v=$(field "$name" "$col")
    if ((${v:-0} < low)); then
        echo "($name: ${v:-?} below $low in one run; measured again)" >&2
        fio_jobs "$@" >"$T/rates" || return 1
    fi
}

echo "## 1: set, read back, refusals"
check "bdev_set_qos_limit a --rw-ios-per-sec 2000" rpc bdev_set_qos_limit a --rw-ios-per-sec 2000
check_eq "bdev_get_bdevs -b a: assigned_rate_limits" "2000 0 0 0" "$(limits a)"
check_eq "b has no limit" "0 0 0 0" "$(limits b)"
check_eq "1500 I/Os per second is refused as SPDK refuses it" \
    "-32602 Failed to configure rate limit: Invalid argument (rw_ios_per_sec 1500 is not a multiple of 1000)" \
    "$(rpc_error bdev_set_qos_limit a --rw-ios-per-sec 1500)"
check_eq "... and a keeps its limit" "2000 0 0 0" "$(limits a)"
check_eq "no limit given: -22" "-22 No rate limits specified" "$(rpc_error bdev_set_qos_limit a)"
check_eq "no such bdev: -19" "-19 No such device" \
    "$(rpc_error bdev_set_qos_limit nosuch --rw-ios-per-sec 1000)"
check "ballast export limit b --iops 3000 --write-mibs 50 (the CLI)" \
    ballast_ctl export limit b --iops 3000 --write-mibs 50
check_eq "... b's limits" "3000 0 0 50" "$(limits b)"
check "ballast export limit b --iops 0 --write-mibs 0" ballast_ctl export limit b --iops 0 --write-mibs 0
check_eq "... b has none again" "0 0 0 0" "$(limits b)"

echo "## 2: an I/O limit beside an export without one"
limited_rates a 2 1800 4 a:a:randread:4k:16 b:b:randread:4k:16 || fail "fio runs a and b"
A=$(field a 2) B=$(field b 2)
check "a runs at its limit: $A I/Os per second (1800..2200)" within "${A:-0}" 1800 2200
check "b, read at the same time, runs free: $B I/Os per second (>= 10x a)" \
    within "${B:-0}" $((10 * ${A:-1})) 100000000
D=$(metric ballast_export_qos_delayed_total a)
check "/metrics counts a's requests held back: $D (most of ~8000)" within "${D:-0}" 4000 1000000000
check_eq "... and none of b's" 0 "$(metric ballast_export_qos_delayed_total b)"
PERF=$(ballast_perf_bin)
NVMF_ADDR=$(nvmf_addr)
if [[ -x $PERF && -n $NVMF_ADDR ]]; then
    for _ in 1 2; do # once more only where it fell under the band (limited_rates says why)
        "$PERF" --addr "$NVMF_ADDR" --nqn nqn.2026-11.dev.ballast:a --rw randread --qd 32 \
            --runtime 3 --json >"$T/perf.json" 2>"$T/perf.err"
        N=$(py 'int(j["jobs"][0]["read"]["iops"])' <"$T/perf.json" 2>/dev/null)
        ((${N:-0} >= 1800)) && break
    done
    check "over NVMe/TCP (ballast-perf, QD32) a runs at its limit too: ${N:-?} I/Os per second" \
        within "${N:-0}" 1800 2200
else
    fail "ballast-perf and an NVMe/TCP listener for the NVMe/TCP check" "$PERF $NVMF_ADDR"
fi

echo "## 3: bandwidth limits"
check "a: I/O limit lifted, reads limited to 8 MiB/s" rpc bdev_set_qos_limit a --rw-ios-per-sec 0 --r-mbytes-per-sec 8
check_eq "assigned_rate_limits" "0 0 8 0" "$(limits a)"
limited_rates r 3 7373 4 r:a:randread:128k:8 w:a:randwrite:128k:8 || fail "fio reads and writes a"
R=$(field r 3) W=$(field w 3)
check "128 KiB reads of a at 8 MiB/s: $R KiB/s (7373..9011)" within "${R:-0}" 7373 9011
check "writes beside them are not charged by the read limit: $W KiB/s (>= 4x)" \
    within "${W:-0}" $((4 * ${R:-1})) 100000000
check "a: writes limited to 4 MiB/s (the read limit kept)" rpc bdev_set_qos_limit a --w-mbytes-per-sec 4
check_eq "assigned_rate_limits" "0 0 8 4" "$(limits a)"
limited_rates w 3 3686 4 w:a:randwrite:128k:8 || fail "fio writes a"
W=$(field w 3)
check "128 KiB writes of a at 4 MiB/s: $W KiB/s (3686..4506)" within "${W:-0}" 3686 4506

echo "## 4: limits lifted"
# 16 MiB of reads at 1 MiB/s, all in flight at once: ~15 s of waiting, until the limit goes.
check "a: reads limited to 1 MiB/s" rpc bdev_set_qos_limit a --r-mbytes-per-sec 1
t0=$(date +%s%N)
reads_in_background held --rw=read --size=16m
HELD=$BG
sleep 1
check "every limit of a lifted while 15 s of reads wait" \
    rpc bdev_set_qos_limit a --r-mbytes-per-sec 0 --w-mbytes-per-sec 0
wait "$HELD"
rc=$? ms=$((($(date +%s%N) - t0) / 1000000))
check "the waiting reads went at once: fio done in ${ms} ms (< 4000), exit $rc" \
    within "$((rc == 0 ? ms : 99999))" 0 3999
check_eq "assigned_rate_limits" "0 0 0 0" "$(limits a)"
fio_jobs 3 a:a:randread:4k:16 >"$T/rates" || fail "fio reads a"
A=$(field a 2)
check "a runs free again: $A I/Os per second (>= 10x its old limit)" within "${A:-0}" 20000 100000000

echo "## 5: a stop with I/O waiting for its slot"
# 1 MiB reads at 1 MiB/s, 16 in flight: each waits up to 16 s for its slot.
check "a limited to 1 MiB/s of reads" rpc bdev_set_qos_limit a --r-mbytes-per-sec 1
reads_in_background slow --rw=randread --time_based=1 --runtime=60
FIO=$BG
add_cleanup "kill $FIO"
sleep 2
t0=$(date +%s%N)
stop_ballast
ms=$((($(date +%s%N) - t0) / 1000000))
check "the stop took ${ms} ms (< 5000: delayed I/O is submitted, not waited out)" within "$ms" 0 4999
kill "$FIO" 2>/dev/null
wait "$FIO" 2>/dev/null
check "server log has no panic" bash -c "! grep -q panicked '$BALLAST_LOG'"

echo "## 6: a volume's limits are kept in its pool"
check "a pool" "$(ballast_bin)" pool create "$T/pool.img" --size 256M
start_ballast --cores 2 --pool "$T/pool.img" || finish
check "volume v created" ballast_ctl volume create v 64M
check "bdev_set_qos_limit lvs0/v --rw-ios-per-sec 3000" rpc bdev_set_qos_limit lvs0/v --rw-ios-per-sec 3000
stop_ballast
start_ballast --cores 2 --pool "$T/pool.img" || finish
check_eq "after a restart v keeps its limit" "3000 0 0 0" "$(limits v)"
limited_rates v 2 2700 3 v:v:randread:4k:16 || fail "fio reads v"
V=$(field v 2)
check "... and runs at it: $V I/Os per second (2700..3300)" within "${V:-0}" 2700 3300
check "volume v deleted" ballast_ctl volume delete v
check "a new volume v" ballast_ctl volume create v 64M
check_eq "the new v has no limit (they went with the deleted one)" "0 0 0 0" "$(limits v)"
stop_ballast
check "pool check is exact" "$(ballast_bin)" pool check "$T/pool.img"
finish
