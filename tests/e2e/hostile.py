#!/usr/bin/python3
"""Hostile / malformed NBD clients against ballast (raw sockets), plus a well-behaved libnbd
client that must keep working throughout.  Run with /usr/bin/python3.

Every outcome the spec allows for a bad client (error reply, or hard disconnect) passes; a
daemon crash, a hang, a success reply where an error is required, or collateral damage to
other clients fails.
"""
import errno
import os
import resource
import select
import socket
import struct
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import nbd  # noqa: E402

from ballast_testlib import Ballast, guarded  # noqa: E402

MiB = 1 << 20
NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REP_MAGIC = 0x3E889045565A9
REQ_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
STRUCT_MAGIC = 0x668E33EF

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_INFO, OPT_GO, OPT_STRUCTURED_REPLY = 1, 2, 3, 6, 7, 8
REP_ACK, REP_SERVER, REP_INFO = 1, 2, 3
REP_ERR_BIT = 1 << 31
REP_ERR_UNKNOWN, REP_ERR_TOO_BIG = 0x80000006, 0x80000009
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_CACHE, CMD_WRITE_ZEROES, CMD_BLOCK_STATUS = range(8)
FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES = 1, 2
TX_FLAGS_WANT = {"HAS_FLAGS": 1, "SEND_FLUSH": 4, "SEND_FUA": 8, "SEND_TRIM": 32,
                 "SEND_WRITE_ZEROES": 64, "SEND_DF": 128, "CAN_MULTI_CONN": 256,
                 "SEND_CACHE": 1024, "SEND_FAST_ZERO": 2048}

VOL_SIZE = 256 * MiB          # "vol": big enough that 128 MiB reads are in range
CANARY_OFF = 40 * MiB
CANARY_LEN = 8 * MiB


class Closed(Exception):
    pass


