#!/bin/bash
# ballast's NBD over TLS vs the Linux kernel's NBD client (nbd-client with GnuTLS), in a qemu
# guest (tests/vm/run.sh; guest side: guest-nbd-tls.sh). The host makes a CA, a server
# certificate for 10.0.2.2 (the host as the guest sees it), a client certificate on the
# export's allow-list and one that is not; ballast serves vol0 with --nbd-tls require. The
# guest attaches over TLS, makes a filesystem, writes files, re-attaches and checks them, and
# sees plaintext and the other certificate refused. Prints PASS/FAIL and "N passed, M failed".
#
# Environment: BALLAST_BIN, BALLAST_VM_TIMEOUT (default 300 s), KEEP=1 keeps the work dir.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
bin=${BALLAST_BIN:-$root/build/cargo/release/ballast}
. "$here/host-lib.sh"
"$here/build.sh" || { echo "FAIL: building the guest"; exit 1; }
work=$(mktemp -d "${TMPDIR:-/tmp}/ballast-nbd-tls-vm.XXXXXX")
trap '[[ -n $spid ]] && kill -KILL $spid 2>/dev/null' EXIT

p=$work/pki; mkdir -p "$p"
ossl() { openssl "$@" 2>>"$work/openssl.log"; }
ossl req -x509 -newkey rsa:2048 -nodes -keyout "$p/ca.key" -subj "/CN=ballast test CA" -days 2 -out "$p/ca.pem"
for who in server client other; do
  cn=$who; [[ $who == client ]] && cn=guest
  ossl req -new -newkey rsa:2048 -nodes -keyout "$p/$who.key" -subj "/CN=$cn" -out "$p/$who.csr"
  : > "$p/$who.ext"
  [[ $who == server ]] && echo "subjectAltName=IP:10.0.2.2,IP:127.0.0.1,DNS:localhost" > "$p/$who.ext"
  ossl x509 -req -in "$p/$who.csr" -CA "$p/ca.pem" -CAkey "$p/ca.key" -CAcreateserial -days 2 \
    -extfile "$p/$who.ext" -out "$p/$who.pem"
done
chmod 600 "$p"/*.key
port=$(free_port)
"$bin" serve --data-dir "$work/data" --nbd-listen "127.0.0.1:$port" --nvmf-listen "127.0.0.1:$(free_port)" \
  --export vol0=ram:256M --nbd-tls require --nbd-tls-cert "$p/server.pem" --nbd-tls-key "$p/server.key" \
  --nbd-tls-ca "$p/ca.pem" --nbd-tls-allow vol0=guest > "$work/server.log" 2>&1 &
spid=$!
for _ in $(seq 100); do listening "$port" && break; sleep 0.2; done
listening "$port" && pass "ballast listening with --nbd-tls require" || { fail "ballast listening"; tail "$work/server.log"; }

echo "NBD_PORT=$port" > "$work/params"
run_guest 300 "$here/guest-nbd-tls.sh" "$work/params" "$p/ca.pem" "$p/client.pem" "$p/client.key" "$p/other.pem" "$p/other.key"
grep -q 'TLS established.*identity="\?guest' "$work/server.log" && pass "server log: TLS established for identity guest" \
  || fail "server log shows the TLS identity"
if kill -TERM "$spid" && wait "$spid"; then pass "server exits 0 after SIGTERM"; else fail "server exit status"; fi
spid=
grep -q panicked "$work/server.log" && fail "no panic in the server log"
echo "=== $npass passed, $nfail failed"
if ((nfail)) || [[ -n ${KEEP:-} ]]; then echo "logs kept in $work"; else rm -rf "$work"; fi
((nfail == 0))
