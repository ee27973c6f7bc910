#!/usr/bin/python3
"""A volume made read-only while clients use it (`bdev_lvol_set_read_only`, `ballast volume
read-only`; tests/e2e/spdk_rpc.sh calls it with SPDK's own client), over NBD (libnbd) and
NVMe/TCP (raw hosts), then kept across kill -9.

A pool with volume `ro` (16 MiB) and `other`; libnbd connected to `ro` before the change, a raw
NVMe host on `ro`'s subsystem holding an Asynchronous Event Request (namespace notices on):
- before: both write; the change answers true and the host's AER completes with Namespace
  Attribute Changed (00040002h), the Changed Namespace List names namespace 1, Identify
  Namespace says write protected (NSATTR bit 0);
- after: the NVMe write is refused as Namespace is Write Protected (20h), reads give what was
  written; the NBD connection made before has its write refused (EPERM) and reads the same
  bytes; a new NBD connection is offered the export read-only; the listings say read-only
  (`bdev_lvol_get_lvols` read_only and is_snapshot, `export list`); a resize is refused;
  asking again is no error; an unknown volume is No such device;
- it can be cloned (as a snapshot): the clone reads its content and takes writes, which leave
  `ro` as it was; `other`, made read-only through the CLI, is the only other one changed;
- kill -9 and restart: `ro` and `other` are still read-only, `ro` holds the same bytes, its
  namespace still write protected, the clone still writable; the pool checks exact offline;
- the daemon logs no panic. Run with /usr/bin/python3 (libnbd's `nbd` module).
"""
import json
import os
import struct
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import nbd  # noqa: E402
import nvmeraw  # noqa: E402
from ballast_testlib import check_pool_exact, guarded, pool_daemon  # noqa: E402

PREFIX = "nqn.2026-11.dev.ballast:"
OP_SET_FEATURES, OP_AER = 0x09, 0x0C
LID_CHANGED_NS = 0x04
AEN_NS_CHANGED = 0x00040002
NS_WRITE_PROTECTED = 0x20
MiB = 1 << 20


def write4k(io, slba, byte):
    return io.command(nvmeraw.OP_WRITE, 1, (slba, 0, 0, 0, 0, 0), bytes([byte]) * 4096)[0]


def read4k(io, slba):
    st, data = io.read_command(nvmeraw.sqe(nvmeraw.OP_READ, io.next_cid(), nsid=1, sgl_len=4096,
                                           cdw=(slba, 0, 0, 0, 0, 0)))
    if st != 0:
        raise AssertionError("read of LBA %d: status 0x%x" % (slba, st))
    return data


def write_protected(adm):
    st, ns = adm.admin_read(nvmeraw.OP_IDENTIFY, (0, 0, 0, 0, 0, 0), 4096, nsid=1)
    if st != 0:
        raise AssertionError("Identify Namespace: status 0x%x" % st)
    return bool(ns[99] & 1)


def nbd_connect(b, name):
    h = nbd.NBD()
    h.connect_uri(b.uri(name))
    return h


def nbd_write_error(h, data, offset):
    try:
        h.pwrite(data, offset)
        h.flush()
    except nbd.Error as e:
        return {1: "EPERM"}.get(e.errno, e.errno)  # a number or its name, by libnbd version
    return 0


