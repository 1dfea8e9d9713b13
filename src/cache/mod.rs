//! The front cache: per-(device, stream) free lists of idle blocks, in front of the
//! driver. A layer the core holds or not ([`CacheConfig::passthrough`] leaves it out).
//!
//! ```text
//!   malloc(dev, size, S) ─▶ FrontCache::take ─▶ this thread's memo ─▶ StreamCache(dev, S)
//!                              hit: a block of size's class, or up to `class_reach`
//!                              classes larger, idle on S ─▶ handed out, no driver call
//!   free(block of S)      ─▶ FrontCache::put  ─▶ pushed on its class list of S
//!                              returns what the release policy gives back to the driver
//! ```
//!
//! A thread finds its stream caches through a memo of the last four it used, the last one
//! first (a plain thread-local compare; see `FrontCache::find`), so a hit touches no
//! shared line until the stream cache's own lock.
//!
//! A block freed on stream S is handed out again on S with no driver call: stream order
//! makes that safe, exactly as the driver's own pool reuses on one stream. It never
//! serves another stream, so no cross-stream ordering is needed. The cache holds no
//! byte credit: live bytes are the budget's alone (`src/budget.rs`), and idle bytes are
//! counted here (published to a device total when a stream cache drifts by
//! `PUBLISH_STEP`).
//!
//! Release policy (the cache decides, the core gives the blocks back to the driver):
//! - idle: every [`CacheConfig::idle_interval`] operations on a stream cache, the blocks
//!   that sat unused the whole interval (each class's low-water mark) are released, and
//!   stream caches of the device that saw no operation between two sweeps (at most one
//!   per second per device) are emptied and dropped (a stream that went away leaves
//!   nothing behind);
//! - budget: over [`CacheConfig::max_bytes_per_device`], a stream cache releases its
//!   largest blocks until the device is back under half the budget;
//! - pressure: a driver out-of-memory empties every stream cache of the device before
//!   the exact size is retried (the core's driver tier); `empty_cache` and dropping the
//!   allocator empty them too.
//!
//! A stream cache is created by the first block freed into it (a failed malloc on a new
//! stream creates nothing), and removed again when it is emptied by a flush or by the
//! idle sweep; scans (stats, flushes) visit only stream caches that hold blocks or were
//! used lately.

mod classes;
mod stream;

use crate::block::Record;
use crate::types::{Device, Stream};
use crossbeam::utils::CachePadded;
use dashmap::DashMap;
use std::cell::{Cell, RefCell};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use stream::{Lists, StreamCache};

pub(crate) use classes::class_of;

/// Whether an idle block of `block_bytes` may serve a request of `size` bytes: a class
/// size from `size`'s class up to `reach` classes larger.
#[cfg(feature = "fuzzing")]
pub(crate) fn may_serve(size: u64, block_bytes: u64, reach: usize) -> bool {
    match (class_of(size), class_of(block_bytes)) {
        (Some((c, _)), Some((b, bs))) => bs == block_bytes && b >= c && b <= c + reach,
        _ => false,
    }
}

/// Sweeps for quiet stream caches run at most this often per device: a stream cache is
/// quiet when it saw no operation between two sweeps, so this is also the shortest
/// silence after which a stream's idle blocks are given back.
const SWEEP_GAP: std::time::Duration = std::time::Duration::from_secs(1);

/// `last_sweep` of a device never swept (its first idle check sweeps).
const NEVER_SWEPT: u64 = u64::MAX;

/// A stream cache publishes its cached bytes to the device total when they moved by
/// this much since the last publish, so the shared total is touched rarely.
pub(crate) const PUBLISH_STEP: u64 = 16 << 20;

/// Cache settings of a [`crate::StreamAlloc`]: start from [`CacheConfig::default`],
/// [`CacheConfig::lean`] or [`CacheConfig::passthrough`] and adjust fields or use the
/// `with_*` methods (more settings may come).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheConfig {
    /// Whether the front cache is on (`false`: every malloc and free goes to the
    /// driver, as in the seed).
    pub enabled: bool,
    /// Bytes the cache may hold per device before it releases blocks to the driver.
    pub max_bytes_per_device: u64,
    /// A request may be served by an idle block up to this many size classes larger
    /// (four classes per power of two: 2 wastes at most half of the request).
    pub class_reach: usize,
    /// Operations on a stream cache between idle checks: blocks unused for a whole
    /// interval go back to the driver, and stream caches idle for one are dropped.
    /// 0 turns idle release off.
    pub idle_interval: u32,
    /// On a miss, while the stream's idle bytes exceed this percentage of its live
    /// bytes, its least recently freed idle blocks (at least the request's size) go
    /// back to the driver first, on the stream itself, so the driver's pool (which
    /// coalesces) serves the request from them instead of growing. `u32::MAX`: never
    /// (the fast preset); see [`CacheConfig::lean`].
    pub idle_over_live_pct: u32,
    /// Requests larger than this go to the driver at their exact size and are never
    /// cached (at most 64 MiB, the largest size class).
    pub max_cached_size: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            enabled: true,
            max_bytes_per_device: 2 << 30,
            class_reach: 2,
            idle_interval: 1 << 14,
            idle_over_live_pct: u32::MAX,
            max_cached_size: classes::MAX_CACHED,
        }
    }
}

