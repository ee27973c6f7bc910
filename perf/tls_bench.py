#!/usr/bin/env python3
"""tls-bench: NVMe/TCP and NBD over TLS against plaintext, one build, in one run (issue 9).

Two daemons of one build serve a 1 GiB RAM export, one core each, pinned to the same CPU
(--server-cpu): one plaintext, one TLS-only: `--nvmf-secure-channel required` with an NVMe
interchange-format key (`NVMeTLSkey-1:01:...:`) given to the bench host through SPDK's
keyring_file_add_key and nvmf_subsystem_add_host --psk, and `--nbd-tls require` with a TLS-PSK
key. Both are filled first (1 MiB writes over NVMe/TCP), so reads return written data.

NVMe/TCP: ballast-perf (our initiator) pinned to --client-cpu, over TLS with --tls-key: TLS 1.3
set up as the Linux host sets it up (identity NVMe0R01, libnvme's PSK derivation, TLS_AES_128_
GCM_SHA256, secp384r1): 4k random read/write at QD32 and 128k sequential read/write at QD8.

NBD: the client is libnbd (GnuTLS for TLS) through its Python binding (Debian's python3-libnbd,
so run with /usr/bin/python3), keeping QD requests in flight with aio_pread/aio_pwrite, same
workloads. (fio's nbd engine cannot be used: libnbd refuses it the local PSK file.) It is slower
than fio; it is the same for both daemons.

Every run is --runtime seconds; runs alternate between the two daemons, medians of --reps.
Server CPU per I/O is utime+stime of the daemon (/proc/PID/stat) over the client's whole run
(connects included: a few ms against seconds of I/O). Then handshakes, plaintext and TLS:
--handshakes sequential NVMe/TCP connects (TCP, TLS, ICReq, Fabrics Connect of an admin queue,
Disconnect: `ballast-perf --handshakes`) and NBD connects (NBD_OPT_GO, disconnect): per second
and server CPU per handshake.

Results: JSON under perf/results/ and Markdown tables on stdout. The machines are noisy: compare
ratios, not absolute numbers. --quick: tiny inputs, a test of the script. The scratch directory
(keys, daemon logs) is removed at the end unless KEEP=1.
"""

import argparse
import base64
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib

PERF_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(PERF_DIR)
sys.path.insert(0, PERF_DIR)
from ab_bench import server_counters  # noqa: E402
from nbd_bench import children_cpu_seconds, log, sys_cpu_times  # noqa: E402
from volume_bench import Daemon  # noqa: E402

WORKLOADS = [
    ("4k-randread-qd32", "read", 4096, 32, True),
    ("4k-randwrite-qd32", "write", 4096, 32, True),
    ("128k-read-qd8", "read", 131072, 8, False),
    ("128k-write-qd8", "write", 131072, 8, False),
]
NQN = "nqn.2026-11.dev.ballast:mem"
HOSTNQN = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-0000ba11a570"
EXPORT_BYTES = 1 << 30

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

# A failed shutdown (the connection was made; libnbd then saw the socket closed under it) is
# counted, not fatal: the second number printed.
HANDSHAKES = r"""
import nbd, sys, time
uri, n = sys.argv[1], int(sys.argv[2])
failed = 0
t0 = time.monotonic()
for _ in range(n):
    h = nbd.NBD()
    h.set_uri_allow_local_file(True)
    h.connect_uri(uri)
    try:
        h.shutdown()
    except nbd.Error as e:
        failed += 1
        print(e, file=sys.stderr)
    del h
print(n / (time.monotonic() - t0), failed)
"""


def nvme_key():
    """A random 32-byte key in the NVMe interchange format (key || CRC-32, base64)."""
    k = os.urandom(32)
    body = base64.b64encode(k + zlib.crc32(k).to_bytes(4, "little")).decode()
    return f"NVMeTLSkey-1:01:{body}:"


def perf_cmd(args, daemon, tls):
    cmd = ["taskset", "-c", str(args.client_cpu), args.perf_binary,
           "--addr", f"127.0.0.1:{daemon.nvmf_port}", "--nqn", NQN, "--hostnqn", HOSTNQN, "--json"]
    if not tls:
        return cmd
    return cmd + ["--tls-key", daemon.nvme_key] + (
        ["--tls-groups", args.tls_groups] if args.tls_groups else [])


