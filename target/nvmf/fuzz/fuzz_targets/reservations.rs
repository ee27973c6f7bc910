//! Reservation commands from four hosts against one namespace: invariants, report bounds.
//! The case itself is `ballast_nvmf::fuzzing::reservations_case`; a command may allocate no
//! more than the longest report.
#![no_main]
use ballast_nvmf::fuzzing::reservations_case;
use ballast_nvmf_fuzz::{AllocMeter, Counting};
use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOC: Counting = Counting;

fuzz_target!(|data: &[u8]| reservations_case(data, &mut AllocMeter));
