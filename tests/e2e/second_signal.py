#!/usr/bin/python3
"""A second SIGTERM while a stop drains ends the daemon at once, and loses no flushed write.

A stop waits (up to ten seconds per core) for connections to finish what they were asked; an
operator or a service manager that asks again means "now". A volume of a pool that commits only
when asked is written and flushed with libnbd; a raw client of ours then asks for 64 MiB of
reads and never reads the replies, so the first SIGTERM's drain has to wait for it. Checked:
after the first signal the daemon is still draining; the second ends it within two seconds,
exit status 128 + SIGTERM, the log saying why; restarted on the same data directory (its
journal replayed: the final commit was skipped), the volume reads back what was flushed, and
`ballast pool check` is exact. Run with /usr/bin/python3 (Debian's python3-libnbd).
"""
import os
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import nbd  # noqa: E402
from ballast_testlib import Ballast, ballast_bin, check_pool_exact, guarded  # noqa: E402
from nbdraw import CMD_READ, nbd_connect, nbd_req  # noqa: E402

MiB = 1 << 20
ARGS = ["--pool", "{data}/pool.img", "--cores", "1", "--commit-interval", "600",
        "--commit-records", "1000000"]


def main(r):
    data = bytes((i * 13 + 5) & 0xFF for i in range(4 * MiB))
    b = Ballast(ARGS)
    pool = os.path.join(b.data_dir, "pool.img")
    subprocess.run([ballast_bin(), "pool", "create", pool, "--size", "256M"], check=True,
                   capture_output=True)
    with b:
        r.check("volume v created", b.ctl("volume", "create", "v", "64M").returncode == 0)
        h = nbd.NBD()
        h.connect_uri(b.uri("v"))
        h.pwrite(data, 8 * MiB)
        h.flush()
        h.shutdown()

        stuck = nbd_connect(b.port, "v", rcvbuf=4096)
        stuck.sendall(b"".join(nbd_req(CMD_READ, i, (i % 32) * MiB, MiB) for i in range(64)))
        time.sleep(0.5)  # the reads are taken and their replies fill the socket

        b.proc.send_signal(signal.SIGTERM)
        time.sleep(1.5)
        r.check("after one SIGTERM the stop is still draining (a client holds replies)",
                b.alive(), b.log_tail())
        t0 = time.monotonic()
        b.proc.send_signal(signal.SIGTERM)
        try:
            status = b.proc.wait(10)
        except subprocess.TimeoutExpired:
            status = None
        took = time.monotonic() - t0
        r.check("the second SIGTERM ends it within 2 s (took %.2f s)" % took,
                status is not None and took < 2.0)
        r.check_eq("exit status 128 + SIGTERM", 128 + signal.SIGTERM, status)
        r.check("the log says why", "second signal while stopping" in b.log_tail(20),
                b.log_tail(20))
        stuck.close()

        b.start()  # the same data directory: the journal is replayed
        h = nbd.NBD()
        h.connect_uri(b.uri("v"))
        back = h.pread(len(data), 8 * MiB)
        h.shutdown()
        r.check("restarted, the volume reads back what was flushed", back == data)
        b.check_clean_end(r)
        check_pool_exact(r, pool)


if __name__ == "__main__":
    guarded(main)
