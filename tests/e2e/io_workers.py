#!/usr/bin/python3
"""The kernel's worker threads per core (--io-workers): a limit that holds under load.

A write the kernel cannot finish without blocking — a direct write into a sparse file's
unwritten blocks, a buffered write waiting for its file's lock — leaves the core's io_uring
for one of the kernel's io-wq worker threads, which the kernel makes for the daemon as
needed (up to four per CPU for files). libnbd keeps 64 writes of 64 KiB in flight on one
connection to a sparse file export on a disk filesystem, one core, while this test counts the
daemon's `iou-wrk` threads every few milliseconds:
- `--io-workers 0` (the kernel's defaults) shows how many the load makes here: when it makes
  no more than two (a filesystem that never blocks these writes), the limit cannot be pushed
  against on this machine and the test says so;
- `--io-workers 2`: never more than two, and every write reads back after a flush;
- the default (8): never more than eight.
"""

import os
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import nbd  # noqa: E402  (Debian's python3-libnbd)
from ballast_testlib import Ballast, disk_scratch, guarded  # noqa: E402

DEPTH = 64
CHUNK = 64 << 10
SIZE = 256 << 20


def workers(pid):
    """The process's io-wq worker threads now."""
    n = 0
    for tid in os.listdir("/proc/%d/task" % pid):
        try:
            with open("/proc/%d/task/%s/comm" % (pid, tid)) as f:
                n += f.read().startswith("iou-wrk")
        except OSError:
            pass
    return n


def fresh(path):
    """A new sparse file for the next daemon: every write into it allocates."""
    if os.path.exists(path):
        os.unlink(path)
    with open(path, "wb") as f:
        f.truncate(SIZE)
    return path


def load(b):
    """Fills the export's sparse file with DEPTH writes in flight, counting the daemon's
    workers meanwhile; returns (most workers seen, every chunk read back)."""
    most = [0]
    done = threading.Event()

    def watch():
        while not done.is_set():
            most[0] = max(most[0], workers(b.proc.pid))
            time.sleep(0.002)

    w = threading.Thread(target=watch)
    w.start()
    h = nbd.NBD()
    h.connect_uri(b.uri("f"))
    chunks = SIZE // CHUNK
    data = [os.urandom(CHUNK) for _ in range(8)]
    nxt = 0
    errors = []

    def retire(error):
        errno = getattr(error, "value", error)  # a ctypes.c_int holding the errno
        if errno:
            errors.append(errno)
        return 1  # retires the command

    try:
        while nxt < chunks or h.aio_in_flight() > 0:
            while nxt < chunks and h.aio_in_flight() < DEPTH:
                h.aio_pwrite(data[nxt % 8], nxt * CHUNK, completion=retire)
                nxt += 1
            h.poll(-1)
        h.flush()
    finally:
        done.set()
        w.join()
    ok = not errors and all(h.pread(CHUNK, i * CHUNK) == data[i % 8]
                            for i in range(0, chunks, 37))
    h.shutdown()
    return most[0], ok


def main(r):
    scratch = disk_scratch(r, "ballast-io-workers")
    if scratch is None:
        return
    path = os.path.join(scratch, "f")
    export = ["--cores", "1", "--export", "f=file:%s" % path]
    try:
        fresh(path)
        with Ballast(export + ["--io-workers", "0"]) as b:
            free, ok = load(b)
            r.check("kernel defaults: every write reads back", ok)
        print("kernel defaults: at most %d io-wq workers under this load" % free)
        if free <= 2:
            print("SKIP the limit: this filesystem made no more than two workers for the load "
                  "(%d), so --io-workers 2 cannot be pushed against here" % free)
        else:
            fresh(path)
            with Ballast(export + ["--io-workers", "2"]) as b:
                most, ok = load(b)
                r.check("--io-workers 2: every write reads back", ok)
                r.check("--io-workers 2: never more than two workers (%d without the limit)"
                        % free, most <= 2, "saw %d" % most)
                r.check("--io-workers 2: writes still went through workers", most >= 1,
                        "saw %d" % most)
                r.check("no panic", not b.panics(), "\n".join(b.panics()))
        fresh(path)
        with Ballast(export) as b:
            most, ok = load(b)
            r.check("default: every write reads back", ok)
            if free > 8:
                r.check("default: never more than eight workers (%d without a limit)" % free,
                        most <= 8, "saw %d" % most)
            else:
                print("SKIP the default's limit: the load made no more than eight workers here")
    finally:
        subprocess.run(["rm", "-rf", scratch])


if __name__ == "__main__":
    guarded(main)
