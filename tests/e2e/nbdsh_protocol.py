#!/usr/bin/python3
"""NBD protocol conformance of ballast, driven through libnbd (python3-libnbd).

Run with /usr/bin/python3 (Debian's python3-libnbd).  Starts its own ballast with a RAM export
and a file export and runs the command checks against both backends.
"""
import errno
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import nbd  # noqa: E402

from ballast_testlib import Ballast, guarded  # noqa: E402

MiB = 1 << 20
SIZES = {"ram0": 64 * MiB, "file0": 48 * MiB}


def expect_nbd_error(r, what, fn, want_errno):
    try:
        fn()
    except nbd.Error as e:
        r.check(what, e.errnum == want_errno,
                "errno %s (%s), want %s" % (e.errnum, e.errno, errno.errorcode[want_errno]))
        return
    r.bad(what, "no error raised")


def connect(b, name, structured=True, strict=None):
    h = nbd.NBD()
    h.set_request_structured_replies(structured)
    if structured:
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.set_export_name(name)
    if strict is not None:
        h.set_strict_mode(strict)
    h.connect_tcp("127.0.0.1", str(b.port))
    return h


def extents(h, count, offset, flags=0):
    """block_status -> list of (offset, length, flags) for base:allocation."""
    out = []

    def cb(ctx, off, entries, err):
        if ctx == nbd.CONTEXT_BASE_ALLOCATION:
            o = off
            for i in range(0, len(entries), 2):
                out.append((o, entries[i], entries[i + 1]))
                o += entries[i]
        return 0

    h.block_status(count, offset, cb, flags)
    return out


def state_at(ext, offset):
    for o, n, f in ext:
        if o <= offset < o + n:
            return f
    return None


def range_has_state(ext, start, length, bits):
    """Every byte of [start, start+length) is covered by extents having all of `bits`."""
    pos = start
    for o, n, f in ext:
        if o <= pos < o + n:
            if f & bits != bits:
                return False
            pos = o + n
            if pos >= start + length:
                return True
    return pos >= start + length


def negotiation(r, b):
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_tcp("127.0.0.1", str(b.port))
    r.check("opt mode: negotiating after connect", h.aio_is_negotiating())

    names = {}
    n = h.opt_list(lambda name, desc: names.__setitem__(name, desc) or 0)
    r.check_eq("opt_list returns every export", sorted(SIZES), sorted(names))
    r.check_eq("opt_list count", len(SIZES), n)

    h.set_export_name("no-such-export")
    expect_nbd_error(r, "opt_info on an unknown name -> error (ENOENT from NBD_REP_ERR_UNKNOWN)",
                     h.opt_info, errno.ENOENT)
    r.check("still negotiating after the failed opt_info", h.aio_is_negotiating())

    h.set_export_name("file0")
    r.run("opt_info on a good name after the error", h.opt_info)
    r.check_eq("opt_info reports the size", SIZES["file0"], h.get_size())

    ctxs = []
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    r.run("opt_list_meta_context", h.opt_list_meta_context, lambda name: ctxs.append(name) or 0)
    r.check("opt_list_meta_context shows base:allocation", nbd.CONTEXT_BASE_ALLOCATION in ctxs, ctxs)

    h.set_export_name("ram0")
    r.run("opt_go on a good name after the failed opt_info", h.opt_go)
    r.check("connection ready after opt_go", h.aio_is_ready())
    r.check_eq("opt_go export size", SIZES["ram0"], h.get_size())
    data = os.urandom(8192)
    h.pwrite(data, 4096)
    r.check("I/O works on the recovered handle", h.pread(8192, 4096) == data)
    h.shutdown()

    # unknown export through a plain connect fails cleanly
    h = nbd.NBD()
    h.set_export_name("no-such-export")
    try:
        h.connect_tcp("127.0.0.1", str(b.port))
        r.bad("connect to an unknown export fails", "connected")
    except nbd.Error as e:
        r.ok("connect to an unknown export fails (%s)" % e.errno)

    # empty name -> the default export (--default-export file0)
    h = nbd.NBD()
    h.set_export_name("")
    h.connect_tcp("127.0.0.1", str(b.port))
    r.check_eq("empty export name maps to the default export (size)", SIZES["file0"], h.get_size())
    marker = os.urandom(4096)
    h.pwrite(marker, 12345)
    h.flush()
    h.shutdown()
    h = connect(b, "file0")
    r.check("empty export name maps to the default export (same data)", h.pread(4096, 12345) == marker)
    h.shutdown()

    # opt_info with the empty name
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_tcp("127.0.0.1", str(b.port))
    h.set_export_name("")
    r.run("opt_info on the empty name", h.opt_info)
    r.check_eq("opt_info on the empty name reports the default export's size", SIZES["file0"], h.get_size())
    h.opt_abort()


