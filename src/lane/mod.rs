//! The driver lane: driver adaptors that serialize `cuMemAllocAsync` / `cuMemFreeAsync`
//! per device, in the style of RMM's `thread_safe_resource_adaptor`.
//!
//! The CUDA driver serializes these calls on a lock of its own, and under contention
//! that lock collapses (DESIGN.md, "The driver lane"). A lane is a [`Driver`] wrapped
//! around the real one: it forwards every call, and lets one call at a time per device
//! into the allocation pair. Bookkeeping stays lock-free; only driver calls take a lane.
//!
//! ```text
//!   StreamAlloc ──▶ Laned<D> ──┬── Off ───────────────▶ D   (threads call concurrently)
//!   (every driver call)        ├── Lock: LockLane<D> ──▶ D   (a blocking lock per device)
//!                              └── Delegate: DelegateLane<D>
//!                                     free lane: the caller calls D itself
//!                                     busy lane: request slot ──▶ device's delegate ──▶ D
//! ```
//!
//! How the lane is chosen: [`crate::StreamAlloc`] wraps its driver in [`Laned::auto`],
//! which puts a driver that says it [serializes internally](Driver::serializes_internally)
//! (CUDA) behind [`DriverLane::DEFAULT`] (or the lane named by the environment variable
//! `STREAMALLOC_DRIVER_LANE`: `off`, `lock`, `delegate`, `delegate_always`), and any other
//! driver (the simulated device, the null driver, a driver already in a lane) behind
//! none. To choose a lane explicitly, pass `Laned::new(driver, lane)`: a lane reports
//! that it does not serialize internally, so the allocator adds nothing on top.

mod delegate;
mod lock;
pub(crate) mod slot;

pub use delegate::DelegateLane;
pub use lock::LockLane;

use crate::driver::{Driver, DriverResult};
use crate::types::{Device, DevicePtr, Stream};

/// How driver allocation calls are serialized per device.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum DriverLane {
    /// No lane: threads call the driver concurrently.
    Off,
    /// A blocking lock per device ([`LockLane`]): waiters sleep in the kernel.
    Lock,
    /// Delegation ([`DelegateLane`]): a caller that finds the device's lane free calls
    /// the driver itself; under contention one delegate thread per device makes every
    /// call, fed by per-thread request slots.
    Delegate,
    /// Delegation for every call, contended or not ([`DelegateLane::always`]).
    DelegateAlways,
}

impl DriverLane {
    /// The lane for a driver that serializes internally (CUDA), unless the environment
    /// names another: delegation, the measured winner (DESIGN.md, "The driver lane": on
    /// an H100 at 16 threads 3.5x PyTorch's cudaMallocAsync backend and 2.0x the seed
    /// replica, on 1 thread 1.39x the raw driver; the PyTorch tests pass under it).
    pub const DEFAULT: DriverLane = DriverLane::Delegate;

    /// The lane's name as the environment variable and the benchmark spell it.
    pub fn name(self) -> &'static str {
        match self {
            DriverLane::Off => "off",
            DriverLane::Lock => "lock",
            DriverLane::Delegate => "delegate",
            DriverLane::DelegateAlways => "delegate_always",
        }
    }

    /// Parses a name from [`DriverLane::name`].
    pub fn from_name(name: &str) -> Option<DriverLane> {
        [DriverLane::Off, DriverLane::Lock, DriverLane::Delegate, DriverLane::DelegateAlways]
            .into_iter()
            .find(|l| l.name() == name.trim())
    }

    /// The lane for a driver that serializes internally: `STREAMALLOC_DRIVER_LANE` if it
    /// names one (read once per process), else [`DriverLane::DEFAULT`].
    pub fn configured() -> DriverLane {
        static CONFIGURED: std::sync::OnceLock<DriverLane> = std::sync::OnceLock::new();
        *CONFIGURED.get_or_init(|| match std::env::var("STREAMALLOC_DRIVER_LANE") {
            Ok(v) => DriverLane::from_name(&v).unwrap_or_else(|| {
                log::warn!("STREAMALLOC_DRIVER_LANE={v:?} names no lane; using the default");
                DriverLane::DEFAULT
            }),
            Err(_) => DriverLane::DEFAULT,
        })
    }
}

