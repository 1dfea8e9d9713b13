//! `streamalloc-dataloader`: the data-loader workload of streamalloc's Rust users, on the
//! GPU (else on the simulated device, small, to show the harness and the ordering work).
//!
//! N producer threads (1, 2, 4, ... `--max-threads`), each on its own stream, loop:
//! allocate a batch buffer (sizes varying within a band: `small` 4..64 KiB, `large`
//! 1..8 MiB), copy a pinned host batch into it, hand it to the consumer stream (an event
//! wait), where a kernel reads every word of it, then free it (streamalloc: after
//! `record_stream` of the consumer). At most 4 batches per producer are in flight.
//!
//! Variants: `streamalloc_cached` (the front cache on), `streamalloc_passthrough` (every
//! call to the driver), `cudarc_alloc` (cudarc's own `CudaStream::alloc`, its events
//! ordering the hand-off and the free; GPU only), `raw_async` (`cuMemAllocAsync` on the
//! producer, `cuMemFreeAsync` on the consumer after the kernel), and `memcpy_only` (the
//! copies alone into a preallocated buffer: the bandwidth ceiling).
//!
//! Each worker times its own span (from leaving the start barrier to its last batch
//! consumed); a run's span is the first start to the last end. Batches/s and GB/s
//! (copied bytes) against threads go to a CSV and a PNG. On the GPU every kernel adds the
//! words it read into a counter, checked against the bytes copied.
//!
//! ```text
//! streamalloc-dataloader [--max-threads 16] [--batches N] [--reps 3] [--bands small,large]
//!     [--variants a,b] [--csv PATH | --no-csv] [--png PATH | --no-png] [--sim]
//! ```

mod plot;
mod rig;

use clap::Parser;
use rig::{GpuRig, MAX_BATCH, Rig, SimRig};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Barrier, Mutex};
use std::time::Instant;
use streamalloc::cuda::{ContextPolicy, CudaDriver};
use streamalloc::sim::{SimConfig, SimDriver};
use streamalloc::{CacheConfig, DevicePtr, Driver, StreamAlloc, StreamOrderedAllocator};

/// The data-loader benchmark: producer threads, a consumer stream, varying batch sizes.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Opts {
    /// Thread counts 1, 2, 4, ... up to N.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=256))]
    max_threads: u64,
    /// Timed batches per producer thread and run [default: 3000 small / 300 large on the
    /// GPU, 40 on the simulated device].
    #[arg(long)]
    batches: Option<u64>,
    /// Runs per variant, band and thread count (the median is reported).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    reps: u64,
    /// Size bands, comma-separated: small (4..64 KiB), large (1..8 MiB).
    #[arg(long, value_delimiter = ',', default_value = "small,large")]
    bands: Vec<String>,
    /// Variants, comma-separated [default: all that apply].
    #[arg(long, value_delimiter = ',')]
    variants: Option<Vec<String>>,
    /// Where to write the CSV.
    #[arg(long, default_value = "streamalloc-dataloader.csv")]
    csv: PathBuf,
    /// Do not write the CSV.
    #[arg(long)]
    no_csv: bool,
    /// Where to draw the PNG.
    #[arg(long, default_value = "streamalloc-dataloader.png")]
    png: PathBuf,
    /// Do not draw the PNG.
    #[arg(long)]
    no_png: bool,
    /// Use the simulated device even if a GPU is found.
    #[arg(long)]
    sim: bool,
    /// The gpu column and plot title [default: the card's name, or sim].
    #[arg(long)]
    gpu_name: Option<String>,
}

/// The variants, in the order they run and are tabulated.
const VARIANTS: &[(&str, bool)] = &[
    // (name, GPU only)
    ("streamalloc_cached", false),
    ("streamalloc_passthrough", false),
    ("cudarc_alloc", true),
    ("raw_async", false),
    ("memcpy_only", false),
];

/// The batch sizes of a band.
fn band_sizes(band: &str) -> Result<&'static [usize], String> {
    const SMALL: [usize; 5] = [4 << 10, 8 << 10, 16 << 10, 32 << 10, 64 << 10];
    const LARGE: [usize; 4] = [1 << 20, 2 << 20, 4 << 20, MAX_BATCH];
    match band {
        "small" => Ok(&SMALL),
        "large" => Ok(&LARGE),
        other => Err(format!("unknown band {other}; known: small, large")),
    }
}

