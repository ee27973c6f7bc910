//! ICReq: framing, decode, round trip, and the digests the ICResp grants.
//! The case itself is `ballast_nvmf::fuzzing::icreq_case`; decoding may allocate no more
//! than the PDU it decodes.
#![no_main]
use ballast_nvmf::fuzzing::icreq_case;
use ballast_nvmf_fuzz::{AllocMeter, Counting};
use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOC: Counting = Counting;

fuzz_target!(|data: &[u8]| icreq_case(data, &mut AllocMeter));
