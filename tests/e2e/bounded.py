#!/usr/bin/python3
"""Hostile, stalled and crowded clients cannot exhaust the daemon (issue 8). Run with
/usr/bin/python3 (libnbd's Python module belongs to it).

Part 1, one daemon with a 128 MiB buffer budget, waves of raw-socket clients of our own, each
wave kept open while the next arrives, while fio (libnbd engine) and libnbd clients keep doing
verified I/O:
  1. 1000 idle NBD and 1000 idle NVMe/TCP connections        -> RSS growth <= 16 MiB
  2. 64 NBD clients stalled mid-way through a 32 MiB write
  3. 64 NVMe/TCP hosts, 128 x 1 MiB writes each, H2CData never sent
  4. NBD and NVMe/TCP clients that send reads and never read the replies
                                                    -> RSS <= baseline + budget + 32 MiB
  5. everybody leaves                                -> RSS <= baseline + 16 MiB
Part 2, a daemon with short deadlines and a connection limit of 40: handshake deadline (both
protocols), stall deadline (stalled writer, non-reader, unanswered R2T), refusal beyond the
limit and recovery, all counted in `ballast stats --json`; the end after NBD_CMD_DISC: a
FIN after the last reply even with input left unread, the lingering bounded by bytes and by
the stall deadline.
"""
import errno
import json
import os
import resource
import select
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import nbd  # noqa: E402

import nvmeraw  # noqa: E402
from nbdraw import (CMD_DISC, CMD_READ, CMD_WRITE, IHAVEOPT, OPT_GO,  # noqa: E402
                    nbd_connect, nbd_req, recvn)
from ballast_testlib import (Ballast, ballast_bin, closed_by_peer, free_port,  # noqa: E402
                             guarded, rss_mib, wait_for)

MiB = 1 << 20
BUDGET = 128 * MiB
NQN = "nqn.2026-11.dev.ballast:vol"


def stats(b):
    p = b.ctl("stats", "--json")
    if p.returncode != 0:
        raise RuntimeError("ballast stats failed: " + p.stderr)
    return json.loads(p.stdout)


def charged(s):
    return sum(c["buffer_charged"] for c in s["reactors"])


def hung_up_unread(s, within):
    """True if the server closes `s` within `within` seconds, without reading anything from it:
    a client that never reads must stay one while we wait (draining it would unstall the
    server's sends and make it an ordinary, slow reader)."""
    p = select.poll()
    p.register(s, select.POLLRDHUP | select.POLLHUP | select.POLLERR)
    deadline = time.monotonic() + within
    while (left := deadline - time.monotonic()) > 0:
        if p.poll(left * 1000):
            return True
    return False


# 4 MiB in 256 KiB requests (nbdcopy's and qemu's usual size), flushed, read back by another
# connection.
# ---- the hostile waves (also opened by perf/bounds_bench.py); each returns its sockets,
# which must stay open for the wave to last.

def idle_crowd(port, nvmf_port, n):
    """n connections per protocol that never say a word."""
    return [socket.create_connection(("127.0.0.1", p)) for _ in range(n) for p in (port, nvmf_port)]


def stalled_writers(port, export, n, region=1 << 30):
    """n NBD clients that announce a 32 MiB write, send what the socket takes of its first
    MiB, and stall."""
    socks = []
    for i in range(n):
        s = nbd_connect(port, export=export)
        s.sendall(nbd_req(CMD_WRITE, i, i * 32 * MiB % region, 32 * MiB))
        s.setblocking(False)
        try:
            s.send(b"\xab" * MiB)
        except BlockingIOError:
            pass
        socks.append(s)
    return socks


