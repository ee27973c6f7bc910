#!/usr/bin/python3
"""Volume placement: a volume's I/O runs on the core owning its family, wherever it arrives.

Two cores, two volumes "a" and "b". libnbd opens four connections in the order a, a, b, b;
the listener places connections on the cores round-robin (0, 1, 0, 1), so each volume has a
connection on either core. Under `--volume-placement owner`:
- plaintext connections move, after their handshake, to the core owning their volume's family
  (a new family goes to the core owning the fewest): a stays on core 0, the second a-connection
  moves there, b goes to core 1 and its first connection moves there — two moves, two
  connections per core, and nothing forwarded;
- TLS-PSK connections (userspace TLS stays on the core that accepted it) cannot move: the
  crossing connections' commands are forwarded to the owner and answered back, in batches.
  (Where the kernel takes the TLS records — kTLS — they move like plaintext ones.)
Every connection writes its own pattern into its own part of the volume, many commands in
flight at once (libnbd's asynchronous commands), flushes, and reads back both its own and the
other connection's part.

Raw clients (plain sockets) check the edges of a move: requests sent together with NBD_OPT_GO
are carried to the new core and served there (a 4 KiB write whole, and the first 16 KiB of a
192 KiB one whose rest is still in the socket); a client whose receive buffer grew in the
handshake and that sends a 48 KiB write with NBD_OPT_GO (more than a move carries) stays and
is served where it is, forwarding.

Checked: every read returns what was written, through every connection; `ballast stats`
shows the moves, the cores' connections and the forwarded requests; kill -9 after the flushes
and a restart keep every block; with `any` (the default) nothing moves or is forwarded and the
data is the same; a bad `--volume-placement` is refused with a clear error.
"""

import json
import os
import socket
import struct
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import nbd  # noqa: E402  (Debian's python3-libnbd)
from ballast_testlib import Ballast, ballast_bin, guarded  # noqa: E402

BLOCK = 4096
# Blocks per connection (each connection owns a quarter of its volume's first 8 MiB).
PER_CONN = 512
ORDER = ("a", "a", "b", "b")


def stats(b):
    p = b.ctl("stats", "--json")
    if p.returncode != 0:
        raise RuntimeError("ballast stats failed: " + p.stderr)
    return json.loads(p.stdout)["reactors"]


def pattern(conn, i):
    return bytes([(conn * 37 + i) % 251 + 1]) * BLOCK


def offset(conn, i):
    # Connections 0 and 1 share volume a, 2 and 3 volume b: halves of the first 4 MiB.
    return ((conn % 2) * PER_CONN + i) * BLOCK


def drive(handles):
    """Each connection in turn writes its part (asynchronous, up to 64 in flight), then all flush."""
    for conn, h in enumerate(handles):
        for i in range(PER_CONN):
            h.aio_pwrite(pattern(conn, i), offset(conn, i))
            while h.aio_in_flight() >= 64:
                h.poll(-1)
    for h in handles:
        while h.aio_in_flight() > 0:
            h.poll(-1)
        h.flush()


def verify(r, label, handles):
    """Each connection reads its volume's two halves: its own writes and its peer's."""
    for conn, h in enumerate(handles):
        bad = 0
        for writer in (conn - conn % 2, conn - conn % 2 + 1):
            for i in range(0, PER_CONN, 7):
                if h.pread(BLOCK, offset(writer, i)) != pattern(writer, i):
                    bad += 1
        r.check("%s: connection %d (volume %s) reads every write to its volume"
                % (label, conn, ORDER[conn]), bad == 0, "%d blocks differ" % bad)


def connect(b, psk=None):
    handles = []
    for name in ORDER:
        h = nbd.NBD()
        if psk:
            h.set_tls(nbd.TLS_REQUIRE)
            h.set_tls_psk_file(psk)
            h.set_tls_username("alice")
            h.connect_uri("nbds://alice@127.0.0.1:%d/%s" % (b.port, name))
        else:
            h.connect_uri(b.uri(name))
        handles.append(h)
    return handles


def close(handles):
    for h in handles:
        try:
            h.shutdown()
        except nbd.Error:
            pass


def deltas(before, after, key):
    return [a[key] - z[key] for z, a in zip(before, after)]


