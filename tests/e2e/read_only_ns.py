#!/usr/bin/python3
"""Read-only exports stay read-only over NVMe/TCP, as they are over NBD.

Three read-only namespaces — a volume's snapshot, a RAM export and a file export added with
`--read-only` — and one writable namespace (the volume). Over NVMe/TCP each read-only one:
- says so in Identify Namespace (NSATTR bit 0, "write protected": Linux's host then marks the
  disk read-only);
- answers every command that would change data — a write with its data in the capsule, a write
  whose data would follow an R2T, Write Zeroes (with and without deallocation), Dataset
  Management with deallocate — with "Namespace is Write Protected" (generic status 20h, what
  Linux's nvmet answers), at once, and nothing changes (read back through NBD and NVMe);
- still reads, and takes a Flush.
The daemon panics nowhere (a Write Zeroes to a read-only file export used to trip the file
backend's assertion and drop the connection; a read-only RAM export took writes). The writable
volume takes the same commands and reports NSATTR 0.
Run with /usr/bin/python3 (Debian's python3-libnbd).
"""
import os
import struct
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import nbd  # noqa: E402
import nvmeraw  # noqa: E402
from ballast_testlib import Ballast, ballast_bin, guarded  # noqa: E402

PREFIX = "nqn.2026-11.dev.ballast:"
OP_FLUSH, OP_WRITE_ZEROES, OP_DSM = 0x00, 0x08, 0x09
NS_WRITE_PROTECTED = 0x020
IDENTIFY_NS_NSATTR = 99


def identify_ns(admin):
    status, data = admin.admin_read(nvmeraw.OP_IDENTIFY, (0, 0, 0, 0, 0, 0), 4096, nsid=1)
    if status != 0:
        raise AssertionError("identify namespace failed: status 0x%x" % status)
    return data


def command(io, opcode, cdw=(0, 0, 0, 0, 0, 0), data=b"", sgl_type=nvmeraw.SGL_TRANSPORT,
            sgl_len=None):
    """Sends one I/O command and returns its status (the host sends no data after it)."""
    return io.command(opcode, 1, cdw, data, sgl_type, sgl_len)[0]


def read4k(io, slba):
    """A 4 KiB read through NVMe/TCP: (status, data)."""
    cid = io.next_cid()
    io.s.sendall(nvmeraw.capsule(nvmeraw.sqe(nvmeraw.OP_READ, cid, nsid=1, sgl_len=4096,
                                             cdw=(slba, 0, 0, 0, 0, 0))))
    data = bytearray()
    while True:
        typ, p = io.pdu()
        if typ == nvmeraw.C2H_DATA:
            data += p[p[3]:] if p[3] else p[p[2]:]
            if p[1] & 0x08:
                return 0, bytes(data)
        elif typ == nvmeraw.CAPSULE_RESP:
            sf = struct.unpack("<H", p[22:24])[0]
            return (sf >> 1) & 0x7FF, bytes(data)
        else:
            raise AssertionError("unexpected PDU type %d" % typ)


def changing_commands():
    """(what, opcode, cdw, data, sgl_type, sgl_len) of commands that would change LBAs 0-1."""
    dsm_range = struct.pack("<IIQ", 0, 2, 0)  # context attributes, NLB, SLBA
    return [
        ("write, data in the capsule", nvmeraw.OP_WRITE, (0, 0, 1, 0, 0, 0), b"\xee" * 8192,
         nvmeraw.SGL_INCAPSULE, None),
        ("write, data after an R2T", nvmeraw.OP_WRITE, (0, 0, 1, 0, 0, 0), b"",
         nvmeraw.SGL_TRANSPORT, 8192),
        ("write zeroes", OP_WRITE_ZEROES, (0, 0, 1, 0, 0, 0), b"", nvmeraw.SGL_TRANSPORT, 0),
        ("write zeroes, deallocate", OP_WRITE_ZEROES, (0, 0, 1 | 1 << 25, 0, 0, 0), b"",
         nvmeraw.SGL_TRANSPORT, 0),
        ("dataset management, deallocate", OP_DSM, (0, 1 << 2, 0, 0, 0, 0), dsm_range,
         nvmeraw.SGL_INCAPSULE, None),
    ]


