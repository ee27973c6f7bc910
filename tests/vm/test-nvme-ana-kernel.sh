#!/bin/bash
# NVMe Asymmetric Namespace Access through the Linux kernel's NVMe/TCP host with native multipath
# (its default), in a qemu guest (tests/vm/run.sh; guest side: tests/vm/guest-nvme-ana.sh). The
# host serves a pool with one volume on two ports; the guest connects through both: one block
# device with two paths. At the guest's word the host sets a path's ANA state (`ballast nvmf
# ana-state`); the kernel hears of it (ANA change notice, log page 0Ch) and moves its I/O:
# never through an inaccessible path, through optimized paths before non-optimized ones, held
# while no path serves and sent once one does, fio verify unharmed while the paths flip.
# Afterwards `ballast pool check` must be exact.
# Prints PASS/FAIL lines and "N passed, M failed"; exits 1 on any failure.
# Environment: BALLAST_BIN, BALLAST_VM_TIMEOUT (default 420).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
bin=${BALLAST_BIN:-$root/build/cargo/release/ballast}
. "$here/host-lib.sh"
"$here/build.sh" >/dev/null || { echo "FAIL: building the guest"; echo "0 passed, 1 failed"; exit 1; }
work=$(mktemp -d "${TMPDIR:-/tmp}/ballast-ana-vm.XXXXXX")
port=$(free_port) sig=$(free_port) nbd=$(free_port) lpid= wpid= spid=
sock=$work/data/ballast.sock
mkdir -p "$work/data"
trap 'for p in $lpid $wpid $spid; do kill -KILL $p 2>/dev/null; done; rm -rf "$work"' EXIT
"$bin" pool create "$work/pool.img" --size 1G > "$work/server.log" 2>&1
"$bin" serve --data-dir "$work/data" --pool "$work/pool.img" --nbd-listen "127.0.0.1:$nbd" \
  --nvmf-listen "127.0.0.1:$port" --cores 2 >> "$work/server.log" 2>&1 &
spid=$!
for _ in $(seq 100); do [[ -S $sock ]] && listening "$port" && break; sleep 0.1; done
listening "$port" && pass "ballast listening" || { fail "ballast listening"; tail "$work/server.log"; }
"$bin" volume create vol0 128M --rpc-socket "$sock" >> "$work/server.log" 2>&1 && pass "volume vol0 created" || fail "volume vol0 created"
port2=$(free_port)
"$bin" nvmf add-listener nqn.2026-11.dev.ballast:vol0 "127.0.0.1:$port2" --rpc-socket "$sock" >> "$work/server.log" 2>&1 \
  && pass "vol0 listens on a second port" || fail "vol0 listens on a second port"
# The guest's words: "ana PORT STATE" sets vol0's ANA state through 127.0.0.1:PORT (every
# group), as an operator or failover manager would; in the order said, each result in $work/said.
guest_words "$sig" "$work/words"
: > "$work/said"
(
  done_lines=0
  while :; do
    mapfile -t -s "$done_lines" lines < "$work/words"
    for l in "${lines[@]}"; do
      done_lines=$((done_lines + 1))
      read -r word p st <<< "$l"
      [[ $word == ana ]] || continue
      out=$("$bin" nvmf ana-state nqn.2026-11.dev.ballast:vol0 "127.0.0.1:$p" "$st" --rpc-socket "$sock" 2>&1)
      echo "$l -> $? $out" >> "$work/said"
    done
    sleep 0.05
  done
) & wpid=$!
printf 'PORT=%s\nPORT2=%s\nSIGNAL_PORT=%s\n' "$port" "$port2" "$sig" > "$work/params"
run_guest 480 "$here/guest-nvme-ana.sh" "$work/params"
sed 's/^/host: /' "$work/said"
n=$(grep -c ' -> 0 ' "$work/said"); bad=$(grep -vc ' -> 0 ' "$work/said")
((n >= 10 && bad == 0)) && pass "the host set every state the guest asked for ($n)" || fail "the host set every state the guest asked for ($n set, $bad refused)"
kill -TERM "$spid"; for _ in $(seq 100); do kill -0 "$spid" 2>/dev/null || break; sleep 0.1; done
kill -0 "$spid" 2>/dev/null && fail "ballast stops on SIGTERM" || pass "ballast stops on SIGTERM"
wait "$spid"; rc=$?
((rc == 0)) && pass "...with exit 0" || fail "...with exit 0 (got $rc)"
grep -q 'panicked' "$work/server.log" && fail "no panic in the server log" || pass "no panic in the server log"
"$bin" pool check "$work/pool.img" >> "$work/server.log" 2>&1 && pass "pool check is exact afterwards" || fail "pool check"
if ((nfail)); then echo "--- server log"; tail -n 40 "$work/server.log"; fi
echo "$npass passed, $nfail failed"
((nfail == 0))
