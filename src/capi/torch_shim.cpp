// streamalloc's PyTorch shim: makes libstreamalloc.so PyTorch's CUDA allocator through
// a subclass of torch::cuda::CUDAPluggableAllocator, adding what the plain pluggable
// route lacks (each override says which of PyTorch's calls it serves):
//
//  * Out of memory reaches Python as torch.cuda.OutOfMemoryError. PyTorch's pluggable
//    wrapper does not check alloc's result for NULL, but it lets exceptions from the
//    allocation propagate; the Python binding's HANDLE_TH_ERRORS turns
//    c10::OutOfMemoryError into torch.OutOfMemoryError. So alloc throws
//    c10::OutOfMemoryError with the library's message (the seed's fields) when
//    streamalloc_alloc returns NULL for size > 0 with last error code 1.
//  * Statistics (torch.cuda.memory_stats and everything built on it: memory_allocated,
//    max_memory_allocated, memory_reserved, memory_summary; reset_peak_memory_stats,
//    reset_accumulated_memory_stats): getDeviceStats, resetPeakStats,
//    resetAccumulatedStats from streamalloc_device_memory_stats. The keys are the seed's
//    (aggregate "all"; the seed reports no per-pool figures), with the seed's meanings:
//    allocated_bytes and requested_bytes are the live allocations (exact, as requested),
//    active_bytes what the pool hands out (live, the allocator's cache, pending frees:
//    the seed's allocated == active), reserved_bytes the pool's reservation; plus counts
//    (allocation, active), num_alloc_retries, num_ooms, num_device_alloc.
//  * cacheInfo (cudnn.benchmark's workspace guess, S9): trial allocations on the current
//    stream, as the seed.
//  * enablePeerAccess (S18): grants the peer access to the device's pool
//    (cudaMemPoolSetAccess); the base class only calls cudaDeviceEnablePeerAccess, which
//    does not cover pool memory. memcpyAsync: the seed's choice (cudaMemcpyAsync when on
//    one device or p2p is enabled, else cudaMemcpyPeerAsync); the base class always uses
//    cudaMemcpyAsync.
//  * Graph capture follows the seed: beginAllocateToPool -> streamalloc_begin_capture_on
//    (device, the capture stream), endAllocateToPool -> streamalloc_end_capture(device,
//    current stream of device), releasePool -> nothing. PyTorch 2.x calls
//    cudaStreamEndCapture before endAllocateToPool, so free streams are joined into the
//    capture stream as they appear rather than at the end.
//  * recordStream gets the stream's own device (S24), where the plain hook would only
//    see a cudaStream_t.
//  * The hot path skips the base class's bookkeeping: CUDAPluggableAllocator takes a
//    process-wide mutex and updates an unordered_map on every allocation and free, only
//    to hand free() the size, device and stream that the library keeps itself. allocate,
//    raw_alloc, raw_alloc_with_stream, raw_delete and the DataPtr deleter go straight to
//    the library (STREAMALLOC_SHIM_BOOKKEEPING=1 keeps the base class's path, for
//    measurements).
//  * The library's warnings become TORCH_WARNs (Python UserWarnings); init, emptyCache,
//    setMemoryFraction and getBaseAllocation are routed to the library; errors are
//    thrown as c10::Error (RuntimeError in Python).
//
// Built once by streamalloc_torch (torch.utils.cpp_extension, cached; the library is
// opened with dlopen at install time, no link-time dependency). With
// STREAMALLOC_SHIM_NO_PYTHON defined it compiles without Python, for C++ programs that
// include it (benches/gpu/torch_alloc_bench.cpp).

#ifndef STREAMALLOC_SHIM_NO_PYTHON
#include <torch/extension.h>
#endif
#include <c10/core/CachingDeviceAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/csrc/cuda/CUDAPluggableAllocator.h>

#include <cuda_runtime_api.h>
#include <dlfcn.h>

#define STREAMALLOC_NO_CUDA_TYPES 1
#include "streamalloc.h"

#include <cstdlib>
#include <memory>
#include <mutex>
#include <string>

