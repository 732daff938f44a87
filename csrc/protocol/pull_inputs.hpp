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

// One entry of the import table ([rank][slot], host-mapped). state = import_state(generation, kind),
// written last by the mapping thread (after base, behind a release fence) and read by the kernel with
// ld.acquire.sys before base. It only grows: a kernel waiting for generation g to be mapped waits for
// state >= import_state(g, kImportMapped) and then requires equality.
struct ImportEntry {
  uint64_t state;
  uint64_t base;  // the exported allocation's address in this process (kImportMapped)
};
constexpr int kImportKindBits = 2;
constexpr uint64_t kImportPending = 0, kImportMapped = 1, kImportFailed = 2, kImportRetired = 3;
constexpr uint64_t import_state(uint32_t generation, uint64_t kind) {
  return (static_cast<uint64_t>(generation) << kImportKindBits) | kind;
}

// The kernels' cache of resolved addresses holds, per (peer, slot), one 64-bit word: the mapped base and 24 bits
// of its generation. A user-space device address fits in the low 48 bits and a mapped allocation starts on a
// 256-byte boundary, so the generation's low 8 bits fill the base's zero bits and its next 16 bits sit above bit
// 47. A stale word could match only after 2^23 exports of one slot that this process never resolved in between.
// A live generation is odd, so a word is never 0 (the cache's "unresolved").
constexpr uint64_t kResolvedBaseMask = ((uint64_t{1} << 48) - 1) & ~uint64_t{0xff};
constexpr bool is_cacheable_base(uint64_t base) { return (base & ~kResolvedBaseMask) == 0; }
constexpr uint64_t resolved_tag(uint32_t generation) {
  return static_cast<uint64_t>(generation & 0xffu) | (static_cast<uint64_t>((generation >> 8) & 0xffffu) << 48);
}

}  // namespace deep_ep
