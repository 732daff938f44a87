// Where internode normal mode keeps its state. Host code sizes buffers with it (Config hints, op
// checks); device code carves pointers. Every rank computes the same layout for an op, so an offset
// names the same place on every rank.
//
// A call streams any number of tokens through bounded rings: the row areas below hold, per (node,
// channel), a ring of `capacity` = num_max_rdma_chunked_recv_tokens rows; the stream position i of a
// (node, channel) lives in ring slot i % capacity. Counters say how far each side has got.
//
// RDMA window (the rank's RDMA payload, which the transport reaches on remote nodes):
//   signals   uint64 [1 done | N meta | N*C dispatch rows | N*C combine rows | N*C dispatch credits |
//             N*C combine credits]; index helpers below
//   meta      [N] per source node: what the source with this rank's local index sends this node
//             (its per-channel counts and its per-expert counts for this node's ranks)
//   meta_send [N] per destination node: the same, staged here before the put
//   rows      [N][C][cap] dispatch: the ring of rows from source node n, channel c (the source stores
//             them there directly where the transport maps the window, else stages them in send_rows
//             [destination node][C][cap] at the same slots and puts). Combine reuses both areas for the
//             partial sums going back: rows[n][c] on the home rank is the ring of node n's partials.
// NVLink area (the rank's NVLink payload, read by the ranks of its node):
//   flags     int64: meta_ready[N], rows_ready[N][C], published, combine ring tails and heads,
//             rows_scanned[N][C][Rn]
//   published int32: this rank's recv_gbl_channel_prefix_matrix [R][C] (the forwarders of its node
//             compute send_nvl_head from it)
//   rings     combine: per (channel, local rank l) a ring of Q = num_max_nvl_chunked_recv_tokens rows
//             [combine_row_stride] that this rank fills, in the order forwarder (my node, l) sums them
#pragma once

#include <cstdint>

#include "deep_ep/config.hpp"
#include "util/align.hpp"

// Host and device both carve with these structs; plain C++ compilers see ordinary inline functions.
#ifdef __CUDACC__
#define DEEP_EP_INTERNODE_HD __host__ __device__
#else
#define DEEP_EP_INTERNODE_HD
#endif

namespace deep_ep::internode {

constexpr int kMaxInternodeRanks = 256;
constexpr int kMaxInternodeNodes = 32;  // a warp's lanes cover every node
// The smallest ring (num_max_rdma_chunked_recv_tokens) the kernels accept: a combine home rank sums a
// round of tokens while the forwarders fill a batch, and both must fit in one ring.
constexpr int kMinRingSlots = 16;

// One dispatch row: [x: row_bytes][scales: S floats][topk_idx: K int32 (global ids)][topk_weights: K
// floats][source token: int32][destination mask: uint32 over the node's local ranks], 16-aligned.
struct RowLayout {
  int64_t scales_offset, topk_idx_offset, topk_weights_offset, src_token_offset, mask_offset, stride;
  DEEP_EP_INTERNODE_HD static RowLayout make(int64_t row_bytes, int num_scales, int num_topk) {
    RowLayout layout{};
    layout.scales_offset = row_bytes;
    layout.topk_idx_offset = layout.scales_offset + 4 * int64_t(num_scales);
    layout.topk_weights_offset = layout.topk_idx_offset + 4 * int64_t(num_topk);
    layout.src_token_offset = layout.topk_weights_offset + 4 * int64_t(num_topk);
    layout.mask_offset = layout.src_token_offset + 4;
    layout.stride = align_up(layout.mask_offset + 4, 16);
    return layout;
  }
};

// A combine row (ring entry or partial sum): [bf16 x: hidden * 2][float weights: K], 16-aligned.
inline int64_t combine_row_stride(int64_t hidden, int num_topk) {
  return align_up(hidden * 2 + 4 * int64_t(num_topk), 16);
}

// NVLink bytes of the combine rings after nvl_fixed_bytes.
inline int64_t combine_ring_bytes(int num_channels, int num_ranks_per_node, int ring_slots, int64_t row_stride) {
  return int64_t(num_channels) * num_ranks_per_node * ring_slots * row_stride;
}

struct Layout {
  int num_nodes, num_ranks_per_node, num_ranks, num_channels, capacity;
  int64_t row_stride;  // max of the dispatch and combine rows of this op
  // RDMA window
  int64_t signals_offset, meta_offset, meta_send_offset, rows_offset, send_rows_offset, rdma_bytes;
  int64_t meta_ints;  // per meta record
  // NVLink area
  int64_t flags_offset, published_offset, rings_offset, nvl_fixed_bytes;

