// get_dispatch_layout kernel: one thread per token, block-level histograms in shared memory when they
// fit, merged into the global counts with one atomic per non-zero bin.
#include <algorithm>

#include "kernels/common/device_utils.cuh"
#include "kernels/layout/layout.hpp"
#include "runtime/cuda_check.hpp"

namespace deep_ep::layout {

namespace {

constexpr int kThreads = 256;
constexpr int kMaxSharedBins = 12 * 1024;  // 48 KB of int32 bins

__device__ __forceinline__ bool valid_expert(int64_t e, int num_experts) { return e >= 0 && e < num_experts; }

__global__ void __launch_bounds__(kThreads) get_dispatch_layout(
    const int64_t* topk_idx, int num_tokens, int num_topk, int num_ranks, int num_experts,
    int* num_tokens_per_rank, int* num_tokens_per_rdma_rank, int* num_tokens_per_expert, bool* is_token_in_rank,
    DeviceDiagnostics* diagnostics, int rank, bool shared_bins, int num_ranks_per_node) {
  extern __shared__ int bins[];  // [num_experts | num_ranks | num_nodes]
  const int num_nodes = num_tokens_per_rdma_rank ? num_ranks / num_ranks_per_node : 0;
  const int experts_per_rank = num_experts / num_ranks;
  int* expert_bins = shared_bins ? bins : num_tokens_per_expert;
  int* rank_bins = shared_bins ? bins + num_experts : num_tokens_per_rank;
  int* node_bins = shared_bins ? bins + num_experts + num_ranks : num_tokens_per_rdma_rank;
  if (shared_bins) {
    for (int i = threadIdx.x; i < num_experts + num_ranks + num_nodes; i += blockDim.x) bins[i] = 0;
    __syncthreads();
  }

  for (int t = blockIdx.x * blockDim.x + threadIdx.x; t < num_tokens; t += gridDim.x * blockDim.x) {
    const int64_t* row = topk_idx + static_cast<int64_t>(t) * num_topk;
    bool* in_rank = is_token_in_rank + static_cast<int64_t>(t) * num_ranks;
    for (int k = 0; k < num_topk; ++k) {
      const int64_t e = row[k];
      if (e == -1) continue;
      if (!valid_expert(e, num_experts)) {
        device::report(diagnostics, Phase::kLayoutExpertRange, false, rank, -1, -1, t, num_experts, e);
        continue;
      }
      atomicAdd(&expert_bins[e], 1);
      // A token counts once per rank and once per node: only the first slot naming them counts.
      const int dst_rank = static_cast<int>(e) / experts_per_rank;
      bool rank_seen = false, node_seen = false;
      for (int k2 = 0; k2 < k; ++k2) {
        const int64_t e2 = row[k2];
        if (!valid_expert(e2, num_experts)) continue;
        const int r2 = static_cast<int>(e2) / experts_per_rank;
        rank_seen |= r2 == dst_rank;
        node_seen |= r2 / num_ranks_per_node == dst_rank / num_ranks_per_node;
      }
      if (!rank_seen) {
        in_rank[dst_rank] = true;
        atomicAdd(&rank_bins[dst_rank], 1);
      }
      if (num_nodes > 0 && !node_seen) atomicAdd(&node_bins[dst_rank / num_ranks_per_node], 1);
    }
  }

  if (shared_bins) {
    __syncthreads();
    for (int i = threadIdx.x; i < num_experts; i += blockDim.x)
      if (bins[i]) atomicAdd(&num_tokens_per_expert[i], bins[i]);
    for (int i = threadIdx.x; i < num_ranks; i += blockDim.x)
      if (bins[num_experts + i]) atomicAdd(&num_tokens_per_rank[i], bins[num_experts + i]);
    for (int i = threadIdx.x; i < num_nodes; i += blockDim.x)
      if (bins[num_experts + num_ranks + i]) atomicAdd(&num_tokens_per_rdma_rank[i], bins[num_experts + num_ranks + i]);
  }
}

}  // namespace

void launch_get_dispatch_layout(const int64_t* topk_idx, int num_tokens, int num_topk, int num_ranks,
                                int num_experts, int* num_tokens_per_rank, int* num_tokens_per_rdma_rank,
                                int* num_tokens_per_expert, bool* is_token_in_rank, DeviceDiagnostics* diagnostics,
                                int rank, int num_ranks_per_node, cudaStream_t stream) {
  const int num_nodes = num_tokens_per_rdma_rank ? num_ranks / num_ranks_per_node : 0;
  DEEP_EP_CUDA_CHECK(cudaMemsetAsync(num_tokens_per_rank, 0, sizeof(int) * num_ranks, stream));
  if (num_nodes) DEEP_EP_CUDA_CHECK(cudaMemsetAsync(num_tokens_per_rdma_rank, 0, sizeof(int) * num_nodes, stream));
  DEEP_EP_CUDA_CHECK(cudaMemsetAsync(num_tokens_per_expert, 0, sizeof(int) * num_experts, stream));
  if (num_tokens == 0) return;
  DEEP_EP_CUDA_CHECK(cudaMemsetAsync(is_token_in_rank, 0, sizeof(bool) * num_tokens * num_ranks, stream));
  const int num_bins = num_experts + num_ranks + num_nodes;
  const bool shared_bins = num_bins <= kMaxSharedBins;
  const int num_blocks = std::min((num_tokens + kThreads - 1) / kThreads, 132);
  get_dispatch_layout<<<num_blocks, kThreads, shared_bins ? num_bins * sizeof(int) : 0, stream>>>(
      topk_idx, num_tokens, num_topk, num_ranks, num_experts, num_tokens_per_rank, num_tokens_per_rdma_rank,
      num_tokens_per_expert, is_token_in_rank, diagnostics, rank, shared_bins, num_ranks_per_node);
  DEEP_EP_CUDA_CHECK(cudaGetLastError());
}

}  // namespace deep_ep::layout
