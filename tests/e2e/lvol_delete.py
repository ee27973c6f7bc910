#!/usr/bin/python3
"""Deleting, rolling back, shrinking and inflating large volumes: clusters released (or
mapped) in bounded steps once the operation is durable (docs/VOLUMES.md, "Delete"), the space
back (or taken) when the RPC returns, nothing lost or leaked by a kill -9 between the steps.

A 72 GiB pool (a sparse file: thick volumes map clusters, they write no data), two cores:
- `keep` (64 MiB, written with a pattern) is read by a libnbd client throughout: every read
  sees the pattern (the largest read latency is printed, not judged: this VM's own hiccups
  reach tens of ms);
- `big`, thick, 64 GiB (a million 64 KiB clusters mapped); snapshot `big-snap`, clone `big-c`:
  deleting the snapshot, then `big`, gives nothing back (the clone still names every cluster)
  and each is gone from the listings at once; deleting the clone gives back the 64 GiB, the free
  bytes exactly what they were before `big` (`bdev_lvol_get_lvstores`);
- `r` (256 MiB): written, snapshot `r-s`, written again over other clusters; rolled back to
  `r-s`, the clusters only the second writes named are free again and `r` reads its snapshot;
- `sh`, thick, 64 GiB, written at 0 and at 1 GiB: shrunk to 1 GiB and three clusters
  (--force; the end inside a leaf of the map), the rest back when it returns, its first 4 MiB
  as written; grown to 2 GiB, it takes the difference, reads its three clusters past 1 GiB as
  written and zeros after them (what was written there is gone);
- `in`, thin, 64 GiB, 4 MiB written: inflated (`bdev_lvol_inflate`), it is thick, takes the
  rest of its 64 GiB when the RPC returns and reads what was written; killed -9 at once, the
  pool checks exact offline with no thick volume left to complete (every cluster mapped, not
  only reserved, when the RPC answered);
- three times: thick `big2` (64 GiB) made, then its deletion sent and the daemon killed -9 a
  few ms later (before, during or after its release: the whole delete takes ~20 ms here);
  restarted, `big2` is either gone with the free bytes back to the baseline, or there whole
  (thick, its size) with the free bytes as before the delete — never in between, and not there
  if the delete answered; deleted again if there (the outcomes are printed);
- three times: thick `sh2` (64 GiB, written at 0 and 32 GiB) made, then shrunk to 1 GiB and
  the daemon killed -9 a few ms later: restarted, it is 1 GiB or 64 GiB (1 GiB if the shrink
  answered), the free bytes those of its size, what it was written within its size as
  written;
- `keep` still reads its pattern; the pool checks exact offline.
Run with /usr/bin/python3 (libnbd's `nbd` module).
"""
import os
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import nbd  # noqa: E402
from ballast_testlib import (ballast_bin, check_pool_exact, guarded, piece_pattern,  # noqa: E402
                             pool_daemon)

MiB = 1 << 20
GiB = 1 << 30
KEEP = 64 * MiB


def pattern(offset, length):
    return piece_pattern(offset, length, (0x5A, 0xA5))


def free_bytes(b):
    return b.lvstore()["free_bytes"]


def ok(r, b, what, method, params):
    code, out = b.rpc(method, params)
    r.check(what, code == 0, out[-300:])


