// Intranode pull combine. Block b owns channels b, b + gridDim.x, ... of this rank's tokens (the
// dispatch's channels; the grid is at most one block per channel, fewer where the ranks sharing this
// GPU would not fit side by side). Its warps walk a channel's tokens in order and read each token's rows straight out
// of the expert ranks' combine inputs (mapped into this process by the host), summing them in float32 over expert ranks
// in increasing order, then the biases, rounding to bf16 once (the CPU reference's order). No ring, no sender: the rows
// cross HBM (or NVLink) once.
//
// Row of token t at expert rank j: rank_begin(this rank, j) (rows from lower ranks) + channel_prefix_matrix
// [j][c] (this rank's earlier channels) + the channel's earlier tokens that go to j, as dispatch
// placed them.
//
// The inputs of every rank must be complete before anyone reads them, and stay alive until everyone has: the op
// bracket (op_bracket.cuh), which also publishes where this rank's inputs live (host-free form).
#include <cuda_bf16.h>

#include "kernels/common/bf16.cuh"
#include "kernels/common/import_resolve.cuh"
#include "kernels/common/occupancy.cuh"
#include "kernels/common/role_timer.cuh"
#include "kernels/intranode/channel_walk.cuh"
#include "kernels/intranode/op_bracket.cuh"
#include "kernels/intranode/prologue.cuh"
#include "kernels/intranode/token_sum.cuh"
#include "protocol/control_region.hpp"
#include "util/cuda_check.hpp"

namespace deep_ep::intranode {

namespace {

constexpr int kPullWarps = 16;

__global__ void __launch_bounds__(kPullWarps * 32, 1) combine(Peers peers, PullCombineArgs args) {  // V1's kernel name
  const int warp = threadIdx.x / 32, lane = device::lane_id(), block = blockIdx.x;
  const int num_ranks = peers.num_ranks, rank = peers.rank, num_channels = args.num_channels;
  __shared__ int epoch_shared, ok_shared;
  // Every rank's inputs as this process reaches them.
  __shared__ const uint16_t* x_of[kNumMaxNvlPeers];
  __shared__ const float* weights_of[kNumMaxNvlPeers];
  // Role timer buckets (DEEP_EP_PROFILE_ROLES builds only): 0 the start barrier, 1 finding the peers' inputs,
  // 2 summing rows, 3 the end barrier (block 0's lines on rank 0).
  device::RoleTimer timer;
  timer.begin();
  device::report_block_start("pull_combine", rank, timer.start);
  if (threadIdx.x == 0) {
    // Host-free form: where this rank's inputs live, for every rank.
    ok_shared = open_op_bracket(peers, Phase::kPullCombineReady, &epoch_shared, [&](ControlRegion* peer) {
      if (args.imports) peer->pull_inputs[rank] = args.own_input;
    });
  }
  __syncthreads();
  timer.lap(0);
  // Thread j resolves rank j's inputs: given, or (host-free form) at the slot rank j published (read after the
  // acquire of its pull_ready above, ordered by the barrier), once this process's mapping thread has mapped it.
  if (threadIdx.x < num_ranks) {
    const int j = threadIdx.x;
    x_of[j] = args.x[j];
    weights_of[j] = args.topk_weights[j];
    if (args.imports && j != rank && ok_shared) {
      const PullInput& input = control_of(peers, rank)->pull_inputs[j];
      bool ok = true;
      x_of[j] = reinterpret_cast<const uint16_t*>(
          device::resolve_published(device::load_published_ref(&input.x), args.imports, args.resolved_bases, j,
                                    peers.timeout_ns, peers.diagnostics, Phase::kPullCombineMap, rank, j, block, ok));
      const char* weights =
          device::resolve_published(device::load_published_ref(&input.topk_weights), args.imports, args.resolved_bases,
                                    j, peers.timeout_ns, peers.diagnostics, Phase::kPullCombineMap, rank, j, block, ok);
      // By num_topk, not by this rank's own pointer: a rank that received no rows has a null one while its
      // peers' weights are real.
      weights_of[j] = args.num_topk > 0 ? reinterpret_cast<const float*>(weights) : nullptr;
      if (!ok) ok_shared = 0;
    }
  }
  __syncthreads();
  timer.lap(1);

  if (ok_shared) {
    walk_channel_tokens<kPullWarps>(
        args.rank_prefix_matrix, args.channel_prefix_matrix, args.is_token_in_rank, args.num_tokens, num_channels, rank,
        num_ranks, warp, lane, [&](int token, unsigned token_mask, int my_row) {
          // Lane j < num_ranks knows the token's row at rank j; every lane takes the rows it reads by shuffle.
          int row_of[kNumMaxNvlPeers];
          const int4* row_ptr[kNumMaxNvlPeers];
#pragma unroll
          for (int j = 0; j < kNumMaxNvlPeers; ++j) {
            row_of[j] = __shfl_sync(0xffffffffu, my_row, j);
            row_ptr[j] = ((token_mask >> j) & 1u)
                             ? reinterpret_cast<const int4*>(x_of[j] + static_cast<int64_t>(row_of[j]) * args.hidden)
                             : nullptr;
          }
          // At L2 (__ldcg): another process wrote these rows; a non-coherent cached copy of an earlier
          // call's rows at the same address must not be read.
          sum_token<2>(
              lane, token, token_mask, args.hidden, args.num_topk, args.bias_0, args.bias_1, args.combined_x,
              args.combined_topk_weights, [&](int j, int col) { return __ldcg(row_ptr[j] + col); },
              [&](int j, int k2) {
                return __ldcg(&weights_of[j][static_cast<int64_t>(row_of[j]) * args.num_topk + k2]);
              });
        });
  }

  // Every read of this block is done before it counts itself; the last block tells every rank.
  timer.lap(2);
  __syncthreads();
  if (threadIdx.x == 0) close_op_bracket(peers, epoch_shared, Phase::kPullCombineDone);
  timer.lap(3);
  timer.report("pull_combine", "warp", rank, kNumMaxNvlPeers, 0);
}

}  // namespace

int max_resident_pull_combine_blocks_per_sm() { return device::resident_blocks_per_sm<combine>(kPullWarps * 32); }

void launch_pull_combine(const Peers& peers, const PullCombineArgs& args, const LaunchShape& shape,
                         cudaStream_t stream) {
  combine<<<shape.num_blocks, kPullWarps * 32, 0, stream>>>(peers, args);
  DEEP_EP_CUDA_CHECK(cudaGetLastError());
}

int max_resident_blocks_per_sm(Kernel kernel, const LaunchShape& shape) {
  switch (kernel) {
    case Kernel::kDispatch:
      return max_resident_dispatch_blocks_per_sm(shape.wide);
    case Kernel::kCombine:
      return max_resident_combine_blocks_per_sm(shape.wide);
    case Kernel::kPullCombine:
      return max_resident_pull_combine_blocks_per_sm();
    case Kernel::kPushDispatch:
      return max_resident_push_dispatch_blocks_per_sm();
  }
  return 0;
}

}  // namespace deep_ep::intranode
