//! The driver boundary: the narrow set of stream-ordered device operations that the
//! allocator needs. Implemented by the CUDA driver ([`crate::cuda`]), the simulated
//! device ([`crate::sim`]) and a null driver for measuring bookkeeping alone
//! ([`crate::sim::NullDriver`]).
//!
//! Every method takes the device explicitly: the real backend binds that device's
//! primary context on the calling thread first, so the null stream and pool calls mean
//! what the caller meant.

use crate::error::{CUDA_ERROR_NOT_SUPPORTED, DriverError};
use crate::types::{
    CaptureStatus, Device, DevicePtr, Event, MemInfo, PoolAttribute, Stream, UsageStream,
};

/// Result of a driver call.
pub type DriverResult<T> = Result<T, DriverError>;

/// Stream-ordered device operations on each device's default memory pool.
pub trait Driver: Send + Sync + 'static {
    /// A short name for logs and benchmark tables ("cuda", "sim", "null").
    fn name(&self) -> &'static str;

    /// How many devices there are. Must not create a context (S1).
    fn device_count(&self) -> DriverResult<usize>;

    /// S2: configure the device's default pool (release threshold `u64::MAX`, the three
    /// reuse flags on). Called once per device, on first use.
    fn init_device(&self, device: Device) -> DriverResult<()>;

    /// Creates a non-blocking stream on `device` (the unifying free stream).
    fn create_stream(&self, device: Device) -> DriverResult<Stream>;

    /// Whether `stream.stream` is a stream of `stream.device`: `Ok` for a live stream of
    /// that device (the null stream is every device's own), else an error:
    /// `CUDA_ERROR_INVALID_DEVICE` for a device that does not exist,
    /// `CUDA_ERROR_INVALID_HANDLE` for a stream that does not exist (where the driver
    /// can tell) or one of another device. No work is enqueued and no state changes.
    fn check_stream(&self, stream: UsageStream) -> DriverResult<()>;

    /// S23: reports (and clears) an error left by earlier asynchronous work on this
    /// thread/device, the way `cudaGetLastError` does.
    fn check_last_error(&self, device: Device) -> DriverResult<()>;

    /// `cuMemAllocAsync` from the device's default pool, ordered on `stream`.
    /// Out of memory is a [`DriverError`] whose [`DriverError::is_oom`] holds.
    fn malloc_async(&self, device: Device, size: usize, stream: Stream) -> DriverResult<DevicePtr>;

    /// `cuMemFreeAsync` of `ptr` (of `size` bytes, allocated on `device`), ordered on `stream`.
    fn free_async(
        &self,
        device: Device,
        ptr: DevicePtr,
        size: usize,
        stream: Stream,
    ) -> DriverResult<()>;

    /// `cuMemAlloc`: `size` bytes on `device` outside the stream-ordered pool, for
    /// memory that must keep its address across a CUDA graph capture (the private pools
    /// of [`crate::pools`]). Allowed while a stream is being captured (the CUDA backend
    /// switches the thread to the relaxed capture mode for the call): the allocation is
    /// not a graph node and the graph may use it at once. The default refuses
    /// (`CUDA_ERROR_NOT_SUPPORTED`), for drivers without synchronous memory.
    fn malloc_sync(&self, device: Device, size: usize) -> DriverResult<DevicePtr> {
        let _ = (device, size);
        Err(DriverError::new("cuMemAlloc", CUDA_ERROR_NOT_SUPPORTED, "CUDA_ERROR_NOT_SUPPORTED"))
    }

    /// `cuMemFree` of a block from [`Driver::malloc_sync`]. Synchronizes the device, so
    /// every use has completed; must not be called while a stream of the device is
    /// being captured (CUDA refuses it there).
    fn free_sync(&self, device: Device, ptr: DevicePtr, size: usize) -> DriverResult<()> {
        let _ = (device, ptr, size);
        Err(DriverError::new("cuMemFree", CUDA_ERROR_NOT_SUPPORTED, "CUDA_ERROR_NOT_SUPPORTED"))
    }

    /// `cuMemGetInfo` for the device.
    fn mem_get_info(&self, device: Device) -> DriverResult<MemInfo>;

    /// Reads an attribute of the device's default pool (flags read as 0 or 1).
    fn pool_attribute(&self, device: Device, attr: PoolAttribute) -> DriverResult<u64>;

    /// Sets an attribute of the device's default pool.
    fn set_pool_attribute(
        &self,
        device: Device,
        attr: PoolAttribute,
        value: u64,
    ) -> DriverResult<()>;

    /// `cuMemPoolTrimTo`: releases unused reserved memory down to `keep` bytes.
    fn pool_trim_to(&self, device: Device, keep: u64) -> DriverResult<()>;

    /// Waits for all work on the device.
    fn device_synchronize(&self, device: Device) -> DriverResult<()>;

    /// Records an event on `stream` (an event made on the stream's own device, S24).
    fn record_event(&self, stream: UsageStream) -> DriverResult<Event>;

    /// Makes `stream` wait for `event` (which may come from another device).
    fn stream_wait_event(&self, stream: UsageStream, event: &Event) -> DriverResult<()>;

    /// Whether the work captured by `event` has completed (`cuEventQuery`).
    fn event_query(&self, device: Device, event: &Event) -> DriverResult<bool>;

    /// Releases an event (it may still be pending; the driver frees it when done). The
    /// event is consumed: it cannot be used afterwards.
    fn destroy_event(&self, device: Device, event: Event) -> DriverResult<()>;

    /// Whether `stream` is being captured.
    fn capture_status(&self, stream: UsageStream) -> DriverResult<CaptureStatus>;

    /// S18: lets `accessor` read and write memory of `owner`'s default pool.
    fn pool_set_access(&self, owner: Device, accessor: Device) -> DriverResult<()>;

    /// S19: asynchronous device-to-device copy (`peer` selects a peer copy between two
    /// devices without p2p access enabled).
    #[allow(clippy::too_many_arguments)]
    fn memcpy_async(
        &self,
        dst: DevicePtr,
        dst_device: Device,
        src: DevicePtr,
        src_device: Device,
        count: usize,
        stream: UsageStream,
        peer: bool,
    ) -> DriverResult<()>;

    /// S21: synchronous device-to-device copy of `count` bytes.
    fn memcpy(
        &self,
        device: Device,
        dst: DevicePtr,
        src: DevicePtr,
        count: usize,
    ) -> DriverResult<()>;

    /// Whether concurrent allocation calls contend inside the driver, so that the
    /// allocator does better to let one thread at a time per device make them (the
    /// driver lane, `src/lane/`). True for CUDA; false for drivers that scale.
    fn serializes_internally(&self) -> bool {
        false
    }

    /// Whether `malloc_async` and `free_async` themselves report an error left by earlier
    /// work (S23), so that the allocator need not call `check_last_error` before each.
    /// True for CUDA, where a sticky error is returned by every later call on the
    /// context (and `check_last_error` is one more driver call that sees nothing else);
    /// false where the check reports something the calls do not (the simulated device's
    /// injected errors).
    fn calls_report_prior_errors(&self) -> bool {
        false
    }

    /// Tells the driver layer that a block the allocator kept (never returned to the
    /// driver) is handed out again on `stream`. A no-op on real hardware; the simulated
    /// device checks that the reuse is ordered after the block's last use.
    fn note_reuse(&self, _device: Device, _ptr: DevicePtr, _size: usize, _stream: Stream) {}

    /// Tells the driver layer that a block was returned to the allocator's own cache on
    /// `stream` (not to the driver). A no-op on real hardware.
    fn note_cached(&self, _device: Device, _ptr: DevicePtr, _size: usize, _stream: Stream) {}

    /// Makes `dependent` wait for all work so far on `dependency` (event record, wait,
    /// destroy: the seed's `sync_raw`). The event is made on the dependency's device.
    fn sync_streams(&self, dependency: UsageStream, dependent: UsageStream) -> DriverResult<()> {
        let event = self.record_event(dependency)?;
        let waited = self.stream_wait_event(dependent, &event);
        let destroyed = self.destroy_event(dependency.device, event);
        waited.and(destroyed)
    }
}

