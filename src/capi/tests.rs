//! The C ABI on the simulated device: two devices of 1 GiB, installed as the global
//! allocator before any test touches it (tests run in parallel in one process, so each
//! keeps to its own pointers and checks only what others cannot change).

use super::*;
use std::ffi::CStr;

// The unsafe entry points, for these tests: they run on the simulated backend, whose
// stream handles are numbers it looks up (garbage and destroyed ones are refused there),
// and the handlers they install are plain functions that live for the process. Local
// items shadow the glob import above.

fn streamalloc_alloc(size: usize, device: c_int, stream: CudaStream) -> *mut c_void {
    // Safety: see above.
    unsafe { super::streamalloc_alloc(size, device, stream) }
}

fn pool_alloc(device: c_int, id0: u64, id1: u64, size: usize, stream: CudaStream) -> *mut c_void {
    // Safety: see above.
    unsafe { pools::streamalloc_pool_alloc(device, id0, id1, size, stream) }
}

fn streamalloc_record_stream(ptr: *mut c_void, stream: CudaStream) {
    // Safety: see above.
    unsafe { super::streamalloc_record_stream(ptr, stream) }
}

fn streamalloc_record_stream_on(ptr: *mut c_void, stream: CudaStream, device: c_int) -> c_int {
    // Safety: see above.
    unsafe { super::streamalloc_record_stream_on(ptr, stream, device) }
}

fn streamalloc_end_capture(device: c_int, stream: CudaStream) -> c_int {
    // Safety: see above.
    unsafe { super::streamalloc_end_capture(device, stream) }
}

fn streamalloc_attach_oom_observer(
    observer: history::StreamallocOomObserver,
    user: *mut c_void,
) -> c_int {
    // Safety: see above.
    unsafe { history::streamalloc_attach_oom_observer(observer, user) }
}

fn streamalloc_set_warning_handler(handler: Option<WarningHandler>, user: *mut c_void) -> c_int {
    // Safety: see above.
    unsafe { warnings::streamalloc_set_warning_handler(handler, user) }
}

const GIB: u64 = 1 << 30;

/// The global allocator's simulated device, with this test's turn: the tests share the
/// process-wide allocator (and its statistics and last-error slots), so they run one at a
/// time.
struct Setup {
    sim: &'static Arc<SimDriver>,
    _turn: std::sync::MutexGuard<'static, ()>,
}

impl std::ops::Deref for Setup {
    type Target = Arc<SimDriver>;
    fn deref(&self) -> &Arc<SimDriver> {
        self.sim
    }
}

fn setup() -> Setup {
    static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let turn = TURN.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    Setup { sim: sim(), _turn: turn }
}

fn sim() -> &'static Arc<SimDriver> {
    static SIM: OnceLock<Arc<SimDriver>> = OnceLock::new();
    SIM.get_or_init(|| {
        let sim = Arc::new(SimDriver::with_devices(2, GIB));
        let driver: Arc<dyn Driver> = sim.clone();
        let global = Global::new(driver, c"sim", 0, crate::CacheConfig::default());
        assert!(install_global(global), "a global existed");
        sim
    })
}

fn last_error() -> (c_int, String) {
    let mut buf = vec![0 as c_char; 1024];
    // Safety: buf holds 1024 bytes.
    let code = unsafe { streamalloc_last_error(buf.as_mut_ptr(), buf.len()) };
    // Safety: streamalloc_last_error NUL-terminates within the buffer.
    let msg = unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned();
    (code, msg)
}

#[test]
fn alloc_free_round_trip() {
    let sim = setup();
    for device in 0..2 {
        let side = sim.new_stream(device as Device).unwrap();
        let p = streamalloc_alloc(4096, device, std::ptr::null_mut());
        assert!(!p.is_null(), "{:?}", last_error());
        assert_eq!(streamalloc_last_error_code(), 0);
        let mut size = 0usize;
        // Safety: size is a valid usize.
        let base = unsafe { streamalloc_base_alloc(p, &mut size) };
        assert_eq!((base, size), (p, 4096));
        streamalloc_record_stream(p, side.as_raw() as CudaStream);
        assert_eq!(streamalloc_last_error_code(), 0, "{:?}", last_error());
        streamalloc_free(p, 4096, device, std::ptr::null_mut());
        assert_eq!(streamalloc_last_error_code(), 0, "{:?}", last_error());
    }
    assert_eq!(streamalloc_empty_cache(), 0);
}

#[test]
fn backend_is_sim() {
    let _turn = setup();
    // Safety: the returned pointer is a static NUL-terminated string.
    let name = unsafe { CStr::from_ptr(streamalloc_backend()) };
    assert_eq!(name, c"sim");
}

#[test]
fn bad_device_is_an_error_not_a_crash() {
    let _turn = setup();
    for bad in [-1, 2, c_int::MIN, c_int::MAX] {
        let p = streamalloc_alloc(64, bad, std::ptr::null_mut());
        assert!(p.is_null());
        let (code, msg) = last_error();
        assert_eq!(code, ErrorCode::InvalidArgument as c_int);
        assert!(msg.contains(&format!("invalid device index {bad}")), "{msg}");
        assert_eq!(streamalloc_reset_peak_stats(bad), ErrorCode::InvalidArgument as c_int);
        assert_eq!(streamalloc_begin_capture(bad), ErrorCode::InvalidArgument as c_int);
        assert_eq!(streamalloc_cache_info(bad), 0);
    }
    // The allocator keeps working.
    let p = streamalloc_alloc(64, 0, std::ptr::null_mut());
    assert!(!p.is_null());
    streamalloc_free(p, 64, 0, std::ptr::null_mut());
    assert_eq!(streamalloc_last_error_code(), 0);
}

#[test]
fn unknown_pointer_and_double_free_record_errors() {
    let _turn = setup();
    streamalloc_free(0xdead_0000 as *mut c_void, 16, 0, std::ptr::null_mut());
    let (code, msg) = last_error();
    assert_eq!(code, ErrorCode::InvalidArgument as c_int);
    assert!(msg.contains("was not allocated by this allocator"), "{msg}");

    let p = streamalloc_alloc(256, 1, std::ptr::null_mut());
    assert!(!p.is_null());
    streamalloc_free(p, 256, 1, std::ptr::null_mut());
    assert_eq!(streamalloc_last_error_code(), 0);
    streamalloc_free(p, 256, 1, std::ptr::null_mut());
    assert_eq!(streamalloc_last_error_code(), ErrorCode::InvalidArgument as c_int);

    // Safety: a null size pointer is allowed.
    let base = unsafe { streamalloc_base_alloc(0xbeef_0000 as *mut c_void, std::ptr::null_mut()) };
    assert!(base.is_null());
    assert_eq!(streamalloc_last_error_code(), ErrorCode::InvalidArgument as c_int);
    streamalloc_record_stream(0xbeef_0000 as *mut c_void, std::ptr::null_mut());
    assert_eq!(streamalloc_last_error_code(), ErrorCode::InvalidArgument as c_int);
    // Null pointers are no-ops.
    streamalloc_free(std::ptr::null_mut(), 0, 0, std::ptr::null_mut());
    assert_eq!(streamalloc_last_error_code(), 0);
}

