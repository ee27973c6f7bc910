#!/usr/bin/python3
"""NBD extended headers (NBD_OPT_EXTENDED_HEADERS, proto.md "Extended headers"), on the wire.

Host libnbd (1.14) predates the extension, so this drives the protocol byte by byte (the
trixie VM suite proves it with libnbd 1.22's and qemu 10's own tools). On a 12 GiB sparse file
export, a 12 GiB thin volume and a 12 GiB RAM export (whose long trims and write-zeroes go to it
in 256 MiB pieces, one after another):
- negotiation: NBD_OPT_EXTENDED_HEADERS with data refused, acknowledged, refused a second time;
  NBD_OPT_STRUCTURED_REPLY after it gets NBD_REP_ERR_EXT_HEADER_REQD; base:allocation selected;
- every reply is a 32-byte extended chunk echoing the cookie and the request's offset: writes
  (with and without NBD_CMD_FLAG_PAYLOAD_LEN) answered by NBD_REPLY_TYPE_NONE, reads by
  OFFSET_DATA (or OFFSET_HOLE), errors by NBD_REPLY_TYPE_ERROR with a message;
- 64-bit effect lengths: one block status over all 12 GiB answered with
  NBD_REPLY_TYPE_BLOCK_STATUS_EXT whose hole between two written MiBs is one 9 GiB extent; one
  10 GiB trim and one 6 GiB write-zeroes (each a single request) take effect (the data there
  reads as zeros, block status shows holes, data just outside is kept); cache, zero-length
  reads and trims, DF reads, FUA trims and write-zeroes, FAST_ZERO answered in chunks too;
- bad requests: a read past the maximum payload, a trim past the end, a write past the end
  (its payload skipped), block status with a payload (PAYLOAD_LEN: skipped, refused) — each
  answered with an error chunk and the connection stays in step; a compact (28-byte) request
  on an extended connection, and a write announcing more than the maximum payload, end the
  connection; the next connections are served as before.
"""
import os
import shutil
import socket
import struct
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from ballast_testlib import Ballast, ballast_bin, closed_by_peer, disk_scratch, guarded  # noqa: E402
from nbdraw import recvn  # noqa: E402

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
SIZE = 12 * GiB
IHAVEOPT, REP_MAGIC = 0x49484156454F5054, 0x0003E889045565A9
EXT_REQ, EXT_REPLY, REQ, STRUCTURED_REPLY = 0x21E41C71, 0x6E8A278C, 0x25609513, 0x668E33EF
OPT_GO, OPT_STRUCTURED_REPLY, OPT_SET_META, OPT_EXTENDED = 7, 8, 10, 11
REP_ACK, REP_INFO, REP_META = 1, 3, 4
REP_ERR_INVALID, REP_ERR_EXT_HEADER_REQD = (1 << 31) + 3, (1 << 31) + 10
CMD_READ, CMD_WRITE, CMD_FLUSH, CMD_TRIM, CMD_WRITE_ZEROES, CMD_BLOCK_STATUS = 0, 1, 3, 4, 6, 7
FLAG_FUA, FLAG_NO_HOLE, FLAG_DF, FLAG_FAST_ZERO, FLAG_PAYLOAD_LEN = 1, 2, 4, 16, 1 << 5
CMD_CACHE = 5
T_NONE, T_DATA, T_HOLE, T_BS, T_BS_EXT, T_ERROR = 0, 1, 2, 5, 6, (1 << 15) + 1
DONE = 1
EINVAL, ENOSPC, ENOTSUP = 22, 28, 95
STATE_HOLE, STATE_ZERO = 1, 2


def option(s, opt, data=b""):
    s.sendall(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)


def option_replies(s, opt):
    """Replies to one option until its final one: [(type, data)]."""
    out = []
    while True:
        magic, o, typ, length = struct.unpack(">QIII", recvn(s, 20))
        assert magic == REP_MAGIC and o == opt, (hex(magic), o, opt)
        out.append((typ, recvn(s, length)))
        if typ != REP_INFO and typ != REP_META:
            return out


