// get_dispatch_layout kernel: one launch, no memsets and no global atomics. The grid splits the outputs,
// not the tokens: an expert block owns 64 experts and counts their slots over every token (coalesced reads
// of topk_idx as one flat array, counts in shared memory); a rank block owns up to 32 ranks (a whole node
// when num_tokens_per_rdma_rank is wanted) and, per token, writes those ranks' is_token_in_rank entries
// and counts the tokens per rank and per node (ballots per warp, one shared add per warp and rank at the end).
// topk_idx is small (T x K x 8 bytes), so every block reading it all costs less than the launches and atomics of
// a token-split grid; the kernel is bound by load latency, so every thread keeps several loads in flight.
#include <algorithm>

#include "deep_ep/error.hpp"

#include "kernels/common/device_utils.cuh"
#include "kernels/layout/layout.hpp"
#include "util/cuda_check.hpp"

namespace deep_ep::layout {

namespace {

constexpr int kThreads = 256;
// topk_idx slots a thread loads before it uses any (the kernel reads a few hundred KB and is bound by memory
// latency, not bandwidth): expert blocks over the flat array, rank blocks over a token's ids.
constexpr int kSlotsPerRound = 8;
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
    for (int64_t base = threadIdx.x; base < num_slots; base += static_cast<int64_t>(blockDim.x) * kSlotsPerRound) {
      int64_t experts[kSlotsPerRound];
#pragma unroll
      for (int u = 0; u < kSlotsPerRound; ++u) {
        const int64_t i = base + static_cast<int64_t>(u) * blockDim.x;  // coalesced across the block for each u
        experts[u] = i < num_slots ? __ldg(topk_idx + i) : -1;
      }
#pragma unroll
      for (int u = 0; u < kSlotsPerRound; ++u) {
        const int64_t expert_offset = experts[u] - first_expert;
        if (expert_offset >= 0 && expert_offset < num_owned_experts) atomicAdd(&counts[expert_offset], 1);
      }
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
  // Counts per warp, lane j holding rank j's (ballots per round of 32 tokens): a shared atomic per token and rank
  // would put every thread of the block on the same few counters. Rounds are warp-uniform for the ballots.
  const int lane = device::lane_id();
  int rank_count = 0, node_tokens = 0;
  for (int first_token = threadIdx.x - lane; first_token < num_tokens; first_token += blockDim.x) {
    const int token = first_token + lane;
    uint32_t mask = 0;
    int64_t bad_expert = -1;
    if (token < num_tokens) {
      const int64_t* row = topk_idx + static_cast<int64_t>(token) * num_topk;
      // A token's ids are loaded kSlotsPerRound at a time before any is used.
      for (int k0 = 0; k0 < num_topk; k0 += kSlotsPerRound) {
        int64_t experts[kSlotsPerRound];
#pragma unroll
        for (int u = 0; u < kSlotsPerRound; ++u) experts[u] = k0 + u < num_topk ? __ldg(row + k0 + u) : -1;
#pragma unroll
        for (int u = 0; u < kSlotsPerRound; ++u) {
          const int64_t expert = experts[u];
          if (expert == -1) continue;
          if (expert < -1 || expert >= num_experts) {
            bad_expert = expert;  // the slot is skipped everywhere; reported below
            continue;
          }
          const int rank_offset = static_cast<int>(expert) / experts_per_rank - first_rank;
          if (rank_offset >= 0 && rank_offset < num_owned_ranks) mask |= 1u << rank_offset;
        }
      }
      // Reported once (by the first rank block; the first report wins).
      if (bad_expert != -1 && rank_block == 0)
        device::report(diagnostics, Phase::kLayoutExpertRange, false, rank, -1, -1, token, num_experts, bad_expert);
      bool* in_rank = is_token_in_rank + static_cast<int64_t>(token) * num_ranks + first_rank;
      for (int j = 0; j < num_owned_ranks; ++j) in_rank[j] = (mask >> j) & 1u;
    }
    for (int j = 0; j < num_owned_ranks; ++j) {
      const int hits = __popc(__ballot_sync(0xffffffffu, (mask >> j) & 1u));
      if (lane == j) rank_count += hits;
    }
    const int routed = __popc(__ballot_sync(0xffffffffu, mask != 0));
    if (lane == 0) node_tokens += routed;
  }
  if (lane < num_owned_ranks && rank_count > 0) atomicAdd(&counts[lane], rank_count);
  if (num_tokens_per_rdma_rank != nullptr && lane == 0 && node_tokens > 0) atomicAdd(&node_count, node_tokens);
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
