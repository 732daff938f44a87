#include "runtime/peer_tensor_map.hpp"

#include <unistd.h>

#include <cstring>

#include "deep_ep/error.hpp"
#include "runtime/ipc_allocation.hpp"
#include "util/cuda_check.hpp"

namespace deep_ep {

namespace {

// Where one tensor lives: the allocation's IPC handle and the offset inside it, and the raw pointer
// for ranks of the same process.
struct TensorRecord {
  uint64_t pointer;
  uint64_t offset;
  int64_t has_rows;  // 0: no rows (nobody reads them; nothing to map)
  cudaIpcMemHandle_t handle;
};

// x is 16-byte aligned: check_normal_combine_inputs refuses it otherwise.
struct Record {
  int32_t exportable;  // every tensor of this rank has an IPC handle
  int32_t pid;
  TensorRecord x, weights;
};

// Fills `out` for `ptr`; false when its allocation cannot be exported.
bool describe(const void* ptr, bool has_rows, TensorRecord* out) {
  out->pointer = reinterpret_cast<uint64_t>(ptr);
  out->has_rows = has_rows;
  if (!has_rows) return true;
  IpcAllocation allocation;
  if (!find_ipc_allocation(ptr, &allocation)) return false;
  out->handle = allocation.handle;
  out->offset = allocation.offset;
  return true;
}

}  // namespace

size_t PeerTensorMap::record_bytes() { return sizeof(Record); }

const char* PeerTensorMap::open(int rank, const cudaIpcMemHandle_t& handle, uint64_t offset, bool may_synchronize) {
  auto& cache = opened_[rank];
  HandleKey key;
  std::memcpy(key.data(), &handle, sizeof(handle));
  auto it = cache.find(key);
  if (it == cache.end()) {
    if (cache.size() >= kMaxMappingsPerRank && may_synchronize) {
      // No kernel may still read through the mappings closed here. The other tensor of this call was
      // opened already; map() opens it again if this closed it.
      DEEP_EP_CUDA_CHECK(cudaDeviceSynchronize());
      for (auto old = cache.begin(); old != cache.end();) {
        if (old->second.pinned) {
          ++old;
          continue;
        }
        cudaIpcCloseMemHandle(old->second.base);
        old = cache.erase(old);
      }
    }
    void* opened = nullptr;
    DEEP_EP_CUDA_CHECK(cudaIpcOpenMemHandle(&opened, handle, cudaIpcMemLazyEnablePeerAccess));
    it = cache.emplace(key, Mapping{static_cast<char*>(opened), false}).first;
  }
  if (!may_synchronize) it->second.pinned = true;  // a graph being captured will replay this mapping
  return it->second.base + offset;
}

const PeerTensorMap::Inputs& PeerTensorMap::map(HostExchange& exchange, int rank, const void* x, const void* weights,
                                                bool with_weights, bool has_rows, bool may_synchronize) {
  DEEP_EP_RUNTIME_CHECK(exchange.record_bytes() == sizeof(Record), "pull combine: exchange records of ",
                        exchange.record_bytes(), " bytes, expected ", sizeof(Record));
  Record mine{};
  mine.pid = static_cast<int32_t>(getpid());
  const bool x_exportable = describe(x, has_rows, &mine.x);  // both described: one process uses both
  mine.exportable = x_exportable && (!with_weights || describe(weights, has_rows, &mine.weights));
  mine.weights.pointer = reinterpret_cast<uint64_t>(weights);
  const int num_ranks = exchange.size();
  if (static_cast<int>(opened_.size()) != num_ranks) opened_.resize(num_ranks);
  gathered_.resize(sizeof(Record) * num_ranks);
  exchange.all_gather(&mine, gathered_.data(), "combine (exchanging the pull combine's input addresses)");
  // Records are plain bytes in gathered_; read each as a Record through a copy (no aliasing question).
  auto record = [&](int r) {
    Record out;
    std::memcpy(&out, gathered_.data() + sizeof(Record) * r, sizeof(Record));
    return out;
  };

  bool all_exportable = true, one_process = true;
  const int32_t first_pid = record(0).pid;
  for (int r = 0; r < num_ranks; ++r) {
    const Record peer = record(r);
    all_exportable = all_exportable && peer.exportable;
    one_process = one_process && peer.pid == first_pid;
  }
  Inputs& out = inputs_;
  out.x.clear();
  out.weights.clear();
  // Decided from the gathered records alone, so every rank decides alike.
  if (!all_exportable && !one_process) return out;
  out.x.assign(num_ranks, nullptr);
  if (with_weights) out.weights.assign(num_ranks, nullptr);
  for (int r = 0; r < num_ranks; ++r) {
    const Record peer = record(r);
    if (r == rank || peer.pid == mine.pid) {  // this process: the raw pointers
      out.x[r] = reinterpret_cast<const char*>(peer.x.pointer);
      if (with_weights) out.weights[r] = reinterpret_cast<const char*>(peer.weights.pointer);
      continue;
    }
    if (!peer.x.has_rows) continue;  // null: no token of any rank has a row there
    out.x[r] = open(r, peer.x.handle, peer.x.offset, may_synchronize);
    if (with_weights) {
      const size_t before = opened_[r].size();
      out.weights[r] = open(r, peer.weights.handle, peer.weights.offset, may_synchronize);
      // Opening the weights' allocation trimmed the cache, maybe closing x's mapping: look x up again.
      if (opened_[r].size() < before) out.x[r] = open(r, peer.x.handle, peer.x.offset, may_synchronize);
    }
  }
  return out;
}

void PeerTensorMap::close_all() {
  for (auto& per_rank : opened_)
    for (auto& [key, mapping] : per_rank) cudaIpcCloseMemHandle(mapping.base);
  opened_.clear();
}

}  // namespace deep_ep
