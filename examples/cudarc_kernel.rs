//! A kernel launched through cudarc on pooled memory, on the GPU: the input is allocated
//! and filled on a producer stream, the kernel runs on a consumer stream (the use is
//! recorded and ordered by the pooled slice), and the result is read back and checked.
//! Without a GPU it says so and exits with status 2.
//!
//! `cargo run --release --example cudarc_kernel`

use cudarc::driver::{CudaContext, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::Ptx;
use std::sync::Arc;
use streamalloc::interop::PooledSlice;
use streamalloc::{StreamAlloc, StreamOrderedAllocator, UsageStream};

/// `scale_add(out, in, a, n)`: `out[i] = a * in[i] + 1`.
const PTX: &str = include_str!("scale_add.ptx");

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let driver = match streamalloc::cuda::detect() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("cudarc_kernel needs a CUDA GPU and driver, and found none: {e}");
            std::process::exit(2);
        }
    };
    let ctx = CudaContext::new(0)?;
    let scale_add = ctx.load_module(Ptx::from_src(PTX))?.load_function("scale_add")?;
    let (producer, consumer) = (ctx.new_stream()?, ctx.new_stream()?);
    let alloc: Arc<dyn StreamOrderedAllocator> = Arc::new(StreamAlloc::new(driver)?);

    let n: usize = 1 << 20;
    let host: Vec<f32> = (0..n).map(|i| (i % 1000) as f32).collect();
    // Allocated and filled on the producer stream.
    let mut input = PooledSlice::<f32>::alloc(&alloc, &producer, n)?;
    producer.memcpy_htod(&host, &mut input)?;
    // The output lives on the consumer stream.
    let mut output = PooledSlice::<f32>::alloc(&alloc, &consumer, n)?;
    {
        // `input.on(&consumer)`: the consumer waits for the producer's copy, and the
        // input's free will wait for the kernel.
        let input_arg = input.on(&consumer);
        let a = 2.0f32;
        let len = n as u32;
        let mut launch = consumer.launch_builder(&scale_add);
        launch.arg(&mut output).arg(&input_arg).arg(&a).arg(&len);
        // Safety: the kernel's signature is (float*, const float*, float, unsigned) and
        // both buffers hold `n` floats.
        unsafe { launch.launch(LaunchConfig::for_num_elems(len)) }?;
    }
    let recorded = alloc
        .snapshot()
        .into_iter()
        .find(|b| b.ptr == input.ptr())
        .map(|b| b.recorded_streams)
        .unwrap_or_default();
    assert_eq!(recorded, vec![UsageStream::from(&*consumer)], "the consumer use is recorded");

    let result = consumer.clone_dtoh(&output)?;
    let wrong = host.iter().zip(&result).filter(|(x, y)| 2.0 * **x + 1.0 != **y).count();
    // Freed here, the input after the consumer's kernel.
    drop((input, output));
    consumer.synchronize()?;
    println!(
        "scale_add on {} pooled floats through cudarc: {} wrong; allocated now {} bytes",
        n,
        wrong,
        alloc.used_bytes(0)
    );
    if wrong != 0 {
        return Err(format!("{wrong} wrong results").into());
    }
    Ok(())
}
