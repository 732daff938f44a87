// Layout of the low-latency (decode) buffer inside a rank's RDMA payload: two identical halves used
// alternately, so that two results can be held at once (spec section 8). Each half holds:
//   dispatch receive slots [L][R][M]: a slot per (local expert, source rank, source position), written
//     by the source with plain stores, so no atomics are needed to place a token. A slot is
//     [payload: bf16 row, or FP8 row | float32 scales at byte 2H | 16-byte metadata {token, top-k slot}];
//   combine receive rows [M][min(E, kNumMaxTopk)]: one row per (token, top-k slot) of this rank, bf16
//     or LogFMT, written by the expert's rank;
//   signals, each written by one peer: dispatch [L][R] and combine [R], 64-bit
//     (epoch << 32 | row count) so that a signal left over from an earlier call never matches;
//   dispatch send counters [E], int32, used only by the owner: row halves it has stored per expert.
#pragma once

#include <algorithm>
#include <cstdint>

#include "deep_ep/config.hpp"
#include "kernels/intranode/buffer_layout.hpp"

namespace deep_ep::low_latency {

struct HalfLayout {
  int64_t dispatch_scales_offset;  // inside a slot
  int64_t dispatch_meta_offset;    // inside a slot
  int64_t dispatch_slot_bytes;
  int64_t combine_row_bytes;       // bf16 row; a LogFMT row is smaller
  int64_t combine_slots_per_token; // min(E, kNumMaxTopk)
  int64_t dispatch_offset, combine_offset, dispatch_signal_offset, combine_signal_offset, send_done_offset;
  int64_t bytes;

  static HalfLayout make(int64_t num_max_dispatch_tokens_per_rank, int64_t hidden, int64_t num_ranks,
                         int64_t num_experts) {
    using intranode::align_up;
    HalfLayout l{};
    const int64_t local_experts = num_experts / num_ranks;
    l.combine_slots_per_token = std::min<int64_t>(num_experts, kNumMaxTopk);
    l.dispatch_scales_offset = hidden * 2;
    l.dispatch_meta_offset = align_up(hidden * 2 + hidden / 128 * 4, 16);
    l.dispatch_slot_bytes = l.dispatch_meta_offset + 16;
    l.combine_row_bytes = hidden * 2;
    int64_t off = 0;
    l.dispatch_offset = off;
    off = align_up(off + local_experts * num_ranks * num_max_dispatch_tokens_per_rank * l.dispatch_slot_bytes, 128);
    l.combine_offset = off;
    off = align_up(off + num_max_dispatch_tokens_per_rank * l.combine_slots_per_token * l.combine_row_bytes, 128);
    l.dispatch_signal_offset = off;
    off = align_up(off + local_experts * num_ranks * 8, 128);
    l.combine_signal_offset = off;
    off = align_up(off + num_ranks * 8, 128);
    l.send_done_offset = off;
    off = align_up(off + num_experts * 4, 128);
    l.bytes = off;
    return l;
  }
};

inline int64_t rdma_size_hint(int64_t num_max_dispatch_tokens_per_rank, int64_t hidden, int64_t num_ranks,
                              int64_t num_experts) {
  return 2 * HalfLayout::make(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts).bytes;
}

}  // namespace deep_ep::low_latency
