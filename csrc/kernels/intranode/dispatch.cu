// Intranode dispatch. Block c owns channel c: its sender warps stage each of the channel's tokens
// once into this rank's ring c (row, scales, top-k, {source index, destination mask}); its receiver
// warps pull, from every rank's ring c, the slots whose mask names this rank, straight into the
// outputs. With ranks on one GPU that is one HBM pass of the sender's tokens plus one of the received
// rows; the ring itself is small enough to be served mostly from L2.
//
// Ring counters (ControlRegion, owner = the rank whose buffer holds them):
//   dispatch_tail[c][i] in receiver j's region: slots rank i has staged in ring c. Written by sender i
//     (st.release.sys by warp 0 after a named barrier of every sender warp: the release is cumulative
//     over the batch the barrier ordered before it); read by j with ld.acquire.sys before it reads
//     those slots.
//   dispatch_head[c][j] in sender i's region: slots receiver j is done with (kDone when j needs no
//     more). Written by j (st.release.sys after its reads); read by i before reusing slots.
#include <algorithm>

#include "kernels/common/occupancy.cuh"
#include "kernels/common/role_timer.cuh"
#include "kernels/intranode/prologue.cuh"
#include "protocol/control_region.hpp"
#include "util/cuda_check.hpp"

namespace deep_ep::intranode {

namespace {

// Two shapes, picked per launch by the co-residency budget (docs/design.md decision 5): Wide when one block
// per SM is enough for every rank sharing the GPU, Narrow (two blocks per SM) otherwise. A sender warp copies one
// token of a batch at a time, so Wide's 8 sender warps copy a batch of up to 8 tokens in one pass, where 4 took two
// (batches are at most half the ring: runtime/intranode_rings.hpp).
struct Wide {
  static constexpr int kSendWarps = 8, kRecvWarps = 16, kMinBlocksPerSm = 1;
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

__device__ __forceinline__ Ring ring_of(const Peers& peers, const DispatchQueueLayout& layout, int rank) {
  char* base = peers.bases[rank] + peers.payload_offset;
  return {reinterpret_cast<uint8_t*>(base + layout.rows_offset), reinterpret_cast<float*>(base + layout.scales_offset),
          reinterpret_cast<int*>(base + layout.topk_idx_offset),
          reinterpret_cast<float*>(base + layout.topk_weights_offset),
          reinterpret_cast<SlotMeta*>(base + layout.meta_offset)};
}

template <int kSendWarps>
__device__ void run_sender(const Peers& peers, const DispatchArgs& args, const DispatchQueueLayout& layout, int channel,
                           int warp, int lane) {
  const int num_ranks = peers.num_ranks, rank = peers.rank;
  ControlRegion* mine = control_of(peers, rank);
  const Ring ring = ring_of(peers, layout, rank);
  int begin, end;
  device::channel_range(channel, args.num_channels, args.num_tokens, begin, end);
  const int batch = min(args.send_chunk, 32);
  const int row_int4 = args.row_bytes / 16;
  const int ring_slots = args.num_slots;
  __shared__ int abort_flag;
  if (warp == 0 && lane == 0) abort_flag = 0;

  // Lane j < num_ranks: the output row of the next token this channel sends to rank j (for send_head), the same
  // in every warp. One value per lane instead of an array in every lane: the registers go to the row copies.
  int next_row = lane < num_ranks ? rank_begin(args.rank_prefix_matrix, rank, lane, num_ranks) +
                                        args.channel_prefix_matrix[lane * args.num_channels + channel]
                                  : 0;
  device::named_barrier(kSendBarrier, kSendWarps * 32);

  // Role timer buckets (DEEP_EP_PROFILE_ROLES builds only): 0 copying rows into the ring, 1 waiting for ring
  // space, 2 fence and tail publication, 3 masks and send_head.
  device::RoleTimer timer;
  timer.begin();
  int staged = 0;
  for (int batch_begin = begin; batch_begin < end; batch_begin += batch) {
    const int batch_size = min(batch, end - batch_begin);
    unsigned mask = 0;
    if (lane < batch_size) {
      const bool* row = args.is_token_in_rank + static_cast<int64_t>(batch_begin + lane) * num_ranks;
      for (int j = 0; j < num_ranks; ++j) mask |= static_cast<unsigned>(row[j]) << j;
    }
    const unsigned staged_lanes = __ballot_sync(0xffffffffu, mask != 0);
    const int num_staged = __popc(staged_lanes);

    // send_head: where each destination will place this token (warp 0 writes).
    unsigned to_lane = 0;  // lane j: the batch's lanes whose token goes to rank j
#pragma unroll
    for (int j = 0; j < kNumMaxNvlPeers; ++j) {
      if (j >= num_ranks) break;
      const unsigned to_j = __ballot_sync(0xffffffffu, (mask >> j) & 1u);
      const int row_j = __shfl_sync(0xffffffffu, next_row, j);
      if (warp == 0 && lane < batch_size)
        args.send_head[static_cast<int64_t>(batch_begin + lane) * num_ranks + j] =
            ((mask >> j) & 1u) ? row_j + __popc(to_j & ((1u << lane) - 1u)) : -1;
      if (lane == j) to_lane = to_j;
    }
    next_row += __popc(to_lane);
    timer.lap(3);
    if (num_staged == 0) continue;

    // Wait until every receiver released the slots this batch overwrites.
    if (warp == 0 && lane < num_ranks) {
      if (!device::wait_at_least(&mine->dispatch_head[channel][lane], staged + num_staged - ring_slots,
                                 peers.timeout_ns, peers.diagnostics, Phase::kDispatchWaitSpace, rank, lane, channel))
        abort_flag = 1;
    }
    device::named_barrier(kSendBarrier, kSendWarps * 32);
    timer.lap(1);
    if (abort_flag) return;

    for (int k = warp; k < num_staged; k += kSendWarps) {
      const int src_lane = device::nth_set_bit(staged_lanes, k);
      const int token = batch_begin + src_lane;
      const unsigned token_mask = __shfl_sync(0xffffffffu, mask, src_lane);
      const int64_t slot = static_cast<int64_t>(channel) * ring_slots + (staged + k) % ring_slots;
      // A token's first 64 FP8 scales are loaded before its row is copied and stored after it: their round
      // trip (strided loads when the scales are column-major) overlaps the row's instead of following it.
      const float* token_scales = args.x_scales + token * args.scale_token_stride;
      const float early_scale_0 = lane < args.num_scales ? token_scales[lane * args.scale_channel_stride] : 0.0f;
      const float early_scale_1 =
          lane + 32 < args.num_scales ? token_scales[(lane + 32) * args.scale_channel_stride] : 0.0f;
      device::warp_copy_in_rounds<8>(
          reinterpret_cast<int4*>(ring.rows + slot * layout.row_stride),
          reinterpret_cast<const int4*>(args.x + static_cast<int64_t>(token) * args.row_bytes), row_int4, lane,
          device::ld_input);
      float* slot_scales = ring.scales + slot * args.num_scales;
      if (lane < args.num_scales) slot_scales[lane] = early_scale_0;
      if (lane + 32 < args.num_scales) slot_scales[lane + 32] = early_scale_1;
      for (int scale = 64 + lane; scale < args.num_scales; scale += 32)
        slot_scales[scale] = token_scales[scale * args.scale_channel_stride];
      for (int k2 = lane; k2 < args.num_topk; k2 += 32) {
        ring.topk_idx[slot * args.num_topk + k2] =
            static_cast<int>(args.topk_idx[static_cast<int64_t>(token) * args.num_topk + k2]);
        ring.topk_weights[slot * args.num_topk + k2] =
            args.topk_weights[static_cast<int64_t>(token) * args.num_topk + k2];
      }
      if (lane == 0) ring.meta[slot] = {token, token_mask};
    }
    staged += num_staged;
    timer.lap(0);
    // One fence per batch, not one per thread: every sender thread's slot writes precede the barrier, and
    // the publishing lanes' st.release.sys is cumulative over what their threads observed through it, so a
    // receiver that acquires the tail sees the whole batch.
    device::named_barrier(kSendBarrier, kSendWarps * 32);
    if (warp == 0 && lane < num_ranks)
      device::st_release_sys(&control_of(peers, lane)->dispatch_tail[channel][rank], staged);
    timer.lap(2);
  }
  timer.report("intra-dispatch", "sender", rank, 1, 0);
}

template <int kRecvWarps>
__device__ void run_receiver(const Peers& peers, const DispatchArgs& args, const DispatchQueueLayout& layout,
                             int channel, int receive_warp, int lane) {
  const int num_ranks = peers.num_ranks, rank = peers.rank, num_channels = args.num_channels;
  const int warps_per_sender = kRecvWarps / num_ranks;
  const int source = receive_warp / warps_per_sender, group_warp = receive_warp % warps_per_sender;
  if (source >= num_ranks) return;
  const int group_threads = warps_per_sender * 32;
  const Ring ring = ring_of(peers, layout, source);
  const int ring_slots = args.num_slots;
  const int num_local_experts = args.num_experts > 0 ? args.num_experts / num_ranks : 0;
  const int row_int4 = args.row_bytes / 16;

  int out_base, expected;
  received_channel_rows(args.rank_prefix_matrix, args.recv_channel_prefix_matrix, source, rank, channel, num_channels,
                        num_ranks, out_base, expected);
  int* tail = &control_of(peers, rank)->dispatch_tail[channel][source];
  int* head = &control_of(peers, source)->dispatch_head[channel][rank];

  // The warps of a group agree on each window: the first warp's acquire of the tail is shared through
  // shared memory behind a named barrier (which also orders the later slot reads after it).
  __shared__ int window_end[kNumMaxNvlPeers];
  auto group_sync = [&] {
    if (warps_per_sender > 1)
      device::named_barrier(kRecvBarrierBase + source, group_threads);
    else
      __syncwarp();
  };
  // Role timer buckets (DEEP_EP_PROFILE_ROLES builds only): 0 copying rows out, 1 waiting for staged slots,
  // 2 scanning slot metadata, 3 the group's syncs and the head release.
  device::RoleTimer timer;
  timer.begin();
  int scanned = 0, received = 0;
  while (received < expected) {
    if (group_warp == 0 && lane == 0) {
      const bool ok = device::wait_at_least(tail, scanned + 1, peers.timeout_ns, peers.diagnostics,
                                            Phase::kDispatchWaitData, rank, source, channel);
      window_end[source] = ok ? device::ld_acquire_sys(tail) : -1;
    }
    group_sync();
    timer.lap(1);
    const int available = window_end[source];
    if (available < 0) return;
    for (int scan_begin = scanned; scan_begin < available; scan_begin += 32) {
      const int position = scan_begin + lane;
      SlotMeta meta{0, 0};
      if (position < available) {
        const int64_t slot = static_cast<int64_t>(channel) * ring_slots + position % ring_slots;
        meta.src_idx = __ldcg(&ring.meta[slot].src_idx);
        meta.dest_mask = static_cast<unsigned>(__ldcg(reinterpret_cast<const int*>(&ring.meta[slot].dest_mask)));
      }
      const unsigned mine_lanes = __ballot_sync(0xffffffffu, (meta.dest_mask >> rank) & 1u);
      const int count = __popc(mine_lanes);
      timer.lap(2);
      for (int k = group_warp; k < count; k += warps_per_sender) {
        const int src_lane = device::nth_set_bit(mine_lanes, k);
        const int src_idx = __shfl_sync(0xffffffffu, meta.src_idx, src_lane);
        const int64_t slot = static_cast<int64_t>(channel) * ring_slots + (scan_begin + src_lane) % ring_slots;
        const int64_t row = out_base + received + k;
        if (row >= args.num_rows) {
          if (lane == 0)
            device::report(peers.diagnostics, Phase::kDispatchTooManyRows, false, rank, source, channel, src_idx,
                           args.num_rows, row + 1);
          continue;
        }
        // Streaming stores: the received rows (about 300 MB per rank for 4096 BF16 tokens of 8 ranks) would
        // otherwise evict the ring slots the other receivers still read from L2 (8-15% faster on one H100).
        // Rounds with a predicated last one: an FP8 row of 7168 takes 2 round trips, not 7 (FP8 5-12% faster).
        device::warp_copy_in_rounds<8>(reinterpret_cast<int4*>(args.recv_x + row * args.row_bytes),
                                       reinterpret_cast<const int4*>(ring.rows + slot * layout.row_stride), row_int4,
                                       lane, device::ld_queue, device::st_output_stream);
        for (int scale = lane; scale < args.num_scales; scale += 32)
          args.recv_x_scales[row * args.num_scales + scale] = __ldcg(&ring.scales[slot * args.num_scales + scale]);
        for (int k2 = lane; k2 < args.num_topk; k2 += 32) {
          const int expert = __ldcg(&ring.topk_idx[slot * args.num_topk + k2]);
          const bool local = expert >= rank * num_local_experts && expert < (rank + 1) * num_local_experts;
          args.recv_topk_idx[row * args.num_topk + k2] = local ? expert - rank * num_local_experts : -1;
          args.recv_topk_weights[row * args.num_topk + k2] =
              local ? __ldcg(&ring.topk_weights[slot * args.num_topk + k2]) : 0.0f;
        }
        if (lane == 0) args.recv_src_idx[row] = src_idx;
      }
      received += count;
      timer.lap(0);
    }
    scanned = available;
    // Every warp of the group has finished reading the window before the slots are released, and
    // before window_end is overwritten.
    group_sync();
    if (group_warp == 0 && lane == 0) device::st_release_sys(head, received >= expected ? kDone : scanned);
    timer.lap(3);
  }
  if (expected == 0 && group_warp == 0 && lane == 0) device::st_release_sys(head, kDone);
  timer.report("intra-dispatch", "receiver", rank, 1, 0);
}

template <typename Shape>
__global__ void __launch_bounds__(32 * (Shape::kSendWarps + Shape::kRecvWarps), Shape::kMinBlocksPerSm)
    dispatch(Peers peers, DispatchArgs args, DispatchQueueLayout layout) {
  const int warp = threadIdx.x / 32, lane = device::lane_id();
  const int channel = blockIdx.x;
  const uint64_t started_ns = device::kProfileRoles ? device::global_timer_ns() : 0;
  if (warp < Shape::kSendWarps) {
    run_sender<Shape::kSendWarps>(peers, args, layout, channel, warp, lane);
  } else {
    run_receiver<Shape::kRecvWarps>(peers, args, layout, channel, warp - Shape::kSendWarps, lane);
  }
  device::report_block_start("intra-dispatch", peers.rank, started_ns);
  // num_worst_tokens: rows past the real count carry no expert.
  const int num_recv = args.rank_prefix_matrix[(peers.num_ranks - 1) * peers.num_ranks + peers.rank];
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t row = num_recv + first; row < args.num_rows; row += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    args.recv_src_idx[row] = -1;
    for (int k = 0; k < args.num_topk; ++k) {
      args.recv_topk_idx[row * args.num_topk + k] = -1;
      args.recv_topk_weights[row * args.num_topk + k] = 0.0f;
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

void launch_dispatch(const Peers& peers, const DispatchQueueLayout& layout, const DispatchArgs& args,
                     const LaunchShape& shape, cudaStream_t stream) {
  if (shape.wide) {
    dispatch<Wide><<<shape.num_blocks, threads_of<Wide>(), 0, stream>>>(peers, args, layout);
  } else {
    dispatch<Narrow><<<shape.num_blocks, threads_of<Narrow>(), 0, stream>>>(peers, args, layout);
  }
  DEEP_EP_CUDA_CHECK(cudaGetLastError());
}

}  // namespace deep_ep::intranode
