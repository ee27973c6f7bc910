#!/bin/bash
# Snapshots and clones through the Linux kernel's initiators (NVMe/TCP and NBD) in a qemu guest
# (tests/vm/run.sh); guest side: tests/vm/guest-volume.sh. The host serves a pool, creates the
# volume `base`, and on the guest's signal snapshots it and clones the snapshot; the guest
# mounts the clone as a filesystem, overwrites the origin, and checks the snapshot (read-only,
# over NBD) and the clone are unchanged; then, on another signal, makes the connected clone
# read-only (the kernel host sees it through the namespace change notice), and renames it while
# the kernel NBD client has it attached. Afterwards `ballast pool check` must be exact.
# The daemon runs two cores with `--volume-placement owner`: the kernel's I/O queues and NBD
# connections that the listener put on the core not owning the volumes' family move to its
# owner after Connect / the handshake (at least one does: two I/O queues per connect, placed
# round-robin), so no request is forwarded between the cores.
# Prints PASS/FAIL lines and "N passed, M failed"; exits 1 on any failure.
# Environment: BALLAST_BIN, BALLAST_VM_TIMEOUT (default 420), KEEP=1.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
bin=${BALLAST_BIN:-$root/build/cargo/release/ballast}
listening() { [[ -n $(ss -Hltn "sport = :$1" 2>/dev/null) ]]; }
free_port() { local p; for _ in $(seq 50); do p=$((20000 + RANDOM % 12000)); listening "$p" || break; done; echo "$p"; }
"$here/build.sh" >/dev/null || { echo "FAIL: building the guest"; echo "0 passed, 1 failed"; exit 1; }
work=$(mktemp -d "${TMPDIR:-/tmp}/ballast-volume-vm.XXXXXX")
port=$(free_port) nbd=$(free_port) sig=$(free_port)
sock=$work/data/ballast.sock
spid= lpid= gpid=
cleanup() {
  for p in $spid $lpid $gpid; do kill -KILL "$p" 2>/dev/null; done
  [[ -n ${KEEP:-} ]] || rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/data"
"$bin" pool create "$work/pool.img" --size 4G > "$work/server.log" 2>&1
"$bin" serve --data-dir "$work/data" --pool "$work/pool.img" --nbd-listen "127.0.0.1:$nbd" \
  --nvmf-listen "127.0.0.1:$port" --cores 2 --volume-placement owner >> "$work/server.log" 2>&1 &
spid=$!
for _ in $(seq 100); do [[ -S $sock ]] && listening "$port" && break; sleep 0.1; done
"$bin" volume create base 256M --rpc-socket "$sock" >> "$work/server.log" 2>&1
/usr/bin/python3 -c "
import socket
s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('127.0.0.1',$sig)); s.listen(4)
while True:
    c,_=s.accept(); line=c.makefile().readline().strip(); c.close()
    open('$work/signals','a').write(line+'\n')
" & lpid=$!
printf 'PORT=%s\nNBD_PORT=%s\nSIGNAL_PORT=%s\n' "$port" "$nbd" "$sig" > "$work/params"
: > "$work/signals"
BALLAST_VM_TIMEOUT=${BALLAST_VM_TIMEOUT:-420} "$here/run.sh" "$here/guest-volume.sh" "$work/params" > "$work/console" 2>&1 &
gpid=$!
handled=0
while kill -0 "$gpid" 2>/dev/null; do
  mapfile -t sigs < "$work/signals"
  while ((handled < ${#sigs[@]})); do
    case ${sigs[$handled]} in
      snapshot)
        "$bin" snapshot create base base-snap --rpc-socket "$sock" >> "$work/server.log" 2>&1
        "$bin" clone create base-snap base-clone --rpc-socket "$sock" >> "$work/server.log" 2>&1 ;;
      decouple)
        # Paced so that it spans the guest's writes: 4 MiB/s.
        "$bin" pool copy-rate 4 --rpc-socket "$sock" >> "$work/server.log" 2>&1
        ( t0=$(date +%s.%N)
          "$bin" volume decouple base-clone --rpc-socket "$sock" >> "$work/server.log" 2>&1
          echo "$? $t0 $(date +%s.%N)" > "$work/decouple.done" ) &
        ;;
      writes-done)
        date +%s.%N > "$work/writes.done" ;;
      read-only)
        "$bin" volume read-only base-clone --rpc-socket "$sock" >> "$work/server.log" 2>&1 ;;
      rename)
        "$bin" volume rename base-clone archive --rpc-socket "$sock" >> "$work/server.log" 2>&1 ;;
    esac
    handled=$((handled + 1))
  done
  sleep 0.3
