#!/usr/bin/python3
"""NVMe Asymmetric Namespace Access (ANA) over NVMe/TCP with raw hosts: what the kernel test
(tests/vm/test-nvme-ana-kernel.sh, native multipath) cannot send or see.

A pool-backed daemon; a subsystem made by RPC with namespace 1 (group 1, its id) and namespace
2 in ANA group 5 (`anagrpid`), listening on two ports: path A and path B, a host on each.
- Identify Controller: CMIC bit 3, OAES bit 11, ANATT, ANACAP, ANAGRPMAX = NANAGRPID = MNAN =
  NN (what Linux's host checks before it uses ANA); Identify Namespace ANAGRPID 1 and 5;
- the ANA log page (0Ch) through both paths: two groups, optimized, namespace ids listed (none
  with Return Groups Only);
- `ballast nvmf ana-state` on path A, group 5 inaccessible: A's host, which enabled ANA change
  notices and holds an AER, gets 000C0302h; its log page says inaccessible for group 5 and the
  change count moved; B's log page still optimized; A's Read, Write, Write Zeroes, Dataset
  Management, Flush and Reservation Report on namespace 2 get Asymmetric Access Inaccessible
  (302h) without Do Not Retry, nothing lands (read back through B); namespace 1 is served on A;
  B serves both;
- persistent_loss (301h) for every group; non_optimized serves; `change` refused (a path may
  be changing for at most ANATT: Linux's host resets a controller left in it);
  `nvmf_subsystem_get_listeners` shows each group's state per listener;
- refused with clear errors: an unknown state, group 0, a group past NN, a listener the
  subsystem does not use, anagrpid 0 on add_ns;
- a listener removed and added again starts optimized;
- states are kept in the pool: after kill -9 a path made inaccessible (but for one group)
  still refuses I/O (302h) for the others and says so in its log page, a group's own state and
  a listener added with `ana_state` are back, the volumes' namespaces are in their groups
  again (kept with them); a path made optimized again, a listener removed and added again and
  a listener removed are kept as such (kill -9 again).
The daemon logs no panic. Run with /usr/bin/python3.
"""
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import nvmeraw  # noqa: E402
from ballast_testlib import Ballast, ballast_bin, free_port, guarded, wait_for  # noqa: E402

NQN = "nqn.2026-11.dev.ballast:ana"
OP_FLUSH, OP_WRITE_ZEROES, OP_DSM, OP_REPORT = 0x00, 0x08, 0x09, 0x0E
OP_SET_FEATURES, OP_AER = 0x09, 0x0C
INACCESSIBLE, PERSISTENT_LOSS = 0x302, 0x301
AEN_ANA = 0x000C0302


def u32(b, at):
    return struct.unpack_from("<I", b, at)[0]


def command(io, opcode, nsid, cdw=(0, 0, 0, 0, 0, 0), data=b"", sgl_type=nvmeraw.SGL_INCAPSULE,
            sgl_len=None):
    """One I/O command: (status, DNR); raises on an R2T or data (the command was served)."""
    return io.command(opcode, nsid, cdw, data, sgl_type, sgl_len)


def read4k(io, nsid, slba):
    """(status, data) of a 4 KiB read."""
    return io.read_command(nvmeraw.sqe(nvmeraw.OP_READ, io.next_cid(), nsid=nsid, sgl_len=4096,
                                       cdw=(slba, 0, 0, 0, 0, 0)))


def write4k(io, nsid, slba, byte):
    return command(io, nvmeraw.OP_WRITE, nsid, (slba, 0, 0, 0, 0, 0), bytes([byte]) * 4096)[0]


