#!/usr/bin/python3
"""Zeroing and trimming with FUA are durable when answered: kill -9 right after loses nothing.

A volume of a pool that commits only when asked (`--commit-interval 600`, `--commit-records
1000000`) is written and flushed. Then, in rounds, one FUA command per daemon:
- NVMe/TCP Write Zeroes with FUA and Deallocate, over written data (the volume releases it);
- NVMe/TCP Write Zeroes with FUA, no Deallocate, over a never-written range (the volume writes
  zeros there: new clusters mapped);
- NBD WRITE_ZEROES with FUA over written data, and with NO_HOLE + FUA over a never-written range;
- NBD TRIM with FUA over written data;
each followed, as the control, by an NVMe/TCP Write Zeroes with Deallocate and no FUA over other
written data — and then kill -9 at once. After the restart the FUA range must read zeros (and,
where it was never written, be allocated: block status shows no hole), while the control range
must read its old data again: the kill came before any other commit, so what the FUA command
did is there because its FUA made it durable. `ballast pool check` is exact at the end.
Run with /usr/bin/python3 (Debian's python3-libnbd).
"""
import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import nbd  # noqa: E402
import nvmeraw  # noqa: E402
from ballast_testlib import Ballast, ballast_bin, check_pool_exact, guarded  # noqa: E402

KiB, MiB = 1024, 1 << 20
NQN = "nqn.2026-11.dev.ballast:v"
OP_WRITE_ZEROES = 0x08
FUA, DEAC = 1 << 30, 1 << 25
WRITTEN = 4 * MiB  # [0, 4 MiB) written and flushed first; above it never written
CONTROL = (3 * MiB, 64 * KiB)
ARGS = ["--pool", "{data}/pool.img", "--cores", "1", "--commit-interval", "600",
        "--commit-records", "1000000"]


def nvme_zeroes(b, offset, length, flags):
    admin, io = nvmeraw.io_queue(b.nvmf_port(), NQN)
    try:
        cid = io.next_cid()
        io.send(nvmeraw.capsule(nvmeraw.sqe(
            OP_WRITE_ZEROES, cid, nsid=1,
            cdw=(offset // 4096, 0, (length // 4096 - 1) | flags, 0, 0, 0))))
        got, st, _ = io.response()
        return got == cid and st == 0
    finally:
        io.close()
        admin.close()


def nbd_call(b, fn):
    h = nbd.NBD()
    h.connect_uri(b.uri("v"))
    try:
        fn(h)
        return True
    except nbd.Error as e:
        print("nbd:", e)
        return False
    finally:
        h.shutdown()


# (what, offset, length, how, written before)
ROUNDS = [
    ("NVMe Write Zeroes, FUA + Deallocate", 0, 64 * KiB,
     lambda b, o, n: nvme_zeroes(b, o, n, FUA | DEAC), True),
    ("NVMe Write Zeroes, FUA, no Deallocate (provisions)", 5 * MiB, 128 * KiB,
     lambda b, o, n: nvme_zeroes(b, o, n, FUA), False),
    ("NBD WRITE_ZEROES, FUA", 256 * KiB, 64 * KiB,
     lambda b, o, n: nbd_call(b, lambda h: h.zero(n, o, nbd.CMD_FLAG_FUA)), True),
    ("NBD WRITE_ZEROES, NO_HOLE + FUA (provisions)", 6 * MiB + 4096, 100 * KiB,
     lambda b, o, n: nbd_call(
         b, lambda h: h.zero(n, o, nbd.CMD_FLAG_FUA | nbd.CMD_FLAG_NO_HOLE)), False),
    ("NBD TRIM, FUA", 512 * KiB, 64 * KiB,
     lambda b, o, n: nbd_call(b, lambda h: h.trim(n, o, nbd.CMD_FLAG_FUA)), True),
]


def holes_in(h, off, n):
    found = []

    def cb(meta, start, ents, err):
        pos = start
        for length, state in zip(ents[::2], ents[1::2]):
            if state & 1 and pos < off + n and pos + length > off:
                found.append((pos, length))
            pos += length
        return 0
    h.block_status(n, off, cb)
    return found


def main(r):
    b = Ballast(ARGS)
    pool = os.path.join(b.data_dir, "pool.img")
    subprocess.run([ballast_bin(), "pool", "create", pool, "--size", "256M"], check=True,
                   capture_output=True)
    pattern = bytes((i * 7 + 1) & 0xFF or 1 for i in range(WRITTEN))
    with b:
        r.check("volume v created", b.ctl("volume", "create", "v", "16M").returncode == 0)
        r.check("written and flushed", nbd_call(b, lambda h: (h.pwrite(pattern, 0), h.flush())))
        for what, off, n, how, written in ROUNDS:
            r.check("%s answered" % what, how(b, off, n))
            co, cn = CONTROL
            r.check("%s: then the control, without FUA, answered" % what,
                    nvme_zeroes(b, co, cn, DEAC))
            b.proc.kill()
            b.proc.wait()
            b.start()
            h = nbd.NBD()
            h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
            h.connect_uri(b.uri("v"))
            try:
                r.check("after kill -9: %s reads zeros" % what, h.pread(n, off) == bytes(n))
                if not written:
                    holes = holes_in(h, off, n)
                    r.check("after kill -9: %s left its range allocated (holes %s)"
                            % (what, holes), not holes)
                r.check("after kill -9: the control lost its zeroing (old data back: the kill "
                        "came before any other commit)", h.pread(cn, co) == pattern[co:co + cn])
            finally:
                h.shutdown()
        h = nbd.NBD()
        h.connect_uri(b.uri("v"))
        back = h.pread(WRITTEN, 0)
        h.shutdown()
        want = bytearray(pattern)
        for _, off, n, _, written in ROUNDS:
            if written:
                want[off:off + n] = bytes(n)
        r.check("and everything else holds its data", back == want)
        b.check_clean_end(r)
        check_pool_exact(r, pool)


if __name__ == "__main__":
    guarded(main)
