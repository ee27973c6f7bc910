#!/bin/bash
# Boots the ballast test guest (see build.sh) and runs one shell script inside it, as root, with
# `sh -e`, in /tmp; prints the console; powers off.
#
#   tests/vm/run.sh GUEST_SCRIPT [FILE...]   FILEs are copied into the guest's /guest/ beside the script
#
# Exits with the guest script's exit status, or 99 if the guest never finished (crash, timeout).
# The guest runs under qemu's user-mode network: it reaches this machine's loopback as 10.0.2.2
# (a server on 127.0.0.1:10809 here is 10.0.2.2:10809 there). Use that address only.
#
# Environment:
#   BALLAST_VM_FLAVOUR  default (build.sh: this machine's Debian kernel and binaries) or trixie
#                       (build-trixie.sh: Debian trixie's 6.12 kernel and userspace, for NVMe/TCP
#                       TLS 1.3 PSK and DH-HMAC-CHAP; tlshd runs, its log in /run/tlshd.log)
#   BALLAST_VM_DIR      guest build (as build.sh; default $HOME/.cache/ballast-vm, or
#                       $HOME/.cache/ballast-vm-trixie for the trixie flavour)
#   BALLAST_VM_TIMEOUT  seconds before qemu is killed (default 600)
#   BALLAST_VM_MEM      guest memory, MiB (default 1024; trixie 2048: its root is a larger initramfs)
#   BALLAST_VM_SMP      guest CPUs (default 2)
#   BALLAST_VM_HOSTFWD  extra qemu hostfwd rules, e.g. 'hostfwd=tcp:127.0.0.1:14420-:4420'
#   BALLAST_VM_CONSOLE  if set, the raw console is also saved to this file
#   BALLAST_VM_NVME     a raw image to attach as an emulated NVMe controller (qemu -device nvme,
#                       serial ballast); the guest sees /dev/nvme0n1 and /dev/ng0n1
#   BALLAST_VM_NVME_LBA its logical block size in bytes (default 512)
#   BALLAST_VM_APPEND   extra kernel command line, e.g. 'nvme.poll_queues=2' (module parameters
#                       are passed to insmod)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
script=${1:?usage: run.sh GUEST_SCRIPT [FILE...]}; shift
[[ -f $script ]] || { echo "run.sh: no such guest script: $script" >&2; exit 2; }
case ${BALLAST_VM_FLAVOUR:-default} in
  default) DIR=${BALLAST_VM_DIR:-$HOME/.cache/ballast-vm} base=base.cpio.gz mem=1024
           "$here/build.sh" >/dev/null ;;
  trixie)  DIR=${BALLAST_VM_DIR:-$HOME/.cache/ballast-vm-trixie} base=base.cpio.zst mem=2048
           BALLAST_VM_DIR=$DIR "$here/build-trixie.sh" >/dev/null ;;
  *) echo "run.sh: unknown BALLAST_VM_FLAVOUR ${BALLAST_VM_FLAVOUR} (default or trixie)" >&2; exit 2 ;;
esac
command -v qemu-system-x86_64 >/dev/null || { echo "run.sh: qemu-system-x86_64 missing (run build.sh)" >&2; exit 2; }

work=$(mktemp -d "${TMPDIR:-/tmp}/ballast-vm.XXXXXX"); trap 'rm -rf "$work"' EXIT
mkdir -p "$work/guest"; cp "$script" "$work/guest/script.sh"; cp "$here/guest-lib.sh" "$work/guest/"
for f in "$@"; do cp "$f" "$work/guest/"; done
(cd "$work" && find guest | cpio -o -H newc --quiet | gzip -1 > "$work/extra.cpio.gz")
cat "$DIR/$base" "$work/extra.cpio.gz" > "$work/initrd.gz"

nvme=()
if [[ -n ${BALLAST_VM_NVME:-} ]]; then
  lba=${BALLAST_VM_NVME_LBA:-512}
  nvme=(-drive "file=$BALLAST_VM_NVME,if=none,id=nvm,format=raw,discard=unmap"
        -device "nvme,serial=ballast,drive=nvm,logical_block_size=$lba,physical_block_size=$lba")
fi

# software emulation (TCG): works everywhere; the guest is a client for correctness, not a benchmark.
# A guest whose kernel dies before its init says "up" (seen under TCG on a loaded host: an int3
# Oops in the kernel's own boot-time code patching) never ran anything of ours: it boots again,
# once. Anything after "up" counts as it is.
for attempt in 1 2; do
set +e
timeout -k 10 "${BALLAST_VM_TIMEOUT:-600}" qemu-system-x86_64 -accel tcg -cpu max \
  -m "${BALLAST_VM_MEM:-$mem}" -smp "${BALLAST_VM_SMP:-2}" \
  -nographic -no-reboot -kernel "$DIR/vmlinuz" -initrd "$work/initrd.gz" \
  -append "console=ttyS0 quiet panic=-1${BALLAST_VM_APPEND:+ $BALLAST_VM_APPEND}" "${nvme[@]}" \
  -netdev "user,id=n0${BALLAST_VM_HOSTFWD:+,$BALLAST_VM_HOSTFWD}" -device e1000,netdev=n0 </dev/null 2>&1 \
  | tee "$work/console" | sed -u -e 's/\x1b\[[0-9;?]*[a-zA-Z]//g' -e 's/\x1bc//g' -e 's/\r$//' \
  | grep --line-buffered -v -E '^(SeaBIOS|iPXE|Booting from|Press Ctrl-B|$)'
qrc=${PIPESTATUS[0]}
set -e
if ((attempt == 1 && qrc != 124 && qrc != 137)) && ! grep -q "ballast-vm: up in" "$work/console"; then
  echo "run.sh: the guest kernel never came up (qemu exit $qrc); booting it again" >&2
  continue
fi
break
done
[[ -n ${BALLAST_VM_CONSOLE:-} ]] && cp "$work/console" "$BALLAST_VM_CONSOLE"
rc=$(sed -n 's/.*ballast-vm: guest script exit \([0-9]*\).*/\1/p' "$work/console" | tail -1)
if [[ -z $rc ]]; then
  if ((qrc == 124 || qrc == 137)); then echo "run.sh: guest timed out after ${BALLAST_VM_TIMEOUT:-600}s" >&2
  else echo "run.sh: guest never finished (qemu exit $qrc)" >&2; fi
fi
exit "${rc:-99}"
