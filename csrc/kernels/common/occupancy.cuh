// Resident blocks per SM of a kernel, for the co-residency checks (docs/design.md decision 5). The answer
// depends only on the kernel, its block shape and the GPU architecture (one per process here), so it
// is asked once per kernel instead of on every launch. Host code.
#pragma once

#include <cuda_runtime_api.h>

#include "util/cuda_check.hpp"

namespace deep_ep::device {

// `threads` and `dynamic_shared_bytes` must be the same on every call for a given Kernel.
template <auto Kernel>
int resident_blocks_per_sm(int threads, size_t dynamic_shared_bytes = 0) {
  static const int blocks = [threads, dynamic_shared_bytes] {
    int n = 0;
    DEEP_EP_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, Kernel, threads, dynamic_shared_bytes));
    return n;
  }();
  return blocks;
}

}  // namespace deep_ep::device
