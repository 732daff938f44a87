// Small device helpers every kernel family uses: system-scope acquire/release accesses for flags
// that cross ranks, the global timer for bounded waits, and the diagnostics reporter.
#pragma once

#include <cstdint>

#include "kernels/common/diagnostics.hpp"

namespace deep_ep::device {

// Release store: every memory access of this thread before it is visible to any thread (any process,
// same or peer GPU) that reads the new value with ld_acquire_sys.
__device__ __forceinline__ void st_release_sys(int* ptr, int value) {
  asm volatile("st.release.sys.global.s32 [%0], %1;" ::"l"(ptr), "r"(value) : "memory");
}

__device__ __forceinline__ int ld_acquire_sys(const int* ptr) {
  int value;
  asm volatile("ld.acquire.sys.global.s32 %0, [%1];" : "=r"(value) : "l"(ptr) : "memory");
  return value;
}

// Relaxed read that bypasses the L1 (for polling a counter another rank writes).
__device__ __forceinline__ int ld_volatile(const int* ptr) {
  int value;
  asm volatile("ld.volatile.global.s32 %0, [%1];" : "=r"(value) : "l"(ptr) : "memory");
  return value;
}

__device__ __forceinline__ uint64_t global_timer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// First reporter wins; see DeviceDiagnostics for the publication protocol.
__device__ __forceinline__ void report(DeviceDiagnostics* diag, Phase phase, bool is_timeout, int rank, int peer,
                                       int channel, int token, long long expected, long long observed) {
  if (atomicCAS(&diag->claimed, 0, 1) != 0) return;
  diag->phase = static_cast<int>(phase);
  diag->is_timeout = is_timeout;
  diag->rank = rank;
  diag->peer = peer;
  diag->channel = channel;
  diag->token = token;
  diag->expected = expected;
  diag->observed = observed;
  __threadfence_system();
  *reinterpret_cast<volatile int*>(&diag->ready) = 1;
}

// A bounded wait: spins while `counter` (read with acquire) is below `target`. Returns false after
// reporting a timeout, or if another thread already reported an error (so every waiter unwinds).
__device__ __forceinline__ bool wait_at_least(const int* counter, int target, int64_t timeout_ns,
                                              DeviceDiagnostics* diag, Phase phase, int rank, int peer,
                                              int channel) {
  int value = ld_acquire_sys(counter);
  if (value >= target) return true;
  const uint64_t start = global_timer_ns();
  while (true) {
    value = ld_acquire_sys(counter);
    if (value >= target) return true;
    if (*reinterpret_cast<volatile int*>(&diag->claimed)) return false;
    if (global_timer_ns() - start > static_cast<uint64_t>(timeout_ns)) {
      report(diag, phase, true, rank, peer, channel, -1, target, value);
      return false;
    }
  }
}

}  // namespace deep_ep::device
