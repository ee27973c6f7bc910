//! H2CData headers against a write transfer: data is never accepted outside it.
//! The case itself is `ballast_nvmf::fuzzing::h2c_sequence_case`; decoding may allocate no more
//! than the PDU it decodes.
#![no_main]
use ballast_nvmf::fuzzing::h2c_sequence_case;
use ballast_nvmf_fuzz::{AllocMeter, Counting};
use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOC: Counting = Counting;

fuzz_target!(|data: &[u8]| {
    h2c_sequence_case(data, &mut AllocMeter);
});
