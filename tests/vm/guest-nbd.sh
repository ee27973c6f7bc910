# Runs INSIDE the test guest (busybox sh -e, as root), started by test-nbd-kernel.sh through run.sh.
# The Linux kernel's own NBD client against an NBD server on the host (10.0.2.2 from here):
#   1. attach, mkfs.ext4, files with known checksums, detach, re-attach, e2fsck, checksums, fstrim
#   2. (RESTART_PORT set) detach, say GUEST-WAIT-RESTART; the host stops the server (SIGTERM) and starts
#      it again on RESTART_PORT; attach there, e2fsck, checksums: data survived a clean restart
#   3. fio random writes 4k-64k, QD16, O_DIRECT, crc32c verify on the raw device; zero-out a range;
#      fio again with 1-16 MiB writes
#   4. (MULTI_CONN > 1) detach, attach with that many connections, fio verify again
# Prints "PASS: ..." / "FAIL: ..." lines (counted by the host script) and finally "GUEST-DONE".
# Parameters come from /guest/params: NBD_PORT, NBD_EXPORT, NBD_SIZE (expected bytes, or empty),
# NBD_BLOCK (nbd-client -b, or empty), FIO_SIZE, RESTART_PORT (or empty), MULTI_CONN.
# NB: busybox sh runs its own applets before searching PATH, so tools that busybox also has
# (blkdiscard) are named by full path where the util-linux/e2fsprogs one is needed.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
. /guest/params
HOST=10.0.2.2            # the host's loopback, as qemu's user network shows it; nothing else
DEV=/dev/nbd0
MiB=1048576
failed=0
pass() { echo "PASS: $*"; }
fail() { echo "FAIL: $*"; failed=$((failed + 1)); }
check() { c_name=$1; shift; if "$@"; then pass "$c_name"; else fail "$c_name"; fi; }
# stop here: later steps need this one
fatal() { fail "$*"; echo "--- dmesg tail"; dmesg | tail -n 30; echo "GUEST-DONE"; exit 1; }
if command -v sha256sum >/dev/null; then SUM=sha256sum; else SUM=md5sum; fi
dev_size() { cat /sys/block/nbd0/size 2>/dev/null || echo 0; }   # 512-byte sectors, 0 when detached
now() { cut -d' ' -f1 /proc/uptime; }
since() { awk -v a="$1" '{printf "%.1f", $1 - a}' /proc/uptime; }

