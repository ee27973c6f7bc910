"""Shared helpers for ballast's Python end-to-end tests (run them with /usr/bin/python3).

    from ballast_testlib import Ballast, Report
    r = Report()
    with Ballast(["--export", "a=ram:64M"]) as b:   # b.port, b.uri("a"), b.data_dir, b.log
        r.check("something", cond, "detail")
        ...
        r.check_eq("exit status", 0, b.stop())
    r.finish()           # prints "N passed, M failed", exits 1 if M > 0

Environment: BALLAST_BIN (default <repo>/build/cargo/release/ballast), BALLAST_KEEP_TMP.
"""
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The NQN prefix of the subsystems the daemon and `ballast nvmf create NAME` make.
NQN_PREFIX = "nqn.2026-11.dev.ballast:"

def ballast_bin():
    return os.environ.get("BALLAST_BIN") or os.path.join(
        REPO_ROOT, "build", "cargo", "release", "ballast")


def port_free(port):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


_HANDED_OUT = set()


def free_port():
    """A port nothing listens on, never one this process was given before: two picks for
    one daemon (its NBD and NVMe/TCP listeners) must differ though neither is bound yet."""
    import random
    for _ in range(200):
        p = random.randint(20000, 31999)
        if p not in _HANDED_OUT and port_free(p):
            _HANDED_OUT.add(p)
            return p
    raise RuntimeError("no free port")


def port_open(port, timeout=1.0):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


class Report:
    def __init__(self):
        self.passed = 0
        self.failed = 0

    def ok(self, what):
        self.passed += 1
        print("PASS: " + what, flush=True)

    def bad(self, what, detail=""):
        self.failed += 1
        print("FAIL: " + what + (" -- " + str(detail) if detail != "" else ""), flush=True)

    def check(self, what, cond, detail=""):
        if cond:
            self.ok(what)
        else:
            self.bad(what, detail)
        return bool(cond)

    def check_eq(self, what, expected, actual):
        return self.check(what, expected == actual, "expected %r, got %r" % (expected, actual))

    def run(self, what, fn, *args, **kw):
        """Run fn; an exception counts as a failure (with its message)."""
        try:
            res = fn(*args, **kw)
        except Exception as e:  # noqa: BLE001
            self.bad(what, "%s: %s" % (type(e).__name__, e))
            return None
        self.ok(what)
        return res if res is not None else True

    def finish(self):
        print("%d passed, %d failed" % (self.passed, self.failed), flush=True)
        sys.exit(1 if self.failed else 0)


