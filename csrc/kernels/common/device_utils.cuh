// Small device helpers every kernel family uses: system-scope acquire/release accesses for flags
// that cross ranks, the global timer for bounded waits, and the diagnostics reporter.
#pragma once

#include <cstdint>

#include "protocol/diagnostics.hpp"
#include "transport/timing.cuh"
#include "transport/transport.cuh"

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

// 64-bit forms, for signals that carry a tag and a count in one word.
__device__ __forceinline__ void st_release_sys(int64_t* ptr, int64_t value) {
  asm volatile("st.release.sys.global.s64 [%0], %1;" ::"l"(ptr), "l"(value) : "memory");
}

// The transport's acquire load (the same instruction; flags here are signed words).
__device__ __forceinline__ int64_t ld_acquire_sys(const int64_t* ptr) {
  return static_cast<int64_t>(transport::detail::ld_acquire_sys(reinterpret_cast<const uint64_t*>(ptr)));
}

// Acquire at GPU scope: for counters only warps of this GPU write.
__device__ __forceinline__ int ld_acquire_gpu(const int* ptr) {
  int value;
  asm volatile("ld.acquire.gpu.global.s32 %0, [%1];" : "=r"(value) : "l"(ptr) : "memory");
  return value;
}

// Relaxed read that bypasses the L1 (for polling a counter another rank writes).
__device__ __forceinline__ int ld_volatile(const int* ptr) {
  int value;
  asm volatile("ld.volatile.global.s32 %0, [%1];" : "=r"(value) : "l"(ptr) : "memory");
  return value;
}

using transport::detail::global_timer_ns;
using transport::detail::poll_pause;

// First reporter wins; see DeviceDiagnostics for the publication protocol.
__device__ __forceinline__ void report(DeviceDiagnostics* diag, Phase phase, bool is_timeout, int rank, int peer,
                                       int channel, int token, long long expected, long long observed) {
  // Relaxed is enough: the waits that read it only stop early, and the host reads it after `ready`'s fence.
  if (is_timeout || !is_value_error(phase)) atomicExch(&diag->abort_waits, 1);
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

// Whether some thread of this rank already reported an error that ends the op (a value error does not). The
// record lives in host memory: reading it crosses PCIe, so spinning code checks it only every
// kPollsPerSlowCheck polls.
__device__ __forceinline__ bool error_reported(DeviceDiagnostics* diag) {
  return *reinterpret_cast<volatile int*>(&diag->abort_waits) != 0;
}

using transport::kPollsPerSlowCheck;

// A bounded wait: spins while `counter` (read with acquire) is below `target`. Returns false after
// reporting a timeout, or if another thread already reported an error (so every waiter unwinds).
// Call it from one lane and share the outcome: the data behind the counter is then read by the other
// lanes after a __syncwarp (or a named barrier), which orders their reads after this acquire.
// T is int (counters) or int64_t (epoch-tagged flags).
// On success, *reached (when given) gets the value read, which may exceed target: a caller can keep
// it and skip the next waits it already covers.
template <typename T>
__device__ __forceinline__ bool wait_at_least(const T* counter, T target, int64_t timeout_ns, DeviceDiagnostics* diag,
                                              Phase phase, int rank, int peer, int channel, T* reached = nullptr) {
  T value = ld_acquire_sys(counter);
  if (value >= target) {
    if (reached) *reached = value;
    return true;
  }
  const uint64_t start = global_timer_ns();
  for (int polls = 1;; ++polls) {
    value = ld_acquire_sys(counter);
    if (value >= target) {
      if (reached) *reached = value;
      return true;
    }
    if (polls % kPollsPerSlowCheck == 0) {
      if (error_reported(diag)) return false;
      if (global_timer_ns() - start > static_cast<uint64_t>(timeout_ns)) {
        report(diag, phase, true, rank, peer, channel, -1, target, value);
        return false;
      }
    }
  }
}

}  // namespace deep_ep::device

namespace deep_ep::device {

__device__ __forceinline__ int ld_relaxed_sys(const int* ptr) {
  int value;
  asm volatile("ld.relaxed.sys.global.s32 %0, [%1];" : "=r"(value) : "l"(ptr) : "memory");
  return value;
}

// Input tensors are read-only for the whole kernel: read them through the non-coherent path without
// allocating in L1 (streamed once).
__device__ __forceinline__ int4 ld_input(const int4* ptr) {
  int4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.s32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(ptr));
  return v;
}

