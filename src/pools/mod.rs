//! Private pools: PyTorch's `torch.cuda.MemPool` and the memory of CUDA graphs
//! (`torch.cuda.graph(pool=...)`, `torch.compile(mode="reduce-overhead")`'s graph trees).
//!
//! ```text
//!   begin_allocate_to(device, id, filter) ─┐        route(device, stream) -> Some(id)
//!                                          ▼                │ (filters, newest first)
//!   contexts: [(device, id, filter, origin stream)]  ◀──────┘ one relaxed load when none
//!
//!   pools: (device, PoolId) ─▶ Pool { use_count, blocks by address, free index }
//!                                     │ each block its own cuMemAlloc (no splitting),
//!                                     │ handed out again by address (best fit, same stream)
//!   owner: ptr ─▶ (device, PoolId)    ▼
//!                              Driver::malloc_sync / free_sync (not stream-ordered)
//! ```
//!
//! A layer beside the stream-ordered core ([`crate::StreamAlloc`]), which it does not
//! touch: a block a pool needs while a stream is being captured must not be a CUDA graph
//! memory node (graph trees keep a graph's outputs alive and capture the next graph into
//! the same pool, and a checkpoint brings blocks back at the addresses the graphs baked
//! in), so pool blocks come from [`Driver::malloc_sync`] (`cuMemAlloc`, allowed during a
//! capture in the relaxed mode, as PyTorch's own allocator does it) and are returned with
//! [`Driver::free_sync`] only when no stream an open context began on is being captured.
//!
//! Semantics (PyTorch's native allocator's, `c10/cuda/CUDACachingAllocator.cpp`,
//! `PrivatePool`, unless said):
//! - **Use count.** [`PrivatePools::create_or_incref`] makes a pool (count 1) or adds a
//!   user; [`PrivatePools::begin_allocate_to`] does too; [`PrivatePools::release`] takes
//!   one away. At 0 the pool's free blocks go back to the driver at once (native waits
//!   for `emptyCache`, which `MemPool`'s destructor calls right after), and so does each
//!   live block when it is freed; an empty pool at 0 is forgotten.
//! - **Reuse.** A freed block is reusable by an allocation on the stream it was
//!   allocated on (native keys its free blocks by stream too), best fit among blocks no
//!   more than twice the request (or 1 MiB over it). During a capture that is the
//!   captured order of the graph, as native. A block recorded on other streams
//!   ([`PrivatePools::record_stream`]) waits for them (its stream waits on an event of
//!   each) before it is reusable; freed during a capture, it is held back until an
//!   allocation of the pool outside any capture.
//! - **Checkpoints.** [`PrivatePools::checkpoint`] is the pool's live set (address,
//!   size, stream); [`PrivatePools::restore`] frees every block live now and marks the
//!   checkpoint's blocks live again at the same addresses, returning both lists
//!   (PyTorch's `CheckpointDelta`); [`PrivatePools::check_live`] compares the live set
//!   with an expected set exactly (`checkPoolLiveAllocations`).
//! - Not modelled: `use_on_oom` (a pool lending memory to allocations outside it) and
//!   the memory fraction (pool bytes are not charged to the core's budget).
//!
//! Every operation validates its arguments before it changes anything: an unknown pool,
//! a bad device, a pointer not in the pool, a checkpoint that does not fit the pool are
//! refused with a [`PoolError`] and the books stay as they were.

use crate::driver::Driver;
use crate::error::DriverError;
use crate::types::{CaptureStatus, Device, DevicePtr, Stream, UsageStream};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

mod error;
#[cfg(all(test, not(streamalloc_loom)))]
mod tests;

pub use error::{PoolError, PoolResult};

/// Pool blocks are rounded up to this many bytes.
const ROUND: usize = 512;
/// A free block is reused for a request if it is at most this much larger (or twice).
const REUSE_SLACK: usize = 1 << 20;

/// A pool's id: PyTorch's `MempoolId_t`, two halves (`{0, n}` for `MemPool` and
/// `graph_pool_handle`, `{n, 0}` for a graph's own pool). `{0, 0}` is the default pool,
/// which is not a private pool.
#[derive(Copy, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Default)]
pub struct PoolId(pub u64, pub u64);

impl PoolId {
    /// Whether this is `{0, 0}`, PyTorch's name for the default pool.
    pub fn is_default(self) -> bool {
        self == PoolId(0, 0)
    }
}

