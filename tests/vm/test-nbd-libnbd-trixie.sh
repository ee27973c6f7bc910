#!/bin/bash
# NBD extended headers (64-bit lengths) with clients we did not write: trixie's libnbd 1.22
# (nbdinfo, nbdcopy) and qemu 10 (qemu-io, qemu-img) in the trixie guest against ballast on the
# host (10.0.2.2), plaintext. The
# host serves a pool with a 12 GiB thin volume `v` and a 64 MiB memory export `m`; the guest
# (guest-nbd-libnbd.sh) sees libnbd negotiate extended headers ("using extended packets"),
# copies a 12 GiB sparse image with two written MiBs (one 10 GiB in) onto `v` and back with
# nbdcopy, maps it with nbdinfo --map (the hole between them reported in 64-bit block status),
# and copies 64 MiB of random data through `m` both ways; qemu-io writes, zeroes 10 GiB in place
# and reads back, qemu-img maps and sizes the volume. The host then checks from its own
# side (the volume's allocation through `ballast volume changes`) and `ballast pool check`.
# Prints PASS/FAIL and "N passed, M failed".
#
# Environment: BALLAST_BIN, BALLAST_VM_TIMEOUT (default 300 s), KEEP=1 keeps the work dir.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
bin=${BALLAST_BIN:-$root/build/cargo/release/ballast}
export BALLAST_VM_FLAVOUR=trixie
. "$here/host-lib.sh"
trixie_work libnbd
trap '[[ -n $spid ]] && kill -KILL $spid 2>/dev/null' EXIT
sock=$work/data/ballast.sock
port=$(free_port)
"$bin" pool create "$work/pool.img" --size 2G > "$work/server.log" 2>&1 && pass "a 2 GiB pool created" \
  || fail "pool create"
RUST_LOG=info,ballast_nbd=debug "$bin" serve --data-dir "$work/data" --pool "$work/pool.img" \
  --nbd-listen "127.0.0.1:$port" --nvmf-listen "127.0.0.1:$(free_port)" --cores 1 \
  --export m=ram:64M >> "$work/server.log" 2>&1 &
spid=$!
for _ in $(seq 100); do listening "$port" && [[ -S $sock ]] && break; sleep 0.2; done
"$bin" volume create v 12G --rpc-socket "$sock" >> "$work/server.log" 2>&1 && pass "a 12 GiB thin volume v" \
  || fail "volume create v 12G"

echo "NBD_PORT=$port" > "$work/params"
run_guest 300 "$here/guest-nbd-libnbd.sh" "$work/params"

# What the host sees: the volume holds what the guest wrote last (1 MiB at 0, 1 MiB at 11 GiB)
# and nothing else.
changes=$("$bin" volume changes v --json --rpc-socket "$sock" 2>>"$work/server.log")
got=$(/usr/bin/python3 -c 'import json,sys
d=json.loads(sys.argv[1]); ex=d["extents"] if isinstance(d,dict) else d
print(" ".join("%d+%d" % (e["offset"], e["length"]) for e in ex))' "$changes" 2>&1)
want="0+1048576 11811160064+1048576"
[[ $got == "$want" ]] && pass "the volume holds exactly the two MiBs left (ballast volume changes: $got)" \
  || fail "volume allocation: want '$want', got '$got'"
# every client here (libnbd's tools, qemu's) asked for extended headers and got them
opened=$(grep -c 'connection open' "$work/server.log")
extended=$(grep 'connection open' "$work/server.log" | grep -c 'framing=Extended')
((opened > 5 && opened == extended)) && pass "server log: all $opened connections opened with extended headers" \
  || fail "connections with extended headers: $extended of $opened"
if kill -TERM "$spid" && wait "$spid"; then pass "server exits 0 after SIGTERM"; else fail "server exit status"; fi
spid=
grep -q panicked "$work/server.log" && fail "no panic in the server log"
"$bin" pool check "$work/pool.img" > "$work/check.out" 2>&1 && pass "pool check is exact afterwards" \
  || { fail "pool check"; tail -5 "$work/check.out"; }
echo "=== $npass passed, $nfail failed"
if ((nfail)) || [[ -n ${KEEP:-} ]]; then echo "logs kept in $work"; tail -30 "$work/server.log"; else rm -rf "$work"; fi
((nfail == 0))
