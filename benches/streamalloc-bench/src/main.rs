//! `streamalloc-bench`: aggregate alloc+free throughput against thread count, with the
//! PyTorch anchor's workload (see `workload.rs`), on the GPU when one is found, else on
//! the simulated device; bookkeeping alone on the null driver; heap bytes per live
//! block; a CSV and a PNG plot.
//!
//! ```text
//! cargo run --release --bin streamalloc-bench -- [--max-threads 16] [--reps 3]
//!     [--iters 50000] [--null-iters 500000] [--variants a,b,c] [--csv out.csv | --no-csv]
//!     [--png out.png] [--gpu-name NAME] [--sim] [--blocks 100000]
//! cargo run --release --bin streamalloc-bench -- --help | --version
//! cargo run --release --bin streamalloc-bench -- --plot-only combined.csv --png out.png
//! ```

mod backend;
mod heap;
mod plot;
mod workload;

use backend::{BenchDevice, DeviceBackend, make_streams};
use clap::Parser;
use plot::Row;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use streamalloc::sim::NullDriver;
use streamalloc::{CacheConfig, DriverLane, Laned, SeedReplica, StreamAlloc, UsageStream};
use workload::{HandleApi, PtrApi, RawDriver, Workload};

#[global_allocator]
static GLOBAL: heap::CountingAlloc = heap::CountingAlloc;

/// Which driver a variant runs on.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum On {
    /// The GPU (or the simulated device when there is none).
    Device,
    /// The GPU only: skipped on the simulated device.
    GpuOnly,
    /// The null driver: bookkeeping alone.
    Null,
}

/// A measured variant: its name (the CSV's `variant`) and its driver.
struct Variant {
    name: &'static str,
    on: On,
}

/// Every variant, in the order they run and are tabulated. To add one: a line here and an
/// arm in [`measure`].
const VARIANTS: &[Variant] = &[
    Variant { name: "raw_driver", on: On::GpuOnly },
    // The driver alone: one thread, N streams (the threads column is N), alternating.
    Variant { name: "raw_one_thread", on: On::Device },
    // The driver through a lane alone, no bookkeeping.
    Variant { name: "raw_lock", on: On::Device },
    Variant { name: "raw_delegate", on: On::Device },
    Variant { name: "seed_replica", on: On::Device },
    Variant { name: "streamalloc", on: On::Device },
    Variant { name: "streamalloc_nolane", on: On::Device },
    Variant { name: "streamalloc_lock", on: On::Device },
    Variant { name: "streamalloc_delegate", on: On::Device },
    Variant { name: "streamalloc_delegate_always", on: On::Device },
    Variant { name: "streamalloc_cached", on: On::Device },
    Variant { name: "streamalloc_cached_ptr", on: On::Device },
    Variant { name: "streamalloc_cached_lean", on: On::Device },
    Variant { name: "streamalloc_cached_lean_ptr", on: On::Device },
    Variant { name: "streamalloc_cached_history", on: On::Device },
    Variant { name: "streamalloc_cached_ptr_history", on: On::Device },
    Variant { name: "seed_replica_null", on: On::Null },
    Variant { name: "streamalloc_null", on: On::Null },
    Variant { name: "streamalloc_cached_null", on: On::Null },
];

