//! The simulator's books: devices, pools, streams, events, captures and the checker.
//! Everything here runs under the one mutex of [`super::SimDriver`].

use super::clock::{Sid, VClock};
use super::{
    CUDA_ERROR_ILLEGAL_STATE, CUDA_ERROR_INVALID_DEVICE, CUDA_ERROR_STREAM_CAPTURE_ISOLATION,
    CUDA_ERROR_STREAM_CAPTURE_UNMATCHED, CopyKind, SimConfig, SimGraph, SimOp, error_name,
};
use crate::driver::DriverResult;
use crate::error::{
    CUDA_ERROR_INVALID_HANDLE, CUDA_ERROR_INVALID_VALUE, CUDA_ERROR_OUT_OF_MEMORY,
    CUDA_ERROR_STREAM_CAPTURE_INVALIDATED, CUDA_ERROR_STREAM_CAPTURE_UNJOINED,
    CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, DriverError,
};
use crate::types::{
    CaptureStatus, Device, DevicePtr, Event, MemInfo, PoolAttribute, Stream, UsageStream,
};
use std::collections::{BTreeMap, HashMap, HashSet};

/// Pool blocks are rounded up to this many bytes (and aligned to it).
pub(crate) const ALIGN: u64 = 512;
/// Device `d` hands out addresses in `[(d + 1) << ADDR_SHIFT, (d + 2) << ADDR_SHIFT)`.
pub(crate) const ADDR_SHIFT: u32 = 44;
/// The first stream handle; handles go up in steps of `STREAM_STEP`.
const FIRST_STREAM: usize = 0x5_0000;
const STREAM_STEP: usize = 0x100;
/// The first event handle.
const FIRST_EVENT: usize = 0xE000_0000;

fn err(op: SimOp, code: i32) -> DriverError {
    named_err(op.cuda_name(), code)
}

fn named_err(name: &'static str, code: i32) -> DriverError {
    DriverError::new(name, code, error_name(code))
}

/// Rounds `size` up to [`ALIGN`]; `None` on overflow.
fn round(size: usize) -> Option<u64> {
    let size = u64::try_from(size).ok()?;
    Some(size.checked_add(ALIGN - 1)? & !(ALIGN - 1))
}

struct SimStream {
    handle: usize,
    device: Device,
    clock: VClock,
    /// The capture this stream belongs to (origin or forked into it).
    capture: Option<u64>,
    /// The clock when the stream entered the capture: work after it is graph nodes,
    /// which never run, so host synchronization completes only up to here.
    capture_base: VClock,
    /// The tick of the stream's last operation during the capture (0: none).
    capture_last_op: u64,
}

struct LiveBlock {
    size: u64,
    rounded: u64,
    /// Every declared use: per stream, the tick of its last use (the malloc included).
    uses: VClock,
    /// The capture that allocated it (a graph allocation).
    captured: Option<u64>,
    /// Set by `note_cached`: idle in the allocator's cache as of (stream, tick).
    cached: Option<(Sid, u64)>,
    /// Made by `malloc_sync` (outside the pool; freed by `free_sync` only).
    sync: bool,
}

struct FreeBlock {
    rounded: u64,
    /// The freeing stream and the tick of the free.
    stream: Sid,
    tick: u64,
    /// The freeing stream's clock at the free (for inserted dependencies).
    clock: VClock,
}

struct Pool {
    release_threshold: u64,
    reuse_follow: bool,
    reuse_opportunistic: bool,
    reuse_internal: bool,
    reserved: u64,
    reserved_high: u64,
    used: u64,
    used_high: u64,
    live: BTreeMap<u64, LiveBlock>,
    free: BTreeMap<u64, FreeBlock>,
    next_addr: u64,
}

struct DeviceState {
    capacity: u64,
    initialized: bool,
    context: bool,
    pool: Pool,
    null_stream: Option<Sid>,
    sticky: Option<i32>,
    /// Rounded bytes of live `malloc_sync` blocks.
    sync_bytes: u64,
}

struct EventState {
    stream: Sid,
    tick: u64,
    clock: VClock,
    capture: Option<u64>,
}

struct Capture {
    origin: Sid,
    members: Vec<Sid>,
    ops: u64,
    allocations: u64,
    invalidated: bool,
}

/// The whole simulated machine.
pub(crate) struct State {
    checker: bool,
    devices: Vec<DeviceState>,
    streams: Vec<SimStream>,
    handles: HashMap<usize, Sid>,
    next_handle: usize,
    events: HashMap<usize, EventState>,
    next_event: usize,
    captures: HashMap<u64, Capture>,
    next_capture: u64,
    /// What the host has seen complete: joined from each synchronized stream's clock.
    host_done: VClock,
    calls: HashMap<SimOp, u64>,
    fail_nth: Vec<(SimOp, u64, i32)>,
    fail_always: HashMap<SimOp, i32>,
    reports: Vec<String>,
    peer: HashSet<(Device, Device)>,
    last_copy: Option<CopyKind>,
    last_malloc: Option<UsageStream>,
    last_free: Option<UsageStream>,
}

