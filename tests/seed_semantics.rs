//! One or more tests per seed behaviour S1..S19 (BRIEF.md), each run on the lock-free
//! core and on the seed replica, on the simulated device with its checker on. Each test
//! names the behaviour it pins down and would fail if that behaviour were wrong.

mod common;

use common::*;
use streamalloc::error::CUDA_ERROR_INVALID_VALUE;
use streamalloc::sim::{CopyKind, SimOp};
use streamalloc::{DevicePtr, Error, PoolAttribute, Stream, StreamOrderedAllocator, UsageStream};

#[test]
fn s1_init_sizes_devices_and_creates_no_context() {
    both(3, |s| {
        assert_eq!(s.alloc.device_count(), 3);
        for d in 0..3 {
            assert!(!s.sim.context_created(d), "{}: device {d} touched at init", s.kind);
            assert_eq!(s.alloc.used_bytes(d), 0);
            assert_eq!(s.alloc.memory_limit(d), u64::MAX);
        }
    });
}

#[test]
fn s2_first_use_configures_pool_and_unifying_stream() {
    both(2, |s| {
        let st = s.stream(0);
        // Another library changed the pool before us: first use must set it back.
        s.sim.set_pool_attribute_raw(0, PoolAttribute::ReleaseThreshold, 0);
        s.sim.set_pool_attribute_raw(0, PoolAttribute::ReuseAllowOpportunistic, 0);
        let p = s.alloc.malloc(0, 4096, st.stream).unwrap();
        let q = s.alloc.malloc(0, 4096, st.stream).unwrap();
        let attr = |a| s.sim.pool_attribute_raw(0, a);
        assert_eq!(attr(PoolAttribute::ReleaseThreshold), u64::MAX);
        assert_eq!(attr(PoolAttribute::ReuseFollowEventDependencies), 1);
        assert_eq!(attr(PoolAttribute::ReuseAllowOpportunistic), 1);
        assert_eq!(attr(PoolAttribute::ReuseAllowInternalDependencies), 1);
        assert_eq!(s.sim.call_count(SimOp::InitDevice), 1, "{}", s.kind);
        assert_eq!(s.sim.call_count(SimOp::CreateStream), 1, "{}: one unifying stream", s.kind);
        assert!(!s.sim.context_created(1), "{}: device 1 untouched", s.kind);
        assert_eq!(s.alloc.used_bytes(0), 8192);
        assert_eq!(s.alloc.memory_limit(0), u64::MAX);
        s.alloc.free(p).unwrap();
        s.alloc.free(q).unwrap();
        s.assert_clean();
    });
}

#[test]
fn s3_zero_size_is_null_without_driver_call() {
    both(1, |s| {
        assert_eq!(s.alloc.malloc(0, 0, NULL).unwrap(), DevicePtr::NULL);
        assert_eq!(s.sim.call_count(SimOp::MallocAsync), 0);
        assert!(!s.sim.context_created(0));
        s.alloc.free(DevicePtr::NULL).unwrap();
    });
}

#[test]
fn s3_exbibyte_and_bad_device_are_errors() {
    both(2, |s| {
        let e = s.alloc.malloc(0, 1 << 60, NULL).unwrap_err();
        assert!(matches!(e, Error::TooLarge { .. }) && e.is_oom(), "{e}");
        assert!(e.to_string().contains("more than 1EB"));
        let e = s.alloc.malloc(2, 16, NULL).unwrap_err();
        assert_eq!(e, Error::InvalidDevice { device: 2, device_count: 2 });
        assert_eq!(s.sim.call_count(SimOp::MallocAsync), 0);
        // Still works afterwards.
        let p = s.alloc.malloc(1, 16, NULL).unwrap();
        s.alloc.free(p).unwrap();
        s.assert_books();
    });
}

