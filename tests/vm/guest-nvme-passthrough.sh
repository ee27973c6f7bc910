# Runs INSIDE the test guest (tests/vm/run.sh), started by test-nvme-passthrough.sh, with qemu's
# emulated NVMe controller attached (BALLAST_VM_NVME). ballast runs in the guest and serves the
# namespace through io_uring passthrough (--export pt=nvme:/dev/ng0n1); the guest's kernel NBD
# and NVMe/TCP initiators are its clients, on 127.0.0.1:
#   1. the namespace appears (/dev/ng0n1); ballast starts on it and logs its geometry
#   2. NBD: the size matches the namespace; fio randwrite 4k-1m with crc32c verify (requests
#      above the controller's MDTS are split into several commands)
#   3. BLKZEROOUT (NBD write-zeroes -> NVMe Write Zeroes) reads back as zeros, neighbours
#      intact; BLKDISCARD (trim -> Dataset Management) succeeds, neighbours intact
#   4. mkfs.ext4 on part of the device (it discards it), 24 files with sha256 sums, umount
#   5. a known pattern written at 448 MiB with fsync (NBD FLUSH -> NVMe Flush), then kill -9
#   6. restart: e2fsck clean, the files' sums and the pattern are intact
#   7. NVMe/TCP: the same namespace through the kernel's nvme-tcp host reads the pattern;
#      fio verify over it
#   8. SIGTERM: ballast exits 0
#   9. a pool on the namespace (superblocks, metadata, journal and data all through
#      passthrough: ioctls to format and open it, the device ring for everything else): a
#      volume and a snapshot, fio verify over NBD, a flushed pattern survives kill -9, the
#      snapshot is unchanged, clean stop, `pool check` of the namespace is exact; no I/O
#      errors in dmesg; while it is served, neither `pool check` nor another daemon takes the
#      namespace through its block node (/dev/nvme0n1)
# The host compares the pattern on the image file afterwards. Prints PASS/FAIL lines, then
# "guest done".
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
. /guest/params
pass() { echo "PASS: $*"; }
fail() { echo "FAIL: $*"; }
check() { w=$1; shift; if "$@"; then pass "$w"; else fail "$w"; fi; }
B=/guest/ballast
chmod +x $B
MiB=1048576
PATTERN_AT=448   # MiB
mkdir -p /mnt/v /tmp/data
MODE=interrupts; [ -n "$POLL" ] && MODE="polled completions ($(cat /sys/module/nvme/parameters/poll_queues 2>/dev/null) poll queues)"
echo "NVMe passthrough test: ${LBA}-byte LBAs, $MODE"