// Queue slots are rewritten by other ranks between laps: read them at L2 (the coherence point),
// never from a possibly stale L1 line.
__device__ __forceinline__ int4 ld_queue(const int4* ptr) { return __ldcg(ptr); }

// Stores for warp_copy. st_plain keeps the written line in L2 like any store. st_output_stream (st.global.cs,
// evict-first) is for a kernel's output rows, written once and not read again by the kernel: hundreds of MB of
// them would otherwise push a small ring that other ranks still read back out of L2.
__device__ __forceinline__ void st_plain(int4* ptr, const int4& v) { *ptr = v; }
__device__ __forceinline__ void st_output_stream(int4* ptr, const int4& v) { __stcs(ptr, v); }

// Copies `num_int4` 16-byte words with a warp, kUnroll loads in flight per lane. `Load` and `Store` pick the
// paths.
template <int kUnroll, typename Load, typename Store = decltype(&st_plain)>
__device__ __forceinline__ void warp_copy(int4* dst, const int4* src, int num_int4, int lane, Load load,
                                          Store store = st_plain) {
  int i = lane;
  for (; i + 32 * (kUnroll - 1) < num_int4; i += 32 * kUnroll) {
    int4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) v[u] = load(src + i + 32 * u);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) store(dst + i + 32 * u, v[u]);
  }
  for (; i < num_int4; i += 32) store(dst + i, load(src + i));
}

// warp_copy with the remainder in the same rounds: each round issues all its loads before its first store, the
// last round predicated. A store may alias a later load, so the compiler would not hoist those loads itself, and
// warp_copy's remainder costs a round trip per word (a 7 KB FP8 row with kUnroll = 8: 2 round trips instead of 7).
// It takes more registers in some kernels, so callers choose it where rows are short of a multiple of the round.
template <int kUnroll, typename Load, typename Store = decltype(&st_plain)>
__device__ __forceinline__ void warp_copy_in_rounds(int4* dst, const int4* src, int num_int4, int lane, Load load,
                                                    Store store = st_plain) {
  for (int base = lane; base < num_int4; base += 32 * kUnroll) {
    int4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (base + 32 * u < num_int4) v[u] = load(src + base + 32 * u);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (base + 32 * u < num_int4) store(dst + base + 32 * u, v[u]);
  }
}

__device__ __forceinline__ int lane_id() { return threadIdx.x & 31; }

// The n-th (0-based) set bit of `mask`.
__device__ __forceinline__ int nth_set_bit(unsigned mask, int n) {
  for (int i = 0; i < n; ++i) mask &= mask - 1;
  return __ffs(mask) - 1;
}

// Named barrier among `num_threads` threads (a multiple of 32) of the block.
__device__ __forceinline__ void named_barrier(int id, int num_threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(num_threads) : "memory");
}

// named_barrier that also ORs `predicate` over the `num_threads` threads: every one of them returns the same
// answer. A shared flag read after a plain barrier can be rewritten by a fast thread before a slow one reads it,
// and then the two leave a loop at different barriers.
__device__ __forceinline__ bool named_barrier_or(int id, int num_threads, bool predicate) {
  int any;
  asm volatile(
      "{\n"
      ".reg .pred p, q;\n"
      "setp.ne.s32 p, %1, 0;\n"
      "bar.red.or.pred q, %2, %3, p;\n"
      "selp.s32 %0, 1, 0, q;\n"
      "}\n"
      : "=r"(any)
      : "r"(static_cast<int>(predicate)), "r"(id), "r"(num_threads)
      : "memory");
  return any != 0;
}

// [begin, end) of the tokens of `channel` among `num_channels`.
__device__ __forceinline__ void channel_range(int channel, int num_channels, int num_tokens, int& begin, int& end) {
  begin = static_cast<int>(static_cast<int64_t>(num_tokens) * channel / num_channels);
  end = static_cast<int>(static_cast<int64_t>(num_tokens) * (channel + 1) / num_channels);
}

}  // namespace deep_ep::device
