//! A simulated CUDA device that carries the tests on machines without a GPU, and checks
//! the stream ordering of everything the allocator does ([`SimDriver`]); plus a driver
//! that does no device work at all, for measuring bookkeeping alone ([`NullDriver`]).
//!
//! # The model
//!
//! **Devices and pools.** Each device has a capacity and one default pool. The pool
//! *reserves* memory from the device (`mem_get_info` reports `free = capacity -
//! reserved`) and hands blocks out of it. Sizes are rounded up to 512 bytes and every
//! byte count the pool reports (`ReservedMem*`, `UsedMem*`) is in rounded bytes, as a
//! real pool's granularity makes them. Device `d` hands out addresses in
//! `[(d + 1) << 44, (d + 2) << 44)`, so an address names its device; fresh addresses are
//! never handed out twice. Each fresh block grows the reservation by exactly its
//! rounded size (one segment per block; there is no coalescing of freed neighbours).
//!
//! **Streams and vector clocks.** Every stream (created ones, and the null stream of
//! each device, made on first use) has a vector clock: one component per stream. Every
//! operation enqueued on a stream (malloc, free, kernel launch, copy, event record,
//! event wait) advances the stream's own component by one; that number is the
//! operation's *tick*. Recording an event snapshots the stream's clock; waiting on it
//! joins (component-wise maximum) the snapshot into the waiting stream's clock. Tick `t`
//! of stream `S` *happens before* the next operation of stream `N` when
//! `N.clock[S] >= t`. Created streams are non-blocking: the legacy null stream does not
//! synchronize implicitly with them.
//!
//! **Completion.** Nothing completes on its own: work completes when the host
//! synchronizes. The host keeps one vector clock of what it has seen complete;
//! `device_synchronize(d)` joins the clocks of all streams of `d` into it
//! ([`SimDriver::synchronize_stream`] one stream, [`SimDriver::synchronize_all`] every
//! stream, a synchronous `memcpy` the null stream). Since a stream's clock includes
//! everything it waited for, synchronizing a stream also completes the work it depends
//! on. `event_query` is true once the event's tick has completed. Work captured into a
//! graph never runs, so synchronizing a capturing stream completes it only up to where
//! it entered the capture.
//!
//! **Reuse rules** (the real pool's, by attribute). A block freed on stream `F` at tick
//! `t` goes to the pool's free list. `malloc_async` on stream `N` takes the
//! best-fitting freed block (splitting a larger one) that it may reuse:
//! - freed on `N` itself (stream order makes it safe at once);
//! - `ReuseFollowEventDependencies`: the free happens before `N` (`N.clock[F] >= t`);
//! - `ReuseAllowOpportunistic`: the free has completed as seen by the host.
//!
//! Otherwise the pool grows if the device has room. If it has not and
//! `ReuseAllowInternalDependencies` is on, the driver reuses any large-enough freed
//! block and inserts the dependency itself (`N` joins the free's clock); else the call
//! fails with `CUDA_ERROR_OUT_OF_MEMORY` (a real driver might wait instead). Blocks
//! allocated on a capturing stream are graph allocations: always fresh addresses,
//! counted as used and reserved; freeing one gives its bytes back to the device.
//! `pool_trim_to(keep)` releases freed blocks whose free has completed, largest first,
//! until `reserved <= keep`; `device_synchronize` trims to the release threshold unless
//! it is `u64::MAX`. As in CUDA, a pool starts with threshold 0 and the three reuse
//! flags on; `init_device` sets the threshold to `u64::MAX`.
//!
//! **Synchronous memory.** [`Driver::malloc_sync`] (`cuMemAlloc`) takes fresh addresses
//! from the device outside the pool (counted by [`SimDriver::sync_bytes`], and off the
//! device's free memory); it is allowed during a capture and is not a graph allocation.
//! [`Driver::free_sync`] (`cuMemFree`) completes the device's work first (as the real call
//! synchronizes) and is refused, with a report, while a stream of the device is being
//! captured; `free_async` of such a block is reported too.
//!
//! **Capture.** [`SimDriver::begin_capture`] puts a stream in capture mode. A stream
//! that waits on an event recorded on a capturing stream is forked into that capture.
//! [`SimDriver::end_capture`] requires every forked stream to be joined back: the origin
//! stream's clock must cover the forked stream's last operation during the capture.
//!
//! **The checker** (on by default) records a human-readable report (and logs it with
//! `log::error!`) for each of these, without changing what the call does unless said:
//! - a free not ordered after every declared use of the block (each use, on stream `S`
//!   at tick `u`, must happen before the free or have completed on the host); the malloc
//!   counts as a use on the allocating stream, kernels ([`SimDriver::launch`]) and
//!   copies declare the others;
//! - memory handed out on a stream before the previous free is ordered before it or
//!   complete: checked on the pool's own reuse, and on
//!   [`Driver::note_reuse`] of a block the allocator cached with
//!   [`Driver::note_cached`] (which is checked like a free, and marks the block idle
//!   as of that stream's current tick);
//! - a free on a capturing stream of a block not allocated in that capture (the call
//!   fails with `CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED`, frees nothing, and invalidates
//!   the capture, as CUDA does);
//! - a capture ending with a forked stream not joined back
//!   (`CUDA_ERROR_STREAM_CAPTURE_UNJOINED`);
//! - a free of an unknown or already-freed pointer (`CUDA_ERROR_INVALID_VALUE`);
//! - a use of memory that is not live, is idle in the allocator's cache, lies past the
//!   end of its block, or belongs to another device without pool access;
//! - a stream used with a device it does not belong to (`CUDA_ERROR_INVALID_HANDLE`);
//!   ([`Driver::check_stream`] answers the same error without a report: it is a
//!   question, not a use);
//! - a device-to-device copy between devices without pool access
//!   (`CUDA_ERROR_INVALID_VALUE`).
//!
//! **Faults.** Any driver operation ([`SimOp`]) can be made to fail on its n-th call
//! from now or on every call, with no side effects; `check_last_error` can be given a
//! sticky error to report once. Every call is counted ([`SimDriver::call_count`]).
//!
//! `free_async`'s size argument is not checked (`cuMemFreeAsync` has none); the pool
//! knows each block's size.
//!
//! No method panics on bad input (bad device: `CUDA_ERROR_INVALID_DEVICE`; unknown
//! stream or event: `CUDA_ERROR_INVALID_HANDLE`), except [`SimDriver::assert_clean`],
//! whose purpose is to panic.

