//! Exact per-device statistics of the C ABI: what PyTorch's `memory_stats` reports for
//! the allocations made through `streamalloc_alloc` (bytes and counts, current, peak and
//! cumulative, out-of-memory errors), next to the pool's figures from the allocator.
//!
//! One cache-padded group of atomics per device. An allocation costs two read-modify-
//! writes (bytes and count; the peaks are read, and written only when exceeded), a free
//! four (bytes, count, and the cumulative freed bytes and frees). The cumulative
//! allocated figures are derived (`current + freed`), so `allocated - freed == current`
//! holds in every report, also after `streamalloc_reset_accumulated_stats`.

use crossbeam::utils::CachePadded;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// The atomics of one device.
#[derive(Default)]
pub(crate) struct Counters {
    bytes: AtomicU64,
    bytes_peak: AtomicU64,
    count: AtomicU64,
    count_peak: AtomicU64,
    freed_bytes: AtomicU64,
    frees: AtomicU64,
    ooms: AtomicU64,
    /// `alloc_retries` of the allocator at the last accumulated-stats reset.
    retries_base: AtomicU64,
}

/// A consistent-enough reading of one device's [`Counters`] (each field is exact; the
/// fields are read one after the other).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Reading {
    pub(crate) bytes: u64,
    pub(crate) bytes_peak: u64,
    pub(crate) count: u64,
    pub(crate) count_peak: u64,
    pub(crate) freed_bytes: u64,
    pub(crate) frees: u64,
    pub(crate) ooms: u64,
    pub(crate) retries_base: u64,
}

fn raise_peak(peak: &AtomicU64, now: u64) {
    if now > peak.load(Relaxed) {
        peak.fetch_max(now, Relaxed);
    }
}

impl Counters {
    /// A live allocation of `size` bytes was handed out.
    #[inline]
    pub(crate) fn on_alloc(&self, size: u64) {
        raise_peak(&self.bytes_peak, self.bytes.fetch_add(size, Relaxed) + size);
        raise_peak(&self.count_peak, self.count.fetch_add(1, Relaxed) + 1);
    }

    /// A live allocation of `size` bytes was freed.
    #[inline]
    pub(crate) fn on_free(&self, size: u64) {
        self.bytes.fetch_sub(size, Relaxed);
        self.count.fetch_sub(1, Relaxed);
        self.freed_bytes.fetch_add(size, Relaxed);
        self.frees.fetch_add(1, Relaxed);
    }

    /// An allocation failed for lack of memory.
    pub(crate) fn on_oom(&self) {
        self.ooms.fetch_add(1, Relaxed);
    }

    /// The peaks start again from the current values.
    pub(crate) fn reset_peaks(&self) {
        self.bytes_peak.store(self.bytes.load(Relaxed), Relaxed);
        self.count_peak.store(self.count.load(Relaxed), Relaxed);
        // An allocation racing the reset may have raised the current value past the
        // stored peak: raise it again.
        raise_peak(&self.bytes_peak, self.bytes.load(Relaxed));
        raise_peak(&self.count_peak, self.count.load(Relaxed));
    }

    /// The cumulative figures (frees, freed bytes, out-of-memory errors, retries) start
    /// again from 0; `retries_now` is the allocator's retry count now.
    pub(crate) fn reset_accumulated(&self, retries_now: u64) {
        self.freed_bytes.store(0, Relaxed);
        self.frees.store(0, Relaxed);
        self.ooms.store(0, Relaxed);
        self.retries_base.store(retries_now, Relaxed);
    }

    pub(crate) fn read(&self) -> Reading {
        let bytes = self.bytes.load(Relaxed);
        let count = self.count.load(Relaxed);
        Reading {
            bytes,
            bytes_peak: self.bytes_peak.load(Relaxed).max(bytes),
            count,
            count_peak: self.count_peak.load(Relaxed).max(count),
            freed_bytes: self.freed_bytes.load(Relaxed),
            frees: self.frees.load(Relaxed),
            ooms: self.ooms.load(Relaxed),
            retries_base: self.retries_base.load(Relaxed),
        }
    }
}

/// The counters of every device of the C ABI's allocator.
pub(crate) struct DeviceCounters(Box<[CachePadded<Counters>]>);

impl DeviceCounters {
    pub(crate) fn new(devices: usize) -> Self {
        DeviceCounters((0..devices).map(|_| CachePadded::new(Counters::default())).collect())
    }

    /// The counters of `device` (checked by the caller against the device count).
    #[inline]
    pub(crate) fn get(&self, device: usize) -> &Counters {
        &self.0[device]
    }
}

/// One device's memory statistics for C (`streamalloc_device_memory_stats` in the header):
/// everything PyTorch's `torch.cuda.memory_stats()` reports for the allocator.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct StreamallocMemoryStats {
    /// Bytes in live allocations made through `streamalloc_alloc` (exact, as requested).
    pub allocated_current: u64,
    /// High watermark of `allocated_current` since the last peak reset.
    pub allocated_peak: u64,
    /// Bytes allocated since the last accumulated-stats reset (`current + freed`).
    pub allocated_total: u64,
    /// Bytes freed since the last accumulated-stats reset.
    pub freed_total: u64,
    /// Live allocations.
    pub allocations_current: u64,
    /// High watermark of `allocations_current` since the last peak reset.
    pub allocations_peak: u64,
    /// Allocations since the last accumulated-stats reset (`current + frees`).
    pub allocations_total: u64,
    /// Frees since the last accumulated-stats reset.
    pub frees_total: u64,
    /// Bytes the device's pool has reserved now (`cudaMemPoolAttrReservedMemCurrent`).
    pub reserved_current: u64,
    /// High watermark of reserved bytes (`cudaMemPoolAttrReservedMemHigh`).
    pub reserved_peak: u64,
    /// Bytes the pool hands out now: live allocations, the allocator's cache, frees
    /// still pending on a stream (`cudaMemPoolAttrUsedMemCurrent`; the seed's
    /// "allocated" and "active").
    pub pool_used_current: u64,
    /// High watermark of `pool_used_current` (`cudaMemPoolAttrUsedMemHigh`).
    pub pool_used_peak: u64,
    /// Bytes in the allocator's own cache (freed, not yet returned to the pool).
    pub cached_current: u64,
    /// Allocations served from that cache.
    pub cache_hits: u64,
    /// Allocations that went to the driver (`cudaMallocAsync` calls).
    pub cache_misses: u64,
    /// Allocations retried after the driver ran out of memory, once the cache was
    /// given back (PyTorch's `num_alloc_retries`).
    pub num_alloc_retries: u64,
    /// Allocations refused for lack of memory (PyTorch's `num_ooms`).
    pub num_ooms: u64,
}

