//! Allocation history: a bounded ring of allocator events, in the terms of PyTorch's
//! memory snapshots (`torch.cuda.memory._record_memory_history`, memory_viz).
//!
//! ```text
//!   malloc / free / oom hooks (src/core.rs)
//!        │  history off: one relaxed load of `on`, a branch predicted not taken
//!        ▼  history on:
//!   head.fetch_add(1) ──▶ slot = head % capacity ──▶ seqlock write (6 words)
//!                                                        │
//!   pages of SLOTS_PER_PAGE slots, each allocated on first use (a 1M-entry ring
//!   recording 1000 events costs one page)                 │
//!                                                        ▼
//!   history(): for idx in head-capacity..head, keep the slots whose sequence says
//!   "entry idx, complete" before and after the copy
//! ```
//!
//! Entries carry what memory_viz reads from a trace entry (action, address, size,
//! stream, device, time) and an opaque *context* id: the caller (the PyTorch shim) sets
//! one per thread with [`set_thread_context`] before an allocation or free, and keeps
//! the frames it gathered under that id.
//!
//! What each action means here (the stream-ordered reading of PyTorch's trace actions):
//! - `Alloc`: a block handed out (requested size).
//! - `FreeRequested`: the owner freed it. `FreeCompleted`: its free was issued in stream
//!   order (same call, unless the free was deferred by a capture (S4): then when the
//!   deferred free is issued after the capture).
//! - `SegmentAlloc` / `SegmentFree`: memory asked of / given back to the driver's pool
//!   (the driver size: a block's class size when the front cache may keep it).
//! - `Oom`: an allocation failed; as in PyTorch, `addr` carries the device's free bytes.
//!
//! The ring is lossy by design: when it is full the oldest entries are overwritten, and
//! under extreme contention (a writer lapped by `capacity` others mid-write) one entry
//! may be dropped; a reader never sees a torn entry.

use crate::api::StreamOrderedAllocator;
use crate::driver::Driver;
use crate::error::{Error, Result};
use crate::types::{Device, DevicePtr, Stream};
use crate::{StreamAlloc, cache};
use arc_swap::ArcSwapOption;
use crossbeam::utils::CachePadded;
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering, fence};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// The most entries a ring holds (larger requests, such as Python's default
/// `max_entries=sys.maxsize`, are clamped): 4 Mi entries of 56 bytes, 224 MiB at most,
/// allocated a page at a time as the ring fills.
pub const MAX_HISTORY_ENTRIES: usize = 1 << 22;

/// Slots per lazily allocated page of the ring.
const SLOTS_PER_PAGE: usize = 4096;

/// What happened (PyTorch's `TraceEntry::Action`, with the same numbers).
#[repr(u32)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// A block handed out.
    Alloc = 0,
    /// The owner freed a block.
    FreeRequested = 1,
    /// The block's free was issued in stream order (reusable by later work).
    FreeCompleted = 2,
    /// Memory asked of the driver's pool.
    SegmentAlloc = 3,
    /// Memory given back to the driver's pool.
    SegmentFree = 4,
    /// An allocation failed (`addr` carries the device's free bytes).
    Oom = 8,
}

impl Action {
    /// Every action, in the order of their numbers.
    pub const ALL: [Action; 6] = [
        Action::Alloc,
        Action::FreeRequested,
        Action::FreeCompleted,
        Action::SegmentAlloc,
        Action::SegmentFree,
        Action::Oom,
    ];

    /// The action of a number (PyTorch's numbering); `None` for one not recorded here.
    pub fn from_u32(n: u32) -> Option<Action> {
        Action::ALL.into_iter().find(|a| *a as u32 == n)
    }

    /// The name PyTorch's snapshots give the action (`"alloc"`, `"free_requested"`...).
    pub fn name(self) -> &'static str {
        match self {
            Action::Alloc => "alloc",
            Action::FreeRequested => "free_requested",
            Action::FreeCompleted => "free_completed",
            Action::SegmentAlloc => "segment_alloc",
            Action::SegmentFree => "segment_free",
            Action::Oom => "oom",
        }
    }

    /// The action of a PyTorch name (`skip_actions` lists names).
    pub fn from_name(name: &str) -> Option<Action> {
        Action::ALL.into_iter().find(|a| a.name() == name)
    }

    /// This action's bit in a skip mask.
    pub const fn bit(self) -> u32 {
        1 << (self as u32)
    }
}

/// One recorded event.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct HistoryEntry {
    /// What happened.
    pub action: Action,
    /// The block's (or segment's) address; for [`Action::Oom`], the device's free bytes.
    pub addr: u64,
    /// Bytes: requested for blocks, driver size for segments, requested for an OOM.
    pub size: u64,
    /// The stream the block belongs to (its creation stream).
    pub stream: Stream,
    /// The device.
    pub device: Device,
    /// Nanoseconds since the Unix epoch (a monotonic clock anchored once).
    pub time_ns: u64,
    /// The context id the recording thread had set ([`set_thread_context`]; 0: none).
    pub context: u64,
}