mod clock;
mod null;
mod state;
#[cfg(test)]
mod tests;

pub use null::NullDriver;

use crate::driver::{Driver, DriverResult};
use crate::error::{
    CUDA_ERROR_INVALID_HANDLE, CUDA_ERROR_INVALID_VALUE, CUDA_ERROR_NO_DEVICE,
    CUDA_ERROR_NOT_FOUND, CUDA_ERROR_NOT_INITIALIZED, CUDA_ERROR_NOT_READY,
    CUDA_ERROR_NOT_SUPPORTED, CUDA_ERROR_OUT_OF_MEMORY, CUDA_ERROR_STREAM_CAPTURE_INVALIDATED,
    CUDA_ERROR_STREAM_CAPTURE_UNJOINED, CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, CUDA_ERROR_UNKNOWN,
};
use crate::types::{
    CaptureStatus, Device, DevicePtr, Event, MemInfo, PoolAttribute, Stream, UsageStream,
};
use state::State;
use std::sync::{Mutex, MutexGuard};

pub use crate::error::CUDA_ERROR_INVALID_DEVICE;
/// CUDA's `CUDA_ERROR_ILLEGAL_STATE` (for example a capture begun twice on a stream).
pub const CUDA_ERROR_ILLEGAL_STATE: i32 = 401;
/// CUDA's `CUDA_ERROR_STREAM_CAPTURE_UNMATCHED` (capture ended on another stream).
pub const CUDA_ERROR_STREAM_CAPTURE_UNMATCHED: i32 = 903;
/// CUDA's `CUDA_ERROR_STREAM_CAPTURE_ISOLATION` (a dependency across two captures).
pub const CUDA_ERROR_STREAM_CAPTURE_ISOLATION: i32 = 905;

