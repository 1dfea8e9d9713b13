/* streamalloc.h: the C ABI of libstreamalloc.so, a lock-free stream-ordered CUDA
 * allocator with the semantics of PyTorch's cudaMallocAsync backend.
 *
 * Thread safety: every function may be called from any thread at any time.
 *
 * Errors: each function that can fail sets the calling thread's *last error* (a code
 * and a message) and clears it when it succeeds. Read it with streamalloc_last_error()
 * or streamalloc_last_error_code(); those two and streamalloc_backend() do not clear it.
 * Codes: 0 none, 1 out of memory (the message carries the seed's fields: device,
 * currently allocated, requested, device limit, free according to CUDA, user limit),
 * 2 invalid argument (device index, fraction, unknown pointer, double free, NULL out
 * pointer), 3 CUDA driver error, 4 capture misuse, 5 panic inside the library (a bug;
 * the allocator keeps working), 6 no backend (no CUDA driver/device and
 * STREAMALLOC_BACKEND=sim not set), 7 bad STREAMALLOC_CONF (unknown key or bad value;
 * every call then fails with it). Nothing ever aborts the process. A call made while the
 * thread is being torn down (in a pthread key destructor) still returns and records its
 * failure; such threads share one last-error slot.
 *
 * The allocator is created on first use: the CUDA driver (primary contexts; the caller's
 * current context is restored after each call), or with STREAMALLOC_BACKEND=sim a
 * simulated device (STREAMALLOC_SIM_DEVICES, default 1; STREAMALLOC_SIM_CAPACITY bytes,
 * default 1 GiB) for tests. Streams are cudaStream_t / CUstream handles of the device.
 *
 * Configuration: STREAMALLOC_CONF, read once when the allocator is created, in the style
 * of PYTORCH_CUDA_ALLOC_CONF: comma-separated key:value pairs.
 *   cache:on|off        the front cache (default on; off: every call reaches the
 *                       driver, as PyTorch's cudaMallocAsync backend does)
 *   max_cache_mb:N      MiB the cache may hold per device (default 2048)
 * e.g. STREAMALLOC_CONF="cache:on,max_cache_mb:4096".
 *
 * Warnings (the seed's TORCH_WARNs, errors the library can only log) go to standard
 * error, or to the handler set with streamalloc_set_warning_handler.
 */
#ifndef STREAMALLOC_H
#define STREAMALLOC_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#ifndef STREAMALLOC_NO_CUDA_TYPES
typedef struct CUstream_st* cudaStream_t;
#endif

enum streamalloc_error {
  STREAMALLOC_OK = 0,
  STREAMALLOC_OUT_OF_MEMORY = 1,
  STREAMALLOC_INVALID_ARGUMENT = 2,
  STREAMALLOC_DRIVER_ERROR = 3,
  STREAMALLOC_CAPTURE_MISUSE = 4,
  STREAMALLOC_PANIC = 5,
  STREAMALLOC_NO_BACKEND = 6,
  STREAMALLOC_CONFIG_ERROR = 7
};

/* The most devices streamalloc_init and STREAMALLOC_SIM_DEVICES accept. */
#define STREAMALLOC_MAX_DEVICES 1024

/* Device statistics (streamalloc_device_stats). */
typedef struct streamalloc_stats {
  uint64_t reserved_current;  /* bytes the device's pool reserves now */
  uint64_t reserved_peak;     /* high watermark of reserved bytes */
  uint64_t used_current;      /* bytes the pool hands out now */
  uint64_t used_peak;         /* high watermark of handed-out bytes */
  uint64_t allocated_current; /* bytes in live allocations of this allocator */
  uint64_t cached_current;    /* bytes in the allocator's own cache (0 without one) */
  uint64_t hits;              /* allocations served from that cache */
  uint64_t misses;            /* allocations that went to the driver */
} streamalloc_stats;

/* ---- torch.cuda.memory.CUDAPluggableAllocator's hooks ---- */

/* Allocates size bytes on device, ordered on stream. Returns NULL on failure (last
 * error set; code 1 for out of memory) and for size 0 (no error). */
