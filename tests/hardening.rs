//! Regression tests for issue 13's defects at the door: bad streams and devices refused
//! where they are given, one rule for capture devices. Each runs on the lock-free core
//! (front cache on, and passthrough) and on the seed replica (`both`).

mod common;

use common::*;
use std::sync::Arc;
use streamalloc::error::{CUDA_ERROR_INVALID_DEVICE, CUDA_ERROR_INVALID_HANDLE};
use streamalloc::sim::SimDriver;
use streamalloc::{Error, Stream, StreamAlloc, StreamOrderedAllocator, UsageStream};

/// A stream handle no driver ever made (the simulated device knows its handles).
fn garbage() -> Stream {
    Stream::simulated(0xdead_0000)
}

/// The block is still usable after a refused record_stream: freed, books at 0, no
/// checker report.
fn assert_freeable(s: &Subject, p: streamalloc::DevicePtr) {
    s.alloc.free(p).unwrap_or_else(|e| panic!("{}: free after a refused record: {e}", s.kind));
    s.alloc.empty_cache().unwrap();
    for d in 0..s.alloc.device_count() {
        assert_eq!(s.alloc.used_bytes(d), 0, "{}: used bytes of device {d}", s.kind);
    }
    assert!(s.alloc.snapshot().is_empty(), "{}", s.kind);
    s.assert_books();
    s.assert_clean();
}

fn assert_invalid_stream(r: Result<(), Error>, stream: Stream, device: usize, kind: &str) {
    match r {
        Err(Error::InvalidStream { stream: st, device: d, cause }) => {
            assert_eq!((st, d), (stream, device), "{kind}");
            assert_eq!(cause.code, CUDA_ERROR_INVALID_HANDLE, "{kind}: {cause}");
        }
        other => panic!("{kind}: expected InvalidStream, got {other:?}"),
    }
}

/// Issue 13, defect 1: a garbage stream handle was accepted by record_stream; every
/// later free of the block failed (cuEventRecord INVALID_HANDLE) and its bytes never
/// came back.
#[test]
fn record_stream_refuses_a_stream_that_does_not_exist() {
    both(1, |s| {
        let st = s.stream(0);
        let p = s.alloc.malloc(0, 4096, st.stream).unwrap();
        let bad = UsageStream::new(garbage(), 0);
        assert_invalid_stream(s.alloc.record_stream(p, bad), bad.stream, 0, s.kind);
        assert!(s.alloc.snapshot()[0].recorded_streams.is_empty(), "{}", s.kind);
        assert_freeable(s, p);
    });
}

/// Defect 1: a destroyed stream is a stream that does not exist.
#[test]
fn record_stream_refuses_a_destroyed_stream() {
    both(1, |s| {
        let st = s.stream(0);
        let gone = s.stream(0);
        let p = s.alloc.malloc(0, 4096, st.stream).unwrap();
        s.sim.destroy_stream(gone).unwrap();
        assert_invalid_stream(s.alloc.record_stream(p, gone), gone.stream, 0, s.kind);
        assert_freeable(s, p);
    });
}

/// Defect 1: a device that does not exist is refused with InvalidDevice.
#[test]
fn record_stream_refuses_a_device_that_does_not_exist() {
    both(2, |s| {
        let st = s.stream(0);
        let p = s.alloc.malloc(0, 4096, st.stream).unwrap();
        for bad in [2, 7, usize::MAX] {
            match s.alloc.record_stream(p, UsageStream::new(Stream::NULL, bad)) {
                Err(Error::InvalidDevice { device, device_count: 2 }) => {
                    assert_eq!(device, bad as i64, "{}", s.kind)
                }
                other => panic!("{}: device {bad}: {other:?}", s.kind),
            }
        }
        assert_freeable(s, p);
    });
}

/// Defect 1: another device's stream named as a stream of this device is refused (and
/// the question itself is no misuse: no checker report).
#[test]
fn record_stream_refuses_another_devices_stream() {
    both(2, |s| {
        let st = s.stream(0);
        let on1 = s.stream(1);
        let p = s.alloc.malloc(0, 4096, st.stream).unwrap();
        let misnamed = UsageStream::new(on1.stream, 0);
        assert_invalid_stream(s.alloc.record_stream(p, misnamed), on1.stream, 0, s.kind);
        // Named with its own device it is fine (S24: a use on another device).
        s.alloc.record_stream(p, on1).unwrap();
        assert_eq!(s.alloc.snapshot()[0].recorded_streams, vec![on1], "{}", s.kind);
        assert_freeable(s, p);
    });
}

