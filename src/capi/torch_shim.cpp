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
//  * History, OOM observers and snapshots (the block marked "history, OOM observers,
//    snapshot" below): recordHistory / isHistoryEnabled drive the library's ring
//    (streamalloc_record_history); the frames PyTorch gathers (its CreateContextFn) are
//    kept here under a context id the library stores with each entry; snapshot() builds
//    c10's SnapshotInfo (one segment per driver allocation, live and cached blocks,
//    device_traces) so torch.cuda.memory._snapshot() / _dump_snapshot() work;
//    attachOutOfMemoryObserver registers PyTorch's observers with the library.
//
// Built once by streamalloc_torch.py with torch.utils.cpp_extension.load (cached).
// The library is opened with dlopen at install time (no link-time dependency).

#include <torch/extension.h>
#include <torch/csrc/cuda/CUDAPluggableAllocator.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <dlfcn.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <atomic>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

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

// ---- history, OOM observers, snapshot: the library's side (streamalloc.h) ----

struct HistoryEntry { // streamalloc_history_entry
  uint32_t action;
  int32_t device;
  uint64_t addr;
  uint64_t size;
  uint64_t stream;
  uint64_t time_ns;
  uint64_t context;
};

struct BlockEntry { // streamalloc_block
  uint64_t ptr;
  uint64_t requested;
  uint64_t size;
  uint64_t stream;
  int32_t device;
  int32_t state; // 0 live, 1 free deferred, 2 cached
  int32_t captured;
  int32_t reserved;
};

using oom_observer_fn_t = void (*)(int, size_t, size_t, size_t, void*);

struct HistoryLib {
  int (*record_history)(int, size_t, int, uint32_t) = nullptr;
  int (*history_enabled)() = nullptr;
  void (*set_context)(uint64_t) = nullptr;
  size_t (*history)(HistoryEntry*, size_t) = nullptr;
  size_t (*snapshot_blocks)(BlockEntry*, size_t) = nullptr;
  int (*attach_oom_observer)(oom_observer_fn_t, void*) = nullptr;
};

HistoryLib hlib;

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

// ---- history, OOM observers, snapshot: the shim's state ----

namespace cca = c10::cuda::CUDACachingAllocator;

// What PyTorch asked recordHistory for. `when` is read on every alloc/free: NEVER (the
// default) costs that one relaxed load.
std::atomic<int> record_when{static_cast<int>(cca::RecordContext::NEVER)};
std::atomic<cca::CreateContextFn> recorder{nullptr};

struct Contexts {
  std::mutex m;
  uint64_t next_id = 1;
  size_t max_ids = 1;
  // Frames of the newest trace entries, by the id the library stored with them.
  std::deque<std::pair<uint64_t, std::shared_ptr<c10::GatheredContext>>> trace;
  // Frames of live blocks (context_when_allocated), by address.
  std::unordered_map<void*, std::shared_ptr<c10::GatheredContext>> live;
};
Contexts contexts;

// Gathers frames if PyTorch asked for them at this level; files them for trace entries
// (returns the id the library should record, 0: none).
uint64_t gather_context(
    cca::RecordContext level,
    std::shared_ptr<c10::GatheredContext>* out) {
  auto when = static_cast<cca::RecordContext>(record_when.load(std::memory_order_relaxed));
  auto fn = recorder.load(std::memory_order_relaxed);
  if (when == cca::RecordContext::NEVER || fn == nullptr) {
    return 0;
  }
  bool for_state = level == cca::RecordContext::STATE;
  if (!for_state && when < level) {
    return 0;
  }
  auto ctx = fn();
  *out = ctx;
  if (when < cca::RecordContext::ALLOC || ctx == nullptr) {
    return 0; // STATE: frames of live blocks only
  }
  std::lock_guard<std::mutex> g(contexts.m);
  uint64_t id = contexts.next_id++;
  contexts.trace.emplace_back(id, std::move(ctx));
  while (contexts.trace.size() > contexts.max_ids) {
    contexts.trace.pop_front();
  }
  return id;
}

// An exception an OOM observer threw on this thread, rethrown by shim_alloc (PyTorch's
// allocator lets an observer's exception propagate out of malloc).
thread_local std::exception_ptr observer_error;

void* shim_alloc_plain(size_t size, int device, cudaStream_t stream);

