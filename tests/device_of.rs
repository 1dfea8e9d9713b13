//! `StreamOrderedAllocator::device_of` (issue 13 item 5): a pointer's device and size in
//! one lookup, on the core (cached and passthrough) and the replica, with the errors a
//! free would give.

mod common;

use common::{NULL, both};
use streamalloc::Error;

#[test]
fn device_of_finds_live_blocks_and_refuses_others() {
    both(3, |s| {
        let a = &s.alloc;
        let p0 = a.malloc(0, 4096, NULL).unwrap();
        let p2 = a.malloc(2, 3 << 20, NULL).unwrap();
        assert_eq!(a.device_of(p0), Ok((0, 4096)), "{}", s.kind);
        assert_eq!(a.device_of(p2), Ok((2, 3 << 20)), "{}", s.kind);
        let bogus = streamalloc::DevicePtr::from_raw(0xdead_0000);
        assert_eq!(a.device_of(bogus), Err(Error::UnknownPointer { ptr: bogus }), "{}", s.kind);
        a.free(p2).unwrap();
        assert_eq!(a.device_of(p2), Err(Error::DoubleFree { ptr: p2 }), "{}", s.kind);

        // A block whose free is deferred by a capture is no longer live.
        a.begin_capture(0).unwrap();
        a.free(p0).unwrap();
        assert_eq!(a.device_of(p0), Err(Error::DoubleFree { ptr: p0 }), "{}", s.kind);
        a.end_capture(0, NULL).unwrap();
        s.assert_clean();
    });
}

#[test]
fn alloc_retries_count_mallocs_retried_after_a_driver_oom() {
    let s = common::core(1);
    let a = &s.alloc;
    let blocks: Vec<_> = (0..15).map(|_| a.malloc(0, 64 << 20, NULL).unwrap()).collect();
    for p in blocks {
        a.free(p).unwrap(); // cached: the pool still holds 960 MiB of the 1 GiB
    }
    assert_eq!(a.device_stats(0).unwrap().alloc_retries, 0);
    // The driver runs out, the cache is given back, the malloc is retried (counted
    // whatever the retry's outcome: on the simulated device the flushed frees, issued
    // on the unifying stream, are still pending when the retry asks from the null
    // stream).
    let big = a.malloc(0, 512 << 20, NULL);
    assert_eq!(a.device_stats(0).unwrap().alloc_retries, 1, "{big:?}");
    if let Ok(p) = big {
        a.free(p).unwrap();
    }
    s.assert_clean();
    for s in [common::passthrough(1), common::replica(1)] {
        let p = s.alloc.malloc(0, 512 << 20, NULL).unwrap();
        assert_eq!(s.alloc.device_stats(0).unwrap().alloc_retries, 0, "{}", s.kind);
        s.alloc.free(p).unwrap();
    }
}
