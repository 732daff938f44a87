// Intranode push dispatch, the mirror image of the pull combine. Block b owns channels b, b + gridDim.x, ... of
// this rank's tokens (the dispatch's channels; the grid is at most one block per channel, fewer where the ranks
// sharing this GPU would not fit side by side). Its warps walk a channel's tokens in order; a warp loads a token's
// row once, a round of kRowUnroll 16-byte words per lane at a time, and stores each round into the outputs of every
// rank the token goes to, followed by its FP8 scales, its top-k (renumbered to the destination's local experts, -1
// and 0 elsewhere) and its source index. No ring, no receiving warps, no credits: where ranks share a GPU a row
// costs one read plus one write per destination, where the ring dispatch adds a staged copy and its read.
//
// Row of token t at destination j: rank_begin(this rank, j) (rows from lower ranks) + channel_prefix_matrix[j][c]
// (this rank's earlier channels) + the channel's earlier tokens that go to j: the rows the ring dispatch gives,
// recorded in send_head for the combine.
//
// Every rank's outputs must be allocated before anyone writes them, and every write into them must be visible to
// their owner before its kernel ends: the op bracket (op_bracket.cuh), which also publishes where this rank's
// outputs live. A destination's rows past its allocated rows (num_worst_tokens too small) are dropped by the
// senders and reported by the destination.
#include "kernels/common/import_resolve.cuh"
#include "kernels/common/occupancy.cuh"
#include "kernels/intranode/channel_walk.cuh"
#include "kernels/intranode/intranode.hpp"
#include "kernels/intranode/op_bracket.cuh"
#include "kernels/intranode/prologue.cuh"
#include "kernels/intranode/token_sum.cuh"
#include "protocol/control_region.hpp"
#include "util/cuda_check.hpp"

