// How the pull combine finds the other ranks' inputs without the host: each rank exports the allocations
// holding its combine inputs into numbered slots (never reused while the Buffer lives), its kernel publishes
// which slot and offset hold this call's x and top-k weights (ControlRegion::pull_inputs), and every rank's
// mapping thread opens the peers' exported allocations ahead of use into a table in host-mapped memory that
// the kernel reads. Plain data shared by host and device code.
#pragma once

#include <cstdint>

namespace deep_ep {

// Allocations one rank can export for the pull combine; past them a new allocation's rows are staged in a
// Buffer-owned allocation (one extra copy). The last kStagingSlots are kept for that staging allocation,
// which takes a new slot each time it grows.
constexpr int kExportSlots = 64;
constexpr int kStagingSlots = 8;

// Where a rank's input of one call lives: export slot and byte offset; slot -1: no rows (nothing to read).
struct InputRef {
  int32_t slot;
  int32_t pad;
  uint64_t offset;
};

struct PullInput {
  InputRef x, topk_weights;
};

// One entry of the import table ([rank][slot], host-mapped): state is written last by the mapping thread
// (after base, behind a release fence) and read by the kernel with ld.acquire.sys before base.
struct ImportEntry {
  uint64_t state;  // kImportPending, kImportMapped or kImportFailed
  uint64_t base;   // the exported allocation's address in this process
};
constexpr uint64_t kImportPending = 0, kImportMapped = 1, kImportFailed = 2;

}  // namespace deep_ep
