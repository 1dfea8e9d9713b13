// PyTorch's allocator interface driven from C++ (no Python, no GIL), for one variant per
// process: PyTorch's native caching allocator, its cudaMallocAsync backend (the seed),
// and streamalloc three ways: torch's plain CUDAPluggableAllocator over the library's C
// hooks, streamalloc's shim keeping the base class's bookkeeping (a process-wide mutex
// and an unordered_map per allocation and free), and the shim's direct path without it.
//
// Workload (the PyTorch anchor's, ../shared/anchors/torch_bench.cpp): T threads, each
// with its own non-blocking stream and a ring of 16 live blocks; every step frees the
// oldest block and allocates a new one (one "pair"); sizes cycle pseudo-randomly over
// {512 B, 4 KiB, 64 KiB, 256 KiB, 1 MiB, 1.5 MiB}. Two APIs: raw (raw_alloc_with_stream /
// raw_delete, as the anchor) and dataptr (allocate() on the thread's current stream, the
// DataPtr's deleter frees: what tensors do).
//
// Usage: torch_alloc_bench VARIANT ITERS_PER_THREAD MAX_THREADS [LIB]
//   VARIANT: native | cudaMallocAsync | streamalloc_pluggable | streamalloc_shim_bookkeeping
//            | streamalloc_shim   (native/cudaMallocAsync follow PYTORCH_CUDA_ALLOC_CONF,
//            which the script sets; LIB: libstreamalloc.so for the streamalloc variants)
// Output: CSV rows  variant,api,threads,mpairs_per_s  (aggregate over all threads).
#define STREAMALLOC_SHIM_NO_PYTHON 1
#include "torch_shim.cpp"

#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <barrier>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

static size_t size_of(uint64_t i) {
  uint64_t x = (i * 6364136223846793005ULL + 1442695040888963407ULL) >> 33;
  static const size_t s[6] = {512, 4096, 65536, 1 << 20, 3 << 19, 256 << 10};
  return s[x % 6];
}

static void install_variant(const std::string& variant, const char* lib_path) {
  if (variant == "native" || variant == "cudaMallocAsync") {
    return;
  }
  TORCH_CHECK(lib_path != nullptr, "variant ", variant, " needs the library path");
  if (variant == "streamalloc_pluggable") {
    void* h = dlopen(lib_path, RTLD_NOW | RTLD_GLOBAL);
    TORCH_CHECK(h != nullptr, dlerror());
    auto alloc = reinterpret_cast<void* (*)(size_t, int, cudaStream_t)>(dlsym(h, "streamalloc_alloc"));
    auto free = reinterpret_cast<void (*)(void*, size_t, int, cudaStream_t)>(dlsym(h, "streamalloc_free"));
    TORCH_CHECK(alloc && free, "streamalloc_alloc/free not found");
    auto a = torch::cuda::CUDAPluggableAllocator::createCustomAllocator(alloc, free);
    torch::cuda::CUDAPluggableAllocator::changeCurrentAllocator(a);
    return;
  }
  bool direct = variant == "streamalloc_shim";
  TORCH_CHECK(direct || variant == "streamalloc_shim_bookkeeping", "unknown variant ", variant);
  setenv("STREAMALLOC_SHIM_BOOKKEEPING", direct ? "0" : "1", 1);
  TORCH_CHECK(streamalloc_shim::install(lib_path) == direct);
}

int main(int argc, char** argv) {
  if (argc < 4) {
    fprintf(stderr, "usage: %s VARIANT ITERS_PER_THREAD MAX_THREADS [LIB]\n", argv[0]);
    return 2;
  }
  std::string variant = argv[1];
  uint64_t iters = atoll(argv[2]);
  int maxt = atoi(argv[3]);
  install_variant(variant, argc > 4 ? argv[4] : nullptr);
  auto* a = c10::cuda::CUDACachingAllocator::get();
  a->init(c10::cuda::device_count());
  const int window = 16;
  for (std::string api : {"raw", "dataptr"}) {
    for (int T = 1; T <= maxt; T *= 2) {
      std::barrier bar(T + 1);
      std::vector<std::thread> th;
      for (int t = 0; t < T; t++) {
        th.emplace_back([&, t] {
          c10::cuda::CUDAGuard g(0);
          cudaStream_t s;
          cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
          auto cs = c10::cuda::getStreamFromExternal(s, 0);
          c10::cuda::CUDAStreamGuard sg(cs);
          std::vector<void*> ring(window);
          std::vector<c10::DataPtr> dring(window);
          auto step = [&](uint64_t i, int k) {
            size_t n = size_of(i + t * 7919ULL);
            if (api == "raw") {
              if (ring[k]) a->raw_delete(ring[k]);
              ring[k] = a->raw_alloc_with_stream(n, s);
            } else {
              dring[k] = a->allocate(n);  // the old DataPtr's deleter frees
            }
          };
          for (int w = 0; w < window; w++) step(w, w);
          for (uint64_t i = 0; i < iters / 10; i++) step(i, i % window);
          cudaStreamSynchronize(s);
          bar.arrive_and_wait();
          for (uint64_t i = 0; i < iters; i++) step(i, i % window);
          cudaStreamSynchronize(s);
          bar.arrive_and_wait();
          for (int w = 0; w < window; w++) {
            if (ring[w]) a->raw_delete(ring[w]);
            dring[w].clear();
          }
          cudaStreamSynchronize(s);
        });
      }
      bar.arrive_and_wait();
      auto t0 = std::chrono::steady_clock::now();
      bar.arrive_and_wait();
      double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      for (auto& x : th) x.join();
      printf("%s,%s,%d,%.4f\n", variant.c_str(), api.c_str(), T, T * (double)iters / dt / 1e6);
      fflush(stdout);
    }
  }
  return 0;
}
