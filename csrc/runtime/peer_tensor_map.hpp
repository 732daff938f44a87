// Maps other ranks' tensors (the pull combine's inputs: ordinary caching-allocator memory) into this
// process. Collective: on every call each rank passes its own input pointers and gets every rank's,
// through CUDA IPC of the allocations that hold them (docs/design.md decision 3), exchanged over the host
// (HostExchange, microseconds). Mappings are cached per allocation (the IPC handle identifies it): a
// caching allocator hands out few distinct allocations. Past kMaxMappingsPerRank allocations of one
// rank (an allocator that keeps freeing and allocating), the device is synchronized and that rank's
// mappings are closed, except those a captured call used (pinned: graph replays read through them).
#pragma once

#include <cuda_runtime_api.h>

#include <array>
#include <map>
#include <string>
#include <vector>

#include "runtime/host_exchange.hpp"

namespace deep_ep {

class PeerTensorMap {
 public:
  // Bytes of the record each rank contributes per call (HostExchange's record size).
  static size_t record_bytes();

  // Every rank's pointers as seen from here (this rank's own at its index): x[r] always, weights[r]
  // when `with_weights` (the same on every rank). Both empty on every rank when some rank's memory
  // cannot be exported (e.g. memory from cudaMallocAsync pools or expandable segments): the caller then
  // uses a path that needs no mapping. `has_rows`: false when x (and weights) have no rows; nothing is
  // read from them then, and their pointers (maybe null) are neither exported nor mapped. While `stream` is being
  // captured the cache is not trimmed (that synchronizes the device); it then grows past kMaxMappingsPerRank, and
  // the mappings the captured call uses stay open until the Buffer goes (a graph replays them). The result lives in
  // this map until the next call: a call allocates nothing on the host once the group's size is known.
  struct Inputs {
    std::vector<const char*> x, weights;
  };
  const Inputs& map(HostExchange& exchange, int rank, const void* x, const void* weights, bool with_weights,
                    bool has_rows, cudaStream_t stream);

  // Closes every mapping; only when no kernel can use them (the Buffer's release).
  void close_all();
  ~PeerTensorMap() { close_all(); }

 private:
  static constexpr size_t kMaxMappingsPerRank = 32;
  const char* open(int rank, const cudaIpcMemHandle_t& handle, uint64_t offset, bool may_synchronize);
  struct Mapping {
    char* base;
    bool pinned;  // used by a captured call: never closed before close_all
  };
  using HandleKey = std::array<char, sizeof(cudaIpcMemHandle_t)>;
  std::vector<std::map<HandleKey, Mapping>> opened_;  // [rank]: IPC handle bytes -> mapping
  std::vector<unsigned char> gathered_;               // every rank's record of the current call
  Inputs inputs_;                                     // what map() returns
};

}  // namespace deep_ep
