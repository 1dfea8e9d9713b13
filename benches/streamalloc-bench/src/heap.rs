//! A counting global allocator, and the bookkeeping bytes per live block measured with it.
//!
//! The counter is off except while [`heap_growth`] runs, so the throughput measurements
//! pay one relaxed load of a flag that no thread writes (no shared cache line is
//! written on their hot path).

use crate::workload::{DEVICE, size_of};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicIsize, Ordering};
use streamalloc::{DevicePtr, Stream, StreamOrderedAllocator};

static COUNTING: AtomicBool = AtomicBool::new(false);
static NET_BYTES: AtomicIsize = AtomicIsize::new(0);

/// [`System`], plus a count of the bytes requested minus the bytes freed while counting
/// is on. Counts requested sizes: `malloc`'s own per-chunk overhead is not included.
pub struct CountingAlloc;

#[inline]
fn count(delta: isize) {
    if COUNTING.load(Ordering::Relaxed) {
        NET_BYTES.fetch_add(delta, Ordering::Relaxed);
    }
}

// Safety: every method forwards to `System` with the caller's arguments unchanged, so
// `System`'s guarantees are ours; the counting touches only two atomics.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // Safety: forwarded unchanged; the caller upholds `GlobalAlloc::alloc`'s contract.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            count(layout.size() as isize);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // Safety: forwarded unchanged.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            count(layout.size() as isize);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // Safety: forwarded unchanged; `ptr` came from this allocator, i.e. from System.
        unsafe { System.dealloc(ptr, layout) };
        count(-(layout.size() as isize));
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // Safety: forwarded unchanged; `ptr` came from System with `layout`.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            count(new_size as isize - layout.size() as isize);
        }
        p
    }
}

/// Runs `f` with counting on and returns the net heap growth in bytes it caused. Only one
/// thread may be allocating meanwhile (the others' bytes would count too).
pub fn heap_growth(f: impl FnOnce()) -> isize {
    NET_BYTES.store(0, Ordering::SeqCst);
    COUNTING.store(true, Ordering::SeqCst);
    f();
    COUNTING.store(false, Ordering::SeqCst);
    NET_BYTES.load(Ordering::SeqCst)
}

/// Heap bytes an allocator keeps per live block: allocates `blocks` blocks of the
/// workload's sizes on `stream` (after one warm-up pair, so first-use state is not
/// counted), divides the heap growth by `blocks`, then frees them.
pub fn bytes_per_live_block<A: StreamOrderedAllocator + ?Sized>(
    alloc: &A,
    stream: Stream,
    blocks: usize,
) -> Result<f64, String> {
    let warm = alloc.malloc(DEVICE, 512, stream).map_err(|e| e.to_string())?;
    alloc.free(warm).map_err(|e| e.to_string())?;
    // Allocated before counting starts: the pointer list is the benchmark's, not the
    // allocator's.
    let mut ptrs: Vec<DevicePtr> = Vec::with_capacity(blocks);
    let mut failed = None;
    let grown = heap_growth(|| {
        for i in 0..blocks {
            match alloc.malloc(DEVICE, size_of(i as u64), stream) {
                Ok(p) => ptrs.push(p),
                Err(e) => {
                    failed = Some(e.to_string());
                    break;
                }
            }
        }
    });
    for p in ptrs {
        alloc.free(p).map_err(|e| e.to_string())?;
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(grown as f64 / blocks as f64),
    }
}
