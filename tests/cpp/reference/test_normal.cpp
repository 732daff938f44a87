// Tests of the reference normal-mode dispatch and combine: hand-computed routing, ordering, top-k
// translation, counts, padding, bias and rounding, plus round-trip identities over random inputs.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "deep_ep/error.hpp"
#include "deep_ep/reference.hpp"

namespace ref = deep_ep::reference;

namespace {

std::vector<uint16_t> bf16(const std::vector<float>& values) {
  std::vector<uint16_t> bits;
  for (float v : values) bits.push_back(ref::float_to_bf16(v));
  return bits;
}

std::vector<float> floats(const std::vector<uint16_t>& bits) {
  std::vector<float> values;
  for (uint16_t b : bits) values.push_back(ref::bf16_to_float(b));
  return values;
}

std::vector<uint8_t> bytes_of(const std::vector<uint16_t>& bits) {
  std::vector<uint8_t> bytes(bits.size() * 2);
  std::memcpy(bytes.data(), bits.data(), bytes.size());
  return bytes;
}

std::vector<uint16_t> bf16_of(const std::vector<uint8_t>& bytes) {
  std::vector<uint16_t> bits(bytes.size() / 2);
  std::memcpy(bits.data(), bytes.data(), bits.size() * 2);
  return bits;
}

// Two ranks, one byte pair per row, no top-k: rank 0 sends tokens 0 and 2 to itself and 0 and 1 to
// rank 1; rank 1 sends both tokens to rank 0 and token 0 to itself.
std::vector<ref::NormalDispatchInput> routing_only_inputs() {
  std::vector<ref::NormalDispatchInput> inputs(2);
  inputs[0].num_tokens = 3;
  inputs[0].x = {10, 11, 20, 21, 30, 31};
  inputs[0].is_token_in_rank = {1, 1, 0, 1, 1, 0};
  inputs[1].num_tokens = 2;
  inputs[1].x = {40, 41, 50, 51};
  inputs[1].is_token_in_rank = {1, 1, 1, 0};
  return inputs;
}

ref::NormalDispatchArgs routing_only_args() {
  ref::NormalDispatchArgs args;
  args.num_ranks = 2;
  args.row_bytes = 2;
  return args;
}

// Two ranks, four experts (rank 0: 0-1, rank 1: 2-3), top-2, rows of 2 bytes.
std::vector<ref::NormalDispatchInput> topk_inputs() {
  std::vector<ref::NormalDispatchInput> inputs(2);
  inputs[0].num_tokens = 2;
  inputs[0].x = {1, 2, 3, 4};
  inputs[0].topk_idx = {0, 3, 2, -1};
  inputs[0].topk_weights = {0.5f, 0.25f, 0.75f, 0.125f};
  inputs[0].is_token_in_rank = {1, 1, 0, 1};
  inputs[1].num_tokens = 1;
  inputs[1].x = {5, 6};
  inputs[1].topk_idx = {1, 1};
  inputs[1].topk_weights = {0.375f, 0.625f};
  inputs[1].is_token_in_rank = {1, 0};
  return inputs;
}

ref::NormalDispatchArgs topk_args() {
  ref::NormalDispatchArgs args;
  args.num_ranks = 2;
  args.num_experts = 4;
  args.row_bytes = 2;
  args.num_topk = 2;
  return args;
}

}  // namespace

// ---- dispatch, hand-computed -----------------------------------------------------------------

TEST(NormalDispatch, OrdersRowsBySourceRankThenTokenIndex) {
  auto outputs = ref::normal_dispatch(routing_only_inputs(), routing_only_args());
  ASSERT_EQ(outputs.size(), 2u);
  EXPECT_EQ(outputs[0].num_recv_tokens, 4);
  EXPECT_EQ(outputs[0].recv_x, (std::vector<uint8_t>{10, 11, 30, 31, 40, 41, 50, 51}));
  EXPECT_EQ(outputs[0].recv_src_idx, (std::vector<int32_t>{0, 2, 0, 1}));
  EXPECT_EQ(outputs[1].num_recv_tokens, 3);
  EXPECT_EQ(outputs[1].recv_x, (std::vector<uint8_t>{10, 11, 20, 21, 40, 41}));
  EXPECT_EQ(outputs[1].recv_src_idx, (std::vector<int32_t>{0, 1, 0}));
}

TEST(NormalDispatch, RankPrefixMatrixIsInclusivePrefixOverSendersOnEveryRank) {
  auto outputs = ref::normal_dispatch(routing_only_inputs(), routing_only_args());
  // Sent to rank 0 / rank 1: by rank 0: 2 / 2, by rank 1: 2 / 1.
  const std::vector<int32_t> expected = {2, 2, 4, 3};
  EXPECT_EQ(outputs[0].rank_prefix_matrix, expected);
  EXPECT_EQ(outputs[1].rank_prefix_matrix, expected);
}

TEST(NormalDispatch, WithoutTopkLeavesTopkOutputsEmpty) {
  auto outputs = ref::normal_dispatch(routing_only_inputs(), routing_only_args());
  for (const auto& out : outputs) {
    EXPECT_TRUE(out.recv_topk_idx.empty());
    EXPECT_TRUE(out.recv_topk_weights.empty());
    EXPECT_TRUE(out.num_recv_tokens_per_expert.empty());
    EXPECT_EQ(out.num_rows, out.num_recv_tokens);
  }
}

