//! The delegation lane: under contention, one long-lived thread per device makes every
//! `cuMemAllocAsync` / `cuMemFreeAsync` of that device.
//!
//! ```text
//!   caller ──try the lane── free? ──▶ calls the driver itself (uncontended: no hand-over)
//!                            busy ──▶ its request slot (one padded line) ──▶ doorbell
//!                                                                              │
//!   delegate (one per device, started on first need):  sleeps ◀───────────────┘
//!     takes the lane, then round after round: collects every published request,
//!     runs the frees, then the mallocs, completes each slot; gives the lane back
//!     after IDLE without requests (or, unless `always`, after a run of lone ones)
//! ```
//!
//! The driver's allocation state then stays in one core's cache and no lock moves
//! between cores: a waiting caller reads only its own slot. The lane word says who may
//! call the driver: a caller holding `HELD` (the uncontended fast path) or the delegate
//! (`DELEGATE`, set while it holds or wants the lane, which keeps callers off the fast
//! path). The lane is a performance device only: the driver is thread-safe, so nothing
//! relies on it for correctness; the slots carry the ordering (see `slot.rs`).
//!
//! The delegate binds the device's context on its own thread the way every caller does:
//! each driver call binds it (`src/cuda.rs`), and since the delegate serves one device
//! its binding is made once and then only checked. Calls on the per-thread default stream
//! (`CU_STREAM_PER_THREAD`) mean the *calling* thread's stream, so they never go to the
//! delegate. Every call is synchronous for its caller: a free is issued before `free`
//! returns, as the epoch's grace period (S4) requires.

use super::forward_driver;
use super::slot::{Doorbell, Slot};
use crate::driver::{Driver, DriverResult};
use crate::types::{Device, DevicePtr, Stream};
use crossbeam::utils::CachePadded;
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

/// Request slots per device; a thread finds its own through a per-thread memo.
const SLOTS: usize = 64;
/// A caller is in the driver on its own thread.
const HELD: u8 = 1;
/// The delegate holds the lane, or waits for a caller to leave it.
const DELEGATE: u8 = 2;
/// How long an awake delegate waits for a request before it gives the lane back.
const IDLE: Duration = Duration::from_micros(50);
/// Rounds in a row with a single request after which the delegate gives the lane back
/// (one caller alone goes faster on its own thread).
const LONE_ROUNDS: u32 = 64;
/// `CU_STREAM_PER_THREAD`: the calling thread's default stream.
const PER_THREAD_STREAM: usize = 0x2;

#[derive(Clone, Copy, Debug)]
enum Request {
    Malloc { size: usize, stream: Stream },
    Free { ptr: DevicePtr, size: usize, stream: Stream },
}

/// A free's result is `DevicePtr::NULL`; a panic in the driver goes back to its caller.
type Response = std::thread::Result<DriverResult<DevicePtr>>;

impl Request {
    #[inline]
    fn run<D: Driver>(self, driver: &D, device: Device) -> DriverResult<DevicePtr> {
        match self {
            Request::Malloc { size, stream } => driver.malloc_async(device, size, stream),
            Request::Free { ptr, size, stream } => {
                driver.free_async(device, ptr, size, stream).map(|()| DevicePtr::NULL)
            }
        }
    }

    fn stream(self) -> Stream {
        match self {
            Request::Malloc { stream, .. } | Request::Free { stream, .. } => stream,
        }
    }
}

/// One device's lane.
struct DeviceLane {
    /// `HELD` | `DELEGATE` (module docs).
    word: CachePadded<AtomicU8>,
    slots: Box<[CachePadded<Slot<Request, Response>>]>,
    /// Slot indices handed to threads so far (round-robin).
    next: AtomicUsize,
    /// One past the highest slot index a requester used: the delegate scans below it.
    high: AtomicUsize,
    bell: CachePadded<Doorbell>,
    /// The delegate, started by the first request that needs it (`None`: it could not
    /// be started, and callers take the lane themselves).
    delegate: OnceLock<Option<Thread>>,
    /// Tells this lane's entries apart in the per-thread slot memo.
    id: u64,
}

impl DeviceLane {
    fn new() -> Self {
        static IDS: AtomicU64 = AtomicU64::new(1);
        DeviceLane {
            word: CachePadded::new(AtomicU8::new(0)),
            slots: (0..SLOTS).map(|_| CachePadded::new(Slot::new())).collect(),
            next: AtomicUsize::new(0),
            high: AtomicUsize::new(0),
            bell: CachePadded::new(Doorbell::new()),
            delegate: OnceLock::new(),
            id: IDS.fetch_add(1, Ordering::Relaxed),
        }
    }

