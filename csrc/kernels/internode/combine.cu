// Internode combine, the reverse of dispatch along the same slots:
//   1. every rank stages its input rows (and weights) in its NVLink area, so that the forwarders of
//      its node can read them; the last block raises the `staged` flag;
//   2. forwarder warps of block c: for each slot (source node n, channel c, i) they received in the
//      dispatch, sum the rows of the node's ranks that got it (send_nvl_head), in local-rank order in
//      float32, round to bf16, and put the channel's partials to the home rank (one signalled put);
//   3. home warps of block c: for each token of channel c, sum the partials of the nodes it went to in
//      node order (send_rdma_head), add the biases, round to bf16.
// The order of additions is the CPU reference's (normal_combine with num_ranks_per_node).
#include "deep_ep/error.hpp"
#include "kernels/common/bf16.cuh"
#include "kernels/internode/common.cuh"
#include "runtime/cuda_check.hpp"

namespace deep_ep::internode {

namespace {

constexpr int kNumWarps = kNumThreads / 32;
// Forwarding, then the home sums, each with every warp of the block: forwarding waits only for the
// staged rows, so no block's home role can hold back a forwarder.
constexpr int kNumForwarderWarps = kNumWarps;
constexpr int kNumHomeWarps = kNumWarps;
constexpr int kHomeBarrier = 1;
constexpr int kForwardBarrier = 2;

// Per warp: the source rows (forwarder) or partial slots (home) of the row being summed.
__shared__ int heads[kNumWarps][32];

using device::add_bf16x8;
using device::pack_bf16x8;

__device__ void stage(const Ctx& ctx, const CombineArgs& a, int64_t stride, int epoch) {
  const int warps_total = gridDim.x * kNumWarps;
  const int gw = blockIdx.x * kNumWarps + threadIdx.x / 32, lane = device::lane_id();
  char* staging = ctx.staging(ctx.p.rank);
  const int row_int4 = a.hidden * 2 / 16;
  for (int r = gw; r < a.num_rows; r += warps_total) {
    char* dst = staging + static_cast<int64_t>(r) * stride;
    device::warp_copy<8>(reinterpret_cast<int4*>(dst),
                         reinterpret_cast<const int4*>(a.x + static_cast<int64_t>(r) * a.hidden), row_int4, lane,
                         device::ld_input);
    float* w = reinterpret_cast<float*>(dst + a.hidden * 2);
    for (int k = lane; k < a.num_topk; k += 32) w[k] = a.topk_weights[static_cast<int64_t>(r) * a.num_topk + k];
  }
  // The forwarders of this node read the rows after the flag.
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x == 0) {
    ControlRegion* control = ctx.control();
    if (atomicAdd(&control->internode_staged_arrivals, 1) == static_cast<int>(gridDim.x) - 1) {
      control->internode_staged_arrivals = 0;
      device::st_release_sys(ctx.flag(ctx.p.rank, ctx.l.flag_staged()), int64_t(epoch) + 1);
    }
  }
}

// acc += the rows `heads[0..num)` name (negative: none), in index order, kBatch loads in flight per lane.
// row_ptr(i, head) gives the int4 row of source i.
template <typename RowPtr>
__device__ __forceinline__ void sum_rows(float (&acc)[8], const int* heads, int num, int v, RowPtr row_ptr) {
  constexpr int kBatch = 8;
  for (int i0 = 0; i0 < num; i0 += kBatch) {
    int4 vals[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int head = i0 + u < num ? heads[i0 + u] : -1;
      if (head >= 0) vals[u] = __ldcg(row_ptr(i0 + u, head) + v);
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u)
      if (i0 + u < num && heads[i0 + u] >= 0) add_bf16x8(acc, vals[u]);
  }
}

__device__ void forward(const Ctx& ctx, const CombineArgs& a, int64_t stride, int epoch, int c) {
  const Layout& l = ctx.l;
  const int N = l.num_nodes, Rn = l.num_ranks_per_node, C = l.num_channels;
  const int fw = threadIdx.x / 32, lane = device::lane_id();
  __shared__ const char* staging_of[32];  // staging area of each local rank
  if (fw == 0 && lane < Rn) staging_of[lane] = ctx.staging(ctx.rank_of(ctx.node, lane));
  // Every rank of the node must have staged its rows.
  bool ok = true;
  if (lane < Rn) {
    const int j = ctx.rank_of(ctx.node, lane);
    ok = ctx.wait_flag(ctx.flag(j, l.flag_staged()), int64_t(epoch) + 1, Phase::kInternodeCombineStage, j, c);
  }
  ok = __all_sync(0xffffffffu, ok);
  device::named_barrier(kForwardBarrier, kNumForwarderWarps * 32);
  const int row_int4 = a.hidden * 2 / 16;
  const Transport net = ctx.transport();
  const int64_t own_first_slot = static_cast<int64_t>(ctx.node) * C * l.capacity + static_cast<int64_t>(c) * l.capacity;
  // The slots of every source node, spread over the forwarder warps. The partial of slot (n, c, i) goes
  // to home rank (n, my local index), slot (my node, c, i): written in place for the own node, straight
  // into the home rank's window where the transport maps it, else staged in send_rows and put below.
  for (int n = 0; ok && n < N; ++n) {
    const int* prefix = a.recv_rdma_channel_prefix_matrix + n * C;
    const int count = prefix[c] - (c > 0 ? prefix[c - 1] : 0);
    const int home_rank = ctx.rank_of(n, ctx.local);
    char* dst_first;
    if (n == ctx.node) {
      dst_first = ctx.row(ctx.p.rank, own_first_slot);
    } else if (char* direct = net.direct_ptr(home_rank, l.rows_offset + own_first_slot * l.row_stride)) {
      dst_first = direct;
    } else {
      dst_first = ctx.send_row(l.slot(n, c, 0));
    }
    for (int i = fw; i < count; i += kNumForwarderWarps) {
      const int64_t slot = l.slot(n, c, i);
      __syncwarp();
      if (lane < Rn) heads[fw][lane] = a.send_nvl_head[slot * Rn + lane];
      __syncwarp();
      char* dst = dst_first + static_cast<int64_t>(i) * l.row_stride;
      const auto staged_row = [&](int lr, int row) {
        return reinterpret_cast<const int4*>(staging_of[lr] + static_cast<int64_t>(row) * stride);
      };
      for (int v = lane; v < row_int4; v += 32) {
        float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        sum_rows(acc, heads[fw], Rn, v, staged_row);
        reinterpret_cast<int4*>(dst)[v] = pack_bf16x8(acc);
      }
      for (int k = lane; k < a.num_topk; k += 32) {
        float acc = 0.0f;
        for (int lr = 0; lr < Rn; ++lr) {
          const int row = heads[fw][lr];
          if (row >= 0) acc += __ldcg(reinterpret_cast<const float*>(staging_of[lr] + static_cast<int64_t>(row) * stride +
                                                                     a.hidden * 2) + k);
        }
        reinterpret_cast<float*>(dst + a.hidden * 2)[k] = acc;
      }
    }
  }
  // Every partial of this channel is written (and fenced) before any signal or put covers it.
  __threadfence_system();
  device::named_barrier(kForwardBarrier, kNumForwarderWarps * 32);
  if (!ok) return;
  for (int n = fw; n < N; n += kNumForwarderWarps) {
    const int* prefix = a.recv_rdma_channel_prefix_matrix + n * C;
    const int count = prefix[c] - (c > 0 ? prefix[c - 1] : 0);
    const int home_rank = ctx.rank_of(n, ctx.local);
    if (n == ctx.node) {
      if (lane == 0) device::st_release_sys(ctx.flag(ctx.p.rank, l.flag_combine_ready(n, c)), int64_t(epoch) + 1);
    } else if (net.direct_ptr(home_rank, l.rows_offset) != nullptr) {
      net.signal_add(home_rank, l.signal_combine(ctx.node, c), 1);
    } else {
      net.put_with_signal(home_rank, l.rows_offset + own_first_slot * l.row_stride,
                          l.send_rows_offset + l.slot(n, c, 0) * l.row_stride, static_cast<int64_t>(count) * l.row_stride,
                          l.signal_combine(ctx.node, c), 1);
    }
  }
}

__device__ void home(const Ctx& ctx, const CombineArgs& a, int epoch, int c) {
  const Layout& l = ctx.l;
  const int N = l.num_nodes, C = l.num_channels;
  const int hw = threadIdx.x / 32, lane = device::lane_id();
  __shared__ int home_ok;
  if (hw == 0) {
    bool ok = true;
    for (int n = lane; n < N; n += 32) {
      const int forwarder = ctx.rank_of(n, ctx.local);
      if (n == ctx.node) {
        ok &= ctx.wait_flag(ctx.flag(ctx.p.rank, l.flag_combine_ready(n, c)), int64_t(epoch) + 1,
                            Phase::kInternodeCombineRecv, forwarder, c);
      } else {
        ok &= ctx.wait_signal_once(l.signal_combine(n, c), Phase::kInternodeCombineRecv, forwarder, c);
      }
    }
    ok = __all_sync(0xffffffffu, ok);
    if (lane == 0) home_ok = ok;
  }
  device::named_barrier(kHomeBarrier, kNumHomeWarps * 32);
  if (!home_ok) return;
  int begin, end;
  device::channel_range(c, C, a.num_tokens, begin, end);
  const int row_int4 = a.hidden * 2 / 16;
  const int w = threadIdx.x / 32;
  const char* partials = ctx.row(ctx.p.rank, 0);
  const int64_t node_slots = static_cast<int64_t>(C) * l.capacity;
  const auto partial_row = [&](int n, int slot) {
    return reinterpret_cast<const int4*>(partials + (n * node_slots + slot) * l.row_stride);
  };
  for (int t = begin + hw; t < end; t += kNumHomeWarps) {
    __syncwarp();
    if (lane < N) heads[w][lane] = a.send_rdma_head[static_cast<int64_t>(t) * N + lane];
    __syncwarp();
    for (int v = lane; v < row_int4; v += 32) {
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      sum_rows(acc, heads[w], N, v, partial_row);
      if (a.bias_0) add_bf16x8(acc, reinterpret_cast<const int4*>(a.bias_0 + static_cast<int64_t>(t) * a.hidden)[v]);
      if (a.bias_1) add_bf16x8(acc, reinterpret_cast<const int4*>(a.bias_1 + static_cast<int64_t>(t) * a.hidden)[v]);
      reinterpret_cast<int4*>(a.combined_x + static_cast<int64_t>(t) * a.hidden)[v] = pack_bf16x8(acc);
    }
    for (int k = lane; k < a.num_topk; k += 32) {
      float acc = 0.0f;
      for (int n = 0; n < N; ++n) {
        const int slot = heads[w][n];
        if (slot >= 0) acc += __ldcg(reinterpret_cast<const float*>(reinterpret_cast<const char*>(partial_row(n, slot)) +
                                                                    a.hidden * 2) + k);
      }
      a.combined_topk_weights[static_cast<int64_t>(t) * a.num_topk + k] = acc;
    }
  }
}

__global__ void __launch_bounds__(kNumThreads, 1) combine_kernel(Peers peers, Layout layout, CombineArgs args,
                                                                  int64_t staging_stride) {
  const Ctx ctx(peers, layout);
  const int epoch = begin_op(ctx);
  stage(ctx, args, staging_stride, epoch);
  const int c = blockIdx.x;
  forward(ctx, args, staging_stride, epoch, c);
  home(ctx, args, epoch, c);
  end_op(ctx);
}

}  // namespace

void launch_combine(const Peers& peers, const Layout& layout, const CombineArgs& args, cudaStream_t stream) {
  const int64_t staging_stride = combine_row_stride(args.hidden, args.num_topk);
  combine_kernel<<<layout.num_channels, kNumThreads, 0, stream>>>(peers, layout, args, staging_stride);
  DEEP_EP_CUDA_CHECK(cudaGetLastError());
}

int max_resident_combine_blocks_per_sm() {
  int blocks = 0;
  DEEP_EP_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, combine_kernel, kNumThreads, 0));
  return blocks;
}

}  // namespace deep_ep::internode
