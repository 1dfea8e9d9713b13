//! Device-level functions for the PyTorch shim: pool peer access (S18) and the
//! workspace guess on a given stream (S9).

use super::{CudaStream, Failure, alloc, device, status, stream};
use crate::StreamOrderedAllocator;
use std::ffi::c_int;

/// Lets device `accessor` access memory of device `owner`'s pool (S18: the seed's
/// `enablePeerAccess(dev = accessor, dev_to_access = owner)`, `cudaMemPoolSetAccess`).
/// `cudaDeviceEnablePeerAccess` does not cover pool memory; this does. Returns the
/// status code.
#[unsafe(no_mangle)]
pub extern "C" fn streamalloc_enable_peer_access(accessor: c_int, owner: c_int) -> c_int {
    status(|| {
        let a = alloc()?;
        let (accessor, owner) = (device(a, accessor)?, device(a, owner)?);
        Ok(a.enable_peer_access(accessor, owner)?)
    })
}

/// The largest block that can be allocated on `device` now (S9), found by trial
/// allocations on `stream` (the seed uses the caller's current stream), into `*out`.
/// Returns the status code (2 for a NULL `out`).
///
/// # Safety
/// `out` is null (an error) or valid for one `size_t` write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn streamalloc_cache_info_on(
    device: c_int,
    stream: CudaStream,
    out: *mut usize,
) -> c_int {
    status(|| {
        if out.is_null() {
            return Err(Failure::invalid("streamalloc_cache_info_on: out is NULL"));
        }
        let a = alloc()?;
        let bytes = a.cache_info(self::device(a, device)?, self::stream(stream))?;
        // Safety: out is not null and valid for one write (caller).
        unsafe { out.write(usize::try_from(bytes).unwrap_or(usize::MAX)) };
        Ok(())
    })
}
