// The clock and polling cadence of every bounded device wait, transport and kernels alike (kernels
// reach them through kernels/common/device_utils.cuh), so that all waits time out the same way.
#pragma once

#include <cstdint>

namespace deep_ep::transport {

// A spinning waiter reads the clock and the abort flag or error record (host-mapped memory, a PCIe
// round trip) only every this many polls.
constexpr int kPollsPerSlowCheck = 1024;

namespace detail {

__device__ __forceinline__ uint64_t global_timer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

}  // namespace detail
}  // namespace deep_ep::transport
