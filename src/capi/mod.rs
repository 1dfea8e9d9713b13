//! The C ABI: `libstreamalloc.so`, a drop-in for PyTorch's
//! `torch.cuda.memory.CUDAPluggableAllocator` (and any C or C++ client).
//!
//! ```text
//!   PyTorch ──(alloc/free hooks, or the C++ shim)──▶ extern "C" fns (this module)
//!                                                        │ catch_unwind, checked ints,
//!                                                        │ thread-local last error
//!                                                        ▼
//!                                    one global StreamAlloc<Arc<dyn Driver>>
//!                                    (CudaDriver, Guarded contexts; or SimDriver)
//!                                    beside it, PrivatePools over the same driver
//!                                    (MemPool, CUDA graph pools: [`pools`])
//! ```
//!
//! `streamalloc.h` beside this file documents every function for C callers.
//!
//! # Errors
//! Every call that can fail sets the calling thread's *last error* (a code from
//! [`ErrorCode`] and a message); a call that succeeds clears it. The query functions
//! ([`streamalloc_last_error`], [`streamalloc_last_error_code`],
//! [`streamalloc_backend`]) leave it alone. No panic crosses the boundary: a panic
//! becomes [`ErrorCode::Panic`] with the panic's message.
//!
//! # The global allocator
//! Created on first use (any call other than the error queries and
//! [`streamalloc_init`]): with `STREAMALLOC_BACKEND=sim` a simulated device
//! (`STREAMALLOC_SIM_DEVICES`, default 1, of `STREAMALLOC_SIM_CAPACITY` bytes, default
//! 1 GiB); otherwise the CUDA driver found by [`crate::cuda::detect`], with the default
//! [`crate::cuda::ContextPolicy::Guarded`] policy because the host application (PyTorch)
//! owns the current context. Without either, every call fails with
//! [`ErrorCode::NoBackend`] and a message saying why. `STREAMALLOC_CONF` configures it
//! (see [`config`]); a bad value makes every call fail with [`ErrorCode::Config`].
//!
//! # Statistics
//! [`stats`] keeps exact per-device counts of the allocations made through this ABI
//! (bytes and blocks, current, peak and cumulative; out-of-memory errors), reported with
//! the pool's figures by [`streamalloc_device_memory_stats`]: what PyTorch's
//! `torch.cuda.memory_stats()` shows through the shim.

use crate::StreamAlloc;
use crate::api::{DeviceStats, StreamOrderedAllocator};
use crate::driver::Driver;
use crate::error::Error;
use crate::sim::SimDriver;
use crate::types::{Device, DevicePtr, Stream, UsageStream};
use std::cell::RefCell;
use std::ffi::{CStr, c_char, c_double, c_int, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

pub mod config;
pub mod device;
pub mod stats;
pub mod warnings;

pub use config::{
    CONFIG_ENV, ConfigError, format_config, parse_config, streamalloc_config,
    streamalloc_parse_config,
};
pub use device::{streamalloc_cache_info_on, streamalloc_enable_peer_access};
pub use stats::{
    StreamallocMemoryStats, streamalloc_device_memory_stats, streamalloc_reset_accumulated_stats,
};
pub use warnings::{WarningHandler, streamalloc_set_warning_handler};

pub mod history;
pub mod pools;
#[cfg(test)]
mod tests;

/// The most devices the C ABI accepts (`streamalloc_init`, `STREAMALLOC_SIM_DEVICES`):
/// far above any host's, low enough that a garbage count is refused instead of building
/// millions of device records.
pub const MAX_DEVICES: usize = 1024;

/// A CUDA stream handle as C sees it (`cudaStream_t` / `CUstream`).
pub type CudaStream = *mut c_void;

/// The codes of the thread-local last error (`streamalloc_last_error_code`).
#[repr(i32)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorCode {
    /// No error.
    None = 0,
    /// Out of memory: the device, or the limit set with a memory fraction (or >= 1 EiB).
    OutOfMemory = 1,
    /// A bad argument: device index, memory fraction, unknown pointer, double free,
    /// a null output pointer.
    InvalidArgument = 2,
    /// A CUDA driver call failed.
    Driver = 3,
    /// Capture misuse: a capture begun while one is underway, or ended with none.
    Capture = 4,
    /// A panic inside the library (a bug); the allocator keeps working.
    Panic = 5,
    /// No backend: no CUDA driver or device, and `STREAMALLOC_BACKEND=sim` not set.
    NoBackend = 6,
    /// A bad `STREAMALLOC_CONF` (unknown key, bad value).
    Config = 7,
}

