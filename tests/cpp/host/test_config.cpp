// Config validation, size hints and recommended tables (docs/compatibility.md section 2).
#include <gtest/gtest.h>

#include <vector>

#include "deep_ep/config.hpp"
#include "deep_ep/error.hpp"
#include "kernels/low_latency/low_latency.hpp"
#include "protocol/internode_layout.hpp"
#include "protocol/intranode_layout.hpp"
#include "protocol/low_latency_layout.hpp"

using namespace deep_ep;

TEST(Config, DefaultsMatchV1) {
  Config c;
  EXPECT_EQ(c.num_sms, 20);
  EXPECT_EQ(c.num_max_nvl_chunked_send_tokens, 6);
  EXPECT_EQ(c.num_max_nvl_chunked_recv_tokens, 256);
  EXPECT_EQ(c.num_channels(), 20);
}

TEST(Config, RejectsOddNumSms) { EXPECT_THROW(Config(15, 6, 256, 6, 256), ValueError); }

TEST(Config, RejectsSendChunkNotBelowRecvChunk) {
  EXPECT_THROW(Config(20, 256, 256, 6, 256), ValueError);
  EXPECT_THROW(Config(20, 0, 256, 6, 256), ValueError);
  EXPECT_THROW(Config(20, 6, 256, 256, 256), ValueError);
}

TEST(Config, RoundsRdmaRecvUpToMultipleOfSend) {
  Config c(20, 6, 256, 6, 256);
  EXPECT_EQ(c.num_max_rdma_chunked_recv_tokens, 258);
}

TEST(Config, NvlHintIsMultipleOf128AndCoversBothLayouts) {
  Config c(24, 8, 64, 6, 256);
  const int64_t hidden_bytes = 7168 * 2;
  const int64_t hint = c.get_nvl_buffer_size_hint(hidden_bytes, 8);
  EXPECT_EQ(hint % 128, 0);
  const auto d = intranode::DispatchQueueLayout::make(24, 64, hidden_bytes, 7168 / 128, kNumMaxTopk);
  const auto m = intranode::CombineQueueLayout::make(24, 8, 64, hidden_bytes, kNumMaxTopk);
  EXPECT_EQ(hint, std::max(d.total_bytes, m.total_bytes));
}

TEST(Config, NvlHintGrowsWithChannelsAndHidden) {
  Config small(8, 4, 16, 6, 256), large(16, 4, 16, 6, 256);
  EXPECT_LT(small.get_nvl_buffer_size_hint(4096, 8), large.get_nvl_buffer_size_hint(4096, 8));
  EXPECT_LT(small.get_nvl_buffer_size_hint(4096, 8), small.get_nvl_buffer_size_hint(8192, 8));
}

TEST(Config, RdmaHintIsZeroIntranode) {
  Config c;
  EXPECT_EQ(c.get_rdma_buffer_size_hint(14336, 8), 0);
  EXPECT_EQ(c.get_rdma_buffer_size_hint(14336, 4, 4), 0);
  EXPECT_THROW(c.get_rdma_buffer_size_hint(14336, 12, 8), ValueError);  // 12 ranks are not whole nodes of 8
  EXPECT_THROW(c.get_rdma_buffer_size_hint(14336, 16, 0), ValueError);
}

// The internode hints are the layout the ops carve: two row areas of nodes x channels x chunk rows,
// and the combine staging of the most rows one rank can receive.
TEST(Config, InternodeHintsMatchTheLayout) {
  Config c(8, 16, 32, 16, 128);
  const int64_t hidden_bytes = 7168 * 2;
  const int64_t stride = internode::hint_row_stride(hidden_bytes);
  EXPECT_GE(stride, hidden_bytes + 7168 / 128 * 4 + 2 * 4 * kNumMaxTopk);
  const auto two_nodes = internode::Layout::make(2, 8, 8, 128, stride);
  EXPECT_EQ(c.get_rdma_buffer_size_hint(hidden_bytes, 16), two_nodes.rdma_bytes);
  EXPECT_GE(two_nodes.rdma_bytes, 2 * 2 * 8 * 128 * stride);
  const auto four_nodes = internode::Layout::make(4, 4, 8, 128, stride);
  EXPECT_EQ(c.get_rdma_buffer_size_hint(hidden_bytes, 16, 4), four_nodes.rdma_bytes);
  // Combine rings: channels x ranks per node x 32 rows, whatever the token count.
  EXPECT_EQ(c.get_nvl_buffer_size_hint(hidden_bytes, 16),
            align_up(two_nodes.nvl_fixed_bytes + int64_t(8) * 8 * 32 * internode::combine_row_stride(7168, kNumMaxTopk),
                     128));
  EXPECT_EQ(internode::combine_ring_bytes(8, 8, 32, 100), int64_t(8) * 8 * 32 * 100);
  EXPECT_EQ(c.get_rdma_buffer_size_hint(hidden_bytes, 16) % 128, 0);
}

