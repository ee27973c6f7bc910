#!/usr/bin/python3
"""NVMe reservation notifications over NVMe/TCP with raw hosts (the kernel test, tests/vm/
test-nvme-resv-kernel.sh, reads the same log page with nvme-cli).

A RAM export `x` served by two cores; hosts A (two controllers), B and C, each holding an
Asynchronous Event Request:
- B preempts A: both of A's controllers get the event (0x00800006: I/O command specific,
  reservation log page available, log page 80h), B and C none; each of A's controllers reads
  Registration Preempted (type 1) for namespace 1 once (count 1, nothing more waiting), then
  an empty page;
- a Write Exclusive released tells nobody; a Write Exclusive - Registrants Only released tells
  A and C (Reservation Released, type 2), not B who released it;
- C masks Reservation Preempted (Set Features 82h): B's Clear tells A (type 3) and not C; the
  mask reads back; a namespace the subsystem lacks is refused;
- 70 notifications for A while nobody reads: the log keeps 64 (counts consecutive, "more
  waiting" counting down), the 6 lost show as a gap in the next count; A's other controller,
  which read none of it, keeps its own 64 from its oldest;
- the daemon logs no panic. Run with /usr/bin/python3.
"""
import os
import socket
import struct
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import nvmeraw  # noqa: E402
from ballast_testlib import Ballast, guarded  # noqa: E402

NQN = "nqn.2026-11.dev.ballast:x"
OP_REGISTER, OP_ACQUIRE, OP_RELEASE = 0x0D, 0x11, 0x15
OP_SET_FEATURES, OP_GET_FEATURES, OP_AER = 0x09, 0x0A, 0x0C
FEAT_RESV_MASK = 0x82
AEN_RESV_LOG = 0x00800006
INVALID_NAMESPACE = 0x00B
REG_PREEMPTED, RESV_RELEASED, RESV_PREEMPTED = 1, 2, 3
HA, HB, HC = b"\xaa" * 16, b"\xbb" * 16, b"\xcc" * 16
KA, KB, KC = 0xA1, 0xB2, 0xC3


def resv(io, opcode, cdw10, current, other=0):
    cid = io.next_cid()
    data = struct.pack("<QQ", current, other)
    io.s.sendall(nvmeraw.capsule(nvmeraw.sqe(opcode, cid, nsid=1, sgl_len=16,
                                             sgl_type=nvmeraw.SGL_INCAPSULE,
                                             cdw=(cdw10, 0, 0, 0, 0, 0)), data))
    got, st, _ = io.response()
    if got != cid:
        raise AssertionError("response for cid %d, expected %d" % (got, cid))
    return st


def register(io, key):
    return resv(io, OP_REGISTER, 0, 0, key)


def acquire(io, rtype, key, preempt=None):
    action = 0 if preempt is None else 1
    return resv(io, OP_ACQUIRE, action | rtype << 8, key, preempt or 0)


def release(io, rtype, key, clear=False):
    return resv(io, OP_RELEASE, (1 if clear else 0) | rtype << 8, key)


def send_aer(adm):
    cid = adm.next_cid()
    adm.s.sendall(nvmeraw.capsule(nvmeraw.sqe(OP_AER, cid)))
    return cid


def event(adm, timeout):
    """The next completion on `adm` within `timeout` s: (cid, status, dw0), or None."""
    adm.s.settimeout(timeout)
    try:
        return adm.response()
    except socket.timeout:
        return None
    finally:
        adm.s.settimeout(10)


def resv_log(adm):
    """Get Log Page 80h: (log page count, type, available after it, nsid)."""
    st, page = adm.admin_read(nvmeraw.OP_GET_LOG_PAGE, (0x80 | (15 << 16), 0, 0, 0, 0, 0), 64,
                              nsid=0xFFFFFFFF)
    if st != 0 or len(page) != 64:
        raise AssertionError("reservation log: status 0x%x, %d bytes" % (st, len(page)))
    count, typ, nalp, nsid = struct.unpack_from("<QBB2xI", page, 0)
    if any(page[16:]):
        raise AssertionError("reserved bytes set: %r" % page[16:])
    return count, typ, nalp, nsid


def feature(adm, opcode, nsid, value=0):
    adm.s.sendall(nvmeraw.capsule(nvmeraw.sqe(opcode, adm.next_cid(), nsid=nsid,
                                              cdw=(FEAT_RESV_MASK, value, 0, 0, 0, 0))))
    _, st, dw0 = adm.response()
    return st, dw0


