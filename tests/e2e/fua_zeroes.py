#!/usr/bin/python3
"""Zeroing and trimming with FUA are durable when answered: kill -9 right after loses nothing.

A volume of a pool (commits only when asked: `--commit-interval 600`, `--commit-records
1000000`) is written and flushed, then zeroed and trimmed in four ranges, each command answered
before the next:
- NVMe/TCP Write Zeroes with FUA (raw host), once with Deallocate and once without;
- NBD (libnbd) WRITE_ZEROES and TRIM with NBD_CMD_FLAG_FUA;
- then, as the control, an NVMe/TCP Write Zeroes with Deallocate (a volume releases the
  pieces: records that wait for a commit) without FUA, and nothing after it.
The daemon is killed (SIGKILL) at once and started again on the same pool: the four FUA ranges
must read zeros. The control range must read its old data again — an unflushed zeroing is lost
by a kill — which shows the kill came before any background commit, so the FUA ranges are zeros
because FUA made them durable. `ballast pool check` is exact afterwards.
Run with /usr/bin/python3 (Debian's python3-libnbd).
"""
import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import nbd  # noqa: E402
import nvmeraw  # noqa: E402
from ballast_testlib import Ballast, ballast_bin, guarded  # noqa: E402

KiB = 1024
NQN = "nqn.2026-11.dev.ballast:v"
OP_WRITE_ZEROES = 0x08
FUA, DEAC = 1 << 30, 1 << 25
# (what, offset, length) in bytes; 4 KiB LBAs; the last one is the control (no FUA).
RANGES = [("NVMe Write Zeroes, FUA", 0, 64 * KiB),
          ("NVMe Write Zeroes, FUA + Deallocate", 128 * KiB, 64 * KiB),
          ("NBD WRITE_ZEROES, FUA", 256 * KiB, 64 * KiB),
          ("NBD TRIM, FUA", 384 * KiB, 64 * KiB),
          ("control: NVMe Write Zeroes + Deallocate without FUA", 512 * KiB, 64 * KiB)]
SPAN = 640 * KiB
ARGS = ["--pool", "{data}/pool.img", "--cores", "1", "--commit-interval", "600",
        "--commit-records", "1000000"]


def write_zeroes(io, offset, length, flags):
    cid = io.next_cid()
    io.s.sendall(nvmeraw.capsule(nvmeraw.sqe(
        OP_WRITE_ZEROES, cid, nsid=1,
        cdw=(offset // 4096, 0, (length // 4096 - 1) | flags, 0, 0, 0))))
    got, st, _ = io.response()
    return got == cid and st == 0


def main(r):
    b = Ballast(ARGS)
    pool = os.path.join(b.data_dir, "pool.img")
    subprocess.run([ballast_bin(), "pool", "create", pool, "--size", "256M"], check=True,
                   capture_output=True)
    pattern = bytes((i * 7 + 1) & 0xFF or 1 for i in range(SPAN))
    with b:
        r.check("volume v created", b.ctl("volume", "create", "v", "16M").returncode == 0)
        h = nbd.NBD()
        h.connect_uri(b.uri("v"))
        h.pwrite(pattern, 0)
        h.flush()
        admin, io = nvmeraw.io_queue(b.nvmf_port(), NQN)
        r.check(RANGES[0][0] + " answered", write_zeroes(io, RANGES[0][1], RANGES[0][2], FUA))
        r.check(RANGES[1][0] + " answered",
                write_zeroes(io, RANGES[1][1], RANGES[1][2], FUA | DEAC))
        h.zero(RANGES[2][2], RANGES[2][1], nbd.CMD_FLAG_FUA)
        r.ok(RANGES[2][0] + " answered")
        h.trim(RANGES[3][2], RANGES[3][1], nbd.CMD_FLAG_FUA)
        r.ok(RANGES[3][0] + " answered")
        r.check(RANGES[4][0] + " answered",
                write_zeroes(io, RANGES[4][1], RANGES[4][2], DEAC))
        b.proc.kill()
        b.proc.wait()
        io.close()
        admin.close()
        try:
            h.shutdown()
        except nbd.Error:
            pass
        b.start()
        h = nbd.NBD()
        h.connect_uri(b.uri("v"))
        back = h.pread(SPAN, 0)
        h.shutdown()
        for what, off, n in RANGES[:4]:
            r.check("after kill -9: %s reads zeros" % what, back[off:off + n] == bytes(n))
        what, off, n = RANGES[4]
        r.check("after kill -9: the %s lost its zeroing (old data back: the kill came before "
                "any commit)" % what, back[off:off + n] == pattern[off:off + n])
        untouched = [(64 * KiB, 128 * KiB), (192 * KiB, 256 * KiB), (576 * KiB, SPAN)]
        r.check("after kill -9: the ranges between them hold their data",
                all(back[a:z] == pattern[a:z] for a, z in untouched))
        b.check_clean_end(r)
        chk = subprocess.run([ballast_bin(), "pool", "check", pool], capture_output=True,
                             text=True)
        r.check("pool check is exact afterwards", chk.returncode == 0, chk.stdout[-400:])


if __name__ == "__main__":
    guarded(main)
