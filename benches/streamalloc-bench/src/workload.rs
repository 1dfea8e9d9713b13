//! The measured workload, copied from the PyTorch anchor (`anchors/torch_bench.cpp`) so
//! that its rows and ours are comparable:
//!
//! - T threads, each with its own non-blocking stream and a ring of [`WINDOW`] live blocks;
//! - every step frees the oldest block of the ring and allocates a new one (one "pair");
//! - sizes from the anchor's LCG, [`size_of`]`(i + t * 7919)`;
//! - a warm-up of `iters / 10` steps, a stream synchronize, then a barrier; each worker
//!   then times its own span, from leaving the barrier to the end of its timed steps and
//!   their stream synchronize; the run's span is from the first worker's start to the
//!   last worker's end (no coordinating thread's clock, which on a loaded machine would
//!   add the delay until that thread is scheduled);
//! - the result is the aggregate: `T * iters / seconds / 1e6` (million pairs per second).
//!
//! The operations are behind [`Workload`], so a new variant (a new allocator, or another
//! API of one) is one small adapter type.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Barrier, Mutex};
use std::time::Instant;
use streamalloc::{
    Block, Device, DevicePtr, Driver, Stream, StreamAlloc, StreamOrderedAllocator, UsageStream,
};

/// Live blocks per thread (the anchor's `window`).
pub const WINDOW: usize = 16;

/// The device every variant allocates on.
pub const DEVICE: Device = 0;

/// The anchor's size sequence: {512 B, 4 KiB, 64 KiB, 1 MiB, 1.5 MiB, 256 KiB}, picked
/// by a 64-bit LCG step of `i`.
#[inline]
pub fn size_of(i: u64) -> usize {
    const SIZES: [usize; 6] = [512, 4096, 65536, 1 << 20, 3 << 19, 256 << 10];
    let x = i.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407) >> 33;
    SIZES[(x % 6) as usize]
}

/// One way of allocating and freeing: what a variant measures.
pub trait Workload: Sync {
    /// What the ring holds for one live block.
    type Slot;
    /// Allocates `size` bytes on device [`DEVICE`], ordered on `stream`.
    fn alloc(&self, size: usize, stream: Stream) -> Result<Self::Slot, String>;
    /// Frees a block from [`Self::alloc`].
    fn free(&self, slot: Self::Slot) -> Result<(), String>;
}

/// The driver's own `malloc_async` / `free_async`, no bookkeeping at all.
pub struct RawDriver<'a, D: Driver>(pub &'a D);

impl<D: Driver> Workload for RawDriver<'_, D> {
    type Slot = (DevicePtr, usize, Stream);
    #[inline]
    fn alloc(&self, size: usize, stream: Stream) -> Result<Self::Slot, String> {
        let ptr = self.0.malloc_async(DEVICE, size, stream).map_err(|e| e.to_string())?;
        Ok((ptr, size, stream))
    }
    #[inline]
    fn free(&self, (ptr, size, stream): Self::Slot) -> Result<(), String> {
        self.0.free_async(DEVICE, ptr, size, stream).map_err(|e| e.to_string())
    }
}

/// Any [`StreamOrderedAllocator`] through its pointer API (`malloc` / `free`).
pub struct PtrApi<'a, A: StreamOrderedAllocator + ?Sized>(pub &'a A);

impl<A: StreamOrderedAllocator + ?Sized> Workload for PtrApi<'_, A> {
    type Slot = DevicePtr;
    #[inline]
    fn alloc(&self, size: usize, stream: Stream) -> Result<DevicePtr, String> {
        self.0.malloc(DEVICE, size, stream).map_err(|e| e.to_string())
    }
    #[inline]
    fn free(&self, ptr: DevicePtr) -> Result<(), String> {
        self.0.free(ptr).map_err(|e| e.to_string())
    }
}

/// [`StreamAlloc`]'s handle API: `allocate` gives a [`Block`], dropping it frees it (the
/// way PyTorch's `DataPtr` is used). A failed free on drop is only logged.
pub struct HandleApi<'a, D: Driver>(pub &'a StreamAlloc<D>);

impl<'a, D: Driver> Workload for HandleApi<'a, D> {
    type Slot = Block<'a, D>;
    #[inline]
    fn alloc(&self, size: usize, stream: Stream) -> Result<Block<'a, D>, String> {
        self.0.allocate(DEVICE, size, stream).map_err(|e| e.to_string())
    }
    #[inline]
    fn free(&self, block: Block<'a, D>) -> Result<(), String> {
        drop(block);
        Ok(())
    }
}

