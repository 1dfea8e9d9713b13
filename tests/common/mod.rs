//! Shared test scaffolding: every scenario runs on both allocators (the lock-free core
//! and the seed replica), each on its own simulated device with the checker on.
#![allow(dead_code)]

use std::sync::Arc;
use streamalloc::sim::SimDriver;
use streamalloc::{SeedReplica, Stream, StreamAlloc, StreamOrderedAllocator, UsageStream};

/// Capacity of each simulated device in tests: 1 GiB.
pub const CAPACITY: u64 = 1 << 30;

/// An allocator under test with its simulated device.
pub struct Subject {
    pub alloc: Box<dyn StreamOrderedAllocator>,
    pub sim: Arc<SimDriver>,
    pub kind: &'static str,
}

impl Subject {
    pub fn stream(&self, device: usize) -> UsageStream {
        UsageStream::new(self.sim.new_stream(device), device)
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

pub fn core(devices: usize) -> Subject {
    let sim = Arc::new(SimDriver::with_devices(devices, CAPACITY));
    Subject { alloc: Box::new(StreamAlloc::new(sim.clone()).unwrap()), sim, kind: "core" }
}

pub fn replica(devices: usize) -> Subject {
    let sim = Arc::new(SimDriver::with_devices(devices, CAPACITY));
    Subject { alloc: Box::new(SeedReplica::new(sim.clone()).unwrap()), sim, kind: "replica" }
}

/// Runs `scenario` on both allocators.
pub fn both(devices: usize, scenario: impl Fn(&Subject)) {
    for s in [core(devices), replica(devices)] {
        scenario(&s);
    }
}

pub const NULL: Stream = Stream::NULL;
