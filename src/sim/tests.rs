//! Unit tests of the simulated device: reuse rules, ordering, completion, capture,
//! faults and every checker report (firing on a wrong sequence, silent on a right one).

use super::*;
use crate::error::DriverError;

const MIB: u64 = 1 << 20;

fn sim() -> SimDriver {
    SimDriver::with_devices(2, 64 * MIB)
}

fn us(s: Stream, d: Device) -> UsageStream {
    UsageStream::new(s, d)
}

fn two_streams(sim: &SimDriver) -> (UsageStream, UsageStream) {
    (sim.new_usage_stream(0).unwrap(), sim.new_usage_stream(0).unwrap())
}

fn has(reports: &[String], needle: &str) -> bool {
    reports.iter().any(|r| r.contains(needle))
}

#[test]
fn name_count_and_bad_devices() {
    let s = sim();
    assert_eq!(s.name(), "sim");
    assert_eq!(s.device_count().unwrap(), 2);
    let e: DriverError = s.malloc_async(2, 8, Stream::NULL).unwrap_err();
    assert_eq!((e.code, e.name.as_str()), (101, "CUDA_ERROR_INVALID_DEVICE"));
    assert_eq!(s.init_device(7).unwrap_err().code, 101);
    assert_eq!(s.mem_get_info(usize::MAX).unwrap_err().code, 101);
    assert_eq!(s.pool_set_access(0, 5).unwrap_err().code, 101);
    assert_eq!(s.capture_status(us(Stream::NULL, 9)).unwrap_err().code, 101);
    assert_eq!(s.new_stream(3).unwrap_err().code, 101);
    assert_eq!(s.launch(us(Stream::NULL, 3), &[]).unwrap_err().code, 101);
    assert_eq!(s.live_blocks(9), 0);
    assert!(!s.context_created(9));
}

#[test]
fn unknown_stream_and_event_are_invalid_handles() {
    let s = sim();
    let bogus = Stream::simulated(0xdead);
    let e = s.malloc_async(0, 8, bogus).unwrap_err();
    assert_eq!(
        (e.code, e.name.as_str(), e.op),
        (400, "CUDA_ERROR_INVALID_HANDLE", "cuMemAllocAsync")
    );
    assert_eq!(s.record_event(us(bogus, 0)).unwrap_err().code, 400);
    let ev = Event::from_raw(12345);
    assert_eq!(s.stream_wait_event(us(Stream::NULL, 0), &ev).unwrap_err().code, 400);
    assert_eq!(s.event_query(0, &ev).unwrap_err().code, 400);
    assert_eq!(s.destroy_event(0, ev).unwrap_err().code, 400);
    let real = s.record_event(us(Stream::NULL, 0)).unwrap();
    let raw = real.as_raw();
    s.destroy_event(0, real).unwrap();
    assert_eq!(s.destroy_event(0, Event::from_raw(raw)).unwrap_err().code, 400);
    s.assert_clean();
}

#[test]
fn streams_are_unique_across_devices_and_null_is_per_device() {
    let s = sim();
    let a = s.create_stream(0).unwrap();
    let b = s.create_stream(1).unwrap();
    let c = s.new_stream(1).unwrap();
    assert!(!a.is_null() && a != b && b != c && a != c);
    assert_eq!(s.stream_device(a), Some(0));
    assert_eq!(s.stream_device(c), Some(1));
    assert_eq!(s.stream_device(Stream::NULL), None);
    // Null stream work on device 0 is not work on device 1's null stream.
    s.launch(us(Stream::NULL, 0), &[]).unwrap();
    assert_eq!(s.ops_on(us(Stream::NULL, 0)), 1);
    assert_eq!(s.ops_on(us(Stream::NULL, 1)), 0);
}

#[test]
fn stream_used_with_wrong_device_is_reported() {
    let s = sim();
    let a = s.new_stream(0).unwrap();
    let e = s.record_event(us(a, 1)).unwrap_err();
    assert_eq!(e.code, 400);
    assert!(has(&s.take_reports(), "belongs to device 0"));
    let e = s.malloc_async(1, 8, a).unwrap_err();
    assert_eq!(e.code, 400);
    assert_eq!(s.take_reports().len(), 1);
    s.record_event(us(a, 0)).unwrap();
    s.assert_clean();
}