#[test]
fn s3_limit_oom_reports_seed_fields() {
    both(1, |s| {
        s.alloc.set_memory_fraction(0.5, 0).unwrap();
        let half = CAPACITY / 2;
        let p = s.alloc.malloc(0, (half - 1024) as usize, NULL).unwrap();
        let calls = s.sim.call_count(SimOp::MallocAsync);
        let e = s.alloc.malloc(0, 2048, NULL).unwrap_err();
        assert_eq!(s.sim.call_count(SimOp::MallocAsync), calls, "limit checked before driver");
        let Error::OutOfMemory(oom) = &e else { panic!("{}: {e:?}", s.kind) };
        assert_eq!(oom.device, 0);
        assert_eq!(oom.allocated, half - 1024);
        assert_eq!(oom.requested, 2048);
        assert_eq!(oom.device_total, CAPACITY);
        assert_eq!(oom.limit, half);
        assert!(oom.device_free <= CAPACITY - (half - 1024));
        let msg = e.to_string();
        for field in [
            "Allocation on device 0 would exceed allowed memory",
            "Currently allocated     : 512.00 MiB",
            "Requested               : 2.00 KiB",
            "Device limit            : 1024.00 MiB",
            "Free (according to CUDA)",
            "memory fraction",
        ] {
            assert!(msg.contains(field), "{}: {field:?} missing from {msg}", s.kind);
        }
        // Exactly at the limit is allowed (used + size > limit is the test).
        let q = s.alloc.malloc(0, 1024, NULL).unwrap();
        assert_eq!(s.alloc.used_bytes(0), half);
        s.alloc.free(q).unwrap();
        s.alloc.free(p).unwrap();
        assert_eq!(s.alloc.used_bytes(0), 0);
        s.assert_clean();
    });
}

#[test]
fn s3_driver_oom_is_reported_and_recovered() {
    both(1, |s| {
        let p = s.alloc.malloc(0, (CAPACITY - (1 << 20)) as usize, NULL).unwrap();
        let e = s.alloc.malloc(0, 2 << 20, NULL).unwrap_err();
        let Error::OutOfMemory(oom) = &e else { panic!("{}: {e:?}", s.kind) };
        assert_eq!(oom.requested, 2 << 20);
        assert_eq!(oom.allocated, CAPACITY - (1 << 20));
        assert_eq!(oom.limit, u64::MAX);
        assert!(e.to_string().contains("unlimited"));
        assert_eq!(
            s.alloc.used_bytes(0),
            CAPACITY - (1 << 20),
            "{}: failed alloc leaks no bytes",
            s.kind
        );
        s.alloc.free(p).unwrap();
        let q = s.alloc.malloc(0, 2 << 20, NULL).unwrap();
        s.alloc.free(q).unwrap();
        s.assert_books();
        s.assert_clean();
    });
}

#[test]
fn s3_block_records_size_stream_device_and_capture() {
    both(2, |s| {
        let st = s.stream(1);
        let p = s.alloc.malloc(1, 1000, st.stream).unwrap();
        s.alloc.begin_capture(1).unwrap();
        let q = s.alloc.malloc(1, 3000, st.stream).unwrap();
        s.alloc.end_capture(1, st.stream).unwrap();
        let snap = s.alloc.snapshot();
        let bp = snap.iter().find(|b| b.ptr == p).unwrap();
        let bq = snap.iter().find(|b| b.ptr == q).unwrap();
        assert_eq!((bp.size, bp.creation_stream, bp.captured), (1000, st, false));
        assert_eq!((bq.size, bq.creation_stream, bq.captured), (3000, st, true));
        assert_eq!(s.alloc.used_bytes(1), 4000);
        s.alloc.free(p).unwrap();
        s.alloc.free(q).unwrap();
        assert_eq!(s.alloc.used_bytes(1), 0);
    });
}

#[test]
fn s4_unknown_and_double_free_are_typed_errors() {
    both(1, |s| {
        let never = DevicePtr::from_raw(0xdead_0000);
        assert_eq!(s.alloc.free(never), Err(Error::UnknownPointer { ptr: never }));
        let p = s.alloc.malloc(0, 512, NULL).unwrap();
        s.alloc.free(p).unwrap();
        assert_eq!(s.alloc.free(p), Err(Error::DoubleFree { ptr: p }));
        let driver_frees = if s.seedlike() { 1 } else { 0 }; // the cache keeps it
        assert_eq!(s.sim.call_count(SimOp::FreeAsync), driver_frees, "{}", s.kind);
        let q = s.alloc.malloc(0, 512, NULL).unwrap();
        s.alloc.free(q).unwrap();
        s.assert_books();
        s.assert_clean();
    });
}

