//! The seed replica: a faithful port of PyTorch's cudaMallocAsync backend, one
//! process-wide mutex around everything, on the same [`Driver`] trait.
//!
//! It is the reference model (the lock-free core must agree with it on any
//! single-threaded sequence of operations) and the baseline of every benchmark. It
//! follows the seed line by line, except that where the seed asserts or throws it returns
//! the same typed errors as [`crate::StreamAlloc`], and its books stay exact on errors.

use crate::api::{BlockSnapshot, DeviceStats, StreamOrderedAllocator};
use crate::block::{BlockInfo, ONE_EXBIBYTE, Orphan};
use crate::driver::Driver;
use crate::error::{Error, OutOfMemory, Result};
use crate::freed::FreedTable;
use crate::types::{Device, DevicePtr, Stream, UsageStream};
use crate::warn::{WarningCounts, Warnings};
use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};

/// Everything the seed keeps in globals, behind its `general_mutex`.
struct State {
    devs_initialized: Vec<bool>,
    dummy_unifying_free_streams: Vec<Stream>,
    ptr_info: HashMap<u64, BlockInfo>,
    ungraphed_ptrs_defer_free_until_no_capture: Vec<u64>,
    used_bytes: Vec<u64>,
    memory_limits: Vec<u64>,
    capture_free_streams: HashSet<UsageStream>,
    capture_underway: bool,
    /// `cache_info` trial blocks whose free failed (see [`crate::StreamAlloc`]'s).
    orphans: Vec<Orphan>,
}

/// The seed's global-mutex allocator on a [`Driver`].
pub struct SeedReplica<D: Driver> {
    driver: D,
    device_count: usize,
    general_mutex: Mutex<State>,
    freed: FreedTable,
    warnings: Warnings,
}

impl<D: Driver> SeedReplica<D> {
    /// S1: sized for every device the driver reports; creates no context.
    pub fn new(driver: D) -> Result<Self> {
        let n = driver.device_count()?;
        Ok(Self::with_device_count(driver, n))
    }

    /// S1: sized for `device_count` devices; creates no context.
    pub fn with_device_count(driver: D, device_count: usize) -> Self {
        SeedReplica {
            driver,
            device_count,
            general_mutex: Mutex::new(State {
                devs_initialized: vec![false; device_count],
                dummy_unifying_free_streams: vec![Stream::NULL; device_count],
                ptr_info: HashMap::new(),
                ungraphed_ptrs_defer_free_until_no_capture: Vec::new(),
                used_bytes: vec![0; device_count],
                memory_limits: vec![u64::MAX; device_count],
                capture_free_streams: HashSet::new(),
                capture_underway: false,
                orphans: Vec::new(),
            }),
            freed: FreedTable::new(),
            warnings: Warnings::default(),
        }
    }

