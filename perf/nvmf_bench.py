#!/usr/bin/env python3
"""NVMe/TCP vs NBD on the same ballast, same RAM export, in one run.

Starts `ballast serve --cores 1` pinned to one CPU, drives it from the other CPU with our NVMe/TCP
initiator (ballast-perf) and with fio's NBD engine, for the same profiles, repeats each run and
reports medians: IOPS, MiB/s, latency percentiles and server CPU seconds per 100k I/O (utime +
stime of the daemon from /proc, over the run). Writes perf/results/nvmf-latest.{json,md}.

    perf/nvmf_bench.py [--runtime S] [--reps N] [--quick] [--poll-us N]
"""
import argparse, json, os, socket, statistics, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("BALLAST_BIN", os.path.join(ROOT, "build/cargo/release/ballast"))
PERF = os.environ.get("BALLAST_PERF_BIN", os.path.join(ROOT, "build/cargo/release/ballast-perf"))
PROFILES = [  # name, rw, bs, qd
    ("randread-4k-qd1", "randread", "4k", 1),
    ("randread-4k-qd32", "randread", "4k", 32),
    ("randwrite-4k-qd32", "randwrite", "4k", 32),
    ("read-128k-qd8", "read", "128k", 8),
    ("write-128k-qd8", "write", "128k", 8),
]
TICK = os.sysconf("SC_CLK_TCK")


def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p


def cpu_seconds(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / TICK


def wait_port(port, timeout=10):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close(); return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"ballast did not listen on {port}")


def job_stats(job, ios_key):
    side = job[ios_key]
    pct = side["clat_ns"].get("percentile", {})
    get = lambda k: pct.get(k, 0) / 1000
    return {"iops": side["iops"], "mibs": side["bw"] / 1024, "ios": side["total_ios"],
            "p50": get("50.000000"), "p99": get("99.000000"), "p999": get("99.900000")}


def run_nvme(port, rw, bs, qd, runtime):
    out = subprocess.run(["taskset", "-c", "0", PERF, "--addr", f"127.0.0.1:{port}",
                          "--nqn", "nqn.2026-11.dev.ballast:mem", "--rw", rw, "--bs", bs,
                          "--qd", str(qd), "--runtime", str(runtime), "--json"],
                         capture_output=True, text=True, timeout=runtime + 60)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-500:])
    job = json.loads(out.stdout)["jobs"][0]
    return job_stats(job, "read" if "read" in rw else "write")


def run_nbd(port, rw, bs, qd, runtime):
    out = subprocess.run(["taskset", "-c", "0", "fio", "--name=b", "--ioengine=nbd",
                          f"--uri=nbd://127.0.0.1:{port}/mem", f"--rw={rw}", f"--bs={bs}",
                          f"--iodepth={qd}", "--size=1g", "--time_based", f"--runtime={runtime}",
                          "--output-format=json"], capture_output=True, text=True,
                         timeout=runtime + 60)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-500:])
    text = out.stdout[out.stdout.index("{"):]
    job = json.loads(text)["jobs"][0]
    return job_stats(job, "read" if "read" in rw else "write")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runtime", type=float, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--poll-us", type=int, default=0)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    if a.quick:
        a.runtime, a.reps = 2, 1
    for b in (BIN, PERF):
        if not os.access(b, os.X_OK):
            sys.exit(f"missing {b}: run cargo build --release")
    data = tempfile.mkdtemp(prefix="ballast-nvmf-bench.")
    nbd, nvmf = free_port(), free_port()
    log = open(os.path.join(data, "server.log"), "w")
    srv = subprocess.Popen(["taskset", "-c", "1", BIN, "serve", "--cores", "1", "--data-dir", data,
                            "--poll-us", str(a.poll_us), "--nbd-listen", f"127.0.0.1:{nbd}",
                            "--nvmf-listen", f"127.0.0.1:{nvmf}", "--export", "mem=ram:1G"],
                           stdout=log, stderr=log)
    rows = []
    try:
        wait_port(nbd); wait_port(nvmf)
        # fill the export so reads return data, not holes
        run_nbd(nbd, "write", "1m", 8, 2 if not a.quick else 1)
        for name, rw, bs, qd in PROFILES:
            for proto, fn, port in (("nvme-tcp", run_nvme, nvmf), ("nbd", run_nbd, nbd)):
                reps = []
                for _ in range(a.reps):
                    c0 = cpu_seconds(srv.pid)
                    r = fn(port, rw, bs, qd, a.runtime)
                    r["cpu_per_100k"] = (cpu_seconds(srv.pid) - c0) / max(r["ios"], 1) * 1e5
                    reps.append(r)
                med = {k: statistics.median(x[k] for x in reps) for k in reps[0]}
                rows.append({"profile": name, "protocol": proto, **med})
                print(f"{name:20} {proto:8} {med['iops']/1000:8.1f}k IOPS {med['mibs']:8.1f} MiB/s "
                      f"p50 {med['p50']:7.1f} p99 {med['p99']:8.1f} us  cpu {med['cpu_per_100k']:.3f} s/100k",
                      flush=True)
    finally:
        srv.terminate(); srv.wait(30)
    md = ["| profile | protocol | IOPS | MiB/s | p50 µs | p99 µs | p99.9 µs | server CPU s/100k I/O | CPU/IO nvme/nbd |",
          "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = ""
        if r["protocol"] == "nbd":
            nv = next(x for x in rows if x["profile"] == r["profile"] and x["protocol"] == "nvme-tcp")
            ratio = f"{nv['cpu_per_100k'] / r['cpu_per_100k']:.2f}"
        md.append(f"| {r['profile']} | {r['protocol']} | {r['iops']/1000:.1f}k | {r['mibs']:.1f} | "
                  f"{r['p50']:.1f} | {r['p99']:.1f} | {r['p999']:.1f} | {r['cpu_per_100k']:.3f} | {ratio} |")
    os.makedirs(os.path.join(ROOT, "perf/results"), exist_ok=True)
    json.dump(rows, open(os.path.join(ROOT, "perf/results/nvmf-latest.json"), "w"), indent=1)
    open(os.path.join(ROOT, "perf/results/nvmf-latest.md"), "w").write("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
