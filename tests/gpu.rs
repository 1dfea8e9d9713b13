//! Tests on real hardware: the lock-free allocator over [`CudaDriver`].
//!
//! Every test starts with `let Some(drv) = gpu() else { ... }`: without a CUDA driver and
//! a device it prints `SKIPPED <test>` and returns, and `gpu_tests_report_skip` prints one
//! line naming every GPU test as skipped, so a machine without a GPU never reports these
//! as silently passed. With `STREAMALLOC_GPU_REQUIRED=1` (set by
//! `benches/gpu/run_on_gpu.sh`) a missing GPU is a failure instead.
//!
//! All tests share one [`CudaDriver`] (CUDA contexts are per process anyway); each makes
//! its own allocator. Tests that read pool-wide attributes (stats, empty_cache, S2) or
//! capture in `Global` mode hold [`exclusive`]; the others hold [`shared`], so the file
//! is correct under the default parallel test runner as well as `--test-threads=1`.
//!
//! Build and run on a GPU host: `benches/gpu/build.sh` here, then
//! `benches/gpu/run_on_gpu.sh` there.

use std::sync::{Arc, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Instant;
use streamalloc::cuda::{self, CaptureMode, CudaDriver};
use streamalloc::error::CUDA_ERROR_INVALID_HANDLE;
use streamalloc::{
    BlockSnapshot, Device, DevicePtr, Driver, Error, PoolAttribute, SeedReplica, Stream,
    StreamAlloc, StreamOrderedAllocator, UsageStream,
};

/// Prints a skip line past the test harness's output capture (which swallows `eprintln!`
/// of passing tests), so a skipped GPU test is visible in a plain `cargo test`.
macro_rules! skipped {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// Every GPU test in this file (for the skip report).
const GPU_TESTS: &[&str] = &[
    "gpu_alloc_free_threads",
    "gpu_record_stream_delayed_consumer",
    "gpu_capture_region",
    "gpu_memory_fraction_oom",
    "gpu_larger_than_card_oom",
    "gpu_empty_cache_lowers_reserved",
    "gpu_stats_match_pool_attributes",
    "gpu_bad_input",
    "gpu_bad_stream_handle",
    "gpu_s2_pool_configuration",
    "gpu_multi_device",
    "gpu_seed_replica_parity",
    "gpu_threaded_stress",
    "gpu_cudarc_kernel_on_pooled_block",
];

/// Device used by the single-device tests.
const DEV: Device = 0;
const MIB: usize = 1 << 20;

type Drv = Arc<CudaDriver>;
type Alloc = StreamAlloc<Drv>;

/// The process-wide driver, or `None` without a CUDA driver/GPU.
fn gpu() -> Option<Drv> {
    static DRIVER: OnceLock<Option<Drv>> = OnceLock::new();
    DRIVER
        .get_or_init(|| match cuda::detect() {
            Ok(d) => Some(Arc::new(d)),
            Err(e) => {
                if std::env::var_os("STREAMALLOC_GPU_REQUIRED").is_some_and(|v| v == "1") {
                    panic!("STREAMALLOC_GPU_REQUIRED=1 but no CUDA driver/GPU: {e}");
                }
                eprintln!("no CUDA driver/GPU: {e}");
                None
            }
        })
        .clone()
}

/// Tests that touch pool-wide state take the write side; all others the read side.
static POOL: RwLock<()> = RwLock::new(());

fn shared() -> RwLockReadGuard<'static, ()> {
    POOL.read().unwrap_or_else(|e| e.into_inner())
}

fn exclusive() -> RwLockWriteGuard<'static, ()> {
    POOL.write().unwrap_or_else(|e| e.into_inner())
}

fn new_alloc(drv: &Drv) -> Alloc {
    StreamAlloc::new(drv.clone()).expect("allocator over the CUDA driver")
}

fn new_stream(drv: &Drv, device: Device) -> UsageStream {
    UsageStream::new(drv.create_stream(device).expect("cuStreamCreate"), device)
}

/// Ends a test's stream: empties the cache of every allocator that used it (so none
/// keeps a block on it), waits for it and destroys it. Blocks allocated on it must be
/// freed before.
fn end_stream(drv: &Drv, s: UsageStream, allocs: &[&dyn StreamOrderedAllocator]) {
    for a in allocs {
        a.empty_cache().expect("empty_cache before destroying a stream");
    }
    drv.stream_synchronize(s).expect("cuStreamSynchronize");
    // Safety: the stream was made by new_stream for this test alone; every block on it
    // was freed and every allocator that used it emptied its cache above, so nothing
    // uses the handle after this.
    unsafe { drv.destroy_stream(s) }.expect("cuStreamDestroy");
}

/// Copies `len` bytes at `ptr` back to the host (waiting on `stream`) and checks that
/// every byte is `byte`.
fn expect_bytes(drv: &Drv, s: UsageStream, ptr: DevicePtr, len: usize, byte: u8, what: &str) {
    let mut host = vec![!byte; len];
    drv.copy_to_host(s.device, ptr, &mut host, s.stream).expect("copy to host");
    if let Some(i) = host.iter().position(|&b| b != byte) {
        panic!("{what}: byte {i} of {len} at {ptr} is {:#04x}, expected {byte:#04x}", host[i]);
    }
}

/// A small deterministic generator (no dev-dependency needed).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 33
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// 512 B .. 1.5 MiB, with odd sizes among them.
    fn size(&mut self) -> usize {
        const SIZES: [usize; 8] = [512, 4096, 65536, MIB, 3 << 19, 256 << 10, 1000, 12345];
        SIZES[self.below(SIZES.len() as u64) as usize]
    }
}

/// The books: used bytes equal the sum of live blocks.
fn assert_books(alloc: &dyn StreamOrderedAllocator, device: Device) {
    let live: u64 = alloc
        .snapshot()
        .iter()
        .filter(|b| b.creation_stream.device == device)
        .map(|b| b.size)
        .sum();
    assert_eq!(alloc.used_bytes(device), live, "used bytes of device {device} vs live blocks");
}

