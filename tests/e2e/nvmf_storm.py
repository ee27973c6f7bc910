#!/usr/bin/python3
"""Random NVMe/TCP I/O commands against every kind of namespace, checked against a model.

One host per namespace, all at once (two cores): RAM exports (4096- and 512-byte LBAs), files on
tmpfs (copied on the core) and on disk (O_DIRECT through the ring; also behind 512-byte LBAs), a volume, its snapshot and a
clone of it, a volume behind 512-byte LBAs, read-only RAM and file exports, and a RAM export and
a volume whose hosts use header and data digests (one write in ten with a wrong data digest:
Transient Transport Error, nothing stored). Each host sends
seeded random commands over the first 2 MiB of its namespace — reads, writes with in-capsule
data and through R2T/H2CData, FUA, Write Zeroes with and without deallocation, Dataset
Management deallocate over several ranges (a volume releases the whole 4 KiB pieces inside
each range, and says in DLFEAT that it promises nothing more; RAM and files zero every LBA, as
their DLFEAT says), flushes — plus commands that must fail: ranges past
the end, transfers over MDTS, unknown opcodes, another namespace ID, and on read-only namespaces
everything that would change data.

Every command must get exactly the status the spec and docs/INTERFACE.md give it (the first
failing check, in the order the target checks); every read must return what the model holds
(writes as written, deallocated and zeroed ranges as zeros: DLFEAT says deallocated blocks read
zero); at the end NBD (libnbd) reads every namespace's 2 MiB back and must see the model too;
the daemon lives, exits 0 and never panicked.
Run with /usr/bin/python3 (Debian's python3-libnbd). BALLAST_STORM_SEED, BALLAST_STORM_OPS.
"""
import os
import random
import struct
import subprocess
import sys
import threading

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import nbd  # noqa: E402
import nvmeraw  # noqa: E402
from ballast_testlib import Ballast, ballast_bin, guarded  # noqa: E402

MiB = 1 << 20
PREFIX = "nqn.2026-11.dev.ballast:"
REGION = 2 * MiB
SIZE = 32 * MiB
MDTS = 1 * MiB
IN_CAPSULE = 8192
OP_FLUSH, OP_WRITE, OP_READ, OP_WRITE_ZEROES, OP_DSM = 0x00, 0x01, 0x02, 0x08, 0x09
OK, INVALID_OPCODE, INVALID_FIELD, INVALID_NS = 0x000, 0x001, 0x002, 0x00b
WRITE_PROTECTED, TRANSIENT_TRANSPORT_ERROR, LBA_OUT_OF_RANGE = 0x020, 0x022, 0x080
H2C_CHUNK = 64 * 1024
FUA = 1 << 30
DEAC = 1 << 25


