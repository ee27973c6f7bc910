#!/usr/bin/env python3
"""floor-bench: ballast over NVMe/TCP against the loopback floor, side by side in one run.

The floor is `ballast-floor serve` (perf/src/bin/floor.rs): a server that answers each
request of NVMe/TCP's byte sizes (a 72-byte command capsule; C2HData, 4 KiB and a response
capsule for a read; 4 KiB in the capsule and a 24-byte response for a write) with nothing but
its socket calls — no parsing, no decisions, no copy of its own. What it costs and the latency
its client sees are the least any target can cost on this machine, kernel and TCP stack, SPDK's
included (its posix sockets make the same calls). This machine's speed moves from run to run, so
the figure to read is ballast's ratio to the floor measured in the same run.

Per workload (4 KiB random read and write at QD1 and QD32), alternating: the floor (its
client `ballast-floor run`) touching no data ("floor"), the floor copying each request's 4 KiB
from or to a random block of 1 GiB of memory as a RAM target must ("floor-1g", the base of the
ratios), ballast serving a written 1 GiB RAM export, and ballast serving a written 1 GiB volume
of a pool on tmpfs (--pool-dir), both through `ballast-perf`. Both clients poll
their sockets (as SPDK's perf tool does; --blocking: both sleep in recv) and both batch the
commands they submit while taking completions that arrived together. Servers run on
--server-cpu, clients on --client-cpu. At QD1 the floor spins on its socket (as ballast's
default polling does while requests keep coming); at QD32 it sleeps in recv between batches (as
ballast does after big bursts) — each the floor's cheaper choice at that depth.

Reported: IOPS, average and p99 latency, server and client CPU per I/O, TCP segments per I/O
(machine-wide: keep the machine otherwise quiet), and each against the floor. Only the Python
standard library is used; results go to perf/results/floor-*.json and a Markdown table.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

PERF_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(PERF_DIR)
sys.path.insert(0, PERF_DIR)
from ab_bench import COLUMNS, fill, med, one  # noqa: E402
from nbd_bench import log, proc_cpu_seconds, wait_listening  # noqa: E402
from volume_bench import Daemon, free_port  # noqa: E402

WORKLOADS = [
    ("4k-randread-qd1", "randread", 1),
    ("4k-randwrite-qd1", "randwrite", 1),
    ("4k-randread-qd32", "randread", 32),
    ("4k-randwrite-qd32", "randwrite", 32),
]
RELEASE = os.path.join(REPO, "build/cargo/release")


class Floor:
    """`ballast-floor serve` for one shape, polling mode and span, pinned to a CPU."""

    def __init__(self, binary, shape, poll, span, cpu):
        self.binary, self.shape, self.poll = binary, shape, poll
        self.port = free_port()
        cmd = ["taskset", "-c", str(cpu), binary, "serve", "--listen",
               f"127.0.0.1:{self.port}", "--shape", shape, "--span", span]
        cmd += ["--poll"] if poll else []
        self.proc = subprocess.Popen(cmd)
        if not wait_listening(self.proc, self.port, 10):
            self.stop()
            raise RuntimeError("ballast-floor serve did not start")

    def cpu_s(self):
        return proc_cpu_seconds(self.proc.pid)

    def reactors(self):
        return None

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)


def floor_client(args, server, _proto, _rw, _bs, qd):
    cmd = ["taskset", "-c", str(args.client_cpu), args.floor, "run", "--addr",
           f"127.0.0.1:{server.port}", "--shape", server.shape, "--qd", str(qd),
           "--runtime", str(args.runtime), "--json"] + ([] if args.blocking else ["--poll"])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.runtime * 10 + 60)
    if out.returncode != 0:
        raise RuntimeError(f"ballast-floor run failed: {out.stderr[-1500:]}")
    return json.loads(out.stdout)["jobs"][0]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--binary", default=os.path.join(RELEASE, "ballast"))
    ap.add_argument("--perf", default=os.path.join(RELEASE, "ballast-perf"))
    ap.add_argument("--floor", default=os.path.join(RELEASE, "ballast-floor"))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--runtime", type=int, default=3)
    ap.add_argument("--server-cpu", type=int, default=1)
    ap.add_argument("--client-cpu", type=int, default=0)
    ap.add_argument("--workloads", default=",".join(w[0] for w in WORKLOADS))
    ap.add_argument("--servers", default="floor,floor-1g,ram,volume",
                    help="comma list of: floor, floor-1g (copying to or from 1 GiB), ram (a "
                    "RAM export), volume (on --pool-dir)")
    ap.add_argument("--pool-dir", default="/dev/shm")
    ap.add_argument("--blocking", action="store_true",
                    help="both clients sleep in recv instead of polling their sockets")
    args = ap.parse_args()
    args.perf_args = "" if args.blocking else "--poll"
    servers = [s for s in args.servers.split(",") if s]
    wanted = set(args.workloads.split(","))
    scratch = tempfile.mkdtemp(prefix="floor-bench.")
    daemons, pool = {}, None
    results = {}
    try:
        if "ram" in servers:
            daemons["ram"] = Daemon(args.binary, os.path.join(scratch, "ram"),
                                    ["--export", "mem=ram:1G"], args.server_cpu)
        if "volume" in servers:
            pool = os.path.join(args.pool_dir, f"floor-bench-{os.getpid()}.img")
            subprocess.run([args.binary, "pool", "create", pool, "--size", "2G"], check=True,
                           capture_output=True)
            daemons["volume"] = Daemon(args.binary, os.path.join(scratch, "volume"),
                                       ["--pool", pool], args.server_cpu)
        for name, d in daemons.items():
            d.start()
            if name == "volume":
                d.rpc("volume", "create", "mem", "1G")
            fill(args, d)  # written: reads read data
        for label, rw, qd in WORKLOADS:
            if label not in wanted:
                continue
            shape = "nvmf-read4k" if rw == "randread" else "nvmf-write4k"
            runs = {s: [] for s in servers}
            for rep in range(args.reps):
                order = servers if rep % 2 == 0 else servers[::-1]
                for name in order:
                    if name.startswith("floor"):
                        # The floor's cheaper mode at this depth (see the header).
                        span = "1G" if name == "floor-1g" else "0"
                        f = Floor(args.floor, shape, qd == 1, span, args.server_cpu)
                        try:
                            r = one(args, f, "nvmf", rw, "4k", qd, client=floor_client)
                        finally:
                            f.stop()
                    else:
                        r = one(args, daemons[name], "nvmf", rw, "4k", qd)
                    log(f"{label} {name} rep {rep}: {r['iops']:.0f} IOPS, avg "
                        f"{r['lat_avg_us']:.1f} us, server {r['server_cpu_us_per_io']:.2f} us/IO")
                    runs[name].append(r)
            results[label] = {
                "runs": runs,
                "median": {n: {k: med(v, k) for k in v[0]} for n, v in runs.items()},
            }
    finally:
        for d in daemons.values():
            d.stop()
        if pool:
            os.unlink(pool)
    os.makedirs(os.path.join(PERF_DIR, "results"), exist_ok=True)
    path = os.path.join(PERF_DIR, "results", time.strftime("floor-%Y%m%d-%H%M%S.json"))
    with open(path, "w") as f:
        json.dump({"binary": args.binary, "servers": servers, "reps": args.reps,
                   "runtime": args.runtime, "blocking": args.blocking, "results": results},
                  f, indent=1)
    print(render(results, servers))
    log(f"results: {path}")


def render(results, servers):
    # ab_bench's columns up to the TCP segments (the floor has no ring counters).
    cols = COLUMNS[:[c[0] for c in COLUMNS].index("tcp_segs_per_io") + 1]
    out = ["| workload | server | " + " | ".join(c[1] for c in cols) + " |",
           "|---|---|" + "---|" * len(cols)]
    for label, r in results.items():
        base_name = "floor-1g" if "floor-1g" in servers else "floor"
        base = r["median"].get(base_name)
        for name in servers:
            m = r["median"][name]
            cells = []
            for k, _, d in cols:
                cell = "—" if m.get(k) is None else f"{m[k]:.{d}f}"
                if base and not name.startswith("floor") and m.get(k) is not None and base.get(k):
                    cell += f" ({m[k] / base[k]:.2f}x)"
                cells.append(cell)
            out.append(f"| {label} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    if "--render" in sys.argv:
        with open(sys.argv[sys.argv.index("--render") + 1]) as f:
            doc = json.load(f)
        print(render(doc["results"], doc["servers"]))
    else:
        main()
