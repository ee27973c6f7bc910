#!/bin/bash
# ballast kernel-client VM: builds a small Linux guest (Debian's own kernel + busybox + nbd-client +
# nvme-cli + fio + mkfs.ext4/xfs) that boots under qemu (TCG, no KVM needed) and acts as a real
# NBD / NVMe-over-TCP *client* (kernel initiator) against servers listening on this machine.
# Everything comes from Debian's packages.
#
#   tests/vm/build.sh           builds into $BALLAST_VM_DIR (default $HOME/.cache/ballast-vm) unless
#                               an up-to-date build is already there (idempotent)
#   tests/vm/build.sh --force   rebuilds
#
# BALLAST_VM_KERNEL names the Debian kernel (meta-)package whose image the guest boots (default
# linux-image-amd64, the release's kernel; e.g. linux-image-6.12-amd64): give each its own
# BALLAST_VM_DIR.
#
# Needs root (apt-get) the first time only, when something is missing on the host.
set -euo pipefail
DIR=${BALLAST_VM_DIR:-$HOME/.cache/ballast-vm}
here=$(cd "$(dirname "$0")" && pwd)
KMETA=${BALLAST_VM_KERNEL:-linux-image-amd64}
# a changed build.sh (or another kernel) rebuilds the guest
stamp=$( (cat "$here/build.sh"; echo "$KMETA") | sha256sum | cut -c1-16)
[[ ${1:-} == --force ]] && rm -rf "$DIR"
if [[ -f $DIR/base.cpio.gz && -f $DIR/vmlinuz && $(cat "$DIR/stamp" 2>/dev/null) == "$stamp" ]]; then
  echo "ballast-vm: ready in $DIR (kernel $(cat "$DIR/kernel-version"))"; exit 0
fi
mkdir -p "$DIR"; cd "$DIR"
rm -f stamp

have() { command -v "$1" >/dev/null 2>&1 || [[ -x /sbin/$1 || -x /usr/sbin/$1 ]]; }
need=()
for p in qemu-system-x86:qemu-system-x86_64 busybox-static:busybox nvme-cli:nvme nbd-client:nbd-client \
         fio:fio e2fsprogs:mkfs.ext4 xfsprogs:mkfs.xfs util-linux:blkdiscard kmod:modinfo cpio:cpio; do
  have "${p#*:}" || need+=("${p%%:*}")
done
# busybox must be the static one: it is copied into the guest as is
if have busybox && ! file -L "$(command -v busybox)" 2>/dev/null | grep -q 'statically linked'; then
  need+=(busybox-static)