class Raw:
    """A hand-rolled NBD client on a plain socket."""

    def __init__(self, port, timeout=10.0):
        self.s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.timeout = timeout
        self.buf = bytearray()
        self.handle = 0

    def close(self):
        try:
            self.s.close()
        except OSError:
            pass

    # ---- byte I/O
    def recvn(self, n):
        while len(self.buf) < n:
            try:
                d = self.s.recv(max(65536, n - len(self.buf)))
            except ConnectionResetError:
                d = b""
            except socket.timeout:
                raise TimeoutError("no data from server within %ss" % self.timeout)
            if not d:
                raise Closed()
            self.buf += d
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def send(self, data):
        try:
            self.s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            raise Closed()

    def wait_closed(self, timeout=5.0):
        """True if the server closes the connection within `timeout` (data before EOF is
        discarded); False if it is still open."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r, _, _ = select.select([self.s], [], [], max(0.0, deadline - time.monotonic()))
            if not r:
                break
            try:
                d = self.s.recv(1 << 20)
            except ConnectionResetError:
                return True
            if not d:
                return True
            self.buf += d
        return False

    def pump(self, payload, timeout, min_rx=0):
        """Send `payload` while reading whatever the server sends (so neither side deadlocks).
        Stops when everything is sent and >= min_rx bytes are buffered, on close, or on timeout.
        Returns (bytes_sent, closed)."""
        self.s.setblocking(False)
        sent, closed = 0, False
        mv = memoryview(payload)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if sent >= len(payload) and len(self.buf) >= min_rx:
                    break
                wl = [self.s] if sent < len(payload) else []
                r, w, _ = select.select([self.s], wl, [], 0.2)
                if r:
                    try:
                        d = self.s.recv(1 << 20)
                    except BlockingIOError:
                        d = None
                    except ConnectionResetError:
                        d = b""
                    if d == b"":
                        closed = True
                        break
                    if d:
                        self.buf += d
                if w:
                    try:
                        sent += self.s.send(mv[sent:sent + (1 << 20)])
                    except BlockingIOError:
                        pass
                    except (BrokenPipeError, ConnectionResetError):
                        closed = True
                        break
        finally:
            self.s.setblocking(True)
            self.s.settimeout(self.timeout)
        return sent, closed

    # ---- handshake
    def greeting(self):
        magic, opt_magic, flags = struct.unpack(">QQH", self.recvn(18))
        if magic != NBDMAGIC or opt_magic != IHAVEOPT:
            raise AssertionError("bad greeting %x %x" % (magic, opt_magic))
        return flags

    def client_flags(self, flags=FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES):
        self.send(struct.pack(">I", flags))

    def start(self):
        f = self.greeting()
        self.client_flags()
        return f

    def opt(self, opt, data=b""):
        self.send(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)

    def opt_reply(self):
        magic, opt, typ, length = struct.unpack(">QIII", self.recvn(20))
        if magic != REP_MAGIC:
            raise AssertionError("bad option reply magic %x" % magic)
        return opt, typ, self.recvn(length)

    def go(self, name, structured=False):
        if structured:
            self.opt(OPT_STRUCTURED_REPLY)
            _, typ, _ = self.opt_reply()
            if typ != REP_ACK:
                raise AssertionError("STRUCTURED_REPLY refused: %x" % typ)
        nm = name.encode()
        self.opt(OPT_GO, struct.pack(">I", len(nm)) + nm + struct.pack(">H", 0))
        size = tflags = None
        while True:
            _, typ, data = self.opt_reply()
            if typ == REP_ACK:
                return size, tflags
            if typ == REP_INFO and len(data) >= 12 and struct.unpack(">H", data[:2])[0] == 0:
                size, tflags = struct.unpack(">QH", data[2:12])
            elif typ & REP_ERR_BIT:
                raise AssertionError("GO refused: %x %r" % (typ, data))

    # ---- transmission
    def req(self, typ, offset, length, flags=0, payload=b""):
        self.handle += 1
        self.send(struct.pack(">IHHQQI", REQ_MAGIC, flags, typ, self.handle,
                              offset & 0xFFFFFFFFFFFFFFFF, length) + payload)
        return self.handle

    def req_header(self, typ, offset, length, flags=0):
        self.handle += 1
        return struct.pack(">IHHQQI", REQ_MAGIC, flags, typ, self.handle, offset, length)

    def simple_reply(self):
        magic, err, handle = struct.unpack(">IIQ", self.recvn(16))
        if magic != SIMPLE_MAGIC:
            raise AssertionError("bad simple reply magic %x" % magic)
        return err, handle

    def struct_reply(self):
        """One structured reply chunk: (flags, type, handle, payload)."""
        magic, flags, typ, handle, length = struct.unpack(">IHHQI", self.recvn(20))
        if magic != STRUCT_MAGIC:
            raise AssertionError("bad structured reply magic %x" % magic)
        return flags, typ, handle, self.recvn(length)

    def read(self, offset, length):
        """Simple-reply READ; returns (err, data)."""
        self.req(CMD_READ, offset, length)
        err, _ = self.simple_reply()
        return err, (self.recvn(length) if err == 0 else b"")


def errname(e):
    return errno.errorcode.get(e, str(e))


# A libnbd client in a subprocess (so a stalled server cannot hang this script): N connections,
# each writes 4 MiB of random data into its own region, flushes, and another connection reads
# it back.
OTHER_CLIENT = r'''
import nbd, os, sys
uri, base, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
hs = []
for i in range(n):
    h = nbd.NBD(); h.connect_uri(uri); hs.append(h)
for i, h in enumerate(hs):
    data = os.urandom(4 << 20)
    off = base + i * (4 << 20)
    h.pwrite(data, off)
    h.flush()
    if hs[(i + 1) % n].pread(len(data), off) != data:
        sys.exit("read back differs at %d" % off)
for h in hs:
    h.shutdown()
'''


def other_client(r, b, what, base=100 * MiB, conns=4, timeout=60):
    t0 = time.monotonic()
    try:
        p = subprocess.run([sys.executable, "-c", OTHER_CLIENT, b.uri("vol"), str(base), str(conns)],
                           capture_output=True, text=True, timeout=timeout)
        ok, detail = p.returncode == 0, p.stderr.strip()[-300:]
    except subprocess.TimeoutExpired:
        ok, detail = False, "timed out after %ss (server stalled?)" % timeout
    r.check("%s: libnbd client I/O (%d conns, verified) works [%.1fs]"
            % (what, conns, time.monotonic() - t0), ok, detail)


def nbdinfo_ok(b, name="vol"):
    try:
        p = subprocess.run(["nbdinfo", "--size", b.uri(name)], capture_output=True, text=True,
                           timeout=20)
        return p.returncode == 0, (p.stdout + p.stderr).strip()
    except subprocess.TimeoutExpired:
        return False, "nbdinfo timed out"


def rss_mib(pid):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return -1


def accept_error_or_close(r, what, conn, timeout=10.0, usable_check=None):
    """After a bad request: a non-zero simple-reply error or a close both pass; error 0 fails.
    If the server answered and stays open, the connection must still work."""
    try:
        err, _ = conn.simple_reply()
    except Closed:
        r.ok("%s -> server closed the connection" % what)
        return
    except TimeoutError as e:
        r.bad(what, "no reply and no close: %s" % e)
        return
    if err == 0:
        r.bad(what, "server replied success")
        return
    r.ok("%s -> error %s" % (what, errname(err)))
    if usable_check:
        usable_check(conn, what)


def main(r):
    # 1000 idle connections need more descriptors than the usual 1024, in this process and
    # (inherited) in the daemon.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4096 if hard == resource.RLIM_INFINITY else min(hard, 4096)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))

    with Ballast(["--export", "vol=ram:256M", "--export", "f=file:{data}/f.img:64M"]) as b:
        run_all(r, b)


def run_all(r, b):
    port = b.port
    canary = os.urandom(CANARY_LEN)
    h = nbd.NBD()
    h.connect_uri(b.uri("vol"))
    for o in range(0, CANARY_LEN, 4 * MiB):
        h.pwrite(canary[o:o + 4 * MiB], CANARY_OFF + o)
    h.flush()
    h.shutdown()
    canary_file = tempfile.NamedTemporaryFile(prefix="canary.", dir=b.tmp, delete=False)
    canary_file.write(canary)
    canary_file.close()
    # first 4 KiB of the canary, for quick "connection still usable" checks
    probe = canary[:4096]

    def usable(conn, what):
        try:
            err, data = conn.read(CANARY_OFF, 4096)
            r.check("%s: connection still usable afterwards" % what, err == 0 and data == probe,
                    "err=%s" % err)
        except (Closed, TimeoutError, AssertionError) as e:
            r.bad("%s: connection still usable afterwards" % what, repr(e))

    def section(name, fn):
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            import traceback
            traceback.print_exc()
            r.bad("%s: unexpected exception" % name, "%s: %s" % (type(e).__name__, e))
        if not b.alive():
            r.bad("daemon alive after: %s" % name, "exit status %s\n%s" % (b.proc.poll(), b.log_tail(20)))
            raise SystemExit(finish_dead(r))

    # ------------------------------------------------------------------ handshake
    def handshake():
        c = Raw(port)
        flags = c.greeting()
        r.check("greeting advertises FIXED_NEWSTYLE|NO_ZEROES", flags & 3 == 3, "flags=%#x" % flags)
        c.client_flags()
        size, tflags = c.go("vol", structured=True)
        r.check_eq("raw GO: export size", VOL_SIZE, size)
        missing = [k for k, v in TX_FLAGS_WANT.items() if not tflags & v]
        r.check("raw GO (structured): transmission flags include the contract's set", not missing,
                "flags=%#x missing %s" % (tflags, missing))
        r.check("raw GO: not READ_ONLY", not tflags & 2, "flags=%#x" % tflags)
        c.close()
        c = Raw(port)
        c.start()
        size, tflags = c.go("vol")
        r.check("raw GO without structured replies: SEND_DF clear (spec MUST)", not tflags & 128,
                "flags=%#x" % tflags)
        c.close()

        c = Raw(port)
        c.greeting()
        c.client_flags(0xFFFFFFFF)
        r.check("garbage client flags 0xffffffff -> server closes", c.wait_closed(5),
                "still open after 5 s")
        c.close()

        c = Raw(port)
        c.start()
        c.send(b"XXXXXXXX" + struct.pack(">II", OPT_LIST, 0))
        r.check("bad option magic -> server closes", c.wait_closed(5), "still open after 5 s")
        c.close()

        # unknown option -> NBD_REP_ERR_UNSUP, still usable
        c = Raw(port)
        c.start()
        c.opt(0x7777, b"abc")
        _, typ, _ = c.opt_reply()
        r.check("unknown option -> error reply", typ & REP_ERR_BIT, "type=%#x" % typ)
        c.opt(OPT_LIST)
        names = []
        while True:
            _, typ, data = c.opt_reply()
            if typ != REP_SERVER:
                break
            n = struct.unpack(">I", data[:4])[0]
            names.append(data[4:4 + n].decode())
        r.check("NBD_OPT_LIST after the unknown option works", typ == REP_ACK and "vol" in names,
                "type=%#x names=%s" % (typ, names))
        c.close()

        # GO whose name length points past the option data
        c = Raw(port)
        c.start()
        c.opt(OPT_GO, struct.pack(">I", 1000) + b"vol" + struct.pack(">H", 0))
        try:
            _, typ, _ = c.opt_reply()
            r.check("GO with name length beyond the option -> error reply", typ & REP_ERR_BIT,
                    "type=%#x" % typ)
        except (Closed, TimeoutError):
            r.ok("GO with name length beyond the option -> server closed")
        c.close()

        # GO with a 5000-byte name (the spec caps strings at 4096)
        c = Raw(port)
        c.start()
        nm = b"n" * 5000
        c.opt(OPT_GO, struct.pack(">I", len(nm)) + nm + struct.pack(">H", 0))
        try:
            _, typ, _ = c.opt_reply()
            r.check("GO with a 5000-byte export name -> error reply", typ & REP_ERR_BIT, "type=%#x" % typ)
            size, _ = c.go("vol")
            r.check_eq("GO with a 5000-byte name: connection usable afterwards", VOL_SIZE, size)
        except (Closed, TimeoutError):
            r.ok("GO with a 5000-byte export name -> server closed")
        c.close()

        # 2000 options in a row on one connection (haggling that never ends)
        c = Raw(port)
        c.start()
        t0 = time.monotonic()
        c.send(b"".join(struct.pack(">QII", IHAVEOPT, 0x7777, 0) for _ in range(2000)))
        replies = 0
        try:
            for _ in range(2000):
                c.opt_reply()
                replies += 1
            size, _ = c.go("vol")
            r.check("2000 pipelined unknown options answered, then GO works [%.1fs]"
                    % (time.monotonic() - t0), size == VOL_SIZE)
        except (Closed, TimeoutError):
            r.ok("2000 pipelined unknown options -> server closed after %d replies" % replies)
        c.close()

        # EXPORT_NAME with an unknown name: the server must hard-disconnect
        c = Raw(port)
        c.start()
        c.opt(OPT_EXPORT_NAME, b"no-such-export")
        r.check("EXPORT_NAME of an unknown export -> server closes", c.wait_closed(5))
        c.close()

        # EXPORT_NAME of a good name works (old-style entry into transmission)
        c = Raw(port)
        c.start()
        c.opt(OPT_EXPORT_NAME, b"vol")
        size, tflags = struct.unpack(">QH", c.recvn(10))   # NO_ZEROES negotiated: no padding
        r.check_eq("EXPORT_NAME vol: size", VOL_SIZE, size)
        usable(c, "EXPORT_NAME vol")
        c.close()

    def big_options():
        for label, opt in (("NBD_OPT_GO", OPT_GO), ("unknown option 0x4242", 0x4242),
                           ("NBD_OPT_LIST", OPT_LIST)):
            c = Raw(port)
            c.start()
            payload = struct.pack(">QII", IHAVEOPT, opt, MiB) + os.urandom(MiB)
            sent, closed = c.pump(payload, timeout=15, min_rx=20)
            what = "%s with 1 MiB of option data" % label
            if closed:
                r.ok("%s -> server closed (after %d bytes)" % (what, sent))
            elif len(c.buf) >= 20:
                _, typ, _ = c.opt_reply()
                if typ & REP_ERR_BIT:
                    r.ok("%s -> error reply %#x%s" % (what, typ,
                                                     " (TOO_BIG)" if typ == REP_ERR_TOO_BIG else ""))
                    try:
                        size, _ = c.go("vol")
                        r.check_eq("%s: connection usable afterwards (GO)" % what, VOL_SIZE, size)
                    except Closed:
                        r.ok("%s: server closed after the error reply" % what)
                else:
                    r.bad(what, "non-error reply %#x" % typ)
            else:
                r.bad(what, "neither reply nor close within 15 s (sent %d)" % sent)
            c.close()

        # header claiming ~4 GiB of option data, then silence
        c = Raw(port)
        c.start()
        c.send(struct.pack(">QII", IHAVEOPT, OPT_GO, 0xFFFFFFF0))
        closed = c.wait_closed(3)
        r.ok("option header claiming 4 GiB -> %s" % ("closed" if closed else
             "error reply" if c.buf else "server waits (no allocation crash)"))
        c.close()
        r.check("daemon RSS reasonable after huge option headers (%d MiB)" % rss_mib(b.proc.pid),
                0 < rss_mib(b.proc.pid) < 1024)

    def transmission():
        # exactly the advertised maximum (32 MiB) is accepted; beyond it is refused (the
        # buffer budget grants one request at most what is advertised)
        c = Raw(port, timeout=30)
        c.start()
        c.go("vol")
        err, data = c.read(0, 32 * MiB)
        r.check("READ of 32 MiB (the advertised maximum) succeeds", err == 0 and len(data) == 32 * MiB,
                "err=%s" % errname(err))
        c.req(CMD_READ, 0, 32 * MiB + 4096)
        err, _ = c.simple_reply()
        r.check("READ of 32 MiB + 4 KiB gets EINVAL", err == errno.EINVAL, "err=%s" % errname(err))

        # over the limit: READ 128 MiB (in range of the 256 MiB export)
        c.req(CMD_READ, 0, 128 * MiB)
        accept_error_or_close(r, "READ of 128 MiB (simple replies)", c, usable_check=usable)
        c.close()

        c = Raw(port, timeout=30)
        c.start()
        c.go("vol")
        c.req(CMD_READ, 0, 64 * MiB + 1)
        accept_error_or_close(r, "READ of 64 MiB + 1", c, usable_check=usable)
        c.close()

        # over the limit with structured replies: an error chunk, or close
        c = Raw(port, timeout=30)
        c.start()
        c.go("vol", structured=True)
        hnd = c.req(CMD_READ, 0, 128 * MiB)
        what = "READ of 128 MiB (structured replies)"
        try:
            flags, typ, handle, payload = c.struct_reply()
            if typ & 0x8000:
                e = struct.unpack(">I", payload[:4])[0]
                r.check("%s -> error chunk %s" % (what, errname(e)),
                        e in (errno.EINVAL, errno.EOVERFLOW, errno.ENOMEM) and handle == hnd,
                        "error=%s handle=%s" % (e, handle))
                while not flags & 1:   # drain to the DONE chunk
                    flags, typ, handle, payload = c.struct_reply()
                hnd2 = c.req(CMD_READ, CANARY_OFF, 4096)
                got = b""
                while True:
                    flags, typ, handle, payload = c.struct_reply()
                    if typ == 1:
                        got += payload[8:]
                    if flags & 1:
                        break
                r.check("%s: connection still usable afterwards" % what,
                        handle == hnd2 and got == probe)
            else:
                r.bad(what, "non-error chunk type %d" % typ)
        except Closed:
            r.ok("%s -> server closed" % what)
        c.close()

        # WRITE header claiming 128 MiB: send the payload while watching for a reply/close
        c = Raw(port, timeout=30)
        c.start()
        c.go("vol")
        payload = c.req_header(CMD_WRITE, 0, 128 * MiB) + bytes(128 * MiB)
        sent, closed = c.pump(payload, timeout=60, min_rx=16)
        what = "WRITE of 128 MiB"
        if closed:
            r.ok("%s -> server closed (after %d MiB)" % (what, sent // MiB))
        elif len(c.buf) >= 16:
            err, _ = c.simple_reply()
            if err == 0:
                r.bad(what, "server replied success")
            else:
                r.ok("%s -> error %s (after %d MiB sent)" % (what, errname(err), sent // MiB))
                if sent == len(payload):
                    usable(c, what)
        else:
            r.bad(what, "neither reply nor close within 60 s (sent %d MiB)" % (sent // MiB))
        c.close()

        # offset+length overflowing u64, and ranges past the end
        c = Raw(port, timeout=30)
        c.start()
        c.go("vol")
        top = (1 << 64) - 4096
        for label, typ, off, length, want, payload in (
                ("READ at 2^64-4096 len 8192", CMD_READ, top, 8192, errno.EINVAL, b""),
                ("WRITE at 2^64-4096 len 8192", CMD_WRITE, top, 8192, errno.ENOSPC, bytes(8192)),
                ("WRITE_ZEROES at 2^64-4096 len 8192", CMD_WRITE_ZEROES, top, 8192, errno.ENOSPC, b""),
                ("TRIM at 2^64-4096 len 8192", CMD_TRIM, top, 8192, errno.EINVAL, b""),
                ("CACHE at 2^64-4096 len 8192", CMD_CACHE, top, 8192, errno.EINVAL, b""),
                ("READ at size len 4096", CMD_READ, VOL_SIZE, 4096, errno.EINVAL, b""),
                ("WRITE at size-1 len 2", CMD_WRITE, VOL_SIZE - 1, 2, errno.ENOSPC, b"ab"),
                ("TRIM at size-4096 len 2^32-1", CMD_TRIM, VOL_SIZE - 4096, 0xFFFFFFFF, errno.EINVAL, b""),
                ("WRITE_ZEROES at 0 len 2^32-1 past the end", CMD_WRITE_ZEROES, 0, 0xFFFFFFFF,
                 errno.ENOSPC, b"")):
            try:
                c.req(typ, off, length, payload=payload)
                err, _ = c.simple_reply()
            except Closed:
                r.bad(label, "server closed the connection (contract: error, connection stays usable)")
                c.close()
                c = Raw(port, timeout=30)
                c.start()
                c.go("vol")
                continue
            r.check_eq("%s -> %s" % (label, errname(want)), errname(want), errname(err))
        usable(c, "after the out-of-range requests")
        c.close()

        # unknown command / unknown flag / zero length / bad request magic / BLOCK_STATUS w/o ctx
        c = Raw(port, timeout=30)
        c.start()
        c.go("vol")
        c.req(99, 0, 4096)
        accept_error_or_close(r, "unknown command type 99", c, usable_check=usable)
        c.close()

        c = Raw(port, timeout=30)
        c.start()
        c.go("vol")
        c.req(CMD_BLOCK_STATUS, 0, 4096)
        accept_error_or_close(r, "BLOCK_STATUS without negotiated meta context", c, usable_check=usable)
        c.close()

        # FUA is valid on every command (proto.md: the server MUST accept it, even by ignoring
        # it): CACHE and FLUSH with it succeed, DISC with it still disconnects.
        c = Raw(port, timeout=30)
        c.start()
        c.go("vol")
        for kind, name in ((CMD_CACHE, "CACHE"), (CMD_FLUSH, "FLUSH")):
            c.req(kind, 0, 4096 if kind == CMD_CACHE else 0, flags=1)
            err, _ = c.simple_reply()
            r.check_eq("%s with FUA succeeds" % name, "ok", errname(err) if err else "ok")
        c.req(CMD_DISC, 0, 0, flags=1)
        r.check("DISC with FUA disconnects", c.wait_closed(5), "still open after 5 s")
        c.close()

        c = Raw(port, timeout=30)
        c.start()
        c.go("vol")
        c.req(CMD_READ, CANARY_OFF, 0)
        try:
            err, _ = c.simple_reply()
            r.ok("zero-length READ -> %s" % ("ok" if err == 0 else errname(err)))
            usable(c, "zero-length READ")
        except Closed:
            r.ok("zero-length READ -> server closed")
        c.close()

        c = Raw(port, timeout=30)
        c.start()
        c.go("vol")
        c.send(struct.pack(">IHHQQI", 0xDEADBEEF, 0, CMD_READ, 1, 0, 4096))
        r.check("bad request magic -> server closes", c.wait_closed(5), "still open after 5 s")
        c.close()

        # DISC, then more requests: server must close, without processing them
        c = Raw(port, timeout=30)
        c.start()
        c.go("vol")
        c.req(CMD_DISC, 0, 0)
        try:
            c.req(CMD_READ, CANARY_OFF, 4096)
        except Closed:
            pass
        r.check("NBD_CMD_DISC -> server closes", c.wait_closed(5), "still open after 5 s")
        c.close()

    def half_write():
        # WRITE header + half of its payload, then disconnect
        c = Raw(port)
        c.start()
        c.go("vol")
        c.send(c.req_header(CMD_WRITE, 8 * MiB, 2 * MiB) + os.urandom(MiB))
        c.close()
        time.sleep(0.2)
        ok, detail = nbdinfo_ok(b)
        r.check("WRITE header + half payload, then disconnect: daemon still serves", ok, detail)

        # ... and a writer that stalls half-way but keeps the connection open, while another
        # client does I/O; plus a reader that never reads its replies (300 x 1 MiB queued)
        stalled = Raw(port)
        stalled.start()
        stalled.go("vol")
        stalled.send(stalled.req_header(CMD_WRITE, 12 * MiB, 2 * MiB) + os.urandom(MiB))
        rss0 = rss_mib(b.proc.pid)
        slow = Raw(port)
        slow.start()
        slow.go("vol")
        reqs = b"".join(slow.req_header(CMD_READ, (i % 200) * MiB, MiB) for i in range(1000))
        sent, closed = slow.pump(reqs, timeout=10)   # 28 KB of requests; replies left unread
        r.check("slow reader queued 1000 x 1 MiB READs", sent == len(reqs) and not closed,
                "sent %d of %d, closed=%s" % (sent, len(reqs), closed))
        time.sleep(1.0)
        other_client(r, b, "while a writer is stalled mid-payload and a reader is not reading")
        # A server that applies back-pressure (stops reading requests once a bounded amount of
        # reply data is queued) stays small; one that buffers every reply grows by ~1 GiB.
        rss = rss_mib(b.proc.pid)
        r.check("daemon memory bounded while a client queues 1000 x 1 MiB READs and never reads "
                "(RSS %d -> %d MiB; growth < 512 MiB)" % (rss0, rss), 0 < rss and rss - rss0 < 512)
        stalled.close()
        slow.close()
        time.sleep(0.2)
        ok, detail = nbdinfo_ok(b)
        r.check("daemon serves after the stalled writer / slow reader left", ok, detail)

    held = []

    def idle_connections():
        n_idle, n_tx = 900, 100
        t0 = time.monotonic()
        socks = []
        try:
            for i in range(n_idle + n_tx):
                if time.monotonic() - t0 > 60:
                    break
                socks.append(Raw(port, timeout=20))
        except OSError as e:
            r.bad("open 1000 connections", "after %d: %s" % (len(socks), e))
        r.check_eq("opened 1000 TCP connections [%.1fs]" % (time.monotonic() - t0), 1000, len(socks))
        # every one gets the greeting (i.e. was accepted and is being served)
        pending = {x.s: x for x in socks}
        deadline = time.monotonic() + 30
        while pending and time.monotonic() < deadline:
            rl, _, _ = select.select(list(pending), [], [], 1.0)
            for s in rl:
                x = pending[s]
                try:
                    d = s.recv(18 - len(x.buf))
                except OSError:
                    d = b""
                if not d:
                    del pending[s]
                    x.dead = True
                    continue
                x.buf += d
                if len(x.buf) >= 18:
                    del pending[s]
        dead = sum(1 for x in socks if getattr(x, "dead", False))
        r.check("all 1000 connections got the server greeting",
                not pending and not dead, "%d without greeting, %d closed" % (len(pending), dead))
        # 100 of them go on into transmission and sit idle there
        tx_ok = 0
        for x in socks[n_idle:]:
            try:
                x.greeting()
                x.client_flags()
                x.go("vol")
                tx_ok += 1
            except (Closed, TimeoutError, AssertionError, OSError):
                pass
        r.check_eq("100 of them entered transmission", n_tx, tx_ok)
        other_client(r, b, "while 1000 idle connections are held")
        ok, detail = nbdinfo_ok(b)
        r.check("fresh nbdinfo works while 1000 idle connections are held", ok, detail)
        # keep a few (handshake-idle and transmission-idle) open across SIGTERM; close the rest
        held.extend(socks[:3] + socks[-3:])
        for x in socks[3:-3]:
            x.close()

    def unread_option_replies():
        """Clients that send options and never read the replies: the server stops taking
        options while a connection's replies wait unsent, so they hold little memory (each
        NBD_OPT_LIST is answered with 3x its bytes; an NBD_OPT_INFO asking for the
        description 32,000 times once gave 32,000 replies)."""
        info = struct.pack(">I", 3) + b"vol" + struct.pack(">H", 32000) + struct.pack(">H", 2) * 32000
        kinds = (("NBD_OPT_LIST", struct.pack(">QII", IHAVEOPT, OPT_LIST, 0) * (1 << 19)),
                 ("NBD_OPT_INFO x32000 descriptions",
                  struct.pack(">QII", IHAVEOPT, OPT_INFO, len(info)) + info))
        rss0 = rss_mib(b.proc.pid)
        conns, sent_total = [], 0
        for i in range(16):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(("127.0.0.1", port))
            s.sendall(struct.pack(">I", FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
            label, payload = kinds[i % 2]
            if label.startswith("NBD_OPT_INFO"):
                payload = payload * 128  # 8 MiB of options
            s.setblocking(False)
            mv, sent, deadline = memoryview(payload), 0, time.monotonic() + 2
            while sent < len(payload) and time.monotonic() < deadline:
                try:
                    sent += s.send(mv[sent:sent + (1 << 20)])
                except BlockingIOError:
                    time.sleep(0.01)
                except OSError:
                    break
            sent_total += sent
            conns.append(s)
        time.sleep(1)
        grown = rss_mib(b.proc.pid) - rss0
        r.check("16 clients sending options without reading replies (%d MiB sent): daemon grew "
                "%d MiB (< 64)" % (sent_total >> 20, grown), grown < 64)
        other_client(r, b, "while 16 clients leave option replies unread")
        for s in conns:
            s.close()

    section("handshake", handshake)
    section("unread option replies", unread_option_replies)
    section("big options", big_options)
    section("transmission", transmission)
    section("half write", half_write)
    section("idle connections", idle_connections)

    # ------------------------------------------------------------------ aftermath
    time.sleep(0.3)
    r.check("daemon still alive after all hostile clients", b.alive(), b.log_tail(20))
    ok, detail = nbdinfo_ok(b)
    r.check("fresh nbdinfo after all hostile clients", ok, detail)
    back = os.path.join(b.tmp, "canary.back")
    try:
        p = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "..", "nbdio.py"),
                            "get", b.uri("vol"), str(CANARY_OFF), str(CANARY_LEN), back],
                           capture_output=True, text=True, timeout=60)
        with open(back, "rb") as f:
            r.check("data written at the start is intact", p.returncode == 0 and f.read() == canary,
                    p.stderr[-200:])
    except (subprocess.TimeoutExpired, OSError) as e:
        r.bad("data written at the start is intact", e)
    other_client(r, b, "at the end", base=160 * MiB)
    t0 = time.monotonic()
    status = b.stop(timeout=30)
    r.check_eq("SIGTERM with idle connections open: exit 0 [%.1fs]" % (time.monotonic() - t0), 0, status)
    r.check("server log has no panic", not b.panics(), b.panics()[:3])
    for x in held:
        x.close()
    if r.failed:
        print("---- server log tail ----\n" + b.log_tail(30))


def finish_dead(r):
    r.bad("daemon died; remaining checks skipped")
    r.finish()


if __name__ == "__main__":
    guarded(main)
