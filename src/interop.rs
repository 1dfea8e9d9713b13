//! cudarc interop: pooled memory that cudarc's copies, kernel launches and libraries take
//! directly, and conversions between cudarc's streams and streamalloc's.
//!
//! ```text
//!   cudarc: memcpy_htod / memcpy_dtoh / launch_builder / cuBLAS ...
//!        │ DevicePtr, DevicePtrMut, DeviceSlice, PushKernelArg
//!        ▼
//!   PooledSlice<T>  = OwnedBlock (allocator's pointer API) + bound Arc<CudaStream> + length
//!        │ a use on another stream: record_stream (the free waits for it) and event
//!        │ ordering of the data (as cudarc's own CudaSlice does)
//!        ▼
//!   StreamAlloc<CudaDriver> (or any StreamOrderedAllocator over the same device)
//! ```
//!
//! The allocator and cudarc must drive the same device through the same context:
//! [`crate::cuda::CudaDriver`] uses each device's primary context, as
//! [`CudaContext::new`] does.
//!
//! # The stream rules
//! A [`PooledSlice`] is bound to the stream it was allocated on. When cudarc asks for its
//! pointer on another stream (a copy or a launch there):
//! 1. the use is recorded with the allocator (`record_stream`, S6), so the block's free is
//!    ordered after that stream's work: memory safety does not depend on the caller;
//! 2. when the context manages stream synchronization (cudarc's default), that stream
//!    first waits for the work so far on the bound stream and on earlier foreign streams,
//!    and an event recorded after the use makes the next use on the bound stream wait for
//!    it: the data is ordered as cudarc's own `CudaSlice` orders it.
//!
//! Taken as a kernel argument (`launch_builder(..).arg(&slice)`) the slice is used on its
//! bound stream (cudarc's builder does not tell an argument which stream it launches
//! on); to launch on another stream pass [`PooledSlice::on`]`(&stream)` instead.
//!
//! ```no_run
//! use std::sync::Arc;
//! use cudarc::driver::CudaContext;
//! use streamalloc::cuda::CudaDriver;
//! use streamalloc::interop::PooledSlice;
//! use streamalloc::{StreamAlloc, StreamOrderedAllocator};
//!
//! let ctx = CudaContext::new(0)?;
//! let stream = ctx.new_stream()?;
//! let alloc: Arc<dyn StreamOrderedAllocator> = Arc::new(StreamAlloc::new(CudaDriver::new()?)?);
//! let mut buf = PooledSlice::<f32>::alloc(&alloc, &stream, 1024)?;
//! stream.memcpy_htod(&vec![1.0f32; 1024], &mut buf)?;
//! let back = stream.clone_dtoh(&buf)?;
//! assert_eq!(back, vec![1.0f32; 1024]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use crate::api::StreamOrderedAllocator;
use crate::error::{Error, Result};
use crate::owned::OwnedBlock;
use crate::types::{DevicePtr, Stream, UsageStream};
use cudarc::driver::{
    CudaContext, CudaEvent, CudaStream, DevicePtr as CuDevicePtr, DevicePtrMut, DeviceRepr,
    DeviceSlice, LaunchArgs, PushKernelArg, SyncOnDrop, sys,
};
use std::fmt;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

impl From<&CudaStream> for UsageStream {
    /// The cudarc stream's handle with its device (the context's ordinal).
    fn from(stream: &CudaStream) -> Self {
        UsageStream::new(Stream::from(stream), stream.context().ordinal())
    }
}

impl From<&CudaStream> for Stream {
    /// The cudarc stream's `CUstream` handle.
    fn from(stream: &CudaStream) -> Self {
        // Safety: a live `CUstream` owned by cudarc; the returned handle is valid while
        // `stream` lives, which is the contract `from_raw` states (as for any handle the
        // caller keeps past the stream's life, using it later is the caller's error,
        // exactly as with the `CudaStream` itself).
        unsafe { Stream::from_raw(stream.cu_stream() as usize) }
    }
}

/// A cudarc stream for a streamalloc stream of `ctx`'s device, borrowed: dropping it
/// does not destroy the stream ([`CudaContext::wrap_borrowed_stream`]).
///
/// # Safety
/// `stream` must be a live stream of `ctx` (or [`Stream::NULL`]) and outlive the returned
/// wrapper and anything that retains it.
pub unsafe fn borrow_stream(ctx: &Arc<CudaContext>, stream: Stream) -> Arc<CudaStream> {
    // Safety: the caller guarantees the handle is a live stream of this context that
    // outlives the wrapper; the wrapper never destroys it.
    unsafe { ctx.wrap_borrowed_stream(stream.as_raw() as sys::CUstream) }
}