class Window:
    """Server CPU, other processes' CPU (% of one CPU: machine-wide busy time less the
    daemon's and our children's) and the daemon's ring counters over one client run. The
    counters are read outside the CPU window (asking for them costs the daemon a little)."""

    def __init__(self, daemon):
        self.daemon = daemon
        self.counters0 = server_counters(daemon)
        self.t0, self.c0 = time.monotonic(), daemon.cpu_s()
        self.busy0, self.children0 = sys_cpu_times()[0], children_cpu_seconds()

    def close(self, ios):
        """Server CPU seconds, background % of a CPU, and per I/O: the daemon's system calls
        into its ring, socket sends and receives."""
        server = self.daemon.cpu_s() - self.c0
        busy = sys_cpu_times()[0] - self.busy0
        children = children_cpu_seconds() - self.children0
        wall = max(time.monotonic() - self.t0, 1e-9)
        counters = server_counters(self.daemon)
        per_io = {}
        if counters and self.counters0:
            per_io = {f"server_{k}_per_io": (counters[k] - self.counters0[k]) / max(ios, 1)
                      for k in counters}
        return server, max(0.0, (busy - server - children) / wall * 100), per_io


def run_nvme(args, daemon, tls, rw, bs, qd, rand):
    pattern = ("rand" if rand else "") + rw
    w = Window(daemon)
    out = subprocess.run(perf_cmd(args, daemon, tls) + [
        "--rw", pattern, "--bs", str(bs), "--qd", str(qd), "--runtime", str(args.runtime)],
        capture_output=True, text=True, timeout=args.runtime * 10 + 120)
    if out.returncode != 0:
        raise RuntimeError(f"ballast-perf failed: {out.stderr[-800:]}")
    job = json.loads(out.stdout)["jobs"][0]
    side = job[rw]
    ios, secs = side["total_ios"], job["job_runtime"] / 1000
    server, background, per_io = w.close(ios)
    client = (job["usr_cpu"] + job["sys_cpu"]) / 100 * secs
    pct = side["clat_ns"]["percentile"]
    return {"iops": side["iops"], "mb_s": side["bw_bytes"] / 1e6,
            "server_cpu_us_per_io": server * 1e6 / max(ios, 1),
            "client_cpu_us_per_io": client * 1e6 / max(ios, 1),
            "p50_us": pct["50.000000"] / 1000, "p99_us": pct["99.000000"] / 1000,
            "background_pct": background, **per_io}


def prefill(args, daemon, tls):
    """Writes the whole export once (1 MiB sequential writes)."""
    blocks = EXPORT_BYTES >> 20
    out = subprocess.run(perf_cmd(args, daemon, tls) + [
        "--rw", "write", "--bs", "1m", "--qd", "4", "--number-ios", str(blocks),
        "--runtime", "300"], capture_output=True, text=True, timeout=360)
    if out.returncode != 0:
        raise RuntimeError(f"prefill failed: {out.stderr[-800:]}")
    written = json.loads(out.stdout)["jobs"][0]["write"]["total_ios"]
    if written != blocks:
        raise RuntimeError(f"prefill wrote {written} of {blocks} MiB")


def nvme_handshakes(args, daemon, tls):
    w = Window(daemon)
    out = subprocess.run(perf_cmd(args, daemon, tls) + ["--handshakes", str(args.handshakes)],
                         capture_output=True, text=True, timeout=600)
    server, background, _ = w.close(args.handshakes)
    if out.returncode != 0:
        raise RuntimeError(f"ballast-perf --handshakes failed: {out.stderr[-800:]}")
    r = json.loads(out.stdout)
    return {"handshakes_per_s": r["per_second"],
            "server_cpu_us_per_handshake": server * 1e6 / args.handshakes,
            "client_cpu_us_per_handshake": (r["usr_cpu_s"] + r["sys_cpu_s"]) * 1e6
            / args.handshakes, "background_pct": background}