#[test]
fn zero_size_is_null_without_error() {
    let _turn = setup();
    let p = streamalloc_alloc(0, 0, std::ptr::null_mut());
    assert!(p.is_null());
    assert_eq!(last_error(), (0, String::new()));
}

#[test]
fn oom_sets_code_1_with_the_seed_message() {
    let _turn = setup();
    let p = streamalloc_alloc(2 * GIB as usize, 0, std::ptr::null_mut());
    assert!(p.is_null());
    let (code, msg) = last_error();
    assert_eq!(code, ErrorCode::OutOfMemory as c_int);
    for field in [
        "Allocation on device 0 would exceed allowed memory. (out of memory)",
        "Currently allocated     : ",
        "Requested               : 2.00 GiB",
        "Device limit            : 1024.00 MiB",
        "Free (according to CUDA): ",
        "user-supplied memory fraction",
    ] {
        assert!(msg.contains(field), "missing {field:?} in {msg}");
    }
    // 1 EiB or more is refused outright.
    assert!(streamalloc_alloc(1 << 60, 0, std::ptr::null_mut()).is_null());
    assert_eq!(streamalloc_last_error_code(), ErrorCode::OutOfMemory as c_int);
    // And the allocator keeps working.
    let p = streamalloc_alloc(1 << 20, 0, std::ptr::null_mut());
    assert!(!p.is_null());
    streamalloc_free(p, 1 << 20, 0, std::ptr::null_mut());
    assert_eq!(streamalloc_last_error_code(), 0);
}

#[test]
fn bad_memory_fraction_is_an_error() {
    let _turn = setup();
    for f in [-0.5, 1.5, f64::NAN] {
        streamalloc_set_memory_fraction(f, 1);
        assert_eq!(streamalloc_last_error_code(), ErrorCode::InvalidArgument as c_int);
    }
    streamalloc_set_memory_fraction(1.0, 1);
    assert_eq!(streamalloc_last_error_code(), 0);
}

#[test]
fn stats_are_filled() {
    let _turn = setup();
    let p = streamalloc_alloc(3 << 20, 1, std::ptr::null_mut());
    assert!(!p.is_null());
    let mut s = StreamallocStats::default();
    // Safety: s is a valid StreamallocStats.
    assert_eq!(unsafe { streamalloc_device_stats(1, &mut s) }, 0);
    assert!(s.allocated_current >= 3 << 20, "{s:?}");
    assert!(s.used_current >= 3 << 20 && s.used_peak >= s.used_current, "{s:?}");
    assert!(s.reserved_current >= s.used_current && s.reserved_peak >= 3 << 20, "{s:?}");
    assert_eq!(streamalloc_reset_peak_stats(1), 0);
    streamalloc_free(p, 3 << 20, 1, std::ptr::null_mut());
    assert!(streamalloc_cache_info(1) > 0);
}

#[test]
fn null_out_pointer_and_panics_never_cross() {
    let _turn = setup();
    // Safety: a null out pointer must be reported, not written.
    let code = unsafe { streamalloc_device_stats(0, std::ptr::null_mut()) };
    assert_eq!(code, ErrorCode::InvalidArgument as c_int);
    // Safety: a null buffer only returns the code.
    assert_eq!(unsafe { streamalloc_last_error(std::ptr::null_mut(), 0) }, code);

    let v: c_int = boundary(-7, || panic!("boom"));
    assert_eq!(v, -7);
    let (code, msg) = last_error();
    assert_eq!(code, ErrorCode::Panic as c_int);
    assert!(msg.contains("boom"), "{msg}");
}

#[test]
fn last_error_truncates_to_the_buffer() {
    let _turn = setup();
    streamalloc_free(0xdead_0000 as *mut c_void, 16, 0, std::ptr::null_mut());
    let mut buf = [0x7f as c_char; 8];
    // Safety: buf holds 8 bytes.
    let code = unsafe { streamalloc_last_error(buf.as_mut_ptr(), buf.len()) };
    assert_eq!(code, ErrorCode::InvalidArgument as c_int);
    // Safety: NUL-terminated within the buffer.
    assert_eq!(unsafe { CStr::from_ptr(buf.as_ptr()) }.to_bytes(), b"pointer");
}

#[test]
fn capture_misuse_and_capture_round_trip() {
    let _turn = setup();
    // Ending with no capture underway is misuse (another test could be mid-capture only
    // here, and this is the only capture test).
    assert_eq!(streamalloc_end_capture(0, std::ptr::null_mut()), ErrorCode::Capture as c_int);
    assert_eq!(streamalloc_begin_capture(0), 0);
    assert_eq!(streamalloc_begin_capture(0), ErrorCode::Capture as c_int);
    assert_eq!(streamalloc_end_capture(0, std::ptr::null_mut()), 0);
}

#[test]
fn init_before_first_use_is_accepted() {
    streamalloc_init(2);
    assert_eq!(streamalloc_last_error_code(), 0);
    streamalloc_init(-1);
    assert_eq!(streamalloc_last_error_code(), ErrorCode::InvalidArgument as c_int);
}

// ----- history, OOM observers, snapshots (src/capi/history.rs) -----