/// Valid streams still record: a created stream, and the null stream of every device.
#[test]
fn record_stream_accepts_valid_streams() {
    both(2, |s| {
        let st = s.stream(0);
        let side = s.stream(0);
        let p = s.alloc.malloc(0, 4096, st.stream).unwrap();
        s.alloc.record_stream(p, side).unwrap();
        s.alloc.record_stream(p, UsageStream::new(Stream::NULL, 0)).unwrap();
        s.alloc.record_stream(p, UsageStream::new(Stream::NULL, 1)).unwrap();
        assert_eq!(s.alloc.snapshot()[0].recorded_streams.len(), 3, "{}", s.kind);
        assert_freeable(s, p);
    });
}

/// Defect 1 on the handle API: `Block::record_stream` refuses the same streams, and the
/// handle still frees its block.
#[test]
fn block_record_stream_refuses_bad_streams() {
    let sim = Arc::new(SimDriver::with_devices(2, CAPACITY));
    let alloc = StreamAlloc::new(sim.clone()).unwrap();
    let st = sim.new_stream(0).unwrap();
    let on1 = sim.new_stream(1).unwrap();
    let b = alloc.allocate(0, 4096, st).unwrap();
    assert!(matches!(
        b.record_stream(UsageStream::new(garbage(), 0)),
        Err(Error::InvalidStream { .. })
    ));
    assert!(matches!(b.record_stream(UsageStream::new(on1, 0)), Err(Error::InvalidStream { .. })));
    assert!(matches!(
        b.record_stream(UsageStream::new(Stream::NULL, 9)),
        Err(Error::InvalidDevice { device: 9, .. })
    ));
    b.free().unwrap();
    alloc.empty_cache().unwrap();
    assert_eq!(alloc.used_bytes(0), 0);
    assert_eq!(sim.live_blocks(0), 0);
    sim.assert_clean();
}

/// The refusal comes from the driver's answer: the simulated device's own check says
/// INVALID_HANDLE for unknown and misnamed streams, INVALID_DEVICE for a bad device.
#[test]
fn sim_check_stream_answers() {
    use streamalloc::Driver;
    let sim = SimDriver::with_devices(2, CAPACITY);
    let a = sim.new_stream(0).unwrap();
    assert!(sim.check_stream(UsageStream::new(a, 0)).is_ok());
    assert!(sim.check_stream(UsageStream::new(Stream::NULL, 1)).is_ok());
    let code = |us| sim.check_stream(us).unwrap_err().code;
    assert_eq!(code(UsageStream::new(a, 1)), CUDA_ERROR_INVALID_HANDLE);
    assert_eq!(code(UsageStream::new(garbage(), 0)), CUDA_ERROR_INVALID_HANDLE);
    assert_eq!(code(UsageStream::new(Stream::NULL, 2)), CUDA_ERROR_INVALID_DEVICE);
    sim.destroy_stream(UsageStream::new(a, 0)).unwrap();
    assert_eq!(code(UsageStream::new(a, 0)), CUDA_ERROR_INVALID_HANDLE);
    assert!(sim.reports().is_empty(), "a question is not a use: {:?}", sim.reports());
}

/// Issue 13, defect 8: `begin_capture(99)` was Ok in the core and the replica while
/// `begin_capture_on` and the C ABI refused it. One rule: a device that does not exist
/// is InvalidDevice, and no capture begins.
#[test]
fn begin_capture_refuses_a_device_that_does_not_exist() {
    both(2, |s| {
        for bad in [2, 99, usize::MAX] {
            match s.alloc.begin_capture(bad) {
                Err(Error::InvalidDevice { device, device_count: 2 }) => {
                    assert_eq!(device, bad as i64, "{}", s.kind)
                }
                other => panic!("{}: begin_capture({bad}): {other:?}", s.kind),
            }
            assert!(!s.alloc.capture_underway(), "{}: no capture began", s.kind);
        }
        // A real device still captures, and end_capture refuses a bad device as well.
        let st = s.stream(1);
        s.alloc.begin_capture(1).unwrap();
        assert!(matches!(s.alloc.end_capture(99, st.stream), Err(Error::InvalidDevice { .. })));
        assert!(s.alloc.capture_underway(), "{}", s.kind);
        s.alloc.end_capture(1, st.stream).unwrap();
        s.assert_clean();
    });
}

/// The core's `begin_capture_on` follows the same rule.
#[test]
fn begin_capture_on_refuses_a_device_that_does_not_exist() {
    let sim = Arc::new(SimDriver::with_devices(1, CAPACITY));
    let alloc = StreamAlloc::new(sim.clone()).unwrap();
    assert!(matches!(
        alloc.begin_capture_on(99, Stream::NULL),
        Err(Error::InvalidDevice { device: 99, device_count: 1 })
    ));
    assert!(!alloc.capture_underway());
}
