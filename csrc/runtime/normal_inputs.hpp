// Validation of the tensors a normal-mode dispatch or combine gets (docs/design.md decision 7), shared by the
// intranode and internode ops: every message names the argument, what was expected and what was given.
#pragma once

#include <cstdint>
#include <optional>

#include "deep_ep/tensor.hpp"

namespace deep_ep {

struct NormalDispatchShape {
  int64_t num_tokens = 0, hidden = 0, row_bytes = 0;
  bool fp8 = false;
  int num_scales = 0;  // hidden / 128 for FP8, else 0
  int64_t scale_token_stride = 0, scale_channel_stride = 0;
  int num_topk = 0;  // 0 without top-k
};

// x (bf16, or e4m3 with x_scales of any strides), topk_idx / topk_weights (both or neither),
// num_worst_tokens and expert_alignment.
NormalDispatchShape check_normal_dispatch_inputs(const TensorView& x, const std::optional<TensorView>& x_scales,
                                                 const std::optional<TensorView>& topk_idx,
                                                 const std::optional<TensorView>& topk_weights, int num_worst_tokens,
                                                 int expert_alignment, int device);

struct NormalCombineShape {
  int64_t num_rows = 0, hidden = 0;
  int num_topk = 0;  // 0 without topk_weights
};

// x (bf16 [rows, H]), topk_weights ([rows, K] or none) and the biases ([num_tokens, H] each).
NormalCombineShape check_normal_combine_inputs(const TensorView& x, const std::optional<TensorView>& topk_weights,
                                               const std::optional<TensorView>& bias_0,
                                               const std::optional<TensorView>& bias_1, int64_t num_tokens, int device);

}  // namespace deep_ep