impl CacheConfig {
    /// No cache: the seed's behaviour, every operation reaches the driver.
    pub fn passthrough() -> Self {
        CacheConfig { enabled: false, ..CacheConfig::default() }
    }

    /// The memory-lean preset: only requests up to 1 MiB are cached (larger ones go to
    /// the driver at their exact size, as in the seed, so the driver's pool alone decides
    /// what they cost in memory), and idle bytes beyond half a stream's live bytes go
    /// back to the driver on a miss (DESIGN.md has the measured trade-off). The C ABI's
    /// default, for PyTorch.
    pub fn lean() -> Self {
        CacheConfig { idle_over_live_pct: 50, max_cached_size: 1 << 20, ..CacheConfig::default() }
    }

    /// The size class of a request of `size` bytes when it may be served from, and go
    /// back to, the cache.
    #[inline]
    pub(crate) fn class_for(&self, size: u64) -> Option<usize> {
        if size > self.max_cached_size {
            return None;
        }
        class_of(size).map(|(class, _)| class)
    }

    /// The default cache with another per-device byte budget.
    pub fn with_max_bytes_per_device(self, bytes: u64) -> Self {
        CacheConfig { max_bytes_per_device: bytes, ..self }
    }

    /// The default cache with another idle interval (0: never release idle blocks).
    pub fn with_idle_interval(self, ops: u32) -> Self {
        CacheConfig { idle_interval: ops, ..self }
    }

    /// The default cache serving requests from blocks up to `classes` classes larger.
    pub fn with_class_reach(self, classes: usize) -> Self {
        CacheConfig { class_reach: classes, ..self }
    }
}

/// What a put or a sweep gives back to the driver.
#[derive(Default)]
pub(crate) struct Released {
    /// Blocks of the stream that was just used: freed on their creation stream, which
    /// the caller is using now.
    pub(crate) own: Vec<Arc<Record>>,
    /// Blocks of stream caches that went quiet (their stream may be gone): freed after a
    /// device synchronize, on the device's unifying stream.
    pub(crate) others: Vec<Arc<Record>>,
}

/// Front-cache statistics of a device.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct CacheStats {
    pub(crate) cached: u64,
    pub(crate) hits: u64,
    pub(crate) misses: u64,
    pub(crate) streams: u64,
}

/// The front cache (see the module docs).
pub(crate) struct FrontCache {
    config: CacheConfig,
    caches: DashMap<(Device, Stream), Arc<StreamCache>>,
    /// Bytes held per device, as the stream caches last published them.
    cached: Box<[CachePadded<AtomicU64>]>,
    /// Tells this cache's entries apart in the per-thread memo.
    id: u64,
    /// When each device was last swept, in nanoseconds since `born`.
    last_sweep: Box<[AtomicU64]>,
    born: std::time::Instant,
}

/// A memo entry: (cache id, device, stream) and that stream's cache.
type MemoEntry = (MemoKey, Arc<StreamCache>);

/// The key of a memo entry: (cache id, device, stream).
type MemoKey = (u64, Device, Stream);

/// This thread's memo: the entries, which hold their stream caches alive.
struct Memo(Vec<MemoEntry>);

impl Drop for Memo {
    fn drop(&mut self) {
        // The entries go: so does the pointer to one of them.
        LAST.set(None);
    }
}

thread_local! {
    /// The stream caches this thread used last.
    static MEMO: RefCell<Memo> = const { RefCell::new(Memo(Vec::new())) };
    /// The memo entry found last (a plain thread-local read on the hot path, no
    /// destructor to register): `Some` only while `MEMO` holds an entry of that key,
    /// whose `Arc` keeps the pointer valid.
    static LAST: Cell<Option<(MemoKey, *const StreamCache)>> = const { Cell::new(None) };
}
const MEMO_ENTRIES: usize = 4;