def check_namespace(r, b, name, writable, expect0):
    """Connects to `name`'s subsystem and runs every check; `expect0` is what LBA 0 holds."""
    port = b.nvmf_port()
    admin, io = nvmeraw.io_queue(port, PREFIX + name)
    try:
        nsattr = identify_ns(admin)[IDENTIFY_NS_NSATTR]
        r.check_eq("%s: Identify Namespace NSATTR (write protected)" % name,
                   0 if writable else 1, nsattr)
        for what, opcode, cdw, data, sgl_type, sgl_len in changing_commands():
            if writable and sgl_type == nvmeraw.SGL_TRANSPORT and sgl_len:
                continue  # a writable namespace would wait for the data (R2T): not this test
            st = command(io, opcode, cdw, data, sgl_type, sgl_len)
            r.check_eq("%s: %s answers %s" % (name, what, "success" if writable
                                              else "Namespace is Write Protected"),
                       0 if writable else NS_WRITE_PROTECTED, st)
            if not writable:
                st, got = read4k(io, 0)
                r.check("%s: after %s LBA 0 still reads what it held" % (name, what),
                        st == 0 and got == expect0, "status 0x%x" % st)
        r.check_eq("%s: flush succeeds" % name, 0, command(io, OP_FLUSH))
        st, got = read4k(io, 1)
        r.check("%s: reads succeed" % name, st == 0 and len(got) == 4096, "status 0x%x" % st)
    finally:
        io.close()
        admin.close()


def main(r):
    b = Ballast(["--pool", "{data}/pool.img", "--cores", "1"])
    pool = os.path.join(b.data_dir, "pool.img")
    subprocess.run([ballast_bin(), "pool", "create", pool, "--size", "256M"], check=True,
                   capture_output=True)
    ro_file = os.path.join(b.tmp, "ro.img")
    with open(ro_file, "wb") as f:
        f.write(b"\x5a" * 8192)
        f.truncate(16 << 20)
    with b:
        r.check("volume v created", b.ctl("volume", "create", "v", "64M").returncode == 0)
        h = nbd.NBD()
        h.connect_uri(b.uri("v"))
        h.pwrite(b"\xa5" * 8192, 0)
        h.flush()
        h.shutdown()
        r.check("snapshot of v taken", b.ctl("snapshot", "create", "v", "snap").returncode == 0)
        for name, spec in (("ror", ["--ram", "16M"]), ("rof", ["--file", ro_file])):
            ok = b.ctl("export", "add", name, *spec, "--read-only").returncode == 0
            try:
                b.nvmf_export(name, name)
            except AssertionError as e:
                ok = False
                print(e)
            r.check("read-only export %s served as an NVMe/TCP namespace" % name, ok)

        check_namespace(r, b, "snap", False, b"\xa5" * 4096)
        check_namespace(r, b, "ror", False, bytes(4096))
        check_namespace(r, b, "rof", False, b"\x5a" * 4096)
        check_namespace(r, b, "v", True, None)

        h = nbd.NBD()
        h.connect_uri(b.uri("snap"))
        r.check("NBD reads the snapshot unchanged", h.pread(8192, 0) == b"\xa5" * 8192)
        h.shutdown()
        with open(ro_file, "rb") as f:
            r.check("the read-only file is unchanged", f.read(8192) == b"\x5a" * 8192)
        h = nbd.NBD()
        h.connect_uri(b.uri("v"))
        r.check("the writable volume took the changes (LBAs 0-1 deallocated: zeros)",
                h.pread(8192, 0) == bytes(8192))
        h.shutdown()
        b.check_clean_end(r)


if __name__ == "__main__":
    guarded(main)
