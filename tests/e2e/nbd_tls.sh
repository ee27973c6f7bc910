#!/bin/bash
# End-to-end: NBD over TLS (NBD_OPT_STARTTLS) with clients we did not write: libnbd's nbdinfo,
# nbdcopy and nbdsh (GnuTLS), qemu-img and qemu-io (tls-creds-psk / tls-creds-x509).
#   1. TLS-PSK, --nbd-tls require: data round trips; plaintext, a wrong key and an unknown
#      identity are refused; the key never reaches the log; a world-readable key file is refused;
#      the handshakes ran on offload threads (metrics).
#   2. X.509 with client certificates, --nbd-tls on: an allow-listed export only for its
#      identity, an open export in plaintext too; an untrusted client certificate and an
#      untrusted server certificate fail the handshake; handshakes on the core
#      (--offload-threads 0).
#   3. TLS sessions against --max-connections: the one too many is refused, a closed one frees
#      its place, the held ones cost little memory.
set -u -o pipefail
. "$(dirname "$0")/../lib.sh"

T=$TEST_TMP
MiB=$((1024 * 1024))
command -v openssl >/dev/null || { fail "openssl CLI present"; finish; }

# qemu_opts KIND DIR [USER]: the --object for qemu's TLS credentials.
qemu_obj() {
    if [[ $1 == psk ]]; then
        echo "tls-creds-psk,id=tls0,endpoint=client,dir=$2,username=$3"
    else
        echo "tls-creds-x509,id=tls0,endpoint=client,dir=$2"
    fi
}
qemu_image() { echo "driver=nbd,host=127.0.0.1,port=$PORT,export=$1,tls-creds=tls0"; }

##############################################################################################
echo "## phase 1: TLS-PSK, TLS required"
mkdir -p "$T/psk" "$T/wrongpsk" "$T/mallory"
KEY=$(openssl rand -hex 32)
printf 'alice:%s\nbob:%s\n' "$KEY" "$(openssl rand -hex 32)" >"$T/psk/keys.psk"
chmod 600 "$T/psk/keys.psk"
printf 'alice:%s\n' "$(openssl rand -hex 32)" >"$T/wrongpsk/keys.psk"
printf 'mallory:%s\n' "$KEY" >"$T/mallory/keys.psk"
chmod 600 "$T/wrongpsk/keys.psk" "$T/mallory/keys.psk"

new_data_dir
MPORT=$(free_port)
# Everything at DEBUG from the start, the key file's reading included (the key must stay out
# of the log even then: checked below).
RUST_LOG=debug start_ballast --export vol0=ram:64M --export vol1=ram:16M \
    --metrics-listen "127.0.0.1:$MPORT" --nbd-tls require --nbd-tls-psk "$T/psk/keys.psk" || finish
check_eq "ballast log: DEBUG, as RUST_LOG=debug asked" "level DEBUG" \
    "$("$(ballast_bin)" log --rpc-socket "$RPC_SOCK" | head -1)"
PSK_URI="nbds://alice@127.0.0.1:$PORT"
Q="tls-psk-file=$T/psk/keys.psk"

out=$(timeout 30 nbdinfo "$PSK_URI/vol0?$Q" 2>&1)
if grep -q "with TLS" <<<"$out" && grep -q "export-size: $((64 * MiB))" <<<"$out"; then
    pass "nbdinfo over TLS-PSK: TLS negotiated, size right"
else
    fail "nbdinfo over TLS-PSK" "$(head -3 <<<"$out" | tr '\n' ' ')"
fi
# Handshakes run off the data cores (--offload-threads, default 2).
offloaded=$(curl -s "http://127.0.0.1:$MPORT/metrics" | awk '/^ballast_core_offloaded_total[{ ]/ { n += $NF } END { print n + 0 }')
if ((offloaded >= 2)); then
    pass "TLS handshake steps ran on offload threads ($offloaded)"
else
    fail "handshake steps offloaded" "ballast_core_offloaded=$offloaded"
