#!/usr/bin/python3
"""NVMe/TCP I/O queues spread over the cores (target/nvmf/src/spread.rs).

The listener hands connections to the cores round-robin before it knows what they are; a host
connecting one admin queue and one I/O queue per controller (SPDK's perf with one queue, our
initiator, any host asking for one I/O queue) would have every I/O queue on the same core.
`--cores 2`, a RAM export, four controllers made one after another, each an admin queue and
one I/O queue, 32 reads on every I/O queue: `ballast stats --json` shows each core served the
reads of two queues (64 reads each), and at least one queue moved after its Connect; the data
read back is what was written through the NBD side first. Then `--cores 1`: nothing moves.
"""

import json
import os
import struct
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import nbd  # noqa: E402  (Debian's python3-libnbd)
import nvmeraw  # noqa: E402
from ballast_testlib import Ballast, free_port, guarded  # noqa: E402

NQN = "nqn.2026-11.dev.ballast:m"
CONTROLLERS = 4
READS = 32
OP_READ = 0x02


def stats(b):
    out = b.ctl("stats", "--json")
    return json.loads(out.stdout)["reactors"] if out.returncode == 0 else []


def read_block(q, lba):
    status, data = q.admin_read(OP_READ, (lba, 0, 0, 0, 0, 0), 4096, nsid=1)
    return status, data


def run(r, cores):
    port = free_port()
    with Ballast(["--cores", str(cores), "--nvmf-listen", "127.0.0.1:%d" % port,
                  "--export", "m=ram:64M"]) as b:
        pattern = b"".join(struct.pack("<Q", i) * 512 for i in range(64))
        h = nbd.NBD()
        h.connect_uri(b.uri("m"))
        h.pwrite(pattern, 0)
        h.shutdown()
        before = stats(b)
        queues = [nvmeraw.io_queue(port, NQN) for _ in range(CONTROLLERS)]
        ok = True
        for i, (_, io) in enumerate(queues):
            for k in range(READS):
                lba = (i * READS + k) % 64
                status, data = read_block(io, lba)
                ok &= status == 0 and data == pattern[lba * 4096:(lba + 1) * 4096]
        r.check("--cores %d: every read returned its block" % cores, ok)
        after = stats(b)
        for admin, io in queues:
            admin.close()
            io.close()
        reads = [a["reads"] - b0["reads"] for a, b0 in zip(after, before)]
        moved = sum(a.get("connections_moved", 0) for a in after)
        r.check("no panic", not b.panics(), "\n".join(b.panics()))
        return reads, moved


def main(r):
    reads, moved = run(r, 2)
    r.check_eq("--cores 2: each core served two I/O queues' reads",
               [2 * READS, 2 * READS], reads)
    r.check("--cores 2: I/O queues moved after Connect", moved >= 1, "moved %d" % moved)
    reads, moved = run(r, 1)
    r.check_eq("--cores 1: one core served every read", [CONTROLLERS * READS], reads)
    r.check_eq("--cores 1: nothing moved", 0, moved)


if __name__ == "__main__":
    guarded(main)
