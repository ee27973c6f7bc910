#!/bin/bash
# The "trixie" flavour of the ballast test guest (BALLAST_VM_FLAVOUR=trixie tests/vm/run.sh ...):
# Debian trixie's kernel (6.12, with NVME_TCP_TLS, NVME_HOST_AUTH and the nvmet side of both) and
# a trixie userspace (nvme-cli 2.13, tlshd from ktls-utils, keyutils, fio, e2fsprogs, util-linux,
# kmod, iproute2, nbd-client, libnbd-bin, qemu-utils, busybox) for testing NVMe/TCP TLS 1.3 PSK and
# DH-HMAC-CHAP with the real Linux host, and NBD's extended headers with libnbd's and qemu's own
# clients. Unlike the default flavour (build.sh, which copies this machine's binaries),
# this one is a `debootstrap --variant=minbase trixie` chroot with packages apt-get installed
# *inside it* (this machine's apt sources and packages are never touched), pruned and packed
# whole as a zstd initramfs with our own /init.
#
#   tests/vm/build-trixie.sh              builds into $BALLAST_VM_DIR (default
#                                         $HOME/.cache/ballast-vm-trixie) unless an up-to-date
#                                         build is there (idempotent; a changed script repacks)
#   tests/vm/build-trixie.sh --force      repacks (keeps the chroot and the kernel)
#   tests/vm/build-trixie.sh --force-all  starts over (debootstrap again)
#
# BALLAST_VM_MIRROR: the Debian mirror (default: the first .../debian URI of this machine's apt
# sources, else http://deb.debian.org/debian). Needs root (debootstrap, chroot; and apt-get for
# debootstrap/zstd/cpio/qemu-system-x86 on this machine when missing). A cold build takes a few
# minutes (about 150 MB from the mirror); the cache holds about 1 GB.
set -euo pipefail
DIR=${BALLAST_VM_DIR:-$HOME/.cache/ballast-vm-trixie}
here=$(cd "$(dirname "$0")" && pwd)
self=$here/build-trixie.sh
# the packages installed in the chroot; a change here re-runs apt-get there
PKGS="nvme-cli ktls-utils keyutils fio e2fsprogs util-linux kmod busybox-static iproute2 nbd-client libnbd-bin qemu-utils"
KMETA=linux-image-amd64
stamp=$( (cat "$self"; echo "$PKGS $KMETA") | sha256sum | cut -c1-16)
ready() { [[ -f $DIR/base.cpio.zst && -f $DIR/vmlinuz && $(cat "$DIR/stamp" 2>/dev/null) == "$stamp" ]]; }
if [[ -z ${1:-} ]] && ready; then   # the common case: no root, no lock needed (files are replaced whole)
  echo "ballast-vm(trixie): ready in $DIR (kernel $(cat "$DIR/kernel-version"))"; exit 0
fi
if ((EUID != 0)); then
  command -v sudo >/dev/null || { echo "ballast-vm(trixie): needs root (debootstrap, chroot)" >&2; exit 1; }
  exec sudo BALLAST_VM_DIR="$DIR" ${BALLAST_VM_MIRROR:+BALLAST_VM_MIRROR="$BALLAST_VM_MIRROR"} "$self" "$@"
fi

mkdir -p "$DIR"
exec 9>"$DIR/.lock"; flock 9   # one build at a time; a second caller waits, then finds it ready
case ${1:-} in
  --force) rm -f "$DIR/stamp" ;;
  --force-all) grep -q " $DIR/" /proc/mounts && { echo "ballast-vm(trixie): mounts under $DIR; retry" >&2; exit 1; }
               find "$DIR" -mindepth 1 -maxdepth 1 ! -name .lock -exec rm -rf --one-file-system {} + ;;
esac
if ready; then
  echo "ballast-vm(trixie): ready in $DIR (kernel $(cat "$DIR/kernel-version"))"; exit 0
fi
cd "$DIR"; rm -f stamp
# an interrupted debootstrap or apt-get may leave /proc or /sys mounted in the chroot: never
# descend into them when removing it
unmount_under() { { grep -o " $1/[^ ]*" /proc/mounts || true; } | sort -r | while read -r m; do umount -l "$m" || true; done; }
unmount_under "$DIR"

