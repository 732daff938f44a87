#include "runtime/peer_tensor_map.hpp"

#include <cuda.h>
#include <unistd.h>

#include <cstring>

#include "deep_ep/error.hpp"
#include "runtime/cuda_check.hpp"

namespace deep_ep {

namespace {

struct Record {
  int exportable;
  int pid;
  uint64_t offset;  // of the pointer inside its allocation
  uint64_t pointer;
  cudaIpcMemHandle_t handle;
};

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

std::vector<const char*> PeerTensorMap::map(Group& group, const void* ptr) {
  const int rank = group.rank(), num_ranks = group.size();
  if (static_cast<int>(opened_.size()) != num_ranks) opened_.resize(num_ranks);
  Record mine{};
  mine.pid = static_cast<int>(getpid());
  mine.pointer = reinterpret_cast<uint64_t>(ptr);
  char* base = nullptr;
  if (allocation_base(ptr, &base) && cudaIpcGetMemHandle(&mine.handle, base) == cudaSuccess) {
    mine.exportable = 1;
    mine.offset = static_cast<uint64_t>(static_cast<const char*>(ptr) - base);
  } else {
    cudaGetLastError();  // the failed query is not an error of the next call
  }
  const auto gathered = group.all_gather(std::string(reinterpret_cast<const char*>(&mine), sizeof(mine)));
  std::vector<Record> records(num_ranks);
  bool all_exportable = true, one_process = true;
  for (int r = 0; r < num_ranks; ++r) {
    DEEP_EP_RUNTIME_CHECK(gathered[r].size() == sizeof(Record), "pull combine: rank ", r, " sent a mapping record of ",
                          gathered[r].size(), " bytes, expected ", sizeof(Record));
    std::memcpy(&records[r], gathered[r].data(), sizeof(Record));
    all_exportable = all_exportable && records[r].exportable;
    one_process = one_process && records[r].pid == records[0].pid;
  }
  // Decided from the gathered records alone, so every rank decides alike.
  if (!all_exportable && !one_process) return {};
  std::vector<const char*> pointers(num_ranks);
  for (int r = 0; r < num_ranks; ++r) {
    const Record& peer = records[r];
    if (r == rank || peer.pid == mine.pid) {  // this process: the raw pointer
      pointers[r] = reinterpret_cast<const char*>(peer.pointer);
      continue;
    }
    const std::string key(reinterpret_cast<const char*>(&peer.handle), sizeof(peer.handle));
    auto it = opened_[r].find(key);
    if (it == opened_[r].end()) {
      void* opened = nullptr;
      DEEP_EP_CUDA_CHECK(cudaIpcOpenMemHandle(&opened, peer.handle, cudaIpcMemLazyEnablePeerAccess));
      it = opened_[r].emplace(key, static_cast<char*>(opened)).first;
    }
    pointers[r] = it->second + peer.offset;
  }
  return pointers;
}

void PeerTensorMap::make_room(int new_mappings) {
  for (auto& per_rank : opened_) {
    if (per_rank.size() + new_mappings <= kMaxMappingsPerRank) continue;
    // No kernel may still read through the mappings closed here.
    DEEP_EP_CUDA_CHECK(cudaDeviceSynchronize());
    for (auto& [key, base] : per_rank) cudaIpcCloseMemHandle(base);
    per_rank.clear();
  }
}

void PeerTensorMap::close_all() {
  for (auto& per_rank : opened_)
    for (auto& [key, base] : per_rank) cudaIpcCloseMemHandle(base);
  opened_.clear();
}

}  // namespace deep_ep
