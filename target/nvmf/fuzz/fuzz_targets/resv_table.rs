//! A reservation table as kept in the pool (PTPL): decoding arbitrary bytes.
//! The case itself is `ballast_nvmf::fuzzing::resv_table_case`.
#![no_main]
use ballast_nvmf::fuzzing::resv_table_case;
use ballast_nvmf_fuzz::{AllocMeter, Counting};
use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOC: Counting = Counting;

fuzz_target!(|data: &[u8]| resv_table_case(data, &mut AllocMeter));
