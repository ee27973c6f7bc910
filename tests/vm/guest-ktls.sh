# Runs INSIDE the trixie test guest (sh -e, as root), started by test-ktls-kernel.sh: ballast
# itself runs here, where the kernel has TLS (the `tls` module), so its TLS sessions go to kTLS
# once their handshakes are done. Clients: the kernel's NVMe/TCP host (nvme-cli, tlshd) and NBD
# client (nbd-client's GnuTLS), both to 127.0.0.1. Checks data both ways (fio verify, checksums),
# that ballast logged each hand-over, that the kernel counts ballast's kTLS sockets, and that
# --kernel-tls off keeps records in OpenSSL and still works; libnbd (nbdcopy, nbdinfo) works and
# ballast reads its close_notify after NBD_CMD_DISC either way. Files in /guest: ballast, params
# (HOSTNQN HOSTID VOL0 K256), ca.pem server.pem server.key client.pem client.key.
# Prints PASS/FAIL lines and GUEST-DONE.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
. /guest/params
B=/guest/ballast
A=127.0.0.1
. /guest/guest-lib.sh
tls_stat() { awk -v k="$1" '$1 == k { print $2 }' /proc/net/tls_stat; }
# graceful NBD closes that ended on a receive error other than the client's reset (EIO: an
# alert record left unread, which closing the socket answers with a reset of ours)
bad_ends() { grep -a "graceful close: receive failed" /tmp/ballast.log | grep -vc "errno=104"; }
handed() { grep -c "records handed to the kernel (kTLS)" /tmp/ballast.log; }
nbd_size() { cat /sys/block/nbd0/size 2>/dev/null || echo 0; }
start() {   # start EXTRA-FLAGS...: ballast on 127.0.0.1 with TLS required on both protocols
  mkdir -p /tmp/d
  RUST_LOG=info,ballast_tls=debug,ballast_nbd=debug $B serve --data-dir /tmp/d --cores 1 --nbd-listen $A:10809 --nvmf-listen $A:4420 \
    --nvmf-secure-channel required --export vol0=ram:64M --export vol1=ram:64M \
    --nbd-tls require --nbd-tls-cert /guest/server.pem --nbd-tls-key /tmp/server.key \
    --nbd-tls-ca /guest/ca.pem "$@" > /tmp/ballast.log 2>&1 &
  BPID=$!
  i=0; while ! ss -Hltn "sport = :4420" | grep -q . && [ $i -lt 100 ]; do sleep 0.3; i=$((i + 1)); done
  $B rpc keyring_file_add_key "{\"name\":\"k256\",\"path\":\"/tmp/k256.key\"}" --data-dir /tmp/d >/tmp/rpc.out 2>&1 \
    && $B rpc nvmf_subsystem_add_host "{\"nqn\":\"$VOL0\",\"host\":\"$HOSTNQN\",\"psk\":\"k256\"}" --data-dir /tmp/d >>/tmp/rpc.out 2>&1
}
stop() { kill -TERM $BPID && wait $BPID; }
nvme_round() {   # nvme_round WHAT: connect over TLS, fio verify, disconnect
  if timeout 120 nvme connect -t tcp -a $A -s 4420 -n "$VOL0" --hostnqn="$HOSTNQN" --hostid="$HOSTID" --tls > /tmp/connect.out 2>&1; then
    pass "$1: nvme connect --tls"
    sleep 1; d=$(dev_of "$VOL0")
    if [ -n "$d" ] && fio_verify "$d" 128k 16m; then pass "$1: fio verify over TLS"; else fail "$1: fio verify over TLS on '$d'"; fi
    nvme disconnect -n "$VOL0" >/dev/null 2>&1; sleep 0.5
  else fail "$1: nvme connect --tls"; cat /tmp/connect.out; tail -5 /tmp/ballast.log; fi
}
nbd_round() {   # nbd_round WHAT [nbd-client flags]: attach over TLS, write and read back 8 MiB, detach
  what=$1; shift
  if timeout 60 nbd-client $A 10809 /dev/nbd0 -N vol1 -t 60 -cacertfile /guest/ca.pem \
       -certfile /guest/client.pem -keyfile /tmp/client.key -tlshostname $A "$@" > /tmp/nbd.out 2>&1; then
    i=0; while [ "$(nbd_size)" = 0 ] && [ $i -lt 50 ]; do sleep 0.2; i=$((i + 1)); done
    pass "$what: nbd-client attached over TLS"
    head -c 8388608 /dev/urandom > /tmp/blob
    dd if=/tmp/blob of=/dev/nbd0 bs=1M oflag=direct status=none && sync
    dd if=/dev/nbd0 of=/tmp/back bs=1M count=8 iflag=direct status=none
    cmp -s /tmp/blob /tmp/back && pass "$what: 8 MiB written and read back over NBD TLS" || fail "$what: NBD data differs"
    timeout 60 nbd-client -d /dev/nbd0 >/dev/null 2>&1
  else fail "$what: nbd-client over TLS"; cat /tmp/nbd.out; fi
}
# libnbd_rounds WHAT: nbdcopy writes and reads back 64 MiB (NBD extended headers, as libnbd
# 1.22 asks for them), then 40 nbdinfo runs; each
# connection ends with libnbd's nbd_shutdown: NBD_CMD_DISC and, right behind it, its TLS
# close_notify. None fails, and ballast's graceful close reads that alert (under kTLS a plain
# receive cannot: a socket closed with it unread would reset). Resets are not counted here:
# libnbd closes its socket without reading our close_notify, and its kernel resets on it.
libnbd_rounds() {
  u="nbds://$A/vol1?tls-certificates=/tmp/certs"
  head -c 67108864 /dev/urandom > /tmp/blob
  if timeout 120 nbdcopy /tmp/blob "$u" 2>/tmp/nbdcopy.err && timeout 120 nbdcopy "$u" /tmp/back 2>>/tmp/nbdcopy.err \
     && cmp -s /tmp/blob /tmp/back; then pass "$1: libnbd's nbdcopy wrote and read back 64 MiB"
  else fail "$1: nbdcopy"; tail -3 /tmp/nbdcopy.err; fi
  timeout 30 nbdinfo "$u" 2>&1 | grep -q 'protocol: newstyle-fixed with TLS, using extended packets' \
    && pass "$1: libnbd over TLS negotiates extended headers" || fail "$1: nbdinfo protocol line over TLS"
  bad=0 i=0
  while [ $i -lt 40 ]; do
    [ "$(timeout 30 nbdinfo --size "$u" 2>>/tmp/nbdinfo.err)" = 67108864 ] || bad=$((bad + 1)); i=$((i + 1))
  done
  [ $bad = 0 ] && pass "$1: 40 nbdinfo runs, each ended by nbd_shutdown, all succeed" \
    || { fail "$1: $bad of 40 nbdinfo runs failed"; tail -3 /tmp/nbdinfo.err; }
  sleep 1
  [ "$(bad_ends)" = 0 ] && pass "$1: every graceful close ended at the client's FIN or reset" \
    || { fail "$1: $(bad_ends) graceful closes ended on a receive error"; grep -a "graceful close: receive failed" /tmp/ballast.log | tail -3; }
  rm -f /tmp/blob /tmp/back
}
echo "guest: kernel $(uname -r), $(nvme version | head -1), $(nbdinfo --version | head -1)"
mkdir -p /tmp/certs && cp /guest/ca.pem /tmp/certs/ca-cert.pem && cp /guest/client.pem /tmp/certs/client-cert.pem \
  && cp /guest/client.key /tmp/certs/client-key.pem && chmod 600 /tmp/certs/client-key.pem
