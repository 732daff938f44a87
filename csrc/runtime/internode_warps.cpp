// Warp roles of the internode kernels (internode_warps.hpp).
#include "runtime/internode_warps.hpp"

#include <algorithm>
#include <cstdio>

#include "deep_ep/error.hpp"

namespace deep_ep {

internode::WarpSplit internode_warp_split(int num_ranks_per_node, const char* override_text) {
  internode::WarpSplit split;
  // A producer warp serves up to kMaxRingsPerProducerWarp local ranks' rings.
  const int min_producers =
      (num_ranks_per_node + internode::kMaxRingsPerProducerWarp - 1) / internode::kMaxRingsPerProducerWarp;
  split.combine_producers = std::max(std::min(num_ranks_per_node, split.combine_producers), min_producers);
  if (override_text != nullptr && *override_text != '\0') {
    internode::WarpSplit custom;
    char tail = 0;
    DEEP_EP_CHECK(std::sscanf(override_text, "%d,%d,%d%c", &custom.dispatch_senders, &custom.combine_producers,
                              &custom.combine_forwarders, &tail) == 3,
                  "DEEP_EP_INTERNODE_WARPS must be \"senders,producers,forwarders\", got '", override_text, "'");
    split = custom;
  }
  const int warps = internode::kNumThreads / 32;
  DEEP_EP_CHECK(split.dispatch_senders >= 1 && split.dispatch_senders <= warps - 2, "internode dispatch needs 1 to ",
                warps - 2, " sender warps (one forwarder and one receiver warp remain), got ", split.dispatch_senders);
  DEEP_EP_CHECK(split.combine_producers >= min_producers && split.combine_producers <= num_ranks_per_node &&
                    split.combine_forwarders >= 1 && split.combine_producers + split.combine_forwarders <= warps - 1,
                "internode combine needs ", min_producers, " to ", num_ranks_per_node, " producer warps and at least ",
                "one forwarder and one home warp out of ", warps, ", got ", split.combine_producers, " producers and ",
                split.combine_forwarders, " forwarders");
  return split;
}

int internode_combine_min_ring_slots(const internode::WarpSplit& split) {
  const int home_warps = internode::kNumThreads / 32 - split.combine_producers - split.combine_forwarders;
  return std::max(internode::kMinRingSlots, split.combine_forwarders + home_warps);
}

}  // namespace deep_ep
