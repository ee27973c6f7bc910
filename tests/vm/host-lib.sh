# Sourced by the host side of the VM suites that start ballast themselves
# (test-nbd-tls-kernel.sh, test-nvme-tls-kernel.sh, test-nvme-auth-kernel.sh, test-ktls-kernel.sh,
# test-nbd-libnbd-trixie.sh, ...):
# counting checks, free ports, and key material in the NVMe interchange formats.
npass=0 nfail=0 spid=
pass() { echo "PASS: $*"; npass=$((npass + 1)); }
fail() { echo "FAIL: $*"; nfail=$((nfail + 1)); }
listening() { [[ -n $(ss -Hltn "sport = :$1" 2>/dev/null) ]]; }
free_port() { local p; for _ in $(seq 50); do p=$((20000 + RANDOM % 12000)); listening "$p" || break; done; echo "$p"; }
# guest_words PORT FILE: in the background, appends each line the guest sends to 127.0.0.1:PORT
# (one TCP connection per line, `echo WORDS | nc 10.0.2.2 PORT` in the guest) to FILE (emptied
# first); its pid in $lpid.
guest_words() {
  : > "$2"
  /usr/bin/python3 -c "
import socket, sys
s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen(4)
while True:
    c,_=s.accept(); line=c.makefile().readline().strip(); c.close()
    with open(sys.argv[2], 'a') as f: f.write(line + '\\n')
" "$1" "$2" & lpid=$!
}
# secret PREFIX KEYBYTES HH: PREFIX:HH:base64(key || crc32 little-endian): -- a TLS PSK
# (NVMeTLSkey-1) or a DH-HMAC-CHAP secret (DHHC-1), as nvme gen-tls-key / gen-dhchap-key print.
secret() {
  /usr/bin/python3 -c 'import base64,os,sys,zlib
k=os.urandom(int(sys.argv[2]))
print("%s:%s:%s:" % (sys.argv[1], sys.argv[3], base64.b64encode(k + zlib.crc32(k).to_bytes(4, "little")).decode()))' "$1" "$2" "$3"
}
# trixie_work NAME: the trixie guest built (else a FAIL line, the count and exit 1) and $work a
# fresh directory named after NAME — the start of every suite that boots that flavour.
trixie_work() {
  "$here/build-trixie.sh" || { echo "FAIL: building the trixie guest"; echo "0 passed, 1 failed"; exit 1; }
  work=$(mktemp -d "${TMPDIR:-/tmp}/ballast-$1-vm.XXXXXX")
}
# run_guest DEFAULT_TIMEOUT GUEST_SCRIPT [FILE...]: boots the guest (run.sh) with the script and
# files, under BALLAST_VM_TIMEOUT (default DEFAULT_TIMEOUT s); its console goes to $work/console;
# prints the guest's PASS/FAIL/"guest:" lines, adds them to the counts and checks it finished.
run_guest() {
  local t=${BALLAST_VM_TIMEOUT:-$1} grc; shift
  timeout $((t + 60)) env BALLAST_VM_TIMEOUT="$t" "$here/run.sh" "$@" > "$work/console" 2>&1
  grc=$?
  grep -a '^PASS: \|^FAIL: \|^guest: ' "$work/console"
  npass=$((npass + $(grep -ac '^PASS: ' "$work/console")))
  nfail=$((nfail + $(grep -ac '^FAIL: ' "$work/console")))
  grep -aq '^GUEST-DONE' "$work/console" && pass "guest finished (exit $grc)" \
    || { fail "guest finished"; tail -40 "$work/console"; }
}