TEST(NormalDispatch, TranslatesTopkToLocalExpertIdsAndKeepsOnlyLocalWeights) {
  auto outputs = ref::normal_dispatch(topk_inputs(), topk_args());
  // Rank 0 receives rank 0's token 0 and rank 1's token 0.
  EXPECT_EQ(outputs[0].recv_x, (std::vector<uint8_t>{1, 2, 5, 6}));
  EXPECT_EQ(outputs[0].recv_topk_idx, (std::vector<int64_t>{0, -1, 1, 1}));
  EXPECT_EQ(outputs[0].recv_topk_weights, (std::vector<float>{0.5f, 0.0f, 0.375f, 0.625f}));
  // Rank 1 receives rank 0's tokens 0 and 1.
  EXPECT_EQ(outputs[1].recv_x, (std::vector<uint8_t>{1, 2, 3, 4}));
  EXPECT_EQ(outputs[1].recv_topk_idx, (std::vector<int64_t>{-1, 1, 0, -1}));
  EXPECT_EQ(outputs[1].recv_topk_weights, (std::vector<float>{0.0f, 0.25f, 0.75f, 0.0f}));
}

TEST(NormalDispatch, CountsSlotsPerLocalExpert) {
  auto outputs = ref::normal_dispatch(topk_inputs(), topk_args());
  EXPECT_EQ(outputs[0].num_recv_tokens_per_expert, (std::vector<int32_t>{1, 2}));  // expert 1 named twice
  EXPECT_EQ(outputs[1].num_recv_tokens_per_expert, (std::vector<int32_t>{1, 1}));
}

TEST(NormalDispatch, RoundsExpertCountsUpToAlignmentAndKeepsZero) {
  std::vector<ref::NormalDispatchInput> inputs(1);
  inputs[0].num_tokens = 3;
  inputs[0].x = {1, 2, 3};
  inputs[0].topk_idx = {0, 0, 0, 2, -1, -1};
  inputs[0].topk_weights = {1, 1, 1, 1, 1, 1};
  inputs[0].is_token_in_rank = {1, 1, 0};
  ref::NormalDispatchArgs args;
  args.num_ranks = 1;
  args.num_experts = 3;
  args.row_bytes = 1;
  args.num_topk = 2;
  EXPECT_EQ(ref::normal_dispatch(inputs, args)[0].num_recv_tokens_per_expert, (std::vector<int32_t>{3, 0, 1}));
  args.expert_alignment = 4;
  EXPECT_EQ(ref::normal_dispatch(inputs, args)[0].num_recv_tokens_per_expert, (std::vector<int32_t>{4, 0, 4}));
}

TEST(NormalDispatch, PadsOutputsToNumWorstTokens) {
  ref::NormalDispatchArgs args = topk_args();
  args.num_worst_tokens = 4;
  auto outputs = ref::normal_dispatch(topk_inputs(), args);
  EXPECT_EQ(outputs[0].num_recv_tokens, 2);
  EXPECT_EQ(outputs[0].num_rows, 4);
  EXPECT_EQ(outputs[0].recv_x, (std::vector<uint8_t>{1, 2, 5, 6, 0, 0, 0, 0}));
  EXPECT_EQ(outputs[0].recv_topk_idx, (std::vector<int64_t>{0, -1, 1, 1, -1, -1, -1, -1}));
  EXPECT_EQ(outputs[0].recv_topk_weights, (std::vector<float>{0.5f, 0, 0.375f, 0.625f, 0, 0, 0, 0}));
  EXPECT_EQ(outputs[0].recv_src_idx, (std::vector<int32_t>{0, 0}));
  EXPECT_EQ(outputs[0].num_recv_tokens_per_expert, (std::vector<int32_t>{1, 2}));
}

TEST(NormalDispatch, RejectsMoreRowsThanNumWorstTokens) {
  ref::NormalDispatchArgs args = topk_args();
  args.num_worst_tokens = 1;
  EXPECT_THROW(ref::normal_dispatch(topk_inputs(), args), deep_ep::ValueError);
}

TEST(NormalDispatch, CarriesFp8ScalesWithTheirRows) {
  std::vector<ref::NormalDispatchInput> inputs(1);
  inputs[0].num_tokens = 3;
  inputs[0].x = {1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3};
  inputs[0].x_scales = {0.5f, 1.5f, 2.5f, 3.5f, 4.5f, 5.5f};
  inputs[0].is_token_in_rank = {0, 1, 1};
  ref::NormalDispatchArgs args;
  args.num_ranks = 1;
  args.row_bytes = 4;
  args.num_scales = 2;
  auto outputs = ref::normal_dispatch(inputs, args);
  EXPECT_EQ(outputs[0].recv_x, (std::vector<uint8_t>{2, 2, 2, 2, 3, 3, 3, 3}));
  EXPECT_EQ(outputs[0].recv_x_scales, (std::vector<float>{2.5f, 3.5f, 4.5f, 5.5f}));
}

