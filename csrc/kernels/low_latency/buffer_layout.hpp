// Layout of the low-latency (decode) buffer inside a rank's RDMA payload: two identical halves used
// alternately, so that two results can be held at once (spec section 8). Each half holds:
//   dispatch receive slots [L][R][M]: a slot per (local expert, source rank, source position), written
//     by the source with plain stores, so no atomics are needed to place a token;
//   combine receive rows [M][min(E, kNumMaxTopk)]: one bf16 row per (token, top-k slot) of this rank;
//   signals: dispatch counts [L][R] and combine arrivals [R], each written by one peer.
#pragma once

#include <algorithm>
#include <cstdint>

#include "deep_ep/config.hpp"
#include "kernels/intranode/buffer_layout.hpp"

namespace deep_ep::low_latency {

struct HalfLayout {
  int64_t dispatch_slot_bytes;   // bf16 row + FP8 scales + 16 bytes of metadata
  int64_t dispatch_offset, combine_offset, dispatch_signal_offset, combine_signal_offset;
  int64_t bytes;

  static HalfLayout make(int64_t num_max_dispatch_tokens_per_rank, int64_t hidden, int64_t num_ranks,
                         int64_t num_experts) {
    using intranode::align_up;
    HalfLayout l{};
    const int64_t local_experts = num_experts / num_ranks;
    const int64_t combine_slots = std::min<int64_t>(num_experts, kNumMaxTopk);
    l.dispatch_slot_bytes = align_up(hidden * 2 + hidden / 128 * 4 + 16, 16);
    int64_t off = 0;
    l.dispatch_offset = off;
    off = align_up(off + local_experts * num_ranks * num_max_dispatch_tokens_per_rank * l.dispatch_slot_bytes, 128);
    l.combine_offset = off;
    off = align_up(off + num_max_dispatch_tokens_per_rank * combine_slots * hidden * 2, 128);
    l.dispatch_signal_offset = off;
    off = align_up(off + local_experts * num_ranks * 4, 128);
    l.combine_signal_offset = off;
    off = align_up(off + num_ranks * 4, 128);
    l.bytes = off;
    return l;
  }
};

inline int64_t rdma_size_hint(int64_t num_max_dispatch_tokens_per_rank, int64_t hidden, int64_t num_ranks,
                              int64_t num_experts) {
  return 2 * HalfLayout::make(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts).bytes;
}

}  // namespace deep_ep::low_latency
