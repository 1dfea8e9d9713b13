//! The front cache: per-(device, stream) free lists of blocks by size class, in front of
//! the driver.
//!
//! ```text
//!   thread ──memo──▶ StreamCache (device 0, stream A) ─┐ mutex, owned in practice by
//!                    ┌─ class 0 (512 B)   [p, q, ...]   │ the one thread that uses A
//!                    ├─ class 1 (640 B)   [...]         │
//!                    ├─ ...                             │
//!                    └─ class 68 (64 MiB) [...]         │
//!                    credit: bytes reserved in the device budget, not live
//! ```
//!
//! A block freed on stream A is handed out again on stream A with no driver call: stream
//! order makes that safe, exactly as the driver's own pool reuses on the same stream.
//! Blocks are never handed to another stream, so no cross-stream ordering is needed.
//!
//! Accounting keeps the seed's meaning: `used` is bytes in live allocations. Each stream
//! cache holds *credit*, bytes claimed in the device's `Budget` but not live: a hit
//! spends credit, a free into the cache earns it back, and only when the credit runs
//! out or piles up does the cache claim or return a `CACHE_CREDIT` chunk. So the hot
//! path touches no line another thread writes, and the limit stays exact: a refused
//! claim makes the exact path drain every cache's credit back before it reports
//! out-of-memory. Cached bytes are published to a device total only when a stream
//! cache's count drifts by `PUBLISH_STEP`.
//!
//! Blocks go back to the driver (over budget, on an out-of-memory retry, on
//! `empty_cache`, when the allocator drops) after a device synchronize and on the
//! device's unifying stream, never on the stream they were cached for: that stream may
//! have been destroyed by its owner meanwhile.

use crate::types::Stream;
use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Largest block the cache keeps; larger ones go straight back to the driver.
pub(crate) const MAX_CACHED: u64 = 64 << 20;
/// Size classes: 512 B, then four per power of two up to `MAX_CACHED`.
pub(crate) const CLASSES: usize = 1 + 4 * 17;
/// A stream cache publishes its cached bytes to the device total when they moved by
/// this much since the last publish, so the shared total is touched rarely (the
/// benchmark's cached bytes swing by a few MiB per thread).
pub(crate) const PUBLISH_STEP: u64 = 16 << 20;

/// The size class of `size` (1..=MAX_CACHED): its index and the class's block size.
/// Four classes per power of two bound the waste below 25%; the benchmark's sizes
/// (512 B, 4 KiB, 64 KiB, 256 KiB, 1 MiB, 1.5 MiB) are classes exactly.
#[inline]
pub(crate) fn class_of(size: u64) -> Option<(usize, u64)> {
    if size == 0 || size > MAX_CACHED {
        return None;
    }
    if size <= 512 {
        return Some((0, 512));
    }
    let k = 63 - (size - 1).leading_zeros() as u64; // 2^k < size <= 2^(k+1), k >= 9
    let step = 1u64 << (k - 2);
    let m = size.div_ceil(step); // 5..=8
    Some((1 + 4 * (k as usize - 9) + (m as usize - 5), m * step))
}

/// The size of class `idx`.
pub(crate) fn class_size(idx: usize) -> u64 {
    if idx == 0 {
        return 512;
    }
    let k = (idx - 1) / 4 + 9;
    let m = (idx - 1) % 4 + 5;
    (m as u64) << (k - 2)
}

/// Credit a stream cache takes from the device budget at a time (and keeps at most
/// twice of): claimed against the limit, not live.
pub(crate) const CACHE_CREDIT: u64 = 16 << 20;

/// The free lists of one (device, stream).
pub(crate) struct Lists {
    pub(crate) free: [Vec<u64>; CLASSES],
    /// Bytes (class sizes) held in `free`.
    pub(crate) bytes: u64,
    /// Bytes claimed in the device budget and not live: a hit spends them, a free into
    /// the cache earns them back, so neither touches the budget's atomics.
    pub(crate) credit: u64,
    /// `bytes` as last published to the device total.
    pub(crate) published: u64,
    pub(crate) hits: u64,
    pub(crate) misses: u64,
}