TEST(NormalDispatch, FollowsIsTokenInRankEvenWithoutLocalExperts) {
  // Rank 0 sends its token to rank 1 although none of its experts lives there.
  auto inputs = topk_inputs();
  inputs[1].is_token_in_rank = {1, 1};
  auto outputs = ref::normal_dispatch(inputs, topk_args());
  EXPECT_EQ(outputs[1].num_recv_tokens, 3);
  EXPECT_EQ(outputs[1].recv_topk_idx, (std::vector<int64_t>{-1, 1, 0, -1, -1, -1}));
  EXPECT_EQ(outputs[1].num_recv_tokens_per_expert, (std::vector<int32_t>{1, 1}));
}

TEST(NormalDispatch, RejectsExpertIdOutOfRange) {
  auto inputs = topk_inputs();
  inputs[1].topk_idx = {1, 4};
  EXPECT_THROW(ref::normal_dispatch(inputs, topk_args()), deep_ep::ValueError);
}

TEST(NormalDispatch, RejectsMismatchedSizes) {
  auto inputs = topk_inputs();
  inputs[0].is_token_in_rank.pop_back();
  EXPECT_THROW(ref::normal_dispatch(inputs, topk_args()), deep_ep::ValueError);
  inputs = topk_inputs();
  inputs[1].topk_weights.clear();  // top-k ids without weights
  EXPECT_THROW(ref::normal_dispatch(inputs, topk_args()), deep_ep::ValueError);
  ref::NormalDispatchArgs args = topk_args();
  args.num_ranks = 3;  // only two inputs
  EXPECT_THROW(ref::normal_dispatch(topk_inputs(), args), deep_ep::ValueError);
}

// ---- combine, hand-computed ------------------------------------------------------------------

TEST(NormalCombine, SumsRowsOverReceivingRanksAndAddsBias) {
  auto dispatch_inputs = routing_only_inputs();
  auto dispatch_outputs = ref::normal_dispatch(dispatch_inputs, routing_only_args());
  std::vector<ref::NormalCombineInput> inputs(2);
  // Rank 0's rows: (r0,t0) (r0,t2) (r1,t0) (r1,t1); rank 1's rows: (r0,t0) (r0,t1) (r1,t0).
  inputs[0].x = bf16({1, 2, 3, 4, 5, 6, 7, 8});
  inputs[1].x = bf16({10, 20, 30, 40, 50, 60});
  inputs[0].bias_0 = bf16({0.5f, 0.5f, 0.5f, 0.5f, 0.5f, 0.5f});
  inputs[1].bias_1 = bf16({1, 1, 1, 1});
  auto outputs = ref::normal_combine(dispatch_inputs, dispatch_outputs, inputs, 2, 0);
  EXPECT_EQ(floats(outputs[0].combined_x), (std::vector<float>{11.5f, 22.5f, 30.5f, 40.5f, 3.5f, 4.5f}));
  EXPECT_EQ(floats(outputs[1].combined_x), (std::vector<float>{56, 67, 8, 9}));
  EXPECT_TRUE(outputs[0].combined_topk_weights.empty());
}

TEST(NormalCombine, TokenSentNowhereGetsOnlyTheBias) {
  std::vector<ref::NormalDispatchInput> dispatch_inputs(1);
  dispatch_inputs[0].num_tokens = 2;
  dispatch_inputs[0].x = bytes_of(bf16({7, 8, 9, 10}));
  dispatch_inputs[0].is_token_in_rank = {1, 0};
  ref::NormalDispatchArgs args;
  args.num_ranks = 1;
  args.row_bytes = 4;
  auto dispatch_outputs = ref::normal_dispatch(dispatch_inputs, args);
  std::vector<ref::NormalCombineInput> inputs(1);
  inputs[0].x = bf16({2, 3});
  auto plain = ref::normal_combine(dispatch_inputs, dispatch_outputs, inputs, 2, 0);
  EXPECT_EQ(floats(plain[0].combined_x), (std::vector<float>{2, 3, 0, 0}));
  inputs[0].bias_0 = bf16({0.25f, 0.25f, 0.5f, 0.75f});
  auto biased = ref::normal_combine(dispatch_inputs, dispatch_outputs, inputs, 2, 0);
  EXPECT_EQ(floats(biased[0].combined_x), (std::vector<float>{2.25f, 3.25f, 0.5f, 0.75f}));
}

TEST(NormalCombine, RoundsToBf16OnceAfterBothBiases) {
  std::vector<ref::NormalDispatchInput> dispatch_inputs(1);
  dispatch_inputs[0].num_tokens = 1;
  dispatch_inputs[0].x = {0, 0};
  dispatch_inputs[0].is_token_in_rank = {1};
  ref::NormalDispatchArgs args;
  args.num_ranks = 1;
  args.row_bytes = 2;
  auto dispatch_outputs = ref::normal_dispatch(dispatch_inputs, args);
  std::vector<ref::NormalCombineInput> inputs(1);
  const float half_ulp_of_one = std::ldexp(1.0f, -8);
  inputs[0].x = bf16({1.0f});
  inputs[0].bias_0 = bf16({half_ulp_of_one});
  inputs[0].bias_1 = bf16({half_ulp_of_one});
  // Rounding after each addition would tie back to 1.0 twice; one final rounding gives 1 + 2^-7.
  auto outputs = ref::normal_combine(dispatch_inputs, dispatch_outputs, inputs, 1, 0);
  EXPECT_EQ(outputs[0].combined_x, (std::vector<uint16_t>{0x3F81}));
}

