// Buffer carving arithmetic shared by the host (size hints, op checks) and the kernels (queue pointers).
#pragma once

#include <cstdint>

// Callable from host and device code; plain C++ compilers see an ordinary constexpr function.
#ifdef __CUDACC__
#define DEEP_EP_HOST_DEVICE __host__ __device__
#else
#define DEEP_EP_HOST_DEVICE
#endif

namespace deep_ep {

// The smallest multiple of `alignment` (positive) that is not below `value` (non-negative).
DEEP_EP_HOST_DEVICE constexpr int64_t align_up(int64_t value, int64_t alignment) {
  return (value + alignment - 1) / alignment * alignment;
}

}  // namespace deep_ep
