// Layout of the low-latency (decode) buffer inside a rank's RDMA payload: two identical halves used
// alternately, so that two results can be held at once (docs/compatibility.md section 8). Each half holds:
//   dispatch receive slots [L][R][M]: a slot per (local expert, source rank, source position), so no
//     atomics are needed to place a token. A slot is [payload: bf16 row, or FP8 row | float32 scales
//     at byte 2H | 16-byte metadata {token, top-k slot}];
//   combine receive rows [M][min(E, kNumMaxTopk)]: one row per (token, top-k slot) of this rank, bf16
//     or LogFMT, written by the expert's rank;
//   dispatch send slots [M] and their metadata [M][kNumMaxTopk] (one per destination): where a token is
//     staged (quantized once) before the transport puts it to peers reached through the transport (the
//     combine stages its rows in the dispatch slots of its own half instead, where a zero-copy
//     combine's rows already are);
//   signals, 64-bit, one transport signal array (index functions below), each written by one peer:
//     counts, dispatch [L][R] and combine [R], carrying (epoch << 32 | row count) so that a value left
//     from an earlier call never matches; arrivals, dispatch [L][R] and combine [R], which only grow:
//     each put of rows through the transport adds to its arrivals signal;
//   receiver state: arrival units consumed so far per dispatch source [L][R] and per (combine block,
//     source) [kMaxBlocks][R], uint64; the next op waits for "consumed + what its count announces";
//   sender state: the last value this rank gave each of its count signals at a peer, dispatch [E] and
//     combine [R], uint64: a transport only adds, so setting a tagged value means adding the difference;
//   dispatch send counters [E], int32, used only by the owner: row parts it has sent per expert.
// Everything from signals_offset to the end is zeroed by clean_low_latency_buffer.
#pragma once

#include <algorithm>
#include <cstdint>

#include "deep_ep/config.hpp"
#include "util/align.hpp"

// Host and device both use the signal index functions; plain C++ compilers see ordinary inline functions.
#ifdef __CUDACC__
#define DEEP_EP_LOW_LATENCY_HD __host__ __device__
#else
#define DEEP_EP_LOW_LATENCY_HD
#endif

namespace deep_ep::low_latency {

// Blocks of one rank's low-latency grid, at most (one per SM): the combine receive keeps one consumed
// counter per (block, source).
constexpr int kMaxLowLatencyBlocks = 256;

// A row put through the transport adds kRowArrivalUnits / parts to its arrivals signal, where parts
// (1..16, see dispatch.cu) is how many warps share the row: a row counts the same whatever its split.
constexpr uint64_t kRowArrivalUnits = 720720;  // divisible by every integer 1..16

struct HalfLayout {
  int64_t dispatch_scales_offset;  // inside a slot
  int64_t dispatch_meta_offset;    // inside a slot
  int64_t dispatch_slot_bytes;
  int64_t combine_row_bytes;        // bf16 row; a LogFMT row is smaller
  int64_t combine_slots_per_token;  // min(E, kNumMaxTopk)
  int64_t dispatch_offset, combine_offset, dispatch_send_offset, dispatch_send_meta_offset, signals_offset;
  int64_t dispatch_consumed_offset, combine_consumed_offset, dispatch_mirror_offset, combine_mirror_offset;
  int64_t send_done_offset;
  int64_t bytes;
  int num_local_experts, num_ranks;

  // Transport signal indices (uint64 at signals_offset + 8 * index). Counts are written by tagged
  // values, arrivals by adds of row units; `source` is the writing rank.
  DEEP_EP_LOW_LATENCY_HD int dispatch_count_signal(int local_expert, int source) const {
    return local_expert * num_ranks + source;
  }
  DEEP_EP_LOW_LATENCY_HD int combine_count_signal(int source) const { return num_local_experts * num_ranks + source; }
  DEEP_EP_LOW_LATENCY_HD int dispatch_arrivals_signal(int local_expert, int source) const {
    return (num_local_experts + 1) * num_ranks + local_expert * num_ranks + source;
  }
  DEEP_EP_LOW_LATENCY_HD int combine_arrivals_signal(int source) const {
    return (2 * num_local_experts + 1) * num_ranks + source;
  }
  DEEP_EP_LOW_LATENCY_HD int num_signals() const { return signals_for(num_local_experts, num_ranks); }
  // Signals of a half with num_local_experts experts per rank (the Buffer sizes its GIN signal ranges
  // with the most an op can have).
  static DEEP_EP_LOW_LATENCY_HD int signals_for(int num_local_experts, int num_ranks) {
    return 2 * (num_local_experts + 1) * num_ranks;
  }

  static HalfLayout make(int64_t num_max_dispatch_tokens_per_rank, int64_t hidden, int64_t num_ranks,
                         int64_t num_experts) {
    HalfLayout layout{};
    const int64_t M = num_max_dispatch_tokens_per_rank;
    const int64_t local_experts = num_experts / num_ranks;
    layout.num_local_experts = static_cast<int>(local_experts);
    layout.num_ranks = static_cast<int>(num_ranks);
    layout.combine_slots_per_token = std::min<int64_t>(num_experts, kNumMaxTopk);
    layout.dispatch_scales_offset = hidden * 2;
    layout.dispatch_meta_offset = align_up(hidden * 2 + hidden / 128 * 4, 16);
    layout.dispatch_slot_bytes = layout.dispatch_meta_offset + 16;
    layout.combine_row_bytes = hidden * 2;
    int64_t off = 0;
    layout.dispatch_offset = off;
    off = align_up(off + local_experts * num_ranks * M * layout.dispatch_slot_bytes, 128);
    layout.combine_offset = off;
    off = align_up(off + M * layout.combine_slots_per_token * layout.combine_row_bytes, 128);
    layout.dispatch_send_offset = off;
    off = align_up(off + M * layout.dispatch_slot_bytes, 128);
    layout.dispatch_send_meta_offset = off;
    off = align_up(off + M * kNumMaxTopk * 16, 128);
    layout.signals_offset = off;
    off = align_up(off + int64_t(layout.num_signals()) * 8, 128);
    layout.dispatch_consumed_offset = off;
    off = align_up(off + local_experts * num_ranks * 8, 128);
    layout.combine_consumed_offset = off;
    off = align_up(off + int64_t(kMaxLowLatencyBlocks) * num_ranks * 8, 128);
    layout.dispatch_mirror_offset = off;
    off = align_up(off + num_experts * 8, 128);
    layout.combine_mirror_offset = off;
    off = align_up(off + num_ranks * 8, 128);
    layout.send_done_offset = off;
    off = align_up(off + num_experts * 4, 128);
    // Where the second half starts, measured (H100, 8 ranks under MPS, 128 tokens x 7168, top-8 of 288;
    // `scripts/ab_bench.sh`): with the same kernels, the low-latency sends ran about twice as slow when the
    // halves were 0, 512 or 1536 bytes past a 4 KiB multiple apart (and the old layout shifted by 25 KB),
    // and at full speed 3584 bytes past a 64 KiB multiple apart, as the layout before the transport
    // regions happened to be. The cause (an L2 or DRAM address mapping effect) is not identified.
    layout.bytes = align_up(off, int64_t(1) << 16) + 3584;
    return layout;
  }
};

inline int64_t rdma_size_hint(int64_t num_max_dispatch_tokens_per_rank, int64_t hidden, int64_t num_ranks,
                              int64_t num_experts) {
  return 2 * HalfLayout::make(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts).bytes;
}

}  // namespace deep_ep::low_latency
