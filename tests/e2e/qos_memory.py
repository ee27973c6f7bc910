#!/usr/bin/python3
"""A tenant held back by its rate limit cannot take the memory other exports need.

Requests waiting for their export's rate limits keep the payload memory their connections
charged. Before `--qos-wait-memory`, a tenant limited to 1 MiB/s that opened many connections
and kept them full could fill the core's whole buffer budget with waiting writes; every other
export's connections holding more than a little then waited for that memory, at the tenant's
1 MiB/s. Now an export's waiting requests hold at most their share of a core
(`--qos-wait-memory`, split over the cores): past it, its connections stop reading.

One core, a 16 MiB buffer budget, `--qos-wait-memory 2M`; export `a` limited to 1 MiB/s of
writes, export `b` unlimited. For each protocol:
  - 16 connections (NBD) or I/O queues (NVMe/TCP) keep 32 writes of 128 KiB each in flight to
    `a` (64 MiB asked for, ballast-perf);
  - what `a`'s waiting writes hold stays within its share plus one request per connection
    (`buffer_qos_waiting` in `ballast stats`), the core's charged memory stays under the
    budget's large-holder part, and /metrics counts the connections that stopped
    (`ballast_export_qos_paused_total`);
  - meanwhile a client of `b` writing 1 MiB blocks, 8 in flight (fio over NBD, a client we
    did not write; ballast-perf over NVMe/TCP), runs at >= 50 MiB/s (about 1 MiB/s when the
    waiting writes could take the budget: checked with --qos-wait-memory 16M);
  - `a`'s writes still arrive at its limit, and lifting it lets them all go.
Run with /usr/bin/python3.
"""
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from ballast_testlib import REPO_ROOT, Ballast, free_port, guarded, wait_for  # noqa: E402

PERF = os.environ.get("BALLAST_PERF_BIN") or os.path.join(
    REPO_ROOT, "build", "cargo", "release", "ballast-perf")
MiB = 1 << 20
BUDGET = 16 * MiB
SHARE = 2 * MiB
CONNS = 16
REQ = 128 * 1024


def metric(port, name, export):
    text = urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=10).read()
    want = '%s{export="%s"} ' % (name, export)
    for line in text.decode().splitlines():
        if line.startswith(want):
            return float(line.split()[-1])
    return None


def hostile(target):
    """ballast-perf keeping CONNS x 32 writes of 128 KiB in flight to `a`, in the background."""
    return subprocess.Popen(
        [PERF, "--rw", "randwrite", "--bs", "128k", "--qd", "32", "--queues", str(CONNS),
         "--runtime", "60", "--timeout", "120", "--size", "64M"] + target,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def fio_nbd_write_mibs(uri, secs):
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "fio.json")
        p = subprocess.run(
            ["fio", "--name=victim", "--ioengine=nbd", "--uri=" + uri, "--rw=write", "--bs=1m",
             "--iodepth=8", "--size=256m", "--time_based=1", "--runtime=%d" % secs,
             "--output-format=json", "--output=" + out],
            capture_output=True, text=True, timeout=secs + 60)
        if p.returncode != 0:
            raise RuntimeError("fio: " + (p.stdout + p.stderr).strip()[-400:])
        with open(out) as f:
            return json.load(f)["jobs"][0]["write"]["bw"] / 1024.0


def perf_write_mibs(target, secs):
    p = subprocess.run(
        [PERF, "--json", "--rw", "write", "--bs", "1m", "--qd", "8", "--runtime", str(secs),
         "--size", "256M"] + target, capture_output=True, text=True, timeout=secs + 60)
    if p.returncode != 0:
        raise RuntimeError("ballast-perf: " + p.stderr.strip()[-400:])
    job = json.loads(p.stdout)["jobs"][0]
    return job["write"]["bw"] / 1024.0


def waiting(b):
    return sum(c.get("buffer_qos_waiting", 0) for c in b.reactors())


def round_(r, b, mport, proto, hostile_target, victim):
    r.check_eq("%s: a limited to 1 MiB/s of writes" % proto, 0,
               b.ctl("export", "limit", "a", "--write-mibs", "1").returncode)
    paused0 = metric(mport, "ballast_export_qos_paused_total", "a") or 0
    bad = hostile(hostile_target)
    try:
        # The tenant's connections fill their share, then stop.
        r.check("%s: a's writes wait for its limit" % proto,
                wait_for(lambda: waiting(b) >= SHARE, 20), "waiting %d" % waiting(b))
        time.sleep(1)
        held, charged = 0, 0
        for _ in range(5):
            s = b.reactors()
            held = max(held, sum(c.get("buffer_qos_waiting", 0) for c in s))
            charged = max(charged, sum(c["buffer_charged"] for c in s))
            time.sleep(0.2)
        r.check("%s: a's waiting writes hold at most its share + one request per connection"
                % proto, held <= SHARE + CONNS * REQ, "%.1f MiB" % (held / MiB))
        r.check("%s: the core's charged memory stays below the large holders' part" % proto,
                charged < BUDGET * 3 // 4, "%.1f MiB" % (charged / MiB))
        paused = metric(mport, "ballast_export_qos_paused_total", "a") or 0
        r.check("%s: /metrics counts a's connections that stopped" % proto, paused > paused0,
                "%s -> %s" % (paused0, paused))
        mibs = r.run("%s: a client of b writes 1 MiB blocks meanwhile" % proto, victim)
        if mibs is not None:
            r.check("%s: ... at >= 50 MiB/s" % proto, mibs >= 50, "%.1f MiB/s" % mibs)
        alive = bad.poll() is None
        r.check("%s: the tenant's writes are still being served (not dropped)" % proto, alive)
    finally:
        bad.kill()
        bad.wait()
    # Lifted: what waits goes at once.
    r.check_eq("%s: a's limit lifted" % proto, 0,
               b.ctl("export", "limit", "a", "--write-mibs", "0").returncode)
    r.check("%s: a's waiting writes all go once lifted" % proto,
            wait_for(lambda: waiting(b) == 0, 5), "waiting %d" % waiting(b))


def main(r):
    if not os.access(PERF, os.X_OK):
        r.bad("ballast-perf built", PERF)
        return
    mport = free_port()
    with Ballast(["--cores", "1", "--buffer-memory", "16M", "--qos-wait-memory", "2M",
                  "--export", "a=ram:256M", "--export", "b=ram:256M",
                  "--metrics-listen", "127.0.0.1:%d" % mport]) as b:
        nbd_addr = ["--addr", "127.0.0.1:%d" % b.port]
        round_(r, b, mport, "NBD", ["--nbd", "a"] + nbd_addr,
               lambda: fio_nbd_write_mibs(b.uri("b"), 3))
        nvmf = ["--addr", "127.0.0.1:%d" % b.nvmf_port()]
        nqn_a = b.nvmf_export("qa", "a")
        nqn_b = b.nvmf_export("qb", "b")
        round_(r, b, mport, "NVMe/TCP", ["--nqn", nqn_a] + nvmf,
               lambda: perf_write_mibs(["--nqn", nqn_b] + nvmf, 3))
        b.check_clean_end(r)


if __name__ == "__main__":
    guarded(main)
