//! Fault target: driver failures at fuzzer-chosen calls must surface as errors and leave
//! exact books (`streamalloc::fuzzing::run_faults`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use streamalloc::fuzzing::{FaultsInput, run_faults};

fuzz_target!(|input: FaultsInput| {
    if let Err(e) = run_faults(&input.ops, &input.faults) {
        panic!("{e}");
    }
});
