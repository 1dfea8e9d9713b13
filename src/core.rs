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
use crate::driver::Driver;
use crate::epoch::{EpochGate, Section};
use crate::error::{Error, OutOfMemory, Result};
use crate::freed::FreedTable;
use crate::types::{Device, DevicePtr, PoolAttribute, Stream, UsageStream};
use crate::warn::{WarningCounts, Warnings};
use arc_swap::ArcSwapOption;
use crossbeam::queue::SegQueue;
use crossbeam::utils::CachePadded;
use dashmap::{DashMap, DashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex, OnceLock};

/// Allocations of this size or more are refused outright (S3), as the seed does.
pub const ONE_EXBIBYTE: u64 = 1 << 60;

/// A cheap hasher for device addresses: one multiply (Fibonacci hashing). Addresses are
/// aligned, so the low bits carry nothing; the multiply spreads the middle bits into the
/// high bits that hashbrown and dashmap's shard selection use.
#[derive(Default, Clone, Copy)]
pub struct PtrHasher(u64);

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
        self.0 = (v ^ (v >> 29)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
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
}

/// State of the capture underway (installed before the odd epoch is published).
#[derive(Default)]
struct Capture {
    /// Every stream a free was issued on during the capture (S5, S15).
    free_streams: DashSet<UsageStream>,
}