def unanswered_r2ts(nvmf_port, nqn, n, export_mib=1024):
    """n NVMe/TCP hosts (admin + one I/O queue each) that submit 128 writes of 1 MiB (within the
    first `export_mib` MiB of a 4 KiB-LBA namespace) and never send the data the R2Ts ask for;
    returns [(admin, io)]."""
    hosts = []
    for i in range(n):
        admin, io = nvmeraw.io_queue(nvmf_port, nqn)
        io.s.sendall(b"".join(io.write_cmd(slba=((i * 128 + k) % export_mib) * 256, nbytes=MiB)
                              for k in range(128)))
        hosts.append((admin, io))
    return hosts


def non_readers(port, nvmf_port, export, nqn, n_nbd, n_nvme):
    """Clients with tiny receive buffers that ask for reads and never read the replies: n_nbd
    NBD clients with 64 x 1 MiB reads, n_nvme NVMe/TCP hosts with 127 x 128 KiB reads."""
    socks = []
    for _ in range(n_nbd):
        s = nbd_connect(port, export=export, rcvbuf=4096)
        s.setblocking(False)
        try:
            s.send(b"".join(nbd_req(CMD_READ, k, (k % 256) * MiB, MiB) for k in range(64)))
        except BlockingIOError:
            pass
        socks.append(s)
    for _ in range(n_nvme):
        admin, io = nvmeraw.io_queue(nvmf_port, nqn, rcvbuf=4096)
        io.s.sendall(b"".join(io.read_cmd(slba=k * 32, nbytes=128 * 1024) for k in range(127)))
        socks += [admin.s, io.s]
    return socks


VERIFY_CLIENT = r'''
import nbd, os, sys
uri, base = sys.argv[1], int(sys.argv[2])
h = nbd.NBD(); h.connect_uri(uri)
data = os.urandom(4 << 20)
for off in range(0, len(data), 256 << 10):
    h.pwrite(data[off:off + (256 << 10)], base + off)
h.flush()
h2 = nbd.NBD(); h2.connect_uri(uri)
back = b"".join(h2.pread(256 << 10, base + off) for off in range(0, len(data), 256 << 10))
if back != data:
    sys.exit("read back differs")
h.shutdown(); h2.shutdown()
'''


def real_client_works(r, b, what):
    t0 = time.monotonic()
    try:
        p = subprocess.run(["/usr/bin/python3", "-c", VERIFY_CLIENT, b.uri("vol"), str(900 * MiB)],
                           capture_output=True, text=True, timeout=60)
        ok, detail = p.returncode == 0, p.stderr.strip()[-300:]
    except subprocess.TimeoutExpired:
        ok, detail = False, "timed out"
    r.check("%s: a libnbd client writes, flushes and reads back 4 MiB [%.2fs]"
            % (what, time.monotonic() - t0), ok, detail)
    p = subprocess.run(["nbdinfo", "--size", b.uri("vol")], capture_output=True, text=True,
                       timeout=30)
    r.check("%s: nbdinfo answers" % what, p.returncode == 0 and p.stdout.strip() == str(1 << 30),
            (p.stdout + p.stderr).strip())
    # nbdcopy (its defaults: 64 requests of 256 KiB in flight) in and out of a 32 MiB export
    src, back = os.path.join(b.tmp, "src.img"), os.path.join(b.tmp, "back.img")
    if not os.path.exists(src):
        with open(src, "wb") as f:
            f.write(os.urandom(32 * MiB))
    t0 = time.monotonic()
    try:
        ok = (subprocess.run(["nbdcopy", src, b.uri("small")], capture_output=True,
                             timeout=120).returncode == 0
              and subprocess.run(["nbdcopy", b.uri("small"), back], capture_output=True,
                                 timeout=120).returncode == 0
              and open(src, "rb").read() == open(back, "rb").read())
    except subprocess.TimeoutExpired:
        ok = False
    r.check("%s: nbdcopy copies 32 MiB in and out, identical [%.2fs]"
            % (what, time.monotonic() - t0), ok)


