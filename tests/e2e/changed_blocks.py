#!/usr/bin/python3
"""Incremental backup of a volume through NBD's `qemu:dirty-bitmap:SNAPSHOT` contexts, with
clients we did not write: qemu-io writes, nbdcopy takes the full backup, nbdinfo and qemu-img
read the changes, libnbd copies them.

- a 64 MiB volume `v` written by qemu-io in scattered places (whole MiB, 4 KiB, 512 bytes at
  odd offsets), snapshot `s1`, a full copy of `s1` to a file (nbdcopy);
- more qemu-io writes to `v` (overwrites, new places, unaligned bytes) and a discard of data
  `s1` has, snapshot `s2`;
- nbdinfo lists the contexts of `s2` (base:allocation and a dirty bitmap per kin: `v`, `s1`;
  never a volume of another family); `nbdinfo --map=qemu:dirty-bitmap:s1` gives the changed
  extents; copying only those from `s2` onto the backup of `s1` (libnbd) makes it equal to a
  full copy of `s2`, byte for byte, while less than 1/16 of the volume was copied; qemu-img
  map with `x-dirty-bitmap` reports the same extents;
- a dirty bitmap against an unrelated volume cannot be selected; one block status answers a
  chunk per context (base:allocation and the bitmap); against a snapshot deleted meanwhile —
  and replaced by a new one of the same name — block status fails cleanly (EINVAL, after the
  allocation chunk) and the connection serves on;
- kill -9 and restart: the changes are the same (they come from the maps on the media).
Run with /usr/bin/python3 (Debian's python3-libnbd).
"""
import filecmp
import json
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import nbd  # noqa: E402
from ballast_testlib import Ballast, ballast_bin, check_pool_exact, disk_scratch, guarded  # noqa: E402

MiB = 1 << 20
SIZE = 64 * MiB


def qemu_io(b, name, cmds):
    args = []
    for c in cmds:
        args += ["-c", c]
    p = subprocess.run(["qemu-io", "-f", "raw"] + args + [b.uri(name)],
                       capture_output=True, text=True, timeout=120)
    if p.returncode != 0 or "error" in (p.stdout + p.stderr).lower():
        raise RuntimeError("qemu-io: " + (p.stdout + p.stderr)[-300:])


