#!/usr/bin/python3
"""Compare and fused Compare and Write over NVMe/TCP (NVM Command Set §3.2.1, Base §3.4.2):
what VMware's hosts use for VMFS locking (ATS) and SPDK's target offers.

On a pool volume and on a RAM export (whose writes are stored straight from the receive
buffer), through a raw host:
- Identify Controller says so: ONCS bit 0 (Compare), FUSES bit 0 (Compare and Write), ACWU;
- a Compare answers success when the media holds the host's data and Compare Failure (media
  error 85h) when not, with its data in the capsule and through R2T/H2CData, and changes
  nothing; out of range: LBA Out of Range;
- a fused Compare and Write writes only when the Compare matched (both succeed); otherwise the
  Compare carries Compare Failure, the Write Command Aborted due to Failed Fused Command, and
  the blocks keep what they held — in the capsule and through R2T, with FUA;
- broken pairs get what SPDK's target answers: a first command followed by another command
  (Missing Fused, then the other command is served), a second command alone (Missing Fused), a
  first that is no Compare (Invalid Opcode), a second naming other blocks (Invalid Field, the
  Compare aborted as Failed Fused), a pair longer than ACWU (Invalid Field);
- atomicity: four controllers (queues spread over two cores) increment one counter block by
  read + Compare and Write, each retrying on Compare Failure, while plain writes stream to
  other blocks of the same device from two more NVMe/TCP queues and an NBD connection
  (libnbd): the counter ends at exactly the number of Compare and Writes that succeeded (a
  lost update would leave it lower; a mutant whose fence is not exclusive fails here), every
  plain write landed, and some of them waited for a fence (`writes_fenced`);
- fairness: one queue keeps 16 matching pairs in flight back to back while another queue's
  200 plain writes to the device keep going, half of them within 2 ms (a mutant that gives
  waiting writers no turn between fences makes them wait 4-5 ms on the volume).
Run with /usr/bin/python3 (Debian's python3-libnbd).
"""
import json
import os
import struct
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import nbd  # noqa: E402
import nvmeraw  # noqa: E402
from ballast_testlib import guarded, pool_daemon  # noqa: E402

OP_COMPARE = 0x05
FUSE_FIRST, FUSE_SECOND = 0x01, 0x02
SUCCESS = 0x000
INVALID_OPCODE, INVALID_FIELD = 0x001, 0x002
ABORTED_FAILED_FUSED, ABORTED_MISSING_FUSED = 0x005, 0x00A
LBA_OUT_OF_RANGE = 0x080
COMPARE_FAILURE = 0x285
LBA = 4096


def io_sqe(opcode, cid, slba, nblocks, fuse=0, sgl_type=nvmeraw.SGL_INCAPSULE, fua=False):
    cdw12 = (nblocks - 1) | (1 << 30 if fua else 0)
    b = bytearray(nvmeraw.sqe(opcode, cid, nsid=1, sgl_len=nblocks * LBA, sgl_type=sgl_type,
                              cdw=(slba & 0xFFFFFFFF, slba >> 32, cdw12, 0, 0, 0)))
    b[1] |= fuse
    return bytes(b)


def send_cmd(io, opcode, slba, data, fuse=0, fua=False):
    """Sends a command carrying `data` (in the capsule up to 8 KiB, else through R2T): its cid."""
    cid = io.next_cid()
    incapsule = len(data) <= 8192
    io.send(nvmeraw.capsule(io_sqe(opcode, cid, slba, len(data) // LBA, fuse,
                                   nvmeraw.SGL_INCAPSULE if incapsule else nvmeraw.SGL_TRANSPORT,
                                   fua),
                            data if incapsule else b""))
    if not incapsule:
        io.pending_data[cid] = data
    return cid