namespace streamalloc_shim {

// The library's functions, found with dlsym (types from streamalloc.h).
struct Lib {
  decltype(&streamalloc_alloc) alloc = nullptr;
  decltype(&streamalloc_free) free = nullptr;
  decltype(&streamalloc_init) init = nullptr;
  decltype(&streamalloc_empty_cache) empty_cache = nullptr;
  decltype(&streamalloc_set_memory_fraction) set_fraction = nullptr;
  decltype(&streamalloc_base_alloc) base_alloc = nullptr;
  decltype(&streamalloc_record_stream_on) record_on = nullptr;
  decltype(&streamalloc_begin_capture_on) begin_capture = nullptr;
  decltype(&streamalloc_end_capture) end_capture = nullptr;
  decltype(&streamalloc_last_error) last_error = nullptr;
  // ---- statistics, peer access, cache info, warnings ----
  decltype(&streamalloc_device_memory_stats) memory_stats = nullptr;
  decltype(&streamalloc_reset_peak_stats) reset_peak = nullptr;
  decltype(&streamalloc_reset_accumulated_stats) reset_accumulated = nullptr;
  decltype(&streamalloc_enable_peer_access) enable_peer = nullptr;
  decltype(&streamalloc_cache_info_on) cache_info_on = nullptr;
  decltype(&streamalloc_set_warning_handler) set_warning_handler = nullptr;
};

inline Lib lib;
inline std::mutex install_mutex;
inline bool installed = false;

inline std::string last_error(int* code) {
  char buf[4096];
  buf[0] = '\0';
  *code = lib.last_error(buf, sizeof(buf));
  return std::string(buf);
}

// Throws the library's last error (if any) as a c10 exception.
inline void check(const char* what) {
  int code = 0;
  std::string msg = last_error(&code);
  if (code == STREAMALLOC_OUT_OF_MEMORY) {
    TORCH_CHECK_WITH(OutOfMemoryError, false, msg);
  }
  TORCH_CHECK(code == 0, "streamalloc: ", what, " failed (code ", code, "): ", msg);
}

inline void check_status(int status, const char* what) {
  if (status != 0) {
    check(what);
  }
}

inline void* shim_alloc(size_t size, int device, cudaStream_t stream) {
  void* p = lib.alloc(size, device, stream);
  if (p == nullptr && size > 0) {
    int code = 0;
    std::string msg = last_error(&code);
    if (code == STREAMALLOC_OUT_OF_MEMORY) {
      TORCH_CHECK_WITH(OutOfMemoryError, false, msg);
    }
    TORCH_CHECK(
        false, "streamalloc: allocation of ", size, " bytes on device ", device,
        " failed (code ", code, "): ", msg);
  }
  return p;
}

inline void shim_free(void* ptr, size_t size, int device, cudaStream_t stream) {
  // Called from tensor deleters: never throws. An error stays in the library's
  // thread-local last error (streamalloc_torch.last_error()) and is warned about.
  lib.free(ptr, size, device, stream);
}

// The DataPtr deleter of the direct path: the library keeps each block's records.
inline void delete_direct(void* ptr) {
  lib.free(ptr, 0, -1, nullptr);
}

// Library warnings -> TORCH_WARN (a Python UserWarning under Python). The library
// already emits its once-only warnings once. Nothing may unwind into the library.
inline void on_warning(int level, const char* message, void*) {
  try {
    TORCH_WARN(level == 2 ? "streamalloc error: " : "streamalloc: ", message);
  } catch (...) {
  }
}

inline void set_stat(c10::CachingAllocator::Stat& s, uint64_t current, uint64_t peak,
                     uint64_t allocated, uint64_t freed) {
  s.current = static_cast<int64_t>(current);
  s.peak = static_cast<int64_t>(peak);
  s.allocated = static_cast<int64_t>(allocated);
  s.freed = static_cast<int64_t>(freed);
}

// The pluggable allocator with the overrides listed at the top of this file.
struct StreamallocAllocator
    : public torch::cuda::CUDAPluggableAllocator::CUDAPluggableAllocator {
  using Base = torch::cuda::CUDAPluggableAllocator::CUDAPluggableAllocator;

  StreamallocAllocator(bool direct)
      : Base(shim_alloc, shim_free), direct_(direct) {}

  // ---- the hot path: straight to the library unless bookkeeping was asked for ----

  c10::DataPtr allocate(size_t size) override {
    if (!direct_) {
      return Base::allocate(size);
    }
    c10::DeviceIndex device = -1;
    C10_CUDA_CHECK(c10::cuda::GetDevice(&device));
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device);
    void* p = shim_alloc(size, device, stream);
    return {p, p, &delete_direct, c10::Device(c10::DeviceType::CUDA, device)};
  }

  c10::DeleterFnPtr raw_deleter() const override {
    return direct_ ? &delete_direct : Base::raw_deleter();
  }

