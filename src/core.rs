//! The lock-free allocator: [`StreamAlloc`].
//!
//! ```text
//!            malloc / free / record_stream (any thread)
//!                          │
//!   ┌──────────────────────┼─────────────────────────────────────────────┐
//!   │ EpochGate  one word: even = no capture, odd = capture (+ grace)    │
//!   ├──────────────────────┼─────────────────────────────────────────────┤
//!   │ blocks: DashMap<address, BlockInfo>  (pointer hasher, 128 shards)   │
//!   ├──────────────┬───────┴──────┬──────────────┬───────────────────────┤
//!   │ Shard dev 0  │ Shard dev 1  │ ...          │ deferred frees        │
//!   │  Budget      │  Budget      │              │ (SegQueue, S4)        │
//!   │  unifying    │  unifying    │              │                       │
//!   │  free stream │  free stream │              │                       │
//!   └──────────────┴──────────────┴──────────────┴───────────────────────┘
//!                          │
//!                     Driver (cuda / sim / null)
//! ```
//!
//! No lock is shared by all threads: block metadata lives in a sharded concurrent map,
//! bytes in per-device atomics, capture state in the epoch gate. Locks exist only for a
//! device's first use and for capture transitions.

use crate::api::{BlockSnapshot, DeviceStats, StreamOrderedAllocator};
use crate::budget::Budget;
use crate::cache::{CACHE_CREDIT, CacheConfig, PUBLISH_STEP, StreamCache, class_of};
use crate::driver::Driver;
use crate::epoch::{EpochGate, Section};
use crate::error::{Error, OutOfMemory, Result};
use crate::freed::FreedTable;
use crate::lane::{DriverLane, Laned};
use crate::types::{Device, DevicePtr, Stream, UsageStream};
use crate::warn::{WarningCounts, Warnings};
use arc_swap::ArcSwapOption;
use crossbeam::queue::SegQueue;
use crossbeam::utils::CachePadded;
use dashmap::{DashMap, DashSet};
use std::cell::{Cell, RefCell};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// Allocations of this size or more are refused outright (S3), as the seed does.
pub const ONE_EXBIBYTE: u64 = 1 << 60;

/// Shards of the block map (dashmap's shard count; a power of two).
const MAP_SHARDS: usize = 256;
/// Addresses within one 2 MiB granule go to the same map shard.
const GRANULE_SHIFT: u32 = 21;

/// A cheap hasher for device addresses, shaped for the block map.
///
/// dashmap picks a shard from the 8 bits below the top 7 (those are hashbrown's tag),
/// hashbrown a bucket from the low bits. Here the tag and the bucket bits come from a
/// Fibonacci hash of the whole address, but the shard bits from a hash of its 2 MiB
/// *granule*: a thread that keeps reusing its own blocks (a stream's cache, a null
/// driver's per-thread range) keeps to its own shards, so their lock and data lines stay
/// in its core's cache instead of moving between cores on every operation. Blocks of
/// different threads in one granule share a shard, as with any hash.
#[derive(Default, Clone, Copy)]
pub struct PtrHasher(u64);

/// The bits of the hash that select the map shard (see [`PtrHasher`]).
const SHARD_BITS: u64 = ((MAP_SHARDS as u64) - 1) << (64 - 7 - MAP_SHARDS.trailing_zeros());

impl Hasher for PtrHasher {
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }

    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        // Only used for non-u64 keys; FNV-1a.
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    }

    #[inline]
    fn write_u64(&mut self, v: u64) {
        let whole = (v ^ (v >> 29)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let granule = (v >> GRANULE_SHIFT).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        self.0 = (whole & !SHARD_BITS) | (granule & SHARD_BITS);
    }
}

type PtrMap<V> = DashMap<u64, V, BuildHasherDefault<PtrHasher>>;

/// What the allocator knows about one live block (the seed's `PtrUsage`).
///
/// Kept small: 40 bytes of value plus the 8-byte key and hashbrown's control byte.
#[derive(Clone, Debug)]
pub(crate) struct BlockInfo {
    pub(crate) size: u64,
    pub(crate) creation_stream: Stream,
    pub(crate) device: u32,
    pub(crate) captured: bool,
    pub(crate) free_deferred: bool,
    /// Streams recorded with `record_stream` (rare: boxed so the common block carries
    /// one thin pointer, 8 bytes, instead of a 24-byte `Vec`).
    #[allow(clippy::box_collection)]
    pub(crate) recorded: Option<Box<Vec<UsageStream>>>,
}

