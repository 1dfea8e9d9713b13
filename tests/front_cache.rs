//! The front cache's second design, on the simulated device with the checker on: exact
//! requests near the limit, one view of live blocks for both APIs, idle release, stream
//! cache lifecycle, memory held on a varying-size workload, and an exact limit under
//! contention.

mod common;

use std::sync::Arc;
use streamalloc::sim::SimDriver;
use streamalloc::{
    CacheConfig, DevicePtr, Error, SeedReplica, StreamAlloc, StreamOrderedAllocator, UsageStream,
};

const MIB: usize = 1 << 20;

/// The three subjects on a device of `capacity` bytes.
fn subjects(capacity: u64) -> Vec<(Arc<SimDriver>, Box<dyn StreamOrderedAllocator>, &'static str)> {
    let mut v: Vec<(Arc<SimDriver>, Box<dyn StreamOrderedAllocator>, &'static str)> = Vec::new();
    let sim = Arc::new(SimDriver::with_devices(1, capacity));
    v.push((sim.clone(), Box::new(StreamAlloc::new(sim).unwrap()), "cached"));
    let sim = Arc::new(SimDriver::with_devices(1, capacity));
    let a = StreamAlloc::with_cache(sim.clone(), CacheConfig::passthrough()).unwrap();
    v.push((sim, Box::new(a), "passthrough"));
    let sim = Arc::new(SimDriver::with_devices(1, capacity));
    v.push((sim.clone(), Box::new(SeedReplica::new(sim).unwrap()), "replica"));
    v
}

#[test]
fn a_request_the_seed_grants_is_granted_near_the_device_limit() {
    // 50 MiB on a 52 MiB device: its size class (56 MiB) does not fit, the exact size
    // does. The seed asks the driver for `size`; so must a miss after the driver's OOM.
    for (sim, a, kind) in subjects(52 << 20) {
        let s = sim.new_usage_stream(0).unwrap();
        let p = a.malloc(0, 50 * MIB, s.stream).unwrap_or_else(|e| panic!("{kind}: {e}"));
        assert_eq!(a.used_bytes(0), 50 << 20, "{kind}");
        a.free(p).unwrap();
        // And again, after the block went back (the exact-size block is not cached).
        let p = a.malloc(0, 50 * MIB, s.stream).unwrap_or_else(|e| panic!("{kind}: {e}"));
        a.free(p).unwrap();
        assert_eq!(a.used_bytes(0), 0, "{kind}");
        assert!(sim.reports().is_empty(), "{kind}: {:?}", sim.reports());
    }
}

#[test]
fn idle_blocks_of_other_streams_are_released_before_an_oom() {
    // Stream A leaves 40 MiB idle in its cache; stream B then needs 40 MiB on a 64 MiB
    // device: the driver's OOM releases A's idle blocks and B's request is granted.
    let sim = Arc::new(SimDriver::with_devices(1, 64 << 20));
    let a = StreamAlloc::new(sim.clone()).unwrap();
    let (s1, s2) = (sim.new_usage_stream(0).unwrap(), sim.new_usage_stream(0).unwrap());
    let p = a.malloc(0, 40 * MIB, s1.stream).unwrap();
    a.free(p).unwrap();
    assert_eq!(a.device_stats(0).unwrap().cached_current, 40 << 20);
    let q = a.malloc(0, 40 * MIB, s2.stream).unwrap();
    let stats = a.device_stats(0).unwrap();
    assert_eq!(stats.cached_current, 0);
    assert_eq!(stats.alloc_retries, 1);
    a.free(q).unwrap();
    sim.assert_clean();
}

#[test]
fn handle_blocks_are_seen_by_the_pointer_api() {
    let sim = Arc::new(SimDriver::with_devices(2, 1 << 30));
    for cache in [CacheConfig::default(), CacheConfig::passthrough()] {
        let a = StreamAlloc::with_cache(sim.clone(), cache).unwrap();
        let s = sim.new_usage_stream(0).unwrap();
        let other = sim.new_usage_stream(0).unwrap();
        // Warm the cache so the next handle comes from it.
        drop(a.allocate(0, 4096, s.stream).unwrap());
        let b = a.allocate(0, 4000, s.stream).unwrap();
        let p = b.ptr();
        assert_eq!(a.base_allocation(p).unwrap(), (p, 4000));
        assert_eq!(a.snapshot().iter().filter(|x| x.ptr == p).count(), 1);
        // A use on another stream recorded through the pointer API...
        a.record_stream(p, other).unwrap();
        sim.launch(other, &[p]).unwrap();
        // ...the pointer API may not free a handle's block...
        assert_eq!(a.free(p), Err(Error::OwnedByHandle { ptr: p }));
        // ...and dropping the handle frees it after that use: the checker is silent.
        drop(b);
        sim.assert_clean();
        assert!(matches!(a.free(p), Err(Error::DoubleFree { .. })));
        assert!(matches!(a.base_allocation(p), Err(Error::DoubleFree { .. })));
        assert_eq!(a.used_bytes(0), 0);
    }
}

#[test]
fn pointer_blocks_freed_twice_through_either_api_are_double_frees() {
    let sim = Arc::new(SimDriver::with_devices(1, 1 << 30));
    let a = StreamAlloc::new(sim.clone()).unwrap();
    let s = sim.new_usage_stream(0).unwrap();
    let p = a.malloc(0, 1000, s.stream).unwrap();
    a.free(p).unwrap();
    // Idle in the cache: a second free is a double free, not an unknown pointer.
    assert_eq!(a.free(p), Err(Error::DoubleFree { ptr: p }));
    assert_eq!(a.record_stream(p, s), Err(Error::DoubleFree { ptr: p }));
    assert_eq!(
        a.free(DevicePtr::from_raw(0xdead_0000)),
        Err(Error::UnknownPointer { ptr: DevicePtr::from_raw(0xdead_0000) })
    );
    sim.assert_clean();
}

#[test]
fn idle_blocks_are_released_after_an_interval_unused() {
    let sim = Arc::new(SimDriver::with_devices(1, 1 << 30));
    let cache = CacheConfig::default().with_idle_interval(64);
    let a = StreamAlloc::with_cache(sim.clone(), cache).unwrap();
    let s = sim.new_usage_stream(0).unwrap();
    // A burst of 1 MiB blocks, then a long phase of 4 KiB blocks only.
    let big: Vec<_> = (0..8).map(|_| a.malloc(0, MIB, s.stream).unwrap()).collect();
    big.into_iter().for_each(|p| a.free(p).unwrap());
    assert_eq!(a.device_stats(0).unwrap().cached_current, 8 << 20);
    for _ in 0..200 {
        let p = a.malloc(0, 4096, s.stream).unwrap();
        a.free(p).unwrap();
    }
    let stats = a.device_stats(0).unwrap();
    assert!(stats.cached_current <= 4096, "idle 1 MiB blocks stayed: {stats:?}");
    // Released to the driver: the pool can trim them.
    a.empty_cache().unwrap();
    assert_eq!(sim.pool_reserved(0), 0);
    sim.assert_clean();
}

#[test]
fn stream_caches_of_quiet_streams_are_dropped_and_failed_mallocs_create_none() {
    let sim = Arc::new(SimDriver::with_devices(1, 64 << 20));
    let a = StreamAlloc::with_cache(sim.clone(), CacheConfig::default().with_idle_interval(32))
        .unwrap();
    // Failing mallocs on many streams leave nothing behind.
    for _ in 0..100 {
        let s = sim.new_usage_stream(0).unwrap();
        assert!(a.malloc(0, 100 * MIB, s.stream).is_err());
    }
    assert_eq!(a.device_stats(0).unwrap().cache_streams, 0);
    // Streams used once and then left: their caches are dropped by a busy stream's
    // idle checks, and their blocks go back to the driver.
    for _ in 0..50 {
        let s = sim.new_usage_stream(0).unwrap();
        let p = a.malloc(0, 4096, s.stream).unwrap();
        a.free(p).unwrap();
    }
    assert_eq!(a.device_stats(0).unwrap().cache_streams, 50);
    let busy = sim.new_usage_stream(0).unwrap();
    let churn = |n| {
        for _ in 0..n {
            let p = a.malloc(0, 512, busy.stream).unwrap();
            a.free(p).unwrap();
        }
    };
    // The first idle check sweeps (marking every stream cache's activity); the next
    // sweep comes a second later at the earliest and drops those still quiet.
    churn(100);
    assert_eq!(a.device_stats(0).unwrap().cache_streams, 51);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    churn(40);
    let stats = a.device_stats(0).unwrap();
    assert_eq!(stats.cache_streams, 1, "{stats:?}");
    assert!(stats.cached_current <= 512, "{stats:?}");
    sim.assert_clean();
}

/// A training-like workload: sizes scale with a sequence length that changes every
/// step, so a class-exact cache would keep every shape's historical peak. Returns the
/// peak of live bytes and the peak of bytes the allocator holds (live plus idle), read
/// after every allocation.
fn varying_workload(a: &StreamAlloc<Arc<SimDriver>>, s: UsageStream) -> (u64, u64) {
    let (mut peak_live, mut peak_held) = (0u64, 0u64);
    let mut x = 12345u64;
    for _step in 0..300 {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let seq = 64 + ((x >> 33) % 449) as usize; // 64..512
        let mut live = Vec::new();
        for layer in 0..8 {
            let size = seq * 512 * 4 * (1 + layer % 3);
            live.push(a.malloc(0, size, s.stream).unwrap());
            let st = a.device_stats(0).unwrap();
            peak_live = peak_live.max(st.allocated_current);
            peak_held = peak_held.max(st.allocated_current + st.cached_current);
        }
        for p in live.drain(..) {
            a.free(p).unwrap();
        }
    }
    (peak_live, peak_held)
}

#[test]
fn varying_sizes_hold_little_more_than_the_live_peak() {
    // The allocator's own holding (live + idle), independent of the driver pool's
    // fragmentation: the lean preset stays near the live peak, the fast preset within
    // its bound, passthrough holds nothing idle.
    for (cache, bound) in [
        (CacheConfig::lean(), 1.5),
        (CacheConfig::default(), 2.5),
        (CacheConfig::passthrough(), 1.0),
    ] {
        let sim = Arc::new(SimDriver::with_devices(1, 1 << 30));
        let a = StreamAlloc::with_cache(sim.clone(), cache).unwrap();
        let s = sim.new_usage_stream(0).unwrap();
        let (live, held) = varying_workload(&a, s);
        let ratio = held as f64 / live as f64;
        eprintln!("{cache:?}: held/live {ratio:.3}");
        assert!(ratio <= bound, "{cache:?}: held/live {ratio:.3} > {bound}");
        sim.assert_clean();
    }
}

#[test]
fn the_limit_is_exact_under_contention() {
    // 8 threads churn small blocks while one thread repeatedly asks for exactly what
    // is left under the limit: credit stranded in other threads' stripes must never
    // make that request fail.
    let sim = Arc::new(SimDriver::with_devices(1, 1 << 30));
    for cache in [CacheConfig::default(), CacheConfig::passthrough()] {
        let a = StreamAlloc::with_cache(sim.clone(), cache).unwrap();
        a.set_memory_fraction(96.0 / 1024.0, 0).unwrap(); // 96 MiB
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|sc| {
            for _ in 0..8 {
                sc.spawn(|| {
                    let s = sim.new_usage_stream(0).unwrap();
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let p = a.malloc(0, 64 << 10, s.stream).unwrap();
                        a.free(p).unwrap();
                    }
                });
            }
            let s = sim.new_usage_stream(0).unwrap();
            // At most 8 x 64 KiB are live at once in the churners: 80 MiB always fit.
            for i in 0..300 {
                let p = a
                    .malloc(0, 80 * MIB, s.stream)
                    .unwrap_or_else(|e| panic!("{cache:?}: spurious refusal {i}: {e}"));
                a.free(p).unwrap();
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        });
        assert_eq!(a.used_bytes(0), 0);
    }
}

