//! The device side of the data-loader pipeline, on a GPU ([`GpuRig`]: raw driver calls
//! through cudarc's bindings, the kernel in `sum_words.ptx`) or on the simulated device
//! ([`SimRig`]: copies and kernels are declared uses, so the checker sees the ordering).
//!
//! Per producer thread `t`: its stream, a pinned host batch of [`MAX_BATCH`] bytes (every
//! 32-bit word 1), an event for the hand-off, [`DEPTH`] "done" events bounding the
//! batches in flight, a 4-byte device counter the consumer's kernel adds the batch's words
//! into, and a scratch buffer for `memcpy_only`. One consumer stream for all.

use cudarc::driver::sys::{self, CUevent, CUresult, CUstream};
use cudarc::driver::{CudaContext, CudaFunction, CudaStream};
use std::ffi::c_void;
use std::sync::Arc;
use streamalloc::sim::SimDriver;
use streamalloc::{DevicePtr, UsageStream};

/// The largest batch (8 MiB).
pub const MAX_BATCH: usize = 8 << 20;
/// Batches a producer may have in flight before it waits for the oldest to be consumed.
pub const DEPTH: usize = 4;

/// What the pipeline does on a device, per producer thread `t`.
pub trait Rig: Sync {
    /// Producer `t`'s stream.
    fn producer(&self, t: usize) -> UsageStream;
    /// The consumer stream.
    fn consumer(&self) -> UsageStream;
    /// Makes the calling thread ready to drive the device (binds the context).
    fn enter(&self) -> Result<(), String>;
    /// Copies `bytes` of producer `t`'s pinned batch to `dst`, on its stream.
    fn copy_in(&self, t: usize, dst: DevicePtr, bytes: usize) -> Result<(), String>;
    /// The consumer stream waits for producer `t`'s work so far.
    fn hand_off(&self, t: usize) -> Result<(), String>;
    /// The consumer's kernel reads `bytes` at `src` (into producer `t`'s counter).
    fn consume(&self, t: usize, src: DevicePtr, bytes: usize) -> Result<(), String>;
    /// Marks batch `i` of producer `t` done (on the consumer stream, or on the producer's
    /// when `on_producer`), first waiting until batch `i - DEPTH` is.
    fn step_done(&self, t: usize, i: u64, on_producer: bool) -> Result<(), String>;
    /// Waits for all of producer `t`'s work (its stream and its batches' consumption).
    fn finish(&self, t: usize) -> Result<(), String>;
    /// Producer `t`'s preallocated buffer of [`MAX_BATCH`] bytes (`memcpy_only`).
    fn scratch(&self, t: usize) -> DevicePtr;
    /// Zeroes every counter.
    fn reset_counters(&self) -> Result<(), String>;
    /// Producer `t`'s counter (`None` where kernels do not run, on the simulated device).
    fn counter(&self, t: usize) -> Result<Option<u32>, String>;
}

/// Launch shape of the consumer kernel for a batch of `words` 32-bit words.
pub fn launch_blocks(words: usize) -> u32 {
    words.div_ceil(256 * 8).clamp(1, 512) as u32
}

fn ck(op: &str, r: CUresult) -> Result<(), String> {
    if r == CUresult::CUDA_SUCCESS { Ok(()) } else { Err(format!("{op} failed: {r:?}")) }
}

/// One producer's GPU resources (handles as addresses, so the rig is `Sync`).
struct GpuThread {
    stream: Arc<CudaStream>,
    host: usize,
    handoff: usize,
    done: [usize; DEPTH],
    counter: u64,
    scratch: u64,
}

/// The pipeline on a GPU.
pub struct GpuRig {
    pub ctx: Arc<CudaContext>,
    pub consumer: Arc<CudaStream>,
    pub sum_words: CudaFunction,
    threads: Vec<GpuThread>,
}

const SUM_WORDS_PTX: &str = include_str!("sum_words.ptx");

