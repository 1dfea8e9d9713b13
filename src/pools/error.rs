//! The errors of the private pools.

use super::PoolId;
use crate::error::DriverError;
use crate::types::{Device, DevicePtr};

/// What a private-pool operation refused, or why it failed.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PoolError {
    /// A device index outside `0..device_count`.
    InvalidDevice {
        /// The index that was passed.
        device: i64,
        /// How many devices there are.
        device_count: usize,
    },
    /// `{0, 0}`: the default pool is not a private pool.
    DefaultPool,
    /// No pool of this id on this device.
    UnknownPool {
        /// The device.
        device: Device,
        /// The pool.
        id: PoolId,
    },
    /// The pool's use count is already 0 (released by every user).
    Released {
        /// The device.
        device: Device,
        /// The pool.
        id: PoolId,
    },
    /// The pointer is not a block of any private pool.
    UnknownPointer {
        /// The pointer.
        ptr: DevicePtr,
    },
    /// The pointer is a block of another pool (or device) than the one named.
    NotInPool {
        /// The pointer.
        ptr: DevicePtr,
        /// The device named.
        device: Device,
        /// The pool named.
        id: PoolId,
    },
    /// The block is not live (freed already).
    DoubleFree {
        /// The pointer.
        ptr: DevicePtr,
    },
    /// An allocate-to context for this pool is already open on this device.
    AlreadyAllocatingTo {
        /// The device.
        device: Device,
        /// The pool.
        id: PoolId,
    },
    /// No allocate-to context for this pool is open on this device.
    NotAllocatingTo {
        /// The device.
        device: Device,
        /// The pool.
        id: PoolId,
    },
    /// A checkpoint that does not fit the pool: a block the pool does not have (any
    /// more), of another size, or a checkpoint of another pool.
    BadCheckpoint {
        /// The pointer at fault (null when the whole checkpoint is).
        ptr: DevicePtr,
        /// Why.
        reason: &'static str,
    },
    /// A checkpoint restored while one of the pool's streams is being captured, with
    /// blocks whose recorded streams are still to be waited for.
    CaptureUnderway {
        /// The device.
        device: Device,
    },
    /// The device has no memory for a new block.
    OutOfMemory {
        /// The device.
        device: Device,
        /// The requested size.
        requested: usize,
        /// The driver's error.
        cause: DriverError,
    },
    /// A driver call failed.
    Driver(DriverError),
}

impl std::fmt::Display for PoolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PoolError::InvalidDevice { device, device_count } => {
                write!(f, "invalid device {device} (the allocator has {device_count})")
            }
            PoolError::DefaultPool => {
                write!(f, "pool (0, 0) is the default pool, not a private pool")
            }
            PoolError::UnknownPool { device, id } => {
                write!(f, "no private pool {id} on device {device}")
            }
            PoolError::Released { device, id } => {
                write!(f, "private pool {id} on device {device} was released by every user")
            }
            PoolError::UnknownPointer { ptr } => write!(f, "{ptr} is not a private-pool block"),
            PoolError::NotInPool { ptr, device, id } => {
                write!(f, "{ptr} is not a block of private pool {id} on device {device}")
            }
            PoolError::DoubleFree { ptr } => write!(f, "double free of private-pool block {ptr}"),
            PoolError::AlreadyAllocatingTo { device, id } => {
                write!(f, "already allocating to private pool {id} on device {device}")
            }
            PoolError::NotAllocatingTo { device, id } => {
                write!(f, "not allocating to private pool {id} on device {device}")
            }
            PoolError::BadCheckpoint { ptr, reason } => {
                write!(f, "checkpoint does not fit the pool at {ptr}: {reason}")
            }
            PoolError::CaptureUnderway { device } => write!(
                f,
                "a capture is underway on device {device} and blocks still wait for their \
                 recorded streams"
            ),
            PoolError::OutOfMemory { device, requested, cause } => write!(
                f,
                "CUDA out of memory. Tried to allocate {requested} bytes for a private pool on \
                 device {device} ({cause})"
            ),
            PoolError::Driver(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for PoolError {}

impl From<DriverError> for PoolError {
    fn from(e: DriverError) -> Self {
        PoolError::Driver(e)
    }
}

/// Result of a private-pool operation.
pub type PoolResult<T> = Result<T, PoolError>;