#[test]
fn budget_arithmetic_does_not_wrap() {
    let sim = Arc::new(streamalloc::sim::NullDriver::new(1));
    let a = StreamAlloc::with_cache(sim, CacheConfig::passthrough()).unwrap();
    let big = (1usize << 60) - 1;
    let mut live = Vec::new();
    for _ in 0..20 {
        match a.malloc(0, big, streamalloc::Stream::NULL) {
            Ok(p) => live.push(p),
            Err(e) => assert!(e.is_oom(), "{e}"),
        }
    }
    // 16 of these would overflow u64: the claims saturate at the refusal instead.
    // 16 fit in u64 exactly; a 17th would have wrapped the claims.
    assert_eq!(live.len(), 16);
    assert_eq!(a.used_bytes(0), live.len() as u64 * big as u64);
    live.into_iter().for_each(|p| a.free(p).unwrap());
    assert_eq!(a.used_bytes(0), 0);
}

#[test]
fn the_lean_preset_caches_small_requests_only() {
    let sim = Arc::new(SimDriver::with_devices(1, 1 << 30));
    let a = StreamAlloc::with_cache(sim.clone(), CacheConfig::lean()).unwrap();
    let s = sim.new_usage_stream(0).unwrap();
    // 2 MiB: the exact size from the driver, back to the driver at once.
    let p = a.malloc(0, 2 * MIB + 4096, s.stream).unwrap();
    assert_eq!(sim.block_size(p), Some(2 << 20 | 4096));
    a.free(p).unwrap();
    assert_eq!(a.device_stats(0).unwrap().cached_current, 0);
    // 64 KiB: cached.
    let q = a.malloc(0, 64 << 10, s.stream).unwrap();
    a.free(q).unwrap();
    assert_eq!(a.device_stats(0).unwrap().cached_current, 64 << 10);
    sim.assert_clean();
}

