// The token walk of the intranode kernels that touch other ranks' tensors in place (pull combine, push dispatch):
// block b takes channels b, b + gridDim.x, ... (the grid may be smaller than the channel count, to fit beside the
// other ranks' grids on the GPU), and each channel's tokens in batches of 32, warp w the tokens w, w + kWarps, ...
// of a batch. For each, the whole warp calls visit(token, token_mask, my_row): token_mask the ranks the token goes
// to, my_row (lane j < num_ranks) its row at rank j, the rows dispatch gives: rank_begin(this rank, j) (rows from
// lower ranks) + channel_prefix_matrix[j][c] (this rank's earlier channels) + the channel's earlier tokens to j.
#pragma once

#include "kernels/common/device_utils.cuh"
#include "kernels/intranode/prologue.cuh"
#include "kernels/intranode/token_sum.cuh"

namespace deep_ep::intranode {

template <int kWarps, typename Visit>
__device__ __forceinline__ void walk_channel_tokens(const int* rank_prefix_matrix, const int* channel_prefix_matrix,
                                                    const bool* is_token_in_rank, int num_tokens, int num_channels,
                                                    int rank, int num_ranks, int warp, int lane, Visit visit) {
  for (int channel = blockIdx.x; channel < num_channels; channel += gridDim.x) {
    int begin, end;
    device::channel_range(channel, num_channels, num_tokens, begin, end);
    // Lane j < num_ranks: the row at rank j of the channel's next token that goes to j.
    int next_row = lane < num_ranks ? rank_begin(rank_prefix_matrix, rank, lane, num_ranks) +
                                          channel_prefix_matrix[lane * num_channels + channel]
                                    : 0;
    for (int batch_begin = begin; batch_begin < end; batch_begin += 32) {
      const int batch_size = min(32, end - batch_begin);
      unsigned mask, lanes_of[kNumMaxNvlPeers];
      token_group_masks(is_token_in_rank, batch_begin, batch_size, num_ranks, lane, mask, lanes_of);
      const unsigned lanes_of_lane = lanes_of_this_lane(lanes_of, lane);
      for (int k = warp; k < batch_size; k += kWarps)
        visit(batch_begin + k, __shfl_sync(0xffffffffu, mask, k), next_row + __popc(lanes_of_lane & ((1u << k) - 1u)));
      next_row += __popc(lanes_of_lane);
    }
  }
}

}  // namespace deep_ep::intranode
