#!/bin/bash
# Validates our NVMe/TCP initiator (ballast-perf) against the Linux kernel's own target
# (nvmet-tcp in the test guest, reached through a qemu port forward), so the initiator is not
# only ever tested against ballast. Runs read/write workloads with in-capsule and R2T writes,
# with and without digests and SQ flow control. Prints "N passed, M failed".
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
perf=${BALLAST_PERF_BIN:-$root/build/cargo/release/ballast-perf}
listening() { [[ -n $(ss -Hltn "sport = :$1" 2>/dev/null) ]]; }
# Ports below the ephemeral range (32768+), so no outgoing connection holds one.
free_port() { local p; for _ in $(seq 50); do p=$((20000 + RANDOM % 12000)); listening "$p" || break; done; echo "$p"; }
[[ -x $perf ]] || { echo "FAIL: no ballast-perf at $perf"; echo "0 passed, 1 failed"; exit 1; }
"$here/build.sh" >/dev/null || { echo "FAIL: building the guest"; echo "0 passed, 1 failed"; exit 1; }
work=$(mktemp -d "${TMPDIR:-/tmp}/ballast-nvmet-vm.XXXXXX")
fwd=$(free_port) sig=$(free_port)
lpid= gpid=
trap 'kill $lpid $gpid 2>/dev/null; [[ -n ${KEEP:-} ]] || rm -rf "$work"' EXIT
: > "$work/signals"
# Signal server: records "ready"; answers "poll" with "done" once $work/done exists.
/usr/bin/python3 -c "
import os, socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('127.0.0.1', $sig)); s.listen(8)
while True:
    c, _ = s.accept(); line = c.makefile().readline().strip()
    if line == 'poll':
        c.sendall(b'done\n' if os.path.exists('$work/done') else b'wait\n')
    else:
        open('$work/signals', 'a').write(line + '\n')
    c.close()
" & lpid=$!
echo "SIGNAL_PORT=$sig" > "$work/params"
BALLAST_VM_HOSTFWD="hostfwd=tcp:127.0.0.1:$fwd-:4420" BALLAST_VM_TIMEOUT=${BALLAST_VM_TIMEOUT:-420} \
  "$here/run.sh" "$here/guest-nvmet.sh" "$work/params" > "$work/console" 2>&1 & gpid=$!
for _ in $(seq 240); do grep -q ready "$work/signals" && break; kill -0 $gpid 2>/dev/null || break; sleep 1; done
npass=0 nfail=0
run() {   # run NAME ARGS...: one ballast-perf workload against nvmet; must exit 0 with I/O done
  local name=$1; shift
  if out=$(timeout 120 "$perf" --addr "127.0.0.1:$fwd" --nqn nqn.2014-08.org.example:ref --runtime 2 \
        --timeout 30 --json "$@" 2>&1) && /usr/bin/python3 -c "
import json, sys
j = json.loads(sys.argv[1]); job = j['jobs'][0]
ios = job['read']['total_ios'] + job['write']['total_ios']
sys.exit(0 if ios > 0 and job.get('error', 0) == 0 else 1)" "$out"; then
    echo "PASS: nvmet: $name"; npass=$((npass + 1))
  else
    echo "FAIL: nvmet: $name"; echo "$out" | tail -5; nfail=$((nfail + 1))
  fi
}
if grep -q ready "$work/signals"; then
  run "4k randwrite QD8 (in-capsule)" --rw randwrite --bs 4k --qd 8 --size 32m
  run "4k randread QD8" --rw randread --bs 4k --qd 8 --size 32m
  run "64k write QD4 (R2T + H2CData)" --rw write --bs 64k --qd 4 --size 32m
  run "128k randrw, header+data digests, 2 queues" --rw randrw --bs 128k --qd 4 --queues 2 --size 32m --header-digest --data-digest
  run "4k randread, SQ flow control disabled" --rw randread --bs 4k --qd 8 --size 32m --disable-sqflow
else
  echo "FAIL: nvmet in the guest never became ready"; nfail=$((nfail + 1))
fi
touch "$work/done"
wait $gpid; grc=$?
((grc == 0)) || { echo "FAIL: guest exit $grc"; nfail=$((nfail + 1)); sed -e 's/\x1b\[[0-9;?]*[a-zA-Z]//g' "$work/console" | tail -30; }
echo "$npass passed, $nfail failed"
((nfail == 0))
