//! The blocking lane: one mutex per device around the allocation pair.

use super::forward_driver;
use crate::driver::{Driver, DriverResult};
use crate::types::{Device, DevicePtr, Stream};
use crossbeam::utils::CachePadded;
use std::sync::Mutex;

/// A driver whose `malloc_async` / `free_async` run one at a time per device, under a
/// blocking lock (waiters sleep in the kernel, so they take no core from the holder).
pub struct LockLane<D: Driver> {
    driver: D,
    /// One per device, padded so that devices do not share a line.
    locks: Box<[CachePadded<Mutex<()>>]>,
}

impl<D: Driver> LockLane<D> {
    /// `driver` behind a lock per device (as many as it reports; calls for any other
    /// device go straight to the driver, which refuses them).
    pub fn new(driver: D) -> Self {
        let n = driver.device_count().unwrap_or(0);
        let locks = (0..n).map(|_| CachePadded::new(Mutex::new(()))).collect();
        LockLane { driver, locks }
    }

    /// The driver inside.
    #[inline]
    pub fn inner(&self) -> &D {
        &self.driver
    }

    #[inline]
    fn run<R>(&self, device: Device, f: impl FnOnce(&D) -> R) -> R {
        match self.locks.get(device) {
            Some(lock) => {
                // The lock guards no data (the driver keeps its own), so a poisoned one
                // is as good as any.
                let _g = lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                f(&self.driver)
            }
            None => f(&self.driver),
        }
    }
}

impl<D: Driver> Driver for LockLane<D> {
    fn name(&self) -> &'static str {
        self.driver.name()
    }

    #[inline]
    fn malloc_async(&self, device: Device, size: usize, stream: Stream) -> DriverResult<DevicePtr> {
        self.run(device, |d| d.malloc_async(device, size, stream))
    }

    #[inline]
    fn free_async(
        &self,
        device: Device,
        ptr: DevicePtr,
        size: usize,
        stream: Stream,
    ) -> DriverResult<()> {
        self.run(device, |d| d.free_async(device, ptr, size, stream))
    }

    fn serializes_internally(&self) -> bool {
        false
    }

    forward_driver!(inner);
}
