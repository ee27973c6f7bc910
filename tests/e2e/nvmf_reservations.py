#!/usr/bin/python3
"""NVMe reservations over NVMe/TCP with raw hosts: what the kernel test (tests/vm/
test-nvme-resv-kernel.sh, nvme-cli) cannot send or see.

A volume `v` (in a pool) and a RAM export `r` on subsystems of their own; hosts A and B (host
identifiers differ), A with two controllers:
- Identify: ONCS bit 5, RESCAP 0xFF; Set Features Reservation Persistence turns PTPL on and off
  (Get Features and the report's PTPLS follow; later: on by Set Features, kept across kill -9);
  the Reservation Notification log page reads empty before any notification (tests/e2e/
  nvmf_resv_notices.py tests them);
- A's second controller shares A's registration and reservation (hosts, not controllers, hold
  them); a reservation A holds on `v` does not touch `r`;
- under Exclusive Access, B's Read, Write (in-capsule and R2T), Write Zeroes, Dataset
  Management and Flush get Reservation Conflict (83h) with DNR, and nothing B sent lands (read
  back by A); under Write Exclusive B reads;
- malformed commands get clear errors: short key data (SGL length), type 7 and IEKEY on
  Acquire (Invalid Field), a report without the extended structure (18h, Host Identifier
  Inconsistent Format), a report of 16 bytes (cut to the buffer);
- the holder's controllers closing keeps its registration and reservation (they belong to the
  host); removing the namespace and adding it again starts without reservations;
- the registration limit (64 per namespace by default): 64 hosts register (each disconnecting
  after), the 65th is refused (Internal Error), the report lists 64, one unregistering lets
  another in; `--nvmf-max-registrants 2` admits two, and 0 or 1024 are refused at start.
The daemon logs no panic. Run with /usr/bin/python3.
"""
import json
import os
import struct
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import nvmeraw  # noqa: E402
from ballast_testlib import Ballast, ballast_bin, guarded  # noqa: E402

PREFIX = "nqn.2026-11.dev.ballast:"
OP_FLUSH, OP_WRITE_ZEROES, OP_DSM = 0x00, 0x08, 0x09
OP_REGISTER, OP_REPORT, OP_ACQUIRE, OP_RELEASE = 0x0D, 0x0E, 0x11, 0x15
OP_SET_FEATURES, OP_GET_FEATURES = 0x09, 0x0A
CONFLICT, INVALID_FIELD, SGL_LENGTH, HOSTID_FORMAT, INTERNAL = 0x083, 0x002, 0x00F, 0x018, 0x006
INVALID_NAMESPACE = 0x00B
HA, HB = b"\xaa" * 16, b"\xbb" * 16
KA, KB = 0xA1A1, 0xB2B2


def keys(a, b=0):
    return struct.pack("<QQ", a, b)


def command(io, opcode, cdw=(0, 0, 0, 0, 0, 0), data=b"", sgl_type=nvmeraw.SGL_INCAPSULE,
            sgl_len=None):
    """One I/O command on namespace 1: (status, DNR); raises on an R2T (let through)."""
    return io.command(opcode, 1, cdw, data, sgl_type, sgl_len)


def status(io, *a, **k):
    return command(io, *a, **k)[0]


def register(io, action, current, new, iekey=False, cptpl=0):
    cdw10 = action | (8 if iekey else 0) | cptpl << 30
    return status(io, OP_REGISTER, (cdw10, 0, 0, 0, 0, 0), keys(current, new))


def ptpls(io):
    """The report's PTPLS byte (Persist Through Power Loss on)."""
    st, data = io.read_command(nvmeraw.sqe(OP_REPORT, io.next_cid(), nsid=1, sgl_len=64,
                                           cdw=(15, 1, 0, 0, 0, 0)))
    return data[9] if st == 0 else None


def rescap(adm):
    st, ns = adm.admin_read(nvmeraw.OP_IDENTIFY, (0, 0, 0, 0, 0, 0), 4096, nsid=1)
    return ns[31] if st == 0 else None