/// `len` values of `T` in pooled device memory, bound to a cudarc stream: cudarc's
/// copies, kernel launches and libraries take it as they take a `CudaSlice<T>`. Freed
/// through the allocator when dropped (see the [module documentation](self) for the
/// stream rules). `Send + Sync + 'static`.
pub struct PooledSlice<T, A: StreamOrderedAllocator + ?Sized = dyn StreamOrderedAllocator> {
    block: OwnedBlock<A>,
    /// The block's address as cudarc passes it (kernel arguments point at this field).
    cu_ptr: sys::CUdeviceptr,
    len: usize,
    stream: Arc<CudaStream>,
    /// Recorded after the latest use on a foreign stream; each foreign use first waits
    /// on it, so it covers every foreign use so far. Made on the first foreign use.
    foreign: OnceLock<CudaEvent>,
    /// Whether a foreign use happened since the bound stream last waited on `foreign`.
    foreign_pending: AtomicBool,
    _values: PhantomData<fn() -> T>,
}

impl<T: DeviceRepr, A: StreamOrderedAllocator + ?Sized> PooledSlice<T, A> {
    /// Allocates `len` values of `T` on `stream`'s device, ordered on `stream` (to which
    /// the slice is bound).
    ///
    /// Errors: `len * size_of::<T>()` overflowing is [`Error::TooLarge`]; otherwise those
    /// of the allocator's `malloc`.
    pub fn alloc(alloc: &Arc<A>, stream: &Arc<CudaStream>, len: usize) -> Result<Self> {
        let bytes = len
            .checked_mul(std::mem::size_of::<T>())
            .ok_or(Error::TooLarge { requested: u64::MAX })?;
        let device = stream.context().ordinal();
        let block = OwnedBlock::allocate(alloc, device, bytes, Stream::from(&**stream))?;
        Ok(Self::bind(block, stream.clone(), len))
    }

    /// Wraps an owned block allocated on `stream` (its creation stream): as many values
    /// of `T` as fit. A block made on another stream or device is refused with
    /// [`Error::UnknownPointer`] (and given back, freed).
    pub fn from_block(block: OwnedBlock<A>, stream: Arc<CudaStream>) -> Result<Self> {
        if block.usage_stream() != UsageStream::from(&*stream) {
            return Err(Error::UnknownPointer { ptr: block.ptr() });
        }
        let len = block.size().checked_div(std::mem::size_of::<T>()).unwrap_or(0);
        Ok(Self::bind(block, stream, len))
    }

    fn bind(block: OwnedBlock<A>, stream: Arc<CudaStream>, len: usize) -> Self {
        PooledSlice {
            cu_ptr: block.ptr().as_raw(),
            block,
            len,
            stream,
            foreign: OnceLock::new(),
            foreign_pending: AtomicBool::new(false),
            _values: PhantomData,
        }
    }

    /// The owned block underneath.
    pub fn block(&self) -> &OwnedBlock<A> {
        &self.block
    }

    /// The owned block, unbound (the slice's event, if any, is released).
    pub fn into_block(self) -> OwnedBlock<A> {
        self.block
    }

    /// The device address.
    pub fn ptr(&self) -> DevicePtr {
        self.block.ptr()
    }

    /// The number of values.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the slice holds no values.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The stream the slice is bound to.
    pub fn bound_stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The slice as a kernel argument for a launch on `stream` (another stream than the
    /// bound one: the use is recorded and ordered, see the [module
    /// documentation](self)). Keep the returned value until the launch is enqueued.
    pub fn on<'a>(&'a self, stream: &'a CudaStream) -> PooledArg<'a> {
        let sync = self.prepare(stream);
        PooledArg { ptr: &self.cu_ptr, _sync: sync }
    }

    /// Orders a use on `stream` and returns what to do once it is enqueued.
    fn prepare<'a>(&'a self, stream: &'a CudaStream) -> SyncOnDrop<'a> {
        let ctx = stream.context();
        let tracking = ctx.is_managing_stream_synchronization();
        if UsageStream::from(stream) == self.block.usage_stream() {
            // The bound stream: wait for the foreign uses since the last time.
            if tracking && self.foreign_pending.swap(false, Ordering::AcqRel) {
                if let Some(ev) = self.foreign.get() {
                    ctx.record_err(stream.wait(ev));
                }
            }
            return SyncOnDrop::Record(None);
        }
        // A foreign stream. First the allocator's rule: the free waits for this stream.
        if let Err(e) = self.block.use_on(UsageStream::from(stream)) {
            // Cannot happen for a live owned block; if it does, the use must not outlive
            // the memory: the host waits for it right after it is enqueued.
            log::error!("record_stream of pooled slice {} failed: {e}", self.ptr());
            return SyncOnDrop::sync_stream(stream);
        }
        if !tracking {
            return SyncOnDrop::Record(None);
        }
        // Then the data: wait for the bound stream and for earlier foreign uses.
        ctx.record_err(stream.join(&self.stream));
        if self.foreign_pending.load(Ordering::Acquire) {
            if let Some(ev) = self.foreign.get() {
                ctx.record_err(stream.wait(ev));
            }
        }
        let ev = match self.foreign.get() {
            Some(ev) => ev,
            None => match ctx.new_event(None) {
                Ok(ev) => self.foreign.get_or_init(|| ev),
                Err(e) => {
                    ctx.record_err::<()>(Err(e));
                    return SyncOnDrop::sync_stream(stream);
                }
            },
        };
        self.foreign_pending.store(true, Ordering::Release);
        SyncOnDrop::Record(Some((ev, stream)))
    }
}

impl<T, A: StreamOrderedAllocator + ?Sized> fmt::Debug for PooledSlice<T, A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PooledSlice")
            .field("block", &self.block)
            .field("len", &self.len)
            .field("type", &std::any::type_name::<T>())
            .finish_non_exhaustive()
    }
}