fi
if grep -q 'TLS established.*identity="\?alice' "$BALLAST_LOG"; then
    pass "server log names the PSK identity and the cipher"
else
    fail "server log names the PSK identity" "$(grep -m2 TLS "$BALLAST_LOG")"
fi

head -c $((48 * MiB)) /dev/urandom >"$T/in.bin"
check "nbdcopy 48 MiB into vol0 over TLS" \
    timeout 120 nbdcopy "$T/in.bin" "$PSK_URI/vol0?$Q"
check "nbdcopy vol0 back over TLS" \
    timeout 120 nbdcopy "$PSK_URI/vol0?$Q" "$T/out.bin"
check_eq "data read back over TLS equals data written" "$(sha "$T/in.bin")" \
    "$(head -c $((48 * MiB)) "$T/out.bin" | sha256sum | cut -d' ' -f1)"

obj=$(qemu_obj psk "$T/psk" alice)
check "qemu-io writes and reads back a pattern over TLS-PSK" \
    timeout 60 qemu-io --object "$obj" --image-opts "$(qemu_image vol1)" \
    -c "write -P 0x5a 1M 3M" -c "read -P 0x5a 1M 3M" -c "read -P 0 0 1M"
check "qemu-img compare: vol0 over TLS matches what nbdcopy wrote" \
    timeout 120 qemu-img compare --object "$obj" --image-opts "$(qemu_image vol0)" \
    "driver=raw,file.filename=$T/in.bin"

check_fails "plaintext client refused (TLS required)" \
    timeout 30 nbdinfo "nbd://127.0.0.1:$PORT/vol0"
out=$(timeout 30 /usr/bin/python3 - "$PORT" <<'PY' 2>&1
import nbd, sys
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_tcp("127.0.0.1", sys.argv[1])
try:
    h.opt_list(lambda name, desc: 0)
    print("listed")
except nbd.Error as e:
    print("refused", e.errno)
PY
)
if [[ $out == refused* ]]; then
    pass "NBD_OPT_LIST before STARTTLS refused (NBD_REP_ERR_TLS_REQD)"
else
    fail "NBD_OPT_LIST before STARTTLS" "$out"
fi
check_fails "wrong PSK refused" \
    timeout 30 nbdinfo "$PSK_URI/vol0?tls-psk-file=$T/wrongpsk/keys.psk"
check_fails "unknown PSK identity refused" \
    timeout 30 nbdinfo "nbds://mallory@127.0.0.1:$PORT/vol0?tls-psk-file=$T/mallory/keys.psk"
check_fails "qemu-img with the wrong PSK refused" \
    timeout 30 qemu-img info --object "$(qemu_obj psk "$T/wrongpsk" alice)" \
    --image-opts "$(qemu_image vol0)"
check "server still serves after the refusals" \
    timeout 30 nbdinfo --size "$PSK_URI/vol0?$Q"
# libnbd's shutdown sends NBD_CMD_DISC and its close_notify at once; a server that closes with
# the close_notify unread resets the connection, and the client's shutdown can fail
# ("server closed socket unexpectedly"). The server must read it and end with its FIN.
out=$(timeout 120 /usr/bin/python3 - "$PSK_URI/vol0?$Q" <<'PY' 2>&1
import nbd, sys
def resets():
    lines = [l.split() for l in open("/proc/net/snmp") if l.startswith("Tcp:")]
    return int(lines[1][lines[0].index("OutRsts")])
before, failed = resets(), 0
for _ in range(150):
    h = nbd.NBD()
    h.set_uri_allow_local_file(True)
    h.connect_uri(sys.argv[1])
    h.pread(4096, 0)
    try:
        h.shutdown()
    except nbd.Error as e:
        failed += 1
        print("shutdown failed:", e)
print("SESSIONS 150 FAILED %d RESETS %d" % (failed, resets() - before))
PY
)
read -r failed resets < <(awk '/^SESSIONS/ { print $4, $6 }' <<<"$out")
if [[ $failed == 0 ]] && ((resets <= 3)); then
    pass "150 TLS sessions end with nbd_shutdown: none fails, no resets ($resets sent on this machine)"