for f in server.key client.key; do cp /guest/$f /tmp/$f; chmod 600 /tmp/$f; done
echo "$K256" > /tmp/k256.key; chmod 600 /tmp/k256.key
grep -q TlsCurrTxSw /proc/net/tls_stat && pass "the guest kernel has TLS" || fail "no /proc/net/tls_stat"
nvme check-tls-key --hostnqn="$HOSTNQN" --subsysnqn="$VOL0" --keydata="$K256" --insert > /tmp/insert.out 2>&1 \
  && pass "PSK inserted into the .nvme keyring" || { fail "inserting the PSK"; cat /tmp/insert.out; }
modprobe nbd 2>/dev/null || true

start && pass "ballast up, key and host configured" || { fail "ballast setup"; cat /tmp/rpc.out; tail /tmp/ballast.log; }
before=$(tls_stat TlsTxSw)
nvme_round kTLS
n=$(handed)
[ "$n" -ge 2 ] && pass "ballast handed $n NVMe/TCP queues to the kernel (admin and I/O)" || { fail "NVMe/TCP hand-overs: $n"; grep -i tls /tmp/ballast.log | tail; }
after=$(tls_stat TlsTxSw)
# The host's sockets and ballast's both count: at least two per queue.
[ $((after - before)) -ge $((2 * n)) ] && pass "the kernel counts ballast's kTLS sockets too ($before -> $after)" \
  || fail "kernel kTLS sockets: $before -> $after for $n queues"
