//! Arbitrary client bytes through the whole option-haggling state machine, fed in two pieces,
//! in each TLS mode (the second byte picks it; an allow-listed export; a STARTTLS step is
//! followed by a TLS session opening with an identity, so the post-upgrade paths run too).
#![no_main]
use std::sync::Arc;

use ballast_engine::ram::RamDev;
use ballast_nbd::handshake::{Handshake, Step, TlsMode};
use ballast_nbd::{Export, ExportTable};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let table = ExportTable::default();
    let dev = Arc::new(RamDev::new(1 << 20));
    let _ = table.add(Export { name: "vol0".into(), description: String::new(), dev, read_only: false });
    table.set_allowed("vol0", vec!["alice".into()]);
    let split = data.first().map_or(0, |b| *b as usize).min(data.len());
    let mode = match data.get(1).map_or(0, |b| b % 3) {
        0 => TlsMode::Off,
        1 => TlsMode::On,
        _ => TlsMode::Require,
    };
    let mut hs = Handshake::with_tls(1 << 20, mode);
    let mut out = Vec::new();
    let mut buf = data[..split].to_vec();
    let (used, step) = hs.on_input(&buf, &mut out, &table);
    if matches!(step, Step::StartTls) {
        hs.on_tls_open(Some("alice".into()));
    }
    buf.drain(..used);
    buf.extend_from_slice(&data[split..]);
    let _ = hs.on_input(&buf, &mut out, &table);
});
