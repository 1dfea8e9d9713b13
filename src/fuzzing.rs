//! An operation interpreter for fuzzing and corpus replay: sequences of allocator
//! operations ([`Op`]) applied to the lock-free [`StreamAlloc`] and to the mutex
//! [`SeedReplica`], each on its own simulated device ([`SimDriver`]) with the checker on.
//!
//! - [`run_differential`]: both allocators, same operations; after every step their
//!   results, books and warnings must agree and both checkers must stay silent.
//! - [`run_faults`]: one allocator at a time, with driver failures injected at chosen
//!   calls; every failure must surface as an error and the books must balance after
//!   every step and come back to zero at the end.
//!
//! The interpreter behaves like a well-behaved client: it declares every kernel use of a
//! block (recording the stream when it is not the creation stream), and it never does
//! what a real program could not do under stream capture (see [`Interp::free_is_legal`]).
//! Bad input that the allocator must refuse (double frees, unknown pointers, bad devices,
//! bad fractions, capture misuse) is fair game.
//!
//! `Op` derives `arbitrary::Arbitrary`, so the fuzz targets (crate `streamalloc-fuzz` in
//! `fuzz/`) and the corpus replay in `tests/fuzz_corpus.rs` decode bytes the same way.
//! The module is always compiled (plain `cargo test` replays the corpus); nothing in the
//! allocator uses it, so it costs a user nothing at run time.

use crate::api::StreamOrderedAllocator;
use crate::core::StreamAlloc;
use crate::driver::Driver;
use crate::error::{CUDA_ERROR_INVALID_VALUE, CUDA_ERROR_OUT_OF_MEMORY, CUDA_ERROR_UNKNOWN, Error};
use crate::replica::SeedReplica;
use crate::sim::{SimDriver, SimOp};
use crate::types::{Device, DevicePtr, Stream, UsageStream};
use arbitrary::Arbitrary;
use std::sync::Arc;

/// Devices of each simulated driver.
pub const FUZZ_DEVICES: usize = 2;
/// Capacity of each simulated device: 256 MiB.
pub const FUZZ_CAPACITY: u64 = 256 << 20;
/// Streams per device the interpreter uses: the null stream and two created streams.
pub const STREAMS_PER_DEVICE: usize = 3;
/// Most live blocks the interpreter keeps (an `Alloc` beyond it is skipped).
pub const MAX_SLOTS: usize = 64;
/// Sizes the benchmarks use (512 B to 1.5 MiB).
pub const BENCH_SIZES: [usize; 7] = [512, 1024, 4096, 65536, 262_144, 1 << 20, 3 << 19];

/// The size of an allocation.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeSel {
    /// 0 bytes: null, no driver call.
    Zero,
    /// 1 to 65536 bytes.
    Small(u16),
    /// One of [`BENCH_SIZES`].
    Bench(u8),
    /// Near the device capacity: capacity minus the value in KiB (may exceed what is
    /// free).
    Large(u16),
    /// 1 EiB or more (refused outright).
    Huge(u16),
    /// Any size below 1 EiB (mostly device out-of-memory).
    Any(u64),
}

impl SizeSel {
    /// The size in bytes.
    pub fn bytes(self) -> usize {
        match self {
            SizeSel::Zero => 0,
            SizeSel::Small(n) => n as usize + 1,
            SizeSel::Bench(i) => BENCH_SIZES[i as usize % BENCH_SIZES.len()],
            SizeSel::Large(k) => {
                (FUZZ_CAPACITY - ((k as u64) << 10).min(FUZZ_CAPACITY - 1)) as usize
            }
            SizeSel::Huge(k) => ((1u64 << 60) + ((k as u64) << 40)) as usize,
            SizeSel::Any(n) => (n % (1 << 60)) as usize,
        }
    }
}

/// A driver operation to fail, for [`run_faults`].
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// Which operation ([`FAULT_OPS`], modulo its length).
    pub op: u8,
    /// Its n-th call from the start fails (0 counts as 1).
    pub nth: u8,
    /// The error code: 0 out of memory, 1 invalid value, else unknown.
    pub code: u8,
}

/// The driver operations faults are injected into.
pub const FAULT_OPS: [SimOp; 16] = [
    SimOp::MallocAsync,
    SimOp::FreeAsync,
    SimOp::RecordEvent,
    SimOp::StreamWaitEvent,
    SimOp::DestroyEvent,
    SimOp::MemGetInfo,
    SimOp::PoolAttribute,
    SimOp::SetPoolAttribute,
    SimOp::PoolTrimTo,
    SimOp::DeviceSynchronize,
    SimOp::CreateStream,
    SimOp::InitDevice,
    SimOp::CheckLastError,
    SimOp::PoolSetAccess,
    SimOp::MemcpyAsync,
    SimOp::Memcpy,
];

impl Fault {
    fn sim_op(self) -> SimOp {
        FAULT_OPS[self.op as usize % FAULT_OPS.len()]
    }

    fn code(self) -> i32 {
        match self.code % 3 {
            0 => CUDA_ERROR_OUT_OF_MEMORY,
            1 => CUDA_ERROR_INVALID_VALUE,
            _ => CUDA_ERROR_UNKNOWN,
        }
    }
}

/// One step of a client program. Device and stream selectors are taken modulo the
/// interpreter's devices (plus one invalid index where an op accepts a device) and
/// streams; slots index the live blocks (modulo their number).
#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// S3: malloc on a device (index 2 is invalid) and stream.
    Alloc {
        /// Device selector (modulo 3: 2 is a bad index).
        device: u8,
        /// The size.
        size: SizeSel,
        /// Stream selector on that device (during a capture, allocations on the capture
        /// device go to the capture stream).
        stream: u8,
    },
    /// S4/S5: frees a live block.
    Free {
        /// Slot selector.
        slot: u8,
    },
    /// S4: frees a pointer freed before (or whose free is deferred).
    DoubleFree {
        /// Selector among freed pointers.
        slot: u8,
    },
    /// S4: frees an address never handed out.
    FreeNever {
        /// Which address.
        addr: u16,
    },
    /// S6: records a stream (any device) on a live block, without a use.
    RecordStream {
        /// Slot selector (no live block: a freed or unknown pointer).
        slot: u8,
        /// Stream selector over all devices' streams.
        stream: u8,
    },
    /// A kernel using a live block (recorded first when the stream is not the creation
    /// stream); on another device's stream only with pool access.
    Use {
        /// Slot selector.
        slot: u8,
        /// Stream selector over all devices' streams.
        stream: u8,
    },
    /// S18: `accessor` may access `owner`'s pool.
    EnablePeer {
        /// Device selector (modulo 3).
        accessor: u8,
        /// Device selector (modulo 3).
        owner: u8,
    },
    /// S19: asynchronous copy between two live blocks (both recorded on the stream when
    /// it is not their creation stream).
    Copy {
        /// Slot selector of the destination.
        dst: u8,
        /// Slot selector of the source.
        src: u8,
        /// Stream selector over all devices' streams.
        stream: u8,
        /// Bytes, modulo the smaller block's size plus one.
        count: u16,
        /// Whether the client claims p2p (passed only where pool access is enabled).
        p2p: bool,
    },
    /// S21: synchronous copy between two live blocks of one device (not during a
    /// capture).
    CopySync {
        /// Slot selector of the destination.
        dst: u8,
        /// Slot selector of the source.
        src: u8,
        /// Bytes, modulo the smaller block's size plus one.
        count: u16,
    },
    /// `waiter` waits for all work so far on `on` (streams of any device).
    Wait {
        /// Stream selector over all devices' streams.
        waiter: u8,
        /// Stream selector over all devices' streams.
        on: u8,
    },
    /// The host waits for every stream.
    Sync,
    /// S14: begins a capture in the allocator and on a created stream.
    BeginCapture {
        /// Selector over all devices' created streams.
        stream: u8,
    },
    /// S15: ends the capture (allocator, then the stream).
    EndCapture,
    /// S7: sets the memory fraction; `special` picks out-of-range values.
    SetFraction {
        /// Device selector (modulo 3).
        device: u8,
        /// The fraction is `f / 255` unless `special` says otherwise.
        f: u8,
        /// 0..=9: `f / 255`; 10: 1.5; 11: NaN; 12: -0.25; 13: 1.0; 14: 0.0; 15: infinity.
        special: u8,
    },
    /// S8.
    EmptyCache,
    /// S11.
    Stats {
        /// Device selector (modulo 3).
        device: u8,
    },
    /// S9.
    CacheInfo {
        /// Device selector (modulo 3).
        device: u8,
        /// Stream selector on that device.
        stream: u8,
    },
    /// S10.
    BaseAlloc {
        /// Slot selector (no live block: a freed or unknown pointer).
        slot: u8,
    },
    /// S12.
    ResetPeak {
        /// Device selector (modulo 3).
        device: u8,
    },
    /// S12.
    ResetAccumulated {
        /// Device selector (modulo 3).
        device: u8,
    },
    /// S23: an error left by earlier CUDA work, reported by the next check.
    StickyError {
        /// Device selector (modulo the devices).
        device: u8,
    },
    /// Issue 13: `record_stream` with a stream that cannot be used: `kind` modulo 4 is a
    /// garbage handle, a destroyed stream, another device's stream named as the block's
    /// device, or a device that does not exist. Every side must refuse it (InvalidStream
    /// or InvalidDevice) and leave the block as it was.
    BadRecord {
        /// Slot selector (no live block: nothing happens).
        slot: u8,
        /// Which kind of unusable stream.
        kind: u8,
    },
    /// The program destroys one of its created streams and makes a new one in its place.
    /// Only when no block (live or with a deferred free) names it and no capture is
    /// underway, as a correct program does; the old handle is kept as a dead stream for
    /// `BadRecord`.
    DestroyStream {
        /// Selector over all devices' created streams.
        stream: u8,
    },
    /// The handle API (`StreamAlloc::allocate` -> `Block`) mixed with the pointer API on
    /// the handle's block, on the sides that have it (the core; the replica has no
    /// handles and skips this), not during a capture. The handle's block is freed (or
    /// dropped) at the end of the op; the pointer API must never free it (issue 13,
    /// defect 11).
    Handle {
        /// Device selector (modulo the devices).
        device: u8,
        /// The size.
        size: SizeSel,
        /// Stream selector on that device.
        stream: u8,
        /// What happens to the block while the handle lives.
        steps: Vec<HandleStep>,
        /// End with `Block::free` (else the handle is dropped).
        free: bool,
    },
}

