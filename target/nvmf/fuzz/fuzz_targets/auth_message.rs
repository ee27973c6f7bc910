//! DH-HMAC-CHAP AUTH_Send/AUTH_Receive payloads: the message decoder, re-encoding, and the
//! controller state machine fed the bytes as a Reply. The case itself is
//! `ballast_nvmf::auth::fuzzing::auth_message_case`; decoding may allocate no more than the
//! payload (plus a constant).
#![no_main]
use ballast_nvmf::auth::fuzzing::auth_message_case;
use ballast_nvmf_fuzz::{AllocMeter, Counting};
use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOC: Counting = Counting;

fuzz_target!(|data: &[u8]| auth_message_case(data, &mut AllocMeter));
