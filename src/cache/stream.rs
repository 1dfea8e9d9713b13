//! One (device, stream)'s free lists, and the idle-release bookkeeping on them.
//!
//! ```text
//!   StreamCache (device 0, stream A)     spin lock, in practice taken by the one thread
//!    ├─ class 0 (512 B)   [r, s, ...]    that uses stream A
//!    ├─ class 1 (640 B)   [...]           low[c]: the fewest blocks class c held since the
//!    ├─ ...                                       last idle check: that many sat unused
//!    └─ class 68 (64 MiB) [...]                   the whole interval
//! ```

use super::classes::{CLASSES, class_size};
use crate::block::Record;
use crate::spin::{SpinGuard, SpinLock};
use crate::types::Stream;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// The free lists of one (device, stream), under the stream cache's lock.
pub(crate) struct Lists {
    /// Idle blocks by class; the most recently freed last (handed out first).
    pub(crate) free: [Vec<Arc<Record>>; CLASSES],
    /// The fewest blocks each class held since the last idle check.
    pub(crate) low: [u32; CLASSES],
    /// Bytes (class sizes) held in `free`.
    pub(crate) bytes: u64,
    /// `bytes` as last published to the device total.
    pub(crate) published: u64,
    /// Operations since the last idle check.
    pub(crate) ops: u32,
    /// Puts so far (the clock of `Record::idle_since`).
    pub(crate) ops_total: u64,
    /// Bytes (class sizes) of this stream's blocks handed out and not yet back.
    pub(crate) live: u64,
    pub(crate) hits: u64,
    pub(crate) misses: u64,
    /// Removed from the cache map (emptied while idle): blocks may not be put here.
    pub(crate) retired: bool,
}

impl Lists {
    /// Pops a block of class `class`, or of one of the next `reach` classes.
    #[inline(always)]
    pub(crate) fn pop(&mut self, class: usize, reach: usize) -> Option<Arc<Record>> {
        let last = (class + reach).min(CLASSES - 1);
        for c in class..=last {
            if let Some(r) = self.free[c].pop() {
                let len = self.free[c].len() as u32;
                if len < self.low[c] {
                    self.low[c] = len;
                }
                self.bytes -= class_size(c);
                return Some(r);
            }
        }
        None
    }

    /// Pushes an idle block onto its class list.
    #[inline(always)]
    pub(crate) fn push(&mut self, class: usize, rec: Arc<Record>) {
        self.ops_total += 1;
        self.free[class].push(rec);
        self.bytes += class_size(class);
    }

    /// Takes the blocks that sat idle since the last check (the oldest `low[c]` of each
    /// class) and starts a new interval.
    pub(crate) fn take_idle(&mut self) -> Vec<Arc<Record>> {
        let mut idle = Vec::new();
        for c in 0..CLASSES {
            let n = (self.low[c] as usize).min(self.free[c].len());
            if n > 0 {
                idle.extend(self.free[c].drain(..n));
                self.bytes -= n as u64 * class_size(c);
            }
            self.low[c] = self.free[c].len() as u32;
        }
        self.ops = 0;
        idle
    }

    /// Takes blocks, largest classes first, until at least `bytes` are taken.
    pub(crate) fn take_largest(&mut self, mut bytes: u64) -> Vec<Arc<Record>> {
        let mut out = Vec::new();
        for c in (0..CLASSES).rev() {
            while bytes > 0 {
                let Some(r) = self.free[c].pop() else { break };
                let cs = class_size(c);
                self.bytes -= cs;
                bytes = bytes.saturating_sub(cs);
                out.push(r);
            }
            self.low[c] = self.low[c].min(self.free[c].len() as u32);
        }
        out
    }

    /// Takes the least recently freed blocks (the oldest at the bottom of each class
    /// list) until at least `bytes` are taken.
    pub(crate) fn take_oldest(&mut self, mut bytes: u64) -> Vec<Arc<Record>> {
        let mut out = Vec::new();
        while bytes > 0 {
            let oldest = (0..CLASSES)
                .filter_map(|c| self.free[c].first().map(|r| (r.idle_since(), c)))
                .min();
            let Some((_, c)) = oldest else { break };
            let r = self.free[c].remove(0);
            let cs = class_size(c);
            self.bytes -= cs;
            self.low[c] = self.low[c].min(self.free[c].len() as u32);
            bytes = bytes.saturating_sub(cs);
            out.push(r);
        }
        out
    }

    /// Takes every block.
    pub(crate) fn take_all(&mut self) -> Vec<Arc<Record>> {
        let mut out = Vec::new();
        for (c, list) in self.free.iter_mut().enumerate() {
            out.append(list);
            self.low[c] = 0;
        }
        self.bytes = 0;
        out
    }
}

/// One (device, stream)'s cache.
pub(crate) struct StreamCache {
    pub(crate) stream: Stream,
    lists: SpinLock<Lists>,
    /// Operations (takes and puts) so far, for an idle sweep to tell a stream that has
    /// gone quiet (Relaxed: a hint, written by the owner under the lock).
    pub(crate) activity: AtomicU64,
    /// `activity` as the last sweep saw it.
    pub(crate) swept_at: AtomicU64,
}

impl StreamCache {
    pub(crate) fn new(stream: Stream) -> Self {
        StreamCache {
            stream,
            lists: SpinLock::new(Lists {
                free: std::array::from_fn(|_| Vec::new()),
                low: [0; CLASSES],
                bytes: 0,
                published: 0,
                ops: 0,
                ops_total: 0,
                live: 0,
                hits: 0,
                misses: 0,
                retired: false,
            }),
            activity: AtomicU64::new(0),
            swept_at: AtomicU64::new(0),
        }
    }

    /// Locks the lists. Uncontended in the common case (one thread per stream); never
    /// held across a driver call or while another cache's lock is taken.
    #[inline]
    pub(crate) fn lock(&self) -> SpinGuard<'_, Lists> {
        self.lists.lock()
    }

    /// Counts an operation (under the lock).
    #[inline]
    pub(crate) fn touch(&self) {
        self.activity.store(self.activity.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    }
}