#[test]
fn init_creates_no_context_until_a_device_call() {
    let s = sim();
    s.device_count().unwrap();
    s.capture_status(us(Stream::NULL, 0)).unwrap();
    assert!(!s.context_created(0));
    assert!(!s.device_initialized(0));
    // CUDA's defaults before init: threshold 0, flags on.
    assert_eq!(s.pool_attribute(0, PoolAttribute::ReleaseThreshold).unwrap(), 0);
    assert!(s.context_created(0));
    assert!(!s.context_created(1));
    s.init_device(1).unwrap();
    assert!(s.device_initialized(1) && s.context_created(1));
    assert_eq!(s.pool_attribute(1, PoolAttribute::ReleaseThreshold).unwrap(), u64::MAX);
    for a in [
        PoolAttribute::ReuseFollowEventDependencies,
        PoolAttribute::ReuseAllowOpportunistic,
        PoolAttribute::ReuseAllowInternalDependencies,
    ] {
        assert_eq!(s.pool_attribute(1, a).unwrap(), 1);
        s.set_pool_attribute(1, a, 7).unwrap();
        assert_eq!(s.pool_attribute(1, a).unwrap(), 1);
        s.set_pool_attribute(1, a, 0).unwrap();
        assert_eq!(s.pool_attribute(1, a).unwrap(), 0);
    }
}

#[test]
fn same_stream_reuse_is_immediate() {
    let s = sim();
    s.init_device(0).unwrap();
    let a = s.new_stream(0).unwrap();
    let p = s.malloc_async(0, 1000, a).unwrap();
    assert_eq!(p.as_raw() % 512, 0);
    s.launch(us(a, 0), &[p]).unwrap();
    s.free_async(0, p, 1000, a).unwrap();
    let q = s.malloc_async(0, 1000, a).unwrap();
    assert_eq!(p, q);
    assert_eq!(s.pool_reserved(0), 1024);
    s.assert_clean();
}

#[test]
fn cross_stream_reuse_needs_a_wait_or_a_synchronize() {
    for flags_on in [false, true] {
        let s = sim();
        s.init_device(0).unwrap();
        let (a, b) = two_streams(&s);
        let p = s.malloc_async(0, 4096, a.stream).unwrap();
        s.free_async(0, p, 4096, a.stream).unwrap();
        let v = flags_on as u64;
        s.set_pool_attribute(0, PoolAttribute::ReuseFollowEventDependencies, v).unwrap();
        s.set_pool_attribute(0, PoolAttribute::ReuseAllowOpportunistic, v).unwrap();
        // Not ordered: b gets fresh memory.
        let q = s.malloc_async(0, 4096, b.stream).unwrap();
        assert_ne!(p, q);
        s.free_async(0, q, 4096, b.stream).unwrap();
        // After b waits on a, the free on a is ordered before b's malloc.
        s.wait(b, a).unwrap();
        let r = s.malloc_async(0, 4096, b.stream).unwrap();
        // Flags on: both are reusable and the lower address wins the tie; flags off:
        // only the block freed on b itself is.
        assert_eq!(r, if flags_on { p } else { q }, "flags {flags_on}");
        s.assert_clean();
    }
}

#[test]
fn follow_event_dependencies_reuses_after_a_wait() {
    let s = sim();
    s.init_device(0).unwrap();
    let (a, b) = two_streams(&s);
    s.set_pool_attribute(0, PoolAttribute::ReuseAllowOpportunistic, 0).unwrap();
    let p = s.malloc_async(0, 4096, a.stream).unwrap();
    s.free_async(0, p, 4096, a.stream).unwrap();
    s.synchronize_all(); // completed, but opportunistic is off
    let fresh = s.malloc_async(0, 4096, b.stream).unwrap();
    assert_ne!(fresh, p);
    s.wait(b, a).unwrap();
    assert_eq!(s.malloc_async(0, 4096, b.stream).unwrap(), p);
    s.assert_clean();
}

#[test]
fn opportunistic_reuse_after_synchronize() {
    let s = sim();
    s.init_device(0).unwrap();
    let (a, b) = two_streams(&s);
    s.set_pool_attribute(0, PoolAttribute::ReuseFollowEventDependencies, 0).unwrap();
    let p = s.malloc_async(0, 4096, a.stream).unwrap();
    s.free_async(0, p, 4096, a.stream).unwrap();
    s.wait(b, a).unwrap(); // ordered, but following events is off
    let fresh = s.malloc_async(0, 4096, b.stream).unwrap();
    assert_ne!(fresh, p);
    s.device_synchronize(0).unwrap();
    assert_eq!(s.malloc_async(0, 4096, b.stream).unwrap(), p);
    s.assert_clean();
}

