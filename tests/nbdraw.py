"""Raw NBD client pieces for tests that must misbehave where libnbd would not (stall, never
read): the newstyle handshake through NBD_OPT_GO and request headers, over a plain socket."""
import socket
import struct

NBDMAGIC, IHAVEOPT, REQ_MAGIC = 0x4E42444D41474943, 0x49484156454F5054, 0x25609513
OPT_GO, OPT_STRUCTURED_REPLY = 7, 8
CMD_READ, CMD_WRITE, CMD_DISC = 0, 1, 2


def recvn(s, n):
    out = bytearray()
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise ConnectionError("closed")
        out += chunk
    return bytes(out)


def nbd_connect(port, export="vol", timeout=10.0, rcvbuf=None):
    """A raw NBD client through OPT_GO (simple replies); returns the socket."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(timeout)
    s.connect(("127.0.0.1", port))
    recvn(s, 18)
    s.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
    name = export.encode()
    s.sendall(struct.pack(">QII", IHAVEOPT, OPT_GO, 4 + len(name) + 2) +
              struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
    while True:
        _magic, _opt, typ, length = struct.unpack(">QIII", recvn(s, 20))
        recvn(s, length)
        if typ == 1:  # ACK
            return s
        if typ & (1 << 31):
            raise AssertionError("OPT_GO refused: 0x%x" % typ)


def nbd_req(kind, handle, offset, length):
    return struct.pack(">IHHQQI", REQ_MAGIC, 0, kind, handle, offset, length)
