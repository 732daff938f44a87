// Tests of the reference low-latency dispatch and combine: hand-computed row placement and handle,
// FP8 and UE8M0 payloads, validation, masking, and round-trip identities over random inputs.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "deep_ep/error.hpp"
#include "deep_ep/reference.hpp"

namespace ref = deep_ep::reference;

namespace {

constexpr int kHidden = 128;

// A token row whose every channel holds `value`.
std::vector<uint16_t> constant_rows(const std::vector<float>& values, int hidden = kHidden) {
  std::vector<uint16_t> x;
  for (float v : values) x.insert(x.end(), hidden, ref::float_to_bf16(v));
  return x;
}

int64_t range_of(int64_t begin, int64_t count) { return (begin << 32) | count; }

// Two ranks, four experts (rank 0: 0-1, rank 1: 2-3), top-2, M = 3. Row values are
// 10 * (rank + 1) + token.
std::vector<ref::LowLatencyDispatchInput> two_rank_inputs() {
  std::vector<ref::LowLatencyDispatchInput> inputs(2);
  inputs[0].num_tokens = 3;
  inputs[0].x = constant_rows({10, 11, 12});
  inputs[0].topk_idx = {1, 2, 0, 1, -1, 3};
  inputs[1].num_tokens = 2;
  inputs[1].x = constant_rows({20, 21});
  inputs[1].topk_idx = {1, -1, 2, 3};
  return inputs;
}

ref::LowLatencyDispatchArgs two_rank_args() {
  ref::LowLatencyDispatchArgs args;
  args.num_ranks = 2;
  args.num_experts = 4;
  args.hidden = kHidden;
  args.num_topk = 2;
  args.num_max_dispatch_tokens_per_rank = 3;
  args.use_fp8 = false;
  return args;
}

// First channel of every row of a [L, S, hidden] bf16 tensor.
// One rank, two experts: token 0 names expert 1 twice and expert 0 once, token 1 names expert 1 once.
struct RepeatedExperts {
  std::vector<ref::LowLatencyDispatchInput> inputs;
  ref::LowLatencyDispatchArgs args;
};
RepeatedExperts repeated_experts(const std::vector<float>& token_values) {
  RepeatedExperts r;
  r.inputs.resize(1);
  r.inputs[0].num_tokens = 2;
  r.inputs[0].x = constant_rows(token_values);
  r.inputs[0].topk_idx = {1, 1, 0, -1, 1, -1};
  r.args.num_ranks = 1;
  r.args.num_experts = 2;
  r.args.hidden = kHidden;
  r.args.num_topk = 3;
  r.args.num_max_dispatch_tokens_per_rank = 3;
  r.args.use_fp8 = false;
  return r;
}

std::vector<float> first_channels(const std::vector<uint16_t>& x, int hidden = kHidden) {
  std::vector<float> values;
  for (size_t row = 0; row * hidden < x.size(); ++row) values.push_back(ref::bf16_to_float(x[row * hidden]));
  return values;
}

}  // namespace

// ---- dispatch, hand-computed -----------------------------------------------------------------

TEST(LowLatencyDispatch, GroupsExpertRowsBySourceRankThenTokenIndex) {
  auto outputs = ref::low_latency_dispatch(two_rank_inputs(), two_rank_args());
  ASSERT_EQ(outputs.size(), 2u);
  // Rank 0: expert 0 gets (r0,t1); expert 1 gets (r0,t0) (r0,t1) (r1,t0). Six slots per expert.
  EXPECT_EQ(outputs[0].recv_count, (std::vector<int32_t>{1, 3}));
  EXPECT_EQ(outputs[0].src_info, (std::vector<int32_t>{1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0}));
  EXPECT_EQ(first_channels(outputs[0].recv_x_bf16), (std::vector<float>{11, 0, 0, 0, 0, 0, 10, 11, 20, 0, 0, 0}));
  // Rank 1: expert 2 gets (r0,t0) (r1,t1); expert 3 gets (r0,t2) (r1,t1).
  EXPECT_EQ(outputs[1].recv_count, (std::vector<int32_t>{2, 2}));
  EXPECT_EQ(outputs[1].src_info, (std::vector<int32_t>{0, 1, 0, 0, 0, 0, 2, 1, 0, 0, 0, 0}));
  EXPECT_EQ(first_channels(outputs[1].recv_x_bf16), (std::vector<float>{10, 21, 0, 0, 0, 0, 12, 21, 0, 0, 0, 0}));
}

