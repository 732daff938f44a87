// Device side of the input exports (protocol/pull_inputs.hpp, runtime/input_exports.hpp): where a peer's
// exported input is in this process. Shared by the intranode pull combine and the internode combine in place.
#pragma once

#include <cstdint>

#include "kernels/common/device_utils.cuh"
#include "protocol/diagnostics.hpp"
#include "protocol/pull_inputs.hpp"

namespace deep_ep::device {

// The address of input `ref` of export-group rank `peer`, or nullptr (reported: `phase`, `rank`, `report_peer`,
// `channel`) when its mapping does not come within the timeout or failed. ref.slot must be >= 0.
//
// Memory ordering: `resolved_bases` is plain device memory written only by this process's kernels: an entry is
// either read back in a later kernel (ordered by the kernel boundary) or raced by another thread of the same grid
// storing the same 64-bit value, and its tag (resolved_tag) keeps another generation's address from matching.
// The import entry's state is read with ld.acquire.sys before its base: the mapping thread stores base first,
// then state behind a release fence.
__device__ __forceinline__ const char* resolve_import(const ImportEntry* imports, uint64_t* resolved_bases, int peer,
                                                      const InputRef& ref, int64_t timeout_ns,
                                                      DeviceDiagnostics* diagnostics, Phase phase, int rank,
                                                      int report_peer, int channel) {
  uint64_t* cached = resolved_bases + peer * kExportSlots + ref.slot;
  const uint64_t tag = resolved_tag(ref.generation);
  const uint64_t word = __ldcg(cached);
  uint64_t base = (word & ~kResolvedBaseMask) == tag ? word & kResolvedBaseMask : 0;
  if (base == 0) {
    const ImportEntry* entry = imports + peer * kExportSlots + ref.slot;
    const int64_t mapped = static_cast<int64_t>(import_state(ref.generation, kImportMapped));
    int64_t state = 0;
    if (!wait_at_least(reinterpret_cast<const int64_t*>(&entry->state), mapped, timeout_ns, diagnostics, phase, rank,
                       report_peer, channel, &state))
      return nullptr;
    // Anything else: cudaIpcOpenMemHandle failed for this generation, or the slot moved on (a protocol error: a
    // published slot stays exported until its owner's kernel, which waits for every reader, ends).
    if (state != mapped) {
      report(diagnostics, phase, false, rank, report_peer, channel, -1, mapped, state);
      return nullptr;
    }
    base = *reinterpret_cast<volatile const uint64_t*>(&entry->base);
    if (is_cacheable_base(base)) *cached = base | tag;
  }
  return reinterpret_cast<const char*>(base) + ref.offset;
}

// A reference another process published (stored before a release this thread has acquired, or before a flag an
// acquire ordered): read at L2, never from an L1 copy.
__device__ __forceinline__ InputRef load_published_ref(const InputRef* published) {
  return InputRef{__ldcg(&published->slot), __ldcg(&published->generation), __ldcg(&published->offset)};
}

// The address of a published input, or nullptr: where its slot is -1 (nothing published: no rows, no such output;
// `ok` stays), or where its mapping did not come (reported as resolve_import does; `ok` becomes false). Does nothing
// once `ok` is false, so a caller resolves several references in a row and checks `ok` once.
__device__ __forceinline__ const char* resolve_published(const InputRef& ref, const ImportEntry* imports,
                                                         uint64_t* resolved_bases, int peer, int64_t timeout_ns,
                                                         DeviceDiagnostics* diagnostics, Phase phase, int rank,
                                                         int report_peer, int channel, bool& ok) {
  if (!ok || ref.slot < 0) return nullptr;
  const char* address =
      resolve_import(imports, resolved_bases, peer, ref, timeout_ns, diagnostics, phase, rank, report_peer, channel);
  ok = address != nullptr;
  return address;
}

}  // namespace deep_ep::device
