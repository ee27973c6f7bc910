#!/usr/bin/env python3
"""volume-bench: what the volume layer costs and what it buys, measured in one run.

On one filesystem, with the server pinned to one CPU and fio (ioengine=nbd) to the other:
  1. raw file export vs a fully allocated volume: 4k random overwrite and read, QD32, alternating
     runs, medians of --reps, server CPU per I/O (aim: volume >= 0.9x raw IOPS); over NBD with
     fio, and over NVMe/TCP with ballast-perf (a lighter client, so the server shows more);
  2. first writes into unallocated space: one 4k write per 64 KiB cluster (every write
     allocates), vs the same pattern on a fresh sparse raw file;
  3. first writes after a snapshot: one 4k write per cluster of the snapshotted volume (every
     write copies its cluster's other 60 KiB), vs the same pattern again (in place);
  4. snapshot create latency of thin volumes of 1 GiB, 100 GiB and 10 TiB (control API, includes
     the commit: fsync + journal FUA);
  5. restart-to-serving after kill -9 with --clusters mapped clusters (default 1M), and the
     metadata bytes per TiB mapped (checkpoint, journal ring and RAM).

Only the Python standard library is used. Results: a JSON file under perf/results/ and a
Markdown summary on stdout.
"""

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

PERF_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(PERF_DIR)
sys.path.insert(0, PERF_DIR)
from nbd_bench import log, pick_port, port_free, proc_cpu_seconds  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30


def free_port():
    # Below the ephemeral range (32768+): a port from it could be taken by an outgoing
    # connection, even by our own probe connecting to itself while nothing listens.
    return pick_port(random.randrange(20000, 31800))


class Daemon:
    """One `ballast serve`, pinned to a CPU."""

    def __init__(self, binary, data_dir, args, cpu, cores=1):
        """`cpu`: the CPU (or taskset list, e.g. "0,1") the daemon runs on; `cores`: its data
        cores."""
        self.binary, self.data_dir, self.args, self.cpu = binary, data_dir, args, cpu
        self.cores = cores
        self.port = free_port()
        self.nvmf_port = free_port()
        self.proc = None
        os.makedirs(data_dir, exist_ok=True)

    def start(self):
        cmd = ["taskset", "-c", str(self.cpu), self.binary, "serve", "--cores", str(self.cores),
               "--data-dir", self.data_dir, "--nbd-listen", f"127.0.0.1:{self.port}",
               "--nvmf-listen", f"127.0.0.1:{self.nvmf_port}"] + self.args
        self.log = open(os.path.join(self.data_dir, "serve.log"), "a")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=self.log)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ballast exited: see {self.data_dir}/serve.log")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    break
            except OSError:
                time.sleep(0.002)
        return time.monotonic() - t0

    def rpc(self, *args):
        out = subprocess.run([self.binary, *args, "--data-dir", self.data_dir],
                             capture_output=True, text=True, check=True)
        return out.stdout

    def reactors(self):
        """Per-core statistics (`ballast stats --json`), or None if the build has none."""
        out = subprocess.run([self.binary, "stats", "--json", "--data-dir", self.data_dir],
                             capture_output=True, text=True, timeout=30)
        if out.returncode != 0:
            return None
        try:
            return json.loads(out.stdout)["reactors"]
        except (ValueError, KeyError):
            return None

    def cpu_s(self):
        return proc_cpu_seconds(self.proc.pid)

    def kill9(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=60)


def fio(daemon, export, cpu, extra, runtime=None):
    """Runs fio against nbd://…/export; returns (iops, bytes, server cpu seconds, ios)."""
    cmd = ["taskset", "-c", str(cpu), "fio", "--name=job", "--ioengine=nbd",
           f"--uri=nbd://127.0.0.1:{daemon.port}/{export}", "--output-format=json",
           "--group_reporting"] + extra
    if runtime:
        cmd += ["--time_based", f"--runtime={runtime}", "--ramp_time=1"]
    c0 = daemon.cpu_s()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    c1 = daemon.cpu_s()
    if out.returncode != 0:
        raise RuntimeError(f"fio failed: {out.stderr[-2000:]}")
    text = out.stdout[out.stdout.index("{"):]
    job = json.loads(text)["jobs"][0]
    iops = job["read"]["iops"] + job["write"]["iops"] + job["trim"]["iops"]
    ios = job["read"]["total_ios"] + job["write"]["total_ios"] + job["trim"]["total_ios"]
    return {"iops": iops, "ios": ios, "cpu_s": c1 - c0,
            "cpu_us_per_io": (c1 - c0) * 1e6 / max(ios, 1)}