TEST(LowLatencyDispatch, LayoutRangeHoldsBeginAndCountPerSourceRank) {
  auto outputs = ref::low_latency_dispatch(two_rank_inputs(), two_rank_args());
  EXPECT_EQ(outputs[0].layout_range,
            (std::vector<int64_t>{range_of(0, 1), range_of(1, 0), range_of(0, 2), range_of(2, 1)}));
  EXPECT_EQ(outputs[1].layout_range,
            (std::vector<int64_t>{range_of(0, 1), range_of(1, 1), range_of(0, 1), range_of(1, 1)}));
}

TEST(LowLatencyDispatch, CopiesWholeBf16RowsAndZeroesTheRest) {
  auto inputs = two_rank_inputs();
  for (int c = 0; c < kHidden; ++c) inputs[1].x[kHidden + c] = ref::float_to_bf16(static_cast<float>(c));
  auto outputs = ref::low_latency_dispatch(inputs, two_rank_args());
  const size_t slots = 6;
  // Rank 1's token 1 is row 1 of expert 2 (local 0) and row 1 of expert 3 (local 1) on rank 1.
  for (int l = 0; l < 2; ++l) {
    for (int c = 0; c < kHidden; ++c)
      ASSERT_EQ(outputs[1].recv_x_bf16[(l * slots + 1) * kHidden + c], ref::float_to_bf16(static_cast<float>(c)));
    for (size_t row = 2; row < slots; ++row)
      for (int c = 0; c < kHidden; ++c) ASSERT_EQ(outputs[1].recv_x_bf16[(l * slots + row) * kHidden + c], 0);
  }
  EXPECT_TRUE(outputs[1].recv_x_fp8.empty());
  EXPECT_TRUE(outputs[1].recv_scales.empty());
}

TEST(LowLatencyDispatch, SendsATokenOncePerSlotThatNamesTheExpert) {
  const RepeatedExperts r = repeated_experts({1, 2});
  auto outputs = ref::low_latency_dispatch(r.inputs, r.args);
  EXPECT_EQ(outputs[0].recv_count, (std::vector<int32_t>{1, 3}));
  EXPECT_EQ(outputs[0].src_info, (std::vector<int32_t>{0, 0, 0, 0, 0, 1}));
  EXPECT_EQ(outputs[0].layout_range, (std::vector<int64_t>{range_of(0, 1), range_of(0, 3)}));
}

TEST(LowLatencyDispatch, QuantizesRowsToFp8WithFloatScales) {
  auto inputs = two_rank_inputs();
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  for (auto& in : inputs)
    for (auto& v : in.x) v = ref::float_to_bf16(normal(rng));
  ref::LowLatencyDispatchArgs args = two_rank_args();
  args.use_fp8 = true;
  auto outputs = ref::low_latency_dispatch(inputs, args);
  EXPECT_TRUE(outputs[0].recv_x_bf16.empty());
  EXPECT_TRUE(outputs[0].recv_scales_ue8m0.empty());
  // Rank 0, expert 1, row 2 is rank 1's token 0.
  std::vector<float> source(kHidden);
  for (int c = 0; c < kHidden; ++c) source[c] = ref::bf16_to_float(inputs[1].x[c]);
  std::vector<uint8_t> expected(kHidden);
  float expected_scale = 0.0f;
  ref::quantize_row_fp8(source.data(), kHidden, false, expected.data(), &expected_scale);
  const size_t row = 1 * 6 + 2;
  EXPECT_TRUE(std::equal(expected.begin(), expected.end(), outputs[0].recv_x_fp8.begin() + row * kHidden));
  EXPECT_EQ(outputs[0].recv_scales[row], expected_scale);
  EXPECT_EQ(outputs[0].recv_scales[row + 1], 0.0f);  // past recv_count
}

