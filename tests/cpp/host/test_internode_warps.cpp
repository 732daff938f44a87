// The internode kernels' warp roles (csrc/runtime/internode_warps.hpp): defaults per node size, the
// DEEP_EP_INTERNODE_WARPS override, and the errors for splits the roles cannot run with.
#include <gtest/gtest.h>

#include <string>

#include "deep_ep/error.hpp"
#include "runtime/internode_warps.hpp"
#include "value_error.hpp"

namespace deep_ep {
namespace {

using host_tests::value_error_of;

TEST(InternodeWarps, DefaultsFitEveryNodeSize) {
  for (int ranks_per_node : {1, 2, 4, 8, 16, 32}) {
    const auto split = internode_warp_split(ranks_per_node, nullptr);
    EXPECT_EQ(split.dispatch_senders, 4);
    // Every local rank's ring has a producer warp with room for it, and the home sums keep a warp.
    EXPECT_GE(split.combine_producers * internode::kMaxRingsPerProducerWarp, ranks_per_node);
    EXPECT_LE(split.combine_producers, ranks_per_node);
    EXPECT_LT(split.combine_producers + split.combine_forwarders, internode::kNumThreads / 32);
  }
  EXPECT_EQ(internode_warp_split(2, "").combine_producers, 2);
  EXPECT_EQ(internode_warp_split(8, nullptr).combine_producers, 4);
  EXPECT_EQ(internode_warp_split(32, nullptr).combine_producers, 8);
}

TEST(InternodeWarps, OverrideIsTakenAsGiven) {
  const auto split = internode_warp_split(8, "6,8,4");
  EXPECT_EQ(split.dispatch_senders, 6);
  EXPECT_EQ(split.combine_producers, 8);
  EXPECT_EQ(split.combine_forwarders, 4);
}

TEST(InternodeWarps, BadOverridesNameTheVariable) {
  for (const char* text : {"4,4", "a,b,c", "4,4,6,", "4,4,6x"}) {
    const std::string error = value_error_of([&] { internode_warp_split(8, text); });
    EXPECT_NE(error.find("DEEP_EP_INTERNODE_WARPS"), std::string::npos) << "'" << text << "' gave: '" << error << "'";
  }
  EXPECT_THROW(internode_warp_split(8, "0,4,6"), ValueError);   // no sender
  EXPECT_THROW(internode_warp_split(8, "15,4,6"), ValueError);  // no forwarder or receiver left
  EXPECT_THROW(internode_warp_split(8, "4,1,6"), ValueError);   // 8 rings need 2 producer warps
  EXPECT_THROW(internode_warp_split(8, "4,9,6"), ValueError);   // more producers than local ranks
  EXPECT_THROW(internode_warp_split(8, "4,8,8"), ValueError);   // no home warp left
  EXPECT_THROW(internode_warp_split(8, "4,4,0"), ValueError);   // no forwarder
}

TEST(InternodeWarps, CombineRingHoldsARoundAndABatch) {
  const auto split = internode_warp_split(8, nullptr);
  const int home_warps = internode::kNumThreads / 32 - split.combine_producers - split.combine_forwarders;
  EXPECT_GE(internode_combine_min_ring_slots(split), split.combine_forwarders + home_warps);
  EXPECT_GE(internode_combine_min_ring_slots(split), internode::kMinRingSlots);
  // Two forwarders leave ten home warps: twelve slots are still under the ring minimum.
  EXPECT_EQ(internode_combine_min_ring_slots(internode_warp_split(8, "4,4,2")), internode::kMinRingSlots);
  // One producer of two local ranks, fourteen forwarders, one home warp: fifteen slots.
  EXPECT_EQ(internode_combine_min_ring_slots(internode_warp_split(2, "4,1,14")), internode::kMinRingSlots);
}

}  // namespace
}  // namespace deep_ep
