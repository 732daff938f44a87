// Maps other ranks' tensors (the pull combine's inputs: ordinary caching-allocator memory) into this
// process. Collective: every rank passes its own pointer and gets every rank's, through CUDA IPC of
// the allocation that holds it (design.md decision 3). Mappings are cached per allocation (the IPC
// handle identifies it): a caching allocator hands out few distinct allocations. Past
// kMaxMappingsPerRank allocations of one rank (an allocator that keeps freeing and allocating), the
// device is synchronized and that rank's older mappings are closed; a CUDA graph that captured a
// pull combine must therefore keep its inputs, as graphs do.
#pragma once

#include <cuda_runtime_api.h>

#include <map>
#include <string>
#include <vector>

#include "deep_ep/group.hpp"

namespace deep_ep {

class PeerTensorMap {
 public:
  // Every rank's `ptr` as seen from here (this rank's own pointer at its index), or an empty vector on
  // every rank when some rank's memory cannot be exported (e.g. memory from cudaMallocAsync pools or
  // expandable segments): the caller then uses a path that needs no mapping.
  std::vector<const char*> map(Group& group, const void* ptr);
  // Before an op's map() calls (at most `new_mappings` of them): keeps every rank's cache within
  // kMaxMappingsPerRank without closing a mapping those calls return. Local, not collective.
  void make_room(int new_mappings);
  // Closes every mapping; only when no kernel can use them (the Buffer's release).
  void close_all();
  ~PeerTensorMap() { close_all(); }

 private:
  static constexpr size_t kMaxMappingsPerRank = 32;
  std::vector<std::map<std::string, char*>> opened_;  // [rank]: IPC handle bytes -> opened base
};

}  // namespace deep_ep
