// Normal-mode combine of the CPU reference (docs/compatibility.md section 7): each token's rows come back from the
// ranks that received it and are summed on its home rank, routed only by the dispatch handle
// (is_token_in_rank, rank_prefix_matrix, recv_src_idx), as the GPU kernels route them.
#include "deep_ep/error.hpp"
#include "deep_ep/reference.hpp"

namespace deep_ep::reference {
namespace {

// Rows a combine input may hold for rank j: one per real received row, or one per output row of a
// num_worst_tokens dispatch (the padding rows are then ignored).
bool is_row_count_of(size_t num_elements, size_t row_elements, const NormalDispatchOutput& dispatched) {
  return num_elements == static_cast<size_t>(dispatched.num_recv_tokens) * row_elements ||
         num_elements == static_cast<size_t>(dispatched.num_rows) * row_elements;
}

// row_of[r][t]: the row of rank j's received rows that holds token t of rank r, or -1. Built from
// the handle alone: rows [P[r-1][j], P[r][j]) of rank j came from rank r, recv_src_idx names the token.
std::vector<std::vector<int>> rows_by_source(const std::vector<NormalDispatchInput>& dispatch_inputs,
                                             const NormalDispatchOutput& dispatched, int j) {
  const int num_ranks = static_cast<int>(dispatch_inputs.size());
  const std::vector<int32_t>& prefix = dispatched.rank_prefix_matrix;
  DEEP_EP_CHECK(prefix.size() == static_cast<size_t>(num_ranks) * num_ranks, "normal_combine: rank ", j,
                " rank_prefix_matrix must be [", num_ranks, ", ", num_ranks, "], got ", prefix.size(), " elements");
  DEEP_EP_CHECK(dispatched.recv_src_idx.size() == static_cast<size_t>(dispatched.num_recv_tokens),
                "normal_combine: rank ", j, " recv_src_idx must hold ", dispatched.num_recv_tokens, " rows, got ",
                dispatched.recv_src_idx.size());

  std::vector<std::vector<int>> row_of(num_ranks);
  for (int r = 0; r < num_ranks; ++r) {
    row_of[r].assign(dispatch_inputs[r].num_tokens, -1);
    const int begin = r > 0 ? prefix[static_cast<size_t>(r - 1) * num_ranks + j] : 0;
    const int end = prefix[static_cast<size_t>(r) * num_ranks + j];
    DEEP_EP_CHECK(0 <= begin && begin <= end && end <= dispatched.num_recv_tokens, "normal_combine: rank ", j,
                  " rank_prefix_matrix gives rows [", begin, ", ", end, ") for source rank ", r, " out of ",
                  dispatched.num_recv_tokens);
    for (int row = begin; row < end; ++row) {
      const int32_t token = dispatched.recv_src_idx[row];
      DEEP_EP_CHECK(token >= 0 && token < dispatch_inputs[r].num_tokens, "normal_combine: rank ", j, " recv_src_idx[",
                    row, "] = ", token, " is outside the ", dispatch_inputs[r].num_tokens, " tokens of source rank ",
                    r);
      row_of[r][token] = row;
    }
  }
  return row_of;
}

}  // namespace

std::vector<NormalCombineOutput> normal_combine(const std::vector<NormalDispatchInput>& dispatch_inputs,
                                                const std::vector<NormalDispatchOutput>& dispatch_outputs,
                                                const std::vector<NormalCombineInput>& inputs, int hidden, int num_topk,
                                                int num_ranks_per_node, int only_rank) {
  const int num_ranks = static_cast<int>(dispatch_inputs.size());
  DEEP_EP_CHECK(num_ranks > 0, "normal_combine: needs at least one rank");
  DEEP_EP_CHECK(dispatch_outputs.size() == dispatch_inputs.size() && inputs.size() == dispatch_inputs.size(),
                "normal_combine: expected one dispatch input, dispatch output and combine input per rank (", num_ranks,
                "), got ", dispatch_outputs.size(), " and ", inputs.size());
  DEEP_EP_CHECK(hidden >= 0, "normal_combine: hidden must be >= 0, got ", hidden);
  DEEP_EP_CHECK(num_topk >= 0, "normal_combine: num_topk must be >= 0, got ", num_topk);
  DEEP_EP_CHECK(num_ranks_per_node >= 0, "normal_combine: num_ranks_per_node must be >= 0, got ", num_ranks_per_node);
  DEEP_EP_CHECK(only_rank >= -1 && only_rank < num_ranks, "normal_combine: only_rank must be -1 or in [0, ", num_ranks,
                "), got ", only_rank);
  // Flat order: every rank in one group whose sum is not rounded before the bias.
  const bool hierarchical = num_ranks_per_node > 0 && num_ranks_per_node < num_ranks;
  DEEP_EP_CHECK(!hierarchical || num_ranks % num_ranks_per_node == 0, "normal_combine: num_ranks (", num_ranks,
                ") must be a multiple of num_ranks_per_node (", num_ranks_per_node, ")");
  const int group_size = hierarchical ? num_ranks_per_node : num_ranks;
  const size_t row_elements = static_cast<size_t>(hidden);
  const size_t weight_elements = static_cast<size_t>(num_topk);

  std::vector<std::vector<std::vector<int>>> row_of(num_ranks);  // [receiver j][source r][token t]
  for (int j = 0; j < num_ranks; ++j) {
    DEEP_EP_CHECK(is_row_count_of(inputs[j].x.size(), row_elements, dispatch_outputs[j]), "normal_combine: rank ", j,
                  " x must be [", dispatch_outputs[j].num_recv_tokens, " or ", dispatch_outputs[j].num_rows, ", ",
                  hidden, "], got ", inputs[j].x.size(), " elements");
    DEEP_EP_CHECK(is_row_count_of(inputs[j].topk_weights.size(), weight_elements, dispatch_outputs[j]),
                  "normal_combine: rank ", j, " topk_weights must be [", dispatch_outputs[j].num_recv_tokens, " or ",
                  dispatch_outputs[j].num_rows, ", ", num_topk, "], got ", inputs[j].topk_weights.size(), " elements");
    row_of[j] = rows_by_source(dispatch_inputs, dispatch_outputs[j], j);
  }

  std::vector<NormalCombineOutput> outputs(num_ranks);
  for (int r = 0; r < num_ranks; ++r) {
    if (only_rank >= 0 && r != only_rank) continue;
    const NormalDispatchInput& home = dispatch_inputs[r];
    const size_t num_tokens = static_cast<size_t>(home.num_tokens);
    const NormalCombineInput& in = inputs[r];
    DEEP_EP_CHECK(home.is_token_in_rank.size() == num_tokens * num_ranks, "normal_combine: rank ", r,
                  " is_token_in_rank must be [", num_tokens, ", ", num_ranks, "]");
    DEEP_EP_CHECK(in.bias_0.empty() || in.bias_0.size() == num_tokens * row_elements, "normal_combine: rank ", r,
                  " bias_0 must be empty or [", num_tokens, ", ", hidden, "], got ", in.bias_0.size(), " elements");
    DEEP_EP_CHECK(in.bias_1.empty() || in.bias_1.size() == num_tokens * row_elements, "normal_combine: rank ", r,
                  " bias_1 must be empty or [", num_tokens, ", ", hidden, "], got ", in.bias_1.size(), " elements");

    NormalCombineOutput& out = outputs[r];
    out.combined_x.assign(num_tokens * row_elements, 0);
    out.combined_topk_weights.assign(num_tokens * weight_elements, 0.0f);
    std::vector<float> sum(row_elements);
    std::vector<float> partial(row_elements);
    std::vector<float> partial_weights(weight_elements);
    for (size_t t = 0; t < num_tokens; ++t) {
      sum.assign(row_elements, 0.0f);
      float* weights = out.combined_topk_weights.data() + t * weight_elements;
      // Groups (nodes) in increasing order, ranks in increasing order inside each: float32 addition is
      // not associative, and the GPU kernels sum in this order too.
      for (int begin = 0; begin < num_ranks; begin += group_size) {
        float* acc = hierarchical ? partial.data() : sum.data();
        float* acc_weights = hierarchical ? partial_weights.data() : weights;
        if (hierarchical) {
          partial.assign(row_elements, 0.0f);
          partial_weights.assign(weight_elements, 0.0f);
        }
        bool any = false;
        for (int j = begin; j < begin + group_size; ++j) {
          if (home.is_token_in_rank[t * num_ranks + j] == 0) continue;
          const int row = row_of[j][r][t];
          DEEP_EP_CHECK(row >= 0, "normal_combine: is_token_in_rank of rank ", r, " sends token ", t, " to rank ", j,
                        ", but rank ", j, "'s handle holds no row for it");
          any = true;
          const uint16_t* x = inputs[j].x.data() + static_cast<size_t>(row) * row_elements;
          for (size_t c = 0; c < row_elements; ++c) acc[c] += bf16_to_float(x[c]);
          const float* returned = inputs[j].topk_weights.data() + static_cast<size_t>(row) * weight_elements;
          for (size_t k = 0; k < weight_elements; ++k) acc_weights[k] += returned[k];
        }
        if (!any || !hierarchical) continue;
        // The forwarder rank of this node sends its partial sum on as bf16; weights stay float32.
        for (size_t c = 0; c < row_elements; ++c) sum[c] += bf16_to_float(float_to_bf16(partial[c]));
        for (size_t k = 0; k < weight_elements; ++k) weights[k] += partial_weights[k];
      }
      // Bias last, bias_0 before bias_1, then one rounding to bf16.
      for (size_t c = 0; c < row_elements; ++c) {
        float value = sum[c];
        if (!in.bias_0.empty()) value += bf16_to_float(in.bias_0[t * row_elements + c]);
        if (!in.bias_1.empty()) value += bf16_to_float(in.bias_1[t * row_elements + c]);
        out.combined_x[t * row_elements + c] = float_to_bf16(value);
      }
    }
  }
  return outputs;
}

}  // namespace deep_ep::reference