#[test]
fn dropping_the_allocator_during_a_capture_frees_idle_and_deferred_blocks_after_it() {
    // Issue 13 item 10: a drop during a capture used to skip the flush and leave every
    // idle block with the driver. Blocks on quiet streams go at once; blocks whose
    // stream captures (a free there would join the graph) once the capture has ended.
    for (config, kind) in
        [(CacheConfig::default(), "cached"), (CacheConfig::passthrough(), "passthrough")]
    {
        let cached = kind == "cached";
        let sim = Arc::new(SimDriver::with_devices(1, 1 << 30));
        let a = StreamAlloc::with_cache(sim.clone(), config).unwrap();
        let (quiet, capturing) =
            (sim.new_usage_stream(0).unwrap(), sim.new_usage_stream(0).unwrap());
        let on_capturing: Vec<_> =
            (0..8).map(|_| a.malloc(0, MIB, capturing.stream).unwrap()).collect();
        let on_quiet: Vec<_> = (0..4).map(|_| a.malloc(0, MIB, quiet.stream).unwrap()).collect();
        let deferred = a.malloc(0, MIB, capturing.stream).unwrap();
        for p in on_capturing.into_iter().chain(on_quiet) {
            a.free(p).unwrap();
        }
        assert_eq!(sim.live_blocks(0), if cached { 13 } else { 1 }, "{kind}");
        a.begin_capture_on(0, capturing.stream).unwrap();
        sim.begin_capture(capturing).unwrap();
        a.free(deferred).unwrap(); // allocated before the capture: deferred (S4)
        drop(a);
        // The quiet stream's idle blocks are freed by the drop itself.
        assert_eq!(sim.live_blocks(0), if cached { 9 } else { 1 }, "{kind}");
        assert!(sim.reports().is_empty(), "{kind}: {:?}", sim.reports());
        sim.end_capture(capturing).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while sim.live_blocks(0) > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(sim.live_blocks(0), 0, "{kind}: blocks left with the driver");
        assert_eq!(sim.pool_used(0), 0, "{kind}");
        assert!(sim.reports().is_empty(), "{kind}: {:?}", sim.reports());
    }
}