/// Forwards every [`Driver`] method but the allocation pair, `name` and
/// `serializes_internally` to `self.$inner()`.
macro_rules! forward_driver {
    ($inner:ident) => {
        fn device_count(&self) -> $crate::driver::DriverResult<usize> {
            self.$inner().device_count()
        }
        fn init_device(&self, device: $crate::types::Device) -> $crate::driver::DriverResult<()> {
            self.$inner().init_device(device)
        }
        fn create_stream(
            &self,
            device: $crate::types::Device,
        ) -> $crate::driver::DriverResult<$crate::types::Stream> {
            self.$inner().create_stream(device)
        }
        fn check_stream(
            &self,
            stream: $crate::types::UsageStream,
        ) -> $crate::driver::DriverResult<()> {
            self.$inner().check_stream(stream)
        }
        #[inline]
        fn check_last_error(
            &self,
            device: $crate::types::Device,
        ) -> $crate::driver::DriverResult<()> {
            self.$inner().check_last_error(device)
        }
        fn malloc_sync(
            &self,
            device: $crate::types::Device,
            size: usize,
        ) -> $crate::driver::DriverResult<$crate::types::DevicePtr> {
            self.$inner().malloc_sync(device, size)
        }
        fn free_sync(
            &self,
            device: $crate::types::Device,
            ptr: $crate::types::DevicePtr,
            size: usize,
        ) -> $crate::driver::DriverResult<()> {
            self.$inner().free_sync(device, ptr, size)
        }
        fn mem_get_info(
            &self,
            device: $crate::types::Device,
        ) -> $crate::driver::DriverResult<$crate::types::MemInfo> {
            self.$inner().mem_get_info(device)
        }
        fn pool_attribute(
            &self,
            device: $crate::types::Device,
            attr: $crate::types::PoolAttribute,
        ) -> $crate::driver::DriverResult<u64> {
            self.$inner().pool_attribute(device, attr)
        }
        fn set_pool_attribute(
            &self,
            device: $crate::types::Device,
            attr: $crate::types::PoolAttribute,
            value: u64,
        ) -> $crate::driver::DriverResult<()> {
            self.$inner().set_pool_attribute(device, attr, value)
        }
        fn pool_trim_to(
            &self,
            device: $crate::types::Device,
            keep: u64,
        ) -> $crate::driver::DriverResult<()> {
            self.$inner().pool_trim_to(device, keep)
        }
        fn device_synchronize(
            &self,
            device: $crate::types::Device,
        ) -> $crate::driver::DriverResult<()> {
            self.$inner().device_synchronize(device)
        }
        fn record_event(
            &self,
            stream: $crate::types::UsageStream,
        ) -> $crate::driver::DriverResult<$crate::types::Event> {
            self.$inner().record_event(stream)
        }
        fn stream_wait_event(
            &self,
            stream: $crate::types::UsageStream,
            event: &$crate::types::Event,
        ) -> $crate::driver::DriverResult<()> {
            self.$inner().stream_wait_event(stream, event)
        }
        fn event_query(
            &self,
            device: $crate::types::Device,
            event: &$crate::types::Event,
        ) -> $crate::driver::DriverResult<bool> {
            self.$inner().event_query(device, event)
        }
        fn destroy_event(
            &self,
            device: $crate::types::Device,
            event: $crate::types::Event,
        ) -> $crate::driver::DriverResult<()> {
            self.$inner().destroy_event(device, event)
        }
        fn capture_status(
            &self,
            stream: $crate::types::UsageStream,
        ) -> $crate::driver::DriverResult<$crate::types::CaptureStatus> {
            self.$inner().capture_status(stream)
        }
        fn pool_set_access(
            &self,
            owner: $crate::types::Device,
            accessor: $crate::types::Device,
        ) -> $crate::driver::DriverResult<()> {
            self.$inner().pool_set_access(owner, accessor)
        }
        fn memcpy_async(
            &self,
            dst: $crate::types::DevicePtr,
            dst_device: $crate::types::Device,
            src: $crate::types::DevicePtr,
            src_device: $crate::types::Device,
            count: usize,
            stream: $crate::types::UsageStream,
            peer: bool,
        ) -> $crate::driver::DriverResult<()> {
            self.$inner().memcpy_async(dst, dst_device, src, src_device, count, stream, peer)
        }
        fn memcpy(
            &self,
            device: $crate::types::Device,
            dst: $crate::types::DevicePtr,
            src: $crate::types::DevicePtr,
            count: usize,
        ) -> $crate::driver::DriverResult<()> {
            self.$inner().memcpy(device, dst, src, count)
        }
        #[inline]
        fn note_reuse(
            &self,
            device: $crate::types::Device,
            ptr: $crate::types::DevicePtr,
            size: usize,
            stream: $crate::types::Stream,
        ) {
            self.$inner().note_reuse(device, ptr, size, stream)
        }
        #[inline]
        fn note_cached(
            &self,
            device: $crate::types::Device,
            ptr: $crate::types::DevicePtr,
            size: usize,
            stream: $crate::types::Stream,
        ) {
            self.$inner().note_cached(device, ptr, size, stream)
        }
        fn calls_report_prior_errors(&self) -> bool {
            self.$inner().calls_report_prior_errors()
        }
        fn sync_streams(
            &self,
            dependency: $crate::types::UsageStream,
            dependent: $crate::types::UsageStream,
        ) -> $crate::driver::DriverResult<()> {
            self.$inner().sync_streams(dependency, dependent)
        }
    };
}
pub(crate) use forward_driver;