TEST(LowLatencyDispatch, PacksFourUe8m0ExponentsPerWordLowByteFirst) {
  std::vector<ref::LowLatencyDispatchInput> inputs(1);
  inputs[0].num_tokens = 1;
  // Group maxima 56, 448, 896, 112 give power-of-two scales 2^-3, 2^0, 2^1, 2^-2.
  std::vector<float> row(512, 0.0f);
  row[0] = 56.0f;
  row[128 + 5] = -448.0f;
  row[256 + 9] = 896.0f;
  row[384 + 127] = 112.0f;
  for (float v : row) inputs[0].x.push_back(ref::float_to_bf16(v));
  inputs[0].topk_idx = {0};
  ref::LowLatencyDispatchArgs args;
  args.num_ranks = 1;
  args.num_experts = 1;
  args.hidden = 512;
  args.num_topk = 1;
  args.num_max_dispatch_tokens_per_rank = 2;
  args.use_fp8 = true;
  args.round_scale = true;
  args.use_ue8m0 = true;
  auto outputs = ref::low_latency_dispatch(inputs, args);
  EXPECT_EQ(outputs[0].recv_scales_ue8m0, (std::vector<int32_t>{0x7D807F7C, 0}));  // 124, 127, 128, 125
  EXPECT_TRUE(outputs[0].recv_scales.empty());
  EXPECT_EQ(outputs[0].recv_x_fp8[128 + 5], 0xFE);
}

TEST(LowLatencyDispatch, RejectsUe8m0WithoutRoundScaleOrHiddenMultipleOf512) {
  std::vector<ref::LowLatencyDispatchInput> inputs(1);
  inputs[0].num_tokens = 1;
  inputs[0].x.assign(384, 0);
  inputs[0].topk_idx = {0};
  ref::LowLatencyDispatchArgs args;
  args.num_ranks = 1;
  args.num_experts = 1;
  args.hidden = 384;
  args.num_topk = 1;
  args.num_max_dispatch_tokens_per_rank = 1;
  args.use_fp8 = true;
  args.round_scale = true;
  args.use_ue8m0 = true;
  EXPECT_THROW(ref::low_latency_dispatch(inputs, args), deep_ep::ValueError);  // 384 % 512 != 0
  inputs[0].x.assign(512, 0);
  args.hidden = 512;
  args.round_scale = false;
  EXPECT_THROW(ref::low_latency_dispatch(inputs, args), deep_ep::ValueError);  // no round_scale
  args.round_scale = true;
  EXPECT_NO_THROW(ref::low_latency_dispatch(inputs, args));
}

TEST(LowLatencyDispatch, RejectsMoreTokensThanMaxDispatchTokens) {
  ref::LowLatencyDispatchArgs args = two_rank_args();
  args.num_max_dispatch_tokens_per_rank = 2;  // rank 0 has 3 tokens
  EXPECT_THROW(ref::low_latency_dispatch(two_rank_inputs(), args), deep_ep::ValueError);
}

TEST(LowLatencyDispatch, RejectsInvalidExpertIdsAndShapes) {
  auto inputs = two_rank_inputs();
  inputs[1].topk_idx[3] = 4;
  EXPECT_THROW(ref::low_latency_dispatch(inputs, two_rank_args()), deep_ep::ValueError);
  ref::LowLatencyDispatchArgs args = two_rank_args();
  args.hidden = 64;  // not a multiple of 128
  EXPECT_THROW(ref::low_latency_dispatch(two_rank_inputs(), args), deep_ep::ValueError);
  args = two_rank_args();
  args.num_experts = 3;  // not a multiple of num_ranks
  EXPECT_THROW(ref::low_latency_dispatch(two_rank_inputs(), args), deep_ep::ValueError);
}

