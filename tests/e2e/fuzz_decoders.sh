#!/bin/bash
# The wire decoders of both front-ends and the volume layer's media decoders under libFuzzer
# for a bounded time (tests/fuzz.sh: BALLAST_FUZZ_SECONDS per target, default 20); skips with
# a "SKIP:" line where no toolchain can build the fuzz targets.
exec "$(dirname "$0")/../fuzz.sh" "$@"