def median(rows, key):
    return statistics.median(r[key] for r in rows)


def fio_4k(daemon, export, rw, args):
    return fio(daemon, export, args.fio_cpu,
               [f"--rw={rw}", "--bs=4k", "--iodepth=32", f"--size={args.size}G"], args.runtime)


def raw_vs_volume(raw, pool, args, runner, label):
    """4k random overwrite and read, QD32: alternating raw/volume runs, medians."""
    res = {}
    for rw in ("randwrite", "randread"):
        runs = {"raw": [], "volume": []}
        for rep in range(args.reps):
            for name, d, export in (("raw", raw, "raw"), ("volume", pool, "full")):
                r = runner(d, export, rw, args)
                log(f"{label} {rw} {name} rep {rep}: {r['iops']:.0f} IOPS, "
                    f"{r['cpu_us_per_io']:.2f} us CPU/IO")
                runs[name].append(r)
        med = {k: {"iops": median(v, "iops"), "cpu_us_per_io": median(v, "cpu_us_per_io")}
               for k, v in runs.items()}
        med["ratio_iops"] = med["volume"]["iops"] / med["raw"]["iops"]
        med["ratio_cpu_per_io"] = med["volume"]["cpu_us_per_io"] / med["raw"]["cpu_us_per_io"]
        res[f"{label}-{rw}-4k-qd32"] = {"runs": runs, "median": med}
    return res


def nvme_perf(daemon, export, rw, args):
    """ballast-perf (our NVMe/TCP initiator, lighter than fio) against export's subsystem."""
    perf = os.path.join(os.path.dirname(args.binary), "ballast-perf")
    cmd = ["taskset", "-c", str(args.fio_cpu), perf, "--addr",
           f"127.0.0.1:{daemon.nvmf_port}", "--nqn", f"nqn.2026-11.dev.ballast:{export}",
           "--rw", rw, "--bs", "4k", "--qd", "32", "--runtime", str(args.runtime),
           "--size", f"{args.size}G", "--json"]
    c0 = daemon.cpu_s()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    c1 = daemon.cpu_s()
    if out.returncode != 0:
        raise RuntimeError(f"ballast-perf failed: {out.stderr[-1000:]}")
    job = json.loads(out.stdout)["jobs"][0]
    iops = sum(job[d]["iops"] for d in ("read", "write") if d in job)
    ios = sum(job[d]["total_ios"] for d in ("read", "write") if d in job)
    return {"iops": iops, "ios": ios, "cpu_s": c1 - c0,
            "cpu_us_per_io": (c1 - c0) * 1e6 / max(ios, 1)}


def strided(size_gib):
    # One 4 KiB write, then skip the other 60 KiB: one write per 64 KiB cluster.
    return ["--rw=write:60k", "--bs=4k", "--iodepth=32", f"--size={size_gib}G"]


def bench_first_writes(raw_sparse, pool, args):
    r_raw = fio(raw_sparse, "sparse", args.fio_cpu, strided(args.size))
    pool.rpc("volume", "create", "fresh", f"{args.size}G")
    r_vol = fio(pool, "fresh", args.fio_cpu, strided(args.size))
    log(f"first writes: raw sparse {r_raw['iops']:.0f}, volume {r_vol['iops']:.0f} IOPS")
    return {"raw_sparse": r_raw, "volume": r_vol, "ratio_iops": r_vol["iops"] / r_raw["iops"]}


def bench_after_snapshot(pool, args):
    pool.rpc("snapshot", "create", "full", "full-snap")
    first = fio(pool, "full", args.fio_cpu, strided(args.size))
    again = fio(pool, "full", args.fio_cpu, strided(args.size))
    log(f"after snapshot: first {first['iops']:.0f}, again {again['iops']:.0f} IOPS")
    pool.rpc("volume", "delete", "full-snap")
    return {"first_after_snapshot": first, "in_place_again": again,
            "ratio_iops": first["iops"] / again["iops"]}


