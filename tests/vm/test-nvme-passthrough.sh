#!/bin/bash
# The NVMe passthrough backend for real: boots the test guest (tests/vm/run.sh) with qemu's
# emulated NVMe controller on a sparse image, runs ballast INSIDE the guest on /dev/ng0n1
# (--export pt=nvme:/dev/ng0n1, io_uring passthrough) and drives it with the guest kernel's NBD
# and NVMe/TCP initiators (tests/vm/guest-nvme-passthrough.sh: fio verify, write zeroes,
# discard, ext4 + checksums, kill -9 + restart), then a pool on the namespace (volume,
# snapshot, fio verify, kill -9, pool check). Afterwards this side checks the pattern the guest
# wrote (and flushed before kill -9) is on the image file itself.
#
#   tests/vm/test-nvme-passthrough.sh              512-byte LBAs, interrupts
#   tests/vm/test-nvme-passthrough.sh --lba 4096   4 KiB LBAs
#   tests/vm/test-nvme-passthrough.sh --poll       --poll-device (IOPOLL), guest booted with
#                                                  nvme.poll_queues=2
#   tests/vm/test-nvme-passthrough.sh --trixie     the trixie guest (Linux 6.12: passthrough
#                                                  commands on registered buffers); combines
#                                                  with the others
#
# Prints PASS/FAIL lines and "N passed, M failed"; exits 1 on any failure.
# Environment: BALLAST_BIN, BALLAST_VM_TIMEOUT (default 900), FIO_SIZE (default 48m), KEEP=1.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
bin=${BALLAST_BIN:-$root/build/cargo/release/ballast}
lba=512 poll= flavour=default
while (($#)); do
  case $1 in
    --lba) lba=$2; shift 2 ;;
    --poll) poll=--poll-device; shift ;;
    --trixie) flavour=trixie; shift ;;
    *) echo "usage: $0 [--lba 512|4096] [--poll] [--trixie]" >&2; exit 2 ;;
  esac
done
export BALLAST_VM_FLAVOUR=$flavour
if [[ $flavour == trixie ]]; then
  DIR=${BALLAST_VM_DIR:-$HOME/.cache/ballast-vm-trixie} builder=build-trixie.sh base=base.cpio.zst
else
  DIR=${BALLAST_VM_DIR:-$HOME/.cache/ballast-vm} builder=build.sh base=base.cpio.gz
fi
npass=0 nfail=0
pass() { echo "PASS: $*"; npass=$((npass + 1)); }
fail() { echo "FAIL: $*"; nfail=$((nfail + 1)); }
"$here/$builder" >/dev/null || { echo "FAIL: building the guest"; echo "0 passed, 1 failed"; exit 1; }
[[ -x $bin ]] || { echo "FAIL: no ballast binary at $bin"; echo "0 passed, 1 failed"; exit 1; }
work=$(mktemp -d "${TMPDIR:-/tmp}/ballast-nvme-vm.XXXXXX")
cleanup() { [[ -n ${KEEP:-} ]] && echo "kept $work" || rm -rf "$work"; }
trap cleanup EXIT

# ballast runs in the guest: its shared libraries must be in the initramfs (build.sh)
case $base in
  *.zst) zstd -dc "$DIR/$base" ;;
  *) zcat "$DIR/$base" ;;
esac | cpio -t --quiet 2>/dev/null | sed 's|^\./||' > "$work/guest-files"
missing=
for l in $(ldd "$bin" | grep -o '/[^ ]*'); do
  # a merged-/usr guest (trixie) holds /lib/... as usr/lib/...
  grep -qxF -e "${l#/}" -e "usr/${l#/}" "$work/guest-files" || missing+=" $l"
done
if [[ -z $missing ]]; then pass "ballast's shared libraries are in the guest"
else fail "the guest lacks ballast's libraries:$missing"; fi
strip -o "$work/ballast" "$bin" 2>/dev/null || cp "$bin" "$work/ballast"

truncate -s 512M "$work/nvme.img"
printf 'LBA=%s\nPOLL=%s\nFIO_SIZE=%s\n' "$lba" "$poll" "${FIO_SIZE:-48m}" > "$work/params"
append=
[[ -n $poll ]] && append="nvme.poll_queues=2"
BALLAST_VM_NVME=$work/nvme.img BALLAST_VM_NVME_LBA=$lba BALLAST_VM_APPEND=$append \
  BALLAST_VM_TIMEOUT=${BALLAST_VM_TIMEOUT:-900} \
  "$here/run.sh" "$here/guest-nvme-passthrough.sh" "$work/ballast" "$work/params" > "$work/console" 2>&1
grc=$?
sed -e 's/\x1b\[[0-9;?]*[a-zA-Z]//g' "$work/console"
npass=$((npass + $(grep -c '^PASS: ' "$work/console")))
nfail=$((nfail + $(grep -c '^FAIL: ' "$work/console")))
grep -q 'guest done' "$work/console" || fail "guest script did not finish (exit $grc)"

# the pattern the guest flushed before kill -9 is on the NVMe image at 448 MiB
want=$(yes ballast-nvme-pattern | head -c $((4 << 20)) | sha256sum | cut -d' ' -f1)
got=$(dd if="$work/nvme.img" bs=1M skip=448 count=4 2>/dev/null | sha256sum | cut -d' ' -f1)
if [[ $got == "$want" ]]; then pass "host: the pattern is on the NVMe image at 448 MiB"
else fail "host: the NVMe image does not hold the pattern at 448 MiB"; fi
echo "$npass passed, $nfail failed"
((nfail == 0))