  void* raw_alloc(size_t nbytes) override {
    if (!direct_) {
      return Base::raw_alloc(nbytes);
    }
    c10::DeviceIndex device = -1;
    C10_CUDA_CHECK(c10::cuda::GetDevice(&device));
    return shim_alloc(nbytes, device, c10::cuda::getCurrentCUDAStream(device));
  }

  void* raw_alloc_with_stream(size_t nbytes, cudaStream_t stream) override {
    if (!direct_) {
      return Base::raw_alloc_with_stream(nbytes, stream);
    }
    c10::DeviceIndex device = -1;
    C10_CUDA_CHECK(c10::cuda::GetDevice(&device));
    return shim_alloc(nbytes, device, stream);
  }

  void raw_delete(void* ptr) override {
    if (!direct_) {
      return Base::raw_delete(ptr);
    }
    delete_direct(ptr);
  }

  // ---- streams ----

  void recordStream(const c10::DataPtr& ptr, c10::cuda::CUDAStream stream) override {
    if (ptr.get() == nullptr) {
      return;
    }
    check_status(lib.record_on(ptr.get(), stream.stream(), stream.device_index()),
                 "record_stream");
  }

  // ---- statistics ----

  c10::CachingDeviceAllocator::DeviceStats getDeviceStats(c10::DeviceIndex device) override {
    streamalloc_memory_stats s{};
    check_status(lib.memory_stats(device, &s, sizeof(s)), "memory_stats");
    c10::CachingDeviceAllocator::DeviceStats stats;
    constexpr auto all = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    set_stat(stats.allocated_bytes[all], s.allocated_current, s.allocated_peak,
             s.allocated_total, s.freed_total);
    set_stat(stats.requested_bytes[all], s.allocated_current, s.allocated_peak,
             s.allocated_total, s.freed_total);
    set_stat(stats.active_bytes[all], s.pool_used_current, s.pool_used_peak, 0, 0);
    set_stat(stats.reserved_bytes[all], s.reserved_current, s.reserved_peak, 0, 0);
    set_stat(stats.allocation[all], s.allocations_current, s.allocations_peak,
             s.allocations_total, s.frees_total);
    set_stat(stats.active[all], s.allocations_current, s.allocations_peak,
             s.allocations_total, s.frees_total);
    stats.num_alloc_retries = static_cast<int64_t>(s.num_alloc_retries);
    stats.num_ooms = static_cast<int64_t>(s.num_ooms);
    stats.num_device_alloc = static_cast<int64_t>(s.cache_misses);
    return stats;
  }

  void resetPeakStats(c10::DeviceIndex device) override {
    check_status(lib.reset_peak(device), "reset_peak_stats");
  }

  void resetAccumulatedStats(c10::DeviceIndex device) override {
    check_status(lib.reset_accumulated(device), "reset_accumulated_stats");
  }

  // ---- cudnn's workspace guess, peers, copies ----

  void cacheInfo(c10::DeviceIndex device, size_t* largestBlock) override {
    c10::cuda::CUDAGuard g(device);
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device);
    check_status(lib.cache_info_on(device, stream, largestBlock), "cache_info");
  }

  void enablePeerAccess(c10::DeviceIndex dev, c10::DeviceIndex dev_to_access) override {
    check_status(lib.enable_peer(dev, dev_to_access), "enable_peer_access");
  }

  cudaError_t memcpyAsync(void* dst, int dstDevice, const void* src, int srcDevice,
                          size_t count, cudaStream_t stream, bool p2p_enabled) override {
    if (p2p_enabled || dstDevice == srcDevice) {
      return cudaMemcpyAsync(dst, src, count, cudaMemcpyDeviceToDevice, stream);
    }
    return cudaMemcpyPeerAsync(dst, dstDevice, src, srcDevice, count, stream);
  }

 private:
  bool direct_;
};

template <typename T>
T sym(void* handle, const char* name) {
  void* p = dlsym(handle, name);
  TORCH_CHECK(p != nullptr, "streamalloc: symbol ", name, " not found: ", dlerror(),
              " (is the library older than the shim?)");
  return reinterpret_cast<T>(p);
}