def bench_snapshot_latency(binary, scratch, args):
    path = os.path.join(scratch, "big.img")
    # Room for a 10 TiB volume and one snapshot of it within the provisioning limit.
    subprocess.run([binary, "pool", "create", path, "--size", "3000G"], check=True,
                   capture_output=True)
    d = Daemon(binary, os.path.join(scratch, "big"), ["--pool", path], args.server_cpu)
    d.start()
    out = {}
    try:
        for label, size in (("1GiB", "1G"), ("100GiB", "100G"), ("10TiB", "10T")):
            name = f"thin{label}"
            d.rpc("volume", "create", name, size)
            fio(d, name, args.fio_cpu, ["--rw=randwrite", "--bs=64k", "--iodepth=8",
                                        "--size=" + size, "--io_size=64M", "--end_fsync=1"])
            lat = []
            for i in range(args.snapshots):
                t0 = time.monotonic()
                text = d.rpc("snapshot", "create", name, f"{name}-s{i}")
                client_us = (time.monotonic() - t0) * 1e6
                server_us = int(re.search(r"in (\d+) us", text).group(1))
                lat.append({"server_us": server_us, "client_us": client_us})
                d.rpc("volume", "delete", f"{name}-s{i}")
            out[label] = {"median_server_us": median(lat, "server_us"),
                          "median_client_us": median(lat, "client_us"), "runs": lat}
            log(f"snapshot of a {label} volume: {out[label]['median_server_us']:.0f} us")
            d.rpc("volume", "delete", name)
    finally:
        d.stop()
        os.unlink(path)
    return out


