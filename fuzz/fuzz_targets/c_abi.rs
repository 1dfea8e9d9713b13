//! C ABI target: SKELETON. The C ABI (`src/capi`: `streamalloc_alloc`,
//! `streamalloc_free`, `streamalloc_record_stream`, `streamalloc_base_alloc`, ...) is
//! being built on branch `capi` and was not on `main` when this target was written.
//!
//! TODO(capi merged): add `streamalloc::fuzzing::run_c_abi(&ops)`, which drives the
//! `extern "C"` functions over a simulated backend (`streamalloc_init`, then the ops
//! mapped to their C calls, `streamalloc_reset` between inputs) and compares each step
//! with `run_differential`'s oracle (the seed replica): null for size 0, null plus
//! `streamalloc_last_error_code()` for errors, no panic across the boundary. Then call it
//! here instead of the differential run below.
//!
//! Until then the target decodes the same input as `ops` and runs the differential
//! oracle, so it builds, runs and keeps a corpus in the same format.
#![no_main]

use libfuzzer_sys::fuzz_target;
use streamalloc::fuzzing::{Op, run_differential};

fuzz_target!(|ops: Vec<Op>| {
    if let Err(e) = run_differential(&ops) {
        panic!("{e}");
    }
});