#[test]
fn dropping_the_allocator_while_no_stream_captures_frees_everything_at_once() {
    // The allocator's capture began (PyTorch's beginAllocateToPool) but the driver's
    // has not, or has already ended: nothing waits.
    let sim = Arc::new(SimDriver::with_devices(1, 1 << 30));
    let a = StreamAlloc::new(sim.clone()).unwrap();
    let s = sim.new_usage_stream(0).unwrap();
    let ps: Vec<_> = (0..8).map(|_| a.malloc(0, MIB, s.stream).unwrap()).collect();
    let deferred = a.malloc(0, MIB, s.stream).unwrap();
    ps.into_iter().for_each(|p| a.free(p).unwrap());
    a.begin_capture_on(0, s.stream).unwrap();
    a.free(deferred).unwrap();
    drop(a);
    assert_eq!(sim.live_blocks(0), 0);
    assert!(sim.reports().is_empty(), "{:?}", sim.reports());
}

/// A thread keeps the stream caches it used last in a memo (four entries, the latest one
/// read first): more streams than entries evict entries, `empty_cache` retires the caches
/// the memo points to, and a second allocator on the same device and streams has caches
/// of its own. Each block must still go back to its own allocator and stream.
#[test]
fn the_per_thread_memo_keeps_streams_and_allocators_apart() {
    let sim = Arc::new(SimDriver::with_devices(1, 1 << 30));
    let allocs: Vec<_> = (0..2).map(|_| StreamAlloc::new(sim.clone()).unwrap()).collect();
    let streams: Vec<UsageStream> = (0..6).map(|_| sim.new_usage_stream(0).unwrap()).collect();
    // Allocator k's blocks on stream i are (i + 1) * (k + 1) KiB (each a size class).
    let bytes = |k: usize, i: usize| ((i + 1) * (k + 1)) << 10;
    for round in 0..40 {
        for (i, s) in streams.iter().enumerate() {
            for (k, a) in allocs.iter().enumerate() {
                drop(a.allocate(0, bytes(k, i), s.stream).unwrap());
            }
        }
        if round % 7 == 6 {
            allocs[round % 2].empty_cache().unwrap();
        }
    }
    for (k, a) in allocs.iter().enumerate() {
        let idle = a.idle_blocks(0);
        assert_eq!(idle.len(), 6, "allocator {k}: {idle:?}");
        for (_, b, stream) in idle {
            let i = streams.iter().position(|s| s.stream == stream).expect("a known stream");
            assert_eq!(b, bytes(k, i) as u64, "allocator {k}, stream {i}");
        }
        // Hit counters live in the stream caches, which `empty_cache` drops (last after
        // round 34): the rounds after it hit on every stream.
        let stats = a.device_stats(0).unwrap();
        assert!(stats.cache_hits >= 6 * 4, "allocator {k}: {stats:?}");
        assert_eq!(stats.allocated_current, 0);
    }
    sim.assert_clean();
}
