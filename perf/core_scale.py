#!/usr/bin/env python3
"""core-scale: server CPU per I/O and IOPS as data cores are added (issue 10: "`--cores 2` with
two connections costs <= 1.1x the CPU per I/O of `--cores 1`", and the scaling model for 16-64
cores written from measured costs).

NVMe/TCP, our initiator (ballast-perf: one process per connection, one I/O queue each, pinned
to its own CPU, so the client never shares a CPU with the server). For each `--cores N` in
--cores-list: one pool file on --pool-dir (tmpfs by default: the media cost nothing, the volume
layer and the protocol show), N volumes written once, then a fresh daemon pinned to the first N
of --server-cpus, per --placements entry, serving N connections at a time in two shapes:

  spread   connection i to volume i: one family per core under `owner`; under `any` each
           connection's core decides for its family under the family's lock
  one      all N connections to volume 0: under `owner` every queue moves to the family's core
           (one core serves them all); under `any` N cores share one family's lock

Each cell: IOPS (sum of the clients'), server CPU per I/O (the daemon's utime+stime over the
I/Os), the share of I/Os per core (`ballast stats`), forwarded and moved counts, medians of
--reps with the cells alternating in order. The per-core figure that matters for scaling is
CPU per I/O at N against N=1 (1.00x = no contention) and IOPS at N against N=1 (N.00x =
linear). The daemon runs with --poll-us 0 by default (no spinning: CPU per I/O is work).

Only the Python standard library is used. Results: a JSON file under perf/results/ (or --out)
and a Markdown table on stdout.
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

NQN = "nqn.2026-11.dev.ballast:"


def clients(daemon, args, exports, rw, bs, qd, runtime, cpus, extra=()):
    """One ballast-perf per export, concurrently, each on its own CPU; returns their jobs."""
    procs = []
    for i, export in enumerate(exports):
        cmd = ["taskset", "-c", cpus[i % len(cpus)], args.perf,
               "--addr", f"127.0.0.1:{daemon.nvmf_port}", "--nqn", NQN + export,
               "--rw", rw, "--bs", bs, "--qd", str(qd), "--runtime", str(runtime),
               "--size", args.volume_size, "--seed", str(1000 + i), "--json", *extra]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    jobs = []
    for p in procs:
        out, err = p.communicate(timeout=runtime * 10 + 120)
        if p.returncode != 0:
            raise RuntimeError(f"ballast-perf failed: {err[-1500:]}")
        jobs.append(json.loads(out)["jobs"][0])
    return jobs


def size_bytes(text):
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower()
    return int(t[:-1]) * units[t[-1]] if t[-1] in units else int(t)


def wipe(path):
    """Forgets the pool on `path` (a block device: discarded whole; its pool would otherwise be
    refused by `pool create`)."""
    if subprocess.run(["blkdiscard", "-f", path], capture_output=True).returncode == 0:
        return
    with open(path, "r+b") as f:  # no discard: zero each end, where the pool keeps its roots
        end = f.seek(0, os.SEEK_END)
        for at in (0, max(end - (256 << 20), 0)):
            f.seek(at)
            f.write(bytes(min(256 << 20, end)))


def counter(reactors, key):
    return [r.get(key, 0) for r in reactors]


def measure(daemon, args, exports, rw, cpus):
    r0, c0 = daemon.reactors(), daemon.cpu_s()
    jobs = clients(daemon, args, exports, rw, args.bs, args.qd, args.runtime, cpus)
    c1, r1 = daemon.cpu_s(), daemon.reactors()
    ios = sum(j[d]["total_ios"] for j in jobs for d in ("read", "write") if d in j)
    iops = sum(j[d]["iops"] for j in jobs for d in ("read", "write") if d in j)
    per_core = [(b["reads"] + b["writes"]) - (a["reads"] + a["writes"]) for a, b in zip(r0, r1)]
    total = max(sum(per_core), 1)

    def delta(key):
        return sum(b - a for a, b in zip(counter(r0, key), counter(r1, key)))

    return {
        "iops": iops,
        # The daemon's threads just after the run: its cores, offload threads, and the
        # kernel's io-wq workers for its rings (idle ones linger a few seconds).
        "threads": len(os.listdir(f"/proc/{daemon.proc.pid}/task")),
        "server_cpu_us_per_io": (c1 - c0) * 1e6 / max(ios, 1),
        "core_shares": [n / total for n in per_core],
        "forwarded_per_io": delta("volume_forwarded") / max(ios, 1),
        "moved": delta("connections_moved"),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--binary", default=os.path.join(REPO, "build/cargo/release/ballast"))
    ap.add_argument("--perf", default=None, help="ballast-perf (default: beside --binary)")
    ap.add_argument("--cores-list", default="1,2,4,8")
    ap.add_argument("--server-cpus", default="0-7", help="first N serve --cores N (a-b or list)")
    ap.add_argument("--client-cpus", default="8-15", help="one client per CPU, round robin")
    ap.add_argument("--placements", default="any,owner")
    ap.add_argument("--shapes", default="spread,one")
    ap.add_argument("--rws", default="randread,randwrite")
    ap.add_argument("--one-rws", default="randread", help="workloads for the `one` shape")
    ap.add_argument("--bs", default="4k")
    ap.add_argument("--qd", type=int, default=32, help="per connection")
    ap.add_argument("--runtime", type=float, default=4)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--volume-size", default="256M")
    ap.add_argument("--poll-us", type=int, default=0)
    ap.add_argument("--serve-args", default="", help="extra serve flags")
    ap.add_argument("--pool-dir", default="/dev/shm")
    ap.add_argument("--pool-path", default=None,
                    help="with --backing volume: the pool on this file or block device instead "
                    "of a file on --pool-dir (formatted afresh for each --cores entry)")
    ap.add_argument("--backing", choices=("volume", "file", "ram"), default="volume",
                    help="volume: N volumes of one pool file; file: one file export per "
                    "connection on --pool-dir (the `one` shape: all on the first); ram: one "
                    "RAM export per connection")
    ap.add_argument("--fresh", action="store_true",
                    help="with --backing volume: every cell formats the pool afresh and writes "
                    "into new, never written volumes (each 4 KiB piece's first write makes a "
                    "mapping record: commits, and their seals pausing every core, under load)")
    ap.add_argument("--out", default=os.path.join(PERF_DIR, "results"))
    args = ap.parse_args()
    if args.fresh and args.backing != "volume":
        ap.error("--fresh needs --backing volume")
    args.perf = args.perf or os.path.join(os.path.dirname(args.binary), "ballast-perf")

    def cpu_list(spec):
        out = []
        for part in spec.split(","):
            a, _, b = part.partition("-")
            out += [str(c) for c in range(int(a), int(b or a) + 1)]
        return out

    server_cpus, client_cpus = cpu_list(args.server_cpus), cpu_list(args.client_cpus)
    cores_list = [int(c) for c in args.cores_list.split(",")]
    if max(cores_list) > len(server_cpus):
        ap.error("--server-cpus has fewer CPUs than the largest --cores-list entry")
    scratch = tempfile.mkdtemp(prefix="core-scale.")
    runs = {}
    for n in cores_list:
        pool = os.path.join(args.pool_dir, f"core-scale-{os.getpid()}-{n}.img")
        filled = pool + ".filled"
        vols = [f"v{i}" for i in range(n)]
        files = [f"{pool}.{v}" for v in vols]
        if args.backing == "volume":
            if args.pool_path:
                pool = args.pool_path

            def format_pool():
                if args.pool_path:
                    wipe(pool)
                elif os.path.exists(pool):
                    os.unlink(pool)
                subprocess.run([args.binary, "pool", "create", pool]
                               + ([] if args.pool_path else ["--size", "16G"]),
                               check=True, capture_output=True)
            format_pool()
            where = ["--pool", pool]
        elif args.backing == "file":
            for f in files:
                with open(f, "wb") as fh:
                    fh.truncate(size_bytes(args.volume_size))
            where = [a for v, f in zip(vols, files) for a in ("--export", f"{v}=file:{f}")]
        else:
            where = [a for v in vols for a in ("--export", f"{v}=ram:{args.volume_size}")]
        cells = []
        for shape in args.shapes.split(","):
            rws = args.rws if shape == "spread" else args.one_rws
            for rw in rws.split(","):
                for p in (args.placements.split(",") if n > 1 else ["any"]):
                    if shape == "one" and n == 1:
                        continue  # the same as spread at one core
                    cells.append((shape, rw, p))
        try:
            for rep in range(args.reps):
                for shape, rw, p in (cells if rep % 2 == 0 else list(reversed(cells))):
                    if args.fresh and os.path.exists(filled):
                        format_pool()
                        os.unlink(filled)
                    d = Daemon(args.binary, os.path.join(scratch, f"cores{n}"),
                               where + ["--poll-us", str(args.poll_us),
                                "--volume-placement", p] + args.serve_args.split(),
                               ",".join(server_cpus[:n]), cores=n)
                    d.start()
                    try:
                        if args.backing == "ram" or not os.path.exists(filled):
                            for v in vols if args.backing == "volume" else ():
                                d.rpc("volume", "create", v, args.volume_size)
                            # Written once: reads read data, writes overwrite in place.
                            if not args.fresh:
                                clients(d, args, vols, "write", "128k", 8, 600, client_cpus,
                                        ["--number-ios",
                                         str(size_bytes(args.volume_size) // 131072)])
                            open(filled, "w").close()
                        exports = vols if shape == "spread" else ["v0"] * n
                        r = measure(d, args, exports, rw, client_cpus)
                    finally:
                        d.stop()
                    label = f"cores{n}-{shape}-{rw}-{p}"
                    log(f"{label} rep {rep}: {r['iops']:.0f} IOPS, "
                        f"{r['server_cpu_us_per_io']:.2f} us/IO, shares "
                        + " ".join(f"{s:.2f}" for s in r["core_shares"])
                        + f", fwd/IO {r['forwarded_per_io']:.2f}, moved {r['moved']}, "
                        f"threads {r['threads']}")
                    runs.setdefault(label, []).append(r)
        finally:
            for f in [filled] + files + ([] if args.pool_path else [pool]):
                if os.path.exists(f):
                    os.unlink(f)
    med = {}
    for label, rs in runs.items():
        med[label] = {k: statistics.median(r[k] for r in rs)
                      for k in ("iops", "server_cpu_us_per_io", "forwarded_per_io", "moved",
                                "threads")}
        med[label]["core_share_min"] = statistics.median(min(r["core_shares"]) for r in rs)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    os.makedirs(args.out, exist_ok=True)
    kind = args.backing + ("-fresh" if args.fresh else "")
    path = os.path.join(args.out, f"core-scale-{kind}-{stamp}.json")
    with open(path, "w") as f:
        json.dump({"args": vars(args), "nproc": os.cpu_count(), "uname": os.uname().release,
                   "runs": runs, "median": med}, f, indent=1)
    print(f"NVMe/TCP {args.bs} on {args.backing}, QD{args.qd} per connection "
          "(one ballast-perf each), "
          f"--poll-us {args.poll_us}, medians of {args.reps}\n")
    print("| cell | IOPS | IOPS / N=1 | server µs CPU/IO | CPU/IO / N=1 | smallest core share "
          "| forwarded/IO | moved | threads |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, m in med.items():
        _, shape, rw, _ = label.split("-", 3)
        base = med.get(f"cores1-spread-{rw}-any")
        ri = m["iops"] / base["iops"] if base else float("nan")
        rc = m["server_cpu_us_per_io"] / base["server_cpu_us_per_io"] if base else float("nan")
        print(f"| {label} | {m['iops']:.0f} | {ri:.2f}x | {m['server_cpu_us_per_io']:.2f} | "
              f"{rc:.2f}x | {m['core_share_min']:.2f} | {m['forwarded_per_io']:.2f} | "
              f"{m['moved']:.0f} | {m['threads']:.0f} |")
    log(f"results: {path}")


if __name__ == "__main__":
    main()
