// CUDA return-code checks for host code: every runtime call is checked, failures become
// std::runtime_error naming the call (docs/design.md section 7: no unchecked CUDA calls).
#pragma once

#include <cuda_runtime_api.h>

#include <stdexcept>
#include <string>

#define DEEP_EP_CUDA_CHECK(call)                                                                                 \
  do {                                                                                                           \
    cudaError_t status_ = (call);                                                                                \
    if (status_ != cudaSuccess)                                                                                  \
      throw std::runtime_error(std::string("CUDA error in ") + #call + ": " + cudaGetErrorName(status_) + " (" + \
                               cudaGetErrorString(status_) + ") at " __FILE__ ":" + std::to_string(__LINE__));   \
  } while (0)