impl State {
    pub(crate) fn new(config: SimConfig) -> Self {
        let devices = config
            .devices
            .iter()
            .enumerate()
            .map(|(d, &capacity)| DeviceState {
                capacity,
                initialized: false,
                context: false,
                pool: Pool {
                    // CUDA's defaults for a device's default pool.
                    release_threshold: 0,
                    reuse_follow: true,
                    reuse_opportunistic: true,
                    reuse_internal: true,
                    reserved: 0,
                    reserved_high: 0,
                    used: 0,
                    used_high: 0,
                    live: BTreeMap::new(),
                    free: BTreeMap::new(),
                    next_addr: (d as u64).saturating_add(1).checked_shl(ADDR_SHIFT).unwrap_or(0),
                },
                null_stream: None,
                sticky: None,
                sync_bytes: 0,
            })
            .collect();
        State {
            checker: config.checker,
            devices,
            streams: Vec::new(),
            handles: HashMap::new(),
            next_handle: FIRST_STREAM,
            events: HashMap::new(),
            next_event: FIRST_EVENT,
            captures: HashMap::new(),
            next_capture: 1,
            host_done: VClock::default(),
            calls: HashMap::new(),
            fail_nth: Vec::new(),
            fail_always: HashMap::new(),
            reports: Vec::new(),
            peer: HashSet::new(),
            last_copy: None,
            last_malloc: None,
            last_free: None,
        }
    }

    // ----- plumbing -------------------------------------------------------------------

    fn report(&mut self, msg: String) {
        if self.checker {
            log::error!("sim checker: {msg}");
            self.reports.push(msg);
        }
    }

    /// Counts the call, applies injected faults (which have no side effects), checks the
    /// device and marks its context created.
    fn enter(&mut self, op: SimOp, device: Option<Device>) -> DriverResult<()> {
        let count = {
            let c = self.calls.entry(op).or_insert(0);
            *c += 1;
            *c
        };
        if let Some(i) = self.fail_nth.iter().position(|&(o, at, _)| o == op && at == count) {
            let (_, _, code) = self.fail_nth.remove(i);
            return Err(err(op, code));
        }
        if let Some(&code) = self.fail_always.get(&op) {
            return Err(err(op, code));
        }
        if let Some(d) = device {
            self.check_device(op, d)?;
            self.devices[d].context = true;
        }
        Ok(())
    }

    fn check_device(&self, op: SimOp, d: Device) -> DriverResult<()> {
        self.check_device_named(op.cuda_name(), d)
    }

    fn check_device_named(&self, name: &'static str, d: Device) -> DriverResult<()> {
        if d < self.devices.len() {
            Ok(())
        } else {
            Err(named_err(name, CUDA_ERROR_INVALID_DEVICE))
        }
    }

    fn add_stream(&mut self, handle: usize, device: Device) -> Sid {
        let sid = self.streams.len();
        self.streams.push(SimStream {
            handle,
            device,
            clock: VClock::default(),
            capture: None,
            capture_base: VClock::default(),
            capture_last_op: 0,
        });
        if handle != 0 {
            self.handles.insert(handle, sid);
        }
        sid
    }

    fn new_handle(&mut self, device: Device) -> Stream {
        let handle = Stream::simulated(self.next_handle).as_raw();
        self.next_handle += STREAM_STEP;
        self.add_stream(handle, device);
        Stream::simulated(handle)
    }

    /// Resolves a stream used with `us.device` (the null stream is per device).
    fn stream(&mut self, op: SimOp, us: UsageStream) -> DriverResult<Sid> {
        self.stream_named(op.cuda_name(), us)
    }

    /// [`Self::stream`] for operations outside the driver trait.
    fn stream_named(&mut self, name: &'static str, us: UsageStream) -> DriverResult<Sid> {
        self.check_device_named(name, us.device)?;
        if us.stream.is_null() {
            if let Some(sid) = self.devices[us.device].null_stream {
                return Ok(sid);
            }
            let sid = self.add_stream(0, us.device);
            self.devices[us.device].null_stream = Some(sid);
            return Ok(sid);
        }
        let Some(&sid) = self.handles.get(&us.stream.as_raw()) else {
            return Err(named_err(name, CUDA_ERROR_INVALID_HANDLE));
        };
        let actual = self.streams[sid].device;
        if actual != us.device {
            self.report(format!(
                "{name}: {:?} belongs to device {actual} but was used as a stream of device {}",
                us.stream, us.device
            ));
            return Err(named_err(name, CUDA_ERROR_INVALID_HANDLE));
        }
        Ok(sid)
    }

    fn describe(&self, sid: Sid) -> String {
        let s = &self.streams[sid];
        if s.handle == 0 {
            format!("the null stream of device {}", s.device)
        } else {
            format!("stream {:#x} (device {})", s.handle, s.device)
        }
    }

    /// Enqueues one operation on `sid`: advances its own clock component.
    fn tick(&mut self, sid: Sid) -> u64 {
        let s = &mut self.streams[sid];
        let t = s.clock.advance(sid);
        if let Some(c) = s.capture {
            s.capture_last_op = t;
            if let Some(cap) = self.captures.get_mut(&c) {
                cap.ops += 1;
            }
        }
        t
    }

    /// Whether tick `t` of stream `s` is ordered before the next operation of `on`, or
    /// has completed as seen by the host.
    fn ordered(&self, on: Sid, s: Sid, t: u64) -> bool {
        self.streams[on].clock.get(s) >= t || self.host_done.get(s) >= t
    }

    /// Reports every use in `uses` that the next operation of `on` is not ordered after.
    fn check_uses(&mut self, on: Sid, uses: &VClock, what: impl Fn() -> String) {
        let missing: Vec<(Sid, u64)> =
            uses.entries().filter(|&(s, t)| !self.ordered(on, s, t)).collect();
        for (s, t) in missing {
            let msg = format!(
                "{} on {} is not ordered after its use on {} (op #{t} of that stream): \
                 missing event wait",
                what(),
                self.describe(on),
                self.describe(s)
            );
            self.report(msg);
        }
    }

