//! The block map: address → the [`Record`] of every block the allocator holds (live,
//! idle in the front cache, or with its free deferred).
//!
//! ```text
//!   address ──hash of its 2 MiB granule──▶ shard k of 1024 (cache-padded)
//!                                            SpinLock<HashMap<address, Arc<Record>>>
//! ```
//!
//! A thread that keeps reusing its own blocks (a stream's cache, a driver's per-thread
//! range) keeps to its own shards, so their lock and table lines stay in its core's cache
//! instead of moving between cores on every operation; blocks of different threads in
//! one granule share a shard, as with any hash. Each operation takes its shard's spin
//! lock once: one compare-and-swap to lock and a plain store to unlock (dashmap's
//! reader-writer lock, used before, paid a read-modify-write for each, and the pointer
//! API's free looked a block up under one lock and removed it under another). The
//! closures given to [`BlockMap::peek`] and [`BlockMap::remove_if`] run under the lock:
//! they touch the record only, never the map.

use crate::block::Record;
use crate::spin::SpinLock;
use crossbeam::utils::CachePadded;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

/// Shards of the block map (a power of two). A thread's live blocks span a few granules
/// at a time (the benchmark's 16 blocks of up to 1.5 MiB: about four), so with T threads a
/// shard is shared with another thread's live granules with a chance of about
/// 4 (T - 1) / SHARDS: 23% at 16 threads with 256 shards (dashmap's count before), 6%
/// with 1024. Each shard is a padded line of its own: 128 KiB per allocator.
const SHARDS: usize = 1024;
/// Addresses within one 2 MiB granule go to the same shard.
const GRANULE_SHIFT: u32 = 21;
/// Fibonacci hashing's multiplier (2^64 / golden ratio).
const FIB: u64 = 0x9E37_79B9_7F4A_7C15;

/// A cheap hasher for device addresses, shaped for the block map's tables.
///
/// hashbrown takes a bucket from the hash's low bits and a tag from its top 7 bits. A
/// Fibonacci hash has good high bits only, and device addresses are 512-byte aligned, so
/// the product's high half is folded into the low half: both ends then depend on every
/// address bit above the alignment.
#[derive(Default, Clone, Copy)]
pub struct PtrHasher(u64);

impl Hasher for PtrHasher {
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }

    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        // Only used for non-u64 keys; FNV-1a.
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    }

    #[inline]
    fn write_u64(&mut self, v: u64) {
        let h = (v >> 9).wrapping_mul(FIB);
        self.0 = h ^ (h >> 32);
    }
}

type Table = HashMap<u64, Arc<Record>, BuildHasherDefault<PtrHasher>>;

/// The block map (see the module docs).
pub(crate) struct BlockMap {
    shards: Box<[CachePadded<SpinLock<Table>>]>,
}

impl BlockMap {
    pub(crate) fn new() -> Self {
        BlockMap {
            shards: (0..SHARDS)
                .map(|_| CachePadded::new(SpinLock::new(Table::default())))
                .collect(),
        }
    }

    #[inline]
    fn shard(&self, addr: u64) -> &SpinLock<Table> {
        let k =
            ((addr >> GRANULE_SHIFT).wrapping_mul(FIB) >> (64 - SHARDS.trailing_zeros())) as usize;
        &self.shards[k]
    }

    /// The record at `addr`, if any (a new reference; no lock is kept).
    #[inline]
    pub(crate) fn get(&self, addr: u64) -> Option<Arc<Record>> {
        self.shard(addr).lock().get(&addr).cloned()
    }

    /// Runs `f` on the record at `addr` under the shard's lock (no reference count moves).
    #[inline]
    pub(crate) fn peek<R>(&self, addr: u64, f: impl FnOnce(Option<&Record>) -> R) -> R {
        f(self.shard(addr).lock().get(&addr).map(|r| &**r))
    }

    /// Inserts `rec` at its address; returns the record that was there (the caller drops
    /// it, outside the lock).
    #[inline]
    pub(crate) fn insert(&self, rec: Arc<Record>) -> Option<Arc<Record>> {
        let addr = rec.ptr;
        self.shard(addr).lock().insert(addr, rec)
    }

    /// Removes and returns the record at `addr` if `keep_out` says so (it runs under the
    /// shard's lock, so no other operation on `addr` comes between its decision and the
    /// removal).
    #[inline]
    pub(crate) fn remove_if(
        &self,
        addr: u64,
        keep_out: impl FnOnce(&Record) -> bool,
    ) -> Option<Arc<Record>> {
        let mut table = self.shard(addr).lock();
        if keep_out(table.get(&addr)?) { table.remove(&addr) } else { None }
    }

    /// Removes `rec` itself (not a newer record at its address). The reference it held is
    /// dropped after the lock is released.
    #[inline]
    pub(crate) fn remove(&self, rec: &Arc<Record>) -> Option<Arc<Record>> {
        self.remove_if(rec.ptr, |r| std::ptr::eq(r, &**rec))
    }

    /// The records for which `keep` holds (a scan, shard by shard: not a point-in-time
    /// view while other threads allocate and free).
    pub(crate) fn collect<T>(&self, mut keep: impl FnMut(&Record) -> Option<T>) -> Vec<T> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            out.extend(shard.lock().values().filter_map(|r| keep(r)));
        }
        out
    }
}
