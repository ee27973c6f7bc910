#!/usr/bin/python3
"""The NVMe Error Information log (log page 01h) over NVMe/TCP with raw hosts (the kernel VM
suite reads it with nvme-cli `error-log`, tests/vm/guest-nvme.sh).

Exports `x` (RAM, 16 MiB) and `f` (a file on tmpfs whose writes past 1 MiB fail: the daemon's
RLIMIT_FSIZE stands for a full filesystem), two cores:
- a new controller: Identify says the page holds 64 entries (ELPE 63), the page is all zeros,
  the SMART log counts no error; the Commands Supported and Effects log (05h, LPA bit 1) lists
  the admin and I/O commands served, those changing content marked, and every I/O opcode it
  leaves out an I/O queue refuses (Invalid Opcode);
- on its I/O queue a read past the end (LBA Out of Range), a read of namespace 9 (Invalid
  Namespace), an unknown opcode; on its admin queue an unknown log page and a Fabrics command
  of an unknown type (listed with namespace 0 and byte 4 at fault: a Fabrics command's type,
  not a namespace); each answered as before, then listed newest first: Error Count 5..1, the
  queue, the command id, the status
  field the completion carried (with DNR), the field at fault, the LBA and namespace named,
  the opcode; a successful command adds nothing; a read of 64 bytes at offset 64 is the
  second newest entry whole;
- a write the media refuses (Capacity Exceeded) is listed with its LBA;
- another controller (host B, digests on) lists none of A's: the log is per controller; its
  write with a wrong data digest (Transient Transport Error, retryable) is listed as a
  transport error (transport type TCP; the other errors name none);
- 150 more errors: the page still holds 64, the newest, counting down from 155; the SMART
  log counts all 155;
- the daemon logs no panic. Run with /usr/bin/python3.
"""
import os
import resource
import shutil
import struct
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import nvmeraw  # noqa: E402
from ballast_testlib import Ballast, guarded  # noqa: E402

PREFIX = "nqn.2026-11.dev.ballast:"
LID_ERROR, LID_SMART = 0x01, 0x02
SLOTS, ENTRY = 64, 64
LBA_OUT_OF_RANGE, INVALID_NAMESPACE, INVALID_OPCODE = 0x080, 0x00B, 0x001
INVALID_LOG_PAGE, CAPACITY_EXCEEDED, TRANSIENT_TRANSPORT = 0x109, 0x081, 0x022
LIMIT = 1 << 20
DNR = 0x8000


def log_page(adm, lid, length):
    numd = length // 4 - 1
    st, page = adm.admin_read(nvmeraw.OP_GET_LOG_PAGE,
                              (lid | (numd & 0xFFFF) << 16, numd >> 16, 0, 0, 0, 0), length)
    if st != 0 or len(page) != length:
        raise AssertionError("log page 0x%x: status 0x%x, %d bytes" % (lid, st, len(page)))
    return page


def errors(adm):
    """The error log's used entries, newest first: (count, sqid, cid, status field, location,
    lba, nsid, trtype, opcode)."""
    page = log_page(adm, LID_ERROR, SLOTS * ENTRY)
    out = []
    for i in range(SLOTS):
        e = page[i * ENTRY:(i + 1) * ENTRY]
        count, sqid, cid, sf, loc, lba, nsid = struct.unpack_from("<QHHHHQI", e, 0)
        if count == 0:
            if any(e):
                raise AssertionError("unused entry %d not zero" % i)
            continue
        out.append((count, sqid, cid, sf, loc, lba, nsid, e[29], e[31]))
    return out


def smart_errors(adm):
    return struct.unpack_from("<Q", log_page(adm, LID_SMART, 512), 176)[0]


def command(q, opcode, nsid=1, cdw=(0, 0, 0, 0, 0, 0), sgl_len=0):
    """Sends one command expecting no data back; (cid, status)."""
    cid = q.next_cid()
    st, _ = q.read_command(nvmeraw.sqe(opcode, cid, nsid=nsid, sgl_len=sgl_len, cdw=cdw))
    return cid, st


def sf(status):
    return (status & 0xFF) << 1 | (status >> 8 & 7) << 9 | DNR


