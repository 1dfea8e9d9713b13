//! Capture state as an epoch, with a grace period (S14, S15).
//!
//! ```text
//!   epoch word (one AtomicU64):   0 ──begin──▶ 1 ──end──▶ 2 ──begin──▶ 3 ...
//!                                 even = no capture, odd = capture underway
//!   readers: two sets of counters, picked by the parity of the epoch they saw; in each
//!            set one counter per thread (held alone, `sync::thread_slot`), then a few
//!            striped counters shared by any threads beyond those
//! ```
//!
//! Every allocator operation that may call the driver (malloc, free, the deferred-free
//! flush) runs inside a *read section*: it announces itself on a counter of the set that
//! matches the epoch it read, re-reads the epoch, and only then decides (capture or no
//! capture) and acts. A capture transition (the rare writer) publishes the next epoch and
//! then waits until the counters of the old parity drain: the *grace period*. So when
//! `begin_capture` returns, every operation that decided "no capture" has finished its
//! driver calls: none can issue an uncaptured free inside the capture. When
//! `end_capture`'s grace period ends, every free that decided "capture" has remembered
//! its free stream, so the join that follows sees them all.
//!
//! Orderings: a store-load (Dekker) pattern, made with a `SeqCst` fence on each side:
//! the reader announces (`fetch_add`), fences, re-reads the word; the writer publishes
//! the word, fences, reads the counters. The two fences are totally ordered: if the
//! writer's comes first, the reader's re-read sees the new epoch (and the reader retries
//! under it); if the reader's comes first, the writer's counter read sees the announce
//! (and it waits for the section to end). In a real build the reader's side is made with
//! `SeqCst` accesses instead of a fence (the announce `fetch_add` and the re-read both
//! `SeqCst`, as are the writer's store and counter reads): all four then sit in one total
//! order, which gives the same guarantee, and on x86 the reader pays only its locked
//! add (a `SeqCst` load is a plain load) instead of an `mfence`, twice per alloc/free
//! pair. Under loom the fences are kept, because loom models `SeqCst` fences but treats
//! `SeqCst` loads and stores as acquire/release (`crate::barrier::StoreLoad`, shared with
//! the budget's drain handshake). The section's end is a `Release`
//! decrement that pairs with the writer's `Acquire` counter reads: what the section did
//! (remembering a free stream) is visible to the writer once it sees the counter drop.
//!
//! On Linux the pattern is asymmetric where the kernel allows ([`crate::barrier`]): the
//! reader's announce is a plain (`Relaxed`) store and its fence a compiler fence, and the
//! writer's fence is `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`, which makes every
//! running thread of the process execute a full barrier before it returns. The argument
//! is the one above with the reader's fence supplied by the writer: if the barrier reaches
//! the reader before its announce, the reader's re-read comes after the writer's store
//! and sees the new epoch; if after, the announce is visible to the writer's counter
//! reads. A section then costs no locked instruction at all (an alloc/free pair on the
//! pointer API's driver tier saves two), and a capture transition one system call.
//! Without membarrier (another OS, a seccomp filter, `STREAMALLOC_ASYMMETRIC_FENCE=0`,
//! loom, Miri) the symmetric form below is used.
//!
//! A thread's own counter is written by that thread alone, so its announce is a `SeqCst`
//! store of the counter plus one (an `xchg` on x86, as costly as the shared counters'
//! locked add) and its decrement a plain `Release` store: one locked instruction per
//! section instead of two. Threads beyond the owned counters share the striped ones and
//! use read-modify-writes, as every thread did before.
//!
//! The detailed capture state (the set of free streams) sits behind an `ArcSwapOption`
//! that the writer stores before publishing an odd epoch with `Release`: a reader that
//! read the odd epoch with `Acquire` sees the capture.

use crate::barrier::StoreLoad;
use crate::sync::{
    AtomicU64, AtomicUsize, Mutex, Ordering, lock, spin_wait, thread_slot, thread_stripe,
};
use crossbeam::utils::CachePadded;

