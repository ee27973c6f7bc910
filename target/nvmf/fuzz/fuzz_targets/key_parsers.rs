//! Key and identity texts: `NVMeTLSkey-1:..`, `DHHC-1:..` and TLS PSK identities. The case
//! itself is `ballast_nvmf::auth::fuzzing::key_parsers_case`.
#![no_main]
use ballast_nvmf::auth::fuzzing::key_parsers_case;
use ballast_nvmf_fuzz::{AllocMeter, Counting};
use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOC: Counting = Counting;

fuzz_target!(|data: &[u8]| key_parsers_case(data, &mut AllocMeter));
