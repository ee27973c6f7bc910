# Runs INSIDE the test guest (sh -e, as root), started by test-nbd-tls-kernel.sh through run.sh.
# The Linux kernel's NBD client over TLS (nbd-client's GnuTLS proxy) against ballast on the host
# (10.0.2.2), with a client certificate: attach, mkfs.ext4, files with checksums, detach,
# re-attach, e2fsck, checksums; refusals: no TLS, and a certificate not on the export's
# allow-list. Files in /guest: params (NBD_PORT), ca.pem, client.pem, client.key, other.pem,
# other.key. Prints PASS/FAIL lines and finally GUEST-DONE.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
. /guest/params
HOST=10.0.2.2
DEV=/dev/nbd0
failed=0
pass() { echo "PASS: $*"; }
fail() { echo "FAIL: $*"; failed=$((failed + 1)); }
if command -v sha256sum >/dev/null; then SUM=sha256sum; else SUM=md5sum; fi
dev_size() { cat /sys/block/nbd0/size 2>/dev/null || echo 0; }
tls() {   # tls CERT KEY: nbd-client's TLS arguments
  echo "-cacertfile /guest/ca.pem -certfile /guest/$1 -keyfile /guest/$2 -tlshostname $HOST"
}
attach() {   # attach EXTRA-ARGS...
  timeout 60 nbd-client "$HOST" "$NBD_PORT" "$DEV" -N vol0 -t 60 "$@" || return 1
  i=0; while [ "$(dev_size)" = 0 ] && [ $i -lt 50 ]; do sleep 0.2; i=$((i + 1)); done
  [ "$(dev_size)" != 0 ]
}
detach() {
  timeout 60 nbd-client -d "$DEV" || return 1
  i=0; while [ "$(dev_size)" != 0 ] && [ $i -lt 50 ]; do sleep 0.2; i=$((i + 1)); done
  [ "$(dev_size)" = 0 ]
}
modprobe nbd 2>/dev/null || true

# shellcheck disable=SC2046
if attach $(tls client.pem client.key); then pass "attach over TLS with the allowed certificate"
else fail "attach over TLS with the allowed certificate"; echo GUEST-DONE; exit 1; fi
mkfs.ext4 -q -F "$DEV" && pass "mkfs.ext4 over TLS" || fail "mkfs.ext4 over TLS"
mkdir -p /mnt/t && mount "$DEV" /mnt/t
for i in 1 2 3 4; do head -c $((3 * 1048576 + i * 4099)) /dev/urandom > /mnt/t/f$i; done
(cd /mnt/t && $SUM f1 f2 f3 f4) > /tmp/sums
umount /mnt/t
detach && pass "detach" || fail "detach"
# shellcheck disable=SC2046
attach $(tls client.pem client.key) && pass "re-attach over TLS" || fail "re-attach over TLS"
e2fsck -fn "$DEV" >/tmp/fsck 2>&1 && pass "e2fsck clean after re-attach" || { fail "e2fsck"; tail -5 /tmp/fsck; }
mount "$DEV" /mnt/t && (cd /mnt/t && $SUM -c /tmp/sums >/dev/null) \
  && pass "files read back over TLS match their checksums" || fail "checksums after re-attach"
umount /mnt/t 2>/dev/null || true
detach || fail "second detach"

if attach; then fail "plaintext attach refused (TLS required)"; detach || true
else pass "plaintext attach refused (TLS required)"; fi
# shellcheck disable=SC2046
if attach $(tls other.pem other.key); then fail "certificate not on the allow-list refused"; detach || true
else pass "certificate not on the allow-list refused"; fi
[ "$failed" = 0 ] && echo "guest: all passed"
echo GUEST-DONE
