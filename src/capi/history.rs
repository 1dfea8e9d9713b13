//! The C ABI of history, OOM observers and memory snapshots (`streamalloc.h`, section
//! "history, OOM observers, snapshots"), for the PyTorch shim's `recordHistory`,
//! `attachOutOfMemoryObserver` and `snapshot`, and for C callers.
//!
//! Same rules as the rest of the C ABI ([`super`]): a thread-local last error, no panic
//! across the boundary.

use super::{Failure, alloc, boundary, status};
use crate::history::{Action, BlockState, HistoryOptions, set_thread_context};
use std::ffi::{c_int, c_void};
use std::sync::Arc;

/// One history entry for C (`streamalloc_history_entry`).
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct StreamallocHistoryEntry {
    /// PyTorch's `TraceEntry::Action` number (0 alloc, 1 free_requested, 2
    /// free_completed, 3 segment_alloc, 4 segment_free, 8 oom).
    pub action: u32,
    /// The device.
    pub device: i32,
    /// The address (for an OOM: the device's free bytes).
    pub addr: u64,
    /// Bytes.
    pub size: u64,
    /// The stream (`cudaStream_t`).
    pub stream: u64,
    /// Nanoseconds since the Unix epoch.
    pub time_ns: u64,
    /// The context id the recording thread had set (0: none).
    pub context: u64,
}

/// One block of a memory snapshot for C (`streamalloc_block`).
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct StreamallocBlock {
    /// The address.
    pub ptr: u64,
    /// Bytes the owner asked for (0 for a cached block).
    pub requested: u64,
    /// Bytes the driver allocated (the segment's size).
    pub size: u64,
    /// The creation stream (for a cached block, the stream it is kept for).
    pub stream: u64,
    /// The device.
    pub device: i32,
    /// 0 live, 1 free deferred until the capture ends, 2 cached.
    pub state: i32,
    /// 1 when allocated during a capture.
    pub captured: i32,
    /// Padding (0).
    pub reserved: i32,
}

/// An OOM observer for C: (device, requested bytes, total or limit bytes, free bytes,
/// user data).
pub type StreamallocOomObserver =
    Option<unsafe extern "C" fn(c_int, usize, usize, usize, *mut c_void)>;

/// Starts (`enabled` != 0) or stops recording history. `max_entries` is clamped to
/// 1..=4 Mi; `clear` drops the entries so far; `skip_mask` has bit `1 << action` set for
/// each action not to record. Stopping drops the entries. Returns the status code.
#[unsafe(no_mangle)]
pub extern "C" fn streamalloc_record_history(
    enabled: c_int,
    max_entries: usize,
    clear: c_int,
    skip_mask: u32,
) -> c_int {
    status(|| {
        let skip = Action::ALL.into_iter().filter(|a| skip_mask & a.bit() != 0).collect();
        let options =
            HistoryOptions { enabled: enabled != 0, max_entries, clear: clear != 0, skip };
        alloc()?.record_history(&options);
        Ok(())
    })
}

/// 1 when history is being recorded, 0 when not (or on error).
#[unsafe(no_mangle)]
pub extern "C" fn streamalloc_history_enabled() -> c_int {
    boundary(0, || Ok(alloc()?.history_enabled() as c_int))
}

/// Sets the context id the calling thread's next history entries carry (0: none).
#[unsafe(no_mangle)]
pub extern "C" fn streamalloc_history_set_context(context: u64) {
    boundary((), || {
        set_thread_context(context);
        Ok(())
    })
}

/// Copies the recorded entries, oldest first, into `out` (at most `cap`) and returns
/// how many there are (call again with a larger buffer if that is more than `cap`).
/// `out` may be NULL when `cap` is 0. Returns 0 on error (last error set).
///
/// # Safety
/// `out` is NULL or valid for `cap` `streamalloc_history_entry` writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn streamalloc_history(
    out: *mut StreamallocHistoryEntry,
    cap: usize,
) -> usize {
    boundary(0, || {
        if out.is_null() && cap > 0 {
            return Err(Failure::invalid("streamalloc_history: out is NULL"));
        }
        let entries = alloc()?.history();
        for (i, e) in entries.iter().take(cap).enumerate() {
            let c = StreamallocHistoryEntry {
                action: e.action as u32,
                device: e.device as i32,
                addr: e.addr,
                size: e.size,
                stream: e.stream.as_raw() as u64,
                time_ns: e.time_ns,
                context: e.context,
            };
            // Safety: out is valid for cap writes (caller) and i < cap.
            unsafe { out.add(i).write(c) };
        }
        Ok(entries.len())
    })
}

/// Copies every block the allocator holds (live, deferred and cached), sorted by device
/// and address, into `out` (at most `cap`) and returns how many there are. `out` may be
/// NULL when `cap` is 0. Returns 0 on error (last error set).
///
/// # Safety
/// `out` is NULL or valid for `cap` `streamalloc_block` writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn streamalloc_snapshot_blocks(
    out: *mut StreamallocBlock,
    cap: usize,
) -> usize {
    boundary(0, || {
        if out.is_null() && cap > 0 {
            return Err(Failure::invalid("streamalloc_snapshot_blocks: out is NULL"));
        }
        let blocks = alloc()?.memory_snapshot();
        for (i, b) in blocks.iter().take(cap).enumerate() {
            let c = StreamallocBlock {
                ptr: b.ptr.as_raw(),
                requested: b.requested,
                size: b.size,
                stream: b.stream.as_raw() as u64,
                device: b.device as i32,
                state: match b.state {
                    BlockState::Live => 0,
                    BlockState::FreeDeferred => 1,
                    BlockState::Cached => 2,
                },
                captured: b.captured as i32,
                reserved: 0,
            };
            // Safety: out is valid for cap writes (caller) and i < cap.
            unsafe { out.add(i).write(c) };
        }
        Ok(blocks.len())
    })
}

/// Adds an out-of-memory observer: `observer(device, requested, total, free, user)` is
/// called on the allocating thread when an allocation fails for lack of memory (before
/// the allocation returns NULL), with no allocator lock held. `total` is the user limit
/// when a memory fraction is set, else the device's total (as PyTorch's allocator
/// passes them). The observer must not unwind (C++ exceptions must be caught inside).
/// Returns the status code (2 for a NULL observer).
///
/// # Safety
/// `observer`, if not null, must be a function that may be called from any thread at any
/// time for the life of the process, with the `user` pointer given here.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn streamalloc_attach_oom_observer(
    observer: StreamallocOomObserver,
    user: *mut c_void,
) -> c_int {
    /// The user pointer, carried to whatever thread fails an allocation.
    struct User(*mut c_void);
    // Safety: the caller gives a pointer it allows to be passed back on any thread
    // (the header says so); we never dereference it.
    unsafe impl Send for User {}
    // Safety: as above; it is only copied.
    unsafe impl Sync for User {}

    status(|| {
        let Some(f) = observer else {
            return Err(Failure::invalid("streamalloc_attach_oom_observer: observer is NULL"));
        };
        let user = User(user);
        let clamp = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
        alloc()?.attach_oom_observer(Arc::new(move |device, requested, total, free| {
            let u = &user;
            // Safety: f is the caller's function with this signature; user is passed
            // back unchanged.
            unsafe { f(device as c_int, clamp(requested), clamp(total), clamp(free), u.0) }
        }));
        Ok(())
    })
}