TEST(NormalCombine, RestoresTopkWeightsFromRecvTopkWeights) {
  auto dispatch_inputs = topk_inputs();
  auto dispatch_outputs = ref::normal_dispatch(dispatch_inputs, topk_args());
  std::vector<ref::NormalCombineInput> inputs(2);
  for (int j = 0; j < 2; ++j) {
    inputs[j].x = bf16_of(dispatch_outputs[j].recv_x);  // one bf16 channel per row
    inputs[j].topk_weights = dispatch_outputs[j].recv_topk_weights;
  }
  auto outputs = ref::normal_combine(dispatch_inputs, dispatch_outputs, inputs, 1, 2);
  // Token 1's second slot has no expert (-1): its weight goes nowhere and comes back as 0.
  EXPECT_EQ(outputs[0].combined_topk_weights, (std::vector<float>{0.5f, 0.25f, 0.75f, 0.0f}));
  EXPECT_EQ(outputs[1].combined_topk_weights, (std::vector<float>{0.375f, 0.625f}));
}

TEST(NormalCombine, IgnoresPaddingRowsOfWorstTokenDispatch) {
  auto dispatch_inputs = topk_inputs();
  ref::NormalDispatchArgs args = topk_args();
  args.num_worst_tokens = 5;
  auto dispatch_outputs = ref::normal_dispatch(dispatch_inputs, args);
  std::vector<ref::NormalCombineInput> inputs(2);
  // Rank 0's real rows: (r0,t0) (r1,t0); rank 1's: (r0,t0) (r0,t1); the rest is padding filled with 100.
  inputs[0].x = bf16({1, 2, 100, 100, 100});
  inputs[1].x = bf16({3, 4, 100, 100, 100});
  auto outputs = ref::normal_combine(dispatch_inputs, dispatch_outputs, inputs, 1, 0);
  EXPECT_EQ(floats(outputs[0].combined_x), (std::vector<float>{4, 4}));
  EXPECT_EQ(floats(outputs[1].combined_x), (std::vector<float>{2}));
}

TEST(NormalCombine, RejectsHandleWithoutRowForASentToken) {
  auto dispatch_inputs = routing_only_inputs();
  auto dispatch_outputs = ref::normal_dispatch(dispatch_inputs, routing_only_args());
  dispatch_outputs[1].recv_src_idx[0] = 1;  // rank 1 now holds rank 0's token 1 twice and token 0 never
  std::vector<ref::NormalCombineInput> inputs(2);
  inputs[0].x = bf16({1, 2, 3, 4, 5, 6, 7, 8});
  inputs[1].x = bf16({1, 2, 3, 4, 5, 6});
  EXPECT_THROW(ref::normal_combine(dispatch_inputs, dispatch_outputs, inputs, 2, 0), deep_ep::ValueError);
}

TEST(NormalCombine, RejectsWrongRowCount) {
  auto dispatch_inputs = routing_only_inputs();
  auto dispatch_outputs = ref::normal_dispatch(dispatch_inputs, routing_only_args());
  std::vector<ref::NormalCombineInput> inputs(2);
  inputs[0].x = bf16({1, 2, 3, 4, 5, 6});  // 3 rows where rank 0 received 4
  inputs[1].x = bf16({1, 2, 3, 4, 5, 6});
  EXPECT_THROW(ref::normal_combine(dispatch_inputs, dispatch_outputs, inputs, 2, 0), deep_ep::ValueError);
}

// ---- properties over random inputs -----------------------------------------------------------

namespace {

enum class Routing { kRandom, kAllMinusOne, kAllToOneRank, kZeroTokens, kOneToken };

struct Scenario {
  int num_ranks, num_local_experts, num_topk, hidden;
  std::vector<ref::NormalDispatchInput> inputs;
  std::vector<ref::DispatchLayout> layouts;
  ref::NormalDispatchArgs args;
};

// Small-integer bf16 payloads, so every sum of up to 8 copies is exact in float32 and in bf16.
Scenario make_scenario(uint32_t seed, Routing routing, int num_ranks) {
  std::mt19937 rng(seed);
  Scenario s;
  s.num_ranks = num_ranks;
  s.num_local_experts = 1 + static_cast<int>(rng() % 3);
  s.num_topk = 1 + static_cast<int>(rng() % 4);
  s.hidden = 8;
  const int num_experts = num_ranks * s.num_local_experts;
  const int target_rank = static_cast<int>(rng() % num_ranks);
  std::uniform_int_distribution<int64_t> any_expert(-1, num_experts - 1);
  std::uniform_int_distribution<int64_t> target_expert(target_rank * s.num_local_experts,
                                                       (target_rank + 1) * s.num_local_experts - 1);
  std::uniform_int_distribution<int> small_int(-8, 8);
  for (int r = 0; r < num_ranks; ++r) {
    ref::NormalDispatchInput in;
    in.num_tokens = routing == Routing::kZeroTokens ? 0
                    : routing == Routing::kOneToken ? 1
                                                    : static_cast<int>(rng() % 24);
    const size_t num_slots = static_cast<size_t>(in.num_tokens) * s.num_topk;
    for (size_t slot = 0; slot < num_slots; ++slot) {
      int64_t expert = routing == Routing::kAllMinusOne    ? -1
                       : routing == Routing::kAllToOneRank ? target_expert(rng)
                                                           : any_expert(rng);
      in.topk_idx.push_back(expert);
      in.topk_weights.push_back(static_cast<float>(1 + rng() % 8) / 8.0f);
    }
    std::vector<uint16_t> x;
    for (int c = 0; c < in.num_tokens * s.hidden; ++c)
      x.push_back(ref::float_to_bf16(static_cast<float>(small_int(rng))));
    in.x = bytes_of(x);
    s.layouts.push_back(
        ref::get_dispatch_layout(in.topk_idx.data(), in.num_tokens, s.num_topk, num_ranks, num_experts));
    in.is_token_in_rank = s.layouts.back().is_token_in_rank;
    s.inputs.push_back(std::move(in));
  }
  s.args.num_ranks = num_ranks;
  s.args.num_experts = num_experts;
  s.args.row_bytes = s.hidden * 2;
  s.args.num_topk = s.num_topk;
  return s;
}

std::vector<Scenario> all_scenarios() {
  std::vector<Scenario> scenarios;
  uint32_t seed = 100;
  for (int num_ranks : {1, 2, 3, 4, 8}) {
    for (Routing routing :
         {Routing::kRandom, Routing::kAllMinusOne, Routing::kAllToOneRank, Routing::kZeroTokens, Routing::kOneToken}) {
      for (int repeat = 0; repeat < 3; ++repeat) scenarios.push_back(make_scenario(seed++, routing, num_ranks));
    }
  }
  return scenarios;
}

int count_true(const uint8_t* row, int n) {
  int count = 0;
  for (int i = 0; i < n; ++i) count += row[i] ? 1 : 0;
  return count;
}

}  // namespace