/// Whether [`HandleStep::PtrFree`] runs: the pointer API must refuse a block a live
/// handle owns (issue 13, defect 11; `Error::OwnedByHandle` since the front cache's
/// second design). The inputs that found the defect are in `fuzz/corpus/faults/`.
pub const CHECK_HANDLE_OWNERSHIP: bool = true;

/// One thing done to a handle's block while the handle lives ([`Op::Handle`]).
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandleStep {
    /// `Block::record_stream` on a stream of any device (the creation stream is skipped).
    Record {
        /// Stream selector over all devices' streams.
        stream: u8,
    },
    /// The pointer API's `free` of the handle's address: must be refused, since the
    /// handle owns the block.
    PtrFree,
    /// The pointer API's `record_stream` on the handle's address (refused when the block
    /// is not in the map; accepted when it is).
    PtrRecord {
        /// Stream selector over all devices' streams.
        stream: u8,
    },
    /// A kernel using the block on its creation stream or a stream recorded on it.
    Use {
        /// Selector among those streams.
        stream: u8,
    },
    /// A pointer-API malloc and free on the handle's stream while the handle lives: the
    /// address must differ from the handle's.
    PtrAllocFree {
        /// The size.
        size: SizeSel,
    },
}

/// One allocator under test and its simulated device.
struct Side {
    alloc: Arc<dyn StreamOrderedAllocator>,
    /// The same allocator when it is the core (for the handle API).
    core: Option<Arc<StreamAlloc<Arc<SimDriver>>>>,
    sim: Arc<SimDriver>,
    /// `streams[d][i]`: `i == 0` is the null stream.
    streams: Vec<Vec<UsageStream>>,
    /// Streams the program destroyed (for `Op::BadRecord`).
    dead: Vec<UsageStream>,
}

impl Side {
    fn core_side(alloc: StreamAlloc<Arc<SimDriver>>, sim: Arc<SimDriver>) -> Self {
        let core = Arc::new(alloc);
        let mut side = Side::new(core.clone(), sim);
        side.core = Some(core);
        side
    }

    fn new(alloc: Arc<dyn StreamOrderedAllocator>, sim: Arc<SimDriver>) -> Self {
        let streams = (0..FUZZ_DEVICES)
            .map(|d| {
                let mut v = vec![UsageStream::new(Stream::NULL, d)];
                for _ in 1..STREAMS_PER_DEVICE {
                    v.push(sim.new_usage_stream(d).expect("sim device exists"));
                }
                v
            })
            .collect();
        Side { alloc, core: None, sim, streams, dead: Vec::new() }
    }

    /// The lock-free core without its front cache: every call reaches the driver, as in
    /// the seed, so it must agree with the replica exactly.
    fn core() -> Self {
        let sim = Arc::new(SimDriver::with_devices(FUZZ_DEVICES, FUZZ_CAPACITY));
        let cache = crate::CacheConfig::passthrough();
        Side::core_side(StreamAlloc::with_config(sim.clone(), FUZZ_DEVICES, cache), sim)
    }

    /// The lock-free core as shipped (front cache on, a small cache budget so trimming
    /// runs too): the checker sees every reuse of a cached block.
    fn cached() -> Self {
        let sim = Arc::new(SimDriver::with_devices(FUZZ_DEVICES, FUZZ_CAPACITY));
        let cache = crate::CacheConfig::default().with_max_bytes_per_device(8 << 20);
        Side::core_side(StreamAlloc::with_config(sim.clone(), FUZZ_DEVICES, cache), sim)
    }

    fn replica() -> Self {
        let sim = Arc::new(SimDriver::with_devices(FUZZ_DEVICES, FUZZ_CAPACITY));
        Side::new(Arc::new(SeedReplica::with_device_count(sim.clone(), FUZZ_DEVICES)), sim)
    }

    fn name(&self) -> &'static str {
        self.alloc.name()
    }
}

/// A stream named by device and index into [`Side::streams`].
type StreamId = (Device, usize);

/// The interpreter's view of a live block (the same on every side).
#[derive(Clone, Debug)]
struct Slot {
    /// The block's address on each side.
    ptrs: Vec<DevicePtr>,
    device: Device,
    size: u64,
    creation: StreamId,
    /// The allocator saw a capture underway when it was allocated.
    alloc_captured: bool,
    /// The sim capture it was allocated in (graph memory), by interpreter sequence.
    sim_capture: Option<u64>,
    recorded: Vec<StreamId>,
}

#[derive(Clone, Copy, Debug)]
struct CaptureModel {
    stream: StreamId,
    seq: u64,
}

/// The result of one operation, with pointers left out (sides compare by slot).
type Outcome = Result<String, String>;

/// Whether `e` is the S23 check's report of an earlier error (`cudaGetLastError`).
fn reports_earlier_error(e: &Error) -> bool {
    matches!(e, Error::Driver(d) if d.op == "cudaGetLastError")
}

/// Describes an error without addresses.
pub fn describe_error(e: &Error) -> String {
    match e {
        Error::UnknownPointer { .. } => "UnknownPointer".into(),
        Error::DoubleFree { .. } => "DoubleFree".into(),
        Error::InvalidFraction { fraction } => {
            format!("InvalidFraction({:#x})", fraction.to_bits())
        }
        other => format!("{other:?}"),
    }
}