impl std::fmt::Display for PoolId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "({}, {})", self.0, self.1)
    }
}

/// Decides whether an allocation on a stream goes to a pool (PyTorch's
/// `std::function<bool(cudaStream_t)>` of `beginAllocateToPool`).
pub type StreamFilter = Box<dyn Fn(Stream) -> bool + Send + Sync>;

/// One live block of a checkpoint.
#[derive(Copy, Clone, PartialEq, Eq, Debug)]
pub struct CheckpointBlock {
    /// Its address.
    pub ptr: DevicePtr,
    /// The size that was requested.
    pub size: usize,
    /// The stream it was allocated on.
    pub stream: Stream,
}

/// A pool's live set at one moment ([`PrivatePools::checkpoint`]).
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Checkpoint {
    /// The pool's device.
    pub device: Device,
    /// The pool.
    pub id: PoolId,
    /// Its live blocks, by address.
    pub blocks: Vec<CheckpointBlock>,
}

/// What [`PrivatePools::restore`] changed (PyTorch's `CheckpointDelta`).
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct RestoreDelta {
    /// Every block that was live before the restore, now freed (by address; the size
    /// and stream it had).
    pub freed: Vec<CheckpointBlock>,
    /// Every block of the checkpoint, now live again (in the checkpoint's order).
    pub allocated: Vec<CheckpointBlock>,
}

/// A pool's figures.
#[derive(Copy, Clone, PartialEq, Eq, Debug, Default)]
pub struct PoolStats {
    /// The pool's users.
    pub use_count: u32,
    /// Blocks handed out now.
    pub live_blocks: usize,
    /// Requested bytes of the live blocks.
    pub live_bytes: u64,
    /// Bytes the pool holds from the driver (live, free and held-back blocks).
    pub reserved_bytes: u64,
}

/// One open allocate-to context (`beginAllocateToPool` .. `endAllocateToPool`).
pub struct AllocateTo {
    device: Device,
    id: PoolId,
    filter: Option<StreamFilter>,
    origin: Stream,
    /// Set by the owner of the layer when it has told its stream-ordered allocator that
    /// a capture runs on `origin` (see [`AllocateTo::mark_capture_begun`]).
    capture_begun: AtomicBool,
}

impl AllocateTo {
    /// The device.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The pool.
    pub fn id(&self) -> PoolId {
        self.id
    }

    /// The current stream when the context began: the capture stream, when it serves a
    /// CUDA graph capture (PyTorch begins the context on it just before the capture).
    pub fn origin(&self) -> Stream {
        self.origin
    }

    /// Whether an allocation on `stream` goes to this context's pool.
    pub fn accepts(&self, stream: Stream) -> bool {
        self.filter.as_ref().is_none_or(|f| f(stream))
    }

    /// Records that the capture on [`AllocateTo::origin`] was announced to the
    /// stream-ordered allocator; returns whether it was already (so exactly one caller
    /// announces it).
    pub fn mark_capture_begun(&self) -> bool {
        // AcqRel: one caller wins; it is a flag for the owner's own bookkeeping.
        self.capture_begun.swap(true, Ordering::AcqRel)
    }

    /// Whether [`AllocateTo::mark_capture_begun`] was called.
    pub fn capture_begun(&self) -> bool {
        self.capture_begun.load(Ordering::Acquire)
    }
}

impl std::fmt::Debug for AllocateTo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AllocateTo")
            .field("device", &self.device)
            .field("id", &self.id)
            .field("filtered", &self.filter.is_some())
            .field("origin", &self.origin)
            .field("capture_begun", &self.capture_begun())
            .finish()
    }
}

#[derive(Debug)]
struct Block {
    /// Rounded size: what the driver holds.
    size: usize,
    /// What was asked for (0 while free).
    requested: usize,
    stream: Stream,
    live: bool,
    /// Freed during a capture with recorded streams: not reusable until they are waited
    /// for, outside the capture.
    held: bool,
    recorded: Vec<UsageStream>,
}

#[derive(Debug, Default)]
struct Pool {
    use_count: u32,
    blocks: BTreeMap<DevicePtr, Block>,
    /// Reusable blocks: (stream, size, address).
    free: BTreeSet<(Stream, usize, DevicePtr)>,
}

