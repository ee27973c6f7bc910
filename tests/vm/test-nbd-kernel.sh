#!/bin/bash
# ballast vs the Linux kernel's NBD client, in a qemu guest (tests/vm/run.sh, guest side: guest-nbd.sh).
#
#   tests/vm/test-nbd-kernel.sh [--export SPEC] [--server ballast|nbdkit|qemu-nbd] [--port N]
#                               [--no-restart] [--multi-conn N]
#
#   --export SPEC   ballast serves `--export vol0=SPEC` (e.g. ram:512M, file:/tmp/x.img:512M) instead of
#                   its default: volume vol0 (1 GiB) in the data dir's pool (a 10 GiB sparse file)
#   --server S      what to test: ballast (default), or a reference server that proves the harness
#                   itself: nbdkit (memory 512M) or qemu-nbd (a 512M sparse file)
#   --port N        host TCP port (default: a free one); a restarted server uses another free port
#   --no-restart    skip the restart step (it is skipped anyway for RAM-backed exports)
#   --multi-conn N  connections for the multi-connection step (default 4; 1 skips it)
#
# The server listens on 127.0.0.1 here; the guest reaches it as 10.0.2.2 (qemu user network).
# In the guest: nbd-client attach, mkfs.ext4, files + checksums, detach, re-attach, e2fsck, checksums,
# fstrim; the server is stopped with SIGTERM (must exit 0) and started again on the same data, the
# files must still be there; fio randwrite 4k-64k QD16 O_DIRECT + crc32c verify on the raw device;
# BLKZEROOUT; fio again over N connections. Finally SIGTERM, exit status 0.
# Prints PASS/FAIL lines and "N passed, M failed"; exits 1 on any failure.
#
# Environment: BALLAST_BIN (default build/cargo/release/ballast under the repo root),
#   BALLAST_ARGS (extra `ballast serve` arguments, e.g. "--cores 1"), FIO_SIZE (default 64m),
#   NBD_BLOCK (nbd-client -b: 512..4096; default nbd-client's own), BALLAST_VM_TIMEOUT (default 420 s),
#   KEEP=1 keeps the work dir (server logs, console) even on success (it is kept on failure).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
server=ballast spec= port= restart=1 multi=${MULTI_CONN:-4}
while (($#)); do
  case $1 in
    --export)     spec=${2:?}; shift 2 ;;
    --server)     server=${2:?}; shift 2 ;;
    --port)       port=${2:?}; shift 2 ;;
    --no-restart) restart=0; shift ;;
    --multi-conn) multi=${2:?}; shift 2 ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1 (try --help)" >&2; exit 2 ;;
  esac
done
case $server in ballast|nbdkit|qemu-nbd) ;; *) echo "unknown server: $server" >&2; exit 2 ;; esac

t_start=$(date +%s) npass=0 nfail=0 work= spid=
pass() { echo "PASS: $*"; npass=$((npass + 1)); }
fail() { echo "FAIL: $*"; nfail=$((nfail + 1)); }
summary() {
  echo "=== $npass passed, $nfail failed ($server${spec:+ $spec}, $(($(date +%s) - t_start))s)"
  if ((nfail)) || [[ -n ${KEEP:-} ]]; then echo "logs kept in $work"; else rm -rf "$work"; fi
  ((nfail == 0)) && exit 0 || exit 1
}
to_bytes() {   # 512M -> 536870912 (binary units); empty if not understood
  local v=${1^^}; v=${v%B}; v=${v%I}
  case $v in
    *K) echo $((${v%K} << 10)) ;; *M) echo $((${v%M} << 20)) ;; *G) echo $((${v%G} << 30)) ;;
    *T) echo $((${v%T} << 40)) ;; *[!0-9]*|'') echo "" ;; *) echo "$v" ;;
  esac
}
listening() { [[ -n $(ss -Hltn "sport = :$1" 2>/dev/null) ]]; }
free_port() { local p; for _ in $(seq 50); do p=$((20000 + RANDOM % 12000)); listening "$p" || break; done; echo "$p"; }