fn assert_empty(alloc: &dyn StreamOrderedAllocator) {
    for d in 0..alloc.device_count() {
        assert_eq!(alloc.used_bytes(d), 0, "used bytes of device {d}");
    }
    let snap = alloc.snapshot();
    assert!(snap.is_empty(), "live blocks remain: {snap:#?}");
}

fn find(snap: &[BlockSnapshot], ptr: DevicePtr) -> Option<&BlockSnapshot> {
    snap.iter().find(|b| b.ptr == ptr)
}

#[test]
fn gpu_tests_report_skip() {
    let _g = shared(); // cuMemGetInfo must not meet a Global-mode capture
    match gpu() {
        None => skipped!(
            "SKIPPED (no CUDA driver/GPU) {} GPU tests: {}",
            GPU_TESTS.len(),
            GPU_TESTS.join(", ")
        ),
        Some(drv) => {
            let n = drv.device_count().unwrap_or(0);
            for d in 0..n {
                let name = drv.device_name(d).unwrap_or_else(|e| format!("? ({e})"));
                let info = drv.mem_get_info(d).map(|m| m.total >> 20).unwrap_or(0);
                eprintln!("GPU {d}: {name}, {info} MiB, CUDA driver {}", drv.driver_version());
            }
            eprintln!("running {} GPU tests on {n} device(s)", GPU_TESTS.len());
        }
    }
}

/// 1. alloc/free across 1, 2, 4, 8, 16 threads, each on its own non-blocking stream;
///    every block is filled with a thread/iteration-specific byte and read back while
///    its neighbours are live.
#[test]
fn gpu_alloc_free_threads() {
    let Some(drv) = gpu() else {
        skipped!("SKIPPED gpu_alloc_free_threads: no CUDA driver/GPU");
        return;
    };
    let _g = shared();
    const ITERS: usize = 16;
    const LIVE: usize = 4;
    for threads in [1usize, 2, 4, 8, 16] {
        let alloc = new_alloc(&drv);
        let t0 = Instant::now();
        std::thread::scope(|scope| {
            for t in 0..threads {
                let (alloc, drv) = (&alloc, &drv);
                scope.spawn(move || {
                    let s = new_stream(drv, DEV);
                    let mut rng = Lcg(0x5eed ^ ((threads as u64) << 8) ^ t as u64);
                    for iter in 0..ITERS {
                        let mut live = Vec::with_capacity(LIVE);
                        for k in 0..LIVE {
                            let size = rng.size();
                            let p = alloc.malloc(DEV, size, s.stream).expect("malloc");
                            assert!(!p.is_null());
                            let byte = ((t * 37 + iter * 11 + k * 3) % 251 + 1) as u8;
                            drv.memset_d8_async(DEV, p, byte, size, s.stream).expect("memset");
                            live.push((p, size, byte));
                        }
                        for &(p, size, byte) in &live {
                            let what = format!("threads {threads} t {t} iter {iter}");
                            expect_bytes(drv, s, p, size, byte, &what);
                        }
                        for (p, _, _) in live {
                            alloc.free(p).expect("free");
                        }
                    }
                    end_stream(drv, s, &[alloc]);
                });
            }
        });
        assert_empty(&alloc);
        eprintln!("threads {threads}: ok in {:?}", t0.elapsed());
    }
}

/// 2. record_stream keeps a block alive for a consumer stream that is still sleeping
///    when the block is freed and its size is allocated again on the producer stream.
#[test]
fn gpu_record_stream_delayed_consumer() {
    let Some(drv) = gpu() else {
        skipped!("SKIPPED gpu_record_stream_delayed_consumer: no CUDA driver/GPU");
        return;
    };
    let _g = shared();
    const SIZE: usize = 8 * MIB;
    const REUSERS: usize = 32;
    const PATTERN: u8 = 0x5a;
    const OTHER: u8 = 0xee;
    let alloc = new_alloc(&drv);
    let (prod, cons) = (new_stream(&drv, DEV), new_stream(&drv, DEV));

    let p = alloc.malloc(DEV, SIZE, prod.stream).unwrap();
    let q = alloc.malloc(DEV, SIZE, cons.stream).unwrap();
    drv.memset_d8_async(DEV, p, PATTERN, SIZE, prod.stream).unwrap();
    drv.sync_streams(prod, cons).unwrap();
    drv.stream_sleep(cons, 200).unwrap();
    alloc.memcpy_async(q, DEV, p, DEV, SIZE, cons, false).unwrap();
    alloc.record_stream(p, cons).unwrap();
    assert_eq!(find(&alloc.snapshot(), p).unwrap().recorded_streams, vec![cons]);
    alloc.free(p).unwrap(); // the consumer is still asleep
    let mut reusers = Vec::with_capacity(REUSERS);
    for _ in 0..REUSERS {
        let r = alloc.malloc(DEV, SIZE, prod.stream).unwrap();
        drv.memset_d8_async(DEV, r, OTHER, SIZE, prod.stream).unwrap();
        reusers.push(r);
    }
    let reused = reusers.contains(&p);
    drv.stream_synchronize(prod).unwrap();
    drv.stream_synchronize(cons).unwrap();
    expect_bytes(&drv, cons, q, SIZE, PATTERN, "Q copied from P by the delayed consumer");
    eprintln!("P's address handed out again on the producer: {reused} (allowed only in order)");
    for r in reusers {
        alloc.free(r).unwrap();
    }
    alloc.free(q).unwrap();
    assert_empty(&alloc);

    // Control (informational, not asserted): the same with raw driver calls and no
    // record_stream, the bug the allocator must prevent. Shows whether this card would
    // have exposed it.
    let p = drv.malloc_async(DEV, SIZE, prod.stream).unwrap();
    let q = drv.malloc_async(DEV, SIZE, cons.stream).unwrap();
    drv.memset_d8_async(DEV, p, PATTERN, SIZE, prod.stream).unwrap();
    drv.sync_streams(prod, cons).unwrap();
    drv.stream_sleep(cons, 200).unwrap();
    drv.memcpy_async(q, DEV, p, DEV, SIZE, cons, false).unwrap();
    drv.free_async(DEV, p, SIZE, prod.stream).unwrap();
    let mut raw = Vec::new();
    for _ in 0..REUSERS {
        let r = drv.malloc_async(DEV, SIZE, prod.stream).unwrap();
        drv.memset_d8_async(DEV, r, OTHER, SIZE, prod.stream).unwrap();
        raw.push(r);
    }
    drv.stream_synchronize(prod).unwrap();
    drv.stream_synchronize(cons).unwrap();
    let mut host = vec![0u8; SIZE];
    drv.copy_to_host(DEV, q, &mut host, cons.stream).unwrap();
    let corrupted = host.iter().any(|&b| b != PATTERN);
    eprintln!(
        "control (raw free on the producer, no record_stream): consumer data corrupted: \
         {corrupted}; P reused: {}",
        raw.contains(&p)
    );
    for r in raw.into_iter().chain([q]) {
        drv.free_async(DEV, r, SIZE, prod.stream).unwrap();
    }
    end_stream(&drv, prod, &[&alloc]);
    end_stream(&drv, cons, &[&alloc]);
}

