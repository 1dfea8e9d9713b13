//! What the allocator knows about one block of device memory it holds: a [`Record`].
//!
//! Every block the allocator holds, live or idle in the front cache, has one record,
//! shared (`Arc`) by the block map (address → record, for the pointer API), by the
//! handle that owns it while it is live (the handle API needs no map lookup), and by a
//! stream cache's free list while it is idle. So both APIs see the same blocks: a
//! handle's block can be looked up, recorded on a stream, listed in a snapshot, and a
//! second free of it is told apart from an unknown pointer, whichever API handed it
//! out.
//!
//! ```text
//!                 take (cache hit)            put (free into the cache)
//!   ┌────────┐ ─────────────────────▶ ┌──────┐ ─────────────────────────▶ ┌────────┐
//!   │ CACHED │                        │ LIVE │                            │ CACHED │
//!   └────────┘ ◀───── driver malloc ─ └──────┘ ── free during capture ──▶ ┌──────────┐
//!        │                               │        (uncaptured, S4)        │ DEFERRED │
//!        └── released to the driver ──▶ GONE ◀── driver free ─────────────└──────────┘
//! ```
//!
//! A block handed out through the handle API is `HANDLE` rather than `LIVE` (the same
//! transitions): only its handle moves it on, so that move is a plain store, and the
//! pointer API's free finds it `HANDLE` and is refused. Every other move is a
//! compare-and-swap, so of two racing frees exactly one wins and the other is a double
//! free, whichever APIs they came through. The fields a record is
//! created with (address, device, creation stream, bytes from the driver) never change.

use crate::api::BlockSnapshot;
use crate::types::{Device, DevicePtr, Stream, UsageStream};
use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering, fence};
use std::sync::{Arc, Mutex};

/// Allocations of this size or more are refused outright (S3), as the seed does.
pub const ONE_EXBIBYTE: u64 = 1 << 60;

/// `Record::class` of a block that cannot be cached.
pub(crate) const NO_CLASS: u8 = u8::MAX;

/// Handed out to a caller of the pointer API.
pub(crate) const LIVE: u8 = 1;
/// Handed out to a handle ([`crate::Block`]): live, and moved on by that handle alone
/// (the pointer API may not free it).
pub(crate) const HANDLE: u8 = 5;
/// Idle in a stream cache.
pub(crate) const CACHED: u8 = 2;
/// Freed during a capture, its free deferred until the capture ends (S4).
pub(crate) const DEFERRED: u8 = 3;
/// Given back to the driver (or on its way there).
pub(crate) const GONE: u8 = 4;

/// Whether a block in `state` is handed out (through either API).
#[inline]
pub(crate) fn is_live(state: u8) -> bool {
    state == LIVE || state == HANDLE
}

/// Records a thread keeps for its next blocks: the driver tier makes a record per block
/// and drops it with the block, a heap allocation and free per pair (about 140 of the
/// 1100 instructions of a null-driver pair through glibc) that a reused one avoids.
const SPARE_RECORDS: usize = 16;

thread_local! {
    /// This thread's spare records: no one else refers to them.
    static SPARE: RefCell<Vec<Arc<Record>>> = const { RefCell::new(Vec::new()) };
}

/// One block of device memory (the seed's `PtrUsage`, plus the cache's state).
#[derive(Debug)]
pub(crate) struct Record {
    pub(crate) ptr: u64,
    pub(crate) device: u32,
    /// Allocated during a capture (graph memory: never cached).
    pub(crate) captured: bool,
    /// The stream it was allocated on; a cached block serves only this stream.
    pub(crate) creation_stream: Stream,
    /// Bytes the driver handed out: the size class when the block may be cached, else
    /// the requested size.
    pub(crate) alloc_size: u64,
    /// The size class `alloc_size` is exactly, or [`NO_CLASS`] (the block cannot be
    /// cached: larger than the largest class, or allocated at its exact size).
    pub(crate) class: u8,
    /// The requested size of the current use (S10).
    size: AtomicU64,
    state: AtomicU8,
    /// Whether `recorded` holds any stream (read without the lock on every free).
    has_recorded: AtomicBool,
    /// Streams recorded with `record_stream` (rare: boxed, so a record that has none
    /// spends one pointer on them, not a whole vector).
    #[allow(clippy::box_collection)]
    recorded: Mutex<Option<Box<Vec<UsageStream>>>>,
    /// When it last went idle, on its stream cache's clock (written under that lock).
    idle_since: AtomicU64,
}

