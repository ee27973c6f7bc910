#!/usr/bin/python3
"""A write the media cannot take whole says "no space", and the daemon and its data live on.

The daemon's file size limit (RLIMIT_FSIZE, set on the running process with prlimit: what
`ulimit -f` or a unit's LimitFSIZE= sets) stands for a filesystem filling up: the kernel moves
what fits of a write that crosses it — a short write — and refuses the rest with EFBIG, as a
full filesystem moves what fits and refuses the rest with ENOSPC. Two file exports, one on a
disk filesystem (its writes go through the ring) and one on tmpfs (its writes are copies the
core makes), each checked with clients we did not write:
- qemu-io's write across the limit fails with "No space left on device" (NBD_ENOSPC), which
  is what qemu's default `werror=enospc` needs to pause a guest instead of failing its I/O
  (before, the short write was reported as EIO); a write wholly past the limit, too;
- libnbd sees errno ENOSPC for both, and writes below the limit, flushed, read back whole;
- over NVMe/TCP, an in-capsule write across the limit gets Capacity Exceeded (generic status
  0x81, which Linux's host turns into ENOSPC), not a generic error;
- the daemon is still running and serving afterwards: the tmpfs write runs on the core's own
  thread, where the kernel's SIGXFSZ would have ended the process (the daemon ignores it).
Part 2, a pool whose filesystem fills up (a 48 MiB tmpfs mounted for the test, a 256 MiB
sparse pool file on it; a 10 GiB one, whose metadata would not fit, is refused at creation): a
volume is written 1 MiB at a time, each write flushed, until a
write fails with ENOSPC. Then a flush still succeeds — the pool's metadata blocks (superblock,
checkpoints, journal) were reserved when it opened, so a full filesystem fails data writes,
never a commit (before, the journal's next block could not be had and every flush failed
from then on). kill -9 and restart: every write that was flushed reads back, `pool check` is
exact; the volume deleted, a new one is written into the clusters it gave back.
Run with /usr/bin/python3 (Debian's python3-libnbd).
"""
import errno
import os
import resource
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import nbd  # noqa: E402
import nvmeraw  # noqa: E402
from ballast_testlib import (Ballast, ballast_bin, check_pool_exact, disk_scratch,  # noqa: E402
                             guarded)

KiB, MiB = 1024, 1 << 20
LIMIT = 8 * MiB
NQN = "nqn.2026-12.dev.ballast:nospace"


def qemu_io(uri, cmd):
    p = subprocess.run(["qemu-io", "-f", "raw", "-c", cmd, uri], capture_output=True, text=True,
                       timeout=60)
    return p.returncode, (p.stdout + p.stderr).strip()


def nbd_write(uri, data, offset):
    """0, or the errno libnbd reports for a write of `data` at `offset`."""
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        h.pwrite(data, offset)
        h.flush()
        return 0
    except nbd.Error as e:
        return e.errnum
    finally:
        h.shutdown()


def check_export(r, b, name):
    uri = b.uri(name)
    rc, out = qemu_io(uri, "write -P 0x5c %d 64k" % (LIMIT - 16 * KiB))
    r.check("%s: qemu-io's write across the limit fails with ENOSPC, not EIO" % name,
            "No space left on device" in out and "Input/output error" not in out, out)
    rc, out = qemu_io(uri, "write -P 0x5d %d 4k" % (LIMIT + 64 * KiB))
    r.check("%s: qemu-io's write wholly past the limit says no space" % name,
            "No space left on device" in out, out)
    err = nbd_write(uri, b"\xa5" * 128 * KiB, LIMIT - 64 * KiB)
    r.check("%s: libnbd's write across the limit fails with ENOSPC" % name,
            err == errno.ENOSPC, "errno %s" % errno.errorcode.get(err, err))

    # Writes below the limit are whole and durable.
    below = bytes((i * 7 + 3) & 0xFF for i in range(256 * KiB))
    err = nbd_write(uri, below, LIMIT - 512 * KiB)
    r.check("%s: a write below the limit succeeds" % name, err == 0, "errno %s" % err)
    rc, out = qemu_io(uri, "write -P 0x3e 1m 64k")
    r.check("%s: qemu-io's write below the limit succeeds" % name, rc == 0 and "wrote" in out,
            out)
    h = nbd.NBD()
    h.connect_uri(uri)
    got = h.pread(len(below), LIMIT - 512 * KiB)
    pattern = h.pread(64 * KiB, MiB)
    h.shutdown()
    r.check("%s: it reads back" % name, got == below and pattern == b"\x3e" * 64 * KiB)


def nvme_write_across(r, b, nqn):
    admin, io = nvmeraw.io_queue(b.nvmf_port(), nqn)
    try:
        slba = LIMIT // 4096 - 1  # 8 KiB: its first block fits, its second does not
        cid = io.next_cid()
        io.s.sendall(nvmeraw.capsule(
            nvmeraw.sqe(nvmeraw.OP_WRITE, cid, nsid=1, sgl_len=8192,
                        sgl_type=nvmeraw.SGL_INCAPSULE, cdw=(slba, 0, 1, 0, 0, 0)),
            b"\x77" * 8192))
        got, st, _ = io.response()
        r.check("NVMe/TCP: a write across the limit gets Capacity Exceeded (0x81)",
                got == cid and st == 0x81, "cid %d status 0x%x" % (got, st))
        cid = io.next_cid()
        io.s.sendall(nvmeraw.capsule(
            nvmeraw.sqe(nvmeraw.OP_WRITE, cid, nsid=1, sgl_len=4096,
                        sgl_type=nvmeraw.SGL_INCAPSULE, cdw=(slba - 1, 0, 0, 0, 0, 0)),
            b"\x78" * 4096))
        got, st, _ = io.response()
        r.check("NVMe/TCP: a write below it succeeds", got == cid and st == 0,
                "cid %d status 0x%x" % (got, st))
    finally:
        io.close()
        admin.close()


