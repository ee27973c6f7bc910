#!/bin/bash
# The control socket is private and bounded: mode 0600 and owned by the daemon's user; only root
# and the daemon's user are served (SO_PEERCRED, checked even when the file mode would let
# others in); one request is at most --rpc-max-request bytes (1M); at most --rpc-max-clients (16)
# clients are served at once, without a thread for the others; a silent or slow client is closed
# after --rpc-idle-timeout seconds (60) and frees its slot; refusals are logged rate-limited.
# The other-uid checks run as `nobody` (uid 65534) and need root; they are skipped otherwise.
set -u -o pipefail
. "$(dirname "$0")/../lib.sh"

T=$TEST_TMP
NOBODY=(setpriv --reuid=65534 --regid=65534 --clear-groups)
as_root=0
[[ $(id -u) == 0 ]] && as_root=1

# poke SOCK PYTHON-BODY [ARGS...]: run PYTHON-BODY with helpers; sys.argv[1:] = ARGS.
#   call(payload_bytes) -> the reply (dict) or None on EOF; connect() -> a connected socket;
#   reply(sock, timeout) -> the next reply, None on EOF, "timeout" if nothing came.
poke() {
    local sock=$1 body=$2; shift 2
    "$SYS_PY" - "$@" <<EOF
import json, os, socket, sys, time
SOCK = "$sock"
def connect():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(SOCK)
    return s
BUF = {}
def reply(s, timeout=5.0):
    s.settimeout(timeout)
    dec = json.JSONDecoder()
    while True:
        text = BUF.get(s, b"").decode(errors="replace").lstrip()
        if text:
            try:
                value, end = dec.raw_decode(text)
                BUF[s] = text[end:].encode()
                return value
            except ValueError:
                pass
        try:
            chunk = s.recv(65536)
        except socket.timeout:
            return "timeout"
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return None
        BUF[s] = BUF.get(s, b"") + chunk
def call(payload, timeout=10.0):
    s = connect()
    try:
        s.sendall(payload)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the daemon refused and closed before reading it all; its reply says why
    r = reply(s, timeout)
    s.close()
    return r
def req(method, params=None, pad=0):
    # The padding is a member of the request object beside "params" (JSON-RPC ignores it):
    # methods refuse unknown parameters.
    r = {"jsonrpc": "2.0", "id": 7, "method": method, "params": dict(params or {})}
    if pad:
        r["pad"] = "a" * pad
    return json.dumps(r).encode()
def err(r):
    return r.get("error", {}).get("message", "") if isinstance(r, dict) else repr(r)
$body
EOF
}

threads() { ls "/proc/$PID/task" | wc -l; }
denied_lines() { grep -c "control client refused: not root" "$BALLAST_LOG"; }

##############################################################################################
echo "## phase 1: default limits"
start_ballast --export mem=ram:16M || finish
bin=$(ballast_bin)

mode=$(stat -c %a "$RPC_SOCK")
check_eq "socket is mode 0600" 600 "$mode"
daemon_uid=$(awk '/^Uid:/ {print $3}' "/proc/$PID/status")
check_eq "socket is owned by the daemon's (effective) user" "$daemon_uid" "$(stat -c %u "$RPC_SOCK")"
leftover=$(find "$DATA_DIR" -maxdepth 1 -name '.ballast-rpc.*' | wc -l)
check_eq "no private bind directory is left behind" 0 "$leftover"
check "the daemon's user (root) can call ballast stats" ballast_ctl stats
# No pool: SPDK's listings of lvol stores and lvols are empty (spdk-csi lists them first);
# asking for a store by name is -19.
check_eq "no pool: bdev_lvol_get_lvstores and bdev_lvol_get_lvols list nothing" "[] []" \
    "$(ballast_ctl rpc bdev_lvol_get_lvstores | tr -d ' \n') $(ballast_ctl rpc bdev_lvol_get_lvols | tr -d ' \n')"
out=$(ballast_ctl rpc bdev_lvol_get_lvstores '{"lvs_name":"lvs0"}' 2>&1)
if grep -q "No such device" <<<"$out"; then pass "no pool: bdev_lvol_get_lvstores -l lvs0 is -19 No such device"
else fail "no pool: bdev_lvol_get_lvstores -l lvs0" "$out"; fi
grep -q "control API listening (mode 0600).*max_clients=16 max_request_bytes=1048576 idle_timeout_s=60" \
    "$BALLAST_LOG" && pass "log states the default limits" || fail "log states the default limits"