impl Record {
    /// A block fresh from the driver, handed out in `state` (`LIVE` or `HANDLE`).
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    pub(crate) fn new(
        ptr: DevicePtr,
        device: Device,
        size: u64,
        alloc_size: u64,
        stream: Stream,
        captured: bool,
        cacheable: bool,
        state: u8,
    ) -> Self {
        Record {
            ptr: ptr.as_raw(),
            device: device as u32,
            captured,
            creation_stream: stream,
            alloc_size,
            class: match cacheable.then(|| crate::cache::class_of(alloc_size)).flatten() {
                Some((c, cs)) if cs == alloc_size => c as u8,
                _ => NO_CLASS,
            },
            size: AtomicU64::new(size),
            state: AtomicU8::new(state),
            has_recorded: AtomicBool::new(false),
            recorded: Mutex::new(None),
            idle_since: AtomicU64::new(0),
        }
    }

    /// `rec` in an `Arc`: in a spare record of this thread if it has one, else a new one.
    /// Inline with its caller's `Record::new`, so the fields are written into the spare
    /// directly (a copy through the stack read back 16 bytes at a time costs a
    /// store-forwarding stall).
    #[inline(always)]
    pub(crate) fn shared(rec: Record) -> Arc<Record> {
        let spare = SPARE.try_with(|s| s.borrow_mut().pop()).ok().flatten();
        match spare {
            // A plain read of the count instead of `Arc::get_mut` (whose check is a
            // locked compare-and-swap on the weak count): records are never downgraded,
            // so one strong reference is the only reference.
            Some(arc) if Arc::strong_count(&arc) == 1 => {
                // Acquire: pairs with the Release decrements of the clones other threads
                // dropped (as `Arc`'s own drop does), so their last uses come before this
                // write.
                fence(Ordering::Acquire);
                // Safety: this is the only reference to the record: its strong count is 1,
                // no `Weak` to a record is ever made, and nobody can clone it anew (a spare
                // is in no map or list, and this thread's spare list is not shared). The
                // pointer comes from the `Arc`'s own allocation pointer, not from a shared
                // reference, so writing through it is the write `Arc::get_mut` allows.
                unsafe { *Arc::as_ptr(&arc).cast_mut() = rec };
                arc
            }
            _ => Arc::new(rec),
        }
    }

    /// Drops the caller's reference to a record whose block is gone; when it is the only
    /// one (the block map and every handle let go), the record is kept as this thread's
    /// spare. Nobody can take a new reference to it: it is in no map or list.
    #[inline]
    pub(crate) fn retire(rec: Arc<Record>) {
        // A relaxed read, only a filter: `shared` reads the count again before it reuses
        // the record and orders the other holders' last uses with its Acquire fence (a
        // spare it finds shared is dropped, and a new record made).
        if Arc::strong_count(&rec) == 1 {
            let _ = SPARE.try_with(|s| {
                let mut s = s.borrow_mut();
                if s.len() < SPARE_RECORDS {
                    s.push(rec);
                }
            });
        }
    }

    pub(crate) fn device(&self) -> Device {
        self.device as Device
    }

    pub(crate) fn dptr(&self) -> DevicePtr {
        DevicePtr::from_raw(self.ptr)
    }

    pub(crate) fn creation(&self) -> UsageStream {
        UsageStream::new(self.creation_stream, self.device())
    }