#[test]
fn s4_uncaptured_free_during_capture_is_deferred_and_warned_once() {
    both(1, |s| {
        let cap = s.stream(0);
        let a = s.alloc.malloc(0, 4096, cap.stream).unwrap();
        let b = s.alloc.malloc(0, 4096, cap.stream).unwrap();
        s.alloc.begin_capture(0).unwrap();
        s.sim.begin_capture(cap).unwrap();
        s.alloc.free(a).unwrap();
        s.alloc.free(b).unwrap();
        assert_eq!(s.alloc.free(a), Err(Error::DoubleFree { ptr: a }), "{}", s.kind);
        assert_eq!(s.sim.call_count(SimOp::FreeAsync), 0, "{}: nothing freed in capture", s.kind);
        assert!(s.alloc.snapshot().iter().all(|blk| blk.free_deferred));
        assert_eq!(s.alloc.warnings().uncaptured_free_during_capture, 1, "{}", s.kind);
        assert_eq!(s.alloc.used_bytes(0), 8192, "deferred blocks still count");
        s.alloc.end_capture(0, cap.stream).unwrap();
        s.sim.end_capture(cap).unwrap();
        // The next allocation outside capture flushes the deferred frees.
        let c = s.alloc.malloc(0, 512, cap.stream).unwrap();
        assert_eq!(s.sim.call_count(SimOp::FreeAsync), 2, "{}", s.kind);
        assert_eq!(s.alloc.used_bytes(0), 512);
        s.alloc.free(c).unwrap();
        s.assert_books();
        s.assert_clean();
    });
}

#[test]
fn s4_freeing_captured_block_outside_capture_warns_each_time() {
    both(1, |s| {
        let cap = s.stream(0);
        s.alloc.begin_capture(0).unwrap();
        s.sim.begin_capture(cap).unwrap();
        let a = s.alloc.malloc(0, 4096, cap.stream).unwrap();
        let b = s.alloc.malloc(0, 4096, cap.stream).unwrap();
        s.alloc.end_capture(0, cap.stream).unwrap();
        s.sim.end_capture(cap).unwrap();
        s.alloc.free(a).unwrap();
        s.alloc.free(b).unwrap();
        assert_eq!(s.alloc.warnings().captured_free_outside_capture, 2, "{}", s.kind);
        assert_eq!(s.alloc.used_bytes(0), 0);
        s.assert_clean();
    });
}

#[test]
fn s5_single_stream_block_is_freed_on_its_stream() {
    both(1, |s| {
        let st = s.stream(0);
        let p = s.alloc.malloc(0, 1 << 20, st.stream).unwrap();
        s.sim.launch(st, &[p]).unwrap();
        s.alloc.free(p).unwrap();
        if !s.seedlike() {
            // The front cache keeps it for `st`: the next allocation there gets it back
            // with no driver call. Its flush frees it after a device synchronize on the
            // allocator's own stream (st may be gone by then).
            assert_eq!(s.sim.last_free_stream(), None);
            let q = s.alloc.malloc(0, 1 << 20, st.stream).unwrap();
            assert_eq!((q, s.sim.call_count(SimOp::MallocAsync)), (p, 1));
            s.alloc.free(q).unwrap();
            s.alloc.empty_cache().unwrap();
            let freed_on = s.sim.last_free_stream().unwrap();
            assert!(freed_on != st && freed_on.device == 0, "the unifying stream");
        } else {
            assert_eq!(s.sim.last_free_stream(), Some(st), "{}", s.kind);
        }
        // Freed on st: st can have the memory back at once.
        let q = s.alloc.malloc(0, 1 << 20, st.stream).unwrap();
        if s.seedlike() {
            assert_eq!(q, p, "{}: same-stream reuse", s.kind);
        }
        s.alloc.free(q).unwrap();
        s.assert_clean();
    });
}

#[test]
fn s5_multi_stream_block_goes_through_unifying_stream() {
    // A block used on three streams, one of them on a second device, is freed only after
    // every use: the checker agrees.
    both(2, |s| {
        let (a, b, c) = (s.stream(0), s.stream(0), s.stream(1));
        s.alloc.enable_peer_access(1, 0).unwrap();
        let p = s.alloc.malloc(0, 65536, a.stream).unwrap();
        s.sim.launch(a, &[p]).unwrap();
        s.sim.launch(b, &[p]).unwrap();
        s.sim.launch(c, &[p]).unwrap();
        s.alloc.record_stream(p, b).unwrap();
        s.alloc.record_stream(p, c).unwrap();
        s.alloc.free(p).unwrap();
        let freed_on = s.sim.last_free_stream().unwrap();
        assert_ne!(freed_on, a, "{}: not on the creation stream", s.kind);
        assert_eq!(freed_on.device, 0, "{}: the unifying stream of the block's device", s.kind);
        s.assert_clean();
    });
}

