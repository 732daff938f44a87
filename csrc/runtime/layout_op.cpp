// Buffer::get_dispatch_layout: validation (docs/design.md decision 7), then the layout kernel.
#include "deep_ep/buffer.hpp"
#include "deep_ep/error.hpp"
#include "kernels/layout/layout.hpp"
#include "runtime/buffer_internals.hpp"
#include "util/cuda_check.hpp"

namespace deep_ep {

void Buffer::get_dispatch_layout(const TensorView& topk_idx, int num_experts, const LayoutOutputs& out,
                                 cudaStream_t stream) {
  check_device_errors();
  const int device = options_.device;
  DEEP_EP_TYPE_CHECK(topk_idx.dim() == 2, "topk_idx must be a 2-D int64 tensor [num_tokens, num_topk], got ",
                     topk_idx.describe());
  check_tensor(topk_idx, "topk_idx", {DType::kInt64, {kAnySize, kAnySize}, true, device});
  const int64_t num_tokens = topk_idx.size(0), num_topk = topk_idx.size(1);
  DEEP_EP_CHECK(num_topk >= 1 && num_topk <= kNumMaxTopk, "topk_idx must have 1 to ", kNumMaxTopk,
                " columns (num_topk), got ", num_topk);
  DEEP_EP_CHECK(num_experts > 0 && num_experts % num_ranks_ == 0, "num_experts must be a positive multiple of ",
                "the number of ranks (", num_ranks_, "), got ", num_experts);
  DEEP_EP_CHECK(num_tokens < (int64_t(1) << 31) / num_ranks_, "topk_idx has too many tokens: ", num_tokens);
  check_tensor(out.num_tokens_per_rank, "num_tokens_per_rank", {DType::kInt32, {num_ranks_}, true, device});
  check_tensor(out.num_tokens_per_expert, "num_tokens_per_expert", {DType::kInt32, {num_experts}, true, device});
  check_tensor(out.is_token_in_rank, "is_token_in_rank", {DType::kBool, {num_tokens, num_ranks_}, true, device});
  int* per_rdma_rank = nullptr;
  const int num_nodes = this->num_nodes();
  if (num_nodes > 1) {
    DEEP_EP_CHECK(out.num_tokens_per_rdma_rank.has_value(), "num_tokens_per_rdma_rank is required with ", num_nodes,
                  " nodes");
    check_tensor(*out.num_tokens_per_rdma_rank, "num_tokens_per_rdma_rank", {DType::kInt32, {num_nodes}, true, device});
    per_rdma_rank = out.num_tokens_per_rdma_rank->ptr<int>();
  }
  DEEP_EP_CUDA_CHECK(cudaSetDevice(device));
  layout::launch_get_dispatch_layout(topk_idx.ptr<int64_t>(), static_cast<int>(num_tokens), static_cast<int>(num_topk),
                                     num_ranks_, num_experts, out.num_tokens_per_rank.ptr<int>(), per_rdma_rank,
                                     out.num_tokens_per_expert.ptr<int>(), out.is_token_in_rank.ptr<bool>(),
                                     internals_->device_diagnostics(), rank_, num_ranks_per_node(), stream);
}

}  // namespace deep_ep