def bench_restart(binary, scratch, args):
    clusters = args.clusters
    size_gib = max(1, (clusters * 64 * 1024 + GiB - 1) // GiB)
    path = os.path.join(scratch, "restart.img")
    subprocess.run([binary, "pool", "create", path, "--size", f"{size_gib + 4}G"], check=True,
                   capture_output=True)
    d = Daemon(binary, os.path.join(scratch, "restart"), ["--pool", path], args.server_cpu)
    d.start()
    d.rpc("volume", "create", "big", f"{size_gib}G")
    log(f"mapping {clusters} clusters (one 4k write each)")
    fill = fio(d, "big", args.fio_cpu, ["--rw=write:60k", "--bs=4k", "--iodepth=32",
                                        f"--size={size_gib}G", f"--number_ios={clusters}",
                                        "--end_fsync=1"])
    mapped = json.loads(d.rpc("volume", "list", "--json"))[0]["allocated_bytes"] // 4096
    restarts = []
    for i in range(args.reps):
        d.kill9()
        # The dead daemon's listening sockets live until the kernel tears down its io_uring;
        # wait for that (reported apart), then time the restart itself.
        t_kill = time.monotonic()
        while not port_free(d.port):
            time.sleep(0.002)
        released = time.monotonic() - t_kill
        t0 = time.monotonic()
        d.start()
        # Serving = a client completes the handshake.
        info = subprocess.run(["nbdinfo", f"nbd://127.0.0.1:{d.port}/big"],
                              capture_output=True, text=True)
        serving = time.monotonic() - t0
        if info.returncode != 0:
            raise RuntimeError(f"nbdinfo after restart: {info.stderr}; log {d.data_dir}/serve.log")
        restarts.append({"serving_s": serving, "old_sockets_released_s": released})
        log(f"restart {i} after kill -9: serving in {serving:.3f} s "
            f"(old sockets released after {released:.3f} s)")
    d.stop()  # clean stop: checkpoint
    dump = subprocess.run([binary, "pool", "dump", path], capture_output=True, text=True,
                          check=True).stdout
    ckpt_blocks = int(re.search(r"checkpoint_blocks: (\d+)", dump).group(1))
    journal_blocks = int(re.search(r"journal_blocks: (\d+)", dump).group(1))
    rss_kib = None
    ckpt_bytes = ckpt_blocks * 4096
    per_tib = ckpt_bytes / (mapped * 65536) * (1 << 40) if mapped else None
    os.unlink(path)
    return {"mapped_clusters": mapped, "fill": fill, "restarts": restarts,
            "median_restart_s": median(restarts, "serving_s"),
            "checkpoint_bytes": ckpt_bytes, "journal_ring_bytes": journal_blocks * 4096,
            "checkpoint_bytes_per_tib_mapped": per_tib, "rss_kib": rss_kib}


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default=os.path.join(REPO, "build/cargo/release/ballast"))
    ap.add_argument("--dir", default="/var/tmp", help="scratch filesystem")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--runtime", type=int, default=8, help="seconds per timed fio run")
    ap.add_argument("--size", type=int, default=1, help="GiB per benchmark volume")
    ap.add_argument("--snapshots", type=int, default=5)
    ap.add_argument("--clusters", type=int, default=1_000_000)
    ap.add_argument("--server-cpu", type=int, default=0)
    ap.add_argument("--fio-cpu", type=int, default=1)
    ap.add_argument("--skip", default="", help="comma list: overwrite,nvme,first,snapshot,latency,restart")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    scratch = tempfile.mkdtemp(prefix="ballast-volbench.", dir=args.dir)
    results = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "args": vars(args)}
    daemons = []
    try:
        b = args.binary
        raw_path = os.path.join(scratch, "raw.img")
        sparse_path = os.path.join(scratch, "sparse.img")
        pool_path = os.path.join(scratch, "pool.img")
        # Prepared like the pool file: sparse, then written once by fio below.
        subprocess.run(["truncate", "-s", f"{args.size}G", raw_path], check=True)
        subprocess.run(["truncate", "-s", f"{args.size}G", sparse_path], check=True)
        subprocess.run([b, "pool", "create", pool_path, "--size", f"{4 * args.size + 2}G"],
                       check=True, capture_output=True)
        raw = Daemon(b, os.path.join(scratch, "raw"),
                     ["--export", f"raw=file:{raw_path}", "--export", f"sparse=file:{sparse_path}"],
                     args.server_cpu)
        pool = Daemon(b, os.path.join(scratch, "pool"), ["--pool", pool_path], args.server_cpu)
        daemons += [raw, pool]
        raw.start()
        pool.start()
        pool.rpc("volume", "create", "full", f"{args.size}G")
        log("allocating the volume fully")
        fio(pool, "full", args.fio_cpu, ["--rw=write", "--bs=1m", "--iodepth=4",
                                         f"--size={args.size}G", "--end_fsync=1"])
        fio(raw, "raw", args.fio_cpu, ["--rw=write", "--bs=1m", "--iodepth=4",
                                       f"--size={args.size}G", "--end_fsync=1"])
        if "overwrite" not in skip:
            results["overwrite"] = raw_vs_volume(raw, pool, args, fio_4k, "nbd")
        if "nvme" not in skip:
            results["overwrite_nvme"] = raw_vs_volume(raw, pool, args, nvme_perf, "nvme")
        if "first" not in skip:
            results["first_writes"] = bench_first_writes(raw, pool, args)
        if "snapshot" not in skip:
            results["after_snapshot"] = bench_after_snapshot(pool, args)
        raw.stop()
        pool.stop()
        if "latency" not in skip:
            results["snapshot_latency"] = bench_snapshot_latency(b, scratch, args)
        if "restart" not in skip:
            results["restart"] = bench_restart(b, scratch, args)
    finally:
        for d in daemons:
            try:
                d.stop()
            except Exception:  # noqa: BLE001
                pass
        if os.environ.get("KEEP"):
            log(f"scratch kept: {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    os.makedirs(os.path.join(PERF_DIR, "results"), exist_ok=True)
    out = os.path.join(PERF_DIR, "results", f"volume-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    print(render(results))
    log(f"results: {out}")


def render(r):
    lines = ["| measurement | raw file | volume | ratio |", "|---|---|---|---|"]
    for prof, v in list(r.get("overwrite", {}).items()) + list(r.get("overwrite_nvme", {}).items()):
        m = v["median"]
        lines.append(f"| {prof} IOPS (median) | {m['raw']['iops']:.0f} | {m['volume']['iops']:.0f} "
                     f"| {m['ratio_iops']:.2f}x |")
        lines.append(f"| {prof} server CPU us/IO | {m['raw']['cpu_us_per_io']:.2f} | "
                     f"{m['volume']['cpu_us_per_io']:.2f} | {m['ratio_cpu_per_io']:.2f}x |")
    if "first_writes" in r:
        f = r["first_writes"]
        lines.append(f"| first 4k write per cluster IOPS (raw: sparse file) | "
                     f"{f['raw_sparse']['iops']:.0f} | {f['volume']['iops']:.0f} | "
                     f"{f['ratio_iops']:.2f}x |")
    if "after_snapshot" in r:
        a = r["after_snapshot"]
        lines.append(f"| first 4k write per cluster after a snapshot vs in place again | "
                     f"{a['in_place_again']['iops']:.0f} | {a['first_after_snapshot']['iops']:.0f} | "
                     f"{a['ratio_iops']:.2f}x |")
    out = "\n".join(lines)
    if "snapshot_latency" in r:
        out += "\n\n| thin volume | snapshot create, server (us) | via CLI (us) |\n|---|---|---|\n"
        for label, v in r["snapshot_latency"].items():
            out += f"| {label} | {v['median_server_us']:.0f} | {v['median_client_us']:.0f} |\n"
    if "restart" in r:
        x = r["restart"]
        out += (f"\nrestart after kill -9 with {x['mapped_clusters']} mapped clusters: "
                f"median {x['median_restart_s']:.3f} s to serving a client; checkpoint "
                f"{x['checkpoint_bytes']} bytes = "
                f"{(x['checkpoint_bytes_per_tib_mapped'] or 0) / (1 << 20):.0f} MiB per TiB mapped; "
                f"journal ring {x['journal_ring_bytes'] >> 20} MiB\n")
    return out


if __name__ == "__main__":
    main()
