#!/usr/bin/env python3
"""tls-bench: NBD over TLS against plaintext, the same build, side by side in one run (issue 9).

Two daemons of one build serve a 1 GiB RAM export, one core each, pinned to the same CPU
(--server-cpu); one plaintext, one with `--nbd-tls require` and a TLS-PSK key. fio
(ioengine=nbd, libnbd with GnuTLS: `nbds://` URIs) runs on another CPU. Runs alternate between
the two, medians of --reps, the columns of perf/ab_bench.py: 4k random read/write at QD32,
128k sequential read/write at QD8 by default. Then handshakes: --handshakes sequential
connect + NBD_OPT_GO + disconnect through libnbd's Python binding, plaintext and TLS:
handshakes per second and server CPU per handshake.

Only the Python standard library (and Debian's python3-libnbd for the handshakes, run with
/usr/bin/python3). Results: JSON under perf/results/ and a Markdown table on stdout. The
machines are noisy: compare ratios, not absolute numbers.
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
from ab_bench import WORKLOADS, client_run, med, one, render  # noqa: E402
from nbd_bench import log  # noqa: E402
from volume_bench import Daemon  # noqa: E402

HANDSHAKE_SCRIPT = r"""
import nbd, sys, time
uri, n = sys.argv[1], int(sys.argv[2])
t0 = time.monotonic()
for _ in range(n):
    h = nbd.NBD()
    h.connect_uri(uri)
    h.shutdown()
    h.close()
print(n / (time.monotonic() - t0))
"""


def handshakes(args, daemon):
    c0 = daemon.cpu_s()
    out = subprocess.run(["taskset", "-c", str(args.client_cpu), "/usr/bin/python3", "-c",
                          HANDSHAKE_SCRIPT, daemon.nbd_uri, str(args.handshakes)],
                         capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"handshake loop failed: {out.stderr[-800:]}")
    return {"handshakes_per_s": float(out.stdout.strip()),
            "server_cpu_us_per_handshake": (daemon.cpu_s() - c0) * 1e6 / args.handshakes}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--binary", default=os.path.join(REPO, "build/cargo/release/ballast"))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--runtime", type=int, default=5)
    ap.add_argument("--server-cpu", type=int, default=0)
    ap.add_argument("--client-cpu", type=int, default=1)
    ap.add_argument("--handshakes", type=int, default=300)
    ap.add_argument("--workloads", default="4k-randread-qd32,4k-randwrite-qd32,"
                                           "128k-read-qd8,128k-write-qd8")
    args = ap.parse_args()
    wanted = set(args.workloads.split(","))
    scratch = tempfile.mkdtemp(prefix="tls-bench.")
    psk = os.path.join(scratch, "keys.psk")
    with open(psk, "w") as f:
        f.write("bench:" + os.urandom(32).hex() + "\n")
    os.chmod(psk, 0o600)
    daemons = {}
    for name, extra in (("plain", []),
                        ("tls", ["--nbd-tls", "require", "--nbd-tls-psk", psk])):
        d = Daemon(args.binary, os.path.join(scratch, name),
                   ["--export", "mem=ram:1G"] + extra, args.server_cpu)
        d.start()
        d.nbd_uri = (f"nbds://bench@127.0.0.1:{d.port}/mem?tls-psk-file={psk}"
                     if name == "tls" else f"nbd://127.0.0.1:{d.port}/mem")
        daemons[name] = d
    results, shakes = {}, {}
    try:
        for d in daemons.values():
            client_run(args, d, "nbd", "write", "1m", 8)  # fill: reads read data
        for label, rw, bs, qd in WORKLOADS:
            if label not in wanted:
                continue
            runs = {"plain": [], "tls": []}
            for rep in range(args.reps):
                for name in ("plain", "tls") if rep % 2 == 0 else ("tls", "plain"):
                    r = one(args, daemons[name], "nbd", rw, bs, qd)
                    log(f"nbd {label} {name} rep {rep}: {r['iops']:.0f} IOPS, server "
                        f"{r['server_cpu_us_per_io']:.2f} us/IO")
                    runs[name].append(r)
            results[f"nbd-{label}"] = {
                "runs": runs,
                "median": {n: {k: med(v, k) for k in v[0]} for n, v in runs.items()},
            }
        for name, d in daemons.items():
            shakes[name] = handshakes(args, d)
            log(f"{name}: {shakes[name]}")
    finally:
        for d in daemons.values():
            d.stop()
    os.makedirs(os.path.join(PERF_DIR, "results"), exist_ok=True)
    path = os.path.join(PERF_DIR, "results", time.strftime("tls-%Y%m%d-%H%M%S.json"))
    with open(path, "w") as f:
        json.dump({"binary": args.binary, "reps": args.reps, "runtime": args.runtime,
                   "results": results, "handshakes": shakes}, f, indent=1)
    print(render(results, names=("plain", "tls")))
    print()
    print("| handshakes | per second | server µs CPU each |")
    print("|---|---|---|")
    for name, h in shakes.items():
        print(f"| {name} | {h['handshakes_per_s']:.0f} | "
              f"{h['server_cpu_us_per_handshake']:.0f} |")
    log(f"results: {path}")


if __name__ == "__main__":
    main()
