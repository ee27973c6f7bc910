#!/usr/bin/python3
"""`ballast-perf --nbd` against NBD servers we did not write (nbdkit's memory plugin, qemu-nbd on
a file) and against ballast: the benchmark's NBD client must take what each sends.

For each server: a counted sequential write of 4 MiB (1024 x 4 KiB, 16 in flight) whose every
block is then read back through libnbd and compared with the pattern ballast-perf writes
(byte i of each block: i * 31 ^ queue id); then a polled random read/write run over two
connections at depth 32, which must complete reads and writes with no error. A client that
mis-framed replies, lost a handle or sent a request twice fails here.
Run with /usr/bin/python3 (Debian's python3-libnbd).
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import nbd  # noqa: E402
from ballast_testlib import REPO_ROOT, Ballast, free_port, guarded, port_open, wait_for  # noqa: E402

PERF = os.environ.get("BALLAST_PERF_BIN") or os.path.join(
    REPO_ROOT, "build", "cargo", "release", "ballast-perf")
MiB = 1 << 20
BS = 4096
SPAN = 4 * MiB
PATTERN = bytes(((i * 31) & 0xFF) ^ 1 for i in range(BS))


def perf(args, timeout=60):
    p = subprocess.run([PERF, "--json"] + args, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError("ballast-perf %s: %s" % (" ".join(args), p.stderr.strip()))
    return json.loads(p.stdout)["jobs"][0]


def exercise(r, name, port, export):
    addr = ["--nbd", export, "--addr", "127.0.0.1:%d" % port]
    job = r.run("%s: counted sequential write of 4 MiB" % name, perf,
                addr + ["--rw", "write", "--bs", "4k", "--qd", "16", "--size", "4M",
                        "--number-ios", "1024", "--runtime", "30"])
    if job:
        r.check_eq("%s: every write completed" % name, 1024, job["write"]["total_ios"])
    h = nbd.NBD()
    h.connect_uri("nbd://127.0.0.1:%d/%s" % (port, export))
    data = h.pread(SPAN, 0)
    h.shutdown()
    bad = [off for off in range(0, SPAN, BS) if data[off:off + BS] != PATTERN]
    r.check("%s: libnbd reads the pattern back in all 1024 blocks" % name, not bad,
            "%d blocks differ, first at %s" % (len(bad), bad[:1]))
    job = r.run("%s: polled random read/write, QD32, two connections" % name, perf,
                addr + ["--rw", "randrw", "--bs", "4k", "--qd", "32", "--queues", "2",
                        "--size", "4M", "--runtime", "1", "--poll"])
    if job:
        r.check("%s: reads and writes completed (%d / %d)" % (
            name, job["read"]["total_ios"], job["write"]["total_ios"]),
            job["read"]["total_ios"] > 100 and job["write"]["total_ios"] > 100)


def exercise_peer(r, name, argv, export):
    """Starts the peer server `argv` (its listening port given as `-p PORT` first), exercises
    it and stops it; a peer not installed is a failure."""
    if not shutil.which(argv[0]):
        r.bad("%s missing" % argv[0])
        return
    port = free_port()
    cmd = argv[:1] + ["-p", str(port)] + argv[1:]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        if not wait_for(lambda: port_open(port, 0.2) or p.poll() is not None, 10):
            raise RuntimeError("%s did not listen" % argv[0])
        if p.poll() is not None:
            raise RuntimeError("%s exited: %s" % (argv[0], p.stderr.read().decode()[-500:]))
        exercise(r, name, port, export)
    finally:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def main(r):
    if not os.access(PERF, os.X_OK):
        r.bad("ballast-perf missing", PERF)
        return
    tmp = tempfile.mkdtemp(prefix="perf-nbd.")
    try:
        exercise_peer(r, "nbdkit memory",
                      ["nbdkit", "-f", "-i", "127.0.0.1", "memory", "16M"], "")
        img = os.path.join(tmp, "disk.raw")
        with open(img, "wb") as f:
            f.truncate(16 * MiB)
        exercise_peer(r, "qemu-nbd",
                      ["qemu-nbd", "-f", "raw", "-b", "127.0.0.1", "-x", "q", "-e", "4", "-t", img],
                      "q")
        with Ballast(["--export", "mem=ram:16M", "--cores", "1"]) as b:
            port = b.port
            exercise(r, "ballast", port, "mem")
            # The named export must exist: a clear refusal, not a hang.
            err = None
            try:
                perf(["--nbd", "nope", "--addr", "127.0.0.1:%d" % port, "--runtime", "1"])
            except RuntimeError as e:
                err = str(e)
            r.check("ballast: an unknown export is refused by name", err and '"nope"' in err,
                    err)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


guarded(main)
