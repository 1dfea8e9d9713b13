//! The request slot of the delegation lane, and the doorbell that wakes its delegate.
//!
//! A slot carries one call at a time from a requesting thread to the device's delegate
//! thread and its result back, through one cache-padded line: the requester writes the
//! request and then reads nothing but that line until the result is there.
//!
//! ```text
//!   requester:  FREE ──claim──▶ CLAIMED ──publish──▶ PENDING            DONE ──take──▶ FREE
//!                                                       │                 ▲
//!   delegate:                                          take ──(call)── complete
//!
//!   a requester that waited long sets PARKED on PENDING and sleeps; `complete` wakes it
//! ```
//!
//! Orderings: `publish` is a `Release` store of PENDING that the delegate's `Acquire`
//! load in `take` pairs with (it sees the request); `complete` is an `AcqRel` swap to
//! DONE that the requester's `Acquire` load pairs with (it sees the result). A requester
//! writes `waiter` before it sets PARKED (`Release`), and the delegate reads `waiter` only
//! after it saw PARKED (`Acquire`) and before its swap to DONE hands the slot back, so
//! `waiter` is never read and written at once.
//!
//! The doorbell is a store-load (Dekker) pattern with a `SeqCst` fence on each side: the
//! requester publishes, fences, reads `asleep`; the delegate sets `asleep`, fences, looks
//! for published requests. One of the two sees the other, so no request waits for a
//! delegate that went to sleep without seeing it.

use crate::sync::{
    AtomicBool, AtomicU32, Ordering, Thread, UnsafeCell, current_thread, fence, park, spin_hint,
    spin_wait,
};

const FREE: u32 = 0;
const CLAIMED: u32 = 1;
const PENDING: u32 = 2;
const DONE: u32 = 3;
/// Set on PENDING by a requester that sleeps until `complete` wakes it.
const PARKED: u32 = 4;

/// Spins, then yields (a waiter that shares a core with the delegate lets it run), before
/// a requester sleeps. Under loom one of each, so the sleeping path is explored.
const SPINS: u32 = if cfg!(streamalloc_loom) { 1 } else { 128 };
const YIELDS: u32 = if cfg!(streamalloc_loom) { 1 } else { 4096 };

/// One requester's call and its result (see the module docs).
pub(crate) struct Slot<Q, R> {
    state: AtomicU32,
    request: UnsafeCell<Option<Q>>,
    response: UnsafeCell<Option<R>>,
    /// The sleeping requester, valid while PARKED is set.
    waiter: UnsafeCell<Option<Thread>>,
}

// Safety: the cells are accessed as the state machine allows (module docs): `request` by
// the claiming requester before PENDING and by the delegate after; `response` by the
// delegate before DONE and by the requester after; `waiter` as said above. The values
// move between threads, hence `Send` bounds.
unsafe impl<Q: Send, R: Send> Sync for Slot<Q, R> {}

impl<Q, R> Slot<Q, R> {
    pub(crate) fn new() -> Self {
        Slot {
            state: AtomicU32::new(FREE),
            request: UnsafeCell::new(None),
            response: UnsafeCell::new(None),
            waiter: UnsafeCell::new(None),
        }
    }

    /// Requester: claims the slot if no other requester holds it.
    #[inline]
    pub(crate) fn try_claim(&self) -> bool {
        // Acquire: pairs with the Release store of FREE by the slot's last requester.
        self.state.compare_exchange(FREE, CLAIMED, Ordering::Acquire, Ordering::Relaxed).is_ok()
    }

    /// Requester, holding the claim: publishes the call.
    #[inline]
    pub(crate) fn publish(&self, request: Q) {
        // Safety: CLAIMED: this requester alone touches `request` until PENDING.
        self.request.with_mut(|q| unsafe { *q = Some(request) });
        // Release: the delegate's Acquire load in `take` sees the request.
        self.state.store(PENDING, Ordering::Release);
    }