impl BlockInfo {
    pub(crate) fn creation(&self) -> UsageStream {
        UsageStream::new(self.creation_stream, self.device as Device)
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
    /// Bytes held by this device's stream caches, as they last published them (within
    /// `PUBLISH_STEP` per stream cache of the truth).
    cached: AtomicU64,
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
pub struct StreamAlloc<D: Driver> {
    /// The driver behind its lane (`src/lane/`): every driver call goes through it.
    driver: Laned<D>,
    shards: Box<[Shard]>,
    blocks: PtrMap<BlockInfo>,
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
    /// The front cache's settings and its per-(device, stream) caches.
    cache: CacheConfig,
    caches: DashMap<(Device, Stream), Arc<StreamCache>>,
    /// Tells this allocator's entries apart in the per-thread stream-cache memo.
    id: u64,
    /// S23: ask the driver for an earlier error before each driver-tier malloc and free
    /// (not where its malloc and free report such errors themselves: CUDA).
    check_errors: bool,
}

/// What a cache lookup found.
enum Take {
    Hit(u64),
    /// Nothing cached in this class: go to the driver.
    Miss,
    /// A block was there but the budget refused its bytes: take the exact path.
    NoCredit,
}

/// A memo entry: (allocator id, device, stream, that stream's cache).
type MemoEntry = (u64, Device, Stream, Arc<StreamCache>);

thread_local! {
    /// The stream caches this thread used last.
    static MEMO: RefCell<Vec<MemoEntry>> = const { RefCell::new(Vec::new()) };
}
const MEMO_ENTRIES: usize = 4;

/// A trial block of `cache_info` that could not be freed: device, address, size, and
/// the stream it was allocated on (its free must be ordered after that).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Orphan {
    pub(crate) device: Device,
    pub(crate) ptr: DevicePtr,
    pub(crate) size: u64,
    pub(crate) stream: Stream,
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
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let shards = (0..device_count)
            .map(|device| Shard {
                device,
                budget: CachePadded::new(Budget::new()),
                unifying: OnceLock::new(),
                init: Mutex::new(()),
                cached: AtomicU64::new(0),
            })
            .collect();
        StreamAlloc {
            check_errors: !driver.calls_report_prior_errors(),
            driver: Laned::auto(driver),
            shards,
            blocks: DashMap::with_hasher_and_shard_amount(
                BuildHasherDefault::default(),
                MAP_SHARDS,
            ),
            epoch: EpochGate::new(),
            capture: ArcSwapOption::empty(),
            deferred: SegQueue::new(),
            freed: FreedTable::new(),
            orphans: SegQueue::new(),
            warnings: Warnings::default(),
            cache,
            caches: DashMap::new(),
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
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
        self.cache
    }

    /// The driver underneath.
    pub fn driver(&self) -> &D {
        self.driver.inner()
    }

    /// Allocates a block freed when the returned handle drops (like PyTorch's DataPtr).
    ///
    /// A block served by the front cache carries its own metadata in the handle and is
    /// not entered in the allocator's map: dropping it costs no lookup. Such blocks count
    /// in `used_bytes` but are not listed by `snapshot` (they enter the map, and the
    /// snapshot, when `record_stream` is called on them).
    pub fn allocate(&self, device: Device, size: usize, stream: Stream) -> Result<Block<'_, D>> {
        let size64 = size as u64;
        if size64 >= ONE_EXBIBYTE {
            return Err(Error::TooLarge { requested: size64 });
        }
        let block = |ptr, tracked| Block {
            alloc: self,
            ptr,
            size,
            device,
            stream,
            tracked: Cell::new(tracked),
        };
        if size == 0 {
            return Ok(block(DevicePtr::NULL, true));
        }
        let shard = self.shard(device)?;
        if let Some(ptr) = self.try_cached(shard, size64, stream) {
            return Ok(block(DevicePtr::from_raw(ptr), false));
        }
        let cacheable = self.cacheable_size(size64);
        let (ptr, captured) = self.malloc_driver(shard, size64, stream, !cacheable)?;
        Ok(block(ptr, captured || !cacheable))
    }