#[test]
fn checker_reports_free_missing_a_recorded_stream_wait() {
    // The same block used on a second stream without record_stream: the free on the
    // creation stream is not ordered after that use, and the checker says so.
    both(1, |s| {
        let (a, b) = (s.stream(0), s.stream(0));
        let p = s.alloc.malloc(0, 4096, a.stream).unwrap();
        s.sim.launch(b, &[p]).unwrap();
        s.alloc.free(p).unwrap();
        let reports = s.sim.take_reports();
        assert_eq!(reports.len(), 1, "{}: {reports:?}", s.kind);
    });
}

#[test]
fn s6_record_stream_rules() {
    both(2, |s| {
        let (a, b, other_dev) = (s.stream(0), s.stream(0), s.stream(1));
        s.alloc.record_stream(DevicePtr::NULL, b).unwrap();
        let never = DevicePtr::from_raw(0xbad_000);
        assert_eq!(s.alloc.record_stream(never, b), Err(Error::UnknownPointer { ptr: never }));
        let p = s.alloc.malloc(0, 4096, a.stream).unwrap();
        s.alloc.record_stream(p, a).unwrap();
        s.alloc.record_stream(p, a).unwrap();
        assert_eq!(s.alloc.warnings().record_on_creation_stream, 1, "{}", s.kind);
        assert!(s.alloc.snapshot()[0].recorded_streams.is_empty(), "creation stream not added");
        s.alloc.record_stream(p, b).unwrap();
        s.alloc.record_stream(p, b).unwrap();
        s.alloc.record_stream(p, other_dev).unwrap();
        assert_eq!(s.alloc.snapshot()[0].recorded_streams, vec![b, other_dev], "{}", s.kind);
        s.alloc.free(p).unwrap();
        assert_eq!(s.alloc.record_stream(p, b), Err(Error::DoubleFree { ptr: p }));
        s.assert_clean();
    });
}

#[test]
fn s7_memory_fraction() {
    both(2, |s| {
        for bad in [-0.1, 1.5, f64::NAN, f64::INFINITY] {
            let e = s.alloc.set_memory_fraction(bad, 0).unwrap_err();
            assert!(matches!(e, Error::InvalidFraction { .. }), "{}: {bad} gave {e:?}", s.kind);
        }
        assert!(matches!(
            s.alloc.set_memory_fraction(0.5, 7),
            Err(Error::InvalidDevice { device: 7, .. })
        ));
        s.alloc.set_memory_fraction(0.25, 1).unwrap();
        assert_eq!(s.alloc.memory_limit(1), CAPACITY / 4);
        assert_eq!(s.alloc.memory_limit(0), u64::MAX);
        s.alloc.set_memory_fraction(0.0, 0).unwrap();
        assert!(s.alloc.malloc(0, 1, NULL).unwrap_err().is_oom());
        s.alloc.set_memory_fraction(1.0, 0).unwrap();
        assert_eq!(s.alloc.memory_limit(0), CAPACITY);
        let p = s.alloc.malloc(0, 1, NULL).unwrap();
        s.alloc.free(p).unwrap();
    });
}

#[test]
fn s8_empty_cache_synchronizes_and_trims() {
    both(2, |s| {
        let st = s.stream(0);
        let ptrs: Vec<_> = (0..8).map(|_| s.alloc.malloc(0, 1 << 20, st.stream).unwrap()).collect();
        for p in ptrs {
            s.alloc.free(p).unwrap();
        }
        assert!(s.sim.pool_reserved(0) >= 8 << 20, "{}: pool keeps freed memory", s.kind);
        let syncs = s.sim.call_count(SimOp::DeviceSynchronize);
        s.alloc.empty_cache().unwrap();
        // One synchronize of device 0 (the cache's flush adds one before its frees).
        let flush = if s.seedlike() { 0 } else { 1 };
        assert_eq!(s.sim.call_count(SimOp::DeviceSynchronize), syncs + 1 + flush, "{}", s.kind);
        assert_eq!(s.sim.pool_reserved(0), 0, "{}", s.kind);
        assert!(!s.sim.context_created(1), "{}: unused device untouched", s.kind);
        s.assert_clean();
    });
}

