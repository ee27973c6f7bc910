//! Arbitrary journal-block payloads through the record decoder: whatever decodes re-encodes
//! to the same bytes (one encoding per record), each record's counted length is its encoded
//! length, and nothing panics.
#![no_main]
use ballast_volume::records::decode_all;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(records) = decode_all(data) else { return };
    let mut again = Vec::with_capacity(data.len());
    for r in &records {
        let before = again.len();
        r.encode(&mut again);
        assert_eq!(again.len() - before, r.encoded_len(), "{r:?}");
    }
    assert_eq!(again, data, "decoded {} records that encode otherwise", records.len());
});