TEST(Config, TablesCoverV1RankCounts) {
  for (int r : {2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 144, 160}) {
    EXPECT_EQ(get_dispatch_config(r, 20).num_sms, 20);
    EXPECT_EQ(get_combine_config(r, 24).num_sms, 24);
  }
  EXPECT_THROW(get_dispatch_config(3, 20), ValueError);
  EXPECT_THROW(get_combine_config(12, 20), ValueError);
}

// Internode configs are V1's table: (nvl send, nvl recv, rdma send, rdma recv) per rank count, the
// RDMA ring rounded up to a multiple of the send batch as V1 does.
TEST(Config, InternodeTablesAreV1s) {
  struct Row {
    int ranks, nvl_send, nvl_recv, rdma_send, rdma_recv;
  };
  const Row dispatch[] = {{16, 36, 288, 20, 140}, {24, 32, 288, 8, 128},   {64, 32, 288, 8, 128},
                          {96, 20, 480, 12, 132}, {128, 20, 560, 12, 132}, {144, 32, 720, 12, 132},
                          {160, 28, 720, 12, 132}};
  const Row combine[] = {{16, 4, 288, 12, 132}, {32, 1, 288, 8, 128},  {48, 1, 288, 8, 128}, {96, 1, 480, 8, 128},
                         {128, 1, 560, 8, 128}, {144, 2, 720, 8, 128}, {160, 2, 720, 8, 128}};
  for (const auto& rows :
       {std::make_pair(dispatch, &get_dispatch_config), std::make_pair(combine, &get_combine_config)}) {
    for (int i = 0; i < 7; ++i) {
      const Row& r = rows.first[i];
      const Config c = rows.second(r.ranks, 20);
      EXPECT_EQ(c.num_max_nvl_chunked_send_tokens, r.nvl_send) << r.ranks;
      EXPECT_EQ(c.num_max_nvl_chunked_recv_tokens, r.nvl_recv) << r.ranks;
      EXPECT_EQ(c.num_max_rdma_chunked_send_tokens, r.rdma_send) << r.ranks;
      EXPECT_EQ(c.num_max_rdma_chunked_recv_tokens, r.rdma_recv) << r.ranks;
    }
  }
}

TEST(DispatchQueueLayout, ArraysAreAlignedAndDisjoint) {
  const auto l = intranode::DispatchQueueLayout::make(3, 5, 1000, 4, 9);
  EXPECT_EQ(l.row_stride, 1008);
  for (int64_t off : {l.rows_offset, l.scales_offset, l.topk_idx_offset, l.topk_weights_offset, l.meta_offset})
    EXPECT_EQ(off % 128, 0);
  EXPECT_GE(l.scales_offset, l.rows_offset + 15 * 1008);
  EXPECT_GE(l.topk_idx_offset, l.scales_offset + 15 * 4 * 4);
  EXPECT_GE(l.total_bytes, l.meta_offset + 15 * 8);
}

TEST(LowLatencyLayout, HintIsTwoHalvesAndMultipleOf128) {
  const int64_t hint = get_low_latency_rdma_size_hint(128, 7168, 8, 288);
  EXPECT_EQ(hint % 128, 0);
  EXPECT_EQ(hint, 2 * low_latency::HalfLayout::make(128, 7168, 8, 288).bytes);
  // The dispatch slots alone: 36 local experts x 8 ranks x 128 tokens x (bf16 row + scales + 16).
  EXPECT_GE(hint / 2, 36LL * 8 * 128 * (7168 * 2 + 56 * 4 + 16));
  EXPECT_THROW(get_low_latency_rdma_size_hint(128, 7000, 8, 288), ValueError);
  EXPECT_THROW(get_low_latency_rdma_size_hint(128, 7168, 8, 100), ValueError);
}

