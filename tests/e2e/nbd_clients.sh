#!/bin/bash
# End-to-end: standard NBD clients (nbdinfo, nbdcopy, nbdsh, qemu-img, fio) against ballast,
# runtime export control, and persistence of the default vol0 across a SIGTERM restart.
set -u -o pipefail
. "$(dirname "$0")/../lib.sh"

NBDIO="$SYS_PY $REPO_ROOT/tests/nbdio.py"
MiB=$((1024 * 1024))
T=$TEST_TMP

# json_get FILE PYTHON-EXPR: evaluate EXPR with `j` bound to the parsed JSON of FILE.
json_get() {
    "$SYS_PY" -c 'import json,sys; j=json.load(open(sys.argv[1])); print(eval(sys.argv[2]))' "$1" "$2"
}

##############################################################################################
echo "## phase 1: data path with explicit exports"
new_data_dir
start_ballast --export r256=ram:256M \
              --export qimg=file:"$DATA_DIR"/qimg.img:64M \
              --export fio=file:"$DATA_DIR"/fio.img:256M \
              --export mapr=ram:16M \
              --default-export qimg || finish

# --- listing
if timeout 30 nbdinfo --list --json "$NBD_URI" >"$T/list.json" 2>"$T/list.err"; then
    names=$(json_get "$T/list.json" '" ".join(sorted(e["export-name"] for e in j["exports"]))')
    check_eq "nbdinfo --list shows every export" "fio mapr qimg r256" "$names"
else
    fail "nbdinfo --list" "$(cat "$T/list.err")"
fi
out=$(timeout 30 nbdinfo --list "$NBD_URI" 2>&1)
if grep -q 'export="r256"' <<<"$out" && grep -q 'base:allocation' <<<"$out"; then
    pass "nbdinfo --list text shows r256 and base:allocation"
else
    fail "nbdinfo --list text" "$(head -5 <<<"$out" | tr '\n' ' ')"
fi
check_eq "empty export name maps to --default-export (qimg, 64 MiB)" $((64 * MiB)) \
    "$(timeout 30 nbdinfo --size "$NBD_URI" 2>&1)"
check_eq "nbdinfo --size r256" $((256 * MiB)) "$(timeout 30 nbdinfo --size "$NBD_URI/r256" 2>&1)"

# --- map on a fresh RAM export: all hole/zero; after a write: data in the middle
map=$(timeout 30 nbdinfo --map "$NBD_URI/mapr" 2>&1)
if [[ $(awk '{print $1, $2, $3}' <<<"$map") == "0 $((16 * MiB)) 3" ]]; then
    pass "nbdinfo --map on fresh ram export: one hole,zero extent"
else
    fail "nbdinfo --map on fresh ram export" "$(tr '\n' ';' <<<"$map")"
fi
timeout 30 nbdsh -u "$NBD_URI/mapr" -c "h.pwrite(b'\xab' * 65536, $((4 * MiB)))" \
    || fail "nbdsh pwrite on mapr"
map=$(timeout 30 nbdinfo --map "$NBD_URI/mapr" 2>&1)
data_at=$(awk '$3 == 0 && $1 <= 4194304 && $1 + $2 >= 4194304 + 65536 {print "yes"}' <<<"$map")
zero_at0=$(awk '$1 == 0 && int($3 / 2) % 2 == 1 {print "yes"}' <<<"$map")
if [[ $data_at == yes && $zero_at0 == yes ]]; then
    pass "nbdinfo --map after write: zero at 0, data at 4 MiB"
else
    fail "nbdinfo --map after write" "$(tr '\n' ';' <<<"$map")"
fi

