//! Used-byte accounting against the memory-fraction limit (S3, S7), in atomics.
//!
//! ```text
//!   reserved (one atomic)  = live bytes + credit held by the stripes
//!   credit[stripe] (one cache-padded atomic per thread stripe): reserved, not live
//! ```
//!
//! A claim is made by compare-and-swap *before* the driver call and given back if the
//! call fails, so two threads can never both pass the limit check with bytes the other
//! has already claimed (no load-then-add). To keep every thread off one shared line,
//! each thread stripe holds *credit*: bytes already claimed against the limit but not
//! live. An allocation spends credit from its stripe; a free adds to it; only when the
//! credit runs out (claim `size + CHUNK` at once) or piles up (give back down to `CHUNK`)
//! is the shared `reserved` counter touched. The limit stays exact: when a claim is
//! refused, every stripe's credit is drained back and the exact claim is tried again
//! before out-of-memory is reported.

use crate::sync::{AtomicU64, AtomicUsize, Ordering, thread_stripe};
use crossbeam::utils::CachePadded;

/// Credit stripes; threads are spread over them round-robin.
const STRIPES: usize = if cfg!(streamalloc_loom) { 2 } else { 32 };
/// Credit is taken from `reserved` this much at a time (and a stripe keeps at most twice
/// this before giving back): large against the benchmark's swings of live bytes (a few
/// MiB per thread), small against a device.
pub(crate) const CREDIT_CHUNK: u64 = 16 << 20;
/// Drain-and-claim rounds on the exact path before a refusal that the live bytes do not
/// explain is reported anyway (only a thread that keeps racing every round gets there).
const EXACT_RETRIES: usize = 64;

/// One device's bytes in live allocations and its user limit.
pub(crate) struct Budget {
    reserved: CachePadded<AtomicU64>,
    limit: CachePadded<AtomicU64>,
    /// Threads on the exact path (read-mostly: raised only when a claim is refused).
    exact: CachePadded<AtomicUsize>,
    credit: Box<[CachePadded<AtomicU64>]>,
    /// Two-step moves of bytes between `reserved` and a stripe's credit (a chunk's
    /// claim then its credit, a give-back, a drain) started and finished: while they
    /// differ, `reserved - credit` may read high (the exact path must not refuse on such
    /// a reading). Touched only on those rare paths.
    moves_started: CachePadded<AtomicU64>,
    moves_finished: CachePadded<AtomicU64>,
}

impl Budget {
    /// No bytes used, no limit (S2).
    pub(crate) fn new() -> Self {
        Budget {
            reserved: CachePadded::new(AtomicU64::new(0)),
            limit: CachePadded::new(AtomicU64::new(u64::MAX)),
            exact: CachePadded::new(AtomicUsize::new(0)),
            credit: (0..STRIPES).map(|_| CachePadded::new(AtomicU64::new(0))).collect(),
            moves_started: CachePadded::new(AtomicU64::new(0)),
            moves_finished: CachePadded::new(AtomicU64::new(0)),
        }
    }

    /// Claims `n` bytes against the limit: a CAS loop, never load-then-add.
    ///
    /// Orderings: the counters guard no other data, and read-modify-writes on one
    /// location are totally ordered, so every claim sees every earlier claim or release.
    /// A successful claim is `Release`: a chunk's claim is a move's first step, and an
    /// exact-path reader that sees it (`stable_used`'s `Acquire` loads) then sees the
    /// move's start too. A concurrent `set_limit` applies to the claims that read the
    /// new limit.
    fn claim(&self, n: u64) -> bool {
        let mut reserved = self.reserved.load(Ordering::Relaxed);
        loop {
            // Checked: claims near u64::MAX must not wrap past the limit.
            let Some(new) = reserved.checked_add(n) else { return false };
            if new > self.limit.load(Ordering::Relaxed) {
                return false;
            }
            match self.reserved.compare_exchange_weak(
                reserved,
                new,
                Ordering::Release,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(now) => reserved = now,
            }
        }
    }

