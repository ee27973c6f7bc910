#!/usr/bin/python3
"""A volume renamed while clients use it (`bdev_lvol_rename`, `ballast volume rename`;
tests/e2e/spdk_rpc.sh calls it with SPDK's own client), then kept across kill -9.

A pool with volume `db` (16 MiB, 1 MiB of 0xA1 written through libnbd), its snapshot and a
clone of that; `db`'s subsystem admits one host only (nvmf_subsystem_allow_any_host false,
nvmf_subsystem_add_host); `db` has a rate limit (bdev_set_qos_limit); another subsystem
(nvmf_create_subsystem cnode1) has `db` as namespace 1. A libnbd connection to `db` stays
open through the rename; a raw NVMe host is connected to `db`'s subsystem.
- `bdev_lvol_rename` by alias `lvs0/db` to `app` answers true: the volume keeps its UUID, its
  alias is `lvs0/app`, `db` is gone from every listing; the open NBD connection reads and
  writes on; a new one to `app` reads the data; `db`'s export is gone; the raw NVMe host of
  the old subsystem is disconnected; subsystem `...:app` admits the same host only and serves
  the data; `...:db` is gone; cnode1's namespace 1 is listed as `app`; the rate limit stayed;
  nbdinfo --list describes the snapshot as `snapshot of app`;
- refused, changing nothing: a taken name (File exists), a name that is no name, an unknown
  volume (No such device), the name of a RAM export or of a subsystem's NQN (File exists), a
  name too long for an NQN, a volume whose namespace has a reservation registrant (Device or
  resource busy: the host stays connected and registered; unregistered, the rename goes
  through); the same name: true (spdk_rpc.sh checks the codes);
- the CLI renames the clone (`ballast volume rename dbc web`);
- kill -9 and restart: `app` and `web` are there with their UUIDs and data, `db` and `dbc` are
  not; `...:app` admits the same host only; cnode1's namespace 1 is `app` again; the rate
  limit stayed;
- restarted with `--default-export app` and `--nbd-tls-allow web=alice`: renaming either is
  refused (the next start would fail, or open the export wider), another volume renames; the
  pool checks exact offline;
- the daemon logs no panic. Run with /usr/bin/python3 (libnbd's `nbd` module).
"""
import json
import os
import struct
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import nbd  # noqa: E402
import nvmeraw  # noqa: E402
from ballast_testlib import check_pool_exact, guarded, pool_daemon, wait_for  # noqa: E402

PREFIX = "nqn.2026-11.dev.ballast:"
OP_REGISTER = 0x0D
KEY = 0xA1A1
CNODE = "nqn.2016-06.io.spdk:cnode1"
MiB = 1 << 20


def nbd_connect(b, name):
    h = nbd.NBD()
    h.connect_uri(b.uri(name))
    return h


def subsystems(b):
    code, out = b.rpc("nvmf_get_subsystems", {})
    if code != 0:
        raise AssertionError("nvmf_get_subsystems: " + out)
    return {s["nqn"]: s for s in json.loads(out)}


def qos(b, name):
    code, out = b.rpc("bdev_get_bdevs", {"name": name})
    if code != 0:
        return None
    return json.loads(out)[0]["assigned_rate_limits"]["rw_ios_per_sec"]


def nvme_reads(b, nqn):
    """The first 4 KiB of namespace 1 through a raw host of `nqn` (None when refused)."""
    try:
        adm, io = nvmeraw.io_queue(b.nvmf_port(), nqn)
    except Exception:  # noqa: BLE001 - a refused Connect raises
        return None
    st, data = io.read_command(nvmeraw.sqe(nvmeraw.OP_READ, io.next_cid(), nsid=1,
                                           sgl_len=4096, cdw=(0, 0, 0, 0, 0, 0)))
    adm.close()
    io.close()
    return data if st == 0 else None


def keys(current, new):
    return struct.pack("<QQ", current, new)


def descriptions(b):
    """Every export's description as nbdinfo --list gives it."""
    p = subprocess.run(["nbdinfo", "--list", "--json", b.uri()], capture_output=True, text=True,
                       timeout=30)
    if p.returncode != 0:
        raise AssertionError("nbdinfo --list: " + p.stderr)
    return {e["export-name"]: e.get("description") for e in json.loads(p.stdout)["exports"]}


def still_reads(io):
    """Whether an I/O queue still answers a read (False once its connection is closed)."""
    try:
        io.s.settimeout(5)
        st, _ = io.read_command(nvmeraw.sqe(nvmeraw.OP_READ, io.next_cid(), nsid=1,
                                            sgl_len=4096, cdw=(0, 0, 0, 0, 0, 0)))
        return st == 0
    except Exception:  # noqa: BLE001 - the connection ended
        return False