/// Batch `i`'s size for producer `t` (an LCG step, as in the throughput benchmark).
fn size_of(sizes: &[usize], t: usize, i: u64) -> usize {
    let x =
        (i + t as u64 * 7919).wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407)
            >> 33;
    sizes[(x % sizes.len() as u64) as usize]
}

/// How a variant gets and returns a batch buffer.
trait Buffers: Sync {
    type Buf: Send;
    fn alloc(&self, rig: &dyn Rig, t: usize, size: usize) -> Result<Self::Buf, String>;
    fn ptr(&self, buf: &Self::Buf) -> DevicePtr;
    /// Returns the buffer once the consumer's kernel is enqueued.
    fn release(&self, rig: &dyn Rig, buf: Self::Buf) -> Result<(), String>;
}

/// A streamalloc allocator through its pointer API: malloc on the producer stream,
/// record_stream of the consumer, free.
struct Pooled<'a>(&'a dyn StreamOrderedAllocator);

impl Buffers for Pooled<'_> {
    type Buf = DevicePtr;
    fn alloc(&self, rig: &dyn Rig, t: usize, size: usize) -> Result<DevicePtr, String> {
        self.0.malloc(0, size, rig.producer(t).stream).map_err(|e| e.to_string())
    }
    fn ptr(&self, buf: &DevicePtr) -> DevicePtr {
        *buf
    }
    fn release(&self, rig: &dyn Rig, ptr: DevicePtr) -> Result<(), String> {
        self.0.record_stream(ptr, rig.consumer()).map_err(|e| e.to_string())?;
        self.0.free(ptr).map_err(|e| e.to_string())
    }
}

/// The driver's own stream-ordered calls: allocate on the producer, free on the consumer
/// (after the kernel, in its stream order).
struct Raw<'a, D: Driver>(&'a D);

impl<D: Driver> Buffers for Raw<'_, D> {
    type Buf = (DevicePtr, usize);
    fn alloc(&self, rig: &dyn Rig, t: usize, size: usize) -> Result<Self::Buf, String> {
        let p = self.0.malloc_async(0, size, rig.producer(t).stream).map_err(|e| e.to_string())?;
        Ok((p, size))
    }
    fn ptr(&self, buf: &Self::Buf) -> DevicePtr {
        buf.0
    }
    fn release(&self, rig: &dyn Rig, (ptr, size): Self::Buf) -> Result<(), String> {
        self.0.free_async(0, ptr, size, rig.consumer().stream).map_err(|e| e.to_string())
    }
}

/// One producer's loop for a [`Buffers`] variant (or the copies alone when `bufs` is
/// `None`): `warm` untimed batches, the start barrier, `n` timed batches, its span.
fn produce<B: Buffers>(
    rig: &dyn Rig,
    bufs: Option<&B>,
    sizes: &[usize],
    t: usize,
    warm: u64,
    n: u64,
    barrier: &Barrier,
) -> Result<(Instant, Instant, u64), String> {
    rig.enter()?;
    let one = |i: u64| -> Result<u64, String> {
        let size = size_of(sizes, t, i);
        match bufs {
            Some(b) => {
                let buf = b.alloc(rig, t, size)?;
                let ptr = b.ptr(&buf);
                rig.copy_in(t, ptr, size)?;
                rig.hand_off(t)?;
                rig.consume(t, ptr, size)?;
                b.release(rig, buf)?;
                rig.step_done(t, i, false)?;
            }
            None => {
                rig.copy_in(t, rig.scratch(t), size)?;
                rig.step_done(t, i, true)?;
            }
        }
        Ok(size as u64)
    };
    let warmed = (0..warm).try_for_each(|i| one(i).map(drop)).and_then(|()| rig.finish(t));
    barrier.wait();
    warmed?;
    let start = Instant::now();
    let mut bytes = 0;
    for i in warm..warm + n {
        bytes += one(i)?;
    }
    rig.finish(t)?;
    Ok((start, Instant::now(), bytes))
}

