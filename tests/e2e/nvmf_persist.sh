#!/bin/bash
# End-to-end: the NVMe/TCP security configuration survives restarts on the same pool (kill -9
# and a clean stop), configured with SPDK's own client (`spdk-rpc` from PyPI's `spdk`, as
# tests/e2e/spdk_rpc.sh) and checked from the host side with plaintext NVMe/TCP Connects
# (tests/nvmeraw.py):
#
#   1  keyring_file_add_key (a TLS PSK and DH-HMAC-CHAP secrets), nvmf_create_subsystem -a -s -d,
#      a namespace, two listeners (one -k: TLS required), hosts with --psk, --dhchap-key +
#      --dhchap-ctrlr-key, and none; what hosts see: a PSK host refused in plaintext, a
#      DH-HMAC-CHAP host asked to authenticate (ATR), a plain host admitted, plaintext refused
#      on the TLS listener
#   2  kill -9, restart: keyring_get_keys, nvmf_get_subsystems, nvmf_subsystem_get_listeners
#      and what hosts see are as before
#   3  neither the pool file nor the log holds key bytes (raw, hex, base64, interchange text)
#   4  two key files deleted, clean stop, restart: a warning names each key and its path, the
#      keys are listed unavailable and their hosts refused (Connect Invalid Host) although the
#      subsystem allows any host; adding a key again admits its host
#   5  a subsystem pushed to --max-hosts-per-subsystem (1024 hosts): the next one refused with
#      -32602 naming the limit; deleting the subsystem forgets them (restart)
set -u -o pipefail
. "$(dirname "$0")/../lib.sh"

T=$TEST_TMP
need_spdk_rpc
check "spdk-rpc is installed ($(spdk_rpc_version))" test -x "$SPDK_RPC"

# interchange PREFIX HH: PREFIX:HH:base64(32 random bytes || crc32 LE): (nvme gen-tls-key,
# nvme gen-dhchap-key)
interchange() {
    "$SYS_PY" -c 'import base64,os,sys,zlib
k=os.urandom(32)
print("%s:%s:%s:" % (sys.argv[1], sys.argv[2], base64.b64encode(k + zlib.crc32(k).to_bytes(4, "little")).decode()))' "$@"
}
# key_file NAME TEXT: a 0600 key file in $T/keys.
key_file() { (umask 077; mkdir -p "$T/keys"; echo "$2" >"$T/keys/$1"); echo "$T/keys/$1"; }

check "ballast pool create (256 MiB)" "$(ballast_bin)" pool create "$T/pool.img" --size 256M || finish
serve() { start_ballast --cores 2 --pool "$T/pool.img"; }
serve || finish

NQN=nqn.2016-06.io.spdk:persist1
HOST_PSK=nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-0000000000a1
HOST_DH=nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-0000000000a2
HOST_GPSK=nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-0000000000a3
HOST_GDH=nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-0000000000a4
HOST_PLAIN=nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-0000000000a5
PLAIN_PORT=$(free_port)
TLS_PORT=$(free_port)
while [[ $TLS_PORT == "$PLAIN_PORT" ]]; do TLS_PORT=$(free_port); done

