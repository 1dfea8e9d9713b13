//! The crate's typed errors. Every public operation returns `Result<_, Error>`; after
//! any error the allocator keeps working and its books are exact.

use crate::types::{Device, DevicePtr, Stream, format_size};
use std::fmt;

/// CUDA's `CUDA_ERROR_OUT_OF_MEMORY`.
pub const CUDA_ERROR_OUT_OF_MEMORY: i32 = 2;
/// CUDA's `CUDA_ERROR_INVALID_VALUE`.
pub const CUDA_ERROR_INVALID_VALUE: i32 = 1;
/// CUDA's `CUDA_ERROR_NOT_INITIALIZED`.
pub const CUDA_ERROR_NOT_INITIALIZED: i32 = 3;
/// CUDA's `CUDA_ERROR_INVALID_HANDLE`.
pub const CUDA_ERROR_INVALID_HANDLE: i32 = 400;
/// CUDA's `CUDA_ERROR_INVALID_DEVICE`.
pub const CUDA_ERROR_INVALID_DEVICE: i32 = 101;
/// CUDA's `CUDA_ERROR_INVALID_CONTEXT`.
pub const CUDA_ERROR_INVALID_CONTEXT: i32 = 201;
/// CUDA's `CUDA_ERROR_NOT_READY` (an event or stream still has work pending).
pub const CUDA_ERROR_NOT_READY: i32 = 600;
/// CUDA's `CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED`.
pub const CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED: i32 = 900;
/// CUDA's `CUDA_ERROR_STREAM_CAPTURE_INVALIDATED`.
pub const CUDA_ERROR_STREAM_CAPTURE_INVALIDATED: i32 = 901;
/// CUDA's `CUDA_ERROR_STREAM_CAPTURE_UNJOINED`.
pub const CUDA_ERROR_STREAM_CAPTURE_UNJOINED: i32 = 904;
/// CUDA's `CUDA_ERROR_NOT_FOUND` (also used for a missing driver library).
pub const CUDA_ERROR_NOT_FOUND: i32 = 500;
/// CUDA's `CUDA_ERROR_NO_DEVICE`.
pub const CUDA_ERROR_NO_DEVICE: i32 = 100;
/// CUDA's `CUDA_ERROR_NOT_SUPPORTED` (an operation a driver does not offer).
pub const CUDA_ERROR_NOT_SUPPORTED: i32 = 801;
/// CUDA's `CUDA_ERROR_UNKNOWN`.
pub const CUDA_ERROR_UNKNOWN: i32 = 999;

/// A failed driver call: the operation, the driver's numeric code and its name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DriverError {
    /// The driver operation that failed (for example `"cuMemAllocAsync"`).
    pub op: &'static str,
    /// The driver's result code (`CUresult`).
    pub code: i32,
    /// The code's name (for example `"CUDA_ERROR_OUT_OF_MEMORY"`).
    pub name: String,
}

impl DriverError {
    /// A driver error from its parts.
    pub fn new(op: &'static str, code: i32, name: impl Into<String>) -> Self {
        DriverError { op, code, name: name.into() }
    }

    /// Whether the driver reported out-of-memory.
    pub fn is_oom(&self) -> bool {
        self.code == CUDA_ERROR_OUT_OF_MEMORY
    }
}

impl fmt::Display for DriverError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} failed: {} (code {})", self.op, self.name, self.code)
    }
}

impl std::error::Error for DriverError {}

/// The fields of an out-of-memory report, as the seed gives them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutOfMemory {
    /// The device the allocation was for.
    pub device: Device,
    /// Bytes currently allocated by this allocator on that device.
    pub allocated: u64,
    /// Bytes requested.
    pub requested: u64,
    /// Total bytes of the device.
    pub device_total: u64,
    /// Free bytes according to the driver.
    pub device_free: u64,
    /// The user's limit (memory fraction x total; `u64::MAX` when unset).
    pub limit: u64,
}

impl fmt::Display for OutOfMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Allocation on device {} would exceed allowed memory. (out of memory)\n\
             Currently allocated     : {}\n\
             Requested               : {}\n\
             Device limit            : {}\n\
             Free (according to CUDA): {}\n\
             Limit (set by user-supplied memory fraction)\n                        : {}",
            self.device,
            format_size(self.allocated),
            format_size(self.requested),
            format_size(self.device_total),
            format_size(self.device_free),
            format_size(self.limit),
        )
    }
}