# what this machine needs (the same packages as the default flavour's build asks for, installed
# the same way: host-packages.sh)
need=()
for p in qemu-system-x86:qemu-system-x86_64 debootstrap:debootstrap cpio:cpio zstd:zstd kmod:modinfo; do
  command -v "${p#*:}" >/dev/null 2>&1 || [[ -x /usr/sbin/${p#*:} || -x /sbin/${p#*:} ]] || need+=("${p%%:*}")
done
# bookworm's debootstrap knows trixie; an older one would not
[[ -e /usr/share/debootstrap/scripts/trixie ]] || [[ " ${need[*]} " == *" debootstrap "* ]] || need+=(debootstrap)
if ((${#need[@]})); then
  echo "ballast-vm(trixie): installing ${need[*]}"
  . "$here/host-packages.sh"
  install_host_packages "${need[@]}"
fi

MIRROR=${BALLAST_VM_MIRROR:-$(grep -rhoE '^(URIs:|deb)[[:space:]]+(\[[^]]*\][[:space:]]+)?[a-z]+://[^ ]*/debian/?([[:space:]]|$)' \
  /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null | grep -oE '[a-z]+://[^ ]*' | head -1 || true)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}

# 1. the chroot: debootstrap (into a temporary name, so an interrupted run leaves nothing half
#    made), then apt-get inside it. Kept between builds; redone when PKGS change.
C=$DIR/chroot
if [[ ! -x $C/usr/bin/apt-get ]]; then
  rm -rf --one-file-system "$C" "$C.tmp"
  echo "ballast-vm(trixie): debootstrap trixie from $MIRROR"
  timeout 1200 debootstrap --variant=minbase trixie "$C.tmp" "$MIRROR" > debootstrap.log 2>&1 \
    || { tail -20 debootstrap.log >&2; echo "ballast-vm(trixie): debootstrap failed (log: $DIR/debootstrap.log)" >&2; exit 1; }
  mv "$C.tmp" "$C"
fi
if [[ $(cat "$C/.ballast-pkgs" 2>/dev/null) != "$PKGS" ]]; then
  echo "ballast-vm(trixie): apt-get install $PKGS (in the chroot)"
  printf '#!/bin/sh\nexit 101\n' > "$C/usr/sbin/policy-rc.d"; chmod +x "$C/usr/sbin/policy-rc.d"   # start no services
  cp /etc/resolv.conf "$C/etc/resolv.conf" 2>/dev/null || true
  timeout 1200 chroot "$C" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
    sh -c "apt-get update -qq && apt-get install -y -qq --no-install-recommends $PKGS" > apt.log 2>&1 \
    || { tail -20 apt.log >&2; echo "ballast-vm(trixie): apt-get in the chroot failed (log: $DIR/apt.log)" >&2; exit 1; }
  echo "$PKGS" > "$C/.ballast-pkgs"
fi

# 2. the kernel: what trixie's $KMETA depends on today, downloaded inside the chroot (not
#    installed: no initramfs-tools run) and unpacked here
kpkg=$(chroot "$C" apt-cache depends "$KMETA" 2>/dev/null | sed -n 's/.*Depends: \(linux-image-[0-9].*\)/\1/p' | head -1 || true)
[[ -n $kpkg ]] || { echo "ballast-vm(trixie): no $KMETA in the chroot's apt lists" >&2; exit 1; }
if [[ ! -f kpkg/$kpkg.done ]]; then
  echo "ballast-vm(trixie): downloading $kpkg"
  rm -rf kpkg "$C"/tmp/linux-image-*.deb; mkdir kpkg
  # the chroot's package lists are kept (a stable guest); refreshed when the mirror moved on
  timeout 900 chroot "$C" sh -c "cd /tmp && { apt-get download -qq $kpkg || { apt-get update -qq && apt-get download -qq $kpkg; }; }" >/dev/null
  mv "$C"/tmp/linux-image-*.deb kpkg/
  (cd kpkg && dpkg-deb -x ./*.deb root && rm -f ./*.deb && touch "$kpkg.done")
fi
MODS=$(ls -d kpkg/root/usr/lib/modules/* kpkg/root/lib/modules/* 2>/dev/null | head -1 || true)
[[ -d $MODS ]] || { echo "ballast-vm(trixie): no modules in $kpkg" >&2; exit 1; }
K=$(basename "$MODS")
cp "kpkg/root/boot/vmlinuz-$K" vmlinuz

# 3. the guest root: a pruned copy of the chroot
R=$DIR/rootfs; rm -rf --one-file-system "$R"; cp -a --one-file-system "$C" "$R"
rm -rf "$R"/usr/share/{doc,man,info,locale,i18n,lintian,bash-completion,zsh,common-licenses} \
       "$R"/var/cache/apt/* "$R"/var/lib/apt/lists/* "$R"/var/cache/debconf/*-old "$R"/var/log/* \
       "$R"/usr/sbin/policy-rc.d "$R/.ballast-pkgs"
rm -f "$R"/etc/nvme/hostnqn "$R"/etc/nvme/hostid   # nvme-cli's postinst made some; /init makes a fresh pair per boot
mkdir -p "$R"/etc/nvme "$R"/opt/busybox/bin "$R"/guest "$R"/run "$R"/tmp
for a in $("$R"/usr/bin/busybox --list); do ln -sf /usr/bin/busybox "$R/opt/busybox/bin/$a"; done   # last in PATH

# modules, compressed as shipped (the guest's kmod loads them; depmod below): what NVMe/TCP,
# TLS, authentication, nvmet, NBD, qemu's emulated NVMe controller (nvme) and the filesystems need, their dependencies, and all of crypto/
# (the kernel asks modprobe for "crypto-hmac(sha384)", "crypto-ffdhe3072(dh)" and the like)
MODLIST="e1000 crc32c_generic crc32c_intel nvme_core nvme nvme_fabrics nvme_tcp nvme_keyring nvme_auth
         tls configfs nvmet nvmet_tcp loop nbd ext4"
KD=$R/usr/lib/modules/$K
mkdir -p "$KD"
cp "$MODS"/modules.{order,builtin,builtin.modinfo} "$KD/"
declare -A seen=()
add_mod() {
  local name=${1//-/_} f dep
  [[ -n ${seen[$name]:-} ]] && return 0; seen[$name]=1
  f=$(find "$MODS/kernel" \( -name "$name.ko*" -o -name "${name//_/-}.ko*" \) | head -1 || true)
  [[ -n $f ]] || return 0   # built into the kernel
  mkdir -p "$KD/$(dirname "${f#"$MODS"/}")"; cp "$f" "$KD/${f#"$MODS"/}"
  for dep in $(PATH=$PATH:/sbin:/usr/sbin modinfo -F depends "$f" 2>/dev/null | tr ',' ' '); do add_mod "$dep"; done
}
for m in $MODLIST; do add_mod "$m"; done
for d in crypto arch/x86/crypto lib/crypto; do
  [[ -d $MODS/kernel/$d ]] || continue
  while read -r f; do add_mod "$(basename "$f" | sed 's/\.ko.*//')"; done < <(find "$MODS/kernel/$d" -name '*.ko*')
done
chroot "$R" depmod "$K"
echo $MODLIST > "$R/etc/ballast-vm-modules"

# tlshd (the kernel's TLS handshake upcall, for nvme-tcp and nvmet-tcp alike) must look for PSKs
# in the kernel's .nvme keyring; its log goes to the console's /run/tlshd.log
conf=$R/etc/tlshd.conf
[[ -f $conf ]] || { echo "ballast-vm(trixie): ktls-utils left no /etc/tlshd.conf" >&2; exit 1; }
sed -i -e 's/^#\?[[:space:]]*keyrings[[:space:]]*=.*/keyrings= .nvme/' "$conf"
grep -q '^keyrings= .nvme' "$conf" || printf '\n[authenticate]\nkeyrings= .nvme\n' >> "$conf"

cat > "$R/init" <<'EOI'
#!/bin/sh
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/opt/busybox/bin HOME=/root TERM=dumb
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mkdir -p /dev/pts /dev/shm; mount -t devpts devpts /dev/pts; mount -t tmpfs tmpfs /run; mount -t tmpfs tmpfs /dev/shm
# modprobe reads MODULE.PARAM=VALUE from the kernel command line itself (BALLAST_VM_APPEND)
modprobe -a $(cat /etc/ballast-vm-modules) 2>/dev/null
mount -t configfs none /sys/kernel/config 2>/dev/null
mount -t debugfs none /sys/kernel/debug 2>/dev/null
ip link set lo up; ip link set eth0 up; ip addr add 10.0.2.15/24 dev eth0; ip route add default via 10.0.2.2
busybox hostname ballast-vm
if [ ! -f /etc/nvme/hostnqn ]; then
  u=$(cat /proc/sys/kernel/random/uuid); echo "$u" > /etc/nvme/hostid
  echo "nqn.2014-08.org.nvmexpress:uuid:$u" > /etc/nvme/hostnqn
fi
/usr/sbin/tlshd -s > /run/tlshd.log 2>&1 &
echo "ballast-vm: up in $(cut -d' ' -f1 /proc/uptime)s, kernel $(uname -r), flavour trixie"
cd /tmp; sh -e /guest/script.sh; rc=$?
sync
echo "ballast-vm: guest script exit $rc"
busybox poweroff -f
EOI
chmod +x "$R/init"
(cd "$R" && find . | cpio -o -H newc --quiet | zstd -q -T0 -6 > "$DIR/base.cpio.zst.tmp")
mv "$DIR/base.cpio.zst.tmp" "$DIR/base.cpio.zst"
echo "$K" > "$DIR/kernel-version"
size=$(du -sh "$R" | cut -f1); rm -rf --one-file-system "$R"
echo "$stamp" > "$DIR/stamp"
echo "ballast-vm(trixie): built guest with kernel $K in $DIR ($(du -h "$DIR/base.cpio.zst" | cut -f1) initramfs, $size unpacked)"
