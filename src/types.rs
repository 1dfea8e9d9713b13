//! Plain `Copy` handles that match CUDA's own: a stream is a `CUstream` (which is also a
//! runtime `cudaStream_t`, so a stream from PyTorch can be passed straight in), a device
//! pointer is a `CUdeviceptr`, an event is a `CUevent`.

use std::fmt;

/// A device ordinal, as CUDA numbers devices (0-based).
pub type Device = usize;

/// A CUDA stream handle (`CUstream` / `cudaStream_t`), carried as its address.
///
/// `Stream::NULL` is the legacy default stream of whatever device it is used on, as in
/// CUDA; the allocator always pairs a stream with its device ([`UsageStream`]).
///
/// A `Stream` is a cheap `Copy` handle that does not own the stream. Safe code gets one
/// only from a driver ([`crate::Driver::create_stream`]), as [`Stream::NULL`], or as a
/// [simulated](Stream::simulated) handle that the CUDA backend refuses; making one from
/// an arbitrary address is `unsafe` ([`Stream::from_raw`]), because the CUDA backend
/// hands it to the driver, which dereferences it.
#[repr(transparent)]
#[derive(Copy, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Stream(usize);

/// The bit that marks a [simulated](Stream::simulated) stream handle: never set in a
/// user-space address, so never in a real `CUstream`.
pub const SIMULATED_STREAM_TAG: usize = 1 << (usize::BITS - 1);

impl Stream {
    /// The legacy default stream (handle 0).
    pub const NULL: Stream = Stream(0);

    /// Wraps a raw handle (for example a `cudaStream_t` cast to `usize`).
    ///
    /// # Safety
    /// If the stream is ever given to the CUDA backend ([`crate::cuda::CudaDriver`], or
    /// an allocator over it), `raw` must be 0, `CU_STREAM_LEGACY`, `CU_STREAM_PER_THREAD`
    /// or a live `CUstream` of this process, and stay live while any copy of the
    /// returned handle is used with that backend. Handles used only with the simulated
    /// or null drivers may be any value (prefer [`Stream::simulated`] there: it is safe).
    pub const unsafe fn from_raw(raw: usize) -> Self {
        Stream(raw)
    }

    /// A handle for the simulated and null drivers: `n` with
    /// [`SIMULATED_STREAM_TAG`] set. The CUDA backend refuses it
    /// (`CUDA_ERROR_INVALID_HANDLE`) without passing it to the driver, so it is safe to
    /// make from any number (for example a garbage handle in a test). `simulated(0)` is
    /// not the null stream.
    pub const fn simulated(n: usize) -> Self {
        Stream(n | SIMULATED_STREAM_TAG)
    }

    /// Whether this is a [simulated](Stream::simulated) handle.
    pub const fn is_simulated(self) -> bool {
        self.0 & SIMULATED_STREAM_TAG != 0
    }

    /// The raw handle.
    pub const fn as_raw(self) -> usize {
        self.0
    }

    /// Whether this is the legacy default stream.
    pub const fn is_null(self) -> bool {
        self.0 == 0
    }
}

impl fmt::Debug for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Stream({:#x})", self.0)
    }
}

/// A device address (`CUdeviceptr`). `DevicePtr::NULL` is what a zero-byte allocation
/// returns.
#[repr(transparent)]
#[derive(Copy, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct DevicePtr(u64);

impl DevicePtr {
    /// The null device pointer.
    pub const NULL: DevicePtr = DevicePtr(0);

    /// Wraps a raw device address.
    pub const fn from_raw(raw: u64) -> Self {
        DevicePtr(raw)
    }

    /// The raw device address.
    pub const fn as_raw(self) -> u64 {
        self.0
    }

    /// Whether this is the null pointer.
    pub const fn is_null(self) -> bool {
        self.0 == 0
    }

    /// The address `bytes` further on (for declaring uses of a sub-range, copies).
    pub const fn offset(self, bytes: u64) -> Self {
        DevicePtr(self.0 + bytes)
    }
}

impl fmt::Debug for DevicePtr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DevicePtr({:#x})", self.0)
    }
}