    /// Finds the live block containing `addr`: (device, base).
    fn find_live(&self, addr: u64) -> Option<(Device, u64)> {
        let d = usize::try_from((addr >> ADDR_SHIFT).checked_sub(1)?).ok()?;
        let pool = &self.devices.get(d)?.pool;
        let (&base, b) = pool.live.range(..=addr).next_back()?;
        (addr < base + b.rounded.max(1)).then_some((d, base))
    }

    /// Declares a use of the memory at `ptr` by operation `t` of stream `sid`.
    /// `peer_copy`: a peer copy may touch another device's memory without pool access.
    fn use_block(
        &mut self,
        sid: Sid,
        t: u64,
        ptr: DevicePtr,
        count: u64,
        what: &str,
        peer_copy: bool,
    ) {
        if ptr.is_null() {
            return;
        }
        let Some((d, base)) = self.find_live(ptr.as_raw()) else {
            let msg = format!("{what} on {} uses {ptr}, which is not live", self.describe(sid));
            self.report(msg);
            return;
        };
        let dev = self.streams[sid].device;
        if d != dev && !peer_copy && !self.peer.contains(&(d, dev)) {
            let msg = format!(
                "{what} on {} uses {ptr} of device {d} without pool access for device {dev}",
                self.describe(sid)
            );
            self.report(msg);
        }
        let block = self.devices[d].pool.live.get_mut(&base).expect("found above");
        block.uses.raise(sid, t);
        let cached = block.cached.is_some();
        let overrun = (ptr.as_raw() - base).saturating_add(count) > block.size;
        let size = block.size;
        if cached {
            let msg = format!(
                "{what} on {} uses {ptr}, which is idle in the allocator's cache",
                self.describe(sid)
            );
            self.report(msg);
        }
        if overrun {
            let msg = format!(
                "{what} of {count} bytes at {ptr} overruns its block ({size} bytes at {:#x})",
                base
            );
            self.report(msg);
        }
    }

    fn grow(&mut self, d: Device, rounded: u64) -> Option<u64> {
        let dev = &mut self.devices[d];
        let pool = &mut dev.pool;
        if pool.reserved.checked_add(dev.sync_bytes)?.checked_add(rounded)? > dev.capacity {
            return None;
        }
        let addr = pool.next_addr;
        pool.next_addr = addr.checked_add(rounded)?;
        pool.reserved += rounded;
        pool.reserved_high = pool.reserved_high.max(pool.reserved);
        Some(addr)
    }

    /// The best-fitting freed block the pool may hand to `sid` under its reuse rules.
    fn reusable(&self, d: Device, sid: Sid, rounded: u64) -> Option<u64> {
        let pool = &self.devices[d].pool;
        let clock = &self.streams[sid].clock;
        pool.free
            .iter()
            .filter(|(_, f)| f.rounded >= rounded)
            .filter(|(_, f)| {
                f.stream == sid
                    || (pool.reuse_follow && clock.get(f.stream) >= f.tick)
                    || (pool.reuse_opportunistic && self.host_done.get(f.stream) >= f.tick)
            })
            .min_by_key(|&(&a, f)| (f.rounded, a))
            .map(|(&a, _)| a)
    }

    /// Takes a freed block (splitting off the rest) for stream `sid`.
    fn take_free(&mut self, d: Device, addr: u64, rounded: u64, sid: Sid) {
        let f = self.devices[d].pool.free.remove(&addr).expect("chosen from the free list");
        if !self.ordered(sid, f.stream, f.tick) {
            let msg = format!(
                "pool handed {addr:#x} to {} before its free on {} is ordered or complete",
                self.describe(sid),
                self.describe(f.stream)
            );
            self.report(msg);
        }
        if f.rounded > rounded {
            let rest = FreeBlock {
                rounded: f.rounded - rounded,
                stream: f.stream,
                tick: f.tick,
                clock: f.clock,
            };
            self.devices[d].pool.free.insert(addr + rounded, rest);
        }
    }

    fn trim(&mut self, d: Device, keep: u64) {
        let mut done: Vec<(u64, u64)> = self.devices[d]
            .pool
            .free
            .iter()
            .filter(|(_, f)| self.host_done.get(f.stream) >= f.tick)
            .map(|(&a, f)| (f.rounded, a))
            .collect();
        done.sort_unstable_by(|a, b| b.cmp(a));
        let pool = &mut self.devices[d].pool;
        for (rounded, addr) in done {
            if pool.reserved <= keep {
                break;
            }
            pool.free.remove(&addr);
            pool.reserved -= rounded;
        }
    }

    fn complete(&mut self, sid: Sid) {
        let s = &self.streams[sid];
        let clock = if s.capture.is_some() { s.capture_base.clone() } else { s.clock.clone() };
        self.host_done.join(&clock);
    }

    fn complete_device(&mut self, d: Device) {
        for sid in 0..self.streams.len() {
            if self.streams[sid].device == d {
                self.complete(sid);
            }
        }
    }

    // ----- the Driver operations ------------------------------------------------------

    pub(crate) fn init_device(&mut self, d: Device) -> DriverResult<()> {
        self.enter(SimOp::InitDevice, Some(d))?;
        let dev = &mut self.devices[d];
        dev.initialized = true;
        dev.pool.release_threshold = u64::MAX;
        dev.pool.reuse_follow = true;
        dev.pool.reuse_opportunistic = true;
        dev.pool.reuse_internal = true;
        Ok(())
    }

    pub(crate) fn create_stream(&mut self, d: Device) -> DriverResult<Stream> {
        self.enter(SimOp::CreateStream, Some(d))?;
        Ok(self.new_handle(d))
    }