/// The name CUDA gives a result code (`CUDA_ERROR_<code>` for codes not listed).
pub fn error_name(code: i32) -> String {
    let name = match code {
        0 => "CUDA_SUCCESS",
        CUDA_ERROR_INVALID_VALUE => "CUDA_ERROR_INVALID_VALUE",
        CUDA_ERROR_OUT_OF_MEMORY => "CUDA_ERROR_OUT_OF_MEMORY",
        CUDA_ERROR_NOT_INITIALIZED => "CUDA_ERROR_NOT_INITIALIZED",
        CUDA_ERROR_NO_DEVICE => "CUDA_ERROR_NO_DEVICE",
        CUDA_ERROR_INVALID_DEVICE => "CUDA_ERROR_INVALID_DEVICE",
        CUDA_ERROR_INVALID_HANDLE => "CUDA_ERROR_INVALID_HANDLE",
        CUDA_ERROR_ILLEGAL_STATE => "CUDA_ERROR_ILLEGAL_STATE",
        CUDA_ERROR_NOT_FOUND => "CUDA_ERROR_NOT_FOUND",
        CUDA_ERROR_NOT_READY => "CUDA_ERROR_NOT_READY",
        CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED => "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED",
        CUDA_ERROR_STREAM_CAPTURE_INVALIDATED => "CUDA_ERROR_STREAM_CAPTURE_INVALIDATED",
        CUDA_ERROR_STREAM_CAPTURE_UNMATCHED => "CUDA_ERROR_STREAM_CAPTURE_UNMATCHED",
        CUDA_ERROR_STREAM_CAPTURE_UNJOINED => "CUDA_ERROR_STREAM_CAPTURE_UNJOINED",
        CUDA_ERROR_STREAM_CAPTURE_ISOLATION => "CUDA_ERROR_STREAM_CAPTURE_ISOLATION",
        CUDA_ERROR_NOT_SUPPORTED => "CUDA_ERROR_NOT_SUPPORTED",
        CUDA_ERROR_UNKNOWN => "CUDA_ERROR_UNKNOWN",
        other => return format!("CUDA_ERROR_{other}"),
    };
    name.to_string()
}

/// One variant per [`Driver`] method, for fault injection and call counts.
#[derive(Copy, Clone, PartialEq, Eq, Hash, Debug)]
#[non_exhaustive]
pub enum SimOp {
    /// [`Driver::malloc_async`].
    MallocAsync,
    /// [`Driver::free_async`].
    FreeAsync,
    /// [`Driver::record_event`].
    RecordEvent,
    /// [`Driver::stream_wait_event`].
    StreamWaitEvent,
    /// [`Driver::destroy_event`].
    DestroyEvent,
    /// [`Driver::mem_get_info`].
    MemGetInfo,
    /// [`Driver::pool_attribute`].
    PoolAttribute,
    /// [`Driver::set_pool_attribute`].
    SetPoolAttribute,
    /// [`Driver::pool_trim_to`].
    PoolTrimTo,
    /// [`Driver::device_synchronize`].
    DeviceSynchronize,
    /// [`Driver::create_stream`].
    CreateStream,
    /// [`Driver::init_device`].
    InitDevice,
    /// [`Driver::check_last_error`].
    CheckLastError,
    /// [`Driver::event_query`].
    EventQuery,
    /// [`Driver::capture_status`].
    CaptureStatus,
    /// [`Driver::pool_set_access`].
    PoolSetAccess,
    /// [`Driver::memcpy_async`].
    MemcpyAsync,
    /// [`Driver::memcpy`].
    Memcpy,
    /// [`Driver::malloc_sync`].
    MallocSync,
    /// [`Driver::free_sync`].
    FreeSync,
}

