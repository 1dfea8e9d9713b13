//! The seed's warnings, through the `log` facade. "Once" warnings fire once per
//! allocator; counts of what was emitted are kept so tests can hold that to account.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// How many times each warning was emitted by one allocator.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct WarningCounts {
    /// S4: an uncaptured block freed during a capture (deferred). Once.
    pub uncaptured_free_during_capture: u64,
    /// S4: a captured block freed outside a capture (allowed). Every time.
    pub captured_free_outside_capture: u64,
    /// S6: record_stream on the block's creation stream. Once.
    pub record_on_creation_stream: u64,
    /// S12: reset of accumulated stats, which are not kept. Once.
    pub reset_accumulated_stats: u64,
}

#[derive(Default)]
struct Once {
    fired: AtomicBool,
    emitted: AtomicU64,
}

impl Once {
    fn fire(&self, emit: impl FnOnce()) {
        // Relaxed swap: exactly one caller sees `false`, whatever the interleaving.
        if !self.fired.swap(true, Ordering::Relaxed) {
            self.emitted.fetch_add(1, Ordering::Relaxed);
            emit();
        }
    }
}

/// The warnings of one allocator.
#[derive(Default)]
pub(crate) struct Warnings {
    uncaptured_free: Once,
    captured_free: AtomicU64,
    record_creation: Once,
    reset_accumulated: Once,
}

impl Warnings {
    pub(crate) fn uncaptured_free_during_capture(&self, ptr: crate::DevicePtr) {
        self.uncaptured_free.fire(|| {
            log::warn!(
                "free() was called on an uncaptured allocation during graph capture \
                 (address = {ptr}). This may be benign, for example, a tensor in the capture \
                 might happen to shadow an unrelated temporary from before the capture. \
                 However, if the block freed here IS used by the capture, freeing it is an \
                 error, and may cause illegal memory accesses or memory corruption during \
                 graph replay. Its free is deferred until no capture is underway."
            )
        });
    }

    pub(crate) fn captured_free_outside_capture(&self, ptr: crate::DevicePtr) {
        self.captured_free.fetch_add(1, Ordering::Relaxed);
        log::warn!(
            "Attempting uncaptured free of a captured allocation with address {ptr}. \
             This is technically allowed, but may indicate you are losing the last \
             user-visible handle through which the allocation can be accessed, so you'll \
             have no way to view the data after future replays of the owning graph."
        );
    }

    pub(crate) fn record_on_creation_stream(&self) {
        self.record_creation.fire(|| {
            log::warn!(
                "Called record_stream on a block whose creation stream matches the recorded \
                 stream. This is unnecessary and has no effect."
            )
        });
    }

    pub(crate) fn reset_accumulated_stats(&self) {
        self.reset_accumulated
            .fire(|| log::warn!("For streamalloc, reset_accumulated_stats has no effect."));
    }

    pub(crate) fn counts(&self) -> WarningCounts {
        WarningCounts {
            uncaptured_free_during_capture: self.uncaptured_free.emitted.load(Ordering::Relaxed),
            captured_free_outside_capture: self.captured_free.load(Ordering::Relaxed),
            record_on_creation_stream: self.record_creation.emitted.load(Ordering::Relaxed),
            reset_accumulated_stats: self.reset_accumulated.emitted.load(Ordering::Relaxed),
        }
    }
}
