# Sourced INSIDE the test guest by the guest scripts of the NVMe/TCP TLS, DH-HMAC-CHAP and kTLS
# suites (run.sh ships it as /guest/guest-lib.sh): check lines, and finding and exercising a
# connected subsystem's block device.
failed=0
pass() { echo "PASS: $*"; }
fail() { echo "FAIL: $*"; failed=$((failed + 1)); }
connected() { nvme list-subsys 2>/dev/null | grep -q "NQN=$1"; }
# dev_of SUBNQN: the name of its namespace block device (nvmeXnY), if connected
dev_of() { for c in /sys/class/nvme/nvme*; do
  [ "$(cat "$c/subsysnqn" 2>/dev/null)" = "$1" ] && ls -d "$c"/nvme*n1 2>/dev/null | head -1 | xargs -r basename; done | head -1; }
# fio_verify DEV [MAX_BS SIZE]: random writes of 4k..MAX_BS over SIZE, read back and verified
fio_verify() {
  fio --name=v --filename="/dev/$1" --ioengine=libaio --direct=1 --rw=randwrite --bsrange="4k-${2:-64k}" \
      --iodepth=8 --size="${3:-8m}" --verify=crc32c --do_verify=1 --output=/tmp/fio.out >/dev/null 2>&1 \
    || { tail -5 /tmp/fio.out; return 1; }
}
