#!/bin/bash
# ballast vs the Linux kernel's NVMe/TCP host (nvme-cli), in a qemu guest (tests/vm/run.sh).
# Guest side: tests/vm/guest-nvme.sh. Covers discovery (4420 and a discovery port), connect with
# and without digests and with 1 or 2 I/O queues, id-ctrl/id-ns/ns-descs, fio verify, flush,
# nvme compare (matching and not),
# the error log (error-log, smart-log's count) after a read past the end, the commands
# supported and their effects (effects-log),
# discard, xfs and ext4 with checksums across reconnects, keep-alive, a namespace added at
# runtime (AEN), a target restart under the host, and the allowed-host list.
# Prints PASS/FAIL lines and "N passed, M failed"; exits 1 on any failure.
# Environment: BALLAST_BIN, FIO_SIZE (default 32m), BALLAST_VM_TIMEOUT (default 480), KEEP=1.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
bin=${BALLAST_BIN:-$root/build/cargo/release/ballast}
listening() { [[ -n $(ss -Hltn "sport = :$1" 2>/dev/null) ]]; }
# Ports below the ephemeral range (32768+), so no outgoing connection holds one.
free_port() { local p; for _ in $(seq 50); do p=$((20000 + RANDOM % 12000)); listening "$p" || break; done; echo "$p"; }
"$here/build.sh" >/dev/null || { echo "FAIL: building the guest"; echo "0 passed, 1 failed"; exit 1; }
work=$(mktemp -d "${TMPDIR:-/tmp}/ballast-nvme-vm.XXXXXX")
port=$(free_port) nbd=$(free_port) disc=$(free_port) sig=$(free_port)
sock=$work/data/ballast.sock
ALLOWED=nqn.2014-08.org.example:allowed
RESTRICTED=nqn.2026-11.dev.ballast:restricted
spid= lpid= gpid=
cleanup() {
  for p in $spid $lpid $gpid; do kill -KILL "$p" 2>/dev/null; done
  [[ -n ${KEEP:-} ]] || rm -rf "$work"
}
trap cleanup EXIT
start() {
  local attempt
  for attempt in 1 2 3 4 5; do
    "$bin" serve --data-dir "$work/data" --nbd-listen "127.0.0.1:$nbd" --nvmf-listen "127.0.0.1:$port" \
      --discovery-listen "127.0.0.1:$disc" >> "$work/server.log" 2>&1 &
    spid=$!
    for _ in $(seq 100); do [[ -S $sock ]] && listening "$port" && break; kill -0 "$spid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$spid" 2>/dev/null && break
    # Lost a port race: the guest only knows the NVMe ports, so only the NBD port moves.
    wait "$spid"; nbd=$(free_port)
  done
  "$bin" export add restricted --ram 64M --rpc-socket "$sock" >/dev/null
  rpc nvmf_create_subsystem "{\"nqn\":\"$RESTRICTED\",\"allow_any_host\":false}"
  rpc nvmf_subsystem_add_ns "{\"nqn\":\"$RESTRICTED\",\"namespace\":{\"bdev_name\":\"restricted\"}}"
  rpc nvmf_subsystem_add_host "{\"nqn\":\"$RESTRICTED\",\"host\":\"$ALLOWED\"}"
  rpc nvmf_subsystem_add_listener "{\"nqn\":\"$RESTRICTED\",\"listen_address\":{\"trtype\":\"tcp\",\"traddr\":\"127.0.0.1\",\"trsvcid\":\"$port\"}}"
}
rpc() {   # rpc METHOD PARAMS_JSON: one JSON-RPC call on the control socket
  /usr/bin/python3 - "$sock" "$1" "$2" <<'PY'
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
s.sendall(json.dumps({"jsonrpc": "2.0", "id": 1, "method": sys.argv[2], "params": json.loads(sys.argv[3])}).encode())
r = json.loads(s.makefile().readline())
if "error" in r: sys.exit("rpc %s: %s" % (sys.argv[2], r["error"]["message"]))
PY
}
start
# The guest's signals: one line per TCP connection to $sig.
/usr/bin/python3 -c "
import socket,sys
s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('127.0.0.1',$sig)); s.listen(4)
while True:
    c,_=s.accept(); line=c.makefile().readline().strip(); c.close()
    open('$work/signals','a').write(line+'\n')
" & lpid=$!
cat > "$work/params" <<P
PORT=$port
DISC_PORT=$disc
SIGNAL_PORT=$sig
FIO_SIZE=${FIO_SIZE:-32m}
RESTRICTED=$RESTRICTED
ALLOWED=$ALLOWED
P
: > "$work/signals"
BALLAST_VM_TIMEOUT=${BALLAST_VM_TIMEOUT:-480} "$here/run.sh" "$here/guest-nvme.sh" "$work/params" > "$work/console" 2>&1 &
gpid=$!
handled=0
while kill -0 "$gpid" 2>/dev/null; do
  mapfile -t sigs < "$work/signals"
  while ((handled < ${#sigs[@]})); do
    case ${sigs[$handled]} in
      add-namespace)
        "$bin" export add extra --ram 32M --rpc-socket "$sock" >/dev/null
        rpc nvmf_subsystem_add_ns '{"nqn":"nqn.2026-11.dev.ballast:vol0","namespace":{"bdev_name":"extra","nsid":2}}' ;;
      resize-volume)
        "$bin" export resize vol0 2G --rpc-socket "$sock" >/dev/null ;;
      restart-target)
        kill -TERM "$spid"; wait "$spid"; echo "target stopped with status $? (restarting)" >> "$work/server.log"
        sleep 2; start ;;
    esac
    handled=$((handled + 1))
  done
  sleep 0.3
done
wait "$gpid"; grc=$?
sed -e 's/\x1b\[[0-9;?]*[a-zA-Z]//g' "$work/console" | grep -v -E '^(SeaBIOS|iPXE|Booting from)'
kill -TERM "$spid"; wait "$spid"; src=$?
npass=$(grep -c '^PASS: ' "$work/console"); nfail=$(grep -c '^FAIL: ' "$work/console")
grep -q 'guest done' "$work/console" || { echo "FAIL: guest script did not finish (exit $grc)"; nfail=$((nfail + 1)); }
if ((src == 0)); then echo "PASS: ballast exits 0 on SIGTERM"; npass=$((npass + 1)); else echo "FAIL: ballast exit status $src"; nfail=$((nfail + 1)); fi
if ((nfail)); then echo "--- server log"; tail -n 60 "$work/server.log"; fi
echo "$npass passed, $nfail failed"
((nfail == 0))
