#!/usr/bin/python3
"""Reads of a RAM export's written ranges leave straight from the export's memory (lent to the
socket send, not copied first) — and that memory outlives the export while replies wait; and
writes whose data came in the command capsule are stored straight from the receive buffer.

NVMe/TCP in-capsule writes (4 and 8 KiB, one across two 64 KiB chunks, one over another) are
stored at once (counted:
`writes_now`) and read back through libnbd.

An NVMe/TCP host with a 4 KiB receive buffer asks for 127 reads of 128 KiB of written data
(16 MiB, more than the kernel's socket buffers hold) and reads nothing; the daemon answers them
all from the export's memory (counted: `reads_lent`), so most of the replies wait in its send
queue. Then the namespace is removed and the export with it: the device is gone, its memory
must not be (RSS stays). The host then reads every reply: each carries the data written
(libnbd wrote it); the daemon lives, and once the replies are sent the export's memory is given
back (RSS falls). A build that unmapped the memory with the device fails here (the sends fault
and the connection drops).
Run with /usr/bin/python3 (Debian's python3-libnbd).
"""
import json
import os
import struct
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import nbd  # noqa: E402
import nvmeraw  # noqa: E402
from ballast_testlib import Ballast, guarded, rss_mib, wait_for  # noqa: E402

MiB = 1 << 20
NQN = "nqn.2026-11.dev.ballast:mem"
READS, READ_BYTES = 127, 128 * 1024


def main(r):
    with Ballast(["--export", "mem=ram:64M", "--cores", "1", "--stall-timeout", "60"]) as b:
        port = b.nvmf_port()
        model = os.urandom(READS * READ_BYTES)
        h = nbd.NBD()
        h.connect_uri(b.uri("mem"))
        for off in range(0, len(model), 4 * MiB):
            h.pwrite(model[off:off + 4 * MiB], off)
        h.shutdown()
        rss_written = rss_mib(b.proc.pid)

        # In-capsule writes: stored from the receive buffer, read back by another client.
        w_admin, w_io = nvmeraw.io_queue(port, NQN)
        now0 = b.counter("writes_now")
        expect = {}
        for i, (slba, nbytes) in enumerate([(15, 8192), (16, 8192), (100, 4096)]):
            blob = bytes([(i * 37 + j) & 0xFF for j in range(nbytes)])
            cid = w_io.next_cid()
            w_io.s.sendall(nvmeraw.capsule(
                nvmeraw.sqe(nvmeraw.OP_WRITE, cid, nsid=1, sgl_len=nbytes,
                            sgl_type=nvmeraw.SGL_INCAPSULE,
                            cdw=(slba, 0, nbytes // 4096 - 1, 0, 0, 0)), blob))
            got_cid, st, _ = w_io.response()
            r.check("in-capsule write of %d bytes at LBA %d succeeds" % (nbytes, slba),
                    got_cid == cid and st == 0, "cid %d status 0x%x" % (got_cid, st))
            expect[slba * 4096] = blob
        w_io.close()
        w_admin.close()
        r.check("in-capsule writes are stored from the receive buffer (writes_now %d -> %d)"
                % (now0, b.counter("writes_now")), b.counter("writes_now") - now0 >= 3)
        h = nbd.NBD()
        h.connect_uri(b.uri("mem"))
        # LBA 15's 8 KiB crosses from chunk 0 into chunk 1; LBA 16's overwrote its second half.
        merged = bytearray(h.pread(24 * 4096, 15 * 4096))
        want = bytearray(model[15 * 4096:39 * 4096])
        for off, blob in expect.items():
            if 15 * 4096 <= off < 39 * 4096:
                want[off - 15 * 4096:off - 15 * 4096 + len(blob)] = blob
        r.check("NBD reads back what the in-capsule writes stored", merged == want)
        r.check("and the one at LBA 100", h.pread(4096, 100 * 4096) == expect[100 * 4096])
        h.shutdown()
        model = bytearray(model)
        for off, blob in expect.items():
            model[off:off + len(blob)] = blob
        model = bytes(model)

        admin, io = nvmeraw.io_queue(port, NQN, rcvbuf=4096)
        lent0 = b.counter("reads_lent")
        cids = []
        for k in range(READS):
            cmd = io.read_cmd(slba=k * READ_BYTES // 4096, nbytes=READ_BYTES)
            cids.append(io.cid)
            io.s.sendall(cmd)
        r.check("all %d reads of written ranges are lent (reads_lent counts them)" % READS,
                wait_for(lambda: b.counter("reads_lent") - lent0 >= READS, 10),
                "reads_lent went %d -> %d" % (lent0, b.counter("reads_lent")))
        lent_before = b.counter("reads_lent") - lent0

        p = b.ctl("rpc", "nvmf_subsystem_remove_ns", json.dumps({"nqn": NQN, "nsid": 1}))
        r.check("namespace removed while its replies wait unread", p.returncode == 0,
                p.stderr.strip() or p.stdout.strip())
        p = b.ctl("export", "remove", "mem")
        r.check("export removed while its replies wait unread", p.returncode == 0,
                p.stderr.strip())
        time.sleep(0.3)
        r.check("the export's memory stays while its replies wait (RSS %.0f MiB, %.0f written)"
                % (rss_mib(b.proc.pid), rss_written), rss_mib(b.proc.pid) > rss_written - 4)

        # Read every reply: C2HData (then a response) for reads answered, or an error.
        data = {}
        status = {}
        io.s.settimeout(20)
        try:
            while len(status) < READS:
                typ, pdu = io.pdu()
                if typ == nvmeraw.C2H_DATA:
                    cid, _ttag, datao, datal = struct.unpack("<HHII", pdu[8:20])
                    hlen, pdo = pdu[2], pdu[3]
                    body = pdu[pdo:pdo + datal] if pdo else pdu[hlen:hlen + datal]
                    buf = data.setdefault(cid, bytearray(READ_BYTES))
                    buf[datao:datao + datal] = body
                elif typ == nvmeraw.CAPSULE_RESP:
                    _dw0, _dw1, _sqhd, _sqid, cid, sf = struct.unpack("<IIHHHH", pdu[8:24])
                    status[cid] = (sf >> 1) & 0x7FF
                else:
                    raise AssertionError("unexpected PDU type %d" % typ)
        except Exception as e:  # noqa: BLE001
            r.bad("every read answered", "%s after %d responses" % (e, len(status)))
        answered = [c for c in cids if status.get(c) == 0]
        intact = [c for c in answered
                  if bytes(data.get(c, b"")) == model[cids.index(c) * READ_BYTES:
                                                      (cids.index(c) + 1) * READ_BYTES]]
        r.check("every read answered: data or an error (%d data, %d errors)"
                % (len(answered), READS - len(answered)), len(status) == READS,
                "%d responses" % len(status))
        r.check("reads answered before the export went carry its data, intact (%d lent)"
                % lent_before, len(answered) == lent_before and intact == answered,
                "%d of %d intact" % (len(intact), len(answered)))
        io.close()
        admin.close()
        r.check("the export's memory is given back once its replies are sent (RSS %.0f -> %.0f MiB)"
                % (rss_written, rss_mib(b.proc.pid)),
                wait_for(lambda: rss_mib(b.proc.pid) < rss_written - 6, 10),
                "RSS %.0f MiB" % rss_mib(b.proc.pid))
        b.check_clean_end(r)


if __name__ == "__main__":
    guarded(main)
