#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

pub mod api;
#[cfg(feature = "capi")]
pub mod capi;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod driver;
pub mod error;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod history;
#[cfg(feature = "cuda")]
pub mod interop;
pub mod owned;
pub mod pools;
pub mod sim;
pub mod types;

pub use api::{BlockSnapshot, DeviceStats, StreamOrderedAllocator};
pub use driver::{Driver, DriverResult};
pub use error::{DriverError, Error, OutOfMemory, Result};
pub use types::{
    CaptureStatus, Device, DevicePtr, Event, MemInfo, PoolAttribute, Stream, UsageStream,
};

mod barrier;
mod block;
mod blockmap;
mod budget;
pub mod cache;
pub mod core;
#[cfg(all(test, not(streamalloc_loom)))]
mod core_tests;
mod epoch;
mod freed;
pub mod lane;
pub use lane::{DelegateLane, DriverLane, Laned, LockLane};
pub mod replica;
pub(crate) mod spin;
mod sync;
#[cfg(all(test, streamalloc_loom))]
mod tests;
mod warn;

pub use crate::cache::CacheConfig;
pub use crate::core::{Block, PtrHasher, StreamAlloc};
pub use history::{Action, HistoryEntry, HistoryOptions, OomObserver};
pub use owned::OwnedBlock;

/// Whether this process's read sections use asymmetric fences (Linux `membarrier`: an
/// alloc/free pair on the driver tier then takes no locked instruction for its capture
/// check; DESIGN.md, "The capture epoch"). `false` where the kernel or a seccomp filter
/// refuses the call, or with `STREAMALLOC_ASYMMETRIC_FENCE=0`: the symmetric form is used.
pub fn asymmetric_fences() -> bool {
    barrier::asymmetric()
}
pub use replica::SeedReplica;
pub use warn::WarningCounts;