    /// The driver underneath.
    pub fn driver(&self) -> &D {
        &self.driver
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.general_mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn assert_valid_device(&self, device: Device) -> Result<()> {
        if device < self.device_count {
            Ok(())
        } else {
            Err(Error::InvalidDevice { device: device as i64, device_count: self.device_count })
        }
    }

    fn lazy_init_device(&self, st: &mut State, device: Device) -> Result<()> {
        if !st.devs_initialized[device] {
            self.driver.init_device(device)?;
            st.dummy_unifying_free_streams[device] = self.driver.create_stream(device)?;
            st.used_bytes[device] = 0;
            st.memory_limits[device] = u64::MAX;
            st.devs_initialized[device] = true;
        }
        Ok(())
    }

    fn unknown_or_double_free(&self, st: &State, ptr: DevicePtr) -> Error {
        let deferred = st.ptr_info.get(&ptr.as_raw()).is_some_and(|b| b.free_deferred);
        if deferred || self.freed.was_freed(ptr.as_raw()) {
            Error::DoubleFree { ptr }
        } else {
            Error::UnknownPointer { ptr }
        }
    }

    /// The seed's `free_impl`: the caller has taken the block out of `ptr_info` and puts
    /// it back if this fails.
    fn free_impl(&self, st: &mut State, ptr: u64, info: &BlockInfo) -> Result<()> {
        let creation = info.creation();
        let device = creation.device;
        match &info.recorded {
            None => {
                self.driver.free_async(
                    device,
                    DevicePtr::from_raw(ptr),
                    info.size as usize,
                    creation.stream,
                )?;
                if st.capture_underway {
                    st.capture_free_streams.insert(creation);
                }
            }
            Some(recorded) => {
                let dummy = UsageStream::new(st.dummy_unifying_free_streams[device], device);
                self.driver.sync_streams(creation, dummy)?;
                for &recorded_stream in recorded.iter() {
                    self.driver.sync_streams(recorded_stream, dummy)?;
                }
                self.driver.free_async(
                    device,
                    DevicePtr::from_raw(ptr),
                    info.size as usize,
                    dummy.stream,
                )?;
                if st.capture_underway {
                    st.capture_free_streams.insert(dummy);
                }
            }
        }
        st.used_bytes[device] -= info.size;
        self.freed.freed(ptr);
        Ok(())
    }

    /// Frees orphaned `cache_info` trial blocks (not during a capture); returns whether
    /// any was freed.
    fn free_orphans(&self, st: &mut State) -> Result<bool> {
        if st.capture_underway {
            return Ok(false);
        }
        let mut freed_any = false;
        while let Some(o) = st.orphans.pop() {
            if let Err(e) = self.driver.free_async(o.device, o.ptr, o.size as usize, o.stream) {
                st.orphans.push(o);
                return Err(e.into());
            }
            freed_any = true;
        }
        Ok(freed_any)
    }

    fn oom(&self, st: &State, device: Device, size: u64) -> Error {
        let _ = self.driver.check_last_error(device);
        match self.driver.mem_get_info(device) {
            Ok(info) => Error::OutOfMemory(Box::new(OutOfMemory {
                device,
                allocated: st.used_bytes[device],
                requested: size,
                device_total: info.total,
                device_free: info.free,
                limit: st.memory_limits[device],
            })),
            Err(e) => Error::Driver(e),
        }
    }
}

impl<D: Driver> StreamOrderedAllocator for SeedReplica<D> {
    fn name(&self) -> &'static str {
        "seed_replica"
    }

    fn device_count(&self) -> usize {
        self.device_count
    }

    fn malloc(&self, device: Device, size: usize, stream: Stream) -> Result<DevicePtr> {
        if size as u64 >= ONE_EXBIBYTE {
            return Err(Error::TooLarge { requested: size as u64 });
        }
        if size == 0 {
            return Ok(DevicePtr::NULL);
        }
        self.assert_valid_device(device)?;
        let mut st = self.lock();
        let st = &mut *st;
        if !st.capture_underway && !st.ungraphed_ptrs_defer_free_until_no_capture.is_empty() {
            let pending = std::mem::take(&mut st.ungraphed_ptrs_defer_free_until_no_capture);
            for (i, &ptr) in pending.iter().enumerate() {
                let Some(info) = st.ptr_info.remove(&ptr) else { continue };
                if let Err(e) = self.free_impl(st, ptr, &info) {
                    st.ptr_info.insert(ptr, info);
                    st.ungraphed_ptrs_defer_free_until_no_capture.extend_from_slice(&pending[i..]);
                    return Err(e);
                }
            }
        }
        self.lazy_init_device(st, device)?;
        self.driver.check_last_error(device)?;
        let size64 = size as u64;
        if st.used_bytes[device].saturating_add(size64) > st.memory_limits[device] {
            return Err(self.oom(st, device, size64));
        }
        let ptr = match self.driver.malloc_async(device, size, stream) {
            Err(e) if e.is_oom() && self.free_orphans(st).unwrap_or(false) => {
                self.driver.malloc_async(device, size, stream)
            }
            r => r,
        };
        let ptr = match ptr {
            Ok(p) => p,
            Err(e) if e.is_oom() => return Err(self.oom(st, device, size64)),
            Err(e) => return Err(e.into()),
        };
        let info = BlockInfo {
            size: size64,
            creation_stream: stream,
            device: device as u32,
            captured: st.capture_underway,
            free_deferred: false,
            recorded: None,
        };
        if let Some(stale) = st.ptr_info.insert(ptr.as_raw(), info) {
            log::error!("driver returned live address {ptr} again (old block {stale:?})");
            st.used_bytes[stale.device as usize] -= stale.size;
        }
        st.used_bytes[device] += size64;
        Ok(ptr)
    }