#[test]
fn larger_free_block_is_split() {
    let s = sim();
    s.init_device(0).unwrap();
    let a = s.new_stream(0).unwrap();
    let p = s.malloc_async(0, 4096, a).unwrap();
    s.free_async(0, p, 4096, a).unwrap();
    let q = s.malloc_async(0, 1000, a).unwrap();
    let r = s.malloc_async(0, 1000, a).unwrap();
    assert_eq!(q, p);
    assert_eq!(r, p.offset(1024));
    assert_eq!(s.pool_reserved(0), 4096);
    assert_eq!(s.pool_used(0), 2048);
    assert_eq!(s.block_size(q), Some(1000));
    assert_eq!(s.free_blocks(0), 1);
    s.assert_clean();
}

#[test]
fn vector_clocks_are_transitive_through_events() {
    let s = SimDriver::with_devices(2, 64 * MIB);
    let a = s.new_usage_stream(0).unwrap();
    let b = s.new_usage_stream(0).unwrap();
    let c = s.new_usage_stream(1).unwrap();
    s.launch(a, &[]).unwrap();
    assert!(!s.happens_before(a, c));
    s.wait(b, a).unwrap();
    s.wait(c, b).unwrap(); // cross-device event
    assert!(s.happens_before(a, c));
    assert!(!s.happens_before(c, a));
    s.launch(a, &[]).unwrap();
    assert!(!s.happens_before(a, c), "later work on a is not ordered");
    // An event snapshots the clock at record time.
    let ev = s.record_event(a).unwrap();
    s.launch(a, &[]).unwrap();
    s.stream_wait_event(b, &ev).unwrap();
    assert!(!s.happens_before(a, b));
    s.destroy_event(0, ev).unwrap();
    assert_eq!(s.event_count(), 0);
}

#[test]
fn event_query_turns_true_on_host_completion() {
    let s = sim();
    let (a, b) = two_streams(&s);
    let e1 = s.record_event(a).unwrap();
    assert!(!s.event_query(0, &e1).unwrap());
    assert_eq!(s.event_pending(&e1), Some(true));
    // b depends on a: synchronizing b completes a's work up to the event.
    s.stream_wait_event(b, &e1).unwrap();
    let e2 = s.record_event(a).unwrap();
    s.synchronize_stream(b).unwrap();
    assert!(s.event_query(0, &e1).unwrap());
    assert!(!s.event_query(0, &e2).unwrap());
    s.device_synchronize(0).unwrap();
    assert!(s.event_query(0, &e2).unwrap());
}

#[test]
fn free_not_ordered_after_use_is_reported() {
    let s = sim();
    let (a, b) = two_streams(&s);
    let p = s.malloc_async(0, 256, a.stream).unwrap();
    s.launch(b, &[p]).unwrap();
    s.free_async(0, p, 256, a.stream).unwrap();
    let r = s.take_reports();
    assert_eq!(r.len(), 1, "{r:?}");
    assert!(has(&r, "free of") && has(&r, "not ordered after its use"));
    // Correct: a waits on b before freeing.
    let p = s.malloc_async(0, 256, a.stream).unwrap();
    s.launch(b, &[p]).unwrap();
    s.wait(a, b).unwrap();
    s.free_async(0, p, 256, a.stream).unwrap();
    s.assert_clean();
}

#[test]
fn malloc_counts_as_a_use_on_the_allocating_stream() {
    let s = sim();
    let (a, b) = two_streams(&s);
    let p = s.malloc_async(0, 256, a.stream).unwrap();
    s.free_async(0, p, 256, b.stream).unwrap();
    assert!(has(&s.take_reports(), "not ordered after its use"));
    let p = s.malloc_async(0, 256, a.stream).unwrap();
    s.wait(b, a).unwrap();
    s.free_async(0, p, 256, b.stream).unwrap();
    s.assert_clean();
}

#[test]
fn free_after_host_completion_is_fine() {
    let s = sim();
    let (a, b) = two_streams(&s);
    let p = s.malloc_async(0, 256, a.stream).unwrap();
    s.launch(b, &[p]).unwrap();
    s.synchronize_stream(b).unwrap();
    s.synchronize_stream(a).unwrap();
    s.free_async(0, p, 256, a.stream).unwrap();
    s.assert_clean();
}

