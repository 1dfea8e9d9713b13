//! Concurrent stress on the simulated device: threads = 4 x cores, at least 200k
//! operations (allocate, free, record_stream, captures beginning and ending, fraction
//! changes), then the books: used bytes 0, no live blocks, no checker report.
//!
//! `stress_short` runs in every `cargo test`; `stress_long` is the long mode:
//! `STRESS_SECS=600 cargo test --release --test stress -- --ignored stress_long`.

mod common;

use common::CAPACITY;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use streamalloc::sim::SimDriver;
use streamalloc::{
    CacheConfig, DevicePtr, DriverLane, Error, Laned, StreamAlloc, StreamOrderedAllocator,
    UsageStream,
};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn run(cache: CacheConfig, lane: DriverLane, min_ops: u64, min_time: Duration) {
    let devices = 2;
    let sim = Arc::new(SimDriver::with_devices(devices, CAPACITY));
    let cached = cache.enabled;
    let alloc = StreamAlloc::with_cache(Laned::new(sim.clone(), lane), cache).unwrap();
    assert_eq!(alloc.driver_lane(), DriverLane::Off, "a driver in a lane gets no other");
    alloc.enable_peer_access(0, 1).unwrap();
    alloc.enable_peer_access(1, 0).unwrap();
    let threads = 4 * std::thread::available_parallelism().map_or(2, |n| n.get());
    let ops = AtomicU64::new(0);
    let captures = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let start = Instant::now();
    std::thread::scope(|scope| {
        for t in 0..threads {
            let (alloc, sim, ops, stop, captures) = (&alloc, &sim, &ops, &stop, &captures);
            scope.spawn(move || {
                let mut rng = Rng(0x9E37_79B9 ^ ((t as u64 + 1) * 0x1234_5678_9abc));
                let dev = t % devices;
                let mine = UsageStream::new(sim.new_stream(dev).unwrap(), dev);
                let helper = UsageStream::new(sim.new_stream(dev).unwrap(), dev);
                let peer = UsageStream::new(
                    sim.new_stream((dev + 1) % devices).unwrap(),
                    (dev + 1) % devices,
                );
                let mut live: Vec<DevicePtr> = Vec::new();
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    match rng.next() % 100 {
                        0..=44 => {
                            let size = 512 << (rng.next() % 12);
                            match alloc.malloc(dev, size as usize, mine.stream) {
                                Ok(p) => {
                                    sim.launch(mine, &[p]).unwrap();
                                    live.push(p);
                                }
                                Err(e) => assert!(e.is_oom(), "{e}"),
                            }
                        }
                        45..=89 if !live.is_empty() => {
                            let i = (rng.next() as usize) % live.len();
                            let p = live.swap_remove(i);
                            alloc.free(p).unwrap();
                        }
                        90..=94 if !live.is_empty() => {
                            let p = live[(rng.next() as usize) % live.len()];
                            let other = if rng.next().is_multiple_of(2) { helper } else { peer };
                            sim.launch(other, &[p]).unwrap();
                            alloc.record_stream(p, other).unwrap();
                        }
                        // The capturing thread: begin, let others run, end.
                        95 if t == 0 && alloc.begin_capture(dev).is_ok() => {
                            captures.fetch_add(1, Ordering::Relaxed);
                            std::thread::yield_now();
                            alloc.end_capture(dev, mine.stream).unwrap();
                        }
                        96 if t == 1 => {
                            let f = [0.3, 0.6, 1.0][(rng.next() % 3) as usize];
                            alloc.set_memory_fraction(f, dev).unwrap();
                        }
                        97 => {
                            // Bad input mixed in: must be a typed error, books intact.
                            let bogus =
                                DevicePtr::from_raw(0x0dea_dbee_f000 + (rng.next() % 64) * 512);
                            assert!(matches!(
                                alloc.free(bogus),
                                Err(Error::UnknownPointer { .. } | Error::DoubleFree { .. })
                            ));
                        }
                        _ => {}
                    }
                    if ops.fetch_add(1, Ordering::Relaxed) + 1 >= min_ops
                        && start.elapsed() >= min_time
                    {
                        stop.store(true, Ordering::Relaxed);
                    }
                }
                for p in live {
                    alloc.free(p).unwrap();
                }
                let _ = n;
            });
        }
    });
    assert!(!alloc.capture_underway());
    alloc.flush_deferred_frees().unwrap();
    assert!(ops.load(Ordering::Relaxed) >= min_ops);
    assert!(captures.load(Ordering::Relaxed) > 0, "captures happened");
    for d in 0..devices {
        assert_eq!(alloc.used_bytes(d), 0, "device {d}");
    }
    assert!(alloc.snapshot().is_empty(), "{:?}", alloc.snapshot().first());
    alloc.empty_cache().unwrap(); // cached blocks go back to the driver
    sim.synchronize_all();
    for d in 0..devices {
        assert_eq!(sim.live_blocks(d), 0);
    }
    let reports = sim.reports();
    assert!(
        reports.is_empty(),
        "{} checker reports: {:#?}",
        reports.len(),
        &reports[..reports.len().min(5)]
    );
    // What ran (shown with --nocapture; VERIFY.md quotes the long mode's lines).
    eprintln!(
        "stress {} cache, lane {}: {} operations, {} captures, {:.0} s, {threads} threads",
        if cached { "with" } else { "without" },
        lane.name(),
        ops.load(Ordering::Relaxed),
        captures.load(Ordering::Relaxed),
        start.elapsed().as_secs_f64(),
    );
}

#[test]
fn stress_short_cached() {
    run(CacheConfig::default(), DriverLane::Off, 200_000, Duration::ZERO);
}

#[test]
fn stress_short_passthrough() {
    run(CacheConfig::passthrough(), DriverLane::Off, 200_000, Duration::ZERO);
}

#[test]
fn stress_short_driver_lane() {
    // Driver calls through the lanes CUDA may use.
    run(CacheConfig::passthrough(), DriverLane::Lock, 50_000, Duration::ZERO);
    run(CacheConfig::passthrough(), DriverLane::Delegate, 100_000, Duration::ZERO);
}

#[test]
fn stress_short_delegate_always() {
    // Every driver allocation call made by the delegate threads, cached and not.
    run(CacheConfig::passthrough(), DriverLane::DelegateAlways, 100_000, Duration::ZERO);
    run(CacheConfig::default(), DriverLane::DelegateAlways, 100_000, Duration::ZERO);
}

#[test]
fn stress_small_cache_budget() {
    // A 4 MiB cache budget: trimming runs all the time.
    run(
        CacheConfig::default().with_max_bytes_per_device(4 << 20),
        DriverLane::Off,
        100_000,
        Duration::ZERO,
    );
}

#[test]
#[ignore = "long mode: STRESS_SECS=600 cargo test --release --test stress -- --ignored"]
fn stress_long() {
    let secs = std::env::var("STRESS_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    let part = Duration::from_secs(secs / 4);
    run(CacheConfig::default(), DriverLane::Delegate, 0, part);
    run(CacheConfig::passthrough(), DriverLane::DelegateAlways, 0, part);
    run(CacheConfig::passthrough(), DriverLane::Lock, 0, part);
    run(CacheConfig::passthrough(), DriverLane::Off, 0, part);
}
