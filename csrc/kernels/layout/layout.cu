// get_dispatch_layout kernel: one launch, no memsets and no global atomics. The grid splits the outputs,
// not the tokens: an expert block owns 64 experts and counts their slots over every token (coalesced reads
// of topk_idx as one flat array, counts in shared memory); a rank block owns up to 32 ranks (a whole node
// when num_tokens_per_rdma_rank is wanted) and, per token, writes those ranks' is_token_in_rank entries
// and counts the tokens per rank and per node. topk_idx is small (T x K x 8 bytes), so every block
// reading it all costs less than the launches and atomics of a token-split grid.
#include <algorithm>

#include "deep_ep/error.hpp"

#include "kernels/common/device_utils.cuh"
#include "kernels/layout/layout.hpp"
#include "util/cuda_check.hpp"

namespace deep_ep::layout {

namespace {

constexpr int kThreads = 256;
constexpr int kExpertsPerBlock = 64;
constexpr int kMaxRanksPerBlock = 32;  // a uint32 mask per token

__global__ void __launch_bounds__(kThreads)
    get_dispatch_layout(const int64_t* topk_idx, int num_tokens, int num_topk, int num_ranks, int num_experts,
                        int* num_tokens_per_rank, int* num_tokens_per_rdma_rank, int* num_tokens_per_expert,
                        bool* is_token_in_rank, DeviceDiagnostics* diagnostics, int rank, int ranks_per_block,
                        int num_expert_blocks) {
  __shared__ int counts[kExpertsPerBlock];  // this block's experts, or its ranks
  __shared__ int node_count;
  for (int i = threadIdx.x; i < kExpertsPerBlock; i += blockDim.x) counts[i] = 0;
  if (threadIdx.x == 0) node_count = 0;
  __syncthreads();

  if (static_cast<int>(blockIdx.x) < num_expert_blocks) {
    const int first_expert = blockIdx.x * kExpertsPerBlock;
    const int num_owned_experts = min(kExpertsPerBlock, num_experts - first_expert);
    const int64_t num_slots = static_cast<int64_t>(num_tokens) * num_topk;
    for (int64_t i = threadIdx.x; i < num_slots; i += blockDim.x) {
      const int64_t expert_offset = __ldg(topk_idx + i) - first_expert;
      if (expert_offset >= 0 && expert_offset < num_owned_experts) atomicAdd(&counts[expert_offset], 1);
    }
    __syncthreads();
    for (int i = threadIdx.x; i < num_owned_experts; i += blockDim.x)
      num_tokens_per_expert[first_expert + i] = counts[i];
    return;
  }

  const int rank_block = blockIdx.x - num_expert_blocks;
  const int first_rank = rank_block * ranks_per_block;
  const int num_owned_ranks = min(ranks_per_block, num_ranks - first_rank);
  const int experts_per_rank = num_experts / num_ranks;
  for (int token = threadIdx.x; token < num_tokens; token += blockDim.x) {
    const int64_t* row = topk_idx + static_cast<int64_t>(token) * num_topk;
    uint32_t mask = 0;
    for (int k = 0; k < num_topk; ++k) {
      const int64_t expert = __ldg(row + k);
      if (expert == -1) continue;
      if (expert < -1 || expert >= num_experts) {
        // Reported once (by the first rank block); the slot is skipped everywhere.
        if (rank_block == 0)
          device::report(diagnostics, Phase::kLayoutExpertRange, false, rank, -1, -1, token, num_experts, expert);
        continue;
      }
      const int rank_offset = static_cast<int>(expert) / experts_per_rank - first_rank;
      if (rank_offset >= 0 && rank_offset < num_owned_ranks) mask |= 1u << rank_offset;
    }
    bool* in_rank = is_token_in_rank + static_cast<int64_t>(token) * num_ranks + first_rank;
    for (int j = 0; j < num_owned_ranks; ++j) in_rank[j] = (mask >> j) & 1u;
    for (uint32_t bits = mask; bits != 0; bits &= bits - 1) atomicAdd(&counts[__ffs(bits) - 1], 1);
    if (num_tokens_per_rdma_rank != nullptr && mask != 0) atomicAdd(&node_count, 1);
  }
  __syncthreads();
  for (int j = threadIdx.x; j < num_owned_ranks; j += blockDim.x) num_tokens_per_rank[first_rank + j] = counts[j];
  // With num_tokens_per_rdma_rank, a rank block is one node (ranks_per_block == ranks per node).
  if (num_tokens_per_rdma_rank != nullptr && threadIdx.x == 0) num_tokens_per_rdma_rank[rank_block] = node_count;
}

}  // namespace

void launch_get_dispatch_layout(const int64_t* topk_idx, int num_tokens, int num_topk, int num_ranks, int num_experts,
                                int* num_tokens_per_rank, int* num_tokens_per_rdma_rank, int* num_tokens_per_expert,
                                bool* is_token_in_rank, DeviceDiagnostics* diagnostics, int rank,
                                int num_ranks_per_node, cudaStream_t stream) {
  const int ranks_per_block = num_tokens_per_rdma_rank ? num_ranks_per_node : std::min(num_ranks, kMaxRanksPerBlock);
  DEEP_EP_CHECK(ranks_per_block >= 1 && ranks_per_block <= kMaxRanksPerBlock, "get_dispatch_layout supports at most ",
                kMaxRanksPerBlock, " ranks per node, got ", ranks_per_block);
  const int num_expert_blocks = (num_experts + kExpertsPerBlock - 1) / kExpertsPerBlock;
  const int num_rank_blocks = (num_ranks + ranks_per_block - 1) / ranks_per_block;
  get_dispatch_layout<<<num_expert_blocks + num_rank_blocks, kThreads, 0, stream>>>(
      topk_idx, num_tokens, num_topk, num_ranks, num_experts, num_tokens_per_rank, num_tokens_per_rdma_rank,
      num_tokens_per_expert, is_token_in_rank, diagnostics, rank, ranks_per_block, num_expert_blocks);
  DEEP_EP_CUDA_CHECK(cudaGetLastError());
}

}  // namespace deep_ep::layout
