//! The lock-free allocator: [`StreamAlloc`].
//!
//! ```text
//!            malloc / free / record_stream (any thread)
//!                          │
//!   ┌──────────────────────┼─────────────────────────────────────────────┐
//!   │ EpochGate  one word: even = no capture, odd = capture (+ grace)    │
//!   ├──────────────────────┼─────────────────────────────────────────────┤
//!   │ blocks: BlockMap, address → Arc<Record> (1024 spin-locked shards)  │
//!   ├──────────────┬───────┴──────┬──────────────┬───────────────────────┤
//!   │ Shard dev 0  │ Shard dev 1  │ ...          │ deferred frees        │
//!   │  Budget      │  Budget      │              │ (SegQueue, S4)        │
//!   │  unifying    │  unifying    │              │                       │
//!   │  free stream │  free stream │              │                       │
//!   └──────────────┴──────────────┴──────────────┴───────────────────────┘
//!                          │          FrontCache (src/cache/), when on
//!                     Driver behind its lane (src/lane/): cuda / sim / null
//! ```
//!
//! No lock is shared by all threads: block metadata lives in a sharded concurrent map,
//! bytes in per-device atomics, capture state in the epoch gate. Locks exist only for a
//! device's first use and for capture transitions.

use crate::api::{BlockSnapshot, DeviceStats, StreamOrderedAllocator};
use crate::block::{CACHED, DEFERRED, GONE, HANDLE, LIVE, NO_CLASS, Orphan, Record, is_live};
use crate::blockmap::BlockMap;
use crate::budget::Budget;
use crate::cache::{CacheConfig, FrontCache, Released};
use crate::driver::{Driver, DriverResult};
use crate::epoch::{EpochGate, Section};
use crate::error::{Error, OutOfMemory, Result};
use crate::freed::FreedTable;
use crate::history::{Action, History, OomObservers};
use crate::lane::{DriverLane, Laned};
use crate::types::{CaptureStatus, Device, DevicePtr, Stream, UsageStream};
use crate::warn::{WarningCounts, Warnings};
use arc_swap::ArcSwapOption;
use crossbeam::queue::SegQueue;
use crossbeam::utils::CachePadded;
use dashmap::DashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

pub use crate::block::ONE_EXBIBYTE;

pub use crate::blockmap::PtrHasher;

/// What a malloc hands its caller: the pointer API a device pointer (the block map holds
/// the only reference to the record), the handle API the record itself. A type rather
/// than a flag, so that each API's path moves no reference count it does not need.
trait Grant: Sized {
    /// The state the block is handed out in: `LIVE` or `HANDLE`.
    const STATE: u8;
    /// From a record fresh from the driver, about to move into the block map.
    fn fresh(rec: &Arc<Record>) -> Self;
    /// From a record taken off a free list (the block map holds another reference).
    fn reused(rec: Arc<Record>) -> Self;
    /// The device address.
    fn addr(&self) -> u64;
}

impl Grant for DevicePtr {
    const STATE: u8 = LIVE;
    #[inline]
    fn fresh(rec: &Arc<Record>) -> Self {
        rec.dptr()
    }
    #[inline]
    fn reused(rec: Arc<Record>) -> Self {
        rec.dptr()
    }
    #[inline]
    fn addr(&self) -> u64 {
        self.as_raw()
    }
}

impl Grant for Arc<Record> {
    const STATE: u8 = HANDLE;
    #[inline]
    fn fresh(rec: &Arc<Record>) -> Self {
        rec.clone()
    }
    #[inline]
    fn reused(rec: Arc<Record>) -> Self {
        rec
    }
    #[inline]
    fn addr(&self) -> u64 {
        self.ptr
    }
}

/// One device's state. Cache-padded so devices do not share lines.
struct Shard {
    device: Device,
    budget: CachePadded<Budget>,
    /// The unifying free stream (S2, S5); set once on first use of the device.
    unifying: OnceLock<Stream>,
    /// Taken only by the first use of the device.
    init: Mutex<()>,
    /// Driver allocations retried after a driver out-of-memory released idle blocks.
    alloc_retries: AtomicU64,
}

/// State of the capture underway (installed before the odd epoch is published).
#[derive(Default)]
struct Capture {
    /// Every stream a free was issued on during the capture (S5, S15), joined into the
    /// capture stream at `end_capture`.
    free_streams: DashSet<UsageStream>,
    /// The stream the capture began on, when the caller said which (see
    /// [`StreamAlloc::begin_capture_on`]): free streams are then joined into it at once.
    origin: Option<UsageStream>,
}

/// The lock-free stream-ordered allocator, generic over its [`Driver`].
///
/// Same observable semantics as PyTorch's cudaMallocAsync backend (S1..S19 of the
/// brief), without its process-wide mutex. See the crate's DESIGN.md for the layers.
///
/// ```
/// use streamalloc::{sim::SimDriver, StreamAlloc, StreamOrderedAllocator};
/// // On a GPU: StreamAlloc::new(streamalloc::cuda::detect()?)
/// let alloc = StreamAlloc::new(SimDriver::with_devices(1, 1 << 30))?;
/// let p = alloc.malloc(0, 4096, streamalloc::Stream::NULL)?;
/// assert_eq!(alloc.used_bytes(0), 4096);
/// alloc.free(p)?;
/// # Ok::<(), streamalloc::Error>(())
/// ```
pub struct StreamAlloc<D: Driver> {
    /// The driver behind its lane (`src/lane/`): every driver call goes through it.
    /// Shared only with the reaper a drop during a capture may leave behind.
    driver: Arc<Laned<D>>,
    shards: Box<[Shard]>,
    blocks: BlockMap,
    epoch: EpochGate,
    capture: ArcSwapOption<Capture>,
    /// Pointers whose free waits until no capture is underway (S4).
    deferred: SegQueue<u64>,
    freed: FreedTable,
    /// `cache_info` trial blocks whose free failed (S9): the driver still holds them
    /// and nobody owns them. Freed again at the next `cache_info`, `empty_cache` or
    /// driver out-of-memory outside a capture.
    orphans: SegQueue<Orphan>,
    warnings: Warnings,
    /// The front cache, when on (`None`: every malloc and free reaches the driver).
    cache: Option<FrontCache>,
    /// The cache settings asked for (kept when the cache is off).
    cache_config: CacheConfig,
    /// Allocation history (`src/history.rs`): off unless `record_history` turns it on.
    pub(crate) history: History,
    /// Out-of-memory observers (`src/history.rs`).
    pub(crate) oom_observers: OomObservers,
    /// S23: ask the driver for an earlier error before each driver-tier malloc and free
    /// (not where its malloc and free report such errors themselves: CUDA).
    check_errors: bool,
}

