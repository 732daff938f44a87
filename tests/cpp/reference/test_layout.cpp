// Tests of the reference dispatch layout: hand-computed counts, per-node counts above 8 ranks, input
// validation, and count identities over random top-k choices.
#include <gtest/gtest.h>

#include <random>
#include <string>
#include <vector>

#include "deep_ep/error.hpp"
#include "deep_ep/reference.hpp"

namespace ref = deep_ep::reference;

TEST(DispatchLayout, CountsHandComputedExample) {
  // 2 ranks, 4 experts: rank 0 owns experts 0-1, rank 1 owns 2-3.
  const std::vector<int64_t> topk_idx = {0,  3,    // token 0: both ranks
                                         1,  -1,   // token 1: rank 0
                                         -1, -1};  // token 2: nowhere
  ref::DispatchLayout layout = ref::get_dispatch_layout(topk_idx.data(), 3, 2, 2, 4);
  EXPECT_EQ(layout.num_tokens_per_rank, (std::vector<int32_t>{2, 1}));
  EXPECT_EQ(layout.num_tokens_per_expert, (std::vector<int32_t>{1, 1, 0, 1}));
  EXPECT_EQ(layout.is_token_in_rank, (std::vector<uint8_t>{1, 1, 1, 0, 0, 0}));
  EXPECT_TRUE(layout.num_tokens_per_rdma_rank.empty());
}

TEST(DispatchLayout, CountsTokenOncePerRankButEverySlotPerExpert) {
  const std::vector<int64_t> topk_idx = {0, 1,   // two experts of rank 0
                                         1, 1};  // the same expert twice
  ref::DispatchLayout layout = ref::get_dispatch_layout(topk_idx.data(), 2, 2, 2, 4);
  EXPECT_EQ(layout.num_tokens_per_rank, (std::vector<int32_t>{2, 0}));
  EXPECT_EQ(layout.num_tokens_per_expert, (std::vector<int32_t>{1, 3, 0, 0}));
  EXPECT_EQ(layout.is_token_in_rank, (std::vector<uint8_t>{1, 0, 1, 0}));
}

TEST(DispatchLayout, CountsTokensPerNodeAbove8Ranks) {
  // 16 ranks in 2 nodes of 8, 2 experts per rank.
  const std::vector<int64_t> topk_idx = {0,  17,   // rank 0 (node 0) and rank 8 (node 1)
                                         2,  4,    // ranks 1 and 2, both node 0
                                         -1, -1};  // nowhere
  ref::DispatchLayout layout = ref::get_dispatch_layout(topk_idx.data(), 3, 2, 16, 32);
  EXPECT_EQ(layout.num_tokens_per_rdma_rank, (std::vector<int32_t>{2, 1}));
  std::vector<int32_t> expected_per_rank(16, 0);
  expected_per_rank[0] = expected_per_rank[1] = expected_per_rank[2] = expected_per_rank[8] = 1;
  EXPECT_EQ(layout.num_tokens_per_rank, expected_per_rank);
}

TEST(DispatchLayout, LeavesPerNodeCountsEmptyUpTo8Ranks) {
  const std::vector<int64_t> topk_idx = {0, 15};
  ref::DispatchLayout layout = ref::get_dispatch_layout(topk_idx.data(), 1, 2, 8, 16);
  EXPECT_TRUE(layout.num_tokens_per_rdma_rank.empty());
  EXPECT_EQ(layout.num_tokens_per_rank, (std::vector<int32_t>{1, 0, 0, 0, 0, 0, 0, 1}));
}

TEST(DispatchLayout, HandlesZeroTokens) {
  ref::DispatchLayout layout = ref::get_dispatch_layout(nullptr, 0, 4, 16, 64);
  EXPECT_EQ(layout.num_tokens_per_rank, std::vector<int32_t>(16, 0));
  EXPECT_EQ(layout.num_tokens_per_rdma_rank, std::vector<int32_t>(2, 0));
  EXPECT_EQ(layout.num_tokens_per_expert, std::vector<int32_t>(64, 0));
  EXPECT_TRUE(layout.is_token_in_rank.empty());
}