class Ballast:
    """A `ballast serve` in a scratch data dir on a free 127.0.0.1 port.

    "{data}" in args is replaced by the data directory's path."""

    def __init__(self, args=(), data_dir=None, start_timeout=10.0):
        self.args = list(args)
        self.tmp = tempfile.mkdtemp(prefix="ballast-pytest.")
        self.data_dir = data_dir or os.path.join(self.tmp, "data")
        os.makedirs(self.data_dir, exist_ok=True)
        self.log = os.path.join(self.tmp, "ballast.log")
        self.rpc_sock = os.path.join(self.data_dir, "ballast.sock")
        self.proc = None
        self.port = None
        self.start_timeout = start_timeout

    def start(self):
        exe = ballast_bin()
        if not os.access(exe, os.X_OK):
            raise RuntimeError("ballast binary %s missing (build it or set BALLAST_BIN)" % exe)
        env = dict(os.environ, NO_COLOR="1")
        try:
            help_text = subprocess.run([exe, "serve", "--help"], capture_output=True, text=True,
                                       timeout=30).stdout
        except (OSError, subprocess.TimeoutExpired):
            help_text = ""
        for _ in range(5):
            self.port = free_port()
            args = [a.replace("{data}", self.data_dir) for a in self.args]
            # other listeners this binary has get free ports too, so daemons can run side by side
            for opt in ("--nvmf-listen",):
                if opt in help_text and opt not in args:
                    args = [opt, "127.0.0.1:%d" % free_port()] + args
            with open(self.log, "ab") as logf:
                logf.write(("=== serve %s on %d\n" % (" ".join(args), self.port)).encode())
                logf.flush()
                self.proc = subprocess.Popen(
                    [exe, "serve", "--data-dir", self.data_dir,
                     "--nbd-listen", "127.0.0.1:%d" % self.port,
                     "--rpc-socket", self.rpc_sock] + args,
                    stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, env=env)
            deadline = time.monotonic() + self.start_timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                if os.path.exists(self.rpc_sock) and port_open(self.port):
                    return self
                time.sleep(0.1)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
                raise RuntimeError("ballast did not accept connections within %ss:\n%s"
                                   % (self.start_timeout, self.log_tail()))
            if "address already in use" not in self.log_tail(3).lower():
                raise RuntimeError("ballast exited with %s:\n%s"
                                   % (self.proc.returncode, self.log_tail()))
        raise RuntimeError("could not find a port ballast could bind")

    def uri(self, name=""):
        return "nbd://127.0.0.1:%d/%s" % (self.port, name)

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout=30.0):
        """SIGTERM, wait; returns the exit status (None if it had to be SIGKILLed)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return None
        return self.proc.returncode

    def ctl(self, *args, timeout=30):
        """Run the control CLI (`ballast export add ...`); returns CompletedProcess."""
        argv = [ballast_bin()] + list(args) + ["--rpc-socket", self.rpc_sock]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)

    def rpc(self, method, params):
        """One control method through `ballast rpc`: (exit status, its output and errors)."""
        import json
        p = self.ctl("rpc", method, json.dumps(params))
        return p.returncode, (p.stdout + p.stderr).strip()

    def lvols(self):
        """`bdev_lvol_get_lvols` by volume name; raises if the daemon refuses."""
        import json
        code, out = self.rpc("bdev_lvol_get_lvols", {})
        if code != 0:
            raise AssertionError("bdev_lvol_get_lvols: " + out)
        return {v["name"]: v for v in json.loads(out)}

    def lvstore(self):
        """The pool's `bdev_lvol_get_lvstores` entry; raises if the daemon refuses."""
        import json
        code, out = self.rpc("bdev_lvol_get_lvstores", {})
        if code != 0:
            raise AssertionError("bdev_lvol_get_lvstores: " + out)
        return json.loads(out)[0]

    def read_volume(self, name, size, chunk=4 << 20):
        """Bytes 0..size of export `name`, read through libnbd (the caller's `nbd` module:
        tests run by /usr/bin/python3)."""
        import nbd
        h = nbd.NBD()
        h.connect_uri(self.uri(name))
        data = b"".join(h.pread(min(chunk, size - off), off) for off in range(0, size, chunk))
        h.shutdown()
        return data

    def write_volume(self, name, offset, length, data_at, chunk=4 << 20):
        """Writes `data_at(off, n)` over bytes offset..offset+length of export `name` through
        libnbd, `chunk` bytes a request, then flushes."""
        import nbd
        h = nbd.NBD()
        h.connect_uri(self.uri(name))
        for off in range(offset, offset + length, chunk):
            n = min(chunk, offset + length - off)
            h.pwrite(data_at(off, n), off)
        h.flush()
        h.shutdown()

    def reactors(self):
        """The per-core statistics (`ballast stats --json`: "reactors"); raises if the daemon
        does not answer."""
        import json
        out = self.ctl("stats", "--json")
        if out.returncode != 0:
            raise RuntimeError("ballast stats failed: " + out.stderr)
        return json.loads(out.stdout)["reactors"]

    def counter(self, name):
        """A per-core counter of `ballast stats --json`, summed over the cores (0 if absent)."""
        return sum(c.get(name, 0) for c in self.reactors())

    def nvmf_export(self, name, export, block_size=None):
        """Serves `export` as namespace 1 of a new subsystem (any host) on the daemon's
        NVMe/TCP port, through the CLI; `name` is its NQN, or what follows the daemon's
        prefix. Returns the NQN; raises naming the step that failed."""
        nqn = name if name.startswith("nqn.") else NQN_PREFIX + name
        add_ns = ["nvmf", "add-ns", nqn, export]
        if block_size:
            add_ns += ["--block-size", str(block_size)]
        for args in (["nvmf", "create", nqn, "--allow-any-host"], add_ns,
                     ["nvmf", "add-listener", nqn, "127.0.0.1:%d" % self.nvmf_port()]):
            p = self.ctl(*args)
            if p.returncode != 0:
                raise AssertionError("ballast %s: %s" % (" ".join(args), p.stderr.strip()))
        return nqn

    def nvmf_port(self):
        """The NVMe/TCP port `start` gave the daemon (its command line is in the log)."""
        port = None
        with open(self.log) as f:
            for line in f:
                if "--nvmf-listen 127.0.0.1:" in line:
                    port = int(line.split("--nvmf-listen 127.0.0.1:")[1].split()[0])
        return port

    def check_clean_end(self, r):
        """The checks a suite ends with: the daemon lived, exits 0 on SIGTERM, logged no
        panic (its log's tail printed if anything failed)."""
        r.check("daemon still alive", self.alive(), self.log_tail(20))
        r.check_eq("ballast exits 0 on SIGTERM", 0, self.stop())
        r.check("server log has no panic", not self.panics(), self.panics()[:3])
        if r.failed:
            print("---- server log tail ----\n" + self.log_tail(30))

    def panics(self):
        """Lines of the server log that report a panic."""
        try:
            with open(self.log, errors="replace") as f:
                return [ln.rstrip() for ln in f if "panicked" in ln]
        except OSError:
            return []

    def log_tail(self, n=30):
        try:
            with open(self.log, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.__exit__(None, None, None)
            raise

    def __exit__(self, *exc):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if os.environ.get("BALLAST_KEEP_TMP"):
            print("(kept %s)" % self.tmp, file=sys.stderr)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)
        return False


