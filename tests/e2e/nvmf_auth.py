#!/usr/bin/python3
"""DH-HMAC-CHAP on live queues, with a raw host (tests/nvmeraw.py) that computes its responses
as Linux's host does (NULL DH group, SHA-256, a DHHC-1:00 secret: no transform):
- a host whose key the subsystem has must authenticate its admin queue before anything else
  (Authentication Required, with Do Not Retry, as nvmet sends it);
- re-authentication of a queue older than the handshake deadline (Linux's host does it when its
  secret is written in sysfs) is not cut off by that deadline: it has its own;
- a key rotated over RPC (the host added again with a new key, or SPDK's
  nvmf_subsystem_set_keys) is the one a re-authentication proves, on the same queue; the old one
  fails; a re-authentication left unfinished ends the queue at the handshake deadline;
- nvmf_subsystem_get_qpairs reports the admin queue's hash and group;
- a failed authentication ends the queue once the host has its Failure1, as nvmet and SPDK do;
- an I/O queue takes its id only once authenticated: a stranger without the key who connects
  one with the host's NQN and controller id keeps nobody's queue out;
- all of it logged at DEBUG (log_set_level), and no key appears in the log in any form.
Run with /usr/bin/python3.
"""
import base64
import hashlib
import hmac
import json
import os
import struct
import sys
import time
import zlib

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import nvmeraw as n  # noqa: E402
from ballast_testlib import Ballast, closed_by_peer, guarded  # noqa: E402

NQN = "nqn.2026-12.dev.ballast:auth"
SEND, RECEIVE = 0x05, 0x06
CDW10 = (0xe9 << 24) | (0x01 << 16) | (0x01 << 8)  # SECP, SPSP1, SPSP0
AUTH_REQUIRED = 0x191


def dhhc(key):
    """The key as `nvme gen-dhchap-key` prints it (no transform)."""
    return "DHHC-1:00:%s:" % base64.b64encode(key + zlib.crc32(key).to_bytes(4, "little")).decode()


class AuthHost:
    """An admin queue of a controller of NQN (or I/O queue `qid` of controller `cntlid`), and
    DH-HMAC-CHAP over it."""

    def __init__(self, port, qid=0, cntlid=0xFFFF):
        self.q = n.Host(port, timeout=10)
        self.q.handshake()
        self.connect_status, dw0 = self.q.try_connect(NQN, qid=qid, cntlid=cntlid)
        self.cntlid = dw0 & 0xFFFF
        self.atr = bool(dw0 & (1 << 17))
        self.tid = 0

    def send(self, payload):
        cid = self.q.next_cid()
        self.q.send(n.capsule(n.sqe(n.FABRICS, cid, sgl_len=len(payload), sgl_type=n.SGL_INCAPSULE,
                                    cdw=(CDW10, len(payload), 0, 0, 0, 0), fctype=SEND), payload))
        return self.q.response()[1]

    def receive(self, length=4096):
        return self.q.read_command(n.sqe(n.FABRICS, self.q.next_cid(), sgl_len=length,
                                         cdw=(CDW10, length, 0, 0, 0, 0), fctype=RECEIVE))

    def negotiate(self):
        self.tid += 1
        d = bytearray(64)
        d[0], d[2], d[3] = 1, 1, 1      # DH-HMAC-CHAP; one hash, one group
        d[4], d[34] = 1, 0              # SHA-256; the NULL DH group
        return self.send(struct.pack("<BBHHBB", 0, 0, 0, self.tid, 0, 1) + bytes(d))

    def finish(self, key):
        """After a Negotiate: Challenge, Reply with R1 from `key`, then the controller's answer
        ("success", "failure", or what else came)."""
        st, ch = self.receive()
        if st != 0 or len(ch) < 16 or ch[:2] != b"\x01\x01":
            return "no challenge (status 0x%x, %r)" % (st, ch[:8])
        hl, seq = ch[6], struct.unpack("<I", ch[12:16])[0]
        c1 = ch[16:16 + hl]
        r1 = hmac.new(key, c1 + struct.pack("<IHB", seq, self.tid, 0) + b"HostHost" +
                      n.HOSTNQN.encode() + b"\0" + NQN.encode(), hashlib.sha256).digest()
        reply = struct.pack("<BBHHBBBBHI", 1, 2, 0, self.tid, 32, 0, 0, 0, 0, 0) + r1 + bytes(32)
        if self.send(reply) != 0:
            return "reply refused"
        st, ans = self.receive()
        if st == 0 and ans[:2] == b"\x01\x03":
            return "success"
        if st == 0 and ans[:2] == b"\x00\xf1":
            return "failure"
        return "status 0x%x %r" % (st, ans[:8])

    def authenticate(self, key):
        st = self.negotiate()
        return self.finish(key) if st == 0 else "negotiate refused 0x%x" % st

    def identify(self):
        """Identify Controller: its status and Do Not Retry."""
        st, _ = self.q.admin_read(n.OP_IDENTIFY, (1, 0, 0, 0, 0, 0), 4096)
        return st, self.q.dnr

    def close(self):
        self.q.close()


