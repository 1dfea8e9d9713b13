//! A lossy table of recently freed addresses, to tell a double free from a pointer that
//! was never allocated.
//!
//! Freed addresses cannot all be remembered (a driver may hand out fresh addresses for
//! ever), so each address hashes to one slot of a fixed table; a later free overwrites
//! the slot. A second free of `p` is reported as a double free while `p` still sits in
//! its slot, else as an unknown pointer: an error either way. The table is consulted only
//! for a pointer the allocator does not hold as live, and such a pointer that is in the
//! table was freed before and not handed back to its caller since, so "double free" is
//! never wrong; an allocation that returns `p` again need not clear the slot.

use std::sync::atomic::{AtomicU64, Ordering};

/// Slots (8 to a cache line). Every free writes one; a line serves one 2 MiB granule's
/// addresses at a time, so threads freeing their own blocks share a line only when their
/// granules collide: 2048 lines make that rare at 16 threads (see `blockmap::SHARDS`).
const SLOTS: usize = 16384;

/// Recently freed addresses (see the module docs).
pub(crate) struct FreedTable {
    slots: Box<[AtomicU64]>,
}

#[inline]
fn slot_of(addr: u64) -> usize {
    // The cache line (8 slots) from the address's 2 MiB granule, the slot in it from the
    // address: a thread freeing its own blocks keeps to its own lines.
    const LINE_BITS: u32 = (SLOTS / 8).trailing_zeros();
    let line = ((addr >> 21).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - LINE_BITS)) as usize;
    (line * 8 + ((addr >> 9) & 7) as usize) & (SLOTS - 1)
}

impl FreedTable {
    pub(crate) fn new() -> Self {
        FreedTable { slots: (0..SLOTS).map(|_| AtomicU64::new(0)).collect() }
    }

    /// Remembers that `addr` was freed. Relaxed: a hint for error messages only.
    #[inline]
    pub(crate) fn freed(&self, addr: u64) {
        self.slots[slot_of(addr)].store(addr, Ordering::Relaxed);
    }

    /// Whether `addr` was freed and not handed out since (as far as the table knows).
    pub(crate) fn was_freed(&self, addr: u64) -> bool {
        addr != 0 && self.slots[slot_of(addr)].load(Ordering::Relaxed) == addr
    }
}