    /// Claims `size` live bytes if `used + size <= limit`; on refusal returns the bytes
    /// in use.
    #[inline]
    pub(crate) fn reserve(&self, size: u64) -> Result<(), u64> {
        let credit = &self.credit[thread_stripe(STRIPES)];
        // Credit may be spent only while the claims are within the limit (a lowered limit,
        // or bytes freed into credit after it, can leave them above): then live bytes,
        // which never exceed the claims, stay within it too.
        let mut have = if self.within_limit() { credit.load(Ordering::Relaxed) } else { 0 };
        while have >= size {
            match credit.compare_exchange_weak(
                have,
                have - size,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(()),
                Err(now) => have = now,
            }
        }
        // No new chunk while a thread is on the exact path: it is draining credit.
        if self.exact.load(Ordering::Relaxed) == 0 {
            let move_ = self.begin_move();
            if self.claim(size.saturating_add(CREDIT_CHUNK)) {
                credit.fetch_add(CREDIT_CHUNK, Ordering::Release);
                self.end_move(move_);
                return Ok(());
            }
            self.end_move(move_);
        }
        if self.claim(size) {
            return Ok(());
        }
        self.reserve_exact(size)
    }

    /// The exact path: out-of-memory only if the live bytes plus `size` exceed the limit.
    ///
    /// While a thread is here (`exact` > 0) no thread takes a new chunk of credit and
    /// frees give their bytes straight back to the claims, so the drain below can only
    /// be undone by an operation that read `exact` before this thread raised it; such a
    /// race is retried. The decision to refuse is made on the live bytes (claims less
    /// credit) read after a drain, so bytes stranded as credit in other threads' stripes
    /// never cause a refusal (a spurious out-of-memory under contention was one: 7 in
    /// 28.8 M mallocs at 16 threads before this path), and only on a reading no move of
    /// credit overlapped (`stable_used`: a chunk claimed but not yet credited reads as
    /// live bytes; the loom model `loom_exact_claim_is_not_refused_by_credit_another_
    /// thread_regrabs` found that window).
    #[cold]
    fn reserve_exact(&self, size: u64) -> Result<(), u64> {
        // SeqCst: pairs with the loads of `exact` in `reserve`/`release`; an operation
        // that misses the raise is one the retry below outlasts.
        self.exact.fetch_add(1, Ordering::SeqCst);
        let mut outcome = Err(0);
        for _ in 0..EXACT_RETRIES {
            self.drain();
            if self.claim(size) {
                outcome = Ok(());
                break;
            }
            match self.stable_used() {
                Some(live) if live.checked_add(size).is_none_or(|n| n > self.limit()) => {
                    outcome = Err(live);
                    break;
                }
                Some(live) => outcome = Err(live),
                None => outcome = Err(self.used()),
            }
            crate::sync::spin_wait();
        }
        self.exact.fetch_sub(1, Ordering::SeqCst);
        outcome
    }

    /// Whether the claims (live bytes and credit) are within the limit: the condition
    /// for spending credit without a claim.
    #[inline]
    pub(crate) fn within_limit(&self) -> bool {
        self.reserved.load(Ordering::Relaxed) <= self.limit.load(Ordering::Relaxed)
    }