#[test]
fn s9_cache_info_halves_down_to_what_fits() {
    both(1, |s| {
        s.alloc.set_memory_fraction(0.5, 0).unwrap();
        let p = s.alloc.malloc(0, 100 << 20, NULL).unwrap();
        let guess = s.alloc.cache_info(0, NULL).unwrap();
        // min(free, limit - used) = 412 MiB fits at once.
        assert_eq!(guess, (CAPACITY / 2) - (100 << 20), "{}", s.kind);
        // Fill the device so the driver refuses, forcing halving.
        s.alloc.set_memory_fraction(1.0, 0).unwrap();
        s.alloc.empty_cache().unwrap(); // the trial block went back to the pool: release it
        let q = s.alloc.malloc(0, (CAPACITY - (300 << 20)) as usize, NULL).unwrap();
        let guess = s.alloc.cache_info(0, NULL).unwrap();
        assert!(guess > 0 && guess <= 200 << 20, "{}: {guess}", s.kind);
        let r = s.alloc.malloc(0, guess as usize, NULL).unwrap();
        for x in [p, q, r] {
            s.alloc.free(x).unwrap();
        }
        s.assert_books();
    });
}

#[test]
fn s10_base_allocation() {
    both(1, |s| {
        let p = s.alloc.malloc(0, 12345, NULL).unwrap();
        assert_eq!(s.alloc.base_allocation(p).unwrap(), (p, 12345));
        let never = DevicePtr::from_raw(0x1234_5600);
        assert_eq!(s.alloc.base_allocation(never), Err(Error::UnknownPointer { ptr: never }));
        s.alloc.free(p).unwrap();
    });
}

#[test]
fn s11_stats_come_from_pool_attributes() {
    both(2, |s| {
        assert_eq!(s.alloc.device_stats(1).unwrap(), Default::default());
        assert!(!s.sim.context_created(1), "{}: stats of an unused device", s.kind);
        assert!(matches!(s.alloc.device_stats(2), Err(Error::InvalidDevice { .. })));
        let p = s.alloc.malloc(0, 1 << 20, NULL).unwrap();
        let stats = s.alloc.device_stats(0).unwrap();
        assert_eq!(stats.used_current, s.sim.pool_attribute_raw(0, PoolAttribute::UsedMemCurrent));
        assert_eq!(
            stats.reserved_current,
            s.sim.pool_attribute_raw(0, PoolAttribute::ReservedMemCurrent)
        );
        assert!(stats.used_current >= 1 << 20 && stats.reserved_current >= stats.used_current);
        assert_eq!(stats.allocated_current, 1 << 20);
        s.alloc.free(p).unwrap();
    });
}

#[test]
fn s12_reset_peak_and_accumulated() {
    both(1, |s| {
        let p = s.alloc.malloc(0, 8 << 20, NULL).unwrap();
        s.alloc.free(p).unwrap();
        s.alloc.empty_cache().unwrap();
        let before = s.alloc.device_stats(0).unwrap();
        assert!(before.used_peak >= 8 << 20);
        s.alloc.reset_peak_stats(0).unwrap();
        let after = s.alloc.device_stats(0).unwrap();
        assert_eq!(after.used_peak, after.used_current, "{}", s.kind);
        assert_eq!(after.reserved_peak, after.reserved_current, "{}", s.kind);
        s.alloc.reset_accumulated_stats(0).unwrap();
        s.alloc.reset_accumulated_stats(0).unwrap();
        assert_eq!(s.alloc.warnings().reset_accumulated_stats, 1);
        assert!(s.alloc.reset_peak_stats(5).is_err());
    });
}

#[test]
fn s13_snapshot_lists_every_live_block() {
    both(1, |s| {
        let st = s.stream(0);
        let ps: Vec<_> = (1..=5).map(|i| s.alloc.malloc(0, i * 1000, st.stream).unwrap()).collect();
        let snap = s.alloc.snapshot();
        assert_eq!(snap.len(), 5);
        let total: u64 = snap.iter().map(|b| b.size).sum();
        assert_eq!(total, 15000);
        for p in ps {
            s.alloc.free(p).unwrap();
        }
        assert!(s.alloc.snapshot().is_empty());
    });
}