impl<D: Driver> StreamAlloc<D> {
    /// S1: an allocator for every device the driver reports. Creates no context.
    pub fn new(driver: D) -> Result<Self> {
        let n = driver.device_count()?;
        Ok(Self::with_device_count(driver, n))
    }

    /// S1: an allocator for `device_count` devices with the default front cache.
    pub fn with_device_count(driver: D, device_count: usize) -> Self {
        Self::with_config(driver, device_count, CacheConfig::default())
    }

    /// An allocator for every device the driver reports, with the given cache settings
    /// (`CacheConfig::passthrough()` for the seed's behaviour: every call reaches the
    /// driver).
    pub fn with_cache(driver: D, cache: CacheConfig) -> Result<Self> {
        let n = driver.device_count()?;
        Ok(Self::with_config(driver, n, cache))
    }

    /// An allocator for `device_count` devices with the given cache settings.
    pub fn with_config(driver: D, device_count: usize, cache: CacheConfig) -> Self {
        let check_errors = !driver.calls_report_prior_errors();
        let shards = (0..device_count)
            .map(|device| Shard {
                device,
                budget: CachePadded::new(Budget::new()),
                unifying: OnceLock::new(),
                init: Mutex::new(()),
                alloc_retries: AtomicU64::new(0),
            })
            .collect();
        StreamAlloc {
            driver: Arc::new(Laned::auto(driver)),
            shards,
            blocks: BlockMap::new(),
            epoch: EpochGate::new(),
            capture: ArcSwapOption::empty(),
            deferred: SegQueue::new(),
            freed: FreedTable::new(),
            orphans: SegQueue::new(),
            warnings: Warnings::default(),
            cache: cache.enabled.then(|| FrontCache::new(cache, device_count)),
            cache_config: cache,
            history: History::default(),
            oom_observers: OomObservers::default(),
            check_errors,
        }
    }

    /// How this allocator's driver calls are serialized per device: the default lane
    /// for a driver that serializes internally (CUDA), else none; wrap the driver in
    /// [`Laned::new`] to choose (see `src/lane/`).
    pub fn driver_lane(&self) -> DriverLane {
        self.driver.lane()
    }

    /// The front cache's settings.
    pub fn cache_config(&self) -> CacheConfig {
        self.cache_config
    }

    /// The driver underneath.
    pub fn driver(&self) -> &D {
        self.driver.inner()
    }

