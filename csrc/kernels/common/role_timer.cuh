// Where a warp's time goes, for tuning warp-specialized kernels: a warp splits its run into a few
// buckets (copying, waiting for a peer, fencing, ...) and, at the end, one block of selected ranks
// prints each warp's totals. Built in only with -DDEEP_EP_PROFILE_ROLES=1 (CMake option of the same
// name); otherwise every member compiles to nothing and the kernels are unchanged.
#pragma once

#include <cstdint>
#include <cstdio>

#include "kernels/common/device_utils.cuh"

#ifndef DEEP_EP_PROFILE_ROLES
#define DEEP_EP_PROFILE_ROLES 0
#endif

namespace deep_ep::device {

constexpr bool kProfileRoles = DEEP_EP_PROFILE_ROLES != 0;

struct RoleTimer {
  static constexpr int kBuckets = 4;
  uint64_t start = 0, mark = 0;
  uint64_t spent[kBuckets] = {0, 0, 0, 0};

  __device__ __forceinline__ void begin() {
    if constexpr (kProfileRoles) start = mark = global_timer_ns();
  }
  // The time since the last lap (or begin) goes to `bucket`.
  __device__ __forceinline__ void lap(int bucket) {
    if constexpr (kProfileRoles) {
      const uint64_t now = global_timer_ns();
      spent[bucket] += now - mark;
      mark = now;
    }
  }
  // Lane 0 of each warp of block `block` on ranks that are multiples of `rank_stride` prints
  // "role <kernel> <role> rank block warp total b0 b1 b2 b3" in microseconds.
  __device__ __forceinline__ void report(const char* kernel, const char* role, int rank, int rank_stride,
                                         int block) const {
    if constexpr (kProfileRoles) {
      if (lane_id() != 0 || blockIdx.x != block || rank % rank_stride != 0) return;
      const uint64_t total = global_timer_ns() - start;
      printf("role %s %s rank %d block %d warp %d total %llu b0 %llu b1 %llu b2 %llu b3 %llu\n", kernel, role, rank,
             block, static_cast<int>(threadIdx.x / 32), static_cast<unsigned long long>(total / 1000),
             static_cast<unsigned long long>(spent[0] / 1000), static_cast<unsigned long long>(spent[1] / 1000),
             static_cast<unsigned long long>(spent[2] / 1000), static_cast<unsigned long long>(spent[3] / 1000));
    }
  }
};

// Thread 0 of every block prints "block-start <kernel> rank <r> block <b> at_us <t>" with the GPU's global
// timer when the block began: ranks sharing a GPU read the same clock, so the lines show which blocks of which
// ranks became resident late. Same build switch as RoleTimer.
__device__ __forceinline__ void report_block_start(const char* kernel, int rank, uint64_t started_ns) {
  if constexpr (kProfileRoles) {
    if (threadIdx.x == 0)
      printf("block-start %s rank %d block %d at_us %llu\n", kernel, rank, static_cast<int>(blockIdx.x),
             static_cast<unsigned long long>(started_ns / 1000));
  }
}

}  // namespace deep_ep::device