#[test]
fn unknown_and_double_free_are_reported() {
    let s = sim();
    let a = s.new_stream(0).unwrap();
    let e = s.free_async(0, DevicePtr::from_raw(0x1234), 8, a).unwrap_err();
    assert_eq!((e.code, e.op), (1, "cuMemFreeAsync"));
    assert!(has(&s.take_reports(), "free of unknown pointer"));
    let p = s.malloc_async(0, 8, a).unwrap();
    s.free_async(0, p, 8, a).unwrap();
    assert_eq!(s.free_async(0, p, 8, a).unwrap_err().code, 1);
    assert!(has(&s.take_reports(), "double free"));
    // Freeing through the wrong device is an unknown pointer there.
    let p = s.malloc_async(0, 8, Stream::NULL).unwrap();
    assert_eq!(s.free_async(1, p, 8, Stream::NULL).unwrap_err().code, 1);
    assert_eq!(s.take_reports().len(), 1);
    s.free_async(0, p, 8, Stream::NULL).unwrap();
    s.assert_clean();
}

#[test]
fn use_of_dead_memory_is_reported() {
    let s = sim();
    let a = s.new_usage_stream(0).unwrap();
    let p = s.malloc_async(0, 1024, a.stream).unwrap();
    s.launch(a, &[p, p.offset(100), DevicePtr::NULL]).unwrap();
    s.assert_clean();
    s.free_async(0, p, 1024, a.stream).unwrap();
    s.launch(a, &[p]).unwrap();
    assert!(has(&s.take_reports(), "not live"));
    s.launch(a, &[DevicePtr::from_raw(42)]).unwrap();
    assert!(has(&s.take_reports(), "not live"));
}

#[test]
fn note_cached_and_note_reuse_check_ordering() {
    let s = sim();
    let (a, b) = two_streams(&s);
    let p = s.malloc_async(0, 512, a.stream).unwrap();
    s.launch(a, &[p]).unwrap();
    // Right: cached on a, reused on a.
    s.note_cached(0, p, 512, a.stream);
    assert!(s.is_cached(p));
    s.note_reuse(0, p, 512, a.stream);
    assert!(!s.is_cached(p));
    s.assert_clean();
    // Wrong: cached on a, reused on b with no ordering.
    s.note_cached(0, p, 512, a.stream);
    s.note_reuse(0, p, 512, b.stream);
    let r = s.take_reports();
    assert_eq!(r.len(), 1, "{r:?}");
    assert!(has(&r, "handed out on"));
    // Right: cached on b, a waits on b, reused on a.
    s.launch(b, &[p]).unwrap();
    s.note_cached(0, p, 512, b.stream);
    s.wait(a, b).unwrap();
    s.note_reuse(0, p, 512, a.stream);
    // Right: cached, host synchronized, reused anywhere.
    s.note_cached(0, p, 512, a.stream);
    s.synchronize_all();
    s.note_reuse(0, p, 512, b.stream);
    s.assert_clean();
    // Wrong: cached while a use on another stream is not ordered before.
    s.launch(a, &[p]).unwrap();
    s.note_cached(0, p, 512, b.stream);
    assert!(has(&s.take_reports(), "caching"));
    // Use while cached; reuse of a block never cached; notes on unknown blocks.
    s.launch(b, &[p]).unwrap();
    assert!(has(&s.take_reports(), "idle in the allocator's cache"));
    s.wait(a, b).unwrap();
    s.note_reuse(0, p, 512, a.stream);
    s.note_reuse(0, p, 512, a.stream);
    assert!(has(&s.take_reports(), "never noted as cached"));
    s.note_cached(0, DevicePtr::from_raw(77), 1, a.stream);
    s.note_cached(5, p, 1, a.stream);
    assert_eq!(s.take_reports().len(), 2);
}