#[test]
fn s14_s15_one_capture_at_a_time_and_end_requires_begin() {
    both(1, |s| {
        assert_eq!(s.alloc.end_capture(0, NULL), Err(Error::NoCaptureUnderway));
        s.alloc.begin_capture(0).unwrap();
        assert!(s.alloc.capture_underway());
        assert_eq!(s.alloc.begin_capture(0), Err(Error::CaptureAlreadyUnderway));
        assert!(matches!(s.alloc.end_capture(3, NULL), Err(Error::InvalidDevice { .. })));
        s.alloc.end_capture(0, NULL).unwrap();
        assert!(!s.alloc.capture_underway());
        s.alloc.begin_capture(0).unwrap();
        s.alloc.end_capture(0, NULL).unwrap();
    });
}

#[test]
fn s15_capture_stream_joins_every_free_stream() {
    // Fork a side stream into the capture, allocate and free a block there after the
    // user's own join: without the allocator's join at the end the capture would end
    // with unjoined work on the side stream.
    both(1, |s| {
        let (cap, side) = (s.stream(0), s.stream(0));
        let pre = s.alloc.malloc(0, 4096, cap.stream).unwrap();
        s.alloc.begin_capture(0).unwrap();
        s.sim.begin_capture(cap).unwrap();
        s.sim.wait(side, cap).unwrap(); // fork
        let t = s.alloc.malloc(0, 1 << 16, side.stream).unwrap();
        s.sim.launch(side, &[t]).unwrap();
        s.sim.wait(cap, side).unwrap(); // the user's join
        s.alloc.free(pre).unwrap(); // deferred: uncaptured
        s.alloc.free(t).unwrap(); // a free node on `side` after the join
        s.alloc.end_capture(0, cap.stream).unwrap();
        s.sim.end_capture(cap).unwrap();
        s.assert_clean();
        assert!(s.alloc.snapshot().iter().any(|b| b.ptr == pre && b.free_deferred));
        let x = s.alloc.malloc(0, 512, cap.stream).unwrap();
        let snap = s.alloc.snapshot();
        assert!(
            snap.len() == 1 && snap[0].ptr == x && !snap[0].free_deferred,
            "{}: flushed",
            s.kind
        );
        assert_eq!(s.alloc.used_bytes(0), 512);
        s.alloc.free(x).unwrap();
        s.assert_books();
        s.assert_clean();
    });
}

#[test]
fn checker_reports_unjoined_stream_and_uncaptured_free_in_capture() {
    let s = core(1);
    let (cap, side) = (s.stream(0), s.stream(0));
    let pre = s.alloc.malloc(0, 4096, side.stream).unwrap();
    s.sim.begin_capture(cap).unwrap();
    s.sim.wait(side, cap).unwrap();
    s.sim.launch(side, &[pre]).unwrap();
    // Straight to the driver, bypassing the allocator's deferral: the checker objects.
    use streamalloc::Driver;
    assert!(s.sim.free_async(0, pre, 4096, side.stream).is_err());
    assert!(s.sim.end_capture(cap).is_err(), "side stream was never joined");
    let reports = s.sim.take_reports();
    assert_eq!(reports.len(), 2, "{reports:#?}");
}

#[test]
fn s16_release_pool_does_nothing() {
    both(1, |s| {
        let p = s.alloc.malloc(0, 4096, NULL).unwrap();
        let calls = s.sim.total_calls();
        s.alloc.release_pool(0);
        assert_eq!(s.sim.total_calls(), calls);
        s.alloc.free(p).unwrap();
    });
}

#[test]
fn s17_raw_alloc_on_given_stream_and_raw_delete() {
    both(1, |s| {
        let st = s.stream(0);
        let p = s.alloc.malloc(0, 777, st.stream).unwrap();
        assert_eq!(s.alloc.snapshot()[0].creation_stream, st);
        assert_eq!(s.sim.last_malloc_stream(), Some(st));
        s.alloc.free(p).unwrap();
        s.alloc.empty_cache().unwrap();
        assert_eq!(s.sim.live_blocks(0), 0);
    });
}