impl fmt::Display for DevicePtr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// A CUDA event handle (`CUevent`), carried as its address, owned by whoever holds it:
/// not `Copy` or `Clone`, so an event given back to the driver
/// ([`crate::Driver::destroy_event`], which takes it by value) cannot be used again.
///
/// It remembers which driver made it: the CUDA backend accepts only its own events
/// (those it returned from `record_event`), so an event made by [`Event::from_raw`], or
/// by another driver, never reaches the CUDA driver; making one from a number is
/// therefore safe. The simulated and null drivers go by the number alone.
#[derive(PartialEq, Eq, Hash, Debug)]
pub struct Event {
    raw: usize,
    /// The id of the driver instance that made it (0: none, a foreign handle).
    origin: u64,
}

impl Event {
    /// Wraps a raw handle as a foreign event (the CUDA backend refuses it).
    pub const fn from_raw(raw: usize) -> Self {
        Event { raw, origin: 0 }
    }

    /// An event made by the driver instance `origin` (non-zero).
    pub(crate) const fn made_by(raw: usize, origin: u64) -> Self {
        Event { raw, origin }
    }

    /// The id of the driver instance that made the event (0 for [`Event::from_raw`]).
    pub(crate) const fn origin(&self) -> u64 {
        self.origin
    }

    /// The raw handle.
    pub const fn as_raw(&self) -> usize {
        self.raw
    }
}

/// A stream together with the device it belongs to: the seed's `UsageStream`.
///
/// The device matters because the null stream means a different stream on each device,
/// and because events must be recorded on the stream's own device (S24).
#[derive(Copy, Clone, PartialEq, Eq, Hash, Debug)]
pub struct UsageStream {
    /// The stream handle.
    pub stream: Stream,
    /// The device the stream belongs to.
    pub device: Device,
}

impl UsageStream {
    /// Pairs a stream with its device.
    pub const fn new(stream: Stream, device: Device) -> Self {
        UsageStream { stream, device }
    }
}

/// Whether a stream is being captured into a CUDA graph.
#[derive(Copy, Clone, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum CaptureStatus {
    /// Not capturing.
    None,
    /// Capture underway.
    Active,
    /// Capture was invalidated by an error and must be ended.
    Invalidated,
}

/// The attributes of a device's default memory pool that the allocator reads or sets
/// (`CUmemPool_attribute`).
#[derive(Copy, Clone, PartialEq, Eq, Hash, Debug)]
#[non_exhaustive]
pub enum PoolAttribute {
    /// Bytes of reserved memory the pool keeps before releasing to the OS at a sync.
    ReleaseThreshold,
    /// Reuse a block freed on another stream once an event dependency orders it.
    ReuseFollowEventDependencies,
    /// Reuse a block whose free has completed, as seen by the host.
    ReuseAllowOpportunistic,
    /// Reuse by inserting dependencies the driver adds itself.
    ReuseAllowInternalDependencies,
    /// Bytes currently reserved by the pool.
    ReservedMemCurrent,
    /// High watermark of reserved bytes (settable to 0 only).
    ReservedMemHigh,
    /// Bytes currently handed out by the pool.
    UsedMemCurrent,
    /// High watermark of used bytes (settable to 0 only).
    UsedMemHigh,
}

/// Free and total memory of a device, as `cuMemGetInfo` reports it.
#[derive(Copy, Clone, PartialEq, Eq, Debug, Default)]
pub struct MemInfo {
    /// Free bytes according to the driver.
    pub free: u64,
    /// Total bytes of the device.
    pub total: u64,
}

/// Formats a byte count the way PyTorch's `format_size` does (used in OOM messages).
pub fn format_size(size: u64) -> String {
    const KIB: u64 = 1024;
    const MIB: u64 = KIB * 1024;
    const GIB: u64 = MIB * 1024;
    if size == u64::MAX {
        "unlimited".to_string()
    } else if size <= KIB {
        format!("{size} bytes")
    } else if size <= MIB {
        format!("{:.2} KiB", size as f64 / KIB as f64)
    } else if size <= GIB {
        format!("{:.2} MiB", size as f64 / MIB as f64)
    } else {
        format!("{:.2} GiB", size as f64 / GIB as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_size_matches_pytorch_units() {
        assert_eq!(format_size(512), "512 bytes");
        assert_eq!(format_size(1024), "1024 bytes");
        assert_eq!(format_size(1536), "1.50 KiB");
        assert_eq!(format_size(3 << 20), "3.00 MiB");
        assert_eq!(format_size(80 << 30), "80.00 GiB");
        assert_eq!(format_size(u64::MAX), "unlimited");
    }
}