impl<T, A: StreamOrderedAllocator + ?Sized> DeviceSlice<T> for PooledSlice<T, A> {
    fn len(&self) -> usize {
        self.len
    }
    fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
}

impl<T: DeviceRepr, A: StreamOrderedAllocator + ?Sized> CuDevicePtr<T> for PooledSlice<T, A> {
    fn device_ptr<'a>(&'a self, stream: &'a CudaStream) -> (sys::CUdeviceptr, SyncOnDrop<'a>) {
        (self.cu_ptr, self.prepare(stream))
    }
}

impl<T: DeviceRepr, A: StreamOrderedAllocator + ?Sized> DevicePtrMut<T> for PooledSlice<T, A> {
    fn device_ptr_mut<'a>(
        &'a mut self,
        stream: &'a CudaStream,
    ) -> (sys::CUdeviceptr, SyncOnDrop<'a>) {
        (self.cu_ptr, self.prepare(stream))
    }
}

/// Safety: pushes the address of `cu_ptr`, a `CUdeviceptr` that lives as long as the
/// borrowed slice (`'b: 'a`, so past the launch). The launch is taken to be on the
/// bound stream, which first waits for foreign uses (enqueued now, before the launch).
unsafe impl<'a, 'b: 'a, T: DeviceRepr, A: StreamOrderedAllocator + ?Sized>
    PushKernelArg<&'b PooledSlice<T, A>> for LaunchArgs<'a>
{
    #[inline(always)]
    fn arg(&mut self, arg: &'b PooledSlice<T, A>) -> &mut Self {
        drop(arg.prepare(&arg.stream));
        self.arg(&arg.cu_ptr)
    }
}

/// Safety: as for `&PooledSlice`.
unsafe impl<'a, 'b: 'a, T: DeviceRepr, A: StreamOrderedAllocator + ?Sized>
    PushKernelArg<&'b mut PooledSlice<T, A>> for LaunchArgs<'a>
{
    #[inline(always)]
    fn arg(&mut self, arg: &'b mut PooledSlice<T, A>) -> &mut Self {
        drop(arg.prepare(&arg.stream));
        self.arg(&arg.cu_ptr)
    }
}

/// A [`PooledSlice`] as a kernel argument for a launch on another stream than its bound
/// one ([`PooledSlice::on`]). Dropped after the launch is enqueued, it records the
/// slice's event there, so the bound stream's next use waits for the kernel.
#[must_use = "pass it to the launch builder, and drop it after the launch"]
pub struct PooledArg<'a> {
    ptr: &'a sys::CUdeviceptr,
    _sync: SyncOnDrop<'a>,
}

impl fmt::Debug for PooledArg<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PooledArg").field("ptr", &format_args!("{:#x}", self.ptr)).finish()
    }
}

/// Safety: pushes the address of the slice's `CUdeviceptr`, borrowed for `'c` which
/// outlives the builder (`'c: 'b: 'a`).
unsafe impl<'a, 'b: 'a, 'c: 'b> PushKernelArg<&'b PooledArg<'c>> for LaunchArgs<'a> {
    #[inline(always)]
    fn arg(&mut self, arg: &'b PooledArg<'c>) -> &mut Self {
        self.arg(arg.ptr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooled_slices_are_send_sync_static() {
        fn check<T: Send + Sync + 'static>() {}
        check::<PooledSlice<f32>>();
        check::<PooledSlice<u8, crate::StreamAlloc<crate::cuda::CudaDriver>>>();
    }
}