def run_client(args, daemon, rw, bs, qd, rand):
    w = Window(daemon)
    out = subprocess.run(["taskset", "-c", str(args.client_cpu), "/usr/bin/python3", "-c", CLIENT,
                          daemon.nbd_uri, rw, str(bs), str(qd), "1" if rand else "0",
                          str(args.runtime)], capture_output=True, text=True,
                         timeout=args.runtime * 10 + 60)
    if out.returncode != 0:
        raise RuntimeError(f"client failed: {out.stderr[-800:]}")
    ops, wall, cpu = out.stdout.split()
    ops, wall, cpu = int(ops), float(wall), float(cpu)
    server, background, per_io = w.close(ops)
    return {"iops": ops / wall, "mb_s": ops * bs / wall / 1e6,
            "server_cpu_us_per_io": server * 1e6 / max(ops, 1),
            "client_cpu_us_per_io": cpu * 1e6 / max(ops, 1), "background_pct": background,
            **per_io}


def nbd_handshakes(args, daemon):
    w = Window(daemon)
    out = subprocess.run(["taskset", "-c", str(args.client_cpu), "/usr/bin/python3", "-c",
                          HANDSHAKES, daemon.nbd_uri, str(args.handshakes)],
                         capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"handshake loop failed: {out.stderr[-800:]}")
    server, background, _ = w.close(args.handshakes)
    rate, failed = out.stdout.split()
    if int(failed):
        log(f"nbd handshakes: {failed} of {args.handshakes} shutdowns failed: "
            f"{out.stderr.strip().splitlines()[-1]}")
    return {"handshakes_per_s": float(rate), "failed_shutdowns": int(failed),
            "server_cpu_us_per_handshake": server * 1e6 / args.handshakes,
            "background_pct": background}


def alternate(args, daemons, run):
    """run(name) for each daemon, --reps times, alternating the order; medians per daemon."""
    runs = {"plain": [], "tls": []}
    for rep in range(args.reps):
        for name in ("plain", "tls") if rep % 2 == 0 else ("tls", "plain"):
            runs[name].append(run(name))
    medians = {n: {k: statistics.median(x[k] for x in v) for k in v[0]} for n, v in runs.items()}
    return medians, runs


def calls(r):
    return f"{r['server_ring_enters_per_io']:.2f}" if "server_ring_enters_per_io" in r else "—"


