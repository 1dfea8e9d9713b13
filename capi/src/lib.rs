//! `libstreamalloc.so`: the C ABI of [`streamalloc`] (its `capi` module, documented in
//! `src/capi/streamalloc.h`) as a shared library for PyTorch's
//! `CUDAPluggableAllocator` and C programs. Everything is in `streamalloc::capi`; this
//! crate only links it into a `cdylib` so its `#[no_mangle]` functions are exported.

pub use streamalloc::capi::*;