TEST(LowLatencyDispatch, RejectsMoreRowsFromOneRankToAnExpertThanItsSlots) {
  std::vector<ref::LowLatencyDispatchInput> inputs(1);
  inputs[0].num_tokens = 1;
  inputs[0].x = constant_rows({1});
  inputs[0].topk_idx = {0, 0};  // one token, two rows for expert 0, but only M = 1 slot per source
  ref::LowLatencyDispatchArgs args;
  args.num_ranks = 1;
  args.num_experts = 1;
  args.hidden = kHidden;
  args.num_topk = 2;
  args.num_max_dispatch_tokens_per_rank = 1;
  args.use_fp8 = false;
  EXPECT_THROW(ref::low_latency_dispatch(inputs, args), deep_ep::ValueError);
}

// ---- combine, hand-computed ------------------------------------------------------------------

namespace {

// Expert outputs for two_rank_inputs(): row s of local expert l on rank j holds 100 j + 10 l + s.
std::vector<ref::LowLatencyCombineInput> labelled_expert_outputs() {
  std::vector<ref::LowLatencyCombineInput> inputs(2);
  for (int j = 0; j < 2; ++j) {
    std::vector<float> values;
    for (int l = 0; l < 2; ++l)
      for (int s = 0; s < 6; ++s) values.push_back(static_cast<float>(100 * j + 10 * l + s));
    inputs[j].x = constant_rows(values);
  }
  inputs[0].topk_weights = {0.5f, 0.25f, 1.0f, 2.0f, 9.0f, 0.5f};
  inputs[1].topk_weights = {2.0f, 7.0f, 0.5f, 0.5f};
  return inputs;
}

}  // namespace

TEST(LowLatencyCombine, SumsWeightedExpertRowsOfEachToken) {
  auto dispatch_inputs = two_rank_inputs();
  auto dispatch_outputs = ref::low_latency_dispatch(dispatch_inputs, two_rank_args());
  auto combined =
      ref::low_latency_combine(dispatch_inputs, dispatch_outputs, labelled_expert_outputs(), two_rank_args());
  // Rank 0: t0 = 0.5 * 10 + 0.25 * 100; t1 = 1 * 0 + 2 * 11; t2 = 0.5 * 110 (k = 0 is -1).
  EXPECT_EQ(first_channels(combined[0]), (std::vector<float>{30, 22, 55}));
  // Rank 1: t0 = 2 * 12; t1 = 0.5 * 101 + 0.5 * 111.
  EXPECT_EQ(first_channels(combined[1]), (std::vector<float>{24, 106}));
  EXPECT_EQ(combined[0].size(), 3u * kHidden);
  EXPECT_EQ(combined[0][3 * kHidden - 1], ref::float_to_bf16(55));
}

TEST(LowLatencyCombine, LeavesOutExpertsOfMaskedRanks) {
  auto dispatch_inputs = two_rank_inputs();
  auto dispatch_outputs = ref::low_latency_dispatch(dispatch_inputs, two_rank_args());
  auto combined =
      ref::low_latency_combine(dispatch_inputs, dispatch_outputs, labelled_expert_outputs(), two_rank_args(), {0, 1});
  EXPECT_EQ(first_channels(combined[0]), (std::vector<float>{5, 22, 0}));
  EXPECT_EQ(first_channels(combined[1]), (std::vector<float>{24, 0}));
}

TEST(LowLatencyCombine, MapsRepeatedExpertSlotsToRowsInKOrder) {
  const RepeatedExperts r = repeated_experts({0, 0});
  const auto& dispatch_inputs = r.inputs;
  const auto& args = r.args;
  auto dispatch_outputs = ref::low_latency_dispatch(dispatch_inputs, args);
  std::vector<ref::LowLatencyCombineInput> inputs(1);
  // Expert 0: row 0 = (t0, k2) -> 5. Expert 1: rows (t0, k0) -> 1, (t0, k1) -> 2, (t1, k1) -> 3.
  inputs[0].x = constant_rows({5, 0, 0, 1, 2, 3});
  inputs[0].topk_weights = {1.0f, 8.0f, 0.5f, 1.0f, 4.0f, 1.0f};
  auto combined = ref::low_latency_combine(dispatch_inputs, dispatch_outputs, inputs, args);
  EXPECT_EQ(first_channels(combined[0]), (std::vector<float>{1 * 1 + 8 * 2 + 0.5f * 5, 4 * 3}));
}

