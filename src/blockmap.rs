//! The block map: address → the [`Record`] of every block the allocator holds (live,
//! idle in the front cache, or with its free deferred).
//!
//! ```text
//!   address ──hash of its 2 MiB granule──▶ shard k of 1024 (cache-padded)
//!                                            SpinLock<Table>: address → Arc<Record>
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
//!
//! A shard's [`Table`] is open addressing with linear probing and backward-shift
//! deletion: a shard holds a few blocks, so a lookup usually reads one slot, an insert
//! writes one, and a remove leaves no tombstone behind (a general hash map cost about 150
//! instructions per malloc/free pair here: group probing, control bytes, tombstones and
//! rehashes as addresses keep changing).

use crate::block::Record;
use crate::spin::SpinLock;
use crossbeam::utils::CachePadded;
use std::hash::Hasher;
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

/// A cheap hasher for device addresses, for maps keyed by a device pointer (the block
/// map's own tables hash addresses the same way, without the `Hasher` interface).
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

/// The slot of `addr` in a table of `bits` index bits: the top bits of a Fibonacci hash of
/// the address above its 512-byte alignment (the shard was chosen from the 2 MiB granule,
/// so these bits differ between a shard's blocks).
#[inline(always)]
fn home(addr: u64, bits: u32) -> usize {
    ((addr >> 9).wrapping_mul(FIB) >> (64 - bits)) as usize
}

/// One shard's table: address → record, open addressing with linear probing and
/// backward-shift deletion (see the module docs). A slot is empty when its record is
/// `None`, so every address, 0 included, is a valid key.
pub(crate) struct Table {
    slots: Box<[(u64, Option<Arc<Record>>)]>,
    /// log2 of the slot count (0 while no slot is allocated). Derivable from the slot
    /// count, but kept: deriving it on every operation cost 7 instructions per
    /// malloc/free pair (valgrind).
    bits: u32,
    len: usize,
}

impl Default for Table {
    fn default() -> Self {
        Table { slots: Box::new([]), bits: 0, len: 0 }
    }
}

impl Table {
    /// Slots in a new table; it doubles when more than three quarters full.
    const FIRST_BITS: u32 = 3;

    #[inline(always)]
    fn mask(&self) -> usize {
        self.slots.len().wrapping_sub(1)
    }

    /// The slot holding `addr`, if any.
    #[inline(always)]
    fn find(&self, addr: u64) -> Option<usize> {
        if self.len == 0 {
            return None;
        }
        let mask = self.mask();
        let mut i = home(addr, self.bits);
        loop {
            match &self.slots[i] {
                (_, None) => return None,
                (key, Some(_)) if *key == addr => return Some(i),
                _ => i = (i + 1) & mask,
            }
        }
    }

    /// The record at `addr`.
    #[inline(always)]
    pub(crate) fn get(&self, addr: u64) -> Option<&Arc<Record>> {
        self.find(addr).and_then(|i| self.slots[i].1.as_ref())
    }

    /// Inserts `rec` at `addr`; returns the record that was there.
    #[inline(always)]
    pub(crate) fn insert(&mut self, addr: u64, rec: Arc<Record>) -> Option<Arc<Record>> {
        if (self.len + 1) * 4 > self.slots.len() * 3 {
            self.grow();
        }
        let mask = self.mask();
        let mut i = home(addr, self.bits);
        loop {
            match &mut self.slots[i] {
                (key, slot @ None) => {
                    *key = addr;
                    *slot = Some(rec);
                    self.len += 1;
                    return None;
                }
                (key, Some(old)) if *key == addr => return Some(std::mem::replace(old, rec)),
                _ => i = (i + 1) & mask,
            }
        }
    }

    /// Removes and returns the record at `addr` if `keep_out` says so.
    #[inline(always)]
    pub(crate) fn remove_if(
        &mut self,
        addr: u64,
        keep_out: impl FnOnce(&Record) -> bool,
    ) -> Option<Arc<Record>> {
        let i = self.find(addr)?;
        if !keep_out(self.slots[i].1.as_deref()?) {
            return None;
        }
        Some(self.remove_at(i))
    }

    /// Empties slot `i` (it holds a record) and closes the gap: each later entry of the
    /// probe run whose home is not in the cyclic interval (gap, its slot] moves back into
    /// the gap, so every entry stays reachable from its home without tombstones.
    #[inline(always)]
    fn remove_at(&mut self, mut gap: usize) -> Arc<Record> {
        let rec = self.slots[gap].1.take().expect("remove_at: an occupied slot");
        self.len -= 1;
        let mask = self.mask();
        let mut j = gap;
        loop {
            j = (j + 1) & mask;
            let (key, occupied) = (self.slots[j].0, self.slots[j].1.is_some());
            if !occupied {
                return rec;
            }
            let h = home(key, self.bits);
            // Distance from its home to j, against the distance from the gap to j: an entry
            // whose home lies at or before the gap (cyclically) may fill it.
            if (j.wrapping_sub(h) & mask) >= (j.wrapping_sub(gap) & mask) {
                self.slots[gap] = (key, self.slots[j].1.take());
                gap = j;
            }
        }
    }