/// 3. Capture of a region with a forked side stream: a pre-capture block freed inside
///    is deferred, a captured block recorded on the side stream is freed through the
///    unifying stream, end_capture joins it, the graph instantiates and runs.
#[test]
fn gpu_capture_region() {
    let Some(drv) = gpu() else {
        skipped!("SKIPPED gpu_capture_region: no CUDA driver/GPU");
        return;
    };
    let _g = exclusive(); // Global mode forbids unsafe calls on every thread
    for mode in [CaptureMode::ThreadLocal, CaptureMode::Global] {
        capture_region(&drv, mode);
        eprintln!("capture mode {mode:?}: ok");
    }
}

fn capture_region(drv: &Drv, mode: CaptureMode) {
    const SIZE: usize = 2 * MIB;
    const A_BYTE: u8 = 0xa1;
    let alloc = new_alloc(drv);
    let (cap, side) = (new_stream(drv, DEV), new_stream(drv, DEV));
    let a = alloc.malloc(DEV, SIZE, cap.stream).unwrap();
    let c = alloc.malloc(DEV, SIZE, cap.stream).unwrap(); // the graph's output
    drv.memset_d8_async(DEV, a, A_BYTE, SIZE, cap.stream).unwrap();
    drv.stream_synchronize(cap).unwrap();
    let before = alloc.used_bytes(DEV);
    assert_eq!(before, 2 * SIZE as u64);

    alloc.begin_capture(DEV).unwrap();
    assert!(alloc.capture_underway());
    drv.begin_capture(cap, mode).unwrap();
    let b = alloc.malloc(DEV, SIZE, cap.stream).unwrap();
    assert!(find(&alloc.snapshot(), b).unwrap().captured, "B is a captured block");
    drv.sync_streams(cap, side).unwrap(); // fork
    alloc.memcpy_async(b, DEV, a, DEV, SIZE, side, false).unwrap();
    alloc.memcpy_async(c, DEV, b, DEV, SIZE, side, false).unwrap();
    alloc.free(a).unwrap();
    let snap = alloc.snapshot();
    assert!(find(&snap, a).unwrap().free_deferred, "A's free is deferred: {snap:#?}");
    assert!(matches!(alloc.free(a), Err(Error::DoubleFree { .. })));
    alloc.record_stream(b, side).unwrap();
    alloc.free(b).unwrap(); // captured: freed in the graph, through the unifying stream
    assert!(find(&alloc.snapshot(), b).is_none());
    drv.sync_streams(side, cap).unwrap(); // join
    alloc.end_capture(DEV, cap.stream).unwrap();
    assert!(!alloc.capture_underway());
    let graph = drv
        .end_capture(cap)
        .unwrap_or_else(|e| panic!("cuStreamEndCapture ({mode:?}) after end_capture: {e}"));
    assert_eq!(alloc.used_bytes(DEV), before, "A still counted until its deferred free");

    drv.memset_d8_async(DEV, c, 0, SIZE, cap.stream).unwrap();
    for _ in 0..3 {
        drv.graph_launch(&graph, cap).unwrap();
    }
    drv.stream_synchronize(cap).unwrap();
    expect_bytes(drv, cap, c, SIZE, A_BYTE, "C written by the graph from A");

    let snap = alloc.snapshot();
    assert!(find(&snap, a).is_some_and(|s| s.free_deferred), "A waits: {snap:#?}");
    let d = alloc.malloc(DEV, 4096, cap.stream).unwrap(); // flushes A's deferred free
    let snap = alloc.snapshot();
    assert!(find(&snap, a).is_none_or(|s| s.ptr == d), "A gone: {snap:#?}");
    assert_eq!(alloc.used_bytes(DEV), SIZE as u64 + 4096);
    assert_books(&alloc, DEV);
    assert_eq!(alloc.warnings().uncaptured_free_during_capture, 1);
    alloc.free(c).unwrap();
    alloc.free(d).unwrap();
    assert_empty(&alloc);
    drv.graph_destroy(graph).unwrap();
    end_stream(drv, side, &[&alloc]);
    end_stream(drv, cap, &[&alloc]);
}

