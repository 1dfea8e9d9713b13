//! The library's warnings for C and Python hosts.
//!
//! The allocator warns through the `log` facade (the seed's `TORCH_WARN`s, errors it
//! can only log). A C or Python host installs no `log` logger, so the C ABI installs
//! one: records of the `streamalloc` crate at warning level or above go to the handler
//! registered with [`streamalloc_set_warning_handler`] (the PyTorch shim's calls
//! `TORCH_WARN`, so they reach Python as `UserWarning`s), else to standard error.
//! Records of other crates are dropped. If the host process already has a `log` logger
//! (a Rust host), that one keeps receiving everything and the handler is not called.

use std::ffi::{CString, c_char, c_int, c_void};
use std::sync::RwLock;

/// A warning handler: `level` is 1 for a warning, 2 for an error; `message` is a
/// NUL-terminated string valid for the call; `user` is what was registered with it.
pub type WarningHandler =
    unsafe extern "C" fn(level: c_int, message: *const c_char, user: *mut c_void);

/// The registered handler and its user pointer (as an address, so the pair is `Send`).
static HANDLER: RwLock<Option<(WarningHandler, usize)>> = RwLock::new(None);

struct Forwarder;

static FORWARDER: Forwarder = Forwarder;

impl log::Log for Forwarder {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::Level::Warn && metadata.target().starts_with("streamalloc")
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let level = if record.level() == log::Level::Error { 2 } else { 1 };
        let message = record.args().to_string();
        let handler = *HANDLER.read().unwrap_or_else(|p| p.into_inner());
        match handler {
            Some((f, user)) => {
                // Interior NULs cannot cross as a C string: replace them.
                let c = CString::new(message.replace('\0', " ")).unwrap_or_default();
                // Safety: the host registered `f` for exactly this call shape; `c` lives
                // across the call; `user` is the host's own pointer, passed back as is.
                unsafe { f(level, c.as_ptr(), user as *mut c_void) };
            }
            None => {
                let kind = if level == 2 { "error" } else { "warning" };
                write_stderr(&format!("streamalloc {kind}: {message}\n"));
            }
        }
    }

    fn flush(&self) {}
}

/// Writes to file descriptor 2 without std's stderr lock, which needs thread-locals that
/// may already be gone (a warning from a thread's teardown).
fn write_stderr(s: &str) {
    use std::io::Write;
    use std::os::fd::FromRawFd;
    // Safety: fd 2 is the process's standard error; ManuallyDrop keeps it open.
    let mut f = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(2) });
    let _ = f.write_all(s.as_bytes());
}

/// Makes [`Forwarder`] the process's `log` logger, unless one is set already. Returns
/// whether the forwarder is the logger.
pub(crate) fn install_logger() -> bool {
    static INSTALLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *INSTALLED.get_or_init(|| {
        let ok = log::set_logger(&FORWARDER).is_ok();
        if ok {
            log::set_max_level(log::LevelFilter::Warn);
        }
        ok
    })
}

/// Sends the library's warnings to `handler` (called on the thread that warns, possibly
/// many at once; it must not call back into the library), or back to standard error
/// when `handler` is NULL. Returns 0, or 2 (`STREAMALLOC_INVALID_ARGUMENT`) when the
/// process already has another `log` logger, which then keeps the warnings.
///
/// # Safety
/// `handler`, if not null, must be a function that may be called from any thread at any
/// time until it is replaced, with the `user` pointer given here.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn streamalloc_set_warning_handler(
    handler: Option<WarningHandler>,
    user: *mut c_void,
) -> c_int {
    super::status(|| {
        *HANDLER.write().unwrap_or_else(|p| p.into_inner()) = handler.map(|f| (f, user as usize));
        if install_logger() {
            Ok(())
        } else {
            Err(super::Failure::invalid(
                "the process already has a log logger; it receives streamalloc's warnings",
            ))
        }
    })
}