#[test]
fn capture_fork_join_and_graph_allocations() {
    let s = sim();
    s.init_device(0).unwrap();
    let (origin, side) = two_streams(&s);
    let id = s.begin_capture(origin).unwrap();
    assert_eq!(s.capture_status(origin).unwrap(), CaptureStatus::Active);
    assert_eq!(s.capture_status(side).unwrap(), CaptureStatus::None);
    // Fork: side waits on an event recorded during the capture.
    s.wait(side, origin).unwrap();
    assert_eq!(s.capture_status(side).unwrap(), CaptureStatus::Active);
    let g = s.malloc_async(0, 2048, side.stream).unwrap();
    s.launch(side, &[g]).unwrap();
    s.free_async(0, g, 2048, side.stream).unwrap();
    let kept = s.malloc_async(0, 512, origin.stream).unwrap();
    // Join back, then end.
    s.wait(origin, side).unwrap();
    let graph = s.end_capture(origin).unwrap();
    assert_eq!(graph.capture_id, id);
    assert_eq!(graph.allocations, 2);
    assert_eq!(graph.streams, 2);
    assert!(graph.ops >= 6);
    assert_eq!(s.capture_status(side).unwrap(), CaptureStatus::None);
    assert!(!s.is_capturing(origin));
    assert_eq!(s.pool_used(0), 512);
    // A captured block freed after the capture on a plain stream is allowed.
    s.wait(side, origin).unwrap();
    s.free_async(0, kept, 512, side.stream).unwrap();
    assert_eq!((s.pool_used(0), s.pool_reserved(0), s.live_blocks(0)), (0, 0, 0));
    s.assert_clean();
}

#[test]
fn capture_with_unjoined_fork_is_reported() {
    let s = sim();
    let (origin, side) = two_streams(&s);
    s.begin_capture(origin).unwrap();
    s.wait(side, origin).unwrap();
    s.launch(side, &[]).unwrap();
    let e = s.end_capture(origin).unwrap_err();
    assert_eq!((e.code, e.name.as_str()), (904, "CUDA_ERROR_STREAM_CAPTURE_UNJOINED"));
    assert!(has(&s.take_reports(), "not joined back"));
    assert!(!s.is_capturing(side) && !s.is_capturing(origin));
    // A join that predates the side stream's last op does not count.
    s.begin_capture(origin).unwrap();
    s.wait(side, origin).unwrap();
    s.wait(origin, side).unwrap();
    s.launch(side, &[]).unwrap();
    assert_eq!(s.end_capture(origin).unwrap_err().code, 904);
    assert_eq!(s.take_reports().len(), 1);
}

#[test]
fn capture_misuse_errors() {
    let s = sim();
    let (origin, side) = two_streams(&s);
    assert_eq!(s.end_capture(origin).unwrap_err().code, CUDA_ERROR_ILLEGAL_STATE);
    s.begin_capture(origin).unwrap();
    assert_eq!(s.begin_capture(origin).unwrap_err().code, CUDA_ERROR_ILLEGAL_STATE);
    s.wait(side, origin).unwrap();
    assert_eq!(s.end_capture(side).unwrap_err().code, CUDA_ERROR_STREAM_CAPTURE_UNMATCHED);
    // A stream of another capture may not wait on this one.
    let other = s.new_usage_stream(0).unwrap();
    s.begin_capture(other).unwrap();
    let ev = s.record_event(origin).unwrap();
    assert_eq!(
        s.stream_wait_event(other, &ev).unwrap_err().code,
        CUDA_ERROR_STREAM_CAPTURE_ISOLATION
    );
    s.end_capture(other).unwrap();
    s.wait(origin, side).unwrap();
    s.end_capture(origin).unwrap();
    s.assert_clean();
}

#[test]
fn uncaptured_free_during_capture_is_refused() {
    let s = sim();
    let (origin, _) = two_streams(&s);
    let p = s.malloc_async(0, 512, origin.stream).unwrap();
    s.begin_capture(origin).unwrap();
    let e = s.free_async(0, p, 512, origin.stream).unwrap_err();
    assert_eq!(e.code, 900);
    assert!(has(&s.take_reports(), "uncaptured free during capture"));
    assert!(s.is_live(p), "not freed");
    assert_eq!(s.capture_status(origin).unwrap(), CaptureStatus::Invalidated);
    let e = s.end_capture(origin).unwrap_err();
    assert_eq!(e.code, 901);
    // A block from an earlier capture is uncaptured for the next one.
    s.begin_capture(origin).unwrap();
    let g = s.malloc_async(0, 512, origin.stream).unwrap();
    s.end_capture(origin).unwrap();
    s.begin_capture(origin).unwrap();
    assert_eq!(s.free_async(0, g, 512, origin.stream).unwrap_err().code, 900);
    assert_eq!(s.take_reports().len(), 1);
    let _ = s.end_capture(origin);
    s.free_async(0, g, 512, origin.stream).unwrap();
    s.free_async(0, p, 512, origin.stream).unwrap();
    s.assert_clean();
}

