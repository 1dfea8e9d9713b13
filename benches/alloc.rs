//! Criterion benches of the allocators' bookkeeping, on the null driver (no device work,
//! no GPU needed):
//!
//! - `pair_latency`: one thread, one alloc+free pair (a ring of 16 live blocks, the
//!   workload of `streamalloc-bench` and the PyTorch anchor);
//! - `pair_throughput`: the same on 1, 2, 4 and 8 threads, each on its own stream,
//!   started together on a barrier inside `iter_custom` (criterion's elements/s is the
//!   aggregate pairs/s);
//! - `pair_during_captures`: one thread's pair latency while 0, 1 or 2 background
//!   threads begin and end captures in a loop (the shape of arc-swap's
//!   `benches/background.rs`): what the capture epoch costs the hot path.
//!
//! Each bench measures for about a second, so `cargo bench --bench alloc` takes a minute
//! or two.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};
use streamalloc::sim::NullDriver;
use streamalloc::{DevicePtr, Driver, SeedReplica, Stream, StreamAlloc, StreamOrderedAllocator};

/// Live blocks per thread.
const WINDOW: usize = 16;

/// The anchor's size sequence (see `benches/streamalloc-bench/src/workload.rs`).
#[inline]
fn size_of(i: u64) -> usize {
    const SIZES: [usize; 6] = [512, 4096, 65536, 1 << 20, 3 << 19, 256 << 10];
    let x = i.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407) >> 33;
    SIZES[(x % 6) as usize]
}

/// A ring of live blocks on one stream: each step frees the oldest and allocates anew.
struct Ring {
    ptrs: [DevicePtr; WINDOW],
    stream: Stream,
    salt: u64,
    i: u64,
}

impl Ring {
    fn new<A: StreamOrderedAllocator + ?Sized>(a: &A, stream: Stream, salt: u64) -> Ring {
        let mut ptrs = [DevicePtr::NULL; WINDOW];
        for (k, p) in ptrs.iter_mut().enumerate() {
            *p = a.malloc(0, size_of(k as u64 + salt), stream).expect("malloc");
        }
        Ring { ptrs, stream, salt, i: 0 }
    }

    #[inline]
    fn step<A: StreamOrderedAllocator + ?Sized>(&mut self, a: &A) {
        let k = (self.i % WINDOW as u64) as usize;
        a.free(self.ptrs[k]).expect("free");
        self.ptrs[k] = a.malloc(0, size_of(self.i + self.salt), self.stream).expect("malloc");
        self.i += 1;
    }

    fn drain<A: StreamOrderedAllocator + ?Sized>(self, a: &A) {
        for p in self.ptrs {
            a.free(p).expect("free");
        }
    }
}

/// The allocators under test, each on its own null driver.
fn allocators() -> Vec<(&'static str, Arc<dyn StreamOrderedAllocator>)> {
    let null = || Arc::new(NullDriver::new(1));
    vec![
        ("streamalloc", Arc::new(StreamAlloc::new(null()).expect("init"))),
        ("seed_replica", Arc::new(SeedReplica::new(null()).expect("init"))),
    ]
}

fn stream(i: usize) -> Stream {
    // The null driver accepts any stream handle; distinct values stand for distinct streams.
    Stream::simulated(0x1000 + i * 0x100)
}

fn pair_latency(c: &mut Criterion) {
    let mut g = c.benchmark_group("pair_latency");
    g.warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(1));
    for (name, a) in allocators() {
        let mut ring = Ring::new(&*a, stream(0), 0);
        g.bench_function(name, |b| b.iter(|| ring.step(black_box(&*a))));
        ring.drain(&*a);
    }
    g.finish();
}

/// `threads` threads, `iters` pairs each, started on a barrier; the time from the start
/// barrier until every thread is done.
fn concurrent_pairs(a: &dyn StreamOrderedAllocator, threads: usize, iters: u64) -> Duration {
    let start = Barrier::new(threads + 1);
    let done = Barrier::new(threads + 1);
    std::thread::scope(|s| {
        for t in 0..threads {
            let (start, done) = (&start, &done);
            s.spawn(move || {
                let mut ring = Ring::new(a, stream(t), t as u64 * 7919);
                start.wait();
                for _ in 0..iters {
                    ring.step(a);
                }
                done.wait();
                ring.drain(a);
            });
        }
        start.wait();
        let t0 = Instant::now();
        done.wait();
        t0.elapsed()
    })
}

fn pair_throughput(c: &mut Criterion) {
    let mut g = c.benchmark_group("pair_throughput");
    g.warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_millis(1500))
        .sample_size(20);
    for (name, a) in allocators() {
        for threads in [1usize, 2, 4, 8] {
            g.throughput(Throughput::Elements(threads as u64));
            g.bench_with_input(BenchmarkId::new(name, threads), &threads, |b, &threads| {
                b.iter_custom(|iters| concurrent_pairs(&*a, threads, iters))
            });
        }
    }
    g.finish();
}

fn pair_during_captures(c: &mut Criterion) {
    let mut g = c.benchmark_group("pair_during_captures");
    g.warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(1));
    for (name, a) in allocators() {
        let capture_stream = NullDriver::new(1).create_stream(0).expect("stream");
        for background in [0usize, 1, 2] {
            let stop = AtomicBool::new(false);
            std::thread::scope(|s| {
                for _ in 0..background {
                    let (a, stop) = (&a, &stop);
                    s.spawn(move || {
                        while !stop.load(Ordering::Relaxed) {
                            // Another thread's capture may be underway: that is an error
                            // here, and fine (one capture at a time, S14).
                            if a.begin_capture(0).is_ok() {
                                let _ = a.end_capture(0, capture_stream);
                            }
                        }
                    });
                }
                let mut ring = Ring::new(&*a, stream(0), 0);
                g.bench_with_input(BenchmarkId::new(name, background), &background, |b, _| {
                    b.iter(|| ring.step(black_box(&*a)))
                });
                stop.store(true, Ordering::Relaxed);
                // Frees deferred by a capture are issued by a later malloc outside one.
                ring.drain(&*a);
            });
        }
    }
    g.finish();
}

/// No report plots: plotters, when the benchmark member's `ab_glyph` feature is unified
/// into it, draws text only with registered fonts (criterion would panic with
/// `FontUnavailable`), and the numbers are what this bench is for.
fn config() -> Criterion {
    Criterion::default().without_plots()
}

criterion_group! {
    name = benches;
    config = config();
    targets = pair_latency, pair_throughput, pair_during_captures
}
criterion_main!(benches);