impl ErrorCode {
    /// The code of a library error.
    pub fn of(e: &Error) -> Self {
        match e {
            Error::OutOfMemory(_) | Error::TooLarge { .. } => ErrorCode::OutOfMemory,
            Error::UnknownPointer { .. }
            | Error::DoubleFree { .. }
            | Error::OwnedByHandle { .. }
            | Error::InvalidDevice { .. }
            | Error::InvalidStream { .. }
            | Error::InvalidFraction { .. } => ErrorCode::InvalidArgument,
            Error::CaptureAlreadyUnderway | Error::NoCaptureUnderway => ErrorCode::Capture,
            Error::Driver(_) => ErrorCode::Driver,
        }
    }
}

/// Device statistics for C (`streamalloc_stats` in the header), from [`DeviceStats`].
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct StreamallocStats {
    /// Bytes the device's pool has reserved now.
    pub reserved_current: u64,
    /// High watermark of reserved bytes (since the last peak reset).
    pub reserved_peak: u64,
    /// Bytes the pool has handed out now.
    pub used_current: u64,
    /// High watermark of handed-out bytes (since the last peak reset).
    pub used_peak: u64,
    /// Bytes in live allocations made through this allocator.
    pub allocated_current: u64,
    /// Bytes held in the allocator's own cache (0 without a front cache).
    pub cached_current: u64,
    /// Allocations served from the allocator's cache.
    pub hits: u64,
    /// Allocations that went to the driver.
    pub misses: u64,
}

impl From<DeviceStats> for StreamallocStats {
    fn from(s: DeviceStats) -> Self {
        StreamallocStats {
            reserved_current: s.reserved_current,
            reserved_peak: s.reserved_peak,
            used_current: s.used_current,
            used_peak: s.used_peak,
            allocated_current: s.allocated_current,
            cached_current: s.cached_current,
            hits: s.cache_hits,
            misses: s.cache_misses,
        }
    }
}

// ----- the thread-local last error -----

/// A failure at the boundary: a code and its message.
#[derive(Clone, Debug)]
pub(crate) struct Failure {
    code: ErrorCode,
    message: String,
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure { code: ErrorCode::of(&e), message: e.to_string() }
    }
}

impl Failure {
    fn invalid(message: impl Into<String>) -> Self {
        Failure { code: ErrorCode::InvalidArgument, message: message.into() }
    }
}

thread_local! {
    static LAST_ERROR: RefCell<(ErrorCode, String)> = const { RefCell::new((ErrorCode::None, String::new())) };
}

/// The last error of calls made while the calling thread's slot is gone (in a pthread
/// key destructor, after Rust's thread-locals were destroyed): shared by such threads.
static TEARDOWN_ERROR: Mutex<(ErrorCode, String)> = Mutex::new((ErrorCode::None, String::new()));

fn set_last_error(code: ErrorCode, message: String) {
    let mut value = Some((code, message));
    let _ = LAST_ERROR.try_with(|e| {
        if let (Ok(mut slot), Some(v)) = (e.try_borrow_mut(), value.take()) {
            *slot = v;
        }
    });
    if let Some(v) = value {
        *TEARDOWN_ERROR.lock().unwrap_or_else(|p| p.into_inner()) = v;
    }
}

/// Runs `f` on the calling thread's last error, or on the teardown slot when the
/// thread's is gone.
fn with_last_error<R>(f: impl FnOnce(&(ErrorCode, String)) -> R) -> R {
    let mut f = Some(f);
    let r = LAST_ERROR.try_with(|e| match e.try_borrow() {
        Ok(v) => Some((f.take().expect("runs once"))(&v)),
        Err(_) => None,
    });
    match r {
        Ok(Some(r)) => r,
        _ => {
            let v = TEARDOWN_ERROR.lock().unwrap_or_else(|p| p.into_inner());
            (f.take().expect("runs once"))(&v)
        }
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic payload".to_string()
    }
}