/// One (device, stream)'s cache.
pub(crate) struct StreamCache {
    pub(crate) stream: Stream,
    lists: SpinLock<Lists>,
    /// `Lists::credit` as last written under the lock, for `used_bytes` to read without
    /// it (Relaxed: a plain store on the owner's line; exact once operations are done).
    pub(crate) credit: AtomicU64,
}

impl StreamCache {
    pub(crate) fn new(stream: Stream) -> Self {
        StreamCache {
            stream,
            lists: SpinLock::new(Lists {
                free: std::array::from_fn(|_| Vec::new()),
                bytes: 0,
                credit: 0,
                published: 0,
                hits: 0,
                misses: 0,
            }),
            credit: AtomicU64::new(0),
        }
    }

    /// Locks the lists. Uncontended in the common case (one thread per stream); never
    /// held across a driver call or while another cache's lock is taken.
    #[inline]
    pub(crate) fn lock(&self) -> SpinGuard<'_, Lists> {
        self.lists.lock()
    }

    /// Publishes the credit for `used_bytes` (call under the lock after changing it).
    #[inline]
    pub(crate) fn mirror_credit(&self, lists: &Lists) {
        self.credit.store(lists.credit, Ordering::Relaxed);
    }
}

/// A test-and-set spin lock: the stream caches' lock. In the common case one thread
/// uses a stream and takes its lock uncontended: one compare-and-swap to lock and a
/// plain store to unlock (a `std` mutex's unlock is a read-modify-write, to wake
/// sleepers). Critical sections are a few list operations; a waiter yields after a
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

    #[inline]
    pub(crate) fn lock(&self) -> SpinGuard<'_, T> {
        let mut spins = 0u32;
        // Acquire: pairs with the Release store of the previous holder's unlock.
        while self
            .locked
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            while self.locked.load(Ordering::Relaxed) {
                spins += 1;
                if spins < 64 {
                    std::hint::spin_loop();
                } else {
                    std::thread::yield_now();
                }
            }
        }
        SpinGuard { lock: self }
    }
}

impl<T> std::ops::Deref for SpinGuard<'_, T> {
    type Target = T;
    #[inline]
    fn deref(&self) -> &T {
        // Safety: the guard exists only while this thread holds the lock.
        unsafe { &*self.lock.value.get() }
    }
}

impl<T> std::ops::DerefMut for SpinGuard<'_, T> {
    #[inline]
    fn deref_mut(&mut self) -> &mut T {
        // Safety: the guard exists only while this thread holds the lock, and `&mut
        // self` makes this the only reference through it.
        unsafe { &mut *self.lock.value.get() }
    }
}

impl<T> Drop for SpinGuard<'_, T> {
    #[inline]
    fn drop(&mut self) {
        // Release: what the holder wrote is visible to the next holder's Acquire.
        self.lock.locked.store(false, Ordering::Release);
    }
}

/// Cache settings of a [`crate::StreamAlloc`].
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct CacheConfig {
    /// Whether the front cache is on (`false`: every malloc and free goes to the
    /// driver, as in the seed).
    pub enabled: bool,
    /// Bytes the cache may hold per device before it releases blocks to the driver.
    pub max_bytes_per_device: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig { enabled: true, max_bytes_per_device: 2 << 30 }
    }
}

impl CacheConfig {
    /// No cache: the seed's behaviour, every operation reaches the driver.
    pub fn passthrough() -> Self {
        CacheConfig { enabled: false, ..CacheConfig::default() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_are_monotonic_and_bound_waste() {
        let mut last = 0;
        for idx in 0..CLASSES {
            let s = class_size(idx);
            assert!(s > last, "class {idx}");
            assert_eq!(class_of(s), Some((idx, s)));
            last = s;
        }
        assert_eq!(last, MAX_CACHED);
        for size in (1..5000u64).chain((1..1800).map(|i| i * 37_171)) {
            let (idx, cs) = class_of(size).unwrap();
            assert!(cs >= size && (size <= 512 || (cs - size) * 4 < cs), "{size} -> {cs}");
            assert_eq!(class_size(idx), cs);
        }
        for s in [512u64, 4096, 65536, 262_144, 1 << 20, 3 << 19] {
            assert_eq!(class_of(s).unwrap().1, s, "bench size {s} is exact");
        }
        assert_eq!(class_of(MAX_CACHED + 1), None);
        assert_eq!(class_of(0), None);
    }
}
