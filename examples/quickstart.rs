//! Quickstart on the simulated device (no GPU needed): the pointer API, the owned handle,
//! a use on a second stream, statistics, and a typed error.
//!
//! `cargo run --example quickstart`

use std::sync::Arc;
use streamalloc::sim::SimDriver;
use streamalloc::{Error, OwnedBlock, StreamAlloc, StreamOrderedAllocator};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A simulated device of 1 GiB whose checker reports any stream-ordering mistake.
    // On a GPU: `StreamAlloc::new(streamalloc::cuda::detect()?)`.
    let sim = Arc::new(SimDriver::with_devices(1, 1 << 30));
    let alloc = Arc::new(StreamAlloc::new(sim.clone())?);
    let stream = sim.new_usage_stream(0)?;
    let other = sim.new_usage_stream(0)?;

    // Raw pointers, as PyTorch uses them: allocate on a stream, declare other streams
    // that use the block, free (the free waits for all of them).
    let p = alloc.malloc(0, 1 << 20, stream.stream)?;
    sim.launch(stream, &[p])?; // a kernel on the allocating stream
    sim.wait(other, stream)?; // the second stream waits for it...
    sim.launch(other, &[p])?; // ...and uses the block too
    alloc.record_stream(p, other)?;
    alloc.free(p)?;

    // An owned handle: Send + Sync + 'static, freed when dropped.
    let block = OwnedBlock::allocate(&alloc, 0, 64 << 10, stream.stream)?;
    println!("owned block: {} bytes at {} on device {}", block.size(), block.ptr(), block.device());
    let stats = alloc.device_stats(0)?;
    println!(
        "allocated now: {} bytes, pool reserved: {} bytes",
        stats.allocated_current, stats.reserved_current
    );
    drop(block);
    assert_eq!(alloc.used_bytes(0), 0);

    // Bad input is a typed error, and the allocator keeps working.
    let q = alloc.malloc(0, 512, stream.stream)?;
    alloc.free(q)?;
    match alloc.free(q) {
        Err(Error::DoubleFree { ptr }) => println!("double free of {ptr} refused"),
        other => return Err(format!("expected a double free error, got {other:?}").into()),
    }

    sim.synchronize_all();
    let reports = sim.reports();
    println!("checker reports: {}", reports.len());
    assert!(reports.is_empty(), "{reports:?}");
    Ok(())
}
