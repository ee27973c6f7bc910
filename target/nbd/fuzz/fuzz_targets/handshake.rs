//! Arbitrary client bytes through the whole option-haggling state machine, fed in two pieces.
#![no_main]
use std::sync::Arc;

use ballast_engine::ram::RamDev;
use ballast_nbd::handshake::Handshake;
use ballast_nbd::{Export, ExportTable};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let table = ExportTable::default();
    let dev = Arc::new(RamDev::new(1 << 20));
    let _ = table.add(Export { name: "vol0".into(), description: String::new(), dev, read_only: false });
    let split = data.first().map_or(0, |b| *b as usize).min(data.len());
    let mut hs = Handshake::new();
    let mut out = Vec::new();
    let mut buf = data[..split].to_vec();
    let (used, _) = hs.on_input(&buf, &mut out, &table);
    buf.drain(..used);
    buf.extend_from_slice(&data[split..]);
    let _ = hs.on_input(&buf, &mut out, &table);
});
