#!/usr/bin/env python3
"""nbd-bench: compare ballast with nbdkit and qemu-nbd over loopback NBD using fio (ioengine=nbd),
or with --client ballast-perf, our pipelined polling NBD client (ballast-perf --nbd).

Run through perf/nbd-bench.sh (see perf/README.md).  One invocation starts each server in turn on
its own 127.0.0.1 port (server pinned to one CPU, fio to another), pre-fills the export, runs every
profile in perf/fio/ REPS times, and reports medians: IOPS, MiB/s, completion-latency percentiles,
and the server's CPU time (utime+stime from /proc/PID/stat) per 100k I/Os.

Only the Python standard library is used.
"""

import argparse
import datetime
import fcntl
import hashlib
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

PERF_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(PERF_DIR)
FIO_DIR = os.path.join(PERF_DIR, "fio")
CLK_TCK = os.sysconf("SC_CLK_TCK")
O_DIRECT = getattr(os, "O_DIRECT", 0o40000)

# Profile order: writes first so the seq-write data is what later reads see; reads in between.
DEFAULT_PROFILES = [
    "randread-4k-qd1",
    "randread-4k-qd32",
    "randread-4k-qd32-4conn",
    "seqread-128k-qd8",
    "randwrite-4k-qd32",
    "seqwrite-128k-qd8",
]

SERVERS = [
    # id, backing, kind
    ("ballast-ram", "ram", "ballast"),
    ("nbdkit-memory", "ram", "nbdkit-memory"),
    # A fully written volume of a pool file on tmpfs: the volume layer over memory.
    ("ballast-volume", "ram", "ballast-volume"),
    ("ballast-file", "file", "ballast"),
    ("nbdkit-file", "file", "nbdkit-file"),
    ("qemu-nbd", "file", "qemu-nbd"),
]
PEER_OF = {"ram": "ballast-ram", "file": "ballast-file"}

_children = []  # Popen objects we started and must clean up


def log(msg):
    ts = datetime.datetime.now().strftime("%H:%M:%S")
    print(f"[{ts}] {msg}", file=sys.stderr, flush=True)


def run_cmd(cmd, timeout=10):
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return (p.stdout + p.stderr).strip()
    except Exception as e:  # noqa: BLE001 - informational only
        return f"unavailable ({e.__class__.__name__})"


def parse_size(s):
    m = re.fullmatch(r"(\d+)([KMGT]?)(i?B)?", s.strip(), re.I)
    if not m:
        raise ValueError(f"bad size {s!r}")
    mult = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m.group(2).upper()]
    return int(m.group(1)) * mult


# ---------------------------------------------------------------------------------------------
# /proc helpers


def proc_cpu_seconds(pid):
    """utime+stime of the whole process (all threads, incl. exited ones) in seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    rest = data[data.rindex(")") + 2:].split()
    # rest[0] is field 3 (state); utime is field 14, stime field 15
    return (int(rest[11]) + int(rest[12])) / CLK_TCK


def sys_cpu_times():
    """Machine-wide CPU seconds from /proc/stat: (user+nice+system+irq+softirq, irq+softirq, steal).

    irq/softirq are included in "busy" because, without CONFIG_IRQ_TIME_ACCOUNTING, softirq work
    (loopback TCP!) done in a task's context counts in that task's utime+stime but is classed as
    softirq in /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ...
    return ((v[0] + v[1] + v[2] + v[5] + v[6]) / CLK_TCK, (v[5] + v[6]) / CLK_TCK,
            (v[7] if len(v) > 7 else 0) / CLK_TCK)


def children_cpu_seconds():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def proc_threads(pid):
    out = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in sorted(tids, key=int):
        info = {"tid": int(tid)}
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                info["comm"] = f.read().strip()
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith("Cpus_allowed_list:"):
                        info["cpus_allowed"] = line.split(":", 1)[1].strip()
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                d = f.read()
            r = d[d.rindex(")") + 2:].split()
            info["last_cpu"] = int(r[36])  # field 39 "processor"
            info["cpu_s"] = (int(r[11]) + int(r[12])) / CLK_TCK
        except (OSError, IndexError, ValueError):
            continue
        out.append(info)
    return out


def page_cache_resident(path):
    """Bytes of path resident in the page cache (util-linux fincore), or None."""
    if not shutil.which("fincore"):
        return None
    try:
        out = subprocess.run(["fincore", "-b", "-n", "-r", "-o", "RES", path], capture_output=True,
                             text=True, timeout=30).stdout.split()
        return int(out[0]) if out else None
    except (subprocess.SubprocessError, ValueError):
        return None


def proc_fd_flags(pid, path):
    """Open flags (octal int) of every fd of pid that refers to path."""
    res = []
    real = os.path.realpath(path)
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return res
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != real:
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                for line in f:
                    if line.startswith("flags:"):
                        res.append(int(line.split()[1], 8))
        except OSError:
            continue
    return res


# ---------------------------------------------------------------------------------------------
# machine description