def closed_by_peer(s, within):
    """True if the server closes socket `s` within `within` seconds (what it sends first is
    read and dropped)."""
    s.settimeout(within)
    try:
        while True:
            if not s.recv(65536):
                return True
    except socket.timeout:
        return False
    except OSError:
        return True


def wait_for(cond, timeout, step=0.1):
    """Polls `cond` every `step` seconds until it holds or `timeout` passes; its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return cond()


def rss_mib(pid):
    """Resident memory of process `pid`, in MiB (0.0 if it cannot be read)."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def on_disk(path):
    """Whether `path` is on a filesystem that is not memory (its files go through the ring)."""
    out = subprocess.run(["stat", "-f", "-c", "%T", path], capture_output=True, text=True)
    return out.returncode == 0 and out.stdout.strip() not in ("tmpfs", "ramfs")


def disk_scratch(r, name):
    """A fresh directory `name`-PID on a disk filesystem (/tmp, else <repo>/build), for exports
    whose files must go through the ring; None (a failed check) if there is none."""
    for base in ("/tmp", os.path.join(REPO_ROOT, "build")):
        if os.path.isdir(base) and on_disk(base):
            scratch = os.path.join(base, "%s-%d" % (name, os.getpid()))
            os.makedirs(scratch, exist_ok=True)
            r.ok("a directory on a disk filesystem: %s" % scratch)
            return scratch
    r.bad("a directory on a disk filesystem for the exports")
    return None


def piece_pattern(offset, length, tag):
    """A pattern telling 4 KiB pieces apart: each filled with its number's two low bytes and
    the two bytes of `tag`; `offset` and `length` in whole pieces."""
    out = bytearray()
    for p in range(offset // 4096, (offset + length) // 4096):
        out += bytes([p & 0xFF, (p >> 8) & 0xFF, tag[0], tag[1]]) * 1024
    return bytes(out)


def pool_daemon(size, args=("--cores", "2")):
    """A `Ballast` serving a pool of `size` (e.g. "256M") made in its data directory, and
    the pool's path (made now; the daemon starts on `with`)."""
    b = Ballast(["--pool", "{data}/pool.img"] + list(args))
    pool = os.path.join(b.data_dir, "pool.img")
    subprocess.run([ballast_bin(), "pool", "create", pool, "--size", size], check=True,
                   capture_output=True)
    return b, pool


def check_pool_exact(r, pool):
    """`ballast pool check POOL` (offline, the daemon stopped) exits 0: every reference exact."""
    chk = subprocess.run([ballast_bin(), "pool", "check", pool], capture_output=True, text=True)
    r.check("pool check is exact afterwards", chk.returncode == 0, chk.stdout[-400:])


def guarded(main):
    """Run main(report); an unexpected exception is a failure, and the summary is printed."""
    r = Report()
    # `timeout` sends SIGTERM: turn it into SystemExit so `with Ballast(...)` cleans up.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        main(r)
    except SystemExit:
        raise
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        r.bad("test script raised unexpectedly", "%s: %s" % (type(e).__name__, e))
    r.finish()
