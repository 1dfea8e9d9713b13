//! The C ABI's global allocator chosen from the environment: `STREAMALLOC_BACKEND=sim`,
//! `STREAMALLOC_CONF` (one test in this binary, so the variables are set before any
//! other thread reads them).

use std::ffi::{CStr, c_char, c_int};
use streamalloc::capi::*;

#[test]
fn sim_backend_from_environment() {
    // Safety: the only test in this process; nothing else reads the environment yet.
    unsafe {
        std::env::set_var("STREAMALLOC_BACKEND", "sim");
        std::env::set_var("STREAMALLOC_SIM_CAPACITY", (64u64 << 20).to_string());
        std::env::set_var("STREAMALLOC_CONF", "cache:off, max_cache_mb:32");
    }
    // Issue 13 item 7: an absurd count is refused before it can build anything.
    streamalloc_init(c_int::MAX);
    assert_eq!(streamalloc_last_error_code(), 2);
    streamalloc_init(1);
    assert_eq!(streamalloc_last_error_code(), 0);
    // Safety: a static NUL-terminated string.
    assert_eq!(unsafe { CStr::from_ptr(streamalloc_backend()) }, c"sim");
    // Safety (these three): the null stream.
    let p = unsafe { streamalloc_alloc(1 << 20, 0, std::ptr::null_mut()) };
    assert!(!p.is_null());
    assert!(unsafe { streamalloc_alloc(1 << 20, 1, std::ptr::null_mut()) }.is_null());
    assert_eq!(streamalloc_last_error_code(), 2);
    assert!(unsafe { streamalloc_alloc(128 << 20, 0, std::ptr::null_mut()) }.is_null());
    let mut buf = [0 as c_char; 512];
    // Safety: buf holds 512 bytes.
    assert_eq!(unsafe { streamalloc_last_error(buf.as_mut_ptr(), buf.len()) }, 1);
    // Safety: NUL-terminated within buf.
    let msg = unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy();
    assert!(msg.contains("Device limit            : 64.00 MiB"), "{msg}");
    streamalloc_free(p, 1 << 20, 0, std::ptr::null_mut());
    assert_eq!(streamalloc_last_error_code(), 0);
    let mut s = StreamallocStats::default();
    // Safety: s is valid.
    assert_eq!(unsafe { streamalloc_device_stats(0, &mut s) }, 0);
    assert_eq!(s.allocated_current, 0);
    assert_eq!(streamalloc_empty_cache(), 0);
    // The configuration in effect is the environment's.
    let mut buf = [0 as c_char; 128];
    // Safety: buf holds 128 bytes.
    assert_eq!(unsafe { streamalloc_config(buf.as_mut_ptr(), buf.len()) }, 0);
    // Safety: NUL-terminated within buf.
    let conf = unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy();
    assert_eq!(
        conf,
        "cache:off,max_cache_mb:32,release:lean,max_cached_kb:1024,class_reach:2,idle_interval:16384"
    );
}
