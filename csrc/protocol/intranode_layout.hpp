// Where the intranode dispatch and combine put their queues inside the payload of a rank's NVLink
// buffer. Host code sizes buffers with it (Config hints, op checks); device code carves pointers.
//
// Dispatch stages each token once, in the sender's own buffer: per channel, a ring of Q slots
// (Q = num_max_nvl_chunked_recv_tokens); every receiver pulls the slots whose destination mask names
// it. Combine pushes each received row back into its home rank's buffer: per channel and expert
// rank, a ring of Q slots.
#pragma once

#include <cstdint>

#include "util/align.hpp"

namespace deep_ep::intranode {

struct DispatchQueueLayout {
  int64_t row_stride;  // bytes per staged row, 16-aligned
  int64_t rows_offset, scales_offset, topk_idx_offset, topk_weights_offset, meta_offset;
  int64_t total_bytes;
  int num_channels, num_slots, num_scales, num_topk;

  // Each array is 128-byte aligned; slot s of channel c is element c * num_slots + s.
  static DispatchQueueLayout make(int num_channels, int num_slots, int64_t row_bytes, int num_scales, int num_topk) {
    DispatchQueueLayout layout{};
    layout.num_channels = num_channels;
    layout.num_slots = num_slots;
    layout.num_scales = num_scales;
    layout.num_topk = num_topk;
    layout.row_stride = align_up(row_bytes, 16);
    const int64_t slots = int64_t(num_channels) * num_slots;
    int64_t off = 0;
    layout.rows_offset = off;
    off = align_up(off + slots * layout.row_stride, 128);
    layout.scales_offset = off;
    off = align_up(off + slots * num_scales * 4, 128);
    layout.topk_idx_offset = off;
    off = align_up(off + slots * num_topk * 4, 128);  // global expert ids, int32
    layout.topk_weights_offset = off;
    off = align_up(off + slots * num_topk * 4, 128);
    layout.meta_offset = off;
    off = align_up(off + slots * 8, 128);  // {src_idx, dest_mask}
    layout.total_bytes = off;
    return layout;
  }
};

struct CombineQueueLayout {
  int64_t row_stride;
  int64_t rows_offset, topk_weights_offset;
  int64_t total_bytes;
  int num_channels, num_ranks, num_slots, num_topk;

  // Slot s of queue (channel c, expert rank j) is element (c * num_ranks + j) * num_slots + s.
  static CombineQueueLayout make(int num_channels, int num_ranks, int num_slots, int64_t row_bytes, int num_topk) {
    CombineQueueLayout layout{};
    layout.num_channels = num_channels;
    layout.num_ranks = num_ranks;
    layout.num_slots = num_slots;
    layout.num_topk = num_topk;
    layout.row_stride = align_up(row_bytes, 16);
    const int64_t slots = int64_t(num_channels) * num_ranks * num_slots;
    int64_t off = 0;
    layout.rows_offset = off;
    off = align_up(off + slots * layout.row_stride, 128);
    layout.topk_weights_offset = off;
    off = align_up(off + slots * num_topk * 4, 128);
    layout.total_bytes = off;
    return layout;
  }
};

}  // namespace deep_ep::intranode