attach() {   # attach PORT [extra nbd-client args]
  p=$1; shift
  # -t: kernel request timeout, so that a stalled server fails I/O instead of hanging the guest
  timeout 60 nbd-client "$HOST" "$p" "$DEV" -N "$NBD_EXPORT" -t 60 ${NBD_BLOCK:+-b "$NBD_BLOCK"} "$@" || return 1
  i=0; while [ "$(dev_size)" = 0 ] && [ $i -lt 50 ]; do sleep 0.2; i=$((i + 1)); done
  [ "$(dev_size)" != 0 ]
}
detach() {
  timeout 60 nbd-client -d "$DEV" || return 1
  i=0; while [ "$(dev_size)" != 0 ] && [ $i -lt 50 ]; do sleep 0.2; i=$((i + 1)); done
  [ "$(dev_size)" = 0 ]
}
size_ok() {
  got=$(blockdev --getsize64 "$DEV"); echo "device size: $got bytes (expected ${NBD_SIZE:-any})"
  [ -z "$NBD_SIZE" ] || [ "$got" = "$NBD_SIZE" ]
}
dmesg_clean() {
  bad=$(dmesg | grep -iE 'nbd|I/O error|EXT4-fs|blk_update_request|XFS' \
        | grep -iE 'error|fail|timed out|timeout|warn|dead|corrupt|reset' || true)
  [ -z "$bad" ] && return 0
  echo "$bad" | tail -n 20; return 1
}
sums_ok() {   # the files under $1 match /tmp/sums
  (cd "$1" && $SUM -c /tmp/sums) > /tmp/sumcheck.out 2>&1 && return 0
  grep -v ': OK$' /tmp/sumcheck.out | head -n 20; return 1
}
run_fio() {   # run_fio NAME [extra fio args]: random writes, then read back and crc32c-verify
  job=$1; shift; t0=$(now)
  if timeout 300 fio --name="$job" --filename="$DEV" --ioengine=libaio --direct=1 --rw=randwrite \
       --bsrange=4k-64k --verify=crc32c --verify_fatal=1 --iodepth=16 --group_reporting "$@" \
       > /tmp/fio.out 2>&1; then fio_rc=0; else fio_rc=$?; fi
  grep -E 'err=|issued rwts|READ:|WRITE:|verify|bad|error' /tmp/fio.out | sed 's/^/  fio| /'
  echo "fio took $(since "$t0")s"
  check "fio $job: exit $fio_rc" [ "$fio_rc" = 0 ]
  check "fio $job: err=0" grep -q 'err= 0' /tmp/fio.out
  check "fio $job: read back and verified all it wrote" sh -c "set -- \$(sed -n 's/.*issued rwts: total=\([0-9]*\),\([0-9]*\),.*/\1 \2/p' /tmp/fio.out); [ \"\$1\" = \"\$2\" ] && [ \"\${1:-0}\" -gt 0 ]"
}
zeroout_ok() {   # random 4 MiB at OFF, zero the middle 2 MiB (BLKZEROOUT), read back through O_DIRECT
  off=$1
  head -c $((4 * MiB)) /dev/urandom > /tmp/r
  { head -c $((MiB / 2)) /tmp/r; head -c $((2 * MiB)) /dev/zero; tail -c $((3 * MiB / 2)) /tmp/r; } > /tmp/expect
  dd if=/tmp/r of="$DEV" bs=1M seek=$((off / MiB)) oflag=direct conv=notrunc 2>/dev/null || return 1
  /usr/sbin/blkdiscard -z -o $((off + MiB / 2)) -l $((2 * MiB)) "$DEV" || return 1
  dd if="$DEV" of=/tmp/got bs=1M skip=$((off / MiB)) count=4 iflag=direct 2>/dev/null || return 1
  cmp /tmp/expect /tmp/got
}

echo "=== NBD kernel client vs $HOST:$NBD_PORT export '$NBD_EXPORT' (checksums: $SUM)"
dmesg -c >/dev/null
attach "$NBD_PORT" && pass "attach $DEV (nbd-client -N $NBD_EXPORT)" || fatal "attach $DEV (nbd-client -N $NBD_EXPORT)"
check "device size" size_ok
q=/sys/block/nbd0/queue
echo "queue: logical/physical block $(cat $q/logical_block_size)/$(cat $q/physical_block_size), max_hw_sectors_kb $(cat $q/max_hw_sectors_kb)," \
     "discard_max_bytes $(cat $q/discard_max_bytes), write_zeroes_max_bytes $(cat $q/write_zeroes_max_bytes 2>/dev/null)," \
     "write_cache '$(cat $q/write_cache 2>/dev/null)', fua $(cat $q/fua 2>/dev/null), read-only $(cat /sys/block/nbd0/ro)"

# --- 1. a filesystem, known files, detach / re-attach
t0=$(now)
mkfs.ext4 -q -F "$DEV" && pass "mkfs.ext4 (discards the whole device)" || fatal "mkfs.ext4"
echo "mkfs.ext4 took $(since "$t0")s"
mkdir -p /mnt/t
mount -t ext4 "$DEV" /mnt/t && pass "mount ext4" || fatal "mount ext4"
# known data, made in the guest's RAM first so that the sums are of what we meant to write
mkdir -p /tmp/src/small
head -c 4097 /dev/urandom > /tmp/src/odd-4097
head -c 1048699 /dev/urandom > /tmp/src/one-mib-plus
head -c 8388608 /dev/urandom > /tmp/src/eight-mib
head -c 20000000 /dev/urandom > /tmp/src/twenty-mb
i=0; while [ $i -lt 40 ]; do head -c $((i * 997 + 1)) /dev/urandom > /tmp/src/small/f$i; i=$((i + 1)); done
(cd /tmp/src && find . -type f | sort | xargs $SUM) > /tmp/sums
nfiles=$(wc -l < /tmp/sums)
echo "$nfiles files, $(du -sk /tmp/src | cut -f1) KiB"
check "copy files onto ext4" cp -a /tmp/src /mnt/t/data
check "syncfs (sync -f) reports no write-back error" sync -f /mnt/t/data
check "checksums before detach" sums_ok /mnt/t/data
check "umount" umount /mnt/t
detach && pass "detach (nbd-client -d)" || fatal "detach (nbd-client -d)"
echo 3 > /proc/sys/vm/drop_caches

