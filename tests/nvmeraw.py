"""A minimal raw-socket NVMe/TCP host for tests that must misbehave on purpose: ICReq, Fabrics
Connect (admin and I/O queues), Property Set CC.EN, admin commands that read data (Identify,
Get Log Page), and I/O commands whose data the host then never sends (R2T unanswered) or
whose responses it never reads; header and data digests (CRC-32C) when asked for.

Wire layout from the NVMe/TCP transport spec (PDU common header, ICReq, CapsuleCmd with a
64-byte SQE, CapsuleResp with a 16-byte CQE, R2T) and the Fabrics spec (Connect command and
its 1024-byte data). Blocking sockets with timeouts; nothing here is clever."""
import socket
import struct

ICREQ, ICRESP, H2C_TERM, C2H_TERM, CAPSULE_CMD, CAPSULE_RESP, H2C_DATA, C2H_DATA, R2T = \
    0, 1, 2, 3, 4, 5, 6, 7, 9
FABRICS = 0x7F
FCTYPE_PROPERTY_SET, FCTYPE_CONNECT = 0x00, 0x01
OP_WRITE, OP_READ = 0x01, 0x02
OP_GET_LOG_PAGE, OP_IDENTIFY = 0x02, 0x06
LID_DISCOVERY = 0x70
DISCOVERY_NQN = "nqn.2014-08.org.nvmexpress.discovery"
SGL_INCAPSULE, SGL_TRANSPORT = 0x01, 0x5A
HOSTNQN = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-00000000b0b0"


HDGSTF, DDGSTF = 0x01, 0x02


def _crc32c_table():
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC32C = _crc32c_table()