void* streamalloc_alloc(size_t size, int device, cudaStream_t stream);
/* Frees ptr in stream order (on its creation stream, or after every stream recorded
 * with record_stream). size/device/stream are ignored (the library keeps its own
 * records). NULL is a no-op. Unknown pointer or double free: last error, no crash.
 * During a graph capture, a block allocated outside the capture is freed after it. */
void streamalloc_free(void* ptr, size_t size, int device, cudaStream_t stream);
/* Fixes the device count before first use (PyTorch's init hook). A negative count or
 * one above STREAMALLOC_MAX_DEVICES is code 2. */
void streamalloc_init(int device_count);
/* Empties the cache: synchronizes each used device and trims its pool to 0. */
void streamalloc_reset(void);
/* Limits the allocator's bytes on device to fraction (in [0, 1]) of its memory. */
void streamalloc_set_memory_fraction(double fraction, int device);
/* Returns ptr (the base of its allocation) and writes its size to *size (if size is
 * not NULL). Unknown pointer: NULL and the last error. */
void* streamalloc_base_alloc(void* ptr, size_t* size);
/* Records that ptr is used on stream; its free then waits for that stream. The stream
 * is taken to belong to ptr's device (the hook carries no device; one lookup finds it).
 * NULL ptr is a no-op; ptr's creation stream changes nothing (warns once). */
void streamalloc_record_stream(void* ptr, cudaStream_t stream);
/* record_stream with the stream's device given (a stream of another device is
 * allowed: peer access). Returns the status code. */
int streamalloc_record_stream_on(void* ptr, cudaStream_t stream, int stream_device);

/* ---- streamalloc's own ---- */

/* Fills *out with device's statistics (zeros for a device not used yet; no context
 * is created). Returns the status code (2 for a NULL out). */
int streamalloc_device_stats(int device, streamalloc_stats* out);
/* Resets device's high watermarks: the pool's (reserved_peak, used_peak restart from
 * their current values) and the exact peaks of streamalloc_device_memory_stats. */
int streamalloc_reset_peak_stats(int device);
/* As streamalloc_reset, with a status code. */
int streamalloc_empty_cache(void);
/* A graph capture begins (call before cudaStreamBeginCapture). One at a time in the
 * process: a second is code 4. Frees of blocks allocated outside the capture are
 * deferred until it ends. */
int streamalloc_begin_capture(int device);
/* As streamalloc_begin_capture, naming the capture stream: every stream a free is issued
 * on during the capture is joined back into capture_stream right away, so the capture
 * may end (cudaStreamEndCapture) before streamalloc_end_capture is called, as PyTorch's
 * CUDAGraph::capture_end does. */
int streamalloc_begin_capture_on(int device, cudaStream_t capture_stream);
/* The capture is about to end (call before cudaStreamEndCapture): capture_stream waits
 * on every stream a free was issued on during the capture. No capture: code 4. */
int streamalloc_end_capture(int device, cudaStream_t capture_stream);
/* Copies the calling thread's last error message into buf (at most len-1 bytes, NUL
 * terminated; nothing if buf is NULL or len is 0). Returns its code. */
int streamalloc_last_error(char* buf, size_t len);
/* The calling thread's last error code (0: the last call succeeded). */
int streamalloc_last_error_code(void);
/* "cuda", "sim", or "none" (no backend; the last error says why). Static string. */
const char* streamalloc_backend(void);
/* The largest block that can be allocated on device now (trial allocations on the
 * device's legacy default stream); 0 on error. */
size_t streamalloc_cache_info(int device);

/* ---- history, OOM observers, snapshots (src/capi/history.rs) ---- */

/* One recorded event. action is PyTorch's TraceEntry::Action number: 0 alloc,
 * 1 free_requested, 2 free_completed, 3 segment_alloc, 4 segment_free, 8 oom (for an
 * oom, addr is the device's free bytes and size the request). */
typedef struct streamalloc_history_entry {
  uint32_t action;
  int32_t device;
  uint64_t addr;
  uint64_t size;
  uint64_t stream;  /* cudaStream_t */
  uint64_t time_ns; /* since the Unix epoch */
  uint64_t context; /* the recording thread's context id (0: none) */
} streamalloc_history_entry;

