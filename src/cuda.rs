//! The real backend: [`CudaDriver`] implements [`Driver`] on the CUDA driver API through
//! `cudarc`'s raw bindings (`cudarc::driver::sys`), loading `libcuda` at run time.
//!
//! # Contexts
//! Every device is driven through its *primary* context (the one the CUDA runtime and
//! PyTorch use), retained lazily on the device's first use and released when the driver
//! is dropped. Creating a [`CudaDriver`] creates no context (S1). Before each raw call on
//! device `d`, `d`'s primary context is made current on the calling thread; how that is
//! checked is the [`ContextPolicy`]:
//! - [`ContextPolicy::Guarded`] (the default) asks the driver which context is current
//!   (`cuCtxGetCurrent`, a thread-local read inside the driver), switches only when it
//!   differs and switches back afterwards, like PyTorch's `CUDAGuard`. Safe when the
//!   allocator is embedded in an application that changes the current device itself.
//! - [`ContextPolicy::Cached`] keeps a thread-local record of the context this module last
//!   bound and skips the driver entirely when it matches: the hot path is one thread-local
//!   compare plus the raw call. Only correct when nothing else changes the current context
//!   on the threads that call the allocator (benchmarks, standalone programs).
//!
//! # Errors
//! Every `CUresult` is checked; a failure becomes a [`DriverError`] naming the raw function
//! (`op`), the numeric code and the code's name (`cuGetErrorName`). Out of memory keeps
//! code 2 (`CUDA_ERROR_OUT_OF_MEMORY`), so [`DriverError::is_oom`] holds.
//!
//! # Absent driver
//! In `dynamic-loading` mode cudarc opens `libcuda` on the first raw call and panics if it
//! is missing. [`CudaDriver::new`] therefore checks `sys::is_culib_present()` first and
//! returns an error with code `CUDA_ERROR_NOT_FOUND` instead. [`detect`] is the device
//! selector: `Ok` only with a loadable driver and at least one device.

use crate::driver::{Driver, DriverResult};
use crate::error::{CUDA_ERROR_NO_DEVICE, CUDA_ERROR_NOT_FOUND, DriverError};
use crate::types::{
    CaptureStatus, Device, DevicePtr, Event, MemInfo, PoolAttribute, Stream, UsageStream,
};
use crossbeam::queue::SegQueue;
use cudarc::driver::sys::{
    self, CUcontext, CUdevice, CUevent, CUmemPool_attribute, CUmemoryPool, CUresult, CUstream,
    CUstreamCaptureMode, CUstreamCaptureStatus,
};
use std::cell::Cell;
use std::ffi::{CStr, c_char, c_void};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

/// `CU_STREAM_PER_THREAD`: with the null stream (0) and `CU_STREAM_LEGACY` (1), the
/// handles that name a stream of whichever device's context is bound.
const CU_STREAM_PER_THREAD: usize = 2;

/// Events kept per device for reuse by [`Driver::record_event`] when none is given,
/// see [`CudaDriver::with_event_cache`].
pub const DEFAULT_EVENT_CACHE: usize = 256;

/// Every driver entry point this module calls: checked by [`CudaDriver::new`], because
/// cudarc resolves each symbol on its first call and panics if it is missing.
const REQUIRED_SYMBOLS: &[&str] = &[
    "cuInit",
    "cuDeviceGetCount",
    "cuDeviceGet",
    "cuDriverGetVersion",
    "cuDeviceGetName",
    "cuGetErrorName",
    "cuDevicePrimaryCtxRetain",
    "cuDevicePrimaryCtxRelease_v2",
    "cuCtxGetCurrent",
    "cuCtxSetCurrent",
    "cuCtxGetDevice",
    "cuCtxSynchronize",
    "cuDeviceGetDefaultMemPool",
    "cuMemPoolSetAttribute",
    "cuMemPoolGetAttribute",
    "cuMemPoolTrimTo",
    "cuMemPoolSetAccess",
    "cuMemGetInfo_v2",
    "cuMemAllocAsync",
    "cuMemFreeAsync",
    "cuMemsetD8Async",
    "cuMemcpy",
    "cuPointerGetAttribute",
    "cuMemcpyAsync",
    "cuMemcpyPeerAsync",
    "cuMemcpyDtoHAsync_v2",
    "cuMemcpyHtoDAsync_v2",
    "cuStreamCreate",
    "cuStreamGetCtx",
    "cuCtxPushCurrent_v2",
    "cuCtxPopCurrent_v2",
    "cuStreamDestroy_v2",
    "cuStreamSynchronize",
    "cuStreamWaitEvent",
    "cuStreamIsCapturing",
    "cuStreamBeginCapture_v2",
    "cuStreamEndCapture",
    "cuGraphInstantiateWithFlags",
    "cuGraphLaunch",
    "cuGraphExecDestroy",
    "cuGraphDestroy",
    "cuLaunchHostFunc",
    "cuEventCreate",
    "cuEventRecord",
    "cuEventQuery",
    "cuEventDestroy_v2",
];

/// How [`CudaDriver`] makes a device's primary context current before a raw call.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ContextPolicy {
    /// Ask the driver which context is current (`cuCtxGetCurrent`), switch only if it
    /// differs, and restore the previous context after the call when one was current.
    /// One cheap extra driver call per operation; correct inside PyTorch and any other
    /// host application that sets the current device itself.
    #[default]
    Guarded,
    /// Trust a thread-local record of the context this module last bound: no driver call
    /// when it matches, and no restore. Correct only when nothing else in the process
    /// changes the current context on threads that call the allocator.
    Cached,
}

/// How a stream capture treats potentially unsafe API calls from other threads
/// (`CUstreamCaptureMode`).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CaptureMode {
    /// `CU_STREAM_CAPTURE_MODE_GLOBAL`: unsafe calls from any thread are prohibited.
    Global,
    /// `CU_STREAM_CAPTURE_MODE_THREAD_LOCAL`: unsafe calls from this thread are prohibited.
    ThreadLocal,
    /// `CU_STREAM_CAPTURE_MODE_RELAXED`: no calls are prohibited (PyTorch's choice for
    /// allocator-heavy capture).
    Relaxed,
}

impl CaptureMode {
    fn raw(self) -> CUstreamCaptureMode {
        match self {
            CaptureMode::Global => CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_GLOBAL,
            CaptureMode::ThreadLocal => CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
            CaptureMode::Relaxed => CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED,
        }
    }
}

/// A captured and instantiated CUDA graph: the `CUgraph` and its `CUgraphExec`, owned.
/// Made by [`CudaDriver::end_capture`], launched by [`CudaDriver::graph_launch`] (by
/// reference) and released by [`CudaDriver::graph_destroy`], which consumes it, so a
/// destroyed graph cannot be launched. Not `Copy` or `Clone`; dropping it without
/// `graph_destroy` leaks it (no driver call from `Drop`: the graph does not hold its
/// driver). Only the driver instance that made it accepts it.
#[derive(PartialEq, Eq, Debug)]
pub struct CudaGraph {
    graph: usize,
    exec: usize,
    device: Device,
    /// The id of the [`CudaDriver`] that made it.
    origin: u64,
}

impl CudaGraph {
    /// The raw `CUgraphExec` handle.
    pub fn exec_raw(&self) -> usize {
        self.exec
    }

    /// The raw `CUgraph` handle.
    pub fn graph_raw(&self) -> usize {
        self.graph
    }

    /// The device whose stream was captured.
    pub fn device(&self) -> Device {
        self.device
    }
}

/// Per-device state. Handles are stored as addresses so the driver is `Send + Sync`
/// without unsafe impls: CUDA contexts, pools and events are process-wide handles that
/// the driver API allows any thread to use.
struct DeviceSlot {
    /// The `CUdevice` for this ordinal (from `cuDeviceGet`, no context needed).
    cu_device: CUdevice,
    /// The retained primary context (`CUcontext`), set once on first use.
    ctx: OnceLock<usize>,
    /// The default memory pool (`CUmemoryPool`), fetched once.
    pool: OnceLock<usize>,
    /// Spare events (`CUevent`, made with `CU_EVENT_DISABLE_TIMING` in `ctx`).
    events: SegQueue<usize>,
    /// Approximate length of `events` (bounds the cache; exactness is not needed).
    spare_events: AtomicUsize,
}

