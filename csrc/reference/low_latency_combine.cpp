// Low-latency combine of the CPU reference (docs/compatibility.md section 8): each token's expert outputs are found in
// the expert ranks' [L, S, H] row layout through the dispatch handle (layout_range, src_info) and
// reduced on the home rank with the token's top-k weights.
#include <cmath>

#include "deep_ep/error.hpp"
#include "deep_ep/reference.hpp"

namespace deep_ep::reference {
namespace {

void validate(const std::vector<LowLatencyDispatchInput>& dispatch_inputs,
              const std::vector<LowLatencyDispatchOutput>& dispatch_outputs,
              const std::vector<LowLatencyCombineInput>& inputs, const LowLatencyDispatchArgs& args,
              const std::vector<uint8_t>& masked_ranks) {
  const int num_ranks = args.num_ranks;
  DEEP_EP_CHECK(num_ranks > 0, "low_latency_combine: num_ranks must be positive, got ", num_ranks);
  DEEP_EP_CHECK(args.num_experts > 0 && args.num_experts % num_ranks == 0, "low_latency_combine: num_experts (",
                args.num_experts, ") must be a positive multiple of num_ranks (", num_ranks, ")");
  DEEP_EP_CHECK(args.hidden >= 0 && args.num_topk >= 0 && args.num_max_dispatch_tokens_per_rank >= 0,
                "low_latency_combine: hidden, num_topk and num_max_dispatch_tokens_per_rank must be >= 0");
  DEEP_EP_CHECK(static_cast<int>(dispatch_inputs.size()) == num_ranks &&
                    static_cast<int>(dispatch_outputs.size()) == num_ranks &&
                    static_cast<int>(inputs.size()) == num_ranks,
                "low_latency_combine: expected one dispatch input, dispatch output and combine input per rank (",
                num_ranks, "), got ", dispatch_inputs.size(), ", ", dispatch_outputs.size(), " and ", inputs.size());
  DEEP_EP_CHECK(masked_ranks.empty() || static_cast<int>(masked_ranks.size()) == num_ranks,
                "low_latency_combine: masked_ranks must be empty or hold ", num_ranks, " entries, got ",
                masked_ranks.size());

  const size_t num_local_experts = static_cast<size_t>(args.num_experts / num_ranks);
  const size_t num_slots = num_local_experts * num_ranks * args.num_max_dispatch_tokens_per_rank;  // L * S
  for (int r = 0; r < num_ranks; ++r) {
    const size_t num_tokens = static_cast<size_t>(dispatch_inputs[r].num_tokens);
    DEEP_EP_CHECK(inputs[r].x.size() == num_slots * args.hidden, "low_latency_combine: rank ", r,
                  " x must be [L, S, hidden] = ", num_slots * args.hidden, " elements, got ", inputs[r].x.size());
    DEEP_EP_CHECK(dispatch_inputs[r].topk_idx.size() == num_tokens * args.num_topk, "low_latency_combine: rank ", r,
                  " topk_idx must be [", num_tokens, ", ", args.num_topk, "]");
    DEEP_EP_CHECK(inputs[r].topk_weights.size() == num_tokens * args.num_topk, "low_latency_combine: rank ", r,
                  " topk_weights must be [", num_tokens, ", ", args.num_topk, "], got ", inputs[r].topk_weights.size(),
                  " elements");
    DEEP_EP_CHECK(dispatch_outputs[r].src_info.size() == num_slots &&
                      dispatch_outputs[r].layout_range.size() == num_local_experts * num_ranks,
                  "low_latency_combine: rank ", r, " handle must hold src_info [L, S] and layout_range [L, R]");
  }
}

}  // namespace

std::vector<std::vector<uint16_t>> low_latency_combine(const std::vector<LowLatencyDispatchInput>& dispatch_inputs,
                                                       const std::vector<LowLatencyDispatchOutput>& dispatch_outputs,
                                                       const std::vector<LowLatencyCombineInput>& inputs,
                                                       const LowLatencyDispatchArgs& args,
                                                       const std::vector<uint8_t>& masked_ranks) {
  validate(dispatch_inputs, dispatch_outputs, inputs, args, masked_ranks);
  const int num_ranks = args.num_ranks;
  const int num_topk = args.num_topk;
  const int num_local_experts = args.num_experts / num_ranks;
  const size_t num_slots_per_expert = static_cast<size_t>(num_ranks) * args.num_max_dispatch_tokens_per_rank;
  const size_t hidden = static_cast<size_t>(args.hidden);

  std::vector<std::vector<uint16_t>> combined(num_ranks);
  std::vector<float> sum(hidden);
  for (int r = 0; r < num_ranks; ++r) {
    const LowLatencyDispatchInput& home = dispatch_inputs[r];
    combined[r].assign(static_cast<size_t>(home.num_tokens) * hidden, 0);
    for (int t = 0; t < home.num_tokens; ++t) {
      const int64_t* topk_idx = home.topk_idx.data() + static_cast<size_t>(t) * num_topk;
      const float* topk_weights = inputs[r].topk_weights.data() + static_cast<size_t>(t) * num_topk;
      sum.assign(hidden, 0.0f);
      for (int k = 0; k < num_topk; ++k) {
        const int64_t expert = topk_idx[k];
        if (expert < 0) continue;
        const int expert_rank = static_cast<int>(expert / num_local_experts);
        if (!masked_ranks.empty() && masked_ranks[expert_rank] != 0) continue;
        const int local_expert = static_cast<int>(expert % num_local_experts);

        // The rows rank r sent to this expert; a token listing the expert n times owns n of them, and
        // its k-th listing maps to its k-th row there.
        int occurrence = 0;
        for (int earlier = 0; earlier < k; ++earlier) occurrence += topk_idx[earlier] == expert ? 1 : 0;
        const LowLatencyDispatchOutput& handle = dispatch_outputs[expert_rank];
        const int64_t range = handle.layout_range[static_cast<size_t>(local_expert) * num_ranks + r];
        const int64_t begin = range >> 32;
        const int64_t count = range & 0xFFFFFFFFll;
        DEEP_EP_CHECK(begin >= 0 && begin + count <= static_cast<int64_t>(num_slots_per_expert),
                      "low_latency_combine: layout_range of expert ", expert, " for source rank ", r,
                      " points outside its ", num_slots_per_expert, " slots");
        int64_t row = -1;
        for (int64_t candidate = begin; candidate < begin + count && row < 0; ++candidate) {
          const size_t slot = static_cast<size_t>(local_expert) * num_slots_per_expert + candidate;
          if (handle.src_info[slot] == t && occurrence-- == 0) row = static_cast<int64_t>(slot);
        }
        DEEP_EP_CHECK(row >= 0, "low_latency_combine: expert ", expert, " holds no row for token ", t, " slot ", k,
                      " of rank ", r);

        // Fused multiply-add per term, in k order: what nvcc emits for `sum += w * y` by default.
        const uint16_t* y = inputs[expert_rank].x.data() + static_cast<size_t>(row) * hidden;
        for (size_t c = 0; c < hidden; ++c) sum[c] = std::fma(topk_weights[k], bf16_to_float(y[c]), sum[c]);
      }
      for (size_t c = 0; c < hidden; ++c) combined[r][static_cast<size_t>(t) * hidden + c] = float_to_bf16(sum[c]);
    }
  }
  return combined;
}

}  // namespace deep_ep::reference