TEST(LowLatencyCombine, RejectsWrongWeightShapeAndMaskSize) {
  auto dispatch_inputs = two_rank_inputs();
  auto dispatch_outputs = ref::low_latency_dispatch(dispatch_inputs, two_rank_args());
  auto inputs = labelled_expert_outputs();
  EXPECT_THROW(ref::low_latency_combine(dispatch_inputs, dispatch_outputs, inputs, two_rank_args(), {1}),
               deep_ep::ValueError);
  inputs[1].topk_weights.pop_back();
  EXPECT_THROW(ref::low_latency_combine(dispatch_inputs, dispatch_outputs, inputs, two_rank_args()),
               deep_ep::ValueError);
}

// ---- properties over random inputs -----------------------------------------------------------

namespace {

enum class Routing { kRandom, kAllMinusOne, kAllToOneRank, kZeroTokens, kOneToken, kRepeatedExperts };

struct Scenario {
  std::vector<ref::LowLatencyDispatchInput> inputs;
  std::vector<std::vector<float>> topk_weights;  // per rank [T, K]
  ref::LowLatencyDispatchArgs args;
};

// Small-integer payloads and weights in {0.25, 0.5, 1, 2}: every weighted sum below is exact in bf16.
Scenario make_scenario(uint32_t seed, Routing routing, int num_ranks) {
  std::mt19937 rng(seed);
  Scenario s;
  ref::LowLatencyDispatchArgs& args = s.args;
  args.num_ranks = num_ranks;
  const int num_local_experts = 1 + static_cast<int>(rng() % 3);
  args.num_experts = num_ranks * num_local_experts;
  args.hidden = kHidden;
  args.num_topk = 1 + static_cast<int>(rng() % std::min(4, args.num_experts));
  args.num_max_dispatch_tokens_per_rank = 6;
  args.use_fp8 = false;
  if (routing == Routing::kRepeatedExperts) args.num_max_dispatch_tokens_per_rank = 6 * args.num_topk;
  const int target_rank = static_cast<int>(rng() % num_ranks);
  std::uniform_int_distribution<int> small_int(-8, 8);
  const float weight_choices[] = {0.25f, 0.5f, 1.0f, 2.0f};
  for (int r = 0; r < num_ranks; ++r) {
    ref::LowLatencyDispatchInput in;
    in.num_tokens = routing == Routing::kZeroTokens ? 0
                    : routing == Routing::kOneToken ? 1
                                                    : static_cast<int>(rng() % 7);
    std::vector<float> weights;
    for (int t = 0; t < in.num_tokens; ++t) {
      // Distinct experts per token (as a top-k produces), except in the repeated-experts case.
      std::vector<int64_t> candidates;
      if (routing == Routing::kAllToOneRank) {
        for (int l = 0; l < num_local_experts; ++l) candidates.push_back(target_rank * num_local_experts + l);
      } else {
        for (int e = 0; e < args.num_experts; ++e) candidates.push_back(e);
      }
      std::shuffle(candidates.begin(), candidates.end(), rng);
      for (int k = 0; k < args.num_topk; ++k) {
        int64_t expert = routing == Routing::kRepeatedExperts
                             ? static_cast<int64_t>(rng() % std::min(2, args.num_experts))
                         : k < static_cast<int>(candidates.size()) ? candidates[k]
                                                                   : -1;
        if (routing == Routing::kAllMinusOne || (routing == Routing::kRandom && rng() % 5 == 0)) expert = -1;
        in.topk_idx.push_back(expert);
        weights.push_back(weight_choices[rng() % 4]);
      }
    }
    for (int c = 0; c < in.num_tokens * args.hidden; ++c)
      in.x.push_back(ref::float_to_bf16(static_cast<float>(small_int(rng))));
    s.inputs.push_back(std::move(in));
    s.topk_weights.push_back(std::move(weights));
  }
  return s;
}

std::vector<Scenario> all_scenarios() {
  std::vector<Scenario> scenarios;
  uint32_t seed = 500;
  for (int num_ranks : {1, 2, 4, 8}) {
    for (Routing routing : {Routing::kRandom, Routing::kAllMinusOne, Routing::kAllToOneRank, Routing::kZeroTokens,
                            Routing::kOneToken, Routing::kRepeatedExperts}) {
      for (int repeat = 0; repeat < 3; ++repeat) scenarios.push_back(make_scenario(seed++, routing, num_ranks));
    }
  }
  return scenarios;
}

std::vector<ref::LowLatencyCombineInput> combine_inputs_from(const Scenario& s,
                                                             const std::vector<ref::LowLatencyDispatchOutput>& outs) {
  std::vector<ref::LowLatencyCombineInput> inputs(s.args.num_ranks);
  for (int r = 0; r < s.args.num_ranks; ++r) {
    inputs[r].x = outs[r].recv_x_bf16;  // identity experts
    inputs[r].topk_weights = s.topk_weights[r];
  }
  return inputs;
}

}  // namespace