/// A driver behind the lane chosen at run time: what [`crate::StreamAlloc`] calls.
pub struct Laned<D: Driver> {
    lane: Lane<D>,
}

enum Lane<D: Driver> {
    Off(D),
    Lock(LockLane<D>),
    Delegate(DelegateLane<D>),
}

impl<D: Driver> Laned<D> {
    /// `driver` behind `lane`.
    pub fn new(driver: D, lane: DriverLane) -> Self {
        let lane = match lane {
            DriverLane::Off => Lane::Off(driver),
            DriverLane::Lock => Lane::Lock(LockLane::new(driver)),
            DriverLane::Delegate => Lane::Delegate(DelegateLane::new(driver)),
            DriverLane::DelegateAlways => Lane::Delegate(DelegateLane::always(driver)),
        };
        Laned { lane }
    }

    /// `driver` behind [`DriverLane::configured`] if it serializes internally, else
    /// behind no lane (see the module docs).
    pub fn auto(driver: D) -> Self {
        let lane =
            if driver.serializes_internally() { DriverLane::configured() } else { DriverLane::Off };
        Self::new(driver, lane)
    }

    /// Which lane this is.
    pub fn lane(&self) -> DriverLane {
        match &self.lane {
            Lane::Off(_) => DriverLane::Off,
            Lane::Lock(_) => DriverLane::Lock,
            Lane::Delegate(d) if d.is_always() => DriverLane::DelegateAlways,
            Lane::Delegate(_) => DriverLane::Delegate,
        }
    }

    /// The driver inside the lane.
    #[inline]
    pub fn inner(&self) -> &D {
        match &self.lane {
            Lane::Off(d) => d,
            Lane::Lock(l) => l.inner(),
            Lane::Delegate(l) => l.inner(),
        }
    }
}

impl<D: Driver> Driver for Laned<D> {
    fn name(&self) -> &'static str {
        self.inner().name()
    }

    #[inline(always)]
    fn malloc_async(&self, device: Device, size: usize, stream: Stream) -> DriverResult<DevicePtr> {
        match &self.lane {
            Lane::Off(d) => d.malloc_async(device, size, stream),
            Lane::Lock(l) => l.malloc_async(device, size, stream),
            Lane::Delegate(l) => l.malloc_async(device, size, stream),
        }
    }

    #[inline(always)]
    fn free_async(
        &self,
        device: Device,
        ptr: DevicePtr,
        size: usize,
        stream: Stream,
    ) -> DriverResult<()> {
        match &self.lane {
            Lane::Off(d) => d.free_async(device, ptr, size, stream),
            Lane::Lock(l) => l.free_async(device, ptr, size, stream),
            Lane::Delegate(l) => l.free_async(device, ptr, size, stream),
        }
    }

    /// A driver in a lane (even `Off`, chosen on purpose) needs no other.
    fn serializes_internally(&self) -> bool {
        false
    }

    forward_driver!(inner);
}

#[cfg(all(test, not(streamalloc_loom)))]
mod tests;
