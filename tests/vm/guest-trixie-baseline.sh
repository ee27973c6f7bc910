# Runs inside the trixie guest (tests/vm/test-trixie-baseline.sh): the kernel's own host
# (nvme-tcp, nvme-cli, tlshd) against the kernel's own target (nvmet-tcp), both in this guest, over
# 127.0.0.1. Proves the flavour can do NVMe/TCP TLS 1.3 with configured PSKs and DH-HMAC-CHAP,
# and shows, step by step, what a target must be given and what the host sends (the "NOTE:"
# lines). Prints PASS:/FAIL: lines and "N passed, M failed"; exits 1 on any failure.
HOSTNQN=$(cat /etc/nvme/hostnqn) HOSTID=$(cat /etc/nvme/hostid)
DISC=nqn.2014-08.org.nvmexpress.discovery
TLS256=nqn.2014-08.org.example:tls256
TLS384=nqn.2014-08.org.example:tls384
AUTH=nqn.2014-08.org.example:auth
A=127.0.0.1
npass=0 nfail=0
pass() { echo "PASS: $*"; npass=$((npass + 1)); }
fail() { echo "FAIL: $*"; nfail=$((nfail + 1)); }
check() { n=$1; shift; if "$@"; then pass "$n"; else fail "$n"; fi; }
note() { echo "NOTE: $*"; }
# the block device of subsystem $1 (the multipath head, nvmeXnY), waiting for the namespace scan
dev_for() {
  i=0
  while [ $i -lt 100 ]; do
    for b in /sys/block/nvme*n*; do
      case ${b##*/} in *c*) continue ;; esac
      [ "$(cat "$b/device/subsysnqn" 2>/dev/null)" = "$1" ] && { echo "/dev/${b##*/}"; return 0; }
    done
    sleep 0.1; i=$((i + 1))
  done
  return 1
}
connected() { for c in /sys/class/nvme/nvme*; do [ "$(cat "$c/subsysnqn" 2>/dev/null)" = "$1" ] && return 0; done; return 1; }
fio_verify() {   # fio_verify DEV: 8 MiB of 4k..64k random writes, read back and verified
  fio --name=v --filename="$1" --ioengine=libaio --direct=1 --rw=randwrite --bsrange=4k-64k \
      --iodepth=8 --size=8m --verify=crc32c --do_verify=1 --output=/tmp/fio.out >/dev/null 2>&1 \
    || { tail -5 /tmp/fio.out; return 1; }
}
connect() { timeout 90 nvme connect -t tcp -a $A "$@" > /tmp/connect.out 2>&1; }
disconnect() { nvme disconnect -n "$1" >/dev/null 2>&1; ! connected "$1"; }
echo "guest: kernel $(uname -r), $(nvme version | head -1), $(tlshd --version 2>&1 | head -1)"
echo "guest: hostnqn $HOSTNQN hostid $HOSTID"

# what the kernel logs about TLS handshakes and authentication (dynamic debug)
for m in nvmet nvmet_tcp nvme_auth nvme_keyring nvme_core nvme_fabrics nvme_tcp handshake; do
  echo "module $m +p" > /sys/kernel/debug/dynamic_debug/control 2>/dev/null || true
done
# tlshd at debug level, so that its log names the PSK identities and the negotiated session
kill "$(pidof tlshd)" 2>/dev/null || true
sed -i -e '/^\[debug\]/,/^\[/ s/^loglevel=.*/loglevel=7/' -e '/^\[debug\]/,/^\[/ s/^tls=.*/tls=4/' /etc/tlshd.conf
grep -q '^\[debug\]' /etc/tlshd.conf || printf '[debug]\nloglevel=7\ntls=4\nnl=0\n' >> /etc/tlshd.conf
/usr/sbin/tlshd -s > /run/tlshd.log 2>&1 &
sleep 0.5

# ---------------------------------------------------------------- the target (nvmet, configfs)
dd if=/dev/zero of=/tmp/ns1.img bs=1M count=32 2>/dev/null
dd if=/dev/zero of=/tmp/ns2.img bs=1M count=32 2>/dev/null
dd if=/dev/zero of=/tmp/ns3.img bs=1M count=32 2>/dev/null
T=/sys/kernel/config/nvmet
subsys() {   # subsys NQN IMAGE ALLOW_ANY
  mkdir $T/subsystems/$1
  echo "$3" > $T/subsystems/$1/attr_allow_any_host
  mkdir $T/subsystems/$1/namespaces/1
  echo 1 > $T/subsystems/$1/namespaces/1/buffered_io
  echo "$2" > $T/subsystems/$1/namespaces/1/device_path
  echo 1 > $T/subsystems/$1/namespaces/1/enable
}
subsys $TLS256 /tmp/ns1.img 1
subsys $TLS384 /tmp/ns2.img 1
subsys $AUTH /tmp/ns3.img 0
port() {   # port ID SVCID: TCP on 127.0.0.1
  mkdir $T/ports/$1
  echo tcp > $T/ports/$1/addr_trtype; echo ipv4 > $T/ports/$1/addr_adrfam
  echo $A > $T/ports/$1/addr_traddr; echo "$2" > $T/ports/$1/addr_trsvcid
}
# port 1 (4420): TLS 1.3 required; the secure channel is set before any subsystem is linked
port 1 4420
echo tls1.3 > $T/ports/1/addr_tsas
echo required > $T/ports/1/addr_treq
ln -s $T/subsystems/$TLS256 $T/ports/1/subsystems/
ln -s $T/subsystems/$TLS384 $T/ports/1/subsystems/
note "nvmet port 1: addr_tsas=$(cat $T/ports/1/addr_tsas) addr_treq=$(cat $T/ports/1/addr_treq)"
# port 2 (4421): plaintext, for DH-HMAC-CHAP alone
port 2 4421
ln -s $T/subsystems/$AUTH $T/ports/2/subsystems/

# ---------------------------------------------------------------- TLS 1.3 with configured PSKs
# A PSK in the interchange format, made for this host and subsystem, then inserted into the
# kernel's .nvme keyring as a "psk" key named by its identity; the host (nvme-tcp) and the
# target's tlshd both find it there. Discovery needs one for the discovery NQN as well.
psk_insert() {   # psk_insert SUBNQN HMAC(1: SHA-256, 2: SHA-384) -> prints the PSK
  k=$(nvme gen-tls-key --hmac="$2" --hostnqn="$HOSTNQN" --subsysnqn="$1" | grep -o 'NVMeTLSkey-1:[^ ]*')
  nvme check-tls-key --hostnqn="$HOSTNQN" --subsysnqn="$1" --keydata="$k" --insert > /tmp/insert.out 2>&1 \
    || { cat /tmp/insert.out >&2; return 1; }
  echo "$k"
}
P256=$(psk_insert $TLS256 1)
P384=$(psk_insert $TLS384 2)
PDISC=$(psk_insert $DISC 1)
note "PSK formats: SHA-256 ${P256%%:*}:$(echo "$P256" | cut -d: -f2):<$(echo "$P256" | cut -d: -f3 | tr -d '\n' | wc -c) base64 chars>:, SHA-384 ${P384%%:*}:$(echo "$P384" | cut -d: -f2):<$(echo "$P384" | cut -d: -f3 | tr -d '\n' | wc -c) base64 chars>:"
note "check-tls-key --insert said: $(cat /tmp/insert.out | tr '\n' ' ')"
note ".nvme keyring (description = PSK identity):"
keyctl show %:.nvme 2>&1 | sed 's/^/NOTE:   /'
keyctl rdescribe %:.nvme >/dev/null 2>&1 || true
for id in $(keyctl rlist %:.nvme 2>/dev/null); do note "  key $id: $(keyctl rdescribe "$id" 2>&1)"; done
check "three PSKs in the .nvme keyring (two subsystems and discovery)" \
  test "$(keyctl rlist %:.nvme 2>/dev/null | wc -w)" -ge 3

# discovery over TLS: the log entries carry TREQ and TSAS
if timeout 90 nvme discover -t tcp -a $A -s 4420 --tls > /tmp/disc.out 2>&1; then
  pass "nvme discover --tls on the TLS-required port"
  sed 's/^/NOTE: discover: /' /tmp/disc.out
  check "the discovery log shows $TLS256 with TLS required (treq)" \
    sh -c "grep -A12 'subnqn: *$TLS256' /tmp/disc.out | grep -qi 'treq:.*required'; grep -B12 'subnqn: *$TLS256' /tmp/disc.out | grep -qi 'treq:.*required'" 
  check "the discovery log shows the TLS 1.3 secure channel (tsas sectype)" grep -qiE 'sectype: *tls *1?\.?3|sectype: *tls13' /tmp/disc.out
else
  fail "nvme discover --tls on the TLS-required port"; cat /tmp/disc.out
fi

# plaintext is refused on the TLS-required port
if connect -s 4420 -n $TLS256; then fail "plaintext connect to the TLS-required port refused"; disconnect $TLS256
else pass "plaintext connect to the TLS-required port refused ($(tail -1 /tmp/connect.out))"; fi

tls_session() {   # tls_session NQN LABEL: connect --tls, record the session, fio verify, disconnect
  if connect -s 4420 -n "$1" --tls; then
    pass "nvme connect --tls ($2 PSK)"
    d=$(dev_for "$1") || true
    check "$2: namespace appears ($d)" test -b "$d"
    note "$2: /proc/net/tls_stat: $(grep -E 'TlsCurr(Tx|Rx)(Sw|Device)' /proc/net/tls_stat | tr -s ' \n' ' ')"
    check "$2: kTLS sockets are open (host and target ends)" \
      test "$(awk '/TlsCurrTxSw|TlsCurrTxDevice/ {s += $2} END {print s+0}' /proc/net/tls_stat)" -ge 2
    [ -b "$d" ] && check "$2: fio randwrite 4k-64k with crc32c verify over TLS" fio_verify "$d"
    check "$2: disconnect" disconnect "$1"
  else
    fail "nvme connect --tls ($2 PSK)"; cat /tmp/connect.out
  fi
}
tls_session $TLS256 SHA-256
tls_session $TLS384 SHA-384

# ---------------------------------------------------------------- DH-HMAC-CHAP
# The target's host entry holds the host's secret (and the controller's, for bidirectional
# authentication), the hash and the DH group it selects from the host's offer.
H=$T/hosts/$HOSTNQN
auth_setup() {   # auth_setup HASH DHGROUP HOSTKEY [CTRLKEY]: a fresh host entry (a key cannot be unset)
  if [ -d $H ]; then rm $T/subsystems/$AUTH/allowed_hosts/$HOSTNQN; rmdir $H; fi
  mkdir $H
  echo "hmac($1)" > $H/dhchap_hash; echo "$2" > $H/dhchap_dhgroup
  echo "$3" > $H/dhchap_key; [ -z "${4:-}" ] || echo "$4" > $H/dhchap_ctrl_key
  ln -s $H $T/subsystems/$AUTH/allowed_hosts/
}
auth_ok() {   # auth_ok LABEL ARGS...: connect must succeed, I/O must work
  if connect -s 4421 -n $AUTH "$@"; then
    d=$(dev_for $AUTH) || true
    if [ -b "$d" ] && dd if=/dev/urandom of=/tmp/blk bs=4k count=1 2>/dev/null && dd if=/tmp/blk of="$d" bs=4k oflag=direct 2>/dev/null \
       && dd if="$d" of=/tmp/blk2 bs=4k count=1 iflag=direct 2>/dev/null && cmp -s /tmp/blk /tmp/blk2; then
      pass "DH-HMAC-CHAP $1: connect, write + read back"
    else fail "DH-HMAC-CHAP $1: connected but I/O failed ($d)"; fi
    disconnect $AUTH || fail "DH-HMAC-CHAP $1: disconnect"
  else
    fail "DH-HMAC-CHAP $1: connect"; cat /tmp/connect.out
  fi
}
auth_refused() {   # auth_refused LABEL ARGS...: connect must fail
  if connect -s 4421 -n $AUTH "$@"; then fail "DH-HMAC-CHAP refused: $1"; disconnect $AUTH
  else pass "DH-HMAC-CHAP refused: $1 ($(tail -1 /tmp/connect.out))"; fi
}
key() { nvme gen-dhchap-key --hmac="$1" --nqn="$HOSTNQN" | grep -o 'DHHC-1:[^ ]*'; }
KH=$(key 1) KC=$(key 1) KX=$(key 1)
note "DH-HMAC-CHAP secret format: ${KH%%:*}:$(echo "$KH" | cut -d: -f2):<$(echo "$KH" | cut -d: -f3 | tr -d '\n' | wc -c) base64 chars>:"
dmesg -C
auth_setup sha256 ffdhe2048 "$KH"
auth_ok "sha256/ffdhe2048 unidirectional" --dhchap-secret="$KH"
note "the admin queue's authentication as the kernel logged it (dynamic debug; the I/O queues repeat it):"
dmesg | sed 's/^\[[^]]*\] //' | grep -E 'qid 0[: ]' | grep -vE 'public key|key [0-9a-f]{2} |response [0-9a-f]|challenge [0-9a-f]' | head -40 | sed 's/^/NOTE:   /'
auth_refused "wrong host secret" --dhchap-secret="$KX"
auth_refused "no secret from the host" 
auth_setup sha256 ffdhe2048 "$KH" "$KC"
auth_ok "sha256/ffdhe2048 bidirectional" --dhchap-secret="$KH" --dhchap-ctrl-secret="$KC"
auth_refused "wrong controller secret (the host rejects the target)" --dhchap-secret="$KH" --dhchap-ctrl-secret="$KX"
K3=$(key 2) K5=$(key 3)
auth_setup sha384 null "$K3"
auth_ok "sha384/null (no DH) with a SHA-384 secret" --dhchap-secret="$K3"
auth_setup sha512 ffdhe3072 "$K5" "$KC"
auth_ok "sha512/ffdhe3072 bidirectional with a SHA-512 secret" --dhchap-secret="$K5" --dhchap-ctrl-secret="$KC"

# ---------------------------------------------------------------- TLS and DH-HMAC-CHAP together
# the TLS-required port gets the authenticated subsystem too: PSK for it, then both at once
auth_setup sha256 ffdhe2048 "$KH"
PAUTH=$(psk_insert $AUTH 1)
ln -s $T/subsystems/$AUTH $T/ports/1/subsystems/
if connect -s 4420 -n $AUTH --tls --dhchap-secret="$KH"; then
  d=$(dev_for $AUTH) || true
  check "TLS + DH-HMAC-CHAP: connect and verified I/O" fio_verify "$d"
  disconnect $AUTH || fail "TLS + DH-HMAC-CHAP: disconnect"
else fail "TLS + DH-HMAC-CHAP: connect"; cat /tmp/connect.out; fi

note "tlshd (one process per handshake, host and target side alike): priorities, then per handshake:"
grep 'priority string' /run/tlshd.log | sed 's/^/NOTE:   /'
first=$(grep -m1 'Keeping ciphersuite' /run/tlshd.log | sed 's/:.*//')   # the first client's "tlshd[PID]"
note "  supported groups the host offers: $(grep -F "$first: " /run/tlshd.log | grep 'Sent group' | sed 's/.*Sent group //' | tr '\n' ' ')"
grep -E 'Using psk identity|Keeping ciphersuite|sending key share for|PSK KE mode|Pre Shared Key/41 \(|Selected cipher suite|Selected group .*\(|Session description|failed|unhandled|unknown type' /run/tlshd.log \
  | sed -e 's/gnutls([0-9]*): [A-Z]*\[0x[0-9a-f]*\]: //' -e 's/^/NOTE:   /'
check "no kernel oops or nvme errors besides the refused connects" sh -c "! dmesg | grep -qiE 'BUG:|Oops|WARNING:|Call Trace'"
echo "$npass passed, $nfail failed"
[ "$nfail" -eq 0 ]
