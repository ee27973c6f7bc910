#!/bin/bash
# Many-core runs of perf/core_scale.py on a RAM block device (brd, /dev/ram0): the pool's
# medium without a kernel lock on the overwrite path (tmpfs takes the file's inode lock, zram
# its allocator's: RESULTS §6.12), so eight cores writing one pool show the engine's own
# scaling. Runs: overwrites and reads of written volumes (1, 8 cores), and first writes
# into fresh volumes (1, 8 cores: every 4 KiB piece's first write makes a mapping record, so
# commits and their seals pause every core under load). Falls back to zram when brd is missing.
#   perf/device_scale.sh BINARY_DIR OUT_DIR
set -u
bin=${1:?binary directory (ballast, ballast-perf)}
out=${2:?output directory}
here=$(cd "$(dirname "$0")" && pwd)
{ nproc; uname -r; grep -m1 "model name" /proc/cpuinfo; free -g | head -2; } > "$out/machine.txt"
# brd when it can be loaded; else a zram device (hot_add: the module is there, modprobe may not).
dev=/dev/ram0
if ! { modprobe brd rd_nr=1 rd_size=$((20 * 1024 * 1024)) 2>/dev/null && [ -b $dev ]; }; then
    n=$(cat /sys/class/zram-control/hot_add) || { echo "no brd, no zram" >&2; exit 1; }
    echo 20G > /sys/block/zram$n/disksize || exit 1
    dev=/dev/zram$n
fi
echo "medium: $dev" | tee -a "$out/machine.txt"
run() { timeout 240 python3 "$here/core_scale.py" --binary "$bin/ballast" --backing volume \
    --server-cpus 0-7 --client-cpus 8-15 --placements any --shapes spread \
    --out "$out" "$@" 2>&1 | tee -a "$out/log.txt"; }
run --pool-path "$dev" --cores-list 1,8 --rws randwrite,randread --reps 2 --runtime 3 --volume-size 512M
run --pool-path "$dev" --cores-list 1,8 --rws randwrite --fresh --reps 2 --runtime 3 \
    --volume-size 1G
# The same first writes with the pool on a tmpfs file (its inode lock serializes the data).
run --pool-dir /dev/shm --cores-list 1,8 --rws randwrite --fresh --reps 2 --runtime 3 \
    --volume-size 1G