echo "## 1: keys, a subsystem, its hosts and listeners (spdk-rpc)"
PSK0=$(interchange NVMeTLSkey-1 01)
DH0=$(interchange DHHC-1 01)
DH1=$(interchange DHHC-1 01)
GPSK=$(interchange NVMeTLSkey-1 01)
GDH=$(interchange DHHC-1 00)
SECRETS=("$PSK0" "$DH0" "$DH1" "$GPSK" "$GDH")
for k in psk0:"$PSK0" dh0:"$DH0" dh1:"$DH1" gonepsk:"$GPSK" gonedh:"$GDH"; do
    check "keyring_file_add_key ${k%%:*}" rpc keyring_file_add_key "${k%%:*}" "$(key_file "${k%%:*}" "${k#*:}")"
done
check "bdev_lvol_create lvol0" rpc bdev_lvol_create -l lvs0 lvol0 16
check "nvmf_create_subsystem $NQN -a -s -d -m 8" \
    rpc nvmf_create_subsystem "$NQN" -a -s SPDK00000000000009 -d Ballast_Persist -m 8
check "nvmf_subsystem_add_ns lvs0/lvol0" rpc nvmf_subsystem_add_ns "$NQN" lvs0/lvol0
check "nvmf_subsystem_add_listener $PLAIN_PORT" \
    rpc nvmf_subsystem_add_listener "$NQN" -t tcp -a 127.0.0.1 -s "$PLAIN_PORT"
check "nvmf_subsystem_add_listener $TLS_PORT -k (TLS required)" \
    rpc nvmf_subsystem_add_listener "$NQN" -t tcp -a 127.0.0.1 -s "$TLS_PORT" -k
check "add_host --psk psk0" rpc nvmf_subsystem_add_host "$NQN" "$HOST_PSK" --psk psk0
check "add_host --dhchap-key dh0 --dhchap-ctrlr-key dh1" \
    rpc nvmf_subsystem_add_host "$NQN" "$HOST_DH" --dhchap-key dh0 --dhchap-ctrlr-key dh1
check "add_host --psk gonepsk" rpc nvmf_subsystem_add_host "$NQN" "$HOST_GPSK" --psk gonepsk
check "add_host --dhchap-key gonedh" rpc nvmf_subsystem_add_host "$NQN" "$HOST_GDH" --dhchap-key gonedh
check "add_host (no keys)" rpc nvmf_subsystem_add_host "$NQN" "$HOST_PLAIN"

# state: the configuration as the control API shows it, one canonical line.
state() {
    {
        rpc keyring_get_keys
        rpc nvmf_get_subsystems "$NQN"
        rpc nvmf_subsystem_get_listeners "$NQN"
    } | "$SYS_PY" -c '
import json, sys
dec = json.JSONDecoder(); text = sys.stdin.read().strip(); docs = []
while text:
    d, end = dec.raw_decode(text); docs.append(d); text = text[end:].strip()
keys, subs, listeners = docs
print(sorted((k["name"], k["path"], "unavailable" in k) for k in keys))
s = subs[0]
print(s["serial_number"], s["model_number"], s["max_namespaces"], s["allow_any_host"],
      [(n["nsid"], n["bdev_name"]) for n in s["namespaces"]])
print(sorted((h["nqn"][-2:], h.get("psk"), h.get("dhchap_key"), h.get("dhchap_ctrlr_key"), h.get("refused", False)) for h in s["hosts"]))
print(sorted((l["address"]["trsvcid"], l["secure_channel"]) for l in listeners))'
}
# sees: what each host gets from a plaintext Connect on $PLAIN_PORT ("0x0+atr": admitted, must
# authenticate in-band; 0x184: Connect Invalid Host), and a plaintext ICReq on $TLS_PORT.
sees() {
    PYTHONPATH="$REPO_ROOT/tests" timeout 60 "$SYS_PY" - "$PLAIN_PORT" "$TLS_PORT" "$NQN" \
        "$HOST_PSK" "$HOST_DH" "$HOST_GPSK" "$HOST_GDH" "$HOST_PLAIN" <<'PYEOF'
import sys
import nvmeraw as n
plain, tls, nqn = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
def connect(port, host):
    try:
        st, dw0 = n.connect_reply(port, nqn, hostnqn=host, timeout=5)
    except (OSError, AssertionError):
        return "closed"
    return hex(st) + ("+atr" if st == 0 and dw0 & (1 << 17) else "")
out = ["%s:%s" % (name, connect(plain, host))
       for name, host in zip(("psk", "dh", "gpsk", "gdh", "plain"), sys.argv[4:9])]
out.append("tls-port:%s" % connect(tls, sys.argv[8]))
print(" ".join(out))
PYEOF
}
EXPECT_SEES="psk:0x184 dh:0x0+atr gpsk:0x184 gdh:0x0+atr plain:0x0 tls-port:closed"
check_eq "hosts see their keys enforced" "$EXPECT_SEES" "$(sees)"
BEFORE=$(state)
check_eq "the configuration as listed (serial, model, hosts' key names, TLS listener)" \
    "SPDK00000000000009 Ballast_Persist 8 True [(1, 'lvol0')]" "$(sed -n 2p <<<"$BEFORE")"

echo "## 2: kill -9 and restart on the same pool"
kill -KILL "$PID"; wait "$PID" 2>/dev/null; PID=""
serve || finish
check_eq "keys, subsystem, hosts with their key names, listeners: all back" "$BEFORE" "$(state)"
check_eq "the TLS listener still requires TLS" "True" \
    "$(rpc nvmf_subsystem_get_listeners "$NQN" | py '[l["secure_channel"] for l in j if l["address"]["trsvcid"] == "'"$TLS_PORT"'"][0]')"
check_eq "hosts see their keys enforced after the restart" "$EXPECT_SEES" "$(sees)"

echo "## 3: no key bytes in the pool or the log"
no_secret() {   # no_secret FILE: prints the forms of any key found in FILE, or "none"
    "$SYS_PY" - "$1" "${SECRETS[@]}" <<'PYEOF'
import base64, sys
data = open(sys.argv[1], "rb").read()
found = []
for text in sys.argv[2:]:
    body = text.split(":")[2]
    raw = base64.b64decode(body)[:-4]
    forms = {"text": body.encode(), "raw": raw, "hex": raw.hex().encode(),
             "HEX": raw.hex().upper().encode(), "base64": base64.b64encode(raw).rstrip(b"=")}
    found += ["%s of %s" % (f, text[:12]) for f, b in forms.items() if b in data]
print(" ".join(found) or "none")
PYEOF
}
check_eq "the pool file holds no key in any form" "none" "$(no_secret "$T/pool.img")"
check_eq "the pool file names the key files" "True" \
    "$(grep -qaF "$T/keys/psk0" "$T/pool.img" && echo True)"
check_eq "the log holds no key in any form" "none" "$(no_secret "$BALLAST_LOG")"

echo "## 4: key files gone at restart: their hosts are refused (fail closed)"
stop_ballast
rm -f "$T/keys/gonepsk" "$T/keys/gonedh"
LOG_FROM=$(($(wc -l <"$BALLAST_LOG") + 1))
serve || finish
for k in gonepsk gonedh; do
    line=$(tail -n +"$LOG_FROM" "$BALLAST_LOG" | grep "keyring key not restored" | grep "key=\"$k\"")
    if [[ $line == *"path=\"$T/keys/$k\""* && $line == *"No such file"* ]]; then
        pass "a warning names key $k and its path"
    else
        fail "a warning names key $k and its path" "$(tail -n +"$LOG_FROM" "$BALLAST_LOG" | grep -m2 'not restored')"
    fi
done
check_eq "keyring_get_keys: the two keys listed unavailable, with their paths" \
    "[('gonedh', '$T/keys/gonedh', True), ('gonepsk', '$T/keys/gonepsk', True)]" \
    "$(rpc keyring_get_keys | py 'sorted((k["name"], k["path"], "unavailable" in k) for k in j if k["name"].startswith("gone"))')"
check_eq "nvmf_get_subsystems: their hosts refused, listed with their key names" \
    "[('a3', 'gonepsk', None, True), ('a4', None, 'gonedh', True)]" \
    "$(rpc nvmf_get_subsystems "$NQN" | py 'sorted((h["nqn"][-2:], h.get("psk"), h.get("dhchap_key"), h.get("refused", False)) for h in j[0]["hosts"] if h.get("refused"))')"
check_eq "the subsystem still allows any host" "True" \
    "$(rpc nvmf_get_subsystems "$NQN" | py 'j[0]["allow_any_host"]')"
check_eq "Connect: the hosts without their keys are refused, the others as before" \
    "psk:0x184 dh:0x0+atr gpsk:0x184 gdh:0x184 plain:0x0 tls-port:closed" "$(sees)"
check "keyring_file_add_key gonedh again (its file is back)" \
    rpc keyring_file_add_key gonedh "$(key_file gonedh "$GDH")"
check_eq "its host is admitted again, asked to authenticate" \
    "psk:0x184 dh:0x0+atr gpsk:0x184 gdh:0x0+atr plain:0x0 tls-port:closed" "$(sees)"
check_eq "and no longer listed refused" "['a3']" \
    "$(rpc nvmf_get_subsystems "$NQN" | py 'sorted(h["nqn"][-2:] for h in j[0]["hosts"] if h.get("refused"))')"

echo "## 5: hosts per subsystem: at most --max-hosts-per-subsystem (1024)"
LIM=nqn.2016-06.io.spdk:limit
check "nvmf_create_subsystem $LIM" rpc nvmf_create_subsystem "$LIM"
push_hosts() {
    "$SYS_PY" - "$RPC_SOCK" "$LIM" <<'PYEOF'
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); f = s.makefile()
def call(i, host):
    req = {"jsonrpc": "2.0", "id": i, "method": "nvmf_subsystem_add_host",
           "params": {"nqn": sys.argv[2], "host": host}}
    s.sendall(json.dumps(req).encode())
    return json.loads(f.readline())
for i in range(1024):
    r = call(i, "nqn.2014-08.org.nvmexpress:uuid:limit-%04d" % i)
    if "error" in r:
        print("host %d refused: %s" % (i, r["error"])); sys.exit()
r = call(1024, "nqn.2014-08.org.nvmexpress:uuid:limit-1024")
print(r["error"]["code"], r["error"]["message"] if "error" in r else "accepted")
PYEOF
}
check_eq "1024 hosts accepted, the 1025th refused naming the limit" \
    "-32602 Invalid parameters: subsystem '$LIM' has 1024 hosts, the most it may have (--max-hosts-per-subsystem 1024)" \
    "$(push_hosts)"