/// The CUDA driver backend. See the [module documentation](self).
pub struct CudaDriver {
    /// Tells this instance's events and graphs from others' (never 0).
    id: u64,
    devices: Box<[DeviceSlot]>,
    driver_version: i32,
    policy: ContextPolicy,
    event_cache: usize,
}

/// Bumped whenever a [`CudaDriver`] releases its contexts, so that a thread-local record
/// of a bound context ([`ContextPolicy::Cached`]) from before is never trusted again (a
/// released primary context may be destroyed and its address reused).
static CONTEXT_GENERATION: AtomicU64 = AtomicU64::new(1);

/// Set once `libcuda` was found, so that error naming may call `cuGetErrorName`.
static LIBRARY_LOADED: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// ([`CONTEXT_GENERATION`], context) this thread last bound under
    /// [`ContextPolicy::Cached`].
    static BOUND: Cell<(u64, usize)> = const { Cell::new((0, 0)) };
}

/// Restores the context that was current before a [`ContextPolicy::Guarded`] switch.
#[must_use]
struct ContextGuard {
    /// The previous context (`CUcontext` address), or 0 when nothing is to be restored.
    restore: usize,
}

impl Drop for ContextGuard {
    fn drop(&mut self) {
        if self.restore != 0 {
            // Safety: `restore` is a context that was current on this thread a moment ago
            // (cuCtxGetCurrent returned it); making it current again is what the host
            // application had. The library is loaded (a context exists).
            let r = unsafe { sys::cuCtxSetCurrent(self.restore as CUcontext) };
            if r != CUresult::CUDA_SUCCESS {
                log::warn!("restoring the previous CUDA context failed: {}", error_name(r));
            }
        }
    }
}

/// The name of a `CUresult`: `cuGetErrorName` when the library is loaded, else the
/// binding's variant name (the same text, for example `"CUDA_ERROR_OUT_OF_MEMORY"`).
pub fn error_name(result: CUresult) -> String {
    if LIBRARY_LOADED.load(Ordering::Relaxed) {
        let mut p: *const c_char = std::ptr::null();
        // Safety: the library is loaded (checked above, so the lazy load cannot panic);
        // `p` is a valid out-pointer; on success the driver points it at a static
        // NUL-terminated string that lives as long as the library.
        let r = unsafe { sys::cuGetErrorName(result, &mut p) };
        if r == CUresult::CUDA_SUCCESS && !p.is_null() {
            // Safety: `p` is a non-null static C string from the driver (see above).
            return unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
        }
    }
    format!("{result:?}")
}

/// A [`DriverError`] for a failed raw call.
#[cold]
#[inline(never)]
pub fn cu_error(op: &'static str, result: CUresult) -> DriverError {
    DriverError::new(op, result as i32, error_name(result))
}

/// The `CUstream` for a [`Stream`], refusing a [simulated](Stream::simulated) handle
/// (`CUDA_ERROR_INVALID_HANDLE`), which safe code can make from any number: only handles
/// from the driver or from `unsafe` [`Stream::from_raw`] reach it.
#[inline]
fn cu_stream(op: &'static str, stream: Stream) -> DriverResult<CUstream> {
    if stream.is_simulated() {
        return Err(DriverError::new(
            op,
            CUresult::CUDA_ERROR_INVALID_HANDLE as i32,
            "CUDA_ERROR_INVALID_HANDLE: a simulated stream handle given to the CUDA backend",
        ));
    }
    Ok(stream.as_raw() as CUstream)
}

/// `CUDA_ERROR_INVALID_HANDLE` for a handle this driver instance did not make.
#[cold]
fn foreign(op: &'static str, what: &str) -> DriverError {
    DriverError::new(
        op,
        CUresult::CUDA_ERROR_INVALID_HANDLE as i32,
        format!("CUDA_ERROR_INVALID_HANDLE: {what} not made by this CUDA driver"),
    )
}

/// `Ok` for `CUDA_SUCCESS`, else the call's [`DriverError`].
#[inline]
fn check(op: &'static str, result: CUresult) -> DriverResult<()> {
    if result == CUresult::CUDA_SUCCESS { Ok(()) } else { Err(cu_error(op, result)) }
}

/// The `CUmemPool_attribute` for a [`PoolAttribute`], and whether its value is a C `int`
/// (the reuse flags) rather than a `cuuint64_t` (threshold and memory counters).
pub fn pool_attribute_raw(attr: PoolAttribute) -> (CUmemPool_attribute, bool) {
    use CUmemPool_attribute::*;
    match attr {
        PoolAttribute::ReleaseThreshold => (CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, false),
        PoolAttribute::ReuseFollowEventDependencies => {
            (CU_MEMPOOL_ATTR_REUSE_FOLLOW_EVENT_DEPENDENCIES, true)
        }
        PoolAttribute::ReuseAllowOpportunistic => (CU_MEMPOOL_ATTR_REUSE_ALLOW_OPPORTUNISTIC, true),
        PoolAttribute::ReuseAllowInternalDependencies => {
            (CU_MEMPOOL_ATTR_REUSE_ALLOW_INTERNAL_DEPENDENCIES, true)
        }
        PoolAttribute::ReservedMemCurrent => (CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT, false),
        PoolAttribute::ReservedMemHigh => (CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH, false),
        PoolAttribute::UsedMemCurrent => (CU_MEMPOOL_ATTR_USED_MEM_CURRENT, false),
        PoolAttribute::UsedMemHigh => (CU_MEMPOOL_ATTR_USED_MEM_HIGH, false),
    }
}

/// `CUmemLocation` as C lays it out in every CUDA version: the location type, then the
/// device ordinal (CUDA 13.2 moved `id` into a union with other members of the same 4
/// bytes, so the bindings' field path differs by version while the layout does not).
#[repr(C)]
struct DeviceLocation {
    type_: sys::CUmemLocationType,
    id: std::ffi::c_int,
}

/// A `CUmemLocation` naming device `id`, whatever CUDA version the bindings are for
/// (streamalloc leaves that choice to the final binary).
fn device_location(id: i32) -> sys::CUmemLocation {
    let loc = DeviceLocation { type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE, id };
    // Safety: `CUmemLocation` is a repr(C) struct of the location type followed by a
    // 4-byte `int` (directly or as a union whose every member fits in it), exactly
    // `DeviceLocation`; transmute checks the sizes agree at compile time.
    unsafe { std::mem::transmute::<DeviceLocation, sys::CUmemLocation>(loc) }
}

/// The [`CaptureStatus`] for a `CUstreamCaptureStatus`.
pub fn capture_status_from_raw(status: CUstreamCaptureStatus) -> CaptureStatus {
    match status {
        CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE => CaptureStatus::None,
        CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_ACTIVE => CaptureStatus::Active,
        CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_INVALIDATED => CaptureStatus::Invalidated,
    }
}

/// Whether the CUDA driver library (`libcuda`) can be loaded. Loading it runs its
/// initializers but creates no context.
pub fn library_present() -> bool {
    if LIBRARY_LOADED.load(Ordering::Relaxed) {
        return true;
    }
    // Safety: is_culib_present only tries to open candidate library names with
    // libloading and drops them; it makes no driver call, so it cannot panic on absence.
    let present = unsafe { sys::is_culib_present() };
    if present {
        LIBRARY_LOADED.store(true, Ordering::Relaxed);
    }
    present
}

