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

/// Finding 2: the replica's `begin_capture` asserted (a panic in debug builds) that no
/// free stream was remembered before checking for a capture underway: a second begin
/// during a capture that had freed a block crashed instead of returning
/// `CaptureAlreadyUnderway`.
#[test]
fn second_begin_capture_after_a_captured_free_is_an_error() {
    both(1, |s| {
        let st = s.stream(0);
        s.sim.begin_capture(st).unwrap();
        s.alloc.begin_capture(0).unwrap();
        let p = s.alloc.malloc(0, 4096, st.stream).unwrap();
        s.alloc.free(p).unwrap();
        assert_eq!(s.alloc.begin_capture(0), Err(streamalloc::Error::CaptureAlreadyUnderway));
        s.alloc.end_capture(0, st.stream).unwrap();
        s.sim.end_capture(st).unwrap();
        s.alloc.begin_capture(0).unwrap();
        s.alloc.end_capture(0, st.stream).unwrap();
        s.assert_books();
        s.assert_clean();
    });
}

/// Finding 3: freeing a captured block outside a capture while an earlier CUDA error is
/// pending: the replica warned "captured free outside capture" and then failed on the
/// error; the core (and the seed, which calls `cudaGetLastError` first) fails without
/// warning. The replica now checks first. The retried free warns once.
#[test]
fn captured_free_with_pending_error_fails_before_warning() {
    both(1, |s| {
        let st = s.stream(0);
        s.sim.begin_capture(st).unwrap();
        s.alloc.begin_capture(0).unwrap();
        let p = s.alloc.malloc(0, 4096, st.stream).unwrap();
        s.alloc.end_capture(0, st.stream).unwrap();
        s.sim.end_capture(st).unwrap();
        s.sim.set_sticky_error(0, streamalloc::error::CUDA_ERROR_UNKNOWN);
        assert!(s.alloc.free(p).is_err());
        assert_eq!(s.alloc.warnings().captured_free_outside_capture, 0, "{}", s.kind);
        s.alloc.free(p).unwrap();
        assert_eq!(s.alloc.warnings().captured_free_outside_capture, 1, "{}", s.kind);
        s.assert_books();
        s.assert_clean();
    });
}
