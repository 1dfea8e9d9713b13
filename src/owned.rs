//! An owned block: `Send + Sync + 'static`, freed when dropped, keeping its allocator
//! alive through an [`Arc`]. What a data loader hands from a producer thread to a
//! consumer through a channel.
//!
//! ```text
//!   OwnedBlock { Arc<allocator>, ptr, size, device, creation stream }
//!        │ malloc / record_stream / free: the allocator's pointer API only
//!        ▼
//!   StreamOrderedAllocator (StreamAlloc with or without its cache, SeedReplica, ...)
//! ```
//!
//! It is built on the pointer API of [`StreamOrderedAllocator`] alone (`malloc`,
//! `record_stream`, `free`), so it stays correct whatever the allocator does inside
//! (front cache or not), and it works over `Arc<dyn StreamOrderedAllocator>` as well as
//! a concrete `Arc<StreamAlloc<D>>`.
//!
//! The stream rules are the seed's (S5/S6): the block is allocated on its *creation
//! stream*; a use on any other stream must be declared with [`OwnedBlock::record_stream`]
//! (or through [`OwnedBlock::use_on`], which declares it when needed), and then the free
//! is ordered after that stream's work too. Ordering the *data* (a consumer stream waiting
//! for the producer's copy) stays the caller's job, as in CUDA; the cudarc interop
//! ([`crate::interop`]) does that part too.
//!
//! ```
//! use std::sync::Arc;
//! use streamalloc::sim::SimDriver;
//! use streamalloc::{OwnedBlock, StreamAlloc, StreamOrderedAllocator};
//!
//! let sim = Arc::new(SimDriver::with_devices(1, 1 << 30));
//! let alloc: Arc<dyn StreamOrderedAllocator> = Arc::new(StreamAlloc::new(sim.clone())?);
//! let producer = sim.new_usage_stream(0)?;
//! let consumer = sim.new_usage_stream(0)?;
//!
//! let batch = OwnedBlock::allocate(&alloc, 0, 1 << 20, producer.stream)?;
//! let handle = std::thread::spawn(move || -> streamalloc::Result<()> {
//!     // On the consumer: wait for the producer's work, declare the use, use it.
//!     let ptr = batch.use_on(consumer)?;
//!     assert_eq!(ptr, batch.ptr());
//!     Ok(()) // dropped here: freed after the consumer's work
//! });
//! handle.join().unwrap()?;
//! assert_eq!(alloc.used_bytes(0), 0);
//! # sim.synchronize_all();
//! # assert!(sim.reports().is_empty());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use crate::api::StreamOrderedAllocator;
use crate::error::Result;
use crate::types::{Device, DevicePtr, Stream, UsageStream};
use std::fmt;
use std::sync::Arc;

/// A block of device memory that owns its allocation: freed (through the allocator's
/// pointer API, ordered after every recorded stream) when dropped.
///
/// `A` is the allocator: any [`StreamOrderedAllocator`], by default a trait object, so
/// `OwnedBlock` (no parameter) is one type whatever allocator made it. The block holds an
/// `Arc<A>`, so the allocator lives at least as long as its blocks.
pub struct OwnedBlock<A: StreamOrderedAllocator + ?Sized = dyn StreamOrderedAllocator> {
    alloc: Arc<A>,
    ptr: DevicePtr,
    size: usize,
    creation: UsageStream,
}

impl<A: StreamOrderedAllocator + ?Sized> OwnedBlock<A> {
    /// Allocates `size` bytes on `device`, ordered on `stream` (the block's creation
    /// stream). Size 0 gives a block whose pointer is null (no driver call).
    ///
    /// Errors: those of [`StreamOrderedAllocator::malloc`] (bad device, out of memory,
    /// driver failures).
    pub fn allocate(alloc: &Arc<A>, device: Device, size: usize, stream: Stream) -> Result<Self> {
        let ptr = alloc.malloc(device, size, stream)?;
        Ok(OwnedBlock {
            alloc: Arc::clone(alloc),
            ptr,
            size,
            creation: UsageStream::new(stream, device),
        })
    }

    /// Takes ownership of `ptr`, a live allocation of `size` bytes that `alloc` made on
    /// `device` and `stream` with its pointer API.
    ///
    /// # Safety
    /// Nothing else may free `ptr` afterwards (the block frees it when dropped), and
    /// `size`, `device` and `stream` must be those it was allocated with.
    pub unsafe fn from_raw(
        alloc: Arc<A>,
        ptr: DevicePtr,
        size: usize,
        device: Device,
        stream: Stream,
    ) -> Self {
        OwnedBlock { alloc, ptr, size, creation: UsageStream::new(stream, device) }
    }

    /// Gives up ownership without freeing: the caller must free the pointer with the
    /// allocator's `free` (the allocator is returned with it).
    pub fn into_raw(self) -> (Arc<A>, DevicePtr) {
        let me = std::mem::ManuallyDrop::new(self);
        // Safety: `me` is never dropped, so the Arc is moved out exactly once.
        let alloc = unsafe { std::ptr::read(&me.alloc) };
        (alloc, me.ptr)
    }

