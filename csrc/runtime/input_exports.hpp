// The host side of the host-free pull combine (protocol/pull_inputs.hpp) and of the push dispatch
// (protocol/push_outputs.hpp). Every rank exports the allocations that hold its combine inputs or dispatch outputs
// into numbered slots of a table in one POSIX shared-memory object, and runs a mapping thread that opens every
// peer's newly exported allocations by CUDA IPC, ahead of use, into an import table in host-mapped memory. A combine
// call then only looks up (or exports) its own inputs: no rank waits for another on the host. The kernel waits,
// bounded, for an entry its peer exported moments before to be mapped. An exported allocation that its owner has
// since freed (a caching allocator emptying its cache) is retired: the owner looks for freed ones whenever it
// exports a new allocation and every kScanPeriod calls, and the peers close their mappings of a retired slot, so its
// memory is not held and the slot can be used again. CUDA calls a free before the importers' close undefined;
// nothing tells this code of a caching allocator's frees ahead of time, so the close follows the free as soon as it
// is seen, and only mappings no kernel reads any more are closed (GPU case combine_inputs_freed checks the memory
// comes back).
#pragma once

#include <cuda_runtime_api.h>

#include <array>
#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "deep_ep/group.hpp"
#include "protocol/pull_inputs.hpp"
#include "protocol/push_outputs.hpp"

namespace deep_ep {

// Where the push dispatch's outputs live for this call (InputExports::export_outputs): refs[i] for the peers
// (slot -1: absent), local[i] where this rank's kernel writes, staged[i] when that is the staging allocation
// rather than the output itself (copied out after the kernel).
struct OutputPlacement {
  InputRef refs[kNumPushOutputs];
  void* local[kNumPushOutputs];
  bool staged[kNumPushOutputs];
};

class InputExports {
 public:
  struct Table;  // one rank's export table in the shared object (input_exports.cpp)

  // Collective over `group` (a shared-memory object, like HostExchange). Null on every rank when some rank
  // cannot map it (no /dev/shm, ranks on other hosts).
  static std::unique_ptr<InputExports> create(Group& group, int device);
  // Stops the mapping thread, closes the mappings and frees the staging allocations: only when no kernel
  // reads through them (the Buffer's release).
  ~InputExports();
  InputExports(const InputExports&) = delete;
  InputExports& operator=(const InputExports&) = delete;

  // Where this call's inputs live, for the kernel: each input's export slot and generation (its allocation
  // exported on first sight) and offset. An input whose allocation cannot be exported, or that comes when every
  // general slot holds a live allocation, is copied on `stream` into the staging allocation (grown, and exported
  // anew, when too small). has_rows false: slot -1 (nothing is read). `topk_weights` may be null (no top-k).
  PullInput export_call(const void* x, size_t x_bytes, const void* topk_weights, size_t weights_bytes, bool has_rows,
                        cudaStream_t stream);

  // The push dispatch's outputs (PushOutput order; null or 0 bytes: absent), exported like the combine's inputs.
  // One that cannot be exported is placed in the staging allocation, for copy_staged_outputs after the kernel.
  OutputPlacement export_outputs(void* const (&outputs)[kNumPushOutputs], const size_t (&bytes)[kNumPushOutputs],
                                 cudaStream_t stream);
  // After the kernel on `stream`: the staged outputs copied into the outputs.
  void copy_staged_outputs(const OutputPlacement& placement, void* const (&outputs)[kNumPushOutputs],
                           const size_t (&bytes)[kNumPushOutputs], cudaStream_t stream);

  // The import table [kNumMaxNvlPeers][kExportSlots] as the device sees it.
  const ImportEntry* device_imports() const { return device_imports_; }
  // The kernels' cache of resolved import bases [kNumMaxNvlPeers][kExportSlots] (device memory, zeroed here).
  uint64_t* device_resolved_bases() const { return resolved_bases_; }

 private:
  InputExports(int rank, int size, int device, void* shared, size_t shared_bytes);
  Table* table(int rank) const;
  // Exports `base` into a free slot (general or staging); false when there is none.
  bool export_allocation(char* base, const cudaIpcMemHandle_t& handle, bool staging, InputRef* ref);
  // Retires the general slots whose allocation is gone (freed, or another allocation at its address).
  void retire_freed();
  void publish(int slot, uint32_t generation);
  // Closes the mappings the mapping thread retired (on the calling thread, outside stream capture).
  void close_retired_mappings(cudaStream_t stream);
  InputRef stage(const void* ptr, size_t bytes, size_t offset, cudaStream_t stream);
  // Every export call's start: close the mappings the peers retired, and look for freed allocations periodically.
  void begin_call(cudaStream_t stream);
  // The ref of the general slot holding ptr's allocation, exported on first sight; false when it cannot be
  // exported or every general slot holds a live allocation.
  bool find_or_export(const void* ptr, InputRef* ref);
  // A staging allocation of at least `needed` bytes.
  void reserve_staging(size_t needed);
  void serve();
  // Closes the mappings, frees the allocations and unmaps the shared table (destructor, failed constructor).
  void release_memory();

  int rank_, size_, device_;
  void* shared_;
  size_t shared_bytes_;
  ImportEntry* host_imports_ = nullptr;  // cudaHostAlloc (mapped)
  ImportEntry* device_imports_ = nullptr;
  uint64_t* resolved_bases_ = nullptr;  // cudaMalloc
  using HandleKey = std::array<char, sizeof(cudaIpcMemHandle_t)>;
  // This rank's general slots: the allocation each holds while live, and the slot's generation.
  struct GeneralSlot {
    char* base = nullptr;
    HandleKey key{};
    uint32_t generation = 0;  // odd: exported (live), even: never used or retired
  };
  static constexpr int kGeneralSlots = kExportSlots - kStagingSlots;
  // Calls between two looks for freed allocations (a look costs two driver queries per live slot).
  static constexpr int kScanPeriod = 256;
  std::array<GeneralSlot, kGeneralSlots> general_;
  std::map<HandleKey, int> slot_of_;  // live general slots by allocation
  int calls_since_scan_ = 0;
  int next_staging_ = kGeneralSlots;
  char* staging_ = nullptr;  // current staging allocation and its export slot
  size_t staging_bytes_ = 0;
  InputRef staging_ref_{-1, 0, 0};
  std::vector<char*> retired_staging_;      // earlier ones: peers' kernels may still read them
  std::vector<std::vector<void*>> opened_;  // [rank][slot]: mappings of the peers' allocations (mapping thread)
  std::mutex retired_mutex_;                // guards retired_mappings_
  std::vector<void*> retired_mappings_;     // retired by the mapping thread, closed by export_call
  std::atomic<bool> has_retired_mappings_{false};
  std::atomic<bool> stop_{false};
  std::thread mapper_;
};

}  // namespace deep_ep
