#!/usr/bin/python3
"""The per-I/O path allocates nothing: heap allocations on the data cores per request.

The daemon's allocator counts each thread's allocations, and every core reports its own
(`ballast stats --json`: `allocations`). A RAM export and a volume of a pool (both written
first, so writes overwrite) are driven by fio's NBD engine (libnbd) and by ballast-perf over
NVMe/TCP: 4 KiB random reads and writes at QD32, 4 KiB random reads at QD1, 128 KiB sequential
reads and writes at QD8. Each workload runs long (warming the daemon's buffer caches up to its
peak), then short and long again, each on a fresh connection; what a connection costs (its
handshake, its task, its vectors' growth) is about the same in the last two, so the difference
in allocations over the difference in requests is what a request costs: at most one allocation
per 2,000 requests (statistics replies) beyond a few dozen for the setups' variation. A second
RAM export, never written, is read the same way over NBD (answered as holes). And 20,000 4 KiB
random writes go into a fresh 1 GiB volume over each protocol: first writes, whose metadata
grows, at most one allocation per 10 writes (measured ~0.03). Last, NBD over TLS (a PSK;
userspace TLS where the kernel has no kTLS) through libnbd, measured within one connection.

Before this check a send allocated its message header, an NBD read from RAM its extent list, a
flush round its task list, and a first write its path down the mapping tree (0.87 per write);
each is caught here. Done with one core, then with two cores and two NVMe/TCP queues (a queue
per core); every core must answer every statistics request.
"""

import json
import os
import random
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from ballast_testlib import REPO_ROOT, Ballast, ballast_bin, free_port, guarded  # noqa: E402

PERF = os.environ.get("BALLAST_PERF_BIN") or os.path.join(
    REPO_ROOT, "build", "cargo", "release", "ballast-perf")
# (label, rw, block size, queue depth, requests in the short run, in the long run)
WORKLOADS = [
    ("4k random read QD32", "randread", "4k", 32, 4000, 40000),
    ("4k random write QD32", "randwrite", "4k", 32, 4000, 40000),
    ("4k random read QD1", "randread", "4k", 1, 1000, 6000),
    ("128k read QD8", "read", "128k", 8, 1000, 8000),
    ("128k write QD8", "write", "128k", 8, 1000, 8000),
]
BYTES = {"4k": 4096, "128k": 131072, "1m": 1 << 20}
SPAN = 128 << 20  # bytes of each export the workloads use
PER_IO_MAX = 1 / 2000
# First writes into a fresh volume: each maps a cluster or marks a 4 KiB piece written (a
# mapping record, a tree update); what may allocate is per commit and per epoch (journal
# blocks, the families' record and cluster sets growing back), measured ~0.02 per write. Each
# write's tree update allocated its path (0.87 per write) before the check.
FIRST_WRITE_MAX = 1 / 10
# What a connection's setup may vary by between two runs: its vectors (in-flight table, send
# batch) grow by doublings up to the peak its run happened to reach.
SLACK = 40


def core_totals(b, cores):
    """Allocations and requests summed over the daemon's `cores` cores (all must answer)."""
    reactors = b.reactors()
    if sorted(c["core"] for c in reactors) != list(range(cores)):
        raise RuntimeError("stats from cores %s, not all %d" % ([c["core"] for c in reactors],
                                                                  cores))
    ios = sum(c["reads"] + c["writes"] for c in reactors)
    return sum(c["allocations"] for c in reactors), ios


def run_fio(b, export, rw, bs, qd, count):
    subprocess.run(
        ["fio", "--name=allocs", "--ioengine=nbd", "--uri=" + b.uri(export), "--rw=" + rw,
         "--bs=" + bs, "--iodepth=%d" % qd, "--size=%d" % SPAN,
         "--io_size=%d" % (count * BYTES[bs]), "--output-format=terse"],
        check=True, capture_output=True, timeout=120)


def run_perf(b, nvmf_port, export, rw, bs, qd, count, queues):
    subprocess.run(
        [PERF, "--addr", "127.0.0.1:%d" % nvmf_port, "--nqn", "nqn.2026-11.dev.ballast:" + export,
         "--rw", rw, "--bs", bs, "--qd", str(qd), "--size", str(SPAN), "--queues", str(queues),
         "--number-ios", str(count), "--runtime", "60"],
        check=True, capture_output=True, timeout=120)


