// The steps the ring combine (combine.cu), the pull combine (pull_combine.cu) and the push dispatch
// (push_dispatch.cu) share: the combines differ only in where an expert rank's row of a token is read.
#pragma once

#include <cstdint>

#include "kernels/common/bf16.cuh"
#include "kernels/common/device_utils.cuh"
#include "kernels/intranode/prologue.cuh"

namespace deep_ep::intranode {

// Tokens batch_begin .. batch_begin + batch_size - 1 (batch_size <= 32), one per lane: `mask` is lane's
// token's ranks (bit j: rank j gets it), lanes_of[j] the lanes whose token goes to rank j. Whole warp.
__device__ __forceinline__ void token_group_masks(const bool* is_token_in_rank, int batch_begin, int batch_size,
                                                  int num_ranks, int lane, unsigned& mask,
                                                  unsigned (&lanes_of)[kNumMaxNvlPeers]) {
  mask = 0;
  if (lane < batch_size) {
    const bool* row = is_token_in_rank + static_cast<int64_t>(batch_begin + lane) * num_ranks;
    for (int j = 0; j < num_ranks; ++j) mask |= static_cast<unsigned>(row[j]) << j;
  }
#pragma unroll
  for (int j = 0; j < kNumMaxNvlPeers; ++j)
    lanes_of[j] = __ballot_sync(0xffffffffu, j < num_ranks && ((mask >> j) & 1u));
}

// Lane j < kNumMaxNvlPeers: lanes_of[j] (the batch's lanes whose token goes to rank j); the other lanes 0. One value
// per lane instead of the array in every lane, where a walk keeps it across the batch.
__device__ __forceinline__ unsigned lanes_of_this_lane(const unsigned (&lanes_of)[kNumMaxNvlPeers], int lane) {
  unsigned mine = 0;
#pragma unroll
  for (int j = 0; j < kNumMaxNvlPeers; ++j)
    if (lane == j) mine = lanes_of[j];
  return mine;
}

// One warp combines `token`: every 16-byte column of combined_x[token] is the float32 sum over the ranks
// of token_mask, in increasing order, of load_column(j, col), then bias_0 and bias_1 when given, rounded
// to bf16 once (the CPU reference's order); combined_topk_weights[token][k] (when given) sums
// load_weight(j, k) the same way. kColumns columns per lane make a step (below).
template <int kColumns, typename LoadColumn, typename LoadWeight>
__device__ __forceinline__ void sum_token(int lane, int token, unsigned token_mask, int hidden, int num_topk,
                                          const uint16_t* bias_0, const uint16_t* bias_1, uint16_t* combined_x,
                                          float* combined_topk_weights, LoadColumn load_column,
                                          LoadWeight load_weight) {
  const int row_int4 = hidden / 8;
  int4* out = reinterpret_cast<int4*>(combined_x + static_cast<int64_t>(token) * hidden);
  const int4* bias_0_row =
      bias_0 ? reinterpret_cast<const int4*>(bias_0 + static_cast<int64_t>(token) * hidden) : nullptr;
  const int4* bias_1_row =
      bias_1 ? reinterpret_cast<const int4*>(bias_1 + static_cast<int64_t>(token) * hidden) : nullptr;
  // Each step issues all loads of kColumns columns per lane before the first sum: more bytes in flight per warp,
  // for a kernel whose sums wait on the loads' round trips rather than on the GPU's bandwidth.
  for (int col = lane; col < row_int4; col += 32 * kColumns) {
    int4 v[kColumns * kNumMaxNvlPeers];
#pragma unroll
    for (int c = 0; c < kColumns; ++c)
#pragma unroll
      for (int j = 0; j < kNumMaxNvlPeers; ++j)
        if (((token_mask >> j) & 1u) && (c == 0 || col + 32 * c < row_int4))
          v[c * kNumMaxNvlPeers + j] = load_column(j, col + 32 * c);
#pragma unroll
    for (int c = 0; c < kColumns; ++c) {
      if (c > 0 && col + 32 * c >= row_int4) break;
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
#pragma unroll
      for (int j = 0; j < kNumMaxNvlPeers; ++j)
        if ((token_mask >> j) & 1u) device::add_bf16x8(acc, v[c * kNumMaxNvlPeers + j]);
      if (bias_0_row) device::add_bf16x8(acc, device::ld_input(bias_0_row + col + 32 * c));
      if (bias_1_row) device::add_bf16x8(acc, device::ld_input(bias_1_row + col + 32 * c));
      out[col + 32 * c] = device::pack_bf16x8(acc);
    }
  }
  if (combined_topk_weights) {
    for (int k = lane; k < num_topk; k += 32) {
      float weight = 0.0f;
#pragma unroll
      for (int j = 0; j < kNumMaxNvlPeers; ++j)
        if ((token_mask >> j) & 1u) weight += load_weight(j, k);
      combined_topk_weights[static_cast<int64_t>(token) * num_topk + k] = weight;
    }
  }
}

}  // namespace deep_ep::intranode
