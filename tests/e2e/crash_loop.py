#!/usr/bin/python3
"""kill -9 during writes, again and again: no flushed write is lost, snapshots never change.

A libnbd client keeps 16 random 4 KiB writes (to 16 different blocks) in flight over a small
range of a pool volume (so blocks are overwritten often and copy-on-write follows each
snapshot), flushes every few dozen writes, and sometimes has the daemon snapshot the volume.
At a random moment the daemon is killed with SIGKILL, writes still in flight. After the restart every block must hold the value
of its last write completed before the last completed flush, or of a write issued after it
(never anything else, never a mix inside a block), and every snapshot must read exactly what
the volume held when it was taken. Eight rounds; then `ballast pool check` must be exact.
"""

import hashlib
import os
import random
import signal
import struct
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import nbd  # noqa: E402  (Debian's python3-libnbd)
from ballast_testlib import Ballast, Report, ballast_bin  # noqa: E402

BLOCK = 4096
BLOCKS = 2048  # 8 MiB of a 64 MiB volume: overwrites and copy-on-write are frequent
QD = 16
ROUNDS = int(os.environ.get("CRASH_ROUNDS", "8"))


def content(block, gen):
    head = struct.pack("<QQ", block, gen)
    body = (hashlib.sha256(head).digest() * (BLOCK // 32))[: BLOCK - 16]
    return head + body


def decode(data):
    """(block, gen) if the 4 KiB block is one whole write, 0 if all zeros, None if torn."""
    if data == bytes(BLOCK):
        return 0
    block, gen = struct.unpack("<QQ", data[:16])
    return (block, gen) if content(block, gen) == data else None


def gen_of(data, blk):
    """The generation block `blk` holds: 0 unwritten, -1 someone else's data, None torn."""
    d = decode(data)
    if d is None or d == 0:
        return d
    return d[1] if d[0] == blk else -1


def read_all(uri, blocks=BLOCKS):
    h = nbd.NBD()
    h.connect_uri(uri)
    out = [h.pread(BLOCK, b * BLOCK) for b in range(blocks)]
    h.shutdown()
    return out


def round_(b, rep, rng, state, snapshots):
    """One round of writes ended by kill -9. `state[blk]`: durable gen (0 = never written)."""
    since = {}  # blk -> gens issued since the last completed flush
    completed = dict(state)
    gen = max([0] + [g for g in state.values()]) + 1
    h = nbd.NBD()
    h.connect_uri(b.uri("v"))
    kill_at = time.monotonic() + rng.uniform(0.3, 1.5)
    inflight = {}
    writes = 0
    killed = False
    try:
        while True:
            if not killed and time.monotonic() >= kill_at:
                b.proc.send_signal(signal.SIGKILL)
                b.proc.wait()
                killed = True
            while len(inflight) < QD:
                # One write per block at a time: two overlapping writes in flight may land in
                # either order (NBD orders nothing among requests in flight), so the block's
                # value after them would not be the last one completed.
                busy = {v[0] for v in inflight.values()}
                blk = rng.randrange(BLOCKS)
                while blk in busy:
                    blk = rng.randrange(BLOCKS)
                buf = nbd.Buffer.from_bytearray(bytearray(content(blk, gen)))
                cookie = h.aio_pwrite(buf, blk * BLOCK)
                inflight[cookie] = (blk, gen, buf)
                since.setdefault(blk, set()).add(gen)
                gen += 1
                writes += 1
            h.poll(1)
            for cookie in list(inflight):
                if h.aio_command_completed(cookie):
                    blk, g, _ = inflight.pop(cookie)
                    completed[blk] = g
            if writes % 48 == 0:
                # Drain, flush: everything completed so far is now durable.
                while inflight:
                    h.poll(1)
                    for cookie in list(inflight):
                        if h.aio_command_completed(cookie):
                            blk, g, _ = inflight.pop(cookie)
                            completed[blk] = g
                h.flush()
                state.clear()
                state.update(completed)
                since.clear()
                taken = any(n.startswith("r%ds" % rep) for n in snapshots)
                if rng.random() < 0.15 and not taken and len(snapshots) < 6:
                    name = "r%ds%d" % (rep, len(snapshots))
                    r = b.ctl("snapshot", "create", "v", name)
                    if r.returncode == 0:
                        # The snapshot holds every write completed before it: all of `state`.
                        snapshots[name] = dict(state)
                    writes += 1  # no second snapshot at once
    except nbd.Error as e:
        if not killed:
            # Not the kill: a real failure. Stop the daemon so the next round can start.
            print("FAIL: round %d: I/O failed before the kill: %s" % (rep, e), flush=True)
            b.proc.send_signal(signal.SIGKILL)
            b.proc.wait()
            since["error"] = str(e)
    try:
        h.close()
    except Exception:  # noqa: BLE001
        pass
    return since, writes


def main():
    # `timeout` sends SIGTERM: make it an exit, so the scratch directory below is removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    b = Ballast(["--pool", "{data}/pool.img", "--cores", "2"])
    try:
        return run(b)
    finally:
        # The pool and the log (~55 MB): removed on success and failure alike (the daemon is
        # killed first if still running); BALLAST_KEEP_TMP keeps them.
        b.__exit__(None, None, None)


def run(b):
    r = Report()
    rng = random.Random(int(os.environ.get("CRASH_SEED", str(int(time.time())))))
    print("seed and rounds:", rng.getstate()[1][0], ROUNDS)
    pool = os.path.join(b.data_dir, "pool.img")
    subprocess.run([ballast_bin(), "pool", "create", pool, "--size", "1G"], check=True,
                   capture_output=True)
    b.start()
    r.check("volume v created", b.ctl("volume", "create", "v", "64M").returncode == 0)
    state = {}
    snapshots = {}
    try:
        for rep in range(ROUNDS):
            since, writes = round_(b, rep, rng, state, snapshots)
            r.check("round %d: writes fail only because of the kill" % rep,
                    "error" not in since, since.get("error", ""))
            since.pop("error", None)
            b.start()
            data = read_all(b.uri("v"))
            bad = []
            for blk in range(BLOCKS):
                d = decode(data[blk])
                want = state.get(blk, 0)
                if d is None:
                    bad.append("block %d torn" % blk)
                    continue
                got = 0 if d == 0 else d[1]
                if d != 0 and d[0] != blk:
                    bad.append("block %d holds block %d's data" % (blk, d[0]))
                elif got != want and got not in since.get(blk, ()):
                    bad.append("block %d: gen %d; durable %d, issued since %s"
                               % (blk, got, want, sorted(since.get(blk, ()))[:5]))
                state[blk] = got
            r.check("round %d (%d writes, kill -9 mid-flight): every block holds its flushed "
                    "value or a later write" % (rep, writes), not bad, "; ".join(bad[:5]))
            state = {k: v for k, v in state.items() if v}
            for name, snap in snapshots.items():
                sdata = read_all(b.uri(name))
                wrong = [blk for blk in range(BLOCKS) if gen_of(sdata[blk], blk) != snap.get(blk, 0)]
                r.check("round %d: snapshot %s unchanged" % (rep, name), not wrong,
                        "blocks %s differ" % wrong[:5])
    finally:
        status = b.stop()
    r.check("daemon stops cleanly (SIGTERM exit 0)", status == 0, "status %s" % status)
    chk = subprocess.run([ballast_bin(), "pool", "check", pool], capture_output=True, text=True)
    r.check("pool check is exact after %d kill -9 rounds" % ROUNDS, chk.returncode == 0,
            chk.stdout[-500:])
    r.check("no panic in the log", not b.panics(), "; ".join(b.panics()[:3]))
    return r.finish()


if __name__ == "__main__":
    sys.exit(main())