    /// Gives back `size` live bytes (they become this stripe's credit).
    #[inline]
    pub(crate) fn release(&self, size: u64) {
        if self.exact.load(Ordering::Relaxed) > 0 {
            // A thread is draining credit for an exact claim: give the bytes back to it.
            self.reserved.fetch_sub(size, Ordering::Relaxed);
            return;
        }
        let credit = &self.credit[thread_stripe(STRIPES)];
        let mut have = credit.fetch_add(size, Ordering::Relaxed) + size;
        while have > 2 * CREDIT_CHUNK {
            let move_ = self.begin_move();
            // Release: a reader that sees the lowered credit sees the move's start.
            match credit.compare_exchange_weak(
                have,
                CREDIT_CHUNK,
                Ordering::Release,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    self.reserved.fetch_sub(have - CREDIT_CHUNK, Ordering::Release);
                    self.end_move(move_);
                    return;
                }
                Err(now) => have = now,
            }
            self.end_move(move_);
        }
    }

    /// Moves all credit back to the shared counter.
    pub(crate) fn drain(&self) {
        let move_ = self.begin_move();
        for credit in self.credit.iter() {
            // Release: a reader that sees the drained stripe sees the move's start.
            let taken = credit.swap(0, Ordering::Release);
            if taken > 0 {
                self.reserved.fetch_sub(taken, Ordering::Release);
            }
        }
        self.end_move(move_);
    }

    /// Announces a two-step move of bytes between `reserved` and credit.
    ///
    /// `SeqCst`: the increment must be ordered before the move's first store (which is
    /// `Release`, so a reader acquiring that store sees this increment).
    #[inline]
    fn begin_move(&self) -> Move {
        self.moves_started.fetch_add(1, Ordering::SeqCst);
        Move(())
    }

    /// Ends a move: `Release`, so a reader that sees the count sees the whole move.
    #[inline]
    fn end_move(&self, _: Move) {
        self.moves_finished.fetch_add(1, Ordering::Release);
    }

    /// The live bytes, read while no move of credit was in flight; `None` if one
    /// overlapped the reading. Never higher than the truth at some moment of the call.
    ///
    /// Orderings: `finished` then `started` (`Acquire`): equal means every move started
    /// before the second load had finished, and their stores are visible. The stripes
    /// and `reserved` are read with `Acquire`, so a reading that saw any store of a move
    /// begun later sees that move's start in the last load of `started`, and is retried.
    fn stable_used(&self) -> Option<u64> {
        let finished = self.moves_finished.load(Ordering::Acquire);
        let started = self.moves_started.load(Ordering::Acquire);
        if started != finished {
            return None;
        }
        let credit: u64 = self.credit.iter().map(|c| c.load(Ordering::Acquire)).sum();
        let reserved = self.reserved.load(Ordering::Acquire);
        if self.moves_started.load(Ordering::Acquire) != started {
            return None;
        }
        Some(reserved.saturating_sub(credit))
    }

    /// Bytes in live allocations (exact when no operation is in flight).
    pub(crate) fn used(&self) -> u64 {
        // Credit first, then reserved: a release racing this read can only make the
        // result larger than the truth for a moment, never wrap it below zero.
        let credit: u64 = self.credit.iter().map(|c| c.load(Ordering::Relaxed)).sum();
        self.reserved.load(Ordering::Relaxed).saturating_sub(credit)
    }

    /// The user limit.
    pub(crate) fn limit(&self) -> u64 {
        self.limit.load(Ordering::Relaxed)
    }

    /// Sets the user limit (S7). Bytes already in use are not affected; credit goes back,
    /// so that the next claims are checked against the new limit.
    pub(crate) fn set_limit(&self, limit: u64) {
        self.limit.store(limit, Ordering::Relaxed);
        self.drain();
    }
}

/// A move in flight (from `begin_move`, ended by `end_move`).
struct Move(());

#[cfg(all(test, not(streamalloc_loom)))]
mod tests {
    use super::*;

    #[test]
    fn credit_does_not_outlive_a_lowered_limit() {
        // Found by the loom model: bytes freed into credit before (or after) the limit
        // was lowered must not let a later claim past the new limit.
        let b = Budget::new();
        b.reserve(50).unwrap();
        b.set_limit(40);
        b.release(50);
        assert_eq!(b.used(), 0);
        assert!(b.reserve(41).is_err());
        b.reserve(40).unwrap();
        assert_eq!(b.used(), 40);
    }

    #[test]
    fn exact_at_the_limit_with_credit_stranded() {
        let b = Budget::new();
        b.set_limit(100 << 20);
        // This thread's stripe takes a chunk of credit.
        b.reserve(1 << 20).unwrap();
        assert_eq!(b.used(), 1 << 20);
        // Another thread strands credit in its stripe.
        std::thread::scope(|s| {
            s.spawn(|| {
                b.reserve(10 << 20).unwrap();
                b.release(10 << 20);
            });
        });
        assert_eq!(b.used(), 1 << 20);
        // The rest of the limit is still ours, exactly.
        b.reserve(99 << 20).unwrap();
        assert_eq!(b.used(), 100 << 20);
        assert!(b.reserve(1).is_err());
        b.release(100 << 20);
        assert_eq!(b.used(), 0);
    }
}