/// The device selector: a [`CudaDriver`] if `libcuda` loads and at least one device
/// exists, else the reason why not (callers fall back to the simulated device).
///
/// ```
/// use std::sync::Arc;
/// use streamalloc::{Driver, StreamAlloc, sim::SimDriver};
/// let driver: Arc<dyn Driver> = match streamalloc::cuda::detect() {
///     Ok(gpu) => Arc::new(gpu),
///     Err(why) => {
///         eprintln!("no GPU ({why}): the simulated device");
///         Arc::new(SimDriver::with_devices(1, 1 << 30))
///     }
/// };
/// let alloc = StreamAlloc::new(driver)?;
/// # Ok::<(), streamalloc::Error>(())
/// ```
pub fn detect() -> Result<CudaDriver, DriverError> {
    CudaDriver::new()
}

/// Host function for [`CudaDriver::stream_sleep`]: the milliseconds are the user-data
/// pointer's address, so nothing is allocated and a captured host node may run it any
/// number of times.
unsafe extern "C" fn sleep_host_fn(user_data: *mut c_void) {
    std::thread::sleep(Duration::from_millis(user_data as usize as u64));
}

impl CudaDriver {
    /// Loads `libcuda`, calls `cuInit(0)` and counts devices. Creates no context (S1).
    ///
    /// Errors: a missing library is `op = "load libcuda"`, code `CUDA_ERROR_NOT_FOUND`;
    /// no device is `op = "cuDeviceGetCount"`, code `CUDA_ERROR_NO_DEVICE`; otherwise the
    /// failing call's error.
    pub fn new() -> Result<CudaDriver, DriverError> {
        if !library_present() {
            return Err(DriverError::new(
                "load libcuda",
                CUDA_ERROR_NOT_FOUND,
                "CUDA_ERROR_NOT_FOUND: the CUDA driver library (libcuda) was not found",
            ));
        }
        // cudarc panics on a missing symbol at its first call: check them all up front so
        // an old driver is an error, not a panic.
        for name in REQUIRED_SYMBOLS {
            // Safety: the library is present (checked above), so `culib` loads it without
            // panicking; the symbol is only looked up, never called through this type.
            let found = unsafe { sys::culib().get::<*const c_void>(name.as_bytes()).is_ok() };
            if !found {
                return Err(DriverError::new(
                    "load libcuda",
                    CUDA_ERROR_NOT_FOUND,
                    format!("CUDA_ERROR_NOT_FOUND: libcuda lacks {name} (driver too old)"),
                ));
            }
        }
        // Safety: the library is present, so cudarc's lazy load succeeds; cuInit(0) is
        // the documented first call and may be repeated.
        check("cuInit", unsafe { sys::cuInit(0) })?;
        let mut count: i32 = 0;
        // Safety: driver initialized; `count` is a valid out-pointer.
        check("cuDeviceGetCount", unsafe { sys::cuDeviceGetCount(&mut count) })?;
        if count <= 0 {
            return Err(DriverError::new(
                "cuDeviceGetCount",
                CUDA_ERROR_NO_DEVICE,
                "CUDA_ERROR_NO_DEVICE",
            ));
        }
        let mut version: i32 = 0;
        // Safety: driver initialized; `version` is a valid out-pointer.
        check("cuDriverGetVersion", unsafe { sys::cuDriverGetVersion(&mut version) })?;
        let mut devices = Vec::with_capacity(count as usize);
        for ordinal in 0..count {
            let mut cu_device: CUdevice = 0;
            // Safety: driver initialized; `ordinal < count`; valid out-pointer. Getting a
            // device handle creates no context.
            check("cuDeviceGet", unsafe { sys::cuDeviceGet(&mut cu_device, ordinal) })?;
            devices.push(DeviceSlot {
                cu_device,
                ctx: OnceLock::new(),
                pool: OnceLock::new(),
                events: SegQueue::new(),
                spare_events: AtomicUsize::new(0),
            });
        }
        static IDS: AtomicU64 = AtomicU64::new(1);
        Ok(CudaDriver {
            id: IDS.fetch_add(1, Ordering::Relaxed),
            devices: devices.into_boxed_slice(),
            driver_version: version,
            policy: ContextPolicy::default(),
            event_cache: DEFAULT_EVENT_CACHE,
        })
    }