check_eq "$LIM lists 1024 hosts" 1024 "$(rpc nvmf_get_subsystems "$LIM" | py 'len(j[0]["hosts"])')"
check "nvmf_delete_subsystem $LIM" rpc nvmf_delete_subsystem "$LIM"
kill -KILL "$PID"; wait "$PID" 2>/dev/null; PID=""
serve || finish
check_eq "after kill -9 and restart: $LIM is gone" "False" \
    "$(rpc nvmf_get_subsystems | py 'any(s["nqn"] == "'"$LIM"'" for s in j)')"
check_eq "and $NQN is as configured" "psk:0x184 dh:0x0+atr gpsk:0x184 gdh:0x0+atr plain:0x0 tls-port:closed" "$(sees)"
# The secure channel is the address's: another subsystem listening on the TLS port without
# asking for TLS does not open it to plaintext (the strictest asked holds, as after a restart).
OTHER=nqn.2026-12.dev.ballast:other
check "nvmf_create_subsystem $OTHER" rpc nvmf_create_subsystem "$OTHER" -a
check "$OTHER listens on the TLS port without -k" \
    rpc nvmf_subsystem_add_listener "$OTHER" -t tcp -a 127.0.0.1 -s "$TLS_PORT"
check "$OTHER listens there with TLS optional (ballast's secure_channel \"optional\")" \
    "$(ballast_bin)" rpc nvmf_subsystem_add_listener --rpc-socket "$RPC_SOCK" \
    '{"nqn": "'"$OTHER"'", "secure_channel": "optional", "listen_address": {"trtype": "tcp", "adrfam": "ipv4", "traddr": "127.0.0.1", "trsvcid": "'"$TLS_PORT"'"}}' 
check_eq "the TLS port still requires TLS" "True" \
    "$(rpc nvmf_subsystem_get_listeners "$NQN" | py '[l["secure_channel"] for l in j if l["address"]["trsvcid"] == "'"$TLS_PORT"'"][0]')"
check_eq "and plaintext is still refused there" \
    "psk:0x184 dh:0x0+atr gpsk:0x184 gdh:0x0+atr plain:0x0 tls-port:closed" "$(sees)"
# A host NQN no Connect could carry is refused, not kept.
if out=$(rpc nvmf_subsystem_add_host "$NQN" "bad host" 2>&1); then
    fail "a host NQN with a space is refused" "accepted"
elif grep -q 'no spaces or control characters' <<<"$out"; then
    pass "a host NQN with a space is refused (invalid parameters, saying why)"
else
    fail "a host NQN with a space is refused" "$out"
fi
check_eq "the log holds no key in any form" "none" "$(no_secret "$BALLAST_LOG")"
finish
