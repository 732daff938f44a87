// Intranode dispatch. Block c owns channel c: its sender warps stage each of the channel's tokens
// once into this rank's ring c (row, scales, top-k, {source index, destination mask}); its receiver
// warps pull, from every rank's ring c, the slots whose mask names this rank, straight into the
// outputs. With ranks on one GPU that is one HBM pass of the sender's tokens plus one of the received
// rows; the ring itself is small enough to be served mostly from L2.
//
// Ring counters (ControlRegion, owner = the rank whose buffer holds them):
//   dispatch_tail[c][i] in receiver j's region: slots rank i has staged in ring c. Written by sender i
//     (st.release.sys after a system fence of every sender thread); read by j with ld.acquire.sys
//     before it reads those slots.
//   dispatch_head[c][j] in sender i's region: slots receiver j is done with (kDone when j needs no
//     more). Written by j (st.release.sys after its reads); read by i before reusing slots.
#include <algorithm>

#include "kernels/common/control_region.hpp"
#include "kernels/common/occupancy.cuh"
#include "kernels/intranode/prologue.cuh"
#include "runtime/cuda_check.hpp"

namespace deep_ep::intranode {

namespace {

// Two shapes, picked per launch by the co-residency budget (docs/design.md decision 5): Wide when one block
// per SM is enough for every rank sharing the GPU, Narrow (two blocks per SM) otherwise.
struct Wide {
  static constexpr int kSendWarps = 4, kRecvWarps = 16, kMinBlocksPerSm = 1;
};
struct Narrow {
  static constexpr int kSendWarps = 4, kRecvWarps = 8, kMinBlocksPerSm = 2;
};
constexpr int kDone = 1 << 30;
constexpr int kSendBarrier = 1;  // named barrier ids; 0 is __syncthreads
constexpr int kRecvBarrierBase = 2;

struct SlotMeta {
  int src_idx;
  unsigned dest_mask;
};

struct Ring {
  uint8_t* rows;
  float* scales;
  int* topk_idx;
  float* topk_weights;
  SlotMeta* meta;
};

__device__ __forceinline__ Ring ring_of(const Peers& p, const DispatchQueueLayout& l, int rank) {
  char* base = p.bases[rank] + p.payload_offset;
  return {reinterpret_cast<uint8_t*>(base + l.rows_offset), reinterpret_cast<float*>(base + l.scales_offset),
          reinterpret_cast<int*>(base + l.topk_idx_offset), reinterpret_cast<float*>(base + l.topk_weights_offset),
          reinterpret_cast<SlotMeta*>(base + l.meta_offset)};
}

template <int kSendWarps>
__device__ void run_sender(const Peers& p, const DispatchArgs& a, const DispatchQueueLayout& l, int c, int warp,
                           int lane) {
  const int R = p.num_ranks, me = p.rank;
  ControlRegion* mine = control_of(p, me);
  const Ring ring = ring_of(p, l, me);
  int begin, end;
  device::channel_range(c, a.num_channels, a.num_tokens, begin, end);
  const int batch = min(a.send_chunk, 32);
  const int row_int4 = a.row_bytes / 16;
  const int Q = a.num_slots;
  __shared__ int abort_flag;
  if (warp == 0 && lane == 0) abort_flag = 0;

  // Output row of the next token this channel sends to rank j (for send_head), same in every thread.
  int next_row[kNumMaxNvlPeers];
#pragma unroll
  for (int j = 0; j < kNumMaxNvlPeers; ++j)
    next_row[j] = j < R ? rank_begin(a.rank_prefix_matrix, me, j, R) + a.channel_prefix_matrix[j * a.num_channels + c] : 0;
  device::named_barrier(kSendBarrier, kSendWarps * 32);

  int staged = 0;
  for (int t0 = begin; t0 < end; t0 += batch) {
    const int n = min(batch, end - t0);
    unsigned mask = 0;
    if (lane < n) {
      const bool* row = a.is_token_in_rank + static_cast<int64_t>(t0 + lane) * R;
      for (int j = 0; j < R; ++j) mask |= static_cast<unsigned>(row[j]) << j;
    }
    const unsigned staged_lanes = __ballot_sync(0xffffffffu, mask != 0);
    const int num_staged = __popc(staged_lanes);

    // send_head: where each destination will place this token (warp 0 writes, all keep next_row).
#pragma unroll
    for (int j = 0; j < kNumMaxNvlPeers; ++j) {
      if (j >= R) break;
      const unsigned to_j = __ballot_sync(0xffffffffu, (mask >> j) & 1u);
      if (warp == 0 && lane < n)
        a.send_head[static_cast<int64_t>(t0 + lane) * R + j] =
            ((mask >> j) & 1u) ? next_row[j] + __popc(to_j & ((1u << lane) - 1u)) : -1;
      next_row[j] += __popc(to_j);
    }
    if (num_staged == 0) continue;

    // Wait until every receiver released the slots this batch overwrites.
    if (warp == 0 && lane < R) {
      if (!device::wait_at_least(&mine->dispatch_head[c][lane], staged + num_staged - Q, p.timeout_ns, p.diagnostics,
                                 Phase::kDispatchWaitSpace, me, lane, c))
        abort_flag = 1;
    }
    device::named_barrier(kSendBarrier, kSendWarps * 32);
    if (abort_flag) return;

    for (int k = warp; k < num_staged; k += kSendWarps) {
      const int src_lane = device::nth_set_bit(staged_lanes, k);
      const int t = t0 + src_lane;
      const unsigned token_mask = __shfl_sync(0xffffffffu, mask, src_lane);
      const int64_t slot = static_cast<int64_t>(c) * Q + (staged + k) % Q;
      device::warp_copy<4>(reinterpret_cast<int4*>(ring.rows + slot * l.row_stride),
                           reinterpret_cast<const int4*>(a.x + static_cast<int64_t>(t) * a.row_bytes), row_int4, lane,
                           device::ld_input);
      for (int s = lane; s < a.num_scales; s += 32)
        ring.scales[slot * a.num_scales + s] = a.x_scales[t * a.scale_token_stride + s * a.scale_channel_stride];
      for (int k2 = lane; k2 < a.num_topk; k2 += 32) {
        ring.topk_idx[slot * a.num_topk + k2] = static_cast<int>(a.topk_idx[static_cast<int64_t>(t) * a.num_topk + k2]);
        ring.topk_weights[slot * a.num_topk + k2] = a.topk_weights[static_cast<int64_t>(t) * a.num_topk + k2];
      }
      if (lane == 0) ring.meta[slot] = {t, token_mask};
    }
    staged += num_staged;
    __threadfence_system();
    device::named_barrier(kSendBarrier, kSendWarps * 32);
    if (warp == 0 && lane < R) device::st_release_sys(&control_of(p, lane)->dispatch_tail[c][me], staged);
  }
}

template <int kRecvWarps>
__device__ void run_receiver(const Peers& p, const DispatchArgs& a, const DispatchQueueLayout& l, int c, int rwarp,
                             int lane) {
  const int R = p.num_ranks, me = p.rank, C = a.num_channels;
  const int warps_per_sender = kRecvWarps / R;
  const int i = rwarp / warps_per_sender, sub = rwarp % warps_per_sender;
  if (i >= R) return;
  const int group_threads = warps_per_sender * 32;
  const Ring ring = ring_of(p, l, i);
  const int Q = a.num_slots;
  const int L = a.num_experts > 0 ? a.num_experts / R : 0;
  const int row_int4 = a.row_bytes / 16;

  int out_base, expected;
  received_channel_rows(a.rank_prefix_matrix, a.recv_channel_prefix_matrix, i, me, c, C, R, out_base, expected);
  int* tail = &control_of(p, me)->dispatch_tail[c][i];
  int* head = &control_of(p, i)->dispatch_head[c][me];

  // The warps of a group agree on each window: the first warp's acquire of the tail is shared through
  // shared memory behind a named barrier (which also orders the later slot reads after it).
  __shared__ int window_end[kNumMaxNvlPeers];
  auto group_sync = [&] {
    if (warps_per_sender > 1) device::named_barrier(kRecvBarrierBase + i, group_threads);
    else __syncwarp();
  };
  int scanned = 0, received = 0;
  while (received < expected) {
    if (sub == 0 && lane == 0) {
      const bool ok = device::wait_at_least(tail, scanned + 1, p.timeout_ns, p.diagnostics, Phase::kDispatchWaitData,
                                            me, i, c);
      window_end[i] = ok ? device::ld_acquire_sys(tail) : -1;
    }
    group_sync();
    const int available = window_end[i];
    if (available < 0) return;
    for (int g0 = scanned; g0 < available; g0 += 32) {
      const int s = g0 + lane;
      SlotMeta meta{0, 0};
      if (s < available) {
        const int64_t slot = static_cast<int64_t>(c) * Q + s % Q;
        meta.src_idx = __ldcg(&ring.meta[slot].src_idx);
        meta.dest_mask = static_cast<unsigned>(__ldcg(reinterpret_cast<const int*>(&ring.meta[slot].dest_mask)));
      }
      const unsigned mine_lanes = __ballot_sync(0xffffffffu, (meta.dest_mask >> me) & 1u);
      const int count = __popc(mine_lanes);
      for (int k = sub; k < count; k += warps_per_sender) {
        const int src_lane = device::nth_set_bit(mine_lanes, k);
        const int src_idx = __shfl_sync(0xffffffffu, meta.src_idx, src_lane);
        const int64_t slot = static_cast<int64_t>(c) * Q + (g0 + src_lane) % Q;
        const int64_t row = out_base + received + k;
        if (row >= a.num_rows) {
          if (lane == 0)
            device::report(p.diagnostics, Phase::kDispatchWaitData, false, me, i, c, src_idx, a.num_rows, row + 1);
          continue;
        }
        device::warp_copy<8>(reinterpret_cast<int4*>(a.recv_x + row * a.row_bytes),
                             reinterpret_cast<const int4*>(ring.rows + slot * l.row_stride), row_int4, lane,
                             device::ld_queue);
        for (int s2 = lane; s2 < a.num_scales; s2 += 32)
          a.recv_x_scales[row * a.num_scales + s2] = __ldcg(&ring.scales[slot * a.num_scales + s2]);
        for (int k2 = lane; k2 < a.num_topk; k2 += 32) {
          const int e = __ldcg(&ring.topk_idx[slot * a.num_topk + k2]);
          const bool local = e >= me * L && e < (me + 1) * L;
          a.recv_topk_idx[row * a.num_topk + k2] = local ? e - me * L : -1;
          a.recv_topk_weights[row * a.num_topk + k2] = local ? __ldcg(&ring.topk_weights[slot * a.num_topk + k2]) : 0.0f;
        }
        if (lane == 0) a.recv_src_idx[row] = src_idx;
      }
      received += count;
    }
    scanned = available;
    // Every warp of the group has finished reading the window before the slots are released, and
    // before window_end is overwritten.
    group_sync();
    if (sub == 0 && lane == 0) device::st_release_sys(head, received >= expected ? kDone : scanned);
  }
  if (expected == 0 && sub == 0 && lane == 0) device::st_release_sys(head, kDone);
}

template <typename Shape>
__global__ void __launch_bounds__(32 * (Shape::kSendWarps + Shape::kRecvWarps), Shape::kMinBlocksPerSm)
    dispatch(Peers p, DispatchArgs a, DispatchQueueLayout l) {
  const int warp = threadIdx.x / 32, lane = device::lane_id();
  const int c = blockIdx.x;
  if (warp < Shape::kSendWarps) {
    run_sender<Shape::kSendWarps>(p, a, l, c, warp, lane);
  } else {
    run_receiver<Shape::kRecvWarps>(p, a, l, c, warp - Shape::kSendWarps, lane);
  }
  // num_worst_tokens: rows past the real count carry no expert.
  const int num_recv = a.rank_prefix_matrix[(p.num_ranks - 1) * p.num_ranks + p.rank];
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t r = num_recv + first; r < a.num_rows; r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    a.recv_src_idx[r] = -1;
    for (int k = 0; k < a.num_topk; ++k) {
      a.recv_topk_idx[r * a.num_topk + k] = -1;
      a.recv_topk_weights[r * a.num_topk + k] = 0.0f;
    }
  }
}

}  // namespace

template <typename Shape>
static int threads_of() {
  return 32 * (Shape::kSendWarps + Shape::kRecvWarps);
}

int max_resident_dispatch_blocks_per_sm(bool wide) {
  return wide ? device::resident_blocks_per_sm<dispatch<Wide>>(threads_of<Wide>())
              : device::resident_blocks_per_sm<dispatch<Narrow>>(threads_of<Narrow>());
}

void launch_dispatch(const Peers& peers, const DispatchArgs& args, bool wide, cudaStream_t stream) {
  const auto layout = DispatchQueueLayout::make(args.num_channels, args.num_slots, args.row_bytes, args.num_scales,
                                                args.num_topk);
  if (wide) {
    dispatch<Wide><<<args.num_channels, threads_of<Wide>(), 0, stream>>>(peers, args, layout);
  } else {
    dispatch<Narrow><<<args.num_channels, threads_of<Narrow>(), 0, stream>>>(peers, args, layout);
  }
  DEEP_EP_CUDA_CHECK(cudaGetLastError());
}

}  // namespace deep_ep::intranode