"$here/build.sh" || { echo "FAIL: building the guest"; exit 1; }
work=$(mktemp -d "${TMPDIR:-/tmp}/ballast-nbd-vm.XXXXXX")
[[ -n $port ]] || port=$(free_port)
listening "$port" && { echo "port $port is already in use" >&2; exit 2; }

# --- the server
expect=
case $server in
  ballast)
    bin=${BALLAST_BIN:-$root/build/cargo/release/ballast}
    [[ -x $bin ]] || { fail "no ballast binary at $bin (set BALLAST_BIN)"; summary; }
    if [[ -n $spec ]]; then
      case $spec in ram:*) expect=$(to_bytes "${spec#ram:}"); restart=0 ;;
                    file:*:*) expect=$(to_bytes "${spec##*:}") ;; esac
    else
      expect=$((1 << 30))
    fi ;;
  nbdkit) expect=$((512 << 20)); restart=0 ;;
  qemu-nbd) expect=$((512 << 20)); truncate -s 512M "$work/ref.img" ;;
esac
start_server() {   # start_server PORT LOG: sets spid, checks that it listens
  local p=$1 log=$2 args
  case $server in
    ballast)
      args=(serve --data-dir "$work/data" --nbd-listen "127.0.0.1:$p" --nvmf-listen "127.0.0.1:$(free_port)")
      [[ -n $spec ]] && args+=(--export "vol0=$spec")
      # shellcheck disable=SC2206
      args+=(${BALLAST_ARGS:-})
      echo "server: $bin ${args[*]}"
      "$bin" "${args[@]}" > "$log" 2>&1 & ;;
    nbdkit)
      echo "server: nbdkit -f -v -i 127.0.0.1 -p $p memory 512M"
      nbdkit -f -v -i 127.0.0.1 -p "$p" memory 512M > "$log" 2>&1 & ;;
    qemu-nbd)
      echo "server: qemu-nbd -f raw -b 127.0.0.1 -p $p -x vol0 -t -e 8 --cache=none $work/ref.img"
      qemu-nbd -f raw -b 127.0.0.1 -p "$p" -x vol0 -t -e 8 --cache=none "$work/ref.img" > "$log" 2>&1 & ;;
  esac
  spid=$!
  for _ in $(seq 100); do listening "$p" && break; kill -0 "$spid" 2>/dev/null || break; sleep 0.2; done
  if listening "$p"; then pass "server listening on 127.0.0.1:$p"; return 0; fi
  fail "server listening on 127.0.0.1:$p"; echo "--- $log"; tail -n 40 "$log"; return 1
}
stop_server() {   # stop_server WHEN: SIGTERM, must exit 0 within 30 s
  local src
  if ! kill -0 "$spid" 2>/dev/null; then
    wait "$spid"; src=$?; spid=
    fail "server still running $1 (it had exited with $src)"; return
  fi
  pass "server still running $1"
  kill -TERM "$spid"
  for _ in $(seq 150); do kill -0 "$spid" 2>/dev/null || break; sleep 0.2; done
  if kill -0 "$spid" 2>/dev/null; then
    fail "server exits within 30 s of SIGTERM ($1)"; kill -KILL "$spid"; wait "$spid" 2>/dev/null
  else
    wait "$spid"; src=$?
    ((src == 0)) && pass "server exit status 0 after SIGTERM ($1)" \
      || fail "server exit status 0 after SIGTERM ($1; got $src)"
  fi
  spid=
}
cleanup() {
  [[ -n $spid ]] && kill -0 "$spid" 2>/dev/null && { kill -KILL "$spid"; wait "$spid" 2>/dev/null; }
  [[ -n ${gpid:-} ]] && kill -0 "$gpid" 2>/dev/null && kill -TERM "$gpid" 2>/dev/null
}
trap cleanup EXIT