TEST(LowLatencyRoundTrip, CombineOfDispatchIsTokenTimesSumOfValidWeights) {
  for (const Scenario& s : all_scenarios()) {
    auto outs = ref::low_latency_dispatch(s.inputs, s.args);
    auto combined = ref::low_latency_combine(s.inputs, outs, combine_inputs_from(s, outs), s.args);
    for (int r = 0; r < s.args.num_ranks; ++r) {
      const auto& in = s.inputs[r];
      for (int t = 0; t < in.num_tokens; ++t) {
        float weight_sum = 0.0f;
        for (int k = 0; k < s.args.num_topk; ++k)
          if (in.topk_idx[t * s.args.num_topk + k] >= 0) weight_sum += s.topk_weights[r][t * s.args.num_topk + k];
        for (int c = 0; c < kHidden; ++c)
          ASSERT_EQ(ref::bf16_to_float(combined[r][t * kHidden + c]),
                    ref::bf16_to_float(in.x[t * kHidden + c]) * weight_sum)
              << "rank " << r << " token " << t << " channel " << c;
      }
    }
  }
}

TEST(LowLatencyRoundTrip, MaskedRanksDropTheirExpertsFromTheSum) {
  for (const Scenario& s : all_scenarios()) {
    const int num_ranks = s.args.num_ranks;
    const int num_local_experts = s.args.num_experts / num_ranks;
    std::vector<uint8_t> masked(num_ranks);
    for (int j = 0; j < num_ranks; ++j) masked[j] = (j % 2 == 1) ? 1 : 0;
    auto outs = ref::low_latency_dispatch(s.inputs, s.args);
    auto combined = ref::low_latency_combine(s.inputs, outs, combine_inputs_from(s, outs), s.args, masked);
    for (int r = 0; r < num_ranks; ++r) {
      const auto& in = s.inputs[r];
      for (int t = 0; t < in.num_tokens; ++t) {
        float weight_sum = 0.0f;
        for (int k = 0; k < s.args.num_topk; ++k) {
          const int64_t e = in.topk_idx[t * s.args.num_topk + k];
          if (e >= 0 && !masked[e / num_local_experts]) weight_sum += s.topk_weights[r][t * s.args.num_topk + k];
        }
        ASSERT_EQ(ref::bf16_to_float(combined[r][t * kHidden]), ref::bf16_to_float(in.x[t * kHidden]) * weight_sum);
      }
    }
  }
}