#[test]
fn uncaptured_free_on_plain_stream_during_capture_is_fine() {
    let s = sim();
    let (origin, plain) = two_streams(&s);
    let p = s.malloc_async(0, 512, plain.stream).unwrap();
    s.begin_capture(origin).unwrap();
    s.free_async(0, p, 512, plain.stream).unwrap();
    s.end_capture(origin).unwrap();
    s.assert_clean();
}

#[test]
fn synchronize_does_not_complete_captured_work() {
    let s = sim();
    let (origin, _) = two_streams(&s);
    let before = s.record_event(origin).unwrap();
    s.begin_capture(origin).unwrap();
    let during = s.record_event(origin).unwrap();
    s.synchronize_all();
    assert!(s.event_query(0, &before).unwrap());
    assert!(!s.event_query(0, &during).unwrap());
    s.end_capture(origin).unwrap();
}

#[test]
fn oom_at_capacity() {
    let s = SimDriver::with_devices(1, 4096);
    s.init_device(0).unwrap();
    let a = s.new_stream(0).unwrap();
    let p = s.malloc_async(0, 3000, a).unwrap();
    let e = s.malloc_async(0, 1025, a).unwrap_err();
    assert!(e.is_oom());
    assert_eq!((e.code, e.name.as_str(), e.op), (2, "CUDA_ERROR_OUT_OF_MEMORY", "cuMemAllocAsync"));
    let q = s.malloc_async(0, 1024, a).unwrap();
    assert_eq!(s.mem_get_info(0).unwrap(), MemInfo { free: 0, total: 4096 });
    assert!(s.malloc_async(0, usize::MAX, a).unwrap_err().is_oom());
    s.free_async(0, p, 3000, a).unwrap();
    s.free_async(0, q, 1024, a).unwrap();
    assert_eq!(s.mem_get_info(0).unwrap().free, 0, "freed memory stays reserved");
    s.assert_clean();
}

#[test]
fn internal_dependencies_under_pressure() {
    let s = SimDriver::with_devices(1, 4096);
    s.init_device(0).unwrap();
    let (a, b) = two_streams(&s);
    let p = s.malloc_async(0, 4096, a.stream).unwrap();
    s.free_async(0, p, 4096, a.stream).unwrap();
    // Device full and the free is not ordered: the driver inserts the wait itself.
    let q = s.malloc_async(0, 4096, b.stream).unwrap();
    assert_eq!(p, q);
    assert!(s.happens_before(a, b));
    s.free_async(0, q, 4096, b.stream).unwrap();
    s.set_pool_attribute(0, PoolAttribute::ReuseAllowInternalDependencies, 0).unwrap();
    let c = s.new_usage_stream(0).unwrap();
    assert!(s.malloc_async(0, 4096, c.stream).unwrap_err().is_oom());
    s.assert_clean();
}

#[test]
fn trim_releases_completed_frees_only() {
    let s = sim();
    s.init_device(0).unwrap();
    let a = s.new_stream(0).unwrap();
    let p = s.malloc_async(0, MIB as usize, a).unwrap();
    let q = s.malloc_async(0, MIB as usize, a).unwrap();
    let live = s.malloc_async(0, MIB as usize, a).unwrap();
    s.free_async(0, p, 0, a).unwrap();
    s.free_async(0, q, 0, a).unwrap();
    s.pool_trim_to(0, 0).unwrap();
    assert_eq!(s.pool_reserved(0), 3 * MIB, "frees not complete yet");
    s.device_synchronize(0).unwrap();
    assert_eq!(s.pool_reserved(0), 3 * MIB, "threshold u64::MAX: sync keeps memory");
    s.pool_trim_to(0, 2 * MIB).unwrap();
    assert_eq!(s.pool_reserved(0), 2 * MIB);
    s.pool_trim_to(0, 0).unwrap();
    assert_eq!(s.pool_reserved(0), MIB, "live memory stays");
    assert_eq!(s.mem_get_info(0).unwrap().free, 63 * MIB);
    s.free_async(0, live, 0, a).unwrap();
    s.set_pool_attribute(0, PoolAttribute::ReleaseThreshold, 0).unwrap();
    s.device_synchronize(0).unwrap();
    assert_eq!(s.pool_reserved(0), 0, "sync trims to the threshold");
    s.assert_clean();
}