    /// Allocates a block freed when the returned handle drops (like PyTorch's DataPtr).
    ///
    /// The handle carries the block's record, so dropping it needs no lookup; the block
    /// is in the allocator's map all the same (the pointer API sees it: `base_allocation`,
    /// `record_stream`, `snapshot`), but only the handle may free it.
    #[inline]
    pub fn allocate(&self, device: Device, size: usize, stream: Stream) -> Result<Block<'_, D>> {
        let rec = self.acquire_noted(device, size as u64, stream)?;
        Ok(Block { alloc: self, rec, size, device, stream })
    }

    fn shard(&self, device: Device) -> Result<&Shard> {
        self.shards
            .get(device)
            .ok_or(Error::InvalidDevice { device: device as i64, device_count: self.shards.len() })
    }

    /// S2: the device's first use configures its pool and makes its unifying stream.
    #[inline(always)]
    fn lazy_init<'a>(&self, shard: &'a Shard) -> Result<&'a Shard> {
        if shard.unifying.get().is_none() {
            self.init_device(shard)?;
        }
        Ok(shard)
    }

    /// `lazy_init`'s first use of a device (out of line).
    #[cold]
    #[inline(never)]
    fn init_device(&self, shard: &Shard) -> Result<()> {
        let _g = shard.init.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if shard.unifying.get().is_none() {
            self.driver.init_device(shard.device)?;
            let stream = self.driver.create_stream(shard.device)?;
            let _ = shard.unifying.set(stream);
        }
        Ok(())
    }

    /// The error for a pointer that is not a live block: a double free when the map
    /// holds it idle, deferred or on its way to the driver, or the recently-freed table
    /// remembers it; else an unknown pointer.
    fn unknown_or_double_free(&self, ptr: DevicePtr) -> Error {
        let held = self.blocks.peek(ptr.as_raw(), |r| r.is_some_and(|r| !is_live(r.state())));
        if held || self.freed.was_freed(ptr.as_raw()) {
            Error::DoubleFree { ptr }
        } else {
            Error::UnknownPointer { ptr }
        }
    }

    /// The live block at `ptr` (a clone of its record; no map guard is kept).
    fn live_record(&self, ptr: DevicePtr) -> Result<Arc<Record>> {
        match self.blocks.get(ptr.as_raw()) {
            Some(rec) if is_live(rec.state()) => Ok(rec),
            _ => Err(self.unknown_or_double_free(ptr)),
        }
    }

    fn oom(&self, device: Device, requested: u64) -> Error {
        // The seed clears the driver's error and asks for memory info for the report.
        let _ = self.driver.check_last_error(device);
        match self.driver.mem_get_info(device) {
            Ok(info) => Error::OutOfMemory(Box::new(OutOfMemory {
                device,
                allocated: self.used_bytes(device),
                requested,
                device_total: info.total,
                device_free: info.free,
                limit: self.shards[device].budget.limit(),
            })),
            Err(e) => Error::Driver(e),
        }
    }

    /// `acquire` with its history hooks (alloc, or the observers on out-of-memory).
    #[inline]
    fn acquire_noted<G: Grant>(
        &self,
        device: Device,
        size: u64,
        stream: Stream,
    ) -> Result<Option<G>> {
        let grant = self.noted_oom(stream, self.acquire::<G>(device, size, stream))?;
        if let Some(g) = &grant {
            self.history.note(Action::Alloc, device, g.addr(), size, stream);
        }
        Ok(grant)
    }

    /// The history hook of a free: `FreeRequested`, and `FreeCompleted` when the free
    /// was issued (not deferred by a capture).
    #[inline(always)]
    fn history_free(&self, rec: &Record, size: u64, completed: bool) {
        if self.history.on() {
            let (d, s) = (rec.device(), rec.creation_stream);
            self.history.note(Action::FreeRequested, d, rec.ptr, size, s);
            if completed {
                self.history.note(Action::FreeCompleted, d, rec.ptr, size, s);
            }
        }
    }

    /// HOOK for snapshots: every block idle in the front cache now (memory snapshots
    /// list them as inactive blocks).
    pub fn cached_blocks(&self) -> Vec<crate::history::CachedBlock> {
        (0..self.shards.len())
            .flat_map(|device| {
                self.idle_blocks(device).into_iter().map(move |(ptr, size, stream)| {
                    crate::history::CachedBlock { ptr, size, device, stream }
                })
            })
            .collect()
    }

    /// malloc for both APIs (S3): size checks, then the cache tier, else the driver tier.
    /// `None` for size 0.
    #[inline]
    fn acquire<G: Grant>(&self, device: Device, size: u64, stream: Stream) -> Result<Option<G>> {
        if size >= ONE_EXBIBYTE {
            return Err(Error::TooLarge { requested: size });
        }
        if size == 0 {
            return Ok(None);
        }
        let shard = self.shard(device)?;
        let Some(cache) = &self.cache else {
            return self.malloc_driver(shard, size, stream, false).map(Some);
        };
        let class = match self.cache_config.class_for(size) {
            Some(class) if !self.epoch.capturing() && self.deferred.is_empty() => class,
            _ => return self.malloc_driver(shard, size, stream, false).map(Some),
        };
        // The cache tier: the bytes first (the limit is exact), then an idle block.
        if shard.budget.reserve(size).is_err() {
            return self.malloc_driver(shard, size, stream, false).map(Some);
        }
        let note = |r: &Record| {
            self.driver.note_reuse(device, r.dptr(), r.alloc_size as usize, stream);
        };
        match cache.take(device, class, stream, note) {
            Some(rec) => {
                rec.reuse(size, G::STATE);
                Ok(Some(G::reused(rec)))
            }
            None => self.malloc_driver(shard, size, stream, true).map(Some),
        }
    }

    /// The driver tier of malloc: one read section, the exact budget reservation (unless
    /// `reserved`), the driver call (for the class size when the block may be cached
    /// later), the map insert.
    fn malloc_driver<G: Grant>(
        &self,
        shard: &Shard,
        size: u64,
        stream: Stream,
        reserved: bool,
    ) -> Result<G> {
        let device = shard.device;
        let section = self.epoch.enter();
        let ready = (|| {
            if !section.capturing() && !self.deferred.is_empty() {
                self.flush_deferred(&section)?;
            }
            self.lazy_init(shard)?;
            if self.check_errors {
                self.driver.check_last_error(device)?;
            }
            Ok(())
        })();
        if let Err(e) = ready {
            if reserved {
                shard.budget.release(size);
            }
            return Err(e);
        }
        if !reserved && shard.budget.reserve(size).is_err() {
            return Err(self.oom(device, size));
        }
        let captured = section.capturing();
        let cacheable =
            self.cache.is_some() && !captured && self.cache_config.class_for(size).is_some();
        let mut alloc_size = if cacheable { FrontCache::alloc_size(size) } else { size };
        if let Some(cache) = &self.cache
            && !captured
        {
            // Lean policy: idle blocks of this stream go back first, on this stream, so
            // the driver's pool serves the request from them instead of growing.
            for rec in cache.before_miss(device, stream, alloc_size) {
                if let Err(e) = self.free_idle(&rec, stream) {
                    log::error!("releasing an idle block to the driver failed: {e}");
                    cache.put_back(vec![rec]);
                }
            }
        }
        let mut result = self.driver.malloc_async(device, alloc_size as usize, stream);
        if matches!(&result, Err(e) if e.is_oom()) && !captured {
            // Pressure: idle blocks of every stream, or a trial block a failed cache_info
            // free left behind, may be what the driver is missing. Give them back and ask
            // for the exact size, as the seed does (S3).
            let flushed = self.flush_device(shard, &section).unwrap_or(0);
            let orphans = self.free_orphans(&section).unwrap_or(false);
            if flushed > 0 || orphans || alloc_size != size {
                shard.alloc_retries.fetch_add(1, Ordering::Relaxed);
                alloc_size = size;
                result = self.driver.malloc_async(device, size as usize, stream);
            }
        }
        let ptr = match result {
            Ok(ptr) => ptr,
            Err(e) => {
                shard.budget.release(size);
                return Err(if e.is_oom() { self.oom(device, size) } else { e.into() });
            }
        };
        self.history.note(Action::SegmentAlloc, device, ptr.as_raw(), alloc_size, stream);
        let state = G::STATE;
        let rec = Record::new(ptr, device, size, alloc_size, stream, captured, cacheable, state);
        let rec = Record::shared(rec);
        let grant = G::fresh(&rec);
        if let Some(stale) = self.blocks.insert(rec) {
            // The driver handed out an address we hold: its books and ours disagree.
            // Keep the newer block; the older one's bytes go with it (a handle's block
            // is left to its handle, the only one that moves it on).
            log::error!("driver returned held address {ptr} again (old block {stale:?})");
            if stale.transition(LIVE, GONE) {
                self.shards[stale.device()].budget.release(stale.size());
            }
        }
        Ok(grant)
    }

    /// free for both APIs (S4/S5) of a block the caller owns in state `from` (`LIVE`, or
    /// `HANDLE` for its handle): into the front cache when it may go there, else through
    /// the driver tier.
    #[inline(always)]
    fn release(&self, rec: Arc<Record>, from: u8) -> Result<()> {
        // The cache tier makes no driver call, so it needs no read section: a capture
        // that begins after this load finds the block idle, where a capture never takes
        // it from.
        if let Some(cache) = &self.cache
            && !self.epoch.capturing()
            && !rec.captured
            && rec.class != NO_CLASS
            && !rec.has_recorded()
        {
            let size = rec.size();
            if !rec.leave(from, CACHED) {
                return Err(self.unknown_or_double_free(rec.dptr()));
            }
            let device = rec.device();
            self.history_free(&rec, size, true);
            self.shards[device].budget.release(size);
            let note = |r: &Record| {
                let (ptr, bytes) = (r.dptr(), r.alloc_size as usize);
                self.driver.note_cached(device, ptr, bytes, r.creation_stream);
            };
            if let Some(released) = cache.put(rec, note) {
                self.release_idle(released);
            }
            return Ok(());
        }
        self.release_driver(rec, from)
    }

    /// The driver tier of free (S4, S5): deferred during a capture, else freed through
    /// the driver. A driver failure leaves the block live: the books stay exact and the
    /// caller may retry.
    fn release_driver(&self, rec: Arc<Record>, from: u8) -> Result<()> {
        let ptr = rec.dptr();
        let section = self.epoch.enter();
        if section.capturing() && !rec.captured {
            if !rec.leave(from, DEFERRED) {
                return Err(self.unknown_or_double_free(ptr));
            }
            self.history_free(&rec, rec.size(), false);
            self.warnings.uncaptured_free_during_capture(ptr);
            self.deferred.push(ptr.as_raw());
            return Ok(());
        }
        if !rec.leave(from, GONE) {
            return Err(self.unknown_or_double_free(ptr));
        }
        // Out of the map before the driver free: the driver may hand the address out
        // again at once, and the new block's record must not be the one removed.
        drop(self.blocks.remove(&rec));
        self.free_and_retire(rec, &section)
    }

    /// The pointer API's free when the front cache is off: the block goes `LIVE` →
    /// `GONE` and out of the map in one map operation (the driver tier's path without
    /// the lookup before it). Anything else (a handle's block, a double free, a free
    /// deferred by a capture) takes the general path.
    fn free_uncached(&self, ptr: DevicePtr) -> Result<()> {
        let section = self.epoch.enter();
        let capturing = section.capturing();
        let taken = self
            .blocks
            .remove_if(ptr.as_raw(), |r| (r.captured || !capturing) && r.transition(LIVE, GONE));
        match taken {
            Some(rec) => self.free_and_retire(rec, &section),
            None => {
                drop(section);
                self.free_looked_up(ptr)
            }
        }
    }

    /// The pointer API's free through a lookup of the block's record.
    fn free_looked_up(&self, ptr: DevicePtr) -> Result<()> {
        match self.blocks.get(ptr.as_raw()) {
            Some(rec) if rec.state() == HANDLE => Err(Error::OwnedByHandle { ptr }),
            Some(rec) => self.release(rec, LIVE),
            None => Err(self.unknown_or_double_free(ptr)),
        }
    }

    /// `free_gone`, then the record kept as a spare if nobody else holds it. Each arm
    /// returns its own value: one result kept across the retire call would be copied
    /// back through the stack (a store-forwarding stall per free).
    #[inline(always)]
    fn free_and_retire(&self, rec: Arc<Record>, section: &Section<'_>) -> Result<()> {
        match self.free_gone(&rec, section) {
            Ok(()) => {
                Record::retire(rec);
                Ok(())
            }
            Err(e) => {
                Record::retire(rec);
                Err(e)
            }
        }
    }

    /// Frees a block its caller moved to `GONE` and took out of the map: the S23 check,
    /// the driver free, the books. On an error the block is back in the map, `LIVE`.
    #[inline(always)]
    fn free_gone(&self, rec: &Arc<Record>, section: &Section<'_>) -> Result<()> {
        let ptr = rec.dptr();
        let checked =
            if self.check_errors { self.driver.check_last_error(rec.device()) } else { Ok(()) };
        let result = match checked {
            Ok(()) => {
                if rec.captured && !section.capturing() {
                    self.warnings.captured_free_outside_capture(ptr);
                }
                self.free_impl(rec, section)
            }
            Err(e) => Err(e.into()),
        };
        match &result {
            Ok(()) => self.history_free(rec, rec.size(), true),
            Err(_) => {
                let _none = self.blocks.insert(rec.clone());
                rec.transition(GONE, LIVE);
            }
        }
        result
    }

    /// S5: issues the driver free of a block (state `GONE`, out of the map, owned by the
    /// caller) and gives its bytes back.
    #[inline(always)]
    fn free_impl(&self, rec: &Arc<Record>, section: &Section<'_>) -> Result<()> {
        let key = rec.ptr;
        let device = rec.device();
        let unifying = self.shards[device].unifying.get().copied();
        let free_stream = issue_free(&*self.driver, rec, &rec.recorded(), unifying)?;
        if section.capturing()
            && let Some(capture) = self.capture.load().as_ref()
        {
            self.remember_free_stream(capture, free_stream);
        }
        self.shards[device].budget.release(rec.size());
        self.freed.freed(key);
        self.history.note(Action::SegmentFree, device, key, rec.alloc_size, rec.creation_stream);
        Ok(())
    }

    // ----- giving idle blocks back to the driver -----------------------------------------

    /// Frees what the cache's release policy gave back: the stream's own blocks on their
    /// creation stream (in use by the caller right now), blocks of quiet stream caches
    /// after a device synchronize. Not during a capture: they go back to the cache.
    fn release_idle(&self, released: Released) {
        let section = self.epoch.enter();
        if section.capturing() {
            if let Some(cache) = &self.cache {
                cache.put_back(released.own);
                cache.put_back(released.others);
            }
            return;
        }
        let mut failed = Vec::new();
        for rec in released.own {
            if let Err(e) = self.free_idle(&rec, rec.creation_stream) {
                log::error!("releasing an idle block to the driver failed: {e}");
                failed.push(rec);
            }
        }
        if let Some(device) = released.others.first().map(|r| r.device())
            && let Err(e) = self.release_synced(&self.shards[device], released.others)
        {
            log::error!("releasing idle blocks of quiet streams failed: {e}");
        }
        if let Some(cache) = &self.cache {
            cache.put_back(failed);
        }
    }

    /// Frees one idle block (state `CACHED`, off its free list) on `stream`.
    fn free_idle(&self, rec: &Arc<Record>, stream: Stream) -> Result<()> {
        let ok = rec.transition(CACHED, GONE);
        debug_assert!(ok, "an idle block off a free list");
        let _map_ref = self.blocks.remove(rec);
        let bytes = rec.alloc_size as usize;
        if let Err(e) = self.driver.free_async(rec.device(), rec.dptr(), bytes, stream) {
            let _none = self.blocks.insert(rec.clone());
            rec.transition(GONE, CACHED);
            return Err(e.into());
        }
        self.freed.freed(rec.ptr);
        let (d, s) = (rec.device(), rec.creation_stream);
        self.history.note(Action::SegmentFree, d, rec.ptr, rec.alloc_size, s);
        Ok(())
    }

    /// Frees idle blocks after a device synchronize (every use of an idle block was
    /// enqueued before it went idle, so all are complete), on the device's unifying
    /// stream, which the allocator owns: the stream a block was cached for may have been
    /// destroyed by its owner since. Blocks the driver refuses go back to the cache.
    /// Call inside a read section that saw no capture.
    fn release_synced(&self, shard: &Shard, blocks: Vec<Arc<Record>>) -> Result<usize> {
        if blocks.is_empty() {
            return Ok(0);
        }
        let unifying = *shard.unifying.get().expect("idle blocks imply an initialized device");
        let mut first_error = self.driver.device_synchronize(shard.device).err().map(Error::from);
        let mut failed = Vec::new();
        let mut freed = 0;
        for rec in blocks {
            if first_error.is_none() {
                match self.free_idle(&rec, unifying) {
                    Ok(()) => freed += 1,
                    Err(e) => {
                        first_error = Some(e);
                        failed.push(rec);
                    }
                }
            } else {
                failed.push(rec);
            }
        }
        if let Some(cache) = &self.cache {
            cache.put_back(failed);
        }
        first_error.map_or(Ok(freed), Err)
    }

    /// Gives every idle block of `shard`'s device back to the driver. Returns how many.
    /// Call inside a read section that saw no capture.
    fn flush_device(&self, shard: &Shard, section: &Section<'_>) -> Result<usize> {
        debug_assert!(!section.capturing());
        match &self.cache {
            Some(cache) => self.release_synced(shard, cache.drain_device(shard.device)),
            None => Ok(0),
        }
    }

    /// S15: a free stream of the capture must rejoin the capture stream before the
    /// capture ends. With the origin known the join is made at once (PyTorch ends the
    /// stream capture before it tells the allocator, so a join at `end_capture` would
    /// come too late); otherwise, or if the join fails, at `end_capture`.
    fn remember_free_stream(&self, capture: &Capture, free_stream: UsageStream) {
        match capture.origin {
            Some(origin) if origin == free_stream => {}
            Some(origin) if self.driver.sync_streams(free_stream, origin).is_ok() => {}
            _ => {
                capture.free_streams.insert(free_stream);
            }
        }
    }

    /// S14 with the capture stream named: as `begin_capture`, and every stream a free is
    /// issued on during the capture is joined back into `origin` right after that free,
    /// so the capture may end (`cudaStreamEndCapture`) before `end_capture` is called,
    /// as PyTorch's `CUDAGraph::capture_end` does.
    pub fn begin_capture_on(&self, device: Device, origin: Stream) -> Result<()> {
        self.shard(device)?;
        let origin = Some(UsageStream::new(origin, device));
        self.epoch.transition(
            |underway| if underway { Err(Error::CaptureAlreadyUnderway) } else { Ok(()) },
            || self.capture.store(Some(Arc::new(Capture { origin, ..Capture::default() }))),
            || (),
        )
    }

    /// S4: frees whose turn came because no capture is underway any more.
    fn flush_deferred(&self, section: &Section<'_>) -> Result<()> {
        while let Some(ptr) = self.deferred.pop() {
            let rec = self.blocks.get(ptr);
            let Some(rec) = rec.filter(|r| r.transition(DEFERRED, GONE)) else { continue };
            let _map_ref = self.blocks.remove(&rec);
            if let Err(e) = self.free_impl(&rec, section) {
                let _none = self.blocks.insert(rec.clone());
                rec.transition(GONE, DEFERRED);
                self.deferred.push(ptr);
                return Err(e);
            }
            let (d, s) = (rec.device(), rec.creation_stream);
            self.history.note(Action::FreeCompleted, d, ptr, rec.size(), s);
        }
        Ok(())
    }

    /// Frees the orphaned `cache_info` trial blocks (none while a capture is underway:
    /// their streams may be capturing). Returns whether any was freed.
    fn free_orphans(&self, section: &Section<'_>) -> Result<bool> {
        if section.capturing() {
            return Ok(false);
        }
        let mut freed_any = false;
        // At most the current length: a failing free is pushed back, not retried here.
        for _ in 0..self.orphans.len() {
            let Some(o) = self.orphans.pop() else { break };
            if let Err(e) = self.driver.free_async(o.device, o.ptr, o.size as usize, o.stream) {
                self.orphans.push(o);
                return Err(e.into());
            }
            freed_any = true;
        }
        Ok(freed_any)
    }

    /// The deferred-free flush for callers outside malloc (tests, empty_cache users).
    pub fn flush_deferred_frees(&self) -> Result<()> {
        let section = self.epoch.enter();
        if section.capturing() {
            return Ok(());
        }
        self.flush_deferred(&section)
    }

    /// Blocks idle in the front cache on `device`: (address, bytes, stream they serve).
    pub fn idle_blocks(&self, device: Device) -> Vec<(DevicePtr, u64, Stream)> {
        let Some(cache) = &self.cache else { return Vec::new() };
        let mut v: Vec<_> = cache
            .idle_blocks(device)
            .into_iter()
            .map(|(p, size, s)| (DevicePtr::from_raw(p), size, s))
            .collect();
        v.sort_by_key(|b| b.0);
        v
    }
}

