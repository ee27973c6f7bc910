#!/usr/bin/python3
"""The systemd unit's ExecStart under a NOTIFY_SOCKET listener, as systemd would run it.

contrib/systemd/ballast.service's ExecStart is run with only its binary path, data directory
(%S/ballast) and listen addresses replaced (a scratch directory, free loopback ports), with
NOTIFY_SOCKET naming a datagram socket this test reads and WATCHDOG_USEC set. Checked: READY=1
arrives, and by then the NBD and NVMe/TCP ports accept connections and the CLI reaches the
daemon; WATCHDOG=1 pings follow at about half the interval; stderr is one JSON object per line
(--log-format json); SIGTERM brings STOPPING=1 and exit status 0. A WATCHDOG_PID naming another
process gets no pings. `systemd-analyze verify` accepts the unit where it is installed.
"""

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from ballast_testlib import Report, ballast_bin, free_port, guarded, port_open  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
UNIT = os.path.join(ROOT, "contrib", "systemd", "ballast.service")
WATCHDOG_USEC = 600_000


def binary():
    return os.path.abspath(ballast_bin())


def exec_start():
    with open(UNIT) as f:
        for line in f:
            if line.startswith("ExecStart="):
                return shlex.split(line[len("ExecStart="):].strip())
    raise RuntimeError("no ExecStart in %s" % UNIT)


def run_unit(r, tmp, env_extra, label):
    """Starts ExecStart; returns (proc, notify socket, ports, stderr path)."""
    nbd, nvmf = free_port(), free_port()
    argv = []
    for a in exec_start():
        a = a.replace("/usr/local/bin/ballast", binary())
        a = a.replace("%S/ballast", os.path.join(tmp, "state"))
        a = a.replace("0.0.0.0:10809", "127.0.0.1:%d" % nbd)
        a = a.replace("0.0.0.0:4420", "127.0.0.1:%d" % nvmf)
        argv.append(a)
    path = os.path.join(tmp, "notify-%s.sock" % label)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.2)
    env = dict(os.environ, NOTIFY_SOCKET=path, WATCHDOG_USEC=str(WATCHDOG_USEC),
               XDG_RUNTIME_DIR=os.path.join(tmp, "run"))
    env.update(env_extra)
    os.makedirs(env["XDG_RUNTIME_DIR"], mode=0o700, exist_ok=True)
    err = os.path.join(tmp, "stderr-%s.log" % label)
    with open(err, "wb") as f:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=f, env=env)
    return proc, sock, (nbd, nvmf), err


def messages(sock, seconds):
    """Notifications received within `seconds`, as (time, text)."""
    out, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            out.append((time.monotonic(), sock.recv(4096).decode()))
        except socket.timeout:
            pass
    return out


def wait_for(sock, key, seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            msg = sock.recv(4096).decode()
        except socket.timeout:
            continue
        if key in msg.split("\n"):
            return msg
    return None


def main(r):
    tmp = tempfile.mkdtemp(prefix="ballast-service.")
    procs = []
    try:
        if shutil.which("systemd-analyze"):
            unit = os.path.join(tmp, "ballast.service")
            with open(UNIT) as f:
                text = f.read().replace("/usr/local/bin/ballast", binary())
            with open(unit, "w") as f:
                f.write(text)
            v = subprocess.run(["systemd-analyze", "verify", unit], capture_output=True,
                               text=True)
            r.check("systemd-analyze verify accepts the unit", v.returncode == 0, v.stderr)
        proc, sock, (nbd, nvmf), err = run_unit(r, tmp, {}, "main")
        procs.append(proc)
        ready = wait_for(sock, "READY=1", 60)
        r.check("READY=1 arrives", ready is not None)
        r.check("READY carries a STATUS line", ready is not None and "STATUS=serving" in ready,
                repr(ready))
        r.check("NBD port accepts at READY", port_open(nbd))
        r.check("NVMe/TCP port accepts at READY", port_open(nvmf))
        cli = subprocess.run([binary(), "volume", "list"], capture_output=True, text=True,
                             env=dict(os.environ, XDG_RUNTIME_DIR=os.path.join(tmp, "run")),
                             cwd=tmp, timeout=30)
        r.check("the CLI finds the daemon (RuntimeDirectory pointer) and lists vol0",
                cli.returncode == 0 and "vol0" in cli.stdout, cli.stdout + cli.stderr)
        pings = [t for t, m in messages(sock, 2.0) if "WATCHDOG=1" in m.split("\n")]
        r.check("WATCHDOG=1 pings at about half of WATCHDOG_USEC (%d in 2 s)" % len(pings),
                4 <= len(pings) <= 10, "%d pings" % len(pings))
        proc.send_signal(signal.SIGTERM)
        stopping = wait_for(sock, "STOPPING=1", 30)
        r.check("STOPPING=1 on SIGTERM", stopping is not None)
        try:
            rc = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = None
        r.check("exit status 0 after SIGTERM", rc == 0, "status %s" % rc)
        with open(err, errors="replace") as f:
            lines = [ln for ln in f.read().splitlines() if ln.strip()]
        bad = []
        for ln in lines:
            try:
                obj = json.loads(ln)
                if "level" not in obj or "fields" not in obj:
                    bad.append(ln)
            except ValueError:
                bad.append(ln)
        r.check("--log-format json: every stderr line is a JSON log object (%d lines)"
                % len(lines), lines and not bad, "\n".join(bad[:5]))
        r.check("no panic", not any("panicked" in ln for ln in lines))
        sock.close()

        proc, sock, _, _ = run_unit(r, tmp, {"WATCHDOG_PID": "1"}, "otherpid")
        procs.append(proc)
        r.check("READY=1 with a foreign WATCHDOG_PID", wait_for(sock, "READY=1", 60) is not None)
        pings = [m for _, m in messages(sock, 1.5) if "WATCHDOG=1" in m.split("\n")]
        r.check("no pings when WATCHDOG_PID names another process", not pings,
                "%d pings" % len(pings))
        proc.send_signal(signal.SIGTERM)
        r.check("second instance exits 0", proc.wait(60) == 0)
        sock.close()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    guarded(main)