/// Runs `f` with the boundary's rules: the last error is cleared first, set on failure
/// (`fallback` is returned then), and a panic is caught and reported as
/// [`ErrorCode::Panic`]. Returns the value and this call's code (not read back from the
/// thread's slot, which may be gone).
fn run<T>(fallback: T, f: impl FnOnce() -> Result<T, Failure>) -> (T, ErrorCode) {
    set_last_error(ErrorCode::None, String::new());
    let (code, message) = match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => return (v, ErrorCode::None),
        Ok(Err(failure)) => (failure.code, failure.message),
        Err(payload) => {
            (ErrorCode::Panic, format!("panic inside streamalloc: {}", panic_message(&*payload)))
        }
    };
    set_last_error(code, message);
    (fallback, code)
}

/// [`run`] for functions that return a value (`fallback` on failure).
fn boundary<T>(fallback: T, f: impl FnOnce() -> Result<T, Failure>) -> T {
    run(fallback, f).0
}

/// [`run`] for functions that return a status code.
pub(crate) fn status(f: impl FnOnce() -> Result<(), Failure>) -> c_int {
    run((), f).1 as c_int
}

fn last_error_code() -> ErrorCode {
    with_last_error(|e| e.0)
}

// ----- the global allocator -----

/// The process-wide allocator, the name of its backend, and the ABI's statistics.
pub(crate) struct Global {
    pub(crate) alloc: StreamAlloc<Arc<dyn Driver>>,
    /// Private pools (PyTorch's `MemPool`, CUDA graph pools), on the same driver.
    pub(crate) pools: crate::pools::PrivatePools<Arc<dyn Driver>>,
    backend: &'static CStr,
    counters: stats::DeviceCounters,
}

static GLOBAL: OnceLock<Result<Global, Failure>> = OnceLock::new();

/// Device count fixed by `streamalloc_init` before first use (0: ask the driver).
static INIT_DEVICE_COUNT: AtomicUsize = AtomicUsize::new(0);

fn env_u64(name: &str, default: u64) -> Result<u64, String> {
    match std::env::var(name) {
        Ok(v) => v.trim().parse().map_err(|_| format!("{name}={v:?} is not a number")),
        Err(_) => Ok(default),
    }
}

/// Builds the global allocator from the environment (see the module docs).
fn create_global() -> Result<Global, Failure> {
    warnings::install_logger();
    let no_backend = |message: String| Failure { code: ErrorCode::NoBackend, message };
    let conf = std::env::var(CONFIG_ENV).unwrap_or_default();
    let cache = parse_config(&conf)
        .map_err(|e| Failure { code: ErrorCode::Config, message: e.to_string() })?;
    let requested = INIT_DEVICE_COUNT.load(Ordering::Acquire);
    let (driver, backend): (Arc<dyn Driver>, &'static CStr) =
        if std::env::var("STREAMALLOC_BACKEND").is_ok_and(|b| b == "sim") {
            let default_devices = if requested > 0 { requested as u64 } else { 1 };
            let n = env_u64("STREAMALLOC_SIM_DEVICES", default_devices).map_err(no_backend)?;
            if n > MAX_DEVICES as u64 {
                return Err(no_backend(format!(
                    "STREAMALLOC_SIM_DEVICES={n} is more than {MAX_DEVICES} devices"
                )));
            }
            let capacity = env_u64("STREAMALLOC_SIM_CAPACITY", 1 << 30).map_err(no_backend)?;
            (Arc::new(SimDriver::with_devices(n as usize, capacity)), c"sim")
        } else {
            cuda_backend().map_err(no_backend)?
        };
    Ok(Global::new(driver, backend, requested, cache))
}

/// The CUDA driver found by [`crate::cuda::detect`], or why there is none.
#[cfg(feature = "cuda")]
fn cuda_backend() -> Result<(Arc<dyn Driver>, &'static CStr), String> {
    match crate::cuda::detect() {
        Ok(d) => Ok((Arc::new(d), c"cuda")),
        Err(e) => Err(format!(
            "streamalloc has no backend: no usable CUDA driver or device ({e}); \
             set STREAMALLOC_BACKEND=sim for the simulated device"
        )),
    }
}

/// Built without the `cuda` feature: the simulated device is the only backend.
#[cfg(not(feature = "cuda"))]
fn cuda_backend() -> Result<(Arc<dyn Driver>, &'static CStr), String> {
    Err("streamalloc has no backend: built without the `cuda` feature; set \
         STREAMALLOC_BACKEND=sim for the simulated device"
        .to_string())
}

impl Global {
    /// An allocator over `driver` for `requested` devices (0 or more than the driver
    /// has: every device the driver has, at most [`MAX_DEVICES`]), with `cache`.
    pub(crate) fn new(
        driver: Arc<dyn Driver>,
        backend: &'static CStr,
        requested: usize,
        cache: crate::CacheConfig,
    ) -> Self {
        let available = driver.device_count().unwrap_or(requested).min(MAX_DEVICES);
        let n = if requested == 0 || requested > available { available } else { requested };
        Global {
            pools: crate::pools::PrivatePools::new(driver.clone(), n),
            alloc: StreamAlloc::with_config(driver, n, cache),
            backend,
            counters: stats::DeviceCounters::new(n),
        }
    }
}

/// Installs `global` as the process's allocator if none exists yet (tests).
pub(crate) fn install_global(global: Global) -> bool {
    GLOBAL.set(Ok(global)).is_ok()
}

/// Makes a simulated device (`devices` of `capacity` bytes, checker on) the C ABI's
/// backend, for tests and fuzzing of the C functions from Rust. Returns it, or `None`
/// when the global allocator already exists with another backend. Idempotent.
pub fn install_sim_backend(devices: usize, capacity: u64) -> Option<Arc<crate::sim::SimDriver>> {
    static SIM: std::sync::OnceLock<Option<Arc<crate::sim::SimDriver>>> =
        std::sync::OnceLock::new();
    SIM.get_or_init(|| {
        let sim = Arc::new(crate::sim::SimDriver::with_devices(devices, capacity));
        let driver: Arc<dyn Driver> = sim.clone();
        let global = Global::new(driver, c"sim", 0, crate::CacheConfig::default());
        install_global(global).then_some(sim)
    })
    .clone()
}

pub(crate) fn global() -> Result<&'static Global, Failure> {
    GLOBAL.get_or_init(create_global).as_ref().map_err(Failure::clone)
}