/* One block the allocator holds (a driver allocation: a segment with one block in
 * PyTorch's snapshot format). */
typedef struct streamalloc_block {
  uint64_t ptr;
  uint64_t requested; /* bytes asked for (0 for a cached block) */
  uint64_t size;      /* bytes the driver allocated */
  uint64_t stream;    /* creation stream (cached: the stream it is kept for) */
  int32_t device;
  int32_t state;      /* 0 live, 1 free deferred until the capture ends, 2 cached */
  int32_t captured;   /* 1: allocated during a capture */
  int32_t reserved;
} streamalloc_block;

/* Starts (enabled != 0) or stops recording history into a ring of max_entries (clamped
 * to 1..4Mi; pages allocated as it fills). clear drops the entries so far; stopping
 * drops them too. skip_mask: bit (1 << action) set for each action not recorded.
 * Off, the cost is one relaxed load per malloc/free. Returns the status code. */
int streamalloc_record_history(int enabled, size_t max_entries, int clear, uint32_t skip_mask);
/* 1 while history is recorded, else 0. */
int streamalloc_history_enabled(void);
/* The context id the calling thread's next entries carry (0: none). */
void streamalloc_history_set_context(uint64_t context);
/* Copies up to cap entries, oldest first, into out; returns how many there are (more
 * than cap: call again with a larger buffer). out may be NULL when cap is 0. */
size_t streamalloc_history(streamalloc_history_entry* out, size_t cap);
/* Copies up to cap blocks (live, deferred, cached; by device and address) into out;
 * returns how many there are. out may be NULL when cap is 0. Live blocks served to the
 * Rust handle API from the cache are not listed (never the case through this ABI). */
size_t streamalloc_snapshot_blocks(streamalloc_block* out, size_t cap);
/* Called on the allocating thread when an allocation fails for lack of memory, before
 * it returns NULL, with no allocator lock held: (device, requested bytes, total bytes
 * (the limit when a memory fraction is set), free bytes, user). Must not unwind. */
typedef void (*streamalloc_oom_observer)(int device, size_t requested, size_t total,
                                         size_t free_bytes, void* user);
/* Adds an observer (user is passed back unchanged, on any thread). Code 2 for NULL. */
int streamalloc_attach_oom_observer(streamalloc_oom_observer observer, void* user);

/* ---- statistics, peer access, configuration, warnings (what the PyTorch shim uses) ---- */

/* One device's memory statistics: everything torch.cuda.memory_stats() reports. The
 * "allocated" and "allocations" figures are exact (the allocations made through
 * streamalloc_alloc, in requested bytes); "reserved" and "pool_used" are the pool's
 * attributes. Totals are since the last streamalloc_reset_accumulated_stats, peaks since
 * the last streamalloc_reset_peak_stats; allocated_total - freed_total ==
 * allocated_current always. Fields are only ever added at the end. */
typedef struct streamalloc_memory_stats {
  uint64_t allocated_current;   /* bytes in live allocations */
  uint64_t allocated_peak;      /* high watermark of allocated_current */
  uint64_t allocated_total;     /* bytes allocated (current + freed_total) */
  uint64_t freed_total;         /* bytes freed */
  uint64_t allocations_current; /* live allocations */
  uint64_t allocations_peak;    /* high watermark of allocations_current */
  uint64_t allocations_total;   /* allocations (current + frees_total) */
  uint64_t frees_total;         /* frees */
  uint64_t reserved_current;    /* bytes the pool reserves (ReservedMemCurrent) */
  uint64_t reserved_peak;       /* ReservedMemHigh */
  uint64_t pool_used_current;   /* bytes the pool hands out: live, cached, pending frees
                                   (UsedMemCurrent; the seed's allocated and active) */
  uint64_t pool_used_peak;      /* UsedMemHigh */
  uint64_t cached_current;      /* bytes in the allocator's own cache */
  uint64_t cache_hits;          /* allocations served from that cache */
  uint64_t cache_misses;        /* allocations that called cudaMallocAsync */
  uint64_t num_alloc_retries;   /* allocations retried after a driver out-of-memory */
  uint64_t num_ooms;            /* allocations refused for lack of memory */
} streamalloc_memory_stats;