/// How to record (see [`StreamAlloc::record_history`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistoryOptions {
    /// Record (true) or stop recording and drop the entries (false, as PyTorch does).
    pub enabled: bool,
    /// Entries kept (the newest); clamped to 1..=[`MAX_HISTORY_ENTRIES`].
    pub max_entries: usize,
    /// Drop the entries recorded so far.
    pub clear: bool,
    /// Actions not recorded.
    pub skip: Vec<Action>,
}

impl Default for HistoryOptions {
    fn default() -> Self {
        HistoryOptions { enabled: true, max_entries: 100_000, clear: false, skip: Vec::new() }
    }
}

thread_local! {
    /// The context id entries recorded by this thread carry.
    static CONTEXT: Cell<u64> = const { Cell::new(0) };
}

/// Sets the context id the calling thread's next entries carry (0: none), for every
/// allocator of the process. The PyTorch shim sets the id of the frames it gathered
/// before calling malloc or free, and 0 after.
pub fn set_thread_context(context: u64) {
    let _ = CONTEXT.try_with(|c| c.set(context));
}

/// The calling thread's context id.
pub fn thread_context() -> u64 {
    CONTEXT.try_with(Cell::get).unwrap_or(0)
}

/// One slot: a sequence word (odd while written; `2 * (index + 1)` once entry `index`
/// is complete) and the entry's six words.
#[derive(Default)]
struct Slot {
    seq: AtomicU64,
    words: [AtomicU64; 6],
}

/// The ring: a monotonic head and `capacity` slots in lazily allocated pages.
struct Ring {
    head: CachePadded<AtomicU64>,
    capacity: u64,
    pages: Box<[OnceLock<Box<[Slot]>>]>,
}

impl Ring {
    fn new(capacity: usize) -> Self {
        let capacity = capacity.clamp(1, MAX_HISTORY_ENTRIES);
        let pages = capacity.div_ceil(SLOTS_PER_PAGE);
        Ring {
            head: CachePadded::new(AtomicU64::new(0)),
            capacity: capacity as u64,
            pages: (0..pages).map(|_| OnceLock::new()).collect(),
        }
    }

    fn page_len(&self, page: usize) -> usize {
        let cap = self.capacity as usize;
        (cap - page * SLOTS_PER_PAGE).min(SLOTS_PER_PAGE)
    }

    fn slot(&self, index: u64) -> &Slot {
        let i = (index % self.capacity) as usize;
        let (page, at) = (i / SLOTS_PER_PAGE, i % SLOTS_PER_PAGE);
        let slots = self.pages[page]
            .get_or_init(|| (0..self.page_len(page)).map(|_| Slot::default()).collect());
        &slots[at]
    }

    fn push(&self, words: [u64; 6]) {
        let index = self.head.fetch_add(1, Ordering::Relaxed);
        let slot = self.slot(index);
        let done = 2 * (index + 1);
        // Claim: even (complete or empty) to odd. A newer entry already there wins.
        loop {
            let s = slot.seq.load(Ordering::Relaxed);
            if s >= done {
                return;
            }
            if s & 1 == 0
                && slot
                    .seq
                    .compare_exchange_weak(s, s | 1, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
            {
                break;
            }
            std::hint::spin_loop();
        }
        // Pairs with the reader's acquire fence: a reader that sees any of the words
        // below sees the odd sequence too, and retries or skips.
        fence(Ordering::Release);
        for (w, v) in slot.words.iter().zip(words) {
            w.store(v, Ordering::Relaxed);
        }
        // Pairs with the reader's first (acquire) load: the words are visible to a
        // reader that sees `done`.
        slot.seq.store(done, Ordering::Release);
    }

    /// The complete entries still in the ring, oldest first.
    fn read(&self) -> Vec<[u64; 6]> {
        let head = self.head.load(Ordering::Acquire);
        let start = head.saturating_sub(self.capacity);
        let mut out = Vec::with_capacity((head - start) as usize);
        for index in start..head {
            let i = (index % self.capacity) as usize;
            let Some(slots) = self.pages[i / SLOTS_PER_PAGE].get() else { continue };
            let slot = &slots[i % SLOTS_PER_PAGE];
            let done = 2 * (index + 1);
            if slot.seq.load(Ordering::Acquire) != done {
                continue;
            }
            let words: [u64; 6] = std::array::from_fn(|k| slot.words[k].load(Ordering::Relaxed));
            // Pairs with the writer's release fence: if a writer overwrote any word we
            // read, the sequence load below sees its odd (or newer) value.
            fence(Ordering::Acquire);
            if slot.seq.load(Ordering::Relaxed) == done {
                out.push(words);
            }
        }
        out
    }
}

/// The history of one allocator: off by default.
pub(crate) struct History {
    /// Whether entries are recorded: the only thing the hot path reads when off.
    on: AtomicBool,
    /// Bits of [`Action::bit`] not recorded.
    skip: AtomicU32,
    ring: ArcSwapOption<Ring>,
    /// The ring's settings change under this lock (recording does not take it).
    config: Mutex<()>,
    /// The clock: a monotonic instant and the Unix time it stood for.
    origin: (Instant, u64),
}

impl Default for History {
    fn default() -> Self {
        let unix = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        History {
            on: AtomicBool::new(false),
            skip: AtomicU32::new(0),
            ring: ArcSwapOption::empty(),
            config: Mutex::new(()),
            origin: (Instant::now(), unix),
        }
    }
}

impl History {
    /// Whether history is being recorded.
    ///
    /// Under `--cfg streamalloc_no_history_hooks` (a measurement build only:
    /// `benches/gpu/history_bench.sh` compares it with the normal build to show what the
    /// hooks cost while history is off) the answer is a constant `false`, so every hook
    /// compiles away.
    #[inline(always)]
    pub(crate) fn on(&self) -> bool {
        if cfg!(streamalloc_no_history_hooks) {
            return false;
        }
        self.on.load(Ordering::Relaxed)
    }