impl SimOp {
    /// The CUDA call the operation stands for (the `op` of its errors).
    pub fn cuda_name(self) -> &'static str {
        match self {
            SimOp::MallocAsync => "cuMemAllocAsync",
            SimOp::FreeAsync => "cuMemFreeAsync",
            SimOp::RecordEvent => "cuEventRecord",
            SimOp::StreamWaitEvent => "cuStreamWaitEvent",
            SimOp::DestroyEvent => "cuEventDestroy",
            SimOp::MemGetInfo => "cuMemGetInfo",
            SimOp::PoolAttribute => "cuMemPoolGetAttribute",
            SimOp::SetPoolAttribute => "cuMemPoolSetAttribute",
            SimOp::PoolTrimTo => "cuMemPoolTrimTo",
            SimOp::DeviceSynchronize => "cuCtxSynchronize",
            SimOp::CreateStream => "cuStreamCreate",
            SimOp::InitDevice => "cuDeviceGetDefaultMemPool",
            SimOp::CheckLastError => "cudaGetLastError",
            SimOp::EventQuery => "cuEventQuery",
            SimOp::CaptureStatus => "cuStreamGetCaptureInfo",
            SimOp::PoolSetAccess => "cuMemPoolSetAccess",
            SimOp::MemcpyAsync => "cuMemcpyAsync",
            SimOp::Memcpy => "cuMemcpyDtoD",
            SimOp::MallocSync => "cuMemAlloc",
            SimOp::FreeSync => "cuMemFree",
        }
    }
}

/// How the last asynchronous copy was made (S19).
#[derive(Copy, Clone, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum CopyKind {
    /// `cudaMemcpyAsync(.., cudaMemcpyDeviceToDevice, ..)`.
    DeviceToDevice,
    /// `cudaMemcpyPeerAsync`.
    Peer,
}

/// What ending a capture produced. Graphs are not replayed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimGraph {
    /// The capture's id (from [`SimDriver::begin_capture`]).
    pub capture_id: u64,
    /// Operations enqueued on the capture's streams while it was underway.
    pub ops: u64,
    /// Graph allocations made during the capture.
    pub allocations: u64,
    /// Streams that took part (the origin and every forked stream).
    pub streams: usize,
}

/// How to build a [`SimDriver`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SimConfig {
    /// One entry per device: its capacity in bytes.
    pub devices: Vec<u64>,
    /// Whether the ordering checker records reports.
    pub checker: bool,
}

impl Default for SimConfig {
    /// One device of 1 GiB, checker on.
    fn default() -> Self {
        SimConfig { devices: vec![1 << 30], checker: true }
    }
}

/// The simulated CUDA driver: see the [module documentation](self) for the model.
///
/// All state sits behind one mutex: this is a test device, not a fast path.
///
/// ```
/// use std::sync::Arc;
/// use streamalloc::{sim::SimDriver, StreamAlloc, StreamOrderedAllocator};
/// let sim = Arc::new(SimDriver::with_devices(1, 1 << 30));
/// let alloc = StreamAlloc::new(sim.clone())?;
/// let (a, b) = (sim.new_usage_stream(0)?, sim.new_usage_stream(0)?);
/// let p = alloc.malloc(0, 1 << 20, a.stream)?;
/// sim.launch(b, &[p])?; // used on another stream, not recorded...
/// alloc.free(p)?;
/// assert!(!sim.take_reports().is_empty()); // ...the checker reports the racing free
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct SimDriver {
    state: Mutex<State>,
}

impl std::fmt::Debug for SimDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.lock();
        f.debug_struct("SimDriver")
            .field("devices", &st.device_count())
            .field("reports", &st.reports().len())
            .finish_non_exhaustive()
    }
}

impl SimDriver {
    /// A simulator with the given devices.
    pub fn new(config: SimConfig) -> Self {
        SimDriver { state: Mutex::new(State::new(config)) }
    }

