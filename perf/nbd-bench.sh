#!/usr/bin/env bash
# Compare ballast with nbdkit and qemu-nbd over loopback NBD (fio ioengine=nbd).
# Usage: perf/nbd-bench.sh [--quick] [--runtime S] [--ramp S] [--reps R] [--servers a,b] [--profiles x,y] ...
# See perf/README.md.  Results: perf/results/latest.{json,md}
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec python3 "$here/nbd_bench.py" "$@"