    /// Records an entry when history is on: the hot path's hook.
    #[inline(always)]
    pub(crate) fn note(
        &self,
        action: Action,
        device: Device,
        addr: u64,
        size: u64,
        stream: Stream,
    ) {
        if self.on() {
            self.push(action, device, addr, size, stream);
        }
    }

    #[cold]
    #[inline(never)]
    fn push(&self, action: Action, device: Device, addr: u64, size: u64, stream: Stream) {
        if self.skip.load(Ordering::Relaxed) & action.bit() != 0 {
            return;
        }
        let Some(ring) = self.ring.load_full() else { return };
        let time = self.origin.1 + self.origin.0.elapsed().as_nanos() as u64;
        let head = (action as u64) | ((device as u64) << 32);
        ring.push([head, addr, size, stream.as_raw() as u64, time, thread_context()]);
    }

    pub(crate) fn configure(&self, options: &HistoryOptions) {
        let _g = self.config.lock().unwrap_or_else(|p| p.into_inner());
        let skip = options.skip.iter().fold(0, |m, a| m | a.bit());
        self.skip.store(skip, Ordering::Relaxed);
        if !options.enabled {
            self.on.store(false, Ordering::Relaxed);
            self.ring.store(None);
            return;
        }
        let capacity = options.max_entries.clamp(1, MAX_HISTORY_ENTRIES) as u64;
        let keep = self.ring.load_full().filter(|r| r.capacity == capacity && !options.clear);
        if keep.is_none() {
            self.ring.store(Some(Arc::new(Ring::new(capacity as usize))));
        }
        self.on.store(true, Ordering::Relaxed);
    }

    pub(crate) fn entries(&self) -> Vec<HistoryEntry> {
        let Some(ring) = self.ring.load_full() else { return Vec::new() };
        ring.read()
            .into_iter()
            .filter_map(|w| {
                Some(HistoryEntry {
                    action: Action::from_u32(w[0] as u32)?,
                    device: (w[0] >> 32) as Device,
                    addr: w[1],
                    size: w[2],
                    // Safety: the word was written from a `Stream` this allocator was
                    // given (`note`): the handle is handed back as it came in.
                    stream: unsafe { Stream::from_raw(w[3] as usize) },
                    time_ns: w[4],
                    context: w[5],
                })
            })
            .collect()
    }
}

// ----- OOM observers --------------------------------------------------------------

/// An out-of-memory observer: called with (device, requested bytes, total bytes, free
/// bytes), as PyTorch's allocator calls `OutOfMemoryObserver`s: the second argument is
/// the size of the allocation that failed, the third the user limit when a memory
/// fraction is set (else the device's total), the fourth the device's free bytes
/// according to the driver. Called on the allocating thread, with no allocator lock or
/// read section held (an observer may allocate, free or take a snapshot).
pub type OomObserver = Arc<dyn Fn(Device, u64, u64, u64) + Send + Sync>;

/// The observers of one allocator.
#[derive(Default)]
pub(crate) struct OomObservers {
    list: ArcSwapOption<Vec<OomObserver>>,
    add: Mutex<()>,
}

impl OomObservers {
    fn attach(&self, observer: OomObserver) {
        let _g = self.add.lock().unwrap_or_else(|p| p.into_inner());
        let mut v = self.list.load_full().map(|l| (*l).clone()).unwrap_or_default();
        v.push(observer);
        self.list.store(Some(Arc::new(v)));
    }