    /// `n` devices of `capacity` bytes each, checker on.
    pub fn with_devices(n: usize, capacity: u64) -> Self {
        Self::new(SimConfig { devices: vec![capacity; n], checker: true })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking test thread must not take the simulator down with it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    // ----- streams, work and completion -----

    /// Creates a stream on `device` without counting a driver call (a user's stream).
    pub fn new_stream(&self, device: Device) -> DriverResult<Stream> {
        self.lock().new_stream(device)
    }

    /// [`Self::new_stream`], paired with its device.
    pub fn new_usage_stream(&self, device: Device) -> DriverResult<UsageStream> {
        Ok(UsageStream::new(self.new_stream(device)?, device))
    }

    /// Enqueues a kernel on `stream` that uses the blocks containing `ptrs` (null
    /// pointers are skipped). Reports a use of memory that is not live, is cached, or
    /// belongs to a device `stream` has no pool access to.
    pub fn launch(&self, stream: UsageStream, ptrs: &[DevicePtr]) -> DriverResult<()> {
        self.lock().launch(stream, ptrs)
    }

    /// Makes `waiter` wait for all work so far on `on` (record, wait, destroy).
    pub fn wait(&self, waiter: UsageStream, on: UsageStream) -> DriverResult<()> {
        self.sync_streams(on, waiter)
    }

    /// The host waits for `stream`: all its work (and all it depends on) completes.
    pub fn synchronize_stream(&self, stream: UsageStream) -> DriverResult<()> {
        self.lock().synchronize_stream(stream)
    }

    /// The host waits for every stream of every device (no trimming).
    pub fn synchronize_all(&self) {
        self.lock().synchronize_all()
    }

    /// Whether all work enqueued so far on `first` happens before the next operation on
    /// `then`, or has completed on the host (true when `first` has done nothing).
    pub fn happens_before(&self, first: UsageStream, then: UsageStream) -> bool {
        self.lock().happens_before(first, then)
    }

    /// How many operations have been enqueued on `stream`.
    pub fn ops_on(&self, stream: UsageStream) -> u64 {
        self.lock().ops_on(stream)
    }

    /// Destroys a stream made by [`Self::new_stream`] or [`Driver::create_stream`]
    /// (`cuStreamDestroy`): its handle is unknown from now on, so every later use of it
    /// fails with `CUDA_ERROR_INVALID_HANDLE`. Work already enqueued on it is kept (and
    /// completes when the host synchronizes everything). The null stream cannot be
    /// destroyed (`CUDA_ERROR_INVALID_HANDLE`).
    pub fn destroy_stream(&self, stream: UsageStream) -> DriverResult<()> {
        self.lock().destroy_stream(stream)
    }

    /// The device a created stream belongs to (`None` for null, unknown or destroyed
    /// handles).
    pub fn stream_device(&self, stream: Stream) -> Option<Device> {
        self.lock().stream_device(stream)
    }

    // ----- capture -----

    /// Begins capturing `stream` (`CUDA_ERROR_ILLEGAL_STATE` if it already captures);
    /// returns the capture's id.
    pub fn begin_capture(&self, stream: UsageStream) -> DriverResult<u64> {
        self.lock().begin_capture(stream)
    }

    /// Ends the capture begun on `stream`. All its streams leave capture mode, then:
    /// `CUDA_ERROR_STREAM_CAPTURE_UNJOINED` (and a report) if a forked stream was not
    /// joined back, `CUDA_ERROR_STREAM_CAPTURE_INVALIDATED` if an operation invalidated
    /// it. `CUDA_ERROR_ILLEGAL_STATE` if `stream` is not capturing,
    /// `CUDA_ERROR_STREAM_CAPTURE_UNMATCHED` if it is a forked stream, not the origin.
    pub fn end_capture(&self, stream: UsageStream) -> DriverResult<SimGraph> {
        self.lock().end_capture(stream)
    }

    /// Whether `stream` is part of a capture now.
    pub fn is_capturing(&self, stream: UsageStream) -> bool {
        self.lock().is_capturing(stream)
    }

    // ----- the checker -----

    /// The checker's reports so far.
    pub fn reports(&self) -> Vec<String> {
        self.lock().reports()
    }

    /// The checker's reports so far, clearing them.
    pub fn take_reports(&self) -> Vec<String> {
        self.lock().take_reports()
    }

    /// Panics listing the checker's reports, if there are any.
    #[track_caller]
    pub fn assert_clean(&self) {
        let reports = self.reports();
        if !reports.is_empty() {
            panic!("sim checker found {} problem(s):\n  {}", reports.len(), reports.join("\n  "));
        }
    }

    // ----- faults -----

    /// Makes the `n`-th call of `op` from now (1-based; 0 counts as 1) fail with
    /// `code`, with no side effects.
    pub fn fail_nth(&self, op: SimOp, n: u64, code: i32) {
        self.lock().fail_nth(op, n, code)
    }

    /// Makes every call of `op` fail with `code` until [`Self::clear_faults`].
    pub fn fail_always(&self, op: SimOp, code: i32) {
        self.lock().fail_always(op, code)
    }

    /// Removes every injected fault.
    pub fn clear_faults(&self) {
        self.lock().clear_faults()
    }

    /// The next `check_last_error` on `device` reports `code`, once (S23).
    pub fn set_sticky_error(&self, device: Device, code: i32) {
        self.lock().set_sticky_error(device, code)
    }

    /// How many times `op` was called (failed calls included).
    pub fn call_count(&self, op: SimOp) -> u64 {
        self.lock().call_count(op)
    }

    // ----- inspection -----

    /// Whether `init_device` has run on `device`.
    pub fn device_initialized(&self, device: Device) -> bool {
        self.lock().device_initialized(device)
    }

    /// Whether a driver call has touched `device` (which would create its context on
    /// real hardware). `device_count` and `capture_status` do not count.
    pub fn context_created(&self, device: Device) -> bool {
        self.lock().context_created(device)
    }

    /// Bytes of `device` held by synchronous allocations ([`Driver::malloc_sync`]), in
    /// rounded bytes (0 if there is no such device).
    pub fn sync_bytes(&self, device: Device) -> u64 {
        self.lock().sync_bytes(device)
    }

    /// The capacity of `device` (0 if there is no such device).
    pub fn capacity(&self, device: Device) -> u64 {
        self.lock().capacity(device)
    }

    /// Whether `owner`'s pool grants access to `accessor` (S18).
    pub fn peer_access(&self, owner: Device, accessor: Device) -> bool {
        self.lock().peer_access(owner, accessor)
    }

    /// The stream of the last successful `malloc_async`.
    pub fn last_malloc_stream(&self) -> Option<UsageStream> {
        self.lock().last_malloc_stream()
    }

    /// The stream of the last successful `free_async` (S5: which stream a free used).
    pub fn last_free_stream(&self) -> Option<UsageStream> {
        self.lock().last_free_stream()
    }

    /// Driver calls so far, of every kind.
    pub fn total_calls(&self) -> u64 {
        self.lock().total_calls()
    }

    /// Reads a pool attribute as a test would, without a driver call or a context.
    pub fn pool_attribute_raw(&self, device: Device, attr: PoolAttribute) -> u64 {
        self.lock().pool_attribute_raw(device, attr)
    }

    /// Sets a pool's threshold or reuse flag as another library in the process might,
    /// without counting a driver call.
    pub fn set_pool_attribute_raw(&self, device: Device, attr: PoolAttribute, value: u64) {
        self.lock().set_pool_attribute_raw(device, attr, value)
    }

    /// The kind of the last successful `memcpy_async` (S19).
    pub fn last_copy_kind(&self) -> Option<CopyKind> {
        self.lock().last_copy_kind()
    }

    /// Live blocks in `device`'s pool (graph allocations and allocator-cached blocks
    /// included).
    pub fn live_blocks(&self, device: Device) -> usize {
        self.lock().live_blocks(device)
    }

    /// Freed blocks the pool keeps for reuse on `device`.
    pub fn free_blocks(&self, device: Device) -> usize {
        self.lock().free_blocks(device)
    }

    /// Bytes reserved by `device`'s pool (live and freed-in-pool, rounded).
    pub fn pool_reserved(&self, device: Device) -> u64 {
        self.lock().pool_reserved(device)
    }

    /// Bytes handed out by `device`'s pool (live blocks, rounded).
    pub fn pool_used(&self, device: Device) -> u64 {
        self.lock().pool_used(device)
    }

    /// Whether `ptr` lies in a live block.
    pub fn is_live(&self, ptr: DevicePtr) -> bool {
        self.lock().is_live(ptr)
    }

    /// The requested size of the live block starting at `ptr`.
    pub fn block_size(&self, ptr: DevicePtr) -> Option<u64> {
        self.lock().block_size(ptr)
    }

    /// Whether `ptr` lies in a block noted as idle in the allocator's cache.
    pub fn is_cached(&self, ptr: DevicePtr) -> bool {
        self.lock().is_cached(ptr)
    }

    /// Events recorded and not yet destroyed.
    pub fn event_count(&self) -> usize {
        self.lock().event_count()
    }

    /// Whether an event's work has not completed yet (`None`: no such event).
    pub fn event_pending(&self, event: &Event) -> Option<bool> {
        self.lock().event_pending(event)
    }
}

impl Driver for SimDriver {
    fn name(&self) -> &'static str {
        "sim"
    }