TEST(LowLatencyLayout, HalfIsExactlyItsRegions) {
  // 128 tokens, hidden 7168, 8 ranks, 288 experts: every region, in order, 128-byte aligned.
  const auto l = low_latency::HalfLayout::make(128, 7168, 8, 288);
  EXPECT_EQ(l.dispatch_scales_offset, 7168 * 2);
  EXPECT_EQ(l.dispatch_meta_offset, 7168 * 2 + 56 * 4);  // already 16-aligned
  EXPECT_EQ(l.dispatch_slot_bytes, 7168 * 2 + 56 * 4 + 16);
  EXPECT_EQ(l.combine_slots_per_token, kNumMaxTopk);
  EXPECT_EQ(l.dispatch_offset, 0);
  EXPECT_EQ(l.combine_offset, 36LL * 8 * 128 * l.dispatch_slot_bytes);
  EXPECT_EQ(l.dispatch_send_offset, l.combine_offset + 128LL * kNumMaxTopk * 7168 * 2);
  EXPECT_EQ(l.dispatch_send_meta_offset, l.dispatch_send_offset + 128LL * l.dispatch_slot_bytes);
  EXPECT_EQ(l.signals_offset, l.dispatch_send_meta_offset + 128LL * kNumMaxTopk * 16);
  // Signals: counts [36][8] + [8], arrivals [36][8] + [8], 64-bit: 4736 bytes, a multiple of 128.
  EXPECT_EQ(l.num_signals(), 2 * (36 + 1) * 8);
  EXPECT_EQ(l.dispatch_consumed_offset, l.signals_offset + 4736);
  EXPECT_EQ(l.combine_consumed_offset, l.dispatch_consumed_offset + 36 * 8 * 8);  // 2304, 128-aligned
  EXPECT_EQ(l.dispatch_mirror_offset, l.combine_consumed_offset + low_latency::kMaxLowLatencyBlocks * 8 * 8);
  EXPECT_EQ(l.combine_mirror_offset, l.dispatch_mirror_offset + 288 * 8);
  EXPECT_EQ(l.send_done_offset, l.combine_mirror_offset + 128);  // 8 x 8 bytes rounded up to 128
  // 288 int32 counters, then up to a 64 KiB multiple, plus the 3584 bytes that put the second half
  // where the sends run at full speed.
  EXPECT_EQ(l.bytes, (l.send_done_offset + 1152 + (1 << 16) - 1) / (1 << 16) * (1 << 16) + 3584);
  EXPECT_EQ(l.bytes % (1 << 16), 3584);
  // Signal indices: counts first, then arrivals, each dispatch [L][R] then combine [R]; all distinct.
  EXPECT_EQ(l.dispatch_count_signal(0, 0), 0);
  EXPECT_EQ(l.combine_count_signal(0), 36 * 8);
  EXPECT_EQ(l.dispatch_arrivals_signal(0, 0), 37 * 8);
  EXPECT_EQ(l.combine_arrivals_signal(7), l.num_signals() - 1);
  std::vector<int> seen(l.num_signals(), 0);
  for (int e = 0; e < 36; ++e)
    for (int r = 0; r < 8; ++r) {
      ++seen[l.dispatch_count_signal(e, r)];
      ++seen[l.dispatch_arrivals_signal(e, r)];
    }
  for (int r = 0; r < 8; ++r) {
    ++seen[l.combine_count_signal(r)];
    ++seen[l.combine_arrivals_signal(r)];
  }
  for (int i = 0; i < l.num_signals(); ++i) EXPECT_EQ(seen[i], 1) << "signal " << i;
  // A row's arrival units split evenly over any number of parts 1..16.
  for (uint64_t parts = 1; parts <= 16; ++parts) EXPECT_EQ(low_latency::kRowArrivalUnits % parts, 0u) << parts;
  // Fewer experts than the top-k cap: one combine row per expert per token.
  EXPECT_EQ(low_latency::HalfLayout::make(16, 256, 2, 4).combine_slots_per_token, 4);
}

TEST(LowLatencyPeers, TransportPeerMask) {
  using low_latency::transport_peer_mask;
  // One node: nobody through the transport, unless NVLink is off (then everyone but the rank itself).
  EXPECT_EQ(transport_peer_mask(3, 8, 8, true), 0u);
  EXPECT_EQ(transport_peer_mask(3, 8, 8, false), 0xffu & ~(1u << 3));
  // 2 nodes x 8: rank 1 reaches ranks 8..15 through the transport, rank 12 ranks 0..7.
  EXPECT_EQ(transport_peer_mask(1, 16, 8, true), 0xff00u);
  EXPECT_EQ(transport_peer_mask(12, 16, 8, true), 0x00ffu);
  // 4 nodes x 4, rank 6 on node 1; 32 ranks use every bit.
  EXPECT_EQ(transport_peer_mask(6, 16, 4, true), 0xffffu & ~0x00f0u);
  EXPECT_EQ(transport_peer_mask(0, 32, 16, true), 0xffff0000u);
  EXPECT_EQ(transport_peer_mask(31, 32, 32, false), 0x7fffffffu);
}

TEST(BuildInfo, Sm90IsCompiledInTheDefaultBuild) {
  // CI and the GPU machine build with the default CMAKE_CUDA_ARCHITECTURES=90.
  EXPECT_NE(std::string(compiled_cuda_architectures()).find("90"), std::string::npos);
  EXPECT_TRUE(is_sm90_compiled());
}