/// 4. A memory fraction makes an over-limit allocation an OOM error with the seed's
///    report; the allocator keeps working.
#[test]
fn gpu_memory_fraction_oom() {
    let Some(drv) = gpu() else {
        skipped!("SKIPPED gpu_memory_fraction_oom: no CUDA driver/GPU");
        return;
    };
    let _g = shared();
    let alloc = new_alloc(&drv);
    let s = new_stream(&drv, DEV);
    let total = drv.mem_get_info(DEV).unwrap().total;
    assert!(matches!(alloc.set_memory_fraction(1.5, DEV), Err(Error::InvalidFraction { .. })));
    alloc.set_memory_fraction(0.1, DEV).unwrap();
    let limit = (0.1 * total as f64) as u64;
    assert_eq!(alloc.memory_limit(DEV), limit);
    let held = alloc.malloc(DEV, MIB, s.stream).unwrap();
    let want = (0.2 * total as f64) as usize;
    match alloc.malloc(DEV, want, s.stream) {
        Err(Error::OutOfMemory(oom)) => {
            let text = Error::OutOfMemory(oom.clone()).to_string();
            eprintln!("{text}");
            for field in
                ["Currently allocated", "Requested", "Device limit", "Free (according to CUDA)"]
            {
                assert!(text.contains(field), "OOM report lacks {field:?}: {text}");
            }
            assert_eq!(oom.device, DEV);
            assert_eq!(oom.allocated, MIB as u64);
            assert_eq!(oom.requested, want as u64);
            assert_eq!(oom.device_total, total);
            assert_eq!(oom.limit, limit);
            assert!(oom.device_free <= total);
        }
        other => panic!("expected OutOfMemory for 0.2 x total under fraction 0.1, got {other:?}"),
    }
    assert_eq!(alloc.used_bytes(DEV), MIB as u64, "a refused allocation costs nothing");
    let small = alloc.malloc(DEV, 64 * MIB, s.stream).expect("small allocation after OOM");
    drv.memset_d8_async(DEV, small, 7, 64 * MIB, s.stream).unwrap();
    expect_bytes(&drv, s, small, 64 * MIB, 7, "allocation after OOM");
    alloc.free(small).unwrap();
    alloc.free(held).unwrap();
    assert_empty(&alloc);
    end_stream(&drv, s, &[&alloc]);
}

/// 5. An allocation larger than the card: the driver's OOM becomes the seed's report;
///    1 EiB is refused outright; the next operation works.
#[test]
fn gpu_larger_than_card_oom() {
    let Some(drv) = gpu() else {
        skipped!("SKIPPED gpu_larger_than_card_oom: no CUDA driver/GPU");
        return;
    };
    let _g = shared();
    let alloc = new_alloc(&drv);
    let s = new_stream(&drv, DEV);
    let total = drv.mem_get_info(DEV).unwrap().total;
    let want = 2 * total;
    match alloc.malloc(DEV, want as usize, s.stream) {
        Err(Error::OutOfMemory(oom)) => {
            let text = Error::OutOfMemory(oom.clone()).to_string();
            eprintln!("{text}");
            for field in
                ["Currently allocated", "Requested", "Device limit", "Free (according to CUDA)"]
            {
                assert!(text.contains(field), "OOM report lacks {field:?}: {text}");
            }
            assert_eq!(oom.device, DEV);
            assert_eq!(oom.allocated, 0);
            assert_eq!(oom.requested, want);
            assert_eq!(oom.device_total, total);
            assert_eq!(oom.limit, u64::MAX);
            assert!(text.contains("unlimited"), "{text}");
        }
        other => panic!("expected OutOfMemory for 2 x total, got {other:?}"),
    }
    assert_eq!(alloc.used_bytes(DEV), 0, "the failed reservation was given back");
    assert!(matches!(alloc.malloc(DEV, 1usize << 60, s.stream), Err(Error::TooLarge { .. })));
    let p = alloc.malloc(DEV, 4 * MIB, s.stream).expect("allocation after a driver OOM");
    drv.memset_d8_async(DEV, p, 3, 4 * MIB, s.stream).unwrap();
    expect_bytes(&drv, s, p, 4 * MIB, 3, "allocation after a driver OOM");
    alloc.free(p).unwrap();
    assert_empty(&alloc);
    eprintln!("after the failed attempt: {:?}", alloc.device_stats(DEV).unwrap());
    alloc.empty_cache().unwrap();
    eprintln!("after empty_cache: {:?}", alloc.device_stats(DEV).unwrap());
    end_stream(&drv, s, &[&alloc]);
}

/// 6. empty_cache gives the pool's reserved memory back.
#[test]
fn gpu_empty_cache_lowers_reserved() {
    let Some(drv) = gpu() else {
        skipped!("SKIPPED gpu_empty_cache_lowers_reserved: no CUDA driver/GPU");
        return;
    };
    let _g = exclusive();
    const GIB: u64 = 1 << 30;
    let alloc = new_alloc(&drv);
    let s = new_stream(&drv, DEV);
    let pieces: Vec<DevicePtr> =
        (0..64).map(|_| alloc.malloc(DEV, 16 * MIB, s.stream).unwrap()).collect();
    for p in pieces {
        alloc.free(p).unwrap();
    }
    drv.stream_synchronize(s).unwrap();
    let full = alloc.device_stats(DEV).unwrap();
    eprintln!("after 1 GiB allocated and freed: {full:?}");
    assert!(full.reserved_current >= GIB, "release threshold u64::MAX keeps it: {full:?}");
    alloc.empty_cache().unwrap();
    let trimmed = alloc.device_stats(DEV).unwrap();
    eprintln!("after empty_cache: {trimmed:?}");
    assert!(trimmed.reserved_current < full.reserved_current);
    assert!(
        trimmed.reserved_current <= 32 * MIB as u64,
        "reserved after empty_cache: {} bytes",
        trimmed.reserved_current
    );
    assert_empty(&alloc);
    end_stream(&drv, s, &[&alloc]);
}

