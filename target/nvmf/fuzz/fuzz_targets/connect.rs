//! Fabrics Connect capsules: SQE, connect data (NQNs), the registry lookups.
//! The case itself is `ballast_nvmf::fuzzing::connect_case`; decoding may allocate no more
//! than the PDU it decodes.
#![no_main]
use ballast_nvmf::fuzzing::connect_case;
use ballast_nvmf_fuzz::{AllocMeter, Counting};
use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOC: Counting = Counting;

fuzz_target!(|data: &[u8]| connect_case(data, &mut AllocMeter));
