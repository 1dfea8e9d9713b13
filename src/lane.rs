//! The driver lane: one thread at a time per device inside `cuMemAllocAsync` /
//! `cuMemFreeAsync`, by flat combining.
//!
//! The CUDA driver serializes these calls on a lock of its own, and under contention
//! that lock collapses (measured in the brief: 0.6 M pairs/s on one thread, a quarter of
//! that summed over 16). In the lane, a thread publishes its driver call in its slot and
//! then either finds it done or becomes the *combiner*: the one thread that runs every
//! published call, one after the other, while the others wait on their own slot. The
//! driver's lock is never contended, and its data stays in one core's cache for a whole
//! batch instead of moving with every call. Only driver-tier calls take the lane;
//! bookkeeping stays lock-free.
//!
//! ```text
//!   slot[stripe]:  EMPTY ──claim──▶ WRITING ──publish──▶ PENDING ──combiner runs──▶ DONE
//!        ▲                                                                          │
//!        └─────────────────────────────── owner takes the result ◀──────────────────┘
//! ```

use crate::sync::thread_stripe;
use crossbeam::utils::CachePadded;
use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

/// Publication slots; threads are spread over them round-robin. A thread whose slot is
/// taken (more threads than slots) takes the lane as a plain lock instead.
const SLOTS: usize = 64;
const EMPTY: u8 = 0;
const WRITING: u8 = 1;
const PENDING: u8 = 2;
const DONE: u8 = 3;

/// A published call: a pointer to the owner's closure on the owner's stack, valid until
/// the owner sees `DONE` (it waits for that before returning).
type Job = *mut (dyn FnMut() + Send);

struct Slot {
    state: AtomicU8,
    job: UnsafeCell<Option<Job>>,
    /// The waiting owner, to wake when its call is done.
    owner: UnsafeCell<Option<std::thread::Thread>>,
}

/// How driver allocation calls are serialized per device.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DriverLane {
    /// No lane: threads call the driver concurrently.
    Off,
    /// A blocking lock per device: waiters sleep in the kernel.
    Lock,
    /// Flat combining: one thread runs every waiting thread's call; waiters spin.
    Combining,
}

/// A per-device lane around driver calls (see [`DriverLane`]).
pub(crate) struct Lane {
    combiner: CachePadded<AtomicBool>,
    slots: Box<[CachePadded<Slot>]>,
    lock: std::sync::Mutex<()>,
}

// Safety: `job` is written only by the slot's owner between claiming the slot (WRITING)
// and publishing it (PENDING, Release), and read and run only by the combiner after it
// saw PENDING (Acquire) while holding `combiner`; the closure it points to is `Send`.
unsafe impl Sync for Lane {}
// Safety: as above; a `Lane` holds no thread-bound data.
unsafe impl Send for Lane {}

impl Lane {
    pub(crate) fn new() -> Self {
        let slot = || {
            CachePadded::new(Slot {
                state: AtomicU8::new(EMPTY),
                job: UnsafeCell::new(None),
                owner: UnsafeCell::new(None),
            })
        };
        Lane {
            combiner: CachePadded::new(AtomicBool::new(false)),
            slots: (0..SLOTS).map(|_| slot()).collect(),
            lock: std::sync::Mutex::new(()),
        }
    }

    /// Runs `f` under the blocking lock.
    #[inline]
    pub(crate) fn run_blocking<R>(&self, f: impl FnOnce() -> R) -> R {
        let _g = self.lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        f()
    }