void* shim_alloc(size_t size, int device, cudaStream_t stream) {
  if (record_when.load(std::memory_order_relaxed) ==
      static_cast<int>(cca::RecordContext::NEVER)) {
    return shim_alloc_plain(size, device, stream);
  }
  std::shared_ptr<c10::GatheredContext> ctx;
  uint64_t id = gather_context(cca::RecordContext::ALLOC, &ctx);
  if (ctx == nullptr) {
    gather_context(cca::RecordContext::STATE, &ctx);
  }
  hlib.set_context(id);
  void* p = nullptr;
  try {
    p = shim_alloc_plain(size, device, stream);
  } catch (...) {
    hlib.set_context(0);
    throw;
  }
  hlib.set_context(0);
  if (p != nullptr && ctx != nullptr) {
    std::lock_guard<std::mutex> g(contexts.m);
    contexts.live[p] = std::move(ctx);
  }
  return p;
}

// ---- end of the history block's allocation hook ----

void* shim_alloc_plain(size_t size, int device, cudaStream_t stream) {
  void* p = lib.alloc(size, device, stream);
  if (observer_error) {
    std::exception_ptr e = observer_error;
    observer_error = nullptr;
    std::rethrow_exception(e);
  }
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
  if (record_when.load(std::memory_order_relaxed) ==
      static_cast<int>(cca::RecordContext::NEVER)) {
    lib.free(ptr, size, device, stream);
    return;
  }
  // History block: frames of the free (context "all"), and the block's frames dropped.
  uint64_t id = 0;
  try {
    std::shared_ptr<c10::GatheredContext> ctx;
    id = gather_context(cca::RecordContext::ALL, &ctx);
    std::lock_guard<std::mutex> g(contexts.m);
    contexts.live.erase(ptr);
  } catch (...) {
    id = 0; // frames are best effort in a deleter
  }
  hlib.set_context(id);
  lib.free(ptr, size, device, stream);
  hlib.set_context(0);
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

  // ---- history, OOM observers, snapshot ----

  bool isHistoryEnabled() override {
    return hlib.history_enabled() != 0;
  }

  void recordHistory(
      bool enabled,
      cca::CreateContextFn context_recorder,
      size_t alloc_trace_max_entries,
      cca::RecordContext when,
      bool clearHistory,
      const std::vector<std::string>& skip_actions) override {
    TORCH_CHECK(
        when == cca::RecordContext::NEVER || context_recorder,
        "streamalloc: recordHistory needs a context recorder to record contexts");
    uint32_t skip = 0;
    for (const auto& name : skip_actions) {
      skip |= 1u << static_cast<unsigned>(c10::CachingDeviceAllocator::parseTraceEntryAction(name));
    }
    size_t max_entries = alloc_trace_max_entries == 0 ? 1 : alloc_trace_max_entries;
    {
      std::lock_guard<std::mutex> g(contexts.m);
      record_when.store(
          static_cast<int>(enabled ? when : cca::RecordContext::NEVER),
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
    if (hlib.record_history(enabled ? 1 : 0, max_entries, clearHistory ? 1 : 0, skip) != 0) {
      check("record_history");
    }
  }

  cca::SnapshotInfo snapshot(c10::MempoolId_t mempool_id, bool include_traces) override {
    cca::SnapshotInfo info;
    info.config_metadata.garbage_collection_threshold = 0;
    info.config_metadata.max_split_size = 0;
    info.config_metadata.pinned_num_register_threads = 0;
    info.config_metadata.expandable_segments = false;
    info.config_metadata.release_lock_on_malloc = false;
    info.config_metadata.pinned_use_host_register = false;
    info.config_metadata.graph_capture_record_stream_reuse = false;
    info.config_metadata.last_allocator_settings = "streamalloc";
    // streamalloc has no private pools: every block is in the default pool {0, 0}.
    bool default_pool = mempool_id.first == 0 && mempool_id.second == 0;
    std::vector<BlockEntry> blocks(hlib.snapshot_blocks(nullptr, 0) + 256);
    size_t n = hlib.snapshot_blocks(blocks.data(), blocks.size());
    if (n > blocks.size()) { // more arrived meanwhile: once more, larger
      blocks.resize(n + 4096);
      n = hlib.snapshot_blocks(blocks.data(), blocks.size());
    }
    blocks.resize(std::min(n, blocks.size()));
    std::unordered_map<void*, std::shared_ptr<c10::GatheredContext>> live;
    {
      std::lock_guard<std::mutex> g(contexts.m);
      live = contexts.live;
    }
    for (const auto& b : default_pool ? blocks : std::vector<BlockEntry>{}) {
      c10::CachingDeviceAllocator::SegmentInfo seg;
      seg.device = static_cast<c10::DeviceIndex>(b.device);
      seg.address = b.ptr;
      seg.total_size = b.size;
      seg.requested_size = b.requested;
      seg.allocated_size = b.state == 0 ? b.size : 0;
      seg.active_size = b.state != 2 ? b.size : 0;
      seg.stream = reinterpret_cast<void*>(b.stream);
      seg.is_large = b.size > (size_t(1) << 20); // PyTorch's small pool: <= 1 MiB
      seg.is_expandable = false;
      c10::CachingDeviceAllocator::BlockInfo blk;
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
    }
    int devices = c10::cuda::device_count();
    info.device_traces.resize(std::max(devices, 1));
    if (!include_traces || !default_pool) {
      return info;
    }
    std::vector<HistoryEntry> entries(hlib.history(nullptr, 0) + 1024);
    n = hlib.history(entries.data(), entries.size());
    entries.resize(std::min(n, entries.size()));
    std::unordered_map<uint64_t, std::shared_ptr<c10::GatheredContext>> ctx;
    {
      std::lock_guard<std::mutex> g(contexts.m);
      for (const auto& [id, c] : contexts.trace) {
        ctx.emplace(id, c);
      }
    }
    for (const auto& e : entries) {
      if (e.device < 0 || e.device >= static_cast<int32_t>(info.device_traces.size())) {
        continue;
      }
      std::shared_ptr<c10::GatheredContext> c;
      if (e.context != 0) {
        auto it = ctx.find(e.context);
        if (it != ctx.end()) {
          c = it->second;
        }
      }
      c10::CachingDeviceAllocator::TraceEntry te(
          static_cast<c10::CachingDeviceAllocator::TraceEntry::Action>(e.action),
          static_cast<c10::DeviceIndex>(e.device),
          e.addr,
          e.size,
          reinterpret_cast<void*>(e.stream),
          c10::MempoolId_t{0, 0},
          0,
          std::move(c));
      te.time_.t_ = static_cast<c10::time_t>(e.time_ns / 1000); // microseconds
      info.device_traces[e.device].push_back(std::move(te));
    }
    return info;
  }

  void attachOutOfMemoryObserver(cca::OutOfMemoryObserver observer) override;
};

// ---- history, OOM observers, snapshot: PyTorch's OOM observers ----

struct Observers {
  std::mutex m;
  std::vector<cca::OutOfMemoryObserver> list;
  bool registered = false;
};
Observers observers;

// Called by the library on the allocating thread, with no allocator lock held. Must
// not unwind into the library: an exception is kept for shim_alloc to rethrow.
void oom_trampoline(int device, size_t requested, size_t total, size_t free, void*) {
  std::vector<cca::OutOfMemoryObserver> local;
  {
    std::lock_guard<std::mutex> g(observers.m);
    local = observers.list;
  }
  for (const auto& obs : local) {
    try {
      obs(device, requested, total, free);
    } catch (...) {
      if (!observer_error) {
        observer_error = std::current_exception();
      }
    }
  }
}

void StreamallocAllocator::attachOutOfMemoryObserver(cca::OutOfMemoryObserver observer) {
  std::lock_guard<std::mutex> g(observers.m);
  observers.list.push_back(std::move(observer));
  if (!observers.registered) {
    if (hlib.attach_oom_observer(&oom_trampoline, nullptr) != 0) {
      observers.list.pop_back();
      check("attach_oom_observer");
    }
    observers.registered = true;
  }
}

// ---- end of the history block ----

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
  // History block.
  hlib.record_history = sym<decltype(hlib.record_history)>(h, "streamalloc_record_history");
  hlib.history_enabled = sym<decltype(hlib.history_enabled)>(h, "streamalloc_history_enabled");
  hlib.set_context = sym<decltype(hlib.set_context)>(h, "streamalloc_history_set_context");
  hlib.history = sym<decltype(hlib.history)>(h, "streamalloc_history");
  hlib.snapshot_blocks = sym<decltype(hlib.snapshot_blocks)>(h, "streamalloc_snapshot_blocks");
  hlib.attach_oom_observer =
      sym<decltype(hlib.attach_oom_observer)>(h, "streamalloc_attach_oom_observer");

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
