// Intranode combine. Block c owns channel c of every rank's tokens. Its sender warps (expert-rank
// role) push the rows this rank received from home rank r in channel c, in order, into r's ring
// (c, this rank); its receiver warps (home role) walk this rank's tokens of channel c in order and sum, in
// float32 over expert ranks in increasing order, the rows arriving for each token, then add the
// biases and round to bf16 once (the CPU reference's order, so results match bit for bit).
//
// Ring counters (ControlRegion, owner = the rank whose buffer holds them):
//   combine_tail[c][j] in home rank r's region: rows expert rank j pushed into ring (c, j). Written by j
//     (st.release.sys after a system fence of the writing warp); read by r with ld.acquire.sys.
//   combine_head[c][r] in expert rank j's region: rows of ring (c, j) home rank r has consumed. Written
//     by r (st.release.sys after its reads, once per token batch); read by j before reusing slots.
#include <algorithm>

#include <cuda_bf16.h>

#include "kernels/common/bf16.cuh"
#include "kernels/common/occupancy.cuh"
#include "kernels/intranode/prologue.cuh"
#include "kernels/intranode/token_sum.cuh"
#include "protocol/control_region.hpp"
#include "util/cuda_check.hpp"

namespace deep_ep::intranode {

namespace {

// Two shapes, picked per launch by the co-residency budget (docs/design.md decision 5): Wide when one block
// per SM is enough for every rank sharing the GPU, Narrow (two blocks per SM) otherwise. Wide has twice as
// many receiver warps as sender warps: a receiver lane keeps only one 16-byte column of each row of its
// token in flight, so the receivers, not HBM, bounded the combine with 8 + 8 warps (timed apart, the
// receivers alone took 1.8 ms of the 2.4 ms call; 16 of them made the call 7-9% faster on an H200, and
// 24, or two columns per lane, less so).
// kCopyInRounds: senders copy a row's remainder in the same rounds as the rest (device::warp_copy_in_rounds),
// which Wide's register budget takes without spilling more and Narrow's does not.
struct Wide {
  static constexpr int kSendWarps = 8, kRecvWarps = 16, kMinBlocksPerSm = 1;
  static constexpr bool kCopyInRounds = true;
};
struct Narrow {
  static constexpr int kSendWarps = 4, kRecvWarps = 8, kMinBlocksPerSm = 2;
  static constexpr bool kCopyInRounds = false;
};
constexpr int kRecvBarrier = 1;

struct Ring {
  uint16_t* rows;
  float* topk_weights;
};

__device__ __forceinline__ Ring ring_of(const Peers& peers, const CombineQueueLayout& layout, int rank) {
  char* base = peers.bases[rank] + peers.payload_offset;
  return {reinterpret_cast<uint16_t*>(base + layout.rows_offset),
          reinterpret_cast<float*>(base + layout.topk_weights_offset)};
}

// Each sender warp serves home ranks warp, warp + kSendWarps, ... in turn, a chunk at a time, so that
// no home rank waits behind another's whole channel.
template <int kSendWarps, bool kCopyInRounds>
__device__ void run_sender(const Peers& peers, const CombineArgs& args, const CombineQueueLayout& layout, int channel,
                           int warp, int lane) {
  constexpr int kMaxOwned = (kNumMaxNvlPeers + kSendWarps - 1) / kSendWarps;
  const int num_ranks = peers.num_ranks, rank = peers.rank, num_channels = args.num_channels;
  const int ring_slots = args.num_slots;
  const int row_int4 = args.hidden / 8;
  int first_row[kMaxOwned], num_rows[kMaxOwned], pushed[kMaxOwned];
#pragma unroll
  for (int owned = 0; owned < kMaxOwned; ++owned) {
    const int home_rank = warp + owned * kSendWarps;
    first_row[owned] = num_rows[owned] = pushed[owned] = 0;
    if (home_rank < num_ranks)
      received_channel_rows(args.rank_prefix_matrix, args.recv_channel_prefix_matrix, home_rank, rank, channel,
                            num_channels, num_ranks, first_row[owned], num_rows[owned]);
  }
  uint64_t idle_since = device::global_timer_ns();
  for (int polls = 1;; ++polls) {
    bool pending = false, progressed = false;
#pragma unroll
    for (int owned = 0; owned < kMaxOwned; ++owned) {
      const int home_rank = warp + owned * kSendWarps;
      if (home_rank >= num_ranks || pushed[owned] >= num_rows[owned]) continue;
      pending = true;
      // Push as much as fits, up to a chunk: the home rank may need exactly these rows to finish a batch.
      int head = 0;
      if (lane == 0) head = device::ld_acquire_sys(&control_of(peers, rank)->combine_head[channel][home_rank]);
      __syncwarp();  // the warp's slot writes below are ordered after lane 0's acquire
      head = __shfl_sync(0xffffffffu, head, 0);
      const int free_slots = head + ring_slots - pushed[owned];
      if (free_slots <= 0) continue;
      const int num_to_push = min(min(args.send_chunk, free_slots), num_rows[owned] - pushed[owned]);
      const Ring ring = ring_of(peers, layout, home_rank);
      const int64_t queue = static_cast<int64_t>(channel) * num_ranks + rank;
      for (int k = 0; k < num_to_push; ++k) {
        const int64_t row = first_row[owned] + pushed[owned] + k;
        const int64_t slot = queue * ring_slots + (pushed[owned] + k) % ring_slots;
        auto* dst = reinterpret_cast<int4*>(ring.rows + slot * (layout.row_stride / 2));
        const auto* src = reinterpret_cast<const int4*>(args.x + row * args.hidden);
        if constexpr (kCopyInRounds)
          device::warp_copy_in_rounds<8>(dst, src, row_int4, lane, device::ld_input);
        else
          device::warp_copy<8>(dst, src, row_int4, lane, device::ld_input);
        for (int k2 = lane; k2 < args.num_topk; k2 += 32)
          ring.topk_weights[slot * args.num_topk + k2] = args.topk_weights[row * args.num_topk + k2];
      }
      pushed[owned] += num_to_push;
      __threadfence_system();
      __syncwarp();
      if (lane == 0) device::st_release_sys(&control_of(peers, home_rank)->combine_tail[channel][rank], pushed[owned]);
      progressed = true;
    }
    if (!pending) return;
    if (progressed) {
      idle_since = device::global_timer_ns();
    } else if (polls % device::kPollsPerSlowCheck != 0) {
      continue;
    } else if (device::error_reported(peers.diagnostics)) {
      return;
    } else if (device::global_timer_ns() - idle_since > static_cast<uint64_t>(peers.timeout_ns)) {
      int stuck = warp;
#pragma unroll
      for (int owned = kMaxOwned - 1; owned >= 0; --owned)
        if (warp + owned * kSendWarps < num_ranks && pushed[owned] < num_rows[owned]) stuck = warp + owned * kSendWarps;
      if (lane == 0) device::report(peers.diagnostics, Phase::kCombineWaitSpace, true, rank, stuck, channel, -1, 0, 0);
      return;
    }
  }
}

template <int kRecvWarps>
__device__ void run_receiver(const Peers& peers, const CombineArgs& args, const CombineQueueLayout& layout, int channel,
                             int receive_warp, int lane) {
  const int num_ranks = peers.num_ranks, rank = peers.rank, ring_slots = args.num_slots;
  const int batch = min(32, ring_slots);
  int begin, end;
  device::channel_range(channel, args.num_channels, args.num_tokens, begin, end);
  const Ring ring = ring_of(peers, layout, rank);
  ControlRegion* mine = control_of(peers, rank);
  // Orders nothing now, but nvcc 13 allocates this function's registers far worse without it (280 bytes of spills
  // per thread instead of 36).
  device::named_barrier(kRecvBarrier, kRecvWarps * 32);

  int consumed[kNumMaxNvlPeers];  // rows of ring (channel, j) consumed before this batch, same in every thread
#pragma unroll
  for (int j = 0; j < kNumMaxNvlPeers; ++j) consumed[j] = 0;
  // Lane j < num_ranks: the tail of ring (channel, j) this warp last acquired. Senders usually run rows ahead, so
  // most tokens need no load at all: rows below a value already acquired by this lane are visible.
  int acquired_tail = 0;

  for (int batch_begin = begin; batch_begin < end; batch_begin += batch) {
    const int batch_size = min(batch, end - batch_begin);
    unsigned mask, lanes_of[kNumMaxNvlPeers];
    token_group_masks(args.is_token_in_rank, batch_begin, batch_size, num_ranks, lane, mask, lanes_of);
    bool failed = false;  // warp-uniform: a wait of this warp gave up

    for (int k = receive_warp; k < batch_size; k += kRecvWarps) {
      const int token = batch_begin + k;
      const unsigned token_mask = __shfl_sync(0xffffffffu, mask, k);
      int slot_of[kNumMaxNvlPeers];
      int needed = 0;  // lane j: rows of ring (channel, j) this token needs pushed, 0 if none
#pragma unroll
      for (int j = 0; j < kNumMaxNvlPeers; ++j) {
        slot_of[j] = consumed[j] + __popc(lanes_of[j] & ((1u << k) - 1u));
        if (j == lane && ((token_mask >> j) & 1u)) needed = slot_of[j] + 1;
      }
      // Lane j waits for ring j (all rings in parallel) unless an earlier acquire covers the row; the
      // acquires of every lane order the whole warp's reads of the rows after the __syncwarp.
      bool ok = true;
      if (needed > acquired_tail)
        ok = device::wait_at_least(&mine->combine_tail[channel][lane], needed, peers.timeout_ns, peers.diagnostics,
                                   Phase::kCombineWaitData, rank, lane, channel, &acquired_tail);
      __syncwarp();
      if (!__all_sync(0xffffffffu, ok)) {
        failed = true;
        break;
      }
      const int64_t row_int4_stride = layout.row_stride / 16;
      const int4* rows = reinterpret_cast<const int4*>(ring.rows);
      sum_token<1>(
          lane, token, token_mask, args.hidden, args.num_topk, args.bias_0, args.bias_1, args.combined_x,
          args.combined_topk_weights,
          [&](int j, int col) {
            return device::ld_queue(
                rows +
                ((static_cast<int64_t>(channel) * num_ranks + j) * ring_slots + slot_of[j] % ring_slots) *
                    row_int4_stride +
                col);
          },
          [&](int j, int k) {
            return __ldcg(&ring.topk_weights[((static_cast<int64_t>(channel) * num_ranks + j) * ring_slots +
                                              slot_of[j] % ring_slots) *
                                                 args.num_topk +
                                             k]);
          });
    }
    // All reads of this batch are done before its slots are released. Every receiver warp learns of a failed wait
    // at this barrier: a flag in shared memory could already hold the next batch's failure for a slow reader.
    if (device::named_barrier_or(kRecvBarrier, kRecvWarps * 32, failed)) return;
#pragma unroll
    for (int j = 0; j < kNumMaxNvlPeers; ++j) consumed[j] += __popc(lanes_of[j]);
    if (receive_warp == 0 && lane < num_ranks) {
      int value = 0;
#pragma unroll
      for (int j = 0; j < kNumMaxNvlPeers; ++j)
        if (j == lane) value = consumed[j];
      device::st_release_sys(&control_of(peers, lane)->combine_head[channel][rank], value);
    }
  }
}

template <typename Shape>
__global__ void __launch_bounds__(32 * (Shape::kSendWarps + Shape::kRecvWarps), Shape::kMinBlocksPerSm)
    combine(Peers peers, CombineArgs args, CombineQueueLayout layout) {
  const int warp = threadIdx.x / 32, lane = device::lane_id();
  if (warp < Shape::kSendWarps) {
    run_sender<Shape::kSendWarps, Shape::kCopyInRounds>(peers, args, layout, blockIdx.x, warp, lane);
  } else {
    run_receiver<Shape::kRecvWarps>(peers, args, layout, blockIdx.x, warp - Shape::kSendWarps, lane);
  }
}

}  // namespace

template <typename Shape>
static int threads_of() {
  return 32 * (Shape::kSendWarps + Shape::kRecvWarps);
}

int max_resident_combine_blocks_per_sm(bool wide) {
  return wide ? device::resident_blocks_per_sm<combine<Wide>>(threads_of<Wide>())
              : device::resident_blocks_per_sm<combine<Narrow>>(threads_of<Narrow>());
}

void launch_combine(const Peers& peers, const CombineQueueLayout& layout, const CombineArgs& args,
                    const LaunchShape& shape, cudaStream_t stream) {
  if (shape.wide) {
    combine<Wide><<<shape.num_blocks, threads_of<Wide>(), 0, stream>>>(peers, args, layout);
  } else {
    combine<Narrow><<<shape.num_blocks, threads_of<Narrow>(), 0, stream>>>(peers, args, layout);
  }
  DEEP_EP_CUDA_CHECK(cudaGetLastError());
}

}  // namespace deep_ep::intranode