    /// Chooses how contexts are bound (see [`ContextPolicy`]; the default is
    /// [`ContextPolicy::Guarded`]).
    pub fn with_context_policy(mut self, policy: ContextPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Sets how many spare events each device keeps for reuse (0 creates and destroys an
    /// event for every [`Driver::record_event`], as the seed does).
    pub fn with_event_cache(mut self, per_device: usize) -> Self {
        self.event_cache = per_device;
        self
    }

    /// The context policy in use.
    pub fn context_policy(&self) -> ContextPolicy {
        self.policy
    }

    /// The driver's CUDA version (`cuDriverGetVersion`, for example 13000).
    pub fn driver_version(&self) -> i32 {
        self.driver_version
    }

    /// The device's name (`cuDeviceGetName`, for example "NVIDIA H100 80GB HBM3").
    pub fn device_name(&self, device: Device) -> DriverResult<String> {
        let slot = self.slot(device, "cuDeviceGetName")?;
        let mut buf = [0 as c_char; 256];
        // Safety: driver initialized; `buf` holds `len` writable bytes; the driver writes
        // a NUL-terminated string no longer than `len`.
        check("cuDeviceGetName", unsafe {
            sys::cuDeviceGetName(buf.as_mut_ptr(), buf.len() as i32, slot.cu_device)
        })?;
        buf[buf.len() - 1] = 0;
        // Safety: `buf` is NUL-terminated (forced above) and lives through the call.
        Ok(unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned())
    }

    /// The device's retained primary context (`CUcontext` address), retaining it on
    /// first use (`cuDevicePrimaryCtxRetain`).
    pub fn primary_context(&self, device: Device) -> DriverResult<usize> {
        let slot = self.slot(device, "cuDevicePrimaryCtxRetain")?;
        if let Some(&ctx) = slot.ctx.get() {
            return Ok(ctx);
        }
        self.retain_context(slot)
    }

    #[cold]
    fn retain_context(&self, slot: &DeviceSlot) -> DriverResult<usize> {
        let mut ctx: CUcontext = std::ptr::null_mut();
        // Safety: driver initialized; valid out-pointer; `cu_device` came from
        // cuDeviceGet. Retaining is reference counted, so a racing retain is harmless.
        check("cuDevicePrimaryCtxRetain", unsafe {
            sys::cuDevicePrimaryCtxRetain(&mut ctx, slot.cu_device)
        })?;
        if slot.ctx.set(ctx as usize).is_err() {
            // Another thread retained first: give back our extra reference.
            // Safety: we hold one reference from the retain above; the other thread's
            // reference keeps the context alive.
            let r = unsafe { sys::cuDevicePrimaryCtxRelease_v2(slot.cu_device) };
            check("cuDevicePrimaryCtxRelease", r)?;
        }
        Ok(*slot.ctx.get().expect("context set above"))
    }

    #[inline]
    fn slot(&self, device: Device, op: &'static str) -> DriverResult<&DeviceSlot> {
        self.devices.get(device).ok_or_else(|| {
            DriverError::new(
                op,
                CUresult::CUDA_ERROR_INVALID_DEVICE as i32,
                "CUDA_ERROR_INVALID_DEVICE",
            )
        })
    }

    /// Makes `device`'s primary context current on this thread (see [`ContextPolicy`]).
    /// The returned guard restores the previous context when dropped (Guarded only).
    #[inline]
    fn bind(&self, device: Device) -> DriverResult<ContextGuard> {
        let slot = self.slot(device, "cuCtxSetCurrent")?;
        let ctx = match slot.ctx.get() {
            Some(&c) => c,
            None => self.retain_context(slot)?,
        };
        match self.policy {
            ContextPolicy::Cached => {
                let generation = CONTEXT_GENERATION.load(Ordering::Relaxed);
                // `try_with`: during thread-local destruction (a tensor freed by a
                // thread-exit destructor) the record is gone; then always bind.
                if BOUND.try_with(Cell::get).unwrap_or((0, 0)) != (generation, ctx) {
                    // Safety: `ctx` is a primary context we retained and have not
                    // released (released only in Drop, which needs `&mut self`).
                    check("cuCtxSetCurrent", unsafe { sys::cuCtxSetCurrent(ctx as CUcontext) })?;
                    let _ = BOUND.try_with(|b| b.set((generation, ctx)));
                }
                Ok(ContextGuard { restore: 0 })
            }
            ContextPolicy::Guarded => {
                let mut current: CUcontext = std::ptr::null_mut();
                // Safety: driver initialized; valid out-pointer; reads the calling
                // thread's current context only.
                check("cuCtxGetCurrent", unsafe { sys::cuCtxGetCurrent(&mut current) })?;
                if current as usize == ctx {
                    return Ok(ContextGuard { restore: 0 });
                }
                // Safety: as in the Cached arm: `ctx` is retained and alive.
                check("cuCtxSetCurrent", unsafe { sys::cuCtxSetCurrent(ctx as CUcontext) })?;
                // Restore what the application had; a thread with no context keeps ours.
                Ok(ContextGuard { restore: current as usize })
            }
        }
    }

    /// The device's default memory pool, fetched once. The context must be bound.
    fn pool(&self, device: Device) -> DriverResult<CUmemoryPool> {
        let slot = self.slot(device, "cuDeviceGetDefaultMemPool")?;
        if let Some(&pool) = slot.pool.get() {
            return Ok(pool as CUmemoryPool);
        }
        let mut pool: CUmemoryPool = std::ptr::null_mut();
        // Safety: driver initialized, the device's context is current (callers bind);
        // valid out-pointer. The default pool is a fixed per-device handle, so a racing
        // fetch stores the same value.
        check("cuDeviceGetDefaultMemPool", unsafe {
            sys::cuDeviceGetDefaultMemPool(&mut pool, slot.cu_device)
        })?;
        let _ = slot.pool.set(pool as usize);
        Ok(pool)
    }

    /// `cuMemsetD8Async`: sets `count` bytes at `ptr` to `value`, ordered on `stream`.
    pub fn memset_d8_async(
        &self,
        device: Device,
        ptr: DevicePtr,
        value: u8,
        count: usize,
        stream: Stream,
    ) -> DriverResult<()> {
        let s = cu_stream("cuMemsetD8Async", stream)?;
        let _g = self.bind(device)?;
        self.check_device_memory("cuMemsetD8Async", ptr, count)?;
        // Safety: context bound; the driver validates `ptr`/`count` against its
        // allocations and reports a bad range as an error; `s` is a live stream
        // (`Stream`'s contract).
        check("cuMemsetD8Async", unsafe { sys::cuMemsetD8Async(ptr.as_raw(), value, count, s) })
    }

    /// Copies `dst.len()` bytes from device memory `src` to `dst`, ordered on `stream`
    /// (`cuMemcpyDtoHAsync`), then waits for `stream` (`cuStreamSynchronize`), so `dst`
    /// holds the data on return.
    ///
    /// The driver writes into a staging buffer of this call's own, copied into `dst` only
    /// once the copy is known complete: if the wait fails, the copy may still be pending,
    /// so the staging buffer is leaked (the late write lands there) and `dst` is never
    /// written after this call returns.
    pub fn copy_to_host(
        &self,
        device: Device,
        src: DevicePtr,
        dst: &mut [u8],
        stream: Stream,
    ) -> DriverResult<()> {
        const OP: &str = "cuMemcpyDtoHAsync";
        let s = cu_stream(OP, stream)?;
        let _g = self.bind(device)?;
        self.check_device_memory(OP, src, dst.len())?;
        let mut staging = std::mem::ManuallyDrop::new(vec![0u8; dst.len()]);
        // Safety: context bound; `src` is device memory (checked above; the driver
        // validates the range); `staging` is a live host buffer of `dst.len()` bytes
        // that is freed only after the copy is known complete (else never).
        check(OP, unsafe {
            sys::cuMemcpyDtoHAsync_v2(staging.as_mut_ptr().cast(), src.as_raw(), dst.len(), s)
        })
        .inspect_err(|_| {
            // Not enqueued: nothing will write to the buffer.
            // Safety: taken once, here, on this path only.
            drop(unsafe { std::mem::ManuallyDrop::take(&mut staging) });
        })?;
        // Safety: context bound; waits for the stream (including the copy above). On
        // failure `staging` stays leaked (ManuallyDrop).
        check("cuStreamSynchronize", unsafe { sys::cuStreamSynchronize(s) })?;
        dst.copy_from_slice(&staging);
        // Safety: the copy has completed; taken once.
        drop(unsafe { std::mem::ManuallyDrop::take(&mut staging) });
        Ok(())
    }

    /// Copies `src` to device memory `dst`, ordered on `stream` (`cuMemcpyHtoDAsync`),
    /// then waits for `stream`. The driver reads a staging copy of `src` owned by this
    /// call, leaked if the wait fails (the copy may still be reading it), so `src` is
    /// free for reuse on return either way.
    pub fn copy_from_host(
        &self,
        device: Device,
        src: &[u8],
        dst: DevicePtr,
        stream: Stream,
    ) -> DriverResult<()> {
        const OP: &str = "cuMemcpyHtoDAsync";
        let s = cu_stream(OP, stream)?;
        let _g = self.bind(device)?;
        self.check_device_memory(OP, dst, src.len())?;
        let mut staging = std::mem::ManuallyDrop::new(src.to_vec());
        // Safety: context bound; `dst` is device memory (checked above; the driver
        // validates the range); `staging` is a live host buffer of `src.len()` bytes
        // freed only after the copy is known complete (else never).
        check(OP, unsafe {
            sys::cuMemcpyHtoDAsync_v2(dst.as_raw(), staging.as_ptr().cast(), src.len(), s)
        })
        .inspect_err(|_| {
            // Safety: not enqueued, so nothing reads the buffer; taken once.
            drop(unsafe { std::mem::ManuallyDrop::take(&mut staging) });
        })?;
        // Safety: context bound; waits for the stream (including the copy above).
        check("cuStreamSynchronize", unsafe { sys::cuStreamSynchronize(s) })?;
        // Safety: the copy has completed; taken once.
        drop(unsafe { std::mem::ManuallyDrop::take(&mut staging) });
        Ok(())
    }

    /// Refuses a pointer that is not device memory (`cuPointerGetAttribute`,
    /// `CU_POINTER_ATTRIBUTE_MEMORY_TYPE`). Under unified addressing the copy and set
    /// calls infer a pointer's kind from its value, so a host address passed as a
    /// [`DevicePtr`] (which safe code can make from any number) would have the driver
    /// write host memory. `count` 0 touches nothing and is not checked. The context must
    /// be bound.
    fn check_device_memory(
        &self,
        op: &'static str,
        ptr: DevicePtr,
        count: usize,
    ) -> DriverResult<()> {
        if count == 0 {
            return Ok(());
        }
        let mut kind: u32 = 0;
        // Safety: context bound; `kind` is a live u32, the size of the memory-type
        // attribute (a CUmemorytype); the driver only reads its own tables for `ptr`.
        let r = unsafe {
            sys::cuPointerGetAttribute(
                (&mut kind as *mut u32).cast(),
                sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
                ptr.as_raw(),
            )
        };
        if r == CUresult::CUDA_SUCCESS && kind == sys::CUmemorytype::CU_MEMORYTYPE_DEVICE as u32 {
            return Ok(());
        }
        Err(DriverError::new(
            op,
            CUresult::CUDA_ERROR_INVALID_VALUE as i32,
            format!("CUDA_ERROR_INVALID_VALUE: {ptr} is not device memory"),
        ))
    }

    /// Waits for all work on `stream` (`cuStreamSynchronize`).
    pub fn stream_synchronize(&self, stream: UsageStream) -> DriverResult<()> {
        let s = cu_stream("cuStreamSynchronize", stream.stream)?;
        let _g = self.bind(stream.device)?;
        // Safety: context of the stream's device bound; `s` is a live stream.
        check("cuStreamSynchronize", unsafe { sys::cuStreamSynchronize(s) })
    }

    /// Destroys a stream made by [`Driver::create_stream`] (`cuStreamDestroy`). Work
    /// already queued on it still completes. The null stream is left alone.
    ///
    /// # Safety
    /// [`Stream`] is `Copy`: the caller owns the stream, and no copy of the handle is
    /// used with this driver afterwards (nor recorded in an allocator that may use it:
    /// every block recorded on it, or allocated on it, is freed first, and no cache
    /// keeps blocks on it), since the driver dereferences a handle it is given.
    pub unsafe fn destroy_stream(&self, stream: UsageStream) -> DriverResult<()> {
        if stream.stream.is_null() {
            return Ok(());
        }
        let s = cu_stream("cuStreamDestroy", stream.stream)?;
        let _g = self.bind(stream.device)?;
        // Safety: context bound; the caller owns the (non-null) stream and stops using
        // it (this function's contract).
        check("cuStreamDestroy", unsafe { sys::cuStreamDestroy_v2(s) })
    }

    /// Begins capturing `stream` into a graph (`cuStreamBeginCapture_v2`). Capture needs
    /// a non-null stream.
    pub fn begin_capture(&self, stream: UsageStream, mode: CaptureMode) -> DriverResult<()> {
        let s = cu_stream("cuStreamBeginCapture", stream.stream)?;
        let _g = self.bind(stream.device)?;
        // Safety: context bound; `s` is a live stream; mode is a valid enum.
        check("cuStreamBeginCapture", unsafe { sys::cuStreamBeginCapture_v2(s, mode.raw()) })
    }

    /// Ends the capture of `stream` (`cuStreamEndCapture`) and instantiates the graph
    /// (`cuGraphInstantiateWithFlags`, flags 0).
    pub fn end_capture(&self, stream: UsageStream) -> DriverResult<CudaGraph> {
        let s = cu_stream("cuStreamEndCapture", stream.stream)?;
        let _g = self.bind(stream.device)?;
        let mut graph: sys::CUgraph = std::ptr::null_mut();
        // Safety: context bound; `s` is a live stream; valid out-pointer. On failure no
        // graph is returned.
        check("cuStreamEndCapture", unsafe { sys::cuStreamEndCapture(s, &mut graph) })?;
        let mut exec: sys::CUgraphExec = std::ptr::null_mut();
        // Safety: `graph` is the valid graph just returned; valid out-pointer.
        let r = unsafe { sys::cuGraphInstantiateWithFlags(&mut exec, graph, 0) };
        if r != CUresult::CUDA_SUCCESS {
            // Safety: we own `graph` and nothing else refers to it.
            unsafe { sys::cuGraphDestroy(graph) };
            return Err(cu_error("cuGraphInstantiateWithFlags", r));
        }
        Ok(CudaGraph {
            graph: graph as usize,
            exec: exec as usize,
            device: stream.device,
            origin: self.id,
        })
    }

    /// Launches an instantiated graph on `stream` (`cuGraphLaunch`).
    pub fn graph_launch(&self, graph: &CudaGraph, stream: UsageStream) -> DriverResult<()> {
        if graph.origin != self.id {
            return Err(foreign("cuGraphLaunch", "a graph"));
        }
        let s = cu_stream("cuGraphLaunch", stream.stream)?;
        let _g = self.bind(stream.device)?;
        // Safety: context bound; `graph.exec` is a live exec made by this driver (the
        // origin check) that has not been destroyed (graph_destroy consumes the graph);
        // `s` is a live stream.
        check("cuGraphLaunch", unsafe { sys::cuGraphLaunch(graph.exec as sys::CUgraphExec, s) })
    }

    /// Destroys a graph and its executable (`cuGraphExecDestroy`, `cuGraphDestroy`).
    /// Launches already queued still complete.
    pub fn graph_destroy(&self, graph: CudaGraph) -> DriverResult<()> {
        if graph.origin != self.id {
            return Err(foreign("cuGraphDestroy", "a graph"));
        }
        let _g = self.bind(graph.device)?;
        // Safety: `graph` is consumed here, made by this driver and never destroyed
        // before (destroying consumes it), so both handles are live and unused after.
        let r1 = unsafe { sys::cuGraphExecDestroy(graph.exec as sys::CUgraphExec) };
        // Safety: as above.
        let r2 = unsafe { sys::cuGraphDestroy(graph.graph as sys::CUgraph) };
        check("cuGraphExecDestroy", r1).and(check("cuGraphDestroy", r2))
    }

    /// Holds `stream` for `ms` milliseconds: a host function (`cuLaunchHostFunc`) that
    /// sleeps, so work queued after it starts late (a "delay kernel" that needs no
    /// compiled kernel). It blocks the stream, and a driver thread, while it sleeps.
    pub fn stream_sleep(&self, stream: UsageStream, ms: u32) -> DriverResult<()> {
        let s = cu_stream("cuLaunchHostFunc", stream.stream)?;
        let _g = self.bind(stream.device)?;
        let user_data = std::ptr::without_provenance_mut::<c_void>(ms as usize);
        // Safety: context bound; `s` is a live stream; `sleep_host_fn` makes no CUDA call (as host functions
        // must not) and only reads the address of `user_data`, which is never
        // dereferenced, so any number of runs (for example from a graph) is sound.
        check("cuLaunchHostFunc", unsafe {
            sys::cuLaunchHostFunc(s, Some(sleep_host_fn), user_data)
        })
    }

    /// Takes a spare event of `device` or makes one (`cuEventCreate`, timing off). The
    /// device's context must be bound.
    fn take_event(&self, slot: &DeviceSlot) -> DriverResult<CUevent> {
        if let Some(ev) = slot.events.pop() {
            slot.spare_events.fetch_sub(1, Ordering::Relaxed);
            return Ok(ev as CUevent);
        }
        self.create_event()
    }

    fn create_event(&self) -> DriverResult<CUevent> {
        let mut ev: CUevent = std::ptr::null_mut();
        // Safety: a context is bound (callers bind the event's device); valid
        // out-pointer; flags are a valid CUevent_flags value.
        check("cuEventCreate", unsafe {
            sys::cuEventCreate(&mut ev, sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32)
        })?;
        Ok(ev)
    }

    /// `cuEventDestroy` of an event of the bound context.
    fn destroy_raw_event(ev: CUevent) -> DriverResult<()> {
        // Safety: `ev` is a live event made by this driver; the caller gives it up. A
        // pending event is released by the driver once its work completes.
        check("cuEventDestroy", unsafe { sys::cuEventDestroy_v2(ev) })
    }
}

impl Drop for CudaDriver {
    fn drop(&mut self) {
        // Records of bound contexts on any thread must not be trusted from now on.
        CONTEXT_GENERATION.fetch_add(1, Ordering::Relaxed);
        for device in 0..self.devices.len() {
            let Some(&ctx) = self.devices[device].ctx.get() else { continue };
            // Make this context current to destroy the spare events, then put back what
            // was current (or nothing, if it was this context about to be released).
            let mut current: CUcontext = std::ptr::null_mut();
            // Safety: the library is loaded (a context was retained); valid out-pointer.
            let _ = unsafe { sys::cuCtxGetCurrent(&mut current) };
            // Safety: `ctx` is retained until the release below.
            let _ = unsafe { sys::cuCtxSetCurrent(ctx as CUcontext) };
            while let Some(ev) = self.devices[device].events.pop() {
                let _ = Self::destroy_raw_event(ev as CUevent);
            }
            let restore = if current as usize == ctx { std::ptr::null_mut() } else { current };
            // Safety: rebinding what was current before (or nothing), so this thread does
            // not keep a context we are about to release current.
            let _ = unsafe { sys::cuCtxSetCurrent(restore) };
            // Safety: we hold exactly one reference, taken in retain_context.
            let r = unsafe { sys::cuDevicePrimaryCtxRelease_v2(self.devices[device].cu_device) };
            if r != CUresult::CUDA_SUCCESS {
                log::warn!("releasing the primary context of device {device} failed: {r:?}");
            }
        }
        let _ = BOUND.try_with(|b| b.set((0, 0)));
    }
}

impl Driver for CudaDriver {
    fn serializes_internally(&self) -> bool {
        true
    }

    /// A sticky error is returned by every call on the context, `cuMemAllocAsync` and
    /// `cuMemFreeAsync` included (see `check_last_error`).
    fn calls_report_prior_errors(&self) -> bool {
        true
    }

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn device_count(&self) -> DriverResult<usize> {
        Ok(self.devices.len())
    }

    fn init_device(&self, device: Device) -> DriverResult<()> {
        let _g = self.bind(device)?;
        let pool = self.pool(device)?;
        let mut threshold: u64 = u64::MAX;
        // Safety: context bound; `pool` is the device's default pool; the release
        // threshold is a cuuint64_t attribute and `threshold` is a live u64.
        check("cuMemPoolSetAttribute", unsafe {
            sys::cuMemPoolSetAttribute(
                pool,
                CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut threshold as *mut u64).cast(),
            )
        })?;
        for attr in [
            CUmemPool_attribute::CU_MEMPOOL_ATTR_REUSE_FOLLOW_EVENT_DEPENDENCIES,
            CUmemPool_attribute::CU_MEMPOOL_ATTR_REUSE_ALLOW_OPPORTUNISTIC,
            CUmemPool_attribute::CU_MEMPOOL_ATTR_REUSE_ALLOW_INTERNAL_DEPENDENCIES,
        ] {
            let mut enable: i32 = 1;
            // Safety: as above; the reuse flags are C `int` attributes and `enable` is a
            // live i32.
            check("cuMemPoolSetAttribute", unsafe {
                sys::cuMemPoolSetAttribute(pool, attr, (&mut enable as *mut i32).cast())
            })?;
        }
        Ok(())
    }

    fn create_stream(&self, device: Device) -> DriverResult<Stream> {
        let _g = self.bind(device)?;
        let mut stream: CUstream = std::ptr::null_mut();
        // Safety: context bound; valid out-pointer; NON_BLOCKING is a valid flag.
        check("cuStreamCreate", unsafe {
            sys::cuStreamCreate(&mut stream, sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32)
        })?;
        // Safety: a live stream just made by the driver (the caller owns it).
        Ok(unsafe { Stream::from_raw(stream as usize) })
    }

    /// The null stream, `CU_STREAM_LEGACY` and `CU_STREAM_PER_THREAD` are valid on every
    /// device (they mean that device's own stream once its context is bound). Another
    /// handle's context comes from `cuStreamGetCtx`; the device's primary context is the
    /// common answer, and any other context is asked for its device
    /// (`cuCtxGetDevice`, pushed and popped). The driver cannot tell a handle that never
    /// existed from a live one: that is the contract of `Stream::from_raw`.
    fn check_stream(&self, stream: UsageStream) -> DriverResult<()> {
        const OP: &str = "cuStreamGetCtx";
        let slot = self.slot(stream.device, OP)?;
        let raw = cu_stream(OP, stream.stream)? as usize;
        if raw <= CU_STREAM_PER_THREAD {
            return Ok(());
        }
        let _g = self.bind(stream.device)?;
        let primary = *slot.ctx.get().expect("bound above, so retained");
        let mut ctx: CUcontext = std::ptr::null_mut();
        // Safety: context bound; `raw` is a live stream handle (the contract of
        // `Stream::from_raw`); valid out-pointer.
        check(OP, unsafe { sys::cuStreamGetCtx(raw as CUstream, &mut ctx) })?;
        if ctx as usize == primary {
            return Ok(());
        }
        // Safety: `ctx` is the live context of a live stream; pushed here and popped
        // right below, so the thread's context stack is as it was.
        check("cuCtxPushCurrent", unsafe { sys::cuCtxPushCurrent_v2(ctx) })?;
        let mut dev: CUdevice = 0;
        // Safety: a context is current (pushed above); valid out-pointer.
        let got = check("cuCtxGetDevice", unsafe { sys::cuCtxGetDevice(&mut dev) });
        let mut popped: CUcontext = std::ptr::null_mut();
        // Safety: pops the context pushed above; valid out-pointer.
        let pop = check("cuCtxPopCurrent", unsafe { sys::cuCtxPopCurrent_v2(&mut popped) });
        got.and(pop)?;
        if dev == slot.cu_device {
            Ok(())
        } else {
            Err(DriverError::new(
                OP,
                CUresult::CUDA_ERROR_INVALID_HANDLE as i32,
                "CUDA_ERROR_INVALID_HANDLE: the stream belongs to another device",
            ))
        }
    }

    /// The driver API has no per-thread "last error" to clear: every call returns its own
    /// result, and each call of this driver is checked. What remains is a *sticky* error
    /// (an illegal address or launch failure from earlier kernels) that corrupts the
    /// context; once the driver has seen it, every later call on the context returns it.
    ///
    /// This asks with `cuCtxGetDevice` (documented to "also return error codes from
    /// previous, asynchronous launches"): no device synchronization, not a stream
    /// operation, so it is legal during any capture mode and never invalidates a
    /// capture (unlike `cuStreamQuery`), and it does not wait (unlike
    /// `cuCtxSynchronize`). It costs one cheap driver call (plus binding), so the
    /// allocator may choose to skip it on the hot path: `cuMemAllocAsync` and
    /// `cuMemFreeAsync` themselves report a sticky error too.
    fn check_last_error(&self, device: Device) -> DriverResult<()> {
        let _g = self.bind(device)?;
        let mut dev: CUdevice = 0;
        // Safety: context bound; valid out-pointer.
        check("cuCtxGetDevice", unsafe { sys::cuCtxGetDevice(&mut dev) })
    }

    #[inline]
    fn malloc_async(&self, device: Device, size: usize, stream: Stream) -> DriverResult<DevicePtr> {
        let s = cu_stream("cuMemAllocAsync", stream)?;
        let _g = self.bind(device)?;
        let mut ptr: sys::CUdeviceptr = 0;
        // Safety: context bound (the null stream means this device's legacy stream);
        // `s` is a live stream; valid out-pointer; the allocation comes from the
        // device's default pool.
        check("cuMemAllocAsync", unsafe { sys::cuMemAllocAsync(&mut ptr, size, s) })?;
        Ok(DevicePtr::from_raw(ptr))
    }

    #[inline]
    fn free_async(
        &self,
        device: Device,
        ptr: DevicePtr,
        _size: usize,
        stream: Stream,
    ) -> DriverResult<()> {
        let s = cu_stream("cuMemFreeAsync", stream)?;
        let _g = self.bind(device)?;
        // Safety: the block's device context is bound (cuMemFreeAsync resolves the null
        // stream through it); `s` is a live stream; the driver rejects a pointer it did
        // not allocate.
        check("cuMemFreeAsync", unsafe { sys::cuMemFreeAsync(ptr.as_raw(), s) })
    }

    /// `cuMemAlloc` with the thread in the relaxed capture mode for the call (as
    /// PyTorch's `cudaMallocMaybeCapturing`): a capture in the global or thread-local
    /// mode would otherwise refuse it. The allocation is not a graph node.
    fn malloc_sync(&self, device: Device, size: usize) -> DriverResult<DevicePtr> {
        let _g = self.bind(device)?;
        let mut mode = sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED;
        // Safety: valid in-out pointer to a capture mode; the thread's previous mode is
        // written back to `mode` and restored below.
        check("cuThreadExchangeStreamCaptureMode", unsafe {
            sys::cuThreadExchangeStreamCaptureMode(&mut mode)
        })?;
        let mut ptr: sys::CUdeviceptr = 0;
        // Safety: context bound; valid out-pointer.
        let r = check("cuMemAlloc", unsafe { sys::cuMemAlloc_v2(&mut ptr, size) });
        // Safety: `mode` holds the thread's previous mode (from the exchange above).
        let restored = check("cuThreadExchangeStreamCaptureMode", unsafe {
            sys::cuThreadExchangeStreamCaptureMode(&mut mode)
        });
        r?;
        if let Err(e) = restored {
            // Safety: `ptr` was just allocated by cuMemAlloc and is not handed out.
            let _ = unsafe { sys::cuMemFree_v2(ptr) };
            return Err(e);
        }
        Ok(DevicePtr::from_raw(ptr))
    }

    fn free_sync(&self, device: Device, ptr: DevicePtr, _size: usize) -> DriverResult<()> {
        let _g = self.bind(device)?;
        // Safety: context bound; the driver rejects a pointer that cuMemAlloc did not
        // make; the caller (the private pools) frees only blocks no longer handed out.
        check("cuMemFree", unsafe { sys::cuMemFree_v2(ptr.as_raw()) })
    }

    fn mem_get_info(&self, device: Device) -> DriverResult<MemInfo> {
        let _g = self.bind(device)?;
        let (mut free, mut total) = (0usize, 0usize);
        // Safety: context bound (the info is the current context's device); valid
        // out-pointers.
        check("cuMemGetInfo", unsafe { sys::cuMemGetInfo_v2(&mut free, &mut total) })?;
        Ok(MemInfo { free: free as u64, total: total as u64 })
    }

    fn pool_attribute(&self, device: Device, attr: PoolAttribute) -> DriverResult<u64> {
        let _g = self.bind(device)?;
        let pool = self.pool(device)?;
        let (raw, is_int) = pool_attribute_raw(attr);
        if is_int {
            let mut v: i32 = 0;
            // Safety: context bound; `raw` is an int attribute and `v` a live i32.
            check("cuMemPoolGetAttribute", unsafe {
                sys::cuMemPoolGetAttribute(pool, raw, (&mut v as *mut i32).cast())
            })?;
            Ok(u64::from(v != 0))
        } else {
            let mut v: u64 = 0;
            // Safety: context bound; `raw` is a cuuint64_t attribute and `v` a live u64.
            check("cuMemPoolGetAttribute", unsafe {
                sys::cuMemPoolGetAttribute(pool, raw, (&mut v as *mut u64).cast())
            })?;
            Ok(v)
        }
    }

    fn set_pool_attribute(
        &self,
        device: Device,
        attr: PoolAttribute,
        value: u64,
    ) -> DriverResult<()> {
        let _g = self.bind(device)?;
        let pool = self.pool(device)?;
        let (raw, is_int) = pool_attribute_raw(attr);
        if is_int {
            let mut v: i32 = i32::from(value != 0);
            // Safety: context bound; `raw` is an int attribute and `v` a live i32.
            check("cuMemPoolSetAttribute", unsafe {
                sys::cuMemPoolSetAttribute(pool, raw, (&mut v as *mut i32).cast())
            })
        } else {
            let mut v: u64 = value;
            // Safety: context bound; `raw` is a cuuint64_t attribute and `v` a live u64.
            // The driver rejects values it does not allow (high watermarks other than 0,
            // the read-only current counters).
            check("cuMemPoolSetAttribute", unsafe {
                sys::cuMemPoolSetAttribute(pool, raw, (&mut v as *mut u64).cast())
            })
        }
    }

    fn pool_trim_to(&self, device: Device, keep: u64) -> DriverResult<()> {
        let _g = self.bind(device)?;
        let pool = self.pool(device)?;
        let keep = usize::try_from(keep).unwrap_or(usize::MAX);
        // Safety: context bound; `pool` is the device's default pool.
        check("cuMemPoolTrimTo", unsafe { sys::cuMemPoolTrimTo(pool, keep) })
    }

    fn device_synchronize(&self, device: Device) -> DriverResult<()> {
        let _g = self.bind(device)?;
        // Safety: context bound; waits for all work in it.
        check("cuCtxSynchronize", unsafe { sys::cuCtxSynchronize() })
    }

    fn record_event(&self, stream: UsageStream) -> DriverResult<Event> {
        let s = cu_stream("cuEventRecord", stream.stream)?;
        let _g = self.bind(stream.device)?;
        let slot = self.slot(stream.device, "cuEventRecord")?;
        let from_cache = !slot.events.is_empty();
        let ev = self.take_event(slot)?;
        // Safety: context of the stream's device bound; `ev` was made in that context
        // (S24); re-recording a spare event is legal (a wait captured its earlier state).
        let r = unsafe { sys::cuEventRecord(ev, s) };
        if r == CUresult::CUDA_SUCCESS {
            return Ok(Event::made_by(ev as usize, self.id));
        }
        let _ = Self::destroy_raw_event(ev);
        if from_cache {
            // A spare event that cannot be recorded again (for example one last recorded
            // in a capture that has since been torn down): retry once with a fresh event.
            let ev = self.create_event()?;
            // Safety: as above, with a fresh event of this context.
            let r = unsafe { sys::cuEventRecord(ev, s) };
            if r == CUresult::CUDA_SUCCESS {
                return Ok(Event::made_by(ev as usize, self.id));
            }
            let _ = Self::destroy_raw_event(ev);
        }
        Err(cu_error("cuEventRecord", r))
    }

    /// Only events this driver instance recorded are accepted (`CUDA_ERROR_INVALID_HANDLE`
    /// otherwise): they are live, since `destroy_event` consumes them.
    fn stream_wait_event(&self, stream: UsageStream, event: &Event) -> DriverResult<()> {
        if event.origin() != self.id {
            return Err(foreign("cuStreamWaitEvent", "an event"));
        }
        let s = cu_stream("cuStreamWaitEvent", stream.stream)?;
        let _g = self.bind(stream.device)?;
        // Safety: context of the waiting stream's device bound; `s` is a live stream; the
        // event is a live event of this driver (origin check; not destroyed, as
        // destroying consumes it) and may come from another device (legal); flags 0.
        check("cuStreamWaitEvent", unsafe {
            sys::cuStreamWaitEvent(s, event.as_raw() as CUevent, 0)
        })
    }

    fn event_query(&self, device: Device, event: &Event) -> DriverResult<bool> {
        if event.origin() != self.id {
            return Err(foreign("cuEventQuery", "an event"));
        }
        let _g = self.bind(device)?;
        // Safety: context bound; the event is a live event of this driver (see
        // stream_wait_event).
        match unsafe { sys::cuEventQuery(event.as_raw() as CUevent) } {
            CUresult::CUDA_SUCCESS => Ok(true),
            CUresult::CUDA_ERROR_NOT_READY => Ok(false),
            r => Err(cu_error("cuEventQuery", r)),
        }
    }

    /// Returns the event to `device`'s spare list (up to the cache size), else destroys
    /// it. Reuse is safe even while the event is pending: `cuStreamWaitEvent` captured its
    /// state when called, and a later `cuEventRecord` does not affect earlier waits.
    /// `device` should be the device of the stream the event was recorded on (an event
    /// put on another device's list fails to record there and is then destroyed).
    ///
    /// Only this instance's own events are accepted: a foreign event (one made by
    /// [`Event::from_raw`] or by another driver) is neither cached nor destroyed, since
    /// its owner may still use or destroy it (`CUDA_ERROR_INVALID_HANDLE`).
    fn destroy_event(&self, device: Device, event: Event) -> DriverResult<()> {
        let slot = self.slot(device, "cuEventDestroy")?;
        if event.origin() != self.id {
            return Err(foreign("cuEventDestroy", "an event"));
        }
        if slot.spare_events.load(Ordering::Relaxed) < self.event_cache {
            slot.spare_events.fetch_add(1, Ordering::Relaxed);
            slot.events.push(event.as_raw());
            return Ok(());
        }
        let _g = self.bind(device)?;
        Self::destroy_raw_event(event.as_raw() as CUevent)
    }

    /// `cuStreamIsCapturing` (the stable form; `cuStreamGetCaptureInfo` changed signature
    /// across versions and its extra outputs are not needed). Querying the legacy null
    /// stream while another blocking stream of the device captures fails with
    /// `CUDA_ERROR_STREAM_CAPTURE_IMPLICIT`, which is returned as an error.
    fn capture_status(&self, stream: UsageStream) -> DriverResult<CaptureStatus> {
        let s = cu_stream("cuStreamIsCapturing", stream.stream)?;
        let _g = self.bind(stream.device)?;
        let mut status = CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
        // Safety: context bound (for the null stream); `s` is a live stream; valid
        // out-pointer.
        check("cuStreamIsCapturing", unsafe { sys::cuStreamIsCapturing(s, &mut status) })?;
        Ok(capture_status_from_raw(status))
    }

    /// A no-op when `owner == accessor`: a pool's own device always has read-write
    /// access, and the driver may reject a descriptor that names it.
    fn pool_set_access(&self, owner: Device, accessor: Device) -> DriverResult<()> {
        let accessor_id = i32::try_from(accessor).map_err(|_| {
            DriverError::new(
                "cuMemPoolSetAccess",
                CUresult::CUDA_ERROR_INVALID_DEVICE as i32,
                "CUDA_ERROR_INVALID_DEVICE",
            )
        })?;
        self.slot(accessor, "cuMemPoolSetAccess")?;
        if owner == accessor {
            self.slot(owner, "cuMemPoolSetAccess")?;
            return Ok(());
        }
        let _g = self.bind(owner)?;
        let pool = self.pool(owner)?;
        let desc = sys::CUmemAccessDesc {
            location: device_location(accessor_id),
            flags: sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
        };
        // Safety: context bound; `pool` is the owner's default pool; `desc` is one live
        // access descriptor and the count is 1.
        check("cuMemPoolSetAccess", unsafe { sys::cuMemPoolSetAccess(pool, &desc, 1) })
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
        let s = cu_stream(if peer { "cuMemcpyPeerAsync" } else { "cuMemcpyAsync" }, stream.stream)?;
        if count != 0 {
            let _g = self.bind(stream.device)?;
            let checked = self
                .check_device_memory("cuMemcpyAsync", dst, count)
                .and_then(|_| self.check_device_memory("cuMemcpyAsync", src, count));
            // Memory allocated inside a capture is the graph's: the driver does not know
            // it as device memory until the graph runs, so a capturing stream's copy is
            // left to the driver's own checks (it records the copy, it does not run it).
            if let Err(e) = checked
                && self.capture_status(stream)? != CaptureStatus::Active
            {
                return Err(e);
            }
        }
        if peer {
            let dst_ctx = self.primary_context(dst_device)?;
            let src_ctx = self.primary_context(src_device)?;
            let _g = self.bind(stream.device)?;
            // Safety: both contexts are retained primary contexts of the devices owning
            // the pointers; the stream's device context is bound; the driver validates
            // the ranges.
            check("cuMemcpyPeerAsync", unsafe {
                sys::cuMemcpyPeerAsync(
                    dst.as_raw(),
                    dst_ctx as CUcontext,
                    src.as_raw(),
                    src_ctx as CUcontext,
                    count,
                    s,
                )
            })
        } else {
            let _g = self.bind(stream.device)?;
            // Safety: context of the stream's device bound; unified addressing lets the
            // driver infer both pointers' devices; it validates the ranges.
            check("cuMemcpyAsync", unsafe {
                sys::cuMemcpyAsync(dst.as_raw(), src.as_raw(), count, s)
            })
        }
    }

    /// `cuMemcpy` (unified addressing). As with `cudaMemcpy`, a device-to-device copy is
    /// ordered on the legacy default stream and may return before it completes.
    fn memcpy(
        &self,
        device: Device,
        dst: DevicePtr,
        src: DevicePtr,
        count: usize,
    ) -> DriverResult<()> {
        let _g = self.bind(device)?;
        self.check_device_memory("cuMemcpy", dst, count)?;
        self.check_device_memory("cuMemcpy", src, count)?;
        // Safety: context bound; both pointers are device memory (checked above), so
        // no host memory is written; the driver validates both ranges.
        check("cuMemcpy", unsafe { sys::cuMemcpy(dst.as_raw(), src.as_raw(), count) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::CUDA_ERROR_OUT_OF_MEMORY;

    #[test]
    fn new_without_a_gpu_is_an_error_not_a_panic() {
        match CudaDriver::new() {
            Ok(driver) => {
                // A machine with a GPU: the selector must agree and count devices.
                assert!(driver.device_count().unwrap() > 0);
            }
            Err(e) => {
                if !library_present() {
                    assert_eq!(e.op, "load libcuda");
                    assert_eq!(e.code, CUDA_ERROR_NOT_FOUND);
                } else {
                    assert_ne!(e.code, 0);
                }
                assert!(detect().is_err());
                assert!(e.to_string().contains("failed"));
            }
        }
    }

    #[test]
    fn error_names_and_codes() {
        let e = cu_error("cuMemAllocAsync", CUresult::CUDA_ERROR_OUT_OF_MEMORY);
        assert_eq!(e.code, CUDA_ERROR_OUT_OF_MEMORY);
        assert!(e.is_oom());
        assert_eq!(e.name, "CUDA_ERROR_OUT_OF_MEMORY");
        assert_eq!(e.op, "cuMemAllocAsync");
        let e = cu_error("cuEventQuery", CUresult::CUDA_ERROR_NOT_READY);
        assert_eq!((e.code, e.name.as_str()), (600, "CUDA_ERROR_NOT_READY"));
        assert!(!e.is_oom());
        assert!(check("x", CUresult::CUDA_SUCCESS).is_ok());
        assert_eq!(
            check("cuInit", CUresult::CUDA_ERROR_NO_DEVICE).unwrap_err().code,
            CUDA_ERROR_NO_DEVICE
        );
    }

    #[test]
    fn pool_attribute_mapping() {
        use CUmemPool_attribute::*;
        let cases = [
            (PoolAttribute::ReleaseThreshold, CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, false),
            (
                PoolAttribute::ReuseFollowEventDependencies,
                CU_MEMPOOL_ATTR_REUSE_FOLLOW_EVENT_DEPENDENCIES,
                true,
            ),
            (
                PoolAttribute::ReuseAllowOpportunistic,
                CU_MEMPOOL_ATTR_REUSE_ALLOW_OPPORTUNISTIC,
                true,
            ),
            (
                PoolAttribute::ReuseAllowInternalDependencies,
                CU_MEMPOOL_ATTR_REUSE_ALLOW_INTERNAL_DEPENDENCIES,
                true,
            ),
            (PoolAttribute::ReservedMemCurrent, CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT, false),
            (PoolAttribute::ReservedMemHigh, CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH, false),
            (PoolAttribute::UsedMemCurrent, CU_MEMPOOL_ATTR_USED_MEM_CURRENT, false),
            (PoolAttribute::UsedMemHigh, CU_MEMPOOL_ATTR_USED_MEM_HIGH, false),
        ];
        for (attr, raw, is_int) in cases {
            assert_eq!(pool_attribute_raw(attr), (raw, is_int), "{attr:?}");
        }
        // The numeric values CUDA documents (cuda.h).
        assert_eq!(CU_MEMPOOL_ATTR_RELEASE_THRESHOLD as u32, 4);
        assert_eq!(CU_MEMPOOL_ATTR_USED_MEM_HIGH as u32, 8);
    }

    #[test]
    fn capture_status_mapping() {
        use CUstreamCaptureStatus::*;
        assert_eq!(capture_status_from_raw(CU_STREAM_CAPTURE_STATUS_NONE), CaptureStatus::None);
        assert_eq!(capture_status_from_raw(CU_STREAM_CAPTURE_STATUS_ACTIVE), CaptureStatus::Active);
        assert_eq!(
            capture_status_from_raw(CU_STREAM_CAPTURE_STATUS_INVALIDATED),
            CaptureStatus::Invalidated
        );
        assert_eq!(CaptureMode::Relaxed.raw(), CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED);
    }

    #[test]
    fn driver_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync + 'static>() {}
        assert_send_sync::<CudaDriver>();
        assert_send_sync::<CudaGraph>();
    }
}
