# shellcheck shell=bash
# Helpers for ballast's end-to-end shell tests.  Source it:
#
#   . "$(dirname "$0")/../lib.sh"
#   start_ballast --export mem=ram:64M      # sets PID PORT DATA_DIR RPC_SOCK BALLAST_LOG NBD_URI
#   check "nbdinfo sees the export" nbdinfo "$NBD_URI/mem"
#   stop_ballast                            # SIGTERM; checks the exit status is 0
#   finish                                  # prints "N passed, M failed"; exit 1 if M > 0
#
# Environment:
#   BALLAST_BIN        the binary (default: <repo>/build/cargo/release/ballast)
#   BALLAST_KEEP_TMP   if set, the scratch directory ($TEST_TMP) is kept and its path printed
#   BALLAST_START_TIMEOUT  seconds start_ballast waits for the port (default 10)
#   BALLAST_STOP_TIMEOUT   seconds stop_ballast waits after SIGTERM (default 30)
#
# Every check prints exactly one line ("PASS: ..." or "FAIL: ...").  Only 127.0.0.1 is used.

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export REPO_ROOT
# Tools that must behave the same whatever python3 the PATH finds (python3-libnbd is Debian's).
SYS_PY=/usr/bin/python3
export NO_COLOR=1

PASS_COUNT=0
FAIL_COUNT=0
PID=""
PORT=""
DATA_DIR=""
RPC_SOCK=""
BALLAST_LOG=""
NBD_URI=""
_CLEANUPS=()

TEST_TMP=$(mktemp -d "${TMPDIR:-/tmp}/ballast-test.XXXXXX")
export TEST_TMP
# nbdsh runs whatever `python3` the PATH finds; python3-libnbd belongs to /usr/bin/python3.
mkdir -p "$TEST_TMP/bin"
ln -s "$SYS_PY" "$TEST_TMP/bin/python3"
export PATH="$TEST_TMP/bin:$PATH"

ballast_bin() {
    if [[ -n ${BALLAST_BIN:-} ]]; then
        echo "$BALLAST_BIN"
    else
        echo "$REPO_ROOT/build/cargo/release/ballast"
    fi
}

# ballast_perf_bin: the NVMe/TCP initiator: BALLAST_PERF_BIN, else next to the daemon, else
# the build's.
ballast_perf_bin() {
    local bin=${BALLAST_PERF_BIN:-$(dirname "$(ballast_bin)")/ballast-perf}
    [[ -x $bin ]] || bin=$REPO_ROOT/build/cargo/release/ballast-perf
    echo "$bin"
}