TEST(DispatchLayout, RejectsExpertIdAtOrAboveNumExpertsNamingTheSlot) {
  const std::vector<int64_t> topk_idx = {0, 1, 4, 2};
  try {
    ref::get_dispatch_layout(topk_idx.data(), 2, 2, 2, 4);
    FAIL() << "expected ValueError";
  } catch (const deep_ep::ValueError& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find("topk_idx[1][0]"), std::string::npos) << message;
    EXPECT_NE(message.find("= 4"), std::string::npos) << message;
  }
}

TEST(DispatchLayout, RejectsExpertIdBelowMinusOne) {
  const std::vector<int64_t> topk_idx = {-2};
  EXPECT_THROW(ref::get_dispatch_layout(topk_idx.data(), 1, 1, 2, 4), deep_ep::ValueError);
}

TEST(DispatchLayout, RejectsExpertsNotDivisibleByRanks) {
  const std::vector<int64_t> topk_idx = {0};
  EXPECT_THROW(ref::get_dispatch_layout(topk_idx.data(), 1, 1, 4, 6), deep_ep::ValueError);
}

TEST(DispatchLayout, RejectsMoreThan8RanksNotMultipleOf8) {
  const std::vector<int64_t> topk_idx = {0};
  EXPECT_THROW(ref::get_dispatch_layout(topk_idx.data(), 1, 1, 12, 24), deep_ep::ValueError);
}

TEST(DispatchLayout, CountsAgreeWithTopkOverRandomInputs) {
  struct Case {
    int num_tokens, num_topk, num_ranks, num_experts;
  };
  const Case cases[] = {{0, 4, 4, 16}, {1, 1, 2, 2}, {37, 4, 4, 32}, {64, 8, 16, 64}, {100, 6, 24, 48}};
  for (uint32_t seed : {1u, 2u, 3u}) {
    for (const Case& c : cases) {
      std::mt19937 rng(seed);
      std::uniform_int_distribution<int64_t> expert(-1, c.num_experts - 1);
      std::vector<int64_t> topk_idx(static_cast<size_t>(c.num_tokens) * c.num_topk);
      for (int64_t& e : topk_idx) e = expert(rng);
      ref::DispatchLayout layout =
          ref::get_dispatch_layout(topk_idx.data(), c.num_tokens, c.num_topk, c.num_ranks, c.num_experts);

      const int num_local_experts = c.num_experts / c.num_ranks;
      int32_t num_valid_slots = 0;
      for (int64_t e : topk_idx) num_valid_slots += e >= 0 ? 1 : 0;
      int32_t expert_total = 0;
      for (int32_t n : layout.num_tokens_per_expert) expert_total += n;
      EXPECT_EQ(expert_total, num_valid_slots);

      std::vector<int32_t> per_rank(c.num_ranks, 0);
      std::vector<int32_t> per_node(c.num_ranks > 8 ? c.num_ranks / 8 : 0, 0);
      for (int t = 0; t < c.num_tokens; ++t) {
        std::vector<uint8_t> expected_row(c.num_ranks, 0);
        for (int k = 0; k < c.num_topk; ++k) {
          int64_t e = topk_idx[static_cast<size_t>(t) * c.num_topk + k];
          if (e >= 0) expected_row[e / num_local_experts] = 1;
        }
        std::vector<uint8_t> node_row(per_node.size(), 0);
        for (int j = 0; j < c.num_ranks; ++j) {
          ASSERT_EQ(layout.is_token_in_rank[static_cast<size_t>(t) * c.num_ranks + j], expected_row[j]);
          per_rank[j] += expected_row[j];
          if (!per_node.empty() && expected_row[j]) node_row[j / 8] = 1;
        }
        for (size_t n = 0; n < per_node.size(); ++n) per_node[n] += node_row[n];
      }
      EXPECT_EQ(layout.num_tokens_per_rank, per_rank) << "seed " << seed;
      EXPECT_EQ(layout.num_tokens_per_rdma_rank, per_node) << "seed " << seed;
    }
  }
}