// Opens the library and fills `lib` (idempotent; under install_mutex).
inline void open_library(const std::string& lib_path) {
  if (lib.alloc != nullptr) {
    return;
  }
  void* h = dlopen(lib_path.c_str(), RTLD_NOW | RTLD_GLOBAL);
  TORCH_CHECK(h != nullptr, "streamalloc: cannot open ", lib_path, ": ", dlerror());
  Lib l;
  l.alloc = sym<decltype(l.alloc)>(h, "streamalloc_alloc");
  l.free = sym<decltype(l.free)>(h, "streamalloc_free");
  l.init = sym<decltype(l.init)>(h, "streamalloc_init");
  l.empty_cache = sym<decltype(l.empty_cache)>(h, "streamalloc_empty_cache");
  l.set_fraction = sym<decltype(l.set_fraction)>(h, "streamalloc_set_memory_fraction");
  l.base_alloc = sym<decltype(l.base_alloc)>(h, "streamalloc_base_alloc");
  l.record_on = sym<decltype(l.record_on)>(h, "streamalloc_record_stream_on");
  l.begin_capture = sym<decltype(l.begin_capture)>(h, "streamalloc_begin_capture_on");
  l.end_capture = sym<decltype(l.end_capture)>(h, "streamalloc_end_capture");
  l.last_error = sym<decltype(l.last_error)>(h, "streamalloc_last_error");
  l.memory_stats = sym<decltype(l.memory_stats)>(h, "streamalloc_device_memory_stats");
  l.reset_peak = sym<decltype(l.reset_peak)>(h, "streamalloc_reset_peak_stats");
  l.reset_accumulated =
      sym<decltype(l.reset_accumulated)>(h, "streamalloc_reset_accumulated_stats");
  l.enable_peer = sym<decltype(l.enable_peer)>(h, "streamalloc_enable_peer_access");
  l.cache_info_on = sym<decltype(l.cache_info_on)>(h, "streamalloc_cache_info_on");
  l.set_warning_handler =
      sym<decltype(l.set_warning_handler)>(h, "streamalloc_set_warning_handler");
  lib = l;
}

// Builds the allocator (direct: skip the base class's bookkeeping).
inline std::shared_ptr<StreamallocAllocator> make_allocator(bool direct) {
  auto a = std::make_shared<StreamallocAllocator>(direct);
  a->set_init_fn([](int n) {
    lib.init(n);
    check("init");
  });
  a->set_reset_fn([]() { check_status(lib.empty_cache(), "empty_cache"); });
  a->set_memory_fraction_fn([](double f, int device) {
    lib.set_fraction(f, device);
    check("set_memory_fraction");
  });
  a->set_base_alloc_fn([](void* ptr, size_t* size) -> void* {
    void* base = lib.base_alloc(ptr, size);
    if (base == nullptr && ptr != nullptr) {
      check("base_alloc");
    }
    return base;
  });
  a->set_begin_allocate_to_pool(
      [](int device, c10::cuda::MempoolId_t, std::function<bool(cudaStream_t)>) {
        // CUDAGraph::capture_begin runs on the capture stream: name it, so free streams
        // are joined into it as they appear (capture_end ends the stream capture
        // before it calls endAllocateToPool).
        cudaStream_t s =
            c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).stream();
        check_status(lib.begin_capture(device, s), "begin_capture");
      });
  a->set_end_allocate_to_pool_fn([](int device, c10::cuda::MempoolId_t) {
    cudaStream_t s =
        c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).stream();
    check_status(lib.end_capture(device, s), "end_capture");
  });
  a->set_release_pool([](int, c10::cuda::MempoolId_t) {});
  return a;
}

// Opens the library, builds the allocator, makes it PyTorch's. Must run before CUDA is
// first used (PyTorch refuses to swap an initialized allocator). Returns whether the
// direct path is on.
inline bool install(const std::string& lib_path) {
  std::lock_guard<std::mutex> g(install_mutex);
  const char* keep = std::getenv("STREAMALLOC_SHIM_BOOKKEEPING");
  bool direct = !(keep != nullptr && std::string(keep) == "1");
  if (installed) {
    return direct;
  }
  open_library(lib_path);
  lib.set_warning_handler(&on_warning, nullptr);
  torch::cuda::CUDAPluggableAllocator::changeCurrentAllocator(make_allocator(direct));
  installed = true;
  return direct;
}

inline bool is_installed() {
  std::lock_guard<std::mutex> g(install_mutex);
  return installed;
}

} // namespace streamalloc_shim

#ifndef STREAMALLOC_SHIM_NO_PYTHON
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "streamalloc as PyTorch's CUDA allocator (see streamalloc_torch)";
  m.def("install", &streamalloc_shim::install,
        "Make libstreamalloc PyTorch's CUDA allocator; returns whether the direct path "
        "(no base-class bookkeeping) is on",
        py::arg("lib_path"));
  m.def("installed", &streamalloc_shim::is_installed, "Whether install() ran");
}
#endif