/// A stream cache found by [`FrontCache::find`]: in this thread's memo, or fetched from
/// the map (then `fetched` holds it).
struct Found {
    cache: *const StreamCache,
    fetched: Option<Arc<StreamCache>>,
}

impl Found {
    /// The stream cache.
    #[inline(always)]
    fn get(&self) -> &StreamCache {
        // Safety: `cache` points into an `Arc` kept alive by `fetched`, or by this
        // thread's memo entry, which only this thread removes: in `FrontCache::done` and
        // `forget` (after the use of this `Found` ends: `done` consumes it) or when the
        // thread exits. Nothing run while a `Found` is in use touches the memo.
        unsafe { &*self.cache }
    }
}

impl FrontCache {
    pub(crate) fn new(config: CacheConfig, devices: usize) -> Self {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        FrontCache {
            config,
            caches: DashMap::new(),
            cached: (0..devices).map(|_| CachePadded::new(AtomicU64::new(0))).collect(),
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            last_sweep: (0..devices).map(|_| AtomicU64::new(NEVER_SWEPT)).collect(),
            born: std::time::Instant::now(),
        }
    }

    /// Whether a sweep of `device` is due (at most one per [`SWEEP_GAP`]); the caller
    /// that gets `true` runs it.
    fn sweep_due(&self, device: Device) -> bool {
        let now = self.born.elapsed().as_nanos() as u64;
        let last = self.last_sweep[device].load(Ordering::Relaxed);
        (last == NEVER_SWEPT || now.saturating_sub(last) >= SWEEP_GAP.as_nanos() as u64)
            && self.last_sweep[device]
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    /// The size to ask of the driver for a block of `size` that may be cached later.
    #[inline]
    pub(crate) fn alloc_size(size: u64) -> u64 {
        class_of(size).map_or(size, |(_, class_size)| class_size)
    }

    /// The cache tier of malloc: an idle block of the request's `class` (or up to `class_reach`
    /// classes larger) on `stream`. `on_reuse` runs under the stream cache's lock, so no
    /// other thread can hand the block out before it returns.
    #[inline(always)]
    pub(crate) fn take(
        &self,
        device: Device,
        class: usize,
        stream: Stream,
        on_reuse: impl FnOnce(&Record),
    ) -> Option<Arc<Record>> {
        let reach = self.config.class_reach;
        let found = self.find(device, stream, false)?;
        let sc = found.get();
        let mut l = sc.lock();
        if l.retired {
            drop(l);
            self.done(device, stream, found, false);
            return None;
        }
        sc.touch();
        l.ops += 1;
        let taken = l.pop(class, reach);
        match &taken {
            Some(rec) => {
                l.hits += 1;
                l.live += rec.alloc_size;
                self.publish(device, &mut l, false);
                on_reuse(rec);
            }
            None => l.misses += 1,
        }
        drop(l);
        self.done(device, stream, found, true);
        taken
    }

    /// The cache tier of free: keeps `rec` (idle, its state already `CACHED`, its class
    /// not `NO_CLASS`) for reuse on its creation stream. `on_cache` runs under the lock
    /// before the block can be handed out again. Returns what the release policy gives
    /// back to the driver, if anything.
    #[inline(always)]
    pub(crate) fn put(&self, rec: Arc<Record>, on_cache: impl FnOnce(&Record)) -> Option<Released> {
        let device = rec.device();
        let stream = rec.creation_stream;
        let class = rec.class as usize;
        loop {
            // With `create` there is always a cache to find.
            let Some(found) = self.find(device, stream, true) else { continue };
            let sc = found.get();
            let mut l = sc.lock();
            if l.retired {
                // Retired meanwhile: look it up afresh.
                drop(l);
                self.done(device, stream, found, false);
                continue;
            }
            on_cache(&rec);
            l.live = l.live.saturating_sub(rec.alloc_size);
            sc.touch();
            l.ops += 1;
            rec.set_idle_since(l.ops_total);
            l.push(class, rec);
            let idle_check = self.config.idle_interval > 0 && l.ops >= self.config.idle_interval;
            let published = self.publish(device, &mut l, idle_check);
            let policy =
                (idle_check || published).then(|| self.put_policy(device, &mut l, idle_check));
            drop(l);
            self.done(device, stream, found, true);
            let (own, idle_check) = policy?;
            let others = if idle_check && self.sweep_due(device) {
                self.sweep(device, Some(stream))
            } else {
                Vec::new()
            };
            return Some(Released { own, others });
        }
    }

    /// The release policy after a put (under the stream cache's lock): the idle check's
    /// blocks, and the largest blocks when the device is over budget.
    #[cold]
    fn put_policy(
        &self,
        device: Device,
        l: &mut Lists,
        idle_check: bool,
    ) -> (Vec<Arc<Record>>, bool) {
        let mut own = if idle_check { l.take_idle() } else { Vec::new() };
        if idle_check {
            self.publish(device, l, true);
        }
        let max = self.config.max_bytes_per_device;
        let cached = self.cached[device].load(Ordering::Relaxed);
        if cached > max {
            own.extend(l.take_largest(cached - max / 2));
            self.publish(device, l, true);
        }
        (own, idle_check)
    }

    /// A miss on (device, stream) is about to ask the driver for `alloc_size` bytes:
    /// counts them live on the stream and, under the lean policy, returns the idle blocks
    /// to free on `stream` first (least recently freed first, at least `alloc_size`).
    pub(crate) fn before_miss(
        &self,
        device: Device,
        stream: Stream,
        alloc_size: u64,
    ) -> Vec<Arc<Record>> {
        let pct = self.config.idle_over_live_pct;
        self.with_stream_cache(device, stream, false, |sc| {
            let mut l = sc.lock();
            if l.retired {
                return Err(());
            }
            l.live += alloc_size;
            if pct == u32::MAX || (l.bytes as u128) * 100 <= (l.live as u128) * pct as u128 {
                return Ok(Vec::new());
            }
            let out = l.take_oldest(alloc_size);
            self.publish(device, &mut l, false);
            Ok(out)
        })
        .unwrap_or_default()
    }

    /// Empties and drops the stream caches of `device` that saw no operation since the
    /// last sweep (all but `keep`). Returns their blocks.
    pub(crate) fn sweep(&self, device: Device, keep: Option<Stream>) -> Vec<Arc<Record>> {
        let mut quiet = Vec::new();
        for e in self.caches.iter().filter(|e| e.key().0 == device) {
            let sc = e.value();
            let now = sc.activity.load(Ordering::Relaxed);
            if sc.swept_at.swap(now, Ordering::Relaxed) == now && Some(sc.stream) != keep {
                quiet.push(sc.clone());
            }
        }
        self.retire(device, quiet)
    }

    /// Empties and drops every stream cache of `device` (a flush: driver out-of-memory,
    /// `empty_cache`, the allocator's drop). Returns their blocks.
    pub(crate) fn drain_device(&self, device: Device) -> Vec<Arc<Record>> {
        let all: Vec<Arc<StreamCache>> =
            self.caches.iter().filter(|e| e.key().0 == device).map(|e| e.value().clone()).collect();
        self.retire(device, all)
    }

    fn retire(&self, device: Device, caches: Vec<Arc<StreamCache>>) -> Vec<Arc<Record>> {
        let mut blocks = Vec::new();
        for sc in caches {
            {
                let mut l = sc.lock();
                blocks.append(&mut l.take_all());
                self.publish(device, &mut l, true);
                l.retired = true;
            }
            self.caches.remove_if(&(device, sc.stream), |_, v| Arc::ptr_eq(v, &sc));
        }
        blocks
    }

    /// Gives back blocks the core could not release: to their stream's cache, with no
    /// release policy applied.
    pub(crate) fn put_back(&self, blocks: Vec<Arc<Record>>) {
        for rec in blocks {
            let (device, stream) = (rec.device(), rec.creation_stream);
            let Some((class, _)) = class_of(rec.alloc_size) else { continue };
            let mut rec = Some(rec);
            while rec.is_some() {
                self.with_stream_cache(device, stream, true, |sc| {
                    let mut l = sc.lock();
                    if l.retired {
                        return Err(());
                    }
                    l.push(class, rec.take().expect("pushed once"));
                    self.publish(device, &mut l, true);
                    Ok(())
                });
            }
        }
    }

    /// Statistics of `device` (a scan of its stream caches).
    pub(crate) fn stats(&self, device: Device) -> CacheStats {
        let mut s = CacheStats::default();
        for e in self.caches.iter().filter(|e| e.key().0 == device) {
            let l = e.value().lock();
            s.cached += l.bytes;
            s.hits += l.hits;
            s.misses += l.misses;
            s.streams += 1;
        }
        s
    }

    /// The idle blocks of `device`, for a snapshot: (address, class size, stream).
    pub(crate) fn idle_blocks(&self, device: Device) -> Vec<(u64, u64, Stream)> {
        let mut v = Vec::new();
        for e in self.caches.iter().filter(|e| e.key().0 == device) {
            let l = e.value().lock();
            for list in l.free.iter() {
                v.extend(list.iter().map(|r| (r.ptr, r.alloc_size, r.creation_stream)));
            }
        }
        v
    }

    /// Moves a stream cache's byte count into the device total when it has drifted by
    /// `PUBLISH_STEP` (or always, when `force`). Returns whether it published.
    #[inline(always)]
    fn publish(&self, device: Device, l: &mut Lists, force: bool) -> bool {
        let (now, then) = (l.bytes, l.published);
        if now == then || (!force && now.abs_diff(then) < PUBLISH_STEP) {
            return false;
        }
        self.publish_now(device, l);
        true
    }

    /// `publish` when it does (out of line).
    #[inline(never)]
    fn publish_now(&self, device: Device, l: &mut Lists) {
        let (now, then) = (l.bytes, l.published);
        if now > then {
            self.cached[device].fetch_add(now - then, Ordering::Relaxed);
        } else {
            self.cached[device].fetch_sub(then - now, Ordering::Relaxed);
        }
        l.published = now;
    }

    /// The cache of (device, stream) from the map (made when `create`). Out of line: the
    /// memo serves the hot path, and a new stream cache is a large value.
    #[inline(never)]
    fn lookup(&self, device: Device, stream: Stream, create: bool) -> Option<Arc<StreamCache>> {
        if create {
            let entry = self.caches.entry((device, stream));
            Some(entry.or_insert_with(|| Arc::new(StreamCache::new(stream))).clone())
        } else {
            self.caches.get(&(device, stream)).map(|c| c.clone())
        }
    }

    /// The cache of (device, stream), found through this thread's memo (on a memo hit no
    /// shared line is touched and no reference count moves), or from the map (made when
    /// `create`). Use it, then hand it to [`FrontCache::done`].
    #[inline(always)]
    fn find(&self, device: Device, stream: Stream, create: bool) -> Option<Found> {
        let key = (self.id, device, stream);
        if let Some((last, cache)) = LAST.get()
            && last == key
        {
            return Some(Found { cache, fetched: None });
        }
        self.find_slow(key, create)
    }

    /// `find` past the last entry: the rest of the memo, then the map.
    #[inline(never)]
    fn find_slow(&self, key: MemoKey, create: bool) -> Option<Found> {
        let memo_hit = MEMO
            .try_with(|memo| {
                let cache = Arc::as_ptr(&memo.borrow().0.iter().find(|e| e.0 == key)?.1);
                LAST.set(Some((key, cache)));
                Some(cache)
            })
            .ok()
            .flatten();
        Some(match memo_hit {
            Some(cache) => Found { cache, fetched: None },
            None => {
                let fetched = self.lookup(key.1, key.2, create)?;
                Found { cache: Arc::as_ptr(&fetched), fetched: Some(fetched) }
            }
        })
    }

    /// Ends a use of `found`: a cache fetched from the map goes into the memo, a retired
    /// one (`usable` false) out of it.
    #[inline(always)]
    fn done(&self, device: Device, stream: Stream, found: Found, usable: bool) {
        if !usable {
            Self::forget((self.id, device, stream));
        } else if let Some(cache) = found.fetched {
            Self::remember((self.id, device, stream), cache);
        }
    }

    /// Runs `f` on the cache of (device, stream) ([`FrontCache::find`]). Without `create`,
    /// a stream with no cache gives `None`. `f` returns `Err` when it finds the cache
    /// retired: the memo entry is dropped and `None` returned.
    #[inline]
    fn with_stream_cache<R>(
        &self,
        device: Device,
        stream: Stream,
        create: bool,
        f: impl FnOnce(&StreamCache) -> Result<R, ()>,
    ) -> Option<R> {
        let found = self.find(device, stream, create)?;
        let result = f(found.get());
        self.done(device, stream, found, result.is_ok());
        result.ok()
    }

    /// Drops `key` from this thread's memo (its cache was retired).
    #[cold]
    fn forget(key: MemoKey) {
        let _ = MEMO.try_with(|memo| {
            // First the pointer, then the entry that keeps it valid.
            LAST.set(None);
            memo.borrow_mut().0.retain(|e| e.0 != key);
        });
    }

    /// Files a stream cache in this thread's memo as its last entry (a memo miss; out of
    /// line). Not at all while the memo is gone (thread exit): `fetched` drops it.
    #[inline(never)]
    fn remember(key: MemoKey, cache: Arc<StreamCache>) {
        let _ = MEMO.try_with(|memo| {
            let mut memo = memo.borrow_mut();
            // First the pointer (it may point to the entry evicted next), then the entries.
            LAST.set(Some((key, Arc::as_ptr(&cache))));
            if memo.0.len() >= MEMO_ENTRIES {
                memo.0.remove(0);
            }
            memo.0.push((key, cache));
        });
    }
}
