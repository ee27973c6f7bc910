#!/usr/bin/python3
"""bounds-bench: what the resource bounds (issue 8) cost, and what they protect, in one run.

  1. Cost: the previous build (--old-binary) against this one, alternating runs, medians of
     --reps: 4k random read and write at QD32 on a RAM export (the media costs nothing), over
     NBD (fio, ioengine=nbd) and NVMe/TCP (ballast-perf), the server pinned to one CPU and the
     client to the other; IOPS and server CPU per I/O. Aim: the bounds cost <= 3% CPU per I/O.
  2. Protection: a real client (fio, NBD, 4k random read QD32) unloaded, then while the hostile
     waves of tests/e2e/bounded.py are held open against the same daemon (2000 idle
     connections, 64 NBD writers stalled inside 32 MiB writes, 64 NVMe/TCP hosts with 128
     unanswered 1 MiB R2Ts each, 48 clients that never read their replies). Aim: >= 0.8x.

Run with /usr/bin/python3 (the hostile clients come from tests/, which import libnbd's module).
Results: JSON under perf/results/ and a Markdown summary on stdout.
"""

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time

PERF_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(PERF_DIR)
sys.path.insert(0, PERF_DIR)
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, os.path.join(REPO, "tests", "e2e"))
from volume_bench import Daemon, fio, nvme_perf  # noqa: E402
from nbd_bench import log  # noqa: E402
import bounded  # noqa: E402

MiB = 1 << 20


def nbd_4k(daemon, rw, args):
    return fio(daemon, "mem", args.fio_cpu,
               [f"--rw={rw}", "--bs=4k", "--iodepth=32", "--size=1G"], args.runtime)


def nvme_4k(daemon, rw, args):
    return nvme_perf(daemon, "mem", rw, args)


def cost(args, scratch):
    """Old vs new build, alternating, medians."""
    daemons = {}
    for name, binary in (("old", args.old_binary), ("new", args.binary)):
        d = Daemon(binary, os.path.join(scratch, name), ["--export", "mem=ram:1G"], args.server_cpu)
        d.start()
        daemons[name] = d
    # Fill the RAM exports so reads read data.
    for d in daemons.values():
        fio(d, "mem", args.fio_cpu, ["--rw=write", "--bs=1M", "--iodepth=8", "--size=1G"])
    res = {}
    try:
        for proto, runner in (("nbd", nbd_4k), ("nvme", nvme_4k)):
            for rw in ("randread", "randwrite"):
                runs = {"old": [], "new": []}
                for rep in range(args.reps):
                    for name in ("old", "new") if rep % 2 == 0 else ("new", "old"):
                        r = runner(daemons[name], rw, args)
                        log(f"{proto} {rw} {name} rep {rep}: {r['iops']:.0f} IOPS, "
                            f"{r['cpu_us_per_io']:.2f} us CPU/IO")
                        runs[name].append(r)
                med = {k: {"iops": statistics.median(x["iops"] for x in v),
                           "cpu_us_per_io": statistics.median(x["cpu_us_per_io"] for x in v)}
                       for k, v in runs.items()}
                med["ratio_iops"] = med["new"]["iops"] / med["old"]["iops"]
                med["ratio_cpu_per_io"] = med["new"]["cpu_us_per_io"] / med["old"]["cpu_us_per_io"]
                res[f"{proto}-{rw}-4k-qd32"] = {"runs": runs, "median": med}
    finally:
        for d in daemons.values():
            d.stop()
    return res


def hostile_waves(port, nvmf_port):
    """Opens the waves of tests/e2e/bounded.py; returns every socket (keep them open)."""
    nqn = "nqn.2026-11.dev.ballast:mem"
    socks = bounded.idle_crowd(port, nvmf_port, 1000)
    socks += bounded.stalled_writers(port, "mem", 64)
    socks += [h.s for pair in bounded.unanswered_r2ts(nvmf_port, nqn, 64)
              for h in pair]
    socks += bounded.non_readers(port, nvmf_port, "mem", nqn, 32, 16)
    return socks


def protection(args, scratch):
    d = Daemon(args.binary, os.path.join(scratch, "attacked"),
               ["--export", "mem=ram:1G", "--stall-timeout", "600", "--handshake-timeout", "600"],
               args.server_cpu)
    d.start()
    out = {"unloaded": [], "attacked": []}
    try:
        fio(d, "mem", args.fio_cpu, ["--rw=write", "--bs=1M", "--iodepth=8", "--size=1G"])
        for rep in range(args.reps):
            r = nbd_4k(d, "randread", args)
            log(f"unloaded rep {rep}: {r['iops']:.0f} IOPS, {r['cpu_us_per_io']:.2f} us CPU/IO")
            out["unloaded"].append(r)
        t0 = time.monotonic()
        socks = hostile_waves(d.port, d.nvmf_port)
        log(f"hostile waves open: {len(socks)} sockets in {time.monotonic() - t0:.1f}s")
        time.sleep(2)
        for rep in range(args.reps):
            r = nbd_4k(d, "randread", args)
            log(f"attacked rep {rep}: {r['iops']:.0f} IOPS, {r['cpu_us_per_io']:.2f} us CPU/IO")
            out["attacked"].append(r)
        for s in socks:
            s.close()
    finally:
        d.stop()
    med = {k: statistics.median(x["iops"] for x in v) for k, v in out.items()}
    out["median_iops"] = med
    out["ratio"] = med["attacked"] / med["unloaded"]
    return out


def render(r):
    lines = ["| profile | old IOPS | new IOPS | IOPS new/old | old us CPU/IO | new us CPU/IO "
             "| CPU/IO new/old |", "|---|---|---|---|---|---|---|"]
    for k, v in r["cost"].items():
        m = v["median"]
        lines.append(f"| {k} | {m['old']['iops']:.0f} | {m['new']['iops']:.0f} | "
                     f"{m['ratio_iops']:.3f} | {m['old']['cpu_us_per_io']:.2f} | "
                     f"{m['new']['cpu_us_per_io']:.2f} | {m['ratio_cpu_per_io']:.3f} |")
    p = r["protection"]
    lines += ["", "| real client (NBD 4k randread QD32) | IOPS (median) |", "|---|---|",
              f"| unloaded | {p['median_iops']['unloaded']:.0f} |",
              f"| with the hostile waves open | {p['median_iops']['attacked']:.0f} |",
              f"| ratio | {p['ratio']:.3f} |"]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default=os.path.join(REPO, "build/cargo/release/ballast"))
    ap.add_argument("--old-binary", required=True, help="the previous build, for the A/B")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--runtime", type=int, default=8)
    ap.add_argument("--size", type=int, default=1, help="GiB (ballast-perf's range)")
    ap.add_argument("--server-cpu", type=int, default=0)
    ap.add_argument("--fio-cpu", type=int, default=1)
    ap.add_argument("--skip", default="", help="comma list: cost,protection")
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    scratch = tempfile.mkdtemp(prefix="bounds-bench.", dir="/var/tmp")
    skip = set(args.skip.split(","))
    result = {"cost": {} if "cost" in skip else cost(args, scratch),
              "protection": {} if "protection" in skip else protection(args, scratch)}
    os.makedirs(os.path.join(PERF_DIR, "results"), exist_ok=True)
    path = os.path.join(PERF_DIR, "results", "bounds-%s.json" % time.strftime("%Y%m%d-%H%M%S"))
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    log(f"results: {path}")
    if result["cost"] and result["protection"]:
        print(render(result))
    else:
        print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
