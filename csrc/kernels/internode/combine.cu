// Internode combine, the reverse of dispatch along the same slots. Block c of every rank runs:
//   producers  (one warp per local rank l, up to 8): push this rank's input rows of channel c that
//              forwarder (my node, l) needs into ring (c, l) in this rank's NVLink area, in the order
//              the forwarder sums them: sources (n, l) for n = 0, 1, ..., each in received order;
//   forwarders (the other warps): for each slot (source node n, channel c, i) this rank received in
//              the dispatch, in batches of one slot per warp, sum the ring entries of the node's ranks
//              that got it (send_nvl_head gives each entry's position in its ring), in local-rank order
//              in float32, round to bf16, and hand the ring space back; then send each node's partials
//              to the home rank (one signal or put per node);
//   then every warp: for each token of channel c, sum the partials of the nodes it went to in node
//              order (send_rdma_head), add the biases, round to bf16.
// The order of additions is the CPU reference's (normal_combine with num_ranks_per_node). Producers
// wait only for ring space, forwarders only for ring entries, so both always progress; the home sums
// wait for other ranks' forwarders.
//
// Ring counters (int64, (epoch + 1) << 32 | count): ring_tail(c, j) on the forwarder, written by
// producer j with st.release.sys after a system fence of its entries; ring_head(c, l) on producer j,
// written by forwarder l with st.release.sys after the batch that read the entries (a named barrier).
#include "deep_ep/error.hpp"
#include "kernels/common/bf16.cuh"
#include "kernels/common/occupancy.cuh"
#include "kernels/internode/common.cuh"
#include "kernels/internode/internode_gin.cuh"
#include "runtime/cuda_check.hpp"

