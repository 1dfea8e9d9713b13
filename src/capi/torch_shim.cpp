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
//  * Private pools (torch.cuda.MemPool, use_mem_pool, torch.cuda.graph(pool=...),
//    torch.compile(mode="reduce-overhead")'s graph trees; the block marked "private
//    pools" below): createOrIncrefPool, releasePool, getPoolUseCount,
//    beginAllocateToPool (the filter is handed to the library, which routes matching
//    allocations; the current stream is the context's origin, on which the library
//    notices a graph capture itself), endAllocateToPool, checkPoolLiveAllocations,
//    getCheckpointState / setCheckpointPoolState (StreamallocPoolState, the pool's live
//    blocks; the delta's DataPtrs carry the direct path's deleter), setNoSplit (pool
//    blocks are never split), setUseOnOOM(false); setUseOnOOM(true) is refused.
//  * recordStream gets the stream's own device (S24), where the plain hook would only
//    see a cudaStream_t.
//  * The hot path skips the base class's bookkeeping: CUDAPluggableAllocator takes a
//    process-wide mutex and updates an unordered_map on every allocation and free, only
//    to hand free() the size, device and stream that the library keeps itself. allocate,
//    raw_alloc, raw_alloc_with_stream, raw_delete and the DataPtr deleter go straight to
//    the library (STREAMALLOC_SHIM_BOOKKEEPING=1 keeps the base class's path, for
//    measurements).
//  * History, OOM observers and snapshots (torch.cuda.memory._record_memory_history,
//    _snapshot, _dump_snapshot, torch._C._cuda_attach_out_of_memory_observer; the block
//    marked "history, OOM observers, snapshot" below): recordHistory / isHistoryEnabled
//    drive the library's ring (streamalloc_record_history); the frames PyTorch gathers
//    (its CreateContextFn) are kept here under a context id that the library stores with
//    each entry the call records; snapshot() builds c10's SnapshotInfo (one segment of
//    one block per driver allocation: live, free deferred by a capture, cached; and
//    device_traces) so that memory_viz reads it; attachOutOfMemoryObserver registers
//    PyTorch's observers with the library (an observer's exception is rethrown from the
//    allocation). With no frames asked for, the hot path pays one relaxed load.
//  * The library's warnings become TORCH_WARNs (Python UserWarnings); init, emptyCache,
//    setMemoryFraction and getBaseAllocation are routed to the library; errors are
//    thrown as c10::Error (RuntimeError in Python).
//
// Built once by streamalloc_torch (torch.utils.cpp_extension, cached; the library is
// opened with dlopen at install time, no link-time dependency). With
// STREAMALLOC_SHIM_NO_PYTHON defined it compiles without Python, for C++ programs that
// include it (benches/gpu/torch_alloc_bench.cpp).

#ifndef STREAMALLOC_SHIM_NO_PYTHON
#include <torch/csrc/profiler/combined_traceback.h>
#include <torch/extension.h>
#endif
#include <c10/core/CachingDeviceAllocator.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/csrc/cuda/CUDAPluggableAllocator.h>

#include <cuda_runtime_api.h>
#include <dlfcn.h>

#define STREAMALLOC_NO_CUDA_TYPES 1
#include "streamalloc.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <deque>
#include <thread>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

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
  decltype(&streamalloc_last_error) last_error = nullptr;
  // ---- statistics, peer access, cache info, warnings ----
  decltype(&streamalloc_device_memory_stats) memory_stats = nullptr;
  decltype(&streamalloc_reset_peak_stats) reset_peak = nullptr;
  decltype(&streamalloc_reset_accumulated_stats) reset_accumulated = nullptr;
  decltype(&streamalloc_enable_peer_access) enable_peer = nullptr;
  decltype(&streamalloc_cache_info_on) cache_info_on = nullptr;
  decltype(&streamalloc_set_warning_handler) set_warning_handler = nullptr;
  // ---- history, OOM observers, snapshot ----
  decltype(&streamalloc_record_history) record_history = nullptr;
  decltype(&streamalloc_history_enabled) history_enabled = nullptr;
  decltype(&streamalloc_history_set_context) set_context = nullptr;
  decltype(&streamalloc_history) history = nullptr;
  decltype(&streamalloc_snapshot_blocks) snapshot_blocks = nullptr;
  decltype(&streamalloc_attach_oom_observer) attach_oom_observer = nullptr;
  // ---- private pools ----
  decltype(&streamalloc_pool_create_or_incref) pool_incref = nullptr;
  decltype(&streamalloc_pool_release) pool_release = nullptr;
  decltype(&streamalloc_pool_use_count) pool_use_count = nullptr;
  decltype(&streamalloc_pool_begin_allocate_to) pool_begin = nullptr;
  decltype(&streamalloc_pool_end_allocate_to) pool_end = nullptr;
  decltype(&streamalloc_pool_checkpoint) pool_checkpoint = nullptr;
  decltype(&streamalloc_pool_restore) pool_restore = nullptr;
  decltype(&streamalloc_pool_check_live) pool_check_live = nullptr;
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