impl GpuRig {
    /// Device 0's primary context (the allocator's), the kernel, and `n` producers.
    pub fn new(n: usize) -> Result<GpuRig, String> {
        let e = |e: cudarc::driver::DriverError| e.to_string();
        let ctx = CudaContext::new(0).map_err(e)?;
        let module = ctx.load_module(cudarc::nvrtc::Ptx::from_src(SUM_WORDS_PTX)).map_err(e)?;
        let sum_words = module.load_function("sum_words").map_err(e)?;
        let consumer = ctx.new_stream().map_err(e)?;
        ctx.bind_to_thread().map_err(e)?;
        let mut threads = Vec::with_capacity(n);
        for _ in 0..n {
            let stream = ctx.new_stream().map_err(e)?;
            let mut host: *mut c_void = std::ptr::null_mut();
            // Safety: context bound; valid out-pointer.
            ck("cuMemAllocHost", unsafe { sys::cuMemAllocHost_v2(&mut host, MAX_BATCH) })?;
            // Safety: `host` is MAX_BATCH bytes of pinned memory just allocated, 4-aligned.
            unsafe { std::slice::from_raw_parts_mut(host.cast::<u32>(), MAX_BATCH / 4) }.fill(1);
            let event = || -> Result<usize, String> {
                let mut ev: CUevent = std::ptr::null_mut();
                let flags = sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32;
                // Safety: context bound; valid out-pointer.
                ck("cuEventCreate", unsafe { sys::cuEventCreate(&mut ev, flags) })?;
                Ok(ev as usize)
            };
            let handoff = event()?;
            let done = [event()?, event()?, event()?, event()?];
            let (mut counter, mut scratch) = (0u64, 0u64);
            // Safety: context bound; valid out-pointers.
            ck("cuMemAlloc", unsafe { sys::cuMemAlloc_v2(&mut counter, 4) })?;
            // Safety: as above.
            ck("cuMemAlloc", unsafe { sys::cuMemAlloc_v2(&mut scratch, MAX_BATCH) })?;
            threads.push(GpuThread {
                stream,
                host: host as usize,
                handoff,
                done,
                counter,
                scratch,
            });
        }
        let rig = GpuRig { ctx, consumer, sum_words, threads };
        rig.reset_counters()?;
        Ok(rig)
    }

    /// Producer `t`'s cudarc stream.
    pub fn producer_stream(&self, t: usize) -> &Arc<CudaStream> {
        &self.threads[t].stream
    }

    /// Producer `t`'s pinned batch (for cudarc's own copy).
    pub fn host(&self, t: usize, bytes: usize) -> &[u8] {
        // Safety: MAX_BATCH bytes of pinned memory owned by the rig, never written after
        // setup; `bytes <= MAX_BATCH`.
        unsafe { std::slice::from_raw_parts(self.threads[t].host as *const u8, bytes) }
    }

    /// Producer `t`'s counter address.
    pub fn counter_ptr(&self, t: usize) -> u64 {
        self.threads[t].counter
    }
}

impl Drop for GpuRig {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        let _ = self.ctx.synchronize();
        for th in &self.threads {
            // Safety: the rig's own handles, no work pending (synchronized above).
            unsafe {
                sys::cuMemFreeHost(th.host as *mut c_void);
                sys::cuMemFree_v2(th.counter);
                sys::cuMemFree_v2(th.scratch);
                sys::cuEventDestroy_v2(th.handoff as CUevent);
                for &d in &th.done {
                    sys::cuEventDestroy_v2(d as CUevent);
                }
            }
        }
    }
}