namespace deep_ep::internode {

namespace {

constexpr int kNumWarps = kNumThreads / 32;
constexpr int kMaxProducerWarps = 8;
constexpr int kMaxRingsPerProducer = 32 / kMaxProducerWarps;
constexpr int kNumHomeWarps = kNumWarps;
constexpr int kHomeBarrier = 1;
constexpr int kForwardBarrier = 2;

__device__ __forceinline__ int num_producer_warps(int num_ranks_per_node) {
  return num_ranks_per_node < kMaxProducerWarps ? num_ranks_per_node : kMaxProducerWarps;
}

// Per warp: the ring positions (forwarder) or partial slots (home) of the row being summed.
__shared__ int heads[kNumWarps][32];

using device::add_bf16x8;
using device::pack_bf16x8;

__device__ __forceinline__ int64_t tagged(int epoch, int count) { return (int64_t(epoch) + 1) << 32 | count; }
__device__ __forceinline__ int count_of(int64_t value, int epoch) {
  return (value >> 32) == int64_t(epoch) + 1 ? static_cast<int>(value & 0xffffffff) : 0;
}

// Rows [first, first + count) of this rank's input that source s brought in channel c.
__device__ __forceinline__ void source_rows(const CombineArgs& a, int s, int c, int C, int& first, int& count) {
  const int* prefix = a.recv_gbl_channel_prefix_matrix + s * C;
  const int before = c > 0 ? prefix[c - 1] : 0;
  first = (s > 0 ? a.recv_gbl_rank_prefix_sum[s - 1] : 0) + before;
  count = prefix[c] - before;
}

template <typename Transport>
__device__ void produce(const Ctx<Transport>& ctx, const CombineArgs& a, int64_t stride, int epoch, int c) {
  const Layout& l = ctx.l;
  const int N = l.num_nodes, Rn = l.num_ranks_per_node, C = l.num_channels, Q = a.ring_slots;
  const int warp = threadIdx.x / 32, lane = device::lane_id();
  const int P = num_producer_warps(Rn);
  const int row_int4 = a.hidden * 2 / 16;
  // Per owned ring: the source node being pushed, the next row inside its range, rows pushed.
  int node[kMaxRingsPerProducer], offset[kMaxRingsPerProducer], pushed[kMaxRingsPerProducer];
#pragma unroll
  for (int o = 0; o < kMaxRingsPerProducer; ++o) node[o] = offset[o] = pushed[o] = 0;
  uint64_t idle_since = device::global_timer_ns();
  for (int polls = 1;; ++polls) {
    bool pending = false, progressed = false;
#pragma unroll
    for (int o = 0; o < kMaxRingsPerProducer; ++o) {
      const int lr = warp + o * P;
      if (lr >= Rn || node[o] >= N) continue;
      pending = true;
      int64_t head_value = 0;
      if (lane == 0) head_value = device::ld_acquire_sys(ctx.flag(ctx.p.rank, l.flag_ring_head(c, lr)));
      __syncwarp();  // the entry writes below are ordered after lane 0's acquire
      const int free_slots = count_of(__shfl_sync(0xffffffffu, head_value, 0), epoch) + Q - pushed[o];
      int budget = min(free_slots, a.ring_chunk);
      if (budget <= 0) continue;
      char* ring = ctx.rings(ctx.p.rank) + (static_cast<int64_t>(c) * Rn + lr) * Q * stride;
      while (budget > 0 && node[o] < N) {
        int first, count;
        source_rows(a, ctx.rank_of(node[o], lr), c, C, first, count);
        if (offset[o] >= count) {
          ++node[o];
          offset[o] = 0;
          continue;
        }
        const int64_t row = first + offset[o];
        char* entry = ring + static_cast<int64_t>(pushed[o] % Q) * stride;
        device::warp_copy<8>(reinterpret_cast<int4*>(entry), reinterpret_cast<const int4*>(a.x + row * a.hidden),
                             row_int4, lane, device::ld_input);
        float* w = reinterpret_cast<float*>(entry + a.hidden * 2);
        for (int k = lane; k < a.num_topk; k += 32) w[k] = a.topk_weights[row * a.num_topk + k];
        ++offset[o];
        ++pushed[o];
        --budget;
        progressed = true;
      }
      __threadfence_system();
      __syncwarp();
      if (lane == 0)
        device::st_release_sys(ctx.flag(ctx.rank_of(ctx.node, lr), l.flag_ring_tail(c, ctx.local)), tagged(epoch, pushed[o]));
    }
    if (!pending) return;
    if (progressed) {
      idle_since = device::global_timer_ns();
    } else if (polls % device::kPollsPerSlowCheck != 0) {
      continue;
    } else if (device::error_reported(ctx.p.diagnostics)) {
      return;
    } else if (device::global_timer_ns() - idle_since > static_cast<uint64_t>(ctx.p.timeout_ns)) {
      if (lane == 0)
        device::report(ctx.p.diagnostics, Phase::kInternodeCombineStage, true, ctx.p.rank,
                       ctx.rank_of(ctx.node, warp), c, -1, 0, 0);
      return;
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

template <typename Transport>
__device__ void forward(const Ctx<Transport>& ctx, const CombineArgs& a, int64_t stride, int epoch, int c) {
  const Layout& l = ctx.l;
  const int N = l.num_nodes, Rn = l.num_ranks_per_node, C = l.num_channels, Q = a.ring_slots;
  const int P = num_producer_warps(Rn);
  const int F = kNumWarps - P;
  const int fw = threadIdx.x / 32 - P, lane = device::lane_id();
  __shared__ const char* ring_of[32];  // ring (c, my local) of each local rank
  __shared__ int consumed[32];         // per local rank: entries read by the finished batches
  __shared__ int abort_forward;
  if (fw == 0 && lane < Rn) {
    ring_of[lane] = ctx.rings(ctx.rank_of(ctx.node, lane)) + (static_cast<int64_t>(c) * Rn + ctx.local) * Q * stride;
    consumed[lane] = 0;
  }
  if (fw == 0 && lane == 0) abort_forward = 0;
  device::named_barrier(kForwardBarrier, F * 32);
  const int row_int4 = a.hidden * 2 / 16;
  const Transport& net = ctx.net;
  const int64_t own_first_slot = static_cast<int64_t>(ctx.node) * C * l.capacity + static_cast<int64_t>(c) * l.capacity;
  // The partial of slot (n, c, i) goes to home rank (n, my local index), slot (my node, c, i): written in
  // place for the own node, straight into the home rank's window where the transport maps it, else staged
  // in send_rows and put below.
  for (int n = 0; n < N; ++n) {
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
    for (int i0 = 0; i0 < count && !abort_forward; i0 += F) {
      const int i = i0 + fw;
      if (i < count) {
        const int64_t slot = l.slot(n, c, i);
        __syncwarp();
        const int position = lane < Rn ? a.send_nvl_head[slot * Rn + lane] : -1;
        heads[threadIdx.x / 32][lane] = position;
        // Lane lr waits until local rank lr has pushed this entry.
        bool ok = true;
        if (position >= 0) {
          const int64_t* tail = ctx.flag(ctx.p.rank, l.flag_ring_tail(c, lane));
          const uint64_t start = device::global_timer_ns();
          for (int polls = 1; count_of(device::ld_acquire_sys(tail), epoch) <= position; ++polls) {
            if (polls % device::kPollsPerSlowCheck == 0 &&
                (device::error_reported(ctx.p.diagnostics) ||
                 device::global_timer_ns() - start > static_cast<uint64_t>(ctx.p.timeout_ns))) {
              device::report(ctx.p.diagnostics, Phase::kInternodeCombineStage, true, ctx.p.rank,
                             ctx.rank_of(ctx.node, lane), c, -1, position + 1, count_of(device::ld_acquire_sys(tail), epoch));
              ok = false;
              break;
            }
          }
          atomicMax(&consumed[lane], position + 1);
        }
        const bool all_ok = __all_sync(0xffffffffu, ok);
        __syncwarp();  // heads[] of every lane is visible to the warp
        if (!all_ok) {
          abort_forward = 1;
        } else {
          const int* h = heads[threadIdx.x / 32];
          const auto entry = [&](int lr, int pos) {
            return reinterpret_cast<const int4*>(ring_of[lr] + static_cast<int64_t>(pos % Q) * stride);
          };
          char* dst = dst_first + static_cast<int64_t>(i) * l.row_stride;
          for (int v = lane; v < row_int4; v += 32) {
            float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            sum_rows(acc, h, Rn, v, entry);
            reinterpret_cast<int4*>(dst)[v] = pack_bf16x8(acc);
          }
          for (int k = lane; k < a.num_topk; k += 32) {
            float acc = 0.0f;
            for (int lr = 0; lr < Rn; ++lr)
              if (h[lr] >= 0) acc += __ldcg(reinterpret_cast<const float*>(reinterpret_cast<const char*>(entry(lr, h[lr])) +
                                                                         a.hidden * 2) + k);
            reinterpret_cast<float*>(dst + a.hidden * 2)[k] = acc;
          }
        }
      }
      // The batch's entries are read: hand their space back (one write per ring).
      device::named_barrier(kForwardBarrier, F * 32);
      if (fw == 0 && lane < Rn)
        device::st_release_sys(ctx.flag(ctx.rank_of(ctx.node, lane), l.flag_ring_head(c, ctx.local)),
                               tagged(epoch, consumed[lane]));
      device::named_barrier(kForwardBarrier, F * 32);
    }
  }
  // Every partial of this channel is written (and fenced) before any signal or put covers it: direct
  // stores and staged put sources alike, by every forwarder warp, ordered by the barrier.
  __threadfence_system();
  device::named_barrier(kForwardBarrier, F * 32);
  if (abort_forward) return;
  // combine_ready(my node, c) flag on this rank, or signal_combine(my node, c) on home rank (n, my
  // local): one write or add per op, after every partial of channel c for that node.
  for (int n = fw; n < N; n += F) {
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

template <typename Transport>
__device__ void home_sums(const Ctx<Transport>& ctx, const CombineArgs& a, int epoch, int c) {
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

template <typename Transport>
__global__ void __launch_bounds__(kNumThreads, 1) combine_kernel(Peers peers, Layout layout,
                                                                 const __grid_constant__ Transport net,
                                                                 CombineArgs args, int64_t ring_stride) {
  const Ctx<Transport> ctx(peers, layout, net);
  const int epoch = begin_op(ctx);
  const int c = blockIdx.x;
  if (static_cast<int>(threadIdx.x / 32) < num_producer_warps(layout.num_ranks_per_node)) {
    produce(ctx, args, ring_stride, epoch, c);
  } else {
    forward(ctx, args, ring_stride, epoch, c);
  }
  __syncthreads();
  home_sums(ctx, args, epoch, c);
  end_op(ctx);
}

template <typename Transport>
void launch(const Peers& peers, const Layout& layout, const Transport& net, const CombineArgs& args,
            cudaStream_t stream) {
  const int64_t ring_stride = combine_row_stride(args.hidden, args.num_topk);
  combine_kernel<Transport><<<layout.num_channels, kNumThreads, 0, stream>>>(peers, layout, net, args, ring_stride);
  DEEP_EP_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

// The transports combine is built for.
void launch_combine(const Peers& peers, const Layout& layout, const CombineArgs& args, cudaStream_t stream) {
  launch(peers, layout, p2p_transport(peers, layout), args, stream);
}

#if defined(DEEP_EP_ENABLE_GIN) && DEEP_EP_ENABLE_GIN
void launch_combine(const Peers& peers, const Layout& layout, const CombineArgs& args,
                    const transport::GinTransport& gin, cudaStream_t stream) {
  launch(peers, layout, gin, args, stream);
}
#endif

int max_resident_combine_blocks_per_sm() {
  return device::resident_blocks_per_sm<combine_kernel<transport::P2pTransport>>(kNumThreads);
}

}  // namespace deep_ep::internode