def answers(io, cids):
    """Gathers the responses of `cids`, answering R2Ts with H2CData: {cid: status}."""
    got = {}
    while not all(c in got for c in cids):
        typ, p = io.pdu()
        if typ == nvmeraw.R2T:
            cccid, ttag, r2to, r2tl = struct.unpack_from("<HHII", p, 8)
            data = io.pending_data[cccid][r2to:r2to + r2tl]
            h = struct.pack("<HHII", cccid, ttag, r2to, len(data)) + bytes(4)
            io.send(struct.pack("<BBBBI", nvmeraw.H2C_DATA, 0x04, 24, 24, 24 + len(data))
                    + h + data)
        elif typ == nvmeraw.CAPSULE_RESP:
            _dw0, _dw1, _sqhd, _sqid, cid, sf = struct.unpack("<IIHHHH", p[8:24])
            got[cid] = (sf >> 1) & 0x7FF
            io.pending_data.pop(cid, None)
        else:
            raise AssertionError("unexpected PDU type %d" % typ)
    return [got[c] for c in cids]


def compare(io, slba, data):
    return answers(io, [send_cmd(io, OP_COMPARE, slba, data)])[0]


def write(io, slba, data):
    return answers(io, [send_cmd(io, nvmeraw.OP_WRITE, slba, data)])[0]


def caw(io, slba, expected, new, fua=False):
    """A fused Compare and Write: (Compare's status, Write's status)."""
    a = send_cmd(io, OP_COMPARE, slba, expected, FUSE_FIRST)
    b = send_cmd(io, nvmeraw.OP_WRITE, slba, new, FUSE_SECOND, fua)
    return tuple(answers(io, [a, b]))


