// Internode dispatch. Block c owns channel c (a contiguous range of this rank's tokens) and runs three
// warp roles, the first with every warp, then the other two side by side:
//   senders    write each token of the channel once per destination node, into its slot on the forwarder
//              there (the rank with this rank's local index): in place for the own node, through the
//              transport's direct pointer where it maps the forwarder's window (P2P), else into this
//              rank's send_rows followed by one put; then one signal per node and channel;
//   forwarder  (warp 0) waits for channel c of every source node (transport signal), relays its arrival
//              to the node with a flag, and (non-cached) records in send_nvl_head, for each slot and
//              each rank of the node, the position of that rank's row in its combine stream;
//   receivers  for every source rank, copy from the forwarder of this node the channel-c slots whose
//              mask names this rank, into the outputs at the positions the prefix matrices give.
// A slot is (source node, channel, index among the channel's tokens for this node); slots of one
// (node, channel) are consecutive, so each put is one contiguous range.
#include "deep_ep/error.hpp"
#include "kernels/common/occupancy.cuh"
#include "kernels/internode/common.cuh"
#include "kernels/internode/internode_gin.cuh"
#include "runtime/cuda_check.hpp"

namespace deep_ep::internode {

namespace {

// The roles run one after the other inside a block, so that each gets every warp: all warps send the
// channel, then warp 0 forwards (relays arrivals, builds send_nvl_head) while the others receive.
// Nothing a sender does waits, so a block always reaches its forwarder; every wait is on another block.
constexpr int kNumSenderWarps = kNumThreads / 32;
constexpr int kNumForwarderWarps = 1;
constexpr int kFirstReceiverWarp = kNumForwarderWarps;
constexpr int kNumReceiverWarps = kNumThreads / 32 - kFirstReceiverWarp;
constexpr int kSendBarrier = 1;

// Whether token t goes to any rank of node n, and the mask of those ranks (bit = local rank).
__device__ __forceinline__ uint32_t node_mask(const bool* is_token_in_rank, int R, int Rn, int t, int n) {
  const bool* row = is_token_in_rank + static_cast<int64_t>(t) * R + n * Rn;
  uint32_t mask = 0;
  for (int lr = 0; lr < Rn; ++lr) mask |= static_cast<uint32_t>(row[lr]) << lr;
  return mask;
}

template <typename Transport>
__device__ void send(const Ctx<Transport>& ctx, const DispatchArgs& a, const RowLayout& rl, int epoch, int c) {
  const Layout& l = ctx.l;
  const int R = ctx.p.num_ranks, N = l.num_nodes, Rn = l.num_ranks_per_node;
  const int warp = threadIdx.x / 32, lane = device::lane_id();
  int begin, end;
  device::channel_range(c, l.num_channels, a.num_tokens, begin, end);

  // Slots: the rank of each token among the channel's tokens for node n (c * cap + rank, as the
  // combine's home rank reads it back). Computed once, kept in the handle.
  if (!a.cached) {
    for (int n = warp; n < N; n += kNumSenderWarps) {
      int running = 0;
      for (int t0 = begin; t0 < end; t0 += 32) {
        const int t = t0 + lane;
        const bool mine = t < end && node_mask(a.is_token_in_rank, R, Rn, t, n) != 0;
        const uint32_t ballot = __ballot_sync(0xffffffffu, mine);
        if (t < end)
          a.send_rdma_head[static_cast<int64_t>(t) * N + n] =
              mine ? c * l.capacity + running + __popc(ballot & ((1u << lane) - 1)) : -1;
        running += __popc(ballot);
      }
    }
    __threadfence_block();
    device::named_barrier(kSendBarrier, kNumSenderWarps * 32);
  }

  // A row for node n lands in forwarder (n, my local index), slot (my node, head). The own node's rows
  // are written in place; other nodes' rows too where the transport maps the forwarder's window
  // (P2P), else they are staged in send_rows and put below.
  const Transport& net = ctx.net;
  const int64_t own_first_slot = static_cast<int64_t>(ctx.node) * l.num_channels * l.capacity;
  for (int t = begin + warp; t < end; t += kNumSenderWarps) {
    const int64_t* topk = a.topk_idx ? a.topk_idx + static_cast<int64_t>(t) * a.num_topk : nullptr;
    for (int n = 0; n < N; ++n) {
      const int head = a.send_rdma_head[static_cast<int64_t>(t) * N + n];
      if (head < 0) continue;
      char* dst;
      if (n == ctx.node) {
        dst = ctx.row(ctx.p.rank, own_first_slot + head);
      } else if (char* direct = net.direct_ptr(ctx.rank_of(n, ctx.local), l.rows_offset + (own_first_slot + head) * l.row_stride)) {
        dst = direct;
      } else {
        dst = ctx.send_row(static_cast<int64_t>(n) * l.num_channels * l.capacity + head);
      }
      device::warp_copy<8>(reinterpret_cast<int4*>(dst),
                           reinterpret_cast<const int4*>(a.x + static_cast<int64_t>(t) * a.row_bytes), a.row_bytes / 16,
                           lane, device::ld_input);
      float* scales = reinterpret_cast<float*>(dst + rl.scales_offset);
      for (int k = lane; k < a.num_scales; k += 32)
        scales[k] = a.x_scales[t * a.scale_token_stride + k * a.scale_channel_stride];
      int* topk_dst = reinterpret_cast<int*>(dst + rl.topk_idx_offset);
      float* weights_dst = reinterpret_cast<float*>(dst + rl.topk_weights_offset);
      for (int k = lane; topk && k < a.num_topk; k += 32) {
        topk_dst[k] = static_cast<int>(topk[k]);
        weights_dst[k] = a.topk_weights[static_cast<int64_t>(t) * a.num_topk + k];
      }
      if (lane == 0) {
        *reinterpret_cast<int*>(dst + rl.src_token_offset) = t;
        *reinterpret_cast<uint32_t*>(dst + rl.mask_offset) = node_mask(a.is_token_in_rank, R, Rn, t, n);
      }
    }
  }
  // Own-node slots are read by the node's ranks after the flag; the others are covered by the signal
  // (direct stores count as puts of the storing thread once fenced and ordered before the signalling
  // warp by the barrier; staged rows are a put's source, written before the barrier).
  __threadfence_system();
  device::named_barrier(kSendBarrier, kNumSenderWarps * 32);

  // data_ready(my node, c) flag on this rank, or signal_dispatch(my node, c) on forwarder (n, my local):
  // one write or add per op, after every row of channel c for that node.
  for (int n = warp; n < N; n += kNumSenderWarps) {
    const int* prefix = a.rdma_channel_prefix_matrix + n * l.num_channels;
    const int count = prefix[c] - (c > 0 ? prefix[c - 1] : 0);
    const int forwarder = ctx.rank_of(n, ctx.local);
    if (n == ctx.node) {
      if (lane == 0) device::st_release_sys(ctx.flag(ctx.p.rank, l.flag_data_ready(n, c)), int64_t(epoch) + 1);
    } else if (net.direct_ptr(forwarder, l.rows_offset) != nullptr) {
      net.signal_add(forwarder, l.signal_dispatch(ctx.node, c), 1);
    } else {
      const int64_t first = static_cast<int64_t>(c) * l.capacity;
      net.put_with_signal(forwarder,
                        l.rows_offset + (static_cast<int64_t>(ctx.node) * l.num_channels * l.capacity + first) * l.row_stride,
                        l.send_rows_offset + (static_cast<int64_t>(n) * l.num_channels * l.capacity + first) * l.row_stride,
                        static_cast<int64_t>(count) * l.row_stride, l.signal_dispatch(ctx.node, c), 1);
    }
  }
}

template <typename Transport>
__device__ void forward(const Ctx<Transport>& ctx, const DispatchArgs& a, const RowLayout& rl, int epoch, int c) {
  const Layout& l = ctx.l;
  const int N = l.num_nodes, Rn = l.num_ranks_per_node, C = l.num_channels;
  const int fw = threadIdx.x / 32, lane = device::lane_id();
  for (int n = fw; n < N; n += kNumForwarderWarps) {
    const int source = ctx.rank_of(n, ctx.local);
    bool ok = true;
    if (lane == 0) {
      if (n == ctx.node) {
        ok = ctx.wait_flag(ctx.flag(ctx.p.rank, l.flag_data_ready(n, c)), int64_t(epoch) + 1,
                           Phase::kInternodeDispatchForward, source, c);
      } else {
        ok = ctx.wait_signal_once(l.signal_dispatch(n, c), Phase::kInternodeDispatchForward, source, c);
        if (ok) device::st_release_sys(ctx.flag(ctx.p.rank, l.flag_data_ready(n, c)), int64_t(epoch) + 1);
      }
    }
    ok = __shfl_sync(0xffffffffu, ok, 0);
    if (!ok || a.cached) continue;

    // send_nvl_head: for each slot and each rank j of the node, the position of j's row in j's combine
    // ring (c, my local index), whose stream is j's rows from sources (0, me), (1, me), ... in channel c
    // (from j's published prefixes, written by notify, which ended with epoch == this op's epoch).
    int base = 0;
    if (lane < Rn) {
      const int j = ctx.rank_of(ctx.node, lane);
      if (ctx.wait_flag(ctx.flag(j, l.flag_published()), epoch, Phase::kInternodeDispatchForward, j, c)) {
        const int* channel_prefix = ctx.published(j);
        for (int n2 = 0; n2 < n; ++n2) {
          const int* p = channel_prefix + ctx.rank_of(n2, ctx.local) * C;
          base += __ldcg(p + c) - (c > 0 ? __ldcg(p + c - 1) : 0);
        }
      }
    }
    const int* prefix = a.recv_rdma_channel_prefix_matrix + n * C;
    const int count = prefix[c] - (c > 0 ? prefix[c - 1] : 0);
    int running = 0;  // lane lr: rows so far for local rank lr
    for (int i0 = 0; i0 < count; i0 += 32) {
      const int i = i0 + lane;
      const int64_t slot = l.slot(n, c, i);
      const uint32_t mask = i < count ? __ldcg(reinterpret_cast<const uint32_t*>(ctx.row(ctx.p.rank, slot) + rl.mask_offset)) : 0u;
      for (int lr = 0; lr < Rn; ++lr) {
        const bool hit = (mask >> lr) & 1u;
        const uint32_t ballot = __ballot_sync(0xffffffffu, hit);
        const int lr_base = __shfl_sync(0xffffffffu, base + running, lr);
        if (i < count) a.send_nvl_head[slot * Rn + lr] = hit ? lr_base + __popc(ballot & ((1u << lane) - 1)) : -1;
        if (lane == lr) running += __popc(ballot);
      }
    }
  }
}

template <typename Transport>
__device__ void receive(const Ctx<Transport>& ctx, const DispatchArgs& a, const RowLayout& rl, int epoch, int c) {
  const Layout& l = ctx.l;
  const int C = l.num_channels, Rn = l.num_ranks_per_node, R = ctx.p.num_ranks;
  const int rw = threadIdx.x / 32 - kFirstReceiverWarp, lane = device::lane_id();
  const int L = a.num_experts > 0 ? a.num_experts / R : 0;
  const int first_expert = ctx.p.rank * L;
  // One warp per source. (Every warp scanning every source and copying a share of its rows balances the
  // copies, but measured 10x slower with 16 ranks on one H100.)
  for (int s = rw; s < R; s += kNumReceiverWarps) {
    const int* prefix = a.recv_gbl_channel_prefix_matrix + s * C;
    const int expected = prefix[c] - (c > 0 ? prefix[c - 1] : 0);
    if (expected == 0) continue;
    const int n = s / Rn;
    const int forwarder = ctx.rank_of(ctx.node, s % Rn);
    bool ok = true;
    if (lane == 0) ok = ctx.wait_flag(ctx.flag(forwarder, l.flag_data_ready(n, c)), int64_t(epoch) + 1,
                                      Phase::kInternodeDispatchRecv, forwarder, c);
    if (!__shfl_sync(0xffffffffu, ok, 0)) continue;
    const int base = (s > 0 ? a.recv_gbl_rank_prefix_sum[s - 1] : 0) + (c > 0 ? prefix[c - 1] : 0);
    // Slots past the channel's count hold stale bytes, but they come after every slot of this rank,
    // and the scan stops once it has found `expected` rows.
    int found = 0;
    for (int i0 = 0; found < expected && i0 < l.capacity; i0 += 32) {
      const int i = i0 + lane;
      const int64_t slot = l.slot(n, c, i);
      const char* src_row = ctx.row(forwarder, slot);
      const bool hit = i < l.capacity && ((__ldcg(reinterpret_cast<const uint32_t*>(src_row + rl.mask_offset)) >> ctx.local) & 1u);
      uint32_t ballot = __ballot_sync(0xffffffffu, hit);
      while (ballot != 0 && found < expected) {
        const int src_lane = __ffs(ballot) - 1;
        ballot &= ballot - 1;
        const int64_t src_slot = l.slot(n, c, i0 + src_lane);
        const char* src = ctx.row(forwarder, src_slot);
        const int64_t row = base + found;
        ++found;
        if (row >= a.num_rows) {
          // num_worst_tokens too small: drop the row, say so.
          if (lane == 0)
            device::report(ctx.p.diagnostics, Phase::kInternodeTooManyRows, false, ctx.p.rank, s, c, -1, a.num_rows, row + 1);
          continue;
        }
        device::warp_copy<8>(reinterpret_cast<int4*>(a.recv_x + row * a.row_bytes), reinterpret_cast<const int4*>(src),
                             a.row_bytes / 16, lane, device::ld_queue);
        const float* scales = reinterpret_cast<const float*>(src + rl.scales_offset);
        for (int k = lane; k < a.num_scales; k += 32) a.recv_x_scales[row * a.num_scales + k] = __ldcg(scales + k);
        if (a.num_topk > 0 && a.recv_topk_idx) {
          const int* topk = reinterpret_cast<const int*>(src + rl.topk_idx_offset);
          const float* weights = reinterpret_cast<const float*>(src + rl.topk_weights_offset);
          for (int k = lane; k < a.num_topk; k += 32) {
            const int e = __ldcg(topk + k);
            const bool local = e >= first_expert && e < first_expert + L;
            a.recv_topk_idx[row * a.num_topk + k] = local ? e - first_expert : -1;
            a.recv_topk_weights[row * a.num_topk + k] = local ? __ldcg(weights + k) : 0.0f;
          }
        }
        if (lane == 0) {
          a.recv_src_meta[row * 2] = __ldcg(reinterpret_cast<const int*>(src + rl.src_token_offset));
          a.recv_src_meta[row * 2 + 1] = static_cast<int>(src_slot - static_cast<int64_t>(n) * C * l.capacity);
        }
      }
    }
  }
}

template <typename Transport>
__global__ void __launch_bounds__(kNumThreads, 1) dispatch_kernel(Peers peers, Layout layout,
                                                                  const __grid_constant__ Transport net,
                                                                  DispatchArgs args) {
  const Ctx<Transport> ctx(peers, layout, net);
  const int epoch = begin_op(ctx);
  const RowLayout rl = RowLayout::make(args.row_bytes, args.num_scales, args.num_topk);
  const int c = blockIdx.x;
  send(ctx, args, rl, epoch, c);
  if (threadIdx.x / 32 < kNumForwarderWarps) {
    forward(ctx, args, rl, epoch, c);
  } else {
    receive(ctx, args, rl, epoch, c);
  }
  end_op(ctx);
}

template <typename Transport>
void launch(const Peers& peers, const Layout& layout, const Transport& net, const DispatchArgs& args,
            cudaStream_t stream) {
  dispatch_kernel<Transport><<<layout.num_channels, kNumThreads, 0, stream>>>(peers, layout, net, args);
  DEEP_EP_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

// The transports dispatch is built for.
void launch_dispatch(const Peers& peers, const Layout& layout, const DispatchArgs& args, cudaStream_t stream) {
  launch(peers, layout, p2p_transport(peers, layout), args, stream);
}

#if defined(DEEP_EP_ENABLE_GIN) && DEEP_EP_ENABLE_GIN
void launch_dispatch(const Peers& peers, const Layout& layout, const DispatchArgs& args,
                     const transport::GinTransport& gin, cudaStream_t stream) {
  launch(peers, layout, gin, args, stream);
}
#endif

int max_resident_blocks_per_sm() {
  const int dispatch = device::resident_blocks_per_sm<dispatch_kernel<transport::P2pTransport>>(kNumThreads);
  const int combine = max_resident_combine_blocks_per_sm();
  return dispatch < combine ? dispatch : combine;
}

}  // namespace deep_ep::internode
