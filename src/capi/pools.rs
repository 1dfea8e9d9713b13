//! The C ABI of the private pools ([`crate::pools`]): PyTorch's `MemPool` and CUDA
//! graph pools through the shim's overrides (`createOrIncrefPool`, `releasePool`,
//! `beginAllocateToPool`, `endAllocateToPool`, `getCheckpointState`,
//! `setCheckpointPoolState`, `checkPoolLiveAllocations`, `getPoolUseCount`).
//!
//! Beside the pool calls, this module is the glue between the pools and the
//! stream-ordered core:
//! - **Routing.** While an allocate-to context is open, [`super::streamalloc_alloc`]
//!   asks the contexts' filters (one relaxed load when none is open) and serves an
//!   accepted allocation from the pool; [`super::streamalloc_free`],
//!   `streamalloc_record_stream*` and `streamalloc_base_alloc` recognise pool blocks when
//!   the core does not know the pointer (no cost on the core's own path).
//! - **The core's capture.** PyTorch opens the context *before* `cudaStreamBeginCapture`
//!   (`CUDAGraph::capture_begin`), and also for `use_mem_pool` and graph-tree warm-up,
//!   where no capture begins; the arguments do not tell them apart. So the core hears of
//!   a capture when one is seen: while a context is open, each allocation and free
//!   through the C ABI asks the driver whether the context's origin stream (the current
//!   stream when it opened: the capture stream, for a graph) is being captured, and the
//!   first that sees it calls the core's `begin_capture_on(device, origin)` (frees of
//!   ordinary blocks are then deferred, and their streams joined into the capture, as the
//!   seed does). Closing the context ends the core's capture.

use super::{CudaStream, ErrorCode, Failure, Global, dptr, global, status, stream};
use crate::api::StreamOrderedAllocator;
use crate::pools::{Checkpoint, CheckpointBlock, PoolError, PoolId};
use crate::types::{CaptureStatus, DevicePtr, UsageStream};
use std::ffi::{c_int, c_void};

impl From<PoolError> for Failure {
    fn from(e: PoolError) -> Self {
        let code = match &e {
            PoolError::OutOfMemory { .. } => ErrorCode::OutOfMemory,
            PoolError::Driver(_) => ErrorCode::Driver,
            PoolError::CaptureUnderway { .. } => ErrorCode::Capture,
            _ => ErrorCode::InvalidArgument,
        };
        Failure { code, message: e.to_string() }
    }
}

/// A filter of `streamalloc_pool_begin_allocate_to`: nonzero when an allocation on
/// `stream` goes to the pool. Must not unwind.
pub type StreamallocStreamFilter =
    Option<unsafe extern "C" fn(ctx: *mut c_void, stream: CudaStream) -> c_int>;

/// Releases a filter's context when the pools no longer use it. Must not unwind.
pub type StreamallocFilterDrop = Option<unsafe extern "C" fn(ctx: *mut c_void)>;

/// A C filter and its context, released (`drop`) when the last reference goes: a
/// router may still hold the context for a moment after it closes.
struct CFilter {
    f: unsafe extern "C" fn(*mut c_void, CudaStream) -> c_int,
    ctx: usize,
    drop: StreamallocFilterDrop,
}

impl CFilter {
    fn accepts(&self, s: crate::Stream) -> bool {
        // Safety: the contract of streamalloc_pool_begin_allocate_to: f may be called
        // with ctx from any thread until drop is called (in Drop below), and does not
        // unwind.
        unsafe { (self.f)(self.ctx as *mut c_void, s.as_raw() as *mut c_void) != 0 }
    }
}

impl Drop for CFilter {
    fn drop(&mut self) {
        if let Some(d) = self.drop {
            // Safety: called once, when nothing can call the filter any more; d does
            // not unwind (the caller's contract).
            unsafe { d(self.ctx as *mut c_void) };
        }
    }
}

/// Called once per block freed by `streamalloc_pool_restore`. Must not unwind.
pub type StreamallocFreedFn =
    Option<unsafe extern "C" fn(ctx: *mut c_void, ptr: *mut c_void, size: usize)>;

/// One block of a checkpoint (`streamalloc_pool_block` in the header).
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct StreamallocPoolBlock {
    /// The block's address.
    pub ptr: *mut c_void,
    /// The requested size.
    pub size: usize,
    /// The stream it was allocated on.
    pub stream: CudaStream,
}

/// A pool's figures (`streamalloc_pool_stats` in the header).
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct StreamallocPoolStats {
    /// The pool's users.
    pub use_count: u64,
    /// Blocks handed out now.
    pub live_blocks: u64,
    /// Requested bytes of the live blocks.
    pub live_bytes: u64,
    /// Bytes the pool holds from the driver.
    pub reserved_bytes: u64,
}