impl Pool {
    fn live(&self) -> impl Iterator<Item = (&DevicePtr, &Block)> {
        self.blocks.iter().filter(|(_, b)| b.live)
    }
}

type Key = (Device, PoolId);

#[derive(Debug, Default)]
struct Books {
    pools: HashMap<Key, Pool>,
    owner: HashMap<DevicePtr, Key>,
}

/// The private pools of every device over one driver. See the [module docs](self).
///
/// ```
/// use std::sync::Arc;
/// use streamalloc::pools::{PoolId, PrivatePools};
/// use streamalloc::sim::SimDriver;
/// let sim = Arc::new(SimDriver::with_devices(1, 1 << 30));
/// let pools = PrivatePools::new(sim.clone(), 1);
/// let s = sim.new_stream(0)?;
/// let id = PoolId(0, 1);
/// pools.create_or_incref(0, id)?;
/// let p = pools.alloc(0, id, 4096, s)?;
/// pools.free(p)?;
/// assert_eq!(pools.alloc(0, id, 4096, s)?, p); // the same block, by address
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct PrivatePools<D: Driver> {
    driver: D,
    device_count: usize,
    books: Mutex<Books>,
    contexts: RwLock<Vec<Arc<AllocateTo>>>,
    /// How many contexts are open: the one load the allocation path pays when none is.
    open: AtomicUsize,
}

