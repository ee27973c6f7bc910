# Runs INSIDE the trixie test guest (sh -e, as root), started by test-nvme-auth-kernel.sh: the
# Linux kernel's NVMe/TCP host authenticating to ballast (10.0.2.2) with DH-HMAC-CHAP.
# /guest/params: PORT (plaintext), TPORT (TLS required), HA..HF host NQNs (HA sha256/ffdhe2048
# with H256; HB sha384/null with H384 and controller secret C512; HC sha512/ffdhe3072 with H512
# and C512; HD H256 with ballast's default hash and group; HE like HA, on TPORT with the TLS key PSK;
# HF like HA, whose key the host side rotates to R256 once HF's queues authenticated, then
# announces by adding subsystem ROTATED to the discovery log),
# HOSTID, VOL0, WRONG (a secret ballast does not know). Prints PASS/FAIL lines and GUEST-DONE.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
. /guest/params
A=10.0.2.2
. /guest/guest-lib.sh
connect() { timeout 120 nvme connect -t tcp -a $A -n "$VOL0" --hostid="$HOSTID" "$@" > /tmp/connect.out 2>&1; }
disconnect() { nvme disconnect -n "$VOL0" >/dev/null 2>&1; sleep 0.5; ! connected "$VOL0"; }
auth_ok() {   # auth_ok LABEL EXPECT ARGS...: connect must succeed, the kernel log name EXPECT, fio verify
  label=$1 expect=$2; shift 2
  dmesg -C
  if connect "$@"; then
    pass "DH-HMAC-CHAP $label: connect"
    sleep 1; d=$(dev_of "$VOL0")
    if [ -n "$d" ] && fio_verify "$d"; then pass "DH-HMAC-CHAP $label: fio verify"; else fail "DH-HMAC-CHAP $label: fio verify on '$d'"; fi
    if dmesg | grep -q "authenticated with hash hmac($expect"; then pass "DH-HMAC-CHAP $label: kernel says hmac($expect"
    else fail "DH-HMAC-CHAP $label: kernel log"; dmesg | grep -i auth | tail -5; fi
    disconnect || fail "DH-HMAC-CHAP $label: disconnect"
  else
    fail "DH-HMAC-CHAP $label: connect"; cat /tmp/connect.out; dmesg | tail -5
  fi
}
auth_refused() {   # auth_refused LABEL ARGS...: connect must fail
  label=$1; shift
  if connect "$@"; then fail "DH-HMAC-CHAP refused: $label"; disconnect
  else pass "DH-HMAC-CHAP refused: $label ($(tail -1 /tmp/connect.out))"; fi
}
echo "guest: kernel $(uname -r), $(nvme version | head -1)"
echo 'file drivers/nvme/host/auth.c +p' > /sys/kernel/debug/dynamic_debug/control 2>/dev/null || true

auth_ok "sha256/ffdhe2048 unidirectional" "sha256) dhgroup ffdhe2048" -s "$PORT" --hostnqn="$HA" --dhchap-secret="$H256"
auth_ok "sha384/null bidirectional" "sha384) dhgroup null" -s "$PORT" --hostnqn="$HB" --dhchap-secret="$H384" --dhchap-ctrl-secret="$C512"
auth_ok "sha512/ffdhe3072 bidirectional" "sha512) dhgroup ffdhe3072" -s "$PORT" --hostnqn="$HC" --dhchap-secret="$H512" --dhchap-ctrl-secret="$C512"
auth_ok "ballast's defaults (sha512/ffdhe3072)" "sha512) dhgroup ffdhe3072" -s "$PORT" --hostnqn="$HD" --dhchap-secret="$H256"
auth_refused "wrong host secret" -s "$PORT" --hostnqn="$HA" --dhchap-secret="$WRONG"
auth_refused "no secret from a host that must authenticate" -s "$PORT" --hostnqn="$HA"
auth_refused "wrong controller secret (the host rejects ballast)" -s "$PORT" --hostnqn="$HB" --dhchap-secret="$H384" --dhchap-ctrl-secret="$WRONG"
# TLS and DH-HMAC-CHAP together.
if nvme check-tls-key --hostnqn="$HE" --subsysnqn="$VOL0" --keydata="$PSK" --insert > /tmp/insert.out 2>&1; then
  auth_ok "over TLS (sha256/ffdhe2048)" "sha256) dhgroup ffdhe2048" -s "$TPORT" --hostnqn="$HE" --tls --dhchap-secret="$H256"
