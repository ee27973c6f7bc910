//! Arbitrary request headers (compact and extended) through decode and validation.
#![no_main]
use ballast_nbd::codec::{decode_request, Framing};
use ballast_nbd::transmission::{classify, Session};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for framing in [Framing::Simple, Framing::Structured, Framing::Extended] {
        if let Ok(req) = decode_request(data, framing) {
            let session = Session {
                size_bytes: 1 << 30,
                read_only: data.len() % 2 == 0,
                framing,
                meta_allocation: true,
                meta_bitmap: data.len() % 3 == 0,
                max_payload: 32 << 20,
            };
            let _ = classify(&req, &session);
        }
    }
});
