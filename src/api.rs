//! The operations both allocators offer (the lock-free [`crate::StreamAlloc`] and the
//! mutex [`crate::SeedReplica`]), so tests, benches and fuzz targets can drive either and
//! compare them. Each method names the seed behaviour (S-number) it implements.
//!
//! **Bad input is refused at the door.** Every operation that names a device refuses one
//! outside `0..device_count` with [`Error::InvalidDevice`], and `record_stream` refuses a
//! stream that is not a stream of the device it is named with ([`Error::InvalidStream`]),
//! before any state changes: nothing the allocator keeps can fail later because of an
//! argument it accepted.

use crate::error::{
    CUDA_ERROR_INVALID_CONTEXT, CUDA_ERROR_INVALID_DEVICE, CUDA_ERROR_INVALID_HANDLE, Error, Result,
};
use crate::types::{Device, DevicePtr, Stream, UsageStream};

/// Device statistics (S11): from the default pool's attributes, plus this allocator's
/// own byte count.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeviceStats {
    /// Bytes the pool has reserved from the device now (`ReservedMemCurrent`).
    pub reserved_current: u64,
    /// High watermark of reserved bytes (`ReservedMemHigh`).
    pub reserved_peak: u64,
    /// Bytes the pool has handed out now (`UsedMemCurrent`).
    pub used_current: u64,
    /// High watermark of handed-out bytes (`UsedMemHigh`).
    pub used_peak: u64,
    /// Bytes in live allocations made through this allocator (the seed's
    /// `pytorch_used_bytes`).
    pub allocated_current: u64,
    /// Bytes held in the allocator's own cache, not live and not returned to the pool
    /// (0 when no cache is in front of the driver).
    pub cached_current: u64,
    /// Allocations served from the allocator's cache without a driver call.
    pub cache_hits: u64,
    /// Allocations that found no idle block on their stream's cache.
    pub cache_misses: u64,
    /// Stream caches the front cache keeps on this device now.
    pub cache_streams: u64,
    /// Driver allocations retried after a driver out-of-memory released idle blocks
    /// (the seed's `num_alloc_retries`).
    pub alloc_retries: u64,
}

/// One live block, as a snapshot reports it (S13/S22).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockSnapshot {
    /// The block's address.
    pub ptr: DevicePtr,
    /// Its size in bytes.
    pub size: u64,
    /// The stream it was allocated on.
    pub creation_stream: UsageStream,
    /// Streams recorded with `record_stream`.
    pub recorded_streams: Vec<UsageStream>,
    /// Whether it was allocated during a capture.
    pub captured: bool,
    /// Whether its free is deferred until the current capture ends.
    pub free_deferred: bool,
}

/// The seed's allocator interface, in Rust terms.
pub trait StreamOrderedAllocator: Send + Sync {
    /// S20: the allocator's name.
    fn name(&self) -> &'static str;

    /// S1: the number of devices the allocator was initialized with.
    fn device_count(&self) -> usize;

    /// S3: allocates `size` bytes on `device`, ordered on `stream`. Size 0 gives
    /// [`DevicePtr::NULL`] with no driver call.
    fn malloc(&self, device: Device, size: usize, stream: Stream) -> Result<DevicePtr>;

    /// S4/S5: frees a pointer from [`Self::malloc`] (null is a no-op).
    fn free(&self, ptr: DevicePtr) -> Result<()>;

    /// S6: records that `ptr` is used on `stream` (null pointer: no-op). A stream the
    /// driver does not know, or one of another device than `stream.device`, is refused
    /// with [`Error::InvalidStream`] (a device that does not exist with
    /// [`Error::InvalidDevice`]) and nothing is recorded: a block recorded on an unusable
    /// stream could never be freed.
    fn record_stream(&self, ptr: DevicePtr, stream: UsageStream) -> Result<()>;

    /// S7: limits this allocator's bytes on `device` to `fraction` of the device total.
    fn set_memory_fraction(&self, fraction: f64, device: Device) -> Result<()>;

    /// S8: synchronizes each initialized device and trims its pool to 0.
    fn empty_cache(&self) -> Result<()>;

    /// S9: the largest workspace that can be allocated now on `device`.
    fn cache_info(&self, device: Device, stream: Stream) -> Result<u64>;

    /// S10: the base allocation of `ptr` and its size.
    fn base_allocation(&self, ptr: DevicePtr) -> Result<(DevicePtr, u64)>;

    /// The device and size of the live block at `ptr` (one lookup, no scan), for
    /// callers that get a pointer without its device (PyTorch's plain record-stream
    /// hook). Unknown pointer or double free: the error `free` would give.
    fn device_of(&self, ptr: DevicePtr) -> Result<(Device, u64)>;

    /// S11: device statistics; zeros for a device not yet used (no context is created).
    fn device_stats(&self, device: Device) -> Result<DeviceStats>;

    /// S12: resets the pool's high watermarks to 0.
    fn reset_peak_stats(&self, device: Device) -> Result<()>;

