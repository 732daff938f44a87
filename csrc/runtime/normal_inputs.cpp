// Validation shared by the normal-mode ops (normal_inputs.hpp).
#include "runtime/normal_inputs.hpp"

#include "deep_ep/config.hpp"
#include "deep_ep/error.hpp"

namespace deep_ep {

namespace {

// The kernels move rows in 16-byte vectors: a view that starts mid-vector would fault on the GPU.
void check_aligned_rows(const TensorView& t, const char* name) {
  DEEP_EP_CHECK(reinterpret_cast<uintptr_t>(t.data) % 16 == 0, name,
                " must start at a 16-byte aligned address (a view with a storage offset that is not a multiple of ",
                16 / dtype_size(t.dtype), " elements?), got ", t.describe());
}

}  // namespace

NormalDispatchShape check_normal_dispatch_inputs(const TensorView& x, const std::optional<TensorView>& x_scales,
                                                 const std::optional<TensorView>& topk_idx,
                                                 const std::optional<TensorView>& topk_weights, int num_worst_tokens,
                                                 int expert_alignment, int device) {
  NormalDispatchShape s;
  s.fp8 = x_scales.has_value();
  DEEP_EP_CHECK(x.dim() == 2, "x must be 2-D [num_tokens, hidden], got ", x.describe());
  check_tensor(x, "x", {s.fp8 ? DType::kFloat8E4M3 : DType::kBFloat16, {kAnySize, kAnySize}, true, device});
  s.num_tokens = x.size(0);
  s.hidden = x.size(1);
  s.row_bytes = s.hidden * dtype_size(x.dtype);
  DEEP_EP_CHECK(s.hidden > 0 && s.row_bytes % 16 == 0,
                "x rows must be a positive multiple of 16 bytes, got hidden=", s.hidden, " (", s.row_bytes, " bytes)");
  check_aligned_rows(x, "x");
  if (s.fp8) {
    DEEP_EP_CHECK(s.hidden % 128 == 0,
                  "FP8 x needs hidden % 128 == 0 (one scale per 128 channels), got hidden=", s.hidden);
    s.num_scales = static_cast<int>(s.hidden / 128);
    check_tensor(*x_scales, "x_scales", {DType::kFloat32, {s.num_tokens, s.num_scales}, false, device});
    s.scale_token_stride = x_scales->strides[0];
    s.scale_channel_stride = x_scales->strides[1];
  }
  DEEP_EP_CHECK(topk_idx.has_value() == topk_weights.has_value(),
                "topk_idx and topk_weights must be given together (both or neither)");
  if (topk_idx) {
    DEEP_EP_CHECK(topk_idx->dim() == 2, "topk_idx must be 2-D [num_tokens, num_topk], got ", topk_idx->describe());
    s.num_topk = static_cast<int>(topk_idx->size(1));
    DEEP_EP_CHECK(s.num_topk >= 1 && s.num_topk <= kNumMaxTopk, "num_topk must be in [1, ", kNumMaxTopk, "], got ",
                  s.num_topk);
    check_tensor(*topk_idx, "topk_idx", {DType::kInt64, {s.num_tokens, s.num_topk}, true, device});
    check_tensor(*topk_weights, "topk_weights", {DType::kFloat32, {s.num_tokens, s.num_topk}, true, device});
  }
  DEEP_EP_CHECK(num_worst_tokens >= 0, "num_worst_tokens must be >= 0, got ", num_worst_tokens);
  DEEP_EP_CHECK(expert_alignment >= 1, "expert_alignment must be >= 1, got ", expert_alignment);
  return s;
}

NormalCombineShape check_normal_combine_inputs(const TensorView& x, const std::optional<TensorView>& topk_weights,
                                               const std::optional<TensorView>& bias_0,
                                               const std::optional<TensorView>& bias_1, int64_t num_tokens,
                                               int device) {
  NormalCombineShape s;
  DEEP_EP_CHECK(x.dim() == 2, "x must be 2-D [num_recv_tokens, hidden], got ", x.describe());
  check_tensor(x, "x", {DType::kBFloat16, {kAnySize, kAnySize}, true, device});
  s.num_rows = x.size(0);
  s.hidden = x.size(1);
  DEEP_EP_CHECK(s.hidden > 0 && s.hidden % 8 == 0,
                "combine x rows must be a positive multiple of 16 bytes, got hidden=", s.hidden);
  check_aligned_rows(x, "x");
  if (topk_weights) {
    DEEP_EP_CHECK(topk_weights->dim() == 2, "topk_weights must be 2-D [num_recv_tokens, num_topk], got ",
                  topk_weights->describe());
    s.num_topk = static_cast<int>(topk_weights->size(1));
    DEEP_EP_CHECK(s.num_topk >= 1 && s.num_topk <= kNumMaxTopk, "num_topk must be in [1, ", kNumMaxTopk, "], got ",
                  s.num_topk);
    check_tensor(*topk_weights, "topk_weights", {DType::kFloat32, {s.num_rows, s.num_topk}, true, device});
  }
  if (bias_0) {
    check_tensor(*bias_0, "bias[0]", {DType::kBFloat16, {num_tokens, s.hidden}, true, device});
    check_aligned_rows(*bias_0, "bias[0]");
  }
  if (bias_1) {
    check_tensor(*bias_1, "bias[1]", {DType::kBFloat16, {num_tokens, s.hidden}, true, device});
    check_aligned_rows(*bias_1, "bias[1]");
  }
  return s;
}

}  // namespace deep_ep
