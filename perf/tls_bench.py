#!/usr/bin/env python3
"""tls-bench: NBD over TLS against plaintext, the same build, side by side in one run (issue 9).

Two daemons of one build serve a 1 GiB RAM export, one core each, pinned to the same CPU
(--server-cpu): one plaintext, one with `--nbd-tls require` and a TLS-PSK key. The client is
libnbd (GnuTLS for TLS) through its Python binding (Debian's python3-libnbd, so run with
/usr/bin/python3), pinned to another CPU, keeping QD requests in flight with aio_pread/
aio_pwrite for --runtime seconds: 4k random read/write at QD32 and 128k sequential read/write
at QD8. (fio's nbd engine cannot be used: libnbd refuses it the local PSK file.) The client is
slower than fio; it is the same for both daemons, and the server's CPU per I/O is what is
compared. Runs alternate between the two, medians of --reps. Then handshakes: --handshakes
sequential connect + NBD_OPT_GO + disconnect, plaintext and TLS: handshakes per second and
server CPU per handshake.

Results: JSON under perf/results/ and a Markdown table on stdout. The machines are noisy:
compare ratios, not absolute numbers.
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
    ("4k-randread-qd32", "read", 4096, 32, True),
    ("4k-randwrite-qd32", "write", 4096, 32, True),
    ("128k-read-qd8", "read", 131072, 8, False),
    ("128k-write-qd8", "write", 131072, 8, False),
]

# The client: QD requests in flight for RUNTIME seconds; prints ops and its own CPU seconds.
CLIENT = r"""
import nbd, os, random, resource, sys, time
uri, rw, bs, qd, rand, runtime = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1", float(sys.argv[6])
h = nbd.NBD()
h.set_uri_allow_local_file(True)
h.connect_uri(uri)
size = h.get_size()
slots = size // bs
buf = nbd.Buffer(bs)
if rw == "write":
    buf = nbd.Buffer.from_bytearray(bytearray(os.urandom(bs)))
seq = [0]
def next_off():
    if rand:
        return random.randrange(slots) * bs
    seq[0] = (seq[0] + 1) % slots
    return seq[0] * bs
done = [0]
def cb(*args):
    done[0] += 1
    return 1
def issue():
    if rw == "read":
        h.aio_pread(buf, next_off(), completion=cb)
    else:
        h.aio_pwrite(buf, next_off(), completion=cb)
r0 = resource.getrusage(resource.RUSAGE_SELF)
t0 = time.monotonic()
for _ in range(qd):
    issue()
end = t0 + runtime
while time.monotonic() < end:
    before = done[0]
    h.poll(-1)
    for _ in range(done[0] - before):
        issue()
while h.aio_in_flight() > 0:
    h.poll(-1)
wall = time.monotonic() - t0
r1 = resource.getrusage(resource.RUSAGE_SELF)
cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
print(done[0], wall, cpu)
h.shutdown()
"""

HANDSHAKES = r"""
import nbd, sys, time
uri, n = sys.argv[1], int(sys.argv[2])
t0 = time.monotonic()
for _ in range(n):
    h = nbd.NBD()
    h.set_uri_allow_local_file(True)
    h.connect_uri(uri)
    h.shutdown()
    del h
print(n / (time.monotonic() - t0))
"""


def run_client(args, daemon, rw, bs, qd, rand):
    c0 = daemon.cpu_s()
    out = subprocess.run(["taskset", "-c", str(args.client_cpu), "/usr/bin/python3", "-c", CLIENT,
                          daemon.nbd_uri, rw, str(bs), str(qd), "1" if rand else "0",
                          str(args.runtime)], capture_output=True, text=True,
                         timeout=args.runtime * 10 + 60)
    if out.returncode != 0:
        raise RuntimeError(f"client failed: {out.stderr[-800:]}")
    ops, wall, cpu = out.stdout.split()
    ops, wall, cpu = int(ops), float(wall), float(cpu)
    server = daemon.cpu_s() - c0
    return {"iops": ops / wall, "mib_s": ops * bs / wall / 2**20,
            "server_cpu_us_per_io": server * 1e6 / max(ops, 1),
            "client_cpu_us_per_io": cpu * 1e6 / max(ops, 1)}


def handshakes(args, daemon):
    c0 = daemon.cpu_s()
    out = subprocess.run(["taskset", "-c", str(args.client_cpu), "/usr/bin/python3", "-c",
                          HANDSHAKES, daemon.nbd_uri, str(args.handshakes)],
                         capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"handshake loop failed: {out.stderr[-800:]}")
    return {"handshakes_per_s": float(out.stdout.strip()),
            "server_cpu_us_per_handshake": (daemon.cpu_s() - c0) * 1e6 / args.handshakes}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--binary", default=os.path.join(REPO, "build/cargo/release/ballast"))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--runtime", type=float, default=4)
    ap.add_argument("--server-cpu", type=int, default=0)
    ap.add_argument("--client-cpu", type=int, default=1)
    ap.add_argument("--handshakes", type=int, default=200)
    args = ap.parse_args()
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
        for label, rw, bs, qd, rand in WORKLOADS:
            runs = {"plain": [], "tls": []}
            for rep in range(args.reps):
                for name in ("plain", "tls") if rep % 2 == 0 else ("tls", "plain"):
                    r = run_client(args, daemons[name], rw, bs, qd, rand)
                    log(f"{label} {name} rep {rep}: {r['iops']:.0f} IOPS, server "
                        f"{r['server_cpu_us_per_io']:.2f} us/IO")
                    runs[name].append(r)
            results[label] = {n: {k: statistics.median(x[k] for x in v) for k in v[0]}
                              for n, v in runs.items()}
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
    print("| workload | IOPS plain / TLS | server µs/IO plain / TLS | TLS/plain server CPU per I/O "
          "| client µs/IO plain / TLS |")
    print("|---|---|---|---|---|")
    for label, r in results.items():
        p, t = r["plain"], r["tls"]
        print(f"| {label} | {p['iops']:.0f} / {t['iops']:.0f} | "
              f"{p['server_cpu_us_per_io']:.2f} / {t['server_cpu_us_per_io']:.2f} | "
              f"{t['server_cpu_us_per_io'] / p['server_cpu_us_per_io']:.2f}x | "
              f"{p['client_cpu_us_per_io']:.1f} / {t['client_cpu_us_per_io']:.1f} |")
    print()
    print("| handshakes | per second | server µs CPU each |")
    print("|---|---|---|")
    for name, h in shakes.items():
        print(f"| {name} | {h['handshakes_per_s']:.0f} | "
              f"{h['server_cpu_us_per_handshake']:.0f} |")
    log(f"results: {path}")


if __name__ == "__main__":
    main()