/// Counters per parity held by one thread each (threads beyond these share the striped
/// ones). Under loom, 4: the models' threads with an even id hold one (`thread_slot`).
const OWNED: usize = if cfg!(streamalloc_loom) { 4 } else { 128 };
/// Shared counters per parity after the owned ones; threads without an owned counter are
/// spread over them round-robin, so a section's announce touches a line few other
/// threads write. Under loom, two: enough to show two readers on different counters.
const STRIPES: usize = if cfg!(streamalloc_loom) { 2 } else { 16 };

/// The epoch word and the readers of each parity.
pub(crate) struct EpochGate {
    word: CachePadded<AtomicU64>,
    readers: [Box<[CachePadded<AtomicUsize>]>; 2],
    /// The readers' announce against the writer's publish ([`StoreLoad`]: asymmetric
    /// where membarrier allows).
    pattern: StoreLoad,
    /// Serializes writers (capture begin/end); never taken on the hot path.
    writer: Mutex<()>,
}

/// A read section: while it lives, a writer that published a later epoch waits.
pub(crate) struct Section<'a> {
    counter: Counter<'a>,
    epoch: u64,
}

/// A reader counter as one thread uses it: held alone (plain stores) or shared.
#[derive(Clone, Copy)]
struct Counter<'a> {
    counter: &'a AtomicUsize,
    owned: bool,
}

impl Counter<'_> {
    /// Announces a section: the store half of the store-load pattern.
    #[inline(always)]
    fn announce(self, order: Ordering) {
        if self.owned {
            // Only this thread writes its counter, so a Relaxed load reads its own last
            // store (or the previous owner's, ordered by `thread_slot`'s registry); the
            // store is the pattern's frequent-side store, `order` (pairs with the
            // writer's counter read).
            let now = self.counter.load(Ordering::Relaxed);
            self.counter.store(now + 1, order);
        } else {
            // A shared counter: the same store, as a read-modify-write.
            self.counter.fetch_add(1, order);
        }
    }

    /// Ends a section. Release: pairs with the writer's SeqCst (acquiring) load in
    /// `wait_readers`.
    #[inline]
    fn leave(self) {
        if self.owned {
            let now = self.counter.load(Ordering::Relaxed);
            self.counter.store(now - 1, Ordering::Release);
        } else {
            self.counter.fetch_sub(1, Ordering::Release);
        }
    }
}

impl Section<'_> {
    /// Whether a capture was underway when the section began.
    #[inline]
    pub(crate) fn capturing(&self) -> bool {
        self.epoch & 1 == 1
    }
}

impl Drop for Section<'_> {
    #[inline]
    fn drop(&mut self) {
        self.counter.leave();
    }
}

impl EpochGate {
    /// Epoch 0: no capture.
    pub(crate) fn new() -> Self {
        let set = || (0..OWNED + STRIPES).map(|_| CachePadded::new(AtomicUsize::new(0))).collect();
        EpochGate {
            word: CachePadded::new(AtomicU64::new(0)),
            readers: [set(), set()],
            pattern: StoreLoad::new(),
            writer: Mutex::new(()),
        }
    }

    /// Whether a capture is underway now (a plain read, outside any section).
    #[inline]
    pub(crate) fn capturing(&self) -> bool {
        self.word.load(Ordering::Acquire) & 1 == 1
    }