def fill_pool(r, mnt):
    # A pool whose metadata (about 70 MiB for 10 GiB: checkpoint halves and journal) cannot
    # have its blocks on the 48 MiB filesystem is refused at creation, and leaves no file.
    big = os.path.join(mnt, "big.img")
    p = subprocess.run([ballast_bin(), "pool", "create", big, "--size", "10G"],
                       capture_output=True, text=True)
    r.check("pool create refuses a pool whose filesystem cannot hold its metadata",
            p.returncode != 0 and "no room for the pool's metadata" in p.stderr, p.stderr)
    r.check("... and leaves no file behind", not os.path.exists(big))
    pool = os.path.join(mnt, "pool.img")
    subprocess.run([ballast_bin(), "pool", "create", pool, "--size", "256M"], check=True,
                   capture_output=True)
    b = Ballast(["--cores", "1", "--pool", pool, "--commit-interval", "600",
                 "--commit-records", "1000000"])
    with b:
        r.check("volume v created", b.ctl("volume", "create", "v", "128M").returncode == 0)
        h = nbd.NBD()
        h.connect_uri(b.uri("v"))
        flushed, err = [], 0
        for i in range(128):
            chunk = bytes([i + 1]) * MiB
            try:
                h.pwrite(chunk, i * MiB)
            except nbd.Error as e:
                err = e.errnum
                break
            h.flush()
            flushed.append(i)
        r.check("writes into the pool fail with ENOSPC once its filesystem is full "
                "(%d MiB flushed first)" % len(flushed),
                err == errno.ENOSPC and 8 <= len(flushed) < 48,
                "errno %s" % errno.errorcode.get(err, err))
        try:
            h.flush()
            flush_ok = True
        except nbd.Error as e:
            flush_ok = False
            print("flush:", e)
        r.check("a flush after it still succeeds (the commit has its blocks)", flush_ok)
        try:
            h.shutdown()
        except nbd.Error:
            pass
        b.proc.kill()
        b.proc.wait()

        b.start()
        h = nbd.NBD()
        h.connect_uri(b.uri("v"))
        bad = [i for i in flushed if h.pread(MiB, i * MiB) != bytes([i + 1]) * MiB]
        h.shutdown()
        r.check("after kill -9 and a restart, every flushed write reads back", not bad,
                "MiB %s differ" % bad[:8])
        r.check("volume v deleted", b.ctl("volume", "delete", "v").returncode == 0)
        r.check("volume w created", b.ctl("volume", "create", "w", "128M").returncode == 0)
        err = nbd_write(b.uri("w"), b"\x42" * 4 * MiB, 0)
        r.check("the clusters v gave back take new writes", err == 0, "errno %s" % err)
        b.check_clean_end(r)
    check_pool_exact(r, pool)


def pool_on_a_full_filesystem(r):
    mnt = tempfile.mkdtemp(prefix="ballast-fullfs.")
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m,mode=0700", "tmpfs", mnt],
                       capture_output=True, text=True)
    if p.returncode != 0:
        r.bad("a 48 MiB tmpfs mounted for the full-filesystem part", p.stderr.strip())
        os.rmdir(mnt)
        return
    try:
        fill_pool(r, mnt)
    finally:
        subprocess.run(["umount", mnt], check=False)
        os.rmdir(mnt)


def main(r):
    if not shutil.which("qemu-io"):
        r.bad("qemu-io installed (qemu-utils)")
        return
    scratch = disk_scratch(r, "ballast-nospace")
    if scratch is None:
        return
    shm = "/dev/shm/ballast-nospace-%d" % os.getpid()
    os.makedirs(shm, exist_ok=True)
    try:
        args = ["--cores", "1", "--export", "disk=file:%s/disk.img:64M" % scratch,
                "--export", "mem=file:%s/mem.img:64M" % shm]
        with Ballast(args) as b:
            nqn = b.nvmf_export(NQN, "disk")
            # The soft limit (the one the kernel applies); the hard one stays, so it can be
            # lifted again without privileges.
            _, hard = resource.prlimit(b.proc.pid, resource.RLIMIT_FSIZE)
            resource.prlimit(b.proc.pid, resource.RLIMIT_FSIZE, (LIMIT, hard))
            check_export(r, b, "disk")
            r.check("the ring's short writes were submitted again for their rest "
                    "(short_transfers %d)" % b.counter("short_transfers"),
                    b.counter("short_transfers") >= 1)
            check_export(r, b, "mem")
            nvme_write_across(r, b, nqn)
            resource.prlimit(b.proc.pid, resource.RLIMIT_FSIZE, (hard, hard))
            err = nbd_write(b.uri("mem"), b"\x01" * 64 * KiB, 32 * MiB)
            r.check("with the limit lifted, a write past it succeeds", err == 0,
                    "errno %s" % err)
            b.check_clean_end(r)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)
    pool_on_a_full_filesystem(r)


if __name__ == "__main__":
    guarded(main)
