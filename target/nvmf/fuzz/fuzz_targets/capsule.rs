//! Admin and I/O capsules: SQE decode, admin commands and property get/set.
//! The case itself is `ballast_nvmf::fuzzing::capsule_case`; decoding may allocate no more
//! than the PDU it decodes, an admin command no more than the PDU, the data the host's SGL
//! asks for and one Identify-sized page.
#![no_main]
use ballast_nvmf::fuzzing::capsule_case;
use ballast_nvmf_fuzz::{AllocMeter, Counting};
use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOC: Counting = Counting;

fuzz_target!(|data: &[u8]| capsule_case(data, &mut AllocMeter));
