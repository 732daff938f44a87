// Internode dispatch. Block c owns channel c (a contiguous range of this rank's tokens) and runs three
// warp roles side by side, so that a call streams any number of tokens through bounded rings:
//   senders    write the channel's tokens, a round of send_chunk tokens at a time, once per destination
//              node into the ring (my node, c) of the forwarder there (the rank with this rank's local
//              index): in place for the own node, through the transport's direct pointer where it maps
//              the forwarder's window (P2P), else into this rank's send_rows followed by puts; a round
//              first waits until the forwarder has credited the ring slots it overwrites, and ends with
//              one signal per node carrying the round's row count;
//   forwarder  (one warp) relays each source node's arrivals to its node (rows_ready flags), records
//              in send_nvl_head (non-cached) where each row sits in the combine streams of the node's
//              ranks, and credits each source the positions every rank of the node has scanned;
//   receivers  for every source rank, scan the ring of the forwarder of this node that carries it,
//              copy the rows whose mask names this rank into the outputs at the positions the prefix
//              matrices give, and publish how far they have scanned (rows_scanned).
// Senders wait only for credits, which depend only on arrivals being scanned; receivers and the
// forwarder wait only for arrivals. So every ring drains whatever its size.
#include "deep_ep/error.hpp"
#include "kernels/common/occupancy.cuh"
#include "kernels/internode/common.cuh"
#include "kernels/internode/internode_gin.cuh"
#include "runtime/cuda_check.hpp"

