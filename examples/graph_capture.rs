//! Graph capture on the simulated device (no GPU needed), in PyTorch's order: the
//! allocator hears of the capture and its stream, blocks allocated inside are graph
//! allocations, a block from before the capture freed during it is deferred until the
//! capture ends, and a side stream forked into the capture is joined back by the
//! allocator.
//!
//! `cargo run --example graph_capture`

use std::sync::Arc;
use streamalloc::sim::SimDriver;
use streamalloc::{StreamAlloc, StreamOrderedAllocator};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let sim = Arc::new(SimDriver::with_devices(1, 1 << 30));
    let alloc = StreamAlloc::new(sim.clone())?;
    let (cap, side) = (sim.new_usage_stream(0)?, sim.new_usage_stream(0)?);

    // A block from before the capture (say, model weights).
    let weights = alloc.malloc(0, 1 << 20, cap.stream)?;

    // Begin: the allocator first (naming the capture stream), then the stream capture.
    alloc.begin_capture_on(0, cap.stream)?;
    sim.begin_capture(cap)?;

    // Inside the capture: a workspace on the capture stream and one on a forked side stream.
    let work = alloc.malloc(0, 256 << 10, cap.stream)?;
    sim.launch(cap, &[weights, work])?;
    sim.wait(side, cap)?; // fork the side stream into the capture
    let side_buf = alloc.malloc(0, 64 << 10, side.stream)?;
    sim.launch(side, &[side_buf])?;
    sim.wait(cap, side)?; // the user's join
    alloc.free(side_buf)?; // a free node on the side stream, joined by the allocator
    alloc.free(work)?;
    // Freeing an uncaptured block inside the capture is deferred (and warned once).
    alloc.free(weights)?;
    let deferred = alloc.snapshot().iter().filter(|b| b.free_deferred).count();
    println!("during capture: {deferred} deferred free(s), {} bytes live", alloc.used_bytes(0));

    // End: PyTorch ends the stream capture, then tells the allocator.
    let graph = sim.end_capture(cap)?;
    alloc.end_capture(0, cap.stream)?;
    println!(
        "captured graph: {} ops on {} streams, {} graph allocations",
        graph.ops, graph.streams, graph.allocations
    );

    // The next allocation outside the capture flushes the deferred free.
    let after = alloc.malloc(0, 512, cap.stream)?;
    alloc.free(after)?;
    assert_eq!(alloc.used_bytes(0), 0);
    println!("warnings: {:?}", alloc.warnings());

    sim.synchronize_all();
    let reports = sim.reports();
    println!("checker reports: {}", reports.len());
    assert!(reports.is_empty(), "{reports:?}");
    Ok(())
}