    pub(crate) fn check_stream(&self, us: UsageStream) -> DriverResult<()> {
        let name = "cuStreamGetDevice";
        self.check_device_named(name, us.device)?;
        if us.stream.is_null() {
            return Ok(());
        }
        match self.handles.get(&us.stream.as_raw()) {
            Some(&sid) if self.streams[sid].device == us.device => Ok(()),
            _ => Err(named_err(name, CUDA_ERROR_INVALID_HANDLE)),
        }
    }

    pub(crate) fn destroy_stream(&mut self, us: UsageStream) -> DriverResult<()> {
        let name = "cuStreamDestroy";
        self.check_device_named(name, us.device)?;
        match self.handles.get(&us.stream.as_raw()) {
            Some(&sid) if !us.stream.is_null() && self.streams[sid].device == us.device => {
                self.handles.remove(&us.stream.as_raw());
                Ok(())
            }
            _ => Err(named_err(name, CUDA_ERROR_INVALID_HANDLE)),
        }
    }

    pub(crate) fn check_last_error(&mut self, d: Device) -> DriverResult<()> {
        self.enter(SimOp::CheckLastError, Some(d))?;
        match self.devices[d].sticky.take() {
            Some(code) => Err(err(SimOp::CheckLastError, code)),
            None => Ok(()),
        }
    }

    pub(crate) fn malloc_async(
        &mut self,
        d: Device,
        size: usize,
        stream: Stream,
    ) -> DriverResult<DevicePtr> {
        let op = SimOp::MallocAsync;
        self.enter(op, Some(d))?;
        let sid = self.stream(op, UsageStream::new(stream, d))?;
        if size == 0 {
            return Ok(DevicePtr::NULL);
        }
        let oom = || err(op, CUDA_ERROR_OUT_OF_MEMORY);
        let rounded = round(size).ok_or_else(oom)?;
        let capture = self.streams[sid].capture;
        let addr = if let Some(c) = capture {
            // A graph allocation: fresh addresses, owned by the capture.
            let addr = self.grow(d, rounded).ok_or_else(oom)?;
            if let Some(cap) = self.captures.get_mut(&c) {
                cap.allocations += 1;
            }
            addr
        } else if let Some(addr) = self.reusable(d, sid, rounded) {
            self.take_free(d, addr, rounded, sid);
            addr
        } else if let Some(addr) = self.grow(d, rounded) {
            addr
        } else if self.devices[d].pool.reuse_internal {
            // Under pressure the driver inserts the dependency itself: the allocating
            // stream waits for the free (ReuseAllowInternalDependencies).
            let pool = &self.devices[d].pool;
            let addr = pool
                .free
                .iter()
                .filter(|(_, f)| f.rounded >= rounded)
                .min_by_key(|&(&a, f)| (f.rounded, a))
                .map(|(&a, _)| a)
                .ok_or_else(oom)?;
            let clock = pool.free[&addr].clock.clone();
            self.streams[sid].clock.join(&clock);
            self.take_free(d, addr, rounded, sid);
            addr
        } else {
            return Err(oom());
        };
        let t = self.tick(sid);
        let mut uses = VClock::default();
        uses.raise(sid, t);
        let pool = &mut self.devices[d].pool;
        pool.live.insert(
            addr,
            LiveBlock {
                size: size as u64,
                rounded,
                uses,
                captured: capture,
                cached: None,
                sync: false,
            },
        );
        pool.used += rounded;
        pool.used_high = pool.used_high.max(pool.used);
        self.last_malloc = Some(UsageStream::new(stream, d));
        Ok(DevicePtr::from_raw(addr))
    }

    pub(crate) fn free_async(
        &mut self,
        d: Device,
        ptr: DevicePtr,
        stream: Stream,
    ) -> DriverResult<()> {
        let op = SimOp::FreeAsync;
        self.enter(op, Some(d))?;
        let sid = self.stream(op, UsageStream::new(stream, d))?;
        let addr = ptr.as_raw();
        let pool = &self.devices[d].pool;
        let Some(block) = pool.live.get(&addr) else {
            let what = if pool.free.contains_key(&addr) {
                "double free"
            } else {
                "free of unknown pointer"
            };
            let msg = format!("{what} {ptr} on device {d} ({})", self.describe(sid));
            self.report(msg);
            return Err(err(op, CUDA_ERROR_INVALID_VALUE));
        };
        if block.sync {
            let msg = format!(
                "cuMemFreeAsync of {ptr} on device {d}, which cuMemAlloc made ({})",
                self.describe(sid)
            );
            self.report(msg);
            return Err(err(op, CUDA_ERROR_INVALID_VALUE));
        }
        let (captured, uses, rounded) = (block.captured, block.uses.clone(), block.rounded);
        if let Some(c) = self.streams[sid].capture
            && captured != Some(c)
        {
            let msg = format!(
                "uncaptured free during capture: {ptr} (not allocated in capture {c}) freed \
                 on capturing {}",
                self.describe(sid)
            );
            self.report(msg);
            if let Some(cap) = self.captures.get_mut(&c) {
                cap.invalidated = true;
            }
            return Err(err(op, CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED));
        }
        self.check_uses(sid, &uses, || format!("free of {ptr}"));
        let t = self.tick(sid);
        let clock = self.streams[sid].clock.clone();
        let pool = &mut self.devices[d].pool;
        pool.live.remove(&addr);
        pool.used -= rounded;
        self.last_free = Some(UsageStream::new(stream, d));
        if captured.is_some() {
            // Graph memory goes back with the graph allocation.
            pool.reserved -= rounded;
        } else {
            pool.free.insert(addr, FreeBlock { rounded, stream: sid, tick: t, clock });
        }
        Ok(())
    }