  // Meta record: [0] num_tokens, [1, 1 + C) tokens per channel to the node, [1 + C + local_rank * C +
  // channel] tokens of `channel` to `local_rank`, then [Rn][kMaxLocalExperts] expert counts.
  DEEP_EP_INTERNODE_HD int64_t meta_node_count(int channel) const { return 1 + channel; }
  DEEP_EP_INTERNODE_HD int64_t meta_rank_count(int local_rank, int channel) const {
    return 1 + num_channels + int64_t(local_rank) * num_channels + channel;
  }
  DEEP_EP_INTERNODE_HD int64_t meta_expert_count(int local_rank, int local_expert) const {
    return 1 + num_channels + int64_t(num_ranks_per_node) * num_channels + int64_t(local_rank) * kMaxLocalExperts +
           local_expert;
  }

  // The done signal counts every op since the Buffer was made (never reset), so it keeps index 0 (the
  // first 8 bytes of the window) whatever num_sms an op uses; the others are reset within their op.
  DEEP_EP_INTERNODE_HD int signal_done() const { return 0; }
  DEEP_EP_INTERNODE_HD int signal_meta(int node) const { return 1 + node; }
  DEEP_EP_INTERNODE_HD int signal_dispatch(int node, int channel) const {
    return 1 + num_nodes + node * num_channels + channel;
  }
  DEEP_EP_INTERNODE_HD int signal_combine(int node, int channel) const {
    return 1 + num_nodes * (1 + num_channels) + node * num_channels + channel;
  }
  // Credits: stream positions the receiving side has finished with, added back to the sender of a ring.
  // dispatch_credit(node, channel) on a source rank counts rows of its `channel` that the ranks of `node`
  // consumed; combine_credit(node, channel) on a forwarder counts partials of `channel` that home rank
  // (node, my local) summed.
  DEEP_EP_INTERNODE_HD int signal_dispatch_credit(int node, int channel) const {
    return 1 + num_nodes * (1 + 2 * num_channels) + node * num_channels + channel;
  }
  DEEP_EP_INTERNODE_HD int signal_combine_credit(int node, int channel) const {
    return 1 + num_nodes * (1 + 3 * num_channels) + node * num_channels + channel;
  }
  DEEP_EP_INTERNODE_HD int num_signals() const { return signals_for(num_nodes, num_channels); }
  // Signals of a layout of num_nodes nodes and num_channels channels (the Buffer sizes its GIN signal
  // range with the most channels an op can use).
  static DEEP_EP_INTERNODE_HD int signals_for(int num_nodes, int num_channels) {
    return 1 + num_nodes * (1 + 4 * num_channels);
  }

  // Ring slot of stream `position` of (`node`, `channel`) in rows / send_rows.
  DEEP_EP_INTERNODE_HD int64_t slot(int node, int channel, int64_t position) const {
    return (int64_t(node) * num_channels + channel) * capacity + position % capacity;
  }