/// Everything that can go wrong in the allocator.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Error {
    /// The pointer was never handed out by this allocator (or was already freed and its
    /// address forgotten).
    UnknownPointer {
        /// The pointer.
        ptr: DevicePtr,
    },
    /// The pointer was already freed (or its free is deferred until a capture ends).
    DoubleFree {
        /// The pointer.
        ptr: DevicePtr,
    },
    /// The pointer-API free of a block that a [`crate::Block`] handle owns: only the
    /// handle may free it (drop it, or call [`crate::Block::free`]).
    OwnedByHandle {
        /// The pointer.
        ptr: DevicePtr,
    },
    /// A device index outside `0..device_count`.
    InvalidDevice {
        /// The index that was passed.
        device: i64,
        /// How many devices the allocator was initialized with.
        device_count: usize,
    },
    /// A stream that does not exist (never made, or destroyed), or a stream named as a
    /// stream of a device it does not belong to. Refused where the stream is given
    /// (`record_stream`), before the allocator keeps it.
    InvalidStream {
        /// The stream handle that was passed.
        stream: Stream,
        /// The device it was named with.
        device: Device,
        /// What the driver answered when asked about it.
        cause: DriverError,
    },
    /// A memory fraction outside `[0, 1]` (or NaN).
    InvalidFraction {
        /// The fraction that was passed.
        fraction: f64,
    },
    /// A capture was begun while another is underway: one capture at a time.
    CaptureAlreadyUnderway,
    /// A capture was ended while none is underway.
    NoCaptureUnderway,
    /// An allocation of 1 EiB or more (the seed refuses these outright).
    TooLarge {
        /// The requested size.
        requested: u64,
    },
    /// Out of memory: the user's limit or the device ran out.
    OutOfMemory(Box<OutOfMemory>),
    /// A driver call failed.
    Driver(DriverError),
}

impl Error {
    /// Whether this is an out-of-memory error (including [`Error::TooLarge`]).
    pub fn is_oom(&self) -> bool {
        matches!(self, Error::OutOfMemory(_) | Error::TooLarge { .. })
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::UnknownPointer { ptr } => {
                write!(f, "pointer {ptr} was not allocated by this allocator")
            }
            Error::DoubleFree { ptr } => write!(f, "double free of pointer {ptr}"),
            Error::OwnedByHandle { ptr } => write!(
                f,
                "pointer {ptr} is owned by a Block handle: free it by dropping the handle"
            ),
            Error::InvalidDevice { device, device_count } => write!(
                f,
                "invalid device index {device}: the allocator has {device_count} device(s)"
            ),
            Error::InvalidStream { stream, device, cause } => write!(
                f,
                "invalid stream {stream:?} for device {device}: it does not exist or belongs \
                 to another device ({cause})"
            ),
            Error::InvalidFraction { fraction } => {
                write!(f, "invalid memory fraction {fraction}: it must lie within [0, 1]")
            }
            Error::CaptureAlreadyUnderway => {
                write!(f, "only one capture at a time is allowed in a process")
            }
            Error::NoCaptureUnderway => {
                write!(f, "end of capture requested, but no capture is underway")
            }
            Error::TooLarge { requested } => write!(
                f,
                "CUDA out of memory. Tried to allocate more than 1EB memory ({requested} bytes)."
            ),
            Error::OutOfMemory(oom) => oom.fmt(f),
            Error::Driver(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for Error {
    /// The driver's error, for [`Error::Driver`].
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Driver(e) => Some(e),
            _ => None,
        }
    }
}

impl From<DriverError> for Error {
    fn from(e: DriverError) -> Self {
        Error::Driver(e)
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn driver_errors_are_the_source() {
        let d = DriverError::new(
            "cuMemAllocAsync",
            CUDA_ERROR_OUT_OF_MEMORY,
            "CUDA_ERROR_OUT_OF_MEMORY",
        );
        let e = Error::from(d.clone());
        let src = e.source().expect("a driver error is the source");
        assert_eq!(src.to_string(), d.to_string());
        assert!(src.downcast_ref::<DriverError>().is_some_and(DriverError::is_oom));
        assert!(Error::DoubleFree { ptr: DevicePtr::NULL }.source().is_none());
    }
}
