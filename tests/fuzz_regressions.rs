//! Regression tests for what fuzzing found (VERIFY.md lists each finding). Each runs on
//! the lock-free core and on the seed replica.

mod common;

use common::*;
use streamalloc::error::CUDA_ERROR_UNKNOWN;
use streamalloc::sim::SimOp;

/// Finding 1: `cache_info`'s trial block leaked in the driver when its free failed (the
/// whole free memory of the device, as the first trial is `min(free, limit - used)`).
/// Now the block is kept as an orphan and freed at the next `cache_info`, `empty_cache`
/// or driver out-of-memory.
#[test]
fn cache_info_failed_trial_free_is_not_leaked() {
    both(1, |s| {
        let st = s.stream(0);
        s.sim.fail_nth(SimOp::FreeAsync, 1, CUDA_ERROR_UNKNOWN);
        assert!(s.alloc.cache_info(0, st.stream).is_err(), "{}: the failure surfaces", s.kind);
        assert_eq!(s.alloc.used_bytes(0), 0, "{}", s.kind);
        // The next driver OOM frees the orphan and retries: the device is usable.
        let p = s.alloc.malloc(0, (CAPACITY / 2) as usize, st.stream).unwrap();
        assert_eq!(s.sim.live_blocks(0), 1, "{}: orphan freed", s.kind);
        s.alloc.free(p).unwrap();
        s.alloc.empty_cache().unwrap();
        // And cache_info / empty_cache free one too.
        s.sim.fail_nth(SimOp::FreeAsync, 1, CUDA_ERROR_UNKNOWN);
        assert!(s.alloc.cache_info(0, st.stream).is_err());
        assert_eq!(s.sim.live_blocks(0), 1, "{}: orphan held by the driver", s.kind);
        s.alloc.empty_cache().unwrap();
        assert_eq!(s.sim.live_blocks(0), 0, "{}: empty_cache freed the orphan", s.kind);
        s.sim.fail_nth(SimOp::FreeAsync, 1, CUDA_ERROR_UNKNOWN);
        assert!(s.alloc.cache_info(0, st.stream).is_err());
        s.alloc.cache_info(0, st.stream).unwrap();
        assert_eq!(s.sim.live_blocks(0), 0, "{}: cache_info freed the orphan", s.kind);
        s.assert_books();
        s.assert_clean();
    });
}
