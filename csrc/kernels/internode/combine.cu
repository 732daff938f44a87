// Internode combine, the reverse of dispatch along the same stream positions. Block c of every rank
// runs three warp roles side by side:
//   producers  (CombineArgs::num_producer_warps, each owning the rings of up to 4 local ranks): push this rank's input
//              rows of channel c that forwarder (my node, l) needs into ring (c, l) in this rank's
//              NVLink area, in the order the forwarder sums them: sources (n, l) for n = 0, 1, ...,
//              each in received order;
//   forwarders (CombineArgs::num_forward_warps): for each stream position (source node n, channel c, i) this rank received
//              in the dispatch, in batches of one position per warp, sum the ring entries of the node's
//              ranks that got it (send_nvl_head gives each entry's position in its ring), in local-rank
//              order in float32, round to bf16, hand the ring space back, and write the batch into the
//              ring (my node, c) of home rank (n, my local) once it has credited those slots, with one
//              signal carrying the batch's count;
//   home       (the other warps): for each token of channel c, in rounds of one token per warp, wait
//              for the partials of the nodes it went to (send_rdma_head gives their positions), sum them
//              in node order, add the biases, round to bf16; then credit the forwarders what the round read.
// The order of additions is the CPU reference's (normal_combine with num_ranks_per_node). Every
// forwarder serves source nodes in the same order (0, 1, ...), and so do the producers, so the home
// ranks of node 0 are served first, then those of node 1, ...: a forwarder waiting for a home rank's
// credits waits for partials that come before its own.
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
constexpr int kMaxRingsPerProducer = kMaxRingsPerProducerWarp;
constexpr int kHomeBarrier = 1;
constexpr int kForwardBarrier = 2;

// Warps: producers [0, P), forwarders [P, P + F), home ranks' sums the rest (CombineArgs).
// Rows of channel c in a [*, C] inclusive prefix row.
__device__ __forceinline__ int channel_count(const int* prefix_row, int c) {
  return prefix_row[c] - (c > 0 ? prefix_row[c - 1] : 0);
}

// Per warp: the ring positions (forwarder) or partial slots (home) of the row being summed.
__shared__ int heads[kNumWarps][32];

