// Normal-mode dispatch of the CPU reference (docs/compatibility.md section 6), on the global view: every rank's
// arguments in, every rank's received rows and handle contents out, in the observable row order
// (source rank, then source token index) the GPU kernels must reproduce.
#include <algorithm>
#include <cstring>

#include "deep_ep/error.hpp"
#include "deep_ep/reference.hpp"

namespace deep_ep::reference {
namespace {

void validate(const std::vector<NormalDispatchInput>& inputs, const NormalDispatchArgs& args) {
  const int num_ranks = args.num_ranks;
  DEEP_EP_CHECK(num_ranks > 0, "normal_dispatch: num_ranks must be positive, got ", num_ranks);
  DEEP_EP_CHECK(static_cast<int>(inputs.size()) == num_ranks, "normal_dispatch: expected one input per rank (",
                num_ranks, "), got ", inputs.size());
  DEEP_EP_CHECK(args.row_bytes >= 0, "normal_dispatch: row_bytes must be >= 0, got ", args.row_bytes);
  DEEP_EP_CHECK(args.num_scales >= 0, "normal_dispatch: num_scales must be >= 0, got ", args.num_scales);
  DEEP_EP_CHECK(args.num_topk >= 0, "normal_dispatch: num_topk must be >= 0, got ", args.num_topk);
  DEEP_EP_CHECK(args.expert_alignment >= 1, "normal_dispatch: expert_alignment must be >= 1, got ",
                args.expert_alignment);
  DEEP_EP_CHECK(args.num_worst_tokens >= 0, "normal_dispatch: num_worst_tokens must be >= 0, got ",
                args.num_worst_tokens);
  DEEP_EP_CHECK(args.only_rank >= -1 && args.only_rank < num_ranks, "normal_dispatch: only_rank must be -1 or in [0, ",
                num_ranks, "), got ", args.only_rank);
  if (args.num_topk > 0) {
    DEEP_EP_CHECK(args.num_experts > 0 && args.num_experts % num_ranks == 0, "normal_dispatch: num_experts (",
                  args.num_experts, ") must be a positive multiple of num_ranks (", num_ranks, ")");
  }

  for (int r = 0; r < num_ranks; ++r) {
    const NormalDispatchInput& in = inputs[r];
    const size_t num_tokens = static_cast<size_t>(in.num_tokens);
    DEEP_EP_CHECK(in.num_tokens >= 0, "normal_dispatch: rank ", r, " num_tokens must be >= 0, got ", in.num_tokens);
    DEEP_EP_CHECK(in.x.size() == num_tokens * args.row_bytes, "normal_dispatch: rank ", r, " x must hold ", num_tokens,
                  " x ", args.row_bytes, " bytes, got ", in.x.size());
    DEEP_EP_CHECK(in.x_scales.size() == num_tokens * args.num_scales, "normal_dispatch: rank ", r,
                  " x_scales must hold ", num_tokens, " x ", args.num_scales, " floats, got ", in.x_scales.size());
    DEEP_EP_CHECK(in.is_token_in_rank.size() == num_tokens * num_ranks, "normal_dispatch: rank ", r,
                  " is_token_in_rank must be [", num_tokens, ", ", num_ranks, "], got ", in.is_token_in_rank.size(),
                  " elements");
    const size_t num_slots = num_tokens * args.num_topk;
    DEEP_EP_CHECK(in.topk_idx.size() == num_slots && in.topk_weights.size() == num_slots, "normal_dispatch: rank ", r,
                  " topk_idx and topk_weights must both be [", num_tokens, ", ", args.num_topk, "], got ",
                  in.topk_idx.size(), " and ", in.topk_weights.size(), " elements");
    for (size_t slot = 0; slot < num_slots; ++slot) {
      int64_t expert = in.topk_idx[slot];
      DEEP_EP_CHECK(expert >= -1 && expert < args.num_experts, "normal_dispatch: rank ", r, " topk_idx[",
                    slot / args.num_topk, "][", slot % args.num_topk, "] = ", expert, " is outside [-1, ",
                    args.num_experts, ")");
    }
  }
}

bool sends_to(const NormalDispatchInput& in, int token, int rank, int num_ranks) {
  return in.is_token_in_rank[static_cast<size_t>(token) * num_ranks + rank] != 0;
}

}  // namespace

std::vector<NormalDispatchOutput> normal_dispatch(const std::vector<NormalDispatchInput>& inputs,
                                                  const NormalDispatchArgs& args) {
  validate(inputs, args);
  const int num_ranks = args.num_ranks;
  const int num_topk = args.num_topk;
  const int num_local_experts = num_topk > 0 ? args.num_experts / num_ranks : 0;
  const size_t row_bytes = static_cast<size_t>(args.row_bytes);
  const size_t num_scales = static_cast<size_t>(args.num_scales);

  // rank_prefix_matrix[i][j]: tokens sent to rank j by ranks 0..i. Every rank holds the same copy.
  std::vector<int32_t> rank_prefix_matrix(static_cast<size_t>(num_ranks) * num_ranks, 0);
  for (int i = 0; i < num_ranks; ++i) {
    for (int j = 0; j < num_ranks; ++j) {
      int32_t sent = 0;
      for (int t = 0; t < inputs[i].num_tokens; ++t) sent += sends_to(inputs[i], t, j, num_ranks) ? 1 : 0;
      int32_t before = i > 0 ? rank_prefix_matrix[static_cast<size_t>(i - 1) * num_ranks + j] : 0;
      rank_prefix_matrix[static_cast<size_t>(i) * num_ranks + j] = before + sent;
    }
  }

  std::vector<NormalDispatchOutput> outputs(num_ranks);
  for (int j = 0; j < num_ranks; ++j) {
    NormalDispatchOutput& out = outputs[j];
    const int num_recv_tokens = rank_prefix_matrix[static_cast<size_t>(num_ranks - 1) * num_ranks + j];
    DEEP_EP_CHECK(args.num_worst_tokens == 0 || num_recv_tokens <= args.num_worst_tokens, "normal_dispatch: rank ", j,
                  " receives ", num_recv_tokens, " tokens, more than num_worst_tokens = ", args.num_worst_tokens);
    const int num_rows = args.num_worst_tokens > 0 ? args.num_worst_tokens : num_recv_tokens;
    out.num_recv_tokens = num_recv_tokens;
    out.num_rows = num_rows;
    out.rank_prefix_matrix = rank_prefix_matrix;
    out.recv_src_idx.assign(num_recv_tokens, 0);
    // Another rank's outputs under only_rank: the routing normal_combine reads (recv_src_idx), without the rows.
    const bool fill = args.only_rank < 0 || j == args.only_rank;
    if (fill) {
      // Padding rows (past num_recv_tokens) keep these fill values: zero payload, no expert, zero weight.
      out.recv_x.assign(num_rows * row_bytes, 0);
      out.recv_x_scales.assign(num_rows * num_scales, 0.0f);
      out.recv_topk_idx.assign(static_cast<size_t>(num_rows) * num_topk, -1);
      out.recv_topk_weights.assign(static_cast<size_t>(num_rows) * num_topk, 0.0f);
    }

    const int64_t first_local_expert = static_cast<int64_t>(j) * num_local_experts;
    std::vector<int32_t> num_slots_per_local_expert(num_local_experts, 0);
    size_t next_row = 0;
    for (int i = 0; i < num_ranks; ++i) {
      const NormalDispatchInput& in = inputs[i];
      for (int t = 0; t < in.num_tokens; ++t) {
        if (!sends_to(in, t, j, num_ranks)) continue;
        const size_t row = next_row++;
        out.recv_src_idx[row] = t;
        if (!fill) continue;
        std::memcpy(out.recv_x.data() + row * row_bytes, in.x.data() + t * row_bytes, row_bytes);
        std::copy_n(in.x_scales.data() + t * num_scales, num_scales, out.recv_x_scales.data() + row * num_scales);
        for (int k = 0; k < num_topk; ++k) {
          const size_t src_slot = static_cast<size_t>(t) * num_topk + k;
          const size_t dst_slot = row * num_topk + k;
          const int64_t expert = in.topk_idx[src_slot];
          if (expert < first_local_expert || expert >= first_local_expert + num_local_experts) continue;
          const int64_t local_expert = expert - first_local_expert;
          out.recv_topk_idx[dst_slot] = local_expert;
          out.recv_topk_weights[dst_slot] = in.topk_weights[src_slot];
          // Counted per (row, k) slot, like num_tokens_per_expert of the layout, so a token that picks
          // the same local expert twice counts twice.
          ++num_slots_per_local_expert[local_expert];
        }
      }
    }

    if (!fill) continue;
    out.num_recv_tokens_per_expert.resize(num_local_experts);
    for (int l = 0; l < num_local_experts; ++l) {
      const int32_t alignment = args.expert_alignment;
      out.num_recv_tokens_per_expert[l] = (num_slots_per_local_expert[l] + alignment - 1) / alignment * alignment;
    }
  }
  return outputs;
}

}  // namespace deep_ep::reference
