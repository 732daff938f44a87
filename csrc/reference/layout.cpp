// Dispatch layout of the CPU reference (docs/compatibility.md section 5): from one rank's top-k expert ids, how many
// tokens go to each rank, node and expert, and which ranks each token visits.
#include "deep_ep/error.hpp"
#include "deep_ep/reference.hpp"

namespace deep_ep::reference {
namespace {

constexpr int kNumMaxNvlPeers = 8;  // ranks per node; node ("RDMA rank") of rank r is r / 8

}  // namespace

DispatchLayout get_dispatch_layout(const int64_t* topk_idx, int num_tokens, int num_topk, int num_ranks,
                                   int num_experts) {
  DEEP_EP_CHECK(num_tokens >= 0, "get_dispatch_layout: num_tokens must be >= 0, got ", num_tokens);
  DEEP_EP_CHECK(num_topk >= 0, "get_dispatch_layout: num_topk must be >= 0, got ", num_topk);
  DEEP_EP_CHECK(num_ranks > 0, "get_dispatch_layout: num_ranks must be positive, got ", num_ranks);
  DEEP_EP_CHECK(num_experts > 0 && num_experts % num_ranks == 0, "get_dispatch_layout: num_experts (", num_experts,
                ") must be a positive multiple of num_ranks (", num_ranks, ")");
  DEEP_EP_CHECK(num_ranks <= kNumMaxNvlPeers || num_ranks % kNumMaxNvlPeers == 0,
                "get_dispatch_layout: with more than ", kNumMaxNvlPeers, " ranks, num_ranks must be a multiple of ",
                kNumMaxNvlPeers, ", got ", num_ranks);
  DEEP_EP_CHECK(topk_idx != nullptr || num_tokens == 0 || num_topk == 0,
                "get_dispatch_layout: topk_idx is null but holds ", num_tokens, " x ", num_topk, " ids");

  const int num_local_experts = num_experts / num_ranks;
  const bool has_rdma_ranks = num_ranks > kNumMaxNvlPeers;
  const int num_rdma_ranks = has_rdma_ranks ? num_ranks / kNumMaxNvlPeers : 0;

  DispatchLayout layout;
  layout.num_tokens_per_rank.assign(num_ranks, 0);
  layout.num_tokens_per_rdma_rank.assign(num_rdma_ranks, 0);
  layout.num_tokens_per_expert.assign(num_experts, 0);
  layout.is_token_in_rank.assign(static_cast<size_t>(num_tokens) * num_ranks, 0);

  std::vector<uint8_t> is_token_in_rdma_rank(num_rdma_ranks);
  for (int t = 0; t < num_tokens; ++t) {
    uint8_t* in_rank = layout.is_token_in_rank.data() + static_cast<size_t>(t) * num_ranks;
    is_token_in_rdma_rank.assign(num_rdma_ranks, 0);
    for (int k = 0; k < num_topk; ++k) {
      int64_t expert = topk_idx[static_cast<size_t>(t) * num_topk + k];
      DEEP_EP_CHECK(expert >= -1 && expert < num_experts, "get_dispatch_layout: topk_idx[", t, "][", k, "] = ", expert,
                    " is outside [-1, ", num_experts, ")");
      if (expert < 0) continue;
      // Experts are counted per (token, k) slot; ranks and nodes once per token.
      ++layout.num_tokens_per_expert[expert];
      int rank = static_cast<int>(expert / num_local_experts);
      in_rank[rank] = 1;
      if (has_rdma_ranks) is_token_in_rdma_rank[rank / kNumMaxNvlPeers] = 1;
    }
    for (int j = 0; j < num_ranks; ++j) layout.num_tokens_per_rank[j] += in_rank[j];
    for (int n = 0; n < num_rdma_ranks; ++n) layout.num_tokens_per_rdma_rank[n] += is_token_in_rdma_rank[n];
  }
  return layout;
}

}  // namespace deep_ep::reference