    fn free(&self, ptr: DevicePtr) -> Result<()> {
        if ptr.is_null() {
            return Ok(());
        }
        let mut st = self.lock();
        let st = &mut *st;
        let key = ptr.as_raw();
        let Some(info) = st.ptr_info.get_mut(&key) else {
            return Err(self.unknown_or_double_free(st, ptr));
        };
        if info.free_deferred {
            return Err(Error::DoubleFree { ptr });
        }
        if st.capture_underway && !info.captured {
            info.free_deferred = true;
            self.warnings.uncaptured_free_during_capture(ptr);
            st.ungraphed_ptrs_defer_free_until_no_capture.push(key);
            return Ok(());
        }
        let captured_free_outside_capture = !st.capture_underway && info.captured;
        let device = info.device as Device;
        // The seed reports an earlier CUDA error before it warns (S23).
        self.driver.check_last_error(device)?;
        if captured_free_outside_capture {
            self.warnings.captured_free_outside_capture(ptr);
        }
        let info = st.ptr_info.remove(&key).expect("found above under the same lock");
        if let Err(e) = self.free_impl(st, key, &info) {
            st.ptr_info.insert(key, info);
            return Err(e);
        }
        Ok(())
    }

    fn record_stream(&self, ptr: DevicePtr, stream: UsageStream) -> Result<()> {
        if ptr.is_null() {
            return Ok(());
        }
        crate::api::check_stream(&self.driver, self.device_count, stream)?;
        let mut st = self.lock();
        let Some(info) = st.ptr_info.get_mut(&ptr.as_raw()) else {
            return Err(self.unknown_or_double_free(&st, ptr));
        };
        if info.free_deferred {
            return Err(Error::DoubleFree { ptr });
        }
        if stream == info.creation() {
            self.warnings.record_on_creation_stream();
        } else {
            let recorded = info.recorded.get_or_insert_with(Default::default);
            if !recorded.contains(&stream) {
                recorded.push(stream);
            }
        }
        Ok(())
    }

    fn set_memory_fraction(&self, fraction: f64, device: Device) -> Result<()> {
        if !(0.0..=1.0).contains(&fraction) {
            return Err(Error::InvalidFraction { fraction });
        }
        let mut st = self.lock();
        self.assert_valid_device(device)?;
        self.lazy_init_device(&mut st, device)?;
        let info = self.driver.mem_get_info(device)?;
        st.memory_limits[device] = (fraction * info.total as f64) as u64;
        Ok(())
    }

