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
//!
//! Owned stripes: most threads hold a stripe alone (`sync::thread_slot`, the index the
//! epoch's counters use too), and spend or earn its credit with a plain load and store
//! instead of a locked read-modify-write. The only other writer of an owned stripe is a
//! drain (the exact path, a limit change), so the two meet in a store-load handshake: the
//! owner marks its stripe busy, fences, and uses the plain path only if no drain is
//! announced; a drain announces itself, fences, and waits until each owned stripe is not
//! busy before it takes the stripe's credit. Either the drain sees the owner busy (and
//! waits for its `Release` un-marking, after which the owner's store is visible), or the
//! owner sees the drain (and takes the atomic path, as a shared stripe's thread does).
//! The fences are asymmetric where Linux's membarrier allows (`crate::barrier`: the owner
//! pays a compiler fence, the rare drain a system call), else `SeqCst` accesses as in the
//! epoch. Threads beyond the owned stripes share the striped ones, with atomics.

use crate::barrier::StoreLoad;
use crate::sync::{AtomicBool, AtomicU64, AtomicUsize, Ordering, thread_slot, thread_stripe};
use crossbeam::utils::CachePadded;

/// Stripes held by one thread each (the first `OWNED`; under loom, model threads with an
/// even id hold one).
const OWNED: usize = if cfg!(streamalloc_loom) { 4 } else { 128 };
/// Shared credit stripes after the owned ones; threads without an owned stripe are spread
/// over them round-robin.
const STRIPES: usize = if cfg!(streamalloc_loom) { 2 } else { 32 };