class Storm:
    """One namespace's host, its model and its random commands."""

    def __init__(self, name, nqn, lba, writable, seed, whole_pieces, digests=False):
        self.name, self.nqn, self.lba, self.writable = name, nqn, lba, writable
        self.whole_pieces = whole_pieces
        self.digests = digests
        self.blocks = SIZE // lba
        self.rng = random.Random(seed)
        self.model = None
        self.failures = []
        self.counts = {}
        self.log = []
        self.detail = ""
        self.deepest = 0
        self.io = self.admin = None

    def fail(self, what):
        if len(self.failures) < 12:
            self.failures.append(what)

    # -- wire -------------------------------------------------------------------------------
    def send(self, opcode, cdw, nsid=1, data=b"", sgl_len=None, incapsule=False, bad=False):
        cid = self.io.next_cid()
        sgl_type = nvmeraw.SGL_INCAPSULE if incapsule else nvmeraw.SGL_TRANSPORT
        sgl_len = len(data) if sgl_len is None else sgl_len
        self.io.send(nvmeraw.capsule(
            nvmeraw.sqe(opcode, cid, nsid=nsid, sgl_len=sgl_len, sgl_type=sgl_type, cdw=cdw),
            data if incapsule else b""), bad_data_digest=bad)
        return cid

    def send_h2c(self, cid, ttag, r2to, r2tl, payload, bad):
        """Answers an R2T: its range of `payload` in H2CData PDUs of at most H2C_CHUNK."""
        off = r2to
        while off < r2to + r2tl:
            n = min(H2C_CHUNK, r2to + r2tl - off)
            last = 0x04 if off + n == r2to + r2tl else 0
            hdr = struct.pack("<BBBBIHHIII", nvmeraw.H2C_DATA, last, 24, 24, 24 + n,
                              cid, ttag, off, n, 0)
            self.io.send(hdr + payload[off:off + n], bad_data_digest=bad)
            off += n

    def finish(self, cid, payload=b"", bad=False):
        """Reads PDUs until `cid`'s response: answers R2Ts from `payload`, gathers C2HData.
        Returns (status, data read)."""
        data = bytearray()
        while True:
            typ, p = self.io.pdu()
            if typ == nvmeraw.R2T:
                cccid, ttag, r2to, r2tl = struct.unpack("<HHII", p[8:20])
                if cccid != cid or r2to + r2tl > len(payload):
                    raise AssertionError("R2T for cid %d [%d+%d], expected cid %d of %d bytes"
                                         % (cccid, r2to, r2tl, cid, len(payload)))
                self.send_h2c(cid, ttag, r2to, r2tl, payload, bad)
            elif typ == nvmeraw.C2H_DATA:
                ccid, _, datao, datal = struct.unpack("<HHII", p[8:20])
                if ccid != cid or datao != len(data):
                    raise AssertionError("C2HData for cid %d at %d, expected cid %d at %d"
                                         % (ccid, datao, cid, len(data)))
                body = p[p[3]:] if p[3] else p[p[2]:]
                data += body[:datal]
                if p[1] & 0x08:  # SUCCESS: no response capsule follows
                    self.dnr = False
                    return OK, bytes(data)
            elif typ == nvmeraw.CAPSULE_RESP:
                _dw0, _dw1, _sqhd, _sqid, rcid, sf = struct.unpack("<IIHHHH", p[8:24])
                if rcid != cid:
                    raise AssertionError("response for cid %d, expected %d" % (rcid, cid))
                self.dnr = bool(sf & 0x8000)
                return (sf >> 1) & 0x7FF, bytes(data)
            else:
                raise AssertionError("unexpected PDU type %d" % typ)

    # -- the model --------------------------------------------------------------------------
    def in_region(self, slba, nlb):
        return slba * self.lba + nlb * self.lba <= REGION

    def store(self, slba, data):
        """The model holds the region; what lands past it (near the end) is not modelled."""
        off = slba * self.lba
        if off < REGION:
            data = data[:REGION - off]
            self.model[off:off + len(data)] = data

    def zero(self, slba, nlb):
        self.store(slba, bytes(nlb * self.lba))

    def range_(self):
        """A random (slba, nlb): mostly inside the region, sometimes past the end."""
        r = self.rng.random()
        if r < 0.06:
            nlb = self.rng.randint(1, 16)
            return self.blocks - nlb + self.rng.randint(1, nlb), nlb  # crosses the end
        if r < 0.08:
            return self.blocks + self.rng.randint(0, 1 << 20), 1  # starts past the end
        max_nlb = (64 * 1024 if self.rng.random() < 0.8 else 512 * 1024) // self.lba
        nlb = self.rng.randint(1, max_nlb)
        slba = self.rng.randint(0, REGION // self.lba - nlb)
        return slba, nlb

    def expect(self, slba, nlb, changes, mdts=True):
        """The status the target must answer, in the order it checks."""
        if slba + nlb > self.blocks:
            return LBA_OUT_OF_RANGE
        if mdts and nlb * self.lba > MDTS:
            return INVALID_FIELD
        if changes and not self.writable:
            return WRITE_PROTECTED
        return OK

    def check(self, what, want, got, dnr=None):
        self.counts[what] = self.counts.get(what, 0) + 1
        self.log.append((what, got, self.detail))
        if want != got:
            self.fail("%s: status 0x%03x, expected 0x%03x" % (what, got, want))
            return False
        # Do Not Retry: on every error but a transport's (a digest error: the host retries).
        dnr = self.dnr if dnr is None else dnr
        if dnr != (got not in (OK, TRANSIENT_TRANSPORT_ERROR)):
            self.fail("%s: status 0x%03x with DNR %s" % (what, got, dnr))
            return False
        return True

    # -- commands ---------------------------------------------------------------------------
    def read(self):
        slba, nlb = self.range_()
        if nlb * self.lba > MDTS and self.rng.random() < 0.7:
            nlb = MDTS // self.lba
        cid = self.send(OP_READ, (slba & 0xFFFFFFFF, slba >> 32, nlb - 1, 0, 0, 0),
                        sgl_len=nlb * self.lba)
        st, data = self.finish(cid)
        self.detail = (slba, nlb)
        want = self.expect(slba, nlb, False)
        if self.check("read", want, st) and st == OK and self.in_region(slba, nlb):
            off = slba * self.lba
            if data != self.model[off:off + nlb * self.lba]:
                bad = [i for i in range(len(data)) if data[i] != self.model[off + i]]
                self.fail("read LBA %d+%d: bytes %d-%d of it differ from the model (op %d)"
                          % (slba, nlb, bad[0], bad[-1], len(self.log)))

    def write(self):
        incapsule = self.rng.random() < 0.5
        slba, nlb = self.range_()
        if incapsule:
            nlb = min(nlb, IN_CAPSULE // self.lba)
        # With digests, some writes carry a wrong data digest: the data must not be stored.
        bad = self.digests and self.rng.random() < 0.1
        payload = os.urandom(nlb * self.lba) if nlb * self.lba <= 4 * MiB else b""
        fua = FUA if self.rng.random() < 0.3 else 0
        cdw = (slba & 0xFFFFFFFF, slba >> 32, (nlb - 1) | fua, 0, 0, 0)
        want = self.expect(slba, nlb, True)
        self.detail = (slba, nlb, fua)
        if incapsule:
            cid = self.send(OP_WRITE, cdw, data=payload, incapsule=True, bad=bad)
            if bad:  # checked before anything else is
                want = TRANSIENT_TRANSPORT_ERROR
        else:
            cid = self.send(OP_WRITE, cdw, sgl_len=nlb * self.lba)
            if bad and want == OK:  # the data follows an R2T, then the command fails
                want = TRANSIENT_TRANSPORT_ERROR
        st, _ = self.finish(cid, payload if want in (OK, TRANSIENT_TRANSPORT_ERROR) and not
                            (incapsule and bad) else b"", bad)
        what = "write" + (" in capsule" if incapsule else " via R2T") + \
            (", wrong data digest" if bad else "")
        if self.check(what, want, st) and st == OK:
            self.store(slba, payload)

    def write_zeroes(self):
        slba, nlb = self.range_()
        if self.rng.random() < 0.2 and nlb * self.lba < REGION:
            nlb = self.rng.randint(1, REGION // self.lba)  # beyond MDTS: no transfer, allowed
            slba = self.rng.randint(0, REGION // self.lba - nlb)
        nlb = min(nlb, 1 << 16)
        flags = (DEAC if self.rng.random() < 0.5 else 0) | (FUA if self.rng.random() < 0.2 else 0)
        cid = self.send(OP_WRITE_ZEROES, (slba & 0xFFFFFFFF, slba >> 32, (nlb - 1) | flags,
                                          0, 0, 0))
        st, _ = self.finish(cid)
        self.detail = (slba, nlb, flags)
        if self.check("write zeroes", self.expect(slba, nlb, True, mdts=False), st) and st == OK:
            self.zero(slba, nlb)

    def dsm(self):
        ranges = [self.range_() for _ in range(self.rng.randint(1, 4))]
        body = b"".join(struct.pack("<IIQ", 0, nlb, slba) for slba, nlb in ranges)
        cid = self.send(OP_DSM, (len(ranges) - 1, 1 << 2, 0, 0, 0, 0), data=body,
                        incapsule=True)
        st, _ = self.finish(cid)
        self.detail = ranges
        want = OK
        if any(slba + nlb > self.blocks for slba, nlb in ranges):
            want = LBA_OUT_OF_RANGE
        elif not self.writable:
            want = WRITE_PROTECTED
        if self.check("dataset management", want, st) and st == OK:
            for slba, nlb in ranges:
                if not self.whole_pieces:
                    self.zero(slba, nlb)
                    continue
                # A volume releases the whole 4 KiB pieces inside a range; the rest keeps its
                # data (deallocation is advisory: "may deallocate"; its DLFEAT promises nothing).
                lo = -(-slba * self.lba // 4096) * 4096
                hi = (slba + nlb) * self.lba // 4096 * 4096
                if hi > lo:
                    self.zero(lo // self.lba, (hi - lo) // self.lba)

    def must_fail(self):
        r = self.rng.random()
        if r < 0.4:
            cid = self.send(self.rng.choice([0x04, 0x0a, 0x0c, 0x19, 0x7e, 0x81]),
                            (0, 0, 0, 0, 0, 0))
            self.check("unknown opcode", INVALID_OPCODE, self.finish(cid)[0])
        elif r < 0.7:
            nsid = self.rng.choice([2, 7, 0xFFFFFFFE])
            cid = self.send(OP_READ, (0, 0, 0, 0, 0, 0), nsid=nsid, sgl_len=self.lba)
            self.check("read of another namespace ID", INVALID_NS, self.finish(cid)[0])
        else:
            nlb = MDTS // self.lba + self.rng.randint(1, 64)
            cid = self.send(OP_READ, (0, 0, nlb - 1, 0, 0, 0), sgl_len=nlb * self.lba)
            self.check("read over MDTS", INVALID_FIELD, self.finish(cid)[0])

    def flush(self):
        # Namespace 1, or every namespace of the controller (FFFFFFFFh).
        nsid = 0xFFFFFFFF if self.rng.random() < 0.3 else 1
        cid = self.send(OP_FLUSH, (0, 0, 0, 0, 0, 0), nsid=nsid)
        self.check("flush" if nsid == 1 else "flush of every namespace", OK, self.finish(cid)[0])

    # -- the deep phase: up to `depth` commands in flight, never two over the same bytes ----
    def deep_command(self):
        """A random command as an entry of the in-flight table (not yet sent): what, want,
        spans (byte ranges of the region it reads or changes), the PDU and what follows."""
        e = {"spans": [], "data": bytearray(), "payload": b"", "bad": False, "pdu": None}
        cid = self.io.next_cid()
        e["cid"] = cid
        r = self.rng.random()

        def capsule(opcode, cdw, data=b"", sgl_len=None, incapsule=False, nsid=1):
            sgl_type = nvmeraw.SGL_INCAPSULE if incapsule else nvmeraw.SGL_TRANSPORT
            return nvmeraw.capsule(nvmeraw.sqe(
                opcode, cid, nsid=nsid, sgl_len=len(data) if sgl_len is None else sgl_len,
                sgl_type=sgl_type, cdw=cdw), data if incapsule else b"")

        def span(slba, nlb):
            lo = slba * self.lba
            if lo < REGION:
                e["spans"].append((lo, min(REGION, lo + nlb * self.lba)))

        if r < 0.35:
            slba, nlb = self.range_()
            e.update(what="read", kind="read", slba=slba, nlb=nlb,
                     want=self.expect(slba, nlb, False),
                     pdu=capsule(OP_READ, (slba & 0xFFFFFFFF, slba >> 32, nlb - 1, 0, 0, 0),
                                 sgl_len=nlb * self.lba))
            span(slba, nlb)
        elif r < 0.7:
            incapsule = self.rng.random() < 0.5
            slba, nlb = self.range_()
            if incapsule:
                nlb = min(nlb, IN_CAPSULE // self.lba)
            bad = self.digests and self.rng.random() < 0.1
            payload = os.urandom(nlb * self.lba)
            fua = FUA if self.rng.random() < 0.3 else 0
            cdw = (slba & 0xFFFFFFFF, slba >> 32, (nlb - 1) | fua, 0, 0, 0)
            want = self.expect(slba, nlb, True)
            if bad and (incapsule or want == OK):
                want = TRANSIENT_TRANSPORT_ERROR
            e.update(what="write" + (" in capsule" if incapsule else " via R2T")
                     + (", wrong data digest" if bad else ""), kind="write", slba=slba,
                     payload=payload, bad=bad and not incapsule, want=want,
                     pdu=capsule(OP_WRITE, cdw, payload, incapsule=incapsule)
                     if incapsule else capsule(OP_WRITE, cdw, sgl_len=nlb * self.lba),
                     pdu_bad=bad and incapsule)
            span(slba, nlb)
        elif r < 0.82:
            slba, nlb = self.range_()
            flags = (DEAC if self.rng.random() < 0.5 else 0) | \
                (FUA if self.rng.random() < 0.2 else 0)
            e.update(what="write zeroes", kind="zero", zeros=[(slba, nlb)],
                     want=self.expect(slba, nlb, True, mdts=False),
                     pdu=capsule(OP_WRITE_ZEROES,
                                 (slba & 0xFFFFFFFF, slba >> 32, (nlb - 1) | flags, 0, 0, 0)))
            span(slba, nlb)
        elif r < 0.92:
            ranges = [self.range_() for _ in range(self.rng.randint(1, 4))]
            body = b"".join(struct.pack("<IIQ", 0, nlb, slba) for slba, nlb in ranges)
            want = OK
            if any(slba + nlb > self.blocks for slba, nlb in ranges):
                want = LBA_OUT_OF_RANGE
            elif not self.writable:
                want = WRITE_PROTECTED
            e.update(what="dataset management", kind="dsm", want=want, ranges=ranges,
                     pdu=capsule(OP_DSM, (len(ranges) - 1, 1 << 2, 0, 0, 0, 0), body,
                                 incapsule=True))
            for slba, nlb in ranges:
                span(slba, nlb)
        elif r < 0.96:
            e.update(what="flush", kind="none", want=OK, pdu=capsule(OP_FLUSH, (0,) * 6))
        else:
            e.update(what="unknown opcode", kind="none", want=INVALID_OPCODE,
                     pdu=capsule(self.rng.choice([0x04, 0x0a, 0x0c, 0x7e]), (0,) * 6))
        return e

    def deep_done(self, e, status):
        if not self.check(e["what"] + " (deep)", e["want"], status) or status != OK:
            return
        if e["kind"] == "read" and e["spans"]:
            lo, hi = e["spans"][0]
            if len(e["data"]) < hi - lo or e["data"][:hi - lo] != self.model[lo:hi]:
                self.fail("deep read LBA %d+%d: data differs from the model"
                          % (e["slba"], e["nlb"]))
        elif e["kind"] == "write":
            self.store(e["slba"], e["payload"])
        elif e["kind"] == "zero":
            for slba, nlb in e["zeros"]:
                self.zero(slba, nlb)
        elif e["kind"] == "dsm":
            for slba, nlb in e["ranges"]:
                lo, hi = slba * self.lba, (slba + nlb) * self.lba
                if self.whole_pieces:
                    lo, hi = -(-lo // 4096) * 4096, hi // 4096 * 4096
                if hi > lo:
                    self.zero(lo // self.lba, (hi - lo) // self.lba)

    def deep_pdu(self, inflight):
        """Takes one PDU from the target and moves its command on."""
        typ, p = self.io.pdu()
        if typ == nvmeraw.R2T:
            cccid, ttag, r2to, r2tl = struct.unpack("<HHII", p[8:20])
            e = inflight.get(cccid)
            if e is None or e["kind"] != "write" or r2to + r2tl > len(e["payload"]):
                raise AssertionError("R2T for cid %d [%d+%d] of no write waiting" %
                                     (cccid, r2to, r2tl))
            self.send_h2c(cccid, ttag, r2to, r2tl, e["payload"], e["bad"])
        elif typ == nvmeraw.C2H_DATA:
            ccid, _, datao, datal = struct.unpack("<HHII", p[8:20])
            e = inflight.get(ccid)
            if e is None or e["kind"] != "read" or datao != len(e["data"]):
                raise AssertionError("C2HData for cid %d at %d unexpected" % (ccid, datao))
            body = p[p[3]:] if p[3] else p[p[2]:]
            e["data"] += body[:datal]
            if p[1] & 0x08:
                self.dnr = False
                self.deep_done(inflight.pop(ccid), OK)
        elif typ == nvmeraw.CAPSULE_RESP:
            rcid, sf = struct.unpack("<HH", p[20:24])
            e = inflight.pop(rcid, None)
            if e is None:
                raise AssertionError("response for cid %d, not in flight" % rcid)
            self.dnr = bool(sf & 0x8000)
            self.deep_done(e, (sf >> 1) & 0x7FF)
        else:
            raise AssertionError("unexpected PDU type %d" % typ)

    def close(self):
        """Closes its queues (each phase opens its own)."""
        for q in (self.io, self.admin):
            if q is not None:
                q.close()

    def run_deep(self, port, ops, depth):
        """`ops` random commands, up to `depth` in flight; a command waits to be sent while
        it would touch bytes one in flight touches (so every answer has one right value)."""
        try:
            self.admin, self.io = nvmeraw.io_queue(port, self.nqn, timeout=30,
                                                   digests=self.digests)
            inflight, sent, nxt = {}, 0, None
            while sent < ops or inflight:
                if nxt is None and sent < ops:
                    nxt = self.deep_command()
                clash = nxt is not None and any(
                    a < d and c < b for a, b in nxt["spans"]
                    for f in inflight.values() for c, d in f["spans"])
                if nxt is not None and not clash and len(inflight) < depth:
                    inflight[nxt["cid"]] = nxt
                    self.deepest = max(self.deepest, len(inflight))
                    self.io.send(nxt["pdu"], bad_data_digest=nxt.get("pdu_bad", False))
                    nxt, sent = None, sent + 1
                else:
                    self.deep_pdu(inflight)
        except Exception as e:  # noqa: BLE001
            self.fail("deep: %s: %s" % (type(e).__name__, e))
        finally:
            self.close()

    def run(self, port, ops):
        try:
            self.admin, self.io = nvmeraw.io_queue(port, self.nqn, timeout=30,
                                                   digests=self.digests)
            steps = [(self.read, 30), (self.write, 30), (self.write_zeroes, 10), (self.dsm, 10),
                     (self.must_fail, 8), (self.flush, 4)]
            fns = [f for f, w in steps for _ in range(w)]
            for _ in range(ops):
                self.rng.choice(fns)()
        except Exception as e:  # noqa: BLE001
            self.fail("%s: %s" % (type(e).__name__, e))
        finally:
            self.close()


def nbd_read(b, export):
    h = nbd.NBD()
    h.connect_uri(b.uri(export))
    try:
        return bytearray(h.pread(REGION, 0))
    finally:
        h.shutdown()


def main(r):
    seed = int(os.environ.get("BALLAST_STORM_SEED", random.randrange(1 << 30)))
    ops = int(os.environ.get("BALLAST_STORM_OPS", "4000"))
    print("seed %d, %d commands per namespace (BALLAST_STORM_SEED=%d to repeat)"
          % (seed, ops, seed))
    b = Ballast(["--pool", "{data}/pool.img", "--cores", "2",
                 "--export", "mem=ram:32M", "--export", "mem512=ram:32M",
                 "--export", "memd=ram:32M"])
    pool = os.path.join(b.data_dir, "pool.img")
    subprocess.run([ballast_bin(), "pool", "create", pool, "--size", "512M"], check=True,
                   capture_output=True)
    shm = "/dev/shm/ballast-storm-%d.img" % os.getpid()
    disk = os.path.join(b.tmp, "disk.img")
    disk512 = os.path.join(b.tmp, "disk512.img")
    rof = os.path.join(b.tmp, "ro.img")
    for path in (shm, disk, disk512):
        with open(path, "wb") as f:
            f.truncate(SIZE)
    with open(rof, "wb") as f:
        f.write(random.Random(seed).randbytes(REGION))
        f.truncate(SIZE)
    try:
        with b:
            port = b.nvmf_port()

            def ctl(*args):
                p = b.ctl(*args)
                if p.returncode != 0:
                    raise AssertionError("ballast %s: %s" % (" ".join(args), p.stderr.strip()))

            def subsystem(nqn_name, export, block_size=4096):
                b.nvmf_export(nqn_name, export, block_size)

            ctl("export", "add", "tmpfs", "--file", shm)
            ctl("export", "add", "disk", "--file", disk)
            ctl("export", "add", "disk512", "--file", disk512)
            subsystem("d512", "disk512", 512)
            ctl("export", "add", "ror", "--ram", "32M", "--read-only")
            ctl("export", "add", "rof", "--file", rof, "--read-only")
            for name in ("tmpfs", "disk", "ror", "rof"):
                subsystem(name, name)
            subsystem("m512", "mem512", 512)
            ctl("volume", "create", "v", "32M")
            ctl("volume", "create", "v512", "32M")
            ctl("volume", "create", "vd", "32M")
            subsystem("v512s", "v512", 512)
            # Something in every writable namespace first, so zeros mean something.
            rng = random.Random(seed ^ 1)
            for export in ("mem", "mem512", "memd", "tmpfs", "disk", "disk512", "v", "v512",
                           "vd"):
                h = nbd.NBD()
                h.connect_uri(b.uri(export))
                h.pwrite(rng.randbytes(REGION), 0)
                h.flush()
                h.shutdown()
            ctl("snapshot", "create", "v", "s")
            ctl("clone", "create", "s", "c")

            volumes = ("v", "s", "c", "v512", "vd")
            digests = ("memd", "vd")
            spec = [("mem", "mem", 4096, True), ("mem512", "m512", 512, True),
                    ("tmpfs", "tmpfs", 4096, True), ("disk", "disk", 4096, True),
                    ("disk512", "d512", 512, True),
                    ("v", "v", 4096, True), ("s", "s", 4096, False), ("c", "c", 4096, True),
                    ("v512", "v512s", 512, True), ("ror", "ror", 4096, False),
                    ("rof", "rof", 4096, False), ("memd", "memd", 4096, True),
                    ("vd", "vd", 4096, True)]
            only = [n for n in os.environ.get("BALLAST_STORM_ONLY", "").split(",") if n]
            storms = {}
            for i, (export, sub, lba, writable) in enumerate(spec):
                if only and export not in only:
                    continue
                s = Storm(export, PREFIX + sub, lba, writable, seed + i, export in volumes,
                          export in digests)
                s.model = nbd_read(b, export)
                storms[export] = s
            snapshot_before = bytes(storms["s"].model) if "s" in storms else b""
            # Digests are computed in Python here: their hosts send a quarter as many commands.
            threads = [threading.Thread(target=s.run, args=(port, ops // 4 if s.digests else ops))
                       for s in storms.values()]
            for t in threads:
                t.start()
            for t in threads:
                t.join(600)
            # Then, on a fresh connection each, up to 16 commands in flight at once.
            threads = [threading.Thread(target=s.run_deep,
                                        args=(port, ops // 8 if s.digests else ops // 2, 16))
                       for s in storms.values()]
            for t in threads:
                t.start()
            for t in threads:
                t.join(600)
            for export, s in storms.items():
                total = sum(s.counts.values())
                r.check("%s (%d-byte LBAs, %s%s): %d commands (then up to %d in flight) "
                        "answered as the model says (%s)"
                        % (export, s.lba, "writable" if s.writable else "read-only",
                           ", header and data digests" if s.digests else "", total, s.deepest,
                           ", ".join("%s %d" % kv for kv in sorted(s.counts.items()))),
                        not s.failures and s.deepest > 1
                        and total >= (ops // 4 + ops // 8 if s.digests else ops + ops // 2),
                        "; ".join(s.failures))
                if os.environ.get("BALLAST_STORM_LOG") and s.failures:
                    for i, e in enumerate(s.log):
                        print("  %s op %d: %s" % (export, i + 1, e))
                back = nbd_read(b, export)
                r.check("%s: NBD reads back what the model holds" % export, back == s.model,
                        "%d bytes read, model %d; first difference at byte %s"
                        % (len(back), len(s.model), next(
                            (i for i in range(min(len(back), len(s.model)))
                             if back[i] != s.model[i]), None)))
            if "s" in storms:
                r.check("the snapshot never changed", bytes(storms["s"].model) == snapshot_before)
            b.check_clean_end(r)
    finally:
        os.unlink(shm)


if __name__ == "__main__":
    guarded(main)
