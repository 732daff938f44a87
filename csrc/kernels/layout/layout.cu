// get_dispatch_layout kernel: one launch of one thread-block cluster, no memsets and no global atomics.
//
// The kernel reads a few hundred KB (topk_idx) and is bound by load latency, not bandwidth, so what matters is
// how many dependent load rounds a thread makes. The cluster's 8 x 512 threads split the tokens (a thread owns
// whole tokens, so it can tell a token's first slot on each rank and node by comparing the token's own ids):
// 4096 tokens are one round of loads. Each block counts its tokens per expert, rank and node in its shared
// memory; after a cluster barrier every block sums a slice of those counters over the cluster's blocks through
// distributed shared memory and writes that slice of the outputs. A cluster is placed on the GPU whole, so
// the barrier never waits for a block that has no SM.
#include <cooperative_groups.h>

#include <algorithm>

#include "deep_ep/error.hpp"
#include "kernels/common/device_utils.cuh"
#include "kernels/layout/layout.hpp"
#include "util/cuda_check.hpp"

namespace deep_ep::layout {

namespace {

namespace cg = cooperative_groups;

constexpr int kClusterBlocks = 8;  // the portable cluster size: every Hopper GPU places it
constexpr int kThreads = 512;
// A token's expert ids loaded before any is used (top-8 is one round; top-9 two).
constexpr int kIdsPerRound = 8;

struct LayoutArgs {
  const int64_t* topk_idx;  // [T, K]
  int num_tokens, num_topk, num_ranks, num_experts;
  int ranks_per_node;             // node of rank r: r / ranks_per_node (counted only with num_tokens_per_rdma_rank)
  int num_nodes;                  // 0: num_tokens_per_rdma_rank is not wanted
  int* num_tokens_per_rank;       // [R]
  int* num_tokens_per_rdma_rank;  // [num_nodes] or null
  int* num_tokens_per_expert;     // [E]
  bool* is_token_in_rank;         // [T, R]
  bool rows_word_aligned;         // is_token_in_rank's rows start at 4-byte boundaries and R % 4 == 0
  DeviceDiagnostics* diagnostics;
  int rank;
};

// Whether `value(k)` differs from value(j) for every earlier valid slot j of the token: then slot k is the
// token's first on that rank (or node). Ids of the current round come from registers, earlier rounds' from L1.
template <typename Value>
__device__ __forceinline__ bool first_of_token(const int64_t* row, const int64_t (&ids)[kIdsPerRound], int k0, int u,
                                               int num_experts, Value value) {
  const int mine = value(ids[u]);
  for (int j = 0; j < k0; ++j) {
    const int64_t earlier = __ldg(row + j);
    if (earlier >= 0 && earlier < num_experts && value(earlier) == mine) return false;
  }
#pragma unroll
  for (int v = 0; v < kIdsPerRound; ++v)
    if (v < u && ids[v] >= 0 && ids[v] < num_experts && value(ids[v]) == mine) return false;
  return true;
}

// Zeroes token `token`'s is_token_in_rank row (a word, 4 entries, at a time where rows are word-aligned); its
// ones are stored after it by the same thread, so program order keeps them.
__device__ __forceinline__ void zero_row(const LayoutArgs& a, int token) {
  bool* row = a.is_token_in_rank + static_cast<int64_t>(token) * a.num_ranks;
  if (a.rows_word_aligned) {
    auto* words = reinterpret_cast<uint32_t*>(row);
    for (int w = 0; w < a.num_ranks / 4; ++w) words[w] = 0;
  } else {
    for (int j = 0; j < a.num_ranks; ++j) row[j] = false;
  }
}

// Whole warp: adds one to counters[key] for every lane whose key is >= 0, as one shared add per distinct key
// (lanes of a token round often hit the same few ranks or nodes, which plain atomics would serialize).
__device__ __forceinline__ void add_one_per_lane(int key, int lane, int* counters) {
  const unsigned same = __match_any_sync(0xffffffffu, key);
  if (key >= 0 && lane == __ffs(same) - 1) atomicAdd(&counters[key], __popc(same));
}

__global__ void __cluster_dims__(kClusterBlocks, 1, 1) __launch_bounds__(kThreads) get_dispatch_layout(LayoutArgs a) {
  // This block's counts: [E] per expert, [R] per rank, [num_nodes] per node.
  extern __shared__ int counts[];
  int* expert_counts = counts;
  int* rank_counts = counts + a.num_experts;
  int* node_counts = rank_counts + a.num_ranks;
  const int num_columns = a.num_experts + a.num_ranks + a.num_nodes;
  for (int i = threadIdx.x; i < num_columns; i += kThreads) counts[i] = 0;
  __syncthreads();

  cg::cluster_group cluster = cg::this_cluster();
  const int cluster_thread = static_cast<int>(cluster.block_rank()) * kThreads + static_cast<int>(threadIdx.x);
  constexpr int kClusterThreads = kClusterBlocks * kThreads;
  const int lane = device::lane_id();
  const int experts_per_rank = a.num_experts / a.num_ranks;
  const auto rank_of = [&](int64_t expert) { return static_cast<int>(expert) / experts_per_rank; };
  const auto node_of = [&](int64_t expert) { return static_cast<int>(expert) / experts_per_rank / a.ranks_per_node; };

  // Warp-uniform rounds of 32 consecutive tokens (the warp-wide adds below need every lane); a lane past the last
  // token takes part with no ids.
  for (int first_token = cluster_thread - lane; first_token < a.num_tokens; first_token += kClusterThreads) {
    const int token = first_token + lane;
    const bool has_token = token < a.num_tokens;
    const int64_t* row = a.topk_idx + static_cast<int64_t>(token) * a.num_topk;
    if (has_token) zero_row(a, token);
    int64_t bad_expert = -1;
    for (int k0 = 0; k0 < a.num_topk; k0 += kIdsPerRound) {
      int64_t ids[kIdsPerRound];
#pragma unroll
      for (int u = 0; u < kIdsPerRound; ++u) ids[u] = has_token && k0 + u < a.num_topk ? __ldg(row + k0 + u) : -1;
#pragma unroll
      for (int u = 0; u < kIdsPerRound; ++u) {
        const int64_t expert = ids[u];
        int new_rank = -1, new_node = -1;  // this slot is the token's first on that rank / node
        if (expert < -1 || expert >= a.num_experts) {
          bad_expert = expert;  // skipped everywhere; reported below
        } else if (expert >= 0) {
          atomicAdd(&expert_counts[expert], 1);
          if (first_of_token(row, ids, k0, u, a.num_experts, rank_of)) {
            new_rank = rank_of(expert);
            a.is_token_in_rank[static_cast<int64_t>(token) * a.num_ranks + new_rank] = true;
            // A slot not first on its rank is not first on its node either.
            if (a.num_nodes > 0 && first_of_token(row, ids, k0, u, a.num_experts, node_of)) new_node = node_of(expert);
          }
        }
        add_one_per_lane(new_rank, lane, rank_counts);
        if (a.num_nodes > 0) add_one_per_lane(new_node, lane, node_counts);
      }
    }
    if (bad_expert != -1)
      device::report(a.diagnostics, Phase::kLayoutExpertRange, false, a.rank, -1, -1, token, a.num_experts, bad_expert);
  }

  // Release/acquire at cluster scope: every block's shared counts are final and visible to the others.
  cluster.sync();
  for (int column = cluster_thread; column < num_columns; column += kClusterThreads) {
    int total = 0;
#pragma unroll
    for (int b = 0; b < kClusterBlocks; ++b) total += *cluster.map_shared_rank(counts + column, b);
    if (column < a.num_experts)
      a.num_tokens_per_expert[column] = total;
    else if (column < a.num_experts + a.num_ranks)
      a.num_tokens_per_rank[column - a.num_experts] = total;
    else
      a.num_tokens_per_rdma_rank[column - a.num_experts - a.num_ranks] = total;
  }
  // No block may leave (and free its shared memory) while another still reads it.
  cluster.sync();
}

}  // namespace

void launch_get_dispatch_layout(const int64_t* topk_idx, int num_tokens, int num_topk, int num_ranks, int num_experts,
                                int* num_tokens_per_rank, int* num_tokens_per_rdma_rank, int* num_tokens_per_expert,
                                bool* is_token_in_rank, DeviceDiagnostics* diagnostics, int rank,
                                int num_ranks_per_node, cudaStream_t stream) {
  DEEP_EP_CHECK(num_ranks >= 1 && num_experts % num_ranks == 0, "get_dispatch_layout: num_experts=", num_experts,
                " is not a multiple of num_ranks=", num_ranks);
  LayoutArgs a{};
  a.topk_idx = topk_idx;
  a.num_tokens = num_tokens;
  a.num_topk = num_topk;
  a.num_ranks = num_ranks;
  a.num_experts = num_experts;
  a.ranks_per_node = std::max(num_ranks_per_node, 1);
  a.num_nodes = num_tokens_per_rdma_rank ? (num_ranks + a.ranks_per_node - 1) / a.ranks_per_node : 0;
  a.num_tokens_per_rank = num_tokens_per_rank;
  a.num_tokens_per_rdma_rank = num_tokens_per_rdma_rank;
  a.num_tokens_per_expert = num_tokens_per_expert;
  a.is_token_in_rank = is_token_in_rank;
  a.rows_word_aligned = num_ranks % 4 == 0 && reinterpret_cast<uintptr_t>(is_token_in_rank) % 4 == 0;
  a.diagnostics = diagnostics;
  a.rank = rank;

  // Shared counters per block: one per expert, rank and node. Past the default 48 KB the kernel asks for more
  // (up to what the device allows: about 57,000 experts on Hopper).
  const size_t shared_bytes = static_cast<size_t>(num_experts + num_ranks + a.num_nodes) * sizeof(int);
  if (shared_bytes > 48 * 1024) {
    int device = 0, max_optin = 0;
    DEEP_EP_CUDA_CHECK(cudaGetDevice(&device));
    DEEP_EP_CUDA_CHECK(cudaDeviceGetAttribute(&max_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    DEEP_EP_CHECK(shared_bytes <= static_cast<size_t>(max_optin), "get_dispatch_layout: ", num_experts,
                  " experts need ", shared_bytes, " bytes of shared memory per block; this GPU allows ", max_optin);
    DEEP_EP_CUDA_CHECK(cudaFuncSetAttribute(get_dispatch_layout, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(shared_bytes)));
  }
  get_dispatch_layout<<<kClusterBlocks, kThreads, shared_bytes, stream>>>(a);
  DEEP_EP_CUDA_CHECK(cudaGetLastError());
}

}  // namespace deep_ep::layout