/// Runs `f`, turning a panic into an error so that the other threads still reach their
/// barriers (a panicking worker must not hang the whole run).
fn guarded(f: impl FnOnce() -> Result<(), String>) -> Result<(), String> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => Err(p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic".to_string())),
    }
}

/// `iters` ring steps (step `i` frees slot `i % WINDOW` and allocates `size_of(i + salt)`),
/// as the anchor's loops do.
fn steps<W: Workload>(
    w: &W,
    ring: &mut [Option<W::Slot>],
    stream: Stream,
    salt: u64,
    iters: u64,
) -> Result<(), String> {
    for i in 0..iters {
        let k = (i % WINDOW as u64) as usize;
        if let Some(old) = ring[k].take() {
            w.free(old)?;
        }
        ring[k] = Some(w.alloc(size_of(i + salt), stream)?);
    }
    Ok(())
}

/// Runs the workload on `threads` threads (thread `t` on `streams[t]`), `iters` timed
/// steps each; `sync` waits for a stream's work. Returns million pairs per second,
/// aggregated over the threads, or the first error a thread met.
pub fn run<W: Workload>(
    w: &W,
    streams: &[UsageStream],
    sync: &(dyn Fn(UsageStream) -> Result<(), String> + Sync),
    threads: usize,
    iters: u64,
) -> Result<f64, String> {
    assert!(streams.len() >= threads, "one stream per thread");
    let barrier = Barrier::new(threads);
    let failure: Mutex<Option<String>> = Mutex::new(None);
    let fail = |e: String| {
        let mut f = failure.lock().unwrap_or_else(|p| p.into_inner());
        f.get_or_insert(e);
    };
    let spans: Vec<(Instant, Instant)> = std::thread::scope(|s| {
        let workers: Vec<_> = streams
            .iter()
            .enumerate()
            .take(threads)
            .map(|(t, &stream)| {
                let (barrier, fail) = (&barrier, &fail);
                s.spawn(move || {
                    let salt = t as u64 * 7919;
                    let mut ring: Vec<Option<W::Slot>> = (0..WINDOW).map(|_| None).collect();
                    // Fill the ring, warm up (not timed), drain the stream.
                    let mut ok = guarded(|| {
                        for (k, slot) in ring.iter_mut().enumerate() {
                            *slot = Some(w.alloc(size_of(k as u64 + salt), stream.stream)?);
                        }
                        steps(w, &mut ring, stream.stream, salt, iters / 10)?;
                        sync(stream)
                    });
                    barrier.wait();
                    let start = Instant::now();
                    if ok.is_ok() {
                        ok = guarded(|| {
                            steps(w, &mut ring, stream.stream, salt, iters)?;
                            sync(stream)
                        });
                    }
                    let end = Instant::now();
                    // No worker drains while another is still timed.
                    barrier.wait();
                    let drained = guarded(|| {
                        for slot in ring.iter_mut() {
                            if let Some(old) = slot.take() {
                                w.free(old)?;
                            }
                        }
                        sync(stream)
                    });
                    if let Err(e) = ok.and(drained) {
                        fail(format!("thread {t}: {e}"));
                    }
                    (start, end)
                })
            })
            .collect();
        workers.into_iter().filter_map(|h| h.join().ok()).collect()
    });
    if let Some(e) = failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    let seconds = run_span(&spans).ok_or("a worker thread died")?;
    Ok(threads as f64 * iters as f64 / seconds / 1e6)
}

/// The driver alone from one thread over `n` streams: the ring's step `i` frees the
/// oldest block (on the stream it was allocated on) and allocates on stream `i % n`, so
/// consecutive calls alternate streams. Shows what one thread gets from the driver, and
/// whether more streams cost it anything, with no lane and no other thread. Returns
/// million pairs per second.
pub fn one_thread_streams<D: crate::backend::BenchDevice>(
    dev: &D,
    streams: &[UsageStream],
    n: usize,
    iters: u64,
) -> Result<f64, String> {
    let streams = streams.get(..n).ok_or("fewer streams than asked for")?;
    let w = RawDriver(dev);
    let mut ring: Vec<Option<(DevicePtr, usize, Stream)>> = (0..WINDOW).map(|_| None).collect();
    let step = |ring: &mut [Option<(DevicePtr, usize, Stream)>], i: u64| {
        let k = (i % WINDOW as u64) as usize;
        if let Some(old) = ring[k].take() {
            w.free(old)?;
        }
        let stream = streams[(i % n as u64) as usize].stream;
        ring[k] = Some(w.alloc(size_of(i), stream)?);
        Ok::<(), String>(())
    };
    let sync_all = || streams.iter().try_for_each(|&s| dev.sync(s));
    for i in 0..iters / 10 {
        step(&mut ring, i)?;
    }
    sync_all()?;
    let t0 = Instant::now();
    for i in 0..iters {
        step(&mut ring, i)?;
    }
    sync_all()?;
    let seconds = t0.elapsed().as_secs_f64();
    for old in ring.iter_mut().filter_map(Option::take) {
        w.free(old)?;
    }
    sync_all()?;
    Ok(iters as f64 / seconds / 1e6)
}

