#!/usr/bin/python3
"""Small libnbd I/O helper for the shell tests (run with /usr/bin/python3).

  nbdio.py put URI FILE OFFSET          write FILE's bytes at OFFSET (chunks of 4 MiB), then flush
  nbdio.py put-noflush URI FILE OFFSET  the same without the flush
  nbdio.py get URI OFFSET LENGTH OUT    read LENGTH bytes at OFFSET into OUT
  nbdio.py size URI                     print the export size
  nbdio.py hold URI READY GO [SECONDS]  connect, write+verify 1 MiB, touch READY, wait for GO to
                                        exist (max SECONDS, default 30), then write+verify again
                                        on the same connection; exit 0 if all I/O worked
"""
import os
import sys
import time

import nbd

CHUNK = 4 << 20


def connect(uri):
    h = nbd.NBD()
    h.connect_uri(uri)
    return h


def put(uri, path, offset, flush=True):
    h = connect(uri)
    off = int(offset)
    with open(path, "rb") as f:
        while True:
            buf = f.read(CHUNK)
            if not buf:
                break
            h.pwrite(buf, off)
            off += len(buf)
    if flush and h.can_flush():
        h.flush()
    h.shutdown()


def get(uri, offset, length, out):
    h = connect(uri)
    off, left = int(offset), int(length)
    with open(out, "wb") as f:
        while left > 0:
            n = min(CHUNK, left)
            f.write(h.pread(n, off))
            off += n
            left -= n
    h.shutdown()


def rw_check(h, seed):
    data = (bytes([seed & 0xFF]) + os.urandom(4095)) * 256
    h.pwrite(data, seed * (1 << 20))
    if h.pread(len(data), seed * (1 << 20)) != data:
        raise SystemExit("read back differs")


def hold(uri, ready, go, seconds="30"):
    h = connect(uri)
    rw_check(h, 1)
    open(ready, "w").close()
    deadline = time.monotonic() + float(seconds)
    while not os.path.exists(go):
        if time.monotonic() > deadline:
            raise SystemExit("timed out waiting for " + go)
        time.sleep(0.05)
    rw_check(h, 2)
    h.flush()
    h.shutdown()


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "put":
        put(*args)
    elif cmd == "put-noflush":
        put(*args, flush=False)
    elif cmd == "get":
        get(*args)
    elif cmd == "size":
        h = connect(args[0])
        print(h.get_size())
        h.shutdown()
    elif cmd == "hold":
        hold(*args)
    else:
        raise SystemExit("unknown command " + cmd)


if __name__ == "__main__":
    main()
