// Device pieces shared by the low-latency dispatch and combine kernels: addressing of a peer's half,
// the send tag protocol (see low_latency.hpp), and the bounded wait for a tagged signal that masks a
// silent peer under enable_shrink.
#pragma once

#include <cstdint>

#include "kernels/common/control_region.hpp"
#include "kernels/common/device_utils.cuh"
#include "kernels/low_latency/low_latency.hpp"

namespace deep_ep::low_latency {

__device__ __forceinline__ ControlRegion* control_of(const Peers& p, int rank) {
  return reinterpret_cast<ControlRegion*>(p.bases[rank]);
}

__device__ __forceinline__ char* half_of(const Peers& p, int rank) { return p.bases[rank] + p.half_offset; }

__device__ __forceinline__ int64_t make_signal(int tag, int rows) {
  return (static_cast<int64_t>(tag) << 32) | static_cast<uint32_t>(rows);
}

__device__ __forceinline__ bool is_masked(const Peers& p, int rank) {
  return p.enable_shrink && *reinterpret_cast<volatile int*>(&control_of(p, p.rank)->ll_mask[rank]) != 0;
}

// Called by thread 0 of every block at the start of a send. Returns the tag of this op. Ordering:
// the read of ll_epoch precedes this block's arrival (fence), and the last block's bump follows
// every arrival, so all blocks read the same value.
__device__ __forceinline__ int begin_send(const Peers& p, int op) {
  ControlRegion* mine = control_of(p, p.rank);
  const int epoch = *reinterpret_cast<volatile int*>(&mine->ll_epoch[p.half][op]);
  __threadfence();
  if (atomicAdd(&mine->ll_arrivals[p.half][op], 1) == static_cast<int>(gridDim.x) - 1) {
    __threadfence();
    mine->ll_arrivals[p.half][op] = 0;
    *reinterpret_cast<volatile int*>(&mine->ll_epoch[p.half][op]) = epoch + 1;
  }
  return epoch + 1;
}

// The tag a hooked receive expects: its send has bumped ll_epoch already (the receive runs after it).
__device__ __forceinline__ int receive_tag(const Peers& p, int op) {
  return *reinterpret_cast<volatile int*>(&control_of(p, p.rank)->ll_epoch[p.half][op]);
}

// One lane waits until `signal` carries `tag`; returns the row count, or -1 when the peer is (or
// becomes) masked. A timeout masks the peer under enable_shrink, and is reported otherwise (then the
// return value is -2 and the caller unwinds). `waited_cycles` gets the clock cycles spent.
__device__ __forceinline__ int wait_signal(const Peers& p, const int64_t* signal, int tag, int peer, Phase phase,
                                           int channel, long long& waited_cycles) {
  const long long start_clock = clock64();
  waited_cycles = 0;
  if (is_masked(p, peer)) return -1;
  int64_t value = device::ld_acquire_sys(signal);
  if (static_cast<int>(value >> 32) == tag) return static_cast<int>(value & 0xffffffff);
  const uint64_t start = device::global_timer_ns();
  for (int polls = 1;; ++polls) {
    value = device::ld_acquire_sys(signal);
    const int observed = static_cast<int>(value >> 32);
    if (observed == tag) {
      waited_cycles = clock64() - start_clock;
      return static_cast<int>(value & 0xffffffff);
    }
    // Tags only grow: a later one means the peer overwrote this op's signal (and maybe its rows).
    if (observed - tag > 0) {
      device::report(p.diagnostics, Phase::kLowLatencyOverrun, false, p.rank, peer, channel, -1, tag, observed);
      return -2;
    }
    // Hundreds of waiters poll at once: back off a little so their loads leave L2 bandwidth to the data.
    __nanosleep(64);
    if (polls % device::kPollsPerSlowCheck != 0) continue;
    if (is_masked(p, peer)) return -1;
    if (device::error_reported(p.diagnostics)) return -2;
    if (device::global_timer_ns() - start > static_cast<uint64_t>(p.timeout_ns)) {
      waited_cycles = clock64() - start_clock;
      if (p.enable_shrink) {
        atomicExch(&control_of(p, p.rank)->ll_mask[peer], 1);
        return -1;
      }
      device::report(p.diagnostics, phase, true, p.rank, peer, channel, -1, tag, static_cast<long long>(value >> 32));
      return -2;
    }
  }
}

__device__ __forceinline__ float bf16_to_float(uint32_t bits16) { return __uint_as_float(bits16 << 16); }

}  // namespace deep_ep::low_latency