/// 7. device_stats reads the pool's attributes; reset_peak_stats resets the peaks.
#[test]
fn gpu_stats_match_pool_attributes() {
    let Some(drv) = gpu() else {
        skipped!("SKIPPED gpu_stats_match_pool_attributes: no CUDA driver/GPU");
        return;
    };
    let _g = exclusive();
    let alloc = new_alloc(&drv);
    assert_eq!(
        alloc.device_stats(DEV).unwrap(),
        Default::default(),
        "S11: a device this allocator has not used reads zeros"
    );
    let s = new_stream(&drv, DEV);
    let sizes = [MIB, 3 * MIB, 512, 64 * MIB];
    let blocks: Vec<DevicePtr> =
        sizes.iter().map(|&n| alloc.malloc(DEV, n, s.stream).unwrap()).collect();
    let big = alloc.malloc(DEV, 256 * MIB, s.stream).unwrap();
    alloc.free(big).unwrap();
    drv.stream_synchronize(s).unwrap();

    let check = |when: &str| {
        let st = alloc.device_stats(DEV).unwrap();
        let attr = |a| drv.pool_attribute(DEV, a).unwrap();
        let pool = (
            attr(PoolAttribute::ReservedMemCurrent),
            attr(PoolAttribute::ReservedMemHigh),
            attr(PoolAttribute::UsedMemCurrent),
            attr(PoolAttribute::UsedMemHigh),
        );
        eprintln!("{when}: {st:?}; pool attributes (reserved, high, used, high) {pool:?}");
        assert_eq!(
            (st.reserved_current, st.reserved_peak, st.used_current, st.used_peak),
            pool,
            "{when}"
        );
        assert_eq!(st.allocated_current, alloc.used_bytes(DEV), "{when}");
        st
    };
    let st = check("live blocks");
    let live: u64 = sizes.iter().map(|&n| n as u64).sum();
    assert_eq!(st.allocated_current, live);
    assert!(st.used_current >= live, "the pool hands out at least what we asked for");
    assert!(st.used_peak >= st.used_current + 256 * MIB as u64, "the 256 MiB block peaked");
    assert!(st.reserved_current >= st.used_current);

    alloc.reset_peak_stats(DEV).unwrap();
    let reset = check("after reset_peak_stats");
    for (peak, current, what) in [
        (reset.used_peak, reset.used_current, "used"),
        (reset.reserved_peak, reset.reserved_current, "reserved"),
    ] {
        assert!(peak == current || peak == 0, "{what} peak {peak} after reset, current {current}");
        eprintln!("{what} peak after reset: {}", if peak == current { "current" } else { "0" });
    }
    assert!(reset.used_peak < st.used_peak);

    let again = alloc.malloc(DEV, 8 * MIB, s.stream).unwrap();
    let grown = check("one more block");
    assert!(grown.used_peak >= grown.used_current);
    alloc.free(again).unwrap();
    for p in blocks {
        alloc.free(p).unwrap();
    }
    assert_empty(&alloc);
    end_stream(&drv, s, &[&alloc]);
}

/// 8. Bad input is a typed error, and the allocator keeps working after each.
#[test]
fn gpu_bad_input() {
    let Some(drv) = gpu() else {
        skipped!("SKIPPED gpu_bad_input: no CUDA driver/GPU");
        return;
    };
    let _g = shared();
    let alloc = new_alloc(&drv);
    let s = new_stream(&drv, DEV);
    let works = |what: &str| {
        let p = alloc.malloc(DEV, 4096, s.stream).unwrap_or_else(|e| panic!("after {what}: {e}"));
        drv.memset_d8_async(DEV, p, 9, 4096, s.stream).unwrap();
        expect_bytes(&drv, s, p, 4096, 9, what);
        alloc.free(p).unwrap_or_else(|e| panic!("after {what}: {e}"));
        assert_empty(&alloc);
    };
    works("nothing");

    let bogus = DevicePtr::from_raw(0xdead_0000);
    assert!(matches!(alloc.free(bogus), Err(Error::UnknownPointer { .. })));
    works("free of an unknown pointer");
    assert!(matches!(alloc.record_stream(bogus, s), Err(Error::UnknownPointer { .. })));
    assert!(matches!(alloc.base_allocation(bogus), Err(Error::UnknownPointer { .. })));
    works("record_stream of an unknown pointer");

    let p = alloc.malloc(DEV, 4096, s.stream).unwrap();
    assert_eq!(alloc.base_allocation(p).unwrap(), (p, 4096));
    alloc.free(p).unwrap();
    let e = alloc.free(p).unwrap_err();
    assert!(matches!(e, Error::DoubleFree { .. }), "{e:?}");
    eprintln!("double free: {e}");
    works("double free");

    let n = alloc.device_count();
    let e = alloc.malloc(n, 4096, s.stream).unwrap_err();
    assert!(matches!(e, Error::InvalidDevice { .. }), "{e:?}");
    eprintln!("device past the count: {e}");
    assert!(matches!(alloc.set_memory_fraction(0.5, n), Err(Error::InvalidDevice { .. })));
    assert!(matches!(alloc.device_stats(n), Err(Error::InvalidDevice { .. })));
    works("a device past the count");

    assert!(matches!(alloc.end_capture(DEV, s.stream), Err(Error::NoCaptureUnderway)));
    alloc.begin_capture(DEV).unwrap();
    assert!(matches!(alloc.begin_capture(DEV), Err(Error::CaptureAlreadyUnderway)));
    alloc.end_capture(DEV, s.stream).unwrap();
    works("capture misuse");

    assert_eq!(alloc.malloc(DEV, 0, s.stream).unwrap(), DevicePtr::NULL);
    alloc.free(DevicePtr::NULL).unwrap();
    alloc.record_stream(DevicePtr::NULL, s).unwrap();
    works("null pointer and zero size");
    end_stream(&drv, s, &[&alloc]);
}

