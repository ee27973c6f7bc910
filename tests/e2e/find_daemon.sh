#!/bin/bash
# The CLI finds the daemon from any directory. `serve` with its default socket leaves a pointer
# ($XDG_RUNTIME_DIR/ballast/ctl.sock, a symlink in a 0700 directory) and logs where its socket
# is; the CLI, told nothing, tries ./ballast-data/ballast.sock, then that pointer, then
# /run/ballast/ctl.sock. A live daemon's pointer is never replaced by another daemon; a stale one
# is; a clean stop removes the daemon's own pointer. A pointer in a directory others may write is
# not followed. With no daemon, the error lists every place looked at.
# XDG_RUNTIME_DIR is a scratch directory: nothing is written to /run.
set -u -o pipefail
. "$(dirname "$0")/../lib.sh"

T=$TEST_TMP
bin=$(ballast_bin)
export XDG_RUNTIME_DIR=$T/xdg
unset BALLAST_RPC_SOCKET
mkdir -m 700 "$XDG_RUNTIME_DIR"
mkdir "$T/srv1" "$T/srv2" "$T/elsewhere"
POINTER=$XDG_RUNTIME_DIR/ballast/ctl.sock
SOCK1=$T/srv1/ballast-data/ballast.sock
SOCK2=$T/srv2/ballast-data/ballast.sock
BALLAST_LOG=$T/ballast.log
touch "$BALLAST_LOG"

# serve_in DIR [SERVE-ARGS...]: `ballast serve` started in DIR with its default data dir and
# socket (free ports for NBD and NVMe/TCP); sets PID; waits until it logs "ballast serving".
serve_in() {
    local dir=$1 before i; shift
    before=$(grep -c "ballast serving" "$BALLAST_LOG")
    echo "=== $(date +%T) serve in $dir $*" >>"$BALLAST_LOG"
    (cd "$dir" && exec "$bin" serve --nbd-listen "127.0.0.1:$(free_port)" \
        --nvmf-listen "127.0.0.1:$(free_port)" "$@" </dev/null >>"$BALLAST_LOG" 2>&1) &
    PID=$!
    add_cleanup "kill -KILL $PID"
    for ((i = 0; i < 300; i++)); do
        (($(grep -c "ballast serving" "$BALLAST_LOG") > before)) && return 0
        kill -0 "$PID" 2>/dev/null || break
        sleep 0.1
    done
    fail "serve in $dir comes up" "$(tail -n 5 "$BALLAST_LOG" | tr '\n' ' ')"
    finish
}

# cli_in DIR ARGS...: the CLI run from DIR, told nothing about where the daemon is.
cli_in() {
    local dir=$1; shift
    (cd "$dir" && timeout 30 "$bin" "$@")
}

# A daemon of the machine's own at /run/ballast would be found where these expect none.
system_daemon=0
if "$bin" stats --rpc-socket /run/ballast/ctl.sock >/dev/null 2>&1; then
    system_daemon=1
    echo "NOTE: a daemon answers at /run/ballast/ctl.sock: the no-daemon checks are skipped"
fi

##############################################################################################
echo "## a daemon in srv1 (the default pool), the CLI elsewhere"
serve_in "$T/srv1"
D1=$PID
grep -q "control API listening (mode 0600).*socket=$SOCK1 " "$BALLAST_LOG" &&
    pass "serve logs its control socket's absolute path" ||
    fail "serve logs its control socket's absolute path" "$(grep -m1 'control API' "$BALLAST_LOG")"
grep -q "control socket pointer published pointer=$POINTER socket=$SOCK1" "$BALLAST_LOG" &&
    pass "serve logs the pointer it left" ||
    fail "serve logs the pointer it left" "$(grep -m1 'pointer' "$BALLAST_LOG")"
check_eq "the pointer is a symlink to the daemon's socket" "$SOCK1" "$(readlink "$POINTER")"
check_eq "the pointer's directory is 0700" 700 "$(stat -c %a "$XDG_RUNTIME_DIR/ballast")"
check_eq "the socket is still 0600" 600 "$(stat -c %a "$SOCK1")"

check "stats from another directory finds the daemon through the pointer" \
    cli_in "$T/elsewhere" stats
out=$(cli_in "$T/elsewhere" volume list 2>&1)
grep -q "^vol0 " <<<"$out" && pass "volume list from another directory shows vol0" ||
    fail "volume list from another directory shows vol0" "$out"
check "export list from the daemon's own directory (./ballast-data)" cli_in "$T/srv1" export list
check "--rpc-socket PATH" cli_in "$T/elsewhere" stats --rpc-socket "$SOCK1"
check "--data-dir DIR" cli_in "$T/elsewhere" stats --data-dir "$T/srv1/ballast-data"
check "BALLAST_RPC_SOCKET=PATH" env BALLAST_RPC_SOCKET="$SOCK1" XDG_RUNTIME_DIR= \
    bash -c "cd '$T/elsewhere' && '$bin' stats"
out=$(cli_in "$T/elsewhere" stats --data-dir "$T/nowhere" 2>&1); rc=$?
if ((rc != 0)) && grep -q "cannot reach the daemon at $T/nowhere/ballast.sock" <<<"$out"; then
    pass "an explicit --data-dir is the only place looked at ($out)"