    /// The requested size of the current use.
    pub(crate) fn size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }

    pub(crate) fn state(&self) -> u8 {
        // Acquire: pairs with the AcqRel transitions below (what the winner of a
        // transition wrote before it is visible to a reader that sees its state).
        self.state.load(Ordering::Acquire)
    }

    /// Moves the state `from` → `to`; false if it was not `from` (a racing free won).
    #[inline]
    pub(crate) fn transition(&self, from: u8, to: u8) -> bool {
        self.state.compare_exchange(from, to, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }

    /// Moves the state `from` → `to` for the caller that owns the block in `from`: a
    /// handle's block (`HANDLE`) is moved on by its handle alone (a pointer-API free
    /// finds it `HANDLE` and is refused; nothing else moves a block out of `HANDLE`), so
    /// a store suffices; any other state may be raced by a second free, so it moves by
    /// compare-and-swap. False if a racing free won.
    #[inline]
    pub(crate) fn leave(&self, from: u8, to: u8) -> bool {
        if from == HANDLE {
            debug_assert_eq!(self.state(), HANDLE, "only its handle moves a handle's block");
            // Release: pairs with the Acquire loads of the state, as a transition's does.
            self.state.store(to, Ordering::Release);
            true
        } else {
            self.transition(from, to)
        }
    }

    /// A cached block handed out again for `size` bytes, in `state` (`LIVE` or
    /// `HANDLE`). The caller holds it: it came off a free list, so no other thread can
    /// hand it out, and a racing free of the address (a double free) fails its `LIVE`
    /// compare-and-swap until this store; a plain store suffices.
    #[inline]
    pub(crate) fn reuse(&self, size: u64, state: u8) {
        debug_assert_eq!(self.state(), CACHED, "a block off a free list is idle");
        self.size.store(size, Ordering::Relaxed);
        // Release: pairs with the Acquire loads of the state (the size is visible first).
        self.state.store(state, Ordering::Release);
    }

    pub(crate) fn idle_since(&self) -> u64 {
        self.idle_since.load(Ordering::Relaxed)
    }

    pub(crate) fn set_idle_since(&self, tick: u64) {
        self.idle_since.store(tick, Ordering::Relaxed);
    }

    /// Whether the block was recorded on a stream other than its creation stream.
    #[inline]
    pub(crate) fn has_recorded(&self) -> bool {
        self.has_recorded.load(Ordering::Acquire)
    }

    /// Adds `stream` to the recorded streams (S6).
    pub(crate) fn record(&self, stream: UsageStream) {
        let mut r = crate::sync::lock_std(&self.recorded);
        let r = r.get_or_insert_with(Box::default);
        if !r.contains(&stream) {
            r.push(stream);
        }
        // Release: pairs with the Acquire in `has_recorded` (the list is filled first).
        self.has_recorded.store(true, Ordering::Release);
    }

    /// The recorded streams.
    #[inline]
    pub(crate) fn recorded(&self) -> Vec<UsageStream> {
        if !self.has_recorded() {
            return Vec::new();
        }
        self.recorded_list()
    }

    /// `recorded` of a block used on other streams (the lock and a copy).
    #[cold]
    #[inline(never)]
    fn recorded_list(&self) -> Vec<UsageStream> {
        crate::sync::lock_std(&self.recorded).as_deref().cloned().unwrap_or_default()
    }

    /// The block as a snapshot lists it.
    pub(crate) fn snapshot(&self) -> BlockSnapshot {
        BlockSnapshot {
            ptr: self.dptr(),
            size: self.size(),
            creation_stream: self.creation(),
            recorded_streams: self.recorded(),
            captured: self.captured,
            free_deferred: self.state() == DEFERRED,
        }
    }
}

/// A live block as the seed replica keeps it (the seed's `PtrUsage`).
#[derive(Clone, Debug)]
pub(crate) struct BlockInfo {
    pub(crate) size: u64,
    pub(crate) creation_stream: Stream,
    pub(crate) device: u32,
    pub(crate) captured: bool,
    pub(crate) free_deferred: bool,
    /// Streams recorded with `record_stream` (rare: boxed, one thin pointer).
    #[allow(clippy::box_collection)]
    pub(crate) recorded: Option<Box<Vec<UsageStream>>>,
}

impl BlockInfo {
    pub(crate) fn creation(&self) -> UsageStream {
        UsageStream::new(self.creation_stream, self.device as Device)
    }

    /// The block at `ptr` as a snapshot lists it.
    pub(crate) fn snapshot(&self, ptr: u64) -> BlockSnapshot {
        BlockSnapshot {
            ptr: DevicePtr::from_raw(ptr),
            size: self.size,
            creation_stream: self.creation(),
            recorded_streams: self.recorded.as_deref().cloned().unwrap_or_default(),
            captured: self.captured,
            free_deferred: self.free_deferred,
        }
    }
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

#[cfg(all(test, not(streamalloc_loom)))]
mod tests {
    use super::*;

    fn record(ptr: u64) -> Record {
        Record::new(DevicePtr::from_raw(ptr), 0, 512, 512, Stream::NULL, false, false, LIVE)
    }

    /// A retired record is reused in place by this thread's next `shared` (the write
    /// through the `Arc` that the spare path makes; Miri checks it), and a record another
    /// holder still references is never reused.
    #[test]
    fn spare_records_are_reused_only_when_unshared() {
        let a = Record::shared(record(0x1000));
        a.record(UsageStream::new(Stream::NULL, 0));
        let addr = Arc::as_ptr(&a);
        Record::retire(a);
        let b = Record::shared(record(0x2000));
        assert_eq!(Arc::as_ptr(&b), addr, "the spare is reused");
        assert_eq!(b.ptr, 0x2000);
        assert!(b.recorded().is_empty(), "the old contents were replaced");

        let held = b.clone();
        Record::retire(b);
        let c = Record::shared(record(0x3000));
        assert_ne!(Arc::as_ptr(&c), addr, "a record still held is not a spare");
        assert_eq!(held.ptr, 0x2000);
    }
}