/// 8b. A stream handle that is not a stream. Safe code can only make a simulated
///     handle (`Stream::simulated`), which the CUDA backend refuses without giving it
///     to the driver: a typed error, at malloc and at record_stream, and the allocator
///     keeps working. (A fabricated real-looking handle needs `unsafe`
///     `Stream::from_raw`, whose contract such a test would break.)
#[test]
fn gpu_bad_stream_handle() {
    let Some(drv) = gpu() else {
        skipped!("SKIPPED gpu_bad_stream_handle: no CUDA driver/GPU");
        return;
    };
    let _g = shared();
    let alloc = new_alloc(&drv);
    let s = new_stream(&drv, DEV);
    let p = alloc.malloc(DEV, 4096, s.stream).unwrap(); // initializes the device
    let bogus = Stream::simulated(0x1234);
    match alloc.malloc(DEV, 4096, bogus) {
        Err(Error::Driver(e)) => assert_eq!(e.code, CUDA_ERROR_INVALID_HANDLE, "{e}"),
        Err(e) => panic!("malloc on a bogus stream: expected a driver error, got {e:?}"),
        Ok(q) => panic!("malloc on a bogus stream returned {q}"),
    }
    match alloc.record_stream(p, UsageStream::new(bogus, DEV)) {
        Err(Error::InvalidStream { .. }) => {}
        other => panic!("record_stream on a bogus stream: {other:?}"),
    }
    assert_eq!(alloc.used_bytes(DEV), 4096, "the failed reservation was given back");
    alloc.free(p).unwrap();
    let p = alloc.malloc(DEV, 4096, s.stream).expect("malloc after a bogus stream");
    alloc.free(p).unwrap();
    assert_empty(&alloc);
    end_stream(&drv, s, &[&alloc]);
}

/// 9. S2 on real hardware: the first malloc configures the default pool.
#[test]
fn gpu_s2_pool_configuration() {
    let Some(drv) = gpu() else {
        skipped!("SKIPPED gpu_s2_pool_configuration: no CUDA driver/GPU");
        return;
    };
    let _g = exclusive(); // changes pool attributes that every test relies on
    const FLAGS: [PoolAttribute; 3] = [
        PoolAttribute::ReuseFollowEventDependencies,
        PoolAttribute::ReuseAllowOpportunistic,
        PoolAttribute::ReuseAllowInternalDependencies,
    ];
    // Unset them first, so the test sees this allocator's initialization.
    drv.set_pool_attribute(DEV, PoolAttribute::ReleaseThreshold, 0).unwrap();
    for f in FLAGS {
        drv.set_pool_attribute(DEV, f, 0).unwrap();
    }
    assert_eq!(drv.pool_attribute(DEV, PoolAttribute::ReleaseThreshold).unwrap(), 0);
    let alloc = new_alloc(&drv);
    assert_eq!(alloc.memory_limit(DEV), u64::MAX);
    let s = new_stream(&drv, DEV);
    let p = alloc.malloc(DEV, MIB, s.stream).unwrap();
    let threshold = drv.pool_attribute(DEV, PoolAttribute::ReleaseThreshold).unwrap();
    assert_eq!(threshold, u64::MAX, "release threshold");
    for f in FLAGS {
        assert_eq!(drv.pool_attribute(DEV, f).unwrap(), 1, "{f:?}");
    }
    assert_eq!(alloc.used_bytes(DEV), MIB as u64);
    assert_eq!(alloc.memory_limit(DEV), u64::MAX);
    alloc.free(p).unwrap();
    assert_empty(&alloc);
    end_stream(&drv, s, &[&alloc]);
}

/// 10. Two devices: a block of device 0 read by a stream of device 1 (record_stream
///     across devices, S24), and copies across devices with and without p2p.
#[test]
fn gpu_multi_device() {
    let Some(drv) = gpu() else {
        skipped!("SKIPPED gpu_multi_device: no CUDA driver/GPU");
        return;
    };
    let n = drv.device_count().unwrap();
    if n < 2 {
        skipped!("SKIPPED gpu_multi_device: needs 2 GPUs, found {n}");
        return;
    }
    let _g = shared();
    const SIZE: usize = 4 * MIB;
    let alloc = new_alloc(&drv);
    let (s0, s1) = (new_stream(&drv, 0), new_stream(&drv, 1));
    let p2p = match alloc.enable_peer_access(1, 0) {
        Ok(()) => true,
        Err(e) => {
            eprintln!("enable_peer_access(1, 0) failed ({e}): p2p part skipped");
            false
        }
    };
    for use_p2p in [true, false] {
        if use_p2p && !p2p {
            continue;
        }
        let byte = if use_p2p { 0x71 } else { 0x72 };
        let x = alloc.malloc(0, SIZE, s0.stream).unwrap();
        let y = alloc.malloc(1, SIZE, s1.stream).unwrap();
        drv.memset_d8_async(0, x, byte, SIZE, s0.stream).unwrap();
        drv.sync_streams(s0, s1).unwrap();
        drv.stream_sleep(s1, 100).unwrap();
        alloc.memcpy_async(y, 1, x, 0, SIZE, s1, use_p2p).unwrap();
        alloc.record_stream(x, s1).unwrap();
        alloc.free(x).unwrap(); // device 1 is still asleep
        let reuse = alloc.malloc(0, SIZE, s0.stream).unwrap();
        drv.memset_d8_async(0, reuse, 0xee, SIZE, s0.stream).unwrap();
        expect_bytes(&drv, s1, y, SIZE, byte, &format!("device 1 copy (p2p {use_p2p})"));
        alloc.free(reuse).unwrap();
        alloc.free(y).unwrap();
        assert_books(&alloc, 0);
        assert_books(&alloc, 1);
        eprintln!("cross-device copy, p2p {use_p2p}: ok");
    }
    assert_empty(&alloc);
    end_stream(&drv, s0, &[&alloc]);
    end_stream(&drv, s1, &[&alloc]);
}