impl<D: Driver> StreamOrderedAllocator for StreamAlloc<D> {
    fn name(&self) -> &'static str {
        "streamalloc"
    }

    fn device_count(&self) -> usize {
        self.shards.len()
    }

    fn malloc(&self, device: Device, size: usize, stream: Stream) -> Result<DevicePtr> {
        Ok(self.acquire_noted(device, size as u64, stream)?.unwrap_or(DevicePtr::NULL))
    }

    fn free(&self, ptr: DevicePtr) -> Result<()> {
        if ptr.is_null() {
            return Ok(());
        }
        match &self.cache {
            None => self.free_uncached(ptr),
            Some(_) => self.free_looked_up(ptr),
        }
    }

    fn record_stream(&self, ptr: DevicePtr, stream: UsageStream) -> Result<()> {
        if ptr.is_null() {
            return Ok(());
        }
        let rec = self.live_record(ptr)?;
        self.record_on(&rec, stream)
    }

    fn set_memory_fraction(&self, fraction: f64, device: Device) -> Result<()> {
        if !(0.0..=1.0).contains(&fraction) {
            return Err(Error::InvalidFraction { fraction });
        }
        let shard = self.lazy_init(self.shard(device)?)?;
        let info = self.driver.mem_get_info(device)?;
        shard.budget.set_limit((fraction * info.total as f64) as u64);
        Ok(())
    }

    /// S8, with the cache flushed first: idle blocks go back to the driver, then each
    /// initialized device is synchronized and its pool trimmed to 0. The driver calls
    /// run in a read section, so no capture begins in their midst.
    fn empty_cache(&self) -> Result<()> {
        let section = self.epoch.enter();
        let mut first_error = self.free_orphans(&section).err();
        if !section.capturing() {
            for shard in self.shards.iter().filter(|s| s.unifying.get().is_some()) {
                if let Err(e) = self.flush_device(shard, &section) {
                    first_error.get_or_insert(e);
                }
            }
        }
        for shard in self.shards.iter().filter(|s| s.unifying.get().is_some()) {
            let r = self
                .driver
                .device_synchronize(shard.device)
                .and_then(|_| self.driver.pool_trim_to(shard.device, 0));
            if let Err(e) = r {
                first_error.get_or_insert(e.into());
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// S9, in a read section (a capture cannot begin between the trial malloc and free).
    fn cache_info(&self, device: Device, stream: Stream) -> Result<u64> {
        let shard = self.lazy_init(self.shard(device)?)?;
        let section = self.epoch.enter();
        self.free_orphans(&section)?;
        let info = self.driver.mem_get_info(device)?;
        let used = shard.budget.used();
        let limit = shard.budget.limit();
        let mut guess = info.free.min(limit.saturating_sub(used));
        self.driver.check_last_error(device)?;
        loop {
            if guess == 0 {
                return Ok(0);
            }
            if used.saturating_add(guess) <= limit {
                match self.driver.malloc_async(device, guess as usize, stream) {
                    Ok(ptr) => {
                        if let Err(e) = self.driver.free_async(device, ptr, guess as usize, stream)
                        {
                            let size = guess;
                            self.orphans.push(Orphan { device, ptr, size, stream });
                            return Err(e.into());
                        }
                        return Ok(guess);
                    }
                    Err(e) if e.is_oom() => {}
                    Err(e) => return Err(e.into()),
                }
            }
            guess >>= 1;
        }
    }

    fn device_of(&self, ptr: DevicePtr) -> Result<(Device, u64)> {
        let found = self.blocks.peek(ptr.as_raw(), |r| {
            r.filter(|r| is_live(r.state())).map(|r| (r.device(), r.size()))
        });
        match found {
            Some(found) => Ok(found),
            _ => Err(self.unknown_or_double_free(ptr)),
        }
    }

    fn base_allocation(&self, ptr: DevicePtr) -> Result<(DevicePtr, u64)> {
        let size = self.blocks.peek(ptr.as_raw(), |r| {
            r.filter(|r| matches!(r.state(), LIVE | HANDLE | DEFERRED)).map(|r| r.size())
        });
        match size {
            Some(size) => Ok((ptr, size)),
            _ => Err(self.unknown_or_double_free(ptr)),
        }
    }

    fn device_stats(&self, device: Device) -> Result<DeviceStats> {
        let shard = self.shard(device)?;
        if shard.unifying.get().is_none() {
            return Ok(DeviceStats::default());
        }
        let stats = crate::api::pool_stats(&self.driver, device)?;
        let cache = self.cache.as_ref().map(|c| c.stats(device)).unwrap_or_default();
        Ok(DeviceStats {
            allocated_current: self.used_bytes(device),
            cached_current: cache.cached,
            cache_hits: cache.hits,
            cache_misses: cache.misses,
            cache_streams: cache.streams,
            alloc_retries: shard.alloc_retries.load(Ordering::Relaxed),
            ..stats
        })
    }

    fn reset_peak_stats(&self, device: Device) -> Result<()> {
        self.shard(device)?;
        crate::api::reset_pool_peaks(&self.driver, device)
    }

    fn reset_accumulated_stats(&self, device: Device) -> Result<()> {
        self.shard(device)?;
        self.warnings.reset_accumulated_stats();
        Ok(())
    }

    fn begin_capture(&self, device: Device) -> Result<()> {
        self.shard(device)?;
        self.epoch.transition(
            |underway| if underway { Err(Error::CaptureAlreadyUnderway) } else { Ok(()) },
            || self.capture.store(Some(Arc::new(Capture::default()))),
            || (),
        )
    }

    fn end_capture(&self, device: Device, capture_stream: Stream) -> Result<()> {
        self.shard(device)?;
        let capture = self.epoch.transition(
            |underway| if underway { Ok(()) } else { Err(Error::NoCaptureUnderway) },
            || (),
            || self.capture.swap(None),
        )?;
        // Every free that saw the capture has finished (grace period): join its streams.
        let target = UsageStream::new(capture_stream, device);
        if let Some(capture) = capture {
            for free_stream in capture.free_streams.iter() {
                self.driver.sync_streams(*free_stream, target)?;
            }
        }
        Ok(())
    }

    fn enable_peer_access(&self, accessor: Device, owner: Device) -> Result<()> {
        self.shard(accessor)?;
        self.shard(owner)?;
        self.driver.pool_set_access(owner, accessor)?;
        Ok(())
    }

    fn memcpy_async(
        &self,
        dst: DevicePtr,
        dst_device: Device,
        src: DevicePtr,
        src_device: Device,
        count: usize,
        stream: UsageStream,
        p2p_enabled: bool,
    ) -> Result<()> {
        let d = &self.driver;
        crate::api::copy_async(d, dst, dst_device, src, src_device, count, stream, p2p_enabled)
    }

    fn copy_data(
        &self,
        device: Device,
        dst: DevicePtr,
        src: DevicePtr,
        count: usize,
    ) -> Result<()> {
        self.driver.memcpy(device, dst, src, count)?;
        Ok(())
    }

    fn warnings(&self) -> WarningCounts {
        self.warnings.counts()
    }

    fn capture_underway(&self) -> bool {
        self.epoch.capturing()
    }

    /// Bytes in live allocations (exact when no operation is in flight).
    fn used_bytes(&self, device: Device) -> u64 {
        self.shards.get(device).map_or(0, |s| s.budget.used())
    }

    fn memory_limit(&self, device: Device) -> u64 {
        self.shards.get(device).map_or(u64::MAX, |s| s.budget.limit())
    }

    fn snapshot(&self) -> Vec<BlockSnapshot> {
        let mut v: Vec<BlockSnapshot> = self
            .blocks
            .collect(|r| matches!(r.state(), LIVE | HANDLE | DEFERRED).then(|| r.snapshot()));
        v.sort_by_key(|b| b.ptr);
        v
    }
}

impl<D: Driver> StreamAlloc<D> {
    /// S6 on a live block's record.
    fn record_on(&self, rec: &Record, stream: UsageStream) -> Result<()> {
        crate::api::check_stream(&self.driver, self.shards.len(), stream)?;
        if stream == rec.creation() {
            self.warnings.record_on_creation_stream();
            return Ok(());
        }
        rec.record(stream);
        Ok(())
    }
}

impl<D: Driver> Drop for StreamAlloc<D> {
    /// Gives the front cache's idle blocks and the frees deferred by a capture back to
    /// the driver (live blocks are their owners'). During a capture a block whose
    /// streams capture cannot be freed yet (the free would join the graph): a reaper
    /// thread, which shares the driver, frees it once those streams have left capture.
    fn drop(&mut self) {
        let section = self.epoch.enter();
        if !section.capturing() {
            for shard in self.shards.iter().filter(|s| s.unifying.get().is_some()) {
                if let Err(e) = self.flush_device(shard, &section) {
                    log::error!("releasing idle blocks of device {} failed: {e}", shard.device);
                }
            }
            if let Err(e) = self.flush_deferred(&section) {
                log::error!("a deferred free failed as the allocator was dropped: {e}");
            }
            return;
        }
        let mut waiting: Vec<Detached> = Vec::new();
        let idle = self
            .cache
            .iter()
            .flat_map(|c| self.shards.iter().flat_map(move |s| c.drain_device(s.device)));
        let deferred = std::iter::from_fn(|| self.deferred.pop())
            .filter_map(|ptr| self.blocks.get(ptr))
            .filter(|rec| rec.transition(DEFERRED, GONE));
        for rec in idle.chain(deferred).collect::<Vec<_>>() {
            let unifying = self.shards[rec.device()].unifying.get().copied();
            let block = Detached { rec, unifying };
            if !block.free_when_quiet(&*self.driver) {
                waiting.push(block);
            }
        }
        if waiting.is_empty() {
            return;
        }
        let driver = Arc::clone(&self.driver);
        let reaper = move || {
            let mut pause = Duration::from_millis(1);
            while !waiting.is_empty() {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(100));
                waiting.retain(|b| !b.free_when_quiet(&*driver));
            }
        };
        let spawned = std::thread::Builder::new().name("streamalloc-reaper".into()).spawn(reaper);
        if let Err(e) = spawned {
            log::error!(
                "allocator dropped during a capture, no reaper thread ({e}): idle blocks stay with the driver"
            );
        }
    }
}

/// The driver free of a block (S5): on its creation stream, or, for a block used on
/// other streams (`recorded`), on the device's unifying stream after every stream it was
/// used on. Returns the stream the free was issued on. A block with recorded streams
/// lives on an initialized device, whose unifying stream exists.
#[inline(always)]
fn issue_free<L: Driver>(
    driver: &L,
    rec: &Record,
    recorded: &[UsageStream],
    unifying: Option<Stream>,
) -> DriverResult<UsageStream> {
    let (device, bytes, creation) = (rec.device(), rec.alloc_size as usize, rec.creation());
    let free_on = match unifying {
        Some(u) if !recorded.is_empty() => {
            let u = UsageStream::new(u, device);
            driver.sync_streams(creation, u)?;
            for &used_on in recorded {
                driver.sync_streams(used_on, u)?;
            }
            u
        }
        _ => creation,
    };
    driver.free_async(device, rec.dptr(), bytes, free_on.stream)?;
    Ok(free_on)
}

/// An idle or deferred block of a dropped allocator, freed by nobody but the driver.
struct Detached {
    rec: Arc<Record>,
    /// Its device's unifying stream, for a block used on other streams.
    unifying: Option<Stream>,
}

impl Detached {
    /// Frees the block once none of its streams captures (the free must not join a
    /// graph): on its creation stream, or, for a block used on other streams, on the
    /// unifying stream after every stream it was used on. Returns false while it must
    /// wait; true when freed or given up on (a driver error, logged: the block stays
    /// with the driver).
    fn free_when_quiet<L: Driver>(&self, driver: &L) -> bool {
        let rec = &self.rec;
        let creation = rec.creation();
        let recorded = rec.recorded();
        let quiet = |s: UsageStream| {
            !matches!(
                driver.capture_status(s),
                Ok(CaptureStatus::Active | CaptureStatus::Invalidated)
            )
        };
        if !quiet(creation) || !recorded.iter().all(|&s| quiet(s)) {
            return false;
        }
        if let Err(e) = issue_free(driver, rec, &recorded, self.unifying) {
            log::error!("freeing block {} of a dropped allocator failed: {e}", rec.dptr());
        }
        true
    }
}

/// A block freed when dropped, like PyTorch's `DataPtr`.
///
/// It holds the block's record, so dropping it needs no lookup. The pointer API sees
/// the block too (`base_allocation`, `record_stream`, `snapshot`) but refuses to free
/// it: only the handle does.
pub struct Block<'a, D: Driver> {
    alloc: &'a StreamAlloc<D>,
    /// `None` for a zero-size block.
    rec: Option<Arc<Record>>,
    size: usize,
    device: Device,
    stream: Stream,
}