attach "$NBD_PORT" && pass "re-attach $DEV" || fatal "re-attach $DEV"
fs_ok() {   # fs_ok WHEN: fsck, mount, sums, file count, umount
  check "e2fsck -fn clean ($1)" e2fsck -fn "$DEV"
  mount -t ext4 "$DEV" /mnt/t && pass "mount ($1)" || fatal "mount ($1)"
  check "checksums ($1)" sums_ok /mnt/t/data
  check "file count ($1)" sh -c "[ \$(cd /mnt/t/data && find . -type f | wc -l) = $nfiles ]"
}
fs_ok "after re-attach"
check "fstrim (discard) on ext4" fstrim /mnt/t
check "umount after re-attach" umount /mnt/t

# --- 2. the server restarts (clean SIGTERM), the data must still be there
if [ -n "${RESTART_PORT:-}" ]; then
  detach && pass "detach before server restart" || fatal "detach before server restart"
  echo 3 > /proc/sys/vm/drop_caches
  echo "GUEST-WAIT-RESTART"      # the host stops the server and starts it on RESTART_PORT
  t0=$(now); i=0
  until timeout 10 nbd-client "$HOST" "$RESTART_PORT" "$DEV" -N "$NBD_EXPORT" -t 60 ${NBD_BLOCK:+-b "$NBD_BLOCK"} >/tmp/att.out 2>&1; do
    i=$((i + 1)); [ $i -lt 120 ] || { cat /tmp/att.out; fatal "attach to the restarted server"; }
    sleep 0.5
  done
  pass "attach to the restarted server on port $RESTART_PORT (after $(since "$t0")s)"
  i=0; while [ "$(dev_size)" = 0 ] && [ $i -lt 50 ]; do sleep 0.2; i=$((i + 1)); done
  fs_ok "after server restart"
  check "umount after server restart" umount /mnt/t
fi

# --- 3. raw device: random writes, read back, verify; zero-out
run_fio randwrite-verify --size="$FIO_SIZE"
dev_bytes=$(blockdev --getsize64 "$DEV")
check "BLKZEROOUT (blkdiscard -z) of 2 MiB reads back as zeros, neighbours intact" \
  zeroout_ok $(((dev_bytes / 2) / MiB * MiB))
# large requests (the kernel splits at max_hw_sectors_kb, 32 MiB when the server allows it)
run_fio bigblock-verify --bsrange=1m-16m --iodepth=4 --size=64m --offset=$((dev_bytes / 4 * 3 / MiB))m
check "flush (blockdev --flushbufs)" blockdev --flushbufs "$DEV"
detach && pass "detach" || fatal "detach"

# --- 4. several connections to one export (the kernel spreads requests over them)
if [ "${MULTI_CONN:-1}" -gt 1 ]; then
  attach "${RESTART_PORT:-$NBD_PORT}" -C "$MULTI_CONN" && pass "attach with $MULTI_CONN connections (-C)" \
    || fatal "attach with $MULTI_CONN connections (-C)"
  run_fio multiconn-verify --size=32m --offset=$((dev_bytes / 4 / MiB))m --iodepth=32
  detach && pass "detach ($MULTI_CONN connections)" || fail "detach ($MULTI_CONN connections)"
fi

check "no NBD/I-O errors in dmesg" dmesg_clean
echo "guest: $failed check(s) failed"
echo "GUEST-DONE"
[ $failed = 0 ]
