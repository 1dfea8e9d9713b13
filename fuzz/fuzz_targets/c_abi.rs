//! C ABI target: the `extern "C"` functions (`src/capi`) with arbitrary sizes, devices,
//! pointers, streams, fractions and out-pointers, over a simulated backend. Nothing may
//! panic across the boundary, errors must be reported, held pointers stay valid.
#![no_main]

use libfuzzer_sys::fuzz_target;
use streamalloc::fuzzing::{CAbiOp, run_c_abi};

fuzz_target!(|ops: Vec<CAbiOp>| {
    if let Err(e) = run_c_abi(&ops) {
        panic!("{e}");
    }
});
