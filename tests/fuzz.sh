#!/bin/bash
# Fuzzes both front-ends' wire decoders and the volume layer's media decoders for a bounded
# time: every cargo-fuzz target of target/nbd/fuzz, target/nvmf/fuzz and engine/volume/fuzz
# runs BALLAST_FUZZ_SECONDS seconds (default 20) under
# libFuzzer.  A crash (panic, failed assertion, the NVMe/TCP targets' allocation bound,
# sanitizer report, timeout, out-of-memory) fails the run: the target's last output and the
# crash input (under <crate>/artifacts/<target>/) are printed and the exit status is 1.
#
#   tests/fuzz.sh [TARGET-PATTERN...]     only targets whose "nbd/NAME", "nvmf/NAME" or
#                                         "engine/volume/NAME" contains a pattern
#
# Toolchain: `cargo +nightly fuzz` (cargo-fuzz is installed with `cargo install cargo-fuzz
# --locked` when missing).  Without a nightly toolchain, stable with RUSTC_BOOTSTRAP=1 and no
# sanitizer (`cargo fuzz run -s none`).  If neither can build the targets it prints one
# "SKIP: ..." line and exits 0: the same decoders still run under proptest in `cargo test`.
#
# Environment: BALLAST_FUZZ_SECONDS (seconds per target, default 20),
#   BALLAST_CARGO_LOCK (a file: every cargo command runs under `flock` on it, so builds of
#   several checkouts on one machine never overlap).
# Builds go to <crate>/target, corpora grow in <crate>/corpus (all ignored by git).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 2

SECS=${BALLAST_FUZZ_SECONDS:-20}
CRATES=(target/nbd target/nvmf engine/volume)   # each has its cargo-fuzz crate in fuzz/
patterns=("$@")
LOCK=()
[[ -n ${BALLAST_CARGO_LOCK:-} ]] && LOCK=(flock "$BALLAST_CARGO_LOCK")
LOGS=$(mktemp -d "${TMPDIR:-/tmp}/ballast-fuzz.XXXXXX")
trap 'rm -rf "$LOGS"' EXIT
say() { echo "fuzz.sh: $*"; }

selected() {
    ((${#patterns[@]} == 0)) && return 0
    local p
    for p in "${patterns[@]}"; do [[ $1 == *"$p"* ]] && return 0; done
    return 1
}

# ------------------------------------------------------------------ tools
if ! command -v cargo >/dev/null 2>&1; then
    echo "SKIP: no cargo on PATH; the decoders' proptests run in cargo test"
    exit 0
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    say "installing cargo-fuzz"
    if ! "${LOCK[@]}" cargo install cargo-fuzz --locked; then
        echo "SKIP: cargo-fuzz is missing and could not be installed; the decoders' proptests run in cargo test"
        exit 0
    fi
fi

# fuzz SUBCOMMAND CRATE-DIR ARGS...: cargo fuzz in the chosen mode, building into CRATE/fuzz/target.
FUZZ=() SAN=()
fuzz() {
    local sub=$1 dir=$2; shift 2
    (cd "$ROOT/$dir" && "${LOCK[@]}" "${FUZZ[@]}" "$sub" "${SAN[@]}" --fuzz-dir fuzz \
        --target-dir "$ROOT/$dir/fuzz/target" "$@")
}

if rustup run nightly rustc --version >/dev/null 2>&1; then
    FUZZ=(cargo +nightly fuzz)
    mode="nightly, AddressSanitizer"
else
    # No nightly: stable may still build libFuzzer targets with unstable flags allowed.
    FUZZ=(env RUSTC_BOOTSTRAP=1 cargo fuzz) SAN=(-s none)
    mode="stable with RUSTC_BOOTSTRAP=1, no sanitizer"
    if ! fuzz build "${CRATES[0]}" >"$LOGS/probe.log" 2>&1; then
        tail -n 5 "$LOGS/probe.log"
        echo "SKIP: no nightly toolchain and stable cannot build the fuzz targets (RUSTC_BOOTSTRAP=1 cargo fuzz build -s none failed); the decoders' proptests run in cargo test"
        exit 0
    fi
fi
say "$mode; ${SECS} s per target"

# ------------------------------------------------------------------ run
passed=0 failed=0 failed_names=()
for dir in "${CRATES[@]}"; do
    front=${dir#target/}
    say "building $dir/fuzz"
    if ! fuzz build "$dir" >"$LOGS/build.log" 2>&1; then
        tail -n 40 "$LOGS/build.log"
        echo "FAIL: $front: the fuzz targets do not build"
        failed=$((failed + 1)) failed_names+=("$front (build)")
        continue
    fi
    mapfile -t targets < <(cd "$ROOT/$dir" && "${LOCK[@]}" cargo fuzz list --fuzz-dir fuzz)
    for t in "${targets[@]}"; do
        name="$front/$t"
        selected "$name" || continue
        log="$LOGS/${front//\//-}-$t.log"
        mkdir -p "$ROOT/$dir/fuzz/corpus/$t"
        t0=$SECONDS rc=0
        fuzz run "$dir" "$t" -- -max_total_time="$SECS" -rss_limit_mb=2048 \
            -print_final_stats=1 >"$log" 2>&1 || rc=$?
        runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
        if ((rc == 0)); then
            passed=$((passed + 1))
            echo "PASS: $name: ${runs:-?} runs in $((SECONDS - t0)) s, no crash"
        else
            failed=$((failed + 1)) failed_names+=("$name")
            grep -m 3 -A 1 -E "panicked at|ERROR: (AddressSanitizer|libFuzzer)" "$log"
            tail -n 12 "$log"
            echo "FAIL: $name: crashed (exit $rc) after $((SECONDS - t0)) s; input in $dir/fuzz/artifacts/$t/"
        fi
    done
done

echo
((failed)) && echo "fuzz.sh: failed: ${failed_names[*]}"
echo "fuzz.sh: $passed passed, $failed failed"
((failed == 0))