/// A shared driver is a driver: tests keep a handle on the simulated device while the
/// allocator owns another, and `Arc<dyn Driver>` picks a backend at run time.
impl<T: Driver + ?Sized> Driver for std::sync::Arc<T> {
    fn name(&self) -> &'static str {
        (**self).name()
    }
    fn device_count(&self) -> DriverResult<usize> {
        (**self).device_count()
    }
    fn init_device(&self, device: Device) -> DriverResult<()> {
        (**self).init_device(device)
    }
    fn create_stream(&self, device: Device) -> DriverResult<Stream> {
        (**self).create_stream(device)
    }
    fn check_stream(&self, stream: UsageStream) -> DriverResult<()> {
        (**self).check_stream(stream)
    }
    #[inline]
    fn check_last_error(&self, device: Device) -> DriverResult<()> {
        (**self).check_last_error(device)
    }
    #[inline]
    fn malloc_async(&self, device: Device, size: usize, stream: Stream) -> DriverResult<DevicePtr> {
        (**self).malloc_async(device, size, stream)
    }
    #[inline]
    fn free_async(
        &self,
        device: Device,
        ptr: DevicePtr,
        size: usize,
        stream: Stream,
    ) -> DriverResult<()> {
        (**self).free_async(device, ptr, size, stream)
    }
    fn malloc_sync(&self, device: Device, size: usize) -> DriverResult<DevicePtr> {
        (**self).malloc_sync(device, size)
    }
    fn free_sync(&self, device: Device, ptr: DevicePtr, size: usize) -> DriverResult<()> {
        (**self).free_sync(device, ptr, size)
    }
    fn mem_get_info(&self, device: Device) -> DriverResult<MemInfo> {
        (**self).mem_get_info(device)
    }
    fn pool_attribute(&self, device: Device, attr: PoolAttribute) -> DriverResult<u64> {
        (**self).pool_attribute(device, attr)
    }
    fn set_pool_attribute(
        &self,
        device: Device,
        attr: PoolAttribute,
        value: u64,
    ) -> DriverResult<()> {
        (**self).set_pool_attribute(device, attr, value)
    }
    fn pool_trim_to(&self, device: Device, keep: u64) -> DriverResult<()> {
        (**self).pool_trim_to(device, keep)
    }
    fn device_synchronize(&self, device: Device) -> DriverResult<()> {
        (**self).device_synchronize(device)
    }
    fn record_event(&self, stream: UsageStream) -> DriverResult<Event> {
        (**self).record_event(stream)
    }
    fn stream_wait_event(&self, stream: UsageStream, event: &Event) -> DriverResult<()> {
        (**self).stream_wait_event(stream, event)
    }
    fn event_query(&self, device: Device, event: &Event) -> DriverResult<bool> {
        (**self).event_query(device, event)
    }
    fn destroy_event(&self, device: Device, event: Event) -> DriverResult<()> {
        (**self).destroy_event(device, event)
    }
    fn capture_status(&self, stream: UsageStream) -> DriverResult<CaptureStatus> {
        (**self).capture_status(stream)
    }
    fn pool_set_access(&self, owner: Device, accessor: Device) -> DriverResult<()> {
        (**self).pool_set_access(owner, accessor)
    }
    fn memcpy_async(
        &self,
        dst: DevicePtr,
        dst_device: Device,
        src: DevicePtr,
        src_device: Device,
        count: usize,
        stream: UsageStream,
        peer: bool,
    ) -> DriverResult<()> {
        (**self).memcpy_async(dst, dst_device, src, src_device, count, stream, peer)
    }
    fn memcpy(
        &self,
        device: Device,
        dst: DevicePtr,
        src: DevicePtr,
        count: usize,
    ) -> DriverResult<()> {
        (**self).memcpy(device, dst, src, count)
    }
    fn serializes_internally(&self) -> bool {
        (**self).serializes_internally()
    }
    fn calls_report_prior_errors(&self) -> bool {
        (**self).calls_report_prior_errors()
    }
    #[inline]
    fn note_reuse(&self, device: Device, ptr: DevicePtr, size: usize, stream: Stream) {
        (**self).note_reuse(device, ptr, size, stream)
    }
    #[inline]
    fn note_cached(&self, device: Device, ptr: DevicePtr, size: usize, stream: Stream) {
        (**self).note_cached(device, ptr, size, stream)
    }
    fn sync_streams(&self, dependency: UsageStream, dependent: UsageStream) -> DriverResult<()> {
        (**self).sync_streams(dependency, dependent)
    }
}