fn outcome<T>(r: crate::Result<T>, ok: impl FnOnce(T) -> String) -> Outcome {
    r.map(ok).map_err(|e| describe_error(&e))
}

/// The interpreter: sides plus the shared model of the client program.
struct Interp {
    sides: Vec<Side>,
    /// Compare the sides and require silent checkers after every step.
    differential: bool,
    slots: Vec<Slot>,
    /// Freed blocks (each with its pointer per side), most recent last; bounded. An
    /// address handed out again leaves the list (freeing it would not be a double free).
    freed: Vec<Vec<DevicePtr>>,
    capture: Option<CaptureModel>,
    capture_seq: u64,
    /// Pool access granted: (owner, accessor).
    peer: Vec<(Device, Device)>,
    /// Driver faults are injected: calls may fail. `Op::DestroyStream` does nothing then
    /// (a failed trial free of `cache_info` keeps its block for a later free on the
    /// caller's stream), and `Op::Handle` tolerates failures and retries failed frees.
    faults: bool,
    step: usize,
}

fn device_sel(sel: u8) -> Device {
    sel as usize % (FUZZ_DEVICES + 1)
}

fn stream_any(sel: u8) -> StreamId {
    let i = sel as usize % (FUZZ_DEVICES * STREAMS_PER_DEVICE);
    (i / STREAMS_PER_DEVICE, i % STREAMS_PER_DEVICE)
}

fn never_ptr(addr: u16) -> DevicePtr {
    // Sim blocks start at multiples of 512 from (d + 1) << 44: +256 is never a block.
    let d = (addr & 1) as u64;
    DevicePtr::from_raw(((d + 1) << 44) + (((addr >> 1) as u64) << 9) + 256)
}

impl Interp {
    fn new(sides: Vec<Side>, differential: bool) -> Self {
        Interp {
            sides,
            differential,
            slots: Vec::new(),
            freed: Vec::new(),
            capture: None,
            capture_seq: 0,
            peer: Vec::new(),
            faults: false,
            step: 0,
        }
    }

    fn fail(&self, what: impl std::fmt::Display) -> String {
        format!("step {}: {what}", self.step)
    }

    /// Applies `f` on every side; in differential mode the outcomes must agree.
    fn each<T>(&self, mut f: impl FnMut(usize, &Side) -> (Outcome, T)) -> Result<Vec<T>, String> {
        let mut first: Option<Outcome> = None;
        let mut out = Vec::with_capacity(self.sides.len());
        for (i, side) in self.sides.iter().enumerate() {
            let (o, t) = f(i, side);
            if let Some(prev) = &first {
                if self.differential && *prev != o {
                    return Err(self.fail(format!(
                        "{} gave {prev:?} but {} gave {o:?}",
                        self.sides[0].name(),
                        side.name()
                    )));
                }
            } else {
                first = Some(o);
            }
            out.push(t);
        }
        Ok(out)
    }

    fn us(&self, side: usize, id: StreamId) -> UsageStream {
        self.sides[side].streams[id.0][id.1]
    }

    fn remember_freed(&mut self, ptrs: Vec<DevicePtr>) {
        if self.freed.len() >= 32 {
            self.freed.remove(0);
        }
        self.freed.push(ptrs);
    }

    /// A pointer for ops that accept any pointer: a live block's, else a freed one's,
    /// else one never handed out.
    fn any_ptr(&self, side: usize, sel: u8) -> (DevicePtr, Option<usize>) {
        if !self.slots.is_empty() {
            let i = sel as usize % self.slots.len();
            (self.slots[i].ptrs[side], Some(i))
        } else if !self.freed.is_empty() {
            (self.freed[sel as usize % self.freed.len()][side], None)
        } else {
            (never_ptr(sel as u16), None)
        }
    }

    /// Whether freeing `slot` now is something a real program may do. During a capture,
    /// a block the allocator counts as captured but that is not graph memory of this
    /// capture (allocated in an earlier capture, or on another device) is freed at once:
    /// on its creation stream, or on the unifying stream after waiting on its recorded
    /// streams. If that stream is (or may have been forked into) the capture, CUDA
    /// refuses the free of non-graph memory; the seed would do the same, so a real
    /// program does not free such blocks during a capture, and neither do we.
    fn free_is_legal(&self, slot: &Slot) -> bool {
        let Some(cap) = self.capture else { return true };
        if !slot.alloc_captured || slot.sim_capture == Some(cap.seq) {
            return true;
        }
        slot.creation != cap.stream && slot.recorded.is_empty()
    }

    /// Whether kernels on `accessor`'s streams may touch `owner`'s memory.
    fn access(&self, owner: Device, accessor: Device) -> bool {
        owner == accessor || self.peer.contains(&(owner, accessor))
    }

    /// Whether a well-behaved program may use `slot` on `sid`: graph memory only inside
    /// its own capture on the capture stream; other devices' memory only with access.
    fn use_is_legal(&self, slot: &Slot, sid: StreamId) -> bool {
        self.graph_use_is_legal(slot, sid) && self.access(slot.device, sid.0)
    }

    /// Graph memory is used only inside its own capture, on the capture stream.
    fn graph_use_is_legal(&self, slot: &Slot, sid: StreamId) -> bool {
        match slot.sim_capture {
            None => true,
            Some(k) => self.capture.is_some_and(|c| c.seq == k && c.stream == sid),
        }
    }

    /// Records `sid` on the block in slot `t` if it is not its creation stream, on every
    /// side (the outcomes must agree), as a client does before using it there.
    fn record_use(&mut self, t: usize, sid: StreamId) -> Result<(), String> {
        if sid == self.slots[t].creation {
            return Ok(());
        }
        let ptrs = self.slots[t].ptrs.clone();
        self.each(|i, side| {
            let r = side.alloc.record_stream(ptrs[i], self.us(i, sid));
            (outcome(r, |_| String::new()), ())
        })?;
        let slot = &mut self.slots[t];
        if !slot.recorded.contains(&sid) {
            slot.recorded.push(sid);
        }
        Ok(())
    }