def table(title, results, runs):
    print(f"### {title}")
    print()
    print("| workload | IOPS plain / TLS | MB/s plain / TLS | server µs/IO plain / TLS "
          "| TLS/plain server CPU per I/O | client µs/IO plain / TLS "
          "| server syscalls/IO plain / TLS |")
    print("|---|---|---|---|---|---|---|")
    for label, r in results.items():
        p, t = r["plain"], r["tls"]
        print(f"| {label} | {p['iops']:,.0f} / {t['iops']:,.0f} | {p['mb_s']:,.0f} / "
              f"{t['mb_s']:,.0f} | {p['server_cpu_us_per_io']:.2f} / "
              f"{t['server_cpu_us_per_io']:.2f} | "
              f"**{t['server_cpu_us_per_io'] / p['server_cpu_us_per_io']:.2f}×** | "
              f"{p['client_cpu_us_per_io']:.1f} / {t['client_cpu_us_per_io']:.1f} | "
              f"{calls(p)} / {calls(t)} |")
    print()
    bg = [x["background_pct"] for r in runs.values() for v in r.values() for x in v]
    print(f"Other processes' CPU during these runs: median {statistics.median(bg):.0f}%, "
          f"max {max(bg):.0f}% of a CPU.")
    print()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--binary", default=os.path.join(REPO, "build/cargo/release/ballast"))
    ap.add_argument("--perf-binary", default=os.path.join(REPO, "build/cargo/release/ballast-perf"))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--runtime", type=float, default=4)
    ap.add_argument("--server-cpu", type=int, default=0)
    ap.add_argument("--client-cpu", type=int, default=1)
    ap.add_argument("--handshakes", type=int, default=200)
    ap.add_argument("--protocols", default="nvme,nbd", help="nvme, nbd or both (comma-separated)")
    ap.add_argument("--kernel-tls", choices=["auto", "off"], default="auto",
                    help="the TLS daemon's --kernel-tls (auto uses kTLS where the kernel has it)")
    ap.add_argument("--tls-groups", help="ballast-perf --tls-groups (default: the Linux host's, "
                    "secp384r1 first)")
    ap.add_argument("--poll-us", type=int, help="both daemons' --poll-us (default: theirs)")
    ap.add_argument("--daemon-args", default="",
                    help="more `ballast serve` arguments for both daemons "
                    "(e.g. '--offload-threads 0')")
    ap.add_argument("--skip", default="", help="io and/or handshakes (comma-separated)")
    ap.add_argument("--quick", action="store_true", help="tiny inputs: a test of this script")
    args = ap.parse_args()
    if args.quick:
        args.reps, args.runtime, args.handshakes = 1, 0.5, 10
    protocols = [p for p in args.protocols.split(",") if p]
    if set(protocols) - {"nvme", "nbd"}:
        ap.error("--protocols takes nvme and/or nbd")
    skip = {x for x in args.skip.split(",") if x}
    if skip - {"io", "handshakes"}:
        ap.error("--skip takes io and/or handshakes")
    poll = [] if args.poll_us is None else ["--poll-us", str(args.poll_us)]
    poll += args.daemon_args.split()
    scratch = tempfile.mkdtemp(prefix="tls-bench.")
    psk = os.path.join(scratch, "keys.psk")
    with open(psk, "w") as f:
        f.write("bench:" + os.urandom(32).hex() + "\n")
    os.chmod(psk, 0o600)
    key_path = os.path.join(scratch, "nvme.key")
    with open(key_path, "w") as f:
        f.write(nvme_key() + "\n")
    os.chmod(key_path, 0o600)
    daemons = {}
    for name, extra in (("plain", []),
                        ("tls", ["--nbd-tls", "require", "--nbd-tls-psk", psk,
                                 "--nvmf-secure-channel", "required",
                                 "--kernel-tls", args.kernel_tls])):
        d = Daemon(args.binary, os.path.join(scratch, name),
                   ["--export", f"mem=ram:{EXPORT_BYTES >> 20}M"] + poll + extra, args.server_cpu)
        d.start()
        d.nbd_uri = (f"nbds://bench@127.0.0.1:{d.port}/mem?tls-psk-file={psk}"
                     if name == "tls" else f"nbd://127.0.0.1:{d.port}/mem")
        d.nvme_key = key_path
        daemons[name] = d
    daemons["tls"].rpc("rpc", "keyring_file_add_key",
                       json.dumps({"name": "bench", "path": key_path}))
    daemons["tls"].rpc("rpc", "nvmf_subsystem_add_host",
                       json.dumps({"nqn": NQN, "host": HOSTNQN, "psk": "bench"}))
    nvme, nbd, shakes, raw = {}, {}, {}, {}
    os.makedirs(os.path.join(PERF_DIR, "results"), exist_ok=True)
    path = os.path.join(PERF_DIR, "results", time.strftime("tls-%Y%m%d-%H%M%S.json"))

    def save(**extra):
        """Everything so far (after each case: a failure later keeps what was measured)."""
        with open(path, "w") as f:
            json.dump({"binary": args.binary, "perf_binary": args.perf_binary,
                       "reps": args.reps, "runtime": args.runtime, "poll_us": args.poll_us,
                       "daemon_args": args.daemon_args,
                       "tls_groups": args.tls_groups, **extra, "nvme": nvme, "nbd": nbd,
                       "handshakes": shakes, "runs": raw}, f, indent=1)
    try:
        for name, d in daemons.items():
            if "io" not in skip:
                prefill(args, d, name == "tls")
                log(f"{name}: export filled")
        if "nvme" in protocols and "io" not in skip:
            for label, rw, bs, qd, rand in WORKLOADS:
                def run(name):
                    r = run_nvme(args, daemons[name], name == "tls", rw, bs, qd, rand)
                    log(f"nvme {label} {name}: {r['iops']:.0f} IOPS, server "
                        f"{r['server_cpu_us_per_io']:.2f} us/IO, "
                        f"background {r['background_pct']:.0f}%")
                    return r
                nvme[label], raw[f"nvme {label}"] = alternate(args, daemons, run)
                save()
        if "nbd" in protocols and "io" not in skip:
            for label, rw, bs, qd, rand in WORKLOADS:
                def run(name):
                    r = run_client(args, daemons[name], rw, bs, qd, rand)
                    log(f"nbd {label} {name}: {r['iops']:.0f} IOPS, server "
                        f"{r['server_cpu_us_per_io']:.2f} us/IO, "
                        f"background {r['background_pct']:.0f}%")
                    return r
                nbd[label], raw[f"nbd {label}"] = alternate(args, daemons, run)
                save()
        for proto in [] if "handshakes" in skip else protocols:
            def run(name):
                d = daemons[name]
                r = (nvme_handshakes(args, d, name == "tls") if proto == "nvme"
                     else nbd_handshakes(args, d))
                log(f"{proto} handshakes {name}: {r}")
                return r
            shakes[proto], raw[f"{proto} handshakes"] = alternate(args, daemons, run)
            save()
    finally:
        for d in daemons.values():
            d.stop()
    with open(os.path.join(daemons["tls"].data_dir, "serve.log")) as f:
        tls_log = f.read()
    kernel_tls = "handed to the kernel (kTLS)" in tls_log
    for secret in (key_path, psk):
        with open(secret) as f:
            if f.read().strip().split(":")[-2 if secret == key_path else -1] in tls_log:
                raise RuntimeError(f"the key in {secret} appears in the daemon's log")
    save(kernel_tls=kernel_tls)
    if os.environ.get("KEEP"):
        log(f"kept {scratch} (keys, daemon logs)")
    else:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"TLS records in {'the kernel (kTLS)' if kernel_tls else 'OpenSSL (no kTLS)'}; "
          f"medians of {args.reps} x {args.runtime} s; "
          f"--poll-us {'default' if args.poll_us is None else args.poll_us}"
          + (f"; daemons with {args.daemon_args}" if args.daemon_args else ""))
    print()
    if nvme:
        table("NVMe/TCP (ballast-perf)", nvme, {k: raw[f"nvme {k}"] for k in nvme})
    if nbd:
        table("NBD (libnbd, Python)", nbd, {k: raw[f"nbd {k}"] for k in nbd})
    if shakes:
        print("| handshakes | per second plain / TLS | server µs CPU each plain / TLS "
              "| TLS/plain server CPU | client µs CPU each plain / TLS |")
        print("|---|---|---|---|---|")
    names = {"nvme": "NVMe/TCP (TCP, TLS, ICReq, Connect, Disconnect)",
             "nbd": "NBD (connect, TLS, NBD_OPT_GO, disconnect)"}
    for proto, r in shakes.items():
        p, t = r["plain"], r["tls"]
        client = (f"{p['client_cpu_us_per_handshake']:.0f} / "
                  f"{t['client_cpu_us_per_handshake']:.0f}"
                  if "client_cpu_us_per_handshake" in p else "—")
        ratio = (f"{t['server_cpu_us_per_handshake'] / p['server_cpu_us_per_handshake']:.1f}×"
                 if p["server_cpu_us_per_handshake"] else "—")  # 10 ms ticks: --quick sees 0
        print(f"| {names[proto]} | {p['handshakes_per_s']:,.0f} / {t['handshakes_per_s']:,.0f} | "
              f"{p['server_cpu_us_per_handshake']:.0f} / {t['server_cpu_us_per_handshake']:.0f} | "
              f"{ratio} | {client} |")
    if shakes:
        bg = [x["background_pct"] for proto in shakes for v in raw[f"{proto} handshakes"].values()
              for x in v]
        print()
        print(f"Other processes' CPU during these runs: median {statistics.median(bg):.0f}%, "
              f"max {max(bg):.0f}% of a CPU.")
    log(f"results: {path}")


if __name__ == "__main__":
    main()
