/* The C ABI from C, on the simulated device: compiled and run by tests/capi_c.rs with
 * STREAMALLOC_BACKEND=sim, STREAMALLOC_SIM_DEVICES=2, STREAMALLOC_SIM_CAPACITY=256 MiB
 * and STREAMALLOC_CONF="cache:on,max_cache_mb:64". Prints one line per failed check and
 * "capi_test: N checks, F failed"; exits 1 if any failed. */
#include "streamalloc.h"

#include <limits.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

static int checks, failed;

#define CHECK(cond)                                                        \
  do {                                                                     \
    checks++;                                                              \
    if (!(cond)) {                                                         \
      char msg_[512];                                                      \
      int code_ = streamalloc_last_error(msg_, sizeof msg_);               \
      failed++;                                                            \
      printf("FAILED line %d: %s (last error %d: %s)\n", __LINE__, #cond, \
             code_, msg_);                                                 \
    }                                                                      \
  } while (0)

#define MiB (1024u * 1024u)

static int warnings_seen;
static char last_warning[512];

static void on_warning(int level, const char* message, void* user) {
  if (level == 1 && user == (void*)&warnings_seen) {
    warnings_seen++;
    snprintf(last_warning, sizeof last_warning, "%s", message);
  }
}

static streamalloc_memory_stats stats(int device) {
  streamalloc_memory_stats s;
  memset(&s, 0xff, sizeof s);
  CHECK(streamalloc_device_memory_stats(device, &s, sizeof s) == STREAMALLOC_OK);
  return s;
}

/* Issue 13 item 6: calls from a pthread key destructor, after the thread's Rust
 * thread-locals were destroyed, still report failure and set the last error. */
static pthread_key_t key;
static int teardown_status = -1, teardown_code = -1, teardown_ok = -1;

static void destructor(void* value) {
  (void)value;
  teardown_status = streamalloc_begin_capture(-1);
  teardown_code = streamalloc_last_error_code();
  teardown_ok = streamalloc_reset_peak_stats(0);
}

static void* thread_main(void* arg) {
  (void)arg;
  pthread_setspecific(key, (void*)1);
  streamalloc_reset_peak_stats(0); /* the thread's last-error slot now exists */
  return NULL;
}

