//! The one place that chooses between `std` and loom synchronization types.
//!
//! Under `--cfg streamalloc_loom` (a crate-specific cfg, so a user's `--cfg loom` does not
//! switch this crate) the protocol pieces ([`crate::epoch`], [`crate::budget`]) are built
//! on loom's types and model-checked; otherwise they use `std`'s.

#[cfg(not(streamalloc_loom))]
pub(crate) use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
#[cfg(not(streamalloc_loom))]
pub(crate) use std::sync::{Mutex, MutexGuard};

#[cfg(streamalloc_loom)]
pub(crate) use loom::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
#[cfg(streamalloc_loom)]
pub(crate) use loom::sync::{Mutex, MutexGuard};

/// Yields while spinning on a condition another thread will change.
pub(crate) fn spin_wait() {
    #[cfg(streamalloc_loom)]
    loom::thread::yield_now();
    #[cfg(not(streamalloc_loom))]
    std::thread::yield_now();
}

/// Locks a mutex, ignoring poisoning: the data behind our mutexes stays consistent
/// across a panic (they guard initialization and capture transitions, whose state is
/// written last).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}
