#!/usr/bin/python3
"""Volume placement: a volume's I/O runs on the core owning its family, wherever it arrives.

Two cores, two volumes "a" and "b". libnbd opens four connections in the order a, a, b, b;
the listener places connections on the cores round-robin, so each volume has a connection on
either core. The first connection to each volume writes first, which makes its core the
owner of the volume's family (first touch); the second connection to each is on the other core,
so under `--volume-placement owner` its commands are forwarded to the owner and answered back.
Every connection writes its own pattern into its own part of the volume, many commands in
flight at once (libnbd's asynchronous commands), flushes, and reads back both its own and the
other connection's part.

Checked: every read returns what was written, through every connection; `ballast stats`
shows the crossing connections' requests forwarded and fewer wake-ups than requests
(batches); kill -9 after the flushes and a restart keep every block; with `any` (the default)
nothing is forwarded and the data is the same; a bad `--volume-placement` is refused with a
clear error.
"""

import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import nbd  # noqa: E402  (Debian's python3-libnbd)
from ballast_testlib import Ballast, ballast_bin, guarded  # noqa: E402

BLOCK = 4096
# Blocks per connection (each connection owns a quarter of its volume's first 8 MiB).
PER_CONN = 512
ORDER = ("a", "a", "b", "b")


def stats(b):
    p = b.ctl("stats", "--json")
    if p.returncode != 0:
        raise RuntimeError("ballast stats failed: " + p.stderr)
    return json.loads(p.stdout)["reactors"]


def pattern(conn, i):
    return bytes([(conn * 37 + i) % 251 + 1]) * BLOCK


def offset(conn, i):
    # Connections 0 and 1 share volume a, 2 and 3 volume b: halves of the first 4 MiB.
    return ((conn % 2) * PER_CONN + i) * BLOCK


def drive(handles):
    """Each connection in turn writes its part (asynchronous, up to 64 in flight), then all flush."""
    for conn, h in enumerate(handles):
        for i in range(PER_CONN):
            h.aio_pwrite(pattern(conn, i), offset(conn, i))
            while h.aio_in_flight() >= 64:
                h.poll(-1)
    for h in handles:
        while h.aio_in_flight() > 0:
            h.poll(-1)
        h.flush()


def verify(r, label, handles):
    """Each connection reads its volume's two halves: its own writes and its peer's."""
    for conn, h in enumerate(handles):
        bad = 0
        for writer in (conn - conn % 2, conn - conn % 2 + 1):
            for i in range(0, PER_CONN, 7):
                if h.pread(BLOCK, offset(writer, i)) != pattern(writer, i):
                    bad += 1
        r.check("%s: connection %d (volume %s) reads every write to its volume"
                % (label, conn, ORDER[conn]), bad == 0, "%d blocks differ" % bad)


def connect(b):
    handles = []
    for name in ORDER:
        h = nbd.NBD()
        h.connect_uri(b.uri(name))
        handles.append(h)
    return handles


def close(handles):
    for h in handles:
        try:
            h.shutdown()
        except nbd.Error:
            pass


def run(r, placement):
    b = Ballast(["--pool", "{data}/pool.img", "--cores", "2", "--volume-placement", placement])
    pool = os.path.join(b.data_dir, "pool.img")
    subprocess.run([ballast_bin(), "pool", "create", pool, "--size", "256M"], check=True,
                   capture_output=True)
    with b:
        for name in ("a", "b"):
            r.check("%s: volume %s created" % (placement, name),
                    b.ctl("volume", "create", name, "16M").returncode == 0)
        before = stats(b)
        handles = connect(b)
        drive(handles)
        verify(r, placement, handles)
        after = stats(b)
        fwd = [a["volume_forwarded"] - z["volume_forwarded"] for z, a in zip(before, after)]
        wakes = [a["volume_mail_wakes"] - z["volume_mail_wakes"] for z, a in zip(before, after)]
        print("%s: forwarded per core %s, wake-ups %s" % (placement, fwd, wakes), flush=True)
        # Writes, flush and verifying reads of a crossing connection (one per volume).
        crossing = PER_CONN + 1 + 2 * len(range(0, PER_CONN, 7))
        if placement == "owner":
            r.check("owner: the crossing connections' commands were forwarded",
                    sum(fwd) >= 2 * crossing, "forwarded %s, want >= %d" % (fwd, 2 * crossing))
            r.check("owner: forwarded requests and answers travel in batches (wake-ups < requests)",
                    sum(wakes) < sum(fwd), "wake-ups %s for %s forwarded" % (wakes, fwd))
        else:
            r.check("any: nothing forwarded", fwd == [0, 0] and wakes == [0, 0],
                    "forwarded %s, wake-ups %s" % (fwd, wakes))
        # kill -9 after the flushes: every block is there after a restart.
        b.proc.kill()
        b.proc.wait()
        close(handles)
        b.start()
        handles = connect(b)
        verify(r, placement + " after kill -9", handles)
        close(handles)
        r.check("%s: no panic" % placement, not b.panics(), "\n".join(b.panics()))


def main(r):
    run(r, "owner")
    run(r, "any")
    p = subprocess.run([ballast_bin(), "serve", "--volume-placement", "nearest"],
                       capture_output=True, text=True, timeout=30)
    r.check("a bad --volume-placement is refused, naming the choices",
            p.returncode != 0 and "owner" in p.stderr and "any" in p.stderr, p.stderr[-300:])


if __name__ == "__main__":
    guarded(main)