    /// Begins a read section.
    #[inline(always)]
    pub(crate) fn enter(&self) -> Section<'_> {
        let (s, owned) = match thread_slot(OWNED) {
            Some(s) => (s, true),
            None => (OWNED + thread_stripe(STRIPES), false),
        };
        loop {
            let epoch = self.word.load(Ordering::Acquire);
            let counter = Counter { counter: &self.readers[(epoch & 1) as usize][s], owned };
            // The frequent side of the store-load pattern; pairs with the writer's side
            // in `transition` (see the module docs). Re-read: if a writer published
            // meanwhile it may already have checked our counter; retry under the new
            // epoch.
            let now = self
                .pattern
                .frequent(|order| counter.announce(order), |order| self.word.load(order));
            if now == epoch {
                return Section { counter, epoch };
            }
            counter.leave();
        }
    }

    /// Flips the capture state as the single writer. `check` is given whether a capture
    /// is underway and refuses the flip with `Err`. `before_publish` runs under the writer
    /// lock before the flip (to install state the new epoch's readers need);
    /// `after_grace` runs once every section of the old epoch has ended, and its value is
    /// returned.
    pub(crate) fn transition<T, E>(
        &self,
        check: impl FnOnce(bool) -> Result<(), E>,
        before_publish: impl FnOnce(),
        after_grace: impl FnOnce() -> T,
    ) -> Result<T, E> {
        let _w = lock(&self.writer);
        let old = self.word.load(Ordering::Acquire);
        check(old & 1 == 1)?;
        before_publish();
        // Release (at least): a reader that reads the new word sees what `before_publish`
        // installed.
        self.word.store(old + 1, self.pattern.rare_store());
        // Pairs with the reader's side in `enter` (see the module docs).
        self.pattern.rare_fence();
        self.wait_readers((old & 1) as usize);
        Ok(after_grace())
    }

    fn wait_readers(&self, parity: usize) {
        for counter in self.readers[parity].iter() {
            // Acquire (at least): pairs with the Release decrement that ends a section.
            while counter.load(self.pattern.rare_load()) != 0 {
                spin_wait();
            }
        }
    }
}

#[cfg(all(test, not(streamalloc_loom)))]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    #[test]
    fn parity_tracks_capture() {
        let g = EpochGate::new();
        assert!(!g.enter().capturing());
        g.transition(|c| if c { Err(()) } else { Ok(()) }, || {}, || {}).unwrap();
        assert!(g.capturing());
        assert!(g.enter().capturing());
        assert!(g.transition(|c| if c { Err(()) } else { Ok(()) }, || {}, || {}).is_err());
        g.transition(|c| if c { Ok(()) } else { Err(()) }, || {}, || {}).unwrap();
        assert!(!g.capturing());
    }

    /// The grace period under real threads, with whichever fences this process uses
    /// (asymmetric on Linux): a section that read an even epoch never overlaps the span
    /// between a begin's grace period and the next end's publish.
    #[test]
    fn sections_that_saw_no_capture_end_before_the_capture_does_anything() {
        use std::sync::atomic::AtomicU64 as StdU64;
        let g = EpochGate::new();
        let in_capture = AtomicBool::new(false);
        let stop = AtomicBool::new(false);
        let sections = StdU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| {
                    while !stop.load(Ordering::Relaxed) {
                        let section = g.enter();
                        if !section.capturing() {
                            assert!(
                                !in_capture.load(Ordering::Relaxed),
                                "section overlaps a capture"
                            );
                            std::hint::spin_loop();
                            assert!(
                                !in_capture.load(Ordering::Relaxed),
                                "section overlaps a capture"
                            );
                        }
                        drop(section);
                        sections.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
            for _ in 0..2000 {
                // begin: after the grace period no "no capture" section is open.
                g.transition(
                    |_| Ok::<(), ()>(()),
                    || {},
                    || in_capture.store(true, Ordering::Relaxed),
                )
                .unwrap();
                std::thread::yield_now();
                // end: the capture's work stops before the even epoch is published.
                g.transition(
                    |_| Ok::<(), ()>(()),
                    || in_capture.store(false, Ordering::Relaxed),
                    || {},
                )
                .unwrap();
            }
            stop.store(true, Ordering::Relaxed);
        });
        assert!(sections.load(Ordering::Relaxed) > 0);
    }

    #[test]
    fn writer_waits_for_open_section() {
        let g = EpochGate::new();
        let done = AtomicBool::new(false);
        std::thread::scope(|s| {
            let section = g.enter();
            let h = s.spawn(|| {
                g.transition(|_| Ok::<(), ()>(()), || {}, || done.load(Ordering::SeqCst))
            });
            std::thread::sleep(std::time::Duration::from_millis(50));
            // The writer cannot have finished: our section (old epoch) is open.
            assert!(!h.is_finished());
            done.store(true, Ordering::SeqCst);
            drop(section);
            assert_eq!(h.join().unwrap(), Ok(true));
        });
    }
}