using device::add_bf16x8;
using device::pack_bf16x8;


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
  const int P = a.num_producer_warps;
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
  const int N = l.num_nodes, Rn = l.num_ranks_per_node, C = l.num_channels, Q = a.ring_slots, cap = l.capacity;
  const int P = a.num_producer_warps, F = a.num_forward_warps;
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
  // The partial of position (n, c, i) goes to home rank (n, my local index), ring (my node, c): written
  // in place for the own node, straight into the home rank's window where the transport maps it, else
  // staged in send_rows at the same slot and put.
  for (int n = 0; n < N && !abort_forward; ++n) {
    const int* prefix = a.recv_rdma_channel_prefix_matrix + n * C;
    const int count = channel_count(prefix, c);
    const int64_t row_base = (n > 0 ? a.recv_rdma_rank_prefix_sum[n - 1] : 0) + (c > 0 ? prefix[c - 1] : 0);
    const int home_rank = ctx.rank_of(n, ctx.local);
    const bool staged = n != ctx.node && net.direct_ptr(home_rank, l.rows_offset) == nullptr;
    for (int i0 = 0; i0 < count; i0 += F) {
      const int batch = min(F, count - i0);
      // combine_credit(n, c): adds of home rank (n, my local); position i overwrites position i - cap.
      if (fw == 0 && lane == 0 && i0 + batch - cap > 0) {
        uint64_t observed = 0;
        if (!net.wait_signal(l.signal_combine_credit(n, c), static_cast<uint64_t>(i0 + batch - cap), ctx.p.timeout_ns,
                             &ctx.p.diagnostics->claimed, &observed)) {
          device::report(ctx.p.diagnostics, Phase::kInternodeCombineSend, true, ctx.p.rank, home_rank, c, -1,
                         i0 + batch - cap, static_cast<long long>(observed));
          abort_forward = 1;
        }
      }
      device::named_barrier(kForwardBarrier, F * 32);
      if (abort_forward) break;
      const int i = i0 + fw;
      if (i < count) {
        const int64_t nvl_row = row_base + i;
        __syncwarp();
        const int position = lane < Rn && nvl_row < a.num_rdma_rows ? a.send_nvl_head[nvl_row * Rn + lane] : -1;
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
          const int64_t home_slot = l.slot(ctx.node, c, i);
          char* dst;
          if (n == ctx.node) {
            dst = ctx.row(ctx.p.rank, home_slot);
          } else if (!staged) {
            dst = net.direct_ptr(home_rank, l.rows_offset + home_slot * l.row_stride);
          } else {
            dst = ctx.send_row(l.slot(n, c, i));
          }
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
      // The batch's partials are written and fenced (direct stores and staged put sources alike) before
      // the signal; its ring entries are read before their space is handed back.
      __threadfence_system();
      device::named_barrier(kForwardBarrier, F * 32);
      if (abort_forward) break;
      if (fw == 0) {
        if (lane < Rn)
          device::st_release_sys(ctx.flag(ctx.rank_of(ctx.node, lane), l.flag_ring_head(c, ctx.local)),
                                 tagged(epoch, consumed[lane]));
        // combine(my node, c) on the home rank: one add per batch with its count, after its partials.
        if (!staged) {
          net.signal_add(home_rank, l.signal_combine(ctx.node, c), static_cast<uint64_t>(batch));
        } else {
          const int64_t first_slot = l.slot(ctx.node, c, i0) - l.slot(ctx.node, c, 0);
          const int head_run = static_cast<int>(min(static_cast<int64_t>(batch), cap - first_slot));
          const int64_t dst = l.rows_offset + l.slot(ctx.node, c, i0) * l.row_stride;
          const int64_t src = l.send_rows_offset + l.slot(n, c, i0) * l.row_stride;
          if (head_run < batch) {
            net.put(home_rank, dst, src, static_cast<int64_t>(head_run) * l.row_stride);
            net.put_with_signal(home_rank, l.rows_offset + l.slot(ctx.node, c, 0) * l.row_stride,
                                l.send_rows_offset + l.slot(n, c, 0) * l.row_stride,
                                static_cast<int64_t>(batch - head_run) * l.row_stride, l.signal_combine(ctx.node, c),
                                static_cast<uint64_t>(batch));
          } else {
            net.put_with_signal(home_rank, dst, src, static_cast<int64_t>(batch) * l.row_stride,
                                l.signal_combine(ctx.node, c), static_cast<uint64_t>(batch));
          }
        }
      }
    }
  }
  // Every credit of the op is in once the home ranks summed every partial: then nobody adds to the
  // credit signals any more and they are reset for the next op.
  if (fw == 0 && !abort_forward) {
    for (int n = lane; n < N; n += 32) {
      const int count = channel_count(a.recv_rdma_channel_prefix_matrix + n * C, c);
      uint64_t observed = 0;
      if (count > 0 && !net.wait_signal(l.signal_combine_credit(n, c), static_cast<uint64_t>(count), ctx.p.timeout_ns,
                                        &ctx.p.diagnostics->claimed, &observed)) {
        device::report(ctx.p.diagnostics, Phase::kInternodeCombineSend, true, ctx.p.rank, ctx.rank_of(n, ctx.local), c,
                       -1, count, static_cast<long long>(observed));
        continue;
      }
      net.reset_signal(l.signal_combine_credit(n, c));
    }
  }
}