def main(r):
    shm = "/dev/shm/ballast-errlog-%d" % os.getpid()
    os.makedirs(shm, exist_ok=True)
    try:
        args = ["--export", "x=ram:16M", "--export", "f=file:%s/f.img:4M" % shm,
                "--cores", "2"]
        with Ballast(args) as b:
            run(r, b)
    finally:
        shutil.rmtree(shm, ignore_errors=True)


def run(r, b):
    port = b.nvmf_port()
    adm, io = nvmeraw.io_queue(port, PREFIX + "x", hostid=b"\xaa" * 16)
    r.check_eq("Identify Controller: ELPE 63 (64 entries)", SLOTS - 1,
               adm.identify_controller()[262])
    r.check_eq("a new controller lists no error", [], errors(adm))
    # The other mandatory log page a host reads to know what the controller takes.
    r.check_eq("Identify Controller LPA: Commands Supported and Effects (bit 1)", 2,
               adm.identify_controller()[261] & 2)
    effects = log_page(adm, 0x05, 4096)
    acs = [op for op in range(256) if struct.unpack_from("<I", effects, op * 4)[0]]
    iocs = {op: struct.unpack_from("<I", effects, 1024 + op * 4)[0] for op in range(256)}
    r.check_eq("the effects log (05h): the admin commands served",
               [0x02, 0x06, 0x08, 0x09, 0x0A, 0x0C, 0x18], acs)
    r.check_eq("...and the I/O ones, Write, Write Zeroes and Dataset Management changing "
               "content (LBCC), Compare not",
               {0x00: 1, 0x01: 3, 0x02: 1, 0x05: 1, 0x08: 3, 0x09: 3, 0x0D: 1, 0x0E: 1, 0x11: 1,
                0x15: 1},
               {op: e for op, e in iocs.items() if e})
    # What the log leaves out, an I/O queue refuses (host C's controller, apart from A's log).
    adm_c, io_c = nvmeraw.io_queue(port, PREFIX + "x", hostid=b"\xcc" * 16)
    unlisted = [op for op in range(256) if not iocs[op] and op != nvmeraw.FABRICS]
    refused = [op for op in unlisted if command(io_c, op)[1] == INVALID_OPCODE]
    r.check_eq("every I/O opcode the effects log leaves out is Invalid Opcode on a queue (%d)"
               % len(unlisted), unlisted, refused)
    io_c.close()
    adm_c.close()
    r.check_eq("...and the SMART log counts none", 0, smart_errors(adm))

    blocks = (16 << 20) // 4096
    want = []
    cid, st = command(io, nvmeraw.OP_READ, cdw=(blocks, 0, 0, 0, 0, 0), sgl_len=4096)
    r.check_eq("a read past the end: LBA Out of Range", LBA_OUT_OF_RANGE, st)
    want.append((1, 1, cid, sf(LBA_OUT_OF_RANGE), 40, blocks, 1, 0, nvmeraw.OP_READ))
    cid, st = command(io, nvmeraw.OP_READ, nsid=9, cdw=(7, 0, 0, 0, 0, 0), sgl_len=4096)
    r.check_eq("a read of namespace 9: Invalid Namespace", INVALID_NAMESPACE, st)
    want.append((2, 1, cid, sf(INVALID_NAMESPACE), 4, 7, 9, 0, nvmeraw.OP_READ))
    cid, st = command(io, 0x7E)
    r.check_eq("an unknown I/O opcode: Invalid Opcode", INVALID_OPCODE, st)
    want.append((3, 1, cid, sf(INVALID_OPCODE), 0, 0, 1, 0, 0x7E))
    cid, st = command(adm, nvmeraw.OP_GET_LOG_PAGE, nsid=0, cdw=(0x55 | 15 << 16, 0, 0, 0, 0, 0),
                      sgl_len=64)
    r.check_eq("an unknown log page: Invalid Log Page", INVALID_LOG_PAGE, st)
    want.append((4, 0, cid, sf(INVALID_LOG_PAGE), 0xFFFF, 0, 0, 0, nvmeraw.OP_GET_LOG_PAGE))
    # A Fabrics command of a type there is none of: byte 4 is its type, not a namespace.
    cid = adm.next_cid()
    st, _ = adm.read_command(nvmeraw.sqe(nvmeraw.FABRICS, cid, fctype=0x33))
    r.check_eq("a Fabrics command of an unknown type: Invalid Opcode", INVALID_OPCODE, st)
    want.append((5, 0, cid, sf(INVALID_OPCODE), 4, 0, 0, 0, nvmeraw.FABRICS))
    _, st = command(io, nvmeraw.OP_READ, cdw=(0, 0, 0, 0, 0, 0), sgl_len=4096)
    r.check_eq("a good read succeeds", 0, st)
    r.check_eq("the log lists the five, newest first, each as it was answered",
               want[::-1], errors(adm))
    r.check_eq("the SMART log counts 5", 5, smart_errors(adm))
    # Read in part: 64 bytes at offset 64 are the second newest entry, whole.
    st, part = adm.admin_read(nvmeraw.OP_GET_LOG_PAGE, (LID_ERROR | 15 << 16, 0, 64, 0, 0, 0), 64)
    r.check_eq("a read at offset 64: the second newest (count 4, CSI 0, log page version 1)",
               (0, 4, want[3][2], 0, 1),
               (st, struct.unpack_from("<Q", part)[0], struct.unpack_from("<H", part, 10)[0],
                part[30], part[63]))

    # A write the media refuses (the file export past the daemon's file size limit).
    fadm, fio = nvmeraw.io_queue(port, PREFIX + "f", hostid=b"\xaa" * 16)
    _, hard = resource.prlimit(b.proc.pid, resource.RLIMIT_FSIZE)
    resource.prlimit(b.proc.pid, resource.RLIMIT_FSIZE, (LIMIT, hard))
    try:
        slba = LIMIT // 4096 + 3
        cid = fio.next_cid()
        fio.s.sendall(nvmeraw.capsule(
            nvmeraw.sqe(nvmeraw.OP_WRITE, cid, nsid=1, sgl_len=4096,
                        sgl_type=nvmeraw.SGL_INCAPSULE, cdw=(slba, 0, 0, 0, 0, 0)),
            b"\x5a" * 4096))
        got, st, _ = fio.response()
        r.check_eq("a write past the file size limit: Capacity Exceeded",
                   (cid, CAPACITY_EXCEEDED), (got, st))
    finally:
        resource.prlimit(b.proc.pid, resource.RLIMIT_FSIZE, (hard, hard))
    r.check_eq("...listed on that controller with its LBA",
               [(1, 1, cid, sf(CAPACITY_EXCEEDED), 0xFFFF, slba, 1, 0, nvmeraw.OP_WRITE)],
               errors(fadm))

    adm_b, io_b = nvmeraw.io_queue(port, PREFIX + "x", hostid=b"\xbb" * 16, digests=True)
    r.check_eq("host B's controller lists none of A's", [], errors(adm_b))
    cid = io_b.next_cid()
    io_b.send(nvmeraw.capsule(
        nvmeraw.sqe(nvmeraw.OP_WRITE, cid, nsid=1, sgl_len=4096, sgl_type=nvmeraw.SGL_INCAPSULE,
                    cdw=(5, 0, 0, 0, 0, 0)), b"\x11" * 4096), bad_data_digest=True)
    got, st, _ = io_b.response()
    r.check_eq("B's write with a wrong data digest: Transient Transport Error",
               (cid, TRANSIENT_TRANSPORT), (got, st))
    r.check_eq("...listed for B as a transport error (TCP), retryable (no DNR)",
               [(1, 1, cid, TRANSIENT_TRANSPORT << 1, 0xFFFF, 5, 1, 3, nvmeraw.OP_WRITE)],
               errors(adm_b))

    ok = True
    for _ in range(150):
        ok = ok and command(io, 0x7E)[1] == INVALID_OPCODE
    r.check("150 more unknown opcodes, each refused", ok)
    got = errors(adm)
    r.check_eq("the page holds 64, the newest: counts 155 down to 92 (the Get Log Page "
               "that read it is no error)", list(range(155, 91, -1)), [e[0] for e in got])
    r.check_eq("the SMART log counts all 155", 155, smart_errors(adm))
    r.check_eq("...and B's log still its one", 1, smart_errors(adm_b))
    for q in (io, adm, fio, fadm, io_b, adm_b):
        q.close()
    b.check_clean_end(r)


if __name__ == "__main__":
    guarded(main)