/// One measurement of variant `name` on `dev` (a fresh allocator each time).
fn measure<D: BenchDevice>(
    name: &str,
    dev: &Arc<D>,
    streams: &[UsageStream],
    threads: usize,
    iters: u64,
) -> Result<f64, String> {
    fn go<W: Workload, D: BenchDevice>(
        w: &W,
        dev: &Arc<D>,
        streams: &[UsageStream],
        threads: usize,
        iters: u64,
    ) -> Result<f64, String> {
        workload::run(w, streams, &|s| dev.sync(s), threads, iters)
    }
    let err = |e: streamalloc::Error| e.to_string();
    match name {
        "raw_driver" => go(&RawDriver(&**dev), dev, streams, threads, iters),
        "raw_one_thread" => workload::one_thread_streams(&**dev, streams, threads, iters),
        "raw_lock" | "raw_delegate" => {
            let lane = if name == "raw_lock" { DriverLane::Lock } else { DriverLane::Delegate };
            let laned = Laned::new(dev.clone(), lane);
            go(&RawDriver(&laned), dev, streams, threads, iters)
        }
        "seed_replica" | "seed_replica_null" => {
            let a = SeedReplica::new(dev.clone()).map_err(err)?;
            go(&PtrApi(&a), dev, streams, threads, iters)
        }
        // The lock-free core alone (no front cache): every pair reaches the driver,
        // through the driver lane where the driver serializes (CUDA).
        "streamalloc" | "streamalloc_null" => {
            let a =
                StreamAlloc::with_cache(dev.clone(), CacheConfig::passthrough()).map_err(err)?;
            go(&PtrApi(&a), dev, streams, threads, iters)
        }
        // The same through a lane chosen here (`streamalloc_<lane>`).
        "streamalloc_nolane"
        | "streamalloc_lock"
        | "streamalloc_delegate"
        | "streamalloc_delegate_always" => {
            let lane = name.strip_prefix("streamalloc_").unwrap_or("off");
            let lane = DriverLane::from_name(lane).unwrap_or(DriverLane::Off);
            let laned = Laned::new(dev.clone(), lane);
            let a = StreamAlloc::with_cache(laned, CacheConfig::passthrough()).map_err(err)?;
            go(&PtrApi(&a), dev, streams, threads, iters)
        }
        // With the front cache (the default), through the handle API and the pointer API.
        "streamalloc_cached" | "streamalloc_cached_null" => {
            let a = StreamAlloc::new(dev.clone()).map_err(err)?;
            go(&HandleApi(&a), dev, streams, threads, iters)
        }
        "streamalloc_cached_ptr" => {
            let a = StreamAlloc::new(dev.clone()).map_err(err)?;
            go(&PtrApi(&a), dev, streams, threads, iters)
        }
        // The memory-lean release preset (the C ABI's default).
        "streamalloc_cached_lean" => {
            let a = StreamAlloc::with_cache(dev.clone(), CacheConfig::lean()).map_err(err)?;
            go(&HandleApi(&a), dev, streams, threads, iters)
        }
        "streamalloc_cached_lean_ptr" => {
            let a = StreamAlloc::with_cache(dev.clone(), CacheConfig::lean()).map_err(err)?;
            go(&PtrApi(&a), dev, streams, threads, iters)
        }
        // History on (a ring of 100k entries, as memory_viz users set it): what recording
        // costs. The rows without `_history` are the same allocators with it off.
        "streamalloc_cached_history" | "streamalloc_cached_ptr_history" => {
            let a = StreamAlloc::new(dev.clone()).map_err(err)?;
            a.record_history(&streamalloc::HistoryOptions::default());
            if name == "streamalloc_cached_history" {
                go(&HandleApi(&a), dev, streams, threads, iters)
            } else {
                go(&PtrApi(&a), dev, streams, threads, iters)
            }
        }
        other => Err(format!("variant {other} has no measurement")),
    }
}

/// streamalloc-bench: alloc+free throughput against threads (the PyTorch anchor's
/// workload), on the GPU when one is found, else on the simulated device.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Opts {
    /// Thread counts 1, 2, 4, ... up to N.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=1024))]
    max_threads: u64,
    /// Measurements per variant and thread count (the median is reported).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    reps: u64,
    /// Timed steps per thread for driver variants [default: 50000; 10000 on the
    /// simulated device].
    #[arg(long)]
    iters: Option<u64>,
    /// Timed steps per thread for *_null variants [default: 10 x --iters].
    #[arg(long)]
    null_iters: Option<u64>,
    /// Variants to run, comma-separated [default: all that apply to the device found].
    #[arg(long, value_delimiter = ',')]
    variants: Option<Vec<String>>,
    /// Where to write the CSV rows gpu,variant,threads,mpairs_per_s (medians).
    #[arg(long, default_value = "streamalloc-bench.csv")]
    csv: PathBuf,
    /// Do not write the CSV.
    #[arg(long)]
    no_csv: bool,
    /// Plot throughput against threads into this PNG.
    #[arg(long)]
    png: Option<PathBuf>,
    /// The gpu column and plot title [default: the device's name, or sim].
    #[arg(long)]
    gpu_name: Option<String>,
    /// Use the simulated device even if a GPU is found.
    #[arg(long)]
    sim: bool,
    /// Live blocks for the bytes-per-block count (0: skip).
    #[arg(long, default_value_t = 100_000)]
    blocks: usize,
    /// Re-plot an existing CSV into --png and exit.
    #[arg(long, value_name = "CSV", requires = "png")]
    plot_only: Option<PathBuf>,
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() || v.iter().any(|x| x.is_nan()) {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

/// Formats a throughput with three significant digits.
fn fmt3(x: f64) -> String {
    if !x.is_finite() {
        "failed".to_string()
    } else if x >= 100.0 {
        format!("{x:.0}")
    } else if x >= 10.0 {
        format!("{x:.1}")
    } else if x >= 1.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    }
}