def nbdinfo_map(b, name, context):
    p = subprocess.run(["nbdinfo", "--json", "--map=" + context, b.uri(name)],
                       capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        raise RuntimeError("nbdinfo --map: " + p.stderr.strip())
    return [(e["offset"], e["length"], e["type"]) for e in json.loads(p.stdout)]


def contexts(b, name):
    p = subprocess.run(["nbdinfo", "--json", b.uri(name)], capture_output=True, text=True,
                       timeout=60)
    if p.returncode != 0:
        raise RuntimeError("nbdinfo: " + p.stderr.strip())
    return json.loads(p.stdout)["exports"][0].get("contexts", [])


def nbdcopy(b, name, path):
    p = subprocess.run(["nbdcopy", b.uri(name), path], capture_output=True, text=True,
                       timeout=120)
    if p.returncode != 0:
        raise RuntimeError("nbdcopy: " + p.stderr.strip())


def rpc(b, method, params):
    """`ballast rpc METHOD JSON`: the result."""
    p = b.ctl("rpc", method, json.dumps(params))
    if p.returncode != 0:
        raise RuntimeError("%s: %s" % (method, p.stderr.strip()))
    return json.loads(p.stdout)


def dirty(extents):
    """The (offset, length) of the dirty extents (type bit 0)."""
    return [(o, n) for o, n, t in extents if t & 1]


def apply_changes(b, name, extents, path):
    """Copies `extents` of export `name` over the same places of the file at `path`."""
    h = nbd.NBD()
    h.connect_uri(b.uri(name))
    copied = 0
    with open(path, "r+b") as f:
        for off, n in extents:
            f.seek(off)
            f.write(h.pread(n, off))
            copied += n
    h.shutdown()
    return copied


def qemu_img_dirty(b, name, base):
    """qemu-img's view of the bitmap: with x-dirty-bitmap, qemu reports dirty extents as
    data: false (its documented inversion)."""
    opts = ("driver=nbd,server.type=inet,server.host=127.0.0.1,server.port=%d,export=%s,"
            "x-dirty-bitmap=qemu:dirty-bitmap:%s" % (b.port, name, base))
    p = subprocess.run(["qemu-img", "map", "--output=json", "--image-opts", opts],
                       capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        raise RuntimeError("qemu-img map: " + p.stderr.strip())
    out = []
    for e in json.loads(p.stdout):
        if not e["data"]:
            if out and out[-1][0] + out[-1][1] == e["start"]:
                out[-1] = (out[-1][0], out[-1][1] + e["length"])
            else:
                out.append((e["start"], e["length"]))
    return out


def main(r):
    for tool in ("qemu-io", "qemu-img", "nbdinfo", "nbdcopy"):
        if not shutil.which(tool):
            r.bad("%s installed" % tool)
            return
    scratch = disk_scratch(r, "ballast-changes")
    if scratch is None:
        return
    pool = os.path.join(scratch, "pool.img")
    try:
        p = subprocess.run([ballast_bin(), "pool", "create", pool, "--size", "512M"],
                           capture_output=True, text=True)
        r.check("a 512 MiB pool created", p.returncode == 0, p.stderr)
        b = Ballast(["--cores", "2", "--pool", pool])
        with b:
            for args in (["volume", "create", "v", "64M"], ["volume", "create", "w", "64M"]):
                r.check_eq("ballast " + " ".join(args), 0, b.ctl(*args).returncode)
            r.run("qemu-io writes v in scattered places", qemu_io, b, "v", [
                "write -P 0x11 0 8M", "write -P 0x12 20M 4k", "write -P 0x13 33M 512",
                "write -P 0x14 40M 1M", "write -P 0x15 63M 1M", "flush"])
            r.check_eq("snapshot s1 of v", 0, b.ctl("snapshot", "create", "v", "s1").returncode)
            full1 = os.path.join(scratch, "s1.img")
            r.run("nbdcopy: full backup of s1", nbdcopy, b, "s1", full1)
            r.run("qemu-io changes v: overwrites, new places, unaligned bytes, a discard",
                  qemu_io, b, "v", [
                      "write -P 0x21 1M 64k", "write -P 0x22 5000 1000",
                      "write -P 0x23 24M 4k", "write -P 0x24 50M 1M",
                      "write -P 0x25 41M 512", "discard 63M 1M", "flush"])
            r.check_eq("snapshot s2 of v", 0, b.ctl("snapshot", "create", "v", "s2").returncode)

            listed = r.run("nbdinfo lists s2's metadata contexts", contexts, b, "s2") or []
            r.check_eq("... base:allocation and one dirty bitmap per kin (not w)",
                       ["base:allocation", "qemu:dirty-bitmap:v", "qemu:dirty-bitmap:s1"],
                       listed)
            changes = r.run("nbdinfo --map=qemu:dirty-bitmap:s1 of s2", nbdinfo_map, b, "s2",
                            "qemu:dirty-bitmap:s1") or []
            covered = sum(n for _, n, _ in changes)
            r.check_eq("... the extents cover the whole volume", SIZE, covered)
            changed = dirty(changes)
            # Each write inside a cluster s1 has copies that 64 KiB cluster (1M, and 5000 in
            # cluster 0); writes where s1 has nothing count by their 4 KiB pieces (24M, 41M:
            # just past s1's 40M-41M); a new MiB and a discarded MiB count whole.
            k = 1024
            r.check_eq("... exactly what changed, at the volume's granularity", [
                (0, 64 * k), (MiB, 64 * k), (24 * MiB, 4 * k), (41 * MiB, 4 * k),
                (50 * MiB, MiB), (63 * MiB, MiB)], changed)
            incremental = os.path.join(scratch, "incremental.img")
            shutil.copyfile(full1, incremental)
            copied = r.run("libnbd copies the dirty extents of s2 onto s1's backup",
                           apply_changes, b, "s2", changed, incremental) or 0
            full2 = os.path.join(scratch, "s2.img")
            r.run("nbdcopy: full copy of s2", nbdcopy, b, "s2", full2)
            r.check("the incremental backup equals s2 byte for byte (%d KiB copied of %d MiB)"
                    % (copied >> 10, SIZE >> 20),
                    filecmp.cmp(incremental, full2, shallow=False) and copied < SIZE // 16)
            r.check("... and it was needed: s1's backup alone differs from s2",
                    not filecmp.cmp(full1, full2, shallow=False))
            r.check_eq("qemu-img map with x-dirty-bitmap=qemu:dirty-bitmap:s1 agrees", changed,
                       r.run("qemu-img map", qemu_img_dirty, b, "s2", "s1"))
            cli = b.ctl("volume", "changes", "s2", "--since", "s1", "--json")
            r.check_eq("`ballast volume changes s2 --since s1` gives the same extents", changed,
                       [(e["offset"], e["length"]) for e in json.loads(cli.stdout or "{}")
                        .get("extents", [])] if cli.returncode == 0 else cli.stderr)
            paged, offset = [], 0
            for _ in range(64):
                page = rpc(b, "bdev_lvol_get_changes",
                           {"name": "s2", "base": "s1", "offset": offset, "max_extents": 2})
                paged += [(e["offset"], e["length"]) for e in page["extents"]]
                if page["next_offset"] is None:
                    break
                offset = page["next_offset"]
            r.check_eq("bdev_lvol_get_changes two runs at a time, page after page: the same",
                       changed, paged)
            cli = b.ctl("volume", "changes", "s2", "--json")
            allocation = r.run("nbdinfo --map of s2 (base:allocation)", nbdinfo_map, b, "s2",
                               "base:allocation") or []
            r.check_eq("`ballast volume changes s2` (no base): the extents nbdinfo sees as data",
                       [(o, n) for o, n, t in allocation if not t & 1],
                       [(e["offset"], e["length"]) for e in json.loads(cli.stdout or "{}")
                        .get("extents", [])] if cli.returncode == 0 else cli.stderr)
            for bad in (0, 4097):
                p = b.ctl("rpc", "bdev_lvol_get_changes",
                          json.dumps({"name": "s2", "base": "s1", "max_extents": bad}))
                r.check("max_extents %d is refused (1 to 4096)" % bad,
                        p.returncode != 0 and "max_extents" in p.stderr, p.stderr)
            p = b.ctl("rpc", "bdev_lvol_get_changes", json.dumps({"name": "v", "base": "w"}))
            r.check("... against w (another family): refused, naming it",
                    p.returncode != 0 and "w is not of v's family" in p.stderr, p.stderr)
            back = r.run("the same the other way round (s1 against s2)", nbdinfo_map, b, "s1",
                         "qemu:dirty-bitmap:s2") or []
            r.check_eq("... the same dirty extents", changed, dirty(back))

            h = nbd.NBD()
            h.add_meta_context("qemu:dirty-bitmap:w")
            h.connect_uri(b.uri("v"))
            r.check("a bitmap against w (another family) is not selected",
                    not h.can_meta_context("qemu:dirty-bitmap:w"))
            h.shutdown()

            h = nbd.NBD()
            h.add_meta_context("base:allocation")
            h.add_meta_context("qemu:dirty-bitmap:s1")
            h.connect_uri(b.uri("v"))
            r.check("both contexts are selected on v",
                    h.can_meta_context("qemu:dirty-bitmap:s1")
                    and h.can_meta_context("base:allocation"))
            seen = []
            h.block_status(SIZE, 0, lambda ctx, off, ents, err: seen.append(ctx))
            r.check_eq("one block status answers a chunk per context",
                       ["base:allocation", "qemu:dirty-bitmap:s1"], sorted(seen))
            # s1 deleted and another snapshot named s1 taken: the connection compared with the
            # first s1 (the one the client's backup was made from), not with the new one.
            r.check_eq("snapshot s1 deleted", 0, b.ctl("volume", "delete", "s1").returncode)
            r.check_eq("a new snapshot named s1 of v", 0,
                       b.ctl("snapshot", "create", "v", "s1").returncode)
            seen = []
            try:
                h.block_status(SIZE, 0, lambda ctx, off, ents, err: seen.append(ctx))
                failed = None
            except nbd.Error as e:
                failed = e.errnum
            r.check("then block status on that connection fails with EINVAL (its s1 is gone)",
                    failed == 22, "errno %s" % failed)
            r.check_eq("... after the allocation chunk of the same reply", ["base:allocation"],
                       seen)
            r.check("... and the connection still serves reads",
                    h.pread(4096, 0) == b"\x11" * 4096)
            h.shutdown()
            r.check_eq("a new connection compares with the new s1: nothing changed since",
                       [], dirty(nbdinfo_map(b, "v", "qemu:dirty-bitmap:s1")))
            r.run("qemu-io writes v again", qemu_io, b, "v",
                  ["write -P 0x31 30M 64k", "write -P 0x32 60M 4k", "flush"])
            before_kill = nbdinfo_map(b, "v", "qemu:dirty-bitmap:s2")
            r.check_eq("v against s2 before the kill: the two writes since",
                       [(30 * MiB, 64 * 1024), (60 * MiB, 4096)], dirty(before_kill))
            b.proc.kill()
            b.proc.wait()
            b.start()
            r.check_eq("after kill -9 and a restart, v's changes against s2 are the same",
                       before_kill, r.run("nbdinfo after restart", nbdinfo_map, b, "v",
                                          "qemu:dirty-bitmap:s2"))
            b.check_clean_end(r)
        check_pool_exact(r, pool)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    guarded(main)
