//! A bad `STREAMALLOC_CONF`: the C ABI's allocator is not created, and every call fails
//! with code 7 and a message naming the key (one test in this binary, so the variable is
//! set before any other thread reads it).

use std::ffi::{CStr, c_char};
use streamalloc::capi::*;

#[test]
fn unknown_key_fails_every_call_with_a_clear_error() {
    // Safety: the only test in this process; nothing else reads the environment yet.
    unsafe {
        std::env::set_var("STREAMALLOC_BACKEND", "sim");
        std::env::set_var("STREAMALLOC_CONF", "cache:on,release_thresold:1");
    }
    // Safety: the null stream.
    assert!(unsafe { streamalloc_alloc(4096, 0, std::ptr::null_mut()) }.is_null());
    let mut buf = [0 as c_char; 512];
    // Safety: buf holds 512 bytes.
    assert_eq!(unsafe { streamalloc_last_error(buf.as_mut_ptr(), buf.len()) }, 7);
    // Safety: NUL-terminated within buf.
    let msg = unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned();
    assert!(msg.starts_with("STREAMALLOC_CONF: \"release_thresold:1\": unknown key"), "{msg}");
    assert!(msg.contains("known keys: cache:<on|off>, max_cache_mb:"), "{msg}");
    assert_eq!(streamalloc_empty_cache(), 7);
    // Safety: a static string.
    assert_eq!(unsafe { CStr::from_ptr(streamalloc_backend()) }, c"none");
    assert_eq!(streamalloc_last_error_code(), 7);
}
