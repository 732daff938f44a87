// The rows an internode dispatch cycles through per RDMA ring (csrc/runtime/internode_rings.hpp).
#include <gtest/gtest.h>

#include "runtime/internode_rings.hpp"

namespace deep_ep {
namespace {

constexpr int64_t kL2 = 50 << 20;      // an H100's L2
constexpr int64_t kRow = 14336 + 512;  // a BF16 row of hidden 7168 with its metadata

TEST(InternodeRings, AGpuOfItsOwnKeepsTheWholeRing) {
  EXPECT_EQ(internode_dispatch_ring_rows(1, 128, 2, 12, kRow, 20, kL2), 128);
  EXPECT_EQ(internode_dispatch_ring_rows(0, 140, 20, 24, kRow, 20, kL2), 140);
}

TEST(InternodeRings, SharedGpusCycleThroughAboutTwiceTheirL2) {
  // 16 ranks of 2 nodes on one GPU, 8 channels: 2 x 50 MiB over 256 rings of ~14.8 KB rows is 27: the floor, 32.
  EXPECT_EQ(internode_dispatch_ring_rows(16, 140, 2, 8, kRow, 20, kL2), 32);
  // 4 ranks of 2 nodes, 4 channels: 2 x 50 MiB / (32 rings x 14.8 KB) = 220 rows, capped by the ring.
  EXPECT_EQ(internode_dispatch_ring_rows(4, 128, 2, 4, kRow, 20, kL2), 128);
  // Smaller rows: FP8 rows are half as wide, twice as many fit.
  EXPECT_EQ(internode_dispatch_ring_rows(16, 140, 2, 8, kRow / 2, 20, kL2), 55);
}

TEST(InternodeRings, NeverBelowTheSendChunkNorAboveTheRing) {
  EXPECT_EQ(internode_dispatch_ring_rows(160, 128, 20, 24, kRow, 44, kL2), 44);  // the send chunk wins
  EXPECT_EQ(internode_dispatch_ring_rows(160, 24, 20, 24, kRow, 8, kL2), 24);    // a ring smaller than the floor
}

TEST(InternodeRings, ARoundTakesAtMostHalfTheRing) {
  EXPECT_EQ(internode_dispatch_round_tokens(128, 20), 20);  // a GPU of its own: V1's configs already keep the rule
  EXPECT_EQ(internode_dispatch_round_tokens(32, 20), 16);   // 16 ranks on one H100, BF16: the ring shrank to 32
  EXPECT_EQ(internode_dispatch_round_tokens(55, 20), 20);   // ... FP8: 55 rows, rounds of 20 fit twice
  EXPECT_EQ(internode_dispatch_round_tokens(44, 44), 22);   // a ring floored at the send chunk
  EXPECT_EQ(internode_dispatch_round_tokens(1, 8), 1);      // never empty
}

}  // namespace
}  // namespace deep_ep
