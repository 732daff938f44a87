// Low-latency dispatch of the CPU reference (docs/compatibility.md section 8): every valid (token, k) slot becomes one
// row of its expert's [S = R * M] region on the expert's rank, optionally FP8-quantized. Rows are
// placed in a fixed order (source rank, token index, k) so the GPU result can be compared exactly.
#include <algorithm>

#include "deep_ep/error.hpp"
#include "deep_ep/reference.hpp"

namespace deep_ep::reference {
namespace {

constexpr int kScaleGroup = 128;        // channels per FP8 scale
constexpr int kScalesPerUe8m0Word = 4;  // exponent bytes packed into one int32

void validate(const std::vector<LowLatencyDispatchInput>& inputs, const LowLatencyDispatchArgs& args) {
  DEEP_EP_CHECK(args.num_ranks > 0, "low_latency_dispatch: num_ranks must be positive, got ", args.num_ranks);
  DEEP_EP_CHECK(static_cast<int>(inputs.size()) == args.num_ranks, "low_latency_dispatch: expected one input per ",
                "rank (", args.num_ranks, "), got ", inputs.size());
  DEEP_EP_CHECK(args.num_experts > 0 && args.num_experts % args.num_ranks == 0,
                "low_latency_dispatch: ", "num_experts (", args.num_experts,
                ") must be a positive multiple of num_ranks (", args.num_ranks, ")");
  DEEP_EP_CHECK(args.hidden >= 0 && args.hidden % kScaleGroup == 0, "low_latency_dispatch: hidden must be a ",
                "multiple of ", kScaleGroup, ", got ", args.hidden);
  DEEP_EP_CHECK(args.num_topk >= 0, "low_latency_dispatch: num_topk must be >= 0, got ", args.num_topk);
  DEEP_EP_CHECK(args.num_max_dispatch_tokens_per_rank >= 0,
                "low_latency_dispatch: ", "num_max_dispatch_tokens_per_rank must be >= 0, got ",
                args.num_max_dispatch_tokens_per_rank);
  if (args.use_fp8 && args.use_ue8m0) {
    DEEP_EP_CHECK(args.round_scale, "low_latency_dispatch: use_ue8m0 requires round_scale");
    DEEP_EP_CHECK(args.hidden % (kScaleGroup * kScalesPerUe8m0Word) == 0, "low_latency_dispatch: use_ue8m0 ",
                  "requires hidden to be a multiple of ", kScaleGroup * kScalesPerUe8m0Word, ", got ", args.hidden);
  }

  for (int r = 0; r < args.num_ranks; ++r) {
    const LowLatencyDispatchInput& in = inputs[r];
    DEEP_EP_CHECK(in.num_tokens >= 0 && in.num_tokens <= args.num_max_dispatch_tokens_per_rank,
                  "low_latency_dispatch: rank ", r, " num_tokens (", in.num_tokens,
                  ") must be in [0, num_max_dispatch_tokens_per_rank = ", args.num_max_dispatch_tokens_per_rank, "]");
    const size_t num_tokens = static_cast<size_t>(in.num_tokens);
    DEEP_EP_CHECK(in.x.size() == num_tokens * args.hidden, "low_latency_dispatch: rank ", r, " x must be [", num_tokens,
                  ", ", args.hidden, "], got ", in.x.size(), " elements");
    DEEP_EP_CHECK(in.topk_idx.size() == num_tokens * args.num_topk, "low_latency_dispatch: rank ", r,
                  " topk_idx must be [", num_tokens, ", ", args.num_topk, "], got ", in.topk_idx.size(), " elements");
    for (size_t slot = 0; slot < in.topk_idx.size(); ++slot) {
      const int64_t expert = in.topk_idx[slot];
      DEEP_EP_CHECK(expert >= -1 && expert < args.num_experts, "low_latency_dispatch: rank ", r, " topk_idx[",
                    slot / args.num_topk, "][", slot % args.num_topk, "] = ", expert, " is outside [-1, ",
                    args.num_experts, ")");
    }
  }
}

// Writes one received row: a bf16 copy, or its FP8 payload plus scales (float, or UE8M0 packed).
void write_row(const uint16_t* x, const LowLatencyDispatchArgs& args, size_t row, LowLatencyDispatchOutput& out) {
  const size_t hidden = static_cast<size_t>(args.hidden);
  if (!args.use_fp8) {
    std::copy_n(x, hidden, out.recv_x_bf16.data() + row * hidden);
    return;
  }
  const size_t num_scales = hidden / kScaleGroup;
  std::vector<float> values(hidden);
  std::vector<float> scale_invs(num_scales);
  for (size_t c = 0; c < hidden; ++c) values[c] = bf16_to_float(x[c]);
  quantize_row_fp8(values.data(), args.hidden, args.round_scale, out.recv_x_fp8.data() + row * hidden,
                   scale_invs.data());
  if (!args.use_ue8m0) {
    std::copy(scale_invs.begin(), scale_invs.end(), out.recv_scales.begin() + row * num_scales);
    return;
  }
  const size_t num_words = num_scales / kScalesPerUe8m0Word;
  for (size_t w = 0; w < num_words; ++w) {
    uint32_t word = 0;
    for (int b = 0; b < kScalesPerUe8m0Word; ++b)
      word |= static_cast<uint32_t>(ue8m0_exponent(scale_invs[w * kScalesPerUe8m0Word + b])) << (8 * b);
    out.recv_scales_ue8m0[row * num_words + w] = static_cast<int32_t>(word);
  }
}

}  // namespace

std::vector<LowLatencyDispatchOutput> low_latency_dispatch(const std::vector<LowLatencyDispatchInput>& inputs,
                                                           const LowLatencyDispatchArgs& args) {
  validate(inputs, args);
  const int num_ranks = args.num_ranks;
  const int num_topk = args.num_topk;
  const int num_local_experts = args.num_experts / num_ranks;
  const int num_max_tokens = args.num_max_dispatch_tokens_per_rank;
  const size_t num_slots_per_expert = static_cast<size_t>(num_ranks) * num_max_tokens;  // S
  const size_t num_rows = static_cast<size_t>(num_local_experts) * num_slots_per_expert;
  const size_t hidden = static_cast<size_t>(args.hidden);

  std::vector<LowLatencyDispatchOutput> outputs(num_ranks);
  for (int j = 0; j < num_ranks; ++j) {
    LowLatencyDispatchOutput& out = outputs[j];
    // Rows past recv_count stay zero (payload, scales and src_info).
    if (args.use_fp8) {
      out.recv_x_fp8.assign(num_rows * hidden, 0);
      if (args.use_ue8m0)
        out.recv_scales_ue8m0.assign(num_rows * (hidden / (kScaleGroup * kScalesPerUe8m0Word)), 0);
      else
        out.recv_scales.assign(num_rows * (hidden / kScaleGroup), 0.0f);
    } else {
      out.recv_x_bf16.assign(num_rows * hidden, 0);
    }
    out.recv_count.assign(num_local_experts, 0);
    out.src_info.assign(num_rows, 0);
    out.layout_range.assign(static_cast<size_t>(num_local_experts) * num_ranks, 0);

    for (int l = 0; l < num_local_experts; ++l) {
      const int64_t expert = static_cast<int64_t>(j) * num_local_experts + l;
      const size_t expert_base = static_cast<size_t>(l) * num_slots_per_expert;
      int32_t num_expert_rows = 0;
      for (int i = 0; i < num_ranks; ++i) {
        const LowLatencyDispatchInput& in = inputs[i];
        const int32_t begin = num_expert_rows;
        for (int t = 0; t < in.num_tokens; ++t) {
          for (int k = 0; k < num_topk; ++k) {
            if (in.topk_idx[static_cast<size_t>(t) * num_topk + k] != expert) continue;
            // A source rank owns M slots of each expert region, so it may send an expert at most M rows
            // (only a token that lists the same expert twice can exceed that).
            DEEP_EP_CHECK(num_expert_rows - begin < num_max_tokens, "low_latency_dispatch: rank ", i,
                          " sends more than num_max_dispatch_tokens_per_rank = ", num_max_tokens, " rows to expert ",
                          expert, " (a token lists the expert more than once)");
            const size_t row = expert_base + num_expert_rows;
            write_row(in.x.data() + static_cast<size_t>(t) * hidden, args, row, out);
            out.src_info[row] = t;
            ++num_expert_rows;
          }
        }
        const int64_t count = num_expert_rows - begin;
        out.layout_range[static_cast<size_t>(l) * num_ranks + i] = (static_cast<int64_t>(begin) << 32) | count;
      }
      out.recv_count[l] = num_expert_rows;
    }
  }
  return outputs;
}

}  // namespace deep_ep::reference