    fn device_count(&self) -> DriverResult<usize> {
        Ok(self.lock().device_count())
    }

    fn init_device(&self, device: Device) -> DriverResult<()> {
        self.lock().init_device(device)
    }

    fn create_stream(&self, device: Device) -> DriverResult<Stream> {
        self.lock().create_stream(device)
    }

    fn check_stream(&self, stream: UsageStream) -> DriverResult<()> {
        self.lock().check_stream(stream)
    }

    fn check_last_error(&self, device: Device) -> DriverResult<()> {
        self.lock().check_last_error(device)
    }

    fn malloc_async(&self, device: Device, size: usize, stream: Stream) -> DriverResult<DevicePtr> {
        self.lock().malloc_async(device, size, stream)
    }

    fn free_async(
        &self,
        device: Device,
        ptr: DevicePtr,
        _size: usize,
        stream: Stream,
    ) -> DriverResult<()> {
        self.lock().free_async(device, ptr, stream)
    }

    fn mem_get_info(&self, device: Device) -> DriverResult<MemInfo> {
        self.lock().mem_get_info(device)
    }

    fn malloc_sync(&self, device: Device, size: usize) -> DriverResult<DevicePtr> {
        self.lock().malloc_sync(device, size)
    }

    fn free_sync(&self, device: Device, ptr: DevicePtr, _size: usize) -> DriverResult<()> {
        self.lock().free_sync(device, ptr)
    }