pub(crate) fn alloc() -> Result<&'static StreamAlloc<Arc<dyn Driver>>, Failure> {
    Ok(&global()?.alloc)
}

/// A C `int` device index, checked: negative or too large is [`Error::InvalidDevice`].
fn device(a: &StreamAlloc<Arc<dyn Driver>>, device: c_int) -> Result<Device, Failure> {
    let n = a.device_count();
    match usize::try_from(device) {
        Ok(d) if d < n => Ok(d),
        _ => Err(Error::InvalidDevice { device: device as i64, device_count: n }.into()),
    }
}

fn stream(s: CudaStream) -> Stream {
    // Safety: the header's contract: a C caller passes null or a live `cudaStream_t`
    // (of the device it names) for as long as the allocator may use it, or, with the
    // simulated backend, a handle that backend made.
    unsafe { Stream::from_raw(s as usize) }
}

fn dptr(p: *mut c_void) -> DevicePtr {
    DevicePtr::from_raw(p as usize as u64)
}

/// Whether `STREAMALLOC_TRACE=1`: every hook call is printed to stderr (debugging).
fn tracing() -> bool {
    static TRACE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *TRACE.get_or_init(|| std::env::var("STREAMALLOC_TRACE").is_ok_and(|v| v == "1"))
}

/// What the allocator knows of `ptr`, for traces.
fn describe(a: &StreamAlloc<Arc<dyn Driver>>, ptr: DevicePtr) -> String {
    match a.snapshot().into_iter().find(|b| b.ptr == ptr) {
        Some(b) => format!(
            "size {} creation {:?} captured {} deferred {} recorded {:?}",
            b.size, b.creation_stream.stream, b.captured, b.free_deferred, b.recorded_streams
        ),
        None => "untracked".to_string(),
    }
}

// ----- PyTorch's CUDAPluggableAllocator hooks -----