    /// The device address (null for a 0-byte block).
    pub fn ptr(&self) -> DevicePtr {
        self.ptr
    }

    /// The size requested, in bytes.
    pub fn size(&self) -> usize {
        self.size
    }

    /// The device the block lives on.
    pub fn device(&self) -> Device {
        self.creation.device
    }

    /// The creation stream (the one it was allocated on).
    pub fn stream(&self) -> Stream {
        self.creation.stream
    }

    /// The creation stream with its device.
    pub fn usage_stream(&self) -> UsageStream {
        self.creation
    }

    /// The allocator that made the block.
    pub fn allocator(&self) -> &Arc<A> {
        &self.alloc
    }

    /// S6: declares that the block is used on `stream`, so that its free is ordered after
    /// the work enqueued there so far (recording the creation stream itself is allowed,
    /// and warns once, as in the seed).
    pub fn record_stream(&self, stream: UsageStream) -> Result<()> {
        self.alloc.record_stream(self.ptr, stream)
    }

    /// The pointer to use on `stream`: when `stream` is not the creation stream, the use
    /// is recorded first (S6), so the free waits for it. Ordering the data (making
    /// `stream` wait for the writes before the use) is the caller's.
    pub fn use_on(&self, stream: UsageStream) -> Result<DevicePtr> {
        if stream != self.creation && !self.ptr.is_null() {
            self.alloc.record_stream(self.ptr, stream)?;
        }
        Ok(self.ptr)
    }

    /// Frees now and reports any error (dropping frees too, but can only log one).
    pub fn free(self) -> Result<()> {
        let (alloc, ptr) = self.into_raw();
        alloc.free(ptr)
    }
}

impl<A: StreamOrderedAllocator + ?Sized> Drop for OwnedBlock<A> {
    fn drop(&mut self) {
        if let Err(e) = self.alloc.free(self.ptr) {
            log::error!("freeing owned block {} on drop failed: {e}", self.ptr);
        }
    }
}

