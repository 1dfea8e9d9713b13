//! The pointer-API free that takes no read section, racing `begin_capture` (DESIGN.md,
//! "The front cache"; `StreamAlloc::free` in `src/core.rs`).
//!
//! The free decides on a plain load of the epoch word (`EpochGate::capturing`): no
//! capture, so the block goes into its stream's cache, with no driver call. A capture
//! may begin right after that load, so the block may enter the cache while the capture
//! is underway. That is sound because the cache is only ever emptied into the driver by
//! a flush inside a read section that saw no capture (`empty_cache`, `flush_caches`,
//! the out-of-memory retry), and a capture's mallocs do not take from the cache.
//!
//! Property 1: no driver free of a cached block is issued after `begin_capture`
//! returned (the flush's section waits, or sees the capture and skips).
//! Property 2: a malloc that decided "capture" never takes a cached block.
//! Property 3: the block is never lost or freed twice: at the end it is in the cache,
//! or was freed to the driver exactly once, or its free was deferred (capture path).

use crate::epoch::EpochGate;
use loom::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use loom::sync::{Arc, Mutex};
use loom::thread;

/// The shared state of the model: the gate, one stream cache, what reached the driver.
struct Model {
    gate: EpochGate,
    /// The stream cache (a spin lock in the allocator; its own model is separate).
    cache: Mutex<Vec<u64>>,
    /// Set by the writer once `begin_capture` has returned.
    capture_begun: AtomicBool,
    /// Driver frees of cached blocks (the flush).
    driver_frees: AtomicUsize,
    /// Frees that took the driver tier and deferred (capture seen by the section).
    deferred: AtomicUsize,
}

impl Model {
    fn new() -> Self {
        Model {
            gate: EpochGate::new(),
            cache: Mutex::new(Vec::new()),
            capture_begun: AtomicBool::new(false),
            driver_frees: AtomicUsize::new(0),
            deferred: AtomicUsize::new(0),
        }
    }

    /// `StreamAlloc::free` of a cacheable block: the cache tier on a plain load, else
    /// the driver tier in a read section (which defers during a capture).
    fn free(&self, block: u64) {
        if !self.gate.capturing() {
            self.cache.lock().unwrap().push(block);
            return;
        }
        let section = self.gate.enter();
        if section.capturing() {
            self.deferred.fetch_add(1, SeqCst);
        } else {
            // An uncaptured driver free: must not land inside a capture.
            assert!(!self.capture_begun.load(SeqCst), "uncaptured driver free in a capture");
            self.driver_frees.fetch_add(1, SeqCst);
        }
    }

    /// `empty_cache`'s flush: in a read section, and only when it saw no capture.
    fn flush(&self) {
        let section = self.gate.enter();
        if section.capturing() {
            return;
        }
        let blocks: Vec<u64> = self.cache.lock().unwrap().drain(..).collect();
        for _ in blocks {
            assert!(!self.capture_begun.load(SeqCst), "cached block freed inside a capture");
            self.driver_frees.fetch_add(1, SeqCst);
        }
    }

    /// A malloc's cache tier: only when no capture is seen (`try_cached`).
    fn malloc_cached(&self) -> Option<u64> {
        if self.gate.capturing() {
            return None;
        }
        self.cache.lock().unwrap().pop()
    }
}

fn begin_capture(m: &Model) {
    m.gate.transition(|underway| if underway { Err(()) } else { Ok(()) }, || {}, || {}).unwrap();
    m.capture_begun.store(true, SeqCst);
}

/// A free and a flush race `begin_capture`; then the capture's malloc.
#[test]
fn loom_ptr_free_without_section_races_begin_capture() {
    loom::model(|| {
        let m = Arc::new(Model::new());
        let freer = {
            let m = m.clone();
            thread::spawn(move || m.free(1))
        };
        let flusher = {
            let m = m.clone();
            thread::spawn(move || m.flush())
        };
        begin_capture(&m);
        // Property 2: inside the capture, the cache is not taken from.
        assert_eq!(m.malloc_cached(), None, "a capture's malloc took a cached block");
        freer.join().unwrap();
        flusher.join().unwrap();
        // Property 3: exactly one fate for the block.
        let cached = m.cache.lock().unwrap().len();
        let fates = cached + m.driver_frees.load(SeqCst) + m.deferred.load(SeqCst);
        assert_eq!(fates, 1, "block lost or freed twice");
    });
}

/// A free racing `begin_capture` while a malloc's cache tier races both: the malloc may
/// take the block only if it decided "no capture"; the block has one owner throughout.
#[test]
fn loom_ptr_free_and_cache_hit_race_begin_capture() {
    loom::model(|| {
        let m = Arc::new(Model::new());
        let freer = {
            let m = m.clone();
            thread::spawn(move || m.free(1))
        };
        let taker = {
            let m = m.clone();
            thread::spawn(move || m.malloc_cached())
        };
        begin_capture(&m);
        freer.join().unwrap();
        let taken = taker.join().unwrap();
        // Flushing after the capture began frees nothing to the driver.
        m.flush();
        let cached = m.cache.lock().unwrap().len();
        let fates = cached + usize::from(taken.is_some()) + m.deferred.load(SeqCst);
        assert_eq!(fates, 1, "block lost or handed out twice");
        assert_eq!(m.driver_frees.load(SeqCst), 0);
    });
}
