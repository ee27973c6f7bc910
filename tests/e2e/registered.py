#!/usr/bin/python3
"""Registered files and buffers (--registered-files, --registered-buffers) through the daemon.

Two file exports on a disk filesystem, one core, a table of one file and two buffers: libnbd
writes and reads 4 KiB to 1 MiB (and an odd 12 KiB) on both and gets its bytes back; `ballast
stats --json` shows one file registered (the table is full: the other export goes as a
descriptor), at most two buffers, and fixed operations counted; the kernel's own view (the
core's io_uring in /proc/PID/fdinfo) lists exactly that export's file, and once that export is
removed (and its NVMe subsystem deleted) the file leaves the ring within a second (its slot is
cleared: the file is closed), not before. With
--registered-files 0 --registered-buffers 0 the same I/O works and nothing is registered.
"""

import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import nbd  # noqa: E402  (Debian's python3-libnbd)
from ballast_testlib import Ballast, disk_scratch, guarded  # noqa: E402

SIZES = [4096, 12288, 65536, 131072, 1 << 20]


def ring_files(pid):
    """The base names of the files every io_uring of process `pid` holds registered (the
    kernel's fdinfo `UserFiles:` list: full paths on recent kernels, bare names on older ones,
    which also list empty slots as `<none>` and may list nothing while the ring is busy)."""
    files = []
    fd_dir = "/proc/%d/fd" % pid
    for fd in os.listdir(fd_dir):
        try:
            if os.readlink(os.path.join(fd_dir, fd)) != "anon_inode:[io_uring]":
                continue
            with open("/proc/%d/fdinfo/%s" % (pid, fd)) as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        inside = False
        for ln in lines:
            if ln.startswith("UserFiles:"):
                inside = True
            elif inside and ln.startswith(" ") and ":" in ln:
                name = ln.split(":", 1)[1].strip()
                if name and name != "<none>":
                    files.append(os.path.basename(name))
            elif inside:
                inside = False
    return files


def stats(b):
    out = b.ctl("stats", "--json")
    return json.loads(out.stdout)["reactors"] if out.returncode == 0 else []


def total(reactors, key):
    return sum(r.get(key, 0) for r in reactors)


def exercise(r, b, label, names):
    """Writes and reads back every size on every export; True if all bytes came back."""
    ok = True
    for i, name in enumerate(names):
        h = nbd.NBD()
        h.connect_uri(b.uri(name))
        for j, size in enumerate(SIZES):
            data = os.urandom(size)
            off = (j * 2 + i) << 20
            h.pwrite(data, off)
            ok &= h.pread(size, off) == data
        h.flush()
        h.shutdown()
    r.check("%s: every write reads back on both exports" % label, ok)
    return ok


def main(r):
    scratch = None
    try:
        scratch = disk_scratch(r, "ballast-registered")
        if scratch is None:
            return
        paths = [os.path.join(scratch, n) for n in ("a", "b")]
        for p in paths:
            with open(p, "wb") as f:
                f.truncate(32 << 20)
        exports = ["--export", "a=file:%s" % paths[0], "--export", "b=file:%s" % paths[1]]

        with Ballast(["--cores", "1", "--registered-files", "1", "--registered-buffers", "2"]
                     + exports) as b:
            exercise(r, b, "tables of one file and two buffers", ["a", "b"])
            s = stats(b)
            r.check("stats: one core", len(s) == 1, str(s)[:200])
            r.check_eq("stats: one file registered (the table of one is full)", 1,
                       total(s, "files_registered"))
            r.check("stats: at most two buffers registered", total(s, "bufs_registered") <= 2,
                    str(total(s, "bufs_registered")))
            r.check("stats: operations named the registered file",
                    total(s, "fixed_file_ops") >= len(SIZES), str(total(s, "fixed_file_ops")))
            r.check("stats: reads and writes went on registered buffers",
                    total(s, "fixed_buf_ops") >= 2, str(total(s, "fixed_buf_ops")))
            r.check_eq("stats: no registration refused", 0, total(s, "registration_failures"))
            names = [os.path.basename(p) for p in paths]
            held = []
            for _ in range(100):  # an older kernel lists nothing while the ring is busy
                held = ring_files(b.proc.pid)
                if held:
                    break
                time.sleep(0.01)
            r.check("the core's io_uring holds exactly one export's file",
                    len(held) == 1 and held[0] in names, str(held))
            if len(held) == 1 and held[0] in names:
                name = "ab"[names.index(held[0])]
                # The device lives while anything serves it: the export, and the NVMe
                # subsystem every startup export also is.
                rm = b.ctl("nvmf", "delete", "nqn.2026-11.dev.ballast:%s" % name)
                r.check("nvmf delete of %s's subsystem" % name, rm.returncode == 0, rm.stderr)
                time.sleep(0.2)
                r.check("the file stays registered while the export serves it",
                        ring_files(b.proc.pid) == held, str(ring_files(b.proc.pid)))
                rm = b.ctl("export", "remove", name)
                r.check("export remove %s" % name, rm.returncode == 0, rm.stderr)
                deadline = time.monotonic() + 1.0
                while ring_files(b.proc.pid) and time.monotonic() < deadline:
                    time.sleep(0.01)
                r.check("the removed export's file left the ring within a second",
                        ring_files(b.proc.pid) == [], str(ring_files(b.proc.pid)))
                r.check_eq("stats: no file registered after the removal", 0,
                           total(stats(b), "files_registered"))
                other = "ba"[names.index(held[0])]
                exercise(r, b, "after the removal, the other export", [other])
                s = stats(b)
                r.check_eq("stats: the freed slot went to the other export", 1,
                           total(s, "files_registered"))
            r.check("no panic", not b.panics(), "\n".join(b.panics()))

        with Ballast(["--cores", "1", "--registered-files", "0", "--registered-buffers", "0"]
                     + exports) as b:
            exercise(r, b, "registration off", ["a", "b"])
            s = stats(b)
            r.check("registration off: no fixed operation",
                    total(s, "fixed_file_ops") == 0 and total(s, "fixed_buf_ops") == 0,
                    "%d %d" % (total(s, "fixed_file_ops"), total(s, "fixed_buf_ops")))
            r.check_eq("registration off: the ring holds no file", [], ring_files(b.proc.pid))

        with Ballast(exports) as b:
            exercise(r, b, "defaults", ["a", "b"])
            s = stats(b)
            r.check("defaults: both exports' files registered where they were used",
                    total(s, "files_registered") >= 2, str(total(s, "files_registered")))
            r.check("defaults: every read and write of 1 MiB or less on a registered buffer "
                    "(at least one per request)",
                    total(s, "fixed_buf_ops") >= 2 * len(SIZES),
                    str(total(s, "fixed_buf_ops")))
    finally:
        if scratch:
            subprocess.run(["rm", "-rf", scratch])


if __name__ == "__main__":
    guarded(main)
