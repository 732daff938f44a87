// The clock and polling cadence of every bounded device wait, transport and kernels alike (kernels
// reach them through kernels/common/device_utils.cuh), so that all waits time out the same way.
#pragma once

#include <cstdint>

namespace deep_ep::transport {

// A spinning waiter reads the clock and the abort flag or error record (host-mapped memory, a PCIe
// round trip) only every this many polls.
constexpr int kPollsPerSlowCheck = 1024;

// A poller that found nothing new sleeps this long before it reads again. Hundreds of warps re-reading a
// few flags keep the L2 slices that hold them busy, and every copy that touches those slices queues behind
// the polls: a short pause costs a poller little and gives the copies their bandwidth back.
#ifndef DEEP_EP_POLL_PAUSE_NS
#define DEEP_EP_POLL_PAUSE_NS 128
#endif
constexpr unsigned kPollPauseNs = DEEP_EP_POLL_PAUSE_NS;

namespace detail {

__device__ __forceinline__ uint64_t global_timer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ void poll_pause() {
  if constexpr (kPollPauseNs > 0) __nanosleep(kPollPauseNs);
}

}  // namespace detail
}  // namespace deep_ep::transport
