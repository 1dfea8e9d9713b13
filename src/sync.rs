//! The one place that chooses between `std` and loom synchronization types.
//!
//! Under `--cfg streamalloc_loom` (a crate-specific cfg, so a user's `--cfg loom` does not
//! switch this crate) the protocol pieces ([`crate::epoch`], [`crate::budget`]) are built
//! on loom's types and model-checked; otherwise they use `std`'s.

#[cfg(not(streamalloc_loom))]
pub(crate) use std::sync::atomic::{
    AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering, fence,
};
#[cfg(not(streamalloc_loom))]
pub(crate) use std::sync::{Mutex, MutexGuard};
#[cfg(not(streamalloc_loom))]
pub(crate) use std::thread::{Thread, current as current_thread, park};

#[cfg(streamalloc_loom)]
pub(crate) use loom::cell::UnsafeCell;
#[cfg(streamalloc_loom)]
pub(crate) use loom::sync::atomic::{
    AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering, fence,
};
#[cfg(streamalloc_loom)]
pub(crate) use loom::sync::{Mutex, MutexGuard};
#[cfg(streamalloc_loom)]
pub(crate) use loom::thread::{Thread, current as current_thread, park};

/// `std`'s `UnsafeCell` with loom's interface (`with` / `with_mut` hand out raw
/// pointers), so that code written against it is model-checked under loom.
#[cfg(not(streamalloc_loom))]
#[derive(Debug)]
pub(crate) struct UnsafeCell<T>(std::cell::UnsafeCell<T>);

#[cfg(not(streamalloc_loom))]
impl<T> UnsafeCell<T> {
    pub(crate) const fn new(data: T) -> Self {
        UnsafeCell(std::cell::UnsafeCell::new(data))
    }

    /// Runs `f` with a shared pointer to the value.
    #[inline(always)]
    pub(crate) fn with<R>(&self, f: impl FnOnce(*const T) -> R) -> R {
        f(self.0.get())
    }

    /// Runs `f` with an exclusive pointer to the value.
    #[inline(always)]
    pub(crate) fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
        f(self.0.get())
    }
}

/// Yields while spinning on a condition another thread will change.
pub(crate) fn spin_wait() {
    #[cfg(streamalloc_loom)]
    loom::thread::yield_now();
    #[cfg(not(streamalloc_loom))]
    std::thread::yield_now();
}

/// A hint inside a short spin (under loom: a yield, so the model makes progress).
#[inline(always)]
pub(crate) fn spin_hint() {
    #[cfg(streamalloc_loom)]
    loom::thread::yield_now();
    #[cfg(not(streamalloc_loom))]
    std::hint::spin_loop();
}

/// Locks a mutex, ignoring poisoning: the data behind our mutexes stays consistent
/// across a panic (they guard initialization and capture transitions, whose state is
/// written last).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// Locks a `std` mutex (never a loom one: for data outside the model-checked
/// protocols), ignoring poisoning as [`lock`] does.
pub(crate) fn lock_std<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// A small index for the calling thread, in `0..n`: threads are spread round-robin (under
/// loom, by loom's thread id, so model threads may or may not share a stripe).
#[inline]
pub(crate) fn thread_stripe(n: usize) -> usize {
    #[cfg(not(streamalloc_loom))]
    {
        use std::cell::Cell;
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        thread_local!(static MINE: Cell<usize> = const { Cell::new(usize::MAX) });
        MINE.try_with(|m| {
            let mut s = m.get();
            if s == usize::MAX {
                s = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                m.set(s);
            }
            s % n
        })
        .unwrap_or(0)
    }
    #[cfg(streamalloc_loom)]
    {
        let id = format!("{:?}", loom::thread::current().id());
        id.bytes().map(usize::from).sum::<usize>() % n
    }
}

/// The registry behind [`thread_slot`].
#[cfg(not(streamalloc_loom))]
mod slot {
    use super::lock_std;
    use std::cell::Cell;

    /// Indexes given back by threads that exited.
    static FREE: std::sync::Mutex<Vec<usize>> = std::sync::Mutex::new(Vec::new());
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    /// `MINE` before the thread's first call.
    pub(super) const UNSET: usize = usize::MAX;
    /// `MINE` once the thread's index was given back (thread teardown).
    pub(super) const GONE: usize = usize::MAX - 1;

    thread_local! {
        /// The calling thread's index, read on every call: a `const` thread-local with no
        /// destructor, so reading it is one load, valid during teardown too.
        pub(super) static MINE: Cell<usize> = const { Cell::new(UNSET) };
        /// Holds the index and gives it back on exit.
        static HELD: Held = Held(lock_std(&FREE).pop().unwrap_or_else(|| {
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        }));
    }

    /// Holds the index and gives it back on exit (after marking `MINE` gone, so no later
    /// call of this thread, in another thread-local's destructor, uses it).
    struct Held(usize);

    impl Drop for Held {
        fn drop(&mut self) {
            let _ = MINE.try_with(|m| m.set(GONE));
            lock_std(&FREE).push(self.0);
        }
    }

    /// `thread_slot` when the thread holds no index below `n`: its first call takes one
    /// (registering `HELD`'s destructor); `None` if the index is `n` or above, or the
    /// thread is being torn down.
    #[cold]
    #[inline(never)]
    pub(super) fn first_or_gone(mine: usize, n: usize) -> Option<usize> {
        let index = match mine {
            UNSET => {
                let i = HELD.try_with(|h| h.0).ok()?;
                let _ = MINE.try_with(|m| m.set(i));
                i
            }
            GONE => return None,
            i => i,
        };
        (index < n).then_some(index)
    }
}

/// An index in `0..n` that the calling thread holds alone while it lives, or `None`
/// (more than `n` threads hold one, or the thread is being torn down). A thread's index
/// is given back when it exits and handed to a later thread; the registry's mutex orders
/// everything the old owner wrote to the data behind its index before the new owner's
/// first access. Under loom, model threads with an even id hold their id (the models
/// spawn few), the others none, so both the owned and the shared paths are explored.
#[inline(always)]
pub(crate) fn thread_slot(n: usize) -> Option<usize> {
    #[cfg(not(streamalloc_loom))]
    {
        // The common case inline: the thread holds an index already (`UNSET` and `GONE`
        // are above every `n`).
        let mine = slot::MINE.try_with(std::cell::Cell::get).unwrap_or(slot::GONE);
        if mine < n {
            return Some(mine);
        }
        slot::first_or_gone(mine, n)
    }
    #[cfg(streamalloc_loom)]
    {
        let id = format!("{:?}", loom::thread::current().id());
        let id: usize = id.chars().filter(char::is_ascii_digit).collect::<String>().parse().ok()?;
        (id % 2 == 0 && id < n).then_some(id)
    }
}