fn pool_key(g: &Global, device: c_int, id0: u64, id1: u64) -> Result<(usize, PoolId), Failure> {
    let d = g.pools.check_device(device as i64)?;
    Ok((d, PoolId(id0, id1)))
}

/// Tells the core of a capture that an open context's origin stream is in (see the
/// module docs). Called only while a context is open.
#[cold]
pub(crate) fn sync_core_capture(g: &Global) {
    for c in g.pools.contexts() {
        if c.capture_begun() {
            continue;
        }
        let origin = UsageStream::new(c.origin(), c.device());
        if g.pools.driver().capture_status(origin) != Ok(CaptureStatus::Active) {
            continue;
        }
        match g.alloc.begin_capture_on(c.device(), c.origin()) {
            Ok(()) => {
                c.mark_capture_begun();
            }
            // Another thread (or context) told the core first.
            Err(crate::Error::CaptureAlreadyUnderway) => {}
            Err(e) => log::warn!("streamalloc: a capture seen on {origin:?}: {e}"),
        }
    }
}

/// The routed allocation: `Some` when an open context takes it.
#[cold]
pub(crate) fn routed_alloc(
    g: &Global,
    device: usize,
    size: usize,
    s: crate::Stream,
) -> Result<Option<*mut c_void>, Failure> {
    sync_core_capture(g);
    let Some(c) = g.pools.route(device, s) else { return Ok(None) };
    let p = alloc_counted(g, device, c.id(), size, s)?;
    Ok(Some(p))
}

fn alloc_counted(
    g: &Global,
    d: usize,
    id: PoolId,
    size: usize,
    s: crate::Stream,
) -> Result<*mut c_void, Failure> {
    let mut r = g.pools.alloc(d, id, size, s);
    if matches!(r, Err(PoolError::OutOfMemory { .. }))
        && !g.alloc.capture_underway()
        && g.pools.driver().capture_status(UsageStream::new(s, d)) == Ok(CaptureStatus::None)
    {
        // The core's pool may hold the memory (its release threshold keeps what it
        // reserved): trim it, as PyTorch's allocator frees its cache, then once more.
        if g.alloc.empty_cache().is_ok() {
            r = g.pools.alloc(d, id, size, s);
        }
    }
    match r {
        Ok(p) => {
            if !p.is_null() {
                g.counters.get(d).on_alloc(size as u64);
            }
            Ok(p.as_raw() as usize as *mut c_void)
        }
        Err(e) => {
            if matches!(e, PoolError::OutOfMemory { .. }) {
                g.counters.get(d).on_oom();
            }
            Err(e.into())
        }
    }
}

/// Frees `ptr` if a pool has it: `None` when no pool does.
pub(crate) fn pool_free(g: &Global, ptr: DevicePtr) -> Option<Result<(), Failure>> {
    let (d, _, size) = g.pools.owner_of(ptr)?;
    Some(match g.pools.free(ptr) {
        Ok(()) => {
            g.counters.get(d).on_free(size as u64);
            Ok(())
        }
        Err(e) => Err(e.into()),
    })
}

// ----- the C functions -----

/// Makes private pool `(id0, id1)` of `device` (use count 1) or adds a user
/// (`createOrIncrefPool`). Returns the status code.
#[unsafe(no_mangle)]
pub extern "C" fn streamalloc_pool_create_or_incref(device: c_int, id0: u64, id1: u64) -> c_int {
    status(|| {
        let g = global()?;
        let (d, id) = pool_key(g, device, id0, id1)?;
        g.pools.create_or_incref(d, id)?;
        Ok(())
    })
}

/// Takes a user away from the pool (`releasePool`); at 0 its free blocks go back to the
/// driver (its live blocks when they are freed). Returns the status code.
#[unsafe(no_mangle)]
pub extern "C" fn streamalloc_pool_release(device: c_int, id0: u64, id1: u64) -> c_int {
    status(|| {
        let g = global()?;
        let (d, id) = pool_key(g, device, id0, id1)?;
        g.pools.release(d, id)?;
        Ok(())
    })
}

/// Writes the pool's figures to `*out` (a pool that does not exist is an error).
/// Returns the status code.
///
/// # Safety
/// `out` is null (an error) or valid for one `streamalloc_pool_stats` write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn streamalloc_pool_get_stats(
    device: c_int,
    id0: u64,
    id1: u64,
    out: *mut StreamallocPoolStats,
) -> c_int {
    status(|| {
        if out.is_null() {
            return Err(Failure::invalid("streamalloc_pool_get_stats: out is NULL"));
        }
        let g = global()?;
        let (d, id) = pool_key(g, device, id0, id1)?;
        let s = g.pools.stats(d, id)?;
        let v = StreamallocPoolStats {
            use_count: s.use_count.into(),
            live_blocks: s.live_blocks as u64,
            live_bytes: s.live_bytes,
            reserved_bytes: s.reserved_bytes,
        };
        // Safety: out is not null and valid for one write (the caller's contract).
        unsafe { out.write(v) };
        Ok(())
    })
}