// ---- history, OOM observers, snapshot: the shim's state ----

namespace cca = c10::cuda::CUDACachingAllocator;

// The frames PyTorch asked recordHistory for (cca::RecordContext), read on every
// allocation and free: NEVER (the default, and history without frames: the library
// records the entries itself) costs that one relaxed load.
inline std::atomic<int> context_when{static_cast<int>(cca::RecordContext::NEVER)};
inline std::atomic<cca::CreateContextFn> recorder{nullptr};

struct Contexts {
  std::mutex m;
  uint64_t next_id = 1;
  size_t max_ids = 1;
  // Frames of the newest trace entries, by the id the library stored with them.
  std::deque<std::pair<uint64_t, std::shared_ptr<c10::GatheredContext>>> trace;
  // Frames of live blocks (context_when_allocated), by address.
  std::unordered_map<void*, std::shared_ptr<c10::GatheredContext>> live;
};
// Never destroyed: frames may hold Python objects, which cannot be released at exit.
inline Contexts& contexts = *new Contexts;

// An exception an OOM observer threw on this thread, rethrown by the allocation
// (PyTorch's allocator lets an observer's exception propagate out of malloc).
inline thread_local std::exception_ptr observer_error;

inline bool frames_wanted() {
  return context_when.load(std::memory_order_relaxed) !=
      static_cast<int>(cca::RecordContext::NEVER);
}

// Files frames for trace entries; returns the id the library records with them.
inline uint64_t file_context(std::shared_ptr<c10::GatheredContext> ctx) {
  std::lock_guard<std::mutex> g(contexts.m);
  uint64_t id = contexts.next_id++;
  contexts.trace.emplace_back(id, std::move(ctx));
  while (contexts.trace.size() > contexts.max_ids) {
    contexts.trace.pop_front();
  }
  return id;
}

// The calling thread's context id for the library, for the duration of one call.
struct ContextScope {
  explicit ContextScope(uint64_t id) : set_(id != 0) {
    if (set_) {
      lib.set_context(id);
    }
  }
  ~ContextScope() {
    if (set_) {
      lib.set_context(0);
    }
  }
  ContextScope(const ContextScope&) = delete;
  ContextScope& operator=(const ContextScope&) = delete;

 private:
  bool set_;
};

// ---- the allocation and the free every path takes ----