/// The run's span in seconds: from the first worker's start to the last worker's end
/// (`None` without spans).
pub fn run_span(spans: &[(Instant, Instant)]) -> Option<f64> {
    let first = spans.iter().map(|s| s.0).min()?;
    let last = spans.iter().map(|s| s.1).max()?;
    Some(last.duration_since(first).as_secs_f64().max(1e-9))
}

/// The handle API with the live bytes counted (for the peak-memory probe only: the
/// shared counter would distort a throughput run).
struct CountingHandles<'a, D: Driver> {
    alloc: &'a StreamAlloc<D>,
    live: AtomicU64,
    peak: AtomicU64,
}

impl<'a, D: Driver> Workload for CountingHandles<'a, D> {
    type Slot = Block<'a, D>;
    fn alloc(&self, size: usize, stream: Stream) -> Result<Block<'a, D>, String> {
        let b = self.alloc.allocate(DEVICE, size, stream).map_err(|e| e.to_string())?;
        let now = self.live.fetch_add(size as u64, Ordering::SeqCst) + size as u64;
        self.peak.fetch_max(now, Ordering::SeqCst);
        Ok(b)
    }
    fn free(&self, block: Block<'a, D>) -> Result<(), String> {
        self.live.fetch_sub(block.size() as u64, Ordering::SeqCst);
        drop(block);
        Ok(())
    }
}

/// Runs the workload once through the handle API with `cache` on a trimmed pool with
/// its watermarks reset, and returns (the pool's peak reserved bytes, the peak of bytes
/// in live allocations).
pub fn reserve_ratio<D: crate::backend::BenchDevice>(
    dev: &std::sync::Arc<D>,
    streams: &[UsageStream],
    threads: usize,
    iters: u64,
    cache: streamalloc::CacheConfig,
) -> Result<(u64, u64), String> {
    let err = |e: streamalloc::Error| e.to_string();
    let alloc = StreamAlloc::with_cache(dev.clone(), cache).map_err(err)?;
    // First use of the device (so empty_cache covers it), then trim what earlier runs
    // left in the pool.
    let first = alloc.malloc(DEVICE, 512, streams[0].stream).map_err(err)?;
    alloc.free(first).map_err(err)?;
    alloc.empty_cache().map_err(err)?;
    alloc.reset_peak_stats(DEVICE).map_err(err)?;
    let w = CountingHandles { alloc: &alloc, live: AtomicU64::new(0), peak: AtomicU64::new(0) };
    run(&w, streams, &|s| dev.sync(s), threads, iters)?;
    let reserved = alloc.device_stats(DEVICE).map_err(err)?.reserved_peak;
    let peak = w.peak.load(Ordering::SeqCst);
    alloc.empty_cache().map_err(err)?;
    Ok((reserved, peak))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_span_is_first_start_to_last_end() {
        let t0 = Instant::now();
        let ms = |n| std::time::Duration::from_millis(n);
        let spans = [(t0 + ms(5), t0 + ms(30)), (t0, t0 + ms(20)), (t0 + ms(2), t0 + ms(40))];
        let s = run_span(&spans).unwrap();
        assert!((s - 0.040).abs() < 1e-9, "{s}");
        assert_eq!(run_span(&[]), None);
    }

    #[test]
    fn sizes_match_the_anchor() {
        // The anchor's C++ `size_of(0..8)` (unsigned 64-bit wrapping arithmetic).
        let want = [262144, 65536, 1572864, 262144, 65536, 1572864, 262144, 65536];
        let got: Vec<usize> = (0..8).map(size_of).collect();
        assert_eq!(got, want);
    }
}
