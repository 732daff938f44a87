// The slots an intranode dispatch cycles through per channel ring, and its batch (runtime/intranode_rings.hpp).
#include <gtest/gtest.h>

#include "runtime/intranode_rings.hpp"

namespace deep_ep {
namespace {

constexpr int64_t kL2 = 50 << 20;  // an H100's L2
constexpr int64_t kBf16 = 14336;   // a BF16 row of hidden 7168
constexpr int64_t kFp8 = 7168;

void expect_ring(const IntranodeDispatchRing& ring, int slots, int send_chunk) {
  EXPECT_EQ(ring.num_slots, slots);
  EXPECT_EQ(ring.send_chunk, send_chunk);
}

TEST(IntranodeRings, AGpuOfItsOwnKeepsTheConfig) {
  expect_ring(intranode_dispatch_ring(1, 32, 8, 16, kBf16, kL2), 32, 8);
  expect_ring(intranode_dispatch_ring(0, 256, 6, 24, kBf16, kL2), 256, 6);
}

TEST(IntranodeRings, SharedGpusFitTheirRingsIn30PercentOfL2) {
  // 8 ranks, 16 channels: 30% of 50 MiB (15 MiB) over 128 rings of 14 KB slots is 8.6 slots: 8, batch 4.
  expect_ring(intranode_dispatch_ring(8, 32, 8, 16, kBf16, kL2), 8, 4);
  // FP8 rows are half as wide: 16 slots; 8 channels of BF16 rows too.
  expect_ring(intranode_dispatch_ring(8, 32, 8, 16, kFp8, kL2), 16, 8);
  expect_ring(intranode_dispatch_ring(8, 32, 8, 8, kBf16, kL2), 16, 8);
  // 8 channels of FP8 rows: 34, capped by the ring.
  expect_ring(intranode_dispatch_ring(8, 32, 8, 8, kFp8, kL2), 32, 8);
  // Two ranks on the GPU: the whole ring.
  expect_ring(intranode_dispatch_ring(2, 32, 8, 16, kBf16, kL2), 32, 8);
}

TEST(IntranodeRings, AtLeastTwoSlotsAndABatchOfHalfThem) {
  expect_ring(intranode_dispatch_ring(8, 32, 8, 64, 4 * kBf16, kL2), 2, 1);
  expect_ring(intranode_dispatch_ring(8, 2, 1, 16, kBf16, kL2), 2, 1);   // V1's smallest ring
  expect_ring(intranode_dispatch_ring(8, 12, 2, 16, kFp8, kL2), 12, 2);  // a batch below half the ring stays
}

}  // namespace
}  // namespace deep_ep
