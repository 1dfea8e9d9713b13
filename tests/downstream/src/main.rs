//! A downstream user's program: streamalloc with cudarc's CUDA 12.8 bindings chosen here.
//! Runs on the GPU if there is one, else on the simulated device.

use std::sync::Arc;
use streamalloc::interop::PooledSlice;
use streamalloc::sim::SimDriver;
use streamalloc::{OwnedBlock, StreamAlloc, StreamOrderedAllocator};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    match streamalloc::cuda::detect() {
        Ok(driver) => {
            let ctx = cudarc::driver::CudaContext::new(0)?;
            let stream = ctx.new_stream()?;
            let alloc: Arc<dyn StreamOrderedAllocator> = Arc::new(StreamAlloc::new(driver)?);
            let mut buf = PooledSlice::<u32>::alloc(&alloc, &stream, 256)?;
            let host: Vec<u32> = (0..256).collect();
            stream.memcpy_htod(&host, &mut buf)?;
            assert_eq!(stream.clone_dtoh(&buf)?, host);
            println!("downstream: GPU round trip through a pooled slice ok");
        }
        Err(e) => {
            let sim = Arc::new(SimDriver::with_devices(1, 1 << 30));
            let alloc: Arc<dyn StreamOrderedAllocator> = Arc::new(StreamAlloc::new(sim.clone())?);
            let block = OwnedBlock::allocate(&alloc, 0, 4096, streamalloc::Stream::NULL)?;
            std::thread::spawn(move || drop(block)).join().expect("thread");
            assert_eq!(alloc.used_bytes(0), 0);
            println!("downstream: no GPU ({e}); owned block on the simulated device ok");
        }
    }
    Ok(())
}
