# Runs INSIDE the test guest (tests/vm/run.sh), started by test-volume-kernel.sh. Snapshots and
# clones through the Linux kernel's own initiators against ballast on the host (10.0.2.2):
#   1. NVMe/TCP: NUSE of the fresh thin volume is 0 (nvme id-ns); mkfs.ext4, files with known
#      checksums, NUSE now counts the written blocks; unmount, flush, disconnect
#   2. say snapshot: the host snapshots base -> base-snap and clones it -> base-clone
#   3. the clone mounts as a filesystem: same checksums; a new file written to it; say
#      decouple: the host decouples the clone (`ballast volume decouple`, paced to take
#      seconds) while this host writes and fsyncs files to it for 15 s (checked below)
#   4. the origin is overwritten through NVMe/TCP (files replaced, fstrim)
#   5. the snapshot through the kernel NBD client, read-only: mounts, original checksums, no
#      clone file; through NVMe/TCP: the disk is read-only (Identify Namespace says write
#      protected), mounts with the original files, and writes forced through fail (the target
#      answers write protected); the clone (NVMe/TCP again) still holds its own file and the
#      original ones
#   6. the clone, connected, made read-only on the host (`ballast volume read-only`): the
#      kernel marks the disk read-only without a reconnect, refuses writes, mounts it read-only
#   7. the clone, attached through the kernel NBD client, renamed on the host (`ballast volume
#      rename base-clone archive`): that connection reads its files on; discovery lists
#      ...:archive and not ...:base-clone; NBD and NVMe/TCP connect to it by its new name, still
#      read-only, with its files
# Prints "PASS: ..." / "FAIL: ..." lines and finally "guest done".
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
. /guest/params
A=10.0.2.2
P=nqn.2026-11.dev.ballast:
pass() { echo "PASS: $*"; }
fail() { echo "FAIL: $*"; }
check() { w=$1; shift; if "$@"; then pass "$w"; else fail "$w"; fi; }
say() { echo "$1" | nc "$A" "$SIGNAL_PORT" >/dev/null 2>&1 || true; }
dev_of() { # the namespace block device of subsystem $1 (the multipath head when there is one)
  for s in /sys/class/nvme-subsystem/nvme-subsys*; do
    [ "$(cat "$s/subsysnqn" 2>/dev/null)" = "$1" ] || continue
    for b in "$s"/nvme*n1; do [ -e "$b" ] && { echo "/dev/${b##*/}"; return; }; done
  done
  for c in /sys/class/nvme/nvme*; do
    [ "$(cat "$c/subsysnqn" 2>/dev/null)" = "$1" ] || continue
    n=${c##*/}; echo "/dev/${n}n1"; return
  done
}
connect() { # connect NAME: prints the block device
  nvme connect -t tcp -a $A -s $PORT -n "$P$1" >/dev/null 2>&1 || return 1
  i=0; while [ $i -lt 50 ]; do d=$(dev_of "$P$1"); [ -n "$d" ] && [ -b "$d" ] && { echo "$d"; return 0; }; sleep 0.2; i=$((i+1)); done
  return 1
}
mkdir -p /mnt/v

# 1. the origin
D=$(connect base) && pass "connect base over NVMe/TCP ($D)" || { fail "connect base"; echo "guest done"; exit 1; }
nuse() { echo $(( $(nvme id-ns "$1" | awk '/^nuse/ {print $3}') )); }
check "id-ns: a fresh thin volume uses nothing (NUSE 0)" test "$(nuse "$D")" -eq 0
check "mkfs.ext4 on base" mkfs.ext4 -q -F "$D"
check "mount base" mount "$D" /mnt/v
for i in 1 2 3; do dd if=/dev/urandom of=/mnt/v/f$i bs=64k count=$((i*16)) 2>/dev/null; done
(cd /mnt/v && md5sum f1 f2 f3) > /tmp/orig.sums
check "umount base" umount /mnt/v
used=$(nuse "$D"); echo "NUSE after mkfs and 6 MiB of files: $used blocks"
check "id-ns: NUSE counts the written blocks (more than the files, less than the volume)" \
  sh -c "[ $used -ge 1536 ] && [ $used -lt 65536 ]"
check "nvme flush base" nvme flush "$D" -n 1
check "disconnect base" nvme disconnect -n "${P}base"

# 2. snapshot + clone on the host
say snapshot
i=0; while [ $i -lt 100 ]; do nvme discover -t tcp -a $A -s $PORT 2>/dev/null | grep -q "subnqn: *${P}base-clone" && break; sleep 0.3; i=$((i+1)); done
check "the clone's subsystem is discoverable" sh -c "nvme discover -t tcp -a $A -s $PORT | grep -q 'subnqn: *${P}base-clone'"

# 3. the clone mounts as a filesystem
C=$(connect base-clone) && pass "connect base-clone ($C)" || fail "connect base-clone"
check "mount the clone" mount "$C" /mnt/v
check "clone has the origin's files" sh -c "cd /mnt/v && md5sum -c /tmp/orig.sums"
dd if=/dev/urandom of=/mnt/v/clone-only bs=64k count=8 2>/dev/null
# 3b. the clone decoupled from its snapshot on the host (paced to take seconds) while this
# host writes files to it; they are checked after the remounts below
say decouple
end=$(( $(date +%s) + 15 )); n=0
while [ "$(date +%s)" -lt $end ]; do
  dd if=/dev/urandom of=/mnt/v/d$n bs=64k count=4 conv=fsync 2>/dev/null || break
  n=$((n+1))
done
say writes-done
check "files written to the clone while it was decoupled ($n)" test $n -gt 0
(cd /mnt/v && md5sum clone-only d*) > /tmp/clone.sums
check "umount the clone" umount /mnt/v
check "e2fsck of the clone is clean" e2fsck -fn "$C"
nvme disconnect -n "${P}base-clone" >/dev/null

# 4. overwrite the origin
D=$(connect base) || fail "reconnect base"
check "mount base again" mount "$D" /mnt/v
for i in 1 2 3; do dd if=/dev/urandom of=/mnt/v/f$i bs=64k count=$((i*16)) conv=notrunc 2>/dev/null; done
rm -f /mnt/v/f3
sync
check "fstrim on base" fstrim /mnt/v
check "origin's files now differ" sh -c "cd /mnt/v && ! md5sum -c /tmp/orig.sums >/dev/null 2>&1"
umount /mnt/v
nvme disconnect -n "${P}base" >/dev/null

# 5. the snapshot, through the kernel NBD client, read-only
check "nbd-client attaches the snapshot read-only" timeout 60 nbd-client $A $NBD_PORT /dev/nbd0 -N base-snap -readonly -b 4096 -t 60
i=0; while [ "$(cat /sys/block/nbd0/size)" = 0 ] && [ $i -lt 50 ]; do sleep 0.2; i=$((i+1)); done
check "mount the snapshot (ro, noload)" mount -o ro,noload /dev/nbd0 /mnt/v
check "snapshot still holds the original files" sh -c "cd /mnt/v && md5sum -c /tmp/orig.sums"
check "snapshot has no clone file" test ! -e /mnt/v/clone-only
umount /mnt/v
check "writes to the snapshot are refused" sh -c "! dd if=/dev/zero of=/dev/nbd0 bs=4k count=1 oflag=direct 2>/dev/null"
nbd-client -d /dev/nbd0 >/dev/null 2>&1
# ... and through NVMe/TCP: Identify Namespace says write protected, so the disk is read-only
S=$(connect base-snap) && pass "connect base-snap over NVMe/TCP ($S)" || fail "connect base-snap"
check "the kernel marks the snapshot's namespace read-only (NSATTR)" test "$(cat /sys/block/${S##*/}/ro)" = 1
check "mount the snapshot over NVMe/TCP (ro, noload)" mount -o ro,noload "$S" /mnt/v
check "it holds the original files" sh -c "cd /mnt/v && md5sum -c /tmp/orig.sums"
umount /mnt/v
check "the kernel refuses writes to it" sh -c "! dd if=/dev/zero of=$S bs=4k count=1 oflag=direct 2>/dev/null"
# The block device refuses writes itself; an NVMe Write sent through the namespace's generic
# character device reaches the target, which must answer Namespace is Write Protected (20h).
NG=/dev/ng${S#/dev/nvme}
out=$(nvme write "$NG" --start-block=0 --block-count=0 --data-size=4096 --data=/dev/zero 2>&1 || true)
echo "nvme write $NG: $out"
check "an NVMe Write sent to the snapshot is refused by the target: Namespace is Write Protected" \
  sh -c "echo '$out' | grep -qi 'write protect'"
check "the snapshot still holds the original files" sh -c "mount -o ro,noload $S /mnt/v && cd /mnt/v && md5sum -c /tmp/orig.sums"
umount /mnt/v 2>/dev/null
nvme disconnect -n "${P}base-snap" >/dev/null
C=$(connect base-clone) || fail "reconnect base-clone"
check "mount the clone again" mount "$C" /mnt/v
check "clone kept its own files (those written while it was decoupled too)" sh -c "cd /mnt/v && md5sum -c /tmp/clone.sums"
check "clone kept the original files" sh -c "cd /mnt/v && md5sum -c /tmp/orig.sums"
umount /mnt/v
# 6. the clone made read-only on the host while this host is connected: the namespace change
# notice makes the kernel read Identify Namespace again, which says write protected
check "the clone is writable before" test "$(cat /sys/block/${C##*/}/ro)" = 0
say read-only
i=0; while [ "$(cat /sys/block/${C##*/}/ro)" != 1 ] && [ $i -lt 100 ]; do sleep 0.2; i=$((i+1)); done
check "the kernel marks the clone read-only once the host made it so (no reconnect)" \
  test "$(cat /sys/block/${C##*/}/ro)" = 1
check "the kernel refuses writes to it" sh -c "! dd if=/dev/zero of=$C bs=4k count=1 oflag=direct 2>/dev/null"
check "it mounts read-only with its files" \
  sh -c "mount -o ro,noload $C /mnt/v && cd /mnt/v && md5sum -c /tmp/clone.sums && md5sum -c /tmp/orig.sums"
umount /mnt/v 2>/dev/null
nvme disconnect -n "${P}base-clone" >/dev/null
# 7. the clone renamed on the host while the kernel NBD client has it attached
check "nbd-client attaches the clone" timeout 60 nbd-client $A $NBD_PORT /dev/nbd0 -N base-clone -readonly -b 4096 -t 60
i=0; while [ "$(cat /sys/block/nbd0/size)" = 0 ] && [ $i -lt 50 ]; do sleep 0.2; i=$((i+1)); done
say rename
listed() { nvme discover -t tcp -a $A -s $PORT 2>/dev/null | grep -qE "subnqn: *$P$1\$"; }
i=0; while ! listed archive && [ $i -lt 100 ]; do sleep 0.3; i=$((i+1)); done
check "discovery lists the renamed clone's subsystem ...:archive" listed archive
check "... and no longer ...:base-clone" sh -c "! nvme discover -t tcp -a $A -s $PORT | grep -qE 'subnqn: *${P}base-clone\$'"
check "the NBD connection attached before the rename still reads its files" \
  sh -c "mount -o ro,noload /dev/nbd0 /mnt/v && cd /mnt/v && md5sum -c /tmp/clone.sums"
umount /mnt/v 2>/dev/null
nbd-client -d /dev/nbd0 >/dev/null 2>&1
check "nbd-client attaches the export by its new name" timeout 60 nbd-client $A $NBD_PORT /dev/nbd0 -N archive -readonly -b 4096 -t 60
nbd-client -d /dev/nbd0 >/dev/null 2>&1
R=$(connect archive) && pass "connect ...:archive over NVMe/TCP ($R)" || fail "connect archive"
check "it is still read-only, with the clone's files" sh -c "test \"\$(cat /sys/block/${R##*/}/ro)\" = 1 && mount -o ro,noload $R /mnt/v && cd /mnt/v && md5sum -c /tmp/clone.sums && md5sum -c /tmp/orig.sums"
umount /mnt/v 2>/dev/null
nvme disconnect -n "${P}archive" >/dev/null
echo "guest done"