int main(void) {
  /* Configuration: checked strings, and the one in the environment in effect. */
  CHECK(streamalloc_parse_config("cache:off, max_cache_mb:8") == STREAMALLOC_OK);
  CHECK(streamalloc_parse_config("cache:sometimes") == STREAMALLOC_CONFIG_ERROR);
  char buf[256];
  CHECK(streamalloc_last_error(buf, sizeof buf) == STREAMALLOC_CONFIG_ERROR);
  CHECK(strstr(buf, "bad value for cache") != NULL);
  CHECK(streamalloc_parse_config("nope:1") == STREAMALLOC_CONFIG_ERROR);
  CHECK(streamalloc_parse_config(NULL) == STREAMALLOC_INVALID_ARGUMENT);
  CHECK(streamalloc_config(buf, sizeof buf) == STREAMALLOC_OK);
  CHECK(strcmp(buf, "cache:on,max_cache_mb:64,release:lean,max_cached_kb:1024,class_reach:2,idle_interval:16384") == 0);
  CHECK(strcmp(streamalloc_backend(), "sim") == 0);

  /* Issue 13 item 7: an absurd device count is refused, not built. */
  streamalloc_init(INT_MAX);
  CHECK(streamalloc_last_error_code() == STREAMALLOC_INVALID_ARGUMENT);
  streamalloc_init(STREAMALLOC_MAX_DEVICES + 1);
  CHECK(streamalloc_last_error_code() == STREAMALLOC_INVALID_ARGUMENT);
  streamalloc_init(2);
  CHECK(streamalloc_last_error_code() == STREAMALLOC_OK);

  /* Exact statistics on two devices. */
  void* a = streamalloc_alloc(3 * MiB, 0, NULL);
  void* b = streamalloc_alloc(1000, 0, NULL);
  void* c = streamalloc_alloc(5 * MiB, 1, NULL);
  CHECK(a && b && c);
  streamalloc_memory_stats s0 = stats(0), s1 = stats(1);
  CHECK(s0.allocated_current == 3 * MiB + 1000);
  CHECK(s0.allocated_peak == 3 * MiB + 1000);
  CHECK(s0.allocations_current == 2 && s0.allocations_peak == 2);
  CHECK(s0.allocations_total == 2 && s0.frees_total == 0);
  CHECK(s0.reserved_current >= s0.allocated_current);
  CHECK(s0.pool_used_current >= s0.allocated_current);
  CHECK(s1.allocated_current == 5 * MiB && s1.allocations_current == 1);
  CHECK(s0.num_ooms == 0 && s0.num_alloc_retries == 0);

  streamalloc_free(a, 0, 0, NULL);
  CHECK(streamalloc_last_error_code() == STREAMALLOC_OK);
  s0 = stats(0);
  CHECK(s0.allocated_current == 1000 && s0.allocated_peak == 3 * MiB + 1000);
  CHECK(s0.freed_total == 3 * MiB && s0.frees_total == 1);
  CHECK(s0.allocated_total == 3 * MiB + 1000);
  CHECK(streamalloc_reset_peak_stats(0) == STREAMALLOC_OK);
  s0 = stats(0);
  CHECK(s0.allocated_peak == 1000 && s0.allocations_peak == 1);
  CHECK(streamalloc_reset_accumulated_stats(0) == STREAMALLOC_OK);
  s0 = stats(0);
  CHECK(s0.freed_total == 0 && s0.frees_total == 0 && s0.allocated_total == 1000);

  /* Out of memory: code 1, counted. */
  CHECK(streamalloc_alloc(512 * MiB, 0, NULL) == NULL);
  CHECK(streamalloc_last_error_code() == STREAMALLOC_OUT_OF_MEMORY);
  CHECK(stats(0).num_ooms == 1);
  CHECK(stats(1).num_ooms == 0);

  /* The plain record-stream hook finds the device of a device-1 pointer. */
  streamalloc_record_stream(c, NULL);
  CHECK(streamalloc_last_error_code() == STREAMALLOC_OK);
  CHECK(streamalloc_record_stream_on(c, NULL, 0) == STREAMALLOC_OK);

  /* Peer access to a pool, the workspace guess on a stream. */
  CHECK(streamalloc_enable_peer_access(1, 0) == STREAMALLOC_OK);
  CHECK(streamalloc_enable_peer_access(0, 1) == STREAMALLOC_OK);
  CHECK(streamalloc_enable_peer_access(0, 2) == STREAMALLOC_INVALID_ARGUMENT);
  size_t guess = 0;
  CHECK(streamalloc_cache_info_on(1, NULL, &guess) == STREAMALLOC_OK);
  CHECK(guess > 0 && guess <= 256 * MiB);
  CHECK(streamalloc_cache_info_on(1, NULL, NULL) == STREAMALLOC_INVALID_ARGUMENT);

  /* Warnings reach the registered handler. */
  CHECK(streamalloc_set_warning_handler(on_warning, &warnings_seen) == STREAMALLOC_OK);
  streamalloc_free((void*)(uintptr_t)0xdead0000u, 0, 0, NULL);
  CHECK(streamalloc_last_error_code() == STREAMALLOC_INVALID_ARGUMENT);
  CHECK(warnings_seen == 1);
  CHECK(strstr(last_warning, "0xdead0000") != NULL);
  CHECK(streamalloc_set_warning_handler(NULL, NULL) == STREAMALLOC_OK);

  /* Issue 13 item 6, in a thread of our own. */
  CHECK(pthread_key_create(&key, destructor) == 0);
  pthread_t t;
  CHECK(pthread_create(&t, NULL, thread_main, NULL) == 0);
  CHECK(pthread_join(t, NULL) == 0);
  CHECK(teardown_status == STREAMALLOC_INVALID_ARGUMENT);
  CHECK(teardown_code == STREAMALLOC_INVALID_ARGUMENT);
  CHECK(teardown_ok == STREAMALLOC_OK);

  streamalloc_free(b, 0, 0, NULL);
  streamalloc_free(c, 0, 1, NULL);
  CHECK(streamalloc_last_error_code() == STREAMALLOC_OK);
  CHECK(stats(0).allocated_current == 0 && stats(1).allocated_current == 0);
  CHECK(stats(0).allocations_current == 0);
  CHECK(streamalloc_empty_cache() == STREAMALLOC_OK);

  printf("capi_test: %d checks, %d failed\n", checks, failed);
  return failed ? 1 : 0;
}