else
    fail "TLS sessions end cleanly" "$(tail -3 <<<"$out")"
fi
KEY_B64=$("$SYS_PY" -c 'import base64,sys; print(base64.b64encode(bytes.fromhex(sys.argv[1])).decode()[:40])' "$KEY")
if grep -qi "$KEY" "$BALLAST_LOG" || grep -qF "$KEY_B64" "$BALLAST_LOG"; then
    fail "the PSK never appears in the server log (at DEBUG; hex or base64)"
elif ! grep -q " DEBUG " "$BALLAST_LOG"; then
    fail "the server log was written at DEBUG"
else
    pass "the PSK never appears in the server log (hex or base64), written at DEBUG"
fi
stop_ballast

chmod 644 "$T/psk/keys.psk"
out=$(timeout 30 "$(ballast_bin)" serve --data-dir "$DATA_DIR" --export v=ram:1M \
    --nbd-listen 127.0.0.1:0 --nvmf-listen 127.0.0.1:0 --rpc-socket "$T/x.sock" \
    --nbd-tls require --nbd-tls-psk "$T/psk/keys.psk" 2>&1)
rc=$?
if ((rc != 0)) && grep -q "chmod 600" <<<"$out" && ! grep -qi "$KEY" <<<"$out"; then
    pass "a PSK file others can read is refused at startup, without printing the key"
else
    fail "world-readable PSK file refused" "rc $rc: $(tail -2 <<<"$out")"
fi
chmod 600 "$T/psk/keys.psk"