# nbd-client offers only TLS 1.2 unless told otherwise: both versions go to the kernel.
m=$(handed)
nbd_round "kTLS, TLS 1.3" -priority NORMAL:-VERS-TLS-ALL:+VERS-TLS1.3
[ "$(handed)" = $((m + 1)) ] && pass "ballast handed the NBD TLS 1.3 connection to the kernel" \
  || { fail "NBD TLS 1.3 hand-over missing"; grep -i "tls" /tmp/ballast.log | tail -6; }
nbd_round "kTLS, TLS 1.2 (nbd-client's default)"
[ "$(handed)" = $((m + 2)) ] && grep -q "keys=KernelKeys(Tls12" /tmp/ballast.log \
  && pass "ballast handed the NBD TLS 1.2 connection to the kernel" \
  || { fail "NBD TLS 1.2 hand-over missing"; grep -i "tls" /tmp/ballast.log | tail -6; }
libnbd_rounds "kTLS"
n=$(grep -ac "a TLS record of its own (kTLS)" /tmp/ballast.log)
[ "$n" -ge 1 ] && pass "kTLS: ballast read $n clients' close_notify alerts after NBD_CMD_DISC" \
  || fail "kTLS: no alert record read while lingering"
# nbdcopy may open several connections (multi-conn): at least 42
[ "$(handed)" -ge $((m + 2 + 42)) ] && pass "ballast handed libnbd's connections to the kernel" \
  || { fail "libnbd hand-overs: $(handed) after $((m + 2))"; grep -i "tls" /tmp/ballast.log | tail -6; }
grep -q "panicked" /tmp/ballast.log && fail "ballast panicked" || pass "no panic"
stop && pass "ballast exits 0 (kTLS run)" || fail "ballast exit status"
grep -q "NVMeTLSkey" /tmp/ballast.log && fail "the PSK appears in the log"

start --kernel-tls off
nvme_round "kernel-tls off"
nbd_round "kernel-tls off"
libnbd_rounds "kernel-tls off"
[ "$(handed)" = 0 ] && pass "--kernel-tls off: nothing handed to the kernel" || fail "--kernel-tls off still offloads"
stop && pass "ballast exits 0 (userspace run)" || fail "ballast exit status (off)"
dmesg | grep -q "BUG:\|Oops:" && fail "no kernel oops" || pass "no kernel oops"
[ "$failed" = 0 ] && echo "guest: all passed"
echo GUEST-DONE
