#!/usr/bin/python3
"""Clones decoupled from their snapshot and inflated while clients write to them
(`bdev_lvol_decouple_parent`, `bdev_lvol_inflate`, `ballast volume decouple [--inflate]`;
tests/e2e/spdk_rpc.sh calls them with SPDK's own client), over NBD (libnbd) and NVMe/TCP
(raw host), then an inflation cut short by kill -9.

A pool with volume `base` (64 MiB), 32 MiB of it written with a pattern, snapshot `snap`,
clones `c1`, `c2`, `c3`:
- c1 decoupled while two libnbd connections write to it (random 4 KiB and 64 KiB writes
  across it, some acknowledged while the RPC runs): the RPC answers true; c1 then reads,
  piece by piece, the pattern with every acknowledged write over it; bdev_lvol_get_lvols
  calls it no clone, thin, with no parent, and its export's description (libnbd) says volume,
  not clone of snap; the store's free space fell by exactly c1's clusters (the 32 MiB it
  shared, copied or copied on a write, and those of the other half its clients wrote);
  decoupling it again is refused (Invalid parameters, no parent);
- c2 inflated through the CLI while a raw NVMe host writes to it: thick, the store's free
  space fell by all of its 64 MiB, the pattern and the host's writes read back through
  NVMe/TCP;
- the refusals: a snapshot (read-only), an unknown volume (No such device);
- c3 inflated by a second client, the daemon killed (-9) once its copies began: after the
  restart c3 still reads the pattern (thick already if the inflation had answered), and
  inflating it again completes it;
- snap deleted: c1, c2 and c3 keep their content; base (the snapshot's origin, sharing with
  nothing but it) decoupled too;
- the pool checks exact offline; the daemon logged no panic.
Run with /usr/bin/python3 (libnbd's `nbd` module).
"""
import os
import random
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import nbd  # noqa: E402
import nvmeraw  # noqa: E402
from ballast_testlib import (ballast_bin, check_pool_exact, guarded, piece_pattern,  # noqa: E402
                             pool_daemon)

PREFIX = "nqn.2026-11.dev.ballast:"
MiB = 1 << 20
PIECE = 4096
SIZE = 64 * MiB
WRITTEN = 32 * MiB


def pattern(offset, length):
    """The base pattern: each 4 KiB piece filled with its own number and a tag."""
    return piece_pattern(offset, length, (0x5A, 0xA5))


def nbd_connect(b, name):
    h = nbd.NBD()
    h.connect_uri(b.uri(name))
    return h


def lvol(b, name):
    return b.lvols()[name]


def description(b, name):
    """The export description an NBD client is given (NBD_INFO_DESCRIPTION)."""
    h = nbd.NBD()
    h.set_full_info(True)
    h.connect_uri(b.uri(name))
    d = h.get_export_description()
    h.shutdown()
    return d


def free_clusters(b):
    s = b.lvstore()
    return s["free_clusters"], s["cluster_size"]


def free_clusters_fast(sock_path):
    """`bdev_lvol_get_lvstores`' free clusters straight over the control socket (a CLI call
    takes milliseconds): fresh clusters a copy-up takes leave it at once."""
    import json
    import socket
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock_path)
    s.sendall(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "bdev_lvol_get_lvstores"})
              .encode())
    buf, dec = b"", json.JSONDecoder()
    while True:
        chunk = s.recv(65536)
        if not chunk:
            raise AssertionError("control socket closed: %r" % buf)
        buf += chunk
        try:
            reply, _ = dec.raw_decode(buf.decode())
            break
        except ValueError:
            continue
    s.close()
    if "result" not in reply:
        return None  # refused (say, too many control clients): look again
    return reply["result"][0]["free_clusters"]