    fn pool_attribute(&self, device: Device, attr: PoolAttribute) -> DriverResult<u64> {
        self.lock().pool_attribute(device, attr)
    }

    fn set_pool_attribute(
        &self,
        device: Device,
        attr: PoolAttribute,
        value: u64,
    ) -> DriverResult<()> {
        self.lock().set_pool_attribute(device, attr, value)
    }

    fn pool_trim_to(&self, device: Device, keep: u64) -> DriverResult<()> {
        self.lock().pool_trim_to(device, keep)
    }

    fn device_synchronize(&self, device: Device) -> DriverResult<()> {
        self.lock().device_synchronize(device)
    }

    fn record_event(&self, stream: UsageStream) -> DriverResult<Event> {
        self.lock().record_event(stream)
    }

    fn stream_wait_event(&self, stream: UsageStream, event: &Event) -> DriverResult<()> {
        self.lock().stream_wait_event(stream, event)
    }

    fn event_query(&self, device: Device, event: &Event) -> DriverResult<bool> {
        self.lock().event_query(device, event)
    }

    fn destroy_event(&self, device: Device, event: Event) -> DriverResult<()> {
        self.lock().destroy_event(device, event)
    }

    fn capture_status(&self, stream: UsageStream) -> DriverResult<CaptureStatus> {
        self.lock().capture_status(stream)
    }

    fn pool_set_access(&self, owner: Device, accessor: Device) -> DriverResult<()> {
        self.lock().pool_set_access(owner, accessor)
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
        self.lock().memcpy_async(dst, dst_device, src, src_device, count, stream, peer)
    }

    fn memcpy(
        &self,
        device: Device,
        dst: DevicePtr,
        src: DevicePtr,
        count: usize,
    ) -> DriverResult<()> {
        self.lock().memcpy(device, dst, src, count)
    }

    fn note_reuse(&self, device: Device, ptr: DevicePtr, _size: usize, stream: Stream) {
        self.lock().note_reuse(device, ptr, stream)
    }

    fn note_cached(&self, device: Device, ptr: DevicePtr, _size: usize, stream: Stream) {
        self.lock().note_cached(device, ptr, stream)
    }
}