# --- nbdcopy round trip, 256 MiB random
rand_file "$T/rand256" 256
if timeout 120 nbdcopy "$T/rand256" "$NBD_URI/r256" 2>"$T/nbdcopy.err"; then
    pass "nbdcopy 256 MiB file -> ballast"
    if timeout 120 nbdcopy "$NBD_URI/r256" "$T/back256" 2>"$T/nbdcopy.err"; then
        check_eq "nbdcopy round trip 256 MiB: sha256 equal" "$(sha "$T/rand256")" "$(sha "$T/back256")"
    else
        fail "nbdcopy ballast -> file" "$(tail -3 "$T/nbdcopy.err")"
    fi
else
    fail "nbdcopy 256 MiB file -> ballast" "$(tail -3 "$T/nbdcopy.err")"
fi
rm -f "$T/back256"

# --- qemu-img convert onto a dirty file export (so zero runs must really be written), compare
rand_file "$T/dirty64" 64
timeout 60 nbdcopy "$T/dirty64" "$NBD_URI/qimg" || fail "nbdcopy prefill qimg"
{ head -c $((20 * MiB)) /dev/urandom; head -c $((8 * MiB)) /dev/zero
  head -c $((35 * MiB)) /dev/urandom; head -c 12345 /dev/urandom; } >"$T/src.raw"
truncate -s $((64 * MiB)) "$T/src.raw"   # tail of zeros
if timeout 120 qemu-img convert -n -f raw -O raw "$T/src.raw" "$NBD_URI/qimg" 2>"$T/qemu.err"; then
    pass "qemu-img convert -O raw -> nbd://.../qimg"
    check "qemu-img compare source vs nbd://.../qimg" \
        timeout 120 qemu-img compare -f raw -F raw "$T/src.raw" "$NBD_URI/qimg"
else
    fail "qemu-img convert -> nbd://.../qimg" "$(tail -3 "$T/qemu.err")"
fi
# and back out through qemu's NBD client
if timeout 120 qemu-img convert -f raw -O raw "$NBD_URI/qimg" "$T/qback.raw" 2>"$T/qemu.err"; then
    check_eq "qemu-img convert nbd -> file: sha256 equal" "$(sha "$T/src.raw")" "$(sha "$T/qback.raw")"
else
    fail "qemu-img convert nbd -> file" "$(tail -3 "$T/qemu.err")"
fi

# --- fio: 4 jobs = 4 connections, random writes 4k..1M, iodepth 32, crc32c verify
conns_before=$(grep -c 'connection closed.*export=fio' "$BALLAST_LOG")
if (cd "$T" && timeout 300 fio --name=nbdverify --ioengine=nbd --uri="$NBD_URI/fio" \
        --rw=randwrite --bsrange=4k-1M --iodepth=32 --numjobs=4 \
        --size=64M --offset_increment=64M \
        --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_dump=0 --verify_state_save=0 \
        --output-format=json --output="$T/fio.json") >"$T/fio.out" 2>&1; then
    errs=$(json_get "$T/fio.json" 'sum(x["error"] for x in j["jobs"])')
    njobs=$(json_get "$T/fio.json" 'len(j["jobs"])')
    written=$(json_get "$T/fio.json" 'sum(x["write"]["io_bytes"] for x in j["jobs"])')
    verified=$(json_get "$T/fio.json" 'sum(x["read"]["io_bytes"] for x in j["jobs"])')
    if [[ $errs == 0 && $njobs == 4 && $written -ge $((256 * MiB)) && $verified -ge $((256 * MiB)) ]]
    then
        pass "fio nbd randwrite 4k-1M qd32 x4 jobs, crc32c verify: no errors"
    else
        fail "fio verify" "errors=$errs jobs=$njobs written=$written verified=$verified"
    fi
else
    fail "fio nbd randwrite+verify" "$(grep -iE 'verify|error|fio:' "$T/fio.out" | head -5 | tr '\n' ' ')"
fi
sleep 0.5
conns_after=$(grep -c 'connection closed.*export=fio' "$BALLAST_LOG")
if ((conns_after - conns_before >= 4)); then
    pass "fio used >= 4 NBD connections (server log)"
else
    fail "fio used >= 4 NBD connections (server log)" "log shows $((conns_after - conns_before))"
