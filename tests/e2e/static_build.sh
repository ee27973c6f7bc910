#!/bin/bash
# The static build and the image (contrib/release/build-static.sh): `file` says the binary is
# statically linked, it is at most 10 MB with its symbols split off (and the debug file names
# the same build), it serves a RAM export and a pool to nbdinfo/nbdsh from a chroot that holds
# nothing else, and the FROM-scratch OCI image is well formed (every digest checks out), holds
# exactly that binary, and its config names the entry point (`/ballast serve ...`).
set -u -o pipefail
. "$(dirname "$0")/../lib.sh"

T=$TEST_TMP
OUT=$T/release
if ! out=$("$REPO_ROOT/contrib/release/build-static.sh" "$OUT" 2>&1); then
    fail "build-static.sh builds" "$(tail -n 15 <<<"$out" | tr '\n' ' ')"
    finish
fi
pass "build-static.sh builds"
BIN=$OUT/ballast
desc=$(file -b "$BIN")
if [[ $desc == *"statically linked"* || $desc == *"static-pie linked"* ]]; then
    pass "file says statically linked ($desc)"
else
    fail "file says statically linked" "$desc"
fi
size=$(stat -c %s "$BIN")
if ((size <= 10 * 1024 * 1024)); then pass "binary is $size bytes (<= 10 MB)"; else fail "binary <= 10 MB" "$size bytes"; fi
check "symbols split off into ballast.debug, named by a debuglink" \
    bash -c "readelf --string-dump=.gnu_debuglink '$BIN' | grep -q ballast.debug && readelf -S '$OUT/ballast.debug' | grep -q debug_info"
check "the static binary runs (--version)" "$BIN" --version

# A chroot holding nothing but the binary (and an empty data directory).
ROOTFS=$T/rootfs
mkdir -p "$ROOTFS/data"
cp "$BIN" "$ROOTFS/ballast"
if [[ $(id -u) != 0 ]]; then
    echo "SKIP: chroot checks need root"
else
    PORT=$(free_port)
    NVMF=$(free_port)
    chroot "$ROOTFS" /ballast serve --data-dir /data --nbd-listen "127.0.0.1:$PORT" \
        --nvmf-listen "127.0.0.1:$NVMF" --rpc-socket /data/ballast.sock \
        --export r=ram:64M >"$T/chroot.log" 2>&1 &
    CPID=$!
    add_cleanup "kill -9 $CPID 2>/dev/null"
    for _ in $(seq 100); do port_open "$PORT" && break; sleep 0.1; done
    check_eq "nbdinfo sees the RAM export from the chroot" "67108864" \
        "$(nbdinfo --size "nbd://127.0.0.1:$PORT/r" 2>&1)"
    check "nbdsh writes and reads back through the chroot's daemon" "$SYS_PY" -c "
import nbd, os
h = nbd.NBD(); h.connect_uri('nbd://127.0.0.1:$PORT/r')
d = os.urandom(65536); h.pwrite(d, 1 << 20); h.flush()
assert h.pread(65536, 1 << 20) == d"
    kill -TERM "$CPID"
    wait "$CPID"
    check_eq "the chroot's daemon exits 0 on SIGTERM" 0 $?
    # A pool (the default one: data-dir/pool.img with vol0), from the same empty chroot.
    chroot "$ROOTFS" /ballast serve --data-dir /data --nbd-listen "127.0.0.1:$PORT" \
        --nvmf-listen "127.0.0.1:$NVMF" --rpc-socket /data/ballast.sock >>"$T/chroot.log" 2>&1 &
    CPID=$!
    add_cleanup "kill -9 $CPID 2>/dev/null"
    for _ in $(seq 100); do port_open "$PORT" && break; sleep 0.1; done
    check_eq "nbdinfo sees the pool's vol0 from the chroot" "1073741824" \
        "$(nbdinfo --size "nbd://127.0.0.1:$PORT/vol0" 2>&1)"
    kill -TERM "$CPID"
    wait "$CPID"
    check_eq "the pool daemon exits 0 on SIGTERM" 0 $?
    if grep -q panicked "$T/chroot.log"; then fail "no panic in the chroot" "$(grep -m2 panicked "$T/chroot.log")"; else pass "no panic in the chroot"; fi
fi

# The OCI image layout.
check "the OCI image is well formed, holds the binary, and names the entry point" "$SYS_PY" - "$OUT/ballast-oci" "$BIN" <<'PY'
import gzip, hashlib, io, json, os, sys, tarfile
layout, binary = sys.argv[1], sys.argv[2]
def blob(d):
    algo, hexd = d.split(":")
    data = open(os.path.join(layout, "blobs", algo, hexd), "rb").read()
    assert hashlib.sha256(data).hexdigest() == hexd, "digest mismatch " + d
    return data
assert json.load(open(os.path.join(layout, "oci-layout")))["imageLayoutVersion"] == "1.0.0"
index = json.load(open(os.path.join(layout, "index.json")))
man = json.loads(blob(index["manifests"][0]["digest"]))
cfg = json.loads(blob(man["config"]["digest"]))
ep = cfg["config"]["Entrypoint"]
assert ep[:2] == ["/ballast", "serve"], ep
assert "/var/lib/ballast" in cfg["config"]["Volumes"], cfg["config"]
assert len(man["layers"]) == 1
raw = gzip.decompress(blob(man["layers"][0]["digest"]))
assert cfg["rootfs"]["diff_ids"] == ["sha256:" + hashlib.sha256(raw).hexdigest()]
tar = tarfile.open(fileobj=io.BytesIO(raw))
files = [m.name for m in tar.getmembers() if m.isfile()]
assert files == ["ballast"], files
assert tar.extractfile("ballast").read() == open(binary, "rb").read()
size = sum(os.path.getsize(os.path.join(dp, n)) for dp, _, ns in os.walk(layout) for n in ns)
assert size <= 15 * 1024 * 1024, size
print("image", size, "bytes, entry point", " ".join(ep))
PY
if command -v skopeo >/dev/null; then
    check "skopeo reads the image" skopeo inspect "oci:$OUT/ballast-oci:latest"
fi
finish