def get_ptpl(adm):
    """Get Features Reservation Persistence: (status, PTPL)."""
    adm.send(nvmeraw.capsule(nvmeraw.sqe(OP_GET_FEATURES, adm.next_cid(), nsid=1,
                                         cdw=(0x83, 0, 0, 0, 0, 0))))
    _, st, dw0 = adm.response()
    return st, dw0 & 1


def set_ptpl(adm, on, nsid=1):
    """Set Features Reservation Persistence: the status."""
    adm.send(nvmeraw.capsule(nvmeraw.sqe(OP_SET_FEATURES, adm.next_cid(), nsid=nsid,
                                         cdw=(0x83, on, 0, 0, 0, 0))))
    return adm.response()[1]


def acquire(io, action, rtype, current, preempt=0):
    return status(io, OP_ACQUIRE, (action | rtype << 8, 0, 0, 0, 0, 0), keys(current, preempt))


def release(io, action, rtype, current):
    return status(io, OP_RELEASE, (action | rtype << 8, 0, 0, 0, 0, 0), keys(current))


def report(io, length=4096, eds=True):
    """(status, generation, type, registrants [(hostid, key, holds)])."""
    cmd = nvmeraw.sqe(OP_REPORT, io.next_cid(), nsid=1, sgl_len=length,
                      cdw=(length // 4 - 1, 1 if eds else 0, 0, 0, 0, 0))
    st, data = io.read_command(cmd)
    if st != 0:
        return st, None, None, None
    gen, rtype, n = struct.unpack_from("<IBH", data, 0)
    regs = []
    for i in range(min(n, (len(data) - 64) // 64)):
        e = data[64 + 64 * i:128 + 64 * i]
        regs.append((e[16:32], struct.unpack_from("<Q", e, 8)[0], e[2] == 1))
    return st, gen, rtype, regs if len(data) >= 64 else n


def kill_and_reconnect(b, queues):
    """Closes `queues`, kills the daemon (-9), starts it again and connects hosts A and B to
    `v` again: (A's admin queue, A's I/O queue, B's admin queue, B's I/O queue)."""
    for q in queues:
        q.close()
    b.proc.kill()
    b.proc.wait()
    b.start()
    port = b.nvmf_port()
    return (nvmeraw.io_queue(port, PREFIX + "v", hostid=HA)
            + nvmeraw.io_queue(port, PREFIX + "v", hostid=HB))


def read4k(io, slba):
    st, data = io.read_command(nvmeraw.sqe(nvmeraw.OP_READ, io.next_cid(), nsid=1, sgl_len=4096,
                                           cdw=(slba, 0, 0, 0, 0, 0)))
    return st, data


def write4k(io, slba, byte):
    return status(io, nvmeraw.OP_WRITE, (slba, 0, 0, 0, 0, 0), bytes([byte]) * 4096)


def guarded_commands(slba):
    """The write-group commands B tries: (what, opcode, cdw, data, sgl_type, sgl_len)."""
    dsm = struct.pack("<IIQ", 0, 1, slba)
    return [
        ("Write (in-capsule)", nvmeraw.OP_WRITE, (slba, 0, 0, 0, 0, 0), b"\x66" * 4096,
         nvmeraw.SGL_INCAPSULE, None),
        ("Write (data after R2T)", nvmeraw.OP_WRITE, (slba, 0, 3, 0, 0, 0), b"",
         nvmeraw.SGL_TRANSPORT, 16384),
        ("Write Zeroes", OP_WRITE_ZEROES, (slba, 0, 0, 0, 0, 0), b"", nvmeraw.SGL_TRANSPORT, 0),
        ("Dataset Management (deallocate)", OP_DSM, (0, 1 << 2, 0, 0, 0, 0), dsm,
         nvmeraw.SGL_INCAPSULE, None),
        ("Flush", OP_FLUSH, (0, 0, 0, 0, 0, 0), b"", nvmeraw.SGL_TRANSPORT, 0),
    ]


def main(r):
    b = Ballast(["--pool", "{data}/pool.img", "--cores", "2"])
    pool = os.path.join(b.data_dir, "pool.img")
    subprocess.run([ballast_bin(), "pool", "create", pool, "--size", "256M"], check=True,
                   capture_output=True)
    with b:
        r.check("volume v created", b.ctl("volume", "create", "v", "64M").returncode == 0)
        r.check("RAM export r added", b.ctl("export", "add", "r", "--ram", "16M").returncode == 0)
        b.nvmf_export("r", "r")
        port = b.nvmf_port()
        adm_a, a = nvmeraw.io_queue(port, PREFIX + "v", hostid=HA)
        adm_a2, a2 = nvmeraw.io_queue(port, PREFIX + "v", hostid=HA)
        adm_b, bq = nvmeraw.io_queue(port, PREFIX + "v", hostid=HB)
        adm_r, rb = nvmeraw.io_queue(port, PREFIX + "r", hostid=HB)

        ident = adm_a.identify_controller()
        r.check_eq("Identify Controller ONCS bit 5 (Reservations)", 1 << 5,
                   struct.unpack_from("<H", ident, 520)[0] & (1 << 5))
        st, ns = adm_a.admin_read(nvmeraw.OP_IDENTIFY, (0, 0, 0, 0, 0, 0), 4096, nsid=1)
        r.check_eq("Identify Namespace RESCAP (six types, IEKEY, PTPL: a pool-kept namespace)", 0xFF,
                   ns[31])
        st, _ = adm_a.read_command(nvmeraw.sqe(OP_GET_FEATURES, adm_a.next_cid(), nsid=1,
                                               cdw=(0x83, 0, 0, 0, 0, 0)))
        r.check_eq("Get Features Reservation Persistence answers", 0, st)
        r.check_eq("Set Features Reservation Persistence turns PTPL on (a pool volume)", 0,
                   set_ptpl(adm_a, 1))
        r.check_eq("...Get Features says so", (0, 1), get_ptpl(adm_a))
        r.check_eq("...and so does the report (PTPLS)", 1, ptpls(a))
        r.check_eq("...for namespace 2 (none): Invalid Namespace", INVALID_NAMESPACE,
                   set_ptpl(adm_a, 1, nsid=2))
        r.check_eq("Set Features turns it off again", (0, (0, 0)), (set_ptpl(adm_a, 0), get_ptpl(adm_a)))
        st, page = adm_a.admin_read(nvmeraw.OP_GET_LOG_PAGE, (0x80 | (15 << 16), 0, 0, 0, 0, 0), 64,
                                    nsid=0xFFFFFFFF)
        r.check("Reservation Notification log page reads empty", st == 0 and page == bytes(64),
                "status 0x%x" % st)

        # Malformed commands.
        r.check_eq("Register with 8 bytes of data: SGL length", SGL_LENGTH,
                   status(a, OP_REGISTER, (0, 0, 0, 0, 0, 0), keys(1)[:8]))
        r.check_eq("report without the extended structure: Host Identifier Inconsistent Format",
                   HOSTID_FORMAT, report(a, eds=False)[0])
        r.check_eq("A registers", 0, register(a, 0, 0, KA))
        r.check_eq("B registers", 0, register(bq, 0, 0, KB))
        r.check_eq("Acquire type 7: Invalid Field", INVALID_FIELD, acquire(a, 0, 7, KA))
        r.check_eq("Acquire with IEKEY: Invalid Field", INVALID_FIELD,
                   status(a, OP_ACQUIRE, (8 | 1 << 8, 0, 0, 0, 0, 0), keys(KA)))
        st, gen, rtype, regs = report(a, length=16)
        r.check("a 16-byte report carries the header's start", st == 0 and gen == 2 and regs == 2,
                (st, gen, regs))

        r.check_eq("A write before any reservation", 0, write4k(a, 0, 0xA0))
        # B starts a write whose data follows an R2T while nothing is held; A takes the
        # namespace before B sends the data: the data must not land.
        cid = bq.next_cid()
        bq.s.sendall(nvmeraw.capsule(nvmeraw.sqe(nvmeraw.OP_WRITE, cid, nsid=1, sgl_len=4096,
                                                 sgl_type=nvmeraw.SGL_TRANSPORT,
                                                 cdw=(0, 0, 0, 0, 0, 0))))
        typ, p = bq.pdu()
        r.check_eq("B's R2T write gets its R2T (nothing held yet)", nvmeraw.R2T, typ)
        ttag = struct.unpack("<H", p[10:12])[0]
        r.check_eq("A acquires Exclusive Access", 0, acquire(a, 0, 2, KA))
        bq.s.sendall(struct.pack("<BBBBIHHIII", nvmeraw.H2C_DATA, 0x04, 24, 24, 24 + 4096, cid,
                                 ttag, 0, 4096, 0) + b"\x66" * 4096)
        got, st, _ = bq.response()
        r.check("B's data arriving after A's reservation: Reservation Conflict",
                got == cid and st == CONFLICT, "cid %d status 0x%x" % (got, st))
        st, gen, rtype, regs = report(bq)
        r.check("report: type 2, A holds, B registered",
                st == 0 and rtype == 2 and sorted(regs) == sorted([(HA, KA, True), (HB, KB, False)]),
                (st, rtype, regs))
        # The control plane's view (ballast's nvmf_ns_get_reservation): the same, without keys.
        p = b.ctl("rpc", "nvmf_ns_get_reservation", json.dumps({"nqn": PREFIX + "v", "nsid": 1}))
        view = json.loads(p.stdout) if p.returncode == 0 else {}
        uuid = lambda h: "-".join(h.hex()[a:b] for a, b in ((0, 8), (8, 12), (12, 16),
                                                                     (16, 20), (20, 32)))
        r.check_eq("nvmf_ns_get_reservation: type 2, the generation, A holds, B registered, each "
                   "with its connected host NQN",
                   (2, gen, [(uuid(HA), [nvmeraw.HOSTNQN], True), (uuid(HB), [nvmeraw.HOSTNQN], False)]),
                   (view.get("rtype"), view.get("generation"),
                    [(e["hostid"], e["hostnqns"], e["holds"]) for e in view.get("registrants", [])]))
        r.check("...and no key in it", p.returncode == 0 and all(
            str(k) not in p.stdout and ("%x" % k) not in p.stdout.lower() for k in (KA, KB)),
            p.stdout)
        p = b.ctl("nvmf", "reservation", "v")
        lines = p.stdout.splitlines()
        r.check("ballast nvmf reservation v: the type, the generation, who holds it",
                p.returncode == 0 and lines and
                "v namespace 1: exclusive_access, generation %d, PTPL off" % gen in lines[0] and any(l.split()[:2] == [uuid(HA), "yes"] for l in lines)
                and any(l.split()[:2] == [uuid(HB), "no"] for l in lines), p.stdout + p.stderr)
        p = b.ctl("rpc", "nvmf_ns_get_reservation", json.dumps({"nqn": PREFIX + "v", "nsid": 9}))
        r.check("...of a namespace the subsystem lacks: an error naming it",
                p.returncode != 0 and "no namespace 9" in p.stdout + p.stderr, p.stdout + p.stderr)
        r.check_eq("A's second controller (same host) writes", 0, write4k(a2, 1, 0xA1))
        for what, op, cdw, data, sgl, length in guarded_commands(0):
            st, dnr = command(bq, op, cdw, data, sgl, length)
            r.check("B's %s: Reservation Conflict with DNR" % what, st == CONFLICT and dnr,
                    "status 0x%x dnr %s" % (st, dnr))
        st, _ = read4k(bq, 0)
        r.check_eq("B's Read: Reservation Conflict", CONFLICT, st)
        st, got = read4k(a, 0)
        r.check("nothing B sent landed (A reads its own data)", st == 0 and got == b"\xa0" * 4096)
        r.check_eq("B writes the RAM export meanwhile (another namespace)", 0, write4k(rb, 0, 0x33))

        r.check_eq("A's second controller turns it into Write Exclusive (preempting A's key)", 0,
                   acquire(a2, 1, 1, KA, KA))
        st, got = read4k(bq, 1)
        r.check("B reads under Write Exclusive", st == 0 and got == b"\xa1" * 4096, "0x%x" % st)
        r.check_eq("B still cannot write", CONFLICT, write4k(bq, 1, 0xB1))

        # The holder's controllers go; the host keeps what it holds.
        for q in (a, adm_a, a2, adm_a2):
            q.close()
        adm_a, a = nvmeraw.io_queue(port, PREFIX + "v", hostid=HA)
        st, gen, rtype, regs = report(a)
        r.check("A's registration and reservation outlive its controllers",
                st == 0 and rtype == 1 and (HA, KA, True) in regs, (st, rtype, regs))
        r.check_eq("B still cannot write", CONFLICT, write4k(bq, 1, 0xB1))
        r.check_eq("B preempts A", 0, acquire(bq, 1, 1, KB, KA))
        r.check_eq("A (preempted) cannot write", CONFLICT, write4k(a, 2, 0xA2))
        r.check_eq("B writes", 0, write4k(bq, 2, 0xB2))
        r.check_eq("B releases", 0, release(bq, 0, 1, KB))
        r.check_eq("A writes again", 0, write4k(a, 3, 0xA3))
        r.check_eq("B acquires Exclusive Access again", 0, acquire(bq, 0, 2, KB))

        # The namespace removed and added again: a fresh one, without reservations.
        nqn = PREFIX + "r"
        adm_r2, ra = nvmeraw.io_queue(port, nqn, hostid=HA)
        r.check_eq("B registers on r", 0, register(rb, 0, 0, KB))
        r.check_eq("B acquires Exclusive Access on r", 0, acquire(rb, 0, 2, KB))
        r.check_eq("A cannot read r", CONFLICT, read4k(ra, 0)[0])
        ok = (b.ctl("rpc", "nvmf_subsystem_remove_ns", json.dumps({"nqn": nqn, "nsid": 1})).returncode == 0
              and b.ctl("nvmf", "add-ns", nqn, "r").returncode == 0)
        r.check("r's namespace removed and added again", ok)
        st, got = read4k(ra, 0)
        r.check("A reads r (the new namespace has no reservation)", st == 0 and got == b"\x33" * 4096,
                "0x%x" % st)
        for q in (ra, adm_r2, rb, adm_r):
            q.close()

        # The registration limit.
        r.check_eq("B clears v", 0, release(bq, 1, 0, KB))
        for i in range(64):
            adm, q = nvmeraw.io_queue(port, PREFIX + "v", hostid=struct.pack("<QQ", i + 1, 7))
            st = register(q, 0, 0, 1000 + i)
            q.close()
            adm.close()
            if st != 0:
                r.check_eq("host %d registers" % i, 0, st)
                break
        st, gen, rtype, regs = report(a, length=8192)
        r.check("64 hosts registered (they left, their registrations stay)",
                st == 0 and len(regs) == 64, (st, regs and len(regs)))
        r.check_eq("a 65th registration is refused (Internal Error)", INTERNAL, register(a, 0, 0, KA))
        adm, q = nvmeraw.io_queue(port, PREFIX + "v", hostid=struct.pack("<QQ", 1, 7))
        r.check_eq("one unregisters", 0, register(q, 1, 1000, 0))
        q.close()
        adm.close()
        r.check_eq("then the 65th gets in", 0, register(a, 0, 0, KA))
        r.check_eq("A clears", 0, release(a, 1, 0, KA))
        st, gen, rtype, regs = report(a)
        r.check("report: nothing registered", st == 0 and regs == [], (st, regs))

        # Preempt and Abort waits for the preempted host's writes already on their way: four
        # 256 KiB writes of A's held by a 1 MiB/s limit (the last one ~0.75 s away).
        r.check_eq("A registers", 0, register(a, 0, 0, KA))
        r.check_eq("B registers", 0, register(bq, 0, 0, KB))
        r.check_eq("A acquires Write Exclusive", 0, acquire(a, 0, 1, KA))
        r.check("v limited to 1 MiB/s of writes",
                b.ctl("export", "limit", "v", "--write-mibs", "1").returncode == 0)
        cids = []
        for i in range(4):
            cid = a.next_cid()
            a.s.sendall(nvmeraw.capsule(nvmeraw.sqe(nvmeraw.OP_WRITE, cid, nsid=1, sgl_len=256 << 10,
                                                    sgl_type=nvmeraw.SGL_TRANSPORT,
                                                    cdw=(1024 + 64 * i, 0, 63, 0, 0, 0))))
            cids.append(cid)
        for _ in range(4):
            typ, p = a.pdu()
            r2t_cid, ttag, off, length = struct.unpack("<HHII", p[8:20])
            for at in range(off, off + length, 64 << 10):
                last = 0x04 if at + (64 << 10) == off + length else 0
                a.s.sendall(struct.pack("<BBBBIHHIII", nvmeraw.H2C_DATA, last, 24, 24, 24 + (64 << 10),
                                        r2t_cid, ttag, at, 64 << 10, 0) + b"\xaa" * (64 << 10))
        time.sleep(0.15)  # the data is in: the writes wait for the limit (the last ~0.6 s more)
        t0 = time.monotonic()
        st = acquire(bq, 2, 1, KB, KA)
        took = time.monotonic() - t0
        r.check_eq("B preempts A and aborts", 0, st)
        r.check("...answering once A's writes already on their way are done (%.2f s)" % took,
                took >= 0.3, "took %.3f s" % took)
        done = sorted((lambda c: (c[0], c[1]))(a.response()) for _ in range(4))
        r.check_eq("A's four writes, admitted before the preempt, all succeeded",
                   sorted((c, 0) for c in cids), done)
        r.check("v's limit lifted", b.ctl("export", "limit", "v", "--write-mibs", "0").returncode == 0)
        r.check_eq("A (preempted) cannot write", CONFLICT, write4k(a, 1024, 0xA9))
        t0 = time.monotonic()
        st = acquire(bq, 2, 1, KB, KA)
        r.check("a Preempt and Abort with nothing to wait for answers at once (key gone: conflict)",
                st == CONFLICT and time.monotonic() - t0 < 0.5, (st, time.monotonic() - t0))
        r.check_eq("B clears", 0, release(bq, 1, 0, KB))

        # Persist Through Power Loss: kept in the pool, back after kill -9.
        r.check_eq("RESCAP of a pool-kept namespace: PTPL too", 0xFF, rescap(adm_a))
        r.check_eq("CPTPL 01b (reserved) is refused", INVALID_FIELD, register(a, 0, 0, KA, cptpl=1))
        r.check_eq("A registers asking for PTPL (as Linux's pr_ops do)", 0, register(a, 0, 0, KA, cptpl=3))
        r.check_eq("report: PTPLS 1", 1, ptpls(a))
        r.check_eq("Get Features Reservation Persistence: on", (0, 1), get_ptpl(adm_a))
        r.check_eq("B registers", 0, register(bq, 0, 0, KB))
        r.check_eq("A acquires Write Exclusive", 0, acquire(a, 0, 1, KA))
        before = report(a)
        adm_a, a, adm_b, bq = kill_and_reconnect(b, (a, adm_a, bq, adm_b))
        r.check_eq("after kill -9 and a restart the report is the same", before, report(bq))
        r.check_eq("the fenced host still cannot write", CONFLICT, write4k(bq, 5, 0xB5))
        r.check_eq("the holder writes", 0, write4k(a, 5, 0xA5))
        r.check_eq("PTPL still on", 1, ptpls(a))
        r.check_eq("A turns PTPL off (CPTPL 10b)", 0, register(a, 0, 0, KA, cptpl=2))
        r.check_eq("report: PTPLS 0", 0, ptpls(a))
        adm_a, a, adm_b, bq = kill_and_reconnect(b, (a, adm_a, bq, adm_b))
        st, gen, rtype, regs = report(bq)
        r.check("PTPL off: after a restart nothing is kept", st == 0 and rtype == 0 and regs == [],
                (st, rtype, regs))
        r.check_eq("B writes", 0, write4k(bq, 5, 0xB6))
        r.check_eq("B registers; A turns PTPL on with Set Features 83h", (0, 0),
                   (register(bq, 0, 0, KB), set_ptpl(adm_a, 1)))
        adm_a, a, adm_b, bq = kill_and_reconnect(b, (a, adm_a, bq, adm_b))
        st, gen, rtype, regs = report(a)
        r.check("...after kill -9 and a restart B's registration is there, PTPL on",
                st == 0 and regs == [(HB, KB, False)] and ptpls(a) == 1, (st, regs))
        r.check_eq("Set Features turns it off (B still registered)", 0, set_ptpl(adm_a, 0))
        adm_a, a, adm_b, bq = kill_and_reconnect(b, (a, adm_a, bq, adm_b))
        st, gen, rtype, regs = report(a)
        r.check("...after kill -9 and a restart nothing is kept (the pool forgot the table)",
                st == 0 and regs == [] and ptpls(a) == 0, (st, regs))
        # PTPL on, then the namespace goes: what was kept goes with it.
        r.check_eq("A registers with PTPL again and acquires", 0,
                   register(a, 0, 0, KA, cptpl=3) | acquire(a, 0, 2, KA))
        for q in (a, adm_a, bq, adm_b):
            q.close()
        nqn = PREFIX + "v"
        ok = (b.ctl("rpc", "nvmf_subsystem_remove_ns", json.dumps({"nqn": nqn, "nsid": 1})).returncode == 0
              and b.ctl("nvmf", "add-ns", nqn, "v").returncode == 0)
        r.check("v's namespace removed and added again", ok)
        b.proc.kill()
        b.proc.wait()
        b.start()
        adm_b, bq = nvmeraw.io_queue(b.nvmf_port(), PREFIX + "v", hostid=HB)
        st, gen, rtype, regs = report(bq)
        r.check("a removed namespace's kept reservations went with it (none after a restart)",
                st == 0 and rtype == 0 and regs == [], (st, rtype, regs))
        bq.close()
        adm_b.close()
        b.check_clean_end(r)

    # The limit is a flag: 2 here.
    b = Ballast(["--export", "x=ram:16M", "--cores", "1", "--nvmf-max-registrants", "2"])
    with b:
        port = b.nvmf_port()
        got = []
        for i in range(3):
            adm, q = nvmeraw.io_queue(port, PREFIX + "x", hostid=struct.pack("<QQ", i + 1, 9))
            got.append(register(q, 0, 0, 7))
            q.close()
            adm.close()
        r.check_eq("--nvmf-max-registrants 2: two hosts register, the third is refused",
                   [0, 0, INTERNAL], got)
        adm, q = nvmeraw.io_queue(port, PREFIX + "x", hostid=struct.pack("<QQ", 1, 9))
        r.check_eq("without a pool RESCAP has no PTPL", 0xFE, rescap(adm))
        r.check_eq("...a Register asking for it is taken (as nvmet does)", 0,
                   register(q, 0, 0, 7, cptpl=3))
        r.check_eq("...and PTPLS stays 0", 0, ptpls(q))
        r.check_eq("...Set Features asking for it: Invalid Field", INVALID_FIELD, set_ptpl(adm, 1))
        r.check_eq("...asking for it off: taken", 0, set_ptpl(adm, 0))
        q.close()
        adm.close()
        b.check_clean_end(r)
    for bad in ("0", "1024"):
        p = subprocess.run([ballast_bin(), "serve", "--nvmf-max-registrants", bad], capture_output=True,
                           text=True, timeout=30)
        r.check("--nvmf-max-registrants %s is refused" % bad,
                p.returncode != 0 and "nvmf-max-registrants" in p.stderr, p.stderr[-200:])


if __name__ == "__main__":
    guarded(main)