/* Fills *out with device's memory statistics, at most out_size bytes of it (pass
 * sizeof *out; an older, shorter struct gets its prefix). Returns the status code (2 for
 * a NULL out or a bad device). */
int streamalloc_device_memory_stats(int device, streamalloc_memory_stats* out, size_t out_size);
/* Resets device's totals (freed, frees, num_ooms, num_alloc_retries) to 0; current and
 * peak figures stay. */
int streamalloc_reset_accumulated_stats(int device);
/* Lets device accessor read and write the memory of device owner's pool
 * (cudaMemPoolSetAccess; PyTorch's enablePeerAccess(dev = accessor, dev_to_access =
 * owner)). cudaDeviceEnablePeerAccess does not cover pool memory. */
int streamalloc_enable_peer_access(int accessor, int owner);
/* The largest block that can be allocated on device now, by trial allocations on
 * stream, into *out (cudnn's workspace guess, PyTorch's cacheInfo). */
int streamalloc_cache_info_on(int device, cudaStream_t stream, size_t* out);
/* Checks a STREAMALLOC_CONF string without applying it: 0, or 7 with the reason (the
 * key, and every known key) in the last error. */
int streamalloc_parse_config(const char* conf);
/* Writes the allocator's configuration, every key, in STREAMALLOC_CONF form (at most
 * len-1 bytes, NUL terminated). Creates the allocator if needed. */
int streamalloc_config(char* buf, size_t len);
/* A warning handler: level 1 warning, 2 error; message valid for the call only. Called
 * on the thread that warns, possibly on several at once; it must not call streamalloc. */
typedef void (*streamalloc_warning_fn)(int level, const char* message, void* user);
/* Sends warnings to handler (with user), or back to standard error when handler is
 * NULL. Code 2 if the process already had a Rust `log` logger (it keeps them). */
int streamalloc_set_warning_handler(streamalloc_warning_fn handler, void* user);

/* ---- private pools: torch.cuda.MemPool, CUDA graph pools (graph trees) ----
 *
 * A pool is named by (device, id0, id1), PyTorch's MempoolId_t; (0, 0), the default
 * pool, is refused. Pool blocks are synchronous driver allocations (cuMemAlloc, made in
 * the relaxed capture mode, so never CUDA graph memory nodes), each its own allocation,
 * handed out again by address on the stream they were allocated on; they go back to
 * the driver when the pool's use count is 0 (free blocks at once, live ones when freed),
 * or at streamalloc_empty_cache, never while a capture runs (any device). Their bytes
 * count in the ABI's allocated statistics and in reserved_current. streamalloc_free,
 * streamalloc_record_stream(_on) and streamalloc_base_alloc (base pointers) accept pool
 * blocks. Errors: code 2 for a bad device, pool (0, 0), an unknown pool (message "no
 * private pool (id0, id1) on device d"), a pool released by every user, a pointer not in
 * the pool, a checkpoint that does not fit the pool, a NULL output; 1 out of memory; 3
 * a driver failure; 4 a restore during a capture with recorded streams still to wait
 * for. A refused call changes nothing. */

/* A stream filter: nonzero when an allocation on stream goes to the pool. Called from
 * the allocating thread; must not throw or call streamalloc. */
typedef int (*streamalloc_stream_filter)(void* ctx, cudaStream_t stream);
/* One live block of a checkpoint. */
typedef struct streamalloc_pool_block {
  void* ptr;           /* its address */
  size_t size;         /* the requested size */
  cudaStream_t stream; /* the stream it was allocated on */
} streamalloc_pool_block;
/* A pool's figures (streamalloc_pool_get_stats). */
typedef struct streamalloc_pool_stats {
  uint64_t use_count;      /* the pool's users */
  uint64_t live_blocks;    /* blocks handed out now */
  uint64_t live_bytes;     /* requested bytes of the live blocks */
  uint64_t reserved_bytes; /* bytes the pool holds from the driver */
} streamalloc_pool_stats;
/* Releases a filter's context once the pools no longer use it. */
typedef void (*streamalloc_filter_drop_fn)(void* ctx);
/* Called once per block a restore freed; must not throw or call streamalloc. */
typedef void (*streamalloc_freed_fn)(void* ctx, void* ptr, size_t size);

