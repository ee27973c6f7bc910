#!/usr/bin/python3
"""Background commits: pending journal records are committed without a client's flush.

A libnbd client writes into 8 unallocated clusters of a pool volume (each write logs a mapping
record) and never flushes; the daemon is killed with SIGKILL a while later and restarted. With
the default --commit-interval (1 s) every write is there after the restart (the commit timer
made its record durable); with a 60 s interval and no record limit none is (the same sequence,
nothing committed: what the timer bought); with --commit-records 4 at least the first four are
(the record limit started a commit on its own).
"""

import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import nbd  # noqa: E402  (Debian's python3-libnbd)
from ballast_testlib import Ballast, Report, ballast_bin, guarded  # noqa: E402

CLUSTER = 64 * 1024
WRITES = 8


def survivors(r, label, args, wait):
    """Writes, waits `wait` s, kill -9, restart: how many of the writes read back."""
    b = Ballast(["--pool", "{data}/pool.img", "--cores", "1"] + args)
    pool = os.path.join(b.data_dir, "pool.img")
    subprocess.run([ballast_bin(), "pool", "create", pool, "--size", "256M"], check=True,
                   capture_output=True)
    with b:
        r.check("%s: volume created" % label, b.ctl("volume", "create", "v", "16M").returncode == 0)
        h = nbd.NBD()
        h.connect_uri(b.uri("v"))
        blocks = [os.urandom(4096) for _ in range(WRITES)]
        for i, data in enumerate(blocks):
            h.pwrite(data, i * 3 * CLUSTER)  # a fresh cluster each: a record each
        time.sleep(wait)
        b.proc.kill()
        b.proc.wait()
        try:
            h.shutdown()
        except nbd.Error:
            pass
        h = None
        b.start()
        h = nbd.NBD()
        h.connect_uri(b.uri("v"))
        kept = [h.pread(4096, i * 3 * CLUSTER) == data for i, data in enumerate(blocks)]
        zeros = [h.pread(4096, i * 3 * CLUSTER) == bytes(4096) for i in range(WRITES)]
        h.shutdown()
        r.check("%s: every block reads its write or zeros" % label,
                all(k or z for k, z in zip(kept, zeros)), "kept %s" % kept)
        r.check("%s: no panic" % label, not b.panics(), "\n".join(b.panics()))
        return kept


def main(r):
    kept = survivors(r, "default 1 s interval", [], 2.5)
    r.check("with the commit timer every unflushed write survives kill -9", all(kept),
            "kept %s" % kept)
    kept = survivors(r, "60 s interval", ["--commit-interval", "60", "--commit-records",
                                          "1000000"], 2.5)
    r.check("without a commit (60 s interval, no record limit) no unflushed write survives",
            not any(kept), "kept %s" % kept)
    kept = survivors(r, "record limit 4", ["--commit-interval", "60", "--commit-records", "4"],
                     1.0)
    r.check("with --commit-records 4 the first four writes survive", all(kept[:4]),
            "kept %s" % kept)


if __name__ == "__main__":
    guarded(main)
