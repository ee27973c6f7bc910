#!/usr/bin/env python3
"""decouple-bench: what decoupling a clone (`ballast volume decouple`) costs the I/O around it.

One `ballast serve --cores 1` pinned to --server-cpu, a pool file on --dir (tmpfs by default:
the media costs nothing, so what shows is the daemon's), ballast-perf NVMe/TCP 4k random reads
on --client-cpu. Volumes: `other` (another family) and `base` (fully written), a snapshot of
`base` and a clone of it sharing every cluster. For each daemon configuration (--configs: serve
flags, e.g. "" and "--copy-rate 256"), alternating, --reps times:
  - reads of `other`, then of the clone, alone (before);
  - the same reads while the clone is decoupled (started --lead seconds after the decoupling
    begins, for --runtime seconds or until it ends, whichever is first);
  - how long the decoupling took.
The pool file is written with zeros first unless --sparse: writes into a sparse tmpfs file stall
every read of the pool (perf/RESULTS.md §24), and on a virtual machine a page's first write also
faults it in on the host; either would hide what is measured.

Only the Python standard library. Results: a JSON file under perf/results/ and a Markdown
summary on stdout.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

PERF_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(PERF_DIR)
sys.path.insert(0, PERF_DIR)
from nbd_bench import log  # noqa: E402
from volume_bench import Daemon  # noqa: E402

PREFIX = "nqn.2026-11.dev.ballast:"


def reads(args, daemon, volume, runtime, qd, size=None):
    """ballast-perf 4k random reads of `volume`'s first `size` (default --size GiB) for
    `runtime` s, on --client-cpu: IOPS and latency in us."""
    cmd = ["taskset", "-c", str(args.client_cpu), args.perf, "--addr",
           f"127.0.0.1:{daemon.nvmf_port}", "--nqn", PREFIX + volume, "--rw", "randread",
           "--bs", "4k", "--qd", str(qd), "--runtime", f"{runtime:.3f}",
           "--size", size or f"{args.size}G", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=runtime * 10 + 60)
    if out.returncode != 0:
        raise RuntimeError(f"ballast-perf failed: {out.stderr[-1500:]}")
    job = json.loads(out.stdout[out.stdout.index("{"):])["jobs"][0]["read"]
    lat = job["clat_ns"]
    pct = lat.get("percentile", {})

    def p(q):
        return next((v for k, v in pct.items() if k.startswith(q)), 0) / 1000

    return {"iops": job["iops"], "p50_us": p("50.0"), "p99_us": p("99.0"),
            "max_us": lat.get("max", 0) / 1000}


def fill(args, daemon, volume, size=None):
    """Writes `volume`'s first `size` (default --size GiB) once with fio, on --client-cpu."""
    subprocess.run(["taskset", "-c", str(args.client_cpu), "fio", "--name=fill",
                    "--ioengine=nbd", f"--uri=nbd://127.0.0.1:{daemon.port}/{volume}",
                    "--rw=write", "--bs=1m", "--iodepth=8", f"--size={size or f'{args.size}G'}",
                    "--output-format=json"], capture_output=True, check=True, timeout=600)


def during(args, daemon, volume, qd):
    """Reads of `volume` while the clone `c` is decoupled: (reads, decoupling seconds)."""
    done = {}

    def decouple():
        t0 = time.monotonic()
        p = subprocess.run([args.binary, "volume", "decouple", "c", "--data-dir",
                            daemon.data_dir], capture_output=True, text=True, timeout=3600)
        done["s"] = time.monotonic() - t0
        done["rc"], done["err"] = p.returncode, p.stderr

    t = threading.Thread(target=decouple)
    t.start()
    time.sleep(args.lead)
    r = reads(args, daemon, volume, args.runtime, qd)
    t.join()
    if done["rc"] != 0:
        raise RuntimeError(f"decouple failed: {done['err']}")
    if done["s"] < args.lead + args.runtime:
        log(f"  (the decoupling took {done['s']:.2f} s: shorter than the reads, which also "
            "measured after it)")
    return r, done["s"]


