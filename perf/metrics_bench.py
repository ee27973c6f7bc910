#!/usr/bin/env python3
"""metrics-bench: what the Prometheus endpoint (serve --metrics-listen) costs.

  1. Scrape cost with 100 volumes in the pool (created through the CLI): --scrapes GETs of
     /metrics in a row, wall time per scrape seen by the client and the daemon's CPU per
     scrape (the cores' replies, the pool listing, the encoding), medians of --reps batches.
  2. CPU per I/O with metrics on vs off: two daemons on RAM exports (the media costs nothing),
     one without --metrics-listen, one with it and scraped every second (as Prometheus would),
     fio 4k random read QD32 over NBD, alternating runs, medians of --reps; the server pinned
     to one CPU and fio to the other. Aim (issue 11): <= 2% more CPU per I/O.

Only the Python standard library is used. `--quick` runs everything with tiny inputs (a test
that the script works). Results: a JSON file under perf/results/ and a Markdown summary on
stdout.
"""

import argparse
import json
import os
import socket
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
from volume_bench import Daemon, fio, free_port  # noqa: E402


def scrape(port):
    """One GET /metrics; returns the body's length in bytes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: bench\r\n\r\n")
        data = b""
        while True:
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"scrape failed: {head[:80]!r}")
    return len(body)


def scrape_cost(args, scratch):
    pool = os.path.join(scratch, "pool.img")
    binary = args.binary
    subprocess.run([binary, "pool", "create", pool, "--size", "20G"], check=True,
                   capture_output=True)
    mport = free_port()
    d = Daemon(binary, os.path.join(scratch, "scrape"),
               ["--pool", pool, "--metrics-listen", f"127.0.0.1:{mport}"], args.server_cpu)
    d.start()
    try:
        for i in range(args.volumes):
            d.rpc("volume", "create", f"v{i:03}", "64M")
        batches = []
        for _ in range(args.reps):
            c0, t0 = d.cpu_s(), time.perf_counter()
            size = 0
            for _ in range(args.scrapes):
                size = scrape(mport)
            wall, cpu = time.perf_counter() - t0, d.cpu_s() - c0
            batches.append({"wall_us": wall * 1e6 / args.scrapes,
                            "server_cpu_us": cpu * 1e6 / args.scrapes, "bytes": size})
            log(f"scrape: {batches[-1]}")
    finally:
        d.stop()
    return {
        "volumes": args.volumes,
        "scrapes_per_batch": args.scrapes,
        "batches": batches,
        "wall_us_per_scrape": statistics.median(b["wall_us"] for b in batches),
        "server_cpu_us_per_scrape": statistics.median(b["server_cpu_us"] for b in batches),
        "bytes_per_scrape": batches[-1]["bytes"],
    }


class Scraper:
    """Scrapes a daemon's /metrics every `interval` seconds in a thread while it runs."""

    def __init__(self, port, interval):
        self.port, self.interval, self.count = port, interval, 0
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop_event.wait(self.interval):
            scrape(self.port)
            self.count += 1

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop_event.set()
        self.thread.join()


def on_vs_off(args, scratch):
    mport = free_port()
    daemons = {
        "off": Daemon(args.binary, os.path.join(scratch, "off"), ["--export", "mem=ram:1G"],
                      args.server_cpu),
        "on": Daemon(args.binary, os.path.join(scratch, "on"),
                     ["--export", "mem=ram:1G", "--metrics-listen", f"127.0.0.1:{mport}"],
                     args.server_cpu),
    }
    for d in daemons.values():
        d.start()
    runs = {"off": [], "on": []}
    try:
        for d in daemons.values():
            fio(d, "mem", args.fio_cpu, ["--rw=write", "--bs=1M", "--iodepth=8", "--size=1G"])
        job = ["--rw=randread", "--bs=4k", "--iodepth=32", "--size=1G"]
        for rep in range(args.reps):
            order = ("off", "on") if rep % 2 == 0 else ("on", "off")
            for name in order:
                if name == "on":
                    with Scraper(mport, 1.0) as s:
                        r = fio(daemons[name], "mem", args.fio_cpu, job, args.runtime)
                    r["scrapes"] = s.count
                else:
                    r = fio(daemons[name], "mem", args.fio_cpu, job, args.runtime)
                runs[name].append(r)
                log(f"{name}: {r}")
    finally:
        for d in daemons.values():
            d.stop()
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("iops", "cpu_us_per_io")}
           for k, v in runs.items()}
    return {
        "runs": runs,
        "median": med,
        "iops_ratio_on_off": med["on"]["iops"] / med["off"]["iops"],
        "cpu_per_io_ratio_on_off": med["on"]["cpu_us_per_io"] / med["off"]["cpu_us_per_io"],
    }


def render(r):
    s, o = r["scrape"], r["on_off"]
    lines = [
        f"Scrape with {s['volumes']} volumes: {s['wall_us_per_scrape']:.0f} µs per scrape (client "
        f"wall), {s['server_cpu_us_per_scrape']:.0f} µs of daemon CPU, "
        f"{s['bytes_per_scrape']} bytes (medians of {len(s['batches'])} x "
        f"{s['scrapes_per_batch']} scrapes)",
        "",
        "| 4k randread QD32, NBD | IOPS | server CPU µs/IO |",
        "|---|---|---|",
    ]
    for k in ("off", "on"):
        m = o["median"][k]
        lines.append(f"| metrics {k} | {m['iops']:.0f} | {m['cpu_us_per_io']:.2f} |")
    lines.append(f"| on/off | {o['iops_ratio_on_off']:.3f}x | "
                 f"{o['cpu_per_io_ratio_on_off']:.3f}x |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--binary", default=os.path.join(REPO, "build/cargo/release/ballast"))
    p.add_argument("--volumes", type=int, default=100)
    p.add_argument("--scrapes", type=int, default=200)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--runtime", type=int, default=10)
    p.add_argument("--server-cpu", type=int, default=0)
    p.add_argument("--fio-cpu", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="tiny inputs: a test of the script")
    args = p.parse_args()
    if args.quick:
        args.volumes, args.scrapes, args.reps, args.runtime = 3, 5, 1, 2
    with tempfile.TemporaryDirectory(prefix="metrics-bench.") as scratch:
        result = {"scrape": scrape_cost(args, scratch), "on_off": on_vs_off(args, scratch)}
    if not args.quick:
        os.makedirs(os.path.join(PERF_DIR, "results"), exist_ok=True)
        path = os.path.join(PERF_DIR, "results",
                            "metrics-%s.json" % time.strftime("%Y%m%d-%H%M%S"))
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        log(f"results: {path}")
    print(render(result))


if __name__ == "__main__":
    main()
