//! Asymmetric fences: a store-load pattern whose frequent side pays nothing.
//!
//! The epoch's read sections ([`crate::epoch`]) and its rare writer (a capture begin or
//! end) meet in a store-load (Dekker) pattern that needs a full fence on each side. The
//! reader's fence is paid twice per alloc/free pair; the writer's a few times per
//! capture. Linux's `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)` moves the whole cost
//! to the writer: the kernel makes every running thread of this process execute a full
//! memory barrier before the call returns (an IPI to the CPUs that run them; a thread not
//! running passes one at its context switch). A reader then needs only a compiler fence
//! between its store and its load ([`light`]), the writer calls [`heavy`] between its
//! store and its loads, and the pair orders as two `SeqCst` fences would: this is the
//! reader side of liburcu's `urcu-memb` flavour and folly's
//! `asymmetric_thread_fence_light/heavy`.
//!
//! Availability is decided once per process ([`asymmetric`]): the command must be
//! supported and the process registered for it (`MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED`).
//! Elsewhere (another OS, an old kernel, a seccomp filter that refuses the call, Miri,
//! loom) or when `STREAMALLOC_ASYMMETRIC_FENCE=0` is set, [`asymmetric`] is `false` and
//! the epoch keeps its symmetric form (`SeqCst` accesses on both sides).

use crate::sync::{Ordering, fence};

/// Whether [`heavy`] works in this process: registers the process for the expedited
/// private command on the first call. `false` when membarrier is unavailable or
/// `STREAMALLOC_ASYMMETRIC_FENCE=0`.
pub(crate) fn asymmetric() -> bool {
    imp::asymmetric()
}

/// The frequent side's fence: orders this thread's earlier accesses before its later
/// ones against a concurrent [`heavy`] (a compiler fence: the CPU's fence is the one
/// `heavy` forces). Only valid while [`asymmetric`] is `true`.
#[inline(always)]
fn light() {
    std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
}

/// The rare side's fence: a full fence here and in every thread of the process that runs
/// now. Only valid while [`asymmetric`] is `true`: registered and tried then, the kernel
/// does not take the command back; should it, the frequent side is not ordered, and this
/// says so loudly.
fn heavy() {
    if !imp::heavy() {
        log::error!("membarrier failed after registration: store-load ordering at risk");
    }
}

/// The orderings of the symmetric pattern: `SeqCst` accesses (all four in one total
/// order), or under loom acquire/release accesses plus `SeqCst` fences, because loom
/// models `SeqCst` fences but treats `SeqCst` loads and stores as acquire/release.
const SYM_STORE: Ordering =
    if cfg!(streamalloc_loom) { Ordering::Release } else { Ordering::SeqCst };
const SYM_RMW: Ordering = if cfg!(streamalloc_loom) { Ordering::Relaxed } else { Ordering::SeqCst };
const SYM_LOAD: Ordering =
    if cfg!(streamalloc_loom) { Ordering::Acquire } else { Ordering::SeqCst };

/// One store-load (Dekker) pattern between a frequent side (a read section's announce,
/// an owned budget stripe's busy mark) and a rare side (a capture transition, a credit
/// drain): each side stores, fences, then loads what the other stored, so at least one
/// of them sees the other. Asymmetric where [`asymmetric`] allows (the frequent side
/// stores plainly and pays a compiler fence, the rare side a membarrier), symmetric
/// otherwise and always under loom. The frequent side's later un-marking is a `Release`
/// store that the rare side's loads (acquiring in both forms) pair with.
#[derive(Clone, Copy, Debug)]
pub(crate) struct StoreLoad {
    asymmetric: bool,
}

impl StoreLoad {
    /// The form this process uses (decided once, [`asymmetric`]; symmetric under loom).
    pub(crate) fn new() -> Self {
        StoreLoad { asymmetric: !cfg!(streamalloc_loom) && asymmetric() }
    }

