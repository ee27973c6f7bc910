//! Metadata that passed its checksums but makes no sense (damage, or a bug that wrote it):
//! arbitrary payloads loaded into a pool's state as a checkpoint and journal blocks would be,
//! then the state finished and checked as opening a pool does. Loading may refuse; nothing
//! may panic, and a state that loads keeps exact reference counts.
#![no_main]
use ballast_volume::meta::PoolMeta;
use ballast_volume::pool::{layout, PoolGeometry};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let geometry = PoolGeometry {
        cluster_shift: 14,
        journal_blocks: 16,
        pool_uuid: [1; 16],
        max_volumes: 8,
        config_bytes: 4096,
    };
    let sb = layout(1 << 20, &geometry).expect("a valid layout");
    let mut m = PoolMeta::new(sb);
    // Payloads are separated by byte 0xFE (the first is the checkpoint's, the rest blocks).
    for payload in data.split(|&b| b == 0xFE).filter(|p| !p.is_empty()) {
        if m.load(payload).is_err() {
            return;
        }
    }
    m.loaded(0, None);
    let problems: Vec<String> = m
        .check()
        .into_iter()
        .filter(|p| p.contains("refcount") || p.contains("allocat"))
        .collect();
    assert!(problems.is_empty(), "{problems:?}");
});