    /// Doubles the slots (allocates the first ones) and reinserts every entry.
    #[cold]
    #[inline(never)]
    fn grow(&mut self) {
        let bits = if self.bits == 0 { Self::FIRST_BITS } else { self.bits + 1 };
        let old =
            std::mem::replace(&mut self.slots, (0..1usize << bits).map(|_| (0, None)).collect());
        self.bits = bits;
        let mask = self.mask();
        for (key, rec) in old.into_vec() {
            let Some(rec) = rec else { continue };
            let mut i = home(key, bits);
            while self.slots[i].1.is_some() {
                i = (i + 1) & mask;
            }
            self.slots[i] = (key, Some(rec));
        }
    }

    /// Every record in the table.
    pub(crate) fn values(&self) -> impl Iterator<Item = &Arc<Record>> {
        self.slots.iter().filter_map(|(_, r)| r.as_ref())
    }

    /// How many records the table holds.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

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
        self.shard(addr).lock().get(addr).cloned()
    }

    /// Runs `f` on the record at `addr` under the shard's lock (no reference count moves).
    #[inline]
    pub(crate) fn peek<R>(&self, addr: u64, f: impl FnOnce(Option<&Record>) -> R) -> R {
        f(self.shard(addr).lock().get(addr).map(|r| &**r))
    }

    /// Inserts `rec` at its address; returns the record that was there (the caller drops
    /// it, outside the lock).
    #[inline(always)]
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
        self.shard(addr).lock().remove_if(addr, keep_out)
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

#[cfg(all(test, not(streamalloc_loom)))]
mod tests {
    use super::*;
    use crate::block::LIVE;
    use crate::types::{DevicePtr, Stream};
    use std::collections::HashMap;

    fn rec(addr: u64) -> Arc<Record> {
        Arc::new(Record::new(
            DevicePtr::from_raw(addr),
            0,
            512,
            512,
            Stream::NULL,
            false,
            false,
            LIVE,
        ))
    }

    /// A small xorshift generator: the test is the same on every run.
    fn next(x: &mut u64) -> u64 {
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        *x
    }

    /// Random inserts, lookups and removes against `std`'s map, with keys drawn from a
    /// small set (so probe runs collide, wrap around the end and are shifted back) and
    /// from addresses 512 bytes apart in one granule (what one shard sees).
    #[test]
    fn the_table_agrees_with_a_hash_map() {
        for (seed, keys) in [(1u64, 24u64), (7, 300), (99, 5000)] {
            let (mut t, mut m) = (Table::default(), HashMap::<u64, Arc<Record>>::new());
            let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            for step in 0..200_000 {
                let r = next(&mut x);
                let key = if r & 1 == 0 { (r >> 8) % keys * 512 } else { (r >> 8) % keys };
                match (r >> 4) % 4 {
                    0 | 1 => {
                        let new = rec(key);
                        let old_t = t.insert(key, new.clone());
                        let old_m = m.insert(key, new);
                        assert_eq!(old_t.map(|r| Arc::as_ptr(&r)), old_m.map(|r| Arc::as_ptr(&r)));
                    }
                    2 => {
                        let take = r & 0x100 == 0;
                        let got = t.remove_if(key, |_| take).map(|r| Arc::as_ptr(&r));
                        let want = if take { m.remove(&key) } else { None };
                        assert_eq!(got, want.map(|r| Arc::as_ptr(&r)), "step {step}, key {key}");
                    }
                    _ => {
                        let got = t.get(key).map(Arc::as_ptr);
                        assert_eq!(got, m.get(&key).map(Arc::as_ptr), "step {step}, key {key}");
                    }
                }
                assert_eq!(t.len(), m.len());
            }
            // Every entry is still reachable, and nothing else is in the table.
            for (k, v) in &m {
                assert!(Arc::ptr_eq(t.get(*k).expect("reachable"), v));
            }
            assert_eq!(t.values().count(), m.len());
        }
    }

    #[test]
    fn an_emptied_table_finds_nothing_and_fills_again() {
        let mut t = Table::default();
        assert!(t.get(0).is_none());
        assert!(t.remove_if(0, |_| true).is_none());
        for k in 0..100u64 {
            assert!(t.insert(k * 512, rec(k * 512)).is_none());
        }
        for k in 0..100u64 {
            assert!(t.remove_if(k * 512, |_| true).is_some());
        }
        assert_eq!((t.len(), t.values().count()), (0, 0));
        assert!(t.get(512).is_none());
        assert!(t.insert(512, rec(512)).is_none());
        assert_eq!(t.get(512).map(|r| r.ptr), Some(512));
    }
}
