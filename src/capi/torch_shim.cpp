// streamalloc's PyTorch shim: makes libstreamalloc.so PyTorch's CUDA allocator through
// torch::cuda::CUDAPluggableAllocator, adding what the plain pluggable route lacks:
//
//  * Out of memory reaches Python as torch.cuda.OutOfMemoryError. PyTorch's pluggable
//    wrapper does not check alloc's result for NULL (CUDAPluggableAllocator::malloc
//    stores it and returns it), but it lets exceptions from alloc_fn_ propagate; the
//    Python binding's HANDLE_TH_ERRORS (torch/csrc/Exceptions.h, CATCH_CORE_ERRORS)
//    turns c10::OutOfMemoryError into THPException_OutOfMemoryError, i.e.
//    torch.OutOfMemoryError (alias torch.cuda.OutOfMemoryError). So the shim's alloc
//    throws c10::OutOfMemoryError with the library's message (the seed's fields) when
//    streamalloc_alloc returns NULL for size > 0 with last error code 1.
//  * Graph capture follows the seed: beginAllocateToPool -> streamalloc_begin_capture_on
//    (device, the capture stream), endAllocateToPool -> streamalloc_end_capture(device,
//    current stream of device), releasePool -> nothing. PyTorch 2.x calls
//    cudaStreamEndCapture before endAllocateToPool, so free streams are joined into the
//    capture stream as they appear rather than at the end.
//  * recordStream gets the stream's own device (S24): the class overrides recordStream,
//    where the plain hook would only see a cudaStream_t.
//  * init, emptyCache (reset), setMemoryFraction and getBaseAllocation are routed to
//    the library; their errors are thrown as c10::Error (RuntimeError in Python).
//
// Built once by streamalloc_torch.py with torch.utils.cpp_extension.load (cached).
// The library is opened with dlopen at install time (no link-time dependency).

#include <torch/extension.h>
#include <torch/csrc/cuda/CUDAPluggableAllocator.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <dlfcn.h>
#include <cuda_runtime_api.h>

#include <memory>
#include <mutex>
#include <string>