    /// The frequent side whole: `store` (given the ordering to store with), the fence,
    /// then `load` (given the ordering to load with). Each form passes constant
    /// orderings, so the atomic accesses compile inline to plain instructions.
    #[inline(always)]
    pub(crate) fn frequent<T>(
        self,
        store: impl FnOnce(Ordering),
        load: impl FnOnce(Ordering) -> T,
    ) -> T {
        if self.asymmetric {
            store(Ordering::Relaxed);
            light();
            load(Ordering::Acquire)
        } else {
            store(SYM_STORE);
            if cfg!(streamalloc_loom) {
                fence(Ordering::SeqCst);
            }
            load(SYM_LOAD)
        }
    }

    /// The rare side's store (`Release` at least: it may publish data).
    pub(crate) fn rare_store(self) -> Ordering {
        SYM_STORE
    }

    /// The rare side's store, when it is a read-modify-write.
    pub(crate) fn rare_rmw(self) -> Ordering {
        SYM_RMW
    }

    /// Between the rare side's store and its loads.
    pub(crate) fn rare_fence(self) {
        if self.asymmetric {
            heavy();
        } else if cfg!(streamalloc_loom) {
            fence(Ordering::SeqCst);
        }
    }

    /// The rare side's loads (acquiring: they pair with the frequent side's `Release`
    /// un-marking).
    pub(crate) fn rare_load(self) -> Ordering {
        SYM_LOAD
    }
}

#[cfg(all(target_os = "linux", any(target_arch = "x86_64", target_arch = "aarch64"), not(miri)))]
mod imp {
    use std::ffi::{c_int, c_long};
    use std::sync::OnceLock;

    #[cfg(target_arch = "x86_64")]
    const SYS_MEMBARRIER: c_long = 324;
    #[cfg(target_arch = "aarch64")]
    const SYS_MEMBARRIER: c_long = 283;
    const CMD_QUERY: c_int = 0;
    const CMD_PRIVATE_EXPEDITED: c_int = 1 << 3;
    const CMD_REGISTER_PRIVATE_EXPEDITED: c_int = 1 << 4;

    unsafe extern "C" {
        /// libc's variadic `syscall(2)` (std links libc on Linux).
        fn syscall(number: c_long, ...) -> c_long;
    }

    fn membarrier(cmd: c_int) -> c_long {
        // Safety: membarrier(cmd, flags = 0, cpu_id = 0) reads and writes no memory of
        // ours; an unsupported or refused command returns -1 with errno set.
        unsafe { syscall(SYS_MEMBARRIER, cmd, 0 as c_int, 0 as c_int) }
    }

    pub(super) fn asymmetric() -> bool {
        static ON: OnceLock<bool> = OnceLock::new();
        *ON.get_or_init(|| {
            if std::env::var("STREAMALLOC_ASYMMETRIC_FENCE").is_ok_and(|v| v.trim() == "0") {
                return false;
            }
            let supported = membarrier(CMD_QUERY);
            let both = (CMD_PRIVATE_EXPEDITED | CMD_REGISTER_PRIVATE_EXPEDITED) as c_long;
            supported >= 0
                && supported & both == both
                && membarrier(CMD_REGISTER_PRIVATE_EXPEDITED) == 0
                // One trial: a filter may allow the registration and refuse the command.
                && membarrier(CMD_PRIVATE_EXPEDITED) == 0
        })
    }

    pub(super) fn heavy() -> bool {
        // The call is a full fence on this thread too; the SeqCst fence documents it to
        // the compiler (and is the stand-in should the call ever fail).
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let ok = membarrier(CMD_PRIVATE_EXPEDITED) == 0;
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        ok
    }
}

#[cfg(not(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64"),
    not(miri)
)))]
mod imp {
    pub(super) fn asymmetric() -> bool {
        false
    }

    pub(super) fn heavy() -> bool {
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        false
    }
}

#[cfg(all(test, not(streamalloc_loom)))]
mod tests {
    use super::*;

    #[test]
    fn heavy_works_where_asymmetric() {
        // Decided once; stable across calls.
        let on = asymmetric();
        assert_eq!(asymmetric(), on);
        if on {
            assert!(imp::heavy());
        }
    }
}