#[test]
fn history_and_snapshot_through_the_c_abi() {
    use super::history::*;
    let sim = setup();
    // A stream of our own: other tests run in parallel on the same global allocator.
    let s = sim.new_stream(1).unwrap().as_raw() as CudaStream;
    assert_eq!(streamalloc_record_history(1, 1 << 16, 0, 0), 0, "{:?}", last_error());
    assert_eq!(streamalloc_history_enabled(), 1);
    streamalloc_history_set_context(42);
    let p = streamalloc_alloc(12345, 1, s);
    streamalloc_history_set_context(0);
    assert!(!p.is_null(), "{:?}", last_error());
    // Safety: cap 0 with a NULL buffer only counts.
    let n = unsafe { streamalloc_snapshot_blocks(std::ptr::null_mut(), 0) };
    let mut blocks = vec![StreamallocBlock::default(); n + 64];
    // Safety: blocks holds blocks.len() entries.
    let n = unsafe { streamalloc_snapshot_blocks(blocks.as_mut_ptr(), blocks.len()) };
    let mine = blocks[..n.min(blocks.len())].iter().find(|b| b.ptr == p as u64).copied();
    let mine = mine.expect("the live block is listed");
    assert_eq!((mine.requested, mine.device, mine.state, mine.stream), (12345, 1, 0, s as u64));
    streamalloc_free(p, 12345, 1, s);
    let mut entries = vec![StreamallocHistoryEntry::default(); 1 << 16];
    // Safety: entries holds entries.len() entries.
    let n = unsafe { streamalloc_history(entries.as_mut_ptr(), entries.len()) };
    let mine: Vec<_> =
        entries[..n.min(entries.len())].iter().filter(|e| e.stream == s as u64).copied().collect();
    let actions: Vec<u32> =
        mine.iter().filter(|e| e.addr == p as u64 && e.action <= 2).map(|e| e.action).collect();
    assert_eq!(actions, vec![0, 1, 2], "alloc, free_requested, free_completed");
    let alloc_entry = mine.iter().find(|e| e.action == 0).unwrap();
    assert_eq!((alloc_entry.size, alloc_entry.device, alloc_entry.context), (12345, 1, 42));
    // Safety: a NULL buffer with cap > 0 is refused, not written.
    assert_eq!(unsafe { streamalloc_history(std::ptr::null_mut(), 4) }, 0);
    assert_eq!(streamalloc_last_error_code(), ErrorCode::InvalidArgument as c_int);
}

#[test]
fn oom_observer_through_the_c_abi() {
    use std::sync::Mutex;
    /// (device, requested, total, free, user) of each call.
    type Call = (c_int, usize, usize, usize, usize);
    static SEEN: Mutex<Vec<Call>> = Mutex::new(Vec::new());
    unsafe extern "C" fn observer(d: c_int, req: usize, total: usize, free: usize, u: *mut c_void) {
        SEEN.lock().unwrap().push((d, req, total, free, u as usize));
    }
    let _turn = setup();
    assert_eq!(streamalloc_attach_oom_observer(None, std::ptr::null_mut()), 2);
    let r = streamalloc_attach_oom_observer(Some(observer), 0x5eed as *mut c_void);
    assert_eq!(r, 0, "{:?}", last_error());
    // A request no 1 GiB device can serve, of a size no other test uses.
    let want = 3 * GIB as usize + 4321;
    let p = streamalloc_alloc(want, 0, std::ptr::null_mut());
    assert!(p.is_null());
    assert_eq!(streamalloc_last_error_code(), ErrorCode::OutOfMemory as c_int);
    let seen = SEEN.lock().unwrap().clone();
    let hit = seen.iter().find(|o| o.1 == want).expect("the observer saw this OOM");
    assert_eq!((hit.0, hit.4), (0, 0x5eed));
    assert!(hit.2 as u64 <= GIB && hit.3 as u64 <= GIB, "total and free of the device: {hit:?}");
}

/// Issue 13, defect 1 through the C ABI: a stream that does not exist, a destroyed one,
/// another device's stream named as this device's, and a device that does not exist
/// are refused at record_stream (invalid argument), and the block is still freed.
#[test]
fn record_stream_refuses_unusable_streams() {
    let sim = setup();
    let garbage = Stream::simulated(0xdead_0000).as_raw() as CudaStream;
    let on1 = sim.new_stream(1).unwrap();
    let gone = sim.new_stream(0).unwrap();
    sim.destroy_stream(UsageStream::new(gone, 0)).unwrap();
    let gone = gone.as_raw() as CudaStream;
    let on1_raw = on1.as_raw() as CudaStream;
    let p = streamalloc_alloc(4096, 0, std::ptr::null_mut());
    assert!(!p.is_null(), "{:?}", last_error());
    let invalid = ErrorCode::InvalidArgument as c_int;
    for (stream, device) in [(garbage, 0), (gone, 0), (on1_raw, 0), (std::ptr::null_mut(), 2)] {
        assert_eq!(streamalloc_record_stream_on(p, stream, device), invalid, "{stream:?} {device}");
    }
    // The plain hook takes the pointer's device (0): device 1's stream is refused.
    for stream in [garbage, gone, on1_raw] {
        streamalloc_record_stream(p, stream);
        assert_eq!(streamalloc_last_error_code(), invalid, "{stream:?}: {:?}", last_error());
    }
    assert_eq!(streamalloc_record_stream_on(p, on1_raw, 1), 0, "{:?}", last_error());
    streamalloc_free(p, 4096, 0, std::ptr::null_mut());
    assert_eq!(streamalloc_last_error_code(), 0, "{:?}", last_error());
}

// ----- issue 13 items 5, 6, 7 -----

#[test]
fn plain_record_stream_finds_the_device_without_a_scan() {
    // The plain hook used to snapshot and sort every live block per call when there was
    // more than one device; it now costs one lookup, like the `_on` variant.
    let sim = setup();
    let side = sim.new_stream(1).unwrap().as_raw() as CudaStream;
    let blocks: Vec<*mut c_void> =
        (0..10_000).map(|_| streamalloc_alloc(512, 1, std::ptr::null_mut())).collect();
    assert!(blocks.iter().all(|p| !p.is_null()), "{:?}", last_error());
    let p = blocks[blocks.len() / 2];
    let time = |f: &dyn Fn()| {
        let t = std::time::Instant::now();
        for _ in 0..300 {
            f();
        }
        t.elapsed()
    };
    let on = time(&|| assert_eq!(streamalloc_record_stream_on(p, side, 1), 0));
    let plain = time(&|| {
        streamalloc_record_stream(p, side);
        assert_eq!(streamalloc_last_error_code(), 0, "{:?}", last_error());
    });
    for &b in &blocks {
        streamalloc_free(b, 512, 1, std::ptr::null_mut());
        assert_eq!(streamalloc_last_error_code(), 0, "{:?}", last_error());
    }
    let bound = on * 20 + std::time::Duration::from_millis(50);
    assert!(plain < bound, "plain record_stream {plain:?} vs record_stream_on {on:?}");
}