    /// Runs `f` alone in the lane (on this thread or on the combiner's) and returns its
    /// result.
    pub(crate) fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        let slot = &self.slots[thread_stripe(SLOTS)];
        if slot
            .state
            .compare_exchange(EMPTY, WRITING, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return self.run_locked(f);
        }
        let mut f = Some(f);
        let mut out: Option<std::thread::Result<R>> = None;
        let mut job = || {
            let f = f.take().expect("a published call runs once");
            out = Some(std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)));
        };
        let job_ref: &mut (dyn FnMut() + Send) = &mut job;
        // Safety: erases the closure's lifetime to store it in the slot. The pointer is
        // used only while this frame waits below for DONE, so it never dangles.
        let job_ptr: Job = unsafe { std::mem::transmute(job_ref) };
        // Safety: we own the slot (WRITING); no one else reads `job` or `owner` until
        // PENDING.
        unsafe {
            *slot.job.get() = Some(job_ptr);
            *slot.owner.get() = Some(std::thread::current());
        }
        // Release: the combiner's Acquire load of PENDING sees the job.
        slot.state.store(PENDING, Ordering::Release);
        // Pairs with the fence after a combiner steps down (see `try_combine`): either it
        // sees our PENDING, or we see the lane free.
        std::sync::atomic::fence(Ordering::SeqCst);
        let mut spins = 0u32;
        // Acquire: pairs with the combiner's Release store of DONE, so `out` is visible.
        while slot.state.load(Ordering::Acquire) != DONE {
            if self.try_combine() {
                continue;
            }
            spins += 1;
            if spins < 64 {
                std::hint::spin_loop();
            } else {
                // Sleep until the combiner wakes us (a waiter that spun would slow the
                // combiner on a shared core); the timeout is a safety net only.
                std::thread::park_timeout(std::time::Duration::from_micros(200));
            }
        }
        // Safety: DONE: the combiner is finished with the slot; it is ours again.
        unsafe { *slot.job.get() = None };
        slot.state.store(EMPTY, Ordering::Release);
        match out.expect("DONE means the call ran") {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// Becomes the combiner if no one is, runs every published call (pass after pass
    /// while new ones come), and steps down; then looks once more, so that a call
    /// published while it stepped down is not left waiting.
    fn try_combine(&self) -> bool {
        let mut combined = false;
        loop {
            if self.combiner.load(Ordering::Relaxed)
                || self
                    .combiner
                    .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                    .is_err()
            {
                return combined;
            }
            combined = true;
            for _pass in 0..8 {
                if !self.run_pending() {
                    break;
                }
            }
            // Release: the next combiner sees the driver calls made by this one as done.
            self.combiner.store(false, Ordering::Release);
            // Pairs with the owner's fence after publishing (see `run`).
            std::sync::atomic::fence(Ordering::SeqCst);
            if !self.slots.iter().any(|s| s.state.load(Ordering::Relaxed) == PENDING) {
                return true;
            }
        }
    }

    /// One pass over the slots, running each published call; whether any ran.
    fn run_pending(&self) -> bool {
        let mut ran = false;
        for slot in self.slots.iter() {
            // Acquire: pairs with the owner's Release store of PENDING.
            if slot.state.load(Ordering::Acquire) == PENDING {
                // Safety: PENDING and we hold `combiner`: the job and owner are published,
                // the owner waits for DONE, and no other thread runs the job.
                let (job, owner) = unsafe { (*slot.job.get(), (*slot.owner.get()).clone()) };
                if let Some(job) = job {
                    // Safety: the closure lives in the waiting owner's frame (see `run`).
                    unsafe { (*job)() };
                }
                // Release: the owner's Acquire load of DONE sees the call's result. After
                // this store the slot is the owner's again: wake it through our clone.
                slot.state.store(DONE, Ordering::Release);
                if let Some(owner) = owner {
                    owner.unpark();
                }
                ran = true;
            }
        }
        ran
    }

    /// The lane as a plain lock, for a thread whose slot is taken.
    fn run_locked<R>(&self, f: impl FnOnce() -> R) -> R {
        while self
            .combiner
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            std::hint::spin_loop();
        }
        struct Unlock<'a>(&'a AtomicBool);
        impl Drop for Unlock<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::Release);
            }
        }
        let _unlock = Unlock(&self.combiner);
        f()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_in_the_lane_never_overlap() {
        let lane = Lane::new();
        struct Counter(UnsafeCell<u64>);
        // Safety (test): only touched inside the lane, which runs one call at a time.
        unsafe impl Sync for Counter {}
        let counter = Counter(UnsafeCell::new(0));
        let threads = 8;
        let per = 20_000;
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| {
                    for _ in 0..per {
                        let c = &counter;
                        let before = lane.run(move || {
                            // Safety: inside the lane (exclusive, see above).
                            let v = unsafe { &mut *c.0.get() };
                            *v += 1;
                            *v
                        });
                        assert!(before > 0);
                    }
                });
            }
        });
        // Safety: every thread has joined; no call is in the lane.
        assert_eq!(unsafe { *counter.0.get() }, threads * per);
    }

    #[test]
    fn a_panicking_call_panics_its_owner_and_the_lane_goes_on() {
        let lane = Lane::new();
        let r =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| lane.run(|| panic!("boom"))));
        assert!(r.is_err());
        assert_eq!(lane.run(|| 7), 7);
    }
}
