//! What the benchmark needs from a device besides the [`Driver`] trait: streams of its
//! own for the worker threads, a way to wait for a stream, and a name.

use std::sync::Arc;
use streamalloc::cuda::{ContextPolicy, CudaDriver};
use streamalloc::sim::{NullDriver, SimConfig, SimDriver};
use streamalloc::{Device, Driver, UsageStream};

/// Capacity of the simulated device: room for 16 threads x 16 live blocks of 1.5 MiB
/// with plenty to spare.
const SIM_CAPACITY: u64 = 64 << 30;

/// A device the workload can run on.
pub trait BenchDevice: Driver {
    /// A new non-blocking stream on `device` for one worker thread.
    fn user_stream(&self, device: Device) -> Result<UsageStream, String>;
    /// Waits until all work on `stream` is done.
    fn sync(&self, stream: UsageStream) -> Result<(), String>;
    /// Gives a stream from [`Self::user_stream`] back.
    ///
    /// # Safety
    /// No copy of `stream` is used afterwards, and no allocator that may still use it
    /// (blocks allocated or cached on it) is alive.
    unsafe fn release_stream(&self, _stream: UsageStream) {}
}

impl BenchDevice for CudaDriver {
    fn user_stream(&self, device: Device) -> Result<UsageStream, String> {
        let s = self.create_stream(device).map_err(|e| e.to_string())?;
        Ok(UsageStream::new(s, device))
    }
    fn sync(&self, stream: UsageStream) -> Result<(), String> {
        self.stream_synchronize(stream).map_err(|e| e.to_string())
    }
    unsafe fn release_stream(&self, stream: UsageStream) {
        // Safety: this function's contract is destroy_stream's.
        if let Err(e) = unsafe { self.destroy_stream(stream) } {
            eprintln!("warning: destroying a bench stream failed: {e}");
        }
    }
}

impl BenchDevice for SimDriver {
    fn user_stream(&self, device: Device) -> Result<UsageStream, String> {
        self.new_usage_stream(device).map_err(|e| e.to_string())
    }
    fn sync(&self, stream: UsageStream) -> Result<(), String> {
        self.synchronize_stream(stream).map_err(|e| e.to_string())
    }
}

impl BenchDevice for NullDriver {
    fn user_stream(&self, device: Device) -> Result<UsageStream, String> {
        let s = self.create_stream(device).map_err(|e| e.to_string())?;
        Ok(UsageStream::new(s, device))
    }
    fn sync(&self, _stream: UsageStream) -> Result<(), String> {
        Ok(())
    }
}

/// The device the driver variants run on: the GPU when one is found, else the simulator.
pub enum DeviceBackend {
    /// A real GPU through the CUDA driver API.
    Cuda(Arc<CudaDriver>),
    /// The simulated device (one mutex inside: it does not scale, it only shows that the
    /// benchmark runs and that the allocators' stream ordering is right).
    Sim(Arc<SimDriver>),
}

impl DeviceBackend {
    /// The GPU if `cuda::detect()` finds one (and `force_sim` is off), else the simulator.
    /// The second value says why the simulator was chosen.
    pub fn pick(force_sim: bool) -> (DeviceBackend, Option<String>) {
        let why = if force_sim {
            "--sim given".to_string()
        } else {
            match streamalloc::cuda::detect() {
                Ok(d) => {
                    let d = d.with_context_policy(ContextPolicy::Cached);
                    return (DeviceBackend::Cuda(Arc::new(d)), None);
                }
                Err(e) => e.to_string(),
            }
        };
        let mut config = SimConfig::default();
        config.devices = vec![SIM_CAPACITY];
        let sim = SimDriver::new(config);
        (DeviceBackend::Sim(Arc::new(sim)), Some(why))
    }

    /// Whether this is a real GPU.
    pub fn is_gpu(&self) -> bool {
        matches!(self, DeviceBackend::Cuda(_))
    }

    /// The card's name (`cuDeviceGetName` of device 0), or "sim".
    pub fn card_name(&self) -> String {
        match self {
            DeviceBackend::Cuda(d) => d.device_name(0).unwrap_or_else(|_| "cuda".to_string()),
            DeviceBackend::Sim(_) => "sim".to_string(),
        }
    }

    /// Configures device 0's pool the way the allocators do on first use (S2: release
    /// threshold `u64::MAX`, reuse flags on), so that `raw_driver` is measured on the
    /// same pool settings as the allocators and PyTorch's backend.
    pub fn init(&self) -> Result<(), String> {
        match self {
            DeviceBackend::Cuda(d) => d.init_device(0),
            DeviceBackend::Sim(d) => d.init_device(0),
        }
        .map_err(|e| e.to_string())
    }
}

/// `n` streams on device 0 of `dev`, one per worker thread, reused by every measurement.
pub fn make_streams<D: BenchDevice>(dev: &D, n: usize) -> Result<Vec<UsageStream>, String> {
    (0..n).map(|_| dev.user_stream(0)).collect()
}
