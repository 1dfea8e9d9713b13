//! The lanes against a driver that checks them: calls of one device never overlap,
//! every caller gets its own call's result, errors and panics reach their caller.

use super::*;
use crate::error::DriverError;
use crate::sim::NullDriver;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// A null driver whose allocation calls check that no other is in flight on the device,
/// answer `size` as the address (so a caller can tell its own result), fail a size of 3,
/// panic on a size of 5, and count the calls made by a lane's delegate thread.
struct Checking {
    null: NullDriver,
    busy: Vec<AtomicBool>,
    overlaps: AtomicUsize,
    on_delegate: AtomicUsize,
    calls: AtomicUsize,
}

impl Checking {
    fn new(devices: usize) -> Self {
        Checking {
            null: NullDriver::new(devices),
            busy: (0..devices).map(|_| AtomicBool::new(false)).collect(),
            overlaps: AtomicUsize::new(0),
            on_delegate: AtomicUsize::new(0),
            calls: AtomicUsize::new(0),
        }
    }

    fn null(&self) -> &NullDriver {
        &self.null
    }

    fn enter<R>(&self, device: Device, size: usize, f: impl FnOnce() -> R) -> R {
        if self.busy[device].swap(true, Ordering::SeqCst) {
            self.overlaps.fetch_add(1, Ordering::SeqCst);
        }
        self.calls.fetch_add(1, Ordering::SeqCst);
        let lane_thread =
            std::thread::current().name().is_some_and(|n| n.starts_with("streamalloc-lane"));
        if lane_thread {
            self.on_delegate.fetch_add(1, Ordering::SeqCst);
        }
        // Stay a moment, so that overlapping calls would be seen.
        for _ in 0..50 {
            std::hint::spin_loop();
        }
        self.busy[device].store(false, Ordering::SeqCst);
        if size == 5 {
            panic!("driver panic");
        }
        f()
    }
}

impl Driver for Checking {
    fn name(&self) -> &'static str {
        "checking"
    }
    fn malloc_async(&self, device: Device, size: usize, s: Stream) -> DriverResult<DevicePtr> {
        if device >= self.busy.len() {
            return self.null.malloc_async(device, size, s);
        }
        self.enter(device, size, || {
            if size == 3 {
                Err(DriverError::new("cuMemAllocAsync", 2, "CUDA_ERROR_OUT_OF_MEMORY"))
            } else {
                Ok(DevicePtr::from_raw(size as u64))
            }
        })
    }
    fn free_async(
        &self,
        device: Device,
        ptr: DevicePtr,
        size: usize,
        _: Stream,
    ) -> DriverResult<()> {
        self.enter(device, size, || {
            assert_eq!(ptr.as_raw(), size as u64, "a free carries its own arguments");
            Ok(())
        })
    }
    fn serializes_internally(&self) -> bool {
        true
    }
    forward_driver!(null);
}

/// `threads` threads, `per` malloc/free pairs each on `devices` devices, through `lane`;
/// every thread checks its results.
fn hammer(lane: DriverLane, threads: usize, per: usize) -> Arc<Checking> {
    let devices = 2;
    let checking = Arc::new(Checking::new(devices));
    let laned = Laned::new(checking.clone(), lane);
    assert_eq!(laned.lane(), lane);
    std::thread::scope(|s| {
        for t in 0..threads {
            let laned = &laned;
            s.spawn(move || {
                for i in 0..per {
                    let device = (t + i) % devices;
                    let size = 1024 * (t + 1) + i % 7 * 8;
                    let stream = Stream::simulated(0x100 + t);
                    let p = laned.malloc_async(device, size, stream).unwrap();
                    assert_eq!(p.as_raw(), size as u64, "thread {t} got another call's result");
                    laned.free_async(device, p, size, stream).unwrap();
                }
            });
        }
    });
    assert_eq!(checking.overlaps.load(Ordering::SeqCst), 0, "{lane:?}: calls overlapped");
    assert_eq!(checking.calls.load(Ordering::SeqCst), 2 * threads * per);
    checking
}

#[test]
fn lock_lane_serializes_per_device() {
    hammer(DriverLane::Lock, 6, 5_000);
}

#[test]
fn delegate_lane_serializes_and_answers_each_caller() {
    hammer(DriverLane::Delegate, 6, 5_000);
}