def first_writes(r, b, cores, nvmf_port, queues):
    """4 KiB random writes into a fresh 1 GiB volume, NBD (fio) and NVMe/TCP (ballast-perf):
    most map a cluster or mark a piece written; allocations stay at FIRST_WRITE_MAX."""
    for proto in ("nbd", "nvmf"):
        name = "fresh-" + proto
        made = b.ctl("volume", "create", name, "1G")
        r.check("volume create " + name, made.returncode == 0, made.stderr)
        a0, n0 = core_totals(b, cores)
        if proto == "nbd":
            subprocess.run(
                ["fio", "--name=first", "--ioengine=nbd", "--uri=" + b.uri(name),
                 "--rw=randwrite", "--bs=4k", "--iodepth=32", "--io_size=%d" % (20000 * 4096),
                 "--output-format=terse"], check=True, capture_output=True, timeout=120)
        else:
            subprocess.run(
                [PERF, "--addr", "127.0.0.1:%d" % nvmf_port, "--nqn",
                 "nqn.2026-11.dev.ballast:" + name, "--rw", "randwrite", "--bs", "4k", "--qd",
                 "32", "--queues", str(queues), "--number-ios", str(20000 // queues),
                 "--runtime", "60"], check=True, capture_output=True, timeout=120)
        a1, n1 = core_totals(b, cores)
        listed = json.loads(b.ctl("volume", "list", "--json").stdout)
        allocated = sum(v["allocated_bytes"] for v in listed if v["name"] == name)
        # allocated_bytes counts the 4 KiB pieces written: most of the 20,000 were fresh.
        r.check("cores %d, %s: the writes went to fresh pieces (%d MiB allocated)"
                % (cores, name, allocated >> 20), allocated >= 64 << 20, str(allocated))
        r.check("cores %d, %s: %d allocations for %d first writes (at most %.2f each)"
                % (cores, name, a1 - a0, n1 - n0, FIRST_WRITE_MAX),
                n1 - n0 >= 20000 and a1 - a0 <= (n1 - n0) * FIRST_WRITE_MAX,
                "%d %d" % (a1 - a0, n1 - n0))


def measure(r, b, cores, label, client):
    """Runs `client(count)` long (to warm the daemon's caches up to this workload's peak),
    short and long again; checks the allocations per extra request. What a connection's
    setup allocates varies by a few dozen between runs (seen: 61 and 121 for the same short
    run), so a pair over the bound is measured again, up to three times: an allocation per
    request would be tens of thousands over it every time."""
    client(client.counts[1])
    for attempt in range(3):
        counts = []
        for count in client.counts:
            a0, n0 = core_totals(b, cores)
            client(count)
            a1, n1 = core_totals(b, cores)
            counts.append((a1 - a0, n1 - n0))
        (a_short, n_short), (a_long, n_long) = counts
        extra_ios = n_long - n_short
        extra_allocs = a_long - a_short
        if extra_allocs <= SLACK + extra_ios * PER_IO_MAX:
            break
        print("%s: %d allocations over %d more requests (attempt %d), measuring again"
              % (label, extra_allocs, extra_ios, attempt + 1), flush=True)
    r.check("%s: the long run did more requests (%d vs %d)" % (label, n_long, n_short),
            extra_ios >= (client.counts[1] - client.counts[0]) // 2, str(counts))
    r.check("%s: %d allocations over %d more requests (at most %d + %.4f per request; "
            "short run %d allocations for %d requests)"
            % (label, extra_allocs, extra_ios, SLACK, PER_IO_MAX, a_short, n_short),
            extra_allocs <= SLACK + extra_ios * PER_IO_MAX, str(counts))


def serve_and_check(r, cores, queues):
    nvmf_port = free_port()
    b = Ballast(["--cores", str(cores), "--nvmf-listen", "127.0.0.1:%d" % nvmf_port,
                 "--pool", "{data}/pool.img", "--export", "ram=ram:%d" % SPAN,
                 "--export", "holes=ram:%d" % SPAN])
    pool = os.path.join(b.data_dir, "pool.img")
    subprocess.run([ballast_bin(), "pool", "create", pool, "--size", "4G"], check=True,
                   capture_output=True)
    with b:
        made = b.ctl("volume", "create", "vol", "%dM" % (SPAN >> 20))
        r.check("volume create", made.returncode == 0, made.stderr)
        a, _ = core_totals(b, cores)
        r.check("the cores count their allocations (the daemon's allocator counts)", a > 0,
                str(a))
        for export in ("ram", "vol"):
            run_fio(b, export, "write", "1m", 8, SPAN >> 20)  # written: writes overwrite
        for export in ("ram", "vol"):
            for label, rw, bs, qd, short, long_ in WORKLOADS:
                def nbd_client(count, export=export, rw=rw, bs=bs, qd=qd):
                    run_fio(b, export, rw, bs, qd, count)
                nbd_client.counts = (short, long_)
                measure(r, b, cores, "cores %d, NBD (fio), %s, %s" % (cores, export, label),
                        nbd_client)

                def nvmf_client(count, export=export, rw=rw, bs=bs, qd=qd):
                    run_perf(b, nvmf_port, export, rw, bs, qd, count, queues)
                nvmf_client.counts = (short, long_)
                measure(r, b, cores, "cores %d, NVMe/TCP (%d queues), %s, %s"
                        % (cores, queues, export, label), nvmf_client)
        first_writes(r, b, cores, nvmf_port, queues)
        # Reads of a RAM export never written: NBD answers them as holes (no buffer at all).
        for label, rw, bs, qd, short, long_ in WORKLOADS:
            if rw.endswith("read") and qd > 1:
                def hole_client(count, rw=rw, bs=bs, qd=qd):
                    run_fio(b, "holes", rw, bs, qd, count)
                hole_client.counts = (short, long_)
                measure(r, b, cores, "cores %d, NBD (fio), holes, %s" % (cores, label),
                        hole_client)
        r.check("no panic", not b.panics(), "\n".join(b.panics()))


def libnbd_run(h, write, bs, qd, count):
    """`count` random `bs` reads or writes at depth `qd` on libnbd handle `h`."""
    import nbd  # Debian's python3-libnbd
    buf = nbd.Buffer(bs)
    blocks = h.get_size() // bs
    rng = random.Random(bs * 31 + qd)
    issued = done = 0
    while done < count:
        while issued - done < qd and issued < count:
            off = rng.randrange(blocks) * bs
            (h.aio_pwrite if write else h.aio_pread)(buf, off)
            issued += 1
        h.poll(-1)
        while done < issued:
            try:
                c = h.aio_peek_command_completed()
            except nbd.Error:  # none in flight or completed: all retired
                break
            if c == 0:
                break
            h.aio_command_completed(c)
            done += 1


def settle():
    """Lets the idle core give its buffer cache back now (it does before it sleeps, at most
    once a second, after a connection left or with more than 1 MiB cached), not in the middle
    of the next measurement: the libnbd client is slow enough that the core sleeps between its
    requests, and a trim there made the next requests allocate their buffers again (65
    allocations in one run of the 4 KiB reads after the 1 MiB fill)."""
    time.sleep(2)


def tls_check(r):
    """NBD over TLS (PSK; userspace TLS where the kernel has no kTLS): libnbd, one connection
    per workload, 20,000 requests measured after 3,000 of warm-up: the same bound."""
    import nbd  # Debian's python3-libnbd
    b = Ballast(["--cores", "1", "--export", "ram=ram:%d" % SPAN, "--nbd-tls", "require",
                 "--nbd-tls-psk", "{data}/keys.psk"])
    with open(os.path.join(b.data_dir, "keys.psk"), "w") as f:
        f.write("alice:%s\n" % os.urandom(32).hex())
    os.chmod(os.path.join(b.data_dir, "keys.psk"), 0o600)
    with b:
        uri = "nbds://alice@127.0.0.1:%d/ram?tls-psk-file=%s" % (
            b.port, os.path.join(b.data_dir, "keys.psk"))
        for write, bs, qd in ((True, 1 << 20, 8), (False, 4096, 32), (True, 4096, 32),
                              (False, 131072, 8), (True, 131072, 8)):
            h = nbd.NBD()
            h.set_uri_allow_local_file(True)
            h.connect_uri(uri)
            if bs == 1 << 20:  # written first: writes overwrite (no RAM chunk allocated)
                for off in range(0, SPAN, bs):
                    h.pwrite(bytes(bs), off)
                h.shutdown()
                settle()
                continue
            libnbd_run(h, write, bs, qd, 3000)
            a0, n0 = core_totals(b, 1)
            libnbd_run(h, write, bs, qd, 20000)
            a1, n1 = core_totals(b, 1)
            h.shutdown()
            settle()
            label = "TLS, NBD (libnbd), %s %d KiB QD%d" % ("write" if write else "read",
                                                             bs >> 10, qd)
            r.check("%s: %d allocations over %d requests on one connection (at most %d + "
                    "%.4f per request)" % (label, a1 - a0, n1 - n0, SLACK, PER_IO_MAX),
                    n1 - n0 >= 20000 and a1 - a0 <= SLACK + (n1 - n0) * PER_IO_MAX,
                    "%d %d" % (a1 - a0, n1 - n0))
        r.check("TLS: no panic", not b.panics(), "\n".join(b.panics()))


def main(r):
    if not os.access(PERF, os.X_OK):
        r.bad("ballast-perf missing", PERF)
        return
    serve_and_check(r, 1, 1)
    serve_and_check(r, 2, 2)
    tls_check(r)


if __name__ == "__main__":
    guarded(main)