    fn empty_cache(&self) -> Result<()> {
        let mut st = self.lock();
        let mut first_error = self.free_orphans(&mut st).err();
        for device in (0..self.device_count).filter(|&d| st.devs_initialized[d]) {
            let r = self
                .driver
                .device_synchronize(device)
                .and_then(|_| self.driver.pool_trim_to(device, 0));
            if let Err(e) = r {
                first_error.get_or_insert(e.into());
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn cache_info(&self, device: Device, stream: Stream) -> Result<u64> {
        let mut st = self.lock();
        self.assert_valid_device(device)?;
        self.lazy_init_device(&mut st, device)?;
        self.free_orphans(&mut st)?;
        let info = self.driver.mem_get_info(device)?;
        let used = st.used_bytes[device];
        let limit = st.memory_limits[device];
        let mut guess = info.free.min(limit.saturating_sub(used));
        self.driver.check_last_error(device)?;
        loop {
            if guess == 0 {
                return Ok(0);
            }
            if used.saturating_add(guess) <= limit {
                match self.driver.malloc_async(device, guess as usize, stream) {
                    Ok(ptr) => {
                        if let Err(e) = self.driver.free_async(device, ptr, guess as usize, stream)
                        {
                            let size = guess;
                            st.orphans.push(Orphan { device, ptr, size, stream });
                            return Err(e.into());
                        }
                        return Ok(guess);
                    }
                    Err(e) if e.is_oom() => {}
                    Err(e) => return Err(e.into()),
                }
            }
            guess >>= 1;
        }
    }

    fn base_allocation(&self, ptr: DevicePtr) -> Result<(DevicePtr, u64)> {
        let st = self.lock();
        match st.ptr_info.get(&ptr.as_raw()) {
            Some(info) => Ok((ptr, info.size)),
            None => Err(self.unknown_or_double_free(&st, ptr)),
        }
    }

    fn device_of(&self, ptr: DevicePtr) -> Result<(Device, u64)> {
        let st = self.lock();
        match st.ptr_info.get(&ptr.as_raw()) {
            Some(info) if !info.free_deferred => Ok((info.device as Device, info.size)),
            Some(_) => Err(Error::DoubleFree { ptr }),
            None => Err(self.unknown_or_double_free(&st, ptr)),
        }
    }

    fn device_stats(&self, device: Device) -> Result<DeviceStats> {
        self.assert_valid_device(device)?;
        let st = self.lock();
        if !st.devs_initialized[device] {
            return Ok(DeviceStats::default());
        }
        let stats = crate::api::pool_stats(&self.driver, device)?;
        Ok(DeviceStats { allocated_current: st.used_bytes[device], ..stats })
    }

    fn reset_peak_stats(&self, device: Device) -> Result<()> {
        self.assert_valid_device(device)?;
        crate::api::reset_pool_peaks(&self.driver, device)
    }

    fn reset_accumulated_stats(&self, device: Device) -> Result<()> {
        self.assert_valid_device(device)?;
        self.warnings.reset_accumulated_stats();
        Ok(())
    }

    fn begin_capture(&self, device: Device) -> Result<()> {
        self.assert_valid_device(device)?;
        let mut st = self.lock();
        // The seed asserts the set is empty before checking for a capture underway, so
        // a second begin during a capture that freed something trips the assert; here it
        // is the same error as any second begin (the set is empty outside a capture).
        if st.capture_underway {
            return Err(Error::CaptureAlreadyUnderway);
        }
        debug_assert!(st.capture_free_streams.is_empty());
        st.capture_underway = true;
        Ok(())
    }

    fn end_capture(&self, device: Device, capture_stream: Stream) -> Result<()> {
        self.assert_valid_device(device)?;
        let mut st = self.lock();
        if !st.capture_underway {
            return Err(Error::NoCaptureUnderway);
        }
        st.capture_underway = false;
        let target = UsageStream::new(capture_stream, device);
        for free_stream in std::mem::take(&mut st.capture_free_streams) {
            self.driver.sync_streams(free_stream, target)?;
        }
        Ok(())
    }

    fn enable_peer_access(&self, accessor: Device, owner: Device) -> Result<()> {
        self.assert_valid_device(accessor)?;
        self.assert_valid_device(owner)?;
        self.driver.pool_set_access(owner, accessor)?;
        Ok(())
    }

    fn memcpy_async(
        &self,
        dst: DevicePtr,
        dst_device: Device,
        src: DevicePtr,
        src_device: Device,
        count: usize,
        stream: UsageStream,
        p2p_enabled: bool,
    ) -> Result<()> {
        let d = &self.driver;
        crate::api::copy_async(d, dst, dst_device, src, src_device, count, stream, p2p_enabled)
    }

    fn copy_data(
        &self,
        device: Device,
        dst: DevicePtr,
        src: DevicePtr,
        count: usize,
    ) -> Result<()> {
        self.driver.memcpy(device, dst, src, count)?;
        Ok(())
    }

    fn warnings(&self) -> WarningCounts {
        self.warnings.counts()
    }

    fn capture_underway(&self) -> bool {
        self.lock().capture_underway
    }

    fn used_bytes(&self, device: Device) -> u64 {
        self.lock().used_bytes.get(device).copied().unwrap_or(0)
    }

    fn memory_limit(&self, device: Device) -> u64 {
        self.lock().memory_limits.get(device).copied().unwrap_or(u64::MAX)
    }

    fn snapshot(&self) -> Vec<BlockSnapshot> {
        let st = self.lock();
        let mut v: Vec<BlockSnapshot> =
            st.ptr_info.iter().map(|(&ptr, b)| b.snapshot(ptr)).collect();
        v.sort_by_key(|b| b.ptr);
        v
    }
}