#[test]
fn delegate_always_makes_every_call_on_the_delegate() {
    let c = hammer(DriverLane::DelegateAlways, 4, 3_000);
    assert_eq!(c.on_delegate.load(Ordering::SeqCst), c.calls.load(Ordering::SeqCst));
}

#[test]
fn one_caller_alone_calls_the_driver_itself() {
    let c = hammer(DriverLane::Delegate, 1, 2_000);
    assert_eq!(c.on_delegate.load(Ordering::SeqCst), 0, "no contention, no hand-over");
}

#[test]
fn errors_and_panics_reach_their_caller_and_the_lane_goes_on() {
    for lane in [DriverLane::Lock, DriverLane::Delegate, DriverLane::DelegateAlways] {
        let laned = Laned::new(Checking::new(1), lane);
        let s = Stream::simulated(0x100);
        let e = laned.malloc_async(0, 3, s).unwrap_err();
        assert!(e.is_oom(), "{lane:?}");
        let r =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| laned.malloc_async(0, 5, s)));
        assert!(r.is_err(), "{lane:?}: the panic reaches the caller");
        assert_eq!(laned.malloc_async(0, 64, s).unwrap().as_raw(), 64, "{lane:?}");
        // A device the driver does not have: the driver's own error.
        assert!(laned.malloc_async(7, 64, s).is_err());
    }
}

#[test]
fn per_thread_stream_calls_stay_on_the_callers_thread() {
    let c = Arc::new(Checking::new(1));
    let laned = Laned::new(c.clone(), DriverLane::DelegateAlways);
    // Safety: CU_STREAM_PER_THREAD, a valid handle by `from_raw`'s contract; the test
    // driver only compares it.
    let per_thread = unsafe { Stream::from_raw(0x2) };
    let p = laned.malloc_async(0, 64, per_thread).unwrap();
    laned.free_async(0, p, 64, per_thread).unwrap();
    assert_eq!(c.on_delegate.load(Ordering::SeqCst), 0);
    laned.malloc_async(0, 64, Stream::simulated(0x100)).unwrap();
    assert_eq!(c.on_delegate.load(Ordering::SeqCst), 1);
}

#[test]
fn auto_lanes_only_drivers_that_serialize_internally() {
    assert_eq!(Laned::auto(NullDriver::new(1)).lane(), DriverLane::Off);
    assert_eq!(Laned::auto(Checking::new(1)).lane(), DriverLane::configured());
    // A lane is a driver that needs no other.
    let inner = Laned::new(Checking::new(1), DriverLane::Lock);
    assert_eq!(Laned::auto(inner).lane(), DriverLane::Off);
    for l in [DriverLane::Off, DriverLane::Lock, DriverLane::Delegate, DriverLane::DelegateAlways] {
        assert_eq!(DriverLane::from_name(l.name()), Some(l));
    }
    assert_eq!(DriverLane::from_name("combining"), None);
}

#[test]
fn dropping_a_delegate_lane_stops_its_threads() {
    // Many lanes made and dropped: each joins its delegates (a leak would pile up threads
    // that hold the driver: its strong count would stay up).
    let c = Arc::new(Checking::new(2));
    for _ in 0..20 {
        let laned = Laned::new(c.clone(), DriverLane::DelegateAlways);
        laned.malloc_async(0, 64, Stream::simulated(0x100)).unwrap();
        laned.malloc_async(1, 64, Stream::simulated(0x100)).unwrap();
        drop(laned);
        assert_eq!(Arc::strong_count(&c), 1);
    }
}

#[test]
fn a_streamalloc_runs_through_its_lane() {
    use crate::api::StreamOrderedAllocator;
    let c = Arc::new(Checking::new(1));
    let a = crate::StreamAlloc::with_cache(
        Laned::new(c.clone(), DriverLane::DelegateAlways),
        crate::CacheConfig::passthrough(),
    )
    .unwrap();
    let s = Stream::simulated(0x100);
    let p = a.malloc(0, 4096, s).unwrap();
    a.free(p).unwrap();
    // cache_info's trial allocation goes through the lane too.
    let _ = a.cache_info(0, s);
    assert_eq!(c.on_delegate.load(Ordering::SeqCst), c.calls.load(Ordering::SeqCst));
    assert!(c.calls.load(Ordering::SeqCst) >= 3);
}