def reclone(daemon):
    daemon.rpc("volume", "delete", "c")
    daemon.rpc("clone", "create", "snap", "c")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--binary", default=os.path.join(REPO, "build/cargo/release/ballast"))
    ap.add_argument("--perf", default=os.path.join(REPO, "build/cargo/release/ballast-perf"))
    ap.add_argument("--configs", default="",
                    help="';'-separated serve flag sets to compare (an empty one: defaults)")
    ap.add_argument("--dir", default="/dev/shm", help="where the pool file lives")
    ap.add_argument("--sparse", action="store_true", help="leave the pool file sparse")
    ap.add_argument("--size", type=int, default=1, help="GiB per volume")
    ap.add_argument("--qd", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--runtime", type=float, default=1.0)
    ap.add_argument("--lead", type=float, default=0.1)
    ap.add_argument("--server-cpu", type=int, default=0)
    ap.add_argument("--client-cpu", type=int, default=1)
    args = ap.parse_args()
    configs = [c.strip() for c in args.configs.split(";")]
    scratch = tempfile.mkdtemp(prefix="decouple-bench-", dir=args.dir)
    results = {"args": vars(args), "configs": {}}
    try:
        pool = os.path.join(scratch, "pool.img")
        gib = 3 * args.size + 2
        if not args.sparse:
            # Written, not only allocated: on a virtual machine a page's first write also
            # faults it in on the host, which this guest sees as a slow copy.
            subprocess.run(["dd", "if=/dev/zero", f"of={pool}", "bs=1M", f"count={gib << 10}",
                            "status=none"], check=True)
        subprocess.run([args.binary, "pool", "create", pool, "--size", f"{gib}G"], check=True,
                       capture_output=True)
        rows = {c: [] for c in configs}
        for rep in range(args.reps):
            for c in configs:
                d = Daemon(args.binary, os.path.join(scratch, "d"),
                           ["--pool", pool] + c.split(), args.server_cpu)
                d.start()
                try:
                    if rep == 0 and c == configs[0]:
                        for v in ("other", "base"):
                            d.rpc("volume", "create", v, f"{args.size}G")
                            fill(args, d, v)
                        d.rpc("snapshot", "create", "base", "snap")
                        d.rpc("clone", "create", "snap", "c")
                    row = {}
                    for vol in ("other", "c"):
                        row[f"{vol}_before"] = reads(args, d, vol, args.runtime, args.qd)
                        row[f"{vol}_during"], row[f"{vol}_decouple_s"] = during(
                            args, d, vol, args.qd)
                        reclone(d)
                    rows[c].append(row)
                    log(f"[{c or 'defaults'}] rep {rep}: other {row['other_before']['iops']:.0f}"
                        f" -> {row['other_during']['iops']:.0f} IOPS, clone "
                        f"{row['c_before']['iops']:.0f} -> {row['c_during']['iops']:.0f}, "
                        f"decouple {row['other_decouple_s']:.2f} / {row['c_decouple_s']:.2f} s")
                finally:
                    d.stop()
        print(f"\n| serve flags | reading | IOPS before | IOPS during (x) | p50 / p99 us "
              f"during | decoupling s |")
        print("|---|---|---|---|---|---|")
        for c in configs:
            res = results["configs"][c or "defaults"] = {"runs": rows[c]}
            for vol, label in (("other", "another volume"), ("c", "the clone itself")):
                def m(phase, key):
                    return statistics.median(r[f"{vol}_{phase}"][key] for r in rows[c])
                secs = statistics.median(r[f"{vol}_decouple_s"] for r in rows[c])
                med = {"before_iops": m("before", "iops"), "during_iops": m("during", "iops"),
                       "during_p50_us": m("during", "p50_us"),
                       "during_p99_us": m("during", "p99_us"), "decouple_s": secs}
                res[vol] = med
                print(f"| `{c or '(defaults)'}` | {label} | {med['before_iops']:.0f} | "
                      f"{med['during_iops']:.0f} ({med['during_iops'] / med['before_iops']:.2f}x)"
                      f" | {med['during_p50_us']:.0f} / {med['during_p99_us']:.0f} | "
                      f"{secs:.2f} |")
        os.makedirs(os.path.join(PERF_DIR, "results"), exist_ok=True)
        out = os.path.join(PERF_DIR, "results",
                           time.strftime("decouple-%Y%m%d-%H%M%S.json", time.gmtime()))
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
        log(f"results: {out}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