def machine_info(args):
    cpu_model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_total = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_total = f"{int(line.split()[1]) // 1024} MiB"
    except OSError:
        pass
    info = {
        "hostname": platform.node(),
        "nproc": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "kernel": platform.release(),
        "mem_total": mem_total,
        "scratch_fs": run_cmd(["findmnt", "-n", "-o", "SOURCE,FSTYPE,OPTIONS", "-T", args.scratch]),
        "nbdkit": run_cmd(["nbdkit", "--version"]).splitlines()[0] if shutil.which("nbdkit") else None,
        "qemu_nbd": run_cmd(["qemu-nbd", "--version"]).splitlines()[0] if shutil.which("qemu-nbd") else None,
        "fio": run_cmd(["fio", "--version"]),
        "python": platform.python_version(),
        "ballast_bin": args.ballast_bin,
        "ballast": None,
        "git_head": (run_cmd(["git", "-C", REPO, "rev-parse", "--short", "HEAD"])
                     if subprocess.run(["git", "-C", REPO, "rev-parse", "-q", "--verify", "HEAD"],
                                       capture_output=True).returncode == 0 else "no commits"),
        "git_dirty": bool(run_cmd(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"])),
    }
    if os.access(args.ballast_bin, os.X_OK):
        v = run_cmd([args.ballast_bin, "--version"])
        st = os.stat(getattr(args, "ballast_bin_orig", args.ballast_bin))
        info["ballast"] = (v.splitlines()[0] if v else "?") + " (binary mtime " + \
            datetime.datetime.fromtimestamp(st.st_mtime).isoformat(timespec="seconds") + ")"
    return info


# ---------------------------------------------------------------------------------------------
# servers


def port_free(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def pick_port(start):
    for p in range(start, start + 200):
        if port_free(p):
            return p
    raise RuntimeError(f"no free port near {start}")


def wait_listening(proc, port, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def pin(cpu, cmd, args):
    if args.no_pin or cpu is None:
        return cmd
    return ["taskset", "-c", str(cpu)] + cmd


def server_cmd(kind, port, args, scratch_file, data_dir, aio="io_uring"):
    size = args.size
    if kind == "ballast":
        export = "mem" if scratch_file is None else "disk"
        spec = f"ram:{size}" if scratch_file is None else f"file:{scratch_file}"
        cmd = [args.ballast_bin, "serve", "--data-dir", data_dir,
               "--nbd-listen", f"127.0.0.1:{port}", "--nvmf-listen", f"127.0.0.1:{port + 100}",
               "--cores", "1",
               "--export", f"{export}={spec}"] + args.ballast_args
        return cmd, export
    if kind == "ballast-volume":
        cmd = [args.ballast_bin, "serve", "--data-dir", data_dir,
               "--nbd-listen", f"127.0.0.1:{port}", "--nvmf-listen", f"127.0.0.1:{port + 100}",
               "--cores", "1", "--pool", volume_pool(data_dir)] + args.ballast_args
        return cmd, "vol"
    if kind == "nbdkit-memory":
        return ["nbdkit", "-f", "--exit-with-parent", "-i", "127.0.0.1", "-p", str(port),
                "-e", "mem", "memory", size], "mem"
    if kind == "nbdkit-file":
        # nbdkit 1.32's file plugin has no O_DIRECT: cache=none = page cache + fadvise(DONTNEED)
        # (+ sync_file_range for writes).  The best "uncached" mode this nbdkit offers.
        return ["nbdkit", "-f", "--exit-with-parent", "-i", "127.0.0.1", "-p", str(port),
                "-e", "disk", "file", f"file={scratch_file}", "cache=none"], "disk"
    if kind == "qemu-nbd":
        return ["qemu-nbd", "-t", "-f", "raw", "-x", "disk", "-b", "127.0.0.1", "-p", str(port),
                "-e", "8", "--cache=none", f"--aio={aio}", scratch_file], "disk"
    raise ValueError(kind)


def volume_pool(data_dir):
    """The pool file of a ballast-volume server: on tmpfs, named after its data directory."""
    return os.path.join("/dev/shm", os.path.basename(data_dir) + "-pool.img")


class Server:
    def __init__(self, sid, backing, kind, args, port, scratch_file, data_dir, log_path):
        self.sid, self.backing, self.kind = sid, backing, kind
        self.args, self.port = args, port
        self.scratch_file, self.data_dir, self.log_path = scratch_file, data_dir, log_path
        self.proc = None
        self.cmd = None
        self.export = None
        self.notes = []

    def start(self):
        attempts = ["io_uring", "native"] if self.kind == "qemu-nbd" else [None]
        if self.kind == "ballast-volume":
            pool = volume_pool(self.data_dir)
            subprocess.run([self.args.ballast_bin, "pool", "create", pool, "--size",
                            str(2 * self.args.size_bytes + (1 << 30))],
                           check=True, capture_output=True, timeout=60)
        for aio in attempts:
            cmd, export = server_cmd(self.kind, self.port, self.args, self.scratch_file,
                                     self.data_dir, **({"aio": aio} if aio else {}))
            self.cmd = pin(self.args.server_cpu, cmd, self.args)
            self.export = export
            logf = open(self.log_path, "ab")
            logf.write(f"\n==== {datetime.datetime.now().isoformat()} {' '.join(self.cmd)}\n".encode())
            logf.flush()
            self.proc = subprocess.Popen(self.cmd, stdout=logf, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=self.data_dir)
            logf.close()
            _children.append(self.proc)
            if wait_listening(self.proc, self.port, self.args.start_timeout):
                if self.kind == "ballast-volume":
                    subprocess.run([self.args.ballast_bin, "volume", "create", "vol",
                                    str(self.args.size_bytes), "--data-dir", self.data_dir],
                                   check=True, capture_output=True, timeout=60)
                if aio and aio != attempts[0]:
                    self.notes.append(f"--aio={attempts[0]} failed to start; used --aio={aio}")
                return True
            self.stop()
        return False

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def uri(self):
        return f"nbd://127.0.0.1:{self.port}/{self.export}"

    def stop(self):
        if self.proc is None:
            return None
        rc = self.proc.poll()
        if rc is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                rc = self.proc.wait(timeout=self.args.stop_timeout)
            except subprocess.TimeoutExpired:
                self.notes.append(f"did not exit within {self.args.stop_timeout}s of SIGTERM; killed")
                self.proc.kill()
                rc = self.proc.wait(timeout=10)
        if self.proc in _children:
            _children.remove(self.proc)
        return rc


# ---------------------------------------------------------------------------------------------
# fio


def fio_env(uri, runtime, ramp):
    env = os.environ.copy()
    env.update(IOENGINE="nbd", TARGET=f"uri={uri}", RUNTIME=str(runtime), RAMP=str(ramp))
    return env


def load_fio_json(path):
    with open(path) as f:
        text = f.read()
    i = text.find("{")  # fio may print notices before the JSON document
    if i < 0:
        raise ValueError("no JSON in fio output")
    return json.loads(text[i:])


def run_fio(cmd, env, out_json, timeout, server_pid, ramp, mid=None, extra=None, stdout_json=False):
    """Run fio; returns (fio_json | None, error | None, cpu_measured_s, wall_measured_s, cpu_total_s).

    Server CPU is sampled when the ramp ends and when fio exits; mid() (if given) is called at
    the end of the ramp, while fio's connections are open.  If extra (a dict) is given, it receives
    whole-run CPU accounting: fio's CPU, softirq/steal %, and background_pct = machine-wide
    user+system CPU not used by fio or the server (% of one CPU).  With stdout_json, the client
    prints its JSON (ballast-perf --json) and out_json receives it."""
    cpu_start = proc_cpu_seconds(server_pid)
    sys_start, fio_start = sys_cpu_times(), children_cpu_seconds()
    t_start = time.monotonic()
    errf = open(out_json + ".stderr", "wb")
    outf = open(out_json, "wb") if stdout_json else None
    p = subprocess.Popen(cmd, env=env, stdout=outf or subprocess.DEVNULL, stderr=errf,
                         stdin=subprocess.DEVNULL)
    _children.append(p)
    errf.close()
    if outf:
        outf.close()
    cpu0, t0 = cpu_start, t_start
    try:
        if ramp > 0:
            try:
                p.wait(timeout=ramp)
            except subprocess.TimeoutExpired:
                cpu0, t0 = proc_cpu_seconds(server_pid), time.monotonic()
                if mid:
                    mid()
        elif mid:
            try:
                p.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                mid()
        rc = p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(timeout=10)
        return None, f"{os.path.basename(cmd[0]) if cmd[0] != 'taskset' else os.path.basename(cmd[2])} " \
                     f"timed out after {timeout}s", None, None, None
    finally:
        if p in _children:
            _children.remove(p)
    cpu1, t1 = proc_cpu_seconds(server_pid), time.monotonic()
    sys_end, fio_end = sys_cpu_times(), children_cpu_seconds()
    # whole-run accounting (ramp included) to estimate load from processes outside the benchmark
    wall_total = t1 - t_start
    fio_cpu = fio_end - fio_start
    bg = {"fio_cpu_s": fio_cpu, "wall_total_s": wall_total,
          "softirq_pct": 100.0 * (sys_end[1] - sys_start[1]) / wall_total,
          "steal_pct": 100.0 * (sys_end[2] - sys_start[2]) / wall_total}
    if cpu_start is not None and cpu1 is not None:
        bg["background_pct"] = 100.0 * ((sys_end[0] - sys_start[0]) - fio_cpu - (cpu1 - cpu_start)) / wall_total
    if extra is not None:
        extra.update(bg)
    with open(out_json + ".stderr", errors="replace") as f:
        stderr = f.read().strip()
    cpu_meas = (cpu1 - cpu0) if (cpu0 is not None and cpu1 is not None) else None
    cpu_total = (cpu1 - cpu_start) if (cpu_start is not None and cpu1 is not None) else None
    try:
        data = load_fio_json(out_json)
    except (OSError, ValueError) as e:
        return None, f"fio rc={rc}, unreadable JSON ({e}); stderr: {stderr[-500:]}", cpu_meas, t1 - t0, cpu_total
    if rc != 0:
        return data, f"fio rc={rc}; stderr: {stderr[-500:]}", cpu_meas, t1 - t0, cpu_total
    return data, None, cpu_meas, t1 - t0, cpu_total


def extract(data, direction, numjobs=1):
    job = data["jobs"][0]
    d = job[direction]
    pct = d.get("clat_ns", {}).get("percentile", {})

    def p(key):
        v = pct.get(key)
        return v / 1000.0 if v is not None else None

    return {
        "iops": d["iops"],
        "mib_s": d["bw_bytes"] / (1 << 20),
        "total_ios": d["total_ios"],
        "runtime_ms": d["runtime"],
        "clat_mean_us": d.get("clat_ns", {}).get("mean", 0) / 1000.0,
        "clat_p50_us": p("50.000000"),
        "clat_p99_us": p("99.000000"),
        "clat_p99_9_us": p("99.900000"),
        # group_reporting averages CPU over jobs; x numjobs = load fio put on its CPU
        "fio_cpu_pct": (job.get("usr_cpu", 0) + job.get("sys_cpu", 0)) * numjobs,
        "fio_job_error": job.get("error", 0),
        "short_ios": d.get("short_ios", 0),
    }


def profile_info(profile):
    """(direction 'read'|'write', numjobs) parsed from perf/fio/PROFILE.fio."""
    with open(os.path.join(FIO_DIR, profile + ".fio")) as f:
        text = f.read()
    m = re.search(r"^\s*rw\s*=\s*(\w+)", text, re.M)
    rw = m.group(1) if m else "read"
    n = re.search(r"^\s*numjobs\s*=\s*(\d+)", text, re.M)
    return ("write" if "write" in rw else "read"), (int(n.group(1)) if n else 1)


# ---------------------------------------------------------------------------------------------
# main benchmark


def perf_client_cmd(profile, uri, args):
    """The ballast-perf command running PROFILE (perf/fio/PROFILE.fio's rw, bs, iodepth and
    numjobs: one NBD connection per job) against the export at URI, polling as SPDK's perf
    tool does; fio-like JSON on stdout.  No ramp: ballast-perf measures from its last connect."""
    with open(os.path.join(FIO_DIR, profile + ".fio")) as f:
        text = f.read()

    def opt(name, default):
        m = re.search(r"^\s*%s\s*=\s*(\S+)" % name, text, re.M)
        return m.group(1) if m else default
    m = re.fullmatch(r"nbd://([^/]+)/(.*)", uri)
    jobs = opt("numjobs", "1")
    cmd = [args.perf_bin, "--json", "--nbd", m.group(2), "--addr", m.group(1),
           "--rw", opt("rw", "randread"), "--bs", opt("bs", "4k"), "--qd", opt("iodepth", "1"),
           "--queues", jobs, "--runtime", str(args.runtime)]
    # Polling threads pinned to one client CPU would take turns by preemption: a profile of
    # several connections has the client sleep in its sockets instead.
    return cmd + ([] if args.client_sleeps or jobs != "1" else ["--poll"])


def prepare_scratch_file(path, size):
    if os.path.exists(path):
        os.unlink(path)
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    try:
        os.posix_fallocate(fd, 0, size)
        os.fsync(fd)
    finally:
        os.close(fd)


def drop_caches():
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def bench_server(sid, backing, kind, args, anomalies, results_dir):
    rec = {"id": sid, "backing": backing, "kind": kind, "status": "ok", "runs": {}, "median": {},
           "notes": []}
    scratch_file = None
    if backing == "file":
        scratch_file = os.path.join(args.scratch, "bench-disk.img")
        prepare_scratch_file(scratch_file, args.size_bytes)
        rec["scratch_file"] = scratch_file
    data_dir = tempfile.mkdtemp(prefix=f"{sid}-", dir=args.scratch)
    port = pick_port(args.port_base + [s[0] for s in SERVERS].index(sid))
    log_path = os.path.join(results_dir, "logs", f"{sid}.log")
    if os.path.exists(log_path):
        os.unlink(log_path)
    srv = Server(sid, backing, kind, args, port, scratch_file, data_dir, log_path)
    rec["log"] = os.path.relpath(log_path, REPO)
    if backing == "file":
        rec["caches_dropped_before_start"] = drop_caches()
    try:
        if not srv.start():
            rec["status"] = "failed to start"
            rec["cmd"] = srv.cmd
            anomalies.append(f"{sid}: server failed to start (see {rec['log']})")
            return rec
        rec.update(cmd=srv.cmd, port=port, pid=srv.pid, uri=srv.uri())
        log(f"{sid}: started pid {srv.pid} on {srv.uri()}")

        # ---- pre-fill: one sequential 128k write pass over the whole export, then flush
        if not args.no_prefill:
            out = os.path.join(results_dir, "fio", f"{sid}-prefill.json")
            cmd = pin(args.client_cpu, ["fio", "--name=prefill", "--ioengine=nbd", f"--uri={srv.uri()}",
                                        "--rw=write", "--bs=128k", "--iodepth=8", "--direct=1",
                                        "--end_fsync=1", "--output-format=json", f"--output={out}"], args)
            data, err, cpu, wall, _ = run_fio(cmd, os.environ.copy(), out, args.prefill_timeout, srv.pid, 0)
            if err or data is None:
                anomalies.append(f"{sid}: prefill failed: {err}")
                rec["prefill"] = {"error": err}
            else:
                w = data["jobs"][0]["write"]
                rec["prefill"] = {"bytes": w["io_bytes"], "seconds": wall,
                                  "mib_s": w["bw_bytes"] / (1 << 20), "server_cpu_s": cpu}
                if w["io_bytes"] != args.size_bytes:
                    anomalies.append(f"{sid}: prefill wrote {w['io_bytes']} bytes, export size "
                                     f"{args.size_bytes}")
                log(f"{sid}: prefilled {w['io_bytes'] >> 20} MiB at {rec['prefill']['mib_s']:.0f} MiB/s")
            if backing == "file":
                rec["caches_dropped_after_prefill"] = drop_caches()

        # ---- placement and O_DIRECT are sampled mid-run (servers may open the file / spawn
        # threads per connection); the sample with the most threads is kept.
        seen_bad = set()
        fd_flags = set()

        def sample():
            threads = proc_threads(srv.pid)
            if len(threads) > len(rec.get("threads", [])):
                rec["threads"] = threads
            if not args.no_pin:
                for t in threads:
                    if t.get("cpus_allowed") != str(args.server_cpu):
                        seen_bad.add(f"{t.get('comm')}={t.get('cpus_allowed')}")
            if scratch_file:
                fd_flags.update(proc_fd_flags(srv.pid, scratch_file))

        # ---- measured runs: rep-major order so repetitions of a profile are spread in time
        for rep in range(args.reps):
            for prof in args.profiles:
                if not srv.alive():
                    raise RuntimeError(f"server exited (rc={srv.proc.poll()})")
                out = os.path.join(results_dir, "fio", f"{sid}-{prof}-r{rep}.json")
                perf_client = args.client == "ballast-perf"
                if perf_client:
                    cmd = pin(args.client_cpu, perf_client_cmd(prof, srv.uri(), args), args)
                    env, ramp = os.environ.copy(), 0
                else:
                    cmd = pin(args.client_cpu, ["fio", "--output-format=json", f"--output={out}",
                                                os.path.join(FIO_DIR, prof + ".fio")], args)
                    env, ramp = fio_env(srv.uri(), args.runtime, args.ramp), args.ramp
                timeout = args.runtime + ramp + args.fio_slack
                acct = {}
                data, err, cpu, wall, cpu_total = run_fio(cmd, env, out, timeout, srv.pid,
                                                          ramp, mid=sample, extra=acct,
                                                          stdout_json=perf_client)
                run = {"rep": rep}
                if data is not None:
                    try:
                        rw, numjobs = profile_info(prof)
                        # ballast-perf's CPU is its whole process's already (fio's is per job).
                        run.update(extract(data, rw, 1 if perf_client else numjobs))
                    except (KeyError, IndexError) as e:
                        err = (err or "") + f" bad fio JSON ({e})"
                if not err and run.get("fio_job_error"):
                    err = f"fio job error {run['fio_job_error']}"
                if not err and not run.get("total_ios"):
                    err = "zero I/Os completed"
                if err:
                    run["error"] = err
                    anomalies.append(f"{sid} {prof} rep {rep}: {err}")
                run.update(acct)
                run["server_cpu_s"] = cpu
                run["server_cpu_total_s"] = cpu_total
                run["wall_measured_s"] = wall
                if cpu is not None and run.get("total_ios"):
                    run["server_cpu_s_per_100k_io"] = cpu / run["total_ios"] * 1e5
                    run["server_cpu_pct"] = 100.0 * cpu / wall if wall else None
                rec["runs"].setdefault(prof, []).append(run)
                log(f"{sid} {prof} r{rep}: " + (f"ERROR {err}" if err else
                    f"{run['iops']:.0f} IOPS {run['mib_s']:.1f} MiB/s p99 {run['clat_p99_us']:.1f}us "
                    f"srvcpu {run.get('server_cpu_pct') or 0:.0f}%"))
        if seen_bad:
            anomalies.append(f"{sid}: thread(s) not pinned to CPU {args.server_cpu}: "
                             + ", ".join(sorted(seen_bad)[:8]))
        if scratch_file:
            # ballast keeps an O_DIRECT fd plus a buffered one for unaligned requests: "any"
            rec["scratch_fd_flags"] = sorted(oct(x) for x in fd_flags)
            rec["o_direct"] = any(x & O_DIRECT for x in fd_flags)
            if kind == "ballast" and not rec["o_direct"]:
                anomalies.append(f"{sid}: backing file has no O_DIRECT fd during the runs (fd flags "
                                 f"{rec['scratch_fd_flags']})")
            # page-cache residency after the runs (caches were dropped after the pre-fill): an
            # O_DIRECT server should leave ~nothing cached
            rec["page_cache_resident_bytes"] = page_cache_resident(scratch_file)
            if kind == "ballast" and (rec["page_cache_resident_bytes"] or 0) > args.size_bytes // 100 \
                    and rec.get("caches_dropped_after_prefill"):
                anomalies.append(f"{sid}: {rec['page_cache_resident_bytes'] >> 20} MiB of the backing file "
                                 "is in the page cache after the runs (expected ~0 with O_DIRECT)")
    except Exception as e:  # noqa: BLE001 - keep going with the next server
        rec["status"] = f"error: {e}"
        anomalies.append(f"{sid}: {e}")
        log(f"{sid}: ERROR {e}")
    finally:
        rc = srv.stop()
        rec["exit_code"] = rc
        rec["notes"] += srv.notes
        if kind == "ballast" and rc not in (0, None):
            anomalies.append(f"{sid}: exit code {rc} after SIGTERM (contract says 0)")
        shutil.rmtree(data_dir, ignore_errors=True)
        if kind == "ballast-volume" and os.path.exists(volume_pool(data_dir)):
            os.unlink(volume_pool(data_dir))
        if scratch_file and not args.keep_scratch and os.path.exists(scratch_file):
            os.unlink(scratch_file)
        scan_log(sid, log_path, anomalies, rec)
    # load from outside the benchmark (other processes, e.g. a compiler) makes numbers unreliable
    allruns = [r for runs in rec["runs"].values() for r in runs]
    bgs = [r["background_pct"] for r in allruns if r.get("background_pct") is not None]
    steal = [r["steal_pct"] for r in allruns if r.get("steal_pct") is not None]
    if bgs:
        rec["background_pct_median"] = statistics.median(bgs)
        rec["background_pct_max"] = max(bgs)
        rec["steal_pct_median"] = statistics.median(steal) if steal else None
        if rec["background_pct_median"] > args.max_background or (rec["steal_pct_median"] or 0) > args.max_background:
            anomalies.append(f"{sid}: machine not quiet: background CPU median "
                             f"{rec['background_pct_median']:.0f}% (max {max(bgs):.0f}%), steal "
                             f"{rec['steal_pct_median'] or 0:.0f}% of a CPU during the runs")
    compute_medians(rec, args.max_background)
    return rec


def compute_medians(rec, max_background):
    """Per-profile medians over successful reps, each metric separately.  iops_quiet is the
    median IOPS over "quiet" reps only (background and steal <= max_background % of a CPU)."""
    rec["median"] = {}
    for prof, runs in rec["runs"].items():
        ok = [r for r in runs if "error" not in r]
        if not ok:
            continue
        med = {"reps_ok": len(ok), "reps": len(runs)}
        quiet = [r for r in ok if (r.get("background_pct") or 0) <= max_background
                 and (r.get("steal_pct") or 0) <= max_background]
        med["quiet_reps"] = len(quiet)
        med["iops_quiet"] = statistics.median([r["iops"] for r in quiet]) if quiet else None
        for k in ("iops", "mib_s", "clat_mean_us", "clat_p50_us", "clat_p99_us", "clat_p99_9_us",
                  "server_cpu_s_per_100k_io", "server_cpu_pct", "fio_cpu_pct", "background_pct",
                  "steal_pct", "softirq_pct"):
            vals = [r[k] for r in ok if r.get(k) is not None]
            med[k] = statistics.median(vals) if vals else None
        iops = [r["iops"] for r in ok]
        med["iops_spread_pct"] = (100.0 * (max(iops) - min(iops)) / med["iops"]
                                  if med["iops"] and len(iops) > 1 else None)
        rec["median"][prof] = med


LOG_PATTERNS = re.compile(r"panic|\bERROR\b|\bWARN\b|error|fallback|buffered", re.I)


def scan_log(sid, path, anomalies, rec):
    try:
        with open(path, errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return
    hits = [ln for ln in lines if not ln.startswith("====") and LOG_PATTERNS.search(ln)]
    rec["log_lines"] = len(lines)
    rec["log_suspicious"] = hits[:20]
    if hits:
        anomalies.append(f"{sid}: {len(hits)} suspicious log line(s), first: {hits[0][:200]}")


# ---------------------------------------------------------------------------------------------
# reporting


def fmt(v, digits=1, unit=""):
    if v is None:
        return "—"
    if unit == "k" and v >= 1000:
        return f"{v / 1000:.1f}k"
    return f"{v:.{digits}f}"


def ratio(pair, key):
    """pair[0][key] / pair[1][key], formatted, or "—" where either is missing."""
    if pair is None or not pair[0].get(key) or not pair[1].get(key):
        return "—"
    return f"{pair[0][key] / pair[1][key]:.2f}"


def tables(results, args):
    out = []
    servers = results["servers"]
    for backing, title in (("ram", "RAM backing"), ("file", "File backing (O_DIRECT where supported)")):
        all_ids = [s[0] for s in SERVERS if s[1] == backing and s[0] in servers]
        skipped = [i for i in all_ids if servers[i]["status"].startswith("skipped")]
        ids = [i for i in all_ids if i not in skipped]
        if not all_ids:
            continue
        base = servers.get(PEER_OF[backing])
        out.append(f"### {title}, {args.size} export\n")
        out.append("| profile | server | IOPS | spread | quiet IOPS (n) | MiB/s | p50 µs | p99 µs | p99.9 µs "
                   "| srv CPU s/100k IO | srv CPU % | client CPU % | IOPS ballast/peer | quiet IOPS ballast/peer "
                   "| CPU/IO ballast/peer |")
        out.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        peer_id = next((i for i in ids if not i.startswith("ballast")), None)
        for prof in args.profiles:
            bm = base["median"].get(prof) if base else None
            pm = servers[peer_id]["median"].get(prof) if peer_id else None
            for sid in ids:
                s = servers[sid]
                m = s["median"].get(prof)
                if m is None:
                    out.append(f"| {prof} | {sid} | {s['status'] if s['status'] != 'ok' else 'failed'} "
                               "| | | | | | | | | | | | |")
                    continue
                # ballast/peer: a peer's row against the base ballast server; another ballast
                # configuration's row against the backing's first peer.
                pair = None
                if sid.startswith("ballast") and sid != PEER_OF[backing] and pm:
                    pair = (m, pm)
                elif sid != PEER_OF[backing] and bm:
                    pair = (bm, m)
                r_iops, r_quiet, r_cpu = (ratio(pair, k) for k in (
                    "iops", "iops_quiet", "server_cpu_s_per_100k_io"))
                reps = "" if m["reps_ok"] == m["reps"] else f" ({m['reps_ok']}/{m['reps']} ok)"
                spread = "—" if m["iops_spread_pct"] is None else f"{m['iops_spread_pct']:.0f}%"
                out.append(
                    f"| {prof} | {sid}{reps} | {fmt(m['iops'], 0, 'k')} | {spread} "
                    f"| {fmt(m.get('iops_quiet'), 0, 'k')} ({m.get('quiet_reps', '?')}) "
                    f"| {fmt(m['mib_s'])} | {fmt(m['clat_p50_us'])} | {fmt(m['clat_p99_us'])} "
                    f"| {fmt(m['clat_p99_9_us'])} | {fmt(m['server_cpu_s_per_100k_io'], 3)} "
                    f"| {fmt(m['server_cpu_pct'], 0)} | {fmt(m['fio_cpu_pct'], 0)} | {r_iops} | {r_quiet} "
                    f"| {r_cpu} |")
        for i in ids:
            s = servers[i]
            if s.get("background_pct_median") is not None:
                out.append(f"- {i}: background CPU from other processes, median "
                           f"{max(0, s['background_pct_median']):.0f}% / max "
                           f"{max(0, s['background_pct_max']):.0f}% of a CPU; "
                           f"steal {s.get('steal_pct_median') or 0:.0f}%"
                           + (f"; backing fd O_DIRECT: {'yes' if s.get('o_direct') else 'no'}"
                              if "o_direct" in s else "")
                           + (f"; page cache after runs: {s['page_cache_resident_bytes'] >> 20} MiB"
                              if s.get("page_cache_resident_bytes") is not None else "")
                           + f"; threads: {thread_summary(s.get('threads', []))}")
        for i in skipped:
            out.append(f"\n{i}: {servers[i]['status']}")
        out.append("")
    return "\n".join(out)


def render_markdown(results, args):
    md = "## nbd-bench results (" + results["started"] + ")\n\n" + \
        machine_block(results["machine"], results["config"]) + "\n\n" + tables(results, args)
    md += ("\nRatios: IOPS ballast/peer > 1 means ballast is faster; CPU/IO ballast/peer < 1 means "
           "ballast uses less server CPU per I/O. \"quiet\" = repetitions during which other processes "
           f"used <= {args.max_background:.0f}% of a CPU (n = how many); prefer those columns on a busy "
           "machine.\n")
    if results["anomalies"]:
        md += "\n### Anomalies\n\n" + "\n".join(f"- {a}" for a in results["anomalies"]) + "\n"
    return md


def render_only(path, args):
    """--render: recompute medians and print the report of an existing results JSON."""
    with open(path) as f:
        results = json.load(f)
    cfg = results["config"]
    args.profiles, args.size = cfg["profiles"], cfg["size"]
    for rec in results["servers"].values():
        compute_medians(rec, args.max_background)
    print(render_markdown(results, args))
    return 0


def thread_summary(threads):
    counts = {}
    for t in threads:
        name = re.sub(r"\d+$", "N", t.get("comm", "?"))
        counts[name] = counts.get(name, 0) + 1
    return ", ".join(f"{k}×{v}" if v > 1 else k for k, v in counts.items()) or "?"


def machine_block(mi, cfg):
    return "\n".join([
        f"- machine: {mi['nproc']} CPUs ({mi['cpu_model']}), {mi['mem_total']}, kernel {mi['kernel']}",
        f"- scratch fs: {mi['scratch_fs']}",
        f"- ballast: {mi['ballast'] or 'not found (' + mi['ballast_bin'] + ')'}"
        f"{', sha256 ' + mi['ballast_sha256'][:12] if mi.get('ballast_sha256') else ''}; git {mi['git_head']}"
        f"{' (dirty)' if mi['git_dirty'] else ''}",
        f"- peers: {mi['nbdkit']}; {mi['qemu_nbd']}; client "
        + (f"{mi['fio']} ioengine=nbd" if cfg.get('client', 'fio') == 'fio' else
           "ballast-perf --nbd" + (" (sleeping)" if cfg.get('client_sleeps') else " --poll")),
        f"- runs: runtime {cfg['runtime']}s + ramp {cfg['ramp'] if cfg.get('client', 'fio') == 'fio' else 0}s, "
        f"{cfg['reps']} rep(s), median reported; "
        f"server pinned to CPU {cfg['server_cpu']}, client to CPU {cfg['client_cpu']}"
        f"{' (pinning disabled)' if cfg['no_pin'] else ''}",
    ])


# ---------------------------------------------------------------------------------------------


def main():
    env = os.environ.get
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke test: 1s runs, 1s ramp, 1 rep")
    ap.add_argument("--runtime", type=int, default=int(env("BENCH_RUNTIME", 10)))
    ap.add_argument("--ramp", type=int, default=int(env("BENCH_RAMP", 2)))
    ap.add_argument("--reps", type=int, default=int(env("BENCH_REPS", 3)))
    ap.add_argument("--size", default=env("BENCH_SIZE", "1G"), help="export size (default 1G)")
    ap.add_argument("--servers", default=env("BENCH_SERVERS", ",".join(s[0] for s in SERVERS)),
                    help="comma list of: " + ",".join(s[0] for s in SERVERS))
    ap.add_argument("--profiles", default=env("BENCH_PROFILES", ",".join(DEFAULT_PROFILES)),
                    help="comma list of perf/fio/*.fio basenames")
    ap.add_argument("--ballast-bin", default=env("BALLAST_BIN",
                                                 os.path.join(REPO, "build/cargo/release/ballast")))
    ap.add_argument("--ballast-args", default=env("BALLAST_ARGS", ""),
                    help="extra args for 'ballast serve' (e.g. '--poll-us 50')")
    ap.add_argument("--scratch", default=env("BENCH_SCRATCH", os.path.join(PERF_DIR, "results", "scratch")),
                    help="dir for the backing file (must be on the disk under test)")
    ap.add_argument("--out", default=env("BENCH_OUT", os.path.join(PERF_DIR, "results", "latest.json")))
    ap.add_argument("--port-base", type=int, default=int(env("BENCH_PORT_BASE", 10900)))
    ap.add_argument("--server-cpu", type=int, default=1)
    ap.add_argument("--client-cpu", type=int, default=0)
    ap.add_argument("--no-pin", action="store_true", help="do not use taskset")
    ap.add_argument("--no-prefill", action="store_true")
    ap.add_argument("--keep-scratch", action="store_true")
    ap.add_argument("--max-background", type=float, default=15.0,
                    help="flag runs where other processes used more than this %% of a CPU")
    ap.add_argument("--fio-slack", type=int, default=60, help="fio timeout = runtime+ramp+slack")
    ap.add_argument("--client", choices=("fio", "ballast-perf"), default=env("BENCH_CLIENT", "fio"),
                    help="the measured runs' NBD client: fio's libnbd engine (one request per "
                         "system call), or ballast-perf --nbd (pipelined and batched, polling); "
                         "the pre-fill always uses fio")
    ap.add_argument("--client-sleeps", action="store_true",
                    help="ballast-perf sleeps in its socket instead of polling")
    ap.add_argument("--perf-bin", default=env("BALLAST_PERF_BIN",
                                              os.path.join(REPO, "build/cargo/release/ballast-perf")))
    ap.add_argument("--prefill-timeout", type=int, default=300)
    ap.add_argument("--start-timeout", type=int, default=20)
    ap.add_argument("--stop-timeout", type=int, default=20)
    ap.add_argument("--render", metavar="JSON", help="only print the report of an existing results file")
    args = ap.parse_args()
    if args.render:
        return render_only(args.render, args)

    if args.quick:
        args.runtime, args.ramp, args.reps = 1, 1, 1
    args.size_bytes = parse_size(args.size)
    args.servers = [s for s in args.servers.split(",") if s]
    args.profiles = [p for p in args.profiles.split(",") if p]
    args.ballast_args = args.ballast_args.split()
    args.scratch = os.path.abspath(args.scratch)
    for p in args.profiles:
        if not os.path.exists(os.path.join(FIO_DIR, p + ".fio")):
            ap.error(f"unknown profile {p}")
    for s in args.servers:
        if s not in [x[0] for x in SERVERS]:
            ap.error(f"unknown server {s}")
    if not args.no_pin:
        cpus = os.sched_getaffinity(0)
        if not shutil.which("taskset") or args.server_cpu not in cpus or args.client_cpu not in cpus \
                or args.server_cpu == args.client_cpu:
            log("pinning not possible (taskset missing or CPUs unavailable); running unpinned")
            args.no_pin = True
    for tool in ("fio",):
        if not shutil.which(tool):
            sys.exit(f"{tool} not found")
    if args.client == "ballast-perf" and not os.access(args.perf_bin, os.X_OK):
        sys.exit(f"ballast-perf not found at {args.perf_bin}")

    results_dir = os.path.dirname(os.path.abspath(args.out))
    for d in (results_dir, os.path.join(results_dir, "logs"), os.path.join(results_dir, "fio"), args.scratch):
        os.makedirs(d, exist_ok=True)

    # one run at a time per scratch dir (the backing file and the binary copy live there), and
    # the benchmark is meaningless with two runs competing for the CPUs anyway
    lock_fd = os.open(os.path.join(args.scratch, ".lock"), os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        sys.exit(f"another nbd-bench run holds {args.scratch}/.lock; wait for it to finish")
    main.lock_fd = lock_fd
    # snapshot the binary so both ballast servers run the same build even if it is rebuilt meanwhile
    if os.access(args.ballast_bin, os.X_OK):
        os.makedirs(os.path.join(args.scratch, "bin"), exist_ok=True)
        snap = os.path.join(args.scratch, "bin", "ballast")
        shutil.copy2(args.ballast_bin, snap)
        with open(snap, "rb") as f:
            args.ballast_sha256 = hashlib.sha256(f.read()).hexdigest()
        args.ballast_bin_orig, args.ballast_bin = args.ballast_bin, snap
    mi = machine_info(args)
    if hasattr(args, "ballast_bin_orig"):
        mi["ballast_bin"] = args.ballast_bin_orig
        mi["ballast_sha256"] = args.ballast_sha256
    cfg = {k: getattr(args, k) for k in ("quick", "runtime", "ramp", "reps", "size", "servers", "profiles",
                                          "server_cpu", "client_cpu", "no_pin", "no_prefill",
                                          "ballast_args", "scratch", "client", "client_sleeps")}
    results = {"started": datetime.datetime.now().isoformat(timespec="seconds"), "machine": mi,
               "config": cfg, "servers": {}, "anomalies": []}
    anomalies = results["anomalies"]
    est = len(args.servers) * (len(args.profiles) * args.reps * (args.runtime + args.ramp + 1) + 5)
    log(f"benchmark: {len(args.servers)} servers x {len(args.profiles)} profiles x {args.reps} reps, "
        f"~{est // 60}m{est % 60:02d}s plus pre-fill")

    for sid, backing, kind in SERVERS:
        if sid not in args.servers:
            continue
        missing = None
        if kind.startswith("ballast") and not os.access(args.ballast_bin, os.X_OK):
            missing = f"ballast binary not found at {args.ballast_bin}"
        elif kind.startswith("nbdkit") and not shutil.which("nbdkit"):
            missing = "nbdkit not installed"
        elif kind == "qemu-nbd" and not shutil.which("qemu-nbd"):
            missing = "qemu-nbd not installed"
        if missing:
            log(f"{sid}: skipped: {missing}")
            results["servers"][sid] = {"id": sid, "backing": backing, "kind": kind,
                                       "status": f"skipped: {missing}", "runs": {}, "median": {}}
            continue
        results["servers"][sid] = bench_server(sid, backing, kind, args, anomalies, results_dir)

    results["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    md = render_markdown(results, args)
    results["markdown"] = md
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(md)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    shutil.copy(args.out, os.path.join(results_dir, f"run-{stamp}.json"))
    print(md)
    log(f"wrote {args.out} and {os.path.splitext(args.out)[0]}.md")
    if hasattr(args, "ballast_bin_orig"):
        os.unlink(args.ballast_bin)
        os.rmdir(os.path.dirname(args.ballast_bin))
    try:
        os.rmdir(args.scratch)
    except OSError:
        pass
    return 0


def _cleanup(*_):
    for p in list(_children):
        try:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    p.kill()
        except Exception:  # noqa: BLE001
            pass


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        _cleanup()