TEST(LowLatencyRoundTrip, CountsAndLayoutRangesAgreeWithTopk) {
  for (const Scenario& s : all_scenarios()) {
    const int num_ranks = s.args.num_ranks;
    const int num_local_experts = s.args.num_experts / num_ranks;
    const int num_slots = num_ranks * s.args.num_max_dispatch_tokens_per_rank;
    auto outs = ref::low_latency_dispatch(s.inputs, s.args);
    int64_t total_rows = 0, total_valid_slots = 0;
    for (const auto& in : s.inputs)
      for (int64_t e : in.topk_idx) total_valid_slots += e >= 0 ? 1 : 0;
    for (int j = 0; j < num_ranks; ++j) {
      for (int l = 0; l < num_local_experts; ++l) {
        const int64_t expert = j * num_local_experts + l;
        int64_t next_begin = 0;
        for (int i = 0; i < num_ranks; ++i) {
          const int64_t range = outs[j].layout_range[l * num_ranks + i];
          const int64_t begin = range >> 32, count = range & 0xFFFFFFFF;
          ASSERT_EQ(begin, next_begin);  // source ranks in increasing order, back to back
          int64_t expected_count = 0;
          for (int64_t e : s.inputs[i].topk_idx) expected_count += e == expert ? 1 : 0;
          ASSERT_EQ(count, expected_count);
          for (int64_t row = begin; row < begin + count; ++row) {
            const int t = outs[j].src_info[l * num_slots + row];
            if (row > begin) {
              ASSERT_LE(outs[j].src_info[l * num_slots + row - 1], t);
            }
            ASSERT_LT(t, s.inputs[i].num_tokens);
            ASSERT_EQ(outs[j].recv_x_bf16[(l * num_slots + row) * kHidden], s.inputs[i].x[t * kHidden]);
          }
          next_begin = begin + count;
        }
        ASSERT_EQ(outs[j].recv_count[l], next_begin);
        total_rows += next_begin;
        for (int row = static_cast<int>(next_begin); row < num_slots; ++row) {
          ASSERT_EQ(outs[j].src_info[l * num_slots + row], 0);
          ASSERT_EQ(outs[j].recv_x_bf16[(l * num_slots + row) * kHidden], 0);
        }
      }
    }
    EXPECT_EQ(total_rows, total_valid_slots);
  }
}

TEST(LowLatencyRoundTrip, Fp8RowsDequantizeWithinOneSixteenthOfGroupMax) {
  for (uint32_t seed : {31u, 32u, 33u}) {
    for (bool round_scale : {false, true}) {
      std::mt19937 rng(seed);
      Scenario s = make_scenario(seed, Routing::kRandom, 4);
      s.args.hidden = 512;
      s.args.use_fp8 = true;
      s.args.round_scale = round_scale;
      std::normal_distribution<float> normal(0.0f, 5.0f);
      for (auto& in : s.inputs) {
        in.x.clear();
        for (int c = 0; c < in.num_tokens * s.args.hidden; ++c) in.x.push_back(ref::float_to_bf16(normal(rng)));
      }
      const int hidden = s.args.hidden;
      const int num_local_experts = s.args.num_experts / s.args.num_ranks;
      const int num_slots = s.args.num_ranks * s.args.num_max_dispatch_tokens_per_rank;
      auto outs = ref::low_latency_dispatch(s.inputs, s.args);
      for (int j = 0; j < s.args.num_ranks; ++j) {
        for (int l = 0; l < num_local_experts; ++l) {
          for (int i = 0; i < s.args.num_ranks; ++i) {
            const int64_t range = outs[j].layout_range[l * s.args.num_ranks + i];
            for (int64_t row = range >> 32; row < (range >> 32) + (range & 0xFFFFFFFF); ++row) {
              const size_t slot = l * num_slots + row;
              const uint16_t* source = s.inputs[i].x.data() + outs[j].src_info[slot] * hidden;
              for (int g = 0; g < hidden / 128; ++g) {
                float amax = 1e-4f;
                for (int c = g * 128; c < (g + 1) * 128; ++c)
                  amax = std::fmax(amax, std::fabs(ref::bf16_to_float(source[c])));
                const float scale_inv = outs[j].recv_scales[slot * (hidden / 128) + g];
                if (round_scale) {
                  ASSERT_EQ(std::exp2(std::round(std::log2(scale_inv))), scale_inv);
                }
                for (int c = g * 128; c < (g + 1) * 128; ++c) {
                  const float restored = ref::e4m3_to_float(outs[j].recv_x_fp8[slot * hidden + c]) * scale_inv;
                  ASSERT_LE(std::fabs(restored - ref::bf16_to_float(source[c])), amax / 16.0f);
                }
              }
            }
          }
        }
      }
    }
  }
}
