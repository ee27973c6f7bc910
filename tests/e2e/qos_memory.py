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
    did not write; ballast-perf over NVMe/TCP), runs at >= 50 MiB/s (when the waiting writes
    could take the budget — checked with --qos-wait-memory 16M — it could not write at all:
    fio timed out, the NVMe/TCP queue was closed);
  - `a`'s writes still arrive at its limit (1 MiB/s, from its byte counter on /metrics);
    lifting the limit while the tenant still writes lets them all go at once.
Then commands that hold no memory wait for an I/O limit too (1000 per second): 64 NBD trims
and write-zeroes in flight with writes between them (libnbd), and NVMe/TCP Dataset Management
commands of 8 ranges each (every range a discard of its own) — all complete, the daemon lives.
Run with /usr/bin/python3.
"""
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import nbd  # noqa: E402
import nvmeraw  # noqa: E402
from ballast_testlib import (REPO_ROOT, Ballast, ballast_bin, free_port, guarded,  # noqa: E402
                             wait_for)

PERF = os.environ.get("BALLAST_PERF_BIN") or os.path.join(
    REPO_ROOT, "build", "cargo", "release", "ballast-perf")
MiB = 1 << 20
BUDGET = 16 * MiB
SHARE = 2 * MiB
CONNS = 16
REQ = 128 * 1024
OP_DSM = 0x09


def metric(port, name, export, extra=""):
    text = urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=10).read()
    want = '%s{export="%s"%s} ' % (name, export, extra)
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
        r.check("%s: /metrics counts a's connections that stopped" % proto,
                paused0 < paused <= paused0 + 4 * CONNS, "%s -> %s" % (paused0, paused))
        label = ',protocol="%s",op="write"' % ("nbd" if proto == "NBD" else "nvmf")
        written = lambda: metric(mport, "ballast_export_bytes_total", "a", label) or 0
        w0, t0 = written(), time.monotonic()
        mibs = r.run("%s: a client of b writes 1 MiB blocks meanwhile" % proto, victim)
        if mibs is not None:
            r.check("%s: ... at >= 50 MiB/s" % proto, mibs >= 50, "%.1f MiB/s" % mibs)
        rate = (written() - w0) / MiB / (time.monotonic() - t0)
        r.check("%s: a's writes go on meanwhile, at its limit (1 MiB/s)" % proto,
                0.6 <= rate <= 1.5, "%.2f MiB/s" % rate)
        # Lifted while the tenant still writes: what waits goes at once (it would take more
        # than 2 s at 1 MiB/s), and a's writes run free.
        r.check_eq("%s: a's limit lifted" % proto, 0,
                   b.ctl("export", "limit", "a", "--write-mibs", "0").returncode)
        w1, t1 = written(), time.monotonic()
        r.check("%s: once lifted, a's writes run free" % proto,
                wait_for(lambda: written() - w1 >= 32 * MiB, 5),
                "%.1f MiB in %.1f s" % ((written() - w1) / MiB, time.monotonic() - t1))
    finally:
        bad.kill()
        bad.wait()
    r.check("%s: nothing of a waits once the tenant left" % proto,
            wait_for(lambda: waiting(b) == 0, 2), "waiting %d" % waiting(b))


def main(r):
    if not os.access(PERF, os.X_OK):
        r.bad("ballast-perf built", PERF)
        return
    for bad in ("0", "32M"):
        p = subprocess.run([ballast_bin(), "serve", "--cores", "1", "--buffer-memory", "16M",
                            "--qos-wait-memory", bad, "--export", "a=ram:1M"],
                           capture_output=True, text=True, timeout=30)
        r.check("--qos-wait-memory %s is refused (1 MiB per core to --buffer-memory)" % bad,
                p.returncode != 0 and "--qos-wait-memory" in p.stderr, p.stderr[-300:])
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
        zero_byte_commands(r, b, nqn_a)
        b.check_clean_end(r)


def zero_byte_commands(r, b, nqn):
    """Under an I/O limit, trims, write-zeroes and DSM ranges wait for their slots like
    writes; they hold no memory, and many of them waiting at once with writes among them
    (and going in any order) harm nothing."""
    r.check_eq("a limited to 1000 I/Os per second", 0,
               b.ctl("export", "limit", "a", "--iops", "1000").returncode)
    h = nbd.NBD()
    h.connect_uri(b.uri("a"))
    buf = nbd.Buffer.from_bytearray(bytearray(b"\x5a" * 65536))
    cookies = []
    for i in range(64):
        off = i * 65536
        if i % 3 == 0:
            cookies.append(h.aio_pwrite(buf, off))
        elif i % 3 == 1:
            cookies.append(h.aio_trim(65536, off))
        else:
            cookies.append(h.aio_zero(65536, off))
    deadline = time.monotonic() + 20
    while h.aio_in_flight() > 0 and time.monotonic() < deadline:
        h.poll(1)
    r.check("NBD: 64 writes, trims and write-zeroes under the I/O limit all complete",
            all(h.aio_command_completed(c) for c in cookies), "%d in flight" % h.aio_in_flight())
    h.shutdown()
    admin, io = nvmeraw.io_queue(b.nvmf_port(), nqn)
    cids = []
    for k in range(8):
        body = b"".join(struct.pack("<IIQ", 0, 16, (k * 8 + j) * 16) for j in range(8))
        cid = io.next_cid()
        io.send(nvmeraw.capsule(nvmeraw.sqe(OP_DSM, cid, nsid=1, sgl_len=len(body),
                                            sgl_type=nvmeraw.SGL_INCAPSULE,
                                            cdw=(7, 1 << 2, 0, 0, 0, 0)), body))
        cids.append(cid)
    got = {}
    for _ in cids:
        cid, status, _ = io.response()
        got[cid] = status
    r.check_eq("NVMe/TCP: 8 DSM commands of 8 ranges each under the I/O limit all succeed",
               {c: 0 for c in cids}, got)
    io.close()
    admin.close()
    r.check("daemon alive after them", b.alive(), b.log_tail(10))
    b.ctl("export", "limit", "a", "--iops", "0")


if __name__ == "__main__":
    guarded(main)
