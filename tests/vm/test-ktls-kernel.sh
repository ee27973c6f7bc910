#!/bin/bash
# Kernel TLS offload (kTLS): ballast runs INSIDE the trixie guest (this machine's kernel has no
# TLS; trixie's 6.12 has), its TLS 1.3 sessions go to the kernel after their handshakes, and the
# kernel's own NVMe/TCP host (nvme-cli 2.13, tlshd), NBD client (nbd-client, GnuTLS) and libnbd
# (nbdcopy, nbdinfo: NBD_CMD_DISC and close_notify at once) move data through them; then the
# same with --kernel-tls off (guest side: guest-ktls.sh). The host makes
# the PSK and a small PKI and copies the ballast binary in. Prints PASS/FAIL, "N passed, M failed".
#
# Environment: BALLAST_BIN, BALLAST_VM_TIMEOUT (default 600 s), KEEP=1 keeps the work dir.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
bin=${BALLAST_BIN:-$root/build/cargo/release/ballast}
export BALLAST_VM_FLAVOUR=trixie
. "$here/host-lib.sh"
trixie_work ktls

# the binary without its debug info (the guest's root is an initramfs)
objcopy --strip-debug "$bin" "$work/ballast" && pass "ballast binary for the guest" || fail "stripping ballast"
p=$work/pki; mkdir -p "$p"
ossl() { openssl "$@" 2>>"$work/openssl.log"; }
ossl req -x509 -newkey rsa:2048 -nodes -keyout "$p/ca.key" -subj "/CN=ballast test CA" -days 2 -out "$p/ca.pem"
for who in server client; do
  cn=$who; [[ $who == client ]] && cn=guest
  ossl req -new -newkey rsa:2048 -nodes -keyout "$p/$who.key" -subj "/CN=$cn" -out "$p/$who.csr"
  : > "$p/$who.ext"
  [[ $who == server ]] && echo "subjectAltName=IP:127.0.0.1,DNS:localhost" > "$p/$who.ext"
  ossl x509 -req -in "$p/$who.csr" -CA "$p/ca.pem" -CAkey "$p/ca.key" -CAcreateserial -days 2 \
    -extfile "$p/$who.ext" -out "$p/$who.pem"
done
cat > "$work/params" <<P
HOSTNQN=nqn.2014-08.org.nvmexpress:uuid:6f1c3c52-0b1e-4c52-9d1c-7e1d1a3d00f1
HOSTID=6f1c3c52-0b1e-4c52-9d1c-7e1d1a3d00f1
VOL0=nqn.2026-11.dev.ballast:vol0
K256=$(secret NVMeTLSkey-1 32 01)
P
run_guest 600 "$here/guest-ktls.sh" "$work/ballast" "$work/params" "$p/ca.pem" "$p/server.pem" "$p/server.key" "$p/client.pem" "$p/client.key"
echo "=== $npass passed, $nfail failed"
if ((nfail)) || [[ -n ${KEEP:-} ]]; then echo "logs kept in $work"; else rm -rf "$work"; fi
((nfail == 0))