##############################################################################################
echo "## phase 2: X.509, client certificates, TLS optional, allow-lists"
P=$T/pki
mkdir -p "$P" "$T/alice" "$T/carol" "$T/rogue" "$T/badca"
# cert NAME CN CA-PREFIX [SAN]: key and certificate signed by CA-PREFIX.{crt,key}
cert() {
    openssl req -new -newkey rsa:2048 -nodes -keyout "$P/$1.key" -subj "/CN=$2" \
        -out "$P/$1.csr" 2>/dev/null
    local ext=$P/$1.ext
    if [[ -n ${4:-} ]]; then printf 'subjectAltName=%s\n' "$4" >"$ext"; else : >"$ext"; fi
    openssl x509 -req -in "$P/$1.csr" -CA "$3.crt" -CAkey "$3.key" -CAcreateserial \
        -days 2 -extfile "$ext" -out "$P/$1.crt" 2>/dev/null
}
ca() {
    openssl req -x509 -newkey rsa:2048 -nodes -keyout "$P/$1.key" -subj "/CN=$1" -days 2 \
        -out "$P/$1.crt" 2>/dev/null
}
ca ca && ca otherca
cert server localhost "$P/ca" "DNS:localhost,IP:127.0.0.1"
cert alice alice "$P/ca"
cert carol carol "$P/ca"
cert rogue alice "$P/otherca"
cert fakeserver localhost "$P/otherca" "DNS:localhost,IP:127.0.0.1"
chmod 600 "$P"/*.key
# libnbd and qemu read ca-cert.pem, client-cert.pem, client-key.pem from a directory.
client_dir() {   # client_dir DIR CLIENT CA
    cp "$P/$3.crt" "$1/ca-cert.pem"
    cp "$P/$2.crt" "$1/client-cert.pem"
    cp "$P/$2.key" "$1/client-key.pem"
}
client_dir "$T/alice" alice ca
client_dir "$T/carol" carol ca
client_dir "$T/rogue" rogue ca
client_dir "$T/badca" alice otherca

new_data_dir
# --offload-threads 0: the handshakes run on the data core itself (the other path).
start_ballast --export secret=ram:16M --export open=ram:16M --offload-threads 0 \
    --nbd-tls on --nbd-tls-cert "$P/server.crt" --nbd-tls-key "$P/server.key" \
    --nbd-tls-ca "$P/ca.crt" --nbd-tls-allow secret=alice || finish
X="nbds://127.0.0.1:$PORT"

check "alice's certificate opens the allow-listed export" \
    timeout 30 nbdinfo --size "$X/secret?tls-certificates=$T/alice"
check "qemu-io as alice writes and reads secret over X.509" \
    timeout 60 qemu-io --object "$(qemu_obj x509 "$T/alice")" --image-opts "$(qemu_image secret)" \
    -c "write -P 0x42 0 1M" -c "read -P 0x42 0 1M"
check_fails "carol (trusted, not allow-listed) is refused the export" \
    timeout 30 nbdinfo --size "$X/secret?tls-certificates=$T/carol"
check "carol may use the open export over TLS" \
    timeout 30 nbdinfo --size "$X/open?tls-certificates=$T/carol"
check "a plaintext client may use the open export (TLS optional)" \
    timeout 30 nbdinfo --size "nbd://127.0.0.1:$PORT/open"
check_fails "a plaintext client is refused the TLS-only export" \
    timeout 30 nbdinfo --size "nbd://127.0.0.1:$PORT/secret"
out=$(timeout 30 nbdinfo --list "nbd://127.0.0.1:$PORT" 2>&1)
if grep -q 'export="open"' <<<"$out" && ! grep -q 'export="secret"' <<<"$out"; then
    pass "plaintext NBD_OPT_LIST omits the TLS-only export"
else
    fail "plaintext list omits secret" "$(grep export= <<<"$out" | tr '\n' ' ')"
fi
check_fails "a client certificate from another CA fails the handshake" \
    timeout 30 nbdinfo --size "$X/open?tls-certificates=$T/rogue"
check_fails "a client that does not trust the server's CA refuses it" \
    timeout 30 nbdinfo --size "$X/open?tls-certificates=$T/badca"
check "server still serves after the refusals" \
    timeout 30 nbdinfo --size "$X/secret?tls-certificates=$T/alice"
stop_ballast

##############################################################################################
echo "## phase 3: TLS connections against --max-connections"
new_data_dir
start_ballast --export vol0=ram:16M --max-connections 6 \
    --nbd-tls require --nbd-tls-psk "$T/psk/keys.psk" || finish
# Six TLS sessions held open (libnbd, GnuTLS); the seventh is closed at once; one closed, a
# new one gets in; the daemon's memory for the six stays small.
out=$(timeout 120 /usr/bin/python3 - "nbds://alice@127.0.0.1:$PORT/vol0?$Q" "$PID" <<'PY' 2>&1
import nbd, sys
uri, pid = sys.argv[1], sys.argv[2]
def rss_kib():
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
def connect():
    h = nbd.NBD()
    h.set_uri_allow_local_file(True)
    h.connect_uri(uri)
    h.pread(4096, 0)
    return h
before = rss_kib()
held = [connect() for _ in range(6)]
grown = rss_kib() - before
try:
    extra = connect()
    print("SEVENTH-ACCEPTED")
except nbd.Error:
    print("SEVENTH-REFUSED")
held.pop().shutdown()
import time; time.sleep(0.5)
try:
    connect().shutdown()
    print("AFTER-CLOSE-OK")
except nbd.Error as e:
    print("AFTER-CLOSE-FAILED", e)
print(f"GROWN-KIB {grown}")
for h in held:
    h.shutdown()
PY
)
grep -q SEVENTH-REFUSED <<<"$out" && pass "a seventh TLS session is refused at --max-connections 6" \
    || fail "TLS sessions beyond --max-connections" "$out"
grep -q AFTER-CLOSE-OK <<<"$out" && pass "a closed TLS session frees its place" \
    || fail "place freed after a TLS session closed" "$out"
grown=$(awk '/^GROWN-KIB/ { print $2 }' <<<"$out")
if [[ -n $grown ]] && ((grown < 6 * 512)); then
    pass "six open TLS sessions grew the daemon by ${grown} KiB (< 512 KiB each)"
else
    fail "TLS session memory" "grown ${grown:-?} KiB"
fi
stop_ballast

finish