TEST(NormalRoundTrip, CombineOfDispatchIsTokenTimesRanksReached) {
  for (const Scenario& s : all_scenarios()) {
    auto dispatch_outputs = ref::normal_dispatch(s.inputs, s.args);
    std::vector<ref::NormalCombineInput> inputs(s.num_ranks);
    for (int j = 0; j < s.num_ranks; ++j) {
      inputs[j].x = bf16_of(dispatch_outputs[j].recv_x);
      inputs[j].topk_weights = dispatch_outputs[j].recv_topk_weights;
    }
    auto outputs = ref::normal_combine(s.inputs, dispatch_outputs, inputs, s.hidden, s.num_topk);
    for (int r = 0; r < s.num_ranks; ++r) {
      const std::vector<uint16_t> x = bf16_of(s.inputs[r].x);
      for (int t = 0; t < s.inputs[r].num_tokens; ++t) {
        const int reached = count_true(s.inputs[r].is_token_in_rank.data() + t * s.num_ranks, s.num_ranks);
        for (int c = 0; c < s.hidden; ++c) {
          ASSERT_EQ(ref::bf16_to_float(outputs[r].combined_x[t * s.hidden + c]),
                    ref::bf16_to_float(x[t * s.hidden + c]) * reached)
              << "rank " << r << " token " << t;
        }
      }
      // Every (token, k) weight survives on exactly one rank, or on none when its id is -1.
      for (size_t slot = 0; slot < s.inputs[r].topk_idx.size(); ++slot) {
        const float expected = s.inputs[r].topk_idx[slot] >= 0 ? s.inputs[r].topk_weights[slot] : 0.0f;
        ASSERT_EQ(outputs[r].combined_topk_weights[slot], expected);
      }
    }
  }
}

TEST(NormalRoundTrip, ReceivedRowsAreCopiesOfTheirSourceRows) {
  for (const Scenario& s : all_scenarios()) {
    auto outputs = ref::normal_dispatch(s.inputs, s.args);
    for (int j = 0; j < s.num_ranks; ++j) {
      const auto& out = outputs[j];
      const auto& prefix = out.rank_prefix_matrix;
      for (int i = 0; i < s.num_ranks; ++i) {
        const int begin = i > 0 ? prefix[(i - 1) * s.num_ranks + j] : 0;
        const int end = prefix[i * s.num_ranks + j];
        for (int row = begin; row < end; ++row) {
          const int t = out.recv_src_idx[row];
          if (row > begin) {
            ASSERT_LT(out.recv_src_idx[row - 1], t);  // increasing token index per source
          }
          ASSERT_TRUE(s.inputs[i].is_token_in_rank[t * s.num_ranks + j]);
          ASSERT_EQ(0, std::memcmp(out.recv_x.data() + row * s.args.row_bytes,
                                   s.inputs[i].x.data() + t * s.args.row_bytes, s.args.row_bytes));
        }
      }
    }
  }
}

TEST(NormalRoundTrip, RankPrefixMatrixIsMonotoneAndEndsAtReceivedRows) {
  for (const Scenario& s : all_scenarios()) {
    auto outputs = ref::normal_dispatch(s.inputs, s.args);
    for (int j = 0; j < s.num_ranks; ++j) {
      const auto& prefix = outputs[j].rank_prefix_matrix;
      EXPECT_EQ(prefix, outputs[0].rank_prefix_matrix);
      int previous = 0;
      for (int i = 0; i < s.num_ranks; ++i) {
        ASSERT_GE(prefix[i * s.num_ranks + j], previous);
        previous = prefix[i * s.num_ranks + j];
      }
      EXPECT_EQ(previous, outputs[j].num_recv_tokens);
    }
  }
}