impl StreamallocMemoryStats {
    /// Combines the C ABI's counters with the allocator's device statistics.
    pub(crate) fn new(r: Reading, s: &crate::api::DeviceStats) -> Self {
        StreamallocMemoryStats {
            allocated_current: r.bytes,
            allocated_peak: r.bytes_peak,
            allocated_total: r.bytes + r.freed_bytes,
            freed_total: r.freed_bytes,
            allocations_current: r.count,
            allocations_peak: r.count_peak,
            allocations_total: r.count + r.frees,
            frees_total: r.frees,
            reserved_current: s.reserved_current,
            reserved_peak: s.reserved_peak,
            pool_used_current: s.used_current,
            pool_used_peak: s.used_peak,
            cached_current: s.cached_current,
            cache_hits: s.cache_hits,
            cache_misses: s.cache_misses,
            num_alloc_retries: s.alloc_retries.saturating_sub(r.retries_base),
            num_ooms: r.ooms,
        }
    }
}

// ----- the C functions -----

/// Fills `*out` with `device`'s memory statistics: at most `out_size` bytes of
/// [`StreamallocMemoryStats`] (a caller built against an older, shorter struct passes
/// its size and gets that prefix). Returns the status code (2 for a NULL `out`).
///
/// # Safety
/// `out` is null (an error) or valid for `out_size` bytes of writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn streamalloc_device_memory_stats(
    device: std::ffi::c_int,
    out: *mut StreamallocMemoryStats,
    out_size: usize,
) -> std::ffi::c_int {
    super::status(|| {
        if out.is_null() {
            return Err(super::Failure::invalid("streamalloc_device_memory_stats: out is NULL"));
        }
        let g = super::global()?;
        let d = super::device(&g.alloc, device)?;
        let reading = g.counters.get(d).read();
        let pool = crate::StreamOrderedAllocator::device_stats(&g.alloc, d)?;
        let mut stats = StreamallocMemoryStats::new(reading, &pool);
        // Private pools' blocks are the driver's synchronous memory, outside its pool.
        stats.reserved_current += g.pools.reserved_bytes(d);
        stats.reserved_peak = stats.reserved_peak.max(stats.reserved_current);
        let n = out_size.min(std::mem::size_of::<StreamallocMemoryStats>());
        // Safety: out is not null and valid for out_size >= n bytes (caller); `stats`
        // is a plain repr(C) value on our stack, not overlapping it.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (&stats as *const StreamallocMemoryStats).cast::<u8>(),
                out.cast::<u8>(),
                n,
            )
        };
        Ok(())
    })
}

/// Resets `device`'s cumulative statistics (frees, freed bytes, out-of-memory errors,
/// retries) to 0; the current and peak figures stay (PyTorch's
/// `reset_accumulated_memory_stats`). Returns the status code.
#[unsafe(no_mangle)]
pub extern "C" fn streamalloc_reset_accumulated_stats(device: std::ffi::c_int) -> std::ffi::c_int {
    super::status(|| {
        let g = super::global()?;
        let d = super::device(&g.alloc, device)?;
        let retries = crate::StreamOrderedAllocator::device_stats(&g.alloc, d)?.alloc_retries;
        g.counters.get(d).reset_accumulated(retries);
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_track_current_peak_and_totals() {
        let c = Counters::default();
        c.on_alloc(100);
        c.on_alloc(50);
        c.on_free(100);
        let r = c.read();
        assert_eq!((r.bytes, r.bytes_peak, r.count, r.count_peak), (50, 150, 1, 2));
        assert_eq!((r.freed_bytes, r.frees), (100, 1));
        c.reset_peaks();
        let r = c.read();
        assert_eq!((r.bytes_peak, r.count_peak), (50, 1));
        c.on_oom();
        c.reset_accumulated(7);
        c.on_oom();
        let r = c.read();
        assert_eq!((r.freed_bytes, r.frees, r.ooms, r.retries_base), (0, 0, 1, 7));
        let s = crate::api::DeviceStats { alloc_retries: 9, ..Default::default() };
        let m = StreamallocMemoryStats::new(r, &s);
        assert_eq!((m.allocated_total, m.allocations_total, m.num_alloc_retries), (50, 1, 2));
    }

    #[test]
    fn peaks_are_exact_under_threads() {
        let c = std::sync::Arc::new(Counters::default());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let c = c.clone();
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        c.on_alloc(8);
                        c.on_free(8);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let r = c.read();
        assert_eq!((r.bytes, r.count, r.frees, r.freed_bytes), (0, 0, 40_000, 320_000));
        assert!(r.bytes_peak >= 8 && r.bytes_peak <= 32, "{r:?}");
        assert!(r.count_peak >= 1 && r.count_peak <= 4, "{r:?}");
    }
}
