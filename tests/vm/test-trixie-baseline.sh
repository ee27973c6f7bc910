#!/bin/bash
# The trixie guest flavour (build-trixie.sh) against itself: the Linux kernel's NVMe/TCP host
# (nvme-cli 2.13, tlshd) and the kernel's own target (nvmet-tcp), both inside one trixie guest,
# with TLS 1.3 configured PSKs (SHA-256 and SHA-384; discovery; plaintext refused) and
# DH-HMAC-CHAP (uni- and bidirectional, three hashes, null and two FFDHE groups, wrong and
# missing secrets refused; TLS and DH-HMAC-CHAP together). Guest side: guest-trixie-baseline.sh.
# It proves the flavour before ballast is tested in it, and its NOTE: lines record what the
# kernel host sends (cipher suite, PSK identities, DH-HMAC-CHAP negotiation; see TRIXIE.md).
# Prints PASS:/FAIL: lines and "N passed, M failed"; exits 1 on any failure.
# Environment: BALLAST_VM_TIMEOUT (default 480), KEEP=1 keeps the console (path printed).
# It checks the harness and the kernel, not ballast, so tests/run.sh skips it unless
# BALLAST_VM_BASELINE=1 (run it by hand after changing build-trixie.sh).
set -uo pipefail
if [[ ${BALLAST_VM_BASELINE:-0} != 1 && ${1:-} != --force ]]; then
  echo "SKIP: the trixie baseline (kernel host vs kernel target) runs with BALLAST_VM_BASELINE=1 or --force"
  exit 0
fi
here=$(cd "$(dirname "$0")" && pwd)
export BALLAST_VM_FLAVOUR=trixie
t0=$SECONDS
"$here/build-trixie.sh" || { echo "FAIL: building the trixie guest"; echo "0 passed, 1 failed"; exit 1; }
echo "guest ready after $((SECONDS - t0))s"
work=$(mktemp -d "${TMPDIR:-/tmp}/ballast-trixie-vm.XXXXXX")
[[ -n ${KEEP:-} ]] && echo "keeping $work" || trap 'rm -rf "$work"' EXIT
BALLAST_VM_TIMEOUT=${BALLAST_VM_TIMEOUT:-480} "$here/run.sh" "$here/guest-trixie-baseline.sh" > "$work/console" 2>&1
grc=$?
sed -n -e '/^ballast-vm: up/p' -e '/^guest: /p' -e '/^NOTE: /p' -e '/^PASS: /p' -e '/^FAIL: /p' "$work/console"
npass=$(grep -c '^PASS: ' "$work/console") nfail=$(grep -c '^FAIL: ' "$work/console")
if ((grc != 0)); then
  echo "FAIL: guest exit $grc"; nfail=$((nfail + 1))
  tail -40 "$work/console"
fi
((npass > 0)) || { echo "FAIL: no checks ran"; nfail=$((nfail + 1)); }
echo "$npass passed, $nfail failed ($((SECONDS - t0))s)"
((nfail == 0))