    pub(crate) fn mem_get_info(&mut self, d: Device) -> DriverResult<MemInfo> {
        self.enter(SimOp::MemGetInfo, Some(d))?;
        let dev = &self.devices[d];
        let taken = dev.pool.reserved.saturating_add(dev.sync_bytes);
        Ok(MemInfo { free: dev.capacity.saturating_sub(taken), total: dev.capacity })
    }

    pub(crate) fn malloc_sync(&mut self, d: Device, size: usize) -> DriverResult<DevicePtr> {
        let op = SimOp::MallocSync;
        self.enter(op, Some(d))?;
        if size == 0 {
            return Err(err(op, CUDA_ERROR_INVALID_VALUE));
        }
        let oom = || err(op, CUDA_ERROR_OUT_OF_MEMORY);
        let rounded = round(size).ok_or_else(oom)?;
        let dev = &mut self.devices[d];
        let taken = dev.pool.reserved.saturating_add(dev.sync_bytes);
        if taken.checked_add(rounded).is_none_or(|t| t > dev.capacity) {
            return Err(oom());
        }
        let addr = dev.pool.next_addr;
        dev.pool.next_addr = addr.checked_add(rounded).ok_or_else(oom)?;
        dev.sync_bytes += rounded;
        let block = LiveBlock {
            size: size as u64,
            rounded,
            uses: VClock::default(),
            captured: None,
            cached: None,
            sync: true,
        };
        dev.pool.live.insert(addr, block);
        Ok(DevicePtr::from_raw(addr))
    }

    pub(crate) fn free_sync(&mut self, d: Device, ptr: DevicePtr) -> DriverResult<()> {
        let op = SimOp::FreeSync;
        self.enter(op, Some(d))?;
        let addr = ptr.as_raw();
        let Some(rounded) =
            self.devices[d].pool.live.get(&addr).filter(|b| b.sync).map(|b| b.rounded)
        else {
            self.report(format!("cuMemFree of {ptr} on device {d}: not a cuMemAlloc block"));
            return Err(err(op, CUDA_ERROR_INVALID_VALUE));
        };
        let capturing = self
            .streams
            .iter()
            .enumerate()
            .find(|(_, s)| s.device == d && s.capture.is_some())
            .map(|(sid, _)| sid);
        if let Some(sid) = capturing {
            let msg = format!(
                "cuMemFree of {ptr} on device {d} while {} is being captured",
                self.describe(sid)
            );
            self.report(msg);
            return Err(err(op, CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED));
        }
        // cuMemFree synchronizes: every use of the block has completed.
        self.complete_device(d);
        let dev = &mut self.devices[d];
        dev.pool.live.remove(&addr);
        dev.sync_bytes -= rounded;
        Ok(())
    }

    pub(crate) fn sync_bytes(&self, d: Device) -> u64 {
        self.devices.get(d).map_or(0, |x| x.sync_bytes)
    }

    pub(crate) fn pool_attribute(&mut self, d: Device, attr: PoolAttribute) -> DriverResult<u64> {
        self.enter(SimOp::PoolAttribute, Some(d))?;
        Ok(self.pool_attribute_raw(d, attr))
    }

    pub(crate) fn set_pool_attribute(
        &mut self,
        d: Device,
        attr: PoolAttribute,
        value: u64,
    ) -> DriverResult<()> {
        let op = SimOp::SetPoolAttribute;
        self.enter(op, Some(d))?;
        let p = &mut self.devices[d].pool;
        match attr {
            PoolAttribute::ReleaseThreshold => p.release_threshold = value,
            PoolAttribute::ReuseFollowEventDependencies => p.reuse_follow = value != 0,
            PoolAttribute::ReuseAllowOpportunistic => p.reuse_opportunistic = value != 0,
            PoolAttribute::ReuseAllowInternalDependencies => p.reuse_internal = value != 0,
            PoolAttribute::ReservedMemHigh if value == 0 => p.reserved_high = p.reserved,
            PoolAttribute::UsedMemHigh if value == 0 => p.used_high = p.used,
            _ => return Err(err(op, CUDA_ERROR_INVALID_VALUE)),
        }
        Ok(())
    }

    pub(crate) fn pool_trim_to(&mut self, d: Device, keep: u64) -> DriverResult<()> {
        self.enter(SimOp::PoolTrimTo, Some(d))?;
        self.trim(d, keep);
        Ok(())
    }

    pub(crate) fn device_synchronize(&mut self, d: Device) -> DriverResult<()> {
        self.enter(SimOp::DeviceSynchronize, Some(d))?;
        self.complete_device(d);
        let threshold = self.devices[d].pool.release_threshold;
        if threshold != u64::MAX {
            self.trim(d, threshold);
        }
        Ok(())
    }

    pub(crate) fn record_event(&mut self, us: UsageStream) -> DriverResult<Event> {
        let op = SimOp::RecordEvent;
        self.enter(op, Some(us.device))?;
        let sid = self.stream(op, us)?;
        let tick = self.tick(sid);
        let s = &self.streams[sid];
        let handle = self.next_event;
        self.next_event += 1;
        let ev = EventState { stream: sid, tick, clock: s.clock.clone(), capture: s.capture };
        self.events.insert(handle, ev);
        Ok(Event::from_raw(handle))
    }