namespace deep_ep::intranode {

namespace {

constexpr int kPushWarps = 16;
// 16-byte words per lane per round: a BF16 row of 7168 takes 4 rounds, an FP8 row 2. The round is stored to every
// destination before the next is loaded, so its registers stay few (a round of 16 spills).
constexpr int kRowUnroll = 8;

// Every rank's outputs as this process reaches them (shared memory, filled at the kernel's start).
struct Destinations {
  uint8_t* x[kNumMaxNvlPeers];
  float* scales[kNumMaxNvlPeers];
  int64_t* topk_idx[kNumMaxNvlPeers];
  float* topk_weights[kNumMaxNvlPeers];
  int* src_idx[kNumMaxNvlPeers];
  int num_rows[kNumMaxNvlPeers];
};

// Thread j: rank j's outputs, this rank's own or (after the acquire of rank j's pull_ready) the ones rank j published,
// once this process's mapping thread has mapped them. False when a mapping did not come (reported).
__device__ bool resolve_destination(const Peers& peers, const PushDispatchArgs& args, int j, Destinations& dest) {
  void* resolved[kNumPushOutputs] = {args.recv_x, args.recv_x_scales, args.recv_topk_idx, args.recv_topk_weights,
                                     args.recv_src_idx};
  int num_rows = args.num_rows;
  bool ok = true;
  if (j != peers.rank) {
    const PushOutputs& published = control_of(peers, peers.rank)->push_outputs[j];
    num_rows = __ldcg(&published.num_rows);  // another process wrote it: read at L2, never from an L1 copy
    for (int i = 0; i < kNumPushOutputs; ++i)
      resolved[i] = const_cast<char*>(device::resolve_published(
          device::load_published_ref(&published.refs[i]), args.imports, args.resolved_bases, j, peers.timeout_ns,
          peers.diagnostics, Phase::kPushDispatchMap, peers.rank, j, blockIdx.x, ok));
  }
  dest.x[j] = static_cast<uint8_t*>(resolved[kPushRecvX]);
  dest.scales[j] = static_cast<float*>(resolved[kPushRecvScales]);
  dest.topk_idx[j] = static_cast<int64_t*>(resolved[kPushRecvTopkIdx]);
  dest.topk_weights[j] = static_cast<float*>(resolved[kPushRecvTopkWeights]);
  dest.src_idx[j] = static_cast<int*>(resolved[kPushRecvSrcIdx]);
  dest.num_rows[j] = ok ? num_rows : 0;
  return ok;
}

// One warp stores `token` at row rows[j] of every destination j in `to` (a bit per rank). rows: the warp's slot in
// shared memory (read per use rather than held in registers, which go to the row's round).
__device__ __forceinline__ void push_token(const PushDispatchArgs& args, const Destinations& dest, int token,
                                           unsigned to, const int* rows, int num_local_experts, int lane) {
  // The token's first 64 scales and 32 top-k entries are loaded before its row and stored after it: their round
  // trips (strided loads when the scales are column-major) overlap the row's instead of following it.
  const float* token_scales = args.x_scales + token * args.scale_token_stride;
  const float early_scale_0 = lane < args.num_scales ? token_scales[lane * args.scale_channel_stride] : 0.0f;
  const float early_scale_1 =
      lane + 32 < args.num_scales ? token_scales[(lane + 32) * args.scale_channel_stride] : 0.0f;
  const int64_t token_topk = static_cast<int64_t>(token) * args.num_topk;
  const int64_t early_expert = lane < args.num_topk ? args.topk_idx[token_topk + lane] : -1;
  const float early_weight = lane < args.num_topk ? args.topk_weights[token_topk + lane] : 0.0f;

  // Streaming stores: the outputs (about 300 MB per rank for 4096 BF16 tokens of 8 ranks) would otherwise evict the
  // rows the other warps are still loading. Predicated rounds: an FP8 row of 7168 takes 2 round trips, not 7.
  const int row_int4 = args.row_bytes / 16;
  const int4* src = reinterpret_cast<const int4*>(args.x + static_cast<int64_t>(token) * args.row_bytes);
  for (int base = lane; base < row_int4; base += 32 * kRowUnroll) {
    int4 v[kRowUnroll];
#pragma unroll
    for (int u = 0; u < kRowUnroll; ++u)
      if (base + 32 * u < row_int4) v[u] = device::ld_input(src + base + 32 * u);
#pragma unroll
    for (int j = 0; j < kNumMaxNvlPeers; ++j) {
      if (!((to >> j) & 1u)) continue;
      int4* dst = reinterpret_cast<int4*>(dest.x[j] + static_cast<int64_t>(rows[j]) * args.row_bytes);
#pragma unroll
      for (int u = 0; u < kRowUnroll; ++u)
        if (base + 32 * u < row_int4) device::st_output_stream(dst + base + 32 * u, v[u]);
    }
  }

#pragma unroll
  for (int j = 0; j < kNumMaxNvlPeers; ++j) {
    if (!((to >> j) & 1u)) continue;
    const int64_t row = rows[j];
    if (args.num_scales > 0) {
      float* scales = dest.scales[j] + row * args.num_scales;
      if (lane < args.num_scales) scales[lane] = early_scale_0;
      if (lane + 32 < args.num_scales) scales[lane + 32] = early_scale_1;
      for (int s = 64 + lane; s < args.num_scales; s += 32) scales[s] = token_scales[s * args.scale_channel_stride];
    }
    if (args.num_topk > 0) {
      const int64_t first = static_cast<int64_t>(j) * num_local_experts, last = first + num_local_experts;
      for (int k = lane; k < args.num_topk; k += 32) {
        const int64_t expert = k < 32 ? early_expert : args.topk_idx[token_topk + k];
        const float weight = k < 32 ? early_weight : args.topk_weights[token_topk + k];
        const bool local = expert >= first && expert < last;
        dest.topk_idx[j][row * args.num_topk + k] = local ? expert - first : -1;
        dest.topk_weights[j][row * args.num_topk + k] = local ? weight : 0.0f;
      }
    }
    if (lane == 0 && dest.src_idx[j] != nullptr) dest.src_idx[j][row] = token;
  }
}

__global__ void __launch_bounds__(kPushWarps * 32, 1) dispatch(Peers peers, PushDispatchArgs args) {  // V1's name
  const int warp = threadIdx.x / 32, lane = device::lane_id(), block = blockIdx.x;
  const int num_ranks = peers.num_ranks, rank = peers.rank, num_channels = args.num_channels;
  const int num_local_experts = args.num_experts / num_ranks;  // 0 in a cached call (no top-k)
  __shared__ int epoch_shared, ok_shared;
  __shared__ Destinations dest;
  __shared__ int warp_rows[kPushWarps][kNumMaxNvlPeers];
  if (threadIdx.x == 0) {
    ok_shared = open_op_bracket(peers, Phase::kPushDispatchReady, &epoch_shared,
                                [&](ControlRegion* peer) { peer->push_outputs[rank] = args.own_outputs; });
  }
  __syncthreads();
  if (threadIdx.x < num_ranks && ok_shared && !resolve_destination(peers, args, threadIdx.x, dest)) ok_shared = 0;
  __syncthreads();

  // The rows every source sends here, against the rows allocated: senders drop what does not fit (value error).
  const int num_recv = args.rank_prefix_matrix[(num_ranks - 1) * num_ranks + rank];
  if (block == 0 && threadIdx.x == 0 && num_recv > args.num_rows)
    device::report(peers.diagnostics, Phase::kDispatchTooManyRows, false, rank, -1, -1, -1, args.num_rows, num_recv);

  if (ok_shared) {
    walk_channel_tokens<kPushWarps>(
        args.rank_prefix_matrix, args.channel_prefix_matrix, args.is_token_in_rank, args.num_tokens, num_channels, rank,
        num_ranks, warp, lane, [&](int token, unsigned token_mask, int my_row) {
          if (args.send_head != nullptr && lane < num_ranks)
            args.send_head[static_cast<int64_t>(token) * num_ranks + lane] = ((token_mask >> lane) & 1u) ? my_row : -1;
          // The destinations with room for the token's row, and its row at each (lane j's, through shared memory).
          const unsigned to = __ballot_sync(
              0xffffffffu, lane < num_ranks && ((token_mask >> lane) & 1u) && my_row < dest.num_rows[lane]);
          if (lane < num_ranks) warp_rows[warp][lane] = my_row;
          __syncwarp();
          if (to != 0) push_token(args, dest, token, to, warp_rows[warp], num_local_experts, lane);
          __syncwarp();  // every lane has read warp_rows before the next token's are written
        });
  }

  // num_worst_tokens: this rank's rows past the real count carry no expert.
  const int64_t first = static_cast<int64_t>(block) * blockDim.x + threadIdx.x;
  for (int64_t row = num_recv + first; row < args.num_rows; row += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (args.recv_src_idx) args.recv_src_idx[row] = -1;
    for (int k = 0; k < args.num_topk; ++k) {
      args.recv_topk_idx[row * args.num_topk + k] = -1;
      args.recv_topk_weights[row * args.num_topk + k] = 0.0f;
    }
  }

  // Every store of this block is issued before it counts itself; the last block tells every rank.
  __syncthreads();
  if (threadIdx.x == 0) close_op_bracket(peers, epoch_shared, Phase::kPushDispatchDone);
}

}  // namespace

int max_resident_push_dispatch_blocks_per_sm() { return device::resident_blocks_per_sm<dispatch>(kPushWarps * 32); }

void launch_push_dispatch(const Peers& peers, const PushDispatchArgs& args, const LaunchShape& shape,
                          cudaStream_t stream) {
  dispatch<<<shape.num_blocks, kPushWarps * 32, 0, stream>>>(peers, args);
  DEEP_EP_CUDA_CHECK(cudaGetLastError());
}

}  // namespace deep_ep::intranode
