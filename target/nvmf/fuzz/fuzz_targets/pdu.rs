//! A host byte stream through the common header, its checks and every PDU type's decoder.
//! The case itself is `ballast_nvmf::fuzzing::pdu_case`; decoding may allocate no more
//! than the PDU it decodes.
#![no_main]
use ballast_nvmf::fuzzing::pdu_case;
use ballast_nvmf_fuzz::{AllocMeter, Counting};
use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOC: Counting = Counting;

fuzz_target!(|data: &[u8]| pdu_case(data, &mut AllocMeter));