# ---- another uid
if ((as_root)); then
    # Let nobody reach the socket's directory: only the socket's own mode keeps it out.
    chmod 755 "$TEST_TMP" "$DATA_DIR"
    cp "$bin" "$T/ballast-nobody" && chmod 755 "$T/ballast-nobody"
    out=$("${NOBODY[@]}" "$T/ballast-nobody" stats --rpc-socket "$RPC_SOCK" 2>&1); rc=$?
    if ((rc != 0)) && grep -q "permission denied: the control socket .* is only for root and the daemon's user" <<<"$out"; then
        pass "nobody cannot connect to the 0600 socket (CLI: $out)"
    else
        fail "nobody cannot connect to the 0600 socket" "exit $rc: $out"
    fi

    # Make the file reachable: SO_PEERCRED must still refuse, and run nothing.
    chmod 0666 "$RPC_SOCK"
    out=$("${NOBODY[@]}" "$T/ballast-nobody" rpc export_add '{"name":"evil","ram_size":"1M"}' \
        --rpc-socket "$RPC_SOCK" 2>&1); rc=$?
    if ((rc != 0)) && grep -q "permission denied: uid 65534 is not root or the daemon's user" <<<"$out"; then
        pass "SO_PEERCRED refuses nobody through a 0666 socket (CLI: $out)"
    else
        fail "SO_PEERCRED refuses nobody through a 0666 socket" "exit $rc: $out"
    fi
    out=$("${NOBODY[@]}" "$SYS_PY" - "$RPC_SOCK" <<'EOF' 2>&1
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
try:
    s.sendall(b'{"jsonrpc":"2.0","id":1,"method":"export_add","params":{"name":"evil2","ram_size":"1M"}}')
except OSError:
    pass
data = b""
while True:
    try:
        c = s.recv(4096)
    except ConnectionResetError:
        break  # the refusal came, then the daemon closed with our request unread
    if not c:
        break
    data += c
r = json.loads(data)
print(r["error"]["code"], r["error"]["message"])
EOF
    )
    if grep -q "^-32000 permission denied: uid 65534 is not root or the daemon's user" <<<"$out"; then
        pass "raw JSON-RPC from nobody gets a permission-denied error ($out)"
    else
        fail "raw JSON-RPC from nobody gets a permission-denied error" "$out"
    fi
    names=$(ballast_ctl export list --json | "$SYS_PY" -c 'import json,sys; print(" ".join(e["name"] for e in json.load(sys.stdin)))')
    check_eq "no method ran for nobody (exports unchanged)" "mem" "$names"

    # A flood of refused peers: the warning is rate-limited (1st, 2nd, 4th, ... 64th).
    before=$(denied_lines)
    "${NOBODY[@]}" "$SYS_PY" - "$RPC_SOCK" <<'EOF'
import socket, sys
for _ in range(100):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sys.argv[1])
    s.recv(4096)
    s.close()
EOF
    sleep 0.3
    after=$(denied_lines)
    logged=$((after - before))
    # 102 refusals in all so far: lines at 1, 2, 4, ..., 64 = 7; 5 of them come from the flood.
    if ((logged >= 1 && logged <= 6)); then
        pass "100 refused connections log $logged warning lines, not 100"
    else
        fail "refusals are rate-limited in the log" "$logged lines for 100 refusals"
    fi
    chmod 0600 "$RPC_SOCK"
else
    echo "SKIP: other-uid checks need root"
fi

