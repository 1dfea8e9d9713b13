//! History, OOM observers and memory snapshots on the simulated device (checker on),
//! with the front cache (the default) and without it (passthrough).

use std::sync::{Arc, Mutex};
use streamalloc::history::{BlockState, MAX_HISTORY_ENTRIES};
use streamalloc::sim::SimDriver;
use streamalloc::{
    Action, CacheConfig, Error, HistoryEntry, HistoryOptions, StreamAlloc, StreamOrderedAllocator,
    UsageStream,
};

const MIB: u64 = 1 << 20;
const CAPACITY: u64 = 256 * MIB;

/// A subject: its name, its simulated device, the allocator on it.
type Subject = (&'static str, Arc<SimDriver>, StreamAlloc<Arc<SimDriver>>);

fn subjects() -> Vec<Subject> {
    let mk = |cache: CacheConfig| {
        let sim = Arc::new(SimDriver::with_devices(1, CAPACITY));
        let a = StreamAlloc::with_cache(sim.clone(), cache).unwrap();
        (sim, a)
    };
    let (s1, a1) = mk(CacheConfig::default());
    let (s2, a2) = mk(CacheConfig::passthrough());
    vec![("cached", s1, a1), ("passthrough", s2, a2)]
}

/// The block-level actions (no segment events) as (action, addr, size).
fn block_events(h: &[HistoryEntry]) -> Vec<(Action, u64, u64)> {
    h.iter()
        .filter(|e| !matches!(e.action, Action::SegmentAlloc | Action::SegmentFree))
        .map(|e| (e.action, e.addr, e.size))
        .collect()
}

#[test]
fn history_is_off_by_default_and_costs_no_entries() {
    for (kind, sim, a) in subjects() {
        let s = sim.new_usage_stream(0).unwrap();
        let p = a.malloc(0, 4096, s.stream).unwrap();
        a.free(p).unwrap();
        assert!(!a.history_enabled(), "{kind}");
        assert!(a.history().is_empty(), "{kind}");
    }
}

#[test]
fn history_matches_a_scripted_sequence() {
    for (kind, sim, a) in subjects() {
        let s = sim.new_usage_stream(0).unwrap();
        a.record_history(&HistoryOptions::default());
        streamalloc::history::set_thread_context(7);
        let x = a.malloc(0, 1000, s.stream).unwrap();
        streamalloc::history::set_thread_context(0);
        let y = a.malloc(0, 3 * MIB as usize, s.stream).unwrap();
        a.free(x).unwrap();
        let z = a.malloc(0, 1000, s.stream).unwrap();
        a.free(y).unwrap();
        a.free(z).unwrap();
        let h = a.history();
        use Action::*;
        let want = vec![
            (Alloc, x.as_raw(), 1000),
            (Alloc, y.as_raw(), 3 * MIB),
            (FreeRequested, x.as_raw(), 1000),
            (FreeCompleted, x.as_raw(), 1000),
            (Alloc, z.as_raw(), 1000),
            (FreeRequested, y.as_raw(), 3 * MIB),
            (FreeCompleted, y.as_raw(), 3 * MIB),
            (FreeRequested, z.as_raw(), 1000),
            (FreeCompleted, z.as_raw(), 1000),
        ];
        assert_eq!(block_events(&h), want, "{kind}");
        assert!(h.iter().all(|e| e.stream == s.stream && e.device == 0), "{kind}");
        assert!(h.windows(2).all(|w| w[0].time_ns <= w[1].time_ns), "{kind}: time order");
        // x's entries (its segment, if any, and its allocation) carry context 7.
        let first_y = h.iter().position(|e| e.addr == y.as_raw()).unwrap();
        assert!(h[..first_y].iter().all(|e| e.context == 7), "{kind}: the thread's context");
        assert!(h[first_y..].iter().all(|e| e.context == 0), "{kind}");
        // Segments: every driver allocation and free is there, with the driver size.
        let seg_allocs = h.iter().filter(|e| e.action == SegmentAlloc).count();
        let seg_frees = h.iter().filter(|e| e.action == SegmentFree).count();
        if kind == "passthrough" {
            assert_eq!((seg_allocs, seg_frees), (3, 3), "{kind}");
        } else {
            // x's block comes back from the cache for z: two driver allocations, and
            // nothing given back until the cache is emptied.
            assert_eq!((seg_allocs, seg_frees), (2, 0), "{kind}");
            a.empty_cache().unwrap();
            let h = a.history();
            let frees = h.iter().filter(|e| e.action == SegmentFree).count();
            assert_eq!(frees, 2, "{kind}: empty_cache gives both segments back");
        }
        // Off drops the entries, and nothing more is recorded.
        a.record_history(&HistoryOptions { enabled: false, ..HistoryOptions::default() });
        let p = a.malloc(0, 64, s.stream).unwrap();
        a.free(p).unwrap();
        assert!(a.history().is_empty(), "{kind}");
        sim.assert_clean();
    }
}

#[test]
fn ring_keeps_the_newest_entries_and_skips_actions() {
    for (kind, sim, a) in subjects() {
        let s = sim.new_usage_stream(0).unwrap();
        let skip = vec![Action::FreeRequested, Action::SegmentAlloc, Action::SegmentFree];
        a.record_history(&HistoryOptions { max_entries: 10, skip, ..HistoryOptions::default() });
        let mut ptrs = Vec::new();
        for i in 0..20u64 {
            let p = a.malloc(0, (i as usize + 1) * 512, s.stream).unwrap();
            ptrs.push(p);
        }
        for &p in &ptrs {
            a.free(p).unwrap();
        }
        let h = a.history();
        assert_eq!(h.len(), 10, "{kind}");
        assert!(h.iter().all(|e| e.action == Action::FreeCompleted), "{kind}: the newest 10");
        let addrs: Vec<u64> = h.iter().map(|e| e.addr).collect();
        let want: Vec<u64> = ptrs[10..].iter().map(|p| p.as_raw()).collect();
        assert_eq!(addrs, want, "{kind}");
        // Clearing keeps recording into an empty ring.
        a.record_history(&HistoryOptions { max_entries: 10, clear: true, ..Default::default() });
        assert!(a.history().is_empty(), "{kind}");
        // An absurd size is clamped, not allocated up front.
        a.record_history(&HistoryOptions { max_entries: usize::MAX, ..Default::default() });
        let p = a.malloc(0, 64, s.stream).unwrap();
        a.free(p).unwrap();
        assert!(a.history().len() >= 3, "{kind}");
        assert!(a.history().len() <= MAX_HISTORY_ENTRIES, "{kind}");
    }
}

#[test]
fn deferred_free_completes_after_the_capture() {
    for (kind, sim, a) in subjects() {
        let cap = sim.new_usage_stream(0).unwrap();
        let x = a.malloc(0, 4096, cap.stream).unwrap();
        a.record_history(&HistoryOptions::default());
        a.begin_capture(0).unwrap();
        sim.begin_capture(cap).unwrap();
        a.free(x).unwrap();
        let h = a.history();
        assert_eq!(block_events(&h), vec![(Action::FreeRequested, x.as_raw(), 4096)], "{kind}");
        a.end_capture(0, cap.stream).unwrap();
        sim.end_capture(cap).unwrap();
        let y = a.malloc(0, 512, cap.stream).unwrap(); // flushes the deferred free
        let h = block_events(&a.history());
        assert_eq!(h[1], (Action::FreeCompleted, x.as_raw(), 4096), "{kind}");
        assert_eq!(h[2], (Action::Alloc, y.as_raw(), 512), "{kind}");
        a.free(y).unwrap();
        sim.assert_clean();
    }
}

#[test]
fn concurrent_recording_never_tears_an_entry() {
    let sim = Arc::new(SimDriver::with_devices(1, CAPACITY));
    let a = Arc::new(StreamAlloc::new(sim.clone()).unwrap());
    a.record_history(&HistoryOptions { max_entries: 64, ..HistoryOptions::default() });
    let streams: Vec<UsageStream> = (0..4).map(|_| sim.new_usage_stream(0).unwrap()).collect();
    std::thread::scope(|scope| {
        for (t, s) in streams.iter().enumerate() {
            let a = &a;
            scope.spawn(move || {
                streamalloc::history::set_thread_context(t as u64 + 1);
                for i in 0..2000usize {
                    let size = 256 * (t + 1) + i % 7;
                    let p = a.malloc(0, size, s.stream).unwrap();
                    a.free(p).unwrap();
                }
            });
        }
        // Read while they write: every entry seen is whole.
        for _ in 0..200 {
            for e in a.history() {
                let t = e.context as usize - 1;
                assert_eq!(e.stream, streams[t].stream, "an entry's words belong together");
                // Segment events carry the driver's size (a size class), not the request's.
                if !matches!(e.action, Action::SegmentAlloc | Action::SegmentFree) {
                    assert_eq!(e.size as usize / 256, t + 1, "size of thread {t}'s blocks");
                }
            }
        }
    });
    assert!(a.history().len() <= 64);
}

#[test]
fn oom_observer_is_called_with_the_native_arguments() {
    for (kind, sim, a) in subjects() {
        let s = sim.new_usage_stream(0).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        a.attach_oom_observer(Arc::new(move |d, req, total, free| {
            seen2.lock().unwrap().push((d, req, total, free));
        }));
        a.record_history(&HistoryOptions::default());
        let keep = a.malloc(0, 64 * MIB as usize, s.stream).unwrap();
        // Larger than the device: the driver refuses.
        let r = a.malloc(0, 2 * CAPACITY as usize, s.stream);
        let Err(Error::OutOfMemory(o)) = r else { panic!("{kind}: {r:?}") };
        let got = seen.lock().unwrap().clone();
        assert_eq!(got, vec![(0, 2 * CAPACITY, CAPACITY, o.device_free)], "{kind}");
        assert!(o.device_free <= CAPACITY - 64 * MIB, "{kind}");
        let oom: Vec<_> = a.history().into_iter().filter(|e| e.action == Action::Oom).collect();
        assert_eq!(oom.len(), 1, "{kind}");
        assert_eq!((oom[0].addr, oom[0].size), (o.device_free, 2 * CAPACITY), "{kind}");
        // With a memory fraction, the limit is the total the observer sees.
        a.set_memory_fraction(0.5, 0).unwrap();
        let r = a.malloc(0, (CAPACITY / 2) as usize, s.stream);
        assert!(matches!(r, Err(Error::OutOfMemory(_))), "{kind}: {r:?}");
        let last = *seen.lock().unwrap().last().unwrap();
        assert_eq!((last.0, last.1, last.2), (0, CAPACITY / 2, CAPACITY / 2), "{kind}");
        // The observer may use the allocator (PyTorch's observers take snapshots).
        let a2 = Arc::new(a);
        let weak = Arc::downgrade(&a2);
        let snapped = Arc::new(Mutex::new(0usize));
        let snapped2 = snapped.clone();
        a2.attach_oom_observer(Arc::new(move |_, _, _, _| {
            if let Some(a) = weak.upgrade() {
                *snapped2.lock().unwrap() = a.memory_snapshot().len();
            }
        }));
        assert!(a2.malloc(0, 2 * CAPACITY as usize, s.stream).is_err());
        assert_eq!(*snapped.lock().unwrap(), 1, "{kind}: the observer saw the live block");
        a2.free(keep).unwrap();
        sim.assert_clean();
    }
}

#[test]
fn memory_snapshot_lists_live_and_cached_blocks() {
    for (kind, sim, a) in subjects() {
        let s = sim.new_usage_stream(0).unwrap();
        let live = a.malloc(0, 1000, s.stream).unwrap();
        let gone = a.malloc(0, 5000, s.stream).unwrap();
        a.free(gone).unwrap();
        let snap = a.memory_snapshot();
        let l = snap.iter().find(|b| b.ptr == live).expect("live block listed");
        assert_eq!((l.requested, l.state, l.stream), (1000, BlockState::Live, s.stream), "{kind}");
        assert!(l.size >= 1000, "{kind}");
        assert_eq!(sim.block_size(live), Some(l.size), "{kind}: the driver's size");
        let cached: Vec<_> = snap.iter().filter(|b| b.state == BlockState::Cached).collect();
        if kind == "cached" {
            assert_eq!(cached.len(), 1, "{kind}");
            assert_eq!((cached[0].ptr, cached[0].stream), (gone, s.stream), "{kind}");
            assert_eq!(sim.block_size(gone), Some(cached[0].size), "{kind}");
        } else {
            assert!(cached.is_empty(), "{kind}");
        }
        a.free(live).unwrap();
        a.empty_cache().unwrap();
        assert!(a.memory_snapshot().is_empty(), "{kind}");
    }
}
