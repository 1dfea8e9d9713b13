//! A driver that does no device work, for measuring the allocator's bookkeeping alone.
//!
//! No lock anywhere: `malloc_async` is one atomic add on the device's own cache-padded
//! address counter (fresh, 512-aligned addresses, never reused), frees do nothing,
//! events are numbers from a per-thread counter, nothing is ever captured, and every
//! device has a practically unlimited amount of memory.

use super::{CUDA_ERROR_INVALID_DEVICE, error_name};
use crate::driver::{Driver, DriverResult};
use crate::error::DriverError;
use crate::types::{
    CaptureStatus, Device, DevicePtr, Event, MemInfo, PoolAttribute, Stream, UsageStream,
};
use crossbeam::utils::CachePadded;
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// What the null driver reports as each device's free and total memory (1 EiB).
pub const NULL_DEVICE_MEMORY: u64 = 1 << 60;

const ALIGN: u64 = 512;
const ADDR_SHIFT: u32 = 44;

thread_local! {
    /// Event handles: a per-thread counter (handles need not be unique; no sharing).
    static NEXT_EVENT: Cell<usize> = const { Cell::new(1) };
    /// This thread's range of addresses: (driver id, device, next, end). Threads take
    /// 1 GiB ranges from the device's counter, so a malloc touches no shared line.
    static RANGE: Cell<(u64, Device, u64, u64)> = const { Cell::new((0, 0, 0, 0)) };
}

/// Addresses a thread takes from a device's counter at a time.
const RANGE_BYTES: u64 = 1 << 30;

/// A [`Driver`] that does no device work and never fails (except on a bad device).
#[derive(Debug)]
pub struct NullDriver {
    /// Next address per device; padded so that devices do not share a cache line.
    next: Vec<CachePadded<AtomicU64>>,
    next_stream: AtomicUsize,
    /// Tells this driver's per-thread address ranges apart from another's.
    id: u64,
}

impl NullDriver {
    /// A null driver with `devices` devices.
    pub fn new(devices: usize) -> Self {
        let next = (0..devices)
            .map(|d| {
                let base = (d as u64).saturating_add(1).checked_shl(ADDR_SHIFT).unwrap_or(0);
                CachePadded::new(AtomicU64::new(base))
            })
            .collect();
        static IDS: AtomicU64 = AtomicU64::new(1);
        let id = IDS.fetch_add(1, Ordering::Relaxed);
        NullDriver { next, next_stream: AtomicUsize::new(0x5_0000), id }
    }

    fn check(&self, op: &'static str, device: Device) -> DriverResult<()> {
        if device < self.next.len() {
            Ok(())
        } else {
            Err(DriverError::new(
                op,
                CUDA_ERROR_INVALID_DEVICE,
                error_name(CUDA_ERROR_INVALID_DEVICE),
            ))
        }
    }
}