#[test]
fn s18_peer_access_grants_pool_access() {
    both(2, |s| {
        assert!(!s.sim.peer_access(0, 1));
        s.alloc.enable_peer_access(1, 0).unwrap();
        assert!(s.sim.peer_access(0, 1), "{}: device 0's pool grants device 1", s.kind);
        assert!(!s.sim.peer_access(1, 0));
        assert!(matches!(s.alloc.enable_peer_access(1, 9), Err(Error::InvalidDevice { .. })));
    });
}

#[test]
fn s19_async_copy_kind() {
    both(2, |s| {
        let (a, b) = (s.stream(0), s.stream(1));
        let p = s.alloc.malloc(0, 4096, a.stream).unwrap();
        let q = s.alloc.malloc(0, 4096, a.stream).unwrap();
        let r = s.alloc.malloc(1, 4096, b.stream).unwrap();
        s.alloc.memcpy_async(q, 0, p, 0, 4096, a, false).unwrap();
        assert_eq!(s.sim.last_copy_kind(), Some(CopyKind::DeviceToDevice));
        s.alloc.enable_peer_access(0, 1).unwrap();
        s.alloc.memcpy_async(r, 1, p, 0, 4096, a, true).unwrap();
        assert_eq!(s.sim.last_copy_kind(), Some(CopyKind::DeviceToDevice));
        s.alloc.memcpy_async(r, 1, p, 0, 4096, a, false).unwrap();
        assert_eq!(s.sim.last_copy_kind(), Some(CopyKind::Peer));
        s.alloc.copy_data(0, q, p, 4096).unwrap();
        s.sim.synchronize_all();
        for x in [p, q, r] {
            s.alloc.free(x).unwrap();
        }
        s.assert_clean();
    });
}

#[test]
fn s20_names() {
    assert_eq!(core(1).alloc.name(), "streamalloc");
    assert_eq!(replica(1).alloc.name(), "seed_replica");
}

#[test]
fn s23_sticky_error_is_reported_before_alloc_and_free() {
    both(1, |s| {
        let p = s.alloc.malloc(0, 4096, NULL).unwrap();
        s.sim.set_sticky_error(0, 700);
        let e = s.alloc.malloc(0, 4096, NULL).unwrap_err();
        assert!(matches!(&e, Error::Driver(d) if d.code == 700), "{}: {e:?}", s.kind);
        if s.seedlike() {
            // (A free into the front cache makes no driver call, so there is nothing to
            // report an earlier error through; the next driver-tier call reports it.)
            s.sim.set_sticky_error(0, 700);
            assert!(s.alloc.free(p).is_err());
            assert_eq!(s.alloc.used_bytes(0), 4096, "{}: failed free keeps the block", s.kind);
        }
        s.alloc.free(p).unwrap();
        s.assert_books();
    });
}

#[test]
fn injected_driver_failures_lose_nothing() {
    both(2, |s| {
        let st = s.stream(0);
        let other = s.stream(0);
        let mut live = Vec::new();
        for op in [SimOp::MallocAsync, SimOp::FreeAsync, SimOp::RecordEvent, SimOp::StreamWaitEvent]
        {
            for n in 1..=3 {
                s.sim.fail_nth(op, n, CUDA_ERROR_INVALID_VALUE);
                for i in 0..6 {
                    match s.alloc.malloc(0, 1024 * (i + 1), st.stream) {
                        Ok(p) => live.push(p),
                        Err(e) => assert!(matches!(e, Error::Driver(_)), "{}: {e:?}", s.kind),
                    }
                }
                while let Some(p) = live.pop() {
                    s.alloc.record_stream(p, other).unwrap();
                    if let Err(e) = s.alloc.free(p) {
                        assert!(matches!(e, Error::Driver(_)), "{e:?}");
                        // The block is still ours: freeing again works.
                        s.alloc.free(p).unwrap();
                    }
                }
                s.sim.clear_faults();
                s.assert_books();
                assert_eq!(s.alloc.used_bytes(0), 0, "{}", s.kind);
                assert!(s.alloc.snapshot().is_empty());
            }
        }
        assert_eq!(s.sim.live_blocks(0), 0, "{}: driver holds nothing", s.kind);
    });
}

