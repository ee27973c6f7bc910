#!/usr/bin/python3
"""Random NBD commands through libnbd against every kind of export, checked against a model.

One libnbd client per export and reply style (structured and simple), and for a RAM export and a
volume a third over TLS (PSK), all at once (two cores):
RAM exports, files on tmpfs (copied on the core) and on disk (O_DIRECT through the ring), a
volume, its snapshot and a clone, and read-only RAM and file exports. Each client sends seeded
random commands over the first 2 MiB of its export: reads (also with DF), writes, TRIM, WRITE_ZEROES
(with NO_HOLE, FAST_ZERO, FUA), FLUSH, CACHE, BLOCK_STATUS — lengths from 0 up, offsets unaligned,
ranges that cross or start past the end, and on read-only exports everything that writes.
libnbd's strict checks are off, so every request reaches the server as sent.

What must hold (NBD's proto.md and docs/INTERFACE.md):
- every command answers what the model says: success, or the error the server documents
  (EINVAL for reads, trims, caches and block status past the end, ENOSPC for writes and
  zeroing past the end, EPERM for changes to a read-only export, ENOTSUP for a FAST_ZERO that
  would not be fast: NO_HOLE on a volume, which writes its zeros);
- reads return the model (writes as written, zeroed ranges as zeros, trimmed ranges as zeros on
  RAM and files, on volumes the whole 4 KiB pieces inside them);
- block status: every extent marked ZERO reads zeros in the model, the extents are in order,
  cover at least one byte and at most the range asked;
- libnbd never sees a reply it calls a protocol error (it would drop the connection);
- then one client per export (over TLS where there is one) keeps up to 16 commands in flight
  through libnbd's aio calls, never two over the same bytes, all checked the same way;
- at the end a fresh connection reads every export's 2 MiB as the model (the snapshot's, and
  the read-only exports', as they were: nothing may change them); NO_HOLE provisions a volume's
  range; a block-status reply over 16,384 extents stops at 4,096; the daemon lives, exits 0
  and never panicked.
Run with /usr/bin/python3 (Debian's python3-libnbd). BALLAST_STORM_SEED, BALLAST_STORM_OPS.
"""
import errno
import os
import random
import subprocess
import sys
import threading

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import nbd  # noqa: E402
from ballast_testlib import Ballast, ballast_bin, guarded  # noqa: E402

MiB = 1 << 20
REGION = 2 * MiB
SIZE = 32 * MiB
PIECE = 4096
STATE_HOLE, STATE_ZERO = 1, 2