    pub(crate) fn stream_wait_event(&mut self, us: UsageStream, event: &Event) -> DriverResult<()> {
        let op = SimOp::StreamWaitEvent;
        self.enter(op, Some(us.device))?;
        let sid = self.stream(op, us)?;
        let Some(ev) = self.events.get(&event.as_raw()) else {
            return Err(err(op, CUDA_ERROR_INVALID_HANDLE));
        };
        let (clock, ev_capture) = (ev.clock.clone(), ev.capture);
        if let Some(c) = ev_capture.filter(|c| self.captures.contains_key(c)) {
            match self.streams[sid].capture {
                None => {
                    // Fork: waiting on a captured event pulls the stream into the capture.
                    let s = &mut self.streams[sid];
                    s.capture = Some(c);
                    s.capture_base = s.clock.clone();
                    s.capture_last_op = 0;
                    if let Some(cap) = self.captures.get_mut(&c) {
                        cap.members.push(sid);
                    }
                }
                Some(mine) if mine != c => {
                    return Err(err(op, CUDA_ERROR_STREAM_CAPTURE_ISOLATION));
                }
                Some(_) => {}
            }
        }
        self.streams[sid].clock.join(&clock);
        self.tick(sid);
        Ok(())
    }

    pub(crate) fn event_query(&mut self, d: Device, event: &Event) -> DriverResult<bool> {
        let op = SimOp::EventQuery;
        self.enter(op, Some(d))?;
        let ev =
            self.events.get(&event.as_raw()).ok_or_else(|| err(op, CUDA_ERROR_INVALID_HANDLE))?;
        Ok(self.host_done.get(ev.stream) >= ev.tick)
    }

    pub(crate) fn destroy_event(&mut self, d: Device, event: Event) -> DriverResult<()> {
        let op = SimOp::DestroyEvent;
        self.enter(op, Some(d))?;
        match self.events.remove(&event.as_raw()) {
            Some(_) => Ok(()),
            None => Err(err(op, CUDA_ERROR_INVALID_HANDLE)),
        }
    }

    pub(crate) fn capture_status(&mut self, us: UsageStream) -> DriverResult<CaptureStatus> {
        let op = SimOp::CaptureStatus;
        self.enter(op, None)?;
        let sid = self.stream(op, us)?;
        Ok(match self.streams[sid].capture.and_then(|c| self.captures.get(&c)) {
            None => CaptureStatus::None,
            Some(cap) if cap.invalidated => CaptureStatus::Invalidated,
            Some(_) => CaptureStatus::Active,
        })
    }