TEST(NormalRoundTrip, ReceivedCountsMatchTheSendersLayouts) {
  for (const Scenario& s : all_scenarios()) {
    auto outputs = ref::normal_dispatch(s.inputs, s.args);
    for (int j = 0; j < s.num_ranks; ++j) {
      int32_t sent_to_j = 0;
      for (const auto& layout : s.layouts) sent_to_j += layout.num_tokens_per_rank[j];
      EXPECT_EQ(outputs[j].num_recv_tokens, sent_to_j);
      for (int l = 0; l < s.num_local_experts; ++l) {
        int32_t sent_to_expert = 0;
        for (const auto& layout : s.layouts)
          sent_to_expert += layout.num_tokens_per_expert[j * s.num_local_experts + l];
        EXPECT_EQ(outputs[j].num_recv_tokens_per_expert[l], sent_to_expert);
      }
    }
  }
}

TEST(NormalRoundTrip, AlignedExpertCountsAreSmallestMultiplesAtOrAboveCounts) {
  for (const Scenario& base : all_scenarios()) {
    ref::NormalDispatchArgs args = base.args;
    const auto exact = ref::normal_dispatch(base.inputs, args);
    for (int alignment : {2, 3, 128}) {
      args.expert_alignment = alignment;
      const auto aligned = ref::normal_dispatch(base.inputs, args);
      for (int j = 0; j < base.num_ranks; ++j) {
        for (int l = 0; l < base.num_local_experts; ++l) {
          const int32_t count = exact[j].num_recv_tokens_per_expert[l];
          const int32_t rounded = aligned[j].num_recv_tokens_per_expert[l];
          ASSERT_EQ(rounded % alignment, 0);
          ASSERT_GE(rounded, count);
          ASSERT_LT(rounded, count + alignment);
        }
      }
    }
  }
}

TEST(NormalRoundTrip, WorstTokenPaddingKeepsRealRowsUnchanged) {
  for (const Scenario& base : all_scenarios()) {
    ref::NormalDispatchArgs args = base.args;
    const auto exact = ref::normal_dispatch(base.inputs, args);
    int max_rows = 0;
    for (const auto& out : exact) max_rows = std::max(max_rows, out.num_recv_tokens);
    args.num_worst_tokens = max_rows + 3;
    const auto padded = ref::normal_dispatch(base.inputs, args);
    for (int j = 0; j < base.num_ranks; ++j) {
      const auto& e = exact[j];
      const auto& p = padded[j];
      ASSERT_EQ(p.num_rows, max_rows + 3);
      ASSERT_EQ(p.num_recv_tokens, e.num_recv_tokens);
      ASSERT_EQ(p.recv_src_idx, e.recv_src_idx);
      ASSERT_TRUE(std::equal(e.recv_x.begin(), e.recv_x.end(), p.recv_x.begin()));
      ASSERT_TRUE(std::equal(e.recv_topk_idx.begin(), e.recv_topk_idx.end(), p.recv_topk_idx.begin()));
      for (size_t i = e.recv_topk_idx.size(); i < p.recv_topk_idx.size(); ++i) ASSERT_EQ(p.recv_topk_idx[i], -1);
      for (size_t i = e.recv_x.size(); i < p.recv_x.size(); ++i) ASSERT_EQ(p.recv_x[i], 0);
    }
  }
}

// ---- combine, hierarchical (internode) summation order -----------------------------------------

namespace {

// Four ranks in two nodes of two; only rank 0 has tokens, one bf16 channel per row. Token 0 goes to
// ranks 1 and 2 (one rank per node), token 1 to ranks 0, 1 (node 0) and 2 (node 1).
struct TwoNodeCase {
  std::vector<ref::NormalDispatchInput> dispatch_inputs;
  std::vector<ref::NormalDispatchOutput> dispatch_outputs;
  std::vector<ref::NormalCombineInput> inputs;
};

TwoNodeCase two_node_case() {
  TwoNodeCase c;
  c.dispatch_inputs.resize(4);
  c.dispatch_inputs[0].num_tokens = 2;
  c.dispatch_inputs[0].x = {0, 0, 0, 0};
  c.dispatch_inputs[0].is_token_in_rank = {0, 1, 1, 0, 1, 1, 1, 0};
  ref::NormalDispatchArgs args;
  args.num_ranks = 4;
  args.row_bytes = 2;
  c.dispatch_outputs = ref::normal_dispatch(c.dispatch_inputs, args);
  const float quarter_ulp_of_one = std::ldexp(1.0f, -8);  // half a bf16 ulp of 1.0
  // Rank 0 holds (t1); ranks 1 and 2 hold (t0) (t1); rank 3 holds nothing.
  c.inputs.resize(4);
  c.inputs[0].x = bf16({1.0f});
  c.inputs[1].x = bf16({3.0f, quarter_ulp_of_one});
  c.inputs[2].x = bf16({5.0f, quarter_ulp_of_one});
  c.inputs[0].topk_weights = {0.25f};
  c.inputs[1].topk_weights = {0.5f, 0.125f};
  c.inputs[2].topk_weights = {0.25f, 0.5f};
  c.inputs[0].bias_0 = bf16({0.5f, 0.0f});
  return c;
}

}  // namespace