fi

check "daemon alive after phase 1" kill -0 "$PID"

# SIGTERM while 4 fio connections are writing: drain and exit 0
(cd "$T" && exec timeout 60 fio --name=busy --ioengine=nbd --uri="$NBD_URI/fio" --rw=randwrite \
    --bs=64k --iodepth=32 --numjobs=4 --size=64M --offset_increment=64M --time_based \
    --runtime=30 >"$T/fio-busy.out" 2>&1) &
busy=$!
sleep 2
check "fio busy-writer running when SIGTERM is sent" kill -0 "$busy"
t0=$SECONDS
stop_ballast
echo "   (stopped in $((SECONDS - t0))s under load)"
wait "$busy" 2>/dev/null

##############################################################################################
echo "## phase 2: default vol0, runtime export control, persistence across restart"
new_data_dir
PORT=""
start_ballast || finish

check "default pool created as a 10 GiB sparse file in the data dir" \
    test "$(stat -c %s "$DATA_DIR/pool.img" 2>/dev/null)" = $((10240 * MiB))
check_eq "the default pool is the daemon's user's alone (mode 600, whatever the umask)" 600 \
    "$(stat -c %a "$DATA_DIR/pool.img" 2>/dev/null)"
check "the default pool holds volume vol0 of 1 GiB" \
    sh -c "ballast_list=\$('$(ballast_bin)' volume list --json --rpc-socket '$RPC_SOCK'); echo \"\$ballast_list\" | grep -q '\"name\": \"vol0\"' && echo \"\$ballast_list\" | grep -q '\"size_bytes\": 1073741824'"
check_eq "empty export name maps to vol0 (1 GiB)" $((1024 * MiB)) \
    "$(timeout 30 nbdinfo --size "$NBD_URI" 2>&1)"
out=$(timeout 30 nbdinfo --list "$NBD_URI" 2>&1)
if grep -q 'export="vol0"' <<<"$out"; then pass "nbdinfo --list shows vol0"
else fail "nbdinfo --list shows vol0" "$(head -3 <<<"$out" | tr '\n' ' ')"; fi

map=$(timeout 30 nbdinfo --map "$NBD_URI/vol0" 2>&1)
if [[ $(awk '{print $1, $2, $3}' <<<"$map") == "0 $((1024 * MiB)) 3" ]]; then
    pass "nbdinfo --map on fresh vol0: one hole,zero extent"
else
    fail "nbdinfo --map on fresh vol0" "$(head -5 <<<"$map" | tr '\n' ';')"
fi

# --- runtime control
check "export add ram" ballast_ctl export add rt_ram --ram 64M --description "runtime ram"
check "export add file" ballast_ctl export add rt_file --file "$DATA_DIR/rt_file.img" --size 128M
check "export add read-only ram" ballast_ctl export add rt_ro --ram 16M --read-only
check_fails "export add of an existing name fails" ballast_ctl export add rt_ram --ram 8M
check_eq "export add --file creates the file with --size" $((128 * MiB)) \
    "$(stat -c %s "$DATA_DIR/rt_file.img" 2>&1)"

if ballast_ctl export list --json >"$T/el.json" 2>"$T/el.err"; then
    got=$(json_get "$T/el.json" '";".join("%s,%s,%s,%s,%s" % (e["name"], e["size_bytes"], e["read_only"], e["default"], e["description"] if e["name"] != "vol0" else "-") for e in sorted(j, key=lambda e: e["name"]))' 2>&1)
    check_eq "export list --json shows all exports with fields" \
        "rt_file,134217728,False,False,;rt_ram,67108864,False,False,runtime ram;rt_ro,16777216,True,False,;vol0,1073741824,False,True,-" \
        "$got"
    be=$(json_get "$T/el.json" '[e["backend"] for e in j if e["name"]=="rt_ram"][0]' 2>&1)
    if [[ $be == ram* ]]; then pass "rt_ram backend is ram ($be)"; else fail "rt_ram backend" "$be"; fi