def writer(b, name, seed, model, acks, lock, stop, errors):
    """Writes random pieces of `name` until `stop`, recording each acknowledged one. Writer
    `seed` keeps to 64 KiB chunks of its own (odd or even), so the model knows which write
    came last to each piece."""
    rng = random.Random(seed)
    try:
        h = nbd_connect(b, name)
        n = 0
        while not stop.is_set() or n < 20:
            pieces = rng.choice((1, 1, 1, 16))
            chunk = rng.randrange(0, SIZE // (16 * PIECE) // 2) * 2 + seed % 2
            p = chunk * 16 + (rng.randrange(0, 16) if pieces == 1 else 0)
            val = bytes([seed, n & 0xFF, (n >> 8) & 0xFF, 0xC3])
            h.pwrite(val * (pieces * PIECE // 4), p * PIECE)
            with lock:
                for q in range(p, p + pieces):
                    model[q] = val
                acks.append(time.monotonic())
            n += 1
        h.flush()
        h.shutdown()
    except Exception as e:  # noqa: BLE001
        errors.append("%s writer %d: %s" % (name, seed, e))


def check_content(r, what, data, model):
    """`data` (the whole volume) is the pattern with `model`'s pieces over it."""
    bad = []
    for p in range(SIZE // PIECE):
        got = data[p * PIECE:(p + 1) * PIECE]
        if p in model:
            want = model[p] * (PIECE // 4)
        elif p * PIECE < WRITTEN:
            want = pattern(p * PIECE, PIECE)
        else:
            want = bytes(PIECE)
        if got != want:
            bad.append(p)
    r.check(what, not bad, "%d pieces differ, first %s" % (len(bad), bad[:5]))


def read_all(b, name):
    return b.read_volume(name, SIZE)


def main(r):
    b, pool = pool_daemon("512M")
    with b:
        p = b.ctl("volume", "create", "base", "64M")
        r.check("volume create base", p.returncode == 0, p.stderr)
        b.write_volume("base", 0, WRITTEN, pattern)
        r.check_eq("bdev_lvol_snapshot base snap", 0,
                   b.rpc("bdev_lvol_snapshot", {"lvol_name": "base", "snapshot_name": "snap"})[0])
        for c in ("c1", "c2", "c3"):
            code, out = b.rpc("bdev_lvol_clone", {"snapshot_name": "snap", "clone_name": c})
            r.check("bdev_lvol_clone snap " + c, code == 0, out)
        r.check_eq("c1 is a clone of snap", (True, "snap"),
                   (lvol(b, "c1")["is_clone"], lvol(b, "c1")["parent"]))

        # c1 decoupled while two clients write to it.
        free0, cluster = free_clusters(b)
        per_cluster = cluster // PIECE
        r.check_eq("c1's export describes it as a clone", "clone of snap", description(b, "c1"))
        model, acks, lock, stop, errors = {}, [], threading.Lock(), threading.Event(), []
        ws = [threading.Thread(target=writer,
                               args=(b, "c1", s, model, acks, lock, stop, errors))
              for s in (1, 2)]
        for w in ws:
            w.start()
        time.sleep(0.2)
        t0 = time.monotonic()
        code, out = b.rpc("bdev_lvol_decouple_parent", {"name": "c1"})
        t1 = time.monotonic()
        r.check_eq("bdev_lvol_decouple_parent c1, clients writing", (0, "true"), (code, out))
        stop.set()
        for w in ws:
            w.join(60)
        r.check_eq("the clients' writes all succeeded", [], errors)
        during = sum(1 for t in acks if t0 < t < t1)
        r.check("writes were acknowledged while the decoupling ran", during > 0,
                "%d of %d" % (during, len(acks)))
        check_content(r, "c1 reads the pattern with every acknowledged write over it",
                      read_all(b, "c1"), model)
        v = lvol(b, "c1")
        r.check_eq("c1: no clone, thin, no parent", (False, True, None),
                   (v["is_clone"], v["is_thin_provisioned"], v["parent"]))
        # c1 now owns every cluster of the written half (copied, or copied on a client's
        # write) and each cluster of the other half its clients wrote: nothing else.
        free1, _ = free_clusters(b)
        want = WRITTEN // cluster + len({p // per_cluster for p in model
                                         if p * PIECE >= WRITTEN})
        r.check("the store's free space fell by c1's clusters (%d)" % want,
                want <= free0 - free1 <= want + 16, "%d clusters" % (free0 - free1))
        r.check_eq("c1's export describes it as a volume now", "volume", description(b, "c1"))
        code, out = b.rpc("bdev_lvol_decouple_parent", {"name": "c1"})
        r.check("decoupling c1 again: refused (Invalid parameters: no parent)",
                code != 0 and "Invalid parameters" in out and "no parent" in out, out)

        # c2 inflated through the CLI while a raw NVMe host writes to it.
        free2, _ = free_clusters(b)
        adm, io = nvmeraw.io_queue(b.nvmf_port(), PREFIX + "c2")
        nvme_model = {}
        done = threading.Event()

        def nvme_writer():
            n = 0
            while not done.is_set() or n < 20:
                lba = random.Random(n).randrange(0, SIZE // PIECE)
                val = bytes([0x77, n & 0xFF, (n >> 8) & 0xFF, 0x3C])
                st = io.command(nvmeraw.OP_WRITE, 1, (lba, 0, 0, 0, 0, 0), val * 1024)[0]
                if st != 0:
                    errors.append("NVMe write LBA %d: status 0x%x" % (lba, st))
                    return
                nvme_model[lba] = val
                n += 1

        t = threading.Thread(target=nvme_writer)
        t.start()
        time.sleep(0.1)
        p = b.ctl("volume", "decouple", "c2", "--inflate", timeout=120)
        done.set()
        t.join(60)
        r.check("ballast volume decouple c2 --inflate, a host writing", p.returncode == 0,
                p.stdout + p.stderr)
        r.check_eq("the host's writes all succeeded", [], errors)
        v = lvol(b, "c2")
        r.check_eq("c2: thick, no clone", (False, False),
                   (v["is_thin_provisioned"], v["is_clone"]))
        taken = free2 - free_clusters(b)[0]
        r.check("the store's free space fell by all of c2's clusters (%d)" % (SIZE // cluster),
                SIZE // cluster <= taken <= SIZE // cluster + 16, "%d clusters" % taken)
        bad = []
        for lba in range(0, SIZE // PIECE, 97):
            st, data = io.read_command(nvmeraw.sqe(nvmeraw.OP_READ, io.next_cid(), nsid=1,
                                                   sgl_len=PIECE, cdw=(lba, 0, 0, 0, 0, 0)))
            want = (nvme_model[lba] * 1024 if lba in nvme_model
                    else pattern(lba * PIECE, PIECE) if lba * PIECE < WRITTEN else bytes(PIECE))
            if st != 0 or data != want:
                bad.append(lba)
        for lba, val in list(nvme_model.items())[:200]:
            st, data = io.read_command(nvmeraw.sqe(nvmeraw.OP_READ, io.next_cid(), nsid=1,
                                                   sgl_len=PIECE, cdw=(lba, 0, 0, 0, 0, 0)))
            if st != 0 or data != val * 1024:
                bad.append(lba)
        r.check("c2 read through NVMe/TCP: the pattern and the host's writes", not bad,
                "LBAs %s" % bad[:5])
        adm.close()
        io.close()

        code, out = b.rpc("bdev_lvol_inflate", {"name": "snap"})
        r.check("inflating a snapshot: refused (read-only), naming it by its name",
                code != 0 and "Invalid parameters" in out and "read-only" in out
                and 'volume "snap"' in out, out)
        code, out = b.rpc("bdev_lvol_decouple_parent", {"name": "nosuch"})
        r.check("an unknown volume: No such device", code != 0 and "No such device" in out, out)

        # c3 inflated, the daemon killed a few milliseconds in.
        argv = [ballast_bin(), "rpc", "bdev_lvol_inflate", '{"name": "c3"}',
                "--rpc-socket", b.rpc_sock]
        free_before, _ = free_clusters(b)
        cli = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        # Killed once its copy-ups took clusters.
        deadline, started = time.monotonic() + 10, False
        while not started and time.monotonic() < deadline:
            free = free_clusters_fast(b.rpc_sock)
            started = free is not None and free != free_before
            time.sleep(0.001)
        b.proc.kill()
        b.proc.wait()
        r.check("the inflation was copying when the daemon was killed", started)
        answered = cli.wait(30) == 0
        b.start()
        v = lvol(b, "c3")
        if answered:
            # Durable when it answers: the restart keeps it.
            r.check_eq("after kill -9: c3, inflated before the kill, is thick",
                       (False, False), (v["is_thin_provisioned"], v["is_clone"]))
        else:
            r.ok("after kill -9 c3 is %s (killed before the inflation answered)" % (
                "inflated" if not v["is_thin_provisioned"] else "not yet inflated"))
        check_content(r, "after kill -9: c3 reads the pattern", read_all(b, "c3"), {})
        check_content(r, "after kill -9: c1 as before", read_all(b, "c1"), model)
        r.check_eq("inflating c3 again completes it", 0,
                   b.rpc("bdev_lvol_inflate", {"name": "c3"})[0])
        v = lvol(b, "c3")
        r.check_eq("c3: thick, no clone", (False, False), (v["is_thin_provisioned"], v["is_clone"]))
        check_content(r, "c3 reads the pattern", read_all(b, "c3"), {})
        # The snapshot deleted: the two keep their content; its origin decoupled too.
        c2_before = read_all(b, "c2")
        code, out = b.rpc("bdev_lvol_decouple_parent", {"name": "base"})
        r.check("base (the snapshot's origin, sharing with it) decoupled", code == 0, out)
        check_content(r, "base reads its pattern", read_all(b, "base"), {})
        r.check_eq("bdev_lvol_delete snap", 0, b.rpc("bdev_lvol_delete", {"name": "snap"})[0])
        check_content(r, "c1 after the snapshot went", read_all(b, "c1"), model)
        r.check("c2 after the snapshot went", read_all(b, "c2") == c2_before)
        check_content(r, "c3 after the snapshot went", read_all(b, "c3"), {})

        b.check_clean_end(r)
        check_pool_exact(r, pool)  # stopped, before the data directory goes


if __name__ == "__main__":
    guarded(main)
