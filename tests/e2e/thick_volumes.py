#!/usr/bin/python3
"""Thick volumes (`bdev_lvol_create` without `thin_provision`, SPDK's default; `ballast volume
create --thick`) in an overcommitted pool, through libnbd (tests/e2e/spdk_rpc.sh checks spdk-rpc's
default makes one).

A 64 MiB pool, two cores:
- a thick volume `db` (16 MiB) takes its room at once: the pool's free bytes drop by 16 MiB; the
  listings say thick (`is_thin_provisioned` false, SPDK's `thin_provision` false and every
  cluster allocated); a thin one (`fill`, 256 MiB: 4x the pool) takes nothing;
- a thick volume larger than what is free is refused (-28, No space) and takes nothing; so is a
  growth of `db` past the free room (its size unchanged);
- `fill` is written until the pool is full (ENOSPC); then `db` still takes 16 MiB of writes and a
  flush; a trim of all of `db` gives no room back (the free bytes stay, its reads are zeros) and
  it takes the writes again;
- kill -9 and restart: `db` is still thick, holds what was flushed, and the free bytes are as
  before the kill;
- a snapshot of `db` makes it thin (its clusters are shared), as SPDK's thick lvol becomes;
- `ballast pool check` is exact. Run with /usr/bin/python3 (libnbd's `nbd` module).
"""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import nbd  # noqa: E402
from ballast_testlib import check_pool_exact, guarded, pool_daemon  # noqa: E402

MiB = 1 << 20


def free_bytes(b):
    code, out = b.rpc("bdev_lvol_get_lvstores", {})
    if code != 0:
        raise AssertionError("bdev_lvol_get_lvstores: " + out)
    return json.loads(out)[0]["free_bytes"]


def connect(b, name):
    h = nbd.NBD()
    h.connect_uri(b.uri(name))
    return h


def write_all(h, size, byte):
    """Writes `size` bytes of `byte` in 1 MiB requests, then flushes: None, or the errno name
    of the first failure."""
    try:
        for off in range(0, size, MiB):
            h.pwrite(bytes([byte]) * MiB, off)
        h.flush()
    except nbd.Error as e:
        return {28: "ENOSPC"}.get(e.errno, e.errno)
    return None


def main(r):
    b, pool = pool_daemon("64M")
    with b:
        free0 = free_bytes(b)
        code, out = b.rpc("bdev_lvol_create", {"lvol_name": "db", "size_in_mib": 16})
        r.check("bdev_lvol_create db 16 MiB without thin_provision (SPDK's default)", code == 0,
                out)
        free1 = free_bytes(b)
        r.check_eq("the thick volume took its 16 MiB at once", 16 * MiB, free0 - free1)
        p = b.ctl("volume", "create", "fill", "256M")
        r.check("ballast volume create fill 256M (thin, 4x the pool)", p.returncode == 0, p.stderr)
        r.check_eq("the thin one took nothing", free1, free_bytes(b))
        v = b.lvols()
        r.check_eq("bdev_lvol_get_lvols: db thick, fill thin", (False, True),
                   (v["db"]["is_thin_provisioned"], v["fill"]["is_thin_provisioned"]))
        code, out = b.rpc("bdev_get_bdevs", {"name": "db"})
        lv = json.loads(out)[0]["driver_specific"]["lvol"] if code == 0 else {}
        r.check_eq("bdev_get_bdevs db: thin_provision false, every cluster allocated",
                   (False, 16 * MiB // (64 * 1024)),
                   (lv.get("thin_provision"), lv.get("num_allocated_clusters")))
        p = b.ctl("volume", "list")
        r.check("volume list shows db as a thick volume",
                any(ln.split()[:1] == ["db"] and "thick" in ln for ln in p.stdout.splitlines()),
                p.stdout)

        p = b.ctl("volume", "create", "g", "4M", "--thick")
        r.check("ballast volume create g 4M --thick", p.returncode == 0, p.stderr)
        before = free_bytes(b)
        code, out = b.rpc("bdev_lvol_resize", {"name": "g", "size_in_mib": 8})
        r.check("growing a thick volume with room: true", code == 0, out)
        r.check_eq("... takes the growth's 4 MiB at once", 4 * MiB, before - free_bytes(b))
        code, out = b.rpc("bdev_lvol_delete", {"name": "g"})
        r.check("delete g", code == 0, out)
        free2 = free_bytes(b)
        code, out = b.rpc("bdev_lvol_create", {"lvol_name": "big", "size_in_mib": 64})
        r.check("a thick volume larger than the free room: -28 No space",
                code != 0 and "No space" in out, out)
        r.check("... nothing made, nothing taken", "big" not in b.lvols() and
                free_bytes(b) >= free2, (sorted(b.lvols()), free_bytes(b), free2))

        hf = connect(b, "fill")
        r.check_eq("fill written until the pool is full", "ENOSPC", write_all(hf, 256 * MiB, 0xF1))
        hf.shutdown()
        r.check("the pool is full", free_bytes(b) < 2 * MiB, free_bytes(b))
        code, out = b.rpc("bdev_lvol_resize", {"name": "db", "size_in_mib": 32})
        r.check("growing the thick volume past the free room: refused, No space",
                code != 0 and "No space" in out, out)
        r.check_eq("... its size unchanged", 16 * MiB, b.lvols()["db"]["size_bytes"])

        h = connect(b, "db")
        r.check_eq("the full pool: db takes 16 MiB of writes and a flush", None,
                   write_all(h, 16 * MiB, 0xD1))
        before = free_bytes(b)
        h.trim(16 * MiB, 0)
        h.flush()
        r.check_eq("a trim of all of db gives no room back", before, free_bytes(b))
        r.check_eq("... and reads zeros", bytes(MiB), h.pread(MiB, 5 * MiB))
        r.check_eq("db takes the writes again", None, write_all(h, 16 * MiB, 0xD2))
        h.shutdown()
        free_kill = free_bytes(b)

        b.proc.kill()
        b.proc.wait()
        b.start()
        v = b.lvols()
        r.check_eq("after kill -9: db still thick", False, v["db"]["is_thin_provisioned"])
        h = connect(b, "db")
        r.check_eq("after kill -9: db holds what was flushed", bytes([0xD2]) * MiB,
                   h.pread(MiB, 15 * MiB))
        h.shutdown()
        r.check_eq("after kill -9: the free bytes as before", free_kill, free_bytes(b))

        p = b.ctl("snapshot", "create", "db", "db-snap")
        r.check("snapshot db", p.returncode == 0, p.stderr)
        r.check_eq("a snapshot makes db thin (its clusters are shared)", True,
                   b.lvols()["db"]["is_thin_provisioned"])
        b.check_clean_end(r)
        check_pool_exact(r, pool)  # stopped, before the data directory goes


if __name__ == "__main__":
    guarded(main)