def error_sqids(h):
    """The queue ids of the entries in `h`'s controller's Error Information log (log 01h)."""
    st, page = h.q.admin_read(n.OP_GET_LOG_PAGE, (1 | 1023 << 16, 0, 0, 0, 0, 0), 4096)
    if st != 0:
        raise AssertionError("error log: status 0x%x" % st)
    entries = [page[i:i + 64] for i in range(0, len(page), 64)]
    return [struct.unpack_from("<H", e, 8)[0] for e in entries if struct.unpack_from("<Q", e)[0]]


def main(r):
    with Ballast(["--export", "mem=ram:16M", "--handshake-timeout", "2"]) as b:
        port = b.nvmf_port()

        def rpc(method, params):
            p = b.ctl("rpc", method, json.dumps(params))
            if p.returncode != 0:
                raise AssertionError("%s: %s" % (method, p.stderr.strip()))
            return json.loads(p.stdout) if p.stdout.strip() else None

        # Every component at DEBUG (SPDK's log_set_level): the keys must stay out of the log
        # even then (checked at the end).
        rpc("log_set_level", {"level": "DEBUG"})
        keys = {name: os.urandom(32) for name in ("k1", "k2", "k3", "wrong")}
        for name, key in keys.items():
            path = os.path.join(b.tmp, name + ".key")
            with open(path, "w") as f:
                f.write(dhhc(key))
            os.chmod(path, 0o600)
            rpc("keyring_file_add_key", {"name": name, "path": path})
        rpc("nvmf_create_subsystem", {"nqn": NQN})
        rpc("nvmf_subsystem_add_ns", {"nqn": NQN, "namespace": {"bdev_name": "mem"}})
        rpc("nvmf_subsystem_add_listener", {"nqn": NQN, "listen_address": {
            "trtype": "tcp", "adrfam": "ipv4", "traddr": "127.0.0.1", "trsvcid": str(port)}})
        rpc("nvmf_subsystem_add_host", {"nqn": NQN, "host": n.HOSTNQN, "dhchap_key": "k1"})

        h = AuthHost(port)
        r.check("Connect asks the host to authenticate (ATR)", h.connect_status == 0 and h.atr)
        r.check_eq("nvmf_subsystem_get_qpairs: the admin queue is authenticating, no auth yet",
                   [(0, "authenticating", None)],
                   [(q["qid"], q["state"], q.get("auth"))
                    for q in rpc("nvmf_subsystem_get_qpairs", {"nqn": NQN})])
        st, dnr = h.identify()
        r.check("before authenticating: Authentication Required, with Do Not Retry (as nvmet)",
                st == AUTH_REQUIRED and dnr, "status 0x%x, DNR %s" % (st, dnr))
        r.check_eq("the host authenticates with its key", "success", h.authenticate(keys["k1"]))
        h.q.enable()
        r.check_eq("then commands run", (0, False), h.identify())
        r.check_eq("nvmf_subsystem_get_qpairs says how the admin queue authenticated (SPDK's)",
                   [(0, "enabled", {"state": "completed", "digest": "sha256", "dhgroup": "null"})],
                   [(q["qid"], q["state"], q.get("auth"))
                    for q in rpc("nvmf_subsystem_get_qpairs", {"nqn": NQN})])

        # Past the 2 s handshake deadline, the host re-authenticates (new secret in sysfs).
        time.sleep(3)
        st = h.negotiate()
        time.sleep(1.2)  # several ticks of the admin queue mid-transaction
        st2, dnr = h.identify()
        r.check("mid re-authentication: Authentication Required, with Do Not Retry",
                st == 0 and st2 == AUTH_REQUIRED and dnr, "negotiate 0x%x, identify 0x%x" % (st, st2))
        r.check_eq("a re-authentication after the handshake deadline is not cut off by it",
                   "success", h.finish(keys["k1"]))
        r.check_eq("... and the queue serves", (0, False), h.identify())

        # The key rotates: the host is added again with k2; re-authentication proves k2.
        rpc("nvmf_subsystem_add_host", {"nqn": NQN, "host": n.HOSTNQN, "dhchap_key": "k2"})
        r.check_eq("after a rotation over RPC, re-authenticating with the new key succeeds on the "
                   "same queue", "success", h.authenticate(keys["k2"]))
        # SPDK's own rotation method: nvmf_subsystem_set_keys.
        rpc("nvmf_subsystem_set_keys", {"nqn": NQN, "host": n.HOSTNQN, "dhchap_key": "k3"})
        stale = AuthHost(port)
        r.check_eq("after nvmf_subsystem_set_keys, the old key fails on a new connection",
                   "failure", stale.authenticate(keys["k2"]))
        stale.close()
        r.check_eq("... and the new key re-authenticates the same queue", "success",
                   h.authenticate(keys["k3"]))
        # A re-authentication has a deadline too: one started and never finished (the queue
        # refuses everything meanwhile) ends the queue at the 2 s handshake deadline.
        t0 = time.monotonic()
        st = h.negotiate()
        dropped = st == 0 and closed_by_peer(h.q.s, 8)
        took = time.monotonic() - t0
        r.check("a re-authentication left unfinished is dropped at its deadline (%.1fs)" % took,
                dropped and took >= 1.5, "negotiate 0x%x" % st)
        h.close()

        # A failed authentication ends the queue once the host has its Failure1.
        bad = AuthHost(port)
        r.check_eq("a wrong key: Failure1", "failure", bad.authenticate(keys["wrong"]))
        r.check("... and the target closes the queue", closed_by_peer(bad.q.s, 3))
        bad.close()
        old = AuthHost(port)
        r.check_eq("the rotated-out key fails on a new connection", "failure",
                   old.authenticate(keys["k1"]))
        old.close()
        good = AuthHost(port)
        r.check_eq("a new connection with the current key authenticates", "success",
                   good.authenticate(keys["k3"]))
        good.q.enable()
        # An I/O queue takes its id only once it has authenticated: a stranger who knows the
        # host's NQN and the controller's id (a small number) but not the key holds nothing —
        # before, its Connect took qid 1 and the host's own was refused (and its close would
        # have freed the id of a queue it did not own).
        stranger = AuthHost(port, qid=1, cntlid=good.cntlid)
        r.check("a stranger's I/O queue 1, with the host's NQN, is asked to authenticate",
                stranger.connect_status == 0 and stranger.atr,
                "status 0x%x" % stranger.connect_status)
        io = AuthHost(port, qid=1, cntlid=good.cntlid)
        r.check("the host's own I/O queue 1 connects meanwhile", io.connect_status == 0,
                "status 0x%x" % io.connect_status)
        r.check_eq("... and authenticates", "success", io.authenticate(keys["k3"]))
        refused = [stranger.q.read_command(n.sqe(n.OP_READ, stranger.q.next_cid(), nsid=1,
                                                 sgl_len=4096))[0] for _ in range(3)]
        r.check_eq("the stranger's reads: Authentication Required", [AUTH_REQUIRED] * 3, refused)
        r.check_eq("... none of them in the host's Error Information log (its queue 1 made none)",
                   [], [e for e in error_sqids(good) if e == 1])
        stranger.close()
        time.sleep(0.3)  # the stranger's close is handled: it must free nothing of the host's
        late = AuthHost(port, qid=1, cntlid=good.cntlid)
        r.check("qid 1 is the host's now: another Connect for it is refused",
                late.connect_status == 0x182, "status 0x%x" % late.connect_status)
        late.close()
        st, _ = io.q.read_command(n.sqe(n.OP_READ, io.q.next_cid(), nsid=1, sgl_len=4096))
        r.check_eq("the host's I/O queue reads, the stranger gone", 0, st)
        r.check("nvmf_subsystem_get_qpairs lists it, authenticated",
                any(q["qid"] == 1 and (q.get("auth") or {}).get("state") == "completed"
                    for q in rpc("nvmf_subsystem_get_qpairs", {"nqn": NQN})))
        io.close()
        # Taking the host off the subsystem ends what it connected while allowed (as SPDK's
        # nvmf_subsystem_remove_host disconnects it), and its key goes with it.
        t0 = time.monotonic()
        rpc("nvmf_subsystem_remove_host", {"nqn": NQN, "host": n.HOSTNQN})
        gone = closed_by_peer(good.q.s, 5)
        r.check("nvmf_subsystem_remove_host ends the host's live controller (%.1fs)"
                % (time.monotonic() - t0), gone)
        good.close()
        r.check("... and the removed host's new Connect is refused",
                n.connect_status(port, NQN) != 0)
        # Removing a key from the keyring revokes it at once (SPDK: ENOKEY to every later
        # use): its hosts are refused and disconnected; adding it again admits them with it.
        rpc("nvmf_subsystem_add_host", {"nqn": NQN, "host": n.HOSTNQN, "dhchap_key": "k3"})
        live = AuthHost(port)
        r.check_eq("host added back with k3 authenticates", "success", live.authenticate(keys["k3"]))
        live.q.enable()
        rpc("keyring_file_remove_key", {"name": "k3"})
        r.check("keyring_file_remove_key ends the live controller authenticated with it",
                closed_by_peer(live.q.s, 5))
        live.close()
        r.check("... and its host is refused at Connect while the key is gone",
                n.connect_status(port, NQN) != 0)
        rpc("keyring_file_add_key", {"name": "k3", "path": os.path.join(b.tmp, "k3.key")})
        back = AuthHost(port)
        r.check_eq("the key added again admits the host with it", "success",
                   back.authenticate(keys["k3"]))
        back.close()
        r.check("no panics", not b.panics(), "\n".join(b.panics()[:5]))
        with open(b.log, encoding="utf-8", errors="replace") as f:
            log = f.read()
        r.check("the log was written at DEBUG (the refused reply's public values among it)",
                "DH-HMAC-CHAP: reply refused; the exchange's public values" in log)
        # The key as its DHHC-1 text, a run of that text's base64 (key || CRC), its hex, and
        # its own base64 cut before the padding.
        forms = lambda key: (dhhc(key), dhhc(key)[10:50], key.hex(),  # noqa: E731
                             base64.b64encode(key).decode()[:40])
        shown = [name for name, key in keys.items() if any(f in log for f in forms(key))]
        r.check_eq("no key appears in the log at DEBUG, in any form (DHHC-1 text, hex, base64)",
                   [], shown)


if __name__ == "__main__":
    guarded(main)