start_server "$port" "$work/server.log" || summary
if [[ $server == ballast && -z $spec ]]; then
  sz=$(stat -c %s "$work/data/pool.img" 2>/dev/null || echo none)
  [[ $sz == $((10 << 30)) ]] && pass "default pool data-dir/pool.img (holding vol0) is 10 GiB" \
    || fail "default pool data-dir/pool.img is 10 GiB (got $sz)"
fi
port2=
((restart)) && port2=$(free_port)
((restart)) || echo "(restart step skipped: $server${spec:+ $spec})"

# --- the guest
cat > "$work/params" <<EOF
NBD_PORT=$port
NBD_EXPORT=vol0
NBD_SIZE=$expect
NBD_BLOCK=${NBD_BLOCK:-}
FIO_SIZE=${FIO_SIZE:-64m}
RESTART_PORT=$port2
MULTI_CONN=$multi
EOF
vm_timeout=${BALLAST_VM_TIMEOUT:-420}
echo "=== guest (qemu TCG, limit ${vm_timeout}s; console follows)"
: > "$work/console"
{ BALLAST_VM_TIMEOUT=$vm_timeout "$here/run.sh" "$here/guest-nbd.sh" "$work/params" 2>&1
  echo $? > "$work/guest.rc"; } | tee "$work/console" &
gpid=$!
deadline=$(($(date +%s) + vm_timeout + 60)) restarted=0 logs=("$work/server.log")
while kill -0 "$gpid" 2>/dev/null && (($(date +%s) < deadline)); do
  if ((restart && !restarted)) && grep -aq '^GUEST-WAIT-RESTART' "$work/console"; then
    restarted=1
    echo "=== host: restarting the server (SIGTERM, then start again on port $port2)"
    stop_server "before restart"
    logs+=("$work/server2.log")
    start_server "$port2" "$work/server2.log"
  fi
  sleep 0.5
done
kill -0 "$gpid" 2>/dev/null && { kill -TERM "$gpid"; echo "host: guest overran its deadline"; }
wait "$gpid"
grc=$(cat "$work/guest.rc" 2>/dev/null || echo 99)
echo "=== guest exited $grc"
while IFS= read -r l; do
  case $l in PASS:*) npass=$((npass + 1)) ;; FAIL:*) nfail=$((nfail + 1)) ;; esac
done < <(grep -aE '^(PASS|FAIL): ' "$work/console")
if grep -aq '^GUEST-DONE' "$work/console"; then pass "guest script ran to the end"
else fail "guest script ran to the end (run.sh exit $grc)"; fi
((grc == 0)) && pass "guest script exit 0" || fail "guest script exit 0 (got $grc)"
((restart && !restarted)) && fail "the guest asked for the server restart"

# --- stop the server: SIGTERM, clean exit 0; its logs
if [[ -n $spid ]]; then stop_server "after the guest"; else fail "a server running after the guest"; fi
cat "${logs[@]}" > "$work/server-all.log"
if grep -qiE 'panick|RUST_BACKTRACE' "$work/server-all.log"; then
  fail "no panic in the server log"; grep -iE -A5 'panick' "$work/server-all.log" | head -n 30
else pass "no panic in the server log"; fi
if [[ $server == ballast ]]; then   # INTERFACE.md: one log line per connection open / close
  no=$(grep -c 'connection open' "$work/server-all.log") nc=$(grep -c 'connection closed' "$work/server-all.log")
  ((no > 0 && no == nc)) && pass "server log: every connection opened was closed ($no)" \
    || fail "server log: every connection opened was closed (opened $no, closed $nc)"
fi
for l in "${logs[@]}"; do
  echo "--- $(basename "$l") (last 20 of $(wc -l < "$l") lines)"; tail -n 20 "$l"
done
summary