def flags(r, h, name):
    for f in ("can_flush", "can_fua", "can_trim", "can_zero", "can_df", "can_cache",
              "can_fast_zero", "can_multi_conn"):
        r.check("%s: %s" % (name, f), getattr(h, f)())
    r.check("%s: is_read_only false" % name, not h.is_read_only())
    r.check("%s: can_meta_context(base:allocation)" % name,
            h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION))
    r.check("%s: structured replies negotiated" % name, h.get_structured_replies_negotiated())
    r.check_eq("%s: block size minimum" % name, 1, h.get_block_size(nbd.SIZE_MINIMUM))
    r.check_eq("%s: block size preferred" % name, 4096, h.get_block_size(nbd.SIZE_PREFERRED))
    r.check_eq("%s: block size maximum (32 MiB)" % name, 32 * MiB, h.get_block_size(nbd.SIZE_MAXIMUM))
    r.check_eq("%s: size" % name, SIZES[name], h.get_size())


def commands(r, b, name, backing=None):
    size = SIZES[name]
    h = connect(b, name)
    flags(r, h, name)

    # pread/pwrite, aligned and unaligned, FUA, DF
    data = os.urandom(MiB)
    h.pwrite(data, MiB)
    r.check("%s: pwrite/pread 1 MiB aligned" % name, h.pread(MiB, MiB) == data)
    odd = os.urandom(100003)
    h.pwrite(odd, 3 * MiB + 777, nbd.CMD_FLAG_FUA)
    r.check("%s: pwrite(FUA)/pread unaligned 100003 bytes at +777" % name,
            h.pread(100003, 3 * MiB + 777) == odd)
    r.check("%s: pread unaligned 1 byte" % name, h.pread(1, 3 * MiB + 777 + 5) == odd[5:6])
    h.pwrite(b"\x5a", 3 * MiB + 777 + 6)
    r.check("%s: 1-byte pwrite keeps its neighbours" % name,
            h.pread(3, 3 * MiB + 777 + 5) == odd[5:6] + b"\x5a" + odd[7:8])
    chunks = []

    def chunk_cb(sub, off, status, err):
        chunks.append((bytes(sub), off, status))
        return 0

    buf = h.pread_structured(MiB, MiB, chunk_cb, nbd.CMD_FLAG_DF)
    r.check("%s: pread_structured(DF) data" % name, buf == data)
    r.check("%s: pread_structured(DF) -> a single chunk" % name,
            len(chunks) == 1 and chunks[0][1] == MiB, [(len(c[0]), c[1], c[2]) for c in chunks])
    r.run("%s: flush" % name, h.flush)
    big = os.urandom(32 * MiB)
    h.pwrite(big, size - 32 * MiB)
    r.check("%s: 32 MiB (max payload) pwrite/pread at the end" % name,
            h.pread(32 * MiB, size - 32 * MiB) == big)
    del big

    # a multi-conn peer sees flushed data
    h2 = connect(b, name)
    r.check("%s: second connection sees the first's writes" % name, h2.pread(MiB, MiB) == data)
    h2.shutdown()

    # block_status: data extent where we wrote
    ext = extents(h, 2 * MiB, MiB)
    r.check("%s: block_status reports data at the written 1 MiB" % name,
            ext and range_has_state(ext, MiB, MiB, 0) and not (state_at(ext, MiB) & nbd.STATE_HOLE),
            ext[:4])
    # block_status REQ_ONE: a single extent, not longer than asked
    ext = extents(h, 2 * MiB, MiB, nbd.CMD_FLAG_REQ_ONE)
    r.check("%s: block_status(REQ_ONE) -> exactly one extent within the request" % name,
            len(ext) == 1 and ext[0][0] == MiB and 0 < ext[0][1] <= 2 * MiB, ext)

    # trim -> zeros, hole/zero
    h.trim(MiB, MiB)
    r.check("%s: trimmed range reads zeros" % name, h.pread(MiB, MiB) == bytes(MiB))
    ext = extents(h, MiB, MiB)
    r.check("%s: block_status after trim: zero" % name,
            range_has_state(ext, MiB, MiB, nbd.STATE_ZERO), ext[:4])
    r.check("%s: block_status after trim: hole" % name,
            range_has_state(ext, MiB, MiB, nbd.STATE_HOLE), ext[:4])

    # write zeroes (plain, NO_HOLE, FAST_ZERO)
    for label, zflags, off in (("zero", 0, 8 * MiB), ("zero(NO_HOLE)", nbd.CMD_FLAG_NO_HOLE, 10 * MiB),
                               ("zero(FAST_ZERO)", nbd.CMD_FLAG_FAST_ZERO, 12 * MiB)):
        h.pwrite(os.urandom(MiB), off)
        h.flush()
        blocks_before = os.stat(backing).st_blocks if backing else None
        try:
            h.zero(MiB, off, zflags)
        except nbd.Error as e:
            if zflags == nbd.CMD_FLAG_FAST_ZERO and e.errnum == errno.ENOTSUP:
                r.ok("%s: %s refused with ENOTSUP (allowed)" % (name, label))
                continue
            r.bad("%s: %s" % (name, label), e)
            continue
        r.check("%s: %s range reads zeros" % (name, label), h.pread(MiB, off) == bytes(MiB))
        ext = extents(h, MiB, off)
        if zflags == nbd.CMD_FLAG_NO_HOLE and backing:
            # NO_HOLE: "the area MUST be fully provisioned".  A file backend may use
            # FALLOC_FL_ZERO_RANGE, whose unwritten extents ext4's SEEK_DATA reports as holes,
            # so judge by the backing file's allocation instead of block_status.
            h.flush()
            blocks_after = os.stat(backing).st_blocks
            r.check("%s: %s keeps the range allocated (backing file blocks %d -> %d)"
                    % (name, label, blocks_before, blocks_after), blocks_after >= blocks_before)
        elif zflags == nbd.CMD_FLAG_NO_HOLE:
            # NO_HOLE: the range must stay allocated; reporting "zero" is optional
            r.check("%s: block_status after %s: not a hole (NO_HOLE = fully provisioned)"
                    % (name, label),
                    ext and not any(f & nbd.STATE_HOLE for o, n, f in ext if o < off + MiB),
                    ext[:4])
        else:
            r.check("%s: block_status after %s: zero" % (name, label),
                    range_has_state(ext, off, MiB, nbd.STATE_ZERO), ext[:4])
    # unaligned zero keeps neighbours
    pat = os.urandom(16384)
    h.pwrite(pat, 20 * MiB)
    h.zero(1000, 20 * MiB + 3000)
    r.check("%s: unaligned zero(1000 @ +3000) keeps neighbours" % name,
            h.pread(16384, 20 * MiB) == pat[:3000] + bytes(1000) + pat[4000:])

    # cache
    r.run("%s: cache 4 MiB" % name, h.cache, 4 * MiB, 0)

    # out of range, strict mode off so libnbd sends them
    tail = h.pread(4096, size - 4096)
    h.set_strict_mode(0)
    expect_nbd_error(r, "%s: pread past the end -> EINVAL" % name, lambda: h.pread(4096, size), errno.EINVAL)
    expect_nbd_error(r, "%s: pread straddling the end -> EINVAL" % name,
                     lambda: h.pread(8192, size - 4096), errno.EINVAL)
    expect_nbd_error(r, "%s: pwrite past the end -> ENOSPC" % name,
                     lambda: h.pwrite(b"x" * 4096, size), errno.ENOSPC)
    expect_nbd_error(r, "%s: pwrite straddling the end -> ENOSPC" % name,
                     lambda: h.pwrite(b"x" * 8192, size - 4096), errno.ENOSPC)
    expect_nbd_error(r, "%s: zero past the end -> ENOSPC" % name, lambda: h.zero(4096, size), errno.ENOSPC)
    expect_nbd_error(r, "%s: trim past the end -> EINVAL" % name, lambda: h.trim(4096, size), errno.EINVAL)
    expect_nbd_error(r, "%s: cache past the end -> EINVAL" % name, lambda: h.cache(4096, size), errno.EINVAL)
    expect_nbd_error(r, "%s: block_status past the end -> EINVAL" % name,
                     lambda: extents(h, 4096, size), errno.EINVAL)
    r.check("%s: straddling pwrite did not modify the tail" % name,
            h.pread(4096, size - 4096) == tail)
    r.check("%s: connection usable after out-of-range errors" % name, h.pread(100003, 3 * MiB + 777)[:5] == odd[:5])
    # over the advertised 32 MiB maximum: refused with EINVAL after its payload is read (the
    # buffer budget grants one request at most the advertised maximum), connection usable
    expect_nbd_error(r, "%s: 48 MiB pwrite (> advertised max) -> EINVAL" % name,
                     lambda: h.pwrite(os.urandom(48 * MiB), 0), errno.EINVAL)
    expect_nbd_error(r, "%s: 48 MiB pread (> advertised max) -> EINVAL" % name,
                     lambda: h.pread(48 * MiB, 0), errno.EINVAL)
    blob = os.urandom(32 * MiB)
    h.pwrite(blob, 0)
    r.check("%s: 32 MiB (the advertised max) write and read, after the refusals" % name,
            h.pread(32 * MiB, 0) == blob)
    h.shutdown()

    # structured replies off: simple replies only
    h = connect(b, name, structured=False)
    r.check("%s: structured replies not negotiated when not requested" % name,
            not h.get_structured_replies_negotiated())
    d = os.urandom(3 * MiB)
    h.pwrite(d, 2 * MiB)
    r.check("%s: simple replies: pread/pwrite 3 MiB" % name, h.pread(3 * MiB, 2 * MiB) == d)
    r.check("%s: simple replies: 32 MiB pread" % name, len(h.pread(32 * MiB, 0)) == 32 * MiB)
    r.run("%s: simple replies: flush/trim/zero/cache" % name,
          lambda: (h.flush(), h.trim(4096, 0), h.zero(4096, 8192), h.cache(4096, 0)))
    h.set_strict_mode(0)
    expect_nbd_error(r, "%s: simple replies: pread past the end -> EINVAL" % name,
                     lambda: h.pread(4096, size), errno.EINVAL)
    expect_nbd_error(r, "%s: simple replies: pwrite past the end -> ENOSPC" % name,
                     lambda: h.pwrite(b"y" * 4096, size), errno.ENOSPC)
    r.check("%s: simple replies: usable after errors" % name, h.pread(3 * MiB, 2 * MiB) == d)
    h.shutdown()


