// The rows an internode dispatch cycles through per RDMA ring (csrc/runtime/internode_rings.hpp).
#include <gtest/gtest.h>

#include "runtime/internode_rings.hpp"

namespace deep_ep {
namespace {

constexpr int64_t kL2 = 50 << 20;      // an H100's L2
constexpr int64_t kRow = 14336 + 512;  // a BF16 row of hidden 7168 with its metadata

TEST(InternodeRings, AGpuOfItsOwnKeepsTheWholeRing) {
  EXPECT_EQ(internode_dispatch_ring(1, 128, 2, 12, kRow, 20, kL2).num_rows, 128);
  EXPECT_EQ(internode_dispatch_ring(0, 140, 20, 24, kRow, 20, kL2).num_rows, 140);
}

TEST(InternodeRings, SharedGpusCycleThroughAboutTwiceTheirL2) {
  // 16 ranks of 2 nodes on one GPU, 8 channels: 2 x 50 MiB over 256 rings of ~14.8 KB rows is 27: the floor, 32.
  EXPECT_EQ(internode_dispatch_ring(16, 140, 2, 8, kRow, 20, kL2).num_rows, 32);
  // 4 ranks of 2 nodes, 4 channels: 2 x 50 MiB / (32 rings x 14.8 KB) = 220 rows, capped by the ring.
  EXPECT_EQ(internode_dispatch_ring(4, 128, 2, 4, kRow, 20, kL2).num_rows, 128);
  // Smaller rows: FP8 rows are half as wide, twice as many fit.
  EXPECT_EQ(internode_dispatch_ring(16, 140, 2, 8, kRow / 2, 20, kL2).num_rows, 55);
}

TEST(InternodeRings, NeverBelowTheSendChunkNorAboveTheRing) {
  EXPECT_EQ(internode_dispatch_ring(160, 128, 20, 24, kRow, 44, kL2).num_rows, 44);  // the send chunk wins
  EXPECT_EQ(internode_dispatch_ring(160, 24, 20, 24, kRow, 8, kL2).num_rows, 24);    // a ring smaller than the floor
}

TEST(InternodeRings, ARoundTakesAtMostHalfTheRing) {
  // A GPU of its own: V1's configs already keep the rule.
  EXPECT_EQ(internode_dispatch_ring(1, 128, 2, 12, kRow, 20, kL2).round_tokens, 20);
  // 16 ranks on one H100, BF16: the ring shrank to 32 rows, rounds of 16.
  EXPECT_EQ(internode_dispatch_ring(16, 140, 2, 8, kRow, 20, kL2).round_tokens, 16);
  // ... FP8: 55 rows, rounds of 20 fit twice.
  EXPECT_EQ(internode_dispatch_ring(16, 140, 2, 8, kRow / 2, 20, kL2).round_tokens, 20);
  // A ring floored at the send chunk.
  EXPECT_EQ(internode_dispatch_ring(160, 128, 20, 24, kRow, 44, kL2).round_tokens, 22);
  // Never empty.
  EXPECT_EQ(internode_dispatch_ring(1, 1, 2, 8, kRow, 8, kL2).round_tokens, 1);
}

}  // namespace
}  // namespace deep_ep
