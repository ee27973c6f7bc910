# Runs INSIDE the trixie test guest (sh -e, as root), started by test-nbd-libnbd-trixie.sh:
# libnbd 1.22's tools and qemu 10's (qemu-io, qemu-img) against ballast on the host (10.0.2.2),
# both with NBD extended headers. Files in
# /guest: params (NBD_PORT). Prints PASS/FAIL lines and GUEST-DONE.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
. /guest/params
. /guest/guest-lib.sh
V="nbd://10.0.2.2:$NBD_PORT/v"
M="nbd://10.0.2.2:$NBD_PORT/m"
G=1073741824
echo "guest: kernel $(uname -r), $(nbdinfo --version | head -1)"

if timeout 60 nbdinfo "$V" > /tmp/info 2>&1 && grep -q 'protocol: newstyle-fixed without TLS, using extended packets' /tmp/info; then
  pass "nbdinfo: libnbd negotiated extended headers (using extended packets)"
else fail "nbdinfo protocol line"; cat /tmp/info; fi
grep -q 'export-size: 12884901888' /tmp/info && pass "nbdinfo: export-size 12 GiB" || fail "nbdinfo size"

# A 12 GiB sparse image: 1 MiB of random data at 0 and at 10 GiB.
{ truncate -s 12G /tmp/src && head -c 1048576 /dev/urandom > /tmp/a && head -c 1048576 /dev/urandom > /tmp/z \
  && dd if=/tmp/a of=/tmp/src bs=1M conv=notrunc status=none \
  && dd if=/tmp/z of=/tmp/src bs=1M seek=10240 conv=notrunc status=none; } || fail "preparing the image"
if timeout 180 nbdcopy /tmp/src "$V" 2>/tmp/copy.err; then pass "nbdcopy: the sparse 12 GiB image onto v"
else fail "nbdcopy onto v"; tail -3 /tmp/copy.err; fi

# The map: data, one hole of almost 10 GiB, data, hole to the end (nbdinfo prints offset,
# length, type; a type's number: 0 data, 3 hole+zero).
if timeout 60 nbdinfo --map "$V" > /tmp/map 2>&1; then
  awk '{ print $1, $2, $3 }' /tmp/map > /tmp/map3 || true
  printf '%s\n' "0 1048576 0" "1048576 $((10 * G - 1048576)) 3" "$((10 * G)) 1048576 0" \
    "$((10 * G + 1048576)) $((2 * G - 1048576)) 3" > /tmp/want || true
  cmp -s /tmp/map3 /tmp/want && pass "nbdinfo --map: data, a 10 GiB hole, data, a 2 GiB hole" \
    || { fail "nbdinfo --map"; cat /tmp/map; }
else fail "nbdinfo --map"; cat /tmp/map; fi
# With extended headers nbdinfo --map asks once for the whole export (64-bit block status);
# without, it would ask in pieces below 4 GiB (libnbd's debug log names each call).
LIBNBD_DEBUG=1 timeout 60 nbdinfo --map "$V" > /dev/null 2> /tmp/map.debug || true
n=$(grep -c 'nbd_block_status_64: enter' /tmp/map.debug || true)
grep 'nbd_block_status_64: enter' /tmp/map.debug | head -3 | sed 's/^/guest: /'
[ "$n" = 1 ] && grep -q 'nbd_block_status_64: enter: count=12884901888' /tmp/map.debug \
  && pass "nbdinfo --map: one block status over all 12 GiB" || fail "block status calls: $n"

# Back again, whole, with nbdcopy (holes from block status), and compared where data is.
if timeout 180 nbdcopy "$V" /tmp/back 2>/tmp/copy.err; then
  pass "nbdcopy: v copied back (12 GiB)"
  dd if=/tmp/back bs=1M count=1 status=none | cmp -s - /tmp/a \
    && dd if=/tmp/back bs=1M skip=10240 count=1 status=none | cmp -s - /tmp/z \
    && [ "$(stat -c %s /tmp/back)" = $((12 * G)) ] \
    && pass "the two MiBs read back at 0 and 10 GiB; 12 GiB long" || fail "data read back differs"
  [ "$(du -k /tmp/back | cut -f1)" -lt 65536 ] && pass "the copy stayed sparse (holes came as holes)" \
    || fail "the copy is not sparse: $(du -k /tmp/back)"
else fail "nbdcopy from v"; tail -3 /tmp/copy.err; fi
rm -f /tmp/src /tmp/back

# 64 MiB of random data through a memory export, both ways (reads and writes of libnbd's sizes).
head -c 67108864 /dev/urandom > /tmp/blob || fail "64 MiB of random data"
if timeout 120 nbdcopy /tmp/blob "$M" 2>/tmp/copy.err && timeout 120 nbdcopy "$M" /tmp/mback 2>>/tmp/copy.err \
   && cmp -s /tmp/blob /tmp/mback; then pass "nbdcopy: 64 MiB to m and back, identical"
else fail "nbdcopy through m"; tail -3 /tmp/copy.err; fi
# qemu 10 (qemu-io, qemu-img: its NBD client asks for extended headers too) on the same volume:
# 1 MiB at 11 GiB written and read back, a 10 GiB write-zeroes that may unmap over [1, 11) GiB
# (-n: no slow fallback, which is NBD's FAST_ZERO; qemu-io takes more than 2 GiB only so; the MiB
# at 10 GiB goes, the one at 11 GiB stays), and qemu-img map sees data at 0 and 11 GiB only.
Q="nbd://10.0.2.2:$NBD_PORT/v"
if timeout 120 qemu-io -f raw -c "write -P 0x5a $((11 * G)) 1M" -c "read -P 0x5a $((11 * G)) 1M" \
     -c "write -z -u -n $G $((10 * G))" -c "read -P 0 $((10 * G)) 1M" -c "read -P 0x5a $((11 * G)) 1M" \
     "$Q" > /tmp/qio 2>&1 && ! grep -qi 'fail\|error\|pattern' /tmp/qio; then
  pass "qemu-io: wrote and read back 1 MiB at 11 GiB; a 10 GiB write-zeroes ending there reads as zeros, the MiB after it kept"
else fail "qemu-io"; tail -5 /tmp/qio; fi
if timeout 60 qemu-img map --output=json -f raw "$Q" > /tmp/qmap 2>&1; then
  n=$(grep -c '"data": true' /tmp/qmap || true)
  grep -q '"start": 0, "length": 1048576,.*"data": true' /tmp/qmap \
    && grep -q "\"start\": $((11 * G)), \"length\": 1048576,.*\"data\": true" /tmp/qmap && [ "$n" = 2 ] \
    && pass "qemu-img map: data at 0 and 11 GiB only" || { fail "qemu-img map"; cat /tmp/qmap; }
else fail "qemu-img map"; cat /tmp/qmap; fi
timeout 60 qemu-img info -f raw --output=json "$Q" > /tmp/qinfo 2>&1 || true
grep -q '"virtual-size": 12884901888' /tmp/qinfo && pass "qemu-img info: 12 GiB" || { fail "qemu-img info"; cat /tmp/qinfo; }
echo GUEST-DONE