def kill_during(b, argv, delay):
    """Runs the CLI `argv` (against b's control socket), kills the daemon -9 `delay` s later
    and restarts it: (the command's exit status, its output)."""
    cmd = subprocess.Popen([ballast_bin()] + argv + ["--rpc-socket", b.rpc_sock],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(delay)
    b.proc.kill()
    b.proc.wait()
    out = cmd.communicate(timeout=30)[0]
    b.start()
    return cmd.returncode, out


class Reader:
    """A libnbd client reading `keep` in 64 KiB pieces until stopped: reads, bad reads,
    errors, and the largest latency."""

    def __init__(self, b):
        self.b, self.stop = b, threading.Event()
        self.reads, self.bad, self.errors, self.worst = 0, 0, [], 0.0
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        try:
            h = nbd.NBD()
            h.connect_uri(self.b.uri("keep"))
            off = 0
            while not self.stop.is_set():
                t0 = time.monotonic()
                data = h.pread(64 * 1024, off)
                self.worst = max(self.worst, time.monotonic() - t0)
                self.reads += 1
                if data != pattern(off, 64 * 1024):
                    self.bad += 1
                off = (off + 64 * 1024) % KEEP
            h.shutdown()
        except Exception as e:  # noqa: BLE001
            self.errors.append(repr(e))

    def finish(self):
        self.stop.set()
        self.thread.join(30)


def main(r):
    b, pool = pool_daemon("72G")
    with b:
        ok(r, b, "create keep", "bdev_lvol_create",
           {"lvol_name": "keep", "size_in_mib": KEEP // MiB, "thin_provision": True})
        b.write_volume("keep", 0, KEEP, pattern)
        baseline = free_bytes(b)

        reader = Reader(b)
        t0 = time.monotonic()
        ok(r, b, "create big: thick, 64 GiB", "bdev_lvol_create",
           {"lvol_name": "big", "size_in_mib": 64 * 1024})
        print("thick creation of 64 GiB: %.2f s" % (time.monotonic() - t0))
        r.check_eq("big takes its 64 GiB at once", baseline - 64 * GiB, free_bytes(b))
        ok(r, b, "snapshot big-snap", "bdev_lvol_snapshot",
           {"lvol_name": "big", "snapshot_name": "big-snap"})
        ok(r, b, "clone big-c", "bdev_lvol_clone",
           {"snapshot_name": "big-snap", "clone_name": "big-c"})
        for name in ("big-snap", "big"):
            t0 = time.monotonic()
            ok(r, b, "delete " + name, "bdev_lvol_delete", {"name": name})
            print("deleting %s: %.3f s" % (name, time.monotonic() - t0))
            r.check("... gone from the listings", name not in b.lvols(), sorted(b.lvols()))
            r.check_eq("... nothing given back: the clone names every cluster",
                       baseline - 64 * GiB, free_bytes(b))
        t0 = time.monotonic()
        ok(r, b, "delete big-c", "bdev_lvol_delete", {"name": "big-c"})
        print("deleting big-c (a million clusters freed): %.3f s" % (time.monotonic() - t0))
        r.check_eq("... the 64 GiB back when the delete returns", baseline, free_bytes(b))

        # A rollback releases the old tree the same way.
        ok(r, b, "create r", "bdev_lvol_create",
           {"lvol_name": "r", "size_in_mib": 256, "thin_provision": True})
        b.write_volume("r", 0, 32 * MiB, pattern)
        ok(r, b, "snapshot r-s", "bdev_lvol_snapshot", {"lvol_name": "r", "snapshot_name": "r-s"})
        before = free_bytes(b)
        b.write_volume("r", 64 * MiB, 64 * MiB, lambda off, n: bytes([0xEE]) * n)
        r.check_eq("r's second writes take 64 MiB", before - 64 * MiB, free_bytes(b))
        p = b.ctl("volume", "rollback", "r", "r-s")
        r.check("rollback r to r-s", p.returncode == 0, p.stderr)
        r.check_eq("... what only the second writes named is free again", before,
                   free_bytes(b))
        h = nbd.NBD()
        h.connect_uri(b.uri("r"))
        r.check("... r reads its snapshot",
                h.pread(MiB, 31 * MiB) == pattern(31 * MiB, MiB)
                and h.pread(MiB, 64 * MiB) == bytes(MiB), "")
        h.shutdown()

        # A shrink retires what lies past the new end; an inflation maps in steps.
        before = free_bytes(b)
        ok(r, b, "create sh: thick, 64 GiB", "bdev_lvol_create",
           {"lvol_name": "sh", "size_in_mib": 64 * 1024})
        b.write_volume("sh", 0, 4 * MiB, pattern)
        b.write_volume("sh", GiB, 4 * MiB, pattern)
        cl = b.lvstore()["cluster_size"]
        end = GiB + 3 * cl
        t0 = time.monotonic()
        p = b.ctl("volume", "resize", "sh", str(end), "--force")
        print("shrinking sh from 64 GiB to 1 GiB and 3 clusters: %.3f s"
              % (time.monotonic() - t0))
        r.check("shrink sh to 1 GiB and 3 clusters", p.returncode == 0, p.stderr)
        r.check_eq("... the rest back when it returns", before - end, free_bytes(b))
        p = b.ctl("volume", "resize", "sh", "2G")
        r.check("grow sh to 2 GiB", p.returncode == 0, p.stderr)
        r.check_eq("... a thick growth takes the difference", before - 2 * GiB, free_bytes(b))
        h = nbd.NBD()
        h.connect_uri(b.uri("sh"))
        r.check("... sh reads what was written before its end, zeros past the old one",
                h.pread(4 * MiB, 0) == pattern(0, 4 * MiB)
                and h.pread(3 * cl, GiB) == pattern(GiB, 3 * cl)
                and h.pread(4 * MiB - 3 * cl, end) == bytes(4 * MiB - 3 * cl), "")
        h.shutdown()
        ok(r, b, "delete sh", "bdev_lvol_delete", {"name": "sh"})
        r.check_eq("... all its space back", before, free_bytes(b))

        ok(r, b, "create in: thin, 64 GiB", "bdev_lvol_create",
           {"lvol_name": "in", "size_in_mib": 64 * 1024, "thin_provision": True})
        b.write_volume("in", 32 * GiB, 4 * MiB, pattern)
        t0 = time.monotonic()
        ok(r, b, "inflate in", "bdev_lvol_inflate", {"name": "in"})
        print("inflating in (64 GiB, a million holes): %.3f s" % (time.monotonic() - t0))
        r.check_eq("... thick, taking its 64 GiB when it returns", (False, before - 64 * GiB),
                   (b.lvols()["in"]["is_thin_provisioned"], free_bytes(b)))
        h = nbd.NBD()
        h.connect_uri(b.uri("in"))
        r.check("... it reads what was written, zeros elsewhere",
                h.pread(4 * MiB, 32 * GiB) == pattern(32 * GiB, 4 * MiB)
                and h.pread(MiB, 0) == bytes(MiB), "")
        h.shutdown()
        reader.finish()
        b.proc.kill()
        b.proc.wait()
        chk = subprocess.run([ballast_bin(), "pool", "check", pool], capture_output=True,
                             text=True)
        r.check("... killed -9 at once: the pool checks exact, no thick volume to complete",
                chk.returncode == 0 and "cut short" not in chk.stdout + chk.stderr,
                (chk.stdout + chk.stderr)[-400:])
        b.start()
        ok(r, b, "delete in", "bdev_lvol_delete", {"name": "in"})
        r.check_eq("... all its space back", before, free_bytes(b))
        r.check("keep read its pattern throughout (%d reads, the largest %.1f ms)"
                % (reader.reads, reader.worst * 1e3),
                reader.reads > 0 and reader.bad == 0 and not reader.errors,
                "bad %d, errors %s" % (reader.bad, reader.errors[:2]))

        # kill -9 around a large deletion's release: all of it or none of it.
        base2 = free_bytes(b)
        outcomes = []
        for delay in (0.002, 0.008, 0.015):
            ok(r, b, "create big2: thick, 64 GiB", "bdev_lvol_create",
               {"lvol_name": "big2", "size_in_mib": 64 * 1024})
            held = free_bytes(b)
            _, out = kill_during(b, ["rpc", "bdev_lvol_delete", '{"name": "big2"}'], delay)
            answered = out.strip() == "true"
            vols = b.lvols()
            r.check("after kill -9: a delete that answered is not undone",
                    not (answered and "big2" in vols), "")
            if "big2" in vols:
                outcomes.append("kept")
                r.check_eq("after kill -9 %d ms into the delete: big2 whole (thick, 64 GiB), "
                           "the free bytes as before" % (delay * 1e3),
                           (False, 64 * GiB, held),
                           (vols["big2"]["is_thin_provisioned"], vols["big2"]["size_bytes"],
                            free_bytes(b)))
                ok(r, b, "delete big2 again", "bdev_lvol_delete", {"name": "big2"})
            else:
                outcomes.append("gone (%s)" % ("answered" if answered else "unanswered"))
                r.check_eq("after kill -9 %d ms into the delete: big2 gone, all its space "
                           "back" % (delay * 1e3), base2, free_bytes(b))
            r.check_eq("... and the free bytes at the baseline once it is gone", base2,
                       free_bytes(b))
        print("kill -9 outcomes:", outcomes)

        # kill -9 around a large shrink: the volume is one size or the other, whole.
        sizes = []
        for delay in (0.005, 0.020, 0.040):
            ok(r, b, "create sh2: thick, 64 GiB", "bdev_lvol_create",
               {"lvol_name": "sh2", "size_in_mib": 64 * 1024})
            b.write_volume("sh2", 0, 4 * MiB, pattern)
            b.write_volume("sh2", 32 * GiB, 4 * MiB, pattern)
            held = free_bytes(b)
            code, _ = kill_during(b, ["volume", "resize", "sh2", "1G", "--force"], delay)
            answered = code == 0
            size = b.lvols()["sh2"]["size_bytes"]
            sizes.append("%d GiB (%s)" % (size // GiB, "answered" if answered else "unanswered"))
            r.check_eq("after kill -9 %d ms into a shrink: sh2 is 1 GiB or 64 GiB (1 GiB if the "
                       "shrink answered), its free bytes those of its size" % (delay * 1e3),
                       (True, held + (64 * GiB - size)),
                       (size in (GiB, 64 * GiB) and not (answered and size != GiB),
                        free_bytes(b)))
            h = nbd.NBD()
            h.connect_uri(b.uri("sh2"))
            r.check("... it reads what was written within its size as written",
                    h.pread(4 * MiB, 0) == pattern(0, 4 * MiB)
                    and (size == GiB
                         or h.pread(4 * MiB, 32 * GiB) == pattern(32 * GiB, 4 * MiB)), "")
            h.shutdown()
            ok(r, b, "delete sh2", "bdev_lvol_delete", {"name": "sh2"})
            r.check_eq("... the free bytes at the baseline", base2, free_bytes(b))
        print("kill -9 around a shrink, sh2 after:", sizes)
        h = nbd.NBD()
        h.connect_uri(b.uri("keep"))
        r.check("keep reads its pattern after the restarts",
                all(h.pread(4 * MiB, off) == pattern(off, 4 * MiB)
                    for off in range(0, KEEP, 4 * MiB)), "")
        h.shutdown()
        b.check_clean_end(r)
        check_pool_exact(r, pool)  # stopped, before the data directory goes


if __name__ == "__main__":
    guarded(main)