else fail "inserting the PSK"; cat /tmp/insert.out; fi
# Re-authentication by the kernel host itself: a secret written to a live controller's sysfs
# dhchap_secret makes it authenticate every queue again (nvme_ctrl_auth_work).
ctrl_of() { for c in /sys/class/nvme/nvme*; do [ "$(cat "$c/subsysnqn" 2>/dev/null)" = "$1" ] && basename "$c"; done | head -1; }
authed() { dmesg | grep -c "authenticated with hash" || true; }   # (sh -e: grep -c finding none exits 1)
failures() { dmesg | grep -c "authentication failed" || true; }
reauth() {   # reauth LABEL SECRET: write SECRET, wait for a new "authenticated" and no failure
  n0=$(authed) f0=$(failures)
  if ! { echo "$2" > "/sys/class/nvme/$c/dhchap_secret"; } 2>/dev/null; then fail "re-authentication $1: no controller '$c'"; return 0; fi
  i=0; while [ "$(authed)" -le "$n0" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
  sleep 1
  if [ "$(authed)" -gt "$n0" ] && [ "$(failures)" = "$f0" ]; then
    pass "re-authentication $1: $(( $(authed) - n0 )) queue(s) authenticated again"
  else fail "re-authentication $1"; dmesg | grep -i auth | tail -5; fi
  d=$(dev_of "$VOL0")
  if [ -n "$d" ] && fio_verify "$d"; then pass "re-authentication $1: fio verify"; else fail "re-authentication $1: fio verify on '$d'"; fi
}
# A persistent discovery controller (nvme discover -p) hears of the host side's changes below
# (ROTATED and its listener): an Asynchronous Event (discovery log change, 0070F002h) that the
# kernel turns into a uevent NVME_AEN=0x70f002 for nvme-cli's autoconnect rules.
busybox uevent sh -c 'env | grep "^NVME_AEN=" >> /tmp/aen.log || true' &
UPID=$!
if nvme discover -t tcp -a $A -s "$PORT" -p > /tmp/pdisc.out 2>&1; then pass "persistent discovery controller (nvme discover -p)"
else fail "nvme discover -p"; tail -3 /tmp/pdisc.out; fi
dmesg -C
if connect -s "$PORT" --hostnqn="$HF" --dhchap-secret="$H256"; then
  pass "HF: connect (sha256/ffdhe2048)"
  sleep 1; c=$(ctrl_of "$VOL0")
  reauth "with the same secret" "$H256"
  # The host side rotates HF's key at ballast and then adds $ROTATED: wait for it.
  i=0; while ! nvme discover -t tcp -a $A -s "$PORT" 2>/dev/null | grep -q "$ROTATED" && [ $i -lt 60 ]; do sleep 1; i=$((i + 1)); done
  if nvme discover -t tcp -a $A -s "$PORT" 2>/dev/null | grep -q "$ROTATED"; then
    pass "the key rotation announced (discovery log)"
    i=0; while ! grep -q "NVME_AEN=0x70f002" /tmp/aen.log 2>/dev/null && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
    grep -q "NVME_AEN=0x70f002" /tmp/aen.log 2>/dev/null \
      && pass "the persistent discovery controller got the change as an AEN ($(sort -u /tmp/aen.log | tr '\n' ' '))" \
      || { fail "no discovery-log-change AEN"; cat /tmp/aen.log 2>/dev/null; }
    reauth "with the rotated key" "$R256"
  else fail "the key rotation never announced"; fi
  disconnect || fail "HF: disconnect"
else fail "HF: connect"; cat /tmp/connect.out; dmesg | tail -5; fi
if connect -s "$PORT" --hostnqn="$HF" --dhchap-secret="$H256"; then fail "HF's rotated-out secret still connects"; disconnect || true
else pass "HF's rotated-out secret is refused on a new connection"; fi
kill $UPID 2>/dev/null || true
dmesg | grep -q "BUG:\|Oops:" && fail "no kernel oops" || pass "no kernel oops"
[ "$failed" = 0 ] && echo "guest: all passed"
echo GUEST-DONE