    fn notify(&self, device: Device, requested: u64, total: u64, free: u64) {
        if let Some(list) = self.list.load_full() {
            for obs in list.iter() {
                obs(device, requested, total, free);
            }
        }
    }
}

// ----- the allocator's side ---------------------------------------------------------

/// A block in the allocator's front cache (freed by its owner, kept for reuse on its
/// stream).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct CachedBlock {
    /// The block's address.
    pub ptr: DevicePtr,
    /// Its size as the driver allocated it (the class size).
    pub size: u64,
    /// The device.
    pub device: Device,
    /// The stream it is kept for.
    pub stream: Stream,
}

/// A block's state in a memory snapshot ([`SnapshotBlock`]).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum BlockState {
    /// Live: handed out and not freed.
    Live,
    /// Freed by its owner during a capture; the free waits for the capture's end (S4).
    FreeDeferred,
    /// Freed and kept in the front cache for reuse on its stream.
    Cached,
}

/// One block of a memory snapshot: a driver allocation, which PyTorch's snapshot
/// format shows as a segment holding one block.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct SnapshotBlock {
    /// The address.
    pub ptr: DevicePtr,
    /// Bytes the owner asked for (0 for a cached block).
    pub requested: u64,
    /// Bytes the driver allocated (the segment's size).
    pub size: u64,
    /// The device.
    pub device: Device,
    /// The creation stream (for a cached block, the stream it is kept for).
    pub stream: Stream,
    /// Live, deferred or cached.
    pub state: BlockState,
    /// Allocated during a capture.
    pub captured: bool,
}

impl<D: Driver> StreamAlloc<D> {
    /// Starts, reconfigures or stops recording history (PyTorch's `recordHistory`).
    /// Stopping drops the entries; changing `max_entries` starts a fresh ring.
    pub fn record_history(&self, options: &HistoryOptions) {
        self.history.configure(options);
    }

    /// Whether history is being recorded.
    pub fn history_enabled(&self) -> bool {
        self.history.on()
    }

    /// The recorded entries still in the ring, oldest first.
    pub fn history(&self) -> Vec<HistoryEntry> {
        self.history.entries()
    }

    /// Adds an out-of-memory observer (PyTorch's `attachOutOfMemoryObserver`); see
    /// [`OomObserver`] for its arguments.
    pub fn attach_oom_observer(&self, observer: OomObserver) {
        self.oom_observers.attach(observer);
    }

    /// The out-of-memory hook of malloc: records the OOM and calls the observers (no
    /// lock or read section is held here). Returns `r`.
    #[inline]
    pub(crate) fn noted_oom<T>(&self, stream: Stream, r: Result<T>) -> Result<T> {
        if let Err(Error::OutOfMemory(o)) = &r {
            self.oom_slow(stream, o);
        }
        r
    }

    #[cold]
    #[inline(never)]
    fn oom_slow(&self, stream: Stream, o: &crate::error::OutOfMemory) {
        self.history.note(Action::Oom, o.device, o.device_free, o.requested, stream);
        let total = if o.limit == u64::MAX { o.device_total } else { o.limit };
        self.oom_observers.notify(o.device, o.requested, total, o.device_free);
    }

    /// The size the driver allocated for a block of `size` requested bytes.
    fn driver_block_size(&self, size: u64) -> u64 {
        match cache::class_of(size) {
            Some((_, class_size)) if self.cache_config().enabled => class_size,
            _ => size,
        }
    }

    /// Every block the allocator holds, live and cached, sorted by device and address
    /// (what PyTorch's `memory_snapshot` lists as segments). Live blocks of the handle
    /// API served by the front cache are not listed (they are not in the block map; see
    /// [`StreamAlloc::allocate`]).
    pub fn memory_snapshot(&self) -> Vec<SnapshotBlock> {
        let mut v: Vec<SnapshotBlock> = self
            .snapshot()
            .into_iter()
            .map(|b| SnapshotBlock {
                ptr: b.ptr,
                requested: b.size,
                size: self.driver_block_size(b.size),
                device: b.creation_stream.device,
                stream: b.creation_stream.stream,
                state: if b.free_deferred { BlockState::FreeDeferred } else { BlockState::Live },
                captured: b.captured,
            })
            .collect();
        v.extend(self.cached_blocks().into_iter().map(|c| SnapshotBlock {
            ptr: c.ptr,
            requested: 0,
            size: c.size,
            device: c.device,
            stream: c.stream,
            state: BlockState::Cached,
            captured: false,
        }));
        v.sort_by_key(|b| (b.device, b.ptr));
        v
    }
}