    fn scanned(&self) -> &[CachePadded<Slot<Request, Response>>] {
        &self.slots[..self.high.load(Ordering::Relaxed).min(SLOTS)]
    }

    fn any_pending(&self) -> bool {
        self.scanned().iter().any(|s| s.pending())
    }

    /// The calling thread's slot, claimed: its own if free, else the next free one.
    fn claim(&self) -> &Slot<Request, Response> {
        let start = self.my_index();
        loop {
            for k in 0..SLOTS {
                let i = (start + k) % SLOTS;
                if self.slots[i].try_claim() {
                    if i >= self.high.load(Ordering::Relaxed) {
                        // Before the request is published: the delegate's scan after it
                        // sees the request sees this too (the doorbell's fences).
                        self.high.fetch_max(i + 1, Ordering::Relaxed);
                    }
                    return &self.slots[i];
                }
            }
            // More waiting threads than slots: wait for one to come free.
            std::thread::yield_now();
        }
    }

    /// This thread's slot index in this lane (a four-entry per-thread memo).
    #[inline]
    fn my_index(&self) -> usize {
        thread_local! {
            static MEMO: Cell<[(u64, usize); 4]> = const { Cell::new([(0, 0); 4]) };
        }
        MEMO.try_with(|m| {
            let mut memo = m.get();
            if let Some(&(_, i)) = memo.iter().find(|e| e.0 == self.id) {
                return i;
            }
            let i = self.next.fetch_add(1, Ordering::Relaxed) % SLOTS;
            memo.rotate_right(1);
            memo[0] = (self.id, i);
            m.set(memo);
            i
        })
        .unwrap_or(0)
    }
}

struct Shared<D: Driver> {
    driver: D,
    devices: Box<[DeviceLane]>,
    /// Every call goes through the delegate (no fast path).
    always: bool,
    stop: AtomicBool,
    delegates: Mutex<Vec<JoinHandle<()>>>,
}

/// A driver whose `malloc_async` / `free_async` run one at a time per device: on the
/// caller's thread when the device's lane is free, else on the device's delegate thread
/// (module docs).
pub struct DelegateLane<D: Driver> {
    shared: Arc<Shared<D>>,
}

impl<D: Driver> DelegateLane<D> {
    /// `driver` with a delegation lane per device: a caller that finds the lane free
    /// calls the driver itself; under contention the delegate makes the calls.
    pub fn new(driver: D) -> Self {
        Self::build(driver, false)
    }

    /// `driver` with every allocation call made by the device's delegate thread.
    pub fn always(driver: D) -> Self {
        Self::build(driver, true)
    }

    fn build(driver: D, always: bool) -> Self {
        let n = driver.device_count().unwrap_or(0);
        let devices = (0..n).map(|_| DeviceLane::new()).collect();
        let stop = AtomicBool::new(false);
        let delegates = Mutex::new(Vec::new());
        DelegateLane { shared: Arc::new(Shared { driver, devices, always, stop, delegates }) }
    }

    /// Whether every call goes through the delegate ([`DelegateLane::always`]).
    pub fn is_always(&self) -> bool {
        self.shared.always
    }

    /// The driver inside.
    #[inline]
    pub fn inner(&self) -> &D {
        &self.shared.driver
    }

    #[inline]
    fn call(&self, device: Device, request: Request) -> DriverResult<DevicePtr> {
        let shared = &*self.shared;
        let Some(lane) = shared.devices.get(device) else {
            // Not a device the driver reported: it refuses the call itself.
            return request.run(&shared.driver, device);
        };
        if request.stream().as_raw() == PER_THREAD_STREAM {
            return request.run(&shared.driver, device);
        }
        if !shared.always
            && lane.word.compare_exchange(0, HELD, Ordering::Acquire, Ordering::Relaxed).is_ok()
        {
            let _leave = Leave(&lane.word);
            return request.run(&shared.driver, device);
        }
        let Some(delegate) = self.delegate(device, lane) else {
            // No delegate thread: take the lane as a spin lock.
            while lane.word.compare_exchange(0, HELD, Ordering::Acquire, Ordering::Relaxed).is_err()
            {
                std::thread::yield_now();
            }
            let _leave = Leave(&lane.word);
            return request.run(&shared.driver, device);
        };
        let slot = lane.claim();
        slot.publish(request);
        lane.bell.ring(|| delegate.unpark());
        match slot.wait() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// The device's delegate, started on first need.
    fn delegate<'a>(&'a self, device: Device, lane: &'a DeviceLane) -> Option<&'a Thread> {
        lane.delegate
            .get_or_init(|| {
                let shared = self.shared.clone();
                let spawned = std::thread::Builder::new()
                    .name(format!("streamalloc-lane-{device}"))
                    .spawn(move || serve(&shared, device));
                match spawned {
                    Ok(handle) => {
                        let thread = handle.thread().clone();
                        let mut all =
                            self.shared.delegates.lock().unwrap_or_else(|p| p.into_inner());
                        all.push(handle);
                        Some(thread)
                    }
                    Err(e) => {
                        log::error!("starting the driver-lane thread of device {device}: {e}");
                        None
                    }
                }
            })
            .as_ref()
    }
}

/// Gives the lane back when a caller's own driver call ends (a panic included).
struct Leave<'a>(&'a AtomicU8);

