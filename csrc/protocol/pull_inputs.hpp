// How the pull combine finds the other ranks' inputs without the host: each rank exports the allocations
// holding its combine inputs into numbered slots, its kernel publishes which slot (and export generation) and
// offset hold this call's x and top-k weights (ControlRegion::pull_inputs), and every rank's mapping thread opens
// the peers' exported allocations ahead of use into a table in host-mapped memory that the kernel reads.
// A general slot whose allocation its owner has freed is retired and may be exported again later: its
// generation counts the exports and retirements (odd: exported, even: retired), so a mapping or a cached
// address of an earlier generation is never taken for the current one. Plain data shared by host and device code.
#pragma once

#include <cstdint>

namespace deep_ep {

// Allocations one rank can have exported at once for the pull combine; past them a new allocation's rows are
// staged in a Buffer-owned allocation (one extra copy). The last kStagingSlots are kept for that staging
// allocation, which takes a new slot each time it grows (and is never retired while the Buffer lives).
constexpr int kExportSlots = 64;
constexpr int kStagingSlots = 8;

// Where a rank's input of one call lives: export slot, the slot's generation, byte offset; slot -1: no rows.
struct InputRef {
  int32_t slot;
  uint32_t generation;
  uint64_t offset;
};

struct PullInput {
  InputRef x, topk_weights;
};

// One entry of the import table ([rank][slot], host-mapped). state = generation << kImportKindBits | kind,
// written last by the mapping thread (after base, behind a release fence) and read by the kernel with
// ld.acquire.sys before base. It only grows: a kernel waiting for generation g to be mapped waits for
// state >= g << kImportKindBits | kImportMapped and then requires equality.
struct ImportEntry {
  uint64_t state;
  uint64_t base;  // the exported allocation's address in this process (kImportMapped)
};
constexpr int kImportKindBits = 2;
constexpr uint64_t kImportPending = 0, kImportMapped = 1, kImportFailed = 2, kImportRetired = 3;

// The kernels' cache of resolved addresses holds base | (generation & 0xffff) << kResolvedTagShift: a
// user-space device address fits in the low 48 bits, and a live generation is odd, so an entry is never 0.
constexpr int kResolvedTagShift = 48;

}  // namespace deep_ep
