//! A many-threaded data loader on the simulated device (no GPU needed): producer threads,
//! each with its own stream, allocate a batch buffer of varying size, "copy" a batch in
//! (a kernel on the producer stream), and send the owned buffer through a channel to a
//! consumer thread, whose stream waits for the producer, uses the batch (the use
//! recorded), and drops it. The simulated device checks that every free is ordered after
//! every use.
//!
//! `cargo run --example data_loader [-- PRODUCERS BATCHES_PER_PRODUCER]`

use std::sync::Arc;
use std::sync::mpsc;
use std::time::Instant;
use streamalloc::sim::SimDriver;
use streamalloc::{OwnedBlock, StreamAlloc, StreamOrderedAllocator, UsageStream};

/// A batch in flight: the buffer and the stream its copy was enqueued on.
struct Batch {
    buffer: OwnedBlock,
    producer: UsageStream,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<usize>());
    let producers = args.next().transpose()?.unwrap_or(8);
    let batches = args.next().transpose()?.unwrap_or(200);

    let sim = Arc::new(SimDriver::with_devices(1, 8 << 30));
    let alloc: Arc<dyn StreamOrderedAllocator> = Arc::new(StreamAlloc::new(sim.clone())?);
    let consumer = sim.new_usage_stream(0)?;
    let (tx, rx) = mpsc::sync_channel::<Batch>(2 * producers);
    let t0 = Instant::now();

    let workers: Vec<_> = (0..producers)
        .map(|p| {
            let (tx, sim, alloc) = (tx.clone(), sim.clone(), alloc.clone());
            std::thread::spawn(move || -> streamalloc::Result<u64> {
                let stream = sim.new_usage_stream(0)?;
                let mut bytes = 0;
                for i in 0..batches {
                    // 4 KiB .. 8 MiB, varying per producer and batch.
                    let size = 4096 << ((p * 7 + i * 3) % 12);
                    let buffer = OwnedBlock::allocate(&alloc, 0, size, stream.stream)?;
                    sim.launch(stream, &[buffer.ptr()])?; // the host-to-device copy
                    bytes += size as u64;
                    if tx.send(Batch { buffer, producer: stream }).is_err() {
                        break; // the consumer is gone
                    }
                }
                Ok(bytes)
            })
        })
        .collect();
    drop(tx);

    let mut consumed = 0usize;
    for batch in rx {
        sim.wait(consumer, batch.producer)?; // the data is ordered after the copy
        let ptr = batch.buffer.use_on(consumer)?; // the free is ordered after this use
        sim.launch(consumer, &[ptr])?; // the training step reads the batch
        consumed += 1;
        // `batch` drops here: the buffer is freed after the consumer's kernel.
    }
    let mut bytes = 0;
    for w in workers {
        bytes += w.join().map_err(|_| "producer panicked")??;
    }
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "{producers} producers, {consumed} batches, {:.1} MiB in {secs:.3} s on the simulated \
         device ({:.0} batches/s; simulated, so not GPU speed)",
        bytes as f64 / (1 << 20) as f64,
        consumed as f64 / secs
    );
    assert_eq!(consumed, producers * batches);
    assert_eq!(alloc.used_bytes(0), 0, "every batch was freed");
    sim.synchronize_all();
    let reports = sim.reports();
    println!("checker reports: {}", reports.len());
    assert!(reports.is_empty(), "{reports:?}");
    Ok(())
}