else
    fail "an explicit --data-dir is the only place looked at" "exit $rc: $out"
fi

##############################################################################################
echo "## a second daemon (srv2) leaves the first one's live pointer alone"
serve_in "$T/srv2" --export m2=ram:16M
D2=$PID
grep -q "another live daemon's pointer" "$BALLAST_LOG" &&
    pass "the second daemon says it leaves the live pointer" ||
    fail "the second daemon says it leaves the live pointer"
check_eq "the pointer still names the first daemon" "$SOCK1" "$(readlink "$POINTER")"
names=$(cli_in "$T/srv2" export list --json | "$SYS_PY" -c \
    'import json,sys; print(" ".join(e["name"] for e in json.load(sys.stdin)))')
check_eq "from srv2, ./ballast-data comes first: the second daemon" m2 "$names"
stop_ballast
check_eq "its stop leaves the first daemon's pointer" "$SOCK1" "$(readlink "$POINTER")"
[[ ! -e $SOCK2 ]] && pass "its socket is gone" || fail "its socket is gone"

echo "## a pointer in a directory others may write is not followed"
chmod 777 "$XDG_RUNTIME_DIR/ballast"
out=$(cli_in "$T/elsewhere" stats 2>&1); rc=$?
if ((system_daemon)); then
    echo "SKIP: untrusted pointer (a system daemon answers)"
elif ((rc != 0)) && grep -q "$POINTER: not followed: .* is writable by others (mode 777)" <<<"$out"
then
    pass "the CLI refuses a pointer in a 0777 directory"
else
    fail "the CLI refuses a pointer in a 0777 directory" "exit $rc: $out"
fi
chmod 700 "$XDG_RUNTIME_DIR/ballast"

echo "## a ./ballast-data another user owns is not used (nor, then, the pointer in a 0777 dir)"
chown 65534 "$T/srv1/ballast-data"
chmod 777 "$XDG_RUNTIME_DIR/ballast"
out=$(cli_in "$T/srv1" stats 2>&1); rc=$?
if ((system_daemon)); then
    echo "SKIP: another user's ./ballast-data (a system daemon answers)"
elif ((rc != 0)) &&
    grep -q "$SOCK1: not followed: ballast-data is owned by uid 65534, not root" <<<"$out"; then
    pass "the CLI does not use a socket in another user's ./ballast-data"
else
    fail "the CLI does not use a socket in another user's ./ballast-data" "exit $rc: $out"
fi
chown 0 "$T/srv1/ballast-data"
chmod 700 "$XDG_RUNTIME_DIR/ballast"
check "its own again, ./ballast-data is used" cli_in "$T/srv1" stats

##############################################################################################
echo "## kill -9: a stale pointer, reported and then replaced"
kill -KILL "$D1"
wait "$D1" 2>/dev/null
out=$(cli_in "$T/elsewhere" stats 2>&1); rc=$?
if ((system_daemon)); then
    echo "SKIP: stale pointer report (a system daemon answers)"
elif ((rc != 0)) && grep -q "$POINTER: stale: no daemon listening" <<<"$out"; then
    pass "the CLI reports the stale pointer"
else
    fail "the CLI reports the stale pointer" "exit $rc: $out"
fi
serve_in "$T/srv2" --export m2=ram:16M
check_eq "a new daemon replaces the stale pointer" "$SOCK2" "$(readlink "$POINTER")"
names=$(cli_in "$T/elsewhere" export list --json | "$SYS_PY" -c \
    'import json,sys; print(" ".join(e["name"] for e in json.load(sys.stdin)))')
check_eq "from elsewhere the CLI reaches the new daemon" m2 "$names"
stop_ballast
[[ ! -e $POINTER && ! -L $POINTER ]] && pass "a clean stop removes the daemon's pointer" ||
    fail "a clean stop removes the daemon's pointer" "$(ls -l "$POINTER")"

##############################################################################################
echo "## no daemon: the error lists every place looked at"
if ((system_daemon)); then
    echo "SKIP: no-daemon errors (a system daemon answers)"
else
    out=$(cli_in "$T/elsewhere" stats 2>&1); rc=$?
    ok=1
    for place in "$T/elsewhere/ballast-data/ballast.sock" "$POINTER" /run/ballast/ctl.sock; do
        grep -q "^  $place: " <<<"$out" || ok=0
    done
    if ((rc != 0 && ok)) && grep -q "no running daemon found" <<<"$out"; then
        pass "no daemon: exit 1, the three places listed"
        echo "$out" | sed 's/^/    /'
    else
        fail "no daemon: exit 1, the three places listed" "exit $rc: $out"
    fi
    out=$(cd "$T/elsewhere" && env -u XDG_RUNTIME_DIR "$bin" volume list 2>&1); rc=$?
    lines=$(grep -c "^  /" <<<"$out")
    if ((rc != 0 && lines == 2)) && ! grep -q "$XDG_RUNTIME_DIR" <<<"$out"; then
        pass "without XDG_RUNTIME_DIR: two places listed"
    else
        fail "without XDG_RUNTIME_DIR: two places listed" "exit $rc: $out"
    fi
fi
finish