def main(r):
    b, pool = pool_daemon("256M")
    with b:
        for name in ("ro", "other"):
            p = b.ctl("volume", "create", name, "16M")
            r.check("volume create " + name, p.returncode == 0, p.stderr)
        h1 = nbd_connect(b, "ro")
        r.check("the NBD export is writable before", not h1.is_read_only())
        h1.pwrite(b"\xa1" * MiB, 0)
        h1.flush()
        adm, io = nvmeraw.io_queue(b.nvmf_port(), PREFIX + "ro")
        r.check("Identify Namespace before: not write protected", not write_protected(adm))
        r.check_eq("NVMe write before", 0, write4k(io, 512, 0xB2))
        st, _ = adm.read_command(nvmeraw.sqe(OP_SET_FEATURES, adm.next_cid(),
                                             cdw=(0x0B, 1 << 8, 0, 0, 0, 0)))
        r.check_eq("Set Features AEC: namespace attribute notices", 0, st)
        aer = adm.next_cid()
        adm.s.sendall(nvmeraw.capsule(nvmeraw.sqe(OP_AER, aer)))

        code, out = b.rpc("bdev_lvol_set_read_only", {"name": "ro"})
        r.check_eq("bdev_lvol_set_read_only ro", (0, "true"), (code, out))
        adm.s.settimeout(5)
        cid, st, dw0 = adm.response()
        r.check_eq("the host's AER completes: Namespace Attribute Changed", (aer, 0,
                   AEN_NS_CHANGED), (cid, st, dw0))
        st, log = adm.admin_read(nvmeraw.OP_GET_LOG_PAGE,
                                 (LID_CHANGED_NS | (1023 << 16), 0, 0, 0, 0, 0), 4096)
        r.check_eq("Changed Namespace List: namespace 1", (0, 1, 0),
                   (st, struct.unpack_from("<I", log, 0)[0], struct.unpack_from("<I", log, 4)[0]))
        r.check("Identify Namespace after: write protected (NSATTR bit 0)", write_protected(adm))
        r.check_eq("NVMe write after: Namespace is Write Protected", NS_WRITE_PROTECTED,
                   write4k(io, 520, 0xC3))
        r.check_eq("NVMe reads what was written before", (b"\xb2" * 4096, b"\xa1" * 4096),
                   (read4k(io, 512), read4k(io, 0)))
        r.check_eq("NBD write on the connection made before: EPERM", "EPERM",
                   nbd_write_error(h1, b"\xd4" * 4096, 8192))
        r.check_eq("that connection reads what was written", b"\xa1" * 4096, h1.pread(4096, 8192))
        h1.shutdown()
        h2 = nbd_connect(b, "ro")
        r.check("a new NBD connection is offered it read-only", h2.is_read_only())
        r.check_eq("... and reads the same bytes", b"\xa1" * MiB, h2.pread(MiB, 0))
        h2.shutdown()

        v = b.lvols()
        r.check_eq("bdev_lvol_get_lvols: ro read-only (a snapshot), other not",
                   (True, True, False), (v["ro"]["read_only"], v["ro"]["is_snapshot"],
                                         v["other"]["read_only"]))
        p = b.ctl("export", "list", "--json")
        listed = {e["name"]: e["read_only"] for e in json.loads(p.stdout)} if p.returncode == 0 else {}
        r.check_eq("export list: ro read-only", (True, False), (listed.get("ro"), listed.get("other")))
        code, out = b.rpc("bdev_lvol_resize", {"name": "ro", "size_in_mib": 32})
        r.check("a resize is refused", code != 0 and "read-only" in out, out)
        r.check_eq("asked again: true", (0, "true"),
                   b.rpc("bdev_lvol_set_read_only", {"name": "ro"}))
        code, out = b.rpc("bdev_lvol_set_read_only", {"name": "nosuch"})
        r.check("an unknown volume: No such device", code != 0 and "No such device" in out, out)

        code, out = b.rpc("bdev_lvol_clone", {"snapshot_name": "ro", "clone_name": "roc"})
        r.check("bdev_lvol_clone of the read-only volume", code == 0, out)
        hc = nbd_connect(b, "roc")
        r.check_eq("the clone reads its content", b"\xa1" * MiB, hc.pread(MiB, 0))
        r.check("the clone is writable", not hc.is_read_only())
        hc.pwrite(b"\xe5" * MiB, 0)
        hc.flush()
        hc.shutdown()
        h3 = nbd_connect(b, "ro")
        r.check_eq("its writes leave ro as it was", b"\xa1" * MiB, h3.pread(MiB, 0))
        h3.shutdown()
        p = b.ctl("volume", "read-only", "other")
        r.check("ballast volume read-only other", p.returncode == 0, p.stderr)
        v = b.lvols()
        r.check_eq("read-only now: ro and other, not the clone", {"ro", "other"},
                   {n for n, e in v.items() if e["read_only"]})
        adm.close()
        io.close()

        b.proc.kill()
        b.proc.wait()
        b.start()
        v = b.lvols()
        r.check_eq("after kill -9: ro and other still read-only, the clone writable",
                   (True, True, False), (v["ro"]["read_only"], v["other"]["read_only"],
                                         v["roc"]["read_only"]))
        h4 = nbd_connect(b, "ro")
        r.check_eq("after kill -9: ro offered read-only, holding the same bytes",
                   (True, b"\xa1" * MiB), (h4.is_read_only(), h4.pread(MiB, 0)))
        h4.shutdown()
        adm, io = nvmeraw.io_queue(b.nvmf_port(), PREFIX + "ro")
        r.check("after kill -9: its namespace write protected", write_protected(adm))
        r.check_eq("after kill -9: the NVMe write before the change is there", b"\xb2" * 4096,
                   read4k(io, 512))
        adm.close()
        io.close()
        hc = nbd_connect(b, "roc")
        r.check_eq("after kill -9: the clone holds its writes", b"\xe5" * MiB, hc.pread(MiB, 0))
        hc.shutdown()
        b.check_clean_end(r)
        check_pool_exact(r, pool)  # stopped, before the data directory goes


if __name__ == "__main__":
    guarded(main)