def read(io, slba, nbytes):
    st, data = io.read_command(nvmeraw.sqe(nvmeraw.OP_READ, io.next_cid(), nsid=1,
                                           sgl_len=nbytes,
                                           cdw=(slba, 0, nbytes // LBA - 1, 0, 0, 0)))
    if st != 0:
        raise AssertionError("read of LBA %d failed: 0x%x" % (slba, st))
    return data


def queue(port, nqn):
    admin, io = nvmeraw.io_queue(port, nqn)
    io.pending_data = {}
    return admin, io


def identify_checks(r, admin, name):
    idc = admin.identify_controller()
    oncs, fuses = struct.unpack_from("<HH", idc, 520)
    acwu = struct.unpack_from("<H", idc, 534)[0]
    r.check("%s: Identify Controller ONCS bit 0 (Compare)" % name, oncs & 1, "ONCS 0x%x" % oncs)
    r.check("%s: Identify Controller FUSES bit 0 (Compare and Write)" % name, fuses & 1,
            "FUSES 0x%x" % fuses)
    r.check_eq("%s: ACWU (0's based)" % name, 127, acwu)


def single_checks(r, io, name, blocks):
    a, b = os.urandom(8192), os.urandom(8192)
    r.check_eq("%s: write A to LBAs 0-1" % name, SUCCESS, write(io, 0, a))
    r.check_eq("%s: Compare A (in the capsule) succeeds" % name, SUCCESS, compare(io, 0, a))
    r.check_eq("%s: Compare B fails with Compare Failure" % name, COMPARE_FAILURE,
               compare(io, 0, b))
    r.check_eq("%s: a Compare of one differing byte fails" % name, COMPARE_FAILURE,
               compare(io, 0, a[:8191] + bytes([a[8191] ^ 1])))
    big = os.urandom(64 * 1024)
    r.check_eq("%s: write 64 KiB at LBA 16 (R2T)" % name, SUCCESS, write(io, 16, big))
    r.check_eq("%s: Compare of 64 KiB through R2T succeeds" % name, SUCCESS,
               compare(io, 16, big))
    r.check_eq("%s: ... and fails on other data" % name, COMPARE_FAILURE,
               compare(io, 16, big[:-1] + bytes([big[-1] ^ 1])))
    r.check_eq("%s: a Compare past the end: LBA Out of Range" % name, LBA_OUT_OF_RANGE,
               compare(io, blocks - 1, a))
    r.check("%s: Compares changed nothing" % name, read(io, 0, 8192) == a)

    # Fused Compare and Write.
    r.check_eq("%s: C&W expecting A writes B: both succeed" % name, (SUCCESS, SUCCESS),
               caw(io, 0, a, b))
    r.check("%s: ... LBAs 0-1 hold B" % name, read(io, 0, 8192) == b)
    r.check_eq("%s: C&W expecting A (B there): Compare Failure, Write aborted" % name,
               (COMPARE_FAILURE, ABORTED_FAILED_FUSED), caw(io, 0, a, a))
    r.check("%s: ... LBAs 0-1 still hold B" % name, read(io, 0, 8192) == b)
    big2 = os.urandom(64 * 1024)
    r.check_eq("%s: C&W of 64 KiB through R2T, with FUA" % name, (SUCCESS, SUCCESS),
               caw(io, 16, big, big2, fua=True))
    r.check("%s: ... the 64 KiB hold the new data" % name, read(io, 16, 64 * 1024) == big2)
    r.check_eq("%s: C&W of 64 KiB expecting the old data fails" % name,
               (COMPARE_FAILURE, ABORTED_FAILED_FUSED), caw(io, 16, big, big))
    r.check("%s: ... and wrote nothing" % name, read(io, 16, 64 * 1024) == big2)

    # Broken pairs.
    first = send_cmd(io, OP_COMPARE, 0, b, FUSE_FIRST)
    rd = io.next_cid()
    io.send(nvmeraw.capsule(nvmeraw.sqe(nvmeraw.OP_READ, rd, nsid=1, sgl_len=LBA,
                                        cdw=(0, 0, 0, 0, 0, 0))))
    got = {}
    while len(got) < 2:
        typ, p = io.pdu()
        if typ == nvmeraw.CAPSULE_RESP:
            cid, sf = struct.unpack_from("<HH", p, 20)
            got[cid] = (sf >> 1) & 0x7FF
        elif typ == nvmeraw.C2H_DATA and p[1] & 0x08:
            got[rd] = SUCCESS
    r.check_eq("%s: a first command followed by a read: Missing Fused" % name,
               ABORTED_MISSING_FUSED, got[first])
    r.check_eq("%s: ... and the read is served" % name, SUCCESS, got[rd])
    first = send_cmd(io, OP_COMPARE, 0, b, FUSE_FIRST)
    pget = io.next_cid()
    io.send(nvmeraw.capsule(nvmeraw.sqe(nvmeraw.FABRICS, pget, cdw=(0, 0x1C, 0, 0, 0, 0),
                                        fctype=0x04)))
    got = answers(io, [first, pget])
    r.check_eq("%s: a first command followed by a Fabrics command: Missing Fused" % name,
               ABORTED_MISSING_FUSED, got[0])
    first = send_cmd(io, OP_COMPARE, 0, b, FUSE_FIRST)
    second = io.next_cid()
    io.send(nvmeraw.capsule(io_sqe(nvmeraw.OP_WRITE, second, 0, 2, FUSE_SECOND), a + b"x"))
    got = answers(io, [first, second])
    r.check_eq("%s: a second command with too much in-capsule data: Failed Fused, refused" % name,
               ABORTED_FAILED_FUSED, got[0])
    r.check_eq("%s: a second command alone: Missing Fused" % name, ABORTED_MISSING_FUSED,
               answers(io, [send_cmd(io, nvmeraw.OP_WRITE, 0, a, FUSE_SECOND)])[0])
    r.check_eq("%s: a first command that is a Write: Invalid Opcode" % name, INVALID_OPCODE,
               answers(io, [send_cmd(io, nvmeraw.OP_WRITE, 0, a, FUSE_FIRST)])[0])
    x = send_cmd(io, OP_COMPARE, 0, b, FUSE_FIRST)
    y = send_cmd(io, nvmeraw.OP_WRITE, 4, a, FUSE_SECOND)
    r.check_eq("%s: a second command naming other blocks: Failed Fused, Invalid Field" % name,
               [ABORTED_FAILED_FUSED, INVALID_FIELD], answers(io, [x, y]))
    long_pair = os.urandom(129 * LBA)
    r.check_eq("%s: a pair longer than ACWU: Invalid Field" % name, INVALID_FIELD,
               answers(io, [send_cmd(io, OP_COMPARE, 0, long_pair, FUSE_FIRST)])[0])
    r.check("%s: broken pairs wrote nothing" % name,
            read(io, 0, 8192) == b and read(io, 4, 8192) != a)
    r.check_eq("%s: the queue still serves C&W" % name, (SUCCESS, SUCCESS), caw(io, 0, b, a))


def counter_race(r, b, nqn, name, export, incrementers=4, each=150):
    """Incrementers race on LBA 100 through C&W; plain writers stream to LBAs 200+."""
    port = b.nvmf_port()
    setup_admin, setup = queue(port, nqn)
    zero = struct.pack("<Q", 0).ljust(LBA, b"\0")
    r.check_eq("%s: counter block zeroed" % name, SUCCESS, write(setup, 100, zero))
    results, errors = [], []
    lock = threading.Lock()

    def incrementer(i):
        try:
            admin, io = queue(port, nqn)
            won = tries = 0
            while won < each:
                cur = read(io, 100, LBA)
                v = struct.unpack_from("<Q", cur)[0]
                new = struct.pack("<QI", v + 1, i).ljust(LBA, b"\0")
                cst, wst = caw(io, 100, cur, new)
                tries += 1
                if (cst, wst) == (SUCCESS, SUCCESS):
                    won += 1
                elif (cst, wst) != (COMPARE_FAILURE, ABORTED_FAILED_FUSED):
                    raise AssertionError("C&W answered 0x%x/0x%x" % (cst, wst))
            with lock:
                results.append((won, tries))
            io.close()
            admin.close()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append("incrementer %d: %r" % (i, e))

    racing = threading.Event()
    racing.set()

    def stream(i, put, get):
        """Writes slot k % 300 of its own 300 blocks with (i, k) while the incrementers run,
        then checks every slot holds the last write it took."""
        last = {}
        k = 0
        while racing.is_set() or k < 300:
            lba = 200 + i * 400 + k % 300
            put(lba, struct.pack("<II", i, k).ljust(LBA, b"\x77"))
            last[lba] = k
            k += 1
        for lba, k in last.items():
            if get(lba) != struct.pack("<II", i, k):
                raise AssertionError("plain write %d at LBA %d did not land" % (k, lba))

    def writer(i):
        try:
            admin, io = queue(port, nqn)

            def put(lba, data):
                if write(io, lba, data) != SUCCESS:
                    raise AssertionError("plain write at LBA %d failed" % lba)
            stream(i, put, lambda lba: read(io, lba, LBA)[:8])
            io.close()
            admin.close()
        except Exception as e:  # noqa: BLE001
            errors.append("writer %d: %r" % (i, e))

    def nbd_writer():
        try:
            h = nbd.NBD()
            h.connect_uri(b.uri(export))
            stream(2, lambda lba, data: h.pwrite(data, lba * LBA),
                   lambda lba: h.pread(8, lba * LBA))
            h.shutdown()
        except Exception as e:  # noqa: BLE001
            errors.append("NBD writer: %r" % e)

    fenced0 = b.counter("writes_fenced")
    threads = [threading.Thread(target=incrementer, args=(i,)) for i in range(incrementers)]
    threads += [threading.Thread(target=writer, args=(i,)) for i in range(2)]
    threads.append(threading.Thread(target=nbd_writer))
    for t in threads:
        t.start()
    for t in threads[:incrementers]:
        t.join(300)
    racing.clear()
    for t in threads[incrementers:]:
        t.join(300)
    r.check("%s: every racer finished without error" % name, not errors and
            len(results) == incrementers, "; ".join(errors[:3]))
    final = struct.unpack_from("<Q", read(setup, 100, LBA))[0]
    won = sum(w for w, _ in results)
    tries = sum(t for _, t in results)
    r.check_eq("%s: the counter equals the C&Ws that succeeded (%d tries)" % (name, tries),
               won, final)
    r.check("%s: the race had contention (some Compare Failures)" % name, tries > won,
            "%d tries for %d increments" % (tries, won))
    fenced = b.counter("writes_fenced") - fenced0
    r.check("%s: plain writes waited for fences (writes_fenced +%d)" % (name, fenced),
            fenced > 0)
    setup.close()
    setup_admin.close()


def flood_fairness(r, b, nqn, name):
    """One queue keeps 16 fused pairs in flight back to back (each matching: the block holds
    what every pair compares and writes), while another queue's plain writes to other blocks
    must keep going: a writer that waited gets its turn before the next fence."""
    port = b.nvmf_port()
    fadmin, fio_ = queue(port, nqn)
    wadmin, wio = queue(port, nqn)
    same = b"\x42" * LBA
    r.check_eq("%s: flood block written" % name, SUCCESS, write(fio_, 50, same))
    stop = threading.Event()
    pairs, errors = [0], []

    def flood():
        try:
            inflight = []
            while not stop.is_set() or inflight:
                while not stop.is_set() and len(inflight) < 16:
                    a = send_cmd(fio_, OP_COMPARE, 50, same, FUSE_FIRST)
                    inflight.append((a, send_cmd(fio_, nvmeraw.OP_WRITE, 50, same, FUSE_SECOND)))
                a, w = inflight.pop(0)
                if answers(fio_, [a, w]) != [SUCCESS, SUCCESS]:
                    raise AssertionError("a matching pair failed")
                pairs[0] += 1
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    t = threading.Thread(target=flood)
    t.start()
    time.sleep(0.3)
    took, t0 = [], time.monotonic()
    while len(took) < 200 and time.monotonic() - t0 < 20:
        w0 = time.monotonic()
        if write(wio, 3000 + len(took) % 64, os.urandom(LBA)) != SUCCESS:
            errors.append("plain write failed")
            break
        took.append(time.monotonic() - w0)
    flood_pairs = pairs[0]
    stop.set()
    t.join(60)
    took.sort()
    p50, p90 = (took[len(took) // 2], took[len(took) * 9 // 10]) if took else (9.0, 9.0)
    r.check("%s: 200 plain writes went while pairs flooded the device (%d pairs; write "
            "p50 %.2f ms, p90 %.2f ms, slowest %.1f ms)"
            % (name, flood_pairs, p50 * 1000, p90 * 1000, took[-1] * 1000 if took else 0),
            # Half the writes wait at most a fence and a writers' turn (about 0.3 ms on a
            # volume here; 4-5 ms with a mutant that gives waiting writers no turn).
            len(took) == 200 and not errors and flood_pairs > 0 and p50 < 0.002,
            "; ".join(errors[:2]))
    for h in (fio_, fadmin, wio, wadmin):
        h.close()


def main(r):
    b, _ = pool_daemon("256M")
    with b:
        r.check("volume v created", b.ctl("volume", "create", "v", "64M").returncode == 0)
        r.check("RAM export r added",
                b.ctl("export", "add", "r", "--ram", "64M").returncode == 0)
        for name in ("v", "r"):
            nqn = b.nvmf_export("cw-" + name, name, block_size=LBA)
            rc, out = b.rpc("bdev_get_bdevs", {"name": name})
            bdev = json.loads(out)[0] if rc == 0 else {"supported_io_types": {}}
            io_types = bdev["supported_io_types"]
            r.check_eq("%s: bdev_get_bdevs lists compare and compare_and_write" % name,
                       (True, True), (io_types.get("compare"), io_types.get("compare_and_write")))
            admin, io = queue(b.nvmf_port(), nqn)
            try:
                identify_checks(r, admin, name)
                single_checks(r, io, name, (64 << 20) // LBA)
            finally:
                io.close()
                admin.close()
            counter_race(r, b, nqn, name, name)
            flood_fairness(r, b, nqn, name)
        b.check_clean_end(r)


if __name__ == "__main__":
    guarded(main)