/// The pool's use count (`getPoolUseCount`): 0 for a pool that does not exist, -1 on
/// error (bad device, pool `{0, 0}`; last error set).
#[unsafe(no_mangle)]
pub extern "C" fn streamalloc_pool_use_count(device: c_int, id0: u64, id1: u64) -> i64 {
    super::boundary(-1, || {
        let g = global()?;
        let (d, id) = pool_key(g, device, id0, id1)?;
        Ok(g.pools.use_count(d, id)?.into())
    })
}

/// Opens an allocate-to context (`beginAllocateToPool`): adds a user to the pool (making
/// it if needed); until `streamalloc_pool_end_allocate_to`, `streamalloc_alloc` on
/// `device` with a stream that `filter(filter_ctx, stream)` accepts (every stream, for a
/// NULL filter) allocates from the pool. `origin` is the caller's current stream (the
/// capture stream, for a graph capture). `filter_drop(filter_ctx)` is called once when
/// the filter is no longer used (after the context closes, or at once when this call is
/// refused). Returns the status code.
///
/// # Safety
/// `filter` is NULL or a function that may be called with `filter_ctx` from any thread
/// until `filter_drop` is called, and does not unwind; `filter_drop` is NULL or a
/// function that does not unwind.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn streamalloc_pool_begin_allocate_to(
    device: c_int,
    id0: u64,
    id1: u64,
    origin: CudaStream,
    filter: StreamallocStreamFilter,
    filter_ctx: *mut c_void,
    filter_drop: StreamallocFilterDrop,
) -> c_int {
    status(|| {
        // Made first, so that a refusal below releases the context too.
        let filter: Option<crate::pools::StreamFilter> = filter.map(|f| {
            let c = CFilter { f, ctx: filter_ctx as usize, drop: filter_drop };
            Box::new(move |s: crate::Stream| c.accepts(s)) as crate::pools::StreamFilter
        });
        let g = global()?;
        let (d, id) = pool_key(g, device, id0, id1)?;
        g.pools.begin_allocate_to(d, id, stream(origin), filter)?;
        Ok(())
    })
}

/// Closes the context (`endAllocateToPool`); if the core was told of a capture on the
/// context's origin stream, it ends there (`capture_stream` joins the capture's free
/// streams, as `streamalloc_end_capture`). The user the context added stays until
/// `streamalloc_pool_release`. Returns the status code.
#[unsafe(no_mangle)]
pub extern "C" fn streamalloc_pool_end_allocate_to(device: c_int, id0: u64, id1: u64) -> c_int {
    status(|| {
        let g = global()?;
        let (d, id) = pool_key(g, device, id0, id1)?;
        let c = g.pools.end_allocate_to(d, id)?;
        if c.capture_begun() {
            g.alloc.end_capture(d, c.origin())?;
        }
        Ok(())
    })
}

/// Allocates `size` bytes from the pool, ordered on `stream` (whatever the contexts).
/// NULL on failure (last error set) and for size 0.
///
/// # Safety
/// `stream_` must be a live CUDA stream of `device` (or null): it goes to the driver.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn streamalloc_pool_alloc(
    device: c_int,
    id0: u64,
    id1: u64,
    size: usize,
    stream_: CudaStream,
) -> *mut c_void {
    super::boundary(std::ptr::null_mut(), || {
        let g = global()?;
        let (d, id) = pool_key(g, device, id0, id1)?;
        alloc_counted(g, d, id, size, stream(stream_))
    })
}

/// Writes the pool's live blocks (`getCheckpointState`) to `out` (at most `capacity`)
/// and their number to `*count`; call again with a larger buffer when `*count >
/// capacity`. Returns the status code.
///
/// # Safety
/// `out` is valid for `capacity` writes (or `capacity` is 0); `count` is valid for one
/// write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn streamalloc_pool_checkpoint(
    device: c_int,
    id0: u64,
    id1: u64,
    out: *mut StreamallocPoolBlock,
    capacity: usize,
    count: *mut usize,
) -> c_int {
    status(|| {
        if count.is_null() || (out.is_null() && capacity > 0) {
            return Err(Failure::invalid("streamalloc_pool_checkpoint: NULL output"));
        }
        let g = global()?;
        let (d, id) = pool_key(g, device, id0, id1)?;
        let cp = g.pools.checkpoint(d, id)?;
        for (i, b) in cp.blocks.iter().take(capacity).enumerate() {
            let v = StreamallocPoolBlock {
                ptr: b.ptr.as_raw() as usize as *mut c_void,
                size: b.size,
                stream: b.stream.as_raw() as *mut c_void,
            };
            // Safety: i < capacity and out is valid for capacity writes (caller).
            unsafe { out.add(i).write(v) };
        }
        // Safety: count is valid for one write (checked non-null; caller's contract).
        unsafe { count.write(cp.blocks.len()) };
        Ok(())
    })
}