/// One stripe: its credit, and (owned stripes) whether the owner is in a plain section.
struct Stripe {
    credit: AtomicU64,
    busy: AtomicBool,
}
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
    stripes: Box<[CachePadded<Stripe>]>,
    /// Drains under way (read by every owned-stripe section; raised only by drains).
    drains: CachePadded<AtomicUsize>,
    /// The owners' busy mark against a drain's announce ([`StoreLoad`]: asymmetric where
    /// membarrier allows).
    pattern: StoreLoad,
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
            stripes: (0..OWNED + STRIPES)
                .map(|_| {
                    let stripe = Stripe { credit: AtomicU64::new(0), busy: AtomicBool::new(false) };
                    CachePadded::new(stripe)
                })
                .collect(),
            drains: CachePadded::new(AtomicUsize::new(0)),
            pattern: StoreLoad::new(),
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
    #[inline(always)]
    pub(crate) fn reserve(&self, size: u64) -> Result<(), u64> {
        // The common case inline: this thread's own stripe has the credit.
        if let Some(stripe) = self.owned_stripe()
            && self.within_limit()
            && self
                .owned_section(stripe, |credit| {
                    let have = credit.load(Ordering::Relaxed);
                    (have >= size).then(|| credit.store(have - size, Ordering::Relaxed))
                })
                .is_some()
        {
            return Ok(());
        }
        self.reserve_shared(size)
    }

    /// `reserve` past its owned-stripe fast path: the stripe's credit by
    /// compare-and-swap, a new chunk of credit, an exact claim.
    #[inline(never)]
    fn reserve_shared(&self, size: u64) -> Result<(), u64> {
        let credit = &self.stripe().credit;
        // Credit may be spent only while the claims are within the limit (a lowered limit,
        // or bytes freed into credit after it, can leave them above): then live bytes,
        // which never exceed the claims, stay within it too.
        let within = self.within_limit();
        let mut have = if within { credit.load(Ordering::Relaxed) } else { 0 };
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
        let drain = self.begin_drain();
        let mut outcome = Err(0);
        for _ in 0..EXACT_RETRIES {
            self.drain_stripes(&drain);
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
        self.end_drain(drain);
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
    #[inline(always)]
    pub(crate) fn release(&self, size: u64) {
        // The common case inline: no exact claim under way, room in the own stripe.
        if self.exact.load(Ordering::Relaxed) == 0
            && let Some(stripe) = self.owned_stripe()
            && self
                .owned_section(stripe, |credit| {
                    let have = credit.load(Ordering::Relaxed).saturating_add(size);
                    (have <= 2 * CREDIT_CHUNK).then(|| credit.store(have, Ordering::Relaxed))
                })
                .is_some()
        {
            return;
        }
        self.release_shared(size);
    }

    /// `release` past its owned-stripe fast path.
    #[inline(never)]
    fn release_shared(&self, size: u64) {
        if self.exact.load(Ordering::Relaxed) > 0 {
            // A thread is draining credit for an exact claim: give the bytes back to it.
            self.reserved.fetch_sub(size, Ordering::Relaxed);
            return;
        }
        let credit = &self.stripe().credit;
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

    /// This thread's own stripe, if it holds one.
    #[inline(always)]
    fn owned_stripe(&self) -> Option<&Stripe> {
        thread_slot(OWNED).map(|i| &*self.stripes[i])
    }

    /// This thread's stripe: its own, else a shared one.
    #[inline]
    fn stripe(&self) -> &Stripe {
        self.owned_stripe().unwrap_or_else(|| &self.stripes[OWNED + thread_stripe(STRIPES)])
    }

    /// Runs `f` on the caller's own stripe's credit, which `f` may update with a plain
    /// load and store, unless a drain is under way (then `None`, and the caller takes the
    /// atomic path). `f` returns `None` when it did not write.
    #[inline(always)]
    fn owned_section<R>(
        &self,
        stripe: &Stripe,
        f: impl FnOnce(&AtomicU64) -> Option<R>,
    ) -> Option<R> {
        // The store-load pattern (module docs): mark busy, fence, read `drains`.
        let drains = self
            .pattern
            .frequent(|order| stripe.busy.store(true, order), |order| self.drains.load(order));
        let result = if drains == 0 { f(&stripe.credit) } else { None };
        // Release: a drain that reads `false` (Acquire) sees the credit store above.
        stripe.busy.store(false, Ordering::Release);
        result
    }

    /// Announces a drain: from here owners take the atomic path. The pattern's other
    /// half: announce, fence (membarrier where asymmetric), then read the busy marks.
    fn begin_drain(&self) -> Drain {
        self.drains.fetch_add(1, self.pattern.rare_rmw());
        self.pattern.rare_fence();
        Drain(())
    }

    /// Ends a drain (`Release`: the stripes it emptied are visible to the owners' next
    /// plain sections, which read `drains` after it).
    fn end_drain(&self, _: Drain) {
        self.drains.fetch_sub(1, Ordering::Release);
    }

    /// Moves every stripe's credit back to the shared counter (inside a drain: each
    /// owned stripe is taken once its owner is not in a plain section).
    fn drain_stripes(&self, _: &Drain) {
        let move_ = self.begin_move();
        for (i, stripe) in self.stripes.iter().enumerate() {
            if i < OWNED {
                // Acquire: pairs with the owner's Release un-marking. Yields: the owner may
                // be preempted inside its few-instruction section.
                while stripe.busy.load(self.pattern.rare_load()) {
                    crate::sync::spin_wait();
                }
            }
            // Release: a reader that sees the drained stripe sees the move's start.
            let taken = stripe.credit.swap(0, Ordering::Release);
            if taken > 0 {
                self.reserved.fetch_sub(taken, Ordering::Release);
            }
        }
        self.end_move(move_);
    }

    /// Moves all credit back to the shared counter.
    pub(crate) fn drain(&self) {
        let drain = self.begin_drain();
        self.drain_stripes(&drain);
        self.end_drain(drain);
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
        let credit: u64 = self.stripes.iter().map(|s| s.credit.load(Ordering::Acquire)).sum();
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
        let credit: u64 = self.stripes.iter().map(|s| s.credit.load(Ordering::Relaxed)).sum();
        self.reserved.load(Ordering::Relaxed).saturating_sub(credit)
    }

    /// The claims (live bytes plus every stripe's credit), for the models and tests.
    #[cfg(test)]
    pub(crate) fn claims(&self) -> u64 {
        self.reserved.load(Ordering::Relaxed)
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

/// A drain announced (from `begin_drain`, ended by `end_drain`).
struct Drain(());

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

    /// Owned stripes' plain updates racing drains under real threads, with whichever
    /// fences this process uses (asymmetric on Linux; loom checks the symmetric form):
    /// no byte of credit is lost or counted twice, and the limit holds throughout.
    #[test]
    fn owned_stripes_race_drains_without_losing_credit() {
        let b = Budget::new();
        let limit = 64 * CREDIT_CHUNK;
        b.set_limit(limit);
        // Workers count themselves out even when they panic, so the drainer stops and
        // a failure fails the test instead of hanging it.
        struct Out<'a>(&'a AtomicUsize);
        impl Drop for Out<'_> {
            fn drop(&mut self) {
                self.0.fetch_add(1, Ordering::Relaxed);
            }
        }
        let out = AtomicUsize::new(0);
        std::thread::scope(|s| {
            s.spawn(|| {
                while out.load(Ordering::Relaxed) < 3 {
                    b.set_limit(limit);
                    std::thread::yield_now();
                }
            });
            for t in 0..3u64 {
                let (b, out) = (&b, &out);
                s.spawn(move || {
                    let _out = Out(out);
                    for i in 0..200_000u64 {
                        let size = 1 + (i * 7919 + t * 104_729) % (4 << 20);
                        if b.reserve(size).is_ok() {
                            assert!(b.used() <= limit, "over the limit");
                            b.release(size);
                        }
                    }
                });
            }
        });
        assert_eq!(b.used(), 0, "bytes lost");
        b.drain();
        assert_eq!(b.claims(), 0, "credit lost or counted twice");
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
