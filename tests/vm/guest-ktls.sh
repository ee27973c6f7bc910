# Runs INSIDE the trixie test guest (sh -e, as root), started by test-ktls-kernel.sh: ballast
# itself runs here, where the kernel has TLS (the `tls` module), so its TLS sessions go to kTLS
# once their handshakes are done. Clients: the kernel's NVMe/TCP host (nvme-cli, tlshd) and NBD
# client (nbd-client's GnuTLS), both to 127.0.0.1. Checks data both ways (fio verify, checksums),
# that ballast logged each hand-over, that the kernel counts ballast's kTLS sockets, and that
# --kernel-tls off keeps records in OpenSSL and still works. Files in /guest: ballast, params
# (HOSTNQN HOSTID VOL0 K256), ca.pem server.pem server.key client.pem client.key.
# Prints PASS/FAIL lines and GUEST-DONE.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
. /guest/params
B=/guest/ballast
A=127.0.0.1
. /guest/guest-lib.sh
tls_stat() { awk -v k="$1" '$1 == k { print $2 }' /proc/net/tls_stat; }
handed() { grep -c "records handed to the kernel (kTLS)" /tmp/ballast.log; }
nbd_size() { cat /sys/block/nbd0/size 2>/dev/null || echo 0; }
start() {   # start EXTRA-FLAGS...: ballast on 127.0.0.1 with TLS required on both protocols
  mkdir -p /tmp/d
  RUST_LOG=info,ballast_tls=debug $B serve --data-dir /tmp/d --cores 1 --nbd-listen $A:10809 --nvmf-listen $A:4420 \
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
echo "guest: kernel $(uname -r), $(nvme version | head -1)"
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
grep -q "panicked" /tmp/ballast.log && fail "ballast panicked" || pass "no panic"
stop && pass "ballast exits 0 (kTLS run)" || fail "ballast exit status"
grep -q "NVMeTLSkey" /tmp/ballast.log && fail "the PSK appears in the log"

start --kernel-tls off
nvme_round "kernel-tls off"
nbd_round "kernel-tls off"
[ "$(handed)" = 0 ] && pass "--kernel-tls off: nothing handed to the kernel" || fail "--kernel-tls off still offloads"
stop && pass "ballast exits 0 (userspace run)" || fail "ballast exit status (off)"
dmesg | grep -q "BUG:\|Oops:" && fail "no kernel oops" || pass "no kernel oops"
[ "$failed" = 0 ] && echo "guest: all passed"
echo GUEST-DONE
