#!/bin/bash
# NVMe reservations through the Linux kernel's NVMe/TCP host and nvme-cli's resv-* commands, in a
# qemu guest (tests/vm/run.sh; guest side: tests/vm/guest-nvme-resv.sh). The host serves a pool
# with two volumes, vol0 on two ports; the guest (native multipath off, so each controller has
# its own block device) connects to vol0 as two hosts (one per port) (own host NQN and host identifier each) and to vol1 as
# one of them: registrations and keys, Write Exclusive, Exclusive Access and Registrants Only
# held by one host while the other's reads, writes and flushes are refused or served as the
# specification says, preemption (the preempted host's controller reads Registration Preempted
# from the Reservation Notification log page with nvme-cli, the other's Reservation Released),
# release, clear, fio verify by the holder, another volume unaffected; then Persist Through Power Loss: the appliance killed (-9) and started again under
# the connected hosts keeps the reservation (the fenced host stays fenced). Afterwards
# `ballast pool check` must be exact.
# Prints PASS/FAIL lines and "N passed, M failed"; exits 1 on any failure.
# Environment: BALLAST_BIN, BALLAST_VM_TIMEOUT (default 420).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
bin=${BALLAST_BIN:-$root/build/cargo/release/ballast}
. "$here/host-lib.sh"
"$here/build.sh" >/dev/null || { echo "FAIL: building the guest"; echo "0 passed, 1 failed"; exit 1; }
work=$(mktemp -d "${TMPDIR:-/tmp}/ballast-resv-vm.XXXXXX")
port=$(free_port) sig=$(free_port) lpid= rpid=
sock=$work/data/ballast.sock
mkdir -p "$work/data"
trap 'for p in $rpid $lpid; do kill -KILL $p 2>/dev/null; done; [[ -f $work/spid ]] && kill -KILL "$(cat "$work/spid")" 2>/dev/null; rm -rf "$work"' EXIT
"$bin" pool create "$work/pool.img" --size 1G > "$work/server.log" 2>&1
nbd=$(free_port)
serve() {
  "$bin" serve --data-dir "$work/data" --pool "$work/pool.img" --nbd-listen "127.0.0.1:$nbd" \
    --nvmf-listen "127.0.0.1:$port" --cores 2 >> "$work/server.log" 2>&1 &
  echo $! > "$work/spid"
  for _ in $(seq 100); do [[ -S $sock ]] && listening "$port" && break; sleep 0.1; done
}
serve
listening "$port" && pass "ballast listening" || { fail "ballast listening"; tail "$work/server.log"; }
for v in vol0 vol1; do
  "$bin" volume create $v 128M --rpc-socket "$sock" >> "$work/server.log" 2>&1 && pass "volume $v created" || fail "volume $v created"
done
port2=$(free_port)
"$bin" nvmf add-listener nqn.2026-11.dev.ballast:vol0 "127.0.0.1:$port2" --rpc-socket "$sock" >> "$work/server.log" 2>&1 \
  && pass "vol0 listens on a second port" || fail "vol0 listens on a second port"
# The guest's signals ("restart": kill -9, start again).
guest_words "$sig" "$work/signals"
(
  while ! grep -q restart "$work/signals" 2>/dev/null; do sleep 0.3; done
  kill -KILL "$(cat "$work/spid")"; sleep 0.5
  echo "=== restart after kill -9" >> "$work/server.log"
  serve
  wait
) & rpid=$!
printf 'PORT=%s\nPORT2=%s\nSIGNAL_PORT=%s\n' "$port" "$port2" "$sig" > "$work/params"
BALLAST_VM_APPEND=nvme_core.multipath=N run_guest 480 "$here/guest-nvme-resv.sh" "$work/params"
spid=$(cat "$work/spid")
grep -q '=== restart after kill -9' "$work/server.log" && pass "the guest's restart happened" || fail "the guest's restart happened"
# The daemon started again is the restarter's child: its stop is seen in its log.
kill -TERM "$spid"; for _ in $(seq 100); do kill -0 "$spid" 2>/dev/null || break; sleep 0.1; done
kill -0 "$spid" 2>/dev/null && fail "ballast stops on SIGTERM" || pass "ballast stops on SIGTERM"
tail -3 "$work/server.log" | grep -q 'ballast::serve: stopped' && pass "...after a clean stop" || fail "...after a clean stop"
"$bin" pool check "$work/pool.img" >> "$work/server.log" 2>&1 && pass "pool check is exact afterwards" || fail "pool check"
if ((nfail)); then echo "--- server log"; tail -n 40 "$work/server.log"; fi
echo "$npass passed, $nfail failed"
((nfail == 0))