template <typename Transport>
__device__ void home_sums(const Ctx<Transport>& ctx, const CombineArgs& a, int c, int first_warp) {
  const Layout& l = ctx.l;
  const int N = l.num_nodes, C = l.num_channels;
  const int num_home_warps = kNumWarps - first_warp;
  const int w = threadIdx.x / 32, hw = w - first_warp, lane = device::lane_id();
  const Transport& net = ctx.net;
  __shared__ int used[kMaxInternodeNodes];      // per node: partial positions read by finished rounds
  __shared__ int credited[kMaxInternodeNodes];  // ... and credited back to the forwarder
  __shared__ int home_abort;
  if (hw == 0) {
    for (int n = lane; n < N; n += 32) used[n] = credited[n] = 0;
    if (lane == 0) home_abort = 0;
  }
  device::named_barrier(kHomeBarrier, num_home_warps * 32);
  int begin, end;
  device::channel_range(c, C, a.num_tokens, begin, end);
  const int row_int4 = a.hidden * 2 / 16;
  const char* partials = ctx.row(ctx.p.rank, 0);
  const auto partial_row = [&](int n, int position) {
    return reinterpret_cast<const int4*>(partials + l.slot(n, c, position) * l.row_stride);
  };
  for (int t0 = begin; t0 < end; t0 += num_home_warps) {
    const int t = t0 + hw;
    if (t < end) {
      __syncwarp();
      const int head = lane < N ? a.send_rdma_head[static_cast<int64_t>(t) * N + lane] : -1;
      heads[w][lane] = head;
      // Lane n waits for partial `head` of node n: combine(n, c) counts the partials that have landed.
      bool ok = true;
      if (head >= 0) {
        uint64_t observed = 0;
        ok = net.wait_signal(l.signal_combine(lane, c), static_cast<uint64_t>(head) + 1, ctx.p.timeout_ns,
                             &ctx.p.diagnostics->claimed, &observed);
        if (!ok)
          device::report(ctx.p.diagnostics, Phase::kInternodeCombineRecv, true, ctx.p.rank, ctx.rank_of(lane, ctx.local), c,
                         t, head + 1, static_cast<long long>(observed));
        atomicMax(&used[lane], head + 1);
      }
      const bool all_ok = __all_sync(0xffffffffu, ok);
      __syncwarp();
      if (!all_ok) {
        home_abort = 1;
      } else {
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
            const int position = heads[w][n];
            if (position >= 0)
              acc += __ldcg(reinterpret_cast<const float*>(reinterpret_cast<const char*>(partial_row(n, position)) +
                                                           a.hidden * 2) + k);
          }
          a.combined_topk_weights[static_cast<int64_t>(t) * a.num_topk + k] = acc;
        }
      }
    }
    // The round's partials are read: credit their slots back (one add per node that advanced), then
    // let the next round start, so that `used` holds only finished rounds when it is credited.
    device::named_barrier(kHomeBarrier, num_home_warps * 32);
    if (home_abort) return;
    if (hw == 0) {
      for (int n = 0; n < N; ++n) {
        const int delta = used[n] - credited[n];
        if (delta <= 0) continue;
        net.signal_add(ctx.rank_of(n, ctx.local), l.signal_combine_credit(ctx.node, c), static_cast<uint64_t>(delta));
        if (lane == 0) credited[n] = used[n];
        __syncwarp();
      }
    }
    device::named_barrier(kHomeBarrier, num_home_warps * 32);
  }
  // Every partial of the op has landed (the token with each node's last position waited for it): no
  // add to combine(n, c) can follow.
  if (hw == 0)
    for (int n = lane; n < N; n += 32) net.reset_signal(l.signal_combine(n, c));
}

// Kernel name: V1's (profiles and users' kernel-name filters read it).
template <typename Transport>
__global__ void __launch_bounds__(kNumThreads, 1) combine(Peers peers, Layout layout, const __grid_constant__ Transport net,
                                                          CombineArgs args, int64_t ring_stride) {
  const Ctx<Transport> ctx(peers, layout, net);
  const int epoch = begin_op(ctx);
  const int c = blockIdx.x;
  const int warp = threadIdx.x / 32;
  const int P = args.num_producer_warps, F = args.num_forward_warps;
  if (warp < P) {
    produce(ctx, args, ring_stride, epoch, c);
  } else if (warp < P + F) {
    forward(ctx, args, ring_stride, epoch, c);
  } else {
    home_sums(ctx, args, c, P + F);
  }
  end_op(ctx);
}

template <typename Transport>
void launch(const Peers& peers, const Layout& layout, const Transport& net, const CombineArgs& args,
            cudaStream_t stream) {
  const int64_t ring_stride = combine_row_stride(args.hidden, args.num_topk);
  combine<Transport><<<layout.num_channels, kNumThreads, 0, stream>>>(peers, layout, net, args, ring_stride);
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
  return device::resident_blocks_per_sm<combine<transport::P2pTransport>>(kNumThreads);
}

}  // namespace deep_ep::internode
