// get_dispatch_layout (docs/compatibility.md section 5): per-rank, per-node and per-expert counts and the
// token-to-rank bitmap, from topk_idx.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "protocol/diagnostics.hpp"

namespace deep_ep::layout {

// Outputs must not alias; the kernel writes every element of them (no zeroing needed). num_tokens_per_rdma_rank may be
// null. Expert ids outside [-1, num_experts) are reported in `diagnostics` and skipped.
void launch_get_dispatch_layout(const int64_t* topk_idx, int num_tokens, int num_topk, int num_ranks, int num_experts,
                                int* num_tokens_per_rank, int* num_tokens_per_rdma_rank, int* num_tokens_per_expert,
                                bool* is_token_in_rank, DeviceDiagnostics* diagnostics, int rank,
                                int num_ranks_per_node, cudaStream_t stream);

}  // namespace deep_ep::layout