/// The lock-free stream-ordered allocator, generic over its [`Driver`].
///
/// Same observable semantics as PyTorch's cudaMallocAsync backend (S1..S19 of the
/// brief), without its process-wide mutex. See the crate's DESIGN.md for the layers.
pub struct StreamAlloc<D: Driver> {
    driver: D,
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
}

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

    /// S1: an allocator for `device_count` devices. Creates no context.
    pub fn with_device_count(driver: D, device_count: usize) -> Self {
        let shards = (0..device_count)
            .map(|device| Shard {
                device,
                budget: CachePadded::new(Budget::new()),
                unifying: OnceLock::new(),
                init: Mutex::new(()),
            })
            .collect();
        StreamAlloc {
            driver,
            shards,
            blocks: DashMap::with_hasher_and_shard_amount(BuildHasherDefault::default(), 128),
            epoch: EpochGate::new(),
            capture: ArcSwapOption::empty(),
            deferred: SegQueue::new(),
            freed: FreedTable::new(),
            orphans: SegQueue::new(),
            warnings: Warnings::default(),
        }
    }

    /// The driver underneath.
    pub fn driver(&self) -> &D {
        &self.driver
    }

    /// Allocates a block freed when the returned handle drops (like PyTorch's DataPtr).
    pub fn allocate(&self, device: Device, size: usize, stream: Stream) -> Result<Block<'_, D>> {
        let ptr = self.malloc(device, size, stream)?;
        Ok(Block { alloc: self, ptr, size, device })
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

    fn oom(&self, device: Device, requested: u64, allocated: u64) -> Error {
        // The seed clears the driver's error and asks for memory info for the report.
        let _ = self.driver.check_last_error(device);
        match self.driver.mem_get_info(device) {
            Ok(info) => Error::OutOfMemory(Box::new(OutOfMemory {
                device,
                allocated,
                requested,
                device_total: info.total,
                device_free: info.free,
                limit: self.shards[device].budget.limit(),
            })),
            Err(e) => Error::Driver(e),
        }
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
                    info.size as usize,
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
                    info.size as usize,
                    unifying.stream,
                )?;
                unifying
            }
        };
        if section.capturing()
            && let Some(capture) = self.capture.load().as_ref()
        {
            capture.free_streams.insert(free_stream);
        }
        self.shards[device].budget.release(info.size);
        self.freed.freed(ptr);
        Ok(())
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

    /// The hot path: one read section, one CAS on the device's budget, one driver call,
    /// one map insert.
    fn malloc(&self, device: Device, size: usize, stream: Stream) -> Result<DevicePtr> {
        if size as u64 >= ONE_EXBIBYTE {
            return Err(Error::TooLarge { requested: size as u64 });
        }
        if size == 0 {
            return Ok(DevicePtr::NULL);
        }
        let shard = self.shard(device)?;
        let section = self.epoch.enter();
        if !section.capturing() && !self.deferred.is_empty() {
            self.flush_deferred(&section)?;
        }
        let shard = self.lazy_init(shard)?;
        self.driver.check_last_error(device)?;
        let size64 = size as u64;
        if let Err(allocated) = shard.budget.reserve(size64) {
            return Err(self.oom(device, size64, allocated));
        }
        let ptr = match self.driver.malloc_async(device, size, stream) {
            // Memory a failed cache_info free left behind may be what is missing.
            Err(e) if e.is_oom() && self.free_orphans().unwrap_or(false) => {
                self.driver.malloc_async(device, size, stream)
            }
            r => r,
        };
        let ptr = match ptr {
            Ok(ptr) => ptr,
            Err(e) => {
                shard.budget.release(size64);
                return Err(if e.is_oom() {
                    self.oom(device, size64, shard.budget.used())
                } else {
                    Error::Driver(e)
                });
            }
        };
        self.freed.reused(ptr.as_raw());
        let info = BlockInfo {
            size: size64,
            creation_stream: stream,
            device: device as u32,
            captured: section.capturing(),
            free_deferred: false,
            recorded: None,
        };
        if let Some(stale) = self.blocks.insert(ptr.as_raw(), info) {
            // The driver handed out an address we hold as live: its books and ours
            // disagree. Keep the newer block; the older one's bytes are gone with it.
            log::error!("driver returned live address {ptr} again (old block {stale:?})");
            self.shards[stale.device as usize].budget.release(stale.size);
        }
        Ok(ptr)
    }

    fn free(&self, ptr: DevicePtr) -> Result<()> {
        if ptr.is_null() {
            return Ok(());
        }
        let key = ptr.as_raw();
        let section = self.epoch.enter();
        if section.capturing() && self.defer_if_uncaptured(ptr)? {
            return Ok(());
        }
        let Some((_, info)) = self.blocks.remove_if(&key, |_, b| !b.free_deferred) else {
            return Err(self.unknown_or_double_free(ptr));
        };
        if let Err(e) = self.driver.check_last_error(info.device as Device) {
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
        Ok(())
    }

    fn empty_cache(&self) -> Result<()> {
        let mut first_error = self.free_orphans().err();
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
        let attr = |a| self.driver.pool_attribute(device, a);
        Ok(DeviceStats {
            reserved_current: attr(PoolAttribute::ReservedMemCurrent)?,
            reserved_peak: attr(PoolAttribute::ReservedMemHigh)?,
            used_current: attr(PoolAttribute::UsedMemCurrent)?,
            used_peak: attr(PoolAttribute::UsedMemHigh)?,
            allocated_current: shard.budget.used(),
            ..DeviceStats::default()
        })
    }

    fn reset_peak_stats(&self, device: Device) -> Result<()> {
        self.shard(device)?;
        self.driver.set_pool_attribute(device, PoolAttribute::ReservedMemHigh, 0)?;
        self.driver.set_pool_attribute(device, PoolAttribute::UsedMemHigh, 0)?;
        Ok(())
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
        let peer = !(p2p_enabled || dst_device == src_device);
        self.driver.memcpy_async(dst, dst_device, src, src_device, count, stream, peer)?;
        Ok(())
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

    fn used_bytes(&self, device: Device) -> u64 {
        self.shards.get(device).map_or(0, |s| s.budget.used())
    }

    fn memory_limit(&self, device: Device) -> u64 {
        self.shards.get(device).map_or(u64::MAX, |s| s.budget.limit())
    }

    fn snapshot(&self) -> Vec<BlockSnapshot> {
        let mut v: Vec<BlockSnapshot> = self
            .blocks
            .iter()
            .map(|e| BlockSnapshot {
                ptr: DevicePtr::from_raw(*e.key()),
                size: e.size,
                creation_stream: e.creation(),
                recorded_streams: e.recorded.as_deref().cloned().unwrap_or_default(),
                captured: e.captured,
                free_deferred: e.free_deferred,
            })
            .collect();
        v.sort_by_key(|b| b.ptr);
        v
    }
}

/// A block freed when dropped, like PyTorch's `DataPtr`.
pub struct Block<'a, D: Driver> {
    alloc: &'a StreamAlloc<D>,
    ptr: DevicePtr,
    size: usize,
    device: Device,
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

    /// S6: records that the block is used on `stream`.
    pub fn record_stream(&self, stream: UsageStream) -> Result<()> {
        self.alloc.record_stream(self.ptr, stream)
    }

    /// Frees now and reports any error (dropping frees too, but can only log errors).
    pub fn free(self) -> Result<()> {
        let me = std::mem::ManuallyDrop::new(self);
        me.alloc.free(me.ptr)
    }
}

impl<D: Driver> Drop for Block<'_, D> {
    fn drop(&mut self) {
        if let Err(e) = self.alloc.free(self.ptr) {
            log::error!("freeing block {} on drop failed: {e}", self.ptr);
        }
    }
}