class Storm:
    """One export's client (structured or simple replies), its model and its commands."""

    def __init__(self, b, export, structured, writable, whole_pieces, model, seed, tls=None):
        self.export, self.structured = export, structured
        self.writable, self.whole_pieces = writable, whole_pieces
        self.model = model  # shared by the export's two clients: they take turns (a lock)
        self.rng = random.Random(seed)
        self.failures = []
        self.counts = {}
        self.deepest = 0
        self.h = nbd.NBD()
        self.h.set_strict_mode(0)
        self.h.set_request_structured_replies(structured)
        if structured:
            self.h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        if tls:  # the PSK file: NBD over TLS (userspace TLS where the kernel has no kTLS)
            self.h.set_uri_allow_local_file(True)
            self.h.connect_uri("nbds://alice@127.0.0.1:%d/%s?tls-psk-file=%s"
                               % (b.port, export, tls))
        else:
            self.h.connect_uri(b.uri(export))
        self.label = "%s (%s%s)" % (export, "structured" if structured else "simple",
                                    ", TLS" if tls else "")

    def fail(self, what):
        if len(self.failures) < 12:
            self.failures.append(what)

    def range_(self, max_len=256 * 1024):
        r = self.rng.random()
        if r < 0.05:
            n = self.rng.randint(1, 64 * 1024)
            return SIZE - n + self.rng.randint(1, n), n  # crosses the end
        if r < 0.07:
            return SIZE + self.rng.randint(0, MiB), self.rng.randint(0, 4096)  # past the end
        if r < 0.10:
            return self.rng.randint(0, REGION), 0  # empty
        n = self.rng.randint(1, max_len) if self.rng.random() < 0.5 else \
            self.rng.randint(1, max_len // PIECE) * PIECE
        if self.rng.random() < 0.5:
            off = self.rng.randint(0, REGION - n)
        else:
            off = self.rng.randint(0, (REGION - n) // PIECE) * PIECE
        return off, n

    def store(self, off, data):
        if off < REGION:
            data = data[:REGION - off]
            self.model[off:off + len(data)] = data

    def call(self, what, fn, want):
        """Runs `fn`; checks it failed with errno `want` (0: succeeded). Returns the result, or
        None when it failed."""
        self.counts[what] = self.counts.get(what, 0) + 1
        try:
            res = fn()
            got = 0
        except nbd.Error as e:
            res, got = None, e.errnum or -1
            if not self.h.aio_is_ready() and not self.h.aio_is_processing():
                raise AssertionError("%s: the connection died: %s" % (what, e)) from e
        if got != want:
            self.fail("%s: %s, expected %s" % (what, errno.errorcode.get(got, got) if got
                                                else "success",
                                                errno.errorcode.get(want, "success")))
            return None
        return res

    def in_range(self, off, n):
        return off + n <= SIZE

    def read(self):
        off, n = self.range_()
        df = self.rng.random() < 0.2 and self.structured
        n = min(n, 64 * 1024) if df else n
        want = 0 if self.in_range(off, n) else errno.EINVAL
        data = self.call("read" + (" DF" if df else ""),
                         lambda: self.h.pread(n, off, nbd.CMD_FLAG_DF if df else 0), want)
        if data is not None and off + n <= REGION and data != self.model[off:off + n]:
            bad = [i for i in range(n) if data[i] != self.model[off + i]]
            self.fail("read %d+%d: bytes %d-%d differ from the model" % (off, n, bad[0], bad[-1]))

    def write(self):
        off, n = self.range_()
        data = os.urandom(n)
        fua = nbd.CMD_FLAG_FUA if self.rng.random() < 0.2 else 0
        want = errno.EPERM if not self.writable else \
            (errno.ENOSPC if not self.in_range(off, n) else 0)
        before = len(self.failures)
        self.call("write", lambda: self.h.pwrite(data, off, fua), want)
        if want == 0 and len(self.failures) == before:
            self.store(off, data)

    def trim(self):
        off, n = self.range_(REGION)
        fua = nbd.CMD_FLAG_FUA if self.rng.random() < 0.2 else 0
        want = errno.EPERM if not self.writable else \
            (errno.EINVAL if not self.in_range(off, n) else 0)
        before = len(self.failures)
        self.call("trim", lambda: self.h.trim(n, off, fua), want)
        if want == 0 and len(self.failures) == before:
            if self.whole_pieces:
                lo, hi = -(-off // PIECE) * PIECE, (off + n) // PIECE * PIECE
                if hi > lo:
                    self.store(lo, bytes(hi - lo))
            else:
                self.store(off, bytes(n))

    def zero(self):
        off, n = self.range_(REGION)
        flags = 0
        if self.rng.random() < 0.3:
            flags |= nbd.CMD_FLAG_NO_HOLE
        if self.rng.random() < 0.2:
            flags |= nbd.CMD_FLAG_FUA
        if self.rng.random() < 0.2:
            flags |= nbd.CMD_FLAG_FAST_ZERO
        want = errno.EPERM if not self.writable else \
            (errno.ENOSPC if not self.in_range(off, n) else 0)
        slow = flags & nbd.CMD_FLAG_NO_HOLE and self.whole_pieces  # a volume writes zeros
        if want == 0 and n > 0 and slow and flags & nbd.CMD_FLAG_FAST_ZERO:
            want = errno.ENOTSUP
        before = len(self.failures)
        self.call("write zeroes", lambda: self.h.zero(n, off, flags), want)
        if want == 0 and len(self.failures) == before:
            self.store(off, bytes(n))

    def flush(self):
        self.call("flush", self.h.flush, 0)

    def cache(self):
        off, n = self.range_()
        self.call("cache", lambda: self.h.cache(n, off), 0 if self.in_range(off, n)
                  else errno.EINVAL)

    def block_status(self):
        if not self.structured:
            return
        off, n = self.range_()
        seen = []

        def cb(meta, offset, entries, err):
            if meta == nbd.CONTEXT_BASE_ALLOCATION:
                seen.append((offset, list(entries)))
            return 0
        want = 0 if n > 0 and self.in_range(off, n) else errno.EINVAL
        flags = nbd.CMD_FLAG_REQ_ONE if self.rng.random() < 0.2 else 0
        before = len(self.failures)
        self.call("block status", lambda: self.h.block_status(n, off, cb, flags), want)
        if want != 0 or len(self.failures) != before:
            return
        if len(seen) != 1:
            self.fail("block status %d+%d: %d base:allocation chunks" % (off, n, len(seen)))
            return
        pos, total = off, 0
        entries = seen[0][1]
        for i in range(0, len(entries), 2):
            length, state = entries[i], entries[i + 1]
            if length == 0:
                self.fail("block status %d+%d: an empty extent" % (off, n))
            if state & STATE_ZERO and pos < REGION:
                end = min(pos + length, REGION, off + n)
                if any(self.model[pos:end]):
                    self.fail("block status %d+%d: extent %d+%d says zero, the model is not"
                              % (off, n, pos, length))
            pos += length
            total += length
        if total == 0 or total > n:
            self.fail("block status %d+%d: extents cover %d bytes" % (off, n, total))
        if flags and len(entries) != 2:
            self.fail("block status %d+%d, REQ_ONE: %d extents" % (off, n, len(entries) // 2))

    # -- the deep phase: up to `depth` commands in flight (libnbd's aio), never two over the
    # same bytes, so each answer still has one right value ---------------------------------
    def deep_command(self):
        """(what, want, spans, issue: fn -> cookie, done: fn applied on success)."""
        r = self.rng.random()
        off, n = self.range_()
        inside = off + n <= REGION
        spans = [(off, min(off + n, REGION))] if off < REGION and n else []
        if r < 0.4:
            want = 0 if self.in_range(off, n) else errno.EINVAL
            buf = nbd.Buffer(n)

            def check_read():
                got = buf.to_bytearray()
                if inside and got != self.model[off:off + n]:
                    self.fail("deep read %d+%d: data differs from the model" % (off, n))
            return ("read", want, spans, lambda: self.h.aio_pread(buf, off), check_read)
        if r < 0.75:
            data = os.urandom(n)
            fua = nbd.CMD_FLAG_FUA if self.rng.random() < 0.2 else 0
            want = errno.EPERM if not self.writable else \
                (errno.ENOSPC if not self.in_range(off, n) else 0)
            return ("write", want, spans,
                    lambda: self.h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), off,
                                              flags=fua),
                    lambda: self.store(off, data))
        if r < 0.85:
            want = errno.EPERM if not self.writable else \
                (errno.ENOSPC if not self.in_range(off, n) else 0)
            no_hole = nbd.CMD_FLAG_NO_HOLE if self.rng.random() < 0.3 else 0
            return ("write zeroes", want, spans,
                    lambda: self.h.aio_zero(n, off, flags=no_hole),
                    lambda: self.store(off, bytes(n)))
        if r < 0.95:
            want = errno.EPERM if not self.writable else \
                (errno.EINVAL if not self.in_range(off, n) else 0)

            def trimmed():
                lo, hi = off, off + n
                if self.whole_pieces:
                    lo, hi = -(-lo // PIECE) * PIECE, hi // PIECE * PIECE
                if hi > lo:
                    self.store(lo, bytes(hi - lo))
            return ("trim", want, spans, lambda: self.h.aio_trim(n, off), trimmed)
        return ("flush", 0, [], self.h.aio_flush, lambda: None)

    def run_deep(self, ops, depth, lock):
        """`ops` random commands through libnbd's aio, up to `depth` in flight; a command
        waits while it would touch bytes one in flight touches."""
        inflight, sent, nxt = {}, 0, None
        try:
            while sent < ops or inflight:
                with lock:
                    if nxt is None and sent < ops:
                        nxt = self.deep_command()
                    clash = nxt is not None and any(
                        a < d and c < b for a, b in nxt[2]
                        for f in inflight.values() for c, d in f[2])
                    if nxt is not None and not clash and len(inflight) < depth:
                        inflight[nxt[3]()] = nxt
                        self.deepest = max(self.deepest, len(inflight))
                        nxt, sent = None, sent + 1
                        continue
                self.h.poll(-1)
                with lock:
                    for cookie in list(inflight):
                        what, want, _, _, done = inflight[cookie]
                        try:
                            if not self.h.aio_command_completed(cookie):
                                continue
                            got = 0
                        except nbd.Error as e:
                            got = e.errnum or -1
                        del inflight[cookie]
                        self.counts[what + " (deep)"] = self.counts.get(what + " (deep)", 0) + 1
                        if got != want:
                            self.fail("deep %s: %s, expected %s" % (
                                what, errno.errorcode.get(got, got) if got else "success",
                                errno.errorcode.get(want, "success")))
                        elif want == 0:
                            done()
        except Exception as e:  # noqa: BLE001
            self.fail("deep: %s: %s" % (type(e).__name__, e))

    def run(self, ops, lock):
        steps = [(self.read, 30), (self.write, 25), (self.trim, 10), (self.zero, 12),
                 (self.flush, 4), (self.cache, 3)]
        if self.structured:  # block status needs structured replies
            steps.append((self.block_status, 8))
        fns = [f for f, w in steps for _ in range(w)]
        try:
            for _ in range(ops):
                fn = self.rng.choice(fns)
                with lock:
                    fn()
        except Exception as e:  # noqa: BLE001
            self.fail("%s: %s" % (type(e).__name__, e))

    def close(self):
        try:
            self.h.shutdown()
        except nbd.Error:
            pass


def provisioning(r, b, ctl):
    """NO_HOLE on a thin volume provisions its range (no hole after it, whether it held data or
    was never written); without it, whole pieces are released."""
    ctl("volume", "create", "z", "16M")
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(b.uri("z"))
    try:
        h.pwrite(b"\x55" * (4 * MiB), 0)
        zeroed = [(1000, MiB, nbd.CMD_FLAG_NO_HOLE),  # written before; unaligned, many steps
                  (2 * MiB + 4096, MiB, 0),  # written before, may be released
                  (6 * MiB + 1000, MiB, nbd.CMD_FLAG_NO_HOLE)]  # never written
        for off, n, flags in zeroed:
            h.zero(n, off, flags)
        seen = []
        h.block_status(8 * MiB, 0, lambda meta, off, ents, err: seen.extend(
            zip(ents[::2], ents[1::2])) or 0)
        holes, pos = [], 0
        for length, state in seen:
            if state & STATE_HOLE:
                holes.append((pos, pos + length))
            pos += length
        for off, n, flags in zeroed:
            overlap = [hl for hl in holes if hl[0] < off + n and hl[1] > off]
            if flags:
                r.check("NO_HOLE zeroing of %d+%d on a volume leaves it allocated (holes %s)"
                        % (off, n, overlap), not overlap)
            else:
                r.check("zeroing %d+%d without NO_HOLE releases its pieces" % (off, n),
                        any(a <= off and z >= off + n for a, z in overlap), str(overlap))
        model = bytearray(b"\x55" * (4 * MiB) + bytes(4 * MiB))
        for off, n, _ in zeroed:
            model[off:off + n] = bytes(n)
        r.check("and each reads zeros where it zeroed, the data elsewhere",
                h.pread(8 * MiB, 0) == model)
    finally:
        h.shutdown()


def block_status_bound(r, b, ctl):
    """A 64 MiB range of 16,384 extents (every other 4 KiB piece written): one block-status
    reply describes at most 4,096 of them, in order, exactly; asking again from where it ended
    walks the rest."""
    ctl("volume", "create", "frag", "64M")
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(b.uri("frag"))
    try:
        for i in range(0, 64 * MiB // PIECE, 2):
            h.aio_pwrite(b"\x33" * PIECE, i * PIECE)
            if h.aio_in_flight() >= 64:
                h.poll(-1)
        while h.aio_in_flight() > 0:
            h.poll(-1)
        extents = []

        def cb(meta, off, ents, err):
            extents.append(list(zip(ents[::2], ents[1::2])))
            return 0
        h.block_status(64 * MiB, 0, cb)
        first = extents[0]
        r.check("block status over 16,384 extents answers at most 4,096 (%d)" % len(first),
                0 < len(first) <= 4096)
        r.check("each describes one 4 KiB piece, written and unwritten (zero) in turn",
                all(n == PIECE and bool(st & STATE_ZERO) == (i % 2 == 1)
                    for i, (n, st) in enumerate(first)), str(first[:4]))
        pos, rounds = 0, 0
        while pos < 64 * MiB and rounds < 16:
            extents.clear()
            h.block_status(64 * MiB - pos, pos, cb)
            pos += sum(n for n, _ in extents[0])
            rounds += 1
        r.check("asking again from each reply's end covers the range (%d replies)" % rounds,
                pos == 64 * MiB and rounds >= 4)
    finally:
        h.shutdown()


def read_region(b, export):
    h = nbd.NBD()
    h.connect_uri(b.uri(export))
    try:
        return bytearray(h.pread(REGION, 0))
    finally:
        h.shutdown()


def main(r):
    seed = int(os.environ.get("BALLAST_STORM_SEED", random.randrange(1 << 30)))
    ops = int(os.environ.get("BALLAST_STORM_OPS", "2500"))
    print("seed %d, %d commands per client (BALLAST_STORM_SEED=%d to repeat)" % (seed, ops, seed))
    b = Ballast(["--pool", "{data}/pool.img", "--cores", "2", "--export", "mem=ram:32M",
                 "--nbd-tls", "on", "--nbd-tls-psk", "{data}/keys.psk"])
    psk = os.path.join(b.data_dir, "keys.psk")
    with open(psk, "w") as f:
        f.write("alice:%s\n" % os.urandom(32).hex())
    os.chmod(psk, 0o600)
    pool = os.path.join(b.data_dir, "pool.img")
    subprocess.run([ballast_bin(), "pool", "create", pool, "--size", "512M"], check=True,
                   capture_output=True)
    shm = "/dev/shm/ballast-nbd-storm-%d.img" % os.getpid()
    disk = os.path.join(b.tmp, "disk.img")
    rof = os.path.join(b.tmp, "ro.img")
    for path in (shm, disk):
        with open(path, "wb") as f:
            f.truncate(SIZE)
    with open(rof, "wb") as f:
        f.write(random.Random(seed).randbytes(REGION))
        f.truncate(SIZE)
    try:
        with b:
            def ctl(*args):
                p = b.ctl(*args)
                if p.returncode != 0:
                    raise AssertionError("ballast %s: %s" % (" ".join(args), p.stderr.strip()))
            ctl("export", "add", "tmpfs", "--file", shm)
            ctl("export", "add", "disk", "--file", disk)
            ctl("export", "add", "ror", "--ram", "32M", "--read-only")
            ctl("export", "add", "rof", "--file", rof, "--read-only")
            ctl("volume", "create", "v", "32M")
            rng = random.Random(seed ^ 1)
            for export in ("mem", "tmpfs", "disk", "v"):
                h = nbd.NBD()
                h.connect_uri(b.uri(export))
                h.pwrite(rng.randbytes(REGION), 0)
                h.flush()
                h.shutdown()
            ctl("snapshot", "create", "v", "s")
            ctl("clone", "create", "s", "c")
            spec = [("mem", True, False), ("tmpfs", True, False), ("disk", True, False),
                    ("v", True, True), ("s", False, True), ("c", True, True),
                    ("ror", False, False), ("rof", False, False)]
            only = [n for n in os.environ.get("BALLAST_STORM_ONLY", "").split(",") if n]
            models, storms, threads = {}, [], []
            for i, (export, writable, pieces) in enumerate(spec):
                if only and export not in only:
                    continue
                models[export] = read_region(b, export)
                lock = threading.Lock()
                clients = [(True, None), (False, None)]
                if export in ("mem", "v"):
                    clients.append((True, psk))
                for j, (structured, tls) in enumerate(clients):
                    s = Storm(b, export, structured, writable, pieces, models[export],
                              seed + 3 * i + j, tls)
                    storms.append(s)
                    threads.append(threading.Thread(target=s.run, args=(ops, lock)))
            for t in threads:
                t.start()
            for t in threads:
                t.join(900)
            # Then one client per export (the TLS one where there is one, else the structured
            # one) keeps up to 16 commands in flight.
            deep = {}
            for s in storms:
                if s.export not in deep or "TLS" in s.label:
                    deep[s.export] = s
            threads = [threading.Thread(target=s.run_deep, args=(ops // 2, 16, threading.Lock()))
                       for s in deep.values()]
            for t in threads:
                t.start()
            for t in threads:
                t.join(900)
            for s in storms:
                s.close()
            for s in storms:
                total = sum(s.counts.values())
                r.check("%s: %d commands%s answered as the model says (%s)"
                        % (s.label, total, " (then up to %d in flight)" % s.deepest
                           if s.deepest else "", ", ".join("%s %d" % kv
                                                      for kv in sorted(s.counts.items()))),
                        not s.failures and total >= ops
                        and (s.deepest > 1 or deep[s.export] is not s), "; ".join(s.failures))
            for export, model in models.items():
                back = read_region(b, export)
                r.check("%s: a fresh connection reads what the model holds" % export,
                        back == model, "first difference at byte %s" % next(
                            (i for i in range(REGION) if back[i] != model[i]), None))
            provisioning(r, b, ctl)
            block_status_bound(r, b, ctl)
            b.check_clean_end(r)
    finally:
        os.unlink(shm)


if __name__ == "__main__":
    guarded(main)