#[test]
fn stats_and_high_watermark_reset() {
    let s = sim();
    s.init_device(0).unwrap();
    let a = s.new_stream(0).unwrap();
    let p = s.malloc_async(0, 1000, a).unwrap();
    let q = s.malloc_async(0, 3000, a).unwrap();
    let get = |attr| s.pool_attribute(0, attr).unwrap();
    assert_eq!(get(PoolAttribute::UsedMemCurrent), 1024 + 3072);
    s.free_async(0, q, 3000, a).unwrap();
    assert_eq!(get(PoolAttribute::UsedMemCurrent), 1024);
    assert_eq!(get(PoolAttribute::UsedMemHigh), 4096);
    assert_eq!(get(PoolAttribute::ReservedMemCurrent), 4096);
    assert_eq!(get(PoolAttribute::ReservedMemHigh), 4096);
    s.set_pool_attribute(0, PoolAttribute::UsedMemHigh, 0).unwrap();
    assert_eq!(get(PoolAttribute::UsedMemHigh), 1024);
    s.device_synchronize(0).unwrap();
    s.pool_trim_to(0, 0).unwrap();
    assert_eq!(get(PoolAttribute::ReservedMemCurrent), 1024);
    assert_eq!(get(PoolAttribute::ReservedMemHigh), 4096);
    s.set_pool_attribute(0, PoolAttribute::ReservedMemHigh, 0).unwrap();
    assert_eq!(get(PoolAttribute::ReservedMemHigh), 1024);
    for (attr, v) in [
        (PoolAttribute::UsedMemHigh, 5),
        (PoolAttribute::ReservedMemHigh, 1),
        (PoolAttribute::UsedMemCurrent, 0),
        (PoolAttribute::ReservedMemCurrent, 0),
    ] {
        assert_eq!(s.set_pool_attribute(0, attr, v).unwrap_err().code, 1);
    }
    s.set_pool_attribute(0, PoolAttribute::ReleaseThreshold, 12345).unwrap();
    assert_eq!(get(PoolAttribute::ReleaseThreshold), 12345);
    s.free_async(0, p, 1000, a).unwrap();
    s.assert_clean();
}

#[test]
fn fault_injection_nth_and_always() {
    let s = sim();
    let a = s.new_stream(0).unwrap();
    s.malloc_async(0, 8, a).unwrap();
    s.fail_nth(SimOp::MallocAsync, 2, CUDA_ERROR_OUT_OF_MEMORY);
    let used = s.pool_used(0);
    s.malloc_async(0, 8, a).unwrap();
    let e = s.malloc_async(0, 8, a).unwrap_err();
    assert_eq!((e.code, e.op), (2, "cuMemAllocAsync"));
    assert_eq!(s.pool_used(0), used + 512, "the failed call had no effect");
    s.malloc_async(0, 8, a).unwrap();
    assert_eq!(s.call_count(SimOp::MallocAsync), 4);
    assert_eq!(s.call_count(SimOp::FreeAsync), 0);

    s.fail_always(SimOp::RecordEvent, CUDA_ERROR_UNKNOWN);
    for _ in 0..3 {
        let e = s.record_event(us(a, 0)).unwrap_err();
        assert_eq!((e.code, e.name.as_str()), (999, "CUDA_ERROR_UNKNOWN"));
    }
    assert_eq!(s.event_count(), 0);
    assert_eq!(s.ops_on(us(a, 0)), 3, "failed records enqueue nothing");
    s.clear_faults();
    s.record_event(us(a, 0)).unwrap();
    // The fault comes before the device check: no context for a failed first call.
    s.fail_nth(SimOp::MemGetInfo, 1, 3);
    assert_eq!(s.mem_get_info(1).unwrap_err().code, 3);
    assert!(!s.context_created(1));
}

#[test]
fn sticky_error_is_reported_once() {
    let s = sim();
    s.check_last_error(0).unwrap();
    s.set_sticky_error(0, 700);
    assert_eq!(s.check_last_error(1), Ok(()));
    let e = s.check_last_error(0).unwrap_err();
    assert_eq!((e.code, e.name.as_str()), (700, "CUDA_ERROR_700"));
    s.check_last_error(0).unwrap();
    s.set_sticky_error(99, 1); // ignored
}