/// Allocates `size` bytes on `device`, ordered on `stream`
/// (`CUDAPluggableAllocator`'s alloc). NULL on failure (last error set) and for size 0
/// (no error).
///
/// # Safety
/// `stream` must be a CUDA stream of `device` that is alive (or null, the legacy default
/// stream): the handle goes to the driver as is.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn streamalloc_alloc(
    size: usize,
    device: c_int,
    stream: CudaStream,
) -> *mut c_void {
    boundary(std::ptr::null_mut(), || {
        if size == 0 {
            // S3: size 0 is null with no driver call and no error, whatever the device
            // (the seed returns before it looks at the device).
            return Ok(std::ptr::null_mut());
        }
        let g = global()?;
        let a = &g.alloc;
        let d = self::device(a, device)?;
        if g.pools.routing()
            && let Some(p) = pools::routed_alloc(g, d, size, self::stream(stream))?
        {
            return Ok(p);
        }
        let r = a.malloc(d, size, self::stream(stream));
        if tracing() {
            let cap = a.capture_underway();
            eprintln!(
                "streamalloc trace: alloc {size} dev {d} stream {stream:?} capture {cap}: {r:?}"
            );
        }
        match r {
            Ok(p) => {
                g.counters.get(d).on_alloc(size as u64);
                Ok(p.as_raw() as usize as *mut c_void)
            }
            Err(e) => {
                if matches!(e, Error::OutOfMemory(_) | Error::TooLarge { .. }) {
                    g.counters.get(d).on_oom();
                }
                Err(e.into())
            }
        }
    })
}

/// Frees `ptr` (`CUDAPluggableAllocator`'s free). `size`, `device` and `stream` are
/// what PyTorch passes (the allocation's); the allocator uses its own records. Null is a
/// no-op. Errors (unknown pointer, double free) set the last error.
#[unsafe(no_mangle)]
pub extern "C" fn streamalloc_free(
    ptr: *mut c_void,
    _size: usize,
    _device: c_int,
    _stream: CudaStream,
) {
    boundary((), || {
        if ptr.is_null() {
            return Ok(());
        }
        let g = global()?;
        let a = &g.alloc;
        if g.pools.routing() {
            pools::sync_core_capture(g);
        }
        let what = if tracing() { describe(a, dptr(ptr)) } else { String::new() };
        let r: Result<(), Failure> = match a.device_of(dptr(ptr)) {
            Ok((d, size)) => a.free(dptr(ptr)).map_err(Failure::from).map(|()| {
                g.counters.get(d).on_free(size);
            }),
            // Not the core's: a private pool's block, or the core's error.
            Err(e) => pools::pool_free(g, dptr(ptr)).unwrap_or(Err(e.into())),
        };
        if tracing() {
            let cap = a.capture_underway();
            eprintln!("streamalloc trace: free {ptr:?} ({what}) capture {cap}: {r:?}");
        }
        if let Err(e) = &r {
            log::warn!("streamalloc_free({ptr:?}): {}", e.message);
        }
        r
    })
}

/// Sets the device count before first use (`CUDAPluggableAllocator`'s init hook).
/// After the allocator exists this only checks the count. A negative count or one
/// above [`MAX_DEVICES`] is an error.
#[unsafe(no_mangle)]
pub extern "C" fn streamalloc_init(device_count: c_int) {
    boundary((), || {
        let n =
            usize::try_from(device_count).ok().filter(|&n| n <= MAX_DEVICES).ok_or_else(|| {
                Failure::invalid(format!(
                    "invalid device count {device_count} (0 to {MAX_DEVICES})"
                ))
            })?;
        if GLOBAL.get().is_none() {
            INIT_DEVICE_COUNT.store(n, Ordering::Release);
        }
        Ok(())
    })
}

/// Empties the cache (`CUDAPluggableAllocator`'s reset hook, called by
/// `torch.cuda.empty_cache()`): [`streamalloc_empty_cache`] without a status.
#[unsafe(no_mangle)]
pub extern "C" fn streamalloc_reset() {
    streamalloc_empty_cache();
}

/// Limits the allocator's bytes on `device` to `fraction` of its memory (S7).
#[unsafe(no_mangle)]
pub extern "C" fn streamalloc_set_memory_fraction(fraction: c_double, device: c_int) {
    boundary((), || {
        let a = alloc()?;
        let d = self::device(a, device)?;
        Ok(a.set_memory_fraction(fraction, d)?)
    })
}

/// The base allocation of `ptr` (S10): returns `ptr` and writes its size to `*size`
/// (when `size` is not null). Unknown pointer: NULL and the last error.
///
/// # Safety
/// `size` is null or valid for one `size_t` write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn streamalloc_base_alloc(ptr: *mut c_void, size: *mut usize) -> *mut c_void {
    boundary(std::ptr::null_mut(), || {
        let g = global()?;
        let (base, bytes) = match g.alloc.base_allocation(dptr(ptr)) {
            Ok(v) => v,
            Err(e) => match g.pools.owner_of(dptr(ptr)) {
                // A live private-pool block: its own allocation (base pointers only).
                Some((_, _, size)) if size > 0 => (dptr(ptr), size as u64),
                _ => return Err(e.into()),
            },
        };
        if !size.is_null() {
            // Safety: the caller passes null or a pointer valid for one size_t write.
            unsafe { size.write(bytes as usize) };
        }
        Ok(base.as_raw() as usize as *mut c_void)
    })
}