    /// Requester, after `publish`: waits for the result (spinning, then sleeping), takes
    /// it and frees the slot.
    #[inline]
    pub(crate) fn wait(&self) -> R {
        let mut spins = 0u32;
        loop {
            // Acquire: pairs with the delegate's swap to DONE (the response is visible).
            let s = self.state.load(Ordering::Acquire);
            if s == DONE {
                break;
            }
            if spins < SPINS + YIELDS {
                spins += 1;
                if spins <= SPINS {
                    spin_hint()
                } else {
                    spin_wait()
                }
                continue;
            }
            if s == PENDING {
                // Safety: PENDING without PARKED: the delegate does not read `waiter`.
                self.waiter.with_mut(|w| unsafe { *w = Some(current_thread()) });
                // Release: the delegate that sees PARKED sees `waiter`.
                let parked = self.state.compare_exchange(
                    PENDING,
                    PENDING | PARKED,
                    Ordering::Release,
                    Ordering::Relaxed,
                );
                if parked.is_ok() {
                    // `complete` unparks us after its swap to DONE; spurious wake-ups loop.
                    while self.state.load(Ordering::Acquire) != DONE {
                        park();
                    }
                }
            }
        }
        // Safety: DONE: the delegate is finished with the slot; it is ours.
        let r = self.response.with_mut(|r| unsafe { (*r).take() });
        // Release: the next requester's Acquire claim finds the slot empty.
        self.state.store(FREE, Ordering::Release);
        r.expect("DONE carries a response")
    }

    /// Delegate: the published call, if there is one not taken yet.
    #[inline]
    pub(crate) fn take(&self) -> Option<Q> {
        // Acquire: pairs with the requester's Release store of PENDING.
        if self.state.load(Ordering::Acquire) & !PARKED != PENDING {
            return None;
        }
        // Safety: PENDING: the requester waits and does not touch `request`; only the
        // delegate (one thread per lane) takes it.
        self.request.with_mut(|q| unsafe { (*q).take() })
    }

    /// Whether a call is published (and maybe taken but not complete).
    #[inline]
    pub(crate) fn pending(&self) -> bool {
        self.state.load(Ordering::Relaxed) & !PARKED == PENDING
    }

    /// Delegate: hands the result of a taken call back and wakes its requester if it
    /// sleeps.
    pub(crate) fn complete(&self, response: R) {
        // Safety: PENDING and taken: the requester reads `response` only after DONE.
        self.response.with_mut(|r| unsafe { *r = Some(response) });
        // Acquire: a PARKED seen here makes the requester's `waiter` visible.
        let mut s = self.state.load(Ordering::Acquire);
        loop {
            let waiter = if s & PARKED != 0 {
                // Safety: PARKED is set and the slot is not handed back yet: the requester
                // wrote `waiter` before and does not write it again for this call.
                self.waiter.with(|w| unsafe { (*w).clone() })
            } else {
                None
            };
            // AcqRel: Release hands the response over; Acquire (on failure too) keeps
            // reading a PARKED set meanwhile as above.
            match self.state.compare_exchange(s, DONE, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    if let Some(w) = waiter {
                        w.unpark();
                    }
                    return;
                }
                Err(now) => s = now,
            }
        }
    }
}

/// Wakes a delegate that went to sleep (see the module docs).
pub(crate) struct Doorbell {
    asleep: AtomicBool,
}

impl Doorbell {
    pub(crate) fn new() -> Self {
        Doorbell { asleep: AtomicBool::new(false) }
    }

    /// Requester, after `publish`: wakes the delegate if it sleeps or is about to.
    #[inline]
    pub(crate) fn ring(&self, wake: impl FnOnce()) {
        // Pairs with the fence in `sleep`.
        fence(Ordering::SeqCst);
        if self.asleep.load(Ordering::Relaxed) {
            wake();
        }
    }

    /// Delegate: sleeps unless `work` (asked after announcing the sleep) says there is
    /// something to do. May return early (a stale or spurious wake-up): callers loop.
    pub(crate) fn sleep(&self, work: impl Fn() -> bool) {
        self.asleep.store(true, Ordering::Relaxed);
        // Pairs with the fence in `ring`.
        fence(Ordering::SeqCst);
        if !work() {
            park();
        }
        self.asleep.store(false, Ordering::Relaxed);
    }
}