# ---- request size (1 MiB)
out=$(poke "$RPC_SOCK" '
r = call(req("export_list", pad=2 << 20))
print(err(r))
')
check_eq "a 2 MiB request gets 'request too large'" "request too large (limit 1048576 bytes)" "$out"
check "the daemon keeps serving after a too-large request" ballast_ctl stats
out=$(poke "$RPC_SOCK" '
r = call(req("export_list", pad=1000 * 1024))
print("ok" if isinstance(r, dict) and r.get("result") else err(r))
')
check_eq "a 1000 KiB request (under the limit) is served" ok "$out"
# SPDK's client sends no newline: two requests back to back on one connection, none in between.
out=$(poke "$RPC_SOCK" '
s = connect()
s.sendall(req("rpc_get_methods") + req("export_list"))
a, b = reply(s), reply(s)
print(isinstance(a, dict) and "export_list" in a["result"], isinstance(b, dict) and b["result"][0]["name"])
')
check_eq "requests without newlines still work, several per connection" "True mem" "$out"
out=$(poke "$RPC_SOCK" '
r = call(b"{\"jsonrpc\": \"2.0\", \"id\": 1, \"method\": ]}")
print(r["error"]["code"] if isinstance(r, dict) else r)
')
check_eq "malformed JSON gets a parse error" -32700 "$out"

# ---- concurrent clients (16)
sleep 0.3   # let the slots of the clients above go
base=$(threads)
out=$(poke "$RPC_SOCK" '
held = []
for _ in range(20):
    held.append(connect())
    time.sleep(0.02)
time.sleep(0.5)
got = [reply(s, 0.05) for s in held]
idle = sum(1 for g in got if g == "timeout")
busy = [err(g) for g in got if isinstance(g, dict)]
ok = got[:16] == ["timeout"] * 16 and busy == ["too many control clients (limit 16)"] * 4
print("ok" if ok else f"idle={idle} refused={busy}")
' )
check_eq "20 idle clients: 16 served, the 17th-20th get 'too many control clients (limit 16)'" ok "$out"
sleep 0.5
check "after they close, a new client is served" ballast_ctl stats

# Held: 16 idle clients; then the CLI is refused with the limit in its message.
poke "$RPC_SOCK" '
held = [connect() for _ in range(16)]
time.sleep(3)
' &
holder=$!
add_cleanup "kill $holder"
sleep 1
out=$(ballast_ctl stats 2>&1); rc=$?
if ((rc != 0)) && grep -q "too many control clients (limit 16)" <<<"$out"; then
    pass "the CLI says 'too many control clients' when the slots are taken ($out)"
else
    fail "the CLI says 'too many control clients' when the slots are taken" "exit $rc: $out"
fi
wait "$holder"

# 100 clients connecting at once: the thread count never passes base + 16.
sleep 0.3
base=$(threads)
out=$(poke "$RPC_SOCK" '
import threading
pid = sys.argv[1]
held, lock = [], threading.Lock()
def one():
    try:
        s = connect()
        with lock:
            held.append(s)
    except OSError:
        pass
ts = [threading.Thread(target=one) for _ in range(100)]
for t in ts: t.start()
peak = 0
for _ in range(20):
    peak = max(peak, len(os.listdir(f"/proc/{pid}/task")))
    time.sleep(0.05)
for t in ts: t.join()
time.sleep(0.3)
refused = sum(1 for s in held if isinstance(reply(s, 0.02), dict))
peak = max(peak, len(os.listdir(f"/proc/{pid}/task")))
print(peak, len(held), refused)
' "$PID")
read -r peak connected refused <<<"$out"
echo "threads: $base before, peak $peak with $connected connected clients ($refused refused)"
if [[ -n ${peak:-} ]] && ((peak <= base + 16)); then
    pass "100 clients: the daemon's threads stay within the bound ($peak <= $base + 16)"
else
    fail "100 clients: the daemon's threads stay within the bound" "peak ${peak:-?}, base $base"
fi
check_eq "100 clients: all but 16 were refused" 84 "${refused:-?}"
sleep 0.3
sleep 0.5
check "after the 100 clients, the daemon serves" ballast_ctl stats
stop_ballast

##############################################################################################
echo "## phase 2: the flags, a stale socket, idle and slow clients"
# A stale socket (nobody listening) left at the path: the daemon replaces it.
"$SYS_PY" -c 'import socket,sys; socket.socket(socket.AF_UNIX).bind(sys.argv[1])' "$RPC_SOCK"
start_ballast --export mem=ram:16M --rpc-max-clients 2 --rpc-max-request 4K --rpc-idle-timeout 2 ||
    finish
# start_ballast saw the stale file: wait until the control API is up.
for ((i = 0; i < 50; i++)); do
    (($(grep -c "control API listening" "$BALLAST_LOG") >= 2)) && break
    sleep 0.1
done
check_eq "a stale socket is replaced by a 0600 one" 600 "$(stat -c %a "$RPC_SOCK")"
out=$(poke "$RPC_SOCK" '
print(err(call(req("export_list", pad=5000))), "|", "ok" if call(req("export_list", pad=3000)).get("result") else "no")
')
check_eq "--rpc-max-request 4K: 5000 bytes refused, 3000 served" \
    "request too large (limit 4096 bytes) | ok" "$out"
out=$(poke "$RPC_SOCK" '
time.sleep(0.3)
held = [connect() for _ in range(3)]
print(err(reply(held[2], 1.0)))
')
check_eq "--rpc-max-clients 2: the third client is refused" "too many control clients (limit 2)" "$out"
out=$(poke "$RPC_SOCK" '
time.sleep(0.3)
held = [connect() for _ in range(2)]
t0 = time.monotonic()
closed = [reply(s, 6.0) for s in held]
waited = time.monotonic() - t0
# Their slots are free again although they never closed: a new client is served.
r = call(req("export_list"))
print(closed == [None, None] and 1.5 < waited < 5.0, isinstance(r, dict) and "result" in r)
')
check_eq "--rpc-idle-timeout 2: silent clients are closed after ~2 s and free their slots" \
    "True True" "$out"
out=$(poke "$RPC_SOCK" '
s = connect()
t0 = time.monotonic()
closed_after = None
for c in req("export_list").decode():
    try:
        s.sendall(c.encode())
    except OSError:
        closed_after = time.monotonic() - t0
        break
    time.sleep(0.5)
print(closed_after is not None and closed_after < 5.0)
')
check_eq "a client dribbling one request (a byte per 0.5 s) is closed after the timeout" True "$out"
check "the daemon serves after idle and slow clients" ballast_ctl stats
stop_ballast

# ---- bad flag values are refused with a clear message
for bad in "--rpc-max-request 0" "--rpc-max-request 2G" "--rpc-max-request lots" \
           "--rpc-max-clients 0" "--rpc-idle-timeout 0"; do
    # shellcheck disable=SC2086
    out=$("$bin" serve --data-dir "$T/never" $bad 2>&1); rc=$?
    if ((rc != 0)) && grep -q "invalid value .* for '${bad%% *}" <<<"$out"; then
        pass "serve $bad is refused: $(head -n1 <<<"$out")"
    else
        fail "serve $bad is refused" "exit $rc: $out"
    fi
done
[[ ! -e $T/never ]] && pass "a refused flag starts nothing" || fail "a refused flag starts nothing"
finish