fn main() {
    if let Err(e) = real_main(Opts::parse()) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn real_main(o: Opts) -> Result<(), String> {
    if let Some(csv) = &o.plot_only {
        let png = o.png.as_ref().ok_or("--plot-only needs --png OUT")?;
        let text = std::fs::read_to_string(csv).map_err(|e| format!("{}: {e}", csv.display()))?;
        let rows = plot::parse_csv(&text)?;
        plot::plot(&rows, png, o.gpu_name.as_deref())?;
        println!("plotted {} rows of {} into {}", rows.len(), csv.display(), png.display());
        return Ok(());
    }

    // Which variants, on which devices.
    if let Some(names) = &o.variants {
        for n in names {
            if !VARIANTS.iter().any(|v| v.name == n) {
                let all: Vec<&str> = VARIANTS.iter().map(|v| v.name).collect();
                return Err(format!("unknown variant {n}; known: {}", all.join(",")));
            }
        }
    }
    let wanted = |v: &Variant| o.variants.as_ref().is_none_or(|n| n.iter().any(|n| n == v.name));
    let needs_device = VARIANTS.iter().any(|v| wanted(v) && v.on != On::Null);
    let (device, sim_reason) = if needs_device {
        let (d, why) = DeviceBackend::pick(o.sim);
        (Some(d), why)
    } else {
        (None, None)
    };
    let is_gpu = device.as_ref().is_some_and(DeviceBackend::is_gpu);
    // The simulated device runs every call through its checker: fewer steps keep the run
    // to a minute or two; its numbers only show the harness works.
    let iters = o.iters.unwrap_or(if device.is_some() && !is_gpu { 10_000 } else { 50_000 });
    let max_threads = o.max_threads as usize;
    let csv = (!o.no_csv).then_some(&o.csv);
    let selected: Vec<&Variant> = VARIANTS
        .iter()
        .filter(|v| wanted(v))
        .filter(|v| {
            let skip = v.on == On::GpuOnly && !is_gpu;
            if skip {
                println!("skipping {} (GPU only; running on the simulated device)", v.name);
            }
            !skip
        })
        .collect();
    let gpu = o.gpu_name.clone().unwrap_or_else(|| match &device {
        Some(d) => d.card_name(),
        None => "cpu".to_string(),
    });
    match (&device, &sim_reason) {
        (Some(DeviceBackend::Cuda(d)), _) => println!(
            "device: GPU {} (CUDA driver {}), context policy Cached",
            d.device_name(0).unwrap_or_default(),
            d.driver_version()
        ),
        (Some(DeviceBackend::Sim(_)), why) => println!(
            "device: simulated (SimDriver, one mutex: numbers show the harness works, not \
             GPU speed); no GPU because: {}",
            why.as_deref().unwrap_or("?")
        ),
        (None, _) => println!("device: none needed (null-driver variants only)"),
    }
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let null_iters = o.null_iters.unwrap_or(iters.saturating_mul(10));
    println!(
        "host: {cores} cores; iters per thread: {} (driver variants), {null_iters} (null \
         variants); reps: {}; gpu column: {gpu}; asymmetric fences: {}",
        iters,
        o.reps as usize,
        if streamalloc::asymmetric_fences() { "on (membarrier)" } else { "off" }
    );
    let thread_counts: Vec<usize> = std::iter::successors(Some(1usize), |t| Some(t * 2))
        .take_while(|&t| t <= max_threads)
        .collect();

    // Streams: one per worker thread, made once per device and reused.
    let null = Arc::new(NullDriver::new(1));
    let null_streams = make_streams(&*null, max_threads)?;
    let device_streams = match &device {
        Some(d) => {
            d.init()?;
            Some(match d {
                DeviceBackend::Cuda(c) => make_streams(&**c, max_threads)?,
                DeviceBackend::Sim(s) => make_streams(&**s, max_threads)?,
            })
        }
        None => None,
    };

    // Bookkeeping bytes per live block, on the null driver (first: it takes a moment
    // and the partial CSVs written after each rep carry it).
    let mut extra_rows = Vec::new();
    if o.blocks > 0 {
        let stream = null_streams[0].stream;
        let sa = StreamAlloc::new(null.clone()).map_err(|e| e.to_string())?;
        let per = heap::bytes_per_live_block(&sa, stream, o.blocks)?;
        drop(sa);
        let sr = SeedReplica::new(null.clone()).map_err(|e| e.to_string())?;
        let per_seed = heap::bytes_per_live_block(&sr, stream, o.blocks)?;
        println!(
            "bookkeeping heap bytes per live block ({} live blocks, null driver): streamalloc \
             {per:.1}, seed_replica {per_seed:.1} (target: under 128)",
            o.blocks
        );
        for (name, value) in
            [("bytes_per_live_block", per), ("bytes_per_live_block_seed_replica", per_seed)]
        {
            extra_rows.push(Row { gpu: gpu.clone(), variant: name.to_string(), threads: 0, value });
        }
    }

    // Measurements: reps outside, variants inside, so drift hits every variant alike.
    let mut results: BTreeMap<(&str, usize), Vec<f64>> = BTreeMap::new();
    let mut failed: BTreeMap<&str, String> = BTreeMap::new();
    for rep in 0..o.reps as usize {
        for v in &selected {
            if failed.contains_key(v.name) {
                continue;
            }
            for &t in &thread_counts {
                let r = match (v.on, &device, &device_streams) {
                    (On::Null, _, _) => measure(v.name, &null, &null_streams, t, null_iters),
                    (_, Some(DeviceBackend::Cuda(d)), Some(s)) => measure(v.name, d, s, t, iters),
                    (_, Some(DeviceBackend::Sim(d)), Some(s)) => measure(v.name, d, s, t, iters),
                    _ => Err("no device".to_string()),
                };
                match r {
                    Ok(x) => {
                        println!(
                            "rep {} {:<22} threads {t:>2}: {} M pairs/s",
                            rep + 1,
                            v.name,
                            fmt3(x)
                        );
                        results.entry((v.name, t)).or_default().push(x);
                    }
                    Err(e) => {
                        println!("rep {} {:<22} threads {t:>2}: FAILED: {e}", rep + 1, v.name);
                        failed.insert(v.name, e);
                        break;
                    }
                }
            }
        }
        // A partial CSV after every rep: a run cut short still leaves its numbers.
        if let Some(path) = csv {
            let rows = median_rows(&gpu, &selected, &thread_counts, &results, &failed);
            write_csv(path, &rows, &extra_rows)?;
        }
    }
    // Peak reserved against peak live bytes (untimed runs): the fast default, the lean
    // preset, and passthrough (the driver's pool alone: the baseline).
    if VARIANTS.iter().any(|v| v.name == "streamalloc_cached" && wanted(v)) {
        let configs = [
            ("reserved_over_live_peak", CacheConfig::default()),
            ("reserved_over_live_peak_lean", CacheConfig::lean()),
            ("reserved_over_live_peak_passthrough", CacheConfig::passthrough()),
        ];
        for (variant, cache) in configs {
            for &t in &thread_counts {
                let r = match (&device, &device_streams) {
                    (Some(DeviceBackend::Cuda(d)), Some(s)) => {
                        workload::reserve_ratio(d, s, t, iters, cache)
                    }
                    (Some(DeviceBackend::Sim(d)), Some(s)) => {
                        workload::reserve_ratio(d, s, t, iters, cache)
                    }
                    _ => continue,
                };
                match r {
                    Ok((reserved, live)) => {
                        let ratio = reserved as f64 / live.max(1) as f64;
                        println!(
                            "{variant} threads {t:>2}: peak reserved {reserved} B, peak live \
                             {live} B, ratio {ratio:.3} (target <= 1.25)"
                        );
                        let variant = variant.to_string();
                        extra_rows.push(Row {
                            gpu: gpu.clone(),
                            variant,
                            threads: t,
                            value: ratio,
                        });
                    }
                    Err(e) => println!("{variant} probe at {t} threads failed: {e}"),
                }
            }
        }
        if let Some(path) = csv {
            let rows = median_rows(&gpu, &selected, &thread_counts, &results, &failed);
            write_csv(path, &rows, &extra_rows)?;
        }
    }
    if let (Some(d), Some(streams)) = (&device, &device_streams) {
        for &s in streams {
            // Safety: every workload made and dropped its own allocators above, so none
            // that used these streams is alive, and the streams are not used after this.
            match d {
                DeviceBackend::Cuda(c) => unsafe { c.release_stream(s) },
                DeviceBackend::Sim(m) => unsafe { m.release_stream(s) },
            }
        }
    }
    if let Some(DeviceBackend::Sim(sim)) = &device {
        let reports = sim.reports();
        println!("simulated device checker: {} ordering reports", reports.len());
        for r in reports.iter().take(5) {
            println!("  {r}");
        }
    }

    let rows = median_rows(&gpu, &selected, &thread_counts, &results, &failed);
    if let Some(path) = csv {
        write_csv(path, &rows, &extra_rows)?;
        println!("wrote {}", path.display());
    }
    if let Some(path) = &o.png {
        match plot::plot(&rows, path, Some(&gpu)) {
            Ok(()) => println!("wrote {}", path.display()),
            Err(e) => println!("plot failed: {e}"),
        }
    }
    for (name, e) in &failed {
        println!("{name} failed: {e}");
    }
    print_table(&gpu, &selected, &thread_counts, &rows, o.reps as usize);
    Ok(())
}

/// The median over reps of each variant and thread count measured (NaN for a variant
/// that failed).
fn median_rows(
    gpu: &str,
    selected: &[&Variant],
    thread_counts: &[usize],
    results: &BTreeMap<(&str, usize), Vec<f64>>,
    failed: &BTreeMap<&str, String>,
) -> Vec<Row> {
    let mut rows = Vec::new();
    for v in selected {
        for &t in thread_counts {
            if let Some(xs) = results.get(&(v.name, t)) {
                let value =
                    if failed.contains_key(v.name) { f64::NAN } else { median(&mut xs.clone()) };
                rows.push(Row {
                    gpu: gpu.to_string(),
                    variant: v.name.to_string(),
                    threads: t,
                    value,
                });
            }
        }
    }
    rows
}

/// Writes the CSV: header, throughput rows, then the extra rows (bytes per block).
fn write_csv(path: &std::path::Path, rows: &[Row], extra: &[Row]) -> Result<(), String> {
    let mut text = format!("{}\n", plot::HEADER);
    for r in rows.iter().chain(extra) {
        text.push_str(&r.to_csv());
        text.push('\n');
    }
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}

fn print_table(gpu: &str, selected: &[&Variant], threads: &[usize], rows: &[Row], reps: usize) {
    println!();
    println!("M alloc+free pairs/s, aggregate (median of {reps}), {gpu}");
    let width = |v: &Variant| v.name.len().max(7);
    let mut head = format!("{:>7}", "threads");
    for v in selected {
        head.push_str(&format!("  {:>w$}", v.name, w = width(v)));
    }
    println!("{head}");
    for &t in threads {
        let mut line = format!("{t:>7}");
        for v in selected {
            let x = rows
                .iter()
                .find(|r| r.variant == v.name && r.threads == t)
                .map_or("-".to_string(), |r| fmt3(r.value));
            line.push_str(&format!("  {:>w$}", x, w = width(v)));
        }
        println!("{line}");
    }
}