def main(r):
    b = Ballast(["--export", "x=ram:16M", "--cores", "2"])
    with b:
        port = b.nvmf_port()
        adm_a1, a1 = nvmeraw.io_queue(port, NQN, hostid=HA)
        adm_a2, a2 = nvmeraw.io_queue(port, NQN, hostid=HA)
        adm_b, bq = nvmeraw.io_queue(port, NQN, hostid=HB)
        adm_c, cq = nvmeraw.io_queue(port, NQN, hostid=HC)
        r.check_eq("no notification yet: an empty page", (0, 0, 0, 0), resv_log(adm_a1))
        aers = {name: send_aer(adm) for name, adm in
                (("a1", adm_a1), ("a2", adm_a2), ("b", adm_b), ("c", adm_c))}

        r.check_eq("A, B and C register", [0, 0, 0], [register(a1, KA), register(bq, KB),
                                                       register(cq, KC)])
        r.check_eq("A acquires Write Exclusive", 0, acquire(a1, 1, KA))
        r.check_eq("B preempts A", 0, acquire(bq, 1, KB, preempt=KA))
        for name, adm in (("first", adm_a1), ("second", adm_a2)):
            got = event(adm, 5)
            want = (aers["a1" if name == "first" else "a2"], 0, AEN_RESV_LOG)
            r.check("A's %s controller gets the event (0x%08x)" % (name, AEN_RESV_LOG),
                    got == want, got and (got[0], got[1], hex(got[2])))
        r.check("B (the issuer) and C (not preempted) get none",
                event(adm_b, 0.5) is None and event(adm_c, 0.3) is None)
        r.check_eq("A's first controller reads Registration Preempted, namespace 1",
                   (1, REG_PREEMPTED, 0, 1), resv_log(adm_a1))
        r.check_eq("...once", (0, 0, 0, 0), resv_log(adm_a1))
        r.check_eq("A's second controller has its own copy", (1, REG_PREEMPTED, 0, 1),
                   resv_log(adm_a2))

        r.check_eq("A registers again", 0, register(a1, KA))
        aers["a1"], aers["a2"] = send_aer(adm_a1), send_aer(adm_a2)
        r.check_eq("B releases its Write Exclusive", 0, release(bq, 1, KB))
        r.check("...which tells nobody (it concerned B alone)",
                event(adm_a1, 0.6) is None and event(adm_c, 0.1) is None)
        r.check_eq("B acquires Write Exclusive - Registrants Only", 0, acquire(bq, 3, KB))
        r.check_eq("B releases it", 0, release(bq, 3, KB))
        got = (event(adm_a1, 5), event(adm_a2, 5), event(adm_c, 5))
        r.check("A's controllers and C get the event",
                got == ((aers["a1"], 0, AEN_RESV_LOG), (aers["a2"], 0, AEN_RESV_LOG),
                        (aers["c"], 0, AEN_RESV_LOG)), got)
        r.check_eq("A reads Reservation Released (its second notification)",
                   (2, RESV_RELEASED, 0, 1), resv_log(adm_a1))
        r.check_eq("C reads Reservation Released (its first)", (1, RESV_RELEASED, 0, 1),
                   resv_log(adm_c))
        r.check("B heard nothing of its own release", event(adm_b, 0.3) is None)

        r.check_eq("C masks Reservation Preempted on namespace 1 (Set Features 82h)", 0,
                   feature(adm_c, OP_SET_FEATURES, 1, 1 << 3)[0])
        r.check_eq("...and reads it back", (0, 1 << 3), feature(adm_c, OP_GET_FEATURES, 1))
        r.check_eq("a mask for a namespace the subsystem lacks: Invalid Namespace",
                   INVALID_NAMESPACE, feature(adm_c, OP_SET_FEATURES, 5, 1 << 3)[0])
        aers["a1"], aers["c"] = send_aer(adm_a1), send_aer(adm_c)
        r.check_eq("B clears", 0, release(bq, 0, KB, clear=True))
        got = event(adm_a1, 5)
        r.check("A gets the event", got == (aers["a1"], 0, AEN_RESV_LOG), got)
        r.check_eq("A reads Reservation Preempted", (3, RESV_PREEMPTED, 0, 1), resv_log(adm_a1))
        r.check("C (masked) gets no event", event(adm_c, 0.6) is None)
        r.check_eq("...and its log is empty", (0, 0, 0, 0), resv_log(adm_c))

        # 70 notifications for A, nobody reading: 64 kept, 6 lost, the gap in the counts.
        register(bq, KB)
        ok = True
        for _ in range(70):
            ok = ok and register(a1, KA) == 0 and acquire(bq, 1, KB, preempt=KA) == 0
        r.check("70 times: A registers, B preempts it", ok)
        a2_first = resv_log(adm_a2)
        pages = [resv_log(adm_a1) for _ in range(65)]
        r.check_eq("A's log keeps 64, in order, the number still waiting counting down",
                   [(4 + i, REG_PREEMPTED, 63 - i, 1) for i in range(64)], pages[:64])
        r.check_eq("...then it is empty", (0, 0, 0, 0), pages[64])
        r.check_eq("A's second controller kept its own, oldest first (the release it never read)",
                   (2, RESV_RELEASED, 63, 1), a2_first)
        r.check_eq("A registers, B preempts it once more", (0, 0),
                   (register(a1, KA), acquire(bq, 1, KB, preempt=KA)))
        r.check_eq("the next count shows the 6 lost (67 read last, 74 now)", (74, REG_PREEMPTED, 0, 1),
                   resv_log(adm_a1))
        for q in (a1, adm_a1, a2, adm_a2, bq, adm_b, cq, adm_c):
            q.close()
        b.check_clean_end(r)


if __name__ == "__main__":
    guarded(main)
