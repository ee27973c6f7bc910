#!/usr/bin/python3
"""A pool grows into its file after the file was grown from outside, and keeps every byte.

A 64 MiB pool file, a thin volume much larger than it written 1 MiB at a time through libnbd
(each write flushed) until the pool is full (ENOSPC). Then:
- `ballast pool grow` with the file unchanged says there is nothing to grow into;
- the file is grown to 160 MiB (`truncate`), `ballast pool grow` (SPDK's
  bdev_lvol_grow_lvstore underneath) reports the new data size, and `pool info --json` shows
  it; kill -9 straight after, and the restarted daemon has the new size (the growth was
  durable when the command returned);
- the write that failed, and writes after it, now succeed: qemu-io (a client we did not write)
  writes patterns into the new room and flushes; kill -9 and restart: every flushed MiB reads
  back through libnbd, old and new, and `pool check` is exact once the daemon stops;
- the volume deleted, a new one fills the whole grown pool (the new clusters are reusable).
Run with /usr/bin/python3 (Debian's python3-libnbd).
"""
import errno
import json
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import nbd  # noqa: E402
from ballast_testlib import (Ballast, ballast_bin, check_pool_exact, disk_scratch,  # noqa: E402
                             guarded)

MiB = 1 << 20


def pattern(i):
    return bytes([(i * 37 + 11) & 0xFF]) * MiB


def write_until_full(h, first):
    """Writes MiB `first`, `first`+1, ... each flushed; returns (MiBs flushed, errno)."""
    done = []
    for i in range(first, first + 1024):
        try:
            h.pwrite(pattern(i), i * MiB)
            h.flush()
        except nbd.Error as e:
            return done, e.errnum
        done.append(i)
    return done, 0


def pool_info(b):
    p = b.ctl("pool", "info", "--json")
    return json.loads(p.stdout)[0] if p.returncode == 0 else {}


def read_back(b, name, mibs):
    h = nbd.NBD()
    h.connect_uri(b.uri(name))
    bad = [i for i in mibs if h.pread(MiB, i * MiB) != pattern(i)]
    h.shutdown()
    return bad


def main(r):
    if not shutil.which("qemu-io"):
        r.bad("qemu-io installed (qemu-utils)")
        return
    scratch = disk_scratch(r, "ballast-grow")
    if scratch is None:
        return
    pool = os.path.join(scratch, "pool.img")
    try:
        p = subprocess.run([ballast_bin(), "pool", "create", pool, "--size", "64M"],
                           capture_output=True, text=True)
        r.check("a 64 MiB pool created", p.returncode == 0, p.stderr)
        b = Ballast(["--cores", "1", "--pool", pool])
        with b:
            r.check("volume v (256 MiB, thin) created",
                    b.ctl("volume", "create", "v", "256M").returncode == 0)
            small = pool_info(b).get("data_bytes", 0)
            h = nbd.NBD()
            h.connect_uri(b.uri("v"))
            flushed, err = write_until_full(h, 0)
            h.shutdown()
            r.check("the pool fills up: ENOSPC after %d MiB flushed" % len(flushed),
                    err == errno.ENOSPC and 16 <= len(flushed) < 64,
                    "errno %s" % errno.errorcode.get(err, err))

            p = b.ctl("pool", "grow")
            r.check("pool grow with the file unchanged: nothing to grow into",
                    p.returncode == 0 and "nothing to grow" in p.stdout, p.stdout + p.stderr)
            os.truncate(pool, 160 * MiB)
            p = b.ctl("pool", "grow")
            r.check("pool grow after truncate -s 160M says it grew",
                    p.returncode == 0 and "grown" in p.stdout, p.stdout + p.stderr)
            grown = pool_info(b).get("data_bytes", 0)
            r.check("pool info: the data area grew by 96 MiB (%d -> %d bytes)" % (small, grown),
                    grown - small == 96 * MiB)

            # Durable when the command returned.
            b.proc.kill()
            b.proc.wait()
            b.start()
            r.check_eq("after kill -9 straight after, the pool still has the new size", grown,
                       pool_info(b).get("data_bytes", 0))

            # qemu-io writes into the new room: the MiB that failed, and the next 60.
            more = list(range(len(flushed), len(flushed) + 61))
            cmds = []
            for i in more:
                cmds += ["-c", "write -P %d %d 1M" % (pattern(i)[0], i * MiB)]
            cmds += ["-c", "flush"]
            q = subprocess.run(["qemu-io", "-f", "raw"] + cmds + [b.uri("v")],
                               capture_output=True, text=True, timeout=120)
            r.check("qemu-io writes 61 MiB more into the grown pool and flushes",
                    q.returncode == 0 and "No space" not in q.stdout + q.stderr
                    and (q.stdout + q.stderr).count("wrote") == len(more),
                    (q.stdout + q.stderr)[-300:])
            b.proc.kill()
            b.proc.wait()
            b.start()
            bad = read_back(b, "v", flushed + more)
            r.check("after kill -9 and a restart, every flushed MiB reads back "
                    "(%d before the growth, %d after)" % (len(flushed), len(more)), not bad,
                    "MiB %s differ" % bad[:8])
            r.check("volume v deleted", b.ctl("volume", "delete", "v").returncode == 0)
            r.check("volume w (256 MiB) created",
                    b.ctl("volume", "create", "w", "256M").returncode == 0)
            h = nbd.NBD()
            h.connect_uri(b.uri("w"))
            filled, err = write_until_full(h, 0)
            h.shutdown()
            r.check("w fills the whole grown pool (%d MiB, %d before the growth)"
                    % (len(filled), len(flushed)),
                    err == errno.ENOSPC and len(filled) >= len(flushed) + 90,
                    "errno %s" % errno.errorcode.get(err, err))
            b.check_clean_end(r)
        check_pool_exact(r, pool)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    guarded(main)
