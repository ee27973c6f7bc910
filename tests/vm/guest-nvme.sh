# Runs inside the test guest (tests/vm/run.sh) as the NVMe/TCP host, against ballast on the host
# machine (10.0.2.2). Parameters come from /guest/params. Prints "PASS: ..."/"FAIL: ..." lines;
# signals the host test through `say WORD` (a line to the host's signal port).
. /guest/params
A=10.0.2.2
NQN=nqn.2026-11.dev.ballast:vol0
pass() { echo "PASS: $*"; }
fail() { echo "FAIL: $*"; }
check() { local what=$1; shift; if "$@"; then pass "$what"; else fail "$what"; fi; }
say() { echo "$1" | nc "$A" "$SIGNAL_PORT" >/dev/null 2>&1 || true; }
dev_for() { # the block device of the first namespace of the controller connected to $1
  for c in /sys/class/nvme/nvme*; do
    [ "$(cat "$c/subsysnqn" 2>/dev/null)" = "$1" ] || continue
    for n in "$c"/nvme*n1 /sys/block/nvme*; do :; done
  done
  for b in /sys/block/nvme*n1; do
    [ "$(cat "$b/device/subsysnqn" 2>/dev/null || cat "$b"/device/../subsysnqn 2>/dev/null)" = "$1" ] && { echo "/dev/${b##*/}"; return; }
  done
  ls /dev/nvme*n1 2>/dev/null | head -1
}
wait_dev() { i=0; while [ $i -lt 50 ]; do [ -b "$1" ] && return 0; sleep 0.2; i=$((i+1)); done; return 1; }

set +e
out=$(nvme discover -t tcp -a $A -s $PORT 2>&1); echo "$out"
check "nvme discover lists $NQN" sh -c "echo '$out' | grep -q 'subnqn: *$NQN'"
if [ -n "$DISC_PORT" ]; then
  out=$(nvme discover -t tcp -a $A -s $DISC_PORT 2>&1)
  check "discovery on port $DISC_PORT" sh -c "echo '$out' | grep -q 'subnqn: *$NQN'"
fi

