//! Shared test scaffolding: every scenario runs on both allocators (the lock-free core
//! and the seed replica), each on its own simulated device with the checker on.
#![allow(dead_code)]

use std::sync::Arc;
use streamalloc::sim::SimDriver;
use streamalloc::{
    CacheConfig, SeedReplica, Stream, StreamAlloc, StreamOrderedAllocator, UsageStream,
};

/// Capacity of each simulated device in tests: 1 GiB.
pub const CAPACITY: u64 = 1 << 30;

/// An allocator under test with its simulated device.
pub struct Subject {
    pub alloc: Box<dyn StreamOrderedAllocator>,
    pub sim: Arc<SimDriver>,
    pub kind: &'static str,
}

impl Subject {
    /// Whether every malloc and free reaches the driver (no front cache).
    pub fn seedlike(&self) -> bool {
        self.kind != "core"
    }

    pub fn stream(&self, device: usize) -> UsageStream {
        self.sim.new_usage_stream(device).unwrap()
    }

    /// The books: used bytes per device equal the sum of live blocks' sizes.
    pub fn assert_books(&self) {
        let snap = self.alloc.snapshot();
        for d in 0..self.alloc.device_count() {
            let live: u64 =
                snap.iter().filter(|b| b.creation_stream.device == d).map(|b| b.size).sum();
            assert_eq!(self.alloc.used_bytes(d), live, "{}: used bytes of device {d}", self.kind);
        }
    }

    /// No checker report.
    pub fn assert_clean(&self) {
        let reports = self.sim.reports();
        assert!(reports.is_empty(), "{}: checker reports: {reports:#?}", self.kind);
    }
}

/// The lock-free core with its front cache (the default).
pub fn core(devices: usize) -> Subject {
    let sim = Arc::new(SimDriver::with_devices(devices, CAPACITY));
    Subject { alloc: Box::new(StreamAlloc::new(sim.clone()).unwrap()), sim, kind: "core" }
}

/// The lock-free core without a cache: every call reaches the driver, as in the seed.
pub fn passthrough(devices: usize) -> Subject {
    let sim = Arc::new(SimDriver::with_devices(devices, CAPACITY));
    let alloc = StreamAlloc::with_cache(sim.clone(), CacheConfig::passthrough()).unwrap();
    Subject { alloc: Box::new(alloc), sim, kind: "passthrough" }
}

pub fn replica(devices: usize) -> Subject {
    let sim = Arc::new(SimDriver::with_devices(devices, CAPACITY));
    Subject { alloc: Box::new(SeedReplica::new(sim.clone()).unwrap()), sim, kind: "replica" }
}

/// Runs `scenario` on the core (cached and passthrough) and on the replica.
pub fn both(devices: usize, scenario: impl Fn(&Subject)) {
    for s in [core(devices), passthrough(devices), replica(devices)] {
        scenario(&s);
    }
}

pub const NULL: Stream = Stream::NULL;
