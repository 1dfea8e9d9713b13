//! The driver lane: one thread at a time per device inside `cuMemAllocAsync` /
//! `cuMemFreeAsync`.
//!
//! The CUDA driver serializes these calls on a lock of its own, and under contention
//! that lock collapses (measured in the brief: 0.6 M pairs/s on one thread, a quarter of
//! that summed over 16). A short spin lock in user space in front of it keeps the
//! driver's lock uncontended and hands the lane over without a futex sleep and wake.
//! Only driver-tier calls take the lane; bookkeeping stays lock-free.

use crossbeam::utils::CachePadded;
use std::sync::atomic::{AtomicBool, Ordering};

/// Spins before yielding the CPU while the lane is taken.
const SPINS_BEFORE_YIELD: u32 = 128;

/// A per-device spin lock around driver calls.
pub(crate) struct Lane {
    busy: CachePadded<AtomicBool>,
}

struct Held<'a>(&'a AtomicBool);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        // Release: pairs with the Acquire of the next holder's exchange, so driver calls
        // in the lane are ordered one after the other.
        self.0.store(false, Ordering::Release);
    }
}

impl Lane {
    pub(crate) fn new() -> Self {
        Lane { busy: CachePadded::new(AtomicBool::new(false)) }
    }

    /// Runs `f` alone in the lane.
    #[inline]
    pub(crate) fn run<R>(&self, f: impl FnOnce() -> R) -> R {
        let mut spins = 0;
        while self
            .busy
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            // Test before test-and-set: wait on a shared copy of the line.
            while self.busy.load(Ordering::Relaxed) {
                if spins < SPINS_BEFORE_YIELD {
                    spins += 1;
                    std::hint::spin_loop();
                } else {
                    std::thread::yield_now();
                }
            }
        }
        let _held = Held(&self.busy);
        f()
    }
}