#[cfg(target_os = "linux")]
#[test]
fn failures_in_a_pthread_key_destructor_are_reported() {
    // glibc runs pthread key destructors after the thread's Rust thread-locals are
    // destroyed: the last error's slot is gone, yet failures must still be reported.
    use std::ffi::c_uint;
    unsafe extern "C" {
        fn pthread_key_create(
            key: *mut c_uint,
            destructor: Option<unsafe extern "C" fn(*mut c_void)>,
        ) -> c_int;
        fn pthread_setspecific(key: c_uint, value: *const c_void) -> c_int;
    }
    static SEEN: std::sync::Mutex<Vec<(&'static str, c_int)>> = std::sync::Mutex::new(Vec::new());
    unsafe extern "C" fn destructor(_: *mut c_void) {
        let mut seen = Vec::new();
        seen.push(("begin_capture(-1) status", streamalloc_begin_capture(-1)));
        seen.push(("code after begin_capture(-1)", streamalloc_last_error_code()));
        streamalloc_free(0xdead_0000 as *mut c_void, 16, 0, std::ptr::null_mut());
        seen.push(("code after a bad free", streamalloc_last_error_code()));
        // Safety: a null buffer only returns the code.
        seen.push(("last_error after a bad free", unsafe {
            streamalloc_last_error(std::ptr::null_mut(), 0)
        }));
        seen.push(("reset_peak_stats(0) status", streamalloc_reset_peak_stats(0)));
        seen.push(("code after a good call", streamalloc_last_error_code()));
        SEEN.lock().unwrap().extend(seen);
    }
    let _turn = setup();
    std::thread::spawn(|| {
        let mut key: c_uint = 0;
        // Safety: key is a valid out-pointer; the destructor has the C signature.
        assert_eq!(unsafe { pthread_key_create(&mut key, Some(destructor)) }, 0);
        // Safety: key was created above; a non-null value makes the destructor run.
        assert_eq!(unsafe { pthread_setspecific(key, std::ptr::dangling::<c_void>()) }, 0);
        // Touch the thread's last-error slot so that it exists and is destroyed first.
        assert_eq!(streamalloc_reset_peak_stats(0), 0);
    })
    .join()
    .unwrap();
    let invalid = ErrorCode::InvalidArgument as c_int;
    assert_eq!(
        *SEEN.lock().unwrap(),
        vec![
            ("begin_capture(-1) status", invalid),
            ("code after begin_capture(-1)", invalid),
            ("code after a bad free", invalid),
            ("last_error after a bad free", invalid),
            ("reset_peak_stats(0) status", 0),
            ("code after a good call", 0),
        ]
    );
}

#[test]
fn absurd_device_counts_are_refused() {
    let _turn = setup();
    for bad in [c_int::MAX, MAX_DEVICES as c_int + 1, -1] {
        streamalloc_init(bad);
        let (code, msg) = last_error();
        assert_eq!(code, ErrorCode::InvalidArgument as c_int, "init({bad})");
        assert!(msg.contains(&format!("invalid device count {bad}")), "{msg}");
    }
    streamalloc_init(2);
    assert_eq!(streamalloc_last_error_code(), 0);
}

// ----- statistics, peer access, cache info, configuration, warnings -----

fn memory_stats(device: c_int) -> StreamallocMemoryStats {
    let mut s = StreamallocMemoryStats::default();
    // Safety: s is a valid StreamallocMemoryStats of the size passed.
    let code =
        unsafe { streamalloc_device_memory_stats(device, &mut s, std::mem::size_of_val(&s)) };
    assert_eq!(code, 0, "{:?}", last_error());
    s
}

#[test]
fn memory_stats_count_exactly() {
    // Device 0 only here: other tests use it too, so compare differences of what this
    // test alone can change on the sim (its own blocks are large and distinct).
    let _turn = setup();
    let before = memory_stats(0);
    let a = streamalloc_alloc(3 << 20, 0, std::ptr::null_mut());
    let b = streamalloc_alloc(5 << 20, 0, std::ptr::null_mut());
    assert!(!a.is_null() && !b.is_null(), "{:?}", last_error());
    let mid = memory_stats(0);
    assert!(mid.allocated_current >= before.allocated_current + (8 << 20) - (1 << 20));
    assert!(mid.allocated_peak >= mid.allocated_current, "{mid:?}");
    assert!(mid.allocations_total >= before.allocations_total + 2, "{mid:?}");
    assert_eq!(mid.allocated_total - mid.freed_total, mid.allocated_current, "{mid:?}");
    assert_eq!(mid.allocations_total - mid.frees_total, mid.allocations_current, "{mid:?}");
    assert!(mid.reserved_current >= 8 << 20 && mid.pool_used_current >= 8 << 20, "{mid:?}");
    streamalloc_free(a, 0, 0, std::ptr::null_mut());
    streamalloc_free(b, 0, 0, std::ptr::null_mut());
    let after = memory_stats(0);
    assert!(after.frees_total >= mid.frees_total + 2, "{after:?}");
    assert!(after.freed_total >= mid.freed_total + (8 << 20), "{after:?}");

    // An out-of-memory error is counted.
    let ooms = memory_stats(0).num_ooms;
    assert!(streamalloc_alloc(4 * GIB as usize, 0, std::ptr::null_mut()).is_null());
    assert!(memory_stats(0).num_ooms > ooms);

    // A short struct gets its prefix; NULL is refused.
    let mut two = [u64::MAX; 2];
    // Safety: two holds 16 bytes, the size passed.
    let code = unsafe { streamalloc_device_memory_stats(0, two.as_mut_ptr().cast(), 16) };
    assert_eq!(code, 0);
    assert!(two[1] >= two[0], "{two:?}");
    // Safety: NULL must be refused, not written.
    let code = unsafe { streamalloc_device_memory_stats(0, std::ptr::null_mut(), 8) };
    assert_eq!(code, ErrorCode::InvalidArgument as c_int);
    // Safety: as above.
    let code = unsafe { streamalloc_device_memory_stats(7, two.as_mut_ptr().cast(), 16) };
    assert_eq!(code, ErrorCode::InvalidArgument as c_int);
}

#[test]
fn peaks_and_accumulated_stats_reset() {
    // Device 1 with blocks only this test holds at the time it reads its peak.
    let _turn = setup();
    let big = streamalloc_alloc(64 << 20, 1, std::ptr::null_mut());
    assert!(!big.is_null());
    let with = memory_stats(1);
    assert!(with.allocated_peak >= 64 << 20);
    streamalloc_free(big, 0, 1, std::ptr::null_mut());
    assert_eq!(streamalloc_reset_peak_stats(1), 0);
    let reset = memory_stats(1);
    assert!(reset.allocated_peak < with.allocated_peak, "{reset:?} vs {with:?}");
    assert_eq!(streamalloc_reset_accumulated_stats(1), 0);
    let acc = memory_stats(1);
    assert_eq!(acc.num_ooms, 0);
    assert!(acc.frees_total <= reset.frees_total, "{acc:?}");
    assert_eq!(streamalloc_reset_accumulated_stats(-3), ErrorCode::InvalidArgument as c_int);
}

#[test]
fn peer_access_grants_the_pool() {
    use crate::driver::Driver;
    let sim = setup();
    let src = streamalloc_alloc(4096, 0, std::ptr::null_mut());
    let dst = streamalloc_alloc(4096, 1, std::ptr::null_mut());
    assert!(!src.is_null() && !dst.is_null());
    let on1 = sim.new_usage_stream(1).unwrap();
    let copy = || sim.memcpy_async(dptr(dst), 1, dptr(src), 0, 4096, on1, false);
    assert!(copy().is_err(), "device 1 reads device 0's pool without access");
    assert_eq!(streamalloc_enable_peer_access(1, 0), 0, "{:?}", last_error());
    copy().expect("device 1 may read device 0's pool now");
    assert_eq!(streamalloc_enable_peer_access(1, 9), ErrorCode::InvalidArgument as c_int);
    streamalloc_free(src, 0, 0, std::ptr::null_mut());
    streamalloc_free(dst, 0, 1, std::ptr::null_mut());
    assert_eq!(streamalloc_last_error_code(), 0);
}

#[test]
fn cache_info_on_a_stream() {
    let sim = setup();
    let s = sim.new_stream(0).unwrap().as_raw() as CudaStream;
    let mut out = 0usize;
    // Safety: out is a valid usize.
    assert_eq!(unsafe { streamalloc_cache_info_on(0, s, &mut out) }, 0, "{:?}", last_error());
    assert!(out > 0 && out as u64 <= GIB);
    // Safety: NULL must be refused.
    let code = unsafe { streamalloc_cache_info_on(0, s, std::ptr::null_mut()) };
    assert_eq!(code, ErrorCode::InvalidArgument as c_int);
    // Safety: out is a valid usize.
    let code = unsafe { streamalloc_cache_info_on(5, s, &mut out) };
    assert_eq!(code, ErrorCode::InvalidArgument as c_int);
}

#[test]
fn config_is_checked_and_reported() {
    let _turn = setup();
    // Safety: NUL-terminated strings.
    unsafe {
        assert_eq!(streamalloc_parse_config(c"cache:off,max_cache_mb:16".as_ptr()), 0);
        assert_eq!(streamalloc_parse_config(c"cache:on,colour:blue".as_ptr()), 7);
        let (_, msg) = last_error();
        assert!(msg.contains("unknown key \"colour\""), "{msg}");
        assert_eq!(streamalloc_parse_config(c"max_cache_mb:-1".as_ptr()), 7);
        assert_eq!(streamalloc_parse_config(std::ptr::null()), 2);
    }
    let mut buf = [0 as c_char; 128];
    // Safety: buf holds 128 bytes.
    assert_eq!(unsafe { streamalloc_config(buf.as_mut_ptr(), buf.len()) }, 0);
    // Safety: NUL-terminated within buf.
    let text = unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned();
    assert_eq!(
        text,
        "cache:on,max_cache_mb:2048,release:fast,max_cached_kb:65536,class_reach:2,idle_interval:16384"
    );
}

#[test]
fn warnings_reach_the_registered_handler() {
    static GOT: std::sync::Mutex<Vec<(c_int, String, usize)>> = std::sync::Mutex::new(Vec::new());
    unsafe extern "C" fn handler(level: c_int, message: *const c_char, user: *mut c_void) {
        // Safety: the library passes a NUL-terminated string valid for the call.
        let m = unsafe { CStr::from_ptr(message) }.to_string_lossy().into_owned();
        GOT.lock().unwrap().push((level, m, user as usize));
    }
    let _turn = setup();
    assert_eq!(streamalloc_set_warning_handler(Some(handler), 0x5eed as *mut c_void), 0);
    streamalloc_free(0xfeed_0000 as *mut c_void, 16, 0, std::ptr::null_mut());
    assert_eq!(streamalloc_set_warning_handler(None, std::ptr::null_mut()), 0);
    let got = GOT.lock().unwrap();
    assert!(
        got.iter().any(|(level, m, user)| *level == 1
            && m.contains("0xfeed0000")
            && m.contains("was not allocated by this allocator")
            && *user == 0x5eed),
        "{got:?}"
    );
}

// ----- private pools -----

fn sptr(s: Stream) -> CudaStream {
    s.as_raw() as *mut c_void
}

fn pool_of(p: *mut c_void) -> Option<(u64, u64)> {
    let (mut a, mut b) = (0u64, 0u64);
    // Safety: both outputs are valid u64s.
    match unsafe { pools::streamalloc_pool_of(p, &mut a, &mut b) } {
        1 => Some((a, b)),
        _ => None,
    }
}

#[test]
fn mem_pool_use_routes_allocations_and_release_returns_memory() {
    let sim = setup();
    let _ = sim.take_reports(); // other tests' findings are theirs
    let s = sim.new_stream(0).unwrap();
    let (id0, id1) = (0, 101);
    let sync_before = sim.sync_bytes(0);
    let async_before = sim.call_count(crate::sim::SimOp::MallocAsync);
    // torch.cuda.MemPool(): one user.
    assert_eq!(pools::streamalloc_pool_create_or_incref(0, id0, id1), 0);
    assert_eq!(pools::streamalloc_pool_use_count(0, id0, id1), 1);
    // use_mem_pool: begin (a user more), allocate, end, release.
    // Safety: no filter.
    let r = unsafe {
        pools::streamalloc_pool_begin_allocate_to(
            0,
            id0,
            id1,
            sptr(s),
            None,
            std::ptr::null_mut(),
            None,
        )
    };
    assert_eq!(r, 0, "{:?}", last_error());
    assert_eq!(pools::streamalloc_pool_use_count(0, id0, id1), 2);
    let x = streamalloc_alloc(1 << 20, 0, sptr(s));
    let on_device_1 = streamalloc_alloc(4096, 1, std::ptr::null_mut());
    assert_eq!(pools::streamalloc_pool_end_allocate_to(0, id0, id1), 0);
    assert_eq!(pools::streamalloc_pool_release(0, id0, id1), 0);
    assert_eq!(pool_of(x), Some((id0, id1)));
    assert_eq!(pool_of(on_device_1), None, "the context is device 0's");
    assert_eq!(sim.call_count(crate::sim::SimOp::MallocAsync), async_before + 1);
    let y = streamalloc_alloc(4096, 0, sptr(s));
    assert_eq!(pool_of(y), None, "the context is closed");
    let mut st = pools::StreamallocPoolStats::default();
    // Safety: st is a valid output.
    assert_eq!(unsafe { pools::streamalloc_pool_get_stats(0, id0, id1, &mut st) }, 0);
    assert_eq!((st.use_count, st.live_blocks, st.live_bytes), (1, 1, 1 << 20));
    // del tensor: streamalloc_free knows the pool's block; del pool: release.
    streamalloc_free(x, 0, 0, std::ptr::null_mut());
    assert_eq!(streamalloc_last_error_code(), 0, "{:?}", last_error());
    assert_eq!(pools::streamalloc_pool_release(0, id0, id1), 0);
    assert_eq!(sim.sync_bytes(0), sync_before);
    assert_eq!(pools::streamalloc_pool_use_count(0, id0, id1), 0);
    streamalloc_free(y, 0, 0, std::ptr::null_mut());
    streamalloc_free(on_device_1, 0, 0, std::ptr::null_mut());
    streamalloc_free(x, 0, 0, std::ptr::null_mut());
    assert_eq!(streamalloc_last_error_code(), ErrorCode::InvalidArgument as c_int);
    sim.assert_clean();
}

static FILTER_DROPS: AtomicUsize = AtomicUsize::new(0);

/// Counts the releases of filter contexts.
unsafe extern "C" fn count_drop(_ctx: *mut c_void) {
    FILTER_DROPS.fetch_add(1, Ordering::Relaxed);
}

/// A filter that accepts the stream its context names.
unsafe extern "C" fn only_stream(ctx: *mut c_void, stream: CudaStream) -> c_int {
    (ctx == stream) as c_int
}

#[test]
fn graph_capture_into_a_pool_tells_the_core_of_the_capture() {
    let sim = setup();
    let _ = sim.take_reports(); // other tests' findings are theirs
    let s = sim.new_stream(0).unwrap();
    let us = UsageStream::new(s, 0);
    let (id0, id1) = (102, 0);
    // An ordinary block from before the capture, freed during it.
    let before = streamalloc_alloc(8192, 0, sptr(s));
    assert!(pool_of(before).is_none());
    let async_before = sim.call_count(crate::sim::SimOp::MallocAsync);
    // CUDAGraph::capture_begin: the context, then the stream capture.
    // Safety: only_stream never unwinds and needs no context memory.
    let r = unsafe {
        pools::streamalloc_pool_begin_allocate_to(
            0,
            id0,
            id1,
            sptr(s),
            Some(only_stream),
            sptr(s),
            Some(count_drop),
        )
    };
    assert_eq!(r, 0, "{:?}", last_error());
    assert!(!alloc().unwrap().capture_underway(), "no capture seen yet");
    sim.begin_capture(us).unwrap();
    let a = streamalloc_alloc(1 << 20, 0, sptr(s));
    assert_eq!(pool_of(a), Some((id0, id1)));
    assert!(alloc().unwrap().capture_underway(), "the core heard of the capture");
    sim.launch(us, &[dptr(a)]).unwrap();
    streamalloc_free(before, 0, 0, std::ptr::null_mut()); // deferred by the core (S4)
    streamalloc_free(a, 0, 0, std::ptr::null_mut()); // back to the pool, reusable
    assert_eq!(streamalloc_alloc(1 << 20, 0, sptr(s)), a);
    assert_eq!(sim.call_count(crate::sim::SimOp::MallocAsync), async_before);
    // capture_end: the stream capture ends, then the context.
    let graph = sim.end_capture(us).unwrap();
    assert_eq!(graph.allocations, 0);
    assert_eq!(pools::streamalloc_pool_end_allocate_to(0, id0, id1), 0);
    assert!(!alloc().unwrap().capture_underway());
    assert_eq!(FILTER_DROPS.load(Ordering::Relaxed), 1, "the filter's context is released");
    // The graph's output lives on; the graph's reset releases the pool.
    assert_eq!(pools::streamalloc_pool_release(0, id0, id1), 0);
    streamalloc_free(a, 0, 0, std::ptr::null_mut());
    assert_eq!(pools::streamalloc_pool_use_count(0, id0, id1), 0);
    // The deferred free is issued at the next allocation.
    let z = streamalloc_alloc(512, 0, sptr(s));
    streamalloc_free(z, 0, 0, std::ptr::null_mut());
    sim.assert_clean();
}

#[test]
fn checkpoint_restore_and_live_check_through_the_c_abi() {
    let sim = setup();
    let _ = sim.take_reports(); // other tests' findings are theirs
    let s = sim.new_stream(0).unwrap();
    let (d, id0, id1) = (0, 0, 103);
    assert_eq!(pools::streamalloc_pool_create_or_incref(d, id0, id1), 0);
    let a = pool_alloc(d, id0, id1, 1000, sptr(s));
    let b = pool_alloc(d, id0, id1, 3000, sptr(s));
    assert!(!a.is_null() && !b.is_null(), "{:?}", last_error());
    let mut count = 0usize;
    // Safety: capacity 0 with a NULL buffer; count is valid.
    let r = unsafe {
        pools::streamalloc_pool_checkpoint(d, id0, id1, std::ptr::null_mut(), 0, &mut count)
    };
    assert_eq!((r, count), (0, 2));
    let mut cp = vec![
        pools::StreamallocPoolBlock {
            ptr: std::ptr::null_mut(),
            size: 0,
            stream: std::ptr::null_mut()
        };
        count
    ];
    // Safety: cp holds count blocks.
    let r = unsafe {
        pools::streamalloc_pool_checkpoint(d, id0, id1, cp.as_mut_ptr(), cp.len(), &mut count)
    };
    assert_eq!(r, 0);
    streamalloc_free(a, 0, 0, std::ptr::null_mut());
    let c = pool_alloc(d, id0, id1, 5000, sptr(s));
    let check = |ptrs: &[*mut c_void]| {
        let mut same = -1;
        // Safety: ptrs is a live slice; same is valid.
        let r = unsafe {
            pools::streamalloc_pool_check_live(d, id0, id1, ptrs.as_ptr(), ptrs.len(), &mut same)
        };
        assert_eq!(r, 0);
        same == 1
    };
    assert!(check(&[b, c]));
    assert!(!check(&[b]));
    // A checkpoint block the pool does not have: refused, nothing changed.
    let mut bad = cp.clone();
    bad.push(pools::StreamallocPoolBlock { ptr: 0x10 as *mut c_void, size: 1, stream: sptr(s) });
    // Safety: bad holds bad.len() blocks; no callback.
    let r = unsafe {
        pools::streamalloc_pool_restore(
            d,
            id0,
            id1,
            bad.as_ptr(),
            bad.len(),
            None,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(r, ErrorCode::InvalidArgument as c_int);
    assert!(last_error().1.contains("checkpoint"), "{:?}", last_error());
    assert!(check(&[b, c]));
    unsafe extern "C" fn collect(ctx: *mut c_void, ptr: *mut c_void, _size: usize) {
        // Safety: ctx is the test's Vec, alive for the call.
        unsafe { (*(ctx as *mut Vec<*mut c_void>)).push(ptr) };
    }
    let mut freed: Vec<*mut c_void> = Vec::new();
    // Safety: cp holds cp.len() blocks; collect does not unwind; ctx is `freed`.
    let r = unsafe {
        pools::streamalloc_pool_restore(
            d,
            id0,
            id1,
            cp.as_ptr(),
            cp.len(),
            Some(collect),
            (&mut freed as *mut Vec<*mut c_void>).cast(),
        )
    };
    assert_eq!(r, 0, "{:?}", last_error());
    freed.sort();
    let mut want = vec![b, c];
    want.sort();
    assert_eq!(freed, want);
    assert!(check(&[a, b]));
    for p in [a, b] {
        streamalloc_free(p, 0, 0, std::ptr::null_mut());
        assert_eq!(streamalloc_last_error_code(), 0);
    }
    assert_eq!(pools::streamalloc_pool_release(d, id0, id1), 0);
    sim.assert_clean();
}

#[test]
fn pool_calls_refuse_bad_input() {
    let _sim = setup();
    let invalid = ErrorCode::InvalidArgument as c_int;
    assert_eq!(pools::streamalloc_pool_release(0, 0, 999), invalid);
    assert!(last_error().1.contains("no private pool (0, 999)"), "{:?}", last_error());
    assert_eq!(pools::streamalloc_pool_create_or_incref(7, 0, 999), invalid);
    assert_eq!(pools::streamalloc_pool_create_or_incref(-1, 0, 999), invalid);
    assert_eq!(pools::streamalloc_pool_use_count(0, 0, 0), -1);
    assert!(pool_alloc(0, 0, 999, 64, std::ptr::null_mut()).is_null());
    assert_eq!(streamalloc_last_error_code(), invalid);
    assert_eq!(pools::streamalloc_pool_end_allocate_to(0, 0, 999), invalid);
    let mut out = 0;
    // Safety: NULL pointers with n > 0 are refused before any read.
    let r = unsafe { pools::streamalloc_pool_check_live(0, 0, 999, std::ptr::null(), 3, &mut out) };
    assert_eq!(r, invalid);
    // Safety: as above.
    let r = unsafe {
        pools::streamalloc_pool_restore(0, 0, 999, std::ptr::null(), 1, None, std::ptr::null_mut())
    };
    assert_eq!(r, invalid);
    // A pool block on device 0 is not device 1's pool's.
    assert_eq!(pools::streamalloc_pool_create_or_incref(0, 0, 998), 0);
    let p = pool_alloc(0, 0, 998, 64, std::ptr::null_mut());
    assert!(!p.is_null());
    let mut same = -1;
    // Safety: one pointer; same is valid.
    let r = unsafe { pools::streamalloc_pool_check_live(1, 0, 998, &p, 1, &mut same) };
    assert_eq!(r, invalid);
    streamalloc_free(p, 0, 0, std::ptr::null_mut());
    assert_eq!(pools::streamalloc_pool_release(0, 0, 998), 0);
    assert_eq!(pools::streamalloc_pool_release(0, 0, 998), invalid, "released already");
}

#[test]
fn pool_block_recorded_on_the_capture_stream_from_a_forked_side_stream() {
    let sim = setup();
    let _ = sim.take_reports(); // other tests' findings are theirs
    let s = sim.new_usage_stream(0).unwrap();
    let side = sim.new_usage_stream(0).unwrap();
    let (id0, id1) = (104, 0);
    let sync_before = sim.sync_bytes(0);
    // Safety: no filter: every stream of device 0 goes to the pool.
    let r = unsafe {
        pools::streamalloc_pool_begin_allocate_to(
            0,
            id0,
            id1,
            sptr(s.stream),
            None,
            std::ptr::null_mut(),
            None,
        )
    };
    assert_eq!(r, 0);
    sim.begin_capture(s).unwrap();
    let a = streamalloc_alloc(1 << 20, 0, sptr(s.stream));
    sim.wait(side, s).unwrap(); // fork
    let b = streamalloc_alloc(1 << 20, 0, sptr(side.stream));
    assert_eq!((pool_of(a), pool_of(b)), (Some((id0, id1)), Some((id0, id1))));
    sim.launch(side, &[dptr(a), dptr(b)]).unwrap();
    assert_eq!(streamalloc_record_stream_on(b, sptr(s.stream), 0), 0, "{:?}", last_error());
    sim.wait(s, side).unwrap(); // join
    streamalloc_free(b, 0, 0, std::ptr::null_mut()); // held back: recorded, in a capture
    streamalloc_free(a, 0, 0, std::ptr::null_mut());
    assert_eq!(streamalloc_last_error_code(), 0, "{:?}", last_error());
    let c = streamalloc_alloc(1 << 20, 0, sptr(side.stream));
    assert_ne!(c, b, "not reused inside the capture");
    streamalloc_free(c, 0, 0, std::ptr::null_mut());
    sim.end_capture(s).unwrap();
    assert_eq!(pools::streamalloc_pool_end_allocate_to(0, id0, id1), 0);
    assert_eq!(pools::streamalloc_pool_release(0, id0, id1), 0);
    assert_eq!(sim.sync_bytes(0), sync_before, "every block went back, the held one too");
    sim.assert_clean();
}

/// The C ABI calls of a graph tree (`torch/_inductor/cudagraph_trees.py`): a pool kept
/// alive by an empty capture, a warm-up context, a recording, a checkpoint, and a
/// restore before the next recording with a warm-up output dead since.
#[test]
fn graph_tree_sequence() {
    let sim = setup();
    let _ = sim.take_reports(); // other tests' findings are theirs
    let s = sim.new_usage_stream(0).unwrap();
    let (d, id0, id1) = (0, 0, 105);
    let sync_before = sim.sync_bytes(0);
    let begin = |filtered: bool| {
        let (f, ctx): (pools::StreamallocStreamFilter, *mut c_void) = if filtered {
            (Some(only_stream), sptr(s.stream))
        } else {
            (None, std::ptr::null_mut())
        };
        // Safety: only_stream never unwinds and reads no context memory.
        let r = unsafe {
            pools::streamalloc_pool_begin_allocate_to(d, id0, id1, sptr(s.stream), f, ctx, None)
        };
        assert_eq!(r, 0, "{:?}", last_error());
    };
    let end = || assert_eq!(pools::streamalloc_pool_end_allocate_to(d, id0, id1), 0);
    let live = |ptrs: &[*mut c_void]| {
        let mut same = -1;
        // Safety: ptrs is a live slice; same is valid.
        let r = unsafe {
            pools::streamalloc_pool_check_live(d, id0, id1, ptrs.as_ptr(), ptrs.len(), &mut same)
        };
        assert_eq!(r, 0);
        same == 1
    };
    // "Keeps Memory Pool Alive": an empty capture into the pool.
    begin(true);
    sim.begin_capture(s).unwrap();
    sim.end_capture(s).unwrap();
    end();
    assert_eq!(pools::streamalloc_pool_use_count(d, id0, id1), 1);
    // Warm-up (_use_cuda_memory_pool_manager): the thread's allocations, no capture.
    begin(false);
    let x = streamalloc_alloc(4096, d, sptr(s.stream)); // a static input
    let w = streamalloc_alloc(8192, d, sptr(s.stream)); // the warm-up's output
    let t = streamalloc_alloc(8192, d, sptr(s.stream));
    sim.launch(s, &[dptr(x), dptr(w), dptr(t)]).unwrap();
    streamalloc_free(t, 0, 0, std::ptr::null_mut());
    end();
    assert_eq!(pools::streamalloc_pool_release(d, id0, id1), 0);
    // Recording: the graph's allocations in the capture.
    begin(true);
    sim.begin_capture(s).unwrap();
    let tmp = streamalloc_alloc(8192, d, sptr(s.stream));
    assert_eq!(tmp, t, "a block freed on the stream is reused by address");
    let o1 = streamalloc_alloc(4096, d, sptr(s.stream));
    sim.launch(s, &[dptr(x), dptr(tmp), dptr(o1)]).unwrap();
    streamalloc_free(tmp, 0, 0, std::ptr::null_mut());
    let graph = sim.end_capture(s).unwrap();
    end();
    assert_eq!(graph.allocations, 0);
    let mut count = 0usize;
    let mut cp = vec![
        pools::StreamallocPoolBlock {
            ptr: std::ptr::null_mut(),
            size: 0,
            stream: std::ptr::null_mut()
        };
        8
    ];
    // Safety: cp holds 8 blocks; count is valid.
    let r = unsafe {
        pools::streamalloc_pool_checkpoint(d, id0, id1, cp.as_mut_ptr(), cp.len(), &mut count)
    };
    assert_eq!((r, count), (0, 3));
    cp.truncate(count);
    assert!(live(&[x, w, o1]));
    // The warm-up output dies; graph trees later free the checkpoint's dead blocks.
    streamalloc_free(w, 0, 0, std::ptr::null_mut());
    let o_extra = pool_alloc(d, id0, id1, 4096, sptr(s.stream));
    assert!(live(&[x, o1, o_extra]));
    // Before the next recording: the checkpoint's state, then raw_delete of the dead.
    // Safety: cp holds count blocks; no callback.
    let r = unsafe {
        pools::streamalloc_pool_restore(
            d,
            id0,
            id1,
            cp.as_ptr(),
            cp.len(),
            None,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(r, 0, "{:?}", last_error());
    assert!(live(&[x, w, o1]));
    streamalloc_free(w, 0, 0, std::ptr::null_mut());
    assert_eq!(streamalloc_last_error_code(), 0, "{:?}", last_error());
    assert!(live(&[x, o1]));
    // The next recording may use w's and o_extra's blocks again.
    begin(true);
    sim.begin_capture(s).unwrap();
    let o2 = streamalloc_alloc(8192, d, sptr(s.stream));
    assert_eq!(o2, w);
    sim.launch(s, &[dptr(o1), dptr(o2)]).unwrap();
    sim.end_capture(s).unwrap();
    end();
    // The tree goes away: its outputs die, each graph (the keep-alive one and the two
    // recordings: every capture added a user) releases the pool.
    for p in [x, o1, o2] {
        streamalloc_free(p, 0, 0, std::ptr::null_mut());
        assert_eq!(streamalloc_last_error_code(), 0, "{:?}", last_error());
    }
    assert_eq!(pools::streamalloc_pool_use_count(d, id0, id1), 3);
    for _ in 0..3 {
        assert_eq!(pools::streamalloc_pool_release(d, id0, id1), 0);
    }
    assert_eq!(pools::streamalloc_pool_use_count(d, id0, id1), 0);
    assert_eq!(sim.sync_bytes(0), sync_before);
    sim.assert_clean();
}

#[test]
fn base_alloc_and_record_stream_know_pool_blocks() {
    let sim = setup();
    let _ = sim.take_reports(); // other tests' findings are theirs
    let s = sim.new_usage_stream(0).unwrap();
    let other = sim.new_usage_stream(0).unwrap();
    let (id0, id1) = (0, 106);
    assert_eq!(pools::streamalloc_pool_create_or_incref(0, id0, id1), 0);
    let p = pool_alloc(0, id0, id1, 3000, sptr(s.stream));
    let mut size = 0usize;
    // Safety: size is a valid usize.
    assert_eq!(unsafe { streamalloc_base_alloc(p, &mut size) }, p);
    assert_eq!(size, 3000);
    sim.launch(other, &[dptr(p)]).unwrap();
    streamalloc_record_stream(p, sptr(other.stream));
    assert_eq!(streamalloc_last_error_code(), 0, "{:?}", last_error());
    streamalloc_free(p, 0, 0, std::ptr::null_mut());
    // Freed: base_alloc and record_stream refuse it; the reuse waits for `other`.
    // Safety: as above.
    assert!(unsafe { streamalloc_base_alloc(p, &mut size) }.is_null());
    assert_eq!(
        streamalloc_record_stream_on(p, sptr(other.stream), 0),
        ErrorCode::InvalidArgument as c_int
    );
    assert_eq!(pool_alloc(0, id0, id1, 3000, sptr(s.stream)), p);
    assert!(sim.happens_before(other, s));
    streamalloc_free(p, 0, 0, std::ptr::null_mut());
    assert_eq!(pools::streamalloc_pool_release(0, id0, id1), 0);
    sim.assert_clean();
}