namespace deep_ep::internode {

namespace {

// Warps: senders [0, S), the forwarder S, receivers (S, 16); S = DispatchArgs::num_sender_warps.
constexpr int kSendBarrier = 1;

// Whether token t goes to any rank of node n, and the mask of those ranks (bit = local rank).
__device__ __forceinline__ uint32_t node_mask(const bool* is_token_in_rank, int R, int Rn, int t, int n) {
  const bool* row = is_token_in_rank + static_cast<int64_t>(t) * R + n * Rn;
  uint32_t mask = 0;
  for (int lr = 0; lr < Rn; ++lr) mask |= static_cast<uint32_t>(row[lr]) << lr;
  return mask;
}

// Rows of channel c in a [*, C] inclusive prefix row.
__device__ __forceinline__ int channel_count(const int* prefix_row, int c) {
  return prefix_row[c] - (c > 0 ? prefix_row[c - 1] : 0);
}

// Idle-time bookkeeping of a polling loop: true once `timeout_ns` passed without progress (or another
// thread reported an error), checked every kPollsPerSlowCheck polls.
struct IdleClock {
  uint64_t since = device::global_timer_ns();
  int polls = 0;
  __device__ __forceinline__ void progressed() { since = device::global_timer_ns(); }
  __device__ __forceinline__ bool expired(const Peers& p) {
    if (++polls % device::kPollsPerSlowCheck != 0) return false;
    return device::error_reported(p.diagnostics) ||
           device::global_timer_ns() - since > static_cast<uint64_t>(p.timeout_ns);
  }
};

template <typename Transport>
__device__ void send(const Ctx<Transport>& ctx, const DispatchArgs& a, const RowLayout& rl, int c) {
  const Layout& l = ctx.l;
  const int R = ctx.p.num_ranks, N = l.num_nodes, Rn = l.num_ranks_per_node, cap = l.capacity;
  const int warp = threadIdx.x / 32, lane = device::lane_id();
  const int kNumSenderWarps = a.num_sender_warps;
  __shared__ int sent[kMaxInternodeNodes];       // stream positions written per destination node
  __shared__ int round_end[kMaxInternodeNodes];  // ... once the current round is written
  __shared__ int send_failed;
  int begin, end;
  device::channel_range(c, l.num_channels, a.num_tokens, begin, end);

  // Stream positions: the rank of each token among the channel's tokens for node n (as the combine's
  // home rank reads them back). Computed once, kept in the handle.
  if (!a.cached) {
    for (int n = warp; n < N; n += kNumSenderWarps) {
      int running = 0;
      for (int t0 = begin; t0 < end; t0 += 32) {
        const int t = t0 + lane;
        const bool mine = t < end && node_mask(a.is_token_in_rank, R, Rn, t, n) != 0;
        const uint32_t ballot = __ballot_sync(0xffffffffu, mine);
        if (t < end) a.send_rdma_head[static_cast<int64_t>(t) * N + n] = mine ? running + __popc(ballot & ((1u << lane) - 1)) : -1;
        running += __popc(ballot);
      }
    }
    __threadfence_block();
  }
  if (warp == 0) {
    for (int n = lane; n < N; n += 32) sent[n] = 0;
    if (lane == 0) send_failed = 0;
  }
  device::named_barrier(kSendBarrier, kNumSenderWarps * 32);

  const Transport& net = ctx.net;
  for (int t0 = begin; t0 < end; t0 += a.send_chunk) {
    const int t1 = min(end, t0 + a.send_chunk);
    // Warp 0, lane n: the positions this round writes for node n, and the credit they need: position
    // i overwrites the slot of position i - cap, which every rank of node n must have scanned.
    if (warp == 0) {
      for (int n = lane; n < N; n += 32) {
        int need = sent[n];
        for (int t = t0; t < t1; ++t) {
          const int head = a.send_rdma_head[static_cast<int64_t>(t) * N + n];
          if (head >= 0) need = head + 1;
        }
        round_end[n] = need;
        if (need - cap > 0) {
          uint64_t observed = 0;
          // dispatch_credit(n, c): adds of forwarder (n, my local), acquired here before the overwrite.
          if (!net.wait_signal(l.signal_dispatch_credit(n, c), static_cast<uint64_t>(need - cap), ctx.p.timeout_ns,
                               &ctx.p.diagnostics->claimed, &observed)) {
            device::report(ctx.p.diagnostics, Phase::kInternodeDispatchSend, true, ctx.p.rank, ctx.rank_of(n, ctx.local),
                           c, -1, need - cap, static_cast<long long>(observed));
            send_failed = 1;
          }
        }
      }
    }
    device::named_barrier(kSendBarrier, kNumSenderWarps * 32);
    if (send_failed) return;

    // A row for node n lands in forwarder (n, my local index), ring (my node, c).
    for (int t = t0 + warp; t < t1; t += kNumSenderWarps) {
      const int64_t* topk = a.topk_idx ? a.topk_idx + static_cast<int64_t>(t) * a.num_topk : nullptr;
      for (int n = 0; n < N; ++n) {
        const int head = a.send_rdma_head[static_cast<int64_t>(t) * N + n];
        if (head < 0) continue;
        const int64_t slot = l.slot(ctx.node, c, head);
        char* dst;
        if (n == ctx.node) {
          dst = ctx.row(ctx.p.rank, slot);
        } else if (char* direct = net.direct_ptr(ctx.rank_of(n, ctx.local), l.rows_offset + slot * l.row_stride)) {
          dst = direct;
        } else {
          dst = ctx.send_row(l.slot(n, c, head));
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
    // In-place and direct stores count as puts once fenced and ordered before the signalling warp by
    // the barrier; staged rows are a put's source, written before the barrier.
    __threadfence_system();
    device::named_barrier(kSendBarrier, kNumSenderWarps * 32);

    // dispatch(my node, c) on forwarder (n, my local): one add per round with the round's rows, after them.
    if (warp == 0) {
      for (int n = 0; n < N; ++n) {
        const int first = sent[n], count = round_end[n] - first;
        if (count == 0) continue;
        const int forwarder = ctx.rank_of(n, ctx.local);
        if (n == ctx.node || net.direct_ptr(forwarder, l.rows_offset) != nullptr) {
          net.signal_add(forwarder, l.signal_dispatch(ctx.node, c), static_cast<uint64_t>(count));
        } else {
          // Staged at the same ring slots: one put per contiguous run (the ring may wrap once).
          const int64_t first_slot = l.slot(ctx.node, c, first) - l.slot(ctx.node, c, 0);
          const int head_run = static_cast<int>(min(static_cast<int64_t>(count), cap - first_slot));
          const int64_t dst = l.rows_offset + l.slot(ctx.node, c, first) * l.row_stride;
          const int64_t src = l.send_rows_offset + l.slot(n, c, first) * l.row_stride;
          if (head_run < count) {
            net.put(forwarder, dst, src, static_cast<int64_t>(head_run) * l.row_stride);
            net.put_with_signal(forwarder, l.rows_offset + l.slot(ctx.node, c, 0) * l.row_stride,
                                l.send_rows_offset + l.slot(n, c, 0) * l.row_stride,
                                static_cast<int64_t>(count - head_run) * l.row_stride, l.signal_dispatch(ctx.node, c),
                                static_cast<uint64_t>(count));
          } else {
            net.put_with_signal(forwarder, dst, src, static_cast<int64_t>(count) * l.row_stride,
                                l.signal_dispatch(ctx.node, c), static_cast<uint64_t>(count));
          }
        }
        if (lane == 0) sent[n] = round_end[n];
        __syncwarp();
      }
    }
  }

  // Every credit of the op is in once each node's ranks scanned every row: then nobody adds to the
  // credit signals any more and they are reset for the next op.
  if (warp == 0) {
    for (int n = lane; n < N; n += 32) {
      uint64_t observed = 0;
      if (sent[n] > 0 && !net.wait_signal(l.signal_dispatch_credit(n, c), static_cast<uint64_t>(sent[n]),
                                          ctx.p.timeout_ns, &ctx.p.diagnostics->claimed, &observed)) {
        device::report(ctx.p.diagnostics, Phase::kInternodeDispatchSend, true, ctx.p.rank, ctx.rank_of(n, ctx.local), c,
                       -1, sent[n], static_cast<long long>(observed));
        continue;
      }
      net.reset_signal(l.signal_dispatch_credit(n, c));
    }
  }
}

template <typename Transport>
__device__ void forward(const Ctx<Transport>& ctx, const DispatchArgs& a, const RowLayout& rl, int epoch, int c) {
  const Layout& l = ctx.l;
  const int N = l.num_nodes, Rn = l.num_ranks_per_node, C = l.num_channels;
  const int lane = device::lane_id();
  const Transport& net = ctx.net;
  // Per (source node, local rank): the next position in that rank's combine ring stream (c, my local).
  __shared__ int nvl_position[kMaxInternodeNodes][32];

  // send_nvl_head: for each received row and each rank j of the node, the position of j's row in j's
  // combine ring (c, my local index), whose stream is j's rows from sources (0, me), (1, me), ... in
  // channel c (from j's published prefixes, written by notify, which ended with epoch == this op's).
  if (!a.cached && lane < Rn) {
    const int j = ctx.rank_of(ctx.node, lane);
    int base = 0;
    const bool ok = ctx.wait_flag(ctx.flag(j, l.flag_published()), epoch, Phase::kInternodeDispatchForward, j, c);
    const int* channel_prefix = ctx.published(j);
    for (int n = 0; n < N; ++n) {
      nvl_position[n][lane] = base;
      const int* p = channel_prefix + ctx.rank_of(n, ctx.local) * C;
      if (ok) base += __ldcg(p + c) - (c > 0 ? __ldcg(p + c - 1) : 0);
    }
  }
  __syncwarp();

  // Lane n keeps node n's ring (n, c): rows expected, arrived, recorded in send_nvl_head, credited.
  const int n = lane;
  const int total = n < N ? channel_count(a.recv_rdma_channel_prefix_matrix + n * C, c) : 0;
  const int row_base = n < N ? (n > 0 ? a.recv_rdma_rank_prefix_sum[n - 1] : 0) +
                                   (c > 0 ? a.recv_rdma_channel_prefix_matrix[n * C + c - 1] : 0)
                             : 0;
  int arrived = 0, recorded = 0, credited = 0;
  bool reset = n >= N;
  if (!a.cached && n < N && row_base + total > a.num_rdma_rows) {
    // num_worst_tokens bounded send_nvl_head below the rows this forwarder receives: those rows get none.
    device::report(ctx.p.diagnostics, Phase::kInternodeTooManyRows, false, ctx.p.rank, ctx.rank_of(n, ctx.local), c, -1,
                   a.num_rdma_rows, row_base + total);
  }
  IdleClock clock;
  while (!__all_sync(0xffffffffu, reset)) {
    bool progressed = false;
    // Arrivals: dispatch(n, c) counts rows of ring (n, c) that have landed here; relayed to the node.
    if (n < N && arrived < total) {
      const int now = static_cast<int>(min(static_cast<uint64_t>(total), net.read_signal(l.signal_dispatch(n, c))));
      if (now > arrived) {
        arrived = now;
        device::st_release_sys(ctx.flag(ctx.p.rank, l.flag_rows_ready(n, c)), tagged(epoch, arrived));
        progressed = true;
      }
    }
    // send_nvl_head of the rows that arrived since the last pass, node by node with the whole warp.
    if (!a.cached) {
      for (int m = 0; m < N; ++m) {
        const int from = __shfl_sync(0xffffffffu, recorded, m), to = __shfl_sync(0xffffffffu, arrived, m);
        const int base_m = __shfl_sync(0xffffffffu, row_base, m);
        for (int i0 = from; i0 < to; i0 += 32) {
          const int i = i0 + lane;
          const uint32_t mask =
              i < to ? __ldcg(reinterpret_cast<const uint32_t*>(ctx.row(ctx.p.rank, l.slot(m, c, i)) + rl.mask_offset)) : 0u;
          for (int lr = 0; lr < Rn; ++lr) {
            const bool hit = (mask >> lr) & 1u;
            const uint32_t ballot = __ballot_sync(0xffffffffu, hit);
            const int position = nvl_position[m][lr];
            const int64_t row = static_cast<int64_t>(base_m) + i;
            if (i < to && row < a.num_rdma_rows)
              a.send_nvl_head[row * Rn + lr] = hit ? position + __popc(ballot & ((1u << lane) - 1)) : -1;
            __syncwarp();
            if (lane == 0) nvl_position[m][lr] = position + __popc(ballot);
            __syncwarp();
          }
        }
        if (lane == m) recorded = to;
      }
    } else {
      recorded = arrived;
    }
    // Credits: positions every rank of the node has scanned, and this warp has recorded.
    int consumable = 0;
    if (n < N) {
      consumable = recorded;
      for (int lr = 0; lr < Rn; ++lr)
        consumable = min(consumable, count_of(device::ld_acquire_sys(ctx.flag(ctx.p.rank, l.flag_rows_scanned(n, c, lr))), epoch));
    }
    for (int m = 0; m < N; ++m) {
      const int delta = __shfl_sync(0xffffffffu, consumable - credited, m);
      if (delta <= 0) continue;
      // dispatch_credit(my node, c) on source (m, my local): the scans above were acquired by this warp.
      net.signal_add(ctx.rank_of(m, ctx.local), l.signal_dispatch_credit(ctx.node, c), static_cast<uint64_t>(delta));
      if (lane == m) credited += delta;
      progressed = true;
    }
    // Every row of ring (n, c) arrived: no add to dispatch(n, c) can follow this op's last.
    if (!reset && arrived == total && credited == total) {
      net.reset_signal(l.signal_dispatch(n, c));
      reset = true;
    }
    if (progressed) {
      clock.progressed();
    } else if (clock.expired(ctx.p)) {
      if (!reset) {
        const bool waits_rows = arrived < total;
        device::report(ctx.p.diagnostics, Phase::kInternodeDispatchForward, true, ctx.p.rank, ctx.rank_of(n, ctx.local),
                       c, -1, total, waits_rows ? arrived : consumable);
      }
      return;
    }
  }
}

template <typename Transport>
__device__ void receive(const Ctx<Transport>& ctx, const DispatchArgs& a, const RowLayout& rl, int epoch, int c) {
  const Layout& l = ctx.l;
  const int C = l.num_channels, Rn = l.num_ranks_per_node, R = ctx.p.num_ranks;
  const int kNumReceiverWarps = kNumThreads / 32 - a.num_sender_warps - 1;
  const int rw = threadIdx.x / 32 - a.num_sender_warps - 1, lane = device::lane_id();
  const int L = a.num_experts > 0 ? a.num_experts / R : 0;
  const int first_expert = ctx.p.rank * L;
  // Per source rank (owned by warp s % kNumReceiverWarps): positions scanned, rows found.
  __shared__ int scanned[kMaxInternodeRanks], found[kMaxInternodeRanks];
  for (int s = rw; s < R; s += kNumReceiverWarps) {
    const int expected = channel_count(a.recv_gbl_channel_prefix_matrix + s * C, c);
    if (lane == 0) {
      scanned[s] = 0;
      found[s] = 0;
      // A source with nothing for this rank holds nothing back in its ring.
      if (expected == 0)
        device::st_release_sys(ctx.flag(ctx.rank_of(ctx.node, s % Rn), l.flag_rows_scanned(s / Rn, c, ctx.local)),
                               tagged(epoch, kScanDone));
    }
  }
  __syncwarp();
  IdleClock clock;
  for (;;) {
    bool pending = false, progressed = false;
    for (int s = rw; s < R; s += kNumReceiverWarps) {
      const int* prefix = a.recv_gbl_channel_prefix_matrix + s * C;
      const int expected = channel_count(prefix, c);
      int got = found[s];
      if (got >= expected) continue;
      pending = true;
      const int n = s / Rn;
      const int forwarder = ctx.rank_of(ctx.node, s % Rn);
      int64_t ready_value = 0;
      if (lane == 0) ready_value = device::ld_acquire_sys(ctx.flag(forwarder, l.flag_rows_ready(n, c)));
      const int ready = count_of(__shfl_sync(0xffffffffu, ready_value, 0), epoch);
      int position = scanned[s];
      if (ready <= position) continue;
      const int base = (s > 0 ? a.recv_gbl_rank_prefix_sum[s - 1] : 0) + (c > 0 ? prefix[c - 1] : 0);
      for (; position < ready && got < expected; position += 32) {
        const int i = position + lane;
        const char* lane_row = ctx.row(forwarder, l.slot(n, c, i));
        const bool hit = i < ready && ((__ldcg(reinterpret_cast<const uint32_t*>(lane_row + rl.mask_offset)) >> ctx.local) & 1u);
        uint32_t ballot = __ballot_sync(0xffffffffu, hit);
        while (ballot != 0 && got < expected) {
          const int src_lane = __ffs(ballot) - 1;
          ballot &= ballot - 1;
          const int src_position = position + src_lane;
          const char* src = ctx.row(forwarder, l.slot(n, c, src_position));
          const int64_t row = base + got;
          ++got;
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
            a.recv_src_meta[row * 2 + 1] = src_position;
          }
        }
      }
      position = min(position, ready);
      // rows_scanned(n, c, my local) on the forwarder: after this warp's reads of the scanned slots
      // (the __syncwarp orders every lane's loads before lane 0's release).
      __syncwarp();
      if (lane == 0) {
        scanned[s] = position;
        found[s] = got;
        device::st_release_sys(ctx.flag(forwarder, l.flag_rows_scanned(n, c, ctx.local)),
                               tagged(epoch, got >= expected ? kScanDone : position));
      }
      __syncwarp();
      progressed = true;
    }
    if (!pending) return;
    if (progressed) {
      clock.progressed();
    } else if (clock.expired(ctx.p)) {
      // Name the first source still short of rows.
      for (int s = rw; s < R; s += kNumReceiverWarps) {
        const int expected = channel_count(a.recv_gbl_channel_prefix_matrix + s * C, c);
        if (found[s] < expected) {
          if (lane == 0)
            device::report(ctx.p.diagnostics, Phase::kInternodeDispatchRecv, true, ctx.p.rank, s, c, -1, expected, found[s]);
          break;
        }
      }
      return;
    }
  }
}

// Kernel name: V1's (profiles and users' kernel-name filters read it).
template <typename Transport>
__global__ void __launch_bounds__(kNumThreads, 1) dispatch(Peers peers, Layout layout, const __grid_constant__ Transport net,
                                                           DispatchArgs args) {
  const Ctx<Transport> ctx(peers, layout, net);
  const int epoch = begin_op(ctx);
  const RowLayout rl = RowLayout::make(args.row_bytes, args.num_scales, args.num_topk);
  const int c = blockIdx.x;
  const int warp = threadIdx.x / 32;
  if (warp < args.num_sender_warps) {
    send(ctx, args, rl, c);
  } else if (warp == args.num_sender_warps) {
    forward(ctx, args, rl, epoch, c);
  } else {
    receive(ctx, args, rl, epoch, c);
  }
  end_op(ctx);
}

template <typename Transport>
void launch(const Peers& peers, const Layout& layout, const Transport& net, const DispatchArgs& args,
            cudaStream_t stream) {
  dispatch<Transport><<<layout.num_channels, kNumThreads, 0, stream>>>(peers, layout, net, args);
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
  const int dispatch_blocks = device::resident_blocks_per_sm<dispatch<transport::P2pTransport>>(kNumThreads);
  const int combine_blocks = max_resident_combine_blocks_per_sm();
  return dispatch_blocks < combine_blocks ? dispatch_blocks : combine_blocks;
}

}  // namespace deep_ep::internode