    fn shard(&self, device: Device) -> Result<&Shard> {
        self.shards
            .get(device)
            .ok_or(Error::InvalidDevice { device: device as i64, device_count: self.shards.len() })
    }

    /// S2: the device's first use configures its pool and makes its unifying stream.
    fn lazy_init<'a>(&self, shard: &'a Shard) -> Result<&'a Shard> {
        if shard.unifying.get().is_none() {
            let _g = shard.init.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if shard.unifying.get().is_none() {
                self.driver.init_device(shard.device)?;
                let stream = self.driver.create_stream(shard.device)?;
                let _ = shard.unifying.set(stream);
            }
        }
        Ok(shard)
    }

    fn unknown_or_double_free(&self, ptr: DevicePtr) -> Error {
        let deferred = self.blocks.get(&ptr.as_raw()).is_some_and(|b| b.free_deferred);
        if deferred || self.freed.was_freed(ptr.as_raw()) {
            Error::DoubleFree { ptr }
        } else {
            Error::UnknownPointer { ptr }
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

    /// The driver tier of malloc: one read section, the exact budget reservation, the
    /// driver call (for the class size when the block may be cached later), the map
    /// insert (when `track`, or when allocated during a capture). Returns the pointer
    /// and whether it was allocated during a capture.
    fn malloc_driver(
        &self,
        shard: &Shard,
        size: u64,
        stream: Stream,
        track: bool,
    ) -> Result<(DevicePtr, bool)> {
        let device = shard.device;
        let section = self.epoch.enter();
        if !section.capturing() && !self.deferred.is_empty() {
            self.flush_deferred(&section)?;
        }
        self.lazy_init(shard)?;
        if self.check_errors {
            self.driver.check_last_error(device)?;
        }
        self.reserve_exact(shard, size)?;
        let alloc_size = self.driver_size(size) as usize;
        let mut result = self.driver.malloc_async(device, alloc_size, stream);
        if matches!(&result, Err(e) if e.is_oom()) && !section.capturing() {
            // Cached blocks, or a trial block a failed cache_info free left behind, may be
            // what the driver is missing: give them back, retry once.
            let flushed = self.cache.enabled && self.flush_caches(shard).is_ok();
            if self.free_orphans().unwrap_or(false) || flushed {
                result = self.driver.malloc_async(device, alloc_size, stream);
            }
        }
        let ptr = match result {
            Ok(ptr) => ptr,
            Err(e) => {
                shard.budget.release(size);
                return Err(if e.is_oom() { self.oom(device, size) } else { e.into() });
            }
        };
        let captured = section.capturing();
        if track || captured {
            let info = BlockInfo {
                size,
                creation_stream: stream,
                device: device as u32,
                captured,
                free_deferred: false,
                recorded: None,
            };
            if let Some(stale) = self.blocks.insert(ptr.as_raw(), info) {
                // The driver handed out an address we hold as live: its books and ours
                // disagree. Keep the newer block; the older one's bytes go with it.
                log::error!("driver returned live address {ptr} again (old block {stale:?})");
                self.shards[stale.device as usize].budget.release(stale.size);
            }
        }
        Ok((ptr, captured))
    }

    /// S3/S7: claims `size` bytes against the limit (exactly: credit stranded in other
    /// threads' stripes is drained back before out-of-memory is declared).
    fn reserve_exact(&self, shard: &Shard, size: u64) -> Result<()> {
        if shard.budget.reserve(size).is_ok() {
            return Ok(());
        }
        if self.cache.enabled {
            self.drain_credit(shard);
            if shard.budget.reserve(size).is_ok() {
                return Ok(());
            }
        }
        Err(self.oom(shard.device, size))
    }

    /// Gives every stream cache's credit on the device back to the budget, so that an
    /// exact claim sees every byte that is not live.
    fn drain_credit(&self, shard: &Shard) {
        for e in self.caches.iter().filter(|e| e.key().0 == shard.device) {
            let sc = e.value();
            let mut l = sc.lock();
            shard.budget.release(std::mem::take(&mut l.credit));
            sc.mirror_credit(&l);
        }
    }

    // ----- the front cache -------------------------------------------------------------

    /// The size asked of the driver: the class size when the block may be cached.
    #[inline]
    fn driver_size(&self, size: u64) -> u64 {
        match class_of(size) {
            Some((_, class_size)) if self.cache.enabled => class_size,
            _ => size,
        }
    }

    #[inline]
    fn cacheable_size(&self, size: u64) -> bool {
        self.cache.enabled && class_of(size).is_some()
    }

    /// Whether a block freed outside a capture goes to the front cache: not captured
    /// (graph memory stays the graph's), never recorded on another stream (those are
    /// freed through the unifying stream, S5), and of a cached size.
    #[inline]
    fn cacheable(&self, info: &BlockInfo) -> bool {
        info.recorded.is_none() && !info.captured && self.cacheable_size(info.size)
    }

    /// Runs `f` on the cache of (device, stream), found through this thread's memo (on
    /// a memo hit, no shared line is touched and no reference count moves). `f` must
    /// not re-enter the memo.
    #[inline]
    fn with_stream_cache<R>(
        &self,
        device: Device,
        stream: Stream,
        f: impl FnOnce(&StreamCache) -> R,
    ) -> R {
        let lookup = || {
            let entry = self.caches.entry((device, stream));
            entry.or_insert_with(|| Arc::new(StreamCache::new(stream))).clone()
        };
        let mut f = Some(f);
        let mut run = |cache: &StreamCache| (f.take().expect("runs once"))(cache);
        let memo = MEMO.try_with(|memo| {
            {
                let memo = memo.borrow();
                let mine = |e: &&MemoEntry| e.0 == self.id && e.1 == device && e.2 == stream;
                if let Some(e) = memo.iter().find(mine) {
                    return Some(run(&e.3));
                }
            }
            let cache = lookup();
            let mut memo = memo.borrow_mut();
            if memo.len() >= MEMO_ENTRIES {
                memo.remove(0);
            }
            memo.push((self.id, device, stream, cache));
            None
        });
        match memo {
            Ok(Some(r)) => r,
            // Not in the memo before (it is now), or the memo is gone (thread teardown).
            _ => run(&lookup()),
        }
    }

    /// The cache tier of malloc: a block of `size`'s class cached on this stream, if the
    /// cache is on, no capture is underway, and no deferred free is waiting.
    #[inline]
    fn try_cached(&self, shard: &Shard, size: u64, stream: Stream) -> Option<u64> {
        if !self.cache.enabled || self.epoch.capturing() || !self.deferred.is_empty() {
            return None;
        }
        let (class, class_size) = class_of(size)?;
        let take = self.with_stream_cache(shard.device, stream, |sc| {
            let mut l = sc.lock();
            let Some(ptr) = l.free[class].pop() else {
                l.misses += 1;
                return Take::Miss;
            };
            if !shard.budget.within_limit() {
                // The limit was lowered under the claims: spend no credit, claim exactly.
                shard.budget.release(std::mem::take(&mut l.credit));
            }
            if l.credit < size {
                // Refill from the device budget: a chunk, else the exact bytes.
                let want = [size + CACHE_CREDIT, size];
                match want.into_iter().find(|&n| shard.budget.reserve(n).is_ok()) {
                    Some(n) => l.credit += n,
                    None => {
                        l.free[class].push(ptr);
                        return Take::NoCredit;
                    }
                }
            }
            l.credit -= size;
            sc.mirror_credit(&l);
            l.bytes -= class_size;
            l.hits += 1;
            publish(shard, &mut l, false);
            // Under the lock, so no other thread can hand the block out before the
            // driver layer hears of it.
            let p = DevicePtr::from_raw(ptr);
            self.driver.note_reuse(shard.device, p, class_size as usize, stream);
            Take::Hit(ptr)
        });
        match take {
            Take::Hit(ptr) => Some(ptr),
            Take::Miss | Take::NoCredit => None,
        }
    }

    /// The cache tier of free: keeps a block freed on `stream` for reuse on `stream`.
    fn put_cached(&self, shard: &Shard, ptr: u64, size: u64, stream: Stream) {
        let Some((class, class_size)) = class_of(size) else { return };
        let over_budget = self.with_stream_cache(shard.device, stream, |sc| {
            let mut l = sc.lock();
            let p = DevicePtr::from_raw(ptr);
            self.driver.note_cached(shard.device, p, class_size as usize, stream);
            l.free[class].push(ptr);
            l.bytes += class_size;
            l.credit += size;
            if l.credit > 2 * CACHE_CREDIT {
                shard.budget.release(l.credit - CACHE_CREDIT);
                l.credit = CACHE_CREDIT;
            }
            sc.mirror_credit(&l);
            publish(shard, &mut l, false)
                && shard.cached.load(Ordering::Relaxed) > self.cache.max_bytes_per_device
        });
        if over_budget {
            self.trim_stream_cache(shard, stream);
        }
    }

    /// Over budget: release blocks of this stream's cache, largest first, until the
    /// device's cached bytes are back under half the budget (releases are batched, each
    /// batch costing a device synchronize). Not during a capture (the frees would be
    /// uncaptured frees inside it).
    fn trim_stream_cache(&self, shard: &Shard, stream: Stream) {
        let section = self.epoch.enter();
        if section.capturing() {
            return;
        }
        let victims = self.with_stream_cache(shard.device, stream, |sc| {
            let mut l = sc.lock();
            let target = self.cache.max_bytes_per_device / 2;
            let mut excess = shard.cached.load(Ordering::Relaxed).saturating_sub(target);
            let mut victims = Vec::new();
            for class in (0..l.free.len()).rev() {
                while excess > 0 {
                    let Some(ptr) = l.free[class].pop() else { break };
                    let cs = crate::cache::class_size(class);
                    l.bytes -= cs;
                    excess = excess.saturating_sub(cs);
                    victims.push((ptr, cs, stream));
                }
            }
            publish(shard, &mut l, true);
            victims
        });
        if let Err(e) = self.release_to_driver(shard, victims) {
            log::error!("releasing cached blocks to the driver failed: {e}");
        }
    }

    /// Gives every cached block of `shard`'s device back to the driver. Call inside a
    /// section that saw no capture.
    fn flush_caches(&self, shard: &Shard) -> Result<()> {
        let caches: Vec<Arc<StreamCache>> = self
            .caches
            .iter()
            .filter(|e| e.key().0 == shard.device)
            .map(|e| e.value().clone())
            .collect();
        let mut blocks = Vec::new();
        for sc in caches {
            let mut l = sc.lock();
            for (class, list) in l.free.iter_mut().enumerate() {
                let cs = crate::cache::class_size(class);
                blocks.extend(list.drain(..).map(|ptr| (ptr, cs, sc.stream)));
            }
            l.bytes = 0;
            publish(shard, &mut l, true);
            shard.budget.release(std::mem::take(&mut l.credit));
            sc.mirror_credit(&l);
        }
        self.release_to_driver(shard, blocks)
    }

    /// Frees cached blocks through the driver: after a device synchronize (every use of
    /// a cached block was enqueued before it was cached, so all are complete), on the
    /// device's unifying stream, which the allocator owns: the stream a block was
    /// cached for may have been destroyed by its owner since. A block the driver refuses
    /// goes back to its cache.
    fn release_to_driver(&self, shard: &Shard, blocks: Vec<(u64, u64, Stream)>) -> Result<()> {
        if blocks.is_empty() {
            return Ok(());
        }
        let device = shard.device;
        let unifying = *shard.unifying.get().expect("cached blocks imply an initialized device");
        let mut first_error = self.driver.device_synchronize(device).err();
        for (ptr, size, stream) in blocks {
            let freed = first_error.is_none()
                && self
                    .driver
                    .free_async(device, DevicePtr::from_raw(ptr), size as usize, unifying)
                    .map_err(|e| first_error = Some(e))
                    .is_ok();
            if !freed {
                self.put_back(device, stream, ptr, size);
            }
        }
        first_error.map_or(Ok(()), |e| Err(e.into()))
    }

    fn put_back(&self, device: Device, stream: Stream, ptr: u64, class_size: u64) {
        let shard = &self.shards[device];
        self.with_stream_cache(device, stream, |sc| {
            let mut l = sc.lock();
            if let Some((class, _)) = class_of(class_size) {
                l.free[class].push(ptr);
                l.bytes += class_size;
                publish(shard, &mut l, true);
            }
        });
    }

    /// A handle's block that the map never saw goes back: to the cache, or during a
    /// capture through the seed's path (deferred until the capture ends, S4).
    fn free_untracked(
        &self,
        device: Device,
        ptr: DevicePtr,
        size: u64,
        stream: Stream,
    ) -> Result<()> {
        if self.epoch.capturing() {
            self.track(device, ptr, size, stream);
            return self.free(ptr);
        }
        self.put_cached(&self.shards[device], ptr.as_raw(), size, stream);
        Ok(())
    }

    /// Enters a handle's block in the map (for record_stream, or a free in a capture).
    fn track(&self, device: Device, ptr: DevicePtr, size: u64, stream: Stream) {
        let info = BlockInfo {
            size,
            creation_stream: stream,
            device: device as u32,
            captured: false,
            free_deferred: false,
            recorded: None,
        };
        self.blocks.insert(ptr.as_raw(), info);
    }

    /// Front-cache statistics of a device: (cached bytes, hits, misses).
    fn cache_stats(&self, device: Device) -> (u64, u64, u64) {
        let mut totals = (0, 0, 0);
        for e in self.caches.iter().filter(|e| e.key().0 == device) {
            let l = e.value().lock();
            totals.0 += l.bytes;
            totals.1 += l.hits;
            totals.2 += l.misses;
        }
        totals
    }

    /// S5: issues the driver free of a block already taken out of the map, then gives
    /// its bytes back. On a driver error the caller puts the block back.
    fn free_impl(&self, ptr: u64, info: &BlockInfo, section: &Section<'_>) -> Result<()> {
        let device = info.device as Device;
        let creation = info.creation();
        let free_stream = match &info.recorded {
            None => {
                self.driver.free_async(
                    device,
                    DevicePtr::from_raw(ptr),
                    self.driver_size(info.size) as usize,
                    creation.stream,
                )?;
                creation
            }
            Some(recorded) => {
                let unifying = UsageStream::new(
                    *self.shards[device].unifying.get().expect("a block's device is initialized"),
                    device,
                );
                self.driver.sync_streams(creation, unifying)?;
                for &used_on in recorded.iter() {
                    self.driver.sync_streams(used_on, unifying)?;
                }
                self.driver.free_async(
                    device,
                    DevicePtr::from_raw(ptr),
                    self.driver_size(info.size) as usize,
                    unifying.stream,
                )?;
                unifying
            }
        };
        if section.capturing()
            && let Some(capture) = self.capture.load().as_ref()
        {
            self.remember_free_stream(capture, free_stream);
        }
        self.shards[device].budget.release(info.size);
        self.freed.freed(ptr);
        Ok(())
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
            let Some((_, info)) = self.blocks.remove_if(&ptr, |_, b| b.free_deferred) else {
                continue;
            };
            if let Err(e) = self.free_impl(ptr, &info, section) {
                self.blocks.insert(ptr, info);
                self.deferred.push(ptr);
                return Err(e);
            }
        }
        Ok(())
    }

    /// S4: during a capture, an uncaptured block is not freed but deferred until no
    /// capture is underway. Returns whether it was deferred.
    fn defer_if_uncaptured(&self, ptr: DevicePtr) -> Result<bool> {
        match self.blocks.get_mut(&ptr.as_raw()) {
            None => Err(self.unknown_or_double_free(ptr)),
            Some(b) if b.free_deferred => Err(Error::DoubleFree { ptr }),
            Some(b) if b.captured => Ok(false),
            Some(mut b) => {
                b.free_deferred = true;
                drop(b);
                self.warnings.uncaptured_free_during_capture(ptr);
                self.deferred.push(ptr.as_raw());
                Ok(true)
            }
        }
    }

    /// Frees the orphaned `cache_info` trial blocks (none while a capture is underway:
    /// their streams may be capturing). Returns whether any was freed.
    fn free_orphans(&self) -> Result<bool> {
        if self.epoch.capturing() {
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
}

impl<D: Driver> StreamOrderedAllocator for StreamAlloc<D> {
    fn name(&self) -> &'static str {
        "streamalloc"
    }

    fn device_count(&self) -> usize {
        self.shards.len()
    }

    /// The hot path. With the front cache on and no capture underway, a block cached on
    /// this stream is handed out with no driver call and no shared line written but the
    /// map's shard; otherwise the driver tier (`malloc_driver`).
    fn malloc(&self, device: Device, size: usize, stream: Stream) -> Result<DevicePtr> {
        let size = size as u64;
        if size >= ONE_EXBIBYTE {
            return Err(Error::TooLarge { requested: size });
        }
        if size == 0 {
            return Ok(DevicePtr::NULL);
        }
        let shard = self.shard(device)?;
        if let Some(ptr) = self.try_cached(shard, size, stream) {
            let info = BlockInfo {
                size,
                creation_stream: stream,
                device: device as u32,
                captured: false,
                free_deferred: false,
                recorded: None,
            };
            self.blocks.insert(ptr, info);
            return Ok(DevicePtr::from_raw(ptr));
        }
        self.malloc_driver(shard, size, stream, true).map(|(ptr, _)| ptr)
    }

    fn free(&self, ptr: DevicePtr) -> Result<()> {
        if ptr.is_null() {
            return Ok(());
        }
        let key = ptr.as_raw();
        // The cache tier: no driver call, so no read section is needed (as for a handle's
        // free): a capture that begins after this load finds the block cached, where a
        // capture never takes it from.
        if self.cache.enabled
            && !self.epoch.capturing()
            && let Some((_, info)) =
                self.blocks.remove_if(&key, |_, b| !b.free_deferred && self.cacheable(b))
        {
            self.freed.freed(key);
            self.put_cached(
                &self.shards[info.device as usize],
                key,
                info.size,
                info.creation_stream,
            );
            return Ok(());
        }
        // The driver tier (S4, S5): uncached blocks, captures, errors.
        let section = self.epoch.enter();
        if section.capturing() && self.defer_if_uncaptured(ptr)? {
            return Ok(());
        }
        let Some((_, info)) = self.blocks.remove_if(&key, |_, b| !b.free_deferred) else {
            return Err(self.unknown_or_double_free(ptr));
        };
        let device = info.device as Device;
        if self.check_errors
            && let Err(e) = self.driver.check_last_error(device)
        {
            self.blocks.insert(key, info);
            return Err(e.into());
        }
        if info.captured && !section.capturing() {
            self.warnings.captured_free_outside_capture(ptr);
        }
        if let Err(e) = self.free_impl(key, &info, &section) {
            self.blocks.insert(key, info);
            return Err(e);
        }
        Ok(())
    }

    fn record_stream(&self, ptr: DevicePtr, stream: UsageStream) -> Result<()> {
        if ptr.is_null() {
            return Ok(());
        }
        let Some(mut b) = self.blocks.get_mut(&ptr.as_raw()) else {
            return Err(self.unknown_or_double_free(ptr));
        };
        if b.free_deferred {
            return Err(Error::DoubleFree { ptr });
        }
        if stream == b.creation() {
            drop(b);
            self.warnings.record_on_creation_stream();
            return Ok(());
        }
        let recorded = b.recorded.get_or_insert_with(Default::default);
        if !recorded.contains(&stream) {
            recorded.push(stream);
        }
        Ok(())
    }

    fn set_memory_fraction(&self, fraction: f64, device: Device) -> Result<()> {
        if !(0.0..=1.0).contains(&fraction) {
            return Err(Error::InvalidFraction { fraction });
        }
        let shard = self.lazy_init(self.shard(device)?)?;
        let info = self.driver.mem_get_info(device)?;
        shard.budget.set_limit((fraction * info.total as f64) as u64);
        self.drain_credit(shard);
        Ok(())
    }

    /// S8, with the cache flushed first: cached blocks go back to the driver, then each
    /// initialized device is synchronized and its pool trimmed to 0.
    fn empty_cache(&self) -> Result<()> {
        let mut first_error = self.free_orphans().err();
        if self.cache.enabled {
            let section = self.epoch.enter();
            if !section.capturing() {
                for shard in self.shards.iter().filter(|s| s.unifying.get().is_some()) {
                    if let Err(e) = self.flush_caches(shard) {
                        first_error.get_or_insert(e);
                    }
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

    fn cache_info(&self, device: Device, stream: Stream) -> Result<u64> {
        let shard = self.lazy_init(self.shard(device)?)?;
        self.free_orphans()?;
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

    fn base_allocation(&self, ptr: DevicePtr) -> Result<(DevicePtr, u64)> {
        match self.blocks.get(&ptr.as_raw()) {
            Some(b) => Ok((ptr, b.size)),
            None => Err(self.unknown_or_double_free(ptr)),
        }
    }

    fn device_stats(&self, device: Device) -> Result<DeviceStats> {
        let shard = self.shard(device)?;
        if shard.unifying.get().is_none() {
            return Ok(DeviceStats::default());
        }
        let stats = crate::api::pool_stats(&self.driver, device)?;
        let (cached, hits, misses) = self.cache_stats(device);
        Ok(DeviceStats {
            allocated_current: self.used_bytes(device),
            cached_current: cached,
            cache_hits: hits,
            cache_misses: misses,
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

    fn begin_capture(&self, _device: Device) -> Result<()> {
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

    /// Bytes in live allocations: the budget's claims less the stream caches' credit
    /// (exact when no operation is in flight).
    fn used_bytes(&self, device: Device) -> u64 {
        let Some(shard) = self.shards.get(device) else { return 0 };
        let credit: u64 = self
            .caches
            .iter()
            .filter(|e| e.key().0 == device)
            .map(|e| e.value().credit.load(Ordering::Relaxed))
            .sum();
        shard.budget.used().saturating_sub(credit)
    }

    fn memory_limit(&self, device: Device) -> u64 {
        self.shards.get(device).map_or(u64::MAX, |s| s.budget.limit())
    }

    fn snapshot(&self) -> Vec<BlockSnapshot> {
        let mut v: Vec<BlockSnapshot> =
            self.blocks.iter().map(|e| crate::api::snapshot_entry(*e.key(), e.value())).collect();
        v.sort_by_key(|b| b.ptr);
        v
    }
}

impl<D: Driver> Drop for StreamAlloc<D> {
    /// Gives the front cache's blocks back to the driver (live blocks are the owner's).
    fn drop(&mut self) {
        if !self.cache.enabled || self.epoch.capturing() {
            return;
        }
        for shard in self.shards.iter().filter(|s| s.unifying.get().is_some()) {
            if let Err(e) = self.flush_caches(shard) {
                log::error!("releasing cached blocks of device {} failed: {e}", shard.device);
            }
        }
    }
}

/// A block freed when dropped, like PyTorch's `DataPtr`.
///
/// A block from the front cache carries its metadata here rather than in the
/// allocator's map, so dropping it needs no lookup.
pub struct Block<'a, D: Driver> {
    alloc: &'a StreamAlloc<D>,
    ptr: DevicePtr,
    size: usize,
    device: Device,
    stream: Stream,
    /// Whether the block is in the allocator's map (as every pointer-API block is).
    tracked: Cell<bool>,
}

impl<D: Driver> Block<'_, D> {
    /// The device address (null for a zero-size block).
    pub fn ptr(&self) -> DevicePtr {
        self.ptr
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
        if !self.tracked.get() {
            self.alloc.track(self.device, self.ptr, self.size as u64, self.stream);
            self.tracked.set(true);
        }
        self.alloc.record_stream(self.ptr, stream)
    }

    /// Frees now and reports any error (dropping frees too, but can only log errors).
    pub fn free(self) -> Result<()> {
        let me = std::mem::ManuallyDrop::new(self);
        me.release()
    }

    fn release(&self) -> Result<()> {
        if self.tracked.get() {
            self.alloc.free(self.ptr)
        } else {
            self.alloc.free_untracked(self.device, self.ptr, self.size as u64, self.stream)
        }
    }
}

impl<D: Driver> Drop for Block<'_, D> {
    fn drop(&mut self) {
        if let Err(e) = self.release() {
            log::error!("freeing block {} on drop failed: {e}", self.ptr);
        }
    }
}

/// Moves a stream cache's byte count into the device total when it has drifted by
/// `PUBLISH_STEP` (or always, when `force`). Returns whether it published.
#[inline]
fn publish(shard: &Shard, l: &mut crate::cache::Lists, force: bool) -> bool {
    let (now, then) = (l.bytes, l.published);
    if now == then || (!force && now.abs_diff(then) < PUBLISH_STEP) {
        return false;
    }
    if now > then {
        shard.cached.fetch_add(now - then, Ordering::Relaxed);
    } else {
        shard.cached.fetch_sub(then - now, Ordering::Relaxed);
    }
    l.published = now;
    true
}