impl<D: Driver> Block<'_, D> {
    /// The device address (null for a zero-size block).
    pub fn ptr(&self) -> DevicePtr {
        self.rec.as_ref().map_or(DevicePtr::NULL, |r| r.dptr())
    }

    /// The requested size.
    pub fn size(&self) -> usize {
        self.size
    }

    /// The device the block lives on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The stream the block was allocated on (its creation stream).
    pub fn stream(&self) -> Stream {
        self.stream
    }

    /// S6: records that the block is used on `stream` (it is then freed through the
    /// unifying stream, after that stream's work).
    pub fn record_stream(&self, stream: UsageStream) -> Result<()> {
        match &self.rec {
            Some(rec) => self.alloc.record_on(rec, stream),
            None => Ok(()),
        }
    }

    /// Frees now and reports any error (dropping frees too, but can only log errors).
    /// After a failed free the block stays live and the pointer API may free it.
    pub fn free(mut self) -> Result<()> {
        self.release()
    }

    fn release(&mut self) -> Result<()> {
        let Some(rec) = self.rec.take() else { return Ok(()) };
        // If the free fails the block is left `LIVE`: the pointer API may then free it.
        self.alloc.release(rec, HANDLE)
    }
}

impl<D: Driver> Drop for Block<'_, D> {
    /// Frees the block. A failed free leaves it `LIVE` in the map (as `Block::free`
    /// does); with no caller to hand the error to, the drop logs it and tries once more
    /// through the pointer API: an earlier asynchronous error that the S23 check reported
    /// has been consumed by then (a sticky CUDA error fails the retry too, and the block
    /// stays for the pointer API).
    fn drop(&mut self) {
        let ptr = self.ptr();
        if let Err(e) = self.release() {
            log::error!("freeing block {ptr} on drop failed: {e}");
            if let Err(e) = self.alloc.free(ptr) {
                log::error!("freeing block {ptr} on drop failed again: {e}");
            }
        }
    }
}
