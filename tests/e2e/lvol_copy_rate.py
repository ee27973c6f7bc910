#!/usr/bin/python3
"""The pace of decoupling and inflating (`serve --copy-rate`, `ballast pool copy-rate`,
`bdev_lvol_set_copy_rate`): a pool-wide limit on what those copies take, pushed against.

A daemon started with `--copy-rate 16` (MiB/s), a pool with volume `base` (32 MiB, written
with a pattern), snapshot `snap`, clones of it:
- the rate is what `ballast pool copy-rate` and `bdev_lvol_get_lvstores` say;
- decoupling clone a (32 MiB to copy) takes at least the 2 s the rate allows, while a libnbd
  client reading a sees the pattern throughout and is served meanwhile;
- clones b and c decoupled at once take at least 4 s together, each about as long: the rate
  is the pool's, not each decoupling's;
- at 1 MiB/s, clone d's decoupling copies about 1 MiB a second (the store's free clusters
  fall no faster, and `bdev_lvol_get_lvstores` counts it running and what it copied); asked
  again meanwhile, refused busy; a snapshot of it and a rollback of it refused busy (the
  volume named by its name); renamed d2 meanwhile; the rate lifted (`bdev_lvol_set_copy_rate`
  0) while it waits, it finishes at once instead of in half a minute, d2's NBD export
  describes it as a volume, and a snapshot of it is taken;
- at most two at once (`--max-decouples 2`): with e and f copying at 1 MiB/s a third (g) is
  refused at once (busy, the limit named), the control socket serving other requests; g goes
  once they ended;
- refused: a rate past the limit, an unknown field, another store's name; `serve
  --copy-rate` past the limit exits with an error;
- every clone reads the pattern, is no clone any more; the pool checks exact offline.
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
PIECE = 4096
SIZE = 32 * MiB


def pattern(offset, length):
    return piece_pattern(offset, length, (0x3C, 0xC3))


def decouple_timed(b, name, out):
    t0 = time.monotonic()
    code, text = b.rpc("bdev_lvol_decouple_parent", {"name": name})
    out[name] = (code, text, time.monotonic() - t0)


def main(r):
    b, pool = pool_daemon("512M", ("--cores", "2", "--copy-rate", "16", "--max-decouples", "2"))
    with b:
        p = b.ctl("pool", "copy-rate")
        r.check_eq("ballast pool copy-rate: the rate serve was given", (0, "16 MiB/s"),
                   (p.returncode, p.stdout.strip()))
        r.check_eq("bdev_lvol_get_lvstores: copy_rate_bytes_per_sec", 16 * MiB,
                   b.lvstore().get("copy_rate_bytes_per_sec"))
        p = b.ctl("volume", "create", "base", "32M")
        r.check("volume create base", p.returncode == 0, p.stderr)
        b.write_volume("base", 0, SIZE, pattern)
        r.check_eq("snapshot base", 0, b.ctl("snapshot", "create", "base", "snap").returncode)
        for c in ("a", "b", "c", "d", "e", "f", "g"):
            r.check_eq("clone " + c, 0, b.ctl("clone", "create", "snap", c).returncode)

        # a, read throughout its decoupling.
        stop, reads, bad, errors = threading.Event(), [], [], []

        def reader():
            try:
                h = nbd.NBD()
                h.connect_uri(b.uri("a"))
                n = 0
                while not stop.is_set():
                    off = (n * 7919 % (SIZE // PIECE)) * PIECE
                    if h.pread(PIECE, off) != pattern(off, PIECE):
                        bad.append(off)
                    reads.append(time.monotonic())
                    n += 1
                h.shutdown()
            except Exception as e:  # noqa: BLE001
                errors.append(str(e))

        t = threading.Thread(target=reader)
        t.start()
        time.sleep(0.2)
        out = {}
        decouple_timed(b, "a", out)
        stop.set()
        t.join(30)
        code, text, took = out["a"]
        r.check_eq("decoupling a at 16 MiB/s", (0, "true"), (code, text))
        r.check("it took the 2 s 32 MiB take at 16 MiB/s, at least", took >= 1.8,
                "%.2f s" % took)
        t1 = reads[-1] if reads else 0
        during = sum(1 for x in reads if t1 - took < x)
        r.check_eq("the reader of a saw the pattern throughout", ([], []), (bad, errors))
        r.check("the reader was served while a was decoupled", during > 100,
                "%d reads in %.2f s" % (during, took))

        # b and c at once: the rate is the pool's.
        ts = [threading.Thread(target=decouple_timed, args=(b, c, out)) for c in ("b", "c")]
        t0 = time.monotonic()
        for t in ts:
            t.start()
        for t in ts:
            t.join(120)
        both = time.monotonic() - t0
        r.check_eq("decoupling b and c at once", [(0, "true")] * 2,
                   [out[c][:2] for c in ("b", "c")])
        r.check("together they took the 4 s 64 MiB take at 16 MiB/s, at least", both >= 3.6,
                "%.2f s (b %.2f s, c %.2f s)" % (both, out["b"][2], out["c"][2]))
        # Side by side, each at half the rate (one after the other, each would take 2 s).
        r.check("each took about as long as both: they shared the rate",
                min(out["b"][2], out["c"][2]) >= 3.0,
                "b %.2f s, c %.2f s" % (out["b"][2], out["c"][2]))

        # d at 1 MiB/s, then unpaced while it waits.
        p = b.ctl("pool", "copy-rate", "1")
        r.check("ballast pool copy-rate 1", p.returncode == 0, p.stderr)
        r.check_eq("ballast pool copy-rate says 1 MiB/s", "1 MiB/s",
                   b.ctl("pool", "copy-rate").stdout.strip())
        st = b.lvstore()
        free0, cluster, copied_before = st["free_clusters"], st["cluster_size"], st["copied_bytes"]
        r.check_eq("nothing running before d", 0, st["decouples_running"])
        t = threading.Thread(target=decouple_timed, args=(b, "d", out))
        t0 = time.monotonic()
        t.start()
        time.sleep(2.0)
        st = b.lvstore()
        copied = free0 - st["free_clusters"]
        elapsed = time.monotonic() - t0
        counted = st.get("copied_bytes", 0) - copied_before
        r.check_eq("bdev_lvol_get_lvstores: one decoupling running", 1,
                   st.get("decouples_running"))
        # Counted once a copy-up is done: the clusters of one in flight are taken already.
        r.check("bdev_lvol_get_lvstores: the bytes it copied counted",
                0 < counted <= copied * cluster <= counted + MiB,
                "%d counted, %d taken" % (counted, copied * cluster))
        # 1 MiB a step, each charged 1 s from when it began: at most two steps in 2 s.
        r.check("at 1 MiB/s: about 1 MiB copied a second",
                0 < copied * cluster <= (elapsed + 1.2) * MiB,
                "%d clusters (%.1f MiB) in %.2f s" % (copied, copied * cluster / MiB, elapsed))
        code, text = b.rpc("bdev_lvol_decouple_parent", {"name": "d"})
        r.check("d asked again while its decoupling runs (a client that gave up waiting): "
                "refused busy", code != 0 and "Device or resource busy" in text
                and "being decoupled" in text, text)
        code, text = b.rpc("bdev_lvol_snapshot", {"lvol_name": "d", "snapshot_name": "d-s"})
        r.check("a snapshot of d while it is decoupled: refused busy (as SPDK refuses one of a "
                "blob being inflated), the volume named by its name",
                code != 0 and "Device or resource busy" in text and 'volume "d"' in text, text)
        p = b.ctl("volume", "rollback", "d", "snap")
        r.check("a rollback of d while it is decoupled: refused busy",
                p.returncode != 0 and "being decoupled" in p.stderr, p.stderr)
        p = b.ctl("volume", "rename", "d", "d2")
        r.check("d renamed d2 while it is decoupled", p.returncode == 0, p.stderr)
        code, text = b.rpc("bdev_lvol_set_copy_rate", {"mbytes_per_sec": 0})
        r.check_eq("bdev_lvol_set_copy_rate 0 (unpaced)", (0, "true"), (code, text))
        t.join(60)
        r.check_eq("decoupling d", (0, "true"), out["d"][:2])
        h = nbd.NBD()
        h.set_full_info(True)
        h.connect_uri(b.uri("d2"))
        r.check_eq("d2's NBD export describes it as a volume (not a clone) once decoupled",
                   "volume", h.get_export_description())
        h.shutdown()
        code, text = b.rpc("bdev_lvol_snapshot", {"lvol_name": "d2", "snapshot_name": "d-s"})
        r.check("a snapshot of d2 once decoupled", code == 0, text)
        r.check("unpaced while it waited: d finished at once, not in 32 s", out["d"][2] < 10,
                "%.2f s" % out["d"][2])
        r.check_eq("ballast pool copy-rate says unpaced", "0 (unpaced)",
                   b.ctl("pool", "copy-rate").stdout.strip())

        # At most two at once (--max-decouples 2): a third is refused at once, the control
        # socket serving on; it goes once one has ended.
        p = b.ctl("pool", "copy-rate", "1")
        ts = [threading.Thread(target=decouple_timed, args=(b, c, out)) for c in ("e", "f")]
        for t in ts:
            t.start()
        deadline = time.monotonic() + 10
        while b.lvstore()["decouples_running"] < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        t0 = time.monotonic()
        code, text = b.rpc("bdev_lvol_decouple_parent", {"name": "g"})
        r.check("a third decoupling while two run: refused at once (busy, the limit named)",
                code != 0 and "Device or resource busy" in text and "--max-decouples" in text
                and time.monotonic() - t0 < 5, text)
        p = b.ctl("pool", "info")
        r.check("the control socket serves other requests meanwhile", p.returncode == 0, p.stderr)
        r.check_eq("g is still a clone", True, b.lvols()["g"]["is_clone"])
        r.check_eq("ballast pool copy-rate 0", 0, b.ctl("pool", "copy-rate", "0").returncode)
        for t in ts:
            t.join(60)
        r.check_eq("e and f decoupled", [(0, "true")] * 2, [out[c][:2] for c in ("e", "f")])
        decouple_timed(b, "g", out)
        r.check_eq("g decoupled once they ended", (0, "true"), out["g"][:2])

        # Refusals.
        code, text = b.rpc("bdev_lvol_set_copy_rate", {"mbytes_per_sec": (1 << 24) + 1})
        r.check("a rate past the limit: refused", code != 0 and "Invalid parameters" in text
                and "at most" in text, text)
        code, text = b.rpc("bdev_lvol_set_copy_rate", {"mbytes_per_sec": 5, "burst": 1})
        r.check("an unknown field: refused", code != 0, text)
        code, text = b.rpc("bdev_lvol_set_copy_rate", {"mbytes_per_sec": 5, "lvs_name": "nope"})
        r.check("another store's name: No such device", code != 0 and "No such device" in text,
                text)
        r.check_eq("the refusals changed nothing", "0 (unpaced)",
                   b.ctl("pool", "copy-rate").stdout.strip())

        st = b.lvstore()
        r.check_eq("afterwards: none running, every shared byte of the seven clones counted "
                   "once", (0, 7 * SIZE), (st["decouples_running"], st["copied_bytes"]))
        for c in ("a", "b", "c", "d2", "e", "f", "g"):
            v = b.lvols()[c]
            r.check_eq(c + ": no clone, no parent", (False, None), (v["is_clone"], v["parent"]))
            r.check(c + " reads the pattern", b.read_volume(c, SIZE) == pattern(0, SIZE))
        b.check_clean_end(r)
        check_pool_exact(r, pool)  # stopped, before the data directory goes

        p = subprocess.run([ballast_bin(), "serve", "--pool", pool, "--copy-rate", "16777217"],
                           capture_output=True, text=True, timeout=30)
        r.check("serve --copy-rate past the limit: exits with an error",
                p.returncode != 0 and "copy-rate" in p.stderr, p.stderr[-300:])


if __name__ == "__main__":
    guarded(main)
