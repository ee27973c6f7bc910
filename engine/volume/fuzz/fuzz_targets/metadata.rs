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
    // Payloads, each after its length (u16, little-endian; the first is the checkpoint's,
    // the rest journal blocks').
    let mut rest = data;
    while rest.len() >= 2 {
        let len = usize::from(u16::from_le_bytes([rest[0], rest[1]])).min(rest.len() - 2);
        let (payload, after) = rest[2..].split_at(len);
        rest = after;
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