/// The observable outcome of [`parity_scenario`], with addresses and stream handles
/// replaced by names so two allocators can be compared.
fn parity_scenario(
    alloc: &dyn StreamOrderedAllocator,
    drv: &Drv,
    s: [UsageStream; 3],
) -> Vec<String> {
    let [s1, s2, cap] = s;
    let name = |st: UsageStream| match st {
        _ if st == s1 => "s1",
        _ if st == s2 => "s2",
        _ if st == cap => "cap",
        _ => "other",
    };
    let err = |r: Result<(), Error>| match r {
        Ok(()) => "ok".to_string(),
        Err(e) => format!("{e:?}").split([' ', '(', '{']).next().unwrap_or("").to_string(),
    };
    // A trimmed pool for each run: an earlier out-of-memory attempt can leave the pool
    // holding most of the card, which the captured graph's own memory would lack.
    drv.device_synchronize(DEV).unwrap();
    drv.pool_trim_to(DEV, 0).unwrap();
    let mut trace = Vec::new();
    let mut note = |alloc: &dyn StreamOrderedAllocator, what: &str, r: String| {
        let mut snap: Vec<String> = alloc
            .snapshot()
            .iter()
            .map(|b| {
                let rec: Vec<&str> = b.recorded_streams.iter().map(|&u| name(u)).collect();
                format!(
                    "{}@{} rec{rec:?} cap{} def{}",
                    b.size,
                    name(b.creation_stream),
                    b.captured,
                    b.free_deferred
                )
            })
            .collect();
        snap.sort();
        trace.push(format!("{what}: {r}; used {}; {snap:?}", alloc.used_bytes(DEV)));
    };
    let x = alloc.malloc(DEV, MIB, s1.stream).unwrap();
    drv.memset_d8_async(DEV, x, 0x11, MIB, s1.stream).unwrap();
    expect_bytes(drv, s1, x, MIB, 0x11, "parity X");
    note(alloc, "malloc X", "ok".into());
    note(alloc, "record X on creation", err(alloc.record_stream(x, s1)));
    note(alloc, "record X on s2", err(alloc.record_stream(x, s2)));
    note(alloc, "record X on s2 again", err(alloc.record_stream(x, s2)));
    let y = alloc.malloc(DEV, 2 * MIB, s2.stream).unwrap();
    note(alloc, "malloc Y", "ok".into());

    note(alloc, "begin capture", err(alloc.begin_capture(DEV)));
    drv.begin_capture(cap, CaptureMode::ThreadLocal).unwrap();
    let z = alloc.malloc(DEV, 3 * MIB, cap.stream).unwrap();
    note(alloc, "malloc Z in capture", "ok".into());
    note(alloc, "free X in capture", err(alloc.free(x)));
    note(alloc, "free X again", err(alloc.free(x)));
    note(alloc, "record X after deferral", err(alloc.record_stream(x, cap)));
    note(alloc, "free Z in capture", err(alloc.free(z)));
    note(alloc, "begin capture twice", err(alloc.begin_capture(DEV)));
    note(alloc, "end capture", err(alloc.end_capture(DEV, cap.stream)));
    let graph = drv.end_capture(cap);
    note(alloc, "graph", err(graph.as_ref().map(|_| ()).map_err(|e| Error::from(e.clone()))));
    if let Ok(g) = graph {
        drv.graph_launch(&g, cap).unwrap();
        drv.stream_synchronize(cap).unwrap();
        drv.graph_destroy(g).unwrap();
    }

    note(alloc, "free Y", err(alloc.free(y)));
    let w = alloc.malloc(DEV, 4096, s1.stream).unwrap();
    note(alloc, "malloc W flushes X", "ok".into());
    note(alloc, "free unknown", err(alloc.free(DevicePtr::from_raw(0xdead_0000))));
    note(alloc, "free W", err(alloc.free(w)));
    let twice_the_card = 2 * drv.mem_get_info(DEV).unwrap().total as usize;
    let huge = alloc.malloc(DEV, twice_the_card, s1.stream);
    note(alloc, "malloc 2 x total", err(huge.map(|_| ())));
    note(alloc, "malloc 1 EiB", err(alloc.malloc(DEV, 1 << 60, s1.stream).map(|_| ())));
    trace
}

/// 11. The seed replica and the lock-free allocator agree on real hardware.
#[test]
fn gpu_seed_replica_parity() {
    let Some(drv) = gpu() else {
        skipped!("SKIPPED gpu_seed_replica_parity: no CUDA driver/GPU");
        return;
    };
    let _g = shared();
    // Earlier tests may leave the pool holding most of the card (release threshold
    // u64::MAX keeps what cache_info's trial allocations reserved): the captured graph
    // below needs device memory of its own.
    drv.device_synchronize(DEV).unwrap();
    drv.pool_trim_to(DEV, 0).unwrap();
    let streams = [new_stream(&drv, DEV), new_stream(&drv, DEV), new_stream(&drv, DEV)];
    let core = new_alloc(&drv);
    let replica = SeedReplica::new(drv.clone()).unwrap();
    let a = parity_scenario(&core, &drv, streams);
    let b = parity_scenario(&replica, &drv, streams);
    for line in &a {
        eprintln!("  {line}");
    }
    assert_eq!(a, b, "core vs seed replica on {}", drv.device_name(DEV).unwrap_or_default());
    assert_eq!(core.warnings(), replica.warnings(), "warning counts");
    assert_empty(&core);
    assert_empty(&replica);
    for s in streams {
        end_stream(&drv, s, &[&core, &replica]);
    }
}