fi
# (qemu-system-x86 comes with the release's qemu-utils: host-packages.sh)
if ((${#need[@]})); then
  echo "ballast-vm: installing ${need[*]}"
  . "$here/host-packages.sh"
  install_host_packages "${need[@]}"
fi

# the kernel: whatever Debian's $KMETA points at (downloaded, not installed)
kdep() { apt-cache depends "$KMETA" 2>/dev/null | sed -n 's/.*Depends: \(linux-image-[0-9].*\)/\1/p' | head -1; }
kpkg=$(kdep)
[[ -n $kpkg ]] || { timeout 300 apt-get update -qq; kpkg=$(kdep); }
[[ -n $kpkg ]] || { echo "ballast-vm: cannot find Debian's kernel package" >&2; exit 1; }
rm -rf kpkg && mkdir kpkg
(cd kpkg && timeout 600 apt-get download "$kpkg" >/dev/null && dpkg -x ./*.deb root)
K=$(ls kpkg/root/lib/modules | head -1)
cp kpkg/root/boot/vmlinuz-"$K" vmlinuz
MODS=kpkg/root/lib/modules/$K

R=$DIR/rootfs; rm -rf "$R"; mkdir -p "$R"/{bin,sbin,etc,proc,sys,dev,tmp,mnt,run,var,lib/modules}
BB=$(command -v busybox || echo /bin/busybox)
cp "$BB" "$R/bin/busybox"
for a in $("$R/bin/busybox" --list); do [[ -e $R/bin/$a ]] || ln -s busybox "$R/bin/$a"; done
copy_bin() {   # a host binary and the shared libraries it links, at the same paths
  local b; b=$(command -v "$1" || true); [[ -x $b ]] || b=/sbin/$1; [[ -x $b ]] || b=/usr/sbin/$1
  [[ -x $b ]] || return 0
  mkdir -p "$R$(dirname "$b")"; cp -L "$b" "$R$b"
  ldd "$b" 2>/dev/null | grep -o '/[^ ]*' | while read -r l; do mkdir -p "$R$(dirname "$l")"; cp -L "$l" "$R$l"; done
}
for b in nvme nbd-client fio mkfs.ext4 mke2fs e2fsck mkfs.xfs xfs_repair blkdiscard sha256sum md5sum; do
  copy_bin "$b"
done
# ballast itself (copied in by the tests that run it in the guest) links only these
for l in /lib/x86_64-linux-gnu/libgcc_s.so.1 /lib/x86_64-linux-gnu/libm.so.6 \
         /lib/x86_64-linux-gnu/libc.so.6 /lib64/ld-linux-x86-64.so.2; do
  [[ -e $l ]] && { mkdir -p "$R$(dirname "$l")"; cp -L "$l" "$R$l"; }
done
# fio loads some engines at run time; libaio is linked in Debian's build, but be safe
for l in /usr/lib/x86_64-linux-gnu/libaio.so.1*; do [[ -e $l ]] && { mkdir -p "$R$(dirname "$l")"; cp -L "$l" "$R$l"; }; done
[[ -f /etc/mke2fs.conf ]] && cp /etc/mke2fs.conf "$R/etc/"
mkdir -p "$R/etc/nvme" "$R/etc/nbd-client"
echo 'root:x:0:0:root:/root:/bin/sh' > "$R/etc/passwd"; echo 'root:x:0:' > "$R/etc/group"

# kernel modules, in dependency order (insmod, no depmod needed)
order=()
add_mod() {
  local name=$1 f dep m
  for m in "${order[@]}"; do [[ $m == "$name" || $m == "${name//_/-}" || $m == "${name//-/_}" ]] && return 0; done
  f=$(find "$MODS/kernel" \( -name "$name.ko*" -o -name "${name//_/-}.ko*" -o -name "${name//-/_}.ko*" \) | head -1)
  [[ -n $f ]] || return 0   # built into the kernel
  for dep in $(modinfo -F depends "$f" | tr ',' ' '); do add_mod "$dep"; done
  case $f in
    *.ko.xz)  xz -dc "$f" > "$R/lib/modules/$(basename "$f" .xz)" ;;
    *.ko.zst) zstd -qdc "$f" > "$R/lib/modules/$(basename "$f" .zst)" ;;
    *)        cp "$f" "$R/lib/modules/" ;;
  esac
  m=$(basename "$f"); order+=("${m%%.ko*}")
}
for m in e1000 crc32c_generic crc32c-intel nvme nvme-tcp nbd loop ext4 xfs configfs nvmet nvmet-tcp; do add_mod "$m"; done
printf '%s\n' "${order[@]}" > "$R/lib/modules/order"

cat > "$R/init" <<'EOI'
#!/bin/sh
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
# module parameters come from the kernel command line as MODULE.PARAM=VALUE (insmod does not
# read it, modprobe would): e.g. nvme.poll_queues=2
for m in $(cat /lib/modules/order); do
  p=$(echo "$m" | tr - _)
  insmod /lib/modules/$m.ko $(tr ' ' '\n' < /proc/cmdline | sed -n "s/^$p\.//p") 2>/dev/null
done
mount -t configfs none /sys/kernel/config 2>/dev/null
ip link set lo up; ip link set eth0 up; ip addr add 10.0.2.15/24 dev eth0; ip route add default via 10.0.2.2
hostname ballast-vm
[ -f /etc/nvme/hostnqn ] || echo "nqn.2014-08.org.nvmexpress:uuid:$(cat /proc/sys/kernel/random/uuid)" > /etc/nvme/hostnqn
echo "ballast-vm: up in $(cut -d' ' -f1 /proc/uptime)s, kernel $(uname -r)"
cd /tmp; sh -e /guest/script.sh; rc=$?
sync
echo "ballast-vm: guest script exit $rc"
poweroff -f
EOI
chmod +x "$R/init"
(cd "$R" && find . | cpio -o -H newc --quiet | gzip -1 > "$DIR/base.cpio.gz")
echo "$K" > "$DIR/kernel-version"
rm -rf kpkg
echo "$stamp" > "$DIR/stamp"
echo "ballast-vm: built guest with kernel $K in $DIR"