    pub(crate) fn pool_set_access(&mut self, owner: Device, accessor: Device) -> DriverResult<()> {
        let op = SimOp::PoolSetAccess;
        self.enter(op, Some(owner))?;
        self.check_device(op, accessor)?;
        self.peer.insert((owner, accessor));
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn memcpy_async(
        &mut self,
        dst: DevicePtr,
        dst_device: Device,
        src: DevicePtr,
        src_device: Device,
        count: usize,
        us: UsageStream,
        peer: bool,
    ) -> DriverResult<()> {
        let op = SimOp::MemcpyAsync;
        self.enter(op, Some(us.device))?;
        self.check_device(op, dst_device)?;
        self.check_device(op, src_device)?;
        let sid = self.stream(op, us)?;
        let kind = if peer { CopyKind::Peer } else { CopyKind::DeviceToDevice };
        if kind == CopyKind::DeviceToDevice && dst_device != src_device {
            for d in [dst_device, src_device] {
                if d != us.device && !self.peer.contains(&(d, us.device)) {
                    let msg = format!(
                        "device-to-device copy on {} touches the pool of device {d} \
                         without pool access (use a peer copy or pool_set_access)",
                        self.describe(sid)
                    );
                    self.report(msg);
                    return Err(err(op, CUDA_ERROR_INVALID_VALUE));
                }
            }
        }
        let t = self.tick(sid);
        let count = count as u64;
        self.check_block_device(dst, dst_device, "copy destination");
        self.check_block_device(src, src_device, "copy source");
        self.use_block(sid, t, dst, count, "memcpy_async", peer);
        self.use_block(sid, t, src, count, "memcpy_async", peer);
        self.last_copy = Some(kind);
        Ok(())
    }

    fn check_block_device(&mut self, ptr: DevicePtr, d: Device, what: &str) {
        if let Some((actual, _)) = self.find_live(ptr.as_raw())
            && actual != d
        {
            self.report(format!("{what} {ptr} lies on device {actual}, not device {d}"));
        }
    }

    pub(crate) fn memcpy(
        &mut self,
        d: Device,
        dst: DevicePtr,
        src: DevicePtr,
        count: usize,
    ) -> DriverResult<()> {
        let op = SimOp::Memcpy;
        self.enter(op, Some(d))?;
        let sid = self.stream(op, UsageStream::new(Stream::NULL, d))?;
        let t = self.tick(sid);
        self.use_block(sid, t, dst, count as u64, "memcpy", false);
        self.use_block(sid, t, src, count as u64, "memcpy", false);
        // Synchronous: the host returns once the copy is done.
        self.complete(sid);
        Ok(())
    }

    pub(crate) fn note_cached(&mut self, d: Device, ptr: DevicePtr, stream: Stream) {
        let Some((sid, base)) = self.note_target("note_cached", d, ptr, stream) else {
            return;
        };
        let block = &self.devices[d].pool.live[&base];
        if block.cached.is_some() {
            self.report(format!("note_cached of {ptr}, which is already cached"));
            return;
        }
        let uses = block.uses.clone();
        self.check_uses(sid, &uses, || format!("caching {ptr}"));
        let tick = self.streams[sid].clock.get(sid);
        if let Some(b) = self.devices[d].pool.live.get_mut(&base) {
            b.cached = Some((sid, tick));
        }
    }

    pub(crate) fn note_reuse(&mut self, d: Device, ptr: DevicePtr, stream: Stream) {
        let Some((sid, base)) = self.note_target("note_reuse", d, ptr, stream) else {
            return;
        };
        let Some((from, tick)) = self.devices[d].pool.live[&base].cached else {
            self.report(format!("note_reuse of {ptr}, which was never noted as cached"));
            return;
        };
        if !self.ordered(sid, from, tick) {
            let msg = format!(
                "cached block {ptr} handed out on {} before its return to the cache on {} \
                 (op #{tick}) is ordered or complete",
                self.describe(sid),
                self.describe(from)
            );
            self.report(msg);
        }
        let now = self.streams[sid].clock.get(sid);
        if let Some(b) = self.devices[d].pool.live.get_mut(&base) {
            b.cached = None;
            b.uses = VClock::default();
            b.uses.raise(sid, now);
        }
    }

    /// Resolves the stream and the live block (by base address) of a note.
    fn note_target(
        &mut self,
        what: &'static str,
        d: Device,
        ptr: DevicePtr,
        stream: Stream,
    ) -> Option<(Sid, u64)> {
        let sid = match self.stream_named(what, UsageStream::new(stream, d)) {
            Ok(sid) => sid,
            Err(e) => {
                self.report(format!("{what}({d}, {ptr}, {stream:?}): {}", e.name));
                return None;
            }
        };
        if !self.devices[d].pool.live.contains_key(&ptr.as_raw()) {
            self.report(format!("{what} of {ptr} on device {d}: not a live block"));
            return None;
        }
        Some((sid, ptr.as_raw()))
    }

    // ----- test helpers ---------------------------------------------------------------

    pub(crate) fn new_stream(&mut self, d: Device) -> DriverResult<Stream> {
        self.check_device_named("sim.new_stream", d)?;
        Ok(self.new_handle(d))
    }

    pub(crate) fn launch(&mut self, us: UsageStream, ptrs: &[DevicePtr]) -> DriverResult<()> {
        let sid = self.stream_named("sim.launch", us)?;
        let t = self.tick(sid);
        for &p in ptrs {
            self.use_block(sid, t, p, 0, "kernel", false);
        }
        Ok(())
    }

    pub(crate) fn synchronize_stream(&mut self, us: UsageStream) -> DriverResult<()> {
        let sid = self.stream_named("cuStreamSynchronize", us)?;
        self.complete(sid);
        Ok(())
    }

    pub(crate) fn synchronize_all(&mut self) {
        for sid in 0..self.streams.len() {
            self.complete(sid);
        }
    }

    pub(crate) fn begin_capture(&mut self, us: UsageStream) -> DriverResult<u64> {
        let name = "cuStreamBeginCapture";
        let sid = self.stream_named(name, us)?;
        if self.streams[sid].capture.is_some() {
            return Err(named_err(name, CUDA_ERROR_ILLEGAL_STATE));
        }
        let c = self.next_capture;
        self.next_capture += 1;
        let s = &mut self.streams[sid];
        s.capture = Some(c);
        s.capture_base = s.clock.clone();
        s.capture_last_op = 0;
        let cap =
            Capture { origin: sid, members: vec![sid], ops: 0, allocations: 0, invalidated: false };
        self.captures.insert(c, cap);
        Ok(c)
    }

    pub(crate) fn end_capture(&mut self, us: UsageStream) -> DriverResult<SimGraph> {
        let fail = |code| named_err("cuStreamEndCapture", code);
        let sid = self.stream_named("cuStreamEndCapture", us)?;
        let Some(c) = self.streams[sid].capture else {
            return Err(fail(CUDA_ERROR_ILLEGAL_STATE));
        };
        if self.captures.get(&c).map(|cap| cap.origin) != Some(sid) {
            return Err(fail(CUDA_ERROR_STREAM_CAPTURE_UNMATCHED));
        }
        let cap = self.captures.remove(&c).expect("checked above");
        let mut unjoined = Vec::new();
        for &m in &cap.members {
            let s = &self.streams[m];
            if m != sid && s.capture_last_op > self.streams[sid].clock.get(m) {
                unjoined.push(m);
            }
        }
        for &m in &cap.members {
            let s = &mut self.streams[m];
            s.capture = None;
            s.capture_base = VClock::default();
            s.capture_last_op = 0;
        }
        for m in &unjoined {
            let msg = format!(
                "capture {c} ended on {} with {} forked into it and not joined back",
                self.describe(sid),
                self.describe(*m)
            );
            self.report(msg);
        }
        if !unjoined.is_empty() {
            return Err(fail(CUDA_ERROR_STREAM_CAPTURE_UNJOINED));
        }
        if cap.invalidated {
            return Err(fail(CUDA_ERROR_STREAM_CAPTURE_INVALIDATED));
        }
        Ok(SimGraph {
            capture_id: c,
            ops: cap.ops,
            allocations: cap.allocations,
            streams: cap.members.len(),
        })
    }

    pub(crate) fn is_capturing(&self, us: UsageStream) -> bool {
        self.lookup(us).is_some_and(|sid| self.streams[sid].capture.is_some())
    }

    /// Resolves a stream without side effects (no null stream is created).
    fn lookup(&self, us: UsageStream) -> Option<Sid> {
        if us.stream.is_null() {
            self.devices.get(us.device)?.null_stream
        } else {
            self.handles.get(&us.stream.as_raw()).copied()
        }
    }

    pub(crate) fn happens_before(&self, first: UsageStream, then: UsageStream) -> bool {
        let Some(a) = self.lookup(first) else { return true };
        let t = self.streams[a].clock.get(a);
        if t == 0 {
            return true;
        }
        match self.lookup(then) {
            Some(b) => self.ordered(b, a, t),
            None => self.host_done.get(a) >= t,
        }
    }

    pub(crate) fn ops_on(&self, us: UsageStream) -> u64 {
        self.lookup(us).map_or(0, |s| self.streams[s].clock.get(s))
    }

    pub(crate) fn fail_nth(&mut self, op: SimOp, n: u64, code: i32) {
        let now = self.calls.get(&op).copied().unwrap_or(0);
        self.fail_nth.push((op, now.saturating_add(n.max(1)), code));
    }

    pub(crate) fn fail_always(&mut self, op: SimOp, code: i32) {
        self.fail_always.insert(op, code);
    }

    pub(crate) fn clear_faults(&mut self) {
        self.fail_nth.clear();
        self.fail_always.clear();
    }

    pub(crate) fn set_sticky_error(&mut self, d: Device, code: i32) {
        if let Some(dev) = self.devices.get_mut(d) {
            dev.sticky = Some(code);
        }
    }

    pub(crate) fn call_count(&self, op: SimOp) -> u64 {
        self.calls.get(&op).copied().unwrap_or(0)
    }

    pub(crate) fn reports(&self) -> Vec<String> {
        self.reports.clone()
    }

    pub(crate) fn take_reports(&mut self) -> Vec<String> {
        std::mem::take(&mut self.reports)
    }

    pub(crate) fn peer_access(&self, owner: Device, accessor: Device) -> bool {
        self.peer.contains(&(owner, accessor))
    }

    pub(crate) fn last_malloc_stream(&self) -> Option<UsageStream> {
        self.last_malloc
    }

    pub(crate) fn last_free_stream(&self) -> Option<UsageStream> {
        self.last_free
    }

    pub(crate) fn total_calls(&self) -> u64 {
        self.calls.values().sum()
    }

    /// Reads a pool attribute without counting a call or touching the context.
    pub(crate) fn pool_attribute_raw(&self, d: Device, attr: PoolAttribute) -> u64 {
        let Some(dev) = self.devices.get(d) else { return 0 };
        let p = &dev.pool;
        match attr {
            PoolAttribute::ReleaseThreshold => p.release_threshold,
            PoolAttribute::ReuseFollowEventDependencies => p.reuse_follow as u64,
            PoolAttribute::ReuseAllowOpportunistic => p.reuse_opportunistic as u64,
            PoolAttribute::ReuseAllowInternalDependencies => p.reuse_internal as u64,
            PoolAttribute::ReservedMemCurrent => p.reserved,
            PoolAttribute::ReservedMemHigh => p.reserved_high,
            PoolAttribute::UsedMemCurrent => p.used,
            PoolAttribute::UsedMemHigh => p.used_high,
        }
    }

    /// Sets a pool's release threshold or reuse flag as another library in the process
    /// might, without counting a call. Statistics are not settable this way.
    pub(crate) fn set_pool_attribute_raw(&mut self, d: Device, attr: PoolAttribute, value: u64) {
        let Some(dev) = self.devices.get_mut(d) else { return };
        let p = &mut dev.pool;
        match attr {
            PoolAttribute::ReleaseThreshold => p.release_threshold = value,
            PoolAttribute::ReuseFollowEventDependencies => p.reuse_follow = value != 0,
            PoolAttribute::ReuseAllowOpportunistic => p.reuse_opportunistic = value != 0,
            PoolAttribute::ReuseAllowInternalDependencies => p.reuse_internal = value != 0,
            _ => {}
        }
    }

    pub(crate) fn last_copy_kind(&self) -> Option<CopyKind> {
        self.last_copy
    }

    pub(crate) fn device_count(&self) -> usize {
        self.devices.len()
    }

    pub(crate) fn device_initialized(&self, d: Device) -> bool {
        self.devices.get(d).is_some_and(|x| x.initialized)
    }

    pub(crate) fn context_created(&self, d: Device) -> bool {
        self.devices.get(d).is_some_and(|x| x.context)
    }

    pub(crate) fn capacity(&self, d: Device) -> u64 {
        self.devices.get(d).map_or(0, |x| x.capacity)
    }

    pub(crate) fn live_blocks(&self, d: Device) -> usize {
        self.devices.get(d).map_or(0, |x| x.pool.live.len())
    }

    pub(crate) fn free_blocks(&self, d: Device) -> usize {
        self.devices.get(d).map_or(0, |x| x.pool.free.len())
    }

    pub(crate) fn pool_reserved(&self, d: Device) -> u64 {
        self.devices.get(d).map_or(0, |x| x.pool.reserved)
    }

    pub(crate) fn pool_used(&self, d: Device) -> u64 {
        self.devices.get(d).map_or(0, |x| x.pool.used)
    }

    pub(crate) fn block_size(&self, ptr: DevicePtr) -> Option<u64> {
        let (d, base) = self.find_live(ptr.as_raw())?;
        (base == ptr.as_raw()).then(|| self.devices[d].pool.live[&base].size)
    }

    pub(crate) fn is_live(&self, ptr: DevicePtr) -> bool {
        self.find_live(ptr.as_raw()).is_some()
    }

    pub(crate) fn is_cached(&self, ptr: DevicePtr) -> bool {
        self.find_live(ptr.as_raw())
            .is_some_and(|(d, base)| self.devices[d].pool.live[&base].cached.is_some())
    }

    pub(crate) fn stream_device(&self, stream: Stream) -> Option<Device> {
        self.handles.get(&stream.as_raw()).map(|&s| self.streams[s].device)
    }

    pub(crate) fn event_count(&self) -> usize {
        self.events.len()
    }

    pub(crate) fn event_pending(&self, event: &Event) -> Option<bool> {
        self.events.get(&event.as_raw()).map(|e| self.host_done.get(e.stream) < e.tick)
    }
}