TEST(NormalCombineHierarchical, SumsInsideEachNodeRoundsThenSumsAcrossNodes) {
  TwoNodeCase c = two_node_case();
  auto outputs = ref::normal_combine(c.dispatch_inputs, c.dispatch_outputs, c.inputs, 1, 1, 2);
  // Token 0: one rank per node, 3 + 5 + 0.5. Token 1: node 0 gives 1 + 2^-8, which ties to 1.0 in bf16;
  // node 1 gives 2^-8; 1 + 2^-8 ties to 1.0 again.
  EXPECT_EQ(outputs[0].combined_x, (std::vector<uint16_t>{ref::float_to_bf16(8.5f), 0x3F80}));
  EXPECT_EQ(outputs[0].combined_topk_weights, (std::vector<float>{0.75f, 0.875f}));
  for (int r = 1; r < 4; ++r) EXPECT_TRUE(outputs[r].combined_x.empty());
  // Flat order (0, or a node holding every rank): 1 + 2^-8 + 2^-8 = 1 + 2^-7, exact in bf16.
  for (int flat : {0, 4, 8}) {
    auto flat_outputs = ref::normal_combine(c.dispatch_inputs, c.dispatch_outputs, c.inputs, 1, 1, flat);
    EXPECT_EQ(flat_outputs[0].combined_x, (std::vector<uint16_t>{ref::float_to_bf16(8.5f), 0x3F81}));
    EXPECT_EQ(flat_outputs[0].combined_topk_weights, (std::vector<float>{0.75f, 0.875f}));
  }
}

TEST(NormalCombineHierarchical, RejectsRankCountNotAMultipleOfNodeSize) {
  TwoNodeCase c = two_node_case();
  EXPECT_THROW(ref::normal_combine(c.dispatch_inputs, c.dispatch_outputs, c.inputs, 1, 1, 3), deep_ep::ValueError);
  EXPECT_THROW(ref::normal_combine(c.dispatch_inputs, c.dispatch_outputs, c.inputs, 1, 1, -1), deep_ep::ValueError);
}

TEST(NormalCombineHierarchical, MatchesAnExplicitTwoLevelSumOnRandomInputs) {
  constexpr int kRanks = 4, kPerNode = 2, kHidden = 64;
  int differs_from_flat = 0;
  for (uint32_t seed = 900; seed < 905; ++seed) {
    const Scenario s = make_scenario(seed, Routing::kRandom, kRanks);
    const int K = s.num_topk;
    auto dispatch_outputs = ref::normal_dispatch(s.inputs, s.args);
    // Values of widely varying magnitude, so the per-node bf16 rounding matters.
    std::mt19937 rng(seed);
    std::uniform_real_distribution<float> mantissa(-1.0f, 1.0f);
    std::uniform_int_distribution<int> exponent(-6, 6);
    auto random_bf16 = [&](size_t n) {
      std::vector<float> values(n);
      for (float& v : values) v = std::ldexp(mantissa(rng), exponent(rng));
      return bf16(values);
    };
    std::vector<ref::NormalCombineInput> inputs(kRanks);
    for (int j = 0; j < kRanks; ++j) {
      const size_t rows = static_cast<size_t>(dispatch_outputs[j].num_recv_tokens);
      inputs[j].x = random_bf16(rows * kHidden);
      for (size_t i = 0; i < rows * K; ++i) inputs[j].topk_weights.push_back(mantissa(rng));
      if (j % 2 == 0) inputs[j].bias_0 = random_bf16(static_cast<size_t>(s.inputs[j].num_tokens) * kHidden);
      if (j < 2) inputs[j].bias_1 = random_bf16(static_cast<size_t>(s.inputs[j].num_tokens) * kHidden);
    }
    auto outputs = ref::normal_combine(s.inputs, dispatch_outputs, inputs, kHidden, K, kPerNode);
    auto flat = ref::normal_combine(s.inputs, dispatch_outputs, inputs, kHidden, K);

    for (int r = 0; r < kRanks; ++r) {
      for (int t = 0; t < s.inputs[r].num_tokens; ++t) {
        std::vector<float> sum(kHidden, 0.0f), weights(K, 0.0f);
        for (int node = 0; node < kRanks / kPerNode; ++node) {
          std::vector<float> partial(kHidden, 0.0f), partial_weights(K, 0.0f);
          bool any = false;
          for (int j = node * kPerNode; j < (node + 1) * kPerNode; ++j) {
            if (!s.inputs[r].is_token_in_rank[t * kRanks + j]) continue;
            // Rank j's rows from rank r, then the one holding token t.
            const auto& prefix = dispatch_outputs[j].rank_prefix_matrix;
            int row = r > 0 ? prefix[(r - 1) * kRanks + j] : 0;
            while (dispatch_outputs[j].recv_src_idx[row] != t) ++row;
            any = true;
            for (int c = 0; c < kHidden; ++c) partial[c] += ref::bf16_to_float(inputs[j].x[row * kHidden + c]);
            for (int k = 0; k < K; ++k) partial_weights[k] += inputs[j].topk_weights[row * K + k];
          }
          if (!any) continue;
          for (int c = 0; c < kHidden; ++c) sum[c] += ref::bf16_to_float(ref::float_to_bf16(partial[c]));
          for (int k = 0; k < K; ++k) weights[k] += partial_weights[k];
        }
        for (int c = 0; c < kHidden; ++c) {
          const size_t i = static_cast<size_t>(t) * kHidden + c;
          float value = sum[c];
          if (!inputs[r].bias_0.empty()) value += ref::bf16_to_float(inputs[r].bias_0[i]);
          if (!inputs[r].bias_1.empty()) value += ref::bf16_to_float(inputs[r].bias_1[i]);
          ASSERT_EQ(outputs[r].combined_x[i], ref::float_to_bf16(value)) << "rank " << r << " token " << t;
          differs_from_flat += outputs[r].combined_x[i] != flat[r].combined_x[i];
        }
        for (int k = 0; k < K; ++k) {
          ASSERT_EQ(0, std::memcmp(&outputs[r].combined_topk_weights[t * K + k], &weights[k], sizeof(float)))
              << "rank " << r << " token " << t;
        }
      }
    }
  }
  EXPECT_GT(differs_from_flat, 0);  // the inputs do exercise the per-node rounding
}