else
    fail "export list --json" "$(cat "$T/el.err")"
fi
check "export list --data-dir DIR finds the daemon's socket" \
    timeout 30 "$(ballast_bin)" export list --data-dir "$DATA_DIR"
out=$(ballast_ctl export list 2>&1)
if grep -q rt_file <<<"$out" && grep -q rt_ram <<<"$out"; then pass "export list (table) shows new exports"
else fail "export list (table)" "$out"; fi

out=$(timeout 30 nbdinfo --list "$NBD_URI" 2>&1)
if grep -q 'export="rt_ram"' <<<"$out" && grep -q 'export="rt_file"' <<<"$out"; then
    pass "nbdinfo --list shows runtime-added exports"
else
    fail "nbdinfo --list shows runtime-added exports"
fi
if grep -q 'description: runtime ram' <<<"$out"; then pass "nbdinfo --list shows --description"
else fail "nbdinfo --list shows --description" "$(grep -A2 rt_ram <<<"$out" | tr '\n' ' ')"; fi
check_fails "export add without --ram/--file fails" ballast_ctl export add bad1
check_fails "export add --ram with a bad size fails" ballast_ctl export add bad2 --ram lots
check_fails "export add with both --ram and --file fails" \
    ballast_ctl export add bad3 --ram 1M --file "$DATA_DIR/bad3.img" --size 1M
check_fails "control CLI against a socket nobody listens on fails" \
    timeout 30 "$(ballast_bin)" export list --rpc-socket "$DATA_DIR/nobody.sock"

rand_file "$T/rt64" 64
if timeout 60 nbdcopy "$T/rt64" "$NBD_URI/rt_ram" && timeout 60 nbdcopy "$NBD_URI/rt_ram" "$T/rt64.back"; then
    check_eq "I/O on runtime ram export (nbdcopy 64 MiB round trip)" "$(sha "$T/rt64")" "$(sha "$T/rt64.back")"
else
    fail "nbdcopy on runtime ram export"
fi
rand_file "$T/rtf16" 16
if timeout 60 $NBDIO put "$NBD_URI/rt_file" "$T/rtf16" $((100 * MiB)) &&
   timeout 60 $NBDIO get "$NBD_URI/rt_file" $((100 * MiB)) $((16 * MiB)) "$T/rtf16.back"; then
    check_eq "I/O on runtime file export (16 MiB at 100 MiB)" "$(sha "$T/rtf16")" "$(sha "$T/rtf16.back")"
else
    fail "I/O on runtime file export"
fi
check_eq "read-only export reports is_read_only" "0" \
    "$(timeout 30 nbdinfo --is read-only "$NBD_URI/rt_ro" >/dev/null 2>&1; echo $?)"
check_fails "write to read-only export fails" \
    timeout 30 nbdsh -u "$NBD_URI/rt_ro" -c 'h.pwrite(b"x" * 4096, 0)'

# a connection opened before `export remove` keeps working (INTERFACE: until it closes)
rm -f "$T/ready" "$T/go"
timeout 60 $NBDIO hold "$NBD_URI/rt_ram" "$T/ready" "$T/go" 30 >"$T/hold.out" 2>&1 &
hold_pid=$!
for ((i = 0; i < 200; i++)); do [[ -e $T/ready ]] && break; sleep 0.05; done
[[ -e $T/ready ]] || fail "held connection to rt_ram did not become ready" "$(cat "$T/hold.out")"

check "export remove rt_ram" ballast_ctl export remove rt_ram
touch "$T/go"
hold_rc=0; wait "$hold_pid" || hold_rc=$?
check_eq "open connection to a removed export keeps working" 0 "$hold_rc"
[[ $hold_rc == 0 ]] || cat "$T/hold.out"

check_fails "new connection to removed export is refused (nbdinfo fails)" \
    timeout 30 nbdinfo "$NBD_URI/rt_ram"
