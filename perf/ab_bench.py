#!/usr/bin/env python3
"""ab-bench: this build against a previous one, side by side in one run (issue 12).

Both daemons serve a 1 GiB RAM export (the media costs nothing) — or, with --backing volume,
a fully written 1 GiB volume of a pool file on --pool-dir (tmpfs by default, so the media costs
nothing and the volume layer shows) — one core each, pinned to the same CPU (--server-cpu, one
daemon at a time under load); the client runs on another CPU (--client-cpu). For NBD the
client is fio (ioengine=nbd; `--nbd-client ballast-perf`: ballast-perf --nbd), for NVMe/TCP
ballast-perf. Runs alternate between the builds (old, new / new, old, ...), medians of --reps. Workloads:
4k random read and write at QD1 and QD32, 128k sequential read and write at QD8.

With --backing file, each daemon exports a file or block device of its own (--paths OLD,NEW:
O_DIRECT media, e.g. two zram devices); with --backing volume and --paths, each pool lives
there instead of in --pool-dir. --old-args / --new-args add serve flags to one side, so one
binary can be run against itself with a feature off (e.g. --old-binary the same build and
--old-args "--registered-files 0 --registered-buffers 0").

Per run: IOPS, average and p99 completion latency, server CPU per I/O (the daemon's
utime+stime), client CPU per I/O (the client's own usr+sys), TCP segments per I/O
(/proc/net/snmp OutSegs, both directions of the loopback connection: machine-wide, so keep the
machine otherwise quiet), and — where the build reports them (`ballast stats`: ring_enters,
sends, recvs, sleeps, loops_busy, reads_lent) — the server's system calls into its ring, its
socket sends, its sleeps in the ring, its busy loop turns and its reads sent straight from a
RAM export's memory per I/O; for a volume, its borrows of the pool state per I/O
(volume_rounds: one per flush round with volume work).

Only the Python standard library is used. Results: a JSON file under perf/results/ and a
Markdown table on stdout. The machines are noisy: compare ratios, not absolute numbers.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

PERF_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(PERF_DIR)
sys.path.insert(0, PERF_DIR)
from nbd_bench import log  # noqa: E402
from volume_bench import Daemon  # noqa: E402

WORKLOADS = [
    ("4k-randread-qd1", "randread", "4k", 1),
    ("4k-randwrite-qd1", "randwrite", "4k", 1),
    ("4k-randread-qd32", "randread", "4k", 32),
    ("4k-randwrite-qd32", "randwrite", "4k", 32),
    ("128k-read-qd8", "read", "128k", 8),
    ("128k-write-qd8", "write", "128k", 8),
]


# `ballast stats` counters reported per I/O, where the build has them.
COUNTERS = ("ring_enters", "sends", "recvs", "volume_rounds", "volume_events", "sleeps",
            "loops_busy", "fixed_file_ops", "fixed_buf_ops", "allocations", "reads_lent")


def tcp_out_segs():
    with open("/proc/net/snmp") as f:
        lines = [ln.split() for ln in f if ln.startswith("Tcp:")]
    header, values = lines[0], lines[1]
    return int(values[header.index("OutSegs")])


def server_counters(daemon):
    """Sums of the daemon's per-core ring counters, or None if the build has none."""
    reactors = daemon.reactors()
    if not reactors or "ring_enters" not in reactors[0]:
        return None
    return {k: sum(r[k] for r in reactors) for k in COUNTERS if k in reactors[0]}


def job_side(job):
    """The direction that did the I/O in a fio-like job."""
    for d in ("read", "write"):
        if job.get(d, {}).get("total_ios", 0) > 0:
            return job[d]
    return job["read"]


def client_run(args, daemon, proto, rw, bs, qd):
    """Runs the client once; returns the parsed job (fio-like JSON) and its wall seconds."""
    if proto == "nbd" and args.nbd_client == "ballast-perf":
        uri = getattr(daemon, "nbd_uri", None) or f"nbd://127.0.0.1:{daemon.port}/mem"
        addr, export = uri[len("nbd://"):].split("/", 1)
        cmd = ["taskset", "-c", str(args.client_cpu), args.perf, "--nbd", export, "--addr", addr,
               "--rw", rw, "--bs", bs, "--qd", str(qd), "--runtime", str(args.runtime),
               "--size", "1G", "--json"] + args.perf_args.split()
    elif proto == "nbd":
        uri = getattr(daemon, "nbd_uri", None) or f"nbd://127.0.0.1:{daemon.port}/mem"
        cmd = ["taskset", "-c", str(args.client_cpu), "fio", "--name=job", "--ioengine=nbd",
               f"--uri={uri}", "--output-format=json",
               f"--rw={rw}", f"--bs={bs}", f"--iodepth={qd}", "--size=1G", "--time_based",
               f"--runtime={args.runtime}", "--ramp_time=1"]
    else:
        cmd = ["taskset", "-c", str(args.client_cpu), args.perf, "--addr",
               f"127.0.0.1:{daemon.nvmf_port}", "--nqn", "nqn.2026-11.dev.ballast:mem",
               "--rw", rw, "--bs", bs, "--qd", str(qd), "--runtime", str(args.runtime),
               "--size", "1G", "--json"] + args.perf_args.split()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.runtime * 10 + 60)
    if out.returncode != 0:
        raise RuntimeError(f"{cmd[3]} failed: {out.stderr[-1500:]}")
    text = out.stdout[out.stdout.index("{"):]
    return json.loads(text)["jobs"][0]