def data_path_commands(slba):
    """(what, opcode, cdw, data, sgl_type, sgl_len) of every command a path checks."""
    dsm_range = struct.pack("<IIQ", 0, 1, slba)
    return [
        ("Write (in-capsule)", nvmeraw.OP_WRITE, (slba, 0, 0, 0, 0, 0), b"\x55" * 4096,
         nvmeraw.SGL_INCAPSULE, None),
        ("Read", nvmeraw.OP_READ, (slba, 0, 0, 0, 0, 0), b"", nvmeraw.SGL_TRANSPORT, 4096),
        ("Write Zeroes", OP_WRITE_ZEROES, (slba, 0, 0, 0, 0, 0), b"", nvmeraw.SGL_INCAPSULE, 0),
        ("Dataset Management (deallocate)", OP_DSM, (0, 1 << 2, 0, 0, 0, 0), dsm_range,
         nvmeraw.SGL_INCAPSULE, None),
        ("Flush", OP_FLUSH, (0, 0, 0, 0, 0, 0), b"", nvmeraw.SGL_INCAPSULE, 0),
        ("Reservation Report", OP_REPORT, (15, 1, 0, 0, 0, 0), b"", nvmeraw.SGL_TRANSPORT, 64),
    ]


def ana_log(adm, rgo=False):
    """{group: (state, [nsids])} and the change count of the ANA log page."""
    cdw10 = 0x0C | (1 << 8 if rgo else 0) | ((4096 // 4 - 1) << 16)
    st, page = adm.admin_read(nvmeraw.OP_GET_LOG_PAGE, (cdw10, 0, 0, 0, 0, 0), 4096,
                              nsid=0xFFFFFFFF)
    if st != 0:
        raise AssertionError("ANA log page: status 0x%x" % st)
    count, ngroups = struct.unpack_from("<QH", page, 0)
    groups, at = {}, 16
    for _ in range(ngroups):
        grp, nnsids, _chg, state = struct.unpack_from("<IIQB", page, at)
        at += 32
        groups[grp] = (state, [u32(page, at + 4 * i) for i in range(nnsids)])
        at += 4 * nnsids
    return groups, count


def enable_ana_notices(adm):
    st, _ = adm.read_command(nvmeraw.sqe(OP_SET_FEATURES, adm.next_cid(),
                                         cdw=(0x0B, (1 << 8) | (1 << 11), 0, 0, 0, 0)))
    if st != 0:
        raise AssertionError("Set Features AEC: 0x%x" % st)


def send_aer(adm):
    cid = adm.next_cid()
    adm.s.sendall(nvmeraw.capsule(nvmeraw.sqe(OP_AER, cid)))
    return cid


def rpc(b, method, params):
    p = b.ctl("rpc", method, json.dumps(params))
    return p.returncode, (p.stdout + p.stderr).strip()


def address(port):
    return {"trtype": "tcp", "adrfam": "ipv4", "traddr": "127.0.0.1", "trsvcid": str(port)}


def set_state(b, port, state, group=None):
    args = ["nvmf", "ana-state", NQN, "127.0.0.1:%d" % port, state]
    if group is not None:
        args += ["--group", str(group)]
    p = b.ctl(*args)
    return p.returncode, (p.stdout + p.stderr).strip()


def listener_states(b):
    """{port: {group: state}} from nvmf_subsystem_get_listeners."""
    code, out = rpc(b, "nvmf_subsystem_get_listeners", {"nqn": NQN})
    if code != 0:
        raise AssertionError("get_listeners: " + out)
    return {int(l["address"]["trsvcid"]): {s["ana_group"]: s["ana_state"] for s in l["ana_states"]}
            for l in json.loads(out)}


def setup(r, b, port_b):
    port_a = b.nvmf_port()
    for args in (["export", "add", "r1", "--ram", "16M"], ["export", "add", "r2", "--ram", "16M"]):
        r.check("ballast %s" % " ".join(args), b.ctl(*args).returncode == 0)
    # Volumes keep their namespaces in the pool; RAM exports' namespaces are not restored (new
    # data each start), so the restart check uses a volume in group 5.
    r.check("volume v created", b.ctl("volume", "create", "v", "16M").returncode == 0)
    steps = [
        ("nvmf_create_subsystem", {"nqn": NQN, "allow_any_host": True, "ana_reporting": True}),
        ("nvmf_subsystem_add_ns", {"nqn": NQN, "namespace": {"bdev_name": "r1", "nsid": 1}}),
        ("nvmf_subsystem_add_ns",
         {"nqn": NQN, "namespace": {"bdev_name": "r2", "nsid": 2, "anagrpid": 5}}),
        ("nvmf_subsystem_add_ns",
         {"nqn": NQN, "namespace": {"bdev_name": "v", "nsid": 3, "anagrpid": 5}}),
        ("nvmf_subsystem_add_listener", {"nqn": NQN, "listen_address": address(port_a)}),
        ("nvmf_subsystem_add_listener", {"nqn": NQN, "listen_address": address(port_b)}),
    ]
    for method, params in steps:
        code, out = rpc(b, method, params)
        r.check("%s %s" % (method, json.dumps(params)[:60]), code == 0, out)
    return port_a


def main(r):
    b = Ballast(["--pool", "{data}/pool.img", "--cores", "2"])
    pool = os.path.join(b.data_dir, "pool.img")
    subprocess.run([ballast_bin(), "pool", "create", pool, "--size", "256M"], check=True,
                   capture_output=True)
    port_b = free_port()
    with b:
        port_a = setup(r, b, port_b)
        adm_a, a = nvmeraw.io_queue(port_a, NQN, hostid=b"\xaa" * 16)
        adm_b, bq = nvmeraw.io_queue(port_b, NQN, hostid=b"\xbb" * 16)

        ident = adm_a.identify_controller()
        nn = u32(ident, 516)
        r.check_eq("CMIC bit 3 (ANA reporting)", 0x08, ident[76] & 0x08)
        r.check_eq("OAES bit 11 (ANA change notices)", 1 << 11, u32(ident, 92) & (1 << 11))
        r.check("ANATT set", ident[342] > 0, ident[342])
        r.check_eq("ANACAP: the five states and a fixed group id", 0x5F, ident[343])
        r.check_eq("ANAGRPMAX, NANAGRPID, MNAN = NN", (nn, nn, nn),
                   (u32(ident, 344), u32(ident, 348), u32(ident, 540)))
        for nsid, grp in ((1, 1), (2, 5), (3, 5)):
            st, ns = adm_a.admin_read(nvmeraw.OP_IDENTIFY, (0, 0, 0, 0, 0, 0), 4096, nsid=nsid)
            r.check_eq("Identify Namespace %d ANAGRPID" % nsid, grp, u32(ns, 92))

        code, out = rpc(b, "nvmf_get_subsystems", {})
        subs = [s for s in json.loads(out) if s["nqn"] == NQN] if code == 0 else []
        r.check_eq("nvmf_get_subsystems: each namespace's anagrpid", {1: 1, 2: 5, 3: 5},
                   {ns["nsid"]: ns.get("anagrpid") for s in subs for ns in s["namespaces"]})
        groups, count0 = ana_log(adm_a)
        r.check_eq("ANA log through A: groups 1 and 5, optimized, their namespaces",
                   {1: (1, [1]), 5: (1, [2, 3])}, groups)
        r.check_eq("ANA log through B: the same", groups, ana_log(adm_b)[0])
        r.check_eq("Return Groups Only: no namespace ids", {1: (1, []), 5: (1, [])},
                   ana_log(adm_a, rgo=True)[0])

        r.check_eq("A writes namespace 2 while optimized", 0, write4k(a, 2, 8, 0xA1))
        enable_ana_notices(adm_a)
        enable_ana_notices(adm_b)
        aer_a, aer_b = send_aer(adm_a), send_aer(adm_b)
        code, out = set_state(b, port_a, "inaccessible", group=5)
        r.check("ballast nvmf ana-state A inaccessible --group 5", code == 0, out)
        adm_a.s.settimeout(5)
        try:
            cid, st, dw0 = adm_a.response()
            r.check("A's host gets the ANA change notice (000C0302h)",
                    (cid, st, dw0) == (aer_a, 0, AEN_ANA), (cid, st, hex(dw0)))
        except OSError as e:
            r.bad("A's host gets the ANA change notice", repr(e))
        groups, count1 = ana_log(adm_a)
        r.check_eq("A's log: group 5 inaccessible, group 1 optimized", {1: (1, [1]), 5: (3, [2, 3])},
                   groups)
        r.check("the change count moved on", count1 > count0, (count0, count1))
        r.check_eq("B's log: still optimized", {1: (1, [1]), 5: (1, [2, 3])}, ana_log(adm_b)[0])

        for what, op, cdw, data, sgl, length in data_path_commands(8):
            st, dnr = command(a, op, 2, cdw, data, sgl, length)
            r.check("A's %s on namespace 2: Asymmetric Access Inaccessible, retryable" % what,
                    (st, dnr) == (INACCESSIBLE, False), (hex(st), dnr))
        st, data = read4k(bq, 2, 8)
        r.check("nothing A sent landed (B reads A's first write)", st == 0 and data == b"\xa1" * 4096,
                hex(st))
        r.check_eq("A's namespace 1 (group 1) is served", 0, write4k(a, 1, 0, 0x11))
        r.check_eq("B writes namespace 2", 0, write4k(bq, 2, 9, 0xB2))

        # B's host heard nothing (its path did not change): its AER is still held.
        adm_b.s.settimeout(0.5)
        try:
            adm_b.response()
            r.bad("B's host gets no notice", "an AER completed")
        except socket.timeout:
            r.ok("B's host gets no notice (its path did not change)")
        adm_b.s.settimeout(10)

        for state, expect in (("persistent_loss", PERSISTENT_LOSS),):
            code, out = set_state(b, port_a, state)
            r.check("ana-state A %s (every group)" % state, code == 0, out)
            for nsid in (1, 2):
                st, dnr = command(a, nvmeraw.OP_WRITE, nsid, (0, 0, 0, 0, 0, 0), b"\0" * 4096)
                r.check("A's write on namespace %d: 0x%x" % (nsid, expect),
                        (st, dnr) == (expect, False), (hex(st), dnr))
        code, out = set_state(b, port_a, "non_optimized")
        r.check("ana-state A non_optimized", code == 0, out)
        r.check_eq("a non-optimized path serves", 0, write4k(a, 2, 10, 0xA3))
        r.check_eq("A's log: non-optimized", {1: (2, [1]), 5: (2, [2, 3])}, ana_log(adm_a)[0])
        code, out = set_state(b, port_b, "inaccessible", group=1)
        r.check_eq("nvmf_subsystem_get_listeners: each group's state per listener",
                   {port_a: {1: "non_optimized", 5: "non_optimized"},
                    port_b: {1: "inaccessible", 5: "optimized"}}, listener_states(b))
        p = b.ctl("nvmf", "listeners", NQN)
        r.check("ballast nvmf listeners shows the states",
                "1:inaccessible,5:optimized" in p.stdout, p.stdout)

        # Refused, with what was wrong.
        bad = [
            ({"ana_state": "sleepy"}, "ana_state"),
            ({"ana_state": "change"}, "ANATT"),
            ({"ana_state": "optimized", "anagrpid": 0}, "ANA group 0"),
            ({"ana_state": "optimized", "anagrpid": nn + 1}, "ANA group %d" % (nn + 1)),
        ]
        for extra, says in bad:
            params = dict({"nqn": NQN, "listen_address": address(port_a)}, **extra)
            code, out = rpc(b, "nvmf_subsystem_listener_set_ana_state", params)
            r.check("set_ana_state %s refused, saying %r" % (extra, says), code != 0 and says in out,
                    out)
        params = {"nqn": NQN, "listen_address": address(free_port()), "ana_state": "optimized"}
        code, out = rpc(b, "nvmf_subsystem_listener_set_ana_state", params)
        r.check("set_ana_state on a listener it does not use refused", code != 0 and "listen" in out,
                out)
        code, out = rpc(b, "nvmf_subsystem_add_ns",
                        {"nqn": NQN, "namespace": {"bdev_name": "r1", "nsid": 9, "anagrpid": 0}})
        r.check("add_ns anagrpid 0 refused", code != 0 and "ANA group 0" in out, out)

        # A listener removed and added again starts optimized.
        for method in ("nvmf_subsystem_remove_listener", "nvmf_subsystem_add_listener"):
            code, out = rpc(b, method, {"nqn": NQN, "listen_address": address(port_b)})
            r.check(method + " B", code == 0, out)
        r.check_eq("B added again: optimized", {1: "optimized", 5: "optimized"},
                   listener_states(b)[port_b])
        for q in (adm_a, a, adm_b, bq):
            q.close()

        # What is set is kept in the pool: kill -9 and start again finds it. A volume w as
        # namespace 4 in group 7; A inaccessible for every group but group 5 (optimized);
        # B's group 5 non-optimized; a third listener C added with `ana_state`
        # non_optimized. The volumes' namespaces are kept with their groups (the RAM
        # exports' are not restored).
        port_c = free_port()
        r.check("volume w created", b.ctl("volume", "create", "w", "16M").returncode == 0)
        kept = [rpc(b, "nvmf_subsystem_add_ns",
                    {"nqn": NQN, "namespace": {"bdev_name": "w", "nsid": 4, "anagrpid": 7}}),
                set_state(b, port_a, "inaccessible"), set_state(b, port_a, "optimized", 5),
                set_state(b, port_b, "non_optimized", 5),
                rpc(b, "nvmf_subsystem_add_listener",
                    {"nqn": NQN, "listen_address": address(port_c), "ana_state": "non_optimized"})]
        r.check_eq("w in group 7; A inaccessible but group 5; B's group 5 non-optimized; C added "
                   "non-optimized", [0] * 5, [k[0] for k in kept])

        def restart(ports):
            b.proc.send_signal(signal.SIGKILL)
            b.proc.wait()
            b.start()
            return wait_for(lambda: set(ports) <= set(listener_states(b)), 10)

        def states():
            now = listener_states(b)
            return {p: (now[p].get(5), now[p].get(7)) for p in sorted(now)}

        r.check("kill -9 and restart: the three listeners restored",
                restart([port_a, port_b, port_c]), listener_states(b))
        adm_b, bq = nvmeraw.io_queue(port_b, NQN, hostid=b"\xbb" * 16)
        st, ns = adm_b.admin_read(nvmeraw.OP_IDENTIFY, (0, 0, 0, 0, 0, 0), 4096, nsid=3)
        r.check_eq("after kill -9: the volume's namespace is in group 5 again", 5, u32(ns, 92))
        r.check_eq("after kill -9: (group 5, group 7) through A, B and C as they were set",
                   {port_a: ("optimized", "inaccessible"), port_b: ("non_optimized", "optimized"),
                    port_c: ("non_optimized", "non_optimized")}, states())
        adm_a, a = nvmeraw.io_queue(port_a, NQN, hostid=b"\xaa" * 16)
        r.check_eq("A's host reads them in the ANA log page (5 optimized, 7 inaccessible)",
                   {5: (1, [3]), 7: (3, [4])}, ana_log(adm_a)[0])
        st, dnr = command(a, nvmeraw.OP_WRITE, 4, (0, 0, 0, 0, 0, 0), b"\x33" * 4096)
        r.check_eq("A's write to w (group 7): Asymmetric Access Inaccessible", (0x302, False),
                   (st, dnr))
        st, _ = command(a, nvmeraw.OP_WRITE, 3, (0, 0, 0, 0, 0, 0), b"\x33" * 4096)
        r.check_eq("A writes v (group 5, optimized)", 0, st)
        st, _ = command(bq, nvmeraw.OP_WRITE, 4, (0, 0, 0, 0, 0, 0), b"\x33" * 4096)
        r.check_eq("B writes w", 0, st)
        for q in (adm_a, a, adm_b, bq):
            q.close()

        # A optimized again; B removed and added again; C removed: each kept as such.
        steps = [set_state(b, port_a, "optimized")[0]]
        for method, port in (("nvmf_subsystem_remove_listener", port_b),
                             ("nvmf_subsystem_add_listener", port_b),
                             ("nvmf_subsystem_remove_listener", port_c)):
            steps.append(rpc(b, method, {"nqn": NQN, "listen_address": address(port)})[0])
        r.check_eq("A optimized; B removed and added again; C removed", [0] * 4, steps)
        r.check("kill -9 and restart again", restart([port_a, port_b]), listener_states(b))
        r.check_eq("A and B optimized (B added again started afresh), C gone for good",
                   {port_a: ("optimized", "optimized"), port_b: ("optimized", "optimized")},
                   states())
        adm_a, a = nvmeraw.io_queue(port_a, NQN, hostid=b"\xaa" * 16)
        st, _ = command(a, nvmeraw.OP_WRITE, 4, (0, 0, 0, 0, 0, 0), b"\x33" * 4096)
        r.check_eq("A writes w", 0, st)
        for q in (adm_a, a):
            q.close()
        b.check_clean_end(r)


if __name__ == "__main__":
    guarded(main)