/// cudarc's own allocation: `CudaStream::alloc` on the producer, its copy, the kernel on
/// the consumer with the slice as argument (cudarc's events order the hand-off and the
/// free), dropped (freed on the producer after the kernel).
fn produce_cudarc(
    rig: &GpuRig,
    sizes: &[usize],
    t: usize,
    warm: u64,
    n: u64,
    barrier: &Barrier,
) -> Result<(Instant, Instant, u64), String> {
    use cudarc::driver::{LaunchConfig, PushKernelArg};
    let e = |e: cudarc::driver::DriverError| e.to_string();
    rig.enter()?;
    let p = rig.producer_stream(t);
    let counter = rig.counter_ptr(t);
    let one = |i: u64| -> Result<u64, String> {
        let size = size_of(sizes, t, i);
        // Safety: every byte is written by the copy before the kernel reads it.
        let mut buf = unsafe { p.alloc::<u8>(size) }.map_err(e)?;
        p.memcpy_htod(rig.host(t, size), &mut buf).map_err(e)?;
        let words = (size / 4) as u64;
        let cfg = LaunchConfig {
            grid_dim: (rig::launch_blocks(size / 4), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = rig.consumer.launch_builder(&rig.sum_words);
        b.arg(&buf).arg(&words).arg(&counter);
        // Safety: sum_words(const unsigned*, unsigned long long, unsigned*): the slice
        // holds `size` bytes, the counter 4.
        unsafe { b.launch(cfg) }.map_err(e)?;
        drop(buf);
        rig.step_done(t, i, false)?;
        Ok(size as u64)
    };
    let warmed = (0..warm).try_for_each(|i| one(i).map(drop)).and_then(|()| rig.finish(t));
    barrier.wait();
    warmed?;
    let start = Instant::now();
    let mut bytes = 0;
    for i in warm..warm + n {
        bytes += one(i)?;
    }
    rig.finish(t)?;
    rig.ctx.check_err().map_err(e)?;
    Ok((start, Instant::now(), bytes))
}

/// One measurement: `threads` producers; returns (batches/s, GB/s).
fn measure(
    variant: &str,
    dev: &Device,
    sizes: &[usize],
    threads: usize,
    batches: u64,
) -> Result<(f64, f64), String> {
    let warm = (batches / 10).max(1);
    let barrier = Barrier::new(threads);
    let rig: &dyn Rig = match dev {
        Device::Gpu { rig, .. } => rig,
        Device::Sim { rig, .. } => rig,
    };
    rig.reset_counters()?;
    let failure = Mutex::new(None::<String>);
    let run = |f: &(dyn Fn(usize) -> Result<(Instant, Instant, u64), String> + Sync)| {
        std::thread::scope(|s| {
            let hs: Vec<_> = (0..threads)
                .map(|t| {
                    let failure = &failure;
                    s.spawn(move || match f(t) {
                        Ok(x) => Some(x),
                        Err(e) => {
                            failure.lock().unwrap().get_or_insert(format!("thread {t}: {e}"));
                            None
                        }
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().ok().flatten()).collect::<Vec<_>>()
        })
    };
    let b = &barrier;
    let spans = match (variant, dev) {
        ("streamalloc_cached" | "streamalloc_passthrough", _) => {
            let cache = if variant == "streamalloc_cached" {
                CacheConfig::default()
            } else {
                CacheConfig::passthrough()
            };
            let alloc: Box<dyn StreamOrderedAllocator> = match dev {
                Device::Gpu { driver, .. } => Box::new(
                    StreamAlloc::with_cache(driver.clone(), cache).map_err(|e| e.to_string())?,
                ),
                Device::Sim { rig, .. } => Box::new(
                    StreamAlloc::with_cache(rig.sim.clone(), cache).map_err(|e| e.to_string())?,
                ),
            };
            let bufs = Pooled(&*alloc);
            let spans = run(&|t| produce(rig, Some(&bufs), sizes, t, warm, batches, b));
            alloc.empty_cache().map_err(|e| e.to_string())?;
            spans
        }
        ("raw_async", Device::Gpu { driver, .. }) => {
            let bufs = Raw(&**driver);
            run(&|t| produce(rig, Some(&bufs), sizes, t, warm, batches, b))
        }
        ("raw_async", Device::Sim { rig: r, .. }) => {
            let bufs = Raw(&*r.sim);
            run(&|t| produce(rig, Some(&bufs), sizes, t, warm, batches, b))
        }
        ("memcpy_only", _) => {
            run(&|t| produce::<Raw<SimDriver>>(rig, None, sizes, t, warm, batches, b))
        }
        ("cudarc_alloc", Device::Gpu { rig: g, .. }) => {
            run(&|t| produce_cudarc(g, sizes, t, warm, batches, b))
        }
        (v, _) => return Err(format!("variant {v} does not run here")),
    };
    if let Some(e) = failure.into_inner().unwrap() {
        return Err(e);
    }
    let spans: Vec<_> = spans.into_iter().flatten().collect();
    let first = spans.iter().map(|s| s.0).min().ok_or("no spans")?;
    let last = spans.iter().map(|s| s.1).max().ok_or("no spans")?;
    let secs = last.duration_since(first).as_secs_f64().max(1e-9);
    // The kernels' counters must hold the words copied in (warm-up included), mod 2^32.
    if variant != "memcpy_only" {
        for t in 0..threads {
            if let Some(got) = rig.counter(t)? {
                let words: u64 = (0..warm + batches).map(|i| size_of(sizes, t, i) as u64 / 4).sum();
                if got != words as u32 {
                    return Err(format!(
                        "thread {t}: the consumer kernel summed {got} words, expected {}",
                        words as u32
                    ));
                }
            }
        }
    }
    let bytes: u64 = spans.iter().map(|s| s.2).sum();
    let total = threads as f64 * batches as f64;
    Ok((total / secs, bytes as f64 / secs / 1e9))
}

/// The device the benchmark runs on.
enum Device {
    Gpu { driver: Arc<CudaDriver>, rig: GpuRig },
    Sim { rig: SimRig },
}

fn median(v: &mut [(f64, f64)]) -> (f64, f64) {
    v.sort_by(|a, b| a.0.total_cmp(&b.0));
    v[v.len() / 2]
}

fn main() {
    if let Err(e) = real_main(Opts::parse()) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn real_main(o: Opts) -> Result<(), String> {
    let max_threads = o.max_threads as usize;
    let gpu = if o.sim {
        Err("--sim given".to_string())
    } else {
        CudaDriver::new().map_err(|e| e.to_string())
    };
    let (dev, card) = match gpu {
        Ok(d) => {
            let name = d.device_name(0).unwrap_or_else(|_| "cuda".into());
            let driver = Arc::new(d.with_context_policy(ContextPolicy::Cached));
            // The pool configured as the allocators configure it (S2), for every variant.
            driver.init_device(0).map_err(|e| e.to_string())?;
            let rig = GpuRig::new(max_threads)?;
            println!("device: GPU {name} (CUDA driver {})", driver.driver_version());
            (Device::Gpu { driver, rig }, name)
        }
        Err(why) => {
            println!(
                "device: simulated (checker on; numbers show the harness works, not GPU speed); no GPU because: {why}"
            );
            let mut cfg = SimConfig::default();
            cfg.devices = vec![1 << 40];
            let sim = Arc::new(SimDriver::new(cfg));
            (Device::Sim { rig: SimRig::new(sim, max_threads)? }, "sim".to_string())
        }
    };
    let is_gpu = matches!(dev, Device::Gpu { .. });
    let card = o.gpu_name.clone().unwrap_or(card);
    let known: Vec<&str> = VARIANTS.iter().map(|v| v.0).collect();
    for v in o.variants.iter().flatten() {
        if !known.contains(&v.as_str()) {
            return Err(format!("unknown variant {v}; known: {}", known.join(",")));
        }
    }
    let selected: Vec<&str> = VARIANTS
        .iter()
        .filter(|(name, _)| o.variants.as_ref().is_none_or(|vs| vs.iter().any(|v| v == name)))
        .filter(|(name, gpu_only)| {
            if *gpu_only && !is_gpu {
                println!("skipping {name} (GPU only)");
            }
            is_gpu || !gpu_only
        })
        .map(|v| v.0)
        .collect();
    let threads: Vec<usize> = std::iter::successors(Some(1usize), |t| Some(t * 2))
        .take_while(|&t| t <= max_threads)
        .collect();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "host: {cores} cores; bands {:?}; reps {}; in flight per producer: {}",
        o.bands,
        o.reps,
        rig::DEPTH
    );

    let mut rows: Vec<plot::Row> = Vec::new();
    for band in &o.bands {
        let sizes = band_sizes(band)?;
        let batches = o.batches.unwrap_or(match (is_gpu, band.as_str()) {
            (false, _) => 40,
            (true, "small") => 3000,
            (true, _) => 300,
        });
        let mut results: BTreeMap<(&str, usize), Vec<(f64, f64)>> = BTreeMap::new();
        let mut failed: BTreeMap<&str, String> = BTreeMap::new();
        for rep in 0..o.reps {
            for &v in &selected {
                if failed.contains_key(v) {
                    continue;
                }
                for &t in &threads {
                    match measure(v, &dev, sizes, t, batches) {
                        Ok(x) => {
                            println!(
                                "rep {} {band:<5} {v:<24} threads {t:>2}: {:>10.0} batches/s {:>8.2} GB/s",
                                rep + 1,
                                x.0,
                                x.1
                            );
                            results.entry((v, t)).or_default().push(x);
                        }
                        Err(e) => {
                            println!(
                                "rep {} {band:<5} {v:<24} threads {t:>2}: FAILED: {e}",
                                rep + 1
                            );
                            failed.insert(v, e);
                            break;
                        }
                    }
                }
            }
        }
        for &v in &selected {
            for &t in &threads {
                if let Some(xs) = results.get_mut(&(v, t)) {
                    let (bps, gbs) =
                        if failed.contains_key(v) { (f64::NAN, f64::NAN) } else { median(xs) };
                    rows.push(plot::Row {
                        gpu: card.clone(),
                        variant: v.to_string(),
                        band: band.clone(),
                        threads: t,
                        batches_per_s: bps,
                        gb_per_s: gbs,
                    });
                }
            }
        }
        for (v, e) in &failed {
            println!("{band} {v} failed: {e}");
        }
    }
    if let Device::Sim { rig } = &dev {
        rig.sim.synchronize_all();
        let reports = rig.sim.reports();
        println!("simulated device checker: {} ordering reports", reports.len());
        if let Some(r) = reports.first() {
            return Err(format!("the checker reported: {r}"));
        }
    }
    if !o.no_csv {
        plot::write_csv(&o.csv, &rows)?;
        println!("wrote {}", o.csv.display());
    }
    if !o.no_png {
        match plot::plot(&rows, &o.png, &card) {
            Ok(()) => println!("wrote {}", o.png.display()),
            Err(e) => println!("plot failed: {e}"),
        }
    }
    plot::print_table(&rows, &card, o.reps);
    plot::print_goals(&rows, max_threads);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The whole pipeline, small, on the simulated device with its checker: every
    /// variant that runs without a GPU, both bands, one and three producers.
    #[test]
    fn pipeline_runs_on_the_simulated_device_in_order() {
        let sim = Arc::new(SimDriver::with_devices(1, 1 << 40));
        let dev = Device::Sim { rig: SimRig::new(sim.clone(), 3).unwrap() };
        for band in ["small", "large"] {
            let sizes = band_sizes(band).unwrap();
            for (v, gpu_only) in VARIANTS {
                if *gpu_only {
                    assert!(measure(v, &dev, sizes, 1, 5).is_err(), "{v} needs a GPU");
                    continue;
                }
                for threads in [1, 3] {
                    let (bps, gbs) = measure(v, &dev, sizes, threads, 5).unwrap();
                    assert!(bps > 0.0 && gbs > 0.0, "{v} {band} {threads}: {bps} {gbs}");
                }
            }
        }
        sim.synchronize_all();
        assert!(sim.reports().is_empty(), "{:?}", sim.reports());
        assert!(band_sizes("medium").is_err());
    }

    #[test]
    fn sizes_stay_in_their_band() {
        for band in ["small", "large"] {
            let sizes = band_sizes(band).unwrap();
            for t in 0..16 {
                for i in 0..100 {
                    assert!(sizes.contains(&size_of(sizes, t, i)));
                }
            }
        }
        assert!(band_sizes("small").unwrap().iter().all(|&s| (4 << 10..=64 << 10).contains(&s)));
        assert!(band_sizes("large").unwrap().iter().all(|&s| (1 << 20..=8 << 20).contains(&s)));
    }
}