    fn apply(&mut self, op: &Op) -> Result<(), String> {
        match *op {
            Op::Alloc { device, size, stream } => {
                if self.slots.len() >= MAX_SLOTS {
                    return Ok(());
                }
                let device = device_sel(device);
                let size = size.bytes();
                let sid: StreamId = match self.capture {
                    Some(c) if c.stream.0 == device => c.stream,
                    _ => (device, stream as usize % STREAMS_PER_DEVICE),
                };
                let ptrs = self.each(|i, s| {
                    let st = if device < FUZZ_DEVICES {
                        s.streams[sid.0][sid.1].stream
                    } else {
                        Stream::NULL
                    };
                    let r = s.alloc.malloc(device, size, st);
                    let p = *r.as_ref().unwrap_or(&DevicePtr::NULL);
                    let _ = i;
                    (outcome(r, |p| if p.is_null() { "null".into() } else { "ptr".into() }), p)
                })?;
                if ptrs[0].is_null() {
                    return Ok(());
                }
                for (i, s) in self.sides.iter().enumerate() {
                    let p = ptrs[i];
                    // With the front cache the driver block has a size class's size: the
                    // request's, or one up to `class_reach` classes larger.
                    let reach = crate::CacheConfig::default().class_reach;
                    let held = s.sim.block_size(p);
                    let serves = |h| crate::cache::may_serve(size as u64, h, reach);
                    if held != Some(size as u64) && !held.is_some_and(serves) {
                        return Err(self.fail(format!(
                            "{}: malloc({size}) gave {p}, which the sim does not hold as a \
                             live block of that size",
                            s.name()
                        )));
                    }
                }
                self.freed.retain(|f| f.iter().zip(&ptrs).all(|(a, b)| a != b));
                let sim_capture = self.capture.filter(|c| c.stream == sid).map(|c| c.seq);
                let alloc_captured = self.sides[0].alloc.capture_underway();
                self.slots.push(Slot {
                    ptrs,
                    device,
                    size: size as u64,
                    creation: sid,
                    alloc_captured,
                    sim_capture,
                    recorded: Vec::new(),
                });
            }
            Op::Free { slot } => {
                if self.slots.is_empty() {
                    return Ok(());
                }
                let i = slot as usize % self.slots.len();
                if !self.free_is_legal(&self.slots[i]) {
                    return Ok(());
                }
                let slot = self.slots[i].clone();
                let ok = self.each(|i, s| {
                    let r = s.alloc.free(slot.ptrs[i]);
                    let ok = r.is_ok();
                    (outcome(r, |_| String::new()), ok)
                })?;
                self.check_free(&slot, ok[0])?;
                if ok[0] {
                    self.slots.remove(i);
                    self.remember_freed(slot.ptrs);
                }
            }
            Op::DoubleFree { slot } => {
                if self.freed.is_empty() {
                    return Ok(());
                }
                let f = self.freed[slot as usize % self.freed.len()].clone();
                self.each(|i, s| (outcome(s.alloc.free(f[i]), |_| String::new()), ()))?;
            }
            Op::FreeNever { addr } => {
                self.each(|_, s| (outcome(s.alloc.free(never_ptr(addr)), |_| String::new()), ()))?;
            }
            Op::RecordStream { slot, stream } => {
                let sid = stream_any(stream);
                let mut target = None;
                self.each(|i, s| {
                    let (p, t) = self.any_ptr(i, slot);
                    target = t;
                    let r = s.alloc.record_stream(p, s.streams[sid.0][sid.1]);
                    (outcome(r, |_| String::new()), ())
                })?;
                if let Some(t) = target {
                    let slot = &mut self.slots[t];
                    if sid != slot.creation && !slot.recorded.contains(&sid) {
                        slot.recorded.push(sid);
                    }
                }
            }
            Op::Use { slot, stream } => {
                if self.slots.is_empty() {
                    return Ok(());
                }
                let t = slot as usize % self.slots.len();
                let sid = stream_any(stream);
                if !self.use_is_legal(&self.slots[t], sid) {
                    return Ok(());
                }
                self.record_use(t, sid)?;
                let ptrs = self.slots[t].ptrs.clone();
                for (i, side) in self.sides.iter().enumerate() {
                    side.sim.launch(self.us(i, sid), &[ptrs[i]]).map_err(|e| self.fail(e))?;
                }
            }
            Op::EnablePeer { accessor, owner } => {
                let (accessor, owner) = (device_sel(accessor), device_sel(owner));
                let ok = self.each(|_, s| {
                    let r = s.alloc.enable_peer_access(accessor, owner);
                    let ok = r.is_ok();
                    (outcome(r, |_| String::new()), ok)
                })?;
                if ok[0] && !self.peer.contains(&(owner, accessor)) {
                    self.peer.push((owner, accessor));
                }
            }
            Op::Copy { dst, src, stream, count, p2p } => {
                if self.slots.is_empty() {
                    return Ok(());
                }
                let (d, s) = (dst as usize % self.slots.len(), src as usize % self.slots.len());
                let sid = stream_any(stream);
                let (dd, sd) = (self.slots[d].device, self.slots[s].device);
                // The program claims p2p only where it has been enabled; a copy within one
                // device made on another device's stream needs access.
                let p2p = p2p && self.access(dd, sid.0) && self.access(sd, sid.0);
                let peer = !(p2p || dd == sd);
                // A peer copy needs no pool access; a device-to-device one does.
                let legal = |slot: &Slot| {
                    self.graph_use_is_legal(slot, sid) && (peer || self.access(slot.device, sid.0))
                };
                if !legal(&self.slots[d]) || !legal(&self.slots[s]) {
                    return Ok(());
                }
                self.record_use(d, sid)?;
                self.record_use(s, sid)?;
                let (ps, pd) = (self.slots[s].ptrs.clone(), self.slots[d].ptrs.clone());
                let smaller = self.slots[d].size.min(self.slots[s].size);
                let count = (count as u64 % (smaller + 1)) as usize;
                self.each(|i, side| {
                    let us = self.us(i, sid);
                    let r = side.alloc.memcpy_async(pd[i], dd, ps[i], sd, count, us, p2p);
                    (outcome(r, |_| String::new()), ())
                })?;
            }
            Op::CopySync { dst, src, count } => {
                if self.slots.is_empty() || self.capture.is_some() {
                    return Ok(());
                }
                let (d, s) = (dst as usize % self.slots.len(), src as usize % self.slots.len());
                let dev = self.slots[d].device;
                let null = (dev, 0);
                if self.slots[s].device != dev
                    || !self.use_is_legal(&self.slots[d], null)
                    || !self.use_is_legal(&self.slots[s], null)
                {
                    return Ok(());
                }
                self.record_use(d, null)?;
                self.record_use(s, null)?;
                let (ps, pd) = (self.slots[s].ptrs.clone(), self.slots[d].ptrs.clone());
                let smaller = self.slots[d].size.min(self.slots[s].size);
                let count = (count as u64 % (smaller + 1)) as usize;
                self.each(|i, side| {
                    let r = side.alloc.copy_data(dev, pd[i], ps[i], count);
                    (outcome(r, |_| String::new()), ())
                })?;
            }
            Op::Wait { waiter, on } => {
                let (w, o) = (stream_any(waiter), stream_any(on));
                // Streams of a capture are joined only by the allocator's end_capture.
                if self.capture.is_some_and(|c| c.stream == w || c.stream == o) || w == o {
                    return Ok(());
                }
                for (i, side) in self.sides.iter().enumerate() {
                    let r = side.sim.wait(self.us(i, w), self.us(i, o));
                    // With faults injected the program's own wait may fail: its business.
                    if self.differential {
                        r.map_err(|e| self.fail(e))?;
                    }
                }
            }
            Op::Sync => {
                for side in &self.sides {
                    side.sim.synchronize_all();
                }
            }
            Op::BeginCapture { stream } => {
                let i = stream as usize % (FUZZ_DEVICES * (STREAMS_PER_DEVICE - 1));
                let sid = (i / (STREAMS_PER_DEVICE - 1), 1 + i % (STREAMS_PER_DEVICE - 1));
                let ok = self.each(|_, s| {
                    let r = s.alloc.begin_capture(sid.0);
                    let ok = r.is_ok();
                    (outcome(r, |_| String::new()), ok)
                })?;
                if ok[0] {
                    if self.capture.is_some() {
                        return Err(self.fail("begin_capture succeeded during a capture"));
                    }
                    for (i, side) in self.sides.iter().enumerate() {
                        side.sim.begin_capture(self.us(i, sid)).map_err(|e| self.fail(e))?;
                    }
                    self.capture_seq += 1;
                    self.capture = Some(CaptureModel { stream: sid, seq: self.capture_seq });
                }
            }
            Op::EndCapture => self.end_capture()?,
            Op::SetFraction { device, f, special } => {
                let fraction = match special % 16 {
                    10 => 1.5,
                    11 => f64::NAN,
                    12 => -0.25,
                    13 => 1.0,
                    14 => 0.0,
                    15 => f64::INFINITY,
                    _ => f as f64 / 255.0,
                };
                let device = device_sel(device);
                self.each(|_, s| {
                    (outcome(s.alloc.set_memory_fraction(fraction, device), |_| String::new()), ())
                })?;
            }
            Op::EmptyCache => {
                // Synchronizing a device during a capture is illegal in CUDA.
                if self.capture.is_none() {
                    self.each(|_, s| (outcome(s.alloc.empty_cache(), |_| String::new()), ()))?;
                }
            }
            Op::Stats { device } => {
                let device = device_sel(device);
                self.each(|_, s| {
                    (outcome(s.alloc.device_stats(device), |v| format!("{v:?}")), ())
                })?;
            }
            Op::CacheInfo { device, stream } => {
                let device = device_sel(device);
                let idx = stream as usize % STREAMS_PER_DEVICE;
                self.each(|_, s| {
                    let st = s.streams.get(device).map_or(Stream::NULL, |v| v[idx].stream);
                    (outcome(s.alloc.cache_info(device, st), |v| v.to_string()), ())
                })?;
            }
            Op::BaseAlloc { slot } => {
                self.each(|i, s| {
                    let (p, _) = self.any_ptr(i, slot);
                    let r = s.alloc.base_allocation(p);
                    (outcome(r, |(b, size)| format!("base==ptr:{} size:{size}", b == p)), ())
                })?;
            }
            Op::ResetPeak { device } => {
                let device = device_sel(device);
                self.each(|_, s| {
                    (outcome(s.alloc.reset_peak_stats(device), |_| String::new()), ())
                })?;
            }
            Op::ResetAccumulated { device } => {
                let device = device_sel(device);
                self.each(|_, s| {
                    (outcome(s.alloc.reset_accumulated_stats(device), |_| String::new()), ())
                })?;
            }
            Op::StickyError { device } => {
                let device = device as usize % FUZZ_DEVICES;
                for side in &self.sides {
                    side.sim.set_sticky_error(device, CUDA_ERROR_UNKNOWN);
                }
            }
            Op::BadRecord { slot, kind } => self.bad_record(slot, kind)?,
            Op::DestroyStream { stream } => self.destroy_stream(stream)?,
            Op::Handle { device, size, stream, ref steps, free } => {
                let sid = (device as usize % FUZZ_DEVICES, stream as usize % STREAMS_PER_DEVICE);
                if self.capture.is_none() {
                    for i in 0..self.sides.len() {
                        self.handle(i, sid, size.bytes(), steps, free)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// `Op::BadRecord`: refused on every side, the block unchanged.
    fn bad_record(&mut self, slot: u8, kind: u8) -> Result<(), String> {
        if self.slots.is_empty() {
            return Ok(());
        }
        let t = slot as usize % self.slots.len();
        let before = self.slots[t].clone();
        let other = (before.device + 1) % FUZZ_DEVICES;
        for (i, s) in self.sides.iter().enumerate() {
            let p = before.ptrs[i];
            let bad = match kind % 4 {
                0 => {
                    UsageStream::new(Stream::simulated(0xbad0_0000 + slot as usize), before.device)
                }
                1 => match s.dead.get(slot as usize % s.dead.len().max(1)) {
                    Some(&dead) => dead,
                    None => continue,
                },
                2 => {
                    UsageStream::new(s.streams[other][1 + kind as usize % 2].stream, before.device)
                }
                _ => UsageStream::new(Stream::NULL, FUZZ_DEVICES + kind as usize % 3),
            };
            let snap_before = s.alloc.snapshot();
            match s.alloc.record_stream(p, bad) {
                Err(Error::InvalidStream { .. }) | Err(Error::InvalidDevice { .. }) => {}
                other => {
                    return Err(self.fail(format!(
                        "{}: record_stream({p}, {bad:?}) of an unusable stream gave {other:?}",
                        s.name()
                    )));
                }
            }
            if s.alloc.snapshot() != snap_before {
                return Err(
                    self.fail(format!("{}: a refused record_stream changed state", s.name()))
                );
            }
        }
        Ok(())
    }

    /// `Op::DestroyStream`: destroys and replaces a created stream no block names.
    fn destroy_stream(&mut self, sel: u8) -> Result<(), String> {
        if self.faults || self.capture.is_some() {
            return Ok(());
        }
        let created = STREAMS_PER_DEVICE - 1;
        let k = sel as usize % (FUZZ_DEVICES * created);
        let sid: StreamId = (k / created, 1 + k % created);
        for (i, s) in self.sides.iter().enumerate() {
            let us = self.us(i, sid);
            let named = s
                .alloc
                .snapshot()
                .iter()
                .any(|b| b.creation_stream == us || b.recorded_streams.contains(&us));
            if named {
                return Ok(());
            }
        }
        for i in 0..self.sides.len() {
            let us = self.us(i, sid);
            let side = &mut self.sides[i];
            side.sim.destroy_stream(us).map_err(|e| format!("destroying {us:?}: {e}"))?;
            side.dead.push(us);
            side.streams[sid.0][sid.1] =
                side.sim.new_usage_stream(sid.0).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// A pointer-API free that, with faults injected, is retried a few times (each
    /// injected fault fails one call).
    fn free_retrying(&self, alloc: &dyn StreamOrderedAllocator, p: DevicePtr) -> crate::Result<()> {
        let mut r = alloc.free(p);
        for _ in 0..8 {
            if r.is_ok() || !self.faults {
                break;
            }
            r = alloc.free(p);
        }
        r
    }

    /// `Op::Handle` on a side without handles (the replica): the same driver work
    /// through the pointer API, so the sides' pools stay alike for the differential
    /// comparison (the pointer-API free of the handle's block is left out).
    fn handle_emulated(
        &self,
        i: usize,
        sid: StreamId,
        size: usize,
        steps: &[HandleStep],
    ) -> Result<(), String> {
        let side = &self.sides[i];
        let name = side.name();
        let creation = self.us(i, sid);
        let Ok(p) = side.alloc.malloc(sid.0, size, creation.stream) else { return Ok(()) };
        let mut recorded = vec![creation];
        let fail = |what: &str, e: Error| self.fail(format!("{name}: emulated handle {what}: {e}"));
        for step in steps {
            match *step {
                HandleStep::Record { stream } | HandleStep::PtrRecord { stream } => {
                    let us = self.us(i, stream_any(stream));
                    let skip = matches!(step, HandleStep::Record { .. }) && us == creation;
                    if skip || p.is_null() {
                        continue;
                    }
                    match side.alloc.record_stream(p, us) {
                        Ok(()) if us != creation => recorded.push(us),
                        Ok(()) => {}
                        Err(_) if self.faults => {}
                        Err(e) => return Err(fail("record", e)),
                    }
                }
                HandleStep::PtrFree => {}
                HandleStep::Use { stream } => {
                    let us = recorded[stream as usize % recorded.len()];
                    if us.device == sid.0 && !p.is_null() {
                        side.sim.launch(us, &[p]).map_err(|e| self.fail(format!("{name}: {e}")))?;
                    }
                }
                HandleStep::PtrAllocFree { size } => {
                    if let Ok(q) = side.alloc.malloc(sid.0, size.bytes(), creation.stream) {
                        self.free_retrying(&*side.alloc, q).map_err(|e| fail("free", e))?;
                    }
                }
            }
        }
        self.free_retrying(&*side.alloc, p).map_err(|e| fail("final free", e))
    }

    /// `Op::Handle` on side `i` (a core side; others emulate it).
    fn handle(
        &self,
        i: usize,
        sid: StreamId,
        size: usize,
        steps: &[HandleStep],
        free: bool,
    ) -> Result<(), String> {
        let side = &self.sides[i];
        let Some(core) = side.core.as_deref() else {
            return self.handle_emulated(i, sid, size, steps);
        };
        let name = side.name();
        let creation = self.us(i, sid);
        let block = match core.allocate(sid.0, size, creation.stream) {
            Ok(b) => b,
            Err(_) => return Ok(()), // out of memory and the like: nothing to hold
        };
        let p = block.ptr();
        let mut recorded = vec![creation];
        for step in steps {
            match *step {
                HandleStep::Record { stream } => {
                    let us = self.us(i, stream_any(stream));
                    if us == creation {
                        continue;
                    }
                    match block.record_stream(us) {
                        Ok(()) => recorded.push(us),
                        Err(_) if self.faults => {}
                        Err(e) => {
                            return Err(
                                self.fail(format!("{name}: handle record_stream({us:?}): {e}"))
                            );
                        }
                    }
                }
                HandleStep::PtrFree => {
                    if p.is_null() || !CHECK_HANDLE_OWNERSHIP {
                        continue;
                    }
                    if core.free(p).is_ok() {
                        return Err(self.fail(format!(
                            "{name}: the pointer API freed {p}, a block a live handle owns"
                        )));
                    }
                }
                HandleStep::PtrRecord { stream } => {
                    let us = self.us(i, stream_any(stream));
                    if core.record_stream(p, us).is_ok() && us != creation && !p.is_null() {
                        recorded.push(us);
                    }
                }
                HandleStep::Use { stream } => {
                    let us = recorded[stream as usize % recorded.len()];
                    if us.device == sid.0 && !p.is_null() {
                        side.sim
                            .launch(us, &[p])
                            .map_err(|e| self.fail(format!("{name}: launch: {e}")))?;
                    }
                }
                HandleStep::PtrAllocFree { size } => {
                    if let Ok(q) = core.malloc(sid.0, size.bytes(), creation.stream) {
                        if !q.is_null() && q == p {
                            return Err(self.fail(format!(
                                "{name}: malloc handed out {q}, the live handle's block"
                            )));
                        }
                        self.free_retrying(core, q)
                            .map_err(|e| self.fail(format!("{name}: free: {e}")))?;
                    }
                }
            }
        }
        let freed = if free {
            block.free()
        } else {
            drop(block);
            Ok(())
        };
        match freed {
            Ok(()) => {}
            // A failed free leaves the block in the map: the pointer API frees it. An
            // injected fault, or the S23 check reporting a sticky error set earlier
            // (`Op::StickyError`, consumed by the report).
            Err(e) if self.faults || reports_earlier_error(&e) => {
                self.free_retrying(core, p).map_err(|e| self.fail(format!("{name}: {e}")))?
            }
            Err(e) => return Err(self.fail(format!("{name}: Block::free: {e}"))),
        }
        if self.faults && core.snapshot().iter().any(|b| b.ptr == p) {
            // A dropped handle's failed free (logged by the drop) is cleaned up the same way.
            self.free_retrying(core, p).map_err(|e| self.fail(format!("{name}: {e}")))?;
        }
        if !p.is_null() && core.snapshot().iter().any(|b| b.ptr == p) {
            return Err(self.fail(format!("{name}: the handle's block outlived the handle")));
        }
        Ok(())
    }

    /// After a free: a success means the block is gone from the books (or deferred), a
    /// failure means it is still there, unchanged.
    fn check_free(&self, slot: &Slot, ok: bool) -> Result<(), String> {
        for (i, s) in self.sides.iter().enumerate() {
            let p = slot.ptrs[i];
            let snap = s.alloc.snapshot();
            let entry = snap.iter().find(|b| b.ptr == p);
            let deferred = entry.is_some_and(|b| b.free_deferred);
            let bad = if ok {
                match entry {
                    Some(_) if deferred => !s.sim.is_live(p),
                    Some(_) => true,
                    // Kept by the front cache: live for the driver, idle (cached).
                    None => s.sim.is_live(p) && !s.sim.is_cached(p),
                }
            } else {
                entry.is_none_or(|b| b.free_deferred) || !s.sim.is_live(p)
            };
            if bad {
                return Err(self.fail(format!(
                    "{}: free of {p} returned {} but the allocator has {entry:?} and the sim \
                     says live={}",
                    s.name(),
                    if ok { "Ok" } else { "Err" },
                    s.sim.is_live(p)
                )));
            }
        }
        Ok(())
    }

    fn end_capture(&mut self) -> Result<(), String> {
        let sid = self.capture.map_or((0, 1), |c| c.stream);
        let ok = self.each(|i, s| {
            let r = s.alloc.end_capture(sid.0, self.us(i, sid).stream);
            let ok = r.is_ok();
            (outcome(r, |_| String::new()), ok)
        })?;
        if self.capture.is_some() {
            // The allocator's capture is over even when joining a free stream failed.
            self.capture = None;
            for (i, side) in self.sides.iter().enumerate() {
                let r = side.sim.end_capture(self.us(i, sid));
                if self.differential && r.is_err() {
                    return Err(self.fail(format!(
                        "{}: sim end_capture failed: {r:?} (allocator end_capture ok={})",
                        side.name(),
                        ok[i]
                    )));
                }
            }
        } else if ok[0] {
            return Err(self.fail("end_capture succeeded with no capture underway"));
        }
        Ok(())
    }

    /// The books after every step: used bytes equal the snapshot's sizes per device; in
    /// differential mode the sides agree and the checkers are silent.
    fn check_step(&self) -> Result<(), String> {
        let mut summaries = Vec::new();
        for s in &self.sides {
            let snap = s.alloc.snapshot();
            let mut used = Vec::new();
            for d in 0..FUZZ_DEVICES {
                let live: u64 =
                    snap.iter().filter(|b| b.creation_stream.device == d).map(|b| b.size).sum();
                let u = s.alloc.used_bytes(d);
                if u != live {
                    return Err(self.fail(format!(
                        "{}: device {d} used bytes {u} but live blocks hold {live}",
                        s.name()
                    )));
                }
                used.push((u, s.alloc.memory_limit(d)));
            }
            let mut reports = s.sim.reports();
            if !self.differential {
                // A failed join (an injected fault in end_capture, or in a free that had
                // forked the unifying stream into the capture) leaves it unjoined: CUDA
                // fails the capture, which is the error the program sees.
                reports.retain(|r| !r.contains("not joined back"));
            }
            if !reports.is_empty() {
                return Err(self.fail(format!("{}: checker reports {reports:#?}", s.name())));
            }
            let mut blocks: Vec<String> = snap
                .iter()
                .map(|b| {
                    format!(
                        "{}:{}:{}:{}:{}",
                        b.creation_stream.device,
                        b.size,
                        b.captured,
                        b.free_deferred,
                        b.recorded_streams.len()
                    )
                })
                .collect();
            blocks.sort();
            summaries.push(format!(
                "used={used:?} blocks={blocks:?} capture={} warnings={:?}",
                s.alloc.capture_underway(),
                s.alloc.warnings()
            ));
        }
        if self.differential && summaries.windows(2).any(|w| w[0] != w[1]) {
            return Err(self.fail(format!("states differ: {summaries:#?}")));
        }
        Ok(())
    }

    /// Ends any capture, frees everything, flushes deferred frees and checks that
    /// nothing is left. `retries` frees that fail are retried (faults mode).
    fn finish(&mut self, retries: usize) -> Result<(), String> {
        self.step += 1;
        if self.capture.is_some() {
            self.end_capture()?;
        }
        for s in &self.sides {
            // A sticky error nobody consumed yet (the program's next CUDA call would).
            for d in 0..FUZZ_DEVICES {
                let _ = Driver::check_last_error(&*s.sim, d);
            }
            // The end must not depend on a limit the program set.
            for d in 0..FUZZ_DEVICES {
                if s.alloc.memory_limit(d) != u64::MAX {
                    s.alloc
                        .set_memory_fraction(1.0, d)
                        .map_err(|e| self.fail(format!("{}: fraction 1.0: {e}", s.name())))?;
                }
            }
            if !self.differential {
                // A failed join leaves the sim capture unjoined: not what is checked here.
                let _ = s.sim.take_reports();
            }
        }
        while let Some(slot) = self.slots.pop() {
            for (i, s) in self.sides.iter().enumerate() {
                let mut r = s.alloc.free(slot.ptrs[i]);
                for _ in 0..retries {
                    if r.is_ok() {
                        break;
                    }
                    r = s.alloc.free(slot.ptrs[i]);
                }
                r.map_err(|e| self.fail(format!("{}: final free: {e}", s.name())))?;
            }
        }
        for s in &self.sides {
            // Frees what a failed cache_info free left behind, if anything.
            let mut r = s.alloc.empty_cache();
            for _ in 0..retries {
                if r.is_ok() {
                    break;
                }
                r = s.alloc.empty_cache();
            }
            r.map_err(|e| self.fail(format!("{}: final empty_cache: {e}", s.name())))?;
            let mut r = s.alloc.malloc(0, 512, Stream::NULL);
            for _ in 0..retries {
                if r.is_ok() {
                    break;
                }
                r = s.alloc.malloc(0, 512, Stream::NULL);
            }
            let p = r.map_err(|e| self.fail(format!("{}: flush malloc: {e}", s.name())))?;
            s.alloc.free(p).map_err(|e| self.fail(format!("{}: flush free: {e}", s.name())))?;
            // The front cache keeps that block: give it back.
            s.alloc
                .empty_cache()
                .map_err(|e| self.fail(format!("{}: empty_cache: {e}", s.name())))?;
            s.sim.synchronize_all();
            for d in 0..FUZZ_DEVICES {
                let used = s.alloc.used_bytes(d);
                let live = s.sim.live_blocks(d);
                if used != 0 || live != 0 {
                    return Err(self.fail(format!(
                        "{}: after freeing everything device {d} has used={used}, {live} live \
                         sim block(s); snapshot {:?}",
                        s.name(),
                        s.alloc.snapshot()
                    )));
                }
            }
            if !s.alloc.snapshot().is_empty() {
                return Err(self.fail(format!("{}: snapshot not empty at the end", s.name())));
            }
            let reports = s.sim.reports();
            if !reports.is_empty() {
                return Err(self.fail(format!("{}: checker reports {reports:#?}", s.name())));
            }
        }
        self.check_step()
    }

    fn run(&mut self, ops: &[Op], retries: usize) -> Result<(), String> {
        for op in ops {
            self.step += 1;
            self.apply(op).map_err(|e| format!("{e}\n  op: {op:?}"))?;
            self.check_step().map_err(|e| format!("{e}\n  op: {op:?}"))?;
        }
        self.finish(retries)
    }
}

/// Applies `ops` to the lock-free allocator and to the seed replica (each on its own
/// simulated driver with [`FUZZ_DEVICES`] devices of [`FUZZ_CAPACITY`] bytes, checker
/// on). After every step the outcomes (success or error kind, OOM fields), used bytes
/// per device, live blocks and warnings must agree and both checkers must be silent; at
/// the end everything is freed and nothing may be left. `Err` says what went wrong.
///
/// The same program then runs on the core with its front cache on, alone: pool-level
/// results (stats, `cache_info`, the driver's free memory in an OOM report) legitimately
/// differ from the seed's there, so it is held to the books and the checker instead.
pub fn run_differential(ops: &[Op]) -> Result<(), String> {
    Interp::new(vec![Side::core(), Side::replica()], true).run(ops, 0)?;
    Interp::new(vec![Side::cached()], false).run(ops, 0).map_err(|e| format!("cached: {e}"))
}

/// Applies `ops` with `faults` injected, first to the lock-free allocator alone, then to
/// the seed replica alone. Every failure must be an error (never a panic), the books
/// must balance after every step (used bytes == sizes of the snapshot's blocks, a failed
/// free leaves its block, a successful one removes it), and after clearing the faults
/// and freeing everything (failed frees retried) nothing may be left.
pub fn run_faults(ops: &[Op], faults: &[Fault]) -> Result<(), String> {
    for make in [Side::core as fn() -> Side, Side::cached, Side::replica] {
        let side = make();
        let sim = side.sim.clone();
        let name = side.name();
        for f in faults {
            sim.fail_nth(f.sim_op(), f.nth as u64, f.code());
        }
        let mut interp = Interp::new(vec![side], false);
        interp.faults = true;
        for op in ops {
            interp.step += 1;
            interp.apply(op).map_err(|e| format!("{name}: {e}\n  op: {op:?}"))?;
            interp.check_step().map_err(|e| format!("{name}: {e}\n  op: {op:?}"))?;
        }
        sim.clear_faults();
        interp.finish(4).map_err(|e| format!("{name}: {e}"))?;
    }
    Ok(())
}

/// The input of the `faults` fuzz target.
#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub struct FaultsInput {
    /// Driver calls to fail.
    pub faults: Vec<Fault>,
    /// The client program.
    pub ops: Vec<Op>,
}

/// Decodes fuzzer bytes the way `libfuzzer-sys`'s `fuzz_target!` does for a typed input
/// (`arbitrary_take_rest`); `None` where the target would skip the input.
pub fn decode<T: for<'a> Arbitrary<'a>>(data: &[u8]) -> Option<T> {
    T::arbitrary_take_rest(arbitrary::Unstructured::new(data)).ok()
}

// ----- the C ABI ---------------------------------------------------------------------

/// One call of the C ABI with fuzzer-chosen arguments (devices and streams may be
/// anything a C caller could pass).
#[derive(Arbitrary, Debug, Clone, PartialEq)]
pub enum CAbiOp {
    /// `streamalloc_alloc`.
    Alloc {
        /// Requested bytes (any `size_t`).
        size: SizeSel,
        /// Any `int`.
        device: i32,
        /// Stream selector: a real stream or garbage.
        stream: u64,
    },
    /// `streamalloc_free` of a pointer this program holds.
    Free {
        /// Which held pointer.
        slot: u8,
    },
    /// `streamalloc_free` of an arbitrary address (never allocated, or freed already).
    FreeRaw {
        /// The address.
        addr: u64,
    },
    /// `streamalloc_record_stream_on`.
    RecordStream {
        /// Which held pointer (or a raw address if none).
        slot: u8,
        /// Stream selector.
        stream: u64,
        /// The stream's device (any `int`).
        device: i32,
    },
    /// `streamalloc_base_alloc`, with or without a size out-pointer.
    BaseAlloc {
        /// Which held pointer.
        slot: u8,
        /// Pass a null size pointer.
        null_size: bool,
    },
    /// `streamalloc_device_stats`, with or without an out-pointer.
    Stats {
        /// Any `int`.
        device: i32,
        /// Pass a null out-pointer.
        null_out: bool,
    },
    /// `streamalloc_set_memory_fraction` with any bits.
    Fraction {
        /// The fraction's bit pattern.
        bits: u64,
        /// Any `int`.
        device: i32,
    },
    /// `streamalloc_empty_cache`.
    EmptyCache,
    /// `streamalloc_reset_peak_stats`.
    ResetPeak {
        /// Any `int`.
        device: i32,
    },
    /// `streamalloc_begin_capture` (allocator-level only: the sim's streams do not capture).
    BeginCapture {
        /// Any `int`.
        device: i32,
    },
    /// `streamalloc_end_capture`.
    EndCapture {
        /// Any `int`.
        device: i32,
        /// Stream selector.
        stream: u64,
    },
    /// `streamalloc_cache_info`.
    CacheInfo {
        /// Any `int`.
        device: i32,
    },
    /// `streamalloc_last_error` into a buffer of `len` bytes (0: a null buffer).
    LastError {
        /// Buffer length.
        len: u8,
    },
}

/// Drives the C ABI (over a simulated backend of two 256 MiB devices, installed on first
/// use) with `ops`. Nothing may panic across the boundary (a panic is code 5); a failed
/// call returns null or a nonzero code *and* sets the last error, a successful one
/// clears it; a pointer handed out is reported by `base_alloc` with its size. At the end
/// every pointer the program holds is freed without error.
pub fn run_c_abi(ops: &[CAbiOp]) -> Result<(), String> {
    use crate::capi::*;
    use std::ffi::c_void;
    let sim = install_sim_backend(FUZZ_DEVICES, FUZZ_CAPACITY)
        .ok_or("the C ABI's global allocator exists with another backend")?;
    let streams: Vec<UsageStream> = (0..FUZZ_DEVICES)
        .map(|d| sim.new_usage_stream(d).map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    // A stream of this program's that it destroyed (issue 13: never usable again).
    let dead = sim.new_usage_stream(0).map_err(|e| e.to_string())?;
    sim.destroy_stream(dead).map_err(|e| e.to_string())?;
    // Selector -> (handle, the device it is a stream of: None for garbage or destroyed,
    // Some(usize::MAX) for the null stream, which is every device's).
    let pick = |sel: u64| -> (CudaStream, Option<usize>) {
        match sel % 8 {
            0 => (std::ptr::null_mut(), Some(usize::MAX)),
            k if (k as usize) <= streams.len() => {
                let us = streams[k as usize - 1];
                (us.stream.as_raw() as CudaStream, Some(us.device))
            }
            3 => (dead.stream.as_raw() as CudaStream, None),
            4 => (Stream::simulated(sel as usize >> 3).as_raw() as CudaStream, None),
            _ => (sel as usize as CudaStream, None),
        }
    };
    let stream_of = |sel: u64| pick(sel).0;
    let code = streamalloc_last_error_code;
    let no_panic = |what: &str| -> Result<(), String> {
        if code() == 5 {
            return Err(format!("{what}: a panic reached the C boundary"));
        }
        Ok(())
    };
    let mut held: Vec<(*mut c_void, usize)> = Vec::new();
    let mut capturing = false;
    for (step, op) in ops.iter().enumerate() {
        let at = |msg: String| format!("step {step} {op:?}: {msg}");
        match *op {
            CAbiOp::Alloc { size, device, stream } => {
                let bytes = size.bytes();
                // Safety: the harness runs on the simulated backend, whose stream handles are
                // numbers it looks up (garbage and destroyed ones are refused there).
                let p = unsafe { streamalloc_alloc(bytes, device, stream_of(stream)) };
                no_panic("alloc").map_err(at)?;
                match (p.is_null(), bytes, code()) {
                    (true, 0, 0) => {}
                    (true, 0, c) => return Err(at(format!("size 0 set error code {c}"))),
                    (true, _, 0) => return Err(at("null without an error".into())),
                    (true, _, _) => {}
                    (false, _, 0) => held.push((p, bytes)),
                    (false, _, c) => return Err(at(format!("a pointer and error code {c}"))),
                }
            }
            CAbiOp::Free { slot } if !held.is_empty() => {
                let (p, size) = held.swap_remove(slot as usize % held.len());
                streamalloc_free(p, size, 0, std::ptr::null_mut());
                no_panic("free").map_err(at)?;
                if code() != 0 {
                    return Err(at(format!("free of a live pointer failed: code {}", code())));
                }
            }
            CAbiOp::Free { .. } => {}
            CAbiOp::FreeRaw { addr } => {
                if held.iter().any(|&(p, _)| p as u64 == addr) || addr == 0 {
                    continue;
                }
                streamalloc_free(addr as usize as *mut c_void, 0, 0, std::ptr::null_mut());
                no_panic("free raw").map_err(at)?;
                if code() == 0 {
                    return Err(at("free of a pointer never allocated succeeded".into()));
                }
            }
            CAbiOp::RecordStream { slot, stream, device } => {
                let p = held
                    .get(slot as usize % held.len().max(1))
                    .map_or(std::ptr::null_mut(), |h| h.0);
                let (handle, belongs) = pick(stream);
                // Safety: the harness runs on the simulated backend, whose stream handles are
                // numbers it looks up (garbage and destroyed ones are refused there).
                let c = unsafe { streamalloc_record_stream_on(p, handle, device) };
                no_panic("record_stream").map_err(at)?;
                if c != code() {
                    return Err(at(format!("returned {c}, last error {}", code())));
                }
                // Issue 13, defect 1: an unusable stream or device is refused at the door,
                // a usable one on a held pointer is accepted.
                let dev = usize::try_from(device).ok().filter(|&d| d < FUZZ_DEVICES);
                let usable = dev.is_some_and(|d| belongs == Some(usize::MAX) || belongs == Some(d));
                if !p.is_null() && usable != (c == 0) {
                    return Err(at(format!(
                        "record_stream_on of a {} stream returned {c}",
                        if usable { "usable" } else { "unusable" }
                    )));
                }
            }
            CAbiOp::BaseAlloc { slot, null_size } if !held.is_empty() => {
                let (p, size) = held[slot as usize % held.len()];
                let mut got = 0usize;
                let out = if null_size { std::ptr::null_mut() } else { &mut got as *mut usize };
                // Safety: `out` is null or points at a live usize.
                let base = unsafe { streamalloc_base_alloc(p, out) };
                no_panic("base_alloc").map_err(at)?;
                if base != p || (!null_size && got != size) {
                    return Err(at(format!(
                        "base_alloc gave {base:?}, size {got}; want {p:?}, {size}"
                    )));
                }
            }
            CAbiOp::BaseAlloc { .. } => {}
            CAbiOp::Stats { device, null_out } => {
                let mut stats = StreamallocStats::default();
                let out = if null_out { std::ptr::null_mut() } else { &mut stats as *mut _ };
                // Safety: `out` is null or points at a live stats struct.
                let c = unsafe { streamalloc_device_stats(device, out) };
                no_panic("stats").map_err(at)?;
                if null_out && c == 0 {
                    return Err(at("stats into a null pointer succeeded".into()));
                }
            }
            CAbiOp::Fraction { bits, device } => {
                streamalloc_set_memory_fraction(f64::from_bits(bits), device);
                no_panic("fraction").map_err(at)?;
                let f = f64::from_bits(bits);
                if !(0.0..=1.0).contains(&f) && code() == 0 {
                    return Err(at(format!("fraction {f} accepted")));
                }
            }
            CAbiOp::EmptyCache => {
                // Not during a capture (CUDA forbids the synchronize; so does the seed's user).
                if !capturing {
                    streamalloc_empty_cache();
                    no_panic("empty_cache").map_err(at)?;
                }
            }
            CAbiOp::ResetPeak { device } => {
                streamalloc_reset_peak_stats(device);
                no_panic("reset_peak").map_err(at)?;
            }
            CAbiOp::BeginCapture { device } => {
                let c = streamalloc_begin_capture(device);
                no_panic("begin_capture").map_err(at)?;
                capturing |= c == 0;
            }
            CAbiOp::EndCapture { device, stream } => {
                // Safety: the harness runs on the simulated backend, whose stream handles are
                // numbers it looks up (garbage and destroyed ones are refused there).
                let c = unsafe { streamalloc_end_capture(device, stream_of(stream)) };
                no_panic("end_capture").map_err(at)?;
                if c == 0 {
                    capturing = false;
                }
            }
            CAbiOp::CacheInfo { device } => {
                if !capturing {
                    streamalloc_cache_info(device);
                    no_panic("cache_info").map_err(at)?;
                }
            }
            CAbiOp::LastError { len } => {
                let mut buf = vec![0 as std::ffi::c_char; len as usize];
                let ptr = if len == 0 { std::ptr::null_mut() } else { buf.as_mut_ptr() };
                // Safety: `ptr` is null (len 0) or holds `len` bytes.
                unsafe { streamalloc_last_error(ptr, len as usize) };
                if len > 0 && !buf.contains(&0) {
                    return Err(at("last error not NUL-terminated".into()));
                }
            }
        }
    }
    // Another thread (a parallel test) may hold the one capture: only end our own.
    if capturing {
        for d in 0..FUZZ_DEVICES as i32 {
            // Safety: the null stream, on the simulated backend.
            if unsafe { streamalloc_end_capture(d, std::ptr::null_mut()) } == 0 {
                break;
            }
        }
    }
    for (p, size) in held {
        streamalloc_free(p, size, 0, std::ptr::null_mut());
        if code() != 0 {
            return Err(format!("final free of {p:?} failed: code {}", code()));
        }
    }
    Ok(())
}