/// Records that `ptr` is used on `stream` (S6) (`CUDAPluggableAllocator`'s
/// record-stream hook). The hook gets no device: the stream is taken to belong to the
/// pointer's device (one map lookup). Use [`streamalloc_record_stream_on`] when the
/// stream's device is known.
///
/// # Safety
/// `stream` must be a live CUDA stream (or null): it is checked through the driver,
/// which must be given a real handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn streamalloc_record_stream(ptr: *mut c_void, stream: CudaStream) {
    boundary((), || {
        if ptr.is_null() {
            return Ok(());
        }
        let g = global()?;
        let a = &g.alloc;
        match a.device_of(dptr(ptr)) {
            Ok((d, _)) => {
                Ok(a.record_stream(dptr(ptr), UsageStream::new(self::stream(stream), d))?)
            }
            Err(e) => match g.pools.owner_of(dptr(ptr)) {
                Some((d, _, _)) => Ok(g
                    .pools
                    .record_stream(dptr(ptr), UsageStream::new(self::stream(stream), d))?),
                None => Err(e.into()),
            },
        }
    })
}

/// Records that `ptr` is used on `stream` of device `stream_device` (S6, S24).
/// Returns the status code.
///
/// # Safety
/// `stream` must be a live CUDA stream (or null): it is checked through the driver,
/// which must be given a real handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn streamalloc_record_stream_on(
    ptr: *mut c_void,
    stream: CudaStream,
    stream_device: c_int,
) -> c_int {
    status(|| {
        let g = global()?;
        let a = &g.alloc;
        let d = self::device(a, stream_device)?;
        let us = UsageStream::new(self::stream(stream), d);
        let r: Result<(), Failure> = match a.record_stream(dptr(ptr), us) {
            // Not the core's: a private pool's block, or the core's error.
            Err(_) if pools::is_pool_block(g, dptr(ptr)) => {
                g.pools.record_stream(dptr(ptr), us).map_err(Failure::from)
            }
            r => r.map_err(Failure::from),
        };
        if tracing() {
            eprintln!("streamalloc trace: record_stream {ptr:?} stream {stream:?} dev {d}: {r:?}");
        }
        r
    })
}

// ----- our own -----

/// Fills `*out` with `device`'s statistics (S11). Returns the status code.
///
/// # Safety
/// `out` is null (an error) or valid for one `streamalloc_stats` write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn streamalloc_device_stats(
    device: c_int,
    out: *mut StreamallocStats,
) -> c_int {
    status(|| {
        if out.is_null() {
            return Err(Failure::invalid("streamalloc_device_stats: out is NULL"));
        }
        let a = alloc()?;
        let stats = a.device_stats(self::device(a, device)?)?;
        // Safety: out is not null, and the caller passes a pointer valid for one write.
        unsafe { out.write(stats.into()) };
        Ok(())
    })
}

/// Resets `device`'s high watermarks (S12): the pool's, and the ABI's exact peaks of
/// allocated bytes and blocks (to their current values). Returns the status code.
#[unsafe(no_mangle)]
pub extern "C" fn streamalloc_reset_peak_stats(device: c_int) -> c_int {
    status(|| {
        let g = global()?;
        let d = self::device(&g.alloc, device)?;
        g.counters.get(d).reset_peaks();
        Ok(g.alloc.reset_peak_stats(d)?)
    })
}

/// Synchronizes each used device and returns its pool's unused memory (S8).
/// Returns the status code.
#[unsafe(no_mangle)]
pub extern "C" fn streamalloc_empty_cache() -> c_int {
    status(|| {
        let g = global()?;
        g.alloc.empty_cache()?;
        Ok(g.pools.empty_cache()?)
    })
}