// ---- one rank's results only (the GPU tests check one rank per process) ---------------------

TEST(NormalOnlyRank, DispatchFillsThatRankAndKeepsTheOthersRouting) {
  for (const Scenario& s : all_scenarios()) {
    const auto full = ref::normal_dispatch(s.inputs, s.args);
    for (int r = 0; r < s.num_ranks; ++r) {
      ref::NormalDispatchArgs args = s.args;
      args.only_rank = r;
      const auto one = ref::normal_dispatch(s.inputs, args);
      ASSERT_EQ(one.size(), full.size());
      for (int j = 0; j < s.num_ranks; ++j) {
        EXPECT_EQ(one[j].num_recv_tokens, full[j].num_recv_tokens);
        EXPECT_EQ(one[j].num_rows, full[j].num_rows);
        EXPECT_EQ(one[j].rank_prefix_matrix, full[j].rank_prefix_matrix);
        EXPECT_EQ(one[j].recv_src_idx, full[j].recv_src_idx) << "rank " << j;
        if (j == r) {
          EXPECT_EQ(one[j].recv_x, full[j].recv_x);
          EXPECT_EQ(one[j].recv_topk_idx, full[j].recv_topk_idx);
          EXPECT_EQ(one[j].recv_topk_weights, full[j].recv_topk_weights);
          EXPECT_EQ(one[j].num_recv_tokens_per_expert, full[j].num_recv_tokens_per_expert);
        } else {
          EXPECT_TRUE(one[j].recv_x.empty() && one[j].recv_topk_idx.empty() && one[j].recv_topk_weights.empty() &&
                      one[j].num_recv_tokens_per_expert.empty());
        }
      }
    }
  }
}

TEST(NormalOnlyRank, CombineOfThatRankMatchesTheFullCombineInBothOrders) {
  for (const Scenario& s : all_scenarios()) {
    const auto dispatched = ref::normal_dispatch(s.inputs, s.args);
    std::vector<ref::NormalCombineInput> inputs(s.num_ranks);
    for (int j = 0; j < s.num_ranks; ++j) {
      inputs[j].x = bf16_of(dispatched[j].recv_x);
      inputs[j].topk_weights = dispatched[j].recv_topk_weights;
    }
    for (int ranks_per_node : {0, 2}) {
      if (ranks_per_node > 0 && s.num_ranks % ranks_per_node != 0) continue;
      const auto full = ref::normal_combine(s.inputs, dispatched, inputs, s.hidden, s.num_topk, ranks_per_node);
      for (int r = 0; r < s.num_ranks; ++r) {
        // Routing from a dispatch that filled rank r only, as the GPU tests pass it.
        ref::NormalDispatchArgs args = s.args;
        args.only_rank = r;
        const auto routing = ref::normal_dispatch(s.inputs, args);
        const auto one = ref::normal_combine(s.inputs, routing, inputs, s.hidden, s.num_topk, ranks_per_node, r);
        for (int j = 0; j < s.num_ranks; ++j) {
          if (j == r) {
            EXPECT_EQ(one[j].combined_x, full[j].combined_x);
            EXPECT_EQ(one[j].combined_topk_weights, full[j].combined_topk_weights);
          } else {
            EXPECT_TRUE(one[j].combined_x.empty() && one[j].combined_topk_weights.empty());
          }
        }
      }
    }
  }
}

TEST(NormalOnlyRank, RejectsARankOutsideTheGroup) {
  auto inputs = routing_only_inputs();
  auto args = routing_only_args();
  args.only_rank = 2;
  EXPECT_THROW(ref::normal_dispatch(inputs, args), deep_ep::ValueError);
  args.only_rank = -1;
  auto dispatched = ref::normal_dispatch(inputs, args);
  std::vector<ref::NormalCombineInput> combine_inputs(2);
  combine_inputs[0].x = bf16({1, 2, 3, 4, 5, 6, 7, 8});
  combine_inputs[1].x = bf16({1, 2, 3, 4, 5, 6});
  EXPECT_THROW(ref::normal_combine(inputs, dispatched, combine_inputs, 2, 0, 0, -2), deep_ep::ValueError);
  EXPECT_NO_THROW(ref::normal_combine(inputs, dispatched, combine_inputs, 2, 0, 0, 1));
}