/// Makes the pool's live set the `n` checkpoint blocks (`setCheckpointPoolState`):
/// every block live now is freed (`on_freed(ctx, ptr, size)` is called for each, after
/// the change), every checkpoint block is live again at its address. A checkpoint that
/// does not fit the pool (a block it does not have, one too small) is refused with
/// nothing changed. Returns the status code.
///
/// # Safety
/// `blocks` is valid for `n` reads (or `n` is 0); `on_freed` is NULL or a function that
/// does not unwind.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn streamalloc_pool_restore(
    device: c_int,
    id0: u64,
    id1: u64,
    blocks: *const StreamallocPoolBlock,
    n: usize,
    on_freed: StreamallocFreedFn,
    ctx: *mut c_void,
) -> c_int {
    status(|| {
        if blocks.is_null() && n > 0 {
            return Err(Failure::invalid("streamalloc_pool_restore: blocks is NULL"));
        }
        let g = global()?;
        let (d, id) = pool_key(g, device, id0, id1)?;
        let given: &[StreamallocPoolBlock] = if n == 0 {
            &[]
        } else {
            // Safety: blocks is valid for n reads (caller) and not null (checked).
            unsafe { std::slice::from_raw_parts(blocks, n) }
        };
        let cp = Checkpoint {
            device: d,
            id,
            blocks: given
                .iter()
                .map(|b| CheckpointBlock {
                    ptr: dptr(b.ptr),
                    size: b.size,
                    stream: stream(b.stream),
                })
                .collect(),
        };
        let delta = g.pools.restore(&cp)?;
        let counters = g.counters.get(d);
        for b in &delta.freed {
            counters.on_free(b.size as u64);
        }
        for b in &delta.allocated {
            counters.on_alloc(b.size as u64);
        }
        if let Some(f) = on_freed {
            for b in &delta.freed {
                // Safety: f does not unwind (the caller's contract).
                unsafe { f(ctx, b.ptr.as_raw() as usize as *mut c_void, b.size) };
            }
        }
        Ok(())
    })
}

/// Writes 1 to `*out` when the pool's live blocks are exactly the `n` pointers of
/// `ptrs` (`checkPoolLiveAllocations`), else 0. Returns the status code.
///
/// # Safety
/// `ptrs` is valid for `n` reads (or `n` is 0); `out` is valid for one write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn streamalloc_pool_check_live(
    device: c_int,
    id0: u64,
    id1: u64,
    ptrs: *const *mut c_void,
    n: usize,
    out: *mut c_int,
) -> c_int {
    status(|| {
        if out.is_null() || (ptrs.is_null() && n > 0) {
            return Err(Failure::invalid("streamalloc_pool_check_live: NULL argument"));
        }
        let g = global()?;
        let (d, id) = pool_key(g, device, id0, id1)?;
        let given: &[*mut c_void] = if n == 0 {
            &[]
        } else {
            // Safety: ptrs is valid for n reads (caller) and not null (checked).
            unsafe { std::slice::from_raw_parts(ptrs, n) }
        };
        let expected: Vec<DevicePtr> = given.iter().map(|&p| dptr(p)).collect();
        let same = g.pools.check_live(d, id, &expected)?;
        // Safety: out is valid for one write (caller) and not null (checked).
        unsafe { out.write(same as c_int) };
        Ok(())
    })
}

/// The pool a block belongs to: writes its ids to `*id0`, `*id1` and returns 1; 0 when
/// no pool has it (not an error); -1 on bad arguments.
///
/// # Safety
/// `id0` and `id1` are each valid for one write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn streamalloc_pool_of(
    ptr: *mut c_void,
    id0: *mut u64,
    id1: *mut u64,
) -> c_int {
    super::boundary(-1, || {
        if id0.is_null() || id1.is_null() {
            return Err(Failure::invalid("streamalloc_pool_of: NULL output"));
        }
        let g = global()?;
        match g.pools.owner_of(dptr(ptr)) {
            Some((_, id, _)) => {
                // Safety: both are valid for one write (caller) and not null (checked).
                unsafe {
                    id0.write(id.0);
                    id1.write(id.1);
                }
                Ok(1)
            }
            None => Ok(0),
        }
    })
}

/// The core's view, for the record-stream and base-allocation hooks: whether `ptr` is
/// a pool block (then the pools answer).
pub(crate) fn is_pool_block(g: &Global, ptr: DevicePtr) -> bool {
    g.pools.has_blocks() && g.pools.owner_of(ptr).is_some()
}