if ballast_ctl export list --json >"$T/el.json" 2>&1; then
    check_eq "export list no longer shows rt_ram" "rt_file rt_ro vol0" \
        "$(json_get "$T/el.json" '" ".join(sorted(e["name"] for e in j))')"
fi
check_fails "export remove of an unknown name fails" ballast_ctl export remove no_such_export
check_eq "other exports untouched: rt_file size" $((128 * MiB)) "$(timeout 30 nbdinfo --size "$NBD_URI/rt_file" 2>&1)"
if timeout 60 $NBDIO get "$NBD_URI/rt_file" $((100 * MiB)) $((16 * MiB)) "$T/rtf16.back2"; then
    check_eq "other exports untouched: rt_file data intact" "$(sha "$T/rtf16")" "$(sha "$T/rtf16.back2")"
else
    fail "read rt_file after remove"
fi
if ballast_ctl stats --json >"$T/stats.json" 2>&1 && "$SYS_PY" -c 'import json,sys; json.load(open(sys.argv[1]))' "$T/stats.json"; then
    pass "stats --json prints valid JSON"
else
    fail "stats --json prints valid JSON" "$(head -c 300 "$T/stats.json")"
fi
check "stats (table) works" ballast_ctl stats

# --- persistence of vol0: 32 MiB at 16 MiB, plus an unaligned 5000-byte write near the end
rand_file "$T/p32" 32
head -c 5000 /dev/urandom >"$T/p5000"
tail_off=$((1024 * MiB - 10001))
if timeout 60 $NBDIO put "$NBD_URI/vol0" "$T/p32" $((16 * MiB)) &&
   timeout 60 $NBDIO put-noflush "$NBD_URI/vol0" "$T/p5000" $tail_off; then
    pass "wrote 32 MiB (flushed) + 5000 unaligned bytes (not flushed) to vol0"
else
    fail "write to vol0"
fi
map=$(timeout 30 nbdinfo --map "$NBD_URI/vol0" 2>&1)
data_at=$(awk '$3 == 0 && $1 <= 16777216 && $1 + $2 >= 50331648 {print "yes"}' <<<"$map")
zero_at0=$(awk '$1 == 0 && $2 >= 16777216 && $3 == 3 {print "yes"}' <<<"$map")
if [[ $data_at == yes && $zero_at0 == yes ]]; then
    pass "nbdinfo --map on vol0 after the write: hole,zero at 0, data over 16..48 MiB"
else
    fail "nbdinfo --map on vol0 after the write" "$(head -6 <<<"$map" | tr '\n' ';')"
fi
stop_ballast
check "pool check is exact after the clean stop" "$(ballast_bin)" pool check "$DATA_DIR/pool.img"

start_ballast || finish   # same DATA_DIR (and the same port if it is still free)
if timeout 60 $NBDIO get "$NBD_URI/vol0" $((16 * MiB)) $((32 * MiB)) "$T/p32.back" &&
   timeout 60 $NBDIO get "$NBD_URI/vol0" $tail_off 5000 "$T/p5000.back"; then
    check_eq "vol0 after restart: 32 MiB sha256 equal" "$(sha "$T/p32")" "$(sha "$T/p32.back")"
    check_eq "vol0 after restart: unaligned 5000 bytes equal" "$(sha "$T/p5000")" "$(sha "$T/p5000.back")"
else
    fail "read vol0 after restart"
fi
zero=$(timeout 60 nbdsh -u "$NBD_URI/vol0" -c "print(h.pread(1<<20, 0) == bytes(1<<20) and h.pread(1<<20, $((48 * MiB))) == bytes(1<<20))" 2>&1)
check_eq "vol0 after restart: unwritten regions read zero" "True" "$zero"
check_eq "vol0 after restart: size still 1 GiB" $((1024 * MiB)) "$(timeout 30 nbdinfo --size "$NBD_URI" 2>&1)"
stop_ballast

finish