#[test]
fn zero_size_malloc_is_null() {
    let s = sim();
    assert_eq!(s.malloc_async(0, 0, Stream::NULL).unwrap(), DevicePtr::NULL);
    assert_eq!(s.pool_used(0), 0);
}

#[test]
fn peer_access_and_copy_kinds() {
    let s = sim();
    let a0 = s.new_usage_stream(0).unwrap();
    let p0 = s.malloc_async(0, 4096, a0.stream).unwrap();
    let q0 = s.malloc_async(0, 4096, a0.stream).unwrap();
    let a1 = s.new_usage_stream(1).unwrap();
    let p1 = s.malloc_async(1, 4096, a1.stream).unwrap();
    assert_eq!(s.last_copy_kind(), None);
    s.memcpy_async(q0, 0, p0, 0, 4096, a0, false).unwrap();
    assert_eq!(s.last_copy_kind(), Some(CopyKind::DeviceToDevice));
    s.memcpy_async(p1, 1, p0, 0, 4096, a0, true).unwrap();
    assert_eq!(s.last_copy_kind(), Some(CopyKind::Peer));
    s.assert_clean();
    // Device-to-device across devices needs pool access.
    assert_eq!(s.memcpy_async(p1, 1, p0, 0, 4096, a0, false).unwrap_err().code, 1);
    assert!(has(&s.take_reports(), "without pool access"));
    assert!(!s.peer_access(1, 0));
    s.pool_set_access(1, 0).unwrap();
    assert!(s.peer_access(1, 0) && !s.peer_access(0, 1));
    s.memcpy_async(p1, 1, p0, 0, 4096, a0, false).unwrap();
    s.launch(a0, &[p1]).unwrap();
    s.assert_clean();
    // A kernel on device 1 touching device 0's pool without access.
    s.launch(a1, &[p0]).unwrap();
    assert!(has(&s.take_reports(), "without pool access"));
    // Overrun.
    s.memcpy_async(q0, 0, p0, 0, 5000, a0, false).unwrap();
    assert!(has(&s.take_reports(), "overruns"));
    s.memcpy(0, q0, p0, usize::MAX).unwrap();
    assert!(has(&s.take_reports(), "overruns"));
}

#[test]
fn sync_memcpy_uses_and_completes_the_null_stream() {
    let s = sim();
    let a = s.new_usage_stream(0).unwrap();
    let p = s.malloc_async(0, 512, a.stream).unwrap();
    let q = s.malloc_async(0, 512, a.stream).unwrap();
    s.wait(us(Stream::NULL, 0), a).unwrap();
    s.memcpy(0, p, q, 512).unwrap();
    assert_eq!(s.call_count(SimOp::Memcpy), 1);
    // The copy completed on the host, so freeing on a is ordered.
    s.free_async(0, p, 512, a.stream).unwrap();
    s.free_async(0, q, 512, a.stream).unwrap();
    s.assert_clean();
}

#[test]
#[should_panic(expected = "sim checker found 1 problem")]
fn assert_clean_panics_with_reports() {
    let s = sim();
    let _ = s.free_async(0, DevicePtr::from_raw(512), 1, Stream::NULL);
    s.assert_clean();
}

#[test]
fn checker_off_records_nothing() {
    let s = SimDriver::new(SimConfig { devices: vec![MIB], checker: false });
    assert!(s.free_async(0, DevicePtr::from_raw(512), 1, Stream::NULL).is_err());
    assert!(s.reports().is_empty());
}

#[test]
fn usable_from_many_threads() {
    let s = std::sync::Arc::new(SimDriver::with_devices(1, 1 << 30));
    std::thread::scope(|scope| {
        for _ in 0..4 {
            let s = &s;
            scope.spawn(move || {
                let st = s.create_stream(0).unwrap();
                for i in 0..200 {
                    let p = s.malloc_async(0, 512 * (i % 7 + 1), st).unwrap();
                    s.launch(us(st, 0), &[p]).unwrap();
                    s.free_async(0, p, 0, st).unwrap();
                }
            });
        }
    });
    assert_eq!(s.live_blocks(0), 0);
    assert_eq!(s.pool_used(0), 0);
    s.assert_clean();
    let _: &dyn Driver = &*s;
}