impl Drop for Leave<'_> {
    #[inline]
    fn drop(&mut self) {
        // Release: the delegate's Acquire wait for HELD to clear orders its calls after.
        self.0.fetch_and(!HELD, Ordering::Release);
    }
}

/// The delegate of `device`: sleeps until a request comes, takes the lane, serves
/// rounds of requests until the lane goes idle (or, unless `always`, one caller is left
/// alone), gives it back.
fn serve<D: Driver>(shared: &Shared<D>, device: Device) {
    let lane = &shared.devices[device];
    let mut round: Vec<(usize, Request)> = Vec::with_capacity(SLOTS);
    loop {
        lane.bell.sleep(|| shared.stop.load(Ordering::Acquire) || lane.any_pending());
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        if !lane.any_pending() {
            continue;
        }
        // Take the lane: callers stop taking it; wait for one inside to leave.
        lane.word.fetch_or(DELEGATE, Ordering::Acquire);
        while lane.word.load(Ordering::Acquire) & HELD != 0 {
            std::hint::spin_loop();
        }
        let mut idle_since: Option<Instant> = None;
        let mut lone = 0u32;
        loop {
            round.clear();
            for (i, slot) in lane.scanned().iter().enumerate() {
                if let Some(request) = slot.take() {
                    round.push((i, request));
                }
            }
            if round.is_empty() {
                let now = Instant::now();
                match idle_since {
                    None => idle_since = Some(now),
                    Some(t) if now - t > IDLE || shared.stop.load(Ordering::Relaxed) => break,
                    Some(_) => {}
                }
                std::hint::spin_loop();
                continue;
            }
            idle_since = None;
            // Frees first (they may give back memory the mallocs need); calls of one
            // round are concurrent, so any order is one their callers could have seen.
            let frees = round.iter().filter(|(_, r)| matches!(r, Request::Free { .. }));
            let mallocs = round.iter().filter(|(_, r)| matches!(r, Request::Malloc { .. }));
            for &(i, request) in frees.chain(mallocs) {
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    request.run(&shared.driver, device)
                }));
                lane.slots[i].complete(result);
            }
            lone = if round.len() == 1 { lone + 1 } else { 0 };
            if !shared.always && lone >= LONE_ROUNDS {
                break;
            }
        }
        // Release: a caller's Acquire fast path orders its call after ours.
        lane.word.fetch_and(!DELEGATE, Ordering::Release);
    }
}

impl<D: Driver> Drop for DelegateLane<D> {
    /// Stops and joins the delegates (no call is in flight: calls borrow the lane).
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        let handles =
            std::mem::take(&mut *self.shared.delegates.lock().unwrap_or_else(|p| p.into_inner()));
        for h in handles {
            h.thread().unpark();
            if h.join().is_err() {
                log::error!("a driver-lane thread panicked");
            }
        }
    }
}

impl<D: Driver> Driver for DelegateLane<D> {
    fn name(&self) -> &'static str {
        self.shared.driver.name()
    }

    #[inline]
    fn malloc_async(&self, device: Device, size: usize, stream: Stream) -> DriverResult<DevicePtr> {
        self.call(device, Request::Malloc { size, stream })
    }

    #[inline]
    fn free_async(
        &self,
        device: Device,
        ptr: DevicePtr,
        size: usize,
        stream: Stream,
    ) -> DriverResult<()> {
        self.call(device, Request::Free { ptr, size, stream }).map(|_| ())
    }

    fn serializes_internally(&self) -> bool {
        false
    }

    forward_driver!(inner);
}