def lent_reads(r, b):
    """A RAM export's written ranges are sent straight from its memory (lent, not copied), and
    small writes are stored straight from the receive buffer: many reads in flight at once, of
    odd sizes and offsets, across written, never-written and trimmed 64 KiB chunks, in both
    reply styles, read what a model of the writes says, and the daemon counts both kinds. (tests/e2e/lent_reads.py: the memory outliving its
    export while replies wait.)"""
    import random
    import time
    rnd = random.Random(20261205)
    size, chunk = 8 * MiB, 64 * 1024
    p = b.ctl("export", "add", "lend0", "--ram", "8M")
    if not r.check("export add lend0 (control CLI)", p.returncode == 0, p.stderr.strip()):
        return

    model = bytearray(size)
    h = connect(b, "lend0")
    for c in range(size // chunk):
        if c % 3 == 2:
            continue  # never written: copied as zeros, not lent
        data = os.urandom(chunk)
        h.pwrite(data, c * chunk)
        model[c * chunk:(c + 1) * chunk] = data
    for c in (4, 40, 100):
        h.trim(chunk, c * chunk)
        model[c * chunk:(c + 1) * chunk] = bytes(chunk)
    # Small writes arrive whole with their request: stored from the receive buffer.
    now0 = b.counter("writes_now")
    for _ in range(64):
        n = rnd.choice((1, 511, 4096, 8192))
        off = rnd.randrange(0, size - n + 1)
        data = os.urandom(n)
        h.pwrite(data, off)
        model[off:off + n] = data
    r.check("small writes are stored from the receive buffer (writes_now %d -> %d)"
            % (now0, b.counter("writes_now")), b.counter("writes_now") - now0 >= 32)
    h.shutdown()
    lent0 = b.counter("reads_lent")
    for structured in (True, False):
        style = "structured" if structured else "simple"
        h = connect(b, "lend0", structured=structured)
        reqs, bad, done = [], [], 0
        for _ in range(400):
            n = rnd.choice((1, 512, 4096, 4097, 65536, 100000, 262144))
            off = rnd.randrange(0, size - n + 1)
            reqs.append((off, n, nbd.Buffer(n)))
        inflight = []
        deadline = time.monotonic() + 60
        while (reqs or inflight) and time.monotonic() < deadline:
            while reqs and len(inflight) < 64:
                off, n, buf = reqs.pop()
                inflight.append((h.aio_pread(buf, off), off, n, buf))
            h.poll(1)
            still = []
            for cookie, off, n, buf in inflight:
                if h.aio_command_completed(cookie):
                    done += 1
                    if buf.to_bytearray() != model[off:off + n]:
                        bad.append((off, n))
                else:
                    still.append((cookie, off, n, buf))
            inflight = still
        r.check("lend0 (%s replies): 400 concurrent reads complete within 60 s" % style,
                done == 400, "%d done" % done)
        r.check("lend0 (%s replies): every read matches the writes" % style, not bad, bad[:5])
        h.shutdown()
    # Of 800 random reads, those wholly inside written chunks (about a third) were lent.
    r.check("reads of written ranges were lent (reads_lent %d -> %d)" % (lent0, b.counter("reads_lent")),
            b.counter("reads_lent") - lent0 >= 100)


def read_only(r, b):
    p = b.ctl("export", "add", "ro", "--ram", "16M", "--read-only")
    if not r.check("export add --read-only (control CLI)", p.returncode == 0, p.stderr.strip()):
        return
    h = connect(b, "ro")
    r.check("ro: is_read_only", h.is_read_only())
    r.check_eq("ro: pread works", bytes(4096), h.pread(4096, 0))
    h.set_strict_mode(0)
    expect_nbd_error(r, "ro: pwrite -> EPERM", lambda: h.pwrite(b"z" * 4096, 0), errno.EPERM)
    expect_nbd_error(r, "ro: trim -> EPERM", lambda: h.trim(4096, 0), errno.EPERM)
    expect_nbd_error(r, "ro: zero -> EPERM", lambda: h.zero(4096, 0), errno.EPERM)
    r.check_eq("ro: still zeros and usable after refused writes", bytes(4096), h.pread(4096, 0))
    h.shutdown()
    p = b.ctl("export", "remove", "ro")
    r.check("export remove ro", p.returncode == 0, p.stderr.strip())


def main(r):
    with Ballast(["--export", "ram0=ram:64M",
                  "--export", "file0=file:{data}/file0.img:48M",
                  "--default-export", "file0"]) as b:
        negotiation(r, b)
        for name in ("ram0", "file0"):
            try:
                commands(r, b, name,
                         os.path.join(b.data_dir, "file0.img") if name == "file0" else None)
            except Exception as e:  # noqa: BLE001
                import traceback
                traceback.print_exc()
                r.bad("%s: command checks raised" % name, "%s: %s" % (type(e).__name__, e))
        try:
            lent_reads(r, b)
        except Exception as e:  # noqa: BLE001
            import traceback
            traceback.print_exc()
            r.bad("lent-read checks raised", "%s: %s" % (type(e).__name__, e))
        try:
            read_only(r, b)
        except Exception as e:  # noqa: BLE001
            r.bad("read-only checks raised", "%s: %s" % (type(e).__name__, e))
        b.check_clean_end(r)


if __name__ == "__main__":
    guarded(main)
