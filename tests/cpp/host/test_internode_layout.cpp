// The internode buffer layout (csrc/protocol/internode_layout.hpp): every signal, flag, meta
// field and region has its own place, regions are aligned and inside the sizes the hints report.
#include <gtest/gtest.h>

#include <set>
#include <tuple>

#include "deep_ep/config.hpp"
#include "protocol/internode_layout.hpp"

namespace deep_ep {
namespace {

using internode::Layout;
using internode::RowLayout;

struct Shape {
  int nodes, ranks_per_node, channels, capacity;
};

const Shape kShapes[] = {{2, 8, 8, 128}, {4, 4, 8, 256}, {2, 2, 20, 256}, {20, 8, 24, 64}, {2, 32, 2, 16}};

TEST(InternodeLayout, SignalsAreDistinctAndInRange) {
  for (const Shape& s : kShapes) {
    const Layout l = Layout::make(s.nodes, s.ranks_per_node, s.channels, s.capacity, 1024);
    std::set<int> seen;
    for (int n = 0; n < s.nodes; ++n) {
      seen.insert(l.signal_meta(n));
      for (int c = 0; c < s.channels; ++c) {
        seen.insert(l.signal_dispatch(n, c));
        seen.insert(l.signal_combine(n, c));
        seen.insert(l.signal_dispatch_credit(n, c));
        seen.insert(l.signal_combine_credit(n, c));
      }
    }
    seen.insert(l.signal_done());
    EXPECT_EQ(static_cast<int>(seen.size()), 1 + s.nodes * (1 + 4 * s.channels));
    EXPECT_EQ(*seen.begin(), 0);
    EXPECT_EQ(*seen.rbegin(), l.num_signals() - 1);
    EXPECT_LE(l.signals_offset + 8 * l.num_signals(), l.meta_offset);
  }
}

TEST(InternodeLayout, DoneSignalStaysPutAcrossConfigs) {
  // The done signal counts ops for the Buffer's lifetime: ops with other num_sms (channels), capacity or
  // rows must find it at the same byte of the window.
  const auto a = internode::Layout::make(2, 8, 8, 256, 7680);
  const auto b = internode::Layout::make(2, 8, 24, 64, 15360);
  EXPECT_EQ(a.signals_offset + 8 * a.signal_done(), b.signals_offset + 8 * b.signal_done());
}

TEST(InternodeLayout, FlagsAreDistinctAndInRange) {
  for (const Shape& s : kShapes) {
    const Layout l = Layout::make(s.nodes, s.ranks_per_node, s.channels, s.capacity, 1024);
    std::set<int> seen;
    for (int n = 0; n < s.nodes; ++n) {
      seen.insert(l.flag_meta_ready(n));
      for (int c = 0; c < s.channels; ++c) {
        seen.insert(l.flag_rows_ready(n, c));
        for (int lr = 0; lr < l.num_ranks_per_node; ++lr) seen.insert(l.flag_rows_scanned(n, c, lr));
      }
    }
    seen.insert(l.flag_published());
    for (int c = 0; c < s.channels; ++c)
      for (int lr = 0; lr < s.ranks_per_node; ++lr) {
        seen.insert(l.flag_ring_tail(c, lr));
        seen.insert(l.flag_ring_head(c, lr));
      }
    EXPECT_EQ(static_cast<int>(seen.size()), l.num_flags());
    EXPECT_EQ(*seen.begin(), 0);
    EXPECT_EQ(*seen.rbegin(), l.num_flags() - 1);
    EXPECT_LE(l.flags_offset + 8 * l.num_flags(), l.published_offset);
    EXPECT_LE(l.published_offset + 4 * int64_t(l.num_ranks) * s.channels, l.rings_offset);
    EXPECT_EQ(l.rings_offset, l.nvl_fixed_bytes);
  }
}

TEST(InternodeLayout, MetaFieldsAreDistinctAndFitTheRecord) {
  const Layout l = Layout::make(2, 4, 3, 16, 1024);
  std::set<int64_t> seen = {0};  // [0] is the source's token count
  for (int c = 0; c < 3; ++c) seen.insert(l.meta_node_count(c));
  for (int lr = 0; lr < 4; ++lr) {
    for (int c = 0; c < 3; ++c) seen.insert(l.meta_rank_count(lr, c));
    for (int e = 0; e < kMaxLocalExperts; ++e) seen.insert(l.meta_expert_count(lr, e));
  }
  EXPECT_EQ(static_cast<int64_t>(seen.size()), l.meta_ints);
  EXPECT_EQ(*seen.rbegin(), l.meta_ints - 1);
  EXPECT_GE(l.meta_bytes(), 4 * l.meta_ints);
  EXPECT_EQ(l.meta_bytes() % 16, 0);
}

TEST(InternodeLayout, RegionsAreAlignedAndDisjoint) {
  for (const Shape& s : kShapes) {
    const int64_t stride = internode::hint_row_stride(7168 * 2);
    const Layout l = Layout::make(s.nodes, s.ranks_per_node, s.channels, s.capacity, stride);
    const int64_t rows_bytes = int64_t(s.nodes) * s.channels * s.capacity * stride;
    for (int64_t off : {l.signals_offset, l.meta_offset, l.meta_send_offset, l.rows_offset, l.send_rows_offset,
                        l.flags_offset, l.published_offset, l.rings_offset})
      EXPECT_EQ(off % 128, 0);
    EXPECT_LE(l.meta_offset + s.nodes * l.meta_bytes(), l.meta_send_offset);
    EXPECT_LE(l.meta_send_offset + s.nodes * l.meta_bytes(), l.rows_offset);
    EXPECT_LE(l.rows_offset + rows_bytes, l.send_rows_offset);
    EXPECT_LE(l.send_rows_offset + rows_bytes, l.rdma_bytes);
    // The last slot of the last node and channel is the last row of the area; stream positions wrap
    // around their ring.
    EXPECT_EQ(l.slot(s.nodes - 1, s.channels - 1, s.capacity - 1) + 1, int64_t(s.nodes) * s.channels * s.capacity);
    EXPECT_EQ(l.slot(s.nodes - 1, s.channels - 1, 5 * int64_t(s.capacity) + 3), l.slot(s.nodes - 1, s.channels - 1, 3));
    EXPECT_EQ(l.slot(0, 0, s.capacity), 0);
  }
}

TEST(InternodeLayout, RowLayoutHoldsEveryField) {
  // FP8 row of hidden 7168 with 56 scales and top-8: x, scales, ids, weights, source token, mask.
  const RowLayout fp8 = RowLayout::make(7168, 56, 8);
  EXPECT_EQ(fp8.scales_offset, 7168);
  EXPECT_EQ(fp8.topk_idx_offset, 7168 + 56 * 4);
  EXPECT_EQ(fp8.topk_weights_offset, fp8.topk_idx_offset + 8 * 4);
  EXPECT_EQ(fp8.src_token_offset, fp8.topk_weights_offset + 8 * 4);
  EXPECT_EQ(fp8.mask_offset, fp8.src_token_offset + 4);
  EXPECT_EQ(fp8.stride % 16, 0);
  EXPECT_GE(fp8.stride, fp8.mask_offset + 4);
  // No top-k, no scales (cached BF16): x and the two trailing ints.
  const RowLayout bf16 = RowLayout::make(4096 * 2, 0, 0);
  EXPECT_EQ(bf16.stride, align_up(4096 * 2 + 8, 16));
  // The hint's stride covers the largest dispatch and combine rows of the same hidden.
  const int64_t hint = internode::hint_row_stride(7168 * 2);
  EXPECT_GE(hint, RowLayout::make(7168 * 2, 56, kNumMaxTopk).stride);
  EXPECT_GE(hint, internode::combine_row_stride(7168, kNumMaxTopk));
}

}  // namespace
}  // namespace deep_ep