# 1. header + data digests, 2 I/O queues
check "connect with header+data digests, 2 I/O queues" nvme connect -t tcp -a $A -s $PORT -n $NQN -i 2 -G -D -k 5
D=/dev/nvme0n1
check "namespace block device appears" wait_dev $D
nvme list
nvme id-ctrl /dev/nvme0 | grep -E '^(mn|kas|sgls|ioccsz|iorcsz|icdoff|mdts|vwc|oncs) '
check "id-ctrl ONCS says Compare (bit 0) and FUSES Compare and Write (bit 0)" sh -c "nvme id-ctrl /dev/nvme0 | grep -Eq '^oncs *: 0x2d' && nvme id-ctrl /dev/nvme0 | grep -Eq '^fuses *: 0x1'"
check "id-ctrl shows our model and KAS" sh -c "nvme id-ctrl /dev/nvme0 | grep -q '^mn *: ballast' && nvme id-ctrl /dev/nvme0 | grep -Eq '^kas *: (0xa|10) *$'"
check "id-ns shows 2 LBA formats, 4096 in use" sh -c "nvme id-ns $D | grep -q 'nlbaf *: 1' && nvme id-ns $D | grep 'in use' | grep -q 'lbads:12'"
check "ns-descs lists EUI64, NGUID, UUID" sh -c "nvme ns-descs $D | grep -q eui64 && nvme ns-descs $D | grep -q nguid && nvme ns-descs $D | grep -q uuid"
queues=$(ls -d /sys/class/nvme/nvme0/device/../nvme0/* >/dev/null 2>&1; cat /sys/class/nvme/nvme0/queue_count 2>/dev/null)
echo "queue_count: $queues"
check "fio randwrite 4k-256k (bsrange) QD16 crc32c verify (digests on)" fio --name=v --filename=$D --rw=randwrite --bsrange=4k-256k --size=$FIO_SIZE --ioengine=libaio --direct=1 --iodepth=16 --verify=crc32c --verify_fatal=1 --output-format=terse
check "nvme flush" nvme flush $D -n 1
# The Error Information log (log page 01h): a read past the end, as nvme-cli's error-log shows it.
blocks=$(( $(blockdev --getsize64 $D) / 4096 ))
check "nvme read past the end fails (LBA Out of Range)" sh -c "! nvme read $D -s $blocks -c 0 -z 4096 -d /tmp/past >/dev/null 2>&1"
elog=$(nvme error-log /dev/nvme0 -e 1 -o json 2>&1); echo "$elog"
elog_ok() {
  echo "$elog" | grep -Eq "\"lba\" *: *$blocks([^0-9]|\$)" && echo "$elog" | grep -Eq '"nsid" *: *1([^0-9]|$)' \
    && echo "$elog" | grep -Eq '"status_field" *: *(16512|33024)([^0-9]|$)'
}
check "nvme error-log: its newest entry is that read (LBA $blocks, namespace 1, SC 80h with DNR)" elog_ok
# Linux's connect (Identify CNS 06h among its commands) met no error before it: the read is the first.
check "...and the first error of the controller (error_count 1)" sh -c "echo '$elog' | grep -Eq '\"error_count\" *: *1([^0-9]|\$)'"
smart=$(nvme smart-log /dev/nvme0 -o json 2>&1); echo "$smart"
nerr=$(echo "$smart" | grep -Eo '"num_err_log_entries" *: *"?[0-9]+' | grep -Eo '[0-9]+$')
check "nvme smart-log counts it (num_err_log_entries ${nerr:-none})" test "${nerr:-0}" -ge 1
# Commands Supported and Effects (log 05h; --csi: nvme-cli would read CAP through PCI registers).
eff=$(nvme effects-log /dev/nvme0 --csi=0 -H 2>&1); echo "$eff"
eff_ok() {
  echo "$eff" | grep -Eq '^IOCS1 .*00000003 +CSUPP\+ +LBCC\+' && echo "$eff" | grep -Eq '^IOCS2 .*00000001 +CSUPP\+ +LBCC-' \
    && echo "$eff" | grep -Eq '^IOCS5 .*00000001 +CSUPP\+ +LBCC-' \
    && echo "$eff" | grep -Eq '^ACS24 .*CSUPP\+' && [ "$(echo "$eff" | grep -Ec '^(ACS|IOCS)[0-9]+ ')" -eq 17 ]
}
check "nvme effects-log: 7 admin and 10 I/O commands, Write changing content (LBCC), Read and Compare not" eff_ok
# Compare (nvme-cli's `compare`: the kernel's passthrough): 8 KiB at LBA 4096 written with dd,
# compared with the same bytes (success) and with one byte changed (Compare Failure, non-zero).
head -c 8192 /dev/urandom > /tmp/cmp.a && cp /tmp/cmp.a /tmp/cmp.b && printf 'x' | dd of=/tmp/cmp.b bs=1 seek=5000 conv=notrunc 2>/dev/null
check "dd writes 8 KiB at LBA 4096" dd if=/tmp/cmp.a of=$D bs=4096 seek=4096 oflag=direct conv=notrunc 2>/dev/null
check "nvme compare with the same data succeeds" nvme compare $D -s 4096 -c 1 -z 8192 -d /tmp/cmp.a
cmp_out=$(nvme compare $D -s 4096 -c 1 -z 8192 -d /tmp/cmp.b 2>&1); cmp_rc=$?; echo "$cmp_out"
check "nvme compare with other data fails with Compare Failure" sh -c "[ $cmp_rc -ne 0 ] && echo '$cmp_out' | grep -Eqi 'compare.?fail|miscompare|0x[0-9]?285'"
dd if=/dev/urandom of=$D bs=1M count=4 seek=8 oflag=direct 2>/dev/null
check "blkdiscard of 4 MiB" blkdiscard -o $((8<<20)) -l $((4<<20)) $D
check "discarded range reads zeros" sh -c "dd if=$D bs=1M skip=8 count=4 iflag=direct 2>/dev/null | cmp -s - /dev/zero -n $((4<<20)) || [ \$(dd if=$D bs=1M skip=8 count=4 iflag=direct 2>/dev/null | tr -d '\0' | wc -c) -eq 0 ]"
check "mkfs.xfs" mkfs.xfs -q -f $D
mkdir -p /mnt/x
check "mount xfs" mount $D /mnt/x
for i in 1 2 3; do dd if=/dev/urandom of=/mnt/x/f$i bs=64k count=$((i*8)) 2>/dev/null; done
(cd /mnt/x && md5sum f1 f2 f3) > /tmp/sums.xfs
check "umount xfs" umount /mnt/x
check "nvme disconnect" nvme disconnect -n $NQN

# 2. no digests, 1 I/O queue; the files survived
check "connect without digests, 1 I/O queue" nvme connect -t tcp -a $A -s $PORT -n $NQN -i 1 -k 5
wait_dev $D
check "mount xfs again" mount $D /mnt/x
check "xfs checksums equal after reconnect" sh -c "cd /mnt/x && md5sum -c /tmp/sums.xfs"
umount /mnt/x
check "mkfs.ext4" mkfs.ext4 -q -F $D
check "mount ext4" mount $D /mnt/x
for i in 1 2; do dd if=/dev/urandom of=/mnt/x/g$i bs=64k count=16 2>/dev/null; done
(cd /mnt/x && md5sum g1 g2) > /tmp/sums.ext4
umount /mnt/x

# 3. idle past the keep-alive timeout (5 s), still usable
sleep 12
check "usable after idling past KATO" dd if=$D of=/dev/null bs=4k count=16 iflag=direct

# 4. namespace added at runtime: seen through the AEN without a rescan
say add-namespace
i=0; while [ $i -lt 100 ] && [ ! -b /dev/nvme0n2 ]; do sleep 0.2; i=$((i+1)); done
check "new namespace appears by itself (AEN)" test -b /dev/nvme0n2

# 4b. the volume grows: the host sees the new size by itself (AEN, no rescan command)
before=$(cat /sys/block/nvme0n1/size)
say resize-volume
i=0; while [ $i -lt 100 ] && [ "$(cat /sys/block/nvme0n1/size)" = "$before" ]; do sleep 0.2; i=$((i+1)); done
after=$(cat /sys/block/nvme0n1/size)
echo "size in 512-byte sectors: $before -> $after"
check "grown volume's new size seen without a rescan (AEN)" test "$after" -eq $((before * 2))

# 5. the target restarts under the host; the host reconnects and I/O resumes
sync
say restart-target
sleep 3
i=0; ok=1
while [ $i -lt 60 ]; do dd if=$D of=/dev/null bs=4k count=1 iflag=direct 2>/dev/null && ok=0 && break; sleep 1; i=$((i+1)); done
check "I/O resumes after the target restarts" test $ok -eq 0
check "mount ext4 after restart" mount $D /mnt/x
check "ext4 checksums equal after restart" sh -c "cd /mnt/x && md5sum -c /tmp/sums.ext4"
umount /mnt/x
nvme disconnect -n $NQN >/dev/null

# 6. a host not on the allowed list is refused; one on it is accepted
check "connect refused for a host NQN not allowed" sh -c "! nvme connect -t tcp -a $A -s $PORT -n $RESTRICTED -q nqn.2014-08.org.example:intruder"
check "connect accepted for the allowed host NQN" nvme connect -t tcp -a $A -s $PORT -n $RESTRICTED -q $ALLOWED
nvme disconnect -n $RESTRICTED >/dev/null
echo "guest done"
