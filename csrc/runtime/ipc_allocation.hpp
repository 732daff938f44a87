// The CUDA allocation that holds a pointer, and its IPC handle: what the pull combine exports so that other
// processes can map a tensor they did not allocate (ordinary caching-allocator memory).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace deep_ep {

struct IpcAllocation {
  char* base;       // start of the allocation (cudaMalloc segment) holding the pointer
  uint64_t offset;  // of the pointer in it
  cudaIpcMemHandle_t handle;
};

// False when the pointer's allocation cannot be exported (memory of cudaMallocAsync pools, expandable
// segments, ...); the failed query leaves no sticky CUDA error.
bool find_ipc_allocation(const void* ptr, IpcAllocation* out);

}  // namespace deep_ep
