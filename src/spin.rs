//! A test-and-set spin lock: the stream caches' lock and the block map's shard locks
//! (model-checked under loom: `src/tests/loom_cache.rs`).

use crate::sync::{AtomicBool, Ordering, UnsafeCell, spin_hint};

/// A test-and-set spin lock. In the common case one thread uses a stream (or a map
/// shard) and takes its lock uncontended: one compare-and-swap to lock and a
/// plain store to unlock (a `std` mutex's unlock is a read-modify-write, to wake
/// sleepers). Critical sections are a few list or table operations; a waiter yields after a
/// short spin.
pub(crate) struct SpinLock<T> {
    locked: AtomicBool,
    value: UnsafeCell<T>,
}

// Safety: the lock gives one thread at a time access to `value` (acquire on lock,
// release on unlock), so sharing the lock shares `T` only as a `Mutex` would.
unsafe impl<T: Send> Sync for SpinLock<T> {}

/// Access to a [`SpinLock`]'s value; unlocks on drop.
pub(crate) struct SpinGuard<'a, T> {
    lock: &'a SpinLock<T>,
}

impl<T> SpinLock<T> {
    pub(crate) fn new(value: T) -> Self {
        SpinLock { locked: AtomicBool::new(false), value: UnsafeCell::new(value) }
    }

    #[inline(always)]
    pub(crate) fn lock(&self) -> SpinGuard<'_, T> {
        // Acquire: pairs with the Release store of the previous holder's unlock.
        if self
            .locked
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            self.lock_contended();
        }
        SpinGuard { lock: self }
    }

    /// `lock` after a failed first try: spin, then yield, until the lock is taken.
    #[cold]
    #[inline(never)]
    fn lock_contended(&self) {
        let mut spins = 0u32;
        // Acquire: as in `lock`.
        while self
            .locked
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            while self.locked.load(Ordering::Relaxed) {
                spins += 1;
                if spins < 64 {
                    spin_hint();
                } else {
                    crate::sync::spin_wait();
                }
            }
        }
    }
}

impl<T> std::ops::Deref for SpinGuard<'_, T> {
    type Target = T;
    #[inline]
    fn deref(&self) -> &T {
        // Safety: the guard exists only while this thread holds the lock.
        self.lock.value.with(|p| unsafe { &*p })
    }
}

impl<T> std::ops::DerefMut for SpinGuard<'_, T> {
    #[inline]
    fn deref_mut(&mut self) -> &mut T {
        // Safety: the guard exists only while this thread holds the lock, and `&mut
        // self` makes this the only reference through it.
        self.lock.value.with_mut(|p| unsafe { &mut *p })
    }
}

impl<T> Drop for SpinGuard<'_, T> {
    #[inline]
    fn drop(&mut self) {
        // Release: what the holder wrote is visible to the next holder's Acquire.
        self.lock.locked.store(false, Ordering::Release);
    }
}