impl<D: Driver> std::fmt::Debug for PrivatePools<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrivatePools")
            .field("device_count", &self.device_count)
            .field("pools", &self.lock().pools.len())
            .field("open_contexts", &self.open.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

fn round(size: usize) -> Option<usize> {
    Some(size.checked_add(ROUND - 1)? & !(ROUND - 1))
}

impl<D: Driver> PrivatePools<D> {
    /// Private pools for devices `0..device_count` of `driver`.
    pub fn new(driver: D, device_count: usize) -> Self {
        PrivatePools {
            driver,
            device_count,
            books: Mutex::new(Books::default()),
            contexts: RwLock::new(Vec::new()),
            open: AtomicUsize::new(0),
        }
    }

    /// The driver.
    pub fn driver(&self) -> &D {
        &self.driver
    }

    fn lock(&self) -> MutexGuard<'_, Books> {
        // Every mutation below validates first and cannot panic halfway; a poisoned
        // lock (a panic in a driver) leaves consistent books.
        self.books.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `device` checked against the device count.
    pub fn check_device(&self, device: i64) -> PoolResult<Device> {
        match usize::try_from(device) {
            Ok(d) if d < self.device_count => Ok(d),
            _ => Err(PoolError::InvalidDevice { device, device_count: self.device_count }),
        }
    }

    fn key(&self, device: Device, id: PoolId) -> PoolResult<Key> {
        self.check_device(device as i64)?;
        if id.is_default() {
            return Err(PoolError::DefaultPool);
        }
        Ok((device, id))
    }

    /// Whether `stream` is being captured. A stream the driver will not answer for (the
    /// legacy stream while another stream is captured in the global mode) counts as
    /// capturing: then nothing goes back to the driver and no event is recorded, which
    /// is safe either way.
    fn capturing(&self, stream: UsageStream) -> bool {
        self.driver.capture_status(stream) != Ok(CaptureStatus::None)
    }

    /// Whether a stream that an open context began on, on any device, is being
    /// captured: then no block is returned to the driver (`cuMemFree` is refused during a
    /// capture, and in CUDA's global capture mode it would invalidate a capture of any
    /// thread and device).
    fn any_capturing(&self) -> bool {
        if self.open.load(Ordering::Acquire) == 0 {
            return false;
        }
        let contexts = self.contexts.read().unwrap_or_else(|e| e.into_inner()).clone();
        // A stream we cannot ask about counts as capturing: keeping memory is safe.
        contexts.iter().any(|c| self.capturing(UsageStream::new(c.origin, c.device)))
    }

    // ----- use counts -----

    /// Makes the pool (use count 1) or adds a user (`createOrIncrefPool`).
    pub fn create_or_incref(&self, device: Device, id: PoolId) -> PoolResult<u32> {
        let key = self.key(device, id)?;
        let mut books = self.lock();
        let pool = books.pools.entry(key).or_default();
        pool.use_count = pool.use_count.saturating_add(1);
        Ok(pool.use_count)
    }

    /// The pool's use count (`getPoolUseCount`); 0 for a pool that does not exist.
    pub fn use_count(&self, device: Device, id: PoolId) -> PoolResult<u32> {
        let key = self.key(device, id)?;
        Ok(self.lock().pools.get(&key).map_or(0, |p| p.use_count))
    }

    /// Takes a user away (`releasePool`); returns the new count. At 0 the free blocks go
    /// back to the driver (unless a capture runs: then at
    /// [`PrivatePools::empty_cache`]), and the pool is forgotten once it has no block.
    pub fn release(&self, device: Device, id: PoolId) -> PoolResult<u32> {
        let key = self.key(device, id)?;
        let capturing = self.any_capturing();
        let mut books = self.lock();
        let pool = books.pools.get_mut(&key).ok_or(PoolError::UnknownPool { device, id })?;
        if pool.use_count == 0 {
            return Err(PoolError::Released { device, id });
        }
        pool.use_count -= 1;
        let left = pool.use_count;
        if left == 0 && !capturing {
            self.return_free_blocks(&mut books, key)?;
        }
        Ok(left)
    }

    /// Returns the free blocks of a pool with no users to the driver; forgets the pool
    /// when it has no block left. Stops at the first driver failure (the block stays).
    fn return_free_blocks(&self, books: &mut Books, key: Key) -> PoolResult<()> {
        // Held-back blocks first: their recorded streams are waited for (outside a
        // capture, as every caller is), so they are free too.
        self.release_held(books, key)?;
        let Some(pool) = books.pools.get_mut(&key) else { return Ok(()) };
        let free: Vec<(Stream, usize, DevicePtr)> = pool.free.iter().copied().collect();
        let mut result = Ok(());
        for (stream, size, ptr) in free {
            if let Err(e) = self.driver.free_sync(key.0, ptr, size) {
                result = Err(e.into());
                break;
            }
            pool.free.remove(&(stream, size, ptr));
            pool.blocks.remove(&ptr);
            books.owner.remove(&ptr);
        }
        if pool.use_count == 0 && pool.blocks.is_empty() {
            books.pools.remove(&key);
        }
        result
    }

    /// Returns to the driver the free blocks of every pool that has no users (PyTorch's
    /// `emptyCache` releases those of "freeable" private pools). Nothing while a capture
    /// runs.
    pub fn empty_cache(&self) -> PoolResult<()> {
        if self.any_capturing() {
            return Ok(());
        }
        let mut books = self.lock();
        let dead: Vec<Key> =
            books.pools.iter().filter(|(_, p)| p.use_count == 0).map(|(k, _)| *k).collect();
        for key in dead {
            self.return_free_blocks(&mut books, key)?;
        }
        Ok(())
    }

    // ----- allocate-to contexts -----

    /// Opens an allocate-to context (`beginAllocateToPool`): adds a user to the pool
    /// (making it if needed), and from now on [`PrivatePools::route`] sends allocations
    /// on `device` whose stream `filter` accepts (all, for `None`) to it. `origin` is the
    /// caller's current stream (the capture stream, for a graph capture). One context
    /// per (device, pool).
    pub fn begin_allocate_to(
        &self,
        device: Device,
        id: PoolId,
        origin: Stream,
        filter: Option<StreamFilter>,
    ) -> PoolResult<()> {
        let key = self.key(device, id)?;
        let mut contexts = self.contexts.write().unwrap_or_else(|e| e.into_inner());
        if contexts.iter().any(|c| (c.device, c.id) == key) {
            return Err(PoolError::AlreadyAllocatingTo { device, id });
        }
        self.create_or_incref(device, id)?;
        contexts.push(Arc::new(AllocateTo {
            device,
            id,
            filter,
            origin,
            capture_begun: AtomicBool::new(false),
        }));
        // Release: a router that sees the count sees the context (it reads the list
        // under the lock anyway).
        self.open.fetch_add(1, Ordering::Release);
        Ok(())
    }

    /// Closes the context (`endAllocateToPool`); the user it added stays until
    /// [`PrivatePools::release`], as in PyTorch. Returns the context.
    pub fn end_allocate_to(&self, device: Device, id: PoolId) -> PoolResult<Arc<AllocateTo>> {
        let key = self.key(device, id)?;
        let mut contexts = self.contexts.write().unwrap_or_else(|e| e.into_inner());
        let i = contexts
            .iter()
            .position(|c| (c.device, c.id) == key)
            .ok_or(PoolError::NotAllocatingTo { device, id })?;
        let c = contexts.remove(i);
        self.open.fetch_sub(1, Ordering::Release);
        Ok(c)
    }

    /// Whether any context is open: one relaxed load, for the allocation path.
    #[inline(always)]
    pub fn routing(&self) -> bool {
        self.open.load(Ordering::Relaxed) != 0
    }

    /// The open contexts (a copy).
    pub fn contexts(&self) -> Vec<Arc<AllocateTo>> {
        if !self.routing() {
            return Vec::new();
        }
        self.contexts.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The pool an allocation on `device` and `stream` goes to: the newest open context
    /// of the device whose filter accepts the stream. The filters run with no lock held.
    pub fn route(&self, device: Device, stream: Stream) -> Option<Arc<AllocateTo>> {
        self.contexts().into_iter().rev().find(|c| c.device == device && c.accepts(stream))
    }

    // ----- blocks -----

    /// Allocates `size` bytes from the pool, ordered on `stream` (null for size 0).
    pub fn alloc(
        &self,
        device: Device,
        id: PoolId,
        size: usize,
        stream: Stream,
    ) -> PoolResult<DevicePtr> {
        let key = self.key(device, id)?;
        let us = UsageStream::new(stream, device);
        let capturing = self.capturing(us);
        let mut books = self.lock();
        let pool = books.pools.get(&key).ok_or(PoolError::UnknownPool { device, id })?;
        if pool.use_count == 0 {
            return Err(PoolError::Released { device, id });
        }
        if size == 0 {
            return Ok(DevicePtr::NULL);
        }
        let oom = |cause| PoolError::OutOfMemory { device, requested: size, cause };
        let rounded = round(size).ok_or_else(|| {
            oom(DriverError::new("cuMemAlloc", crate::error::CUDA_ERROR_OUT_OF_MEMORY, "too large"))
        })?;
        if !capturing {
            self.release_held(&mut books, key)?;
        }
        let pool = books.pools.get_mut(&key).expect("checked above");
        let most = rounded.saturating_add(REUSE_SLACK).max(rounded.saturating_mul(2));
        let fit = pool
            .free
            .range(
                (stream, rounded, DevicePtr::NULL)..=(stream, most, DevicePtr::from_raw(u64::MAX)),
            )
            .next()
            .copied();
        if let Some(entry @ (_, bsize, ptr)) = fit {
            pool.free.remove(&entry);
            let b = pool.blocks.get_mut(&ptr).expect("the free index names blocks of the pool");
            b.live = true;
            b.requested = size;
            self.driver.note_reuse(device, ptr, bsize, stream);
            return Ok(ptr);
        }
        let ptr = match self.driver.malloc_sync(device, rounded) {
            Ok(p) => p,
            Err(e) if e.is_oom() && !capturing => {
                // Memory held by pools nobody uses any more, then once more.
                drop(books);
                self.empty_cache()?;
                books = self.lock();
                if !books.pools.contains_key(&key) {
                    return Err(PoolError::UnknownPool { device, id });
                }
                self.driver.malloc_sync(device, rounded).map_err(oom)?
            }
            Err(e) if e.is_oom() => return Err(oom(e)),
            Err(e) => return Err(e.into()),
        };
        let pool = books.pools.get_mut(&key).expect("checked above");
        pool.blocks.insert(
            ptr,
            Block {
                size: rounded,
                requested: size,
                stream,
                live: true,
                held: false,
                recorded: Vec::new(),
            },
        );
        books.owner.insert(ptr, key);
        Ok(ptr)
    }

    /// The pool of a block: `(device, id, requested size)` (size 0 while the block is
    /// free in its pool), or `None` for a pointer no pool has. One map lookup.
    pub fn owner_of(&self, ptr: DevicePtr) -> Option<(Device, PoolId, usize)> {
        let books = self.lock();
        let key = *books.owner.get(&ptr)?;
        let b = &books.pools.get(&key)?.blocks[&ptr];
        Some((key.0, key.1, if b.live { b.requested } else { 0 }))
    }

    /// Whether any pool holds a block.
    pub fn has_blocks(&self) -> bool {
        !self.lock().owner.is_empty()
    }

    /// Records that a live pool block is used on `stream` (of `stream.device`): its next
    /// reuse waits for that stream's work so far.
    pub fn record_stream(&self, ptr: DevicePtr, stream: UsageStream) -> PoolResult<()> {
        self.check_device(stream.device as i64)?;
        let mut books = self.lock();
        let key = *books.owner.get(&ptr).ok_or(PoolError::UnknownPointer { ptr })?;
        let b = books.pools.get_mut(&key).and_then(|p| p.blocks.get_mut(&ptr));
        let b = b.ok_or(PoolError::UnknownPointer { ptr })?;
        if !b.live {
            return Err(PoolError::DoubleFree { ptr });
        }
        let own = stream == UsageStream::new(b.stream, key.0);
        if !own && !b.recorded.contains(&stream) {
            b.recorded.push(stream);
        }
        Ok(())
    }

    /// Frees a pool block: it goes back to its pool (see the module docs for when it is
    /// reusable), or to the driver when the pool has no users and no capture runs.
    pub fn free(&self, ptr: DevicePtr) -> PoolResult<()> {
        let key = *self.lock().owner.get(&ptr).ok_or(PoolError::UnknownPointer { ptr })?;
        let (device, _) = key;
        let stream = {
            let books = self.lock();
            let b = books.pools.get(&key).and_then(|p| p.blocks.get(&ptr));
            b.ok_or(PoolError::UnknownPointer { ptr })?.stream
        };
        let capturing = self.capturing(UsageStream::new(stream, device));
        let any_capturing = capturing || self.any_capturing();
        let mut books = self.lock();
        let pool = books.pools.get_mut(&key).ok_or(PoolError::UnknownPointer { ptr })?;
        let b = pool.blocks.get_mut(&ptr).ok_or(PoolError::UnknownPointer { ptr })?;
        if !b.live {
            return Err(PoolError::DoubleFree { ptr });
        }
        if !b.recorded.is_empty() {
            if capturing {
                b.live = false;
                b.requested = 0;
                b.held = true;
                return Ok(());
            }
            let target = UsageStream::new(b.stream, device);
            for &r in &b.recorded {
                self.driver.sync_streams(r, target)?;
            }
            b.recorded.clear();
        }
        b.live = false;
        b.requested = 0;
        let size = b.size;
        self.driver.note_cached(device, ptr, size, stream);
        pool.free.insert((stream, size, ptr));
        if pool.use_count == 0 && !any_capturing {
            self.return_free_blocks(&mut books, key)?;
        }
        Ok(())
    }

    /// Makes the pool's held-back blocks reusable: each block's stream waits for its
    /// recorded streams. Outside a capture only.
    fn release_held(&self, books: &mut Books, key: Key) -> PoolResult<()> {
        let Some(pool) = books.pools.get_mut(&key) else { return Ok(()) };
        let held: Vec<DevicePtr> =
            pool.blocks.iter().filter(|(_, b)| b.held).map(|(p, _)| *p).collect();
        for ptr in held {
            let b = pool.blocks.get_mut(&ptr).expect("listed above");
            let target = UsageStream::new(b.stream, key.0);
            for &r in &b.recorded {
                self.driver.sync_streams(r, target)?;
            }
            b.recorded.clear();
            b.held = false;
            let (stream, size) = (b.stream, b.size);
            self.driver.note_cached(key.0, ptr, size, stream);
            pool.free.insert((stream, size, ptr));
        }
        Ok(())
    }

    // ----- checkpoints -----

    /// The pool's live set (`getCheckpointState`).
    pub fn checkpoint(&self, device: Device, id: PoolId) -> PoolResult<Checkpoint> {
        let key = self.key(device, id)?;
        let books = self.lock();
        let pool = books.pools.get(&key).ok_or(PoolError::UnknownPool { device, id })?;
        let blocks = pool
            .live()
            .map(|(&ptr, b)| CheckpointBlock { ptr, size: b.requested, stream: b.stream })
            .collect();
        Ok(Checkpoint { device, id, blocks })
    }

    /// Makes the pool's live set the checkpoint's (`setCheckpointPoolState`): every
    /// block live now is freed, every block of the checkpoint is live again at its
    /// address and on its stream. Refused, with nothing changed, if the checkpoint names
    /// a block the pool does not have (any more) or one too small for it.
    pub fn restore(&self, checkpoint: &Checkpoint) -> PoolResult<RestoreDelta> {
        let (device, id) = (checkpoint.device, checkpoint.id);
        let key = self.key(device, id)?;
        let mut books = self.lock();
        let pool = books.pools.get(&key).ok_or(PoolError::UnknownPool { device, id })?;
        let mut seen = HashSet::new();
        for cb in &checkpoint.blocks {
            let b = pool.blocks.get(&cb.ptr).ok_or(PoolError::BadCheckpoint {
                ptr: cb.ptr,
                reason: "the pool has no such block (any more)",
            })?;
            if b.size < cb.size {
                return Err(PoolError::BadCheckpoint {
                    ptr: cb.ptr,
                    reason: "the block is smaller than the checkpoint's",
                });
            }
            if !seen.insert(cb.ptr) {
                return Err(PoolError::BadCheckpoint { ptr: cb.ptr, reason: "named twice" });
            }
        }
        // The only fallible step: recorded streams of live blocks are waited for first.
        let waits: Vec<(UsageStream, UsageStream)> = pool
            .blocks
            .values()
            .filter(|b| b.live || b.held)
            .flat_map(|b| b.recorded.iter().map(move |&r| (r, UsageStream::new(b.stream, device))))
            .collect();
        if !waits.is_empty() {
            let streams: BTreeSet<Stream> = waits.iter().map(|w| w.1.stream).collect();
            for s in streams {
                if self.capturing(UsageStream::new(s, device)) {
                    return Err(PoolError::CaptureUnderway { device });
                }
            }
            for (r, target) in waits {
                self.driver.sync_streams(r, target)?;
            }
        }
        let pool = books.pools.get_mut(&key).expect("checked above");
        let mut delta = RestoreDelta::default();
        for (&ptr, b) in pool.blocks.iter_mut().filter(|(_, b)| b.live || b.held) {
            b.recorded.clear();
            if b.live {
                delta.freed.push(CheckpointBlock { ptr, size: b.requested, stream: b.stream });
            }
            b.live = false;
            b.held = false;
            b.requested = 0;
            self.driver.note_cached(device, ptr, b.size, b.stream);
            pool.free.insert((b.stream, b.size, ptr));
        }
        for cb in &checkpoint.blocks {
            let b = pool.blocks.get_mut(&cb.ptr).expect("validated above");
            pool.free.remove(&(b.stream, b.size, cb.ptr));
            b.live = true;
            b.requested = cb.size;
            b.stream = cb.stream;
            self.driver.note_reuse(device, cb.ptr, b.size, cb.stream);
            delta.allocated.push(*cb);
        }
        Ok(delta)
    }

    /// Whether the pool's live blocks are exactly `expected` (`checkPoolLiveAllocations`).
    pub fn check_live(
        &self,
        device: Device,
        id: PoolId,
        expected: &[DevicePtr],
    ) -> PoolResult<bool> {
        let key = self.key(device, id)?;
        let books = self.lock();
        let pool = books.pools.get(&key).ok_or(PoolError::UnknownPool { device, id })?;
        let expected: HashSet<DevicePtr> = expected.iter().copied().collect();
        let mut live = 0;
        for (ptr, _) in pool.live() {
            if !expected.contains(ptr) {
                return Ok(false);
            }
            live += 1;
        }
        Ok(live == expected.len())
    }

    /// The pool's figures.
    pub fn stats(&self, device: Device, id: PoolId) -> PoolResult<PoolStats> {
        let key = self.key(device, id)?;
        let books = self.lock();
        let pool = books.pools.get(&key).ok_or(PoolError::UnknownPool { device, id })?;
        Ok(PoolStats {
            use_count: pool.use_count,
            live_blocks: pool.live().count(),
            live_bytes: pool.live().map(|(_, b)| b.requested as u64).sum(),
            reserved_bytes: pool.blocks.values().map(|b| b.size as u64).sum(),
        })
    }

    /// Bytes every pool of `device` holds from the driver.
    pub fn reserved_bytes(&self, device: Device) -> u64 {
        let books = self.lock();
        books
            .pools
            .iter()
            .filter(|(k, _)| k.0 == device)
            .flat_map(|(_, p)| p.blocks.values())
            .map(|b| b.size as u64)
            .sum()
    }
}