impl Driver for NullDriver {
    fn name(&self) -> &'static str {
        "null"
    }

    fn device_count(&self) -> DriverResult<usize> {
        Ok(self.next.len())
    }

    fn init_device(&self, device: Device) -> DriverResult<()> {
        self.check("cuDeviceGetDefaultMemPool", device)
    }

    fn create_stream(&self, device: Device) -> DriverResult<Stream> {
        self.check("cuStreamCreate", device)?;
        // Relaxed: only uniqueness matters.
        Ok(Stream::simulated(self.next_stream.fetch_add(0x100, Ordering::Relaxed)))
    }

    /// Only the device is checked: the null driver keeps no record of streams (its
    /// users name streams freely) and never dereferences a handle.
    fn check_stream(&self, stream: UsageStream) -> DriverResult<()> {
        self.check("cuStreamGetDevice", stream.device)
    }

    fn check_last_error(&self, device: Device) -> DriverResult<()> {
        self.check("cudaGetLastError", device)
    }

    fn malloc_async(
        &self,
        device: Device,
        size: usize,
        _stream: Stream,
    ) -> DriverResult<DevicePtr> {
        self.check("cuMemAllocAsync", device)?;
        let rounded = ((size as u64).saturating_add(ALIGN - 1) & !(ALIGN - 1)).max(ALIGN);
        let take = |bytes| {
            // Relaxed: the counter only hands out disjoint ranges; nothing else is published.
            self.next[device].fetch_add(bytes, Ordering::Relaxed)
        };
        if rounded > RANGE_BYTES {
            return Ok(DevicePtr::from_raw(take(rounded)));
        }
        let addr = RANGE
            .try_with(|r| {
                let (id, dev, mut next, mut end) = r.get();
                if id != self.id || dev != device || next + rounded > end {
                    next = take(RANGE_BYTES);
                    end = next + RANGE_BYTES;
                }
                r.set((self.id, device, next + rounded, end));
                next
            })
            .unwrap_or_else(|_| take(rounded));
        Ok(DevicePtr::from_raw(addr))
    }

    fn free_async(&self, device: Device, _: DevicePtr, _: usize, _: Stream) -> DriverResult<()> {
        self.check("cuMemFreeAsync", device)
    }

    fn malloc_sync(&self, device: Device, size: usize) -> DriverResult<DevicePtr> {
        self.check("cuMemAlloc", device)?;
        let rounded = ((size as u64).saturating_add(ALIGN - 1) & !(ALIGN - 1)).max(ALIGN);
        // Relaxed: the counter only hands out disjoint ranges; nothing else is published.
        Ok(DevicePtr::from_raw(self.next[device].fetch_add(rounded, Ordering::Relaxed)))
    }

    fn free_sync(&self, device: Device, _: DevicePtr, _: usize) -> DriverResult<()> {
        self.check("cuMemFree", device)
    }

    fn mem_get_info(&self, device: Device) -> DriverResult<MemInfo> {
        self.check("cuMemGetInfo", device)?;
        Ok(MemInfo { free: NULL_DEVICE_MEMORY, total: NULL_DEVICE_MEMORY })
    }

    fn pool_attribute(&self, device: Device, attr: PoolAttribute) -> DriverResult<u64> {
        self.check("cuMemPoolGetAttribute", device)?;
        Ok(match attr {
            PoolAttribute::ReleaseThreshold => u64::MAX,
            PoolAttribute::ReuseFollowEventDependencies
            | PoolAttribute::ReuseAllowOpportunistic
            | PoolAttribute::ReuseAllowInternalDependencies => 1,
            _ => 0,
        })
    }

    fn set_pool_attribute(&self, device: Device, _: PoolAttribute, _: u64) -> DriverResult<()> {
        self.check("cuMemPoolSetAttribute", device)
    }

    fn pool_trim_to(&self, device: Device, _keep: u64) -> DriverResult<()> {
        self.check("cuMemPoolTrimTo", device)
    }

    fn device_synchronize(&self, device: Device) -> DriverResult<()> {
        self.check("cuCtxSynchronize", device)
    }

    fn record_event(&self, stream: UsageStream) -> DriverResult<Event> {
        self.check("cuEventRecord", stream.device)?;
        let e = NEXT_EVENT.with(|c| {
            let e = c.get();
            c.set(e.wrapping_add(1).max(1));
            e
        });
        Ok(Event::from_raw(e))
    }

    fn stream_wait_event(&self, stream: UsageStream, _: &Event) -> DriverResult<()> {
        self.check("cuStreamWaitEvent", stream.device)
    }

    fn event_query(&self, device: Device, _: &Event) -> DriverResult<bool> {
        self.check("cuEventQuery", device)?;
        Ok(true)
    }

    fn destroy_event(&self, device: Device, _: Event) -> DriverResult<()> {
        self.check("cuEventDestroy", device)
    }

    fn capture_status(&self, stream: UsageStream) -> DriverResult<CaptureStatus> {
        self.check("cuStreamGetCaptureInfo", stream.device)?;
        Ok(CaptureStatus::None)
    }

    fn pool_set_access(&self, owner: Device, accessor: Device) -> DriverResult<()> {
        self.check("cuMemPoolSetAccess", owner)?;
        self.check("cuMemPoolSetAccess", accessor)
    }

    fn memcpy_async(
        &self,
        _: DevicePtr,
        dst_device: Device,
        _: DevicePtr,
        src_device: Device,
        _: usize,
        stream: UsageStream,
        _: bool,
    ) -> DriverResult<()> {
        self.check("cuMemcpyAsync", dst_device)?;
        self.check("cuMemcpyAsync", src_device)?;
        self.check("cuMemcpyAsync", stream.device)
    }

    fn memcpy(&self, device: Device, _: DevicePtr, _: DevicePtr, _: usize) -> DriverResult<()> {
        self.check("cuMemcpyDtoD", device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_aligned_addresses_per_device() {
        let d = NullDriver::new(2);
        let a = d.malloc_async(0, 1, Stream::NULL).unwrap();
        let b = d.malloc_async(0, 513, Stream::NULL).unwrap();
        let c = d.malloc_async(1, 0, Stream::NULL).unwrap();
        assert_eq!(a.as_raw() % 512, 0);
        assert_eq!(b.as_raw(), a.as_raw() + 512);
        assert_ne!(c, a);
        d.free_async(0, a, 1, Stream::NULL).unwrap();
        let again = d.malloc_async(0, 1, Stream::NULL).unwrap();
        assert!(again != a && again != b && again != c, "never reuses");
        assert_eq!(d.malloc_async(2, 1, Stream::NULL).unwrap_err().code, 101);
        assert_eq!(d.name(), "null");
        assert_eq!(
            d.capture_status(UsageStream::new(Stream::NULL, 0)).unwrap(),
            CaptureStatus::None
        );
        assert!(d.mem_get_info(1).unwrap().free >= 1 << 40);
    }

    #[test]
    fn many_threads_get_disjoint_addresses() {
        let d = NullDriver::new(1);
        let mut all: Vec<u64> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        (0..1000)
                            .map(|_| d.malloc_async(0, 700, Stream::NULL).unwrap().as_raw())
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
        });
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 4000);
    }
}
