// Config validation, size hints and the recommended-config tables (docs/compatibility.md section 2).
#include "deep_ep/config.hpp"

#include <algorithm>

#include "deep_ep/error.hpp"
#include "protocol/control_region.hpp"
#include "protocol/internode_layout.hpp"
#include "protocol/intranode_layout.hpp"

namespace deep_ep {

Config::Config(int num_sms_, int nvl_send, int nvl_recv, int rdma_send, int rdma_recv)
    : num_sms(num_sms_),
      num_max_nvl_chunked_send_tokens(nvl_send),
      num_max_nvl_chunked_recv_tokens(nvl_recv),
      num_max_rdma_chunked_send_tokens(rdma_send),
      num_max_rdma_chunked_recv_tokens(rdma_recv) {
  DEEP_EP_CHECK(num_sms >= 2 && num_sms % 2 == 0 && num_sms <= kMaxChannels, "Config.num_sms must be even and in [2, ",
                kMaxChannels, "], got ", num_sms);
  DEEP_EP_CHECK(nvl_send > 0 && nvl_send < nvl_recv,
                "Config.num_max_nvl_chunked_send_tokens must be in (0, num_max_nvl_chunked_recv_tokens=", nvl_recv,
                "), got ", nvl_send);
  DEEP_EP_CHECK(rdma_send > 0 && rdma_send < rdma_recv,
                "Config.num_max_rdma_chunked_send_tokens must be in (0, num_max_rdma_chunked_recv_tokens=", rdma_recv,
                "), got ", rdma_send);
  num_max_rdma_chunked_recv_tokens = (rdma_recv + rdma_send - 1) / rdma_send * rdma_send;
  DEEP_EP_CHECK(rdma_send <= num_max_rdma_chunked_recv_tokens / 2,
                "Config.num_max_rdma_chunked_send_tokens must be at most half of num_max_rdma_chunked_recv_tokens=",
                num_max_rdma_chunked_recv_tokens, ", got ", rdma_send);
}

namespace {

void check_hint_args(int64_t hidden_bytes, int num_ranks, int num_ranks_per_node) {
  DEEP_EP_CHECK(hidden_bytes > 0 && hidden_bytes % 2 == 0,
                "hidden_bytes must be a positive multiple of 2 (hidden * 2 for bf16), got ", hidden_bytes);
  DEEP_EP_CHECK(num_ranks >= 1, "num_ranks must be positive, got ", num_ranks);
  DEEP_EP_CHECK(num_ranks_per_node >= 1 && (num_ranks <= num_ranks_per_node || num_ranks % num_ranks_per_node == 0),
                "num_ranks_per_node must be positive and divide num_ranks=", num_ranks, ", got ", num_ranks_per_node);
}

internode::Layout internode_hint_layout(const Config& config, int64_t hidden_bytes, int num_ranks,
                                        int num_ranks_per_node) {
  return internode::Layout::make(num_ranks / num_ranks_per_node, num_ranks_per_node, config.num_channels(),
                                 config.num_max_rdma_chunked_recv_tokens, internode::hint_row_stride(hidden_bytes));
}

}  // namespace

int64_t Config::get_nvl_buffer_size_hint(int64_t hidden_bytes, int num_ranks, int num_ranks_per_node) const {
  check_hint_args(hidden_bytes, num_ranks, num_ranks_per_node);
  if (num_ranks > num_ranks_per_node) {
    const auto layout = internode_hint_layout(*this, hidden_bytes, num_ranks, num_ranks_per_node);
    return align_up(layout.nvl_fixed_bytes + internode::combine_ring_bytes(
                                                 num_channels(), num_ranks_per_node, num_max_nvl_chunked_recv_tokens,
                                                 internode::combine_row_stride(hidden_bytes / 2, kNumMaxTopk)),
                    128);
  }
  const int nvl_ranks = std::min(num_ranks, kNumMaxNvlPeers);
  // The largest op this config can run: bf16 rows of hidden_bytes, FP8 scales for hidden_bytes / 2
  // channels, the maximum top-k.
  const int num_scales = static_cast<int>(hidden_bytes / 256);
  const auto dispatch = intranode::DispatchQueueLayout::make(num_channels(), num_max_nvl_chunked_recv_tokens,
                                                             hidden_bytes, num_scales, kNumMaxTopk);
  const auto combine = intranode::CombineQueueLayout::make(num_channels(), nvl_ranks, num_max_nvl_chunked_recv_tokens,
                                                           hidden_bytes, kNumMaxTopk);
  return align_up(std::max(dispatch.total_bytes, combine.total_bytes), 128);
}

int64_t Config::get_rdma_buffer_size_hint(int64_t hidden_bytes, int num_ranks, int num_ranks_per_node) const {
  check_hint_args(hidden_bytes, num_ranks, num_ranks_per_node);
  if (num_ranks <= num_ranks_per_node) return 0;
  return align_up(internode_hint_layout(*this, hidden_bytes, num_ranks, num_ranks_per_node).rdma_bytes, 128);
}

static void check_table_ranks(int num_ranks) {
  static const int kRanks[] = {2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 144, 160};
  DEEP_EP_CHECK(std::find(std::begin(kRanks), std::end(kRanks), num_ranks) != std::end(kRanks),
                "no recommended config for num_ranks=", num_ranks,
                " (expected one of 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 144, 160)");
}

// Intranode dispatch rings are small on purpose: staged rows are read back by the receivers while still in L2.
// 32 slots and batches of 8: where ranks share a GPU a call cycles through fewer (runtime/intranode_rings.hpp),
// and on one H100 with 8 ranks the batch of 8 beat 4 by 15% at 8 SMs (BF16 209 against 182 GB/s per rank, 16
// slots) and tied it at 16. Combine wants deeper queues (32 slots measured best among 2 to 128).
// Internode: V1's table (docs/compatibility.md section 2), so that code tuned for V1 gets the rings it expects. The
// RDMA numbers are ring sizes and send batches: a call streams any number of tokens through them.
Config get_dispatch_config(int num_ranks, int num_sms) {
  check_table_ranks(num_ranks);
  if (num_ranks <= kNumMaxNvlPeers) return Config(num_sms, 8, 32, 6, 256);
  if (num_ranks == 16) return Config(num_sms, 36, 288, 20, 128);
  if (num_ranks <= 64) return Config(num_sms, 32, 288, 8, 128);
  if (num_ranks == 96) return Config(num_sms, 20, 480, 12, 128);
  if (num_ranks == 128) return Config(num_sms, 20, 560, 12, 128);
  if (num_ranks == 144) return Config(num_sms, 32, 720, 12, 128);
  return Config(num_sms, 28, 720, 12, 128);
}

Config get_combine_config(int num_ranks, int num_sms) {
  check_table_ranks(num_ranks);
  if (num_ranks <= kNumMaxNvlPeers) return Config(num_sms, 8, 32, 6, 256);
  if (num_ranks == 16) return Config(num_sms, 4, 288, 12, 128);
  if (num_ranks <= 64) return Config(num_sms, 1, 288, 8, 128);
  if (num_ranks == 96) return Config(num_sms, 1, 480, 8, 128);
  if (num_ranks == 128) return Config(num_sms, 1, 560, 8, 128);
  return Config(num_sms, 2, 720, 8, 128);
}

}  // namespace deep_ep

#include "protocol/low_latency_layout.hpp"

namespace deep_ep {

int64_t get_low_latency_rdma_size_hint(int64_t num_max_dispatch_tokens_per_rank, int64_t hidden, int64_t num_ranks,
                                       int64_t num_experts) {
  DEEP_EP_CHECK(num_max_dispatch_tokens_per_rank > 0, "num_max_dispatch_tokens_per_rank must be positive, got ",
                num_max_dispatch_tokens_per_rank);
  DEEP_EP_CHECK(hidden > 0 && hidden % 128 == 0, "hidden must be a positive multiple of 128, got ", hidden);
  DEEP_EP_CHECK(num_ranks > 0, "num_ranks must be positive, got ", num_ranks);
  DEEP_EP_CHECK(num_experts > 0 && num_experts % num_ranks == 0,
                "num_experts must be a positive multiple of num_ranks=", num_ranks, ", got ", num_experts);
  return low_latency::rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts);
}

}  // namespace deep_ep
