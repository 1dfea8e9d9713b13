//! Differential target: the lock-free allocator and the seed replica must agree on every
//! operation sequence, with silent checkers (`streamalloc::fuzzing::run_differential`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use streamalloc::fuzzing::{Op, run_differential};

fuzz_target!(|ops: Vec<Op>| {
    if let Err(e) = run_differential(&ops) {
        panic!("{e}");
    }
});