def connect(port, export, extended=True, meta=True):
    """Handshake; returns (socket, {negotiation step: reply type}, size, transmission flags)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=20)
    recvn(s, 18)
    s.sendall(struct.pack(">I", 3))
    seen = {}
    if extended:
        option(s, OPT_EXTENDED, b"x")
        seen["extended with data"] = option_replies(s, OPT_EXTENDED)[-1][0]
        option(s, OPT_EXTENDED)
        seen["extended"] = option_replies(s, OPT_EXTENDED)[-1][0]
        option(s, OPT_EXTENDED)
        seen["extended again"] = option_replies(s, OPT_EXTENDED)[-1][0]
        option(s, OPT_STRUCTURED_REPLY)
        seen["structured after"] = option_replies(s, OPT_STRUCTURED_REPLY)[-1][0]
    else:
        option(s, OPT_STRUCTURED_REPLY)
        seen["structured"] = option_replies(s, OPT_STRUCTURED_REPLY)[-1][0]
    name = export.encode()
    if meta:
        q = b"base:allocation"
        option(s, OPT_SET_META, struct.pack(">I", len(name)) + name + struct.pack(">II", 1, len(q)) + q)
        seen["set meta"] = [t for t, _ in option_replies(s, OPT_SET_META)]
    option(s, OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
    size = flags = None
    for typ, data in option_replies(s, OPT_GO):
        if typ == REP_INFO and struct.unpack(">H", data[:2])[0] == 0:
            size, flags = struct.unpack(">QH", data[2:12])
        seen["go"] = typ
    return s, seen, size, flags


class Conn:
    def __init__(self, s):
        self.s = s
        self.cookie = 0

    def send(self, kind, offset, length, flags=0, payload=b"", magic=EXT_REQ):
        self.cookie += 1
        if magic == EXT_REQ:
            hdr = struct.pack(">IHHQQQ", EXT_REQ, flags, kind, self.cookie, offset, length)
        else:
            hdr = struct.pack(">IHHQQI", magic, flags, kind, self.cookie, offset, length)
        self.s.sendall(hdr + payload)
        return self.cookie

    def chunk(self):
        """One extended chunk: (flags, type, cookie, offset, payload)."""
        magic, flags, typ, cookie, offset, length = struct.unpack(">IHHQQQ", recvn(self.s, 32))
        assert magic == EXT_REPLY, "reply magic %#x, not the extended one" % magic
        assert length < 64 * MiB, length
        return flags, typ, cookie, offset, recvn(self.s, length)

    def reply(self, cookie, offset):
        """All chunks of one reply (checked: its cookie and echoed offset)."""
        chunks = []
        while True:
            flags, typ, c, off, payload = self.chunk()
            assert c == cookie, (c, cookie)
            assert off == offset, "chunk offset %d, the request's %d" % (off, offset)
            chunks.append((typ, payload))
            if flags & DONE:
                return chunks

    def call(self, kind, offset, length, flags=0, payload=b""):
        return self.reply(self.send(kind, offset, length, flags, payload), offset)

    def status(self, kind, offset, length, flags=0, payload=b""):
        """The error of a reply without data: 0 for NBD_REPLY_TYPE_NONE."""
        chunks = self.call(kind, offset, length, flags, payload)
        typ, data = chunks[-1]
        if typ == T_NONE:
            return 0
        assert typ == T_ERROR, typ
        return struct.unpack(">I", data[:4])[0]

    def error_message(self, chunks):
        typ, data = chunks[-1]
        if typ != T_ERROR:
            return None
        err, n = struct.unpack(">IH", data[:6])
        return err, data[6:6 + n].decode()

    def read(self, offset, length):
        buf = bytearray(length)
        for typ, data in self.call(CMD_READ, offset, length):
            if typ == T_DATA:
                at = struct.unpack(">Q", data[:8])[0] - offset
                buf[at:at + len(data) - 8] = data[8:]
            elif typ == T_HOLE:
                at, n = struct.unpack(">QI", data[:12])
                buf[at - offset:at - offset + n] = bytes(n)
            else:
                raise AssertionError("read reply chunk type %d" % typ)
        return bytes(buf)

    def block_status(self, offset, length):
        """[(length, flags)] of the one BLOCK_STATUS_EXT chunk (asserted to be that kind)."""
        chunks = self.call(CMD_BLOCK_STATUS, offset, length)
        assert len(chunks) == 1, chunks
        typ, data = chunks[0]
        assert typ == T_BS_EXT, "block status chunk type %d" % typ
        ctx, count = struct.unpack(">II", data[:8])
        assert len(data) == 8 + 16 * count
        return [struct.unpack(">QQ", data[8 + 16 * i:24 + 16 * i]) for i in range(count)]


def holes(extents):
    """Merged (start, end) of the extents that are holes."""
    out, at = [], 0
    for n, fl in extents:
        if fl & STATE_HOLE:
            if out and out[-1][1] == at:
                out[-1] = (out[-1][0], at + n)
            else:
                out.append((at, at + n))
        at += n
    return out


def exercise(r, b, export):
    s, seen, size, _flags = connect(b.port, export)
    r.check_eq(export + ": NBD_OPT_EXTENDED_HEADERS with data refused (INVALID)",
               REP_ERR_INVALID, seen["extended with data"])
    r.check_eq(export + ": NBD_OPT_EXTENDED_HEADERS acknowledged", REP_ACK, seen["extended"])
    r.check_eq(export + ": ... a second time refused (INVALID)", REP_ERR_INVALID,
               seen["extended again"])
    r.check_eq(export + ": NBD_OPT_STRUCTURED_REPLY after it: NBD_REP_ERR_EXT_HEADER_REQD",
               REP_ERR_EXT_HEADER_REQD, seen["structured after"])
    r.check_eq(export + ": base:allocation selected", [REP_META, REP_ACK], seen["set meta"])
    r.check_eq(export + ": NBD_OPT_GO acknowledged, 12 GiB", (REP_ACK, SIZE), (seen["go"], size))
    c = Conn(s)
    a, z = os.urandom(MiB), os.urandom(MiB)
    r.check_eq(export + ": a 1 MiB write at 0 answered by NBD_REPLY_TYPE_NONE", 0,
               c.status(CMD_WRITE, 0, MiB, payload=a))
    r.check_eq(export + ": a write at 10 GiB with NBD_CMD_FLAG_PAYLOAD_LEN too", 0,
               c.status(CMD_WRITE, 10 * GiB, MiB, FLAG_PAYLOAD_LEN, payload=z))
    r.check_eq(export + ": flush", 0, c.status(CMD_FLUSH, 0, 0))
    r.check(export + ": both read back (extended OFFSET_DATA chunks)",
            c.read(0, MiB) == a and c.read(10 * GiB, MiB) == z)
    ext = c.block_status(0, SIZE)
    r.check_eq(export + ": one block status over 12 GiB covers it all (BLOCK_STATUS_EXT)", SIZE,
               sum(n for n, _ in ext))
    r.check(export + ": ... the hole between the written MiBs is one extent past 4 GiB",
            (MiB, 10 * GiB) in holes(ext) and any(n > 4 * GiB for n, _ in ext), ext[:6])
    c.status(CMD_WRITE, SIZE - 4 * KiB, 4 * KiB, payload=b"k" * 4 * KiB)
    r.check_eq(export + ": a 10 GiB trim in one request", 0, c.status(CMD_TRIM, 0, 10 * GiB))
    r.check(export + ": the trimmed MiB reads as zeros, the data just past the trim is kept",
            c.read(0, MiB) == bytes(MiB) and c.read(10 * GiB, MiB) == z)
    r.check_eq(export + ": a 6 GiB write-zeroes with FUA in one request", 0,
               c.status(CMD_WRITE_ZEROES, 6 * GiB, 6 * GiB - 4 * KiB, FLAG_FUA))
    r.check(export + ": the zeroed data reads as zeros; the 4 KiB just past it are kept",
            c.read(10 * GiB, MiB) == bytes(MiB)
            and c.read(SIZE - 4 * KiB, 4 * KiB) == b"k" * 4 * KiB)
    ext = c.block_status(0, SIZE)
    h = holes(ext)
    # (up to the last 4 KiB's allocation unit: the RAM export's is 64 KiB)
    r.check(export + ": block status: all holes but the last 4 KiB",
            len(h) == 1 and h[0][0] == 0 and SIZE - 64 * KiB <= h[0][1] <= SIZE - 4 * KiB, h)
    r.check_eq(export + ": a trim with FUA of 5 GiB", 0, c.status(CMD_TRIM, 0, 5 * GiB, FLAG_FUA))

    # The other replies without data are extended chunks too.
    r.check_eq(export + ": cache over 12 GiB", 0, c.status(CMD_CACHE, 0, SIZE))
    r.check_eq(export + ": a zero-length trim", 0, c.status(CMD_TRIM, 4096, 0))
    r.check_eq(export + ": a zero-length read: one NONE chunk", [(T_NONE, b"")],
               c.call(CMD_READ, 4096, 0))
    r.check_eq(export + ": a read with DF: one OFFSET_DATA chunk", [T_DATA],
               [t for t, _ in c.call(CMD_READ, SIZE - 4 * KiB, 4 * KiB, FLAG_DF)])
    err = c.status(CMD_WRITE_ZEROES, 4 * GiB, 64 * KiB, FLAG_NO_HOLE | FLAG_FAST_ZERO)
    r.check(export + ": write-zeroes with FAST_ZERO: done or refused (ENOTSUP) in a chunk",
            err in (0, ENOTSUP), err)

    # Refusals: error chunks with a message, the connection in step after each.
    msg = c.error_message(c.call(CMD_READ, 0, 64 * MiB + 1))
    r.check(export + ": a read past the maximum payload: EINVAL with a message",
            msg is not None and msg[0] == EINVAL and msg[1], msg)
    msg = c.error_message(c.call(CMD_TRIM, 8 * GiB, 5 * GiB))
    r.check(export + ": a trim past the end: EINVAL", msg is not None and msg[0] == EINVAL, msg)
    r.check_eq(export + ": a write past the end: ENOSPC after its payload",
               ENOSPC, c.status(CMD_WRITE, SIZE - 512, 4096, payload=os.urandom(4096)))
    r.check_eq(export + ": block status with a payload (PAYLOAD_LEN, not offered): EINVAL",
               EINVAL, c.status(CMD_BLOCK_STATUS, 0, 16, FLAG_PAYLOAD_LEN, payload=bytes(16)))
    r.check_eq(export + ": ... and the connection is in step: a read after them works",
               b"k" * 4 * KiB, c.read(SIZE - 4 * KiB, 4 * KiB))
    s.close()

    # Framing violations end the connection (and only it).
    s, *_ = connect(b.port, export, meta=False)
    c = Conn(s)
    c.send(CMD_READ, 0, 4096, magic=REQ)
    r.check(export + ": a compact request on an extended connection closes it",
            closed_by_peer(s, 10))
    s.close()
    for n in (5 * GiB, 64 * MiB + 1):
        s, *_ = connect(b.port, export, meta=False)
        c = Conn(s)
        c.send(CMD_WRITE, 0, n)
        r.check(export + ": a write announcing %d bytes, past the maximum payload, closes the "
                "connection (nothing is skipped)" % n, closed_by_peer(s, 10))
        s.close()
    s, seen, _, _ = connect(b.port, export, extended=False)
    c = Conn(s)
    cookie = c.send(CMD_READ, SIZE - 4 * KiB, 4 * KiB, magic=REQ)
    magic, flags, typ, got, length = struct.unpack(">IHHQI", recvn(s, 20))
    data = recvn(s, length)
    r.check(export + ": a client without extended headers still gets 20-byte structured chunks",
            (magic, typ, got) == (STRUCTURED_REPLY, T_DATA, cookie) and data[8:] == b"k" * 4 * KiB,
            (hex(magic), typ, got))
    s.close()


def main(r):
    scratch = disk_scratch(r, "ballast-nbd-extended")
    if scratch is None:
        return
    try:
        pool = os.path.join(scratch, "pool.img")
        p = subprocess.run([ballast_bin(), "pool", "create", pool, "--size", "2G"],
                           capture_output=True, text=True)
        r.check("a 2 GiB pool created (sparse)", p.returncode == 0, p.stderr)
        args = ["--cores", "1", "--pool", pool,
                "--export", "f=file:%s/f.img:%d" % (scratch, SIZE), "--export", "r=ram:%d" % SIZE]
        with Ballast(args) as b:
            p = b.ctl("volume", "create", "v", "12G")
            r.check("a thin volume v of 12 GiB created", p.returncode == 0, p.stderr)
            # a file on disk and a volume take any length whole; the RAM export, which zeroes
            # on its core, gets long trims and write-zeroes in 256 MiB pieces
            for export in ("f", "v", "r"):
                exercise(r, b, export)
            b.check_clean_end(r)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    guarded(main)