impl Rig for GpuRig {
    fn producer(&self, t: usize) -> UsageStream {
        UsageStream::from(&*self.threads[t].stream)
    }
    fn consumer(&self) -> UsageStream {
        UsageStream::from(&*self.consumer)
    }
    fn enter(&self) -> Result<(), String> {
        self.ctx.bind_to_thread().map_err(|e| e.to_string())
    }
    fn copy_in(&self, t: usize, dst: DevicePtr, bytes: usize) -> Result<(), String> {
        let th = &self.threads[t];
        // Safety: context bound on this thread; `host` holds MAX_BATCH >= bytes pinned
        // bytes; `dst` is a live device block of at least `bytes`.
        ck("cuMemcpyHtoDAsync", unsafe {
            sys::cuMemcpyHtoDAsync_v2(
                dst.as_raw(),
                th.host as *const c_void,
                bytes,
                th.stream.cu_stream(),
            )
        })
    }
    fn hand_off(&self, t: usize) -> Result<(), String> {
        let th = &self.threads[t];
        let ev = th.handoff as CUevent;
        // Safety: the thread's own event, recorded on its own stream, waited on by the
        // consumer stream (the wait captures the event's state now, so re-recording it
        // for the next batch is fine).
        ck("cuEventRecord", unsafe { sys::cuEventRecord(ev, th.stream.cu_stream()) })?;
        // Safety: as above.
        ck("cuStreamWaitEvent", unsafe { sys::cuStreamWaitEvent(self.consumer.cu_stream(), ev, 0) })
    }
    fn consume(&self, t: usize, src: DevicePtr, bytes: usize) -> Result<(), String> {
        let words = bytes / 4;
        let (mut data, mut n, mut out) = (src.as_raw(), words as u64, self.threads[t].counter);
        let mut params: [*mut c_void; 3] = [
            (&mut data as *mut u64).cast(),
            (&mut n as *mut u64).cast(),
            (&mut out as *mut u64).cast(),
        ];
        // Safety: sum_words(const unsigned*, unsigned long long, unsigned*): the three
        // parameters point at live u64s; `src` holds `bytes` bytes; the counter is 4
        // bytes; 256 threads per block (a multiple of 32, as the kernel needs).
        ck("cuLaunchKernel", unsafe {
            sys::cuLaunchKernel(
                self.sum_words.cu_function(),
                launch_blocks(words),
                1,
                1,
                256,
                1,
                1,
                0,
                self.consumer.cu_stream(),
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        })
    }
    fn step_done(&self, t: usize, i: u64, on_producer: bool) -> Result<(), String> {
        let th = &self.threads[t];
        let ev = th.done[(i as usize) % DEPTH] as CUevent;
        if i >= DEPTH as u64 {
            // Safety: the thread's own event, recorded DEPTH batches ago.
            ck("cuEventSynchronize", unsafe { sys::cuEventSynchronize(ev) })?;
        }
        let s: CUstream =
            if on_producer { th.stream.cu_stream() } else { self.consumer.cu_stream() };
        // Safety: the thread's own event on a live stream of this context.
        ck("cuEventRecord", unsafe { sys::cuEventRecord(ev, s) })
    }
    fn finish(&self, t: usize) -> Result<(), String> {
        let th = &self.threads[t];
        // Safety: the thread's own stream and events.
        ck("cuStreamSynchronize", unsafe { sys::cuStreamSynchronize(th.stream.cu_stream()) })?;
        for &d in &th.done {
            // Safety: as above (an event never recorded completes at once).
            ck("cuEventSynchronize", unsafe { sys::cuEventSynchronize(d as CUevent) })?;
        }
        Ok(())
    }
    fn scratch(&self, t: usize) -> DevicePtr {
        DevicePtr::from_raw(self.threads[t].scratch)
    }
    fn reset_counters(&self) -> Result<(), String> {
        self.enter()?;
        for th in &self.threads {
            // Safety: context bound; the counter is 4 bytes of device memory; the memset
            // is synchronous with respect to the host.
            ck("cuMemsetD32", unsafe { sys::cuMemsetD32_v2(th.counter, 0, 1) })?;
        }
        Ok(())
    }
    fn counter(&self, t: usize) -> Result<Option<u32>, String> {
        self.enter()?;
        // Safety: context bound; consumer work done.
        ck("cuStreamSynchronize", unsafe { sys::cuStreamSynchronize(self.consumer.cu_stream()) })?;
        let mut v: u32 = 0;
        // Safety: context bound; 4 bytes from the counter into `v`.
        ck("cuMemcpyDtoH", unsafe {
            sys::cuMemcpyDtoH_v2((&mut v as *mut u32).cast(), self.threads[t].counter, 4)
        })?;
        Ok(Some(v))
    }
}

/// The pipeline on the simulated device: copies and kernels are declared uses of the
/// block (`SimDriver::launch`), hand-offs are stream waits; nothing is bounded in flight
/// (completion happens when the host synchronizes).
pub struct SimRig {
    pub sim: Arc<SimDriver>,
    consumer: UsageStream,
    producers: Vec<UsageStream>,
    scratch: Vec<DevicePtr>,
}

impl SimRig {
    /// `n` producers on device 0 of `sim`.
    pub fn new(sim: Arc<SimDriver>, n: usize) -> Result<SimRig, String> {
        use streamalloc::Driver;
        let e = |e: streamalloc::DriverError| e.to_string();
        let consumer = sim.new_usage_stream(0).map_err(e)?;
        let producers: Vec<_> =
            (0..n).map(|_| sim.new_usage_stream(0)).collect::<Result<_, _>>().map_err(e)?;
        let scratch = producers
            .iter()
            .map(|p| sim.malloc_async(0, MAX_BATCH, p.stream))
            .collect::<Result<_, _>>()
            .map_err(e)?;
        Ok(SimRig { sim, consumer, producers, scratch })
    }
}

impl Rig for SimRig {
    fn producer(&self, t: usize) -> UsageStream {
        self.producers[t]
    }
    fn consumer(&self) -> UsageStream {
        self.consumer
    }
    fn enter(&self) -> Result<(), String> {
        Ok(())
    }
    fn copy_in(&self, t: usize, dst: DevicePtr, _bytes: usize) -> Result<(), String> {
        self.sim.launch(self.producers[t], &[dst]).map_err(|e| e.to_string())
    }
    fn hand_off(&self, t: usize) -> Result<(), String> {
        self.sim.wait(self.consumer, self.producers[t]).map_err(|e| e.to_string())
    }
    fn consume(&self, _t: usize, src: DevicePtr, _bytes: usize) -> Result<(), String> {
        self.sim.launch(self.consumer, &[src]).map_err(|e| e.to_string())
    }
    fn step_done(&self, _t: usize, _i: u64, _on_producer: bool) -> Result<(), String> {
        Ok(())
    }
    fn finish(&self, t: usize) -> Result<(), String> {
        self.sim.synchronize_stream(self.producers[t]).map_err(|e| e.to_string())?;
        self.sim.synchronize_stream(self.consumer).map_err(|e| e.to_string())
    }
    fn scratch(&self, t: usize) -> DevicePtr {
        self.scratch[t]
    }
    fn reset_counters(&self) -> Result<(), String> {
        Ok(())
    }
    fn counter(&self, _t: usize) -> Result<Option<u32>, String> {
        Ok(None)
    }
}