/// A capture begins on `device` (S14): one at a time. Returns the status code.
#[unsafe(no_mangle)]
pub extern "C" fn streamalloc_begin_capture(device: c_int) -> c_int {
    status(|| {
        let a = alloc()?;
        let r = a.begin_capture(self::device(a, device)?);
        if tracing() {
            eprintln!("streamalloc trace: begin_capture dev {device}: {r:?}");
        }
        Ok(r?)
    })
}

/// A capture begins on `device` on `capture_stream` (S14): as
/// [`streamalloc_begin_capture`], and every stream a free is issued on during the
/// capture is joined back into `capture_stream` at once, so the capture may end before
/// [`streamalloc_end_capture`] is called (PyTorch's order). Returns the status code.
///
/// # Safety
/// `capture_stream` must be a live CUDA stream of `device` (or null): frees issued during
/// the capture are joined into it through the driver.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn streamalloc_begin_capture_on(
    device: c_int,
    capture_stream: CudaStream,
) -> c_int {
    status(|| {
        let a = alloc()?;
        let r = a.begin_capture_on(self::device(a, device)?, stream(capture_stream));
        if tracing() {
            eprintln!(
                "streamalloc trace: begin_capture_on dev {device} stream {capture_stream:?}: {r:?}"
            );
        }
        Ok(r?)
    })
}

/// The capture on `device` is about to end (S15): `capture_stream` waits on every
/// stream a free was issued on during the capture. Call before `cudaStreamEndCapture`.
/// Returns the status code.
///
/// # Safety
/// `capture_stream` must be a live CUDA stream of `device` (or null): the capture's free
/// streams are joined into it through the driver.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn streamalloc_end_capture(
    device: c_int,
    capture_stream: CudaStream,
) -> c_int {
    status(|| {
        let a = alloc()?;
        let r = a.end_capture(self::device(a, device)?, stream(capture_stream));
        if tracing() {
            eprintln!(
                "streamalloc trace: end_capture dev {device} stream {capture_stream:?}: {r:?}"
            );
        }
        Ok(r?)
    })
}

/// The largest block that can be allocated on `device` now (S9); 0 on error.
#[unsafe(no_mangle)]
pub extern "C" fn streamalloc_cache_info(device: c_int) -> usize {
    boundary(0, || {
        let a = alloc()?;
        let bytes = a.cache_info(self::device(a, device)?, Stream::NULL)?;
        Ok(usize::try_from(bytes).unwrap_or(usize::MAX))
    })
}

/// Copies the calling thread's last error message into `buf` (at most `len - 1` bytes
/// and a NUL; nothing when `buf` is null or `len` is 0). Returns its code.
///
/// # Safety
/// `buf` is null or valid for `len` byte writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn streamalloc_last_error(buf: *mut c_char, len: usize) -> c_int {
    let r = catch_unwind(|| {
        with_last_error(|e| {
            // Safety: the caller passes null or a buffer valid for len bytes.
            unsafe { write_c_string(&e.1, buf, len) };
            e.0 as c_int
        })
    });
    r.unwrap_or(ErrorCode::Panic as c_int)
}

/// Copies `s` into `buf` as a C string: at most `len - 1` bytes and a NUL; nothing when
/// `buf` is null or `len` is 0.
///
/// # Safety
/// `buf` is null or valid for `len` byte writes.
unsafe fn write_c_string(s: &str, buf: *mut c_char, len: usize) {
    if buf.is_null() || len == 0 {
        return;
    }
    let bytes = s.as_bytes();
    let n = bytes.len().min(len - 1);
    // Safety: buf is valid for len bytes (caller), n + 1 <= len, and a Rust string
    // never overlaps the caller's buffer.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf.cast::<u8>(), n);
        buf.add(n).write(0);
    }
}

/// The calling thread's last error code (0: the last call succeeded).
#[unsafe(no_mangle)]
pub extern "C" fn streamalloc_last_error_code() -> c_int {
    catch_unwind(|| last_error_code() as c_int).unwrap_or(ErrorCode::Panic as c_int)
}

/// The backend's name: `"cuda"`, `"sim"`, or `"none"` (no backend; the last error says
/// why). Creates the allocator if needed; does not change the last error unless the
/// backend could not be created.
#[unsafe(no_mangle)]
pub extern "C" fn streamalloc_backend() -> *const c_char {
    let name = catch_unwind(|| match global() {
        Ok(g) => g.backend,
        Err(f) => {
            set_last_error(f.code, f.message);
            c"none"
        }
    });
    name.unwrap_or(c"none").as_ptr()
}