    /// S12: accumulated stats are not kept; warns once.
    fn reset_accumulated_stats(&self, device: Device) -> Result<()>;

    /// S14: a capture begins on `device` (one at a time in the process).
    ///
    /// As every operation that names a device, a device outside `0..device_count` is
    /// refused with [`Error::InvalidDevice`] before anything changes (here: no capture
    /// begins), in the core, the replica and the C ABI alike, although the seed ignores
    /// this argument.
    fn begin_capture(&self, device: Device) -> Result<()>;

    /// S15: the capture on `device` is about to end: `capture_stream` waits on every
    /// stream a free was issued on during the capture, then the capture is over.
    fn end_capture(&self, device: Device, capture_stream: Stream) -> Result<()>;

    /// S16: releasing a capture's pool does nothing.
    fn release_pool(&self, _device: Device) {}

    /// S18: lets `accessor` access memory of `owner`'s pool.
    fn enable_peer_access(&self, accessor: Device, owner: Device) -> Result<()>;

    /// S19: asynchronous copy; device-to-device when on one device or p2p is enabled,
    /// else a peer copy.
    #[allow(clippy::too_many_arguments)]
    fn memcpy_async(
        &self,
        dst: DevicePtr,
        dst_device: Device,
        src: DevicePtr,
        src_device: Device,
        count: usize,
        stream: UsageStream,
        p2p_enabled: bool,
    ) -> Result<()>;

    /// S21: synchronous device-to-device copy.
    fn copy_data(&self, device: Device, dst: DevicePtr, src: DevicePtr, count: usize)
    -> Result<()>;

    /// How many times each of the seed's warnings was emitted.
    fn warnings(&self) -> crate::WarningCounts;

    /// Whether a capture is underway (S14).
    fn capture_underway(&self) -> bool;

    /// Bytes in live allocations on `device` (the seed's `pytorch_used_bytes`).
    fn used_bytes(&self, device: Device) -> u64;

    /// The user limit on `device` (`u64::MAX` when unset).
    fn memory_limit(&self, device: Device) -> u64;

    /// Live blocks (including those whose free is deferred), sorted by address (S13/S22).
    fn snapshot(&self) -> Vec<BlockSnapshot>;
}

// ----- pieces both allocators share -------------------------------------------------

/// S11: the pool's four attributes, read through the driver.
pub(crate) fn pool_stats<D: crate::Driver>(driver: &D, device: Device) -> Result<DeviceStats> {
    use crate::PoolAttribute as A;
    let attr = |a| driver.pool_attribute(device, a);
    Ok(DeviceStats {
        reserved_current: attr(A::ReservedMemCurrent)?,
        reserved_peak: attr(A::ReservedMemHigh)?,
        used_current: attr(A::UsedMemCurrent)?,
        used_peak: attr(A::UsedMemHigh)?,
        ..DeviceStats::default()
    })
}

/// S12: both high watermarks back to 0 (the pool then reports its current values).
pub(crate) fn reset_pool_peaks<D: crate::Driver>(driver: &D, device: Device) -> Result<()> {
    driver.set_pool_attribute(device, crate::PoolAttribute::ReservedMemHigh, 0)?;
    driver.set_pool_attribute(device, crate::PoolAttribute::UsedMemHigh, 0)?;
    Ok(())
}

/// Refuses a stream that cannot be used with its device, before an allocator keeps it
/// (record_stream): a device outside `0..device_count` is [`Error::InvalidDevice`], a
/// stream the driver does not know, or one of another device, is
/// [`Error::InvalidStream`]. Any other driver failure is [`Error::Driver`].
pub(crate) fn check_stream<D: crate::Driver>(
    driver: &D,
    device_count: usize,
    stream: UsageStream,
) -> Result<()> {
    if stream.device >= device_count {
        return Err(Error::InvalidDevice { device: stream.device as i64, device_count });
    }
    match driver.check_stream(stream) {
        Ok(()) => Ok(()),
        Err(cause)
            if matches!(
                cause.code,
                CUDA_ERROR_INVALID_HANDLE | CUDA_ERROR_INVALID_DEVICE | CUDA_ERROR_INVALID_CONTEXT
            ) =>
        {
            Err(Error::InvalidStream { stream: stream.stream, device: stream.device, cause })
        }
        Err(e) => Err(e.into()),
    }
}

/// S19: a device-to-device copy when on one device or p2p is enabled, else a peer copy.
#[allow(clippy::too_many_arguments)]
pub(crate) fn copy_async<D: crate::Driver>(
    driver: &D,
    dst: DevicePtr,
    dst_device: Device,
    src: DevicePtr,
    src_device: Device,
    count: usize,
    stream: UsageStream,
    p2p_enabled: bool,
) -> Result<()> {
    let peer = !(p2p_enabled || dst_device == src_device);
    driver.memcpy_async(dst, dst_device, src, src_device, count, stream, peer)?;
    Ok(())
}