inline void* alloc_plain(size_t size, int device, cudaStream_t stream) {
  void* p = lib.alloc(size, device, stream);
  if (p == nullptr && size > 0) {
    if (observer_error) { // an OOM observer threw: its exception, as PyTorch does
      std::exception_ptr e = std::move(observer_error);
      observer_error = nullptr;
      std::rethrow_exception(e);
    }
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

// History with frames: gathers them as RecordContext asks (STATE: for the live block,
// ALLOC and ALL: also for the trace entries this call records).
C10_NOINLINE inline void* alloc_with_frames(size_t size, int device, cudaStream_t stream) {
  auto when = static_cast<cca::RecordContext>(context_when.load(std::memory_order_relaxed));
  auto fn = recorder.load(std::memory_order_relaxed);
  std::shared_ptr<c10::GatheredContext> ctx;
  uint64_t id = 0;
  if (fn != nullptr && when >= cca::RecordContext::STATE) {
    ctx = fn();
    if (ctx != nullptr && when >= cca::RecordContext::ALLOC) {
      id = file_context(ctx);
    }
  }
  void* p = nullptr;
  {
    ContextScope scope(id);
    p = alloc_plain(size, device, stream);
  }
  if (p != nullptr && ctx != nullptr) {
    std::lock_guard<std::mutex> g(contexts.m);
    contexts.live[p] = std::move(ctx);
  }
  return p;
}

inline void* shim_alloc(size_t size, int device, cudaStream_t stream) {
  if (C10_UNLIKELY(frames_wanted())) {
    return alloc_with_frames(size, device, stream);
  }
  return alloc_plain(size, device, stream);
}

// Frames of the free (RecordContext ALL) for its entries; the block's frames dropped.
// Never throws: frames are best effort in a deleter.
C10_NOINLINE inline void free_with_frames(void* ptr, size_t size, int device,
                                          cudaStream_t stream) {
  uint64_t id = 0;
  try {
    auto when = static_cast<cca::RecordContext>(context_when.load(std::memory_order_relaxed));
    auto fn = recorder.load(std::memory_order_relaxed);
    std::shared_ptr<c10::GatheredContext> ctx;
    if (fn != nullptr && when == cca::RecordContext::ALL) {
      ctx = fn();
    }
    {
      std::lock_guard<std::mutex> g(contexts.m);
      contexts.live.erase(ptr);
    }
    if (ctx != nullptr) {
      id = file_context(std::move(ctx));
    }
  } catch (...) {
    id = 0;
  }
  ContextScope scope(id);
  lib.free(ptr, size, device, stream);
}

inline void shim_free(void* ptr, size_t size, int device, cudaStream_t stream) {
  // Called from tensor deleters: never throws. An error stays in the library's
  // thread-local last error (streamalloc_torch.last_error()) and is warned about.
  if (C10_UNLIKELY(frames_wanted())) {
    free_with_frames(ptr, size, device, stream);
    return;
  }
  lib.free(ptr, size, device, stream);
}

// The DataPtr deleter of the direct path: the library keeps each block's records.
inline void delete_direct(void* ptr) {
  shim_free(ptr, 0, -1, nullptr);
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

// ---- history, OOM observers, snapshot: PyTorch's OOM observers ----

struct Observers {
  std::mutex m;
  std::vector<cca::OutOfMemoryObserver> list;
  bool registered = false;
};
// Never destroyed: observers may hold Python callables (as PyTorch's allocator does).
inline Observers& observers = *new Observers;

// Called by the library on the allocating thread, with no allocator lock held, before
// the allocation returns NULL. Must not unwind into the library: the first exception
// is kept for alloc_plain to rethrow.
inline void oom_trampoline(int device, size_t requested, size_t total, size_t free_bytes,
                           void*) {
  std::vector<cca::OutOfMemoryObserver> local;
  try {
    std::lock_guard<std::mutex> g(observers.m);
    local = observers.list;
  } catch (...) {
    return;
  }
  for (const auto& obs : local) {
    try {
      obs(device, requested, total, free_bytes);
    } catch (...) {
      if (!observer_error) {
        observer_error = std::current_exception();
      }
    }
  }
}

// ---- private pools: the shim's side ----

using PoolFilter = std::function<bool(cudaStream_t)>;

// The library calls the filter from the allocating thread; it must not unwind there.
inline int filter_trampoline(void* ctx, cudaStream_t stream) {
  try {
    return (*static_cast<PoolFilter*>(ctx))(stream) ? 1 : 0;
  } catch (...) {
    return 0;
  }
}

// The library releases the filter once no router can call it.
inline void filter_drop(void* ctx) {
  delete static_cast<PoolFilter*>(ctx);
}

// A checkpoint: the pool's live blocks (getCheckpointState's result).
struct StreamallocPoolState : public cca::AllocatorState {
  c10::DeviceIndex device = 0;
  c10::cuda::MempoolId_t id{0, 0};
  std::vector<streamalloc_pool_block> blocks;
};

inline void collect_freed(void* ctx, void* ptr, size_t) {
  try {
    static_cast<std::vector<void*>*>(ctx)->push_back(ptr);
  } catch (...) {
  }
}

// The current stream of device when CUDA is up; the null stream otherwise (the
// simulated backend in tests without a GPU).
inline cudaStream_t current_stream_or_null(c10::DeviceIndex device) {
  try {
    return c10::cuda::getCurrentCUDAStream(device).stream();
  } catch (...) {
    return nullptr;
  }
}

// Opens an allocate-to context with origin `origin` (beginAllocateToPool's work).
inline void begin_pool(c10::DeviceIndex device, c10::cuda::MempoolId_t id, PoolFilter filter,
                       cudaStream_t origin) {
  auto* f = new PoolFilter(std::move(filter));
  // The library owns f from here: filter_drop deletes it, also when the call is refused.
  check_status(lib.pool_begin(device, id.first, id.second, origin, &filter_trampoline, f,
                              &filter_drop),
               "beginAllocateToPool");
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

  // ---- history, OOM observers, snapshot ----

  bool isHistoryEnabled() override {
    return lib.history_enabled() != 0;
  }

  void recordHistory(bool enabled, cca::CreateContextFn context_recorder,
                     size_t alloc_trace_max_entries, cca::RecordContext when,
                     bool clearHistory, const std::vector<std::string>& skip_actions) override {
    TORCH_CHECK(!enabled || when == cca::RecordContext::NEVER || context_recorder != nullptr,
                "streamalloc: recordHistory needs a context recorder to record contexts");
    uint32_t skip = 0;
    for (const auto& name : skip_actions) {
      skip |= 1u << static_cast<unsigned>(c10::CachingDeviceAllocator::parseTraceEntryAction(name));
    }
    size_t max_entries = alloc_trace_max_entries == 0 ? 1 : alloc_trace_max_entries;
    {
      std::lock_guard<std::mutex> g(contexts.m);
      context_when.store(static_cast<int>(enabled ? when : cca::RecordContext::NEVER),
                         std::memory_order_relaxed);
      recorder.store(enabled ? context_recorder : nullptr, std::memory_order_relaxed);
      contexts.max_ids = std::min<size_t>(max_entries, size_t(1) << 22);
      if (!enabled || clearHistory) {
        contexts.trace.clear();
      }
      if (!enabled) {
        contexts.live.clear();
      }
      while (contexts.trace.size() > contexts.max_ids) {
        contexts.trace.pop_front();
      }
    }
    check_status(lib.record_history(enabled ? 1 : 0, max_entries, clearHistory ? 1 : 0, skip),
                 "record_history");
  }

  cca::SnapshotInfo snapshot(c10::cuda::MempoolId_t mempool_id, bool include_traces) override {
    using c10::CachingDeviceAllocator::BlockInfo;
    using c10::CachingDeviceAllocator::SegmentInfo;
    using c10::CachingDeviceAllocator::TraceEntry;
    cca::SnapshotInfo info;
    info.config_metadata.garbage_collection_threshold = 0;
    info.config_metadata.max_split_size = 0;
    info.config_metadata.pinned_num_register_threads = 0;
    info.config_metadata.expandable_segments = false;
    info.config_metadata.release_lock_on_malloc = false;
    info.config_metadata.pinned_use_host_register = false;
    info.config_metadata.graph_capture_record_stream_reuse = false;
    info.config_metadata.last_allocator_settings = "streamalloc";
    // Private pools' blocks are not listed (DESIGN.md, "Private pools"): a snapshot of
    // one is empty; the default pool {0, 0} lists the core's blocks.
    bool default_pool = mempool_id.first == 0 && mempool_id.second == 0;
    int devices = std::max(c10::cuda::device_count(), static_cast<c10::DeviceIndex>(1));

    std::vector<streamalloc_block> blocks;
    if (default_pool) {
      blocks.resize(lib.snapshot_blocks(nullptr, 0) + 256);
      size_t n = lib.snapshot_blocks(blocks.data(), blocks.size());
      if (n > blocks.size()) { // more arrived meanwhile: once more, larger
        blocks.resize(n + 4096);
        n = lib.snapshot_blocks(blocks.data(), blocks.size());
      }
      blocks.resize(std::min(n, blocks.size()));
    }
    std::unordered_map<void*, std::shared_ptr<c10::GatheredContext>> live;
    if (!blocks.empty()) {
      std::lock_guard<std::mutex> g(contexts.m);
      live = contexts.live;
    }
    for (const auto& b : blocks) {
      SegmentInfo seg;
      seg.device = static_cast<c10::DeviceIndex>(b.device);
      seg.address = b.ptr;
      seg.total_size = b.size;
      seg.requested_size = b.requested;
      seg.allocated_size = b.state == 0 ? b.size : 0;
      seg.active_size = b.state != 2 ? b.size : 0;
      seg.stream = reinterpret_cast<void*>(b.stream);
      seg.is_large = b.size > (size_t(1) << 20); // PyTorch's small pool: <= 1 MiB
      seg.is_expandable = false;
      BlockInfo blk;
      blk.size = b.size;
      blk.requested_size = b.requested;
      blk.allocated = b.state == 0;
      blk.active = b.state != 2;
      auto it = live.find(reinterpret_cast<void*>(b.ptr));
      if (b.state != 2 && it != live.end()) {
        blk.context_when_allocated = it->second;
      }
      seg.blocks.push_back(std::move(blk));
      info.segments.push_back(std::move(seg));
      devices = std::max(devices, b.device + 1);
    }
    if (!include_traces || !default_pool) {
      info.device_traces.resize(devices);
      return info;
    }
    std::vector<streamalloc_history_entry> entries(lib.history(nullptr, 0) + 1024);
    size_t n = lib.history(entries.data(), entries.size());
    entries.resize(std::min(n, entries.size()));
    std::unordered_map<uint64_t, std::shared_ptr<c10::GatheredContext>> ctx;
    {
      std::lock_guard<std::mutex> g(contexts.m);
      for (const auto& [id, c] : contexts.trace) {
        ctx.emplace(id, c);
      }
    }
    for (const auto& e : entries) {
      devices = std::max(devices, e.device + 1);
    }
    info.device_traces.resize(devices);
    for (const auto& e : entries) {
      if (e.device < 0) {
        continue;
      }
      std::shared_ptr<c10::GatheredContext> c;
      if (e.context != 0) {
        auto it = ctx.find(e.context);
        if (it != ctx.end()) {
          c = it->second;
        }
      }
      TraceEntry te(static_cast<TraceEntry::Action>(e.action),
                    static_cast<c10::DeviceIndex>(e.device), e.addr, e.size,
                    reinterpret_cast<void*>(e.stream), c10::cuda::MempoolId_t{0, 0}, 0,
                    std::move(c));
      te.time_.t_ = static_cast<c10::time_t>(e.time_ns / 1000); // microseconds
      info.device_traces[e.device].push_back(std::move(te));
    }
    return info;
  }

  // ---- private pools ----

  void createOrIncrefPool(c10::DeviceIndex device, c10::cuda::MempoolId_t id,
                          std::shared_ptr<cca::CUDAAllocator> allocator) override {
    TORCH_CHECK(allocator == nullptr || allocator.get() == this,
                "streamalloc: a MemPool with its own allocator is not supported (the pool's "
                "memory comes from streamalloc)");
    check_status(lib.pool_incref(device, id.first, id.second), "createOrIncrefPool");
  }

  int getPoolUseCount(c10::DeviceIndex device, c10::cuda::MempoolId_t id) override {
    int64_t n = lib.pool_use_count(device, id.first, id.second);
    if (n < 0) {
      check("getPoolUseCount");
    }
    return static_cast<int>(n);
  }

  void setUseOnOOM(c10::DeviceIndex, c10::cuda::MempoolId_t, bool use_on_oom) override {
    TORCH_CHECK(!use_on_oom,
                "streamalloc: MemPool(use_on_oom=True) is not supported: a private pool's "
                "blocks are not lent to allocations outside it");
  }

  // Pool blocks are never split (each is its own driver allocation).
  void setNoSplit(c10::DeviceIndex, c10::cuda::MempoolId_t) override {}

  void beginAllocateToPool(c10::DeviceIndex device, c10::cuda::MempoolId_t id,
                           PoolFilter filter) override {
    // CUDAGraph::capture_begin runs on the capture stream (torch.cuda.graph enters its
    // stream first): the library watches it for the capture that follows.
    begin_pool(device, id, std::move(filter), current_stream_or_null(device));
  }

  void endAllocateToPool(c10::DeviceIndex device, c10::cuda::MempoolId_t id) override {
    check_status(lib.pool_end(device, id.first, id.second), "endAllocateToPool");
  }

  // Called from destructors (MemPool, CUDAGraph::reset): warns instead of throwing.
  void releasePool(c10::DeviceIndex device, c10::cuda::MempoolId_t id) override {
    if (lib.pool_release(device, id.first, id.second) != 0) {
      int code = 0;
      std::string msg = last_error(&code);
      TORCH_WARN("streamalloc: releasePool failed (code ", code, "): ", msg);
    }
  }

  bool checkPoolLiveAllocations(c10::DeviceIndex device, c10::cuda::MempoolId_t id,
                                const std::unordered_set<void*>& expected) override {
    std::vector<void*> ptrs(expected.begin(), expected.end());
    int same = 0;
    check_status(lib.pool_check_live(device, id.first, id.second, ptrs.data(), ptrs.size(),
                                     &same),
                 "checkPoolLiveAllocations");
    return same == 1;
  }

  std::shared_ptr<cca::AllocatorState> getCheckpointState(c10::DeviceIndex device,
                                                          c10::cuda::MempoolId_t id) override {
    auto state = std::make_shared<StreamallocPoolState>();
    state->device = device;
    state->id = id;
    size_t count = 0;
    check_status(lib.pool_checkpoint(device, id.first, id.second, nullptr, 0, &count),
                 "getCheckpointState");
    while (true) {
      state->blocks.resize(count);
      size_t n = 0;
      check_status(lib.pool_checkpoint(device, id.first, id.second, state->blocks.data(),
                                       state->blocks.size(), &n),
                   "getCheckpointState");
      if (n <= state->blocks.size()) {
        state->blocks.resize(n);
        break;
      }
      count = n; // more arrived meanwhile
    }
    return state;
  }

  cca::CheckpointDelta setCheckpointPoolState(
      c10::DeviceIndex device, std::shared_ptr<cca::AllocatorState> as) override {
    auto state = std::dynamic_pointer_cast<StreamallocPoolState>(as);
    TORCH_CHECK(state != nullptr, "streamalloc: not a checkpoint of streamalloc's pools");
    TORCH_CHECK(state->device == device, "streamalloc: a checkpoint of device ", state->device,
                " restored on device ", device);
    std::vector<void*> freed;
    check_status(lib.pool_restore(device, state->id.first, state->id.second,
                                  state->blocks.data(), state->blocks.size(), &collect_freed,
                                  &freed),
                 "setCheckpointPoolState");
    cca::CheckpointDelta delta;
    delta.ptrs_freed = std::move(freed);
    {
      // Frames of the blocks freed by the restore are dropped, as a free drops them.
      std::lock_guard<std::mutex> g(contexts.m);
      for (void* p : delta.ptrs_freed) {
        contexts.live.erase(p);
      }
    }
    for (const auto& b : state->blocks) {
      // The direct path's deleter: PyTorch attaches these to storages that already
      // point at the blocks, and frees the rest with raw_delete.
      delta.dataptrs_allocd.emplace_back(b.ptr, b.ptr, &delete_direct,
                                         c10::Device(c10::DeviceType::CUDA, device));
    }
    return delta;
  }

  void attachOutOfMemoryObserver(cca::OutOfMemoryObserver observer) override {
    std::lock_guard<std::mutex> g(observers.m);
    observers.list.push_back(std::move(observer));
    if (!observers.registered) {
      if (lib.attach_oom_observer(&oom_trampoline, nullptr) != 0) {
        observers.list.pop_back();
        check("attach_oom_observer");
        TORCH_CHECK(false, "streamalloc: attach_oom_observer failed");
      }
      observers.registered = true;
    }
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
  l.last_error = sym<decltype(l.last_error)>(h, "streamalloc_last_error");
  l.memory_stats = sym<decltype(l.memory_stats)>(h, "streamalloc_device_memory_stats");
  l.reset_peak = sym<decltype(l.reset_peak)>(h, "streamalloc_reset_peak_stats");
  l.reset_accumulated =
      sym<decltype(l.reset_accumulated)>(h, "streamalloc_reset_accumulated_stats");
  l.enable_peer = sym<decltype(l.enable_peer)>(h, "streamalloc_enable_peer_access");
  l.cache_info_on = sym<decltype(l.cache_info_on)>(h, "streamalloc_cache_info_on");
  l.set_warning_handler =
      sym<decltype(l.set_warning_handler)>(h, "streamalloc_set_warning_handler");
  l.record_history = sym<decltype(l.record_history)>(h, "streamalloc_record_history");
  l.history_enabled = sym<decltype(l.history_enabled)>(h, "streamalloc_history_enabled");
  l.set_context = sym<decltype(l.set_context)>(h, "streamalloc_history_set_context");
  l.history = sym<decltype(l.history)>(h, "streamalloc_history");
  l.snapshot_blocks = sym<decltype(l.snapshot_blocks)>(h, "streamalloc_snapshot_blocks");
  l.attach_oom_observer =
      sym<decltype(l.attach_oom_observer)>(h, "streamalloc_attach_oom_observer");
  l.pool_incref = sym<decltype(l.pool_incref)>(h, "streamalloc_pool_create_or_incref");
  l.pool_release = sym<decltype(l.pool_release)>(h, "streamalloc_pool_release");
  l.pool_use_count = sym<decltype(l.pool_use_count)>(h, "streamalloc_pool_use_count");
  l.pool_begin = sym<decltype(l.pool_begin)>(h, "streamalloc_pool_begin_allocate_to");
  l.pool_end = sym<decltype(l.pool_end)>(h, "streamalloc_pool_end_allocate_to");
  l.pool_checkpoint = sym<decltype(l.pool_checkpoint)>(h, "streamalloc_pool_checkpoint");
  l.pool_restore = sym<decltype(l.pool_restore)>(h, "streamalloc_pool_restore");
  l.pool_check_live = sym<decltype(l.pool_check_live)>(h, "streamalloc_pool_check_live");
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
namespace streamalloc_shim::testing {

// Entry points for tests without a GPU (src/capi/python/shim_smoke_sim.py, on the
// library's simulated device). PyTorch's own bindings for recordHistory and OOM
// observers initialize CUDA first, which needs a driver; these do what those bindings
// do (torch/csrc/cuda/memory_snapshot.cpp, Module.cpp) without that step, and reach
// the installed allocator through the same c10 calls. alloc and free are the shim's
// own paths (the direct path's allocation with an explicit device and stream, and its
// DataPtr deleter). torch.cuda.memory._snapshot() needs no driver and is used as is.

inline std::shared_ptr<c10::GatheredContext> gather_python() {
  return torch::CapturedTraceback::gather(true, true, false);
}

inline std::shared_ptr<c10::GatheredContext> gather_all() {
  return torch::CapturedTraceback::gather(true, true, true);
}

// torch.cuda.memory._record_memory_history's arguments, with PyTorch's meanings.
inline void record_history(std::optional<std::string> enabled,
                           std::optional<std::string> context, const std::string& stacks,
                           size_t max_entries, bool clear,
                           const std::vector<std::string>& skip_actions) {
  TORCH_CHECK(!enabled || *enabled == "state" || *enabled == "all",
              "expected enabled to be 'state', 'all', or None");
  TORCH_CHECK(!context || *context == "state" || *context == "alloc" || *context == "all",
              "expected context to be 'state', 'alloc', 'all', or None");
  TORCH_CHECK(stacks == "python" || stacks == "all", "expected stacks to be 'python' or 'all'");
  cca::CreateContextFn fn = stacks == "all" ? gather_all : gather_python;
  auto when = cca::RecordContext::NEVER;
  if (context) {
    when = *context == "all"     ? cca::RecordContext::ALL
           : *context == "alloc" ? cca::RecordContext::ALLOC
                                 : cca::RecordContext::STATE;
  }
  max_entries = (enabled && *enabled == "all") ? max_entries : 1;
  cca::recordHistory(enabled.has_value(), fn, max_entries, when, clear, skip_actions);
}

// Python's observer(device, requested, total, free), as torch._C's binding wraps it.
inline void attach_oom_observer(py::function observer) {
  auto holder = std::make_shared<py::function>(std::move(observer));
  cca::attachOutOfMemoryObserver(
      [holder](int64_t device, size_t requested, size_t total, size_t free_bytes) {
        py::gil_scoped_acquire g;
        (*holder)(device, requested, total, free_bytes);
      });
}

inline uintptr_t alloc(size_t size, int device, uintptr_t stream) {
  return reinterpret_cast<uintptr_t>(
      shim_alloc(size, device, reinterpret_cast<cudaStream_t>(stream)));
}

inline void free_block(uintptr_t ptr) {
  delete_direct(reinterpret_cast<void*>(ptr));
}

// ---- private pools: PyTorch's calls without CUDA ----
// torch.cuda.MemPool() and use_mem_pool() ask CUDA for the current device first; these
// make the same c10 calls (c10/cuda/CUDACachingAllocator.h) with the device given.

inline c10::cuda::MempoolId_t pool_id(uint64_t id0, uint64_t id1) {
  return {static_cast<c10::cuda::CaptureId_t>(id0), static_cast<c10::cuda::CaptureId_t>(id1)};
}

inline void create_or_incref_pool(int device, uint64_t id0, uint64_t id1) {
  cca::createOrIncrefPool(static_cast<c10::DeviceIndex>(device), pool_id(id0, id1));
}

inline int pool_use_count(int device, uint64_t id0, uint64_t id1) {
  return cca::getPoolUseCount(static_cast<c10::DeviceIndex>(device), pool_id(id0, id1));
}

inline void release_pool(int device, uint64_t id0, uint64_t id1) {
  cca::releasePool(static_cast<c10::DeviceIndex>(device), pool_id(id0, id1));
}

// use_mem_pool's beginAllocateCurrentThreadToPool: the calling thread's allocations,
// with `stream` as the context's origin.
inline void begin_allocate_to_pool(int device, uint64_t id0, uint64_t id1, uintptr_t stream) {
  auto tid = std::this_thread::get_id();
  begin_pool(static_cast<c10::DeviceIndex>(device), pool_id(id0, id1),
             [tid](cudaStream_t) { return std::this_thread::get_id() == tid; },
             reinterpret_cast<cudaStream_t>(stream));
}

inline void end_allocate_to_pool(int device, uint64_t id0, uint64_t id1) {
  cca::endAllocateToPool(static_cast<c10::DeviceIndex>(device), pool_id(id0, id1));
}

inline bool check_pool_live(int device, uint64_t id0, uint64_t id1,
                            const std::vector<uintptr_t>& ptrs) {
  std::unordered_set<void*> expected;
  for (auto p : ptrs) {
    expected.insert(reinterpret_cast<void*>(p));
  }
  return cca::checkPoolLiveAllocations(static_cast<c10::DeviceIndex>(device), pool_id(id0, id1),
                                       expected);
}

// Checkpoints by handle (the state stays opaque, as in torch._C).
inline std::mutex checkpoints_m;
inline std::map<int64_t, std::shared_ptr<cca::AllocatorState>> checkpoints;
inline int64_t next_checkpoint = 1;

inline int64_t checkpoint(int device, uint64_t id0, uint64_t id1) {
  auto st = cca::getCheckpointState(static_cast<c10::DeviceIndex>(device), pool_id(id0, id1));
  std::lock_guard<std::mutex> g(checkpoints_m);
  checkpoints[next_checkpoint] = std::move(st);
  return next_checkpoint++;
}

// setCheckpointPoolState; the delta's DataPtrs are released as torch._C's binding does
// with those no storage takes (addStorageDeleterFns). Returns (freed, allocated).
inline std::pair<std::vector<uintptr_t>, std::vector<uintptr_t>> restore(int device,
                                                                         int64_t handle) {
  std::shared_ptr<cca::AllocatorState> st;
  {
    std::lock_guard<std::mutex> g(checkpoints_m);
    auto it = checkpoints.find(handle);
    TORCH_CHECK(it != checkpoints.end(), "no checkpoint ", handle);
    st = it->second;
  }
  auto delta = cca::setCheckpointPoolState(static_cast<c10::DeviceIndex>(device), st);
  std::vector<uintptr_t> freed, allocd;
  for (void* p : delta.ptrs_freed) {
    freed.push_back(reinterpret_cast<uintptr_t>(p));
  }
  for (auto& dp : delta.dataptrs_allocd) {
    allocd.push_back(reinterpret_cast<uintptr_t>(dp.get()));
    dp.release_context();
  }
  return {freed, allocd};
}

} // namespace streamalloc_shim::testing

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "streamalloc as PyTorch's CUDA allocator (see streamalloc_torch)";
  m.def("install", &streamalloc_shim::install,
        "Make libstreamalloc PyTorch's CUDA allocator; returns whether the direct path "
        "(no base-class bookkeeping) is on",
        py::arg("lib_path"));
  m.def("installed", &streamalloc_shim::is_installed, "Whether install() ran");
  namespace t = streamalloc_shim::testing;
  m.def("_test_record_history", &t::record_history,
        "Tests without a GPU: torch.cuda.memory._record_memory_history's work, without "
        "initializing CUDA",
        py::arg("enabled") = "all", py::arg("context") = "all", py::arg("stacks") = "python",
        py::arg("max_entries") = SIZE_MAX, py::arg("clear_history") = false,
        py::arg("skip_actions") = std::vector<std::string>{});
  m.def("_test_attach_oom_observer", &t::attach_oom_observer,
        "Tests without a GPU: torch._C._cuda_attach_out_of_memory_observer's work, without "
        "initializing CUDA");
  m.def("_test_alloc", &t::alloc,
        "Tests without a GPU: the shim's allocation (frames, OOM errors) with an explicit "
        "device and stream; returns the address",
        py::arg("size"), py::arg("device") = 0, py::arg("stream") = 0);
  m.def("_test_free", &t::free_block, "Tests without a GPU: the direct path's DataPtr deleter");
  m.def("_test_create_or_incref_pool", &t::create_or_incref_pool,
        "Tests without a GPU: torch.cuda.MemPool()'s createOrIncrefPool");
  m.def("_test_pool_use_count", &t::pool_use_count, "Tests without a GPU: MemPool.use_count()");
  m.def("_test_release_pool", &t::release_pool, "Tests without a GPU: releasePool");
  m.def("_test_begin_allocate_to_pool", &t::begin_allocate_to_pool,
        "Tests without a GPU: use_mem_pool's beginAllocateCurrentThreadToPool, origin stream given",
        py::arg("device"), py::arg("id0"), py::arg("id1"), py::arg("stream") = 0);
  m.def("_test_end_allocate_to_pool", &t::end_allocate_to_pool,
        "Tests without a GPU: endAllocateToPool");
  m.def("_test_check_pool_live", &t::check_pool_live,
        "Tests without a GPU: checkPoolLiveAllocations");
  m.def("_test_checkpoint", &t::checkpoint,
        "Tests without a GPU: getCheckpointState; returns a handle");
  m.def("_test_restore", &t::restore,
        "Tests without a GPU: setCheckpointPoolState; returns (freed, allocated) addresses");
}
#endif