def crc32c(data):
    """CRC-32C (Castagnoli), as NVMe/TCP's header and data digests use it."""
    c = 0xFFFFFFFF
    t = _CRC32C
    for b in data:
        c = t[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def icreq(digests=False):
    body = struct.pack("<HBBI", 0, 0, 3 if digests else 0, 0).ljust(120, b"\0")
    return struct.pack("<BBBBI", ICREQ, 0, 128, 0, 128) + body


def capsule(sqe, data=b""):
    assert len(sqe) == 64
    pdo = 72 if data else 0
    return struct.pack("<BBBBI", CAPSULE_CMD, 0, 72, pdo, 72 + len(data)) + sqe + data


def sqe(opcode, cid, nsid=0, sgl_len=0, sgl_type=SGL_TRANSPORT, cdw=(0, 0, 0, 0, 0, 0),
        fctype=0):
    b = bytearray(64)
    b[0] = opcode
    b[1] = 0x40  # PSDT: SGL
    struct.pack_into("<H", b, 2, cid)
    if opcode == FABRICS:
        b[4] = fctype
    else:
        struct.pack_into("<I", b, 4, nsid)
    struct.pack_into("<QI", b, 24, 0, sgl_len)
    b[39] = sgl_type
    struct.pack_into("<6I", b, 40, *cdw)
    return bytes(b)


def connect_data(subnqn, hostnqn=HOSTNQN, cntlid=0xFFFF, hostid=b"\x11" * 16):
    b = bytearray(1024)
    b[:16] = hostid
    struct.pack_into("<H", b, 16, cntlid)
    b[256:256 + len(subnqn)] = subnqn.encode()
    b[512:512 + len(hostnqn)] = hostnqn.encode()
    return bytes(b)


class Host:
    """One NVMe/TCP connection (a queue pair)."""

    def __init__(self, port, timeout=10.0, rcvbuf=None, digests=False):
        self.s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            self.s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.s.settimeout(timeout)
        self.s.connect(("127.0.0.1", port))
        self.cid = 0
        # Header and data digests: asked for in ICReq, in use once ICResp grants them.
        self.want_digests = digests
        self.digests = False

    def send(self, pdu, bad_data_digest=False):
        """Sends a PDU built without digests (as `capsule` builds them), adding the header and
        data digests when they are in use (`bad_data_digest`: a wrong one, on purpose)."""
        if not self.digests:
            self.s.sendall(pdu)
            return
        typ, flags, hlen, pdo, plen = struct.unpack("<BBBBI", pdu[:8])
        header = pdu[:hlen]
        data = pdu[pdo:plen] if pdo else b""
        ddgst = b""
        flags |= HDGSTF
        if data:
            flags |= DDGSTF
            ddgst = struct.pack("<I", crc32c(data) ^ (0xFFFFFFFF if bad_data_digest else 0))
        pdo = hlen + 4 if data else 0
        plen = hlen + 4 + len(data) + len(ddgst)
        header = struct.pack("<BBBBI", typ, flags, hlen, pdo, plen) + header[8:]
        self.s.sendall(header + struct.pack("<I", crc32c(header)) + data + ddgst)

    def close(self):
        try:
            self.s.close()
        except OSError:
            pass

    def recvn(self, n):
        out = bytearray()
        while len(out) < n:
            chunk = self.s.recv(n - len(out))
            if not chunk:
                raise ConnectionError("connection closed")
            out += chunk
        return bytes(out)

    def pdu(self):
        """(type, header+body bytes). With digests in use, both are checked (a mismatch raises)
        and taken out: the PDU comes back as it would without them."""
        ch = self.recvn(8)
        typ, flags, hlen, pdo, plen = struct.unpack("<BBBBI", ch)
        p = ch + self.recvn(plen - 8)
        if not self.digests or typ == ICRESP:
            return typ, p
        if not flags & HDGSTF or struct.unpack("<I", p[hlen:hlen + 4])[0] != crc32c(p[:hlen]):
            raise AssertionError("PDU type %d: header digest missing or wrong" % typ)
        data = b""
        if pdo:
            data = p[pdo:plen - 4] if flags & DDGSTF else p[pdo:plen]
            if not flags & DDGSTF or struct.unpack("<I", p[plen - 4:])[0] != crc32c(data):
                raise AssertionError("PDU type %d: data digest missing or wrong" % typ)
        header = struct.pack("<BBBBI", typ, flags & ~(HDGSTF | DDGSTF), hlen,
                             hlen if data else 0, hlen + len(data)) + p[8:hlen]
        return typ, header + data

    def response(self):
        typ, p = self.pdu()
        if typ != CAPSULE_RESP:
            raise AssertionError("expected CapsuleResp, got PDU type %d" % typ)
        dw0, _dw1, _sqhd, _sqid, cid, sf = struct.unpack("<IIHHHH", p[8:24])
        self.dnr = bool(sf & 0x8000)  # Do Not Retry, of the last response
        return cid, (sf >> 1) & 0x7FF, dw0

    def handshake(self):
        self.s.sendall(icreq(self.want_digests))
        typ, p = self.pdu()
        if typ != ICRESP:
            raise AssertionError("expected ICResp, got %d" % typ)
        granted = p[11] & 3
        if self.want_digests and granted != 3:
            raise AssertionError("ICResp granted digests %d, asked for both" % granted)
        self.digests = granted == 3

    def next_cid(self):
        self.cid = (self.cid + 1) & 0xFFFF
        return self.cid

    def connect(self, subnqn, qid=0, sqsize=127, cntlid=0xFFFF, kato_ms=0, hostid=b"\x11" * 16):
        cid = self.next_cid()
        cmd = sqe(FABRICS, cid, sgl_len=1024, sgl_type=SGL_INCAPSULE,
                  cdw=(qid << 16, sqsize, kato_ms, 0, 0, 0), fctype=FCTYPE_CONNECT)
        self.send(capsule(cmd, connect_data(subnqn, cntlid=cntlid, hostid=hostid)))
        _, status, dw0 = self.response()
        if status != 0:
            raise AssertionError("connect (qid %d) failed: status 0x%x" % (qid, status))
        return dw0 & 0xFFFF

    def try_connect(self, subnqn, qid=0, sqsize=31, cntlid=0xFFFF, hostnqn=HOSTNQN):
        """Connect; (status, dw0) whatever the status (status = SCT << 8 | SC)."""
        cid = self.next_cid()
        cmd = sqe(FABRICS, cid, sgl_len=1024, sgl_type=SGL_INCAPSULE,
                  cdw=(qid << 16, sqsize, 0, 0, 0, 0), fctype=FCTYPE_CONNECT)
        self.send(capsule(cmd, connect_data(subnqn, hostnqn=hostnqn, cntlid=cntlid)))
        _, status, dw0 = self.response()
        return status, dw0

    def admin_read(self, opcode, cdw, length, nsid=0):
        """An admin command that returns `length` bytes: (status, data)."""
        return self.read_command(sqe(opcode, self.next_cid(), nsid=nsid, sgl_len=length, cdw=cdw))

    def read_command(self, cmd):
        """Sends command `cmd` (an SQE whose data the target sends: C2HData), gathers its
        data until its response: (status, data); `self.dnr` says Do Not Retry."""
        self.send(capsule(cmd))
        data = bytearray()
        while True:
            typ, p = self.pdu()
            if typ == C2H_DATA:
                data += p[p[3]:]
                if p[1] & 0x08:  # SUCCESS: no response capsule follows
                    self.dnr = False
                    return 0, bytes(data)
            elif typ == CAPSULE_RESP:
                sf = struct.unpack("<H", p[22:24])[0]
                self.dnr = bool(sf & 0x8000)
                return (sf >> 1) & 0x7FF, bytes(data)
            else:
                raise AssertionError("unexpected PDU type %d" % typ)

    def command(self, opcode, nsid=1, cdw=(0, 0, 0, 0, 0, 0), data=b"", sgl_type=SGL_INCAPSULE,
                sgl_len=None):
        """Sends one command whose only answer is its response (its data, if any, in the
        capsule): (status, DNR), status = SCT << 8 | SC. An R2T or data back raises: the
        command was served when a refusal was expected."""
        cid = self.next_cid()
        sgl_len = len(data) if sgl_len is None else sgl_len
        self.send(capsule(sqe(opcode, cid, nsid=nsid, sgl_len=sgl_len, sgl_type=sgl_type,
                              cdw=cdw), data))
        typ, p = self.pdu()
        if typ != CAPSULE_RESP:
            raise AssertionError("opcode 0x%x: PDU type %d, not its response: the command was "
                                 "served" % (opcode, typ))
        got, sf = struct.unpack_from("<HH", p, 20)
        if got != cid:
            raise AssertionError("response for cid %d, expected %d" % (got, cid))
        return (sf >> 1) & 0x7FF, bool(sf & 0x8000)

    def identify_controller(self):
        """Identify (CNS 01h): the 4096 bytes; raises on an error status."""
        status, data = self.admin_read(OP_IDENTIFY, (1, 0, 0, 0, 0, 0), 4096)
        if status != 0:
            raise AssertionError("identify failed: status 0x%x" % status)
        return data

    def discovery_log(self):
        """[(subnqn, "traddr:trsvcid")] of the discovery log (on a discovery controller)."""
        def numd(n):
            return (n // 4 - 1) & 0xFFFF, (n // 4 - 1) >> 16
        lo, hi = numd(1024)
        status, head = self.admin_read(OP_GET_LOG_PAGE, (LID_DISCOVERY | lo << 16, hi, 0, 0, 0, 0), 1024)
        if status != 0:
            raise AssertionError("get log page failed: status 0x%x" % status)
        count = struct.unpack("<Q", head[8:16])[0]
        lo, hi = numd(1024 * (1 + count))
        _, page = self.admin_read(OP_GET_LOG_PAGE, (LID_DISCOVERY | lo << 16, hi, 0, 0, 0, 0),
                                  1024 * (1 + count))
        text = lambda b: b.split(b"\0")[0].decode().strip()
        entries = [page[1024 * (i + 1):1024 * (i + 2)] for i in range(count)]
        return sorted((text(e[256:512]), "%s:%s" % (text(e[512:768]), text(e[32:64])))
                      for e in entries)

    def enable(self):
        """Property Set CC = EN | IOSQES 6 | IOCQES 4."""
        self.set_cc(1 | (6 << 16) | (4 << 20))

    def set_cc(self, cc):
        """Property Set CC = `cc` (0: a controller reset)."""
        cid = self.next_cid()
        cmd = sqe(FABRICS, cid, cdw=(0, 0x14, cc, 0, 0, 0), fctype=FCTYPE_PROPERTY_SET)
        cmd = cmd[:40] + bytes([1]) + cmd[41:]  # ATTRIB: 8-byte property
        self.send(capsule(cmd))
        _, status, _ = self.response()
        if status != 0:
            raise AssertionError("property set CC failed: 0x%x" % status)

    def write_cmd(self, slba, nbytes, lba=4096):
        cid = self.next_cid()
        return capsule(sqe(OP_WRITE, cid, nsid=1, sgl_len=nbytes,
                           cdw=(slba & 0xFFFFFFFF, slba >> 32, nbytes // lba - 1, 0, 0, 0)))

    def read_cmd(self, slba, nbytes, lba=4096):
        cid = self.next_cid()
        return capsule(sqe(OP_READ, cid, nsid=1, sgl_len=nbytes,
                           cdw=(slba & 0xFFFFFFFF, slba >> 32, nbytes // lba - 1, 0, 0, 0)))


def io_queue(port, subnqn, timeout=10.0, rcvbuf=None, hostnqn_suffix="", digests=False,
             hostid=b"\x11" * 16):
    """An admin queue (enabled) and one I/O queue of 128 entries on a new controller (both with
    header and data digests if `digests`) of the host with identifier `hostid`."""
    admin = Host(port, timeout, digests=digests)
    admin.handshake()
    cntlid = admin.connect(subnqn, qid=0, sqsize=31, hostid=hostid)
    admin.enable()
    io = Host(port, timeout, rcvbuf=rcvbuf, digests=digests)
    io.handshake()
    io.connect(subnqn, qid=1, sqsize=127, cntlid=cntlid, hostid=hostid)
    return admin, io


def admin_queue(port, subnqn, timeout=10.0):
    """An admin queue (connected, enabled) on a new controller of `subnqn`."""
    admin = Host(port, timeout)
    admin.handshake()
    admin.connect(subnqn, qid=0, sqsize=31)
    admin.enable()
    return admin


def connect_status(port, subnqn, timeout=10.0, hostnqn=HOSTNQN):
    """The status of an admin-queue Connect to `subnqn` on `port` (0: accepted)."""
    return connect_reply(port, subnqn, timeout, hostnqn)[0]


def connect_reply(port, subnqn, timeout=10.0, hostnqn=HOSTNQN):
    """(status, dw0) of an admin-queue Connect to `subnqn` on `port` as `hostnqn`; dw0 bit 17
    (ATR) set: the host must authenticate in-band (DH-HMAC-CHAP) before anything else."""
    h = Host(port, timeout)
    try:
        h.handshake()
        return h.try_connect(subnqn, hostnqn=hostnqn)
    finally:
        h.close()