/// Stress: 8 threads x 20k operations (alloc, free, record_stream onto other threads'
/// streams) on the GPU; the books end at zero.
#[test]
fn gpu_threaded_stress() {
    let Some(drv) = gpu() else {
        skipped!("SKIPPED gpu_threaded_stress: no CUDA driver/GPU");
        return;
    };
    let _g = shared();
    const THREADS: usize = 8;
    const OPS: usize = 20_000;
    const RING: usize = 16;
    let alloc = new_alloc(&drv);
    let streams: Vec<UsageStream> = (0..THREADS).map(|_| new_stream(&drv, DEV)).collect();
    let t0 = Instant::now();
    std::thread::scope(|scope| {
        for t in 0..THREADS {
            let (alloc, streams) = (&alloc, &streams);
            scope.spawn(move || {
                let mine = streams[t];
                let mut rng = Lcg(0xabcdef ^ t as u64);
                let mut live: Vec<DevicePtr> = Vec::with_capacity(RING);
                for _ in 0..OPS {
                    match rng.below(8) {
                        0..=3 if live.len() < RING => {
                            live.push(alloc.malloc(DEV, rng.size(), mine.stream).unwrap());
                        }
                        0..=5 if !live.is_empty() => {
                            let i = rng.below(live.len() as u64) as usize;
                            alloc.free(live.swap_remove(i)).unwrap();
                        }
                        _ if !live.is_empty() => {
                            let i = rng.below(live.len() as u64) as usize;
                            let other = streams[rng.below(THREADS as u64) as usize];
                            alloc.record_stream(live[i], other).unwrap();
                        }
                        _ => live.push(alloc.malloc(DEV, rng.size(), mine.stream).unwrap()),
                    }
                }
                for p in live {
                    alloc.free(p).unwrap();
                }
            });
        }
    });
    let elapsed = t0.elapsed();
    assert_empty(&alloc);
    for s in streams {
        end_stream(&drv, s, &[&alloc]);
    }
    eprintln!(
        "stress: {THREADS} threads x {OPS} ops in {elapsed:?} ({:.0} ops/s); {:?}",
        (THREADS * OPS) as f64 / elapsed.as_secs_f64(),
        alloc.warnings()
    );
}

/// `scale_add(out, in, a, n)`: `out[i] = a * in[i] + 1` (the example's kernel).
const SCALE_ADD_PTX: &str = include_str!("../examples/scale_add.ptx");

/// cudarc interop: a kernel launched through cudarc's launch builder on pooled slices,
/// the input made and filled on a producer stream and used on a consumer stream (its use
/// recorded), then used again on its own stream (which waits for the consumer's kernel),
/// the results read back; the slices dropped on another thread.
#[test]
fn gpu_cudarc_kernel_on_pooled_block() {
    use cudarc::driver::{CudaContext, LaunchConfig, PushKernelArg};
    use streamalloc::interop::PooledSlice;
    let Some(drv) = gpu() else {
        skipped!("SKIPPED gpu_cudarc_kernel_on_pooled_block: no CUDA driver/GPU");
        return;
    };
    let _g = shared();
    let ctx = CudaContext::new(DEV).expect("cudarc context (primary, as the allocator's)");
    let module = ctx.load_module(cudarc::nvrtc::Ptx::from_src(SCALE_ADD_PTX)).expect("load PTX");
    let f = module.load_function("scale_add").expect("scale_add");
    let (producer, consumer) = (ctx.new_stream().unwrap(), ctx.new_stream().unwrap());
    let alloc: Arc<dyn StreamOrderedAllocator> = Arc::new(new_alloc(&drv));

    let n: usize = (3 << 20) / 4 + 17; // an odd element count
    let len = n as u32;
    let host: Vec<f32> = (0..n).map(|i| (i % 977) as f32).collect();
    let mut input = PooledSlice::<f32>::alloc(&alloc, &producer, n).unwrap();
    producer.memcpy_htod(&host, &mut input).unwrap();
    let mut mid = PooledSlice::<f32>::alloc(&alloc, &consumer, n).unwrap();
    let mut out = PooledSlice::<f32>::alloc(&alloc, &producer, n).unwrap();
    {
        // On the consumer: mid = 2 * input + 1 (input is foreign there).
        let input_arg = input.on(&consumer);
        let mut b = consumer.launch_builder(&f);
        b.arg(&mut mid).arg(&input_arg).arg(&2.0f32).arg(&len);
        // Safety: (float*, const float*, float, unsigned); both hold n floats.
        unsafe { b.launch(LaunchConfig::for_num_elems(len)) }.expect("launch on consumer");
    }
    let snap = alloc.snapshot();
    let entry = snap.iter().find(|b| b.ptr == input.ptr()).expect("input in the snapshot");
    assert_eq!(entry.recorded_streams, vec![UsageStream::from(&*consumer)]);
    {
        // Back on the producer: out = 3 * mid + 1 (mid is foreign there; the producer
        // waits for the consumer's kernel), then input is overwritten on its own stream,
        // which must first wait for the consumer's read of it.
        let mid_arg = mid.on(&producer);
        let mut b = producer.launch_builder(&f);
        b.arg(&mut out).arg(&mid_arg).arg(&3.0f32).arg(&len);
        // Safety: as above.
        unsafe { b.launch(LaunchConfig::for_num_elems(len)) }.expect("launch on producer");
    }
    producer.memcpy_htod(&vec![-1.0f32; n], &mut input).unwrap();
    let got = producer.clone_dtoh(&out).unwrap();
    let bad = (0..n).filter(|&i| got[i] != 3.0 * (2.0 * host[i] + 1.0) + 1.0).count();
    assert_eq!(bad, 0, "{bad} of {n} results wrong (first: {:?})", got.first());
    let mid_back = consumer.clone_dtoh(&mid).unwrap();
    assert!((0..n).all(|i| mid_back[i] == 2.0 * host[i] + 1.0));
    assert_eq!(alloc.used_bytes(DEV), 3 * 4 * n as u64);
    // Owned: the slices move to another thread and are freed there.
    std::thread::spawn(move || drop((input, mid, out))).join().unwrap();
    assert_eq!(alloc.used_bytes(DEV), 0);
    producer.synchronize().unwrap();
    consumer.synchronize().unwrap();
    ctx.check_err().expect("no error recorded in the cudarc context");
    eprintln!("gpu_cudarc_kernel_on_pooled_block: {n} floats through two kernels, all correct");
}
