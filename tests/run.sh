#!/bin/bash
# The test command for the whole ballast suite.
#
#   tests/run.sh [--quick] [--no-cargo] [--no-install] [SUITE-PATTERN...]
#
#   --quick       skip the VM-based kernel tests (tests/vm/test-*.sh)
#   --no-cargo    skip `cargo build --release` and `cargo test` (use the binary already built)
#   --no-install  never try to apt-get install missing tools
#   SUITE-PATTERN only run e2e/vm suites whose path contains one of these substrings
#
# Steps: install missing tools (Debian packages) -> cargo build --release -> cargo test
# --workspace --release -> every tests/e2e/*.sh and tests/e2e/*.py (Python ones with
# /usr/bin/python3, which owns python3-libnbd) -> tests/vm/test-*.sh (unless --quick).  Each
# suite starts its own ballast on a free 127.0.0.1 port.  Prints one line per suite and a final
# "N passed, M failed" over suites; exits non-zero if any suite failed.
#
# Environment: BALLAST_BIN (binary under test; default build/cargo/release/ballast),
#   BALLAST_SUITE_TIMEOUT (seconds per e2e suite, default 900),
#   BALLAST_VM_SUITE_TIMEOUT (seconds per VM suite, default 1800).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 2

quick=0 cargo=1 install=1
patterns=()
for a in "$@"; do
    case $a in
        --quick) quick=1 ;;
        --no-cargo) cargo=0 ;;
        --no-install) install=0 ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        -*) echo "run.sh: unknown option $a" >&2; exit 2 ;;
        *) patterns+=("$a") ;;
    esac
done

export BALLAST_BIN=${BALLAST_BIN:-${CARGO_TARGET_DIR:-$ROOT/build/cargo}/release/ballast}
SUITE_TIMEOUT=${BALLAST_SUITE_TIMEOUT:-900}
VM_TIMEOUT=${BALLAST_VM_SUITE_TIMEOUT:-1800}
export NO_COLOR=1

passed=0 failed=0
failed_names=()
say() { echo "run.sh: $*"; }

record() {   # record NAME RC SECONDS
    if (($2 == 0)); then
        passed=$((passed + 1)); echo "SUITE PASS: $1 (${3}s)"
    else
        failed=$((failed + 1)); failed_names+=("$1"); echo "SUITE FAIL: $1 (exit $2, ${3}s)"
    fi
}

# run_suite NAME TIMEOUT CMD...
run_suite() {
    local name=$1 limit=$2; shift 2
    echo
    echo "======== $name"
    local t0=$SECONDS rc=0
    timeout --kill-after=15 "$limit" "$@" || rc=$?
    ((rc == 124)) && echo "run.sh: $name timed out after ${limit}s"
    record "$name" "$rc" $((SECONDS - t0))
}

selected() {
    ((${#patterns[@]} == 0)) && return 0
    local p
    for p in "${patterns[@]}"; do [[ $1 == *"$p"* ]] && return 0; done
    return 1
}

# ------------------------------------------------------------------ tools
# command -> Debian package
declare -A PKG=(
    [nbdkit]=nbdkit [nbdinfo]=libnbd-bin [nbdcopy]=libnbd-bin [nbdsh]=libnbd-bin
    [fio]=fio [qemu-img]=qemu-utils [qemu-nbd]=qemu-utils [nbd-client]=nbd-client
    [sha256sum]=coreutils [timeout]=coreutils [ss]=iproute2 [prometheus]=prometheus
    [file]=file [objcopy]=binutils [readelf]=binutils [openssl]=openssl
    [pkg-config]=pkg-config
)
missing=()
for c in "${!PKG[@]}"; do
    command -v "$c" >/dev/null 2>&1 || missing+=("${PKG[$c]}")
done
[[ -x /usr/bin/python3 ]] || missing+=(python3)
# The build links OpenSSL (TLS): its headers and libraries (static ones too, for
# contrib/release/build-static.sh).
[[ -f /usr/include/openssl/ssl.h && -n $(compgen -G '/usr/lib/*/libssl.a') ]] \
    || missing+=(libssl-dev)
/usr/bin/python3 -c 'import nbd' >/dev/null 2>&1 || missing+=(python3-libnbd)
# tests/e2e/spdk_rpc.sh installs SPDK's own RPC client (PyPI's `spdk`) into a venv.
/usr/bin/python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
if ((${#missing[@]})); then
    mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
    if ((install)) && command -v apt-get >/dev/null 2>&1; then
        SUDO=""
        ((EUID == 0)) || SUDO=sudo
        say "installing ${missing[*]}"
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null \
            || say "apt-get install failed; suites needing ${missing[*]} may fail"
    else
        say "missing packages: ${missing[*]} (not installing)"
    fi
fi
if ! fio --enghelp=nbd >/dev/null 2>&1; then
    say "warning: this fio has no ioengine=nbd; the fio check in nbd_clients.sh will fail"
fi

# ------------------------------------------------------------------ cargo
if ((cargo)); then
    if ! command -v cargo >/dev/null 2>&1; then
        say "cargo not found"
        record "cargo build --release" 127 0
    else
        echo "======== cargo build --release"
        t0=$SECONDS; rc=0
        cargo build --release || rc=$?
        record "cargo build --release" "$rc" $((SECONDS - t0))
        echo "======== cargo fmt --check, cargo clippy -D warnings"
        t0=$SECONDS; rc=0
        cargo fmt --all -- --check || rc=$?
        cargo clippy --workspace --all-targets --release -- -D warnings || rc=$?
        record "cargo fmt + clippy" "$rc" $((SECONDS - t0))
        echo "======== cargo test --workspace --release"
        t0=$SECONDS; rc=0
        cargo test --workspace --release || rc=$?
        record "cargo test --workspace --release" "$rc" $((SECONDS - t0))
    fi
fi

if [[ ! -x $BALLAST_BIN ]]; then
    say "binary $BALLAST_BIN missing; end-to-end suites will fail"
fi

# ------------------------------------------------------------------ e2e
shopt -s nullglob
for t in tests/e2e/*.sh; do
    selected "$t" || continue
    run_suite "$t" "$SUITE_TIMEOUT" bash "$t"
done
for t in tests/e2e/*.py; do
    selected "$t" || continue
    run_suite "$t" "$SUITE_TIMEOUT" /usr/bin/python3 "$t"
done

# ------------------------------------------------------------------ VM (kernel clients)
if ((quick)); then
    say "--quick: skipping VM tests"
else
    for t in tests/vm/test-*.sh; do
        selected "$t" || continue
        run_suite "$t" "$VM_TIMEOUT" bash "$t"
    done
fi

echo
((failed)) && echo "failed suites: ${failed_names[*]}"
echo "$passed passed, $failed failed"
((failed == 0))