STARTS=0
serve() { # serve ARGS...: starts ballast with ARGS in the background, waits until it serves;
          # log: $LOG
  STARTS=$((STARTS + 1)); LOG=/tmp/ballast.$STARTS.log
  $B serve --cores 2 $POLL "$@" --nbd-listen 127.0.0.1:10809 --nvmf-listen 127.0.0.1:4420 \
    > $LOG 2>&1 &
  BPID=$!
  i=0; while [ $i -lt 100 ]; do
    grep -q "ballast serving" $LOG && return 0
    kill -0 $BPID 2>/dev/null || return 1
    sleep 0.2; i=$((i+1))
  done
  return 1
}
start_ballast() { serve --data-dir /tmp/data --export pt=nvme:/dev/ng0n1 "$@"; }
NBD=nbd0   # a kill -9 leaves it to the kernel's teardown: the restart attaches nbd1
attach() { # attach [EXPORT]: EXPORT (default pt) on /dev/$NBD
  timeout 60 nbd-client 127.0.0.1 10809 /dev/$NBD -N "${1:-pt}" -b 4096 -t 60 > /tmp/nbd-client.out 2>&1 \
    || { cat /tmp/nbd-client.out; return 1; }
  i=0; while [ "$(cat /sys/block/$NBD/size)" = 0 ] && [ $i -lt 50 ]; do sleep 0.2; i=$((i+1)); done
  [ "$(cat /sys/block/$NBD/size)" != 0 ]
}
detach() { nbd-client -d /dev/$NBD >/dev/null 2>&1; }
region_sum() { # region_sum DEV OFFSET_MIB LEN_MIB
  dd if="$1" bs=$MiB skip="$2" count="$3" iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1
}
dev_of() { # the block device of subsystem $1 (the multipath head when there is one)
  for s in /sys/class/nvme-subsystem/nvme-subsys*; do
    [ "$(cat "$s/subsysnqn" 2>/dev/null)" = "$1" ] || continue
    for b in "$s"/nvme*n1; do [ -e "$b" ] && { echo "/dev/${b##*/}"; return; }; done
  done
  for c in /sys/class/nvme/nvme*; do
    [ "$(cat "$c/subsysnqn" 2>/dev/null)" = "$1" ] || continue
    n=${c##*/}; echo "/dev/${n}n1"; return
  done
}
zero_sum() { dd if=/dev/zero bs=$MiB count="$1" 2>/dev/null | sha256sum | cut -d' ' -f1; }

# 1. the namespace and ballast on it
i=0; while [ ! -c /dev/ng0n1 ] && [ $i -lt 50 ]; do sleep 0.2; i=$((i+1)); done
check "the emulated controller's namespace has a generic device (/dev/ng0n1)" test -c /dev/ng0n1
NS_BYTES=$(( $(cat /sys/block/nvme0n1/size) * 512 ))
dmesg | grep -E "nvme nvme0: .*queues" | sed 's/^\[[ 0-9.]*\] //'
echo "namespace: $NS_BYTES bytes, logical block $(cat /sys/block/nvme0n1/queue/logical_block_size)," \
  "max_hw_sectors_kb $(cat /sys/block/nvme0n1/queue/max_hw_sectors_kb)"
# The first run never spins (--poll-us 0): every device completion must wake a sleeping core
# (interrupt mode: the device ring's eventfd); the restart runs with the default polling.
if start_ballast --poll-us=0; then pass "ballast serves nvme:/dev/ng0n1 (--poll-us 0)"; else
  fail "ballast serves nvme:/dev/ng0n1"; cat $LOG; echo "guest done"; exit 1
fi
grep "NVMe namespace opened" $LOG | sed 's/\x1b\[[0-9;]*m//g'

# 2. NBD: size, fio verify
check "nbd-client attaches pt" attach
check "the export's size is the namespace's ($NS_BYTES)" test "$(blockdev --getsize64 /dev/nbd0)" = "$NS_BYTES"
check "fio randwrite 4k-1m, iodepth 16, crc32c verify" \
  fio --name=pt --filename=/dev/nbd0 --eta=never --ioengine=libaio --direct=1 --rw=randwrite \
    --bsrange=4k-1m --iodepth=16 --size=${FIO_SIZE:-48m} --verify=crc32c --do_verify=1 \
    --verify_fatal=1 --output=/tmp/fio.out
grep -E "WRITE:|READ:|err=" /tmp/fio.out | head -4
# From Linux 6.12 (ffi/src/devring.rs PASSTHROUGH_FIXED_SINCE) the data buffers go to the
# namespace registered with the core's device ring (no page pinning per command); before, they
# go plain. `ballast stats --json` counts the commands sent on registered buffers.
$B stats --json --data-dir /tmp/data | grep -o '"fixed_buf_ops": *[0-9]*' | grep -o '[0-9]*$' > /tmp/fixed
fixed_ops=$(awk '{s += $1} END {print s + 0}' /tmp/fixed)
check "ballast stats counts fixed_buf_ops for both cores" test "$(wc -l < /tmp/fixed)" -eq 2
kv=$(uname -r); kmaj=${kv%%.*}; kmin=${kv#*.}; kmin=${kmin%%[!0-9]*}
echo "passthrough commands on registered buffers: $fixed_ops (kernel $kv)"
if [ "$kmaj" -gt 6 ] || { [ "$kmaj" -eq 6 ] && [ "$kmin" -ge 12 ]; }; then
  check "passthrough data went on registered buffers (fixed_buf_ops $fixed_ops > 50)" test "$fixed_ops" -gt 50
else
  check "kernel $kv: passthrough data on plain buffers (fixed_buf_ops $fixed_ops = 0)" test "$fixed_ops" -eq 0
fi
t0=$(date +%s)
dd if=/dev/nbd0 of=/dev/null bs=4k count=300 iflag=direct 2>/dev/null
t1=$(date +%s)
echo "300 reads at queue depth 1: $((t1 - t0)) s"
check "300 reads at queue depth 1 take < 15 s (each completion wakes the sleeping core)" test $((t1 - t0)) -lt 15

# 3. write zeroes and discard
dd if=/dev/urandom of=/tmp/r bs=$MiB count=8 2>/dev/null
dd if=/tmp/r of=/dev/nbd0 bs=$MiB seek=60 oflag=direct conv=fsync 2>/dev/null
before_lo=$(region_sum /dev/nbd0 60 2); before_hi=$(region_sum /dev/nbd0 66 2)
check "BLKZEROOUT of 4 MiB (NVMe Write Zeroes)" /usr/sbin/blkdiscard -z -o $((62 * MiB)) -l $((4 * MiB)) /dev/nbd0
check "the zeroed range reads zeros" test "$(region_sum /dev/nbd0 62 4)" = "$(zero_sum 4)"
check "its neighbours are intact" test "$(region_sum /dev/nbd0 60 2)$(region_sum /dev/nbd0 66 2)" = "$before_lo$before_hi"
dd if=/tmp/r of=/dev/nbd0 bs=$MiB seek=80 oflag=direct conv=fsync 2>/dev/null
before_lo=$(region_sum /dev/nbd0 80 2); before_hi=$(region_sum /dev/nbd0 86 2)
check "BLKDISCARD of 4 MiB (NVMe Dataset Management, deallocate)" /usr/sbin/blkdiscard -o $((82 * MiB)) -l $((4 * MiB)) /dev/nbd0
check "the discard's neighbours are intact" test "$(region_sum /dev/nbd0 80 2)$(region_sum /dev/nbd0 86 2)" = "$before_lo$before_hi"
if [ "$(region_sum /dev/nbd0 82 4)" = "$(zero_sum 4)" ]; then echo "(the deallocated range reads zeros)"; else echo "(the deallocated range does not read zeros: allowed)"; fi

# 4. a filesystem on the first 384 MiB
check "mkfs.ext4 (discards the range first)" /usr/sbin/mkfs.ext4 -q -F -b 4096 /dev/nbd0 98304
check "mount" mount /dev/nbd0 /mnt/v
i=0; while [ $i -lt 24 ]; do
  dd if=/dev/urandom of=/mnt/v/f$i bs=4k count=$(( (i * 37) % 200 + 1 )) 2>/dev/null; i=$((i+1))
done
(cd /mnt/v && sha256sum f*) > /tmp/files.sums
check "umount" umount /mnt/v

# 5. a known pattern, flushed; then kill -9
yes ballast-nvme-pattern | head -c $((4 * MiB)) > /tmp/pattern
check "pattern written at $PATTERN_AT MiB with fsync (NBD FLUSH -> NVMe Flush)" \
  dd if=/tmp/pattern of=/dev/nbd0 bs=$MiB seek=$PATTERN_AT oflag=direct conv=fsync
kill -9 $BPID; wait $BPID 2>/dev/null || true
detach
NBD=nbd1
check "ballast is gone after kill -9" sh -c "! kill -0 $BPID 2>/dev/null"

# 6. restart and verify
if start_ballast; then pass "ballast restarts on the namespace"; else fail "ballast restarts"; tail -20 $LOG; fi
check "nbd-client re-attaches" attach
check "e2fsck -fn is clean after kill -9" /usr/sbin/e2fsck -fn /dev/$NBD
check "mount after restart" mount /dev/$NBD /mnt/v
check "the files' sha256 sums are intact" sh -c "cd /mnt/v && sha256sum -c /tmp/files.sums >/dev/null"
umount /mnt/v
check "the flushed pattern survived kill -9" test "$(region_sum /dev/$NBD $PATTERN_AT 4)" = "$(sha256sum < /tmp/pattern | cut -d' ' -f1)"
detach

# 7. NVMe/TCP over the same namespace
# newer kernels refuse a host id that does not match the host NQN's uuid: give both
U=$(cat /proc/sys/kernel/random/uuid)
if nvme connect -t tcp -a 127.0.0.1 -s 4420 -n nqn.2026-11.dev.ballast:pt \
    --hostnqn=nqn.2014-08.org.nvmexpress:uuid:$U --hostid=$U > /tmp/connect.out 2>&1; then
  pass "nvme connect over TCP"
  D=; i=0
  while [ -z "$D" ] && [ $i -lt 50 ]; do D=$(dev_of nqn.2026-11.dev.ballast:pt); [ -b "$D" ] || { D=; sleep 0.2; i=$((i+1)); }; done
  echo "NVMe/TCP namespace: $D"
  check "the pattern reads back over NVMe/TCP" test "$(region_sum "$D" $PATTERN_AT 4)" = "$(sha256sum < /tmp/pattern | cut -d' ' -f1)"
  check "fio over NVMe/TCP: randwrite 4k-256k, crc32c verify" \
    fio --name=tcp --filename="$D" --eta=never --ioengine=libaio --direct=1 --rw=randwrite --offset=400m \
      --bsrange=4k-256k --iodepth=8 --size=16m --verify=crc32c --do_verify=1 --verify_fatal=1 \
      --output=/tmp/fio-tcp.out
  nvme disconnect -n nqn.2026-11.dev.ballast:pt >/dev/null 2>&1
else
  fail "nvme connect over TCP"; cat /tmp/connect.out
fi

# 8. clean stop
kill -TERM $BPID; rc=0; wait $BPID || rc=$?
check "ballast exits 0 on SIGTERM" test $rc = 0

# 9. a pool on the namespace (the first 128 MiB of data clusters at most: the host's pattern
# at 448 MiB stays)
start_pool() { serve --data-dir /tmp/pdata --pool /dev/ng0n1; }
ctl() { timeout 60 $B "$@" --data-dir /tmp/pdata; }
mkdir -p /tmp/pdata
check "pool create on /dev/ng0n1 (passthrough ioctls)" $B pool create /dev/ng0n1
if start_pool; then pass "ballast serves a pool on /dev/ng0n1"; else
  fail "ballast serves a pool on /dev/ng0n1"; tail -20 $LOG; echo "guest done"; exit 1
fi
check "volume create v 64M" ctl volume create v 64M
NBD=nbd2
check "nbd-client attaches volume v" attach v
check "fio randwrite 4k-256k on the volume, crc32c verify" \
  fio --name=pv --filename=/dev/$NBD --eta=never --ioengine=libaio --direct=1 --rw=randwrite \
    --bsrange=4k-256k --iodepth=16 --size=32m --verify=crc32c --do_verify=1 --verify_fatal=1 \
    --output=/tmp/fio-pool.out
SNAP_SUM=$(region_sum /dev/$NBD 0 32)
check "snapshot create v s1" ctl snapshot create v s1
yes ballast-pool-pattern | head -c $((2 * MiB)) > /tmp/ppattern
check "a pattern over the snapshotted range, with fsync (copy-on-write, commit)" \
  dd if=/tmp/ppattern of=/dev/$NBD bs=$MiB seek=8 oflag=direct conv=fsync
kill -9 $BPID; wait $BPID 2>/dev/null || true
detach
if start_pool; then pass "ballast reopens the pool after kill -9 (journal replay over passthrough)"; else
  fail "ballast reopens the pool"; tail -20 $LOG
fi
# The namespace's block node names the same media: nothing else takes it while it is served.
rc=0; $B pool check /dev/nvme0n1 > /tmp/pcheck2.out 2>&1 || rc=$?
check "pool check through the block node (/dev/nvme0n1) is refused while the pool is served" \
  sh -c "[ $rc != 0 ] && grep -q 'in use by another process' /tmp/pcheck2.out"
mkdir -p /tmp/other
rc=0; timeout 60 $B serve --data-dir /tmp/other --cores 1 --export raw=file:/dev/nvme0n1 \
  --nbd-listen 127.0.0.1:10810 --nvmf-listen 127.0.0.1:4421 > /tmp/other.log 2>&1 || rc=$?
check "a second daemon does not export /dev/nvme0n1 raw while the pool is served" \
  sh -c "[ $rc != 0 ] && grep -q 'in use by another process' /tmp/other.log"
NBD=nbd3
check "nbd-client attaches v again" attach v
check "the flushed pattern survived kill -9" test "$(region_sum /dev/$NBD 8 2)" = "$(sha256sum < /tmp/ppattern | cut -d' ' -f1)"
detach
NBD=nbd4
check "nbd-client attaches snapshot s1" attach s1
check "snapshot s1 is unchanged" test "$(region_sum /dev/$NBD 0 32)" = "$SNAP_SUM"
detach
kill -TERM $BPID; rc=0; wait $BPID || rc=$?
check "ballast exits 0 on SIGTERM (pool checkpointed)" test $rc = 0
$B pool check /dev/ng0n1 > /tmp/pcheck.out 2>&1; rc=$?
tail -3 /tmp/pcheck.out
check "pool check of the namespace: consistent" sh -c "[ $rc = 0 ] && grep -q 'pool is consistent' /tmp/pcheck.out"

check "no panic in ballast's log" sh -c "! grep -qi panic /tmp/ballast.*.log"
check "no I/O errors in dmesg" sh -c "! dmesg | grep -iE 'I/O error|nvme.*(timeout|abort|reset)|EXT4-fs error|blk_update_request'"
dmesg | grep -iE 'nvme|nbd' | tail -8
sync
echo "guest done"
