//! Used-byte accounting against the memory-fraction limit (S3, S7), in atomics.
//!
//! A reservation is made by compare-and-swap *before* the driver call and given back if
//! the call fails, so two threads can never both pass the limit check with bytes the
//! other has already claimed (no load-then-add).

use crate::sync::{AtomicU64, Ordering};

/// One device's bytes in live allocations and its user limit.
pub(crate) struct Budget {
    used: AtomicU64,
    limit: AtomicU64,
}

impl Budget {
    /// No bytes used, no limit (S2).
    pub(crate) fn new() -> Self {
        Budget { used: AtomicU64::new(0), limit: AtomicU64::new(u64::MAX) }
    }

    /// Claims `size` bytes if `used + size <= limit`; on refusal returns the bytes in use.
    ///
    /// Orderings: the CAS is the only writer path that can grow `used`, so every claim
    /// sees every earlier claim or release (RMWs on one location are totally ordered);
    /// `Relaxed` suffices because the counter guards no other data. The limit is read
    /// `Relaxed`: a concurrent `set_limit` takes effect for claims that read it after.
    pub(crate) fn reserve(&self, size: u64) -> Result<(), u64> {
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            let limit = self.limit.load(Ordering::Relaxed);
            if used.saturating_add(size) > limit {
                return Err(used);
            }
            match self.used.compare_exchange_weak(
                used,
                used + size,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(()),
                Err(now) => used = now,
            }
        }
    }

    /// Gives back `size` bytes claimed earlier.
    pub(crate) fn release(&self, size: u64) {
        let before = self.used.fetch_sub(size, Ordering::Relaxed);
        debug_assert!(before >= size, "budget released more than it reserved");
    }

    /// Bytes in live allocations.
    pub(crate) fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// The user limit.
    pub(crate) fn limit(&self) -> u64 {
        self.limit.load(Ordering::Relaxed)
    }

    /// Sets the user limit (S7). Bytes already in use are not affected.
    pub(crate) fn set_limit(&self, limit: u64) {
        self.limit.store(limit, Ordering::Relaxed);
    }
}