#[test]
fn capture_scenarios_agree_between_core_and_replica() {
    // The same script on both: every result and the final books match.
    fn script(s: &Subject) -> Vec<String> {
        let mut out = Vec::new();
        let (cap, side) = (s.stream(0), s.stream(0));
        let mut log = |r: String| out.push(r);
        let a = s.alloc.malloc(0, 1000, cap.stream).unwrap();
        let b = s.alloc.malloc(0, 2000, side.stream).unwrap();
        log(format!("{:?}", s.alloc.begin_capture(0)));
        log(format!("{:?}", s.alloc.begin_capture(0)));
        let c = s.alloc.malloc(0, 3000, cap.stream).unwrap();
        log(format!("{:?}", s.alloc.free(a)));
        log(format!("{:?}", s.alloc.free(a)));
        log(format!("{:?}", s.alloc.free(c)));
        log(format!("{:?}", s.alloc.record_stream(b, cap)));
        log(format!("{:?}", s.alloc.used_bytes(0)));
        log(format!("{:?}", s.alloc.end_capture(0, cap.stream)));
        log(format!("{:?}", s.alloc.end_capture(0, cap.stream)));
        log(format!("{:?}", s.alloc.used_bytes(0)));
        let d = s.alloc.malloc(0, 10, cap.stream).unwrap();
        log(format!("{:?}", s.alloc.used_bytes(0)));
        log(format!("{:?}", s.alloc.free(b)));
        log(format!("{:?}", s.alloc.free(d)));
        log(format!("{:?}", s.alloc.warnings()));
        log(format!("{:?}", s.alloc.used_bytes(0)));
        out
    }
    let (c, r) = (core(1), replica(1));
    assert_eq!(script(&c), script(&r));
    c.assert_clean();
    r.assert_clean();
}

#[test]
fn block_handle_frees_on_drop() {
    use std::sync::Arc;
    use streamalloc::{StreamAlloc, StreamOrderedAllocator, sim::SimDriver};
    let sim = Arc::new(SimDriver::with_devices(1, CAPACITY));
    let alloc = StreamAlloc::new(sim.clone()).unwrap();
    let st = UsageStream::new(sim.new_stream(0).unwrap(), 0);
    {
        let blk = alloc.allocate(0, 4096, st.stream).unwrap();
        assert_eq!(blk.size(), 4096);
        assert_eq!(alloc.used_bytes(0), 4096);
        sim.launch(st, &[blk.ptr()]).unwrap();
    }
    assert_eq!(alloc.used_bytes(0), 0);
    let blk = alloc.allocate(0, 4096, st.stream).unwrap();
    blk.free().unwrap();
    assert!(alloc.snapshot().is_empty());
    let _unused: Stream = st.stream;
    assert!(sim.reports().is_empty());
}

#[test]
fn capture_ended_before_the_allocator_hears_of_it_pytorch_order() {
    // PyTorch's CUDAGraph::capture_end calls cudaStreamEndCapture *before*
    // endAllocateToPool. With the capture stream named at begin, every free stream is
    // joined back at once, so the stream capture ends cleanly; without it the side and
    // unifying streams would be left unjoined.
    for named in [true, false] {
        let sim = std::sync::Arc::new(streamalloc::sim::SimDriver::with_devices(1, CAPACITY));
        let alloc = streamalloc::StreamAlloc::new(sim.clone()).unwrap();
        let (cap, side) = (sim.new_usage_stream(0).unwrap(), sim.new_usage_stream(0).unwrap());
        if named {
            alloc.begin_capture_on(0, cap.stream).unwrap();
        } else {
            alloc.begin_capture(0).unwrap();
        }
        sim.begin_capture(cap).unwrap();
        sim.wait(side, cap).unwrap(); // fork
        let b = alloc.malloc(0, 1 << 16, side.stream).unwrap();
        sim.launch(side, &[b]).unwrap();
        sim.wait(cap, side).unwrap(); // the user's join
        sim.launch(cap, &[b]).unwrap();
        alloc.record_stream(b, cap).unwrap();
        alloc.free(b).unwrap(); // through the unifying stream, after the join
        let ended = sim.end_capture(cap);
        alloc.end_capture(0, cap.stream).unwrap();
        assert_eq!(ended.is_ok(), named, "{:?}", sim.reports());
        if named {
            assert!(sim.reports().is_empty(), "{:?}", sim.reports());
        }
    }
}