namespace {

using alloc_fn_t = void* (*)(size_t, int, cudaStream_t);
using free_fn_t = void (*)(void*, size_t, int, cudaStream_t);
using init_fn_t = void (*)(int);
using status_fn_t = int (*)();
using fraction_fn_t = void (*)(double, int);
using base_alloc_fn_t = void* (*)(void*, size_t*);
using record_on_fn_t = int (*)(void*, cudaStream_t, int);
using begin_fn_t = int (*)(int, cudaStream_t);
using end_fn_t = int (*)(int, cudaStream_t);
using last_error_fn_t = int (*)(char*, size_t);

struct Lib {
  alloc_fn_t alloc = nullptr;
  free_fn_t free = nullptr;
  init_fn_t init = nullptr;
  status_fn_t empty_cache = nullptr;
  fraction_fn_t set_fraction = nullptr;
  base_alloc_fn_t base_alloc = nullptr;
  record_on_fn_t record_on = nullptr;
  begin_fn_t begin_capture = nullptr;
  end_fn_t end_capture = nullptr;
  last_error_fn_t last_error = nullptr;
};

Lib lib;
std::mutex install_mutex;
bool installed = false;

std::string last_error(int* code) {
  char buf[4096];
  buf[0] = '\0';
  *code = lib.last_error(buf, sizeof(buf));
  return std::string(buf);
}

// Throws the library's last error (if any) as a c10 exception.
void check(const char* what) {
  int code = 0;
  std::string msg = last_error(&code);
  if (code == 1) {
    TORCH_CHECK_WITH(OutOfMemoryError, false, msg);
  }
  TORCH_CHECK(code == 0, "streamalloc: ", what, " failed (code ", code, "): ", msg);
}

void* shim_alloc(size_t size, int device, cudaStream_t stream) {
  void* p = lib.alloc(size, device, stream);
  if (p == nullptr && size > 0) {
    int code = 0;
    std::string msg = last_error(&code);
    if (code == 1) {
      TORCH_CHECK_WITH(OutOfMemoryError, false, msg);
    }
    TORCH_CHECK(
        false, "streamalloc: allocation of ", size, " bytes on device ", device,
        " failed (code ", code, "): ", msg);
  }
  return p;
}

void shim_free(void* ptr, size_t size, int device, cudaStream_t stream) {
  // Called from tensor deleters: never throws. An error stays in the library's
  // thread-local last error (streamalloc_torch.last_error()).
  lib.free(ptr, size, device, stream);
}

// The pluggable allocator with the stream's own device passed to record_stream.
struct StreamallocAllocator
    : public torch::cuda::CUDAPluggableAllocator::CUDAPluggableAllocator {
  using Base = torch::cuda::CUDAPluggableAllocator::CUDAPluggableAllocator;
  using Base::Base;

  void recordStream(const c10::DataPtr& ptr, c10::cuda::CUDAStream stream) override {
    if (ptr.get() == nullptr) {
      return;
    }
    if (lib.record_on(ptr.get(), stream.stream(), stream.device_index()) != 0) {
      check("record_stream");
    }
  }
};

template <typename T>
T sym(void* handle, const char* name) {
  void* p = dlsym(handle, name);
  TORCH_CHECK(p != nullptr, "streamalloc: symbol ", name, " not found: ", dlerror());
  return reinterpret_cast<T>(p);
}

// Opens the library, builds the allocator, makes it PyTorch's. Must run before CUDA is
// first used (PyTorch refuses to swap an initialized allocator).
void install(const std::string& lib_path) {
  std::lock_guard<std::mutex> g(install_mutex);
  if (installed) {
    return;
  }
  void* h = dlopen(lib_path.c_str(), RTLD_NOW | RTLD_GLOBAL);
  TORCH_CHECK(h != nullptr, "streamalloc: cannot open ", lib_path, ": ", dlerror());
  lib.alloc = sym<alloc_fn_t>(h, "streamalloc_alloc");
  lib.free = sym<free_fn_t>(h, "streamalloc_free");
  lib.init = sym<init_fn_t>(h, "streamalloc_init");
  lib.empty_cache = sym<status_fn_t>(h, "streamalloc_empty_cache");
  lib.set_fraction = sym<fraction_fn_t>(h, "streamalloc_set_memory_fraction");
  lib.base_alloc = sym<base_alloc_fn_t>(h, "streamalloc_base_alloc");
  lib.record_on = sym<record_on_fn_t>(h, "streamalloc_record_stream_on");
  lib.begin_capture = sym<begin_fn_t>(h, "streamalloc_begin_capture_on");
  lib.end_capture = sym<end_fn_t>(h, "streamalloc_end_capture");
  lib.last_error = sym<last_error_fn_t>(h, "streamalloc_last_error");

  auto a = std::make_shared<StreamallocAllocator>(shim_alloc, shim_free);
  a->set_init_fn([](int n) {
    lib.init(n);
    check("init");
  });
  a->set_reset_fn([]() {
    if (lib.empty_cache() != 0) {
      check("empty_cache");
    }
  });
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
        if (lib.begin_capture(device, s) != 0) {
          check("begin_capture");
        }
      });
  a->set_end_allocate_to_pool_fn([](int device, c10::cuda::MempoolId_t) {
    cudaStream_t s =
        c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).stream();
    if (lib.end_capture(device, s) != 0) {
      check("end_capture");
    }
  });
  a->set_release_pool([](int, c10::cuda::MempoolId_t) {});
  torch::cuda::CUDAPluggableAllocator::changeCurrentAllocator(a);
  installed = true;
}

bool is_installed() {
  std::lock_guard<std::mutex> g(install_mutex);
  return installed;
}

} // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "streamalloc as PyTorch's CUDA allocator (see streamalloc_torch.py)";
  m.def("install", &install, "Make libstreamalloc PyTorch's CUDA allocator",
        py::arg("lib_path"));
  m.def("installed", &is_installed, "Whether install() ran");
}