def fill(args, daemon, size="1G"):
    """Writes the whole export once (fio, sequential 1 MiB, QD8, not time-based), so reads read
    data: a time-based pass leaves most of a RAM export unwritten while its first writes take
    their huge pages."""
    uri = getattr(daemon, "nbd_uri", None) or f"nbd://127.0.0.1:{daemon.port}/mem"
    cmd = ["taskset", "-c", str(args.client_cpu), "fio", "--name=fill", "--ioengine=nbd",
           f"--uri={uri}", "--rw=write", "--bs=1m", "--iodepth=8", f"--size={size}",
           "--output-format=json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"fill failed: {out.stderr[-1500:]}")


def one(args, daemon, proto, rw, bs, qd, client=None):
    """One measured run of `client` (by default `client_run`) against `daemon`."""
    c0, s0, k0 = daemon.cpu_s(), tcp_out_segs(), server_counters(daemon)
    t0 = time.monotonic()
    job = (client or client_run)(args, daemon, proto, rw, bs, qd)
    wall = time.monotonic() - t0
    c1, s1, k1 = daemon.cpu_s(), tcp_out_segs(), server_counters(daemon)
    side = job_side(job)
    ios = max(side["total_ios"], 1)
    # fio's ramp time is not in total_ios but is in the daemon's CPU and the segments; scale
    # the server-side deltas by the share of the wall time the measured part took.
    runtime_s = (job.get("job_runtime") or side.get("runtime") or args.runtime * 1000) / 1000
    share = min(1.0, runtime_s / wall) if wall > 0 else 1.0
    lat = side.get("clat_ns") or side.get("lat_ns") or {}
    pct = lat.get("percentile", {})
    p99 = next((v for k, v in pct.items() if k.startswith("99.0")), 0)
    client_cpu_s = (job.get("usr_cpu", 0) + job.get("sys_cpu", 0)) / 100 * runtime_s
    r = {
        "iops": side["iops"],
        "lat_avg_us": lat.get("mean", 0) / 1000,
        "lat_p99_us": p99 / 1000,
        "server_cpu_us_per_io": (c1 - c0) * share * 1e6 / ios,
        "client_cpu_us_per_io": client_cpu_s * 1e6 / ios,
        "tcp_segs_per_io": (s1 - s0) * share / ios,
    }
    if k0 and k1:
        for k in COUNTERS:
            if k in k0 and k in k1:
                r[f"server_{k}_per_io"] = (k1[k] - k0[k]) * share / ios
    return r


def med(runs, key):
    vals = [r[key] for r in runs if key in r]
    return statistics.median(vals) if vals else None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--binary", default=os.path.join(REPO, "build/cargo/release/ballast"))
    ap.add_argument("--old-binary", required=True)
    ap.add_argument("--perf", default=os.path.join(REPO, "build/cargo/release/ballast-perf"),
                    help="the NVMe/TCP client (the same for both builds)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--runtime", type=int, default=5)
    ap.add_argument("--server-cpu", type=int, default=0)
    ap.add_argument("--client-cpu", type=int, default=1)
    ap.add_argument("--protocols", default="nbd,nvme")
    ap.add_argument("--nbd-client", choices=("fio", "ballast-perf"), default="fio",
                    help="NBD's client: fio's libnbd engine (one request per system call: on a "
                         "small machine it sets the pace) or ballast-perf --nbd (pipelined, "
                         "batched; --perf-args applies to it too)")
    ap.add_argument("--workloads", default=",".join(w[0] for w in WORKLOADS))
    ap.add_argument("--backing", choices=("ram", "volume", "file"), default="ram",
                    help="what both daemons export: a RAM device, a volume of a pool, or a "
                    "file / block device (--paths)")
    ap.add_argument("--pool-dir", default="/dev/shm",
                    help="where the pool files go with --backing volume")
    ap.add_argument("--paths", default="",
                    help="OLD,NEW: the file or block device each daemon exports (--backing "
                    "file) or keeps its pool on (--backing volume); 1 GiB or more each")
    ap.add_argument("--no-fill", action="store_true",
                    help="skip writing the export before the runs (reads then read what the "
                    "media gives unwritten blocks)")
    ap.add_argument("--old-args", default="", help="extra serve flags for the old side")
    ap.add_argument("--new-args", default="", help="extra serve flags for the new side")
    ap.add_argument("--perf-args", default="",
                    help="extra ballast-perf flags (e.g. --poll: a polling initiator, as SPDK's perf)")
    args = ap.parse_args()
    paths = [p for p in args.paths.split(",") if p]
    if args.backing == "file" and len(paths) != 2:
        ap.error("--backing file needs --paths OLD,NEW")
    protos = [p for p in args.protocols.split(",") if p]
    wanted = set(args.workloads.split(","))
    scratch = tempfile.mkdtemp(prefix="ab-bench.")
    daemons = {}
    pools = []
    for i, (name, binary) in enumerate((("old", args.old_binary), ("new", args.binary))):
        if args.backing == "ram":
            serve = ["--export", "mem=ram:1G"]
        elif args.backing == "file":
            serve = ["--export", f"mem=file:{paths[i]}"]
        elif paths:
            subprocess.run([binary, "pool", "create", paths[i]], check=True,
                           capture_output=True)
            serve = ["--pool", paths[i]]
        else:
            pool = os.path.join(args.pool_dir, f"ab-bench-{os.getpid()}-{name}.img")
            subprocess.run([binary, "pool", "create", pool, "--size", "2G"], check=True,
                           capture_output=True)
            pools.append(pool)
            serve = ["--pool", pool]
        serve += (args.old_args if name == "old" else args.new_args).split()
        d = Daemon(binary, os.path.join(scratch, name), serve, args.server_cpu)
        d.start()
        if args.backing == "volume":
            d.rpc("volume", "create", "mem", "1G")
        daemons[name] = d
    results = {}
    try:
        for d in daemons.values() if not args.no_fill else []:
            fill(args, d)
        for proto in protos:
            for label, rw, bs, qd in WORKLOADS:
                if label not in wanted:
                    continue
                runs = {"old": [], "new": []}
                for rep in range(args.reps):
                    for name in ("old", "new") if rep % 2 == 0 else ("new", "old"):
                        r = one(args, daemons[name], proto, rw, bs, qd)
                        log(f"{proto} {label} {name} rep {rep}: {r['iops']:.0f} IOPS, "
                            f"avg {r['lat_avg_us']:.1f} us, server "
                            f"{r['server_cpu_us_per_io']:.2f} us/IO")
                        runs[name].append(r)
                results[f"{proto}-{label}"] = {
                    "runs": runs,
                    "median": {n: {k: med(v, k) for k in v[0]} for n, v in runs.items()},
                }
    finally:
        for d in daemons.values():
            d.stop()
        for pool in pools:
            os.unlink(pool)
    os.makedirs(os.path.join(PERF_DIR, "results"), exist_ok=True)
    path = os.path.join(PERF_DIR, "results", time.strftime("ab-%Y%m%d-%H%M%S.json"))
    with open(path, "w") as f:
        json.dump({"old": args.old_binary, "new": args.binary, "backing": args.backing,
                   "paths": paths, "old_args": args.old_args, "new_args": args.new_args,
                   "reps": args.reps,
                   "runtime": args.runtime, "results": results}, f, indent=1)
    print(render(results))
    log(f"results: {path}")


# The report's columns: (key of a run's result, heading, decimals); client-side ones first.
COLUMNS = [("iops", "IOPS", 0), ("lat_avg_us", "avg µs", 1), ("lat_p99_us", "p99 µs", 1),
           ("server_cpu_us_per_io", "server µs/IO", 2),
           ("client_cpu_us_per_io", "client µs/IO", 2),
           ("tcp_segs_per_io", "TCP segs/IO", 2),
           ("server_ring_enters_per_io", "server syscalls/IO", 2),
           ("server_sends_per_io", "server sends/IO", 2),
           ("server_sleeps_per_io", "server sleeps/IO", 3),
           ("server_loops_busy_per_io", "server busy turns/IO", 2),
           ("server_volume_rounds_per_io", "pool-state borrows/IO", 3),
           ("server_fixed_buf_ops_per_io", "registered-buffer ops/IO", 2),
           ("server_allocations_per_io", "server heap allocations/IO", 3),
           ("server_reads_lent_per_io", "reads lent/IO", 2)]


def render(results, names=("old", "new")):
    cols = COLUMNS
    out = ["| run | build | " + " | ".join(c[1] for c in cols) + " |",
           "|---|---|" + "---|" * len(cols)]
    for label, r in results.items():
        for name in names:
            m = r["median"][name]
            cells = ["—" if m.get(k) is None else f"{m[k]:.{d}f}" for k, _, d in cols]
            out.append(f"| {label} | {name} | " + " | ".join(cells) + " |")
        o, n = r["median"][names[0]], r["median"][names[1]]
        ratio = [f"{n[k] / o[k]:.2f}x" if o.get(k) and n.get(k) is not None else "—"
                 for k, _, _ in cols]
        out.append(f"| {label} | {names[1]}/{names[0]} | " + " | ".join(ratio) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
