#!/bin/bash
# The volume simulator's own test: each deliberate bug of ballast-volume (the `mutant-*`
# features: a commit that skips the data flush, a write that ignores a copy-on-write in flight
# in its cluster, a control operation that applies without waiting for its volume's writes to drain,
# a pool growth that hands out its new clusters before a superblock names them, a deleted or
# rolled-back tree released before its record is durable) is built and
# the simulator run against it; it must fail, and name a seed. The
# simulator itself (10,000 seeded runs over the unmutated code) runs in `cargo test`, and here
# again with small mapping trees.
set -u
cd "$(dirname "$0")/../.."
pass=0 fail=0
for m in drop-flush skip-lock skip-drain grow-early reclaim-early; do
    out=$(BALLAST_SIM_RUNS=${BALLAST_MUTANT_RUNS:-10000} cargo test --release -q \
        -p ballast-volume --features "mutant-$m" --test simulator 2>&1)
    rc=$?
    if ((rc != 0)) && grep -q "seed [0-9]*:" <<<"$out"; then
        echo "PASS: mutant $m caught: $(grep -m1 -o 'seed [0-9]*:.\{0,120\}' <<<"$out")"
        pass=$((pass + 1))
    else
        echo "FAIL: mutant $m not caught by the simulator (rc $rc)"
        tail -20 <<<"$out"
        fail=$((fail + 1))
    fi
done
# The simulator once more with four entries per mapping-tree node (`small-tree`): its volumes
# of a few clusters then have trees of several levels, and resizes, snapshots and checkpoints
# cross them (with 512 they never leave one leaf). It must pass.
out=$(BALLAST_SIM_RUNS=${BALLAST_SIM_RUNS:-10000} cargo test --release -q \
    -p ballast-volume --features small-tree --test simulator 2>&1)
rc=$?
if ((rc == 0)); then
    echo "PASS: simulator with small mapping trees (several levels)"
    pass=$((pass + 1))
else
    echo "FAIL: simulator with small mapping trees (rc $rc)"
    tail -20 <<<"$out"
    fail=$((fail + 1))
fi
# Leave the unmutated library built for whatever runs next.
cargo build --release -q -p ballast-volume >/dev/null 2>&1 || true
echo "$pass passed, $fail failed"
((fail == 0))