def part1(r):
    with Ballast(["--export", "vol=file:{data}/vol.img:1G", "--export",
                  "small=file:{data}/small.img:32M", "--buffer-memory", "128M",
                  "--handshake-timeout", "300", "--stall-timeout", "300",
                  "--max-connections", "4096", "--cores", "2"]) as b:
        nvmf_port = b.nvmf_port()
        pid = b.proc.pid
        real_client_works(r, b, "unloaded")
        s0 = stats(b)
        lim = s0["limits"]
        r.check("stats --json shows every limit",
                lim.get("buffer_memory") == BUDGET and lim.get("max_connections") == 4096
                and lim.get("handshake_timeout") == 300000 and lim.get("stall_timeout") == 300000
                and all(c["buffer_budget"] == BUDGET // 2 for c in s0["reactors"]), json.dumps(lim))
        human = b.ctl("stats").stdout
        r.check("ballast stats prints the limits and connection counters",
                "max connections 4096" in human and "refused" in human, human[-400:])
        # Admin queues asking for 1 MiB log pages they never read: their responses are not
        # charged to the payload budget, so an admin queue stops being read at 256 KiB unsent
        # (it queued 16 MiB before, ~2 GiB with 128 of them).
        time.sleep(1.5)
        rss0 = rss_mib(pid)
        readers = []
        numd = (MiB // 4) - 1
        glp = (0x70 | (numd & 0xFFFF) << 16, numd >> 16, 0, 0, 0, 0)
        for _ in range(8):
            h = nvmeraw.Host(nvmf_port, rcvbuf=4096)
            h.handshake()
            h.connect(nvmeraw.DISCOVERY_NQN, qid=0, sqsize=31)
            h.enable()
            h.s.setblocking(False)
            cmds = b"".join(nvmeraw.capsule(nvmeraw.sqe(nvmeraw.OP_GET_LOG_PAGE, 100 + k,
                                                        sgl_len=MiB, cdw=glp)) for k in range(30))
            try:
                h.s.send(cmds)
            except BlockingIOError:
                pass
            readers.append(h)
        time.sleep(2)
        grown = rss_mib(pid) - rss0
        r.check("8 admin queues asking for 30 x 1 MiB log pages they never read: daemon grew "
                "%.0f MiB (< 48)" % grown, grown < 48)
        for h in readers:
            h.close()
        # A discovery controller whose host asks for no keep-alive (`nvme discover` does)
        # still has one, 120 s as Linux nvmet's: a host that vanishes does not hold it forever.
        h = nvmeraw.Host(nvmf_port)
        h.handshake()
        h.connect(nvmeraw.DISCOVERY_NQN, qid=0, sqsize=31, kato_ms=0)
        h.enable()
        h.send(nvmeraw.capsule(nvmeraw.sqe(0x0A, h.next_cid(), cdw=(0x0F, 0, 0, 0, 0, 0))))
        _, st, kato = h.response()
        r.check("a discovery controller connected with KATO 0 keeps alive 120 s (%d ms)" % kato,
                st == 0 and kato == 120000)
        h.close()
        time.sleep(1.5)
        base = rss_mib(pid)
        print("baseline RSS %.1f MiB" % base)

        # fio keeps working through every wave (libnbd engine, 4k random read/write).
        fio_out = os.path.join(b.tmp, "fio.json")
        fio = subprocess.Popen(
            ["fio", "--name=real", "--ioengine=nbd", "--uri=" + b.uri("vol"), "--rw=randrw",
             "--bs=4k", "--iodepth=8", "--size=256M", "--time_based", "--runtime=600",
             "--output-format=json", "--output=" + fio_out],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        all_socks = []
        peak = [0.0]

        def sample():
            v = rss_mib(pid)
            peak[0] = max(peak[0], v)
            return v

        # ---- wave 1: idle connections
        all_socks += idle_crowd(b.port, nvmf_port, 1000)
        r.check("wave 1: 2000 idle connections are all open",
                wait_for(lambda: stats(b)["connections"]["open"] >= 2000, 30),
                json.dumps(stats(b)["connections"]))
        time.sleep(1)
        grow = sample() - base
        r.check("wave 1: RSS growth for 2000 idle connections <= 16 MiB (%.1f MiB)" % grow,
                grow <= 16, "")
        real_client_works(r, b, "wave 1")

        # ---- wave 2: NBD writers stalled mid-way through a 32 MiB write
        all_socks += stalled_writers(b.port, "vol", 64)
        time.sleep(2)
        rss = sample()
        st = stats(b)
        r.check("wave 2: 64 stalled 32 MiB writers: RSS <= baseline + budget + 32 MiB "
                "(%.1f MiB over baseline, %.1f MiB charged)" % (rss - base, charged(st) / MiB),
                rss - base <= BUDGET / MiB + 32)
        r.check("wave 2: buffer memory charged stays within the budget",
                all(c["buffer_charged"] <= c["buffer_budget"] and c["buffer_peak"] <= c["buffer_budget"]
                    for c in st["reactors"]), json.dumps([c["buffer_charged"] for c in st["reactors"]]))
        real_client_works(r, b, "wave 2")

        # ---- wave 3: NVMe/TCP hosts with full queues of 1 MiB writes, H2CData never sent
        hosts = unanswered_r2ts(nvmf_port, NQN, 64)
        r2ts = 0
        for _, io in hosts:
            for _ in range(128):
                typ, _p = io.pdu()
                r2ts += typ == nvmeraw.R2T
        r.check("wave 3: every host gets its 128 R2Ts (64 x 128)", r2ts == 64 * 128,
                "got %d" % r2ts)
        time.sleep(2)
        rss = sample()
        r.check("wave 3: + 64 NVMe/TCP hosts x 128 unanswered 1 MiB R2Ts: RSS <= baseline + "
                "budget + 32 MiB (%.1f MiB over baseline)" % (rss - base),
                rss - base <= BUDGET / MiB + 32)
        all_socks += [h.s for pair in hosts for h in pair]
        real_client_works(r, b, "wave 3")

        # ---- wave 4: clients that never read their replies
        all_socks += non_readers(b.port, nvmf_port, "vol", NQN, 32, 16)
        time.sleep(3)
        rss = sample()
        st = stats(b)
        r.check("wave 4: + 48 clients that never read: RSS <= baseline + budget + 32 MiB "
                "(%.1f MiB over baseline, %.1f MiB charged, peak %.1f MiB)"
                % (rss - base, charged(st) / MiB, max(c["buffer_peak"] for c in st["reactors"]) / MiB),
                rss - base <= BUDGET / MiB + 32)
        real_client_works(r, b, "wave 4")
        r.check("fio is still running through all waves", fio.poll() is None,
                fio.stderr.read().decode()[-300:] if fio.poll() is not None else "")
        fio.send_signal(2)  # SIGINT: fio stops and writes its results
        fio.wait(60)
        try:
            with open(fio_out) as f:
                text = f.read()
            job = json.loads(text[text.index("{"):])["jobs"][0]  # after "terminating" notes
            ios = job["read"]["total_ios"] + job["write"]["total_ios"]
            r.check("fio did real I/O without errors during the waves (%d I/Os)" % ios,
                    ios > 1000 and job["error"] == 0, "error=%s" % job["error"])
        except (OSError, ValueError, KeyError, IndexError) as e:
            r.bad("fio left a JSON result", str(e))
        print("peak RSS %.1f MiB over baseline" % (peak[0] - base))

        # ---- everybody leaves
        for s in all_socks:
            try:
                s.close()
            except OSError:
                pass
        r.check("all hostile connections are gone",
                wait_for(lambda: stats(b)["connections"]["open"] == 0, 60),
                json.dumps(stats(b)["connections"]))
        r.check("all buffer memory is released", wait_for(lambda: charged(stats(b)) == 0, 10),
                "charged %d" % charged(stats(b)))
        ok = wait_for(lambda: rss_mib(pid) - base <= 16, 15, step=0.5)
        r.check("after they leave RSS is back near its baseline: %.1f MiB over (<= 16)"
                % (rss_mib(pid) - base), ok)
        real_client_works(r, b, "after")
        r.check("no panics", not b.panics(), "\n".join(b.panics()[:5]))


def part2(r):
    with Ballast(["--export", "vol=file:{data}/vol.img:1G", "--handshake-timeout", "1",
                  "--stall-timeout", "2", "--max-connections", "40", "--cores", "2"]) as b:
        nvmf_port = b.nvmf_port()

        # handshake deadline
        t0 = time.monotonic()
        silent_nbd = socket.create_connection(("127.0.0.1", b.port))
        silent_nvme = socket.create_connection(("127.0.0.1", nvmf_port))
        half = socket.create_connection(("127.0.0.1", b.port))
        half.sendall(struct.pack(">I", 3) + struct.pack(">QII", IHAVEOPT, OPT_GO, 100) + b"x" * 10)
        r.check("a silent NBD client is dropped at the 1 s handshake deadline",
                closed_by_peer(silent_nbd, 4))
        r.check("a silent NVMe/TCP host (no ICReq) is dropped at the deadline",
                closed_by_peer(silent_nvme, 4))
        r.check("an NBD client stuck mid-option is dropped at the deadline", closed_by_peer(half, 4))
        r.check("... within 1-4 s (%.1fs)" % (time.monotonic() - t0), time.monotonic() - t0 < 5)
        good = nbd_connect(b.port)
        admin, io = nvmeraw.io_queue(nvmf_port, NQN)
        r.check("connections that finished their handshakes are not dropped after it",
                not closed_by_peer(good, 2.5))
        admin.s.settimeout(0.5)
        try:
            admin.s.recv(1)
            r.bad("a connected NVMe/TCP admin queue is not dropped", "closed")
        except socket.timeout:
            r.ok("a connected NVMe/TCP admin queue is not dropped")
        s = stats(b)["connections"]
        r.check("stats count 3 handshake timeouts", s["handshake_timeouts"] == 3, json.dumps(s))

        # stall deadline
        t0 = time.monotonic()
        writer = nbd_connect(b.port)
        writer.sendall(nbd_req(CMD_WRITE, 1, 0, 4 * MiB) + b"\0" * (256 * 1024))
        nonreader = nbd_connect(b.port, rcvbuf=4096)
        nonreader.sendall(b"".join(nbd_req(CMD_READ, k, 0, MiB) for k in range(32)))
        io.s.sendall(io.write_cmd(0, MiB))
        typ, _ = io.pdu()
        r.check("the NVMe/TCP host gets an R2T", typ == nvmeraw.R2T)
        # (generous windows: a loaded CI machine may be slow to run the 2 s deadline's ticks)
        r.check("a writer stalled mid-payload is dropped at the 2 s stall deadline",
                closed_by_peer(writer, 10))
        r.check("a client that never reads its replies is dropped", hung_up_unread(nonreader, 10))
        r.check("an I/O queue that never answers its R2T is dropped", closed_by_peer(io.s, 10))
        r.check("... within 2-10 s (%.1fs)" % (time.monotonic() - t0), time.monotonic() - t0 < 12)
        s = stats(b)["connections"]
        r.check("stats count 3 connections dropped for stalling", s["stalled_dropped"] == 3,
                json.dumps(s))
        good.sendall(nbd_req(CMD_READ, 7, 0, 4096))
        good.settimeout(5)
        hdr = recvn(good, 16)
        r.check("a well-behaved idle client survives and still gets replies",
                struct.unpack(">IIQ", hdr)[1:] == (0, 7) and len(recvn(good, 4096)) == 4096)
        before = stats(b)["connections"]["open"]
        good.close()
        admin.close()
        # graceful_end counts from the open connections: these two must be gone first (their
        # closes reach the server a moment later; counted early they made its checks flaky).
        r.check("the idle client and the admin queue close",
                wait_for(lambda: stats(b)["connections"]["open"] == before - 2, 5),
                json.dumps(stats(b)["connections"]))
        # A queue the target is closing (here: a malformed PDU after reads it never takes) is
        # dropped at the stall deadline like any other, not kept while its responses wait.
        t0 = time.monotonic()
        admin2, io2 = nvmeraw.io_queue(nvmf_port, NQN, rcvbuf=4096)
        io2.s.sendall(b"".join(io2.read_cmd(slba=k * 32, nbytes=128 * 1024) for k in range(32))
                      + b"\x7f" * 24)
        dropped = hung_up_unread(io2.s, 10)
        r.check("an NVMe/TCP queue closing with responses it never reads is dropped (%.1fs)"
                % (time.monotonic() - t0), dropped)
        admin2.close()
        io2.close()
        # The same for NBD: a client that closes its sending side after asking for reads and
        # never reads them is dropped at the stall deadline (it kept its replies' memory and
        # its place in the connection limit forever).
        t0 = time.monotonic()
        halfclosed = nbd_connect(b.port, rcvbuf=4096)
        halfclosed.sendall(b"".join(nbd_req(CMD_READ, k, 0, MiB) for k in range(16)))
        halfclosed.shutdown(socket.SHUT_WR)
        dropped = hung_up_unread(halfclosed, 10)
        r.check("an NBD client that half-closes and never reads its replies is dropped (%.1fs)"
                % (time.monotonic() - t0), dropped)
        halfclosed.close()
        # A controller reset (CC.EN cleared) deletes its I/O queues.
        admin3, io3 = nvmeraw.io_queue(nvmf_port, NQN)
        admin3.set_cc(0)
        r.check("a controller reset (CC.EN 1 -> 0) deletes its I/O queue", closed_by_peer(io3.s, 5))
        admin3.close()
        io3.close()
        r.check("... and its controller's admin queue closes",
                wait_for(lambda: stats(b)["connections"]["open"] == before - 2, 10),
                json.dumps(stats(b)["connections"]))
        graceful_end(r, b)

        # connection limit
        r.check("connections from part 2 are gone",
                wait_for(lambda: stats(b)["connections"]["open"] == 0, 10),
                json.dumps(stats(b)["connections"]))
        held = [nbd_connect(b.port) for _ in range(40)]
        extra = [socket.create_connection(("127.0.0.1", p)) for p in (b.port, nvmf_port) * 5]
        r.check("beyond --max-connections 40 new connections are closed at once",
                all(closed_by_peer(s, 3) for s in extra))
        s = stats(b)["connections"]
        r.check("stats: 40 open, 10 refused", s["open"] == 40 and s["refused"] == 10, json.dumps(s))
        with open(b.log) as f:
            logged = sum("connection limit reached" in line for line in f)
        r.check("refusals are logged at most once a second (%d lines for 10)" % logged,
                1 <= logged <= 4)
        for s_ in held[:5]:
            s_.close()
        wait_for(lambda: stats(b)["connections"]["open"] <= 35, 10)
        h = nbd.NBD()
        h.connect_uri(b.uri("vol"))
        r.check("after some leave, a real client connects again", h.get_size() == 1 << 30)
        h.shutdown()
        for s_ in held[5:] + extra:
            s_.close()
        r.check("no panics", not b.panics(), "\n".join(b.panics()[:5]))


def read_to_end(s, within):
    """Reads until the server's FIN: (bytes read, None), or (bytes read, the error) if the
    connection was reset or timed out instead."""
    s.settimeout(within)
    got = bytearray()
    try:
        while chunk := s.recv(1 << 20):
            got += chunk
    except OSError as e:
        return bytes(got), e
    return bytes(got), None


def graceful_end(r, b):
    """NBD_CMD_DISC ends a connection gracefully: the replies, then the server's FIN; input
    the client sends meanwhile is read and dropped (a socket closed with input unread answers
    with a reset, which reaches the client as an error, or loses the end of its replies). The
    lingering that takes is bounded: 64 KiB of input, or the stall deadline (2 s here)."""
    base = stats(b)["connections"]
    # An 8 MiB read and the disconnect; the replies cannot all leave before the client reads
    # them, and bytes it sends meanwhile (a TLS client's close_notify, a pipelined request)
    # reach the server after it stopped reading.
    s = nbd_connect(b.port, rcvbuf=65536)
    s.sendall(nbd_req(CMD_READ, 1, 0, 8 * MiB) + nbd_req(CMD_DISC, 2, 0, 0))
    time.sleep(0.3)
    s.sendall(b"after the disconnect" * 5)
    got, err = read_to_end(s, 10)
    r.check("after NBD_CMD_DISC: the whole reply (8 MiB) arrives, then the server's FIN, not a "
            "reset, although input arrived after the disconnect",
            err is None and len(got) == 16 + 8 * MiB and struct.unpack(">IIQ", got[:16])[1:] == (0, 1),
            "error %r after %d bytes" % (err, len(got)))
    s.close()

    # The server's FIN goes out at once, but it waits for the client's: one that keeps its end
    # open is dropped at the stall deadline.
    t0 = time.monotonic()
    keeper = nbd_connect(b.port)
    keeper.sendall(nbd_req(CMD_DISC, 3, 0, 0))
    got, err = read_to_end(keeper, 5)
    r.check("a client that disconnects gets the server's FIN at once", err is None and got == b"",
            "error %r after %d bytes" % (err, len(got)))
    r.check("... the server holds the connection while the client keeps its end open",
            stats(b)["connections"]["open"] == base["open"] + 1, json.dumps(stats(b)["connections"]))
    gone = wait_for(lambda: stats(b)["connections"]["open"] == base["open"], 12)
    s2 = stats(b)["connections"]
    r.check("... and drops it at the stall deadline (%.1fs)" % (time.monotonic() - t0),
            gone and s2["stalled_dropped"] == base["stalled_dropped"] + 1, json.dumps(s2))
    keeper.close()

    # A client that keeps sending after its disconnect is cut off after 64 KiB of it, not
    # read for as long as it sends.
    flood = nbd_connect(b.port)
    flood.sendall(nbd_req(CMD_DISC, 4, 0, 0))
    flood.setblocking(False)
    sent, deadline = 0, time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            sent += flood.send(b"\xa5" * 65536)
        except BlockingIOError:
            time.sleep(0.01)
        except OSError:
            break
    cut = time.monotonic() < deadline
    wait_for(lambda: stats(b)["connections"]["open"] == base["open"], 5)
    s3 = stats(b)["connections"]
    r.check("a client that keeps sending after NBD_CMD_DISC is cut off (%d KiB sent)" % (sent >> 10),
            cut and s3["open"] == base["open"]
            and s3["stalled_dropped"] == base["stalled_dropped"] + 1, json.dumps(s3))
    flood.close()


def part3(r):
    """The budget's own limits: a budget below 16 MiB per core is refused with a clear error;
    a small one shrinks the largest request NBD advertises (and accepts) to what a core can
    grant one request."""
    d = tempfile.mkdtemp(prefix="ballast-budget.")
    p = subprocess.run([ballast_bin(), "serve",
                        "--data-dir", d, "--cores", "2", "--buffer-memory", "8M",
                        "--export", "vol=ram:64M", "--nbd-listen", "127.0.0.1:%d" % free_port(),
                        "--nvmf-listen", "127.0.0.1:%d" % free_port()],
                       capture_output=True, text=True, timeout=30)
    r.check("--buffer-memory below 16 MiB per core is refused, saying why",
            p.returncode != 0 and "below 16 MiB per core" in p.stderr, p.stderr[-300:])
    # Two listeners on one port: refused at once (not a 10 s wait for a port that never frees).
    port = free_port()
    t0 = time.monotonic()
    p = subprocess.run([ballast_bin(), "serve", "--data-dir", d, "--export", "vol=ram:64M",
                        "--nbd-listen", "127.0.0.1:%d" % port,
                        "--nvmf-listen", "0.0.0.0:%d" % port],
                       capture_output=True, text=True, timeout=30)
    took = time.monotonic() - t0
    r.check("--nbd-listen and --nvmf-listen on one port are refused within 2 s, saying why "
            "(%.2f s)" % took,
            p.returncode != 0 and "would share a port" in p.stderr and took < 2, p.stderr[-300:])
    with Ballast(["--export", "vol=ram:64M", "--buffer-memory", "32M", "--cores", "2"]) as b:
        info = subprocess.run(["nbdinfo", "--json", b.uri("vol")], capture_output=True,
                              text=True, timeout=30)
        exp = json.loads(info.stdout)["exports"][0] if info.returncode == 0 else {}
        # 16 MiB per core: 3/4 of it is 12 MiB, the largest power of two within is 8 MiB.
        r.check("nbdinfo sees a maximum block size of 8 MiB with a 32 MiB budget on 2 cores",
                exp.get("block_size_maximum") == 8 * MiB, json.dumps(exp)[:300])
        h = nbd.NBD()
        h.connect_uri(b.uri("vol"))
        r.check("an 8 MiB read works", len(h.pread(8 * MiB, 0)) == 8 * MiB)
        try:
            h.pread(16 * MiB, 0)
            r.bad("a 16 MiB read (beyond the advertised maximum) is refused", "it succeeded")
        except nbd.Error as e:
            r.check("a 16 MiB read (beyond the advertised maximum) is refused with EINVAL",
                    e.errnum == errno.EINVAL, str(e))
        h.shutdown()
    shutil.rmtree(d, ignore_errors=True)


def part4(r):
    """Out of descriptors: the acceptor backs off on a timer, not by sleeping its core, so the
    connections that core serves keep their pace; once descriptors return, clients connect."""
    with Ballast(["--export", "vol=ram:16M", "--cores", "1"]) as b:
        pid = b.proc.pid
        h = nbd.NBD()
        h.connect_uri(b.uri("vol"))
        h.pread(4096, 0)
        opened = len(os.listdir("/proc/%d/fd" % pid))
        soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (opened + 8, hard))
        crowd = []
        for _ in range(40):
            try:
                crowd.append(socket.create_connection(("127.0.0.1", b.port), timeout=2))
            except OSError:
                break
        time.sleep(0.5)
        t0 = time.monotonic()
        for i in range(300):
            h.pread(4096, (i % 64) * 4096)
        took = time.monotonic() - t0
        r.check("out of descriptors with clients waiting to be accepted, 300 reads of a "
                "connection the same core serves take %.2f s (< 1 s: no sleeping acceptor)"
                % took, took < 1.0)
        log = open(b.log).read()
        r.check("the failed accepts are logged", "accept failed" in log, b.log_tail(5))
        for c in crowd:
            c.close()
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
        time.sleep(0.5)
        ok, detail = True, ""
        try:
            h2 = nbd.NBD()
            h2.connect_uri(b.uri("vol"))
            h2.pread(4096, 0)
            h2.shutdown()
        except nbd.Error as e:
            ok, detail = False, str(e)
        r.check("with descriptors back, a new client connects and reads", ok, detail)
        h.shutdown()
        r.check("no panics", not b.panics(), "\n".join(b.panics()[:5]))


def main(r):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    only = os.environ.get("BALLAST_BOUNDED_ONLY")  # e.g. "2": one part
    for n, (what, part) in enumerate((("part 1 (waves)", part1), ("part 2 (deadlines, limit)", part2),
                                      ("part 3 (the budget's own limits)", part3),
                                      ("part 4 (out of descriptors)", part4)), 1):
        if only and str(n) != only:
            continue
        print("==== %s" % what, flush=True)
        part(r)


if __name__ == "__main__":
    guarded(main)