def write_psk(dir):
    path = os.path.join(dir, "keys.psk")
    with open(path, "w") as f:
        f.write("alice:%s\n" % os.urandom(32).hex())
    os.chmod(path, 0o600)
    return path


def recv_exact(sock, n):
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise RuntimeError("connection closed after %d of %d bytes" % (len(out), n))
        out += chunk
    return out


def pipelined(port, name, data, off, big_option=False):
    """A raw client that sends NBD_OPT_GO, a write and a flush in one go, before reading any
    reply (the requests are already received when the handshake ends), then reads the range
    back; returns what the read returned, or an error string. With `big_option`, a 60 KB
    option the server does not know goes first (its receive buffer grows to hold it whole)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=20)

    def request(kind, handle, length):
        return struct.pack(">IHHQQI", 0x25609513, 0, kind, handle, off, length)

    def replies(handles):
        # Replies may come in any order (NBD): collect them by handle.
        got = set()
        while got != handles:
            magic, err, handle = struct.unpack(">IIQ", recv_exact(s, 16))
            if magic != 0x67446698 or err != 0 or handle not in handles - got:
                raise RuntimeError("reply %#x error %d handle %d" % (magic, err, handle))
            got.add(handle)

    try:
        hello = recv_exact(s, 18)
        if hello[:16] != b"NBDMAGICIHAVEOPT":
            return "bad greeting"
        out = struct.pack(">I", 3)  # FIXED_NEWSTYLE | NO_ZEROES
        if big_option:
            # Alone first, answered before the rest is sent: the buffer is big and empty then.
            s.sendall(out + b"IHAVEOPT" + struct.pack(">II", 0x4242, 60000) + bytes(60000))
            magic, option, kind, length = struct.unpack(">QIII", recv_exact(s, 20))
            recv_exact(s, length)
            if (magic, option, kind) != (0x3e889045565a9, 0x4242, 0x80000001):  # ERR_UNSUP
                return "unknown option answered %#x" % kind
            out = b""
        opt = struct.pack(">I", len(name)) + name.encode() + struct.pack(">H", 0)
        out += b"IHAVEOPT" + struct.pack(">II", 7, len(opt)) + opt  # NBD_OPT_GO
        out += request(1, 1, len(data)) + data + request(3, 2, 0)  # write, flush
        # Corked: one segment (under loopback's MSS), so the server receives it in one piece.
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
        s.sendall(out)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)
        while True:  # option replies until the final one
            magic, _opt, kind, length = struct.unpack(">QIII", recv_exact(s, 20))
            recv_exact(s, length)
            if magic != 0x3e889045565a9 or kind & 0x80000000:
                return "option refused (reply %#x)" % kind
            if kind == 1:  # NBD_REP_ACK
                break
        replies({1, 2})
        s.sendall(request(0, 3, len(data)))  # read
        replies({3})
        return recv_exact(s, len(data))
    except (RuntimeError, OSError) as e:
        return str(e)
    finally:
        s.close()


def run(r, placement, tls=False):
    label = placement + (" (TLS)" if tls else "")
    b = Ballast(["--pool", "{data}/pool.img", "--cores", "2", "--volume-placement", placement])
    psk = write_psk(b.tmp) if tls else None
    if tls:
        b.args += ["--nbd-tls", "require", "--nbd-tls-psk", psk]
    pool = os.path.join(b.data_dir, "pool.img")
    subprocess.run([ballast_bin(), "pool", "create", pool, "--size", "256M"], check=True,
                   capture_output=True)
    with b:
        for name in ("a", "b"):
            r.check("%s: volume %s created" % (label, name),
                    b.ctl("volume", "create", name, "16M").returncode == 0)
        before = stats(b)
        handles = connect(b, psk)
        drive(handles)
        verify(r, label, handles)
        after = stats(b)
        fwd = deltas(before, after, "volume_forwarded")
        wakes = deltas(before, after, "volume_mail_wakes")
        moved = deltas(before, after, "connections_moved")
        open_now = [a["connections_open"] for a in after]
        print("%s: moved per core %s, open %s, forwarded %s, wake-ups %s"
              % (label, moved, open_now, fwd, wakes), flush=True)
        info = json.loads(b.ctl("pool", "info", "--json").stdout)
        info = info[0] if isinstance(info, list) else info
        owned = info.get("families_per_core")
        r.check("%s: pool info names the placement and the families each core owns" % label,
                info.get("placement") == placement
                # Placed by moving connections: one each; by TLS connections' first I/O
                # (they stay): both where they arrived; `any` owns nothing.
                and (owned == [1, 1] if placement == "owner" and not tls
                     else sum(owned or [9]) == 2 if placement == "owner" else owned == [0, 0]),
                "placement %s, families per core %s" % (info.get("placement"), owned))
        ktls = "handed to the kernel" in open(b.log).read() if tls else False
        # Writes, flush and verifying reads of a crossing connection (one per volume).
        crossing = PER_CONN + 1 + 2 * len(range(0, PER_CONN, 7))
        if placement == "owner" and not (tls and not ktls):
            r.check("%s: the two crossing connections moved to their volumes' cores" % label,
                    sum(moved) == 2, "moved %s" % moved)
            r.check("%s: families spread, two connections on each core" % label,
                    open_now == [2, 2], "open %s" % open_now)
            r.check("%s: nothing forwarded" % label, sum(fwd) == 0, "forwarded %s" % fwd)
        elif placement == "owner":
            r.check("%s: TLS connections stay where they were accepted" % label,
                    sum(moved) == 0 and open_now == [2, 2], "moved %s open %s" % (moved, open_now))
            r.check("%s: the crossing connections' commands were forwarded" % label,
                    sum(fwd) >= 2 * crossing, "forwarded %s, want >= %d" % (fwd, 2 * crossing))
            r.check("%s: forwarded requests and answers travel in batches (wake-ups < requests)"
                    % label, sum(wakes) < sum(fwd), "wake-ups %s for %s forwarded" % (wakes, fwd))
        else:
            r.check("%s: nothing moved or forwarded" % label,
                    fwd == [0, 0] and wakes == [0, 0] and moved == [0, 0],
                    "moved %s, forwarded %s, wake-ups %s" % (moved, fwd, wakes))
        if placement == "owner" and not tls:
            # Two raw clients whose requests arrive with their NBD_OPT_GO: they land on the
            # core not owning their volume (4 connections so far: 0, 1 next), move, and the
            # input that came before the move is served there — a 4 KiB write whole, and the
            # first part of a 192 KiB one whose rest is still in the socket.
            before = stats(b)
            small = os.urandom(BLOCK)
            big = os.urandom(48 * BLOCK)
            got = [pipelined(b.port, "b", small, 12 << 20), pipelined(b.port, "a", big, 13 << 20)]
            moved = deltas(before, stats(b), "connections_moved")
            r.check("owner: requests sent with the handshake are served after the move",
                    got == [small, big], "got %s" % [g if isinstance(g, str) else len(g)
                                                     for g in got])
            r.check("owner: both pipelining connections moved", moved == [1, 1],
                    "moved %s" % moved)
            # A client whose receive buffer grew in the handshake (a 60 KB option) and that
            # sends a 48 KiB write with its NBD_OPT_GO: more is buffered than a moved
            # connection carries, so it stays (on the core not owning volume b) and forwards.
            before = stats(b)
            got = pipelined(b.port, "b", big[:12 * BLOCK], 14 << 20, big_option=True)
            after = stats(b)
            moved = deltas(before, after, "connections_moved")
            fwd = deltas(before, after, "volume_forwarded")
            r.check("owner: a connection with more input buffered than it can carry stays and "
                    "is served", got == big[:12 * BLOCK] and moved == [0, 0] and sum(fwd) >= 3,
                    "got %s, moved %s, forwarded %s"
                    % (got if isinstance(got, str) else len(got), moved, fwd))
        # kill -9 after the flushes: every block is there after a restart.
        b.proc.kill()
        b.proc.wait()
        close(handles)
        b.start()
        handles = connect(b, psk)
        verify(r, label + " after kill -9", handles)
        close(handles)
        r.check("%s: no panic" % label, not b.panics(), "\n".join(b.panics()))


def main(r):
    run(r, "owner")
    run(r, "owner", tls=True)
    run(r, "any")
    p = subprocess.run([ballast_bin(), "serve", "--volume-placement", "nearest"],
                       capture_output=True, text=True, timeout=30)
    r.check("a bad --volume-placement is refused, naming the choices",
            p.returncode != 0 and "owner" in p.stderr and "any" in p.stderr, p.stderr[-300:])


if __name__ == "__main__":
    guarded(main)