/* Makes the pool (use count 1) or adds a user (createOrIncrefPool). Status code. */
int streamalloc_pool_create_or_incref(int device, uint64_t id0, uint64_t id1);
/* Takes a user away (releasePool); code 2 for an unknown pool or one at 0 already. */
int streamalloc_pool_release(int device, uint64_t id0, uint64_t id1);
/* The pool's use count (getPoolUseCount): 0 for a pool that does not exist; -1 on
 * error (bad device, pool (0, 0)). */
int64_t streamalloc_pool_use_count(int device, uint64_t id0, uint64_t id1);
/* Fills *out with the pool's figures. Status code (2 for an unknown pool). */
int streamalloc_pool_get_stats(int device, uint64_t id0, uint64_t id1, streamalloc_pool_stats* out);
/* Opens an allocate-to context (beginAllocateToPool): adds a user to the pool (making
 * it if needed); until streamalloc_pool_end_allocate_to, streamalloc_alloc on device
 * with a stream that filter(filter_ctx, stream) accepts (every stream: NULL filter)
 * allocates from the pool, the newest context first. origin is the caller's current
 * stream: while a context is open, each streamalloc_alloc / streamalloc_free asks the
 * driver whether origin is being captured, and the first that sees it begins the
 * allocator's capture on it (as streamalloc_begin_capture_on). One context per pool:
 * a second is code 2. filter(filter_ctx, ...) must stay callable until
 * filter_drop(filter_ctx) is called (once, when the filter is no longer used: after the
 * context closes, or at once if this call is refused; NULL: not called). */
int streamalloc_pool_begin_allocate_to(int device, uint64_t id0, uint64_t id1,
                                       cudaStream_t origin, streamalloc_stream_filter filter,
                                       void* filter_ctx, streamalloc_filter_drop_fn filter_drop);
/* Closes the context (endAllocateToPool) and ends the allocator's capture if it began
 * one; the user it added stays until streamalloc_pool_release. No context: code 2. */
int streamalloc_pool_end_allocate_to(int device, uint64_t id0, uint64_t id1);
/* Allocates size bytes from the pool on stream, whatever the contexts. NULL on failure
 * (last error set) and for size 0. Free it with streamalloc_free. */
void* streamalloc_pool_alloc(int device, uint64_t id0, uint64_t id1, size_t size,
                             cudaStream_t stream);
/* The pool's live blocks (getCheckpointState): writes at most capacity of them to out
 * and their number to *count (call again with a larger buffer if *count > capacity).
 * Status code. */
int streamalloc_pool_checkpoint(int device, uint64_t id0, uint64_t id1,
                                streamalloc_pool_block* out, size_t capacity, size_t* count);
/* Makes the pool's live set the n blocks (setCheckpointPoolState): every block live now
 * is freed (on_freed(ctx, ptr, size) is called for each, after the change), every block
 * of the checkpoint is live again at its address, on its stream. A block the pool does
 * not have (any more) or one too small: code 2, nothing changed. */
int streamalloc_pool_restore(int device, uint64_t id0, uint64_t id1,
                             const streamalloc_pool_block* blocks, size_t n,
                             streamalloc_freed_fn on_freed, void* ctx);
/* Writes 1 to *out when the pool's live blocks are exactly the n pointers (order and
 * duplicates aside) of ptrs (checkPoolLiveAllocations), else 0. Status code. */
int streamalloc_pool_check_live(int device, uint64_t id0, uint64_t id1, void* const* ptrs,
                                size_t n, int* out);
/* The pool of ptr: writes its ids and returns 1; 0 when no pool has ptr (no error); -1
 * for NULL outputs. */
int streamalloc_pool_of(void* ptr, uint64_t* id0, uint64_t* id1);

#ifdef __cplusplus
}
#endif
#endif /* STREAMALLOC_H */
