#!/usr/bin/env python3
"""scale-bench: what a second data core costs per I/O (issue 10: "`--cores 2` with two
connections costs <= 1.1x the CPU per I/O of `--cores 1`").

One pool file on --pool-dir (tmpfs by default, so the media costs nothing and the volume layer
shows), two 1 GiB volumes written once, served over NBD to fio (ioengine=nbd) with two
connections — one fio job each — in four configurations, alternating, medians of --reps:

  cores1-one-volume    --cores 1, both connections to one volume
  cores2-one-volume    --cores 2, both connections to one volume: the listener places the
                       connections on different cores, so both cores plan against one volume
                       family and share its pool's lock on every turn with volume work
  cores1-two-volumes   --cores 1, each connection to its own volume
  cores2-two-volumes   --cores 2, each connection to its own volume (one pool, two families)

With --cores 2 each configuration runs once per --placements entry (`owner`: a family is
served by its owning core, connections move there after their handshake; `any`: each
connection's core decides for the family under its lock), labelled `cores2-...-owner` / `-any`.
One volume under `owner`: both connections end on the family's core (one core serves it).
Two volumes: the families go to different cores (a new family goes to the core owning the
fewest), each connection to its volume's core — nothing is forwarded either way
(`forwarded/IO`; `moved` counts the connections that changed core).

Reported per configuration: IOPS, server CPU per I/O (the daemon's utime+stime over the I/Os),
and from `ballast stats` the share of the I/Os each core served (proof that both cores worked)
and the pool-state borrows per I/O; the ratio cores2/cores1 is the issue's measure.

The daemon runs with --poll-us 0 by default (cores never spin, so CPU per I/O is work, not
waiting: on a machine with fewer CPUs than server cores + client threads spinning would only
measure the scheduler). Pin the daemon with --server-cpus (the first CPU for --cores 1, the
first two for --cores 2) and fio with --client-cpus; on the 2-CPU development VM both share
CPUs 0-1, which inflates every number alike: compare ratios, and rerun on a machine with four
or more CPUs, where the defaults should be --server-cpus 0,1 --client-cpus 2,3.

Only the Python standard library is used. Results: a JSON file under perf/results/ and a
Markdown table on stdout.
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile

PERF_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(PERF_DIR)
sys.path.insert(0, PERF_DIR)
from nbd_bench import log  # noqa: E402
from volume_bench import Daemon  # noqa: E402

VOLUMES = ("v0", "v1")


def configs(placements):
    """(label, cores, exports, placement) for every configuration."""
    out = []
    for what, exports in (("one-volume", ("v0", "v0")), ("two-volumes", ("v0", "v1"))):
        out.append((f"cores1-{what}", 1, exports, "owner"))
        out += [(f"cores2-{what}-{p}", 2, exports, p) for p in placements]
    return out


def io_count(reactor):
    """Reads and writes a core completed."""
    return reactor["reads"] + reactor["writes"]


def fio_two(daemon, exports, args, rw, extra=()):
    """fio with one job (one NBD connection) per export; returns the parsed jobs."""
    cmd = ["taskset", "-c", args.client_cpus, "fio", "--output-format=json",
           "--ioengine=nbd", f"--rw={rw}", f"--bs={args.bs}", f"--iodepth={args.qd}",
           "--size=1G", *extra]
    for i, export in enumerate(exports):
        cmd += [f"--name=conn{i}", f"--uri=nbd://127.0.0.1:{daemon.port}/{export}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.runtime * 10 + 120)
    if out.returncode != 0:
        raise RuntimeError(f"fio failed: {out.stderr[-1500:]}")
    return json.loads(out.stdout[out.stdout.index("{"):])["jobs"]


def one(daemon, exports, args):
    r0, c0 = daemon.reactors(), daemon.cpu_s()
    jobs = fio_two(daemon, exports, args, args.rw,
                   ["--time_based", f"--runtime={args.runtime}"])
    c1, r1 = daemon.cpu_s(), daemon.reactors()
    side = "read" if "read" in args.rw else "write"
    ios = sum(j[side]["total_ios"] for j in jobs)
    iops = sum(j[side]["iops"] for j in jobs)
    per_core = [io_count(b) - io_count(a) for a, b in zip(r0, r1)]
    rounds = sum(b.get("volume_rounds", 0) - a.get("volume_rounds", 0) for a, b in zip(r0, r1))
    fwd = sum(b.get("volume_forwarded", 0) - a.get("volume_forwarded", 0) for a, b in zip(r0, r1))
    moved = sum(b.get("connections_moved", 0) - a.get("connections_moved", 0)
                for a, b in zip(r0, r1))
    total = max(sum(per_core), 1)
    return {
        "iops": iops,
        "server_cpu_us_per_io": (c1 - c0) * 1e6 / max(ios, 1),
        "core_shares": [n / total for n in per_core],
        "borrows_per_io": rounds / max(ios, 1),
        "forwarded_per_io": fwd / max(ios, 1),
        "moved": moved,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--binary", default=os.path.join(REPO, "build/cargo/release/ballast"))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--runtime", type=int, default=5)
    ap.add_argument("--rw", default="randread", choices=("randread", "randwrite"))
    ap.add_argument("--bs", default="4k")
    ap.add_argument("--qd", type=int, default=16, help="per connection")
    ap.add_argument("--server-cpus", default="0,1")
    ap.add_argument("--client-cpus", default="0,1")
    ap.add_argument("--poll-us", type=int, default=0)
    ap.add_argument("--pool-dir", default="/dev/shm")
    ap.add_argument("--placements", default="owner,any",
                    help="--volume-placement values to run --cores 2 with")
    args = ap.parse_args()
    plan = configs(args.placements.split(","))
    cpus = args.server_cpus.split(",")
    if len(cpus) < 2:
        ap.error("--server-cpus needs two CPUs (the first serves --cores 1)")
    scratch = tempfile.mkdtemp(prefix="scale-bench.")
    pool = os.path.join(args.pool_dir, f"scale-bench-{os.getpid()}.img")
    subprocess.run([args.binary, "pool", "create", pool, "--size", "3G"], check=True,
                   capture_output=True)
    runs = {label: [] for label, *_ in plan}
    try:
        for rep in range(args.reps):
            order = plan if rep % 2 == 0 else list(reversed(plan))
            for label, cores, exports, placement in order:
                # The pool has one owner at a time: a fresh daemon per configuration.
                d = Daemon(args.binary, os.path.join(scratch, f"cores{cores}"),
                           ["--pool", pool, "--poll-us", str(args.poll_us),
                            "--volume-placement", placement],
                           ",".join(cpus[:cores]), cores=cores)
                d.start()
                try:
                    if rep == 0 and label == order[0][0]:
                        for v in VOLUMES:
                            d.rpc("volume", "create", v, "1G")
                        # Written once, so reads read data and writes overwrite in place.
                        fio_two(d, VOLUMES, args, "write", ["--bs=1m", "--iodepth=8"])
                    r = one(d, exports, args)
                finally:
                    d.stop()
                assert len(r["core_shares"]) == cores, r
                log(f"{label} rep {rep}: {r['iops']:.0f} IOPS, server "
                    f"{r['server_cpu_us_per_io']:.2f} us/IO, core shares "
                    + ", ".join(f"{s:.2f}" for s in r["core_shares"]))
                runs[label].append(r)
    finally:
        os.unlink(pool)
    med = {label: {k: statistics.median(r[k] for r in rs)
                   for k in ("iops", "server_cpu_us_per_io", "borrows_per_io",
                             "forwarded_per_io", "moved")}
           for label, rs in runs.items()}
    for label, rs in runs.items():
        shares = [r["core_shares"] for r in rs]
        med[label]["core_shares"] = [statistics.median(s[i] for s in shares)
                                     for i in range(len(shares[0]))]
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    os.makedirs(os.path.join(PERF_DIR, "results"), exist_ok=True)
    path = os.path.join(PERF_DIR, "results", f"scale-{stamp}.json")
    with open(path, "w") as f:
        json.dump({"args": vars(args), "runs": runs, "median": med}, f, indent=1)
    print(f"fio {args.rw} {args.bs}, QD{args.qd} per connection, two connections, "
          f"--poll-us {args.poll_us}, medians of {args.reps}\n")
    print("| configuration | IOPS | server µs CPU/IO | I/O share per core | "
          "pool-state borrows/IO | forwarded/IO | moved |")
    print("|---|---|---|---|---|---|---|")
    for label, m in med.items():
        shares = " / ".join(f"{s:.2f}" for s in m["core_shares"])
        print(f"| {label} | {m['iops']:.0f} | {m['server_cpu_us_per_io']:.2f} | {shares} | "
              f"{m['borrows_per_io']:.2f} | {m['forwarded_per_io']:.2f} | {m['moved']:.0f} |")
    for what in ("one-volume", "two-volumes"):
        a = med[f"cores1-{what}"]
        for p in args.placements.split(","):
            b = med[f"cores2-{what}-{p}"]
            print(f"\n{what}, {p}: --cores 2 / --cores 1 server CPU per I/O "
                  f"{b['server_cpu_us_per_io'] / a['server_cpu_us_per_io']:.2f}x, "
                  f"IOPS {b['iops'] / a['iops']:.2f}x")
    log(f"results: {path}")


if __name__ == "__main__":
    main()
