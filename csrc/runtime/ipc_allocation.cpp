#include "runtime/ipc_allocation.hpp"

#include <cuda.h>

namespace deep_ep {

namespace {

// The allocation holding `ptr` (its base), through the driver's cuMemGetAddressRange, reached from the
// runtime so that the library does not link the driver.
bool allocation_base(const void* ptr, char** base) {
  using GetAddressRange = CUresult (*)(CUdeviceptr*, size_t*, CUdeviceptr);
  static GetAddressRange get_range = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult status{};
    if (cudaGetDriverEntryPointByVersion("cuMemGetAddressRange", &fn, 12000, cudaEnableDefault, &status) !=
            cudaSuccess ||
        status != cudaDriverEntryPointSuccess)
      fn = nullptr;
    return reinterpret_cast<GetAddressRange>(fn);
  }();
  if (!get_range) return false;
  CUdeviceptr start = 0;
  size_t size = 0;
  if (get_range(&start, &size, reinterpret_cast<CUdeviceptr>(ptr)) != CUDA_SUCCESS) return false;
  *base = reinterpret_cast<char*>(start);
  return true;
}

}  // namespace

bool find_ipc_allocation(const void* ptr, IpcAllocation* out) {
  if (!allocation_base(ptr, &out->base) || cudaIpcGetMemHandle(&out->handle, out->base) != cudaSuccess) {
    cudaGetLastError();  // the failed query is not an error of the next call
    return false;
  }
  out->offset = static_cast<uint64_t>(static_cast<const char*>(ptr) - out->base);
  return true;
}

}  // namespace deep_ep