def check_settings(r, b, when):
    s = subsystems(b)
    app = s.get(PREFIX + "app", {})
    r.check_eq(when + ": ...:app admits the one host only", (False, [nvmeraw.HOSTNQN]),
               (app.get("allow_any_host"), [h["nqn"] for h in app.get("hosts", [])]))
    r.check(when + ": ...:db is gone", PREFIX + "db" not in s, sorted(s))
    ns = [(n["nsid"], n["bdev_name"]) for n in s.get(CNODE, {}).get("namespaces", [])]
    r.check_eq(when + ": cnode1's namespace 1 is app", [(1, "app")], ns)
    r.check_eq(when + ": the rate limit stayed", 20000, qos(b, "app"))


def main(r):
    b, pool = pool_daemon("256M")
    with b:
        p = b.ctl("volume", "create", "db", "16M")
        r.check("volume create db", p.returncode == 0, p.stderr)
        h1 = nbd_connect(b, "db")
        h1.pwrite(b"\xa1" * MiB, 0)
        h1.flush()
        for method, params in [
            ("bdev_lvol_snapshot", {"lvol_name": "db", "snapshot_name": "dbs"}),
            ("bdev_lvol_clone", {"snapshot_name": "dbs", "clone_name": "dbc"}),
            ("nvmf_subsystem_allow_any_host", {"nqn": PREFIX + "db", "allow_any_host": False}),
            ("nvmf_subsystem_add_host", {"nqn": PREFIX + "db", "host": nvmeraw.HOSTNQN}),
            ("bdev_set_qos_limit", {"name": "db", "rw_ios_per_sec": 20000}),
            ("nvmf_create_subsystem", {"nqn": CNODE, "allow_any_host": True}),
            ("nvmf_subsystem_add_ns", {"nqn": CNODE, "namespace": {"bdev_name": "db"}}),
        ]:
            code, out = b.rpc(method, params)
            r.check(method, code == 0, out)
        uuid = b.lvols()["db"]["uuid"]
        adm, io = nvmeraw.io_queue(b.nvmf_port(), PREFIX + "db")

        code, out = b.rpc("bdev_lvol_rename", {"old_name": "lvs0/db", "new_name": "app"})
        r.check_eq("bdev_lvol_rename lvs0/db app", (0, "true"), (code, out))
        v = b.lvols()
        r.check_eq("the volume keeps its UUID, alias lvs0/app; db is gone",
                   (uuid, "lvs0/app", False),
                   (v.get("app", {}).get("uuid"), v.get("app", {}).get("alias"), "db" in v))
        r.check_eq("the NBD connection open through the rename reads", b"\xa1" * 4096,
                   h1.pread(4096, 0))
        h1.pwrite(b"\xb2" * 4096, MiB)
        h1.flush()
        h1.shutdown()
        h2 = nbd_connect(b, "app")
        r.check_eq("a new NBD connection to app reads the data and the write made after",
                   (b"\xa1" * MiB, b"\xb2" * 4096), (h2.pread(MiB, 0), h2.pread(4096, MiB)))
        h2.shutdown()
        try:
            nbd_connect(b, "db").shutdown()
            r.bad("the export db is gone")
        except nbd.Error:
            r.ok("the export db is gone")
        r.check("the host of the old subsystem is disconnected (within a tick)",
                wait_for(lambda: not still_reads(io), 10))
        adm.close()
        io.close()
        r.check_eq("the raw host connects to ...:app and reads the data", b"\xa1" * 4096,
                   nvme_reads(b, PREFIX + "app"))
        r.check_eq("...:db refuses it", None, nvme_reads(b, PREFIX + "db"))
        check_settings(r, b, "renamed")
        d = descriptions(b)
        r.check_eq("nbdinfo --list: app a volume, its snapshot described by the new name",
                   ("volume", "snapshot of app", "clone of dbs"),
                   (d.get("app"), d.get("dbs"), d.get("dbc")))

        code, out = b.rpc("bdev_lvol_rename", {"old_name": "app", "new_name": "dbs"})
        r.check("a taken name: File exists", code != 0 and "File exists" in out, out)
        code, out = b.rpc("bdev_lvol_rename", {"old_name": "app", "new_name": "a/b"})
        r.check("no name: refused", code != 0 and "invalid volume name" in out, out)
        code, out = b.rpc("bdev_lvol_rename", {"old_name": "nosuch", "new_name": "x"})
        r.check("an unknown volume: -19 No such device", code != 0 and "No such device" in out,
                out)
        r.check_eq("the same name: true", (0, "true"),
                   b.rpc("bdev_lvol_rename", {"old_name": "app", "new_name": "app"}))
        code, out = b.rpc("export_add", {"name": "ramx", "ram_size": "4M"})
        r.check("export_add ramx", code == 0, out)
        code, out = b.rpc("bdev_lvol_rename", {"old_name": "app", "new_name": "ramx"})
        r.check("the name of another export: File exists", code != 0 and "File exists" in out,
                out)
        code, out = b.rpc("nvmf_create_subsystem", {"nqn": PREFIX + "taken"})
        r.check("nvmf_create_subsystem ...:taken", code == 0, out)
        code, out = b.rpc("bdev_lvol_rename", {"old_name": "app", "new_name": "taken"})
        r.check("a name whose NQN a subsystem has: File exists",
                code != 0 and "File exists" in out, out)
        code, out = b.rpc("bdev_lvol_rename", {"old_name": "app", "new_name": "n" * 220})
        r.check("a name too long for an NQN: refused", code != 0 and "longer than an NQN" in out,
                out)
        # A host registered for reservations on its namespace: refused, the host stays
        # connected and registered (the table is bound to the namespace's NGUID, which
        # derives from the NQN); once it unregisters, the rename goes through.
        adm, io = nvmeraw.io_queue(b.nvmf_port(), PREFIX + "app")
        r.check_eq("Reservation Register on app", 0,
                   io.command(OP_REGISTER, 1, (0, 0, 0, 0, 0, 0), keys(0, KEY))[0])
        code, out = b.rpc("bdev_lvol_rename", {"old_name": "app", "new_name": "app2"})
        r.check("with a registrant: Device or resource busy",
                code != 0 and "Device or resource busy" in out, out)
        r.check("... the host still connected", still_reads(io))
        code, out = b.rpc("nvmf_ns_get_reservation", {"nqn": PREFIX + "app", "nsid": 1})
        r.check_eq("... and registered", 1,
                   len(json.loads(out)["registrants"]) if code == 0 else out)
        r.check_eq("Reservation Register: unregister", 0,
                   io.command(OP_REGISTER, 1, (1, 0, 0, 0, 0, 0), keys(KEY, 0))[0])
        code, out = b.rpc("bdev_lvol_rename", {"old_name": "app", "new_name": "a/b"})
        r.check("no name, with a host connected: refused, the host still connected",
                code != 0 and "invalid volume name" in out and still_reads(io), out)
        adm.close()
        io.close()
        r.check_eq("renamed to app2 once unregistered, and back", [(0, "true"), (0, "true")],
                   [b.rpc("bdev_lvol_rename", {"old_name": "app", "new_name": "app2"}),
                    b.rpc("bdev_lvol_rename", {"old_name": "app2", "new_name": "app"})])
        check_settings(r, b, "renamed there and back")
        r.check_eq("refusals changed nothing", {"app", "dbs", "dbc"}, set(b.lvols()))
        p = b.ctl("volume", "rename", "dbc", "web")
        r.check("ballast volume rename dbc web", p.returncode == 0, p.stderr + p.stdout)
        v = b.lvols()
        web, dbs = v.get("web", {}).get("uuid"), v.get("dbs", {}).get("uuid")
        r.check("web and dbs are listed with UUIDs", None not in (web, dbs))

        b.proc.kill()
        b.proc.wait()
        b.start()
        v = b.lvols()
        r.check_eq("after kill -9: app, dbs and web with their UUIDs",
                   {"app": uuid, "dbs": dbs, "web": web},
                   {n: e["uuid"] for n, e in v.items()})
        h3 = nbd_connect(b, "app")
        r.check_eq("after kill -9: app holds its data", (b"\xa1" * MiB, b"\xb2" * 4096),
                   (h3.pread(MiB, 0), h3.pread(4096, MiB)))
        h3.shutdown()
        h4 = nbd_connect(b, "web")
        r.check_eq("after kill -9: web (the clone) reads the snapshot's data", b"\xa1" * MiB,
                   h4.pread(MiB, 0))
        h4.shutdown()
        check_settings(r, b, "after kill -9")
        r.check_eq("after kill -9: ...:app serves the data", b"\xa1" * 4096,
                   nvme_reads(b, PREFIX + "app"))

        # Startup settings that name exports: a rename they would outlive is refused.
        r.check_eq("stopped for a start with --default-export and --nbd-tls-allow", 0, b.stop())
        psk = os.path.join(b.data_dir, "keys.psk")
        with open(os.open(psk, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            f.write("alice:%s\n" % ("ab" * 32))
        b.args += ["--default-export", "app", "--nbd-tls", "on", "--nbd-tls-psk", psk,
                   "--nbd-tls-allow", "web=alice"]
        b.start()
        code, out = b.rpc("bdev_lvol_rename", {"old_name": "app", "new_name": "app3"})
        r.check("the --default-export volume: refused", code != 0 and "--default-export" in out,
                out)
        code, out = b.rpc("bdev_lvol_rename", {"old_name": "web", "new_name": "web3"})
        r.check("a volume --nbd-tls-allow names (not the new name): refused",
                code != 0 and "--nbd-tls-allow" in out, out)
        r.check_eq("... both unchanged; another volume still renames",
                   ({"app", "dbs", "web"}, (0, "true")),
                   (set(b.lvols()),
                    b.rpc("bdev_lvol_rename", {"old_name": "dbs", "new_name": "dbs3"})))
        b.check_clean_end(r)
        check_pool_exact(r, pool)  # stopped, before the data directory goes


if __name__ == "__main__":
    guarded(main)
