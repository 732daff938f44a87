// The split of the GIN signals among a Buffer's ops (runtime/gin_signals.hpp): disjoint ranges, each as
// large as the largest layout of its op, so that signals keep their meaning across ops of any shape.
#include <gtest/gtest.h>

#include "deep_ep/config.hpp"
#include "protocol/internode_layout.hpp"
#include "protocol/low_latency_layout.hpp"
#include "runtime/gin_signals.hpp"

using namespace deep_ep;

TEST(GinSignalPlan, RangesFollowEachOtherWithoutOverlap) {
  const GinSignalPlan plan = gin_signal_plan(16, 2, 132);
  EXPECT_EQ(plan.internode_start, 0);
  EXPECT_EQ(plan.low_latency_start[0], plan.internode_start + plan.internode_count);
  EXPECT_EQ(plan.low_latency_start[1], plan.low_latency_start[0] + plan.low_latency_count);
  EXPECT_EQ(plan.total(), plan.internode_count + 2 * plan.low_latency_count);
}

TEST(GinSignalPlan, InternodeRangeFitsAChannelPerSm) {
  for (int nodes : {2, 4, 20}) {
    const int sms = 132;
    const GinSignalPlan plan = gin_signal_plan(nodes * 8, nodes, sms);
    // The most channels an op can have is one per SM; fewer channels need fewer signals.
    EXPECT_EQ(internode::Layout::make(nodes, 8, sms, 128, 16384).num_signals(), plan.internode_count);
    EXPECT_LT(internode::Layout::make(nodes, 8, 20, 128, 16384).num_signals(), plan.internode_count);
  }
}

TEST(GinSignalPlan, LowLatencyRangeFitsTheMostLocalExperts) {
  for (int ranks : {2, 16, 32}) {
    const GinSignalPlan plan = gin_signal_plan(ranks, 2, 132);
    EXPECT_EQ(low_latency::HalfLayout::make(1, 128, ranks, int64_t(kMaxLocalExperts) * ranks).num_signals(),
              plan.low_latency_count);
    EXPECT_LT(low_latency::HalfLayout::make(128, 7168, ranks, 9 * ranks).num_signals(), plan.low_latency_count);
  }
}