done
wait "$gpid"; grc=$?
sed -e 's/\x1b\[[0-9;?]*[a-zA-Z]//g' "$work/console" | grep -v -E '^(SeaBIOS|iPXE|Booting from)'
"$bin" volume list --rpc-socket "$sock"
kind=$("$bin" rpc bdev_lvol_get_lvols --rpc-socket "$sock" | /usr/bin/python3 -c '
import json, sys
v = {l["name"]: l for l in json.load(sys.stdin)}.get("archive", {})
print(v.get("is_clone"), v.get("parent"))')
placed=$("$bin" stats --json --rpc-socket "$sock" | /usr/bin/python3 -c '
import json, sys
r = json.load(sys.stdin)["reactors"]
print(sum(c["connections_moved"] for c in r), sum(c["volume_forwarded"] for c in r))')
kill -TERM "$spid"; wait "$spid"; src=$?
npass=$(grep -c '^PASS: ' "$work/console"); nfail=$(grep -c '^FAIL: ' "$work/console")
read -r moved forwarded <<<"$placed"
if ((moved >= 1 && forwarded == 0)); then echo "PASS: connections moved to their family's core ($moved), nothing forwarded"; npass=$((npass + 1)); else echo "FAIL: placement: moved ${moved:-?}, forwarded ${forwarded:-?}"; nfail=$((nfail + 1)); fi
# The decoupling answered (durable) while the guest was still writing to the clone, and the
# clone (renamed archive since) is a volume of its own: no clone, no parent.
read -r drc dt0 dt1 < "$work/decouple.done" 2>/dev/null
wt=$(cat "$work/writes.done" 2>/dev/null)
if [[ ${drc:-} == 0 && -n $wt ]] && /usr/bin/python3 -c "import sys; sys.exit(not (float('$dt1') < float('$wt')))"; then
  echo "PASS: ballast volume decouple base-clone answered in $(/usr/bin/python3 -c "print(round($dt1 - $dt0, 1))") s, while the guest wrote to it"; npass=$((npass + 1))
else
  echo "FAIL: the decoupling: status ${drc:-none}, ended ${dt1:-?}, the guest's writes ended ${wt:-?}"; nfail=$((nfail + 1))
fi
if [[ $kind == "False None" ]]; then echo "PASS: the clone, decoupled, is no clone of base-snap any more"; npass=$((npass + 1)); else echo "FAIL: archive: is_clone, parent = $kind"; nfail=$((nfail + 1)); fi
grep -q 'guest done' "$work/console" || { echo "FAIL: guest script did not finish (exit $grc)"; nfail=$((nfail + 1)); }
if ((src == 0)); then echo "PASS: ballast exits 0 on SIGTERM"; npass=$((npass + 1)); else echo "FAIL: ballast exit status $src"; nfail=$((nfail + 1)); fi
if "$bin" pool check "$work/pool.img"; then echo "PASS: pool check is exact afterwards"; npass=$((npass + 1)); else echo "FAIL: pool check"; nfail=$((nfail + 1)); fi
if ((nfail)); then echo "--- server log"; tail -n 60 "$work/server.log"; fi
echo "$npass passed, $nfail failed"
((nfail == 0))
