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
