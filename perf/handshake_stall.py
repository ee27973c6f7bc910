#!/usr/bin/env python3
"""handshake-stall: what a storm of TLS handshakes does to the I/O latency of other clients on
the same core, with handshakes on the core (--offload-threads 0) and off it (the default, 2
offload threads), same build, one run (issue 9: "work in the wrong place").

Each daemon serves one RAM export with --cores 1 and --nbd-tls on (TLS-PSK); the process may
use CPUs --server-cpus (the reactor pins itself to the first; offload threads float). fio
(ioengine=nbd, plaintext) reads 4k at random at QD1 for --runtime seconds, pinned to
--client-cpu, alone and then while a libnbd client (/usr/bin/python3, GnuTLS) on the same CPU
connects over TLS, negotiates and disconnects in a loop. Reported: fio's completion latency
p50 / p99 / p99.9 / max and IOPS, the storm's handshakes per second, and the core's offload
counters. Medians of --reps. JSON under perf/results/, Markdown on stdout; ratios only, the
machines are noisy.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

PERF_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(PERF_DIR)
sys.path.insert(0, PERF_DIR)
from nbd_bench import log  # noqa: E402
from volume_bench import Daemon, free_port  # noqa: E402

STORM = r"""
import nbd, sys, time
uri, stop_file = sys.argv[1], sys.argv[2]
n, t0 = 0, time.monotonic()
import os
while not os.path.exists(stop_file):
    h = nbd.NBD()
    h.set_uri_allow_local_file(True)
    h.connect_uri(uri)
    h.shutdown()
    del h
    n += 1
print(n / (time.monotonic() - t0))
"""


def fio_qd1(args, daemon):
    cmd = ["taskset", "-c", str(args.client_cpu), "fio", "--name=qd1", "--ioengine=nbd",
           f"--uri=nbd://127.0.0.1:{daemon.port}/mem", "--rw=randread", "--bs=4k",
           "--iodepth=1", "--time_based", f"--runtime={args.runtime}", "--ramp_time=1",
           "--percentile_list=50:99:99.9", "--output-format=json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.runtime * 5 + 60)
    if out.returncode != 0:
        raise RuntimeError(f"fio failed: {out.stderr[-1500:]}")
    job = json.loads(out.stdout[out.stdout.index("{"):])["jobs"][0]["read"]
    pct = job["clat_ns"]["percentile"]
    return {"iops": job["iops"], "p50_us": pct["50.000000"] / 1e3,
            "p99_us": pct["99.000000"] / 1e3, "p999_us": pct["99.900000"] / 1e3,
            "max_us": job["clat_ns"]["max"] / 1e3}


def offload_counters(daemon):
    text = urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics_port}/metrics").read().decode()
    total = {"offloaded": 0, "in_place": 0}
    for line in text.splitlines():
        if line.startswith("ballast_core_offloaded_total"):
            total["offloaded"] += int(float(line.split()[-1]))
        elif line.startswith("ballast_core_offload_in_place_total"):
            total["in_place"] += int(float(line.split()[-1]))
    return total


def with_storm(args, daemon, scratch):
    stop = os.path.join(scratch, "stop")
    if os.path.exists(stop):
        os.unlink(stop)
    storm = subprocess.Popen(["taskset", "-c", str(args.client_cpu), "/usr/bin/python3", "-c",
                              STORM, daemon.tls_uri, stop], stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)
    try:
        r = fio_qd1(args, daemon)
    finally:
        open(stop, "w").close()
        out, _ = storm.communicate(timeout=60)
    r["handshakes_per_s"] = float(out.strip() or 0)
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--binary", default=os.path.join(REPO, "build/cargo/release/ballast"))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--runtime", type=int, default=5)
    ap.add_argument("--server-cpus", default="0,1")
    ap.add_argument("--client-cpu", type=int, default=1)
    args = ap.parse_args()
    scratch = tempfile.mkdtemp(prefix="handshake-stall.")
    psk = os.path.join(scratch, "keys.psk")
    with open(psk, "w") as f:
        f.write("bench:" + os.urandom(32).hex() + "\n")
    os.chmod(psk, 0o600)
    modes = {"on the core": "0", "offload threads": "2"}
    daemons = {}
    for name, threads in modes.items():
        metrics_port = free_port()
        d = Daemon(args.binary, os.path.join(scratch, threads),
                   ["--export", "mem=ram:256M", "--nbd-tls", "on", "--nbd-tls-psk", psk,
                    "--offload-threads", threads, "--metrics-listen",
                    f"127.0.0.1:{metrics_port}"], args.server_cpus)
        d.metrics_port = metrics_port
        d.start()
        d.tls_uri = f"nbds://bench@127.0.0.1:{d.port}/mem?tls-psk-file={psk}"
        daemons[name] = d
    results = {}
    try:
        for name, d in daemons.items():
            runs = {"alone": [], "storm": []}
            for rep in range(args.reps):
                runs["alone"].append(fio_qd1(args, d))
                runs["storm"].append(with_storm(args, d, scratch))
                log(f"{name} rep {rep}: alone p99 {runs['alone'][-1]['p99_us']:.0f} us, storm "
                    f"p99 {runs['storm'][-1]['p99_us']:.0f} us max "
                    f"{runs['storm'][-1]['max_us']:.0f} us, "
                    f"{runs['storm'][-1]['handshakes_per_s']:.0f} handshakes/s")
            results[name] = {k: {m: statistics.median(r[m] for r in v) for m in v[0]}
                             for k, v in runs.items()}
            results[name]["counters"] = offload_counters(d)
    finally:
        for d in daemons.values():
            d.stop()
    os.makedirs(os.path.join(PERF_DIR, "results"), exist_ok=True)
    path = os.path.join(PERF_DIR, "results", f"handshake-stall-{int(time.time())}.json")
    with open(path, "w") as f:
        json.dump({"args": vars(args), "results": results}, f, indent=1)
    print(f"\nResults: {path}\n")
    print("| handshakes | load | QD1 IOPS | p50 µs | p99 µs | p99.9 µs | max µs | handshakes/s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        for load in ("alone", "storm"):
            x = r[load]
            print(f"| {name} | {load} | {x['iops']:.0f} | {x['p50_us']:.0f} | {x['p99_us']:.0f} | "
                  f"{x['p999_us']:.0f} | {x['max_us']:.0f} | "
                  f"{x.get('handshakes_per_s', 0):.0f} |")
        print(f"<!-- {name}: {r['counters']} -->")


if __name__ == "__main__":
    main()