impl<A: StreamOrderedAllocator + ?Sized> fmt::Debug for OwnedBlock<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OwnedBlock")
            .field("allocator", &self.alloc.name())
            .field("ptr", &self.ptr)
            .field("size", &self.size)
            .field("creation", &self.creation)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::SimDriver;
    use crate::{CacheConfig, SeedReplica, StreamAlloc};
    use std::sync::mpsc;

    fn assert_send_sync_static<T: Send + Sync + 'static>() {}

    #[test]
    fn owned_block_is_send_sync_static() {
        assert_send_sync_static::<OwnedBlock>();
        assert_send_sync_static::<OwnedBlock<StreamAlloc<Arc<SimDriver>>>>();
        assert_send_sync_static::<OwnedBlock<SeedReplica<SimDriver>>>();
    }

    /// Every allocator the tests drive, as trait objects over one simulated device each.
    fn subjects() -> Vec<(Arc<SimDriver>, Arc<dyn StreamOrderedAllocator>)> {
        let mk = || Arc::new(SimDriver::with_devices(2, 1 << 30));
        let (a, b, c) = (mk(), mk(), mk());
        vec![
            (a.clone(), Arc::new(StreamAlloc::new(a).unwrap())),
            (b.clone(), Arc::new(StreamAlloc::with_cache(b, CacheConfig::passthrough()).unwrap())),
            (c.clone(), Arc::new(SeedReplica::new(c).unwrap())),
        ]
    }

    #[test]
    fn drop_frees_and_free_reports() {
        for (sim, alloc) in subjects() {
            let s = sim.new_usage_stream(0).unwrap();
            let b = OwnedBlock::allocate(&alloc, 0, 4096, s.stream).unwrap();
            assert_eq!((b.size(), b.device(), b.stream()), (4096, 0, s.stream));
            assert_eq!(alloc.used_bytes(0), 4096);
            drop(b);
            assert_eq!(alloc.used_bytes(0), 0);
            let b = OwnedBlock::allocate(&alloc, 1, 512, Stream::NULL).unwrap();
            assert_eq!(alloc.used_bytes(1), 512);
            b.free().unwrap();
            assert_eq!(alloc.used_bytes(1), 0);
            // Size 0: null, no driver call, nothing to free.
            let z = OwnedBlock::allocate(&alloc, 0, 0, s.stream).unwrap();
            assert!(z.ptr().is_null());
            assert!(z.use_on(sim.new_usage_stream(0).unwrap()).unwrap().is_null());
            drop(z);
            // Bad input is a typed error, not a block.
            let e = OwnedBlock::allocate(&alloc, 7, 512, s.stream).unwrap_err();
            assert!(matches!(e, crate::Error::InvalidDevice { device: 7, .. }), "{e}");
            sim.synchronize_all();
            assert!(sim.reports().is_empty(), "{}: {:?}", alloc.name(), sim.reports());
        }
    }

    #[test]
    fn into_raw_and_from_raw_round_trip() {
        let (sim, alloc) = subjects().remove(0);
        let b = OwnedBlock::allocate(&alloc, 0, 1 << 20, Stream::NULL).unwrap();
        let (a2, ptr) = b.into_raw();
        assert_eq!(alloc.used_bytes(0), 1 << 20, "into_raw does not free");
        // Safety: ptr is live, made by `a2` on device 0 / null stream with 1 MiB, and
        // nothing else frees it.
        let b = unsafe { OwnedBlock::from_raw(a2, ptr, 1 << 20, 0, Stream::NULL) };
        drop(b);
        assert_eq!(alloc.used_bytes(0), 0);
        assert!(sim.reports().is_empty());
    }

    /// The allocator lives as long as its blocks: dropping the caller's last handle on it
    /// first is fine, and the block's drop still frees through it.
    #[test]
    fn block_keeps_allocator_alive() {
        let sim = Arc::new(SimDriver::with_devices(1, 1 << 30));
        let alloc = Arc::new(StreamAlloc::new(sim.clone()).unwrap());
        let s = sim.new_usage_stream(0).unwrap();
        let b = OwnedBlock::allocate(&alloc, 0, 8192, s.stream).unwrap();
        let weak = Arc::downgrade(&alloc);
        drop(alloc);
        assert!(weak.upgrade().is_some(), "the block holds the allocator");
        assert_eq!(b.allocator().used_bytes(0), 8192);
        drop(b);
        assert!(weak.upgrade().is_none(), "the last block released the allocator");
        assert_eq!(sim.live_blocks(0), 0, "dropping the allocator returned every block");
        assert!(sim.reports().is_empty(), "{:?}", sim.reports());
    }

    /// A data loader's hand-off: producers allocate on their own streams and write the
    /// batch, send it through a channel; the consumer waits for the producer's stream,
    /// uses the batch on its own stream (the use recorded), and drops it there. The
    /// checker must see every free ordered after every use.
    #[test]
    fn owned_blocks_cross_threads_through_a_channel() {
        for (sim, alloc) in subjects() {
            let consumer = sim.new_usage_stream(0).unwrap();
            let (tx, rx) = mpsc::sync_channel::<(UsageStream, OwnedBlock)>(4);
            std::thread::scope(|scope| {
                for p in 0..3 {
                    let (tx, sim, alloc) = (tx.clone(), sim.clone(), alloc.clone());
                    scope.spawn(move || {
                        let s = sim.new_usage_stream(0).unwrap();
                        for i in 0..20 {
                            let size = 4096 << ((p + i) % 6);
                            let b = OwnedBlock::allocate(&alloc, 0, size, s.stream).unwrap();
                            sim.launch(s, &[b.ptr()]).unwrap(); // the producer's copy in
                            tx.send((s, b)).unwrap();
                        }
                    });
                }
                drop(tx);
                let mut got = 0;
                for (producer, batch) in rx {
                    sim.wait(consumer, producer).unwrap();
                    let ptr = batch.use_on(consumer).unwrap();
                    sim.launch(consumer, &[ptr]).unwrap();
                    got += 1;
                    // Dropped on this thread: freed after the consumer's kernel.
                }
                assert_eq!(got, 60);
            });
            assert_eq!(alloc.used_bytes(0), 0);
            sim.synchronize_all();
            assert!(sim.reports().is_empty(), "{}: {:?}", alloc.name(), sim.reports());
        }
    }

    /// The stream rule is what the checker enforces: a use on another stream that is not
    /// recorded lets the free run ahead of it (reported), `use_on` records it (silent).
    #[test]
    fn use_on_another_stream_is_recorded() {
        let sim = Arc::new(SimDriver::with_devices(1, 1 << 30));
        let alloc: Arc<dyn StreamOrderedAllocator> =
            Arc::new(StreamAlloc::with_cache(sim.clone(), CacheConfig::passthrough()).unwrap());
        let (a, b) = (sim.new_usage_stream(0).unwrap(), sim.new_usage_stream(0).unwrap());

        // Recorded: the snapshot lists the stream, the free waits for it.
        let block = OwnedBlock::allocate(&alloc, 0, 1 << 16, a.stream).unwrap();
        assert_eq!(block.use_on(a).unwrap(), block.ptr(), "creation stream: nothing recorded");
        assert!(alloc.snapshot()[0].recorded_streams.is_empty());
        sim.wait(b, a).unwrap();
        let p = block.use_on(b).unwrap();
        sim.launch(b, &[p]).unwrap();
        assert_eq!(alloc.snapshot()[0].recorded_streams, vec![b]);
        drop(block);
        assert!(sim.reports().is_empty(), "{:?}", sim.reports());
        assert_eq!(alloc.warnings(), crate::WarningCounts::default());

        // Not recorded: the checker catches the free racing the other stream's kernel.
        let block = OwnedBlock::allocate(&alloc, 0, 1 << 16, a.stream).unwrap();
        sim.wait(b, a).unwrap();
        sim.launch(b, &[block.ptr()]).unwrap();
        drop(block);
        assert!(!sim.take_reports().is_empty(), "an unrecorded use must be reported");
    }
}
