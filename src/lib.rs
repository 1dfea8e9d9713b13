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
#[cfg(feature = "cuda")]
pub mod interop;
pub mod owned;
pub mod sim;
pub mod types;

pub use api::{BlockSnapshot, DeviceStats, StreamOrderedAllocator};
pub use driver::{Driver, DriverResult};
pub use error::{DriverError, Error, OutOfMemory, Result};
pub use types::{
    CaptureStatus, Device, DevicePtr, Event, MemInfo, PoolAttribute, Stream, UsageStream,
};

mod budget;
pub mod cache;
pub mod core;
mod epoch;
mod freed;
mod lane;
pub use lane::DriverLane;
pub mod replica;
mod sync;
#[cfg(all(test, streamalloc_loom))]
mod tests;
mod warn;

pub use crate::cache::CacheConfig;
pub use crate::core::{Block, PtrHasher, StreamAlloc};
pub use owned::OwnedBlock;
pub use replica::SeedReplica;
pub use warn::WarningCounts;