  // NVLink flags, in int64 units from flags_offset.
  DEEP_EP_INTERNODE_HD int flag_meta_ready(int node) const { return node; }
  // rows_ready(node, channel) on a forwarder: (epoch + 1) << 32 | rows of ring (node, channel) that have
  // arrived, relayed by the forwarder from its transport signal for its node's ranks.
  DEEP_EP_INTERNODE_HD int flag_rows_ready(int node, int channel) const {
    return num_nodes + node * num_channels + channel;
  }
  DEEP_EP_INTERNODE_HD int flag_published() const { return num_nodes * (1 + num_channels); }
  // Combine rings, one per (channel c, local rank l) on every rank j: j's rows for forwarder (j's node,
  // l). ring_tail(c, j's local) lives on the forwarder (rows j pushed), ring_head(c, l) on j (rows the
  // forwarder consumed). Both hold (epoch + 1) << 32 | count, so a value of an earlier op reads as 0.
  DEEP_EP_INTERNODE_HD int flag_ring_tail(int channel, int local_rank) const {
    return flag_published() + 1 + channel * num_ranks_per_node + local_rank;
  }
  DEEP_EP_INTERNODE_HD int flag_ring_head(int channel, int local_rank) const {
    return flag_published() + 1 + (num_channels + channel) * num_ranks_per_node + local_rank;
  }
  // rows_scanned(node, channel, local_rank) on a forwarder: (epoch + 1) << 32 | stream positions of its
  // ring (node, channel) that `local_rank` has read (kScanDone once it has all its rows from that ring),
  // written by that local rank.
  DEEP_EP_INTERNODE_HD int flag_rows_scanned(int node, int channel, int local_rank) const {
    return flag_published() + 1 + 2 * num_channels * num_ranks_per_node +
           (node * num_channels + channel) * num_ranks_per_node + local_rank;
  }
  DEEP_EP_INTERNODE_HD int num_flags() const {
    return flag_published() + 1 + num_channels * num_ranks_per_node * (2 + num_nodes);
  }

  // row_stride covers bf16 rows of `hidden_bytes` with their scales and top-k, and combine rows.
  static Layout make(int num_nodes, int num_ranks_per_node, int num_channels, int capacity, int64_t row_stride) {
    Layout layout{};
    layout.num_nodes = num_nodes;
    layout.num_ranks_per_node = num_ranks_per_node;
    layout.num_ranks = num_nodes * num_ranks_per_node;
    layout.num_channels = num_channels;
    layout.capacity = capacity;
    layout.row_stride = row_stride;
    layout.meta_ints = 1 + num_channels + int64_t(num_ranks_per_node) * (num_channels + kMaxLocalExperts);
    const int64_t meta_bytes = align_up(layout.meta_ints * 4, 16);
    const int64_t rows_bytes = int64_t(num_nodes) * num_channels * capacity * row_stride;
    int64_t off = 0;
    layout.signals_offset = off;
    off = align_up(off + 8 * int64_t(layout.num_signals()), 128);
    layout.meta_offset = off;
    off = align_up(off + num_nodes * meta_bytes, 128);
    layout.meta_send_offset = off;
    off = align_up(off + num_nodes * meta_bytes, 128);
    layout.rows_offset = off;
    off = align_up(off + rows_bytes, 128);
    layout.send_rows_offset = off;
    off = align_up(off + rows_bytes, 128);
    layout.rdma_bytes = off;
    off = 0;
    layout.flags_offset = off;
    off = align_up(off + 8 * int64_t(layout.num_flags()), 128);
    layout.published_offset = off;
    off = align_up(off + 4 * int64_t(layout.num_ranks) * num_channels, 128);
    layout.rings_offset = off;
    layout.nvl_fixed_bytes = off;
    return layout;
  }
  DEEP_EP_INTERNODE_HD int64_t meta_bytes() const { return align_up(meta_ints * 4, 16); }
};

// The row stride the size hints reserve: bf16 rows of hidden_bytes, FP8 scales for hidden_bytes / 2
// channels, kNumMaxTopk top-k slots; or a combine row of the same hidden.
inline int64_t hint_row_stride(int64_t hidden_bytes) {
  const auto dispatch = RowLayout::make(hidden_bytes, static_cast<int>(hidden_bytes / 256), kNumMaxTopk);
  const int64_t combine = combine_row_stride(hidden_bytes / 2, kNumMaxTopk);
  return dispatch.stride > combine ? dispatch.stride : combine;
}

}  // namespace deep_ep::internode
