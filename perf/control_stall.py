#!/usr/bin/env python3
"""control-stall: what a control operation on a large volume costs the I/O of the others.

One `ballast serve --cores 1` on --server-cpu, a pool file in --dir (sparse: only metadata is
written), volume `other` (256 MiB, written) read by ballast-perf NVMe/TCP 4k randread QD1 on
--client-cpu for 3 s; 1 s into each read run, one operation: creating a thick volume of --gib
GiB (its clusters mapped, nothing written), a snapshot of it, a clone of that, decoupling the
clone (every cluster mapped afresh, nothing copied; --no-decouple leaves it out), deleting the
clone and the snapshot, shrinking the volume to 1 GiB, deleting it, then creating a thin volume
of --gib GiB, inflating it (every cluster mapped) and deleting it.
Prints how long each operation took and the reads' IOPS and largest latency — the stall the
operation caused the others (a step taken with the pool state borrowed exclusively stops every
core's decisions). Only the Python standard library.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

PERF_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(PERF_DIR)
sys.path.insert(0, PERF_DIR)
from decouple_bench import fill, reads  # noqa: E402
from volume_bench import Daemon  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--binary", default=os.path.join(REPO, "build/cargo/release/ballast"))
    ap.add_argument("--perf", default=os.path.join(REPO, "build/cargo/release/ballast-perf"))
    ap.add_argument("--gib", type=int, default=64, help="size of the large volume")
    ap.add_argument("--dir", default="/dev/shm")
    ap.add_argument("--server-cpu", type=int, default=0)
    ap.add_argument("--client-cpu", type=int, default=1)
    ap.add_argument("--no-decouple", action="store_true",
                    help="leave out the decoupling (a minute at 64 GiB)")
    args = ap.parse_args()
    scratch = tempfile.mkdtemp(prefix="control-stall-", dir=args.dir)
    try:
        pool = os.path.join(scratch, "pool.img")
        subprocess.run([args.binary, "pool", "create", pool, "--size", f"{2 * args.gib + 8}G"],
                       check=True, capture_output=True)
        d = Daemon(args.binary, os.path.join(scratch, "d"), ["--pool", pool, "--copy-rate", "0"],
                   args.server_cpu)
        d.start()
        try:
            run(args, d)
        finally:
            d.stop()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run(args, d):
    d.rpc("volume", "create", "other", "256M")
    fill(args, d, "other", "256M")

    def during(label, argv):
        res = {}

        def read():
            res.update(reads(args, d, "other", 3.0, 1, "256M"))

        t = threading.Thread(target=read)
        t.start()
        time.sleep(1.0)
        took = 0.0
        if argv:
            t0 = time.monotonic()
            p = subprocess.run([args.binary, *argv, "--data-dir", d.data_dir],
                               capture_output=True, text=True)
            took = time.monotonic() - t0
            if p.returncode != 0:
                raise RuntimeError(f"{argv}: {p.stderr}")
        t.join()
        print(f"| {label} | {took * 1000:.0f} | {res['iops']:.0f} | {res['max_us'] / 1000:.1f} |",
              flush=True)

    g = args.gib
    print("| operation | ms | reads of another volume, QD1 IOPS | their largest latency, ms |")
    print("|---|---|---|---|")
    during("nothing", None)
    during(f"thick creation of {g} GiB", ["volume", "create", "big", f"{g}G", "--thick"])
    during(f"snapshot of the {g} GiB volume", ["snapshot", "create", "big", "bs"])
    during("clone of the snapshot", ["clone", "create", "bs", "bc"])
    if not args.no_decouple:
        during("decoupling the clone (nothing written: mapped afresh)",
               ["volume", "decouple", "bc"])
    during("deleting the clone", ["volume", "delete", "bc"])
    during("deleting the snapshot", ["volume", "delete", "bs"])
    during(f"shrinking the {g} GiB volume to 1 GiB",
           ["volume", "resize", "big", "1G", "--force"])
    during("deleting it", ["volume", "delete", "big"])
    during(f"creating a thin volume of {g} GiB", ["volume", "create", "thin", f"{g}G"])
    during("inflating it (every cluster mapped)", ["volume", "decouple", "thin", "--inflate"])
    during("deleting it", ["volume", "delete", "thin"])


if __name__ == "__main__":
    main()
