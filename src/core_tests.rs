//! Tests of the core that need a driver of their own: a simulated device whose
//! allocations can be made slow, to interleave a driver call with a capture's begin.

use crate::driver::{Driver, DriverResult};
use crate::lane::forward_driver;
use crate::sim::SimDriver;
use crate::types::{Device, DevicePtr, Stream};
use crate::{CacheConfig, StreamAlloc, StreamOrderedAllocator};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The simulated device, with `cuMemAllocAsync` taking 100 ms while `slow` is set.
struct Slow {
    sim: Arc<SimDriver>,
    slow: AtomicBool,
}

impl Slow {
    fn inner(&self) -> &SimDriver {
        &self.sim
    }
}

impl Driver for Slow {
    fn name(&self) -> &'static str {
        "slow sim"
    }
    fn malloc_async(&self, device: Device, size: usize, s: Stream) -> DriverResult<DevicePtr> {
        if self.slow.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(100));
        }
        self.sim.malloc_async(device, size, s)
    }
    fn free_async(
        &self,
        device: Device,
        ptr: DevicePtr,
        size: usize,
        s: Stream,
    ) -> DriverResult<()> {
        self.sim.free_async(device, ptr, size, s)
    }
    fn serializes_internally(&self) -> bool {
        false
    }
    forward_driver!(inner);
}

/// Issue 13, defect 3: `cache_info`'s trial malloc and free ran outside the epoch's read
/// section, so `begin_capture` did not wait for them and the trial free landed inside the
/// capture (an uncaptured free on a capturing stream). Now `begin_capture` waits for it.
#[test]
fn cache_info_trial_free_never_lands_inside_a_capture() {
    for cache in [CacheConfig::default(), CacheConfig::passthrough()] {
        let sim = Arc::new(SimDriver::with_devices(1, 1 << 30));
        let driver = Arc::new(Slow { sim: sim.clone(), slow: AtomicBool::new(false) });
        let alloc = StreamAlloc::with_config(driver.clone(), 1, cache);
        let s = sim.new_usage_stream(0).unwrap();
        // First use of the device, so the trial below is the only slow call.
        let p = alloc.malloc(0, 512, s.stream).unwrap();
        alloc.free(p).unwrap();
        driver.slow.store(true, Ordering::SeqCst);
        let waited = std::thread::scope(|scope| {
            let info = scope.spawn(|| alloc.cache_info(0, s.stream));
            std::thread::sleep(Duration::from_millis(20)); // inside the trial malloc
            let t0 = Instant::now();
            alloc.begin_capture_on(0, s.stream).unwrap();
            let waited = t0.elapsed();
            sim.begin_capture(s).unwrap();
            assert!(info.join().unwrap().unwrap() > 0);
            waited
        });
        driver.slow.store(false, Ordering::SeqCst);
        sim.end_capture(s).unwrap();
        alloc.end_capture(0, s.stream).unwrap();
        assert!(waited >= Duration::from_millis(50), "{cache:?}: begin_capture waited {waited:?}");
        sim.assert_clean();
    }
}

/// A handle's block (state `HANDLE`) seen through the pointer API, with the cache on and
/// off: the pointer API's free is refused, and after the handle's free a second free is
/// a double free; record_stream, base_allocation and snapshot see the block. The
/// pointer API's own blocks take the one-map-operation free when the cache is off.
#[test]
fn handle_blocks_through_the_pointer_api() {
    use crate::Error;
    for cache in [CacheConfig::default(), CacheConfig::passthrough()] {
        let sim = Arc::new(SimDriver::with_devices(1, 1 << 30));
        let alloc = StreamAlloc::with_config(sim.clone(), 1, cache);
        let s = sim.new_usage_stream(0).unwrap();
        let other = sim.new_usage_stream(0).unwrap();
        let block = alloc.allocate(0, 4096, s.stream).unwrap();
        let p = block.ptr();
        assert_eq!(alloc.free(p), Err(Error::OwnedByHandle { ptr: p }), "{cache:?}");
        assert_eq!(alloc.base_allocation(p).unwrap(), (p, 4096));
        assert_eq!(alloc.device_of(p).unwrap(), (0, 4096));
        alloc.record_stream(p, other).unwrap();
        assert_eq!(alloc.snapshot().len(), 1);
        assert_eq!(alloc.used_bytes(0), 4096);
        block.free().unwrap();
        assert_eq!(alloc.free(p), Err(Error::DoubleFree { ptr: p }), "{cache:?}");
        assert_eq!(alloc.used_bytes(0), 0);
        // Pointer-API blocks: freed once, refused the second time.
        let q = alloc.malloc(0, 100 << 20, s.stream).unwrap();
        alloc.free(q).unwrap();
        assert_eq!(alloc.free(q), Err(Error::DoubleFree { ptr: q }), "{cache:?}");
        assert!(alloc.snapshot().is_empty());
        assert_eq!(alloc.used_bytes(0), 0);
        drop(alloc);
        sim.assert_clean();
    }
}

/// A pointer-API free during a capture of a block allocated before it is deferred (S4)
/// with the cache off too: the one-map-operation free leaves it to the general path.
#[test]
fn uncached_free_during_a_capture_is_deferred() {
    let sim = Arc::new(SimDriver::with_devices(1, 1 << 30));
    let alloc = StreamAlloc::with_config(sim.clone(), 1, CacheConfig::passthrough());
    let s = sim.new_usage_stream(0).unwrap();
    let p = alloc.malloc(0, 4096, s.stream).unwrap();
    alloc.begin_capture(0).unwrap();
    alloc.free(p).unwrap();
    assert_eq!(alloc.free(p), Err(crate::Error::DoubleFree { ptr: p }));
    assert!(alloc.snapshot()[0].free_deferred);
    alloc.end_capture(0, s.stream).unwrap();
    alloc.flush_deferred_frees().unwrap();
    assert!(alloc.snapshot().is_empty());
    assert_eq!(alloc.used_bytes(0), 0);
    sim.assert_clean();
}

/// Epoch counters held by one thread are given back when it exits: many short-lived
/// threads in turn never run out of them, and every section ends with its counter at 0
/// (a capture can begin).
#[test]
fn epoch_counters_of_exited_threads_are_reused() {
    let alloc =
        StreamAlloc::with_config(crate::sim::NullDriver::new(1), 1, CacheConfig::passthrough());
    for _ in 0..300 {
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let p = alloc.malloc(0, 512, Stream::NULL).unwrap();
                alloc.free(p).unwrap();
                assert!(crate::sync::thread_slot(usize::MAX).is_some_and(|i| i < 128));
            });
        });
    }
    alloc.begin_capture(0).unwrap();
    alloc.end_capture(0, Stream::NULL).unwrap();
}
