# Runs INSIDE the trixie test guest (sh -e, as root), started by test-nvme-tls-kernel.sh: the
# Linux kernel's NVMe/TCP host (nvme-cli 2.13, tlshd) against ballast on the host (10.0.2.2)
# over TLS 1.3 with configured PSKs. /guest/params: PORT (TLS required), OPORT (TLS optional),
# HOSTNQN, HOSTID, HOST2, VOL0, VOL1, K256 (vol0's key for HOSTNQN), K384 (vol1's key for
# HOST2), KWRONG (a key ballast does not know). Prints PASS/FAIL lines and GUEST-DONE.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
. /guest/params
A=10.0.2.2
DISC=nqn.2014-08.org.nvmexpress.discovery
. /guest/guest-lib.sh
connect() { timeout 90 nvme connect -t tcp -a $A "$@" > /tmp/connect.out 2>&1; }
disconnect() { nvme disconnect -n "$1" >/dev/null 2>&1; sleep 0.5; ! connected "$1"; }
insert() {   # insert HOSTNQN SUBNQN KEY
  nvme check-tls-key --hostnqn="$1" --subsysnqn="$2" --keydata="$3" --insert > /tmp/insert.out 2>&1 \
    || { cat /tmp/insert.out; return 1; }
}
echo "guest: kernel $(uname -r), $(nvme version | head -1)"

insert "$HOSTNQN" "$VOL0" "$K256" && insert "$HOSTNQN" "$DISC" "$K256" && insert "$HOST2" "$VOL1" "$K384" \
  && pass "PSKs inserted into the .nvme keyring" || fail "inserting PSKs"

if timeout 90 nvme discover -t tcp -a $A -s "$PORT" --tls --hostnqn="$HOSTNQN" --hostid="$HOSTID" > /tmp/disc.out 2>&1; then
  pass "nvme discover --tls"
  grep -qi "treq: *required" /tmp/disc.out && pass "discovery log: treq required" \
    || { fail "discovery log: treq required"; cat /tmp/disc.out; }
  grep -qiE "sectype: *tls *1?\.?3|sectype: *tls13" /tmp/disc.out && pass "discovery log: sectype TLS 1.3" \
    || fail "discovery log: sectype TLS 1.3"
else
  fail "nvme discover --tls"; cat /tmp/disc.out
fi

if connect -s "$PORT" -n "$VOL0" --hostnqn="$HOSTNQN" --hostid="$HOSTID"; then
  fail "plaintext connect to the TLS-required listener refused"; disconnect "$VOL0"
else pass "plaintext connect to the TLS-required listener refused"; fi

if connect -s "$PORT" -n "$VOL0" --hostnqn="$HOSTNQN" --hostid="$HOSTID" --tls; then
  pass "nvme connect --tls (SHA-256 PSK)"
  sleep 1; d=$(dev_of "$VOL0")
  if [ -n "$d" ] && fio_verify "$d"; then pass "fio verify over TLS (SHA-256)"; else fail "fio verify over TLS (SHA-256) on '$d'"; fi
  # Linux 6.12's connect and fio met no error: the controller's error log is empty.
  c=$(echo "$d" | sed -E 's/^(nvme[0-9]+).*/\1/')
  nerr=$(nvme smart-log "/dev/$c" -o json 2>/dev/null | grep -Eo '"num_err_log_entries" *: *"?[0-9]+' | grep -Eo '[0-9]+$' || true)
  if [ "${nerr:-none}" = 0 ]; then pass "no error recorded by the controller (smart-log's count 0)"
  else fail "errors recorded by the controller: ${nerr:-none}"; nvme smart-log "/dev/$c" -o json || true; nvme error-log "/dev/$c" -o json || true; nvme get-log "/dev/$c" --log-id=1 --log-len=256 -b | od -A d -t x1 || true; fi
  if [ -n "$d" ] && mkfs.ext4 -q -F "/dev/$d" && mkdir -p /mnt/v && mount "/dev/$d" /mnt/v \
     && head -c 5000000 /dev/urandom > /mnt/v/f && sha256sum /mnt/v/f > /tmp/f.sum && umount /mnt/v \
     && mount "/dev/$d" /mnt/v && sha256sum -c /tmp/f.sum >/dev/null && umount /mnt/v; then
    pass "mkfs.ext4, a file written and read back over TLS"
  else fail "mkfs and a file over TLS"; umount /mnt/v 2>/dev/null; fi
  grep -q TlsCurrTxSw /proc/net/tls_stat && pass "the host's socket uses kernel TLS" || fail "kTLS on the host"
  disconnect "$VOL0" && pass "disconnect" || fail "disconnect"
else
  fail "nvme connect --tls (SHA-256 PSK)"; cat /tmp/connect.out; tail -20 /run/tlshd.log 2>/dev/null
fi

if connect -s "$PORT" -n "$VOL1" --hostnqn="$HOST2" --hostid="$HOSTID" --tls; then
  pass "nvme connect --tls (SHA-384 PSK)"
  sleep 1; d=$(dev_of "$VOL1")
  if [ -n "$d" ] && fio_verify "$d"; then pass "fio verify over TLS (SHA-384)"; else fail "fio verify over TLS (SHA-384)"; fi
  disconnect "$VOL1" || fail "disconnect vol1"
else
  fail "nvme connect --tls (SHA-384 PSK)"; cat /tmp/connect.out
fi

# A host whose key differs from what ballast holds for it: the handshake fails.
insert "$HOST2" "$VOL0" "$KWRONG" >/dev/null
if connect -s "$PORT" -n "$VOL0" --hostnqn="$HOST2" --hostid="$HOSTID" --tls; then
  fail "a wrong PSK is refused"; disconnect "$VOL0"
else pass "a wrong PSK is refused"; fi
# The optional listener: plaintext is fine in general, but a host with a key must use TLS.
if connect -s "$OPORT" -n "$VOL0" --hostnqn="$HOSTNQN" --hostid="$HOSTID"; then
  fail "plaintext refused for a host that has a key (optional listener)"; disconnect "$VOL0"
else pass "plaintext refused for a host that has a key (optional listener)"; fi
if connect -s "$OPORT" -n "$VOL0" --hostnqn="$HOSTNQN" --hostid="$HOSTID" --tls; then
  pass "TLS on the optional listener"; disconnect "$VOL0" || true
else fail "TLS on the optional listener"; cat /tmp/connect.out; fi
dmesg | grep -q "BUG:\|Oops:" && fail "no kernel oops" || pass "no kernel oops"
[ "$failed" = 0 ] && echo "guest: all passed"
echo GUEST-DONE