# nvmf_addr: the NVMe/TCP listener start_ballast gave the daemon (empty without one).
nvmf_addr() {
    local i
    for ((i = 0; i + 1 < ${#EXTRA_LISTEN[@]}; i++)); do
        if [[ ${EXTRA_LISTEN[i]} == --nvmf-listen ]]; then
            echo "${EXTRA_LISTEN[i + 1]}"
            return
        fi
    done
}

# ---------------------------------------------------------------- reporting
pass() {
    PASS_COUNT=$((PASS_COUNT + 1))
    echo "PASS: $*"
}

# fail DESCRIPTION [DETAIL...]
fail() {
    FAIL_COUNT=$((FAIL_COUNT + 1))
    local what=$1; shift
    if (($#)); then echo "FAIL: $what -- $*"; else echo "FAIL: $what"; fi
}

# check DESCRIPTION CMD [ARGS...]: pass if CMD exits 0; on failure shows the tail of its output.
check() {
    local what=$1; shift
    local out rc=0
    out=$("$@" 2>&1) || rc=$?
    if ((rc == 0)); then
        pass "$what"
    else
        fail "$what" "exit $rc: $(tail -n 5 <<<"$out" | tr '\n' ' ')"
    fi
    return $rc
}

# check_fails DESCRIPTION CMD [ARGS...]: pass if CMD exits non-zero (and is not killed by timeout).
check_fails() {
    local what=$1; shift
    check_fails_saying "$what" "" "$@"
}

# check_fails_saying DESCRIPTION REGEX CMD [ARGS...]: pass if CMD exits non-zero (and is not
# killed by timeout) and what it printed matches the extended REGEX.
check_fails_saying() {
    local what=$1 regex=$2; shift 2
    local out rc=0
    out=$("$@" 2>&1) || rc=$?
    if ((rc != 0 && rc != 124 && rc != 137)) && grep -Eq -- "$regex" <<<"$out"; then
        pass "$what"
        return 0
    fi
    fail "$what" "expected failure saying /$regex/, got exit $rc: $(tail -n 3 <<<"$out" | tr '\n' ' ')"
    return 1
}

# check_eq DESCRIPTION EXPECTED ACTUAL
check_eq() {
    if [[ $2 == "$3" ]]; then pass "$1"; else fail "$1" "expected '$2', got '$3'"; fi
}

finish() {
    if [[ -n $PID ]] && kill -0 "$PID" 2>/dev/null; then
        stop_ballast
    fi
    if [[ -n $BALLAST_LOG && -f $BALLAST_LOG ]]; then
        if grep -q 'panicked' "$BALLAST_LOG"; then
            fail "server log has no panic" "$(grep -m3 'panicked' "$BALLAST_LOG" | tr '\n' ' ')"
        else
            pass "server log has no panic"
        fi
    fi
    echo "$PASS_COUNT passed, $FAIL_COUNT failed"
    if ((FAIL_COUNT > 0)); then exit 1; fi
    exit 0
}

# Prints the last lines of the server log (for diagnosing a failure).
show_log() {
    local n=${1:-30}
    if [[ -n $BALLAST_LOG && -f $BALLAST_LOG ]]; then
        echo "---- last $n lines of $BALLAST_LOG ----"
        tail -n "$n" "$BALLAST_LOG"
        echo "----"
    fi
}

# ---------------------------------------------------------------- cleanup
add_cleanup() { _CLEANUPS+=("$*"); }

_cleanup() {
    local rc=$?
    local c
    for c in "${_CLEANUPS[@]}"; do eval "$c" >/dev/null 2>&1 || true; done
    if [[ -n $PID ]] && kill -0 "$PID" 2>/dev/null; then
        kill -KILL "$PID" 2>/dev/null || true
        wait "$PID" 2>/dev/null || true
    fi
    if [[ -n ${BALLAST_KEEP_TMP:-} ]]; then
        echo "(kept scratch directory $TEST_TMP)" >&2
    else
        rm -rf "$TEST_TMP"
    fi
    exit $rc
}
trap _cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- ports
# is_port_free PORT: nothing listens there and we may bind it.
is_port_free() {
    "$SYS_PY" - "$1" <<'EOF' 2>/dev/null
import socket, sys
s = socket.socket()
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)
EOF
}

# free_port: prints a port on 127.0.0.1 that is free now (below the ephemeral range, so
# outgoing connections do not take it meanwhile).
free_port() {
    local i p
    for ((i = 0; i < 200; i++)); do
        p=$((20000 + RANDOM % 12000))
        if is_port_free "$p"; then echo "$p"; return 0; fi
    done
    echo "free_port: no free port found" >&2
    return 1
}

# port_open PORT: something accepts TCP connections on 127.0.0.1:PORT.
port_open() {
    timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
}

# ---------------------------------------------------------------- daemon
# new_data_dir: make a fresh data directory and set DATA_DIR to it.
new_data_dir() {
    DATA_DIR=$(mktemp -d "$TEST_TMP/data.XXXXXX")
    export DATA_DIR
}

# Listen options besides NBD that this binary has (each gets its own free port, so that several
# daemons can run side by side): e.g. --nvmf-listen.
_extra_listen_args() {
    local bin=$1 help opt
    help=$("$bin" serve --help 2>/dev/null)
    EXTRA_LISTEN=()
    for opt in --nvmf-listen; do
        if grep -q -- "$opt" <<<"$help"; then
            EXTRA_LISTEN+=("$opt" "127.0.0.1:$(free_port)")
        fi
    done
}

_start_once() {
    local bin=$1; shift
    RPC_SOCK=$DATA_DIR/ballast.sock
    _extra_listen_args "$bin"
    echo "=== $(date +%T) ballast serve --data-dir $DATA_DIR --nbd-listen 127.0.0.1:$PORT ${EXTRA_LISTEN[*]} $*" >>"$BALLAST_LOG"
    "$bin" serve --data-dir "$DATA_DIR" --nbd-listen "127.0.0.1:$PORT" "${EXTRA_LISTEN[@]}" \
        --rpc-socket "$RPC_SOCK" "$@" </dev/null >>"$BALLAST_LOG" 2>&1 &
    PID=$!
    local deadline=$((SECONDS + ${BALLAST_START_TIMEOUT:-10}))
    while ((SECONDS < deadline)); do
        if ! kill -0 "$PID" 2>/dev/null; then
            wait "$PID" 2>/dev/null; local rc=$?
            PID=""
            return $((rc == 0 ? 1 : rc))
        fi
        if port_open "$PORT" && [[ -S $RPC_SOCK ]]; then
            return 0
        fi
        sleep 0.1
    done
    echo "start_ballast: port $PORT not accepting connections after ${BALLAST_START_TIMEOUT:-10}s" >&2
    kill -KILL "$PID" 2>/dev/null; wait "$PID" 2>/dev/null
    PID=""
    return 124
}

# start_ballast [SERVE-ARGS...]
#   Starts `ballast serve` in the background with --data-dir $DATA_DIR (a fresh one unless
#   DATA_DIR is already set: restart with the same data by keeping it), --nbd-listen on PORT
#   (kept if set, else a free one), other listeners the binary has (--nvmf-listen) on free
#   ports, --rpc-socket $DATA_DIR/ballast.sock; stderr/stdout appended
#   to $BALLAST_LOG.  Waits (max BALLAST_START_TIMEOUT s) until the port accepts connections and
#   the control socket exists.  Exports PID PORT DATA_DIR RPC_SOCK BALLAST_LOG NBD_URI.
#   Returns non-zero (and records a FAIL) if the daemon does not come up.
start_ballast() {
    local bin
    bin=$(ballast_bin)
    if [[ ! -x $bin ]]; then
        fail "start ballast" "binary $bin missing (build it, or set BALLAST_BIN)"
        return 1
    fi
    [[ -n $DATA_DIR && -d $DATA_DIR ]] || new_data_dir
    [[ -n $BALLAST_LOG ]] || BALLAST_LOG=$TEST_TMP/ballast.log
    touch "$BALLAST_LOG"
    local attempt rc=1
    for ((attempt = 0; attempt < 5; attempt++)); do
        [[ -n $PORT ]] || PORT=$(free_port) || return 1
        local before
        before=$(wc -l <"$BALLAST_LOG")
        _start_once "$bin" "$@" && { rc=0; break; }
        rc=$?
        # Lost a race for the port (or the old socket lingers): try another port.
        if tail -n +"$((before + 1))" "$BALLAST_LOG" | grep -qi 'address already in use'; then
            echo "(port $PORT in use, retrying on another port)" >&2
            PORT=""
            continue
        fi
        break
    done
    if ((rc != 0)); then
        fail "start ballast ($*)" "daemon did not come up (rc $rc)"
        show_log 20
        return 1
    fi
    NBD_URI=nbd://127.0.0.1:$PORT
    export PID PORT DATA_DIR RPC_SOCK BALLAST_LOG NBD_URI
    return 0
}

# stop_ballast: SIGTERM, wait (max BALLAST_STOP_TIMEOUT s), check the exit status is 0.
stop_ballast() {
    if [[ -z $PID ]]; then
        fail "stop ballast" "no daemon running"
        return 1
    fi
    local pid=$PID
    PID=""
    kill -TERM "$pid" 2>/dev/null
    local deadline=$((SECONDS + ${BALLAST_STOP_TIMEOUT:-30}))
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
        # Zombie check: kill -0 succeeds on a zombie too; wait reaps it below.
        if [[ $(ps -o stat= -p "$pid" 2>/dev/null) != Z* ]]; then
            kill -KILL "$pid" 2>/dev/null
            wait "$pid" 2>/dev/null
            fail "ballast exits after SIGTERM" "still running after ${BALLAST_STOP_TIMEOUT:-30}s; killed"
            show_log 20
            return 1
        fi
    fi
    local rc=0
    wait "$pid" || rc=$?
    if ((rc == 0)); then
        pass "ballast exits 0 after SIGTERM"
    else
        fail "ballast exits 0 after SIGTERM" "exit status $rc"
        show_log 20
        return 1
    fi
}

# ballast_ctl ARGS...: run the control CLI against the running daemon's socket,
# e.g. `ballast_ctl export list --json`.  The socket option goes after the subcommand words.
ballast_ctl() {
    local bin
    bin=$(ballast_bin)
    case $1 in
        export) timeout 30 "$bin" "$1" "$2" "${@:3}" --rpc-socket "$RPC_SOCK" ;;
        *) timeout 30 "$bin" "$1" "${@:2}" --rpc-socket "$RPC_SOCK" ;;
    esac
}

# Bytes of random data: rand_file PATH MIB
rand_file() {
    head -c "$(($2 * 1024 * 1024))" /dev/urandom >"$1"
}

sha() { sha256sum "$1" | cut -d' ' -f1; }

# ---------------------------------------------------------------- SPDK's RPC client
# need_spdk_rpc: sets SPDK_RPC to `spdk-rpc` from PyPI's `spdk` package, in a venv cached in
# $XDG_CACHE_HOME (or build/) and made on first use.  When PyPI cannot be reached it prints
# SKIP and "0 passed, 0 failed" and exits 0; another failure is a FAIL and finishes the suite.
need_spdk_rpc() {
    local cache=${XDG_CACHE_HOME:-$REPO_ROOT/build}
    SPDK_VENV=$cache/ballast-spdk-venv
    SPDK_RPC=$SPDK_VENV/bin/spdk-rpc
    [[ -x $SPDK_RPC ]] && return 0
    rm -rf "$SPDK_VENV"
    mkdir -p "$cache"
    if ! "$SYS_PY" -m venv "$SPDK_VENV" >"$TEST_TMP/venv.log" 2>&1; then
        fail "python3 -m venv (install python3-venv)" "$(tail -n 3 "$TEST_TMP/venv.log" | tr '\n' ' ')"
        finish
    fi
    if ! timeout 300 "$SPDK_VENV/bin/pip" install -q --disable-pip-version-check spdk \
        >"$TEST_TMP/pip.log" 2>&1; then
        if grep -qiE 'connection|resolve|network|timed out|No matching distribution' "$TEST_TMP/pip.log"; then
            echo "SKIP: pip cannot reach PyPI to install spdk ($(tail -n 1 "$TEST_TMP/pip.log"))"
            rm -rf "$SPDK_VENV"
            echo "0 passed, 0 failed"
            exit 0
        fi
        fail "pip install spdk" "$(tail -n 3 "$TEST_TMP/pip.log" | tr '\n' ' ')"
        rm -rf "$SPDK_VENV"
        finish
    fi
}

# rpc ARGS...: spdk-rpc (need_spdk_rpc) against the daemon start_ballast started (stdout:
# the result; stderr: the error response).
rpc() { timeout 60 "$SPDK_RPC" -s "$RPC_SOCK" "$@"; }
# py EXPR < JSON: evaluate EXPR with `j` bound to the JSON on stdin.
py() { "$SYS_PY" -c 'import json,sys; j=json.load(sys.stdin); print(eval(sys.argv[1]))' "$1"; }
# rpc_error ARGS...: "CODE MESSAGE" of the error spdk-rpc got (it prints the response on stdout).
rpc_error() {
    local out
    if out=$(rpc "$@" 2>&1); then echo "succeeded"; return; fi
    "$SYS_PY" -c '
import json, re, sys
t = sys.stdin.read()
m = re.search(r"response:\s*(\{.*?\})", t, re.S)
if not m:
    print("unparsed: " + t[-200:].replace("\n", " ")); sys.exit()
r = json.loads(m.group(1))
print(r["code"], r["message"])' <<<"$out"
}

# spdk_rpc_version: "spdk X.Y.Z", the installed package's version.
spdk_rpc_version() {
    "$SPDK_VENV/bin/pip" show spdk 2>/dev/null | sed -n 's/^Version: /spdk /p'
}
