#!/usr/bin/python3
"""A block device served as a file export (`--file /dev/loopN`): trims and zeroing in whole
logical blocks, as the kernel's fallocate on a block device takes them.

For loop devices with 512- and 4096-byte logical blocks (each over a sparse file), through
libnbd:
- the export advertises the logical block as its minimum block size;
- a trim of any range succeeds and zeroes exactly the whole logical blocks inside it (the rest
  keeps its data); an empty one succeeds;
- write-zeroes of whole logical blocks reads zeros — with NO_HOLE, FUA, or neither — and one
  that is not whole blocks fails with EINVAL, changing nothing; FAST_ZERO fails with ENOTSUP
  (the kernel may write the zeros itself), changing nothing;
- unaligned reads and writes still work (through the buffered descriptor);
- the data survives a reconnect; the daemon never panics;
- over NVMe/TCP, Identify Namespace's DLFEAT does not promise that deallocated blocks read
  zero (a block device's discard is advisory), while a RAM export's does.
Needs root and loop devices; where `losetup` cannot make one, says so and checks nothing else.
Run with /usr/bin/python3 (Debian's python3-libnbd).
"""
import errno
import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import nbd  # noqa: E402
import nvmeraw  # noqa: E402
from ballast_testlib import Ballast, guarded  # noqa: E402

MiB = 1 << 20
SIZE = 16 * MiB


def losetup(path, sector):
    p = subprocess.run(["losetup", "--show", "-f", "-b", str(sector), path],
                       capture_output=True, text=True)
    return p.stdout.strip() if p.returncode == 0 else None


def expect_errno(r, what, fn, want):
    try:
        fn()
        r.bad(what, "succeeded")
    except nbd.Error as e:
        r.check(what, e.errnum == want, "errno %s" % e.errno)


def check_device(r, b, name, dev, lbs):
    r.check("%s: export added" % name,
            b.ctl("export", "add", name, "--file", dev).returncode == 0)
    h = nbd.NBD()
    h.connect_uri(b.uri(name))
    h.set_strict_mode(0)
    try:
        r.check_eq("%s: minimum block size advertised" % name, lbs,
                   h.get_block_size(nbd.SIZE_MINIMUM))
        model = bytearray(os.urandom(2 * MiB))
        h.pwrite(bytes(model), 0)
        # Unaligned writes and reads still work.
        h.pwrite(b"\x11" * 777, 5 * lbs + 3)
        model[5 * lbs + 3:5 * lbs + 780] = b"\x11" * 777
        r.check("%s: unaligned write reads back" % name,
                h.pread(1000, 5 * lbs) == model[5 * lbs:5 * lbs + 1000])

        # Trims: any range; exactly the whole logical blocks inside are zeroed.
        for off, n in ((lbs // 2, 3 * lbs), (64 * 1024 + 7, 100), (128 * 1024, 8 * lbs),
                       (300 * 1024 + 1, 0)):
            try:
                h.trim(n, off)
                lo, hi = -(-off // lbs) * lbs, (off + n) // lbs * lbs
                if hi > lo:
                    model[lo:hi] = bytes(hi - lo)
                r.ok("%s: trim %d+%d succeeds" % (name, off, n))
            except nbd.Error as e:
                r.bad("%s: trim %d+%d succeeds" % (name, off, n), str(e))
        r.check("%s: trims zeroed exactly the whole logical blocks inside them" % name,
                h.pread(len(model), 0) == model)

        # Write zeroes: whole logical blocks, with any flags.
        for off, n, flags in ((512 * 1024, 4 * lbs, 0),
                              (600 * 1024, 64 * 1024, nbd.CMD_FLAG_NO_HOLE),
                              (700 * 1024, 2 * lbs, nbd.CMD_FLAG_FUA)):
            try:
                h.zero(n, off, flags)
                model[off:off + n] = bytes(n)
                r.ok("%s: write zeroes %d+%d (flags %d) succeeds" % (name, off, n, flags))
            except nbd.Error as e:
                r.bad("%s: write zeroes %d+%d succeeds" % (name, off, n), str(e))
        expect_errno(r, "%s: write zeroes of part of a logical block fails with EINVAL" % name,
                     lambda: h.zero(lbs // 2, 800 * 1024 + 16), errno.EINVAL)
        # The kernel may write the zeros itself: FAST_ZERO is refused at once, nothing changed.
        expect_errno(r, "%s: FAST_ZERO write zeroes fails with ENOTSUP" % name,
                     lambda: h.zero(4 * lbs, 900 * 1024, nbd.CMD_FLAG_FAST_ZERO), errno.ENOTSUP)
        r.check("%s: every byte is what the model says" % name, h.pread(len(model), 0) == model)
    finally:
        h.shutdown()
    h = nbd.NBD()
    h.connect_uri(b.uri(name))
    r.check("%s: and so after reconnecting" % name, h.pread(len(model), 0) == model)
    h.shutdown()


def dlfeat(r, b, export, want):
    """Identify Namespace byte 33 (DLFEAT) of `export` in a subsystem of its own."""
    nqn = b.nvmf_export("dlfeat-" + export, export)
    admin = nvmeraw.admin_queue(b.nvmf_port(), nqn)
    try:
        status, ns = admin.admin_read(nvmeraw.OP_IDENTIFY, (0, 0, 0, 0, 0, 0), 4096, nsid=1)
        r.check("%s: DLFEAT 0x%02x over NVMe/TCP (%s)" % (
            export, want, "deallocated blocks read zero" if want & 7 else "no promise"),
            status == 0 and ns[33] == want, "status 0x%x, DLFEAT 0x%02x" % (status, ns[33]))
    finally:
        admin.close()


def main(r):
    with Ballast(["--cores", "1", "--export", "mem=ram:16M"]) as b:
        loops = []
        try:
            for lbs in (512, 4096):
                backing = os.path.join(b.tmp, "loop%d.img" % lbs)
                with open(backing, "wb") as f:
                    f.truncate(SIZE)
                dev = losetup(backing, lbs)
                if dev is None:
                    print("SKIP: losetup could not make a loop device (not root, or no loop "
                          "support): nothing checked")
                    return
                loops.append(dev)
                check_device(r, b, "bd%d" % lbs, dev, lbs)
                dlfeat(r, b, "bd%d" % lbs, 0x08)
            dlfeat(r, b, "mem", 0x09)
            b.check_clean_end(r)
        finally:
            b.stop()
            for dev in loops:
                subprocess.run(["losetup", "-d", dev], capture_output=True)


if __name__ == "__main__":
    guarded(main)
