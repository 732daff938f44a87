// Internode notify: the count exchange of a non-cached dispatch.
// Blocks 0..N-1 (one per destination node n): count, per channel, this rank's tokens for node n and
// for each rank of it; write them with the per-expert counts of node n's ranks into a meta record and
// put it to the forwarder (n, my local index); also write this rank's send-side prefix matrices.
// Block N: relay the meta records arriving from other nodes to this node (flags), then read the records
// of every source rank from the forwarders of this node and derive the receive-side prefixes, the
// per-expert counts and the received count for the host.
#include "deep_ep/error.hpp"
#include "kernels/internode/common.cuh"
#include "kernels/internode/internode_gin.cuh"
#include "runtime/cuda_check.hpp"

namespace deep_ep::internode {

namespace {

constexpr int kNumWarps = kNumThreads / 32;

template <typename Transport>
__device__ void send_counts(const Ctx<Transport>& ctx, const NotifyArgs& a, int epoch, int dest_node) {
  const Layout& l = ctx.l;
  const int R = ctx.p.num_ranks, Rn = l.num_ranks_per_node, C = l.num_channels;
  const int warp = threadIdx.x / 32, lane = device::lane_id();
  const bool to_self = dest_node == ctx.node;
  int* meta = to_self ? ctx.meta(ctx.p.rank, ctx.node) : ctx.meta_send(dest_node);
  for (int c = warp; c < C; c += kNumWarps) {
    int begin, end;
    device::channel_range(c, C, a.num_tokens, begin, end);
    int node_count = 0;
    int rank_count[32];
    for (int lr = 0; lr < Rn; ++lr) rank_count[lr] = 0;
    for (int t = begin + lane; t < end; t += 32) {
      const bool* row = a.is_token_in_rank + static_cast<int64_t>(t) * R + dest_node * Rn;
      bool any = false;
      for (int lr = 0; lr < Rn; ++lr) {
        rank_count[lr] += row[lr];
        any |= row[lr];
      }
      node_count += any;
    }
    node_count = __reduce_add_sync(0xffffffffu, node_count);
    if (lane == 0) meta[l.meta_node_count(c)] = node_count;
    for (int lr = 0; lr < Rn; ++lr) {
      const int v = __reduce_add_sync(0xffffffffu, rank_count[lr]);
      if (lane == 0) meta[l.meta_rank_count(lr, c)] = v;
    }
  }
  const int L = a.num_experts / R;
  for (int i = threadIdx.x; i < Rn * L; i += blockDim.x) {
    const int lr = i / L, e = i % L;
    meta[l.meta_expert_count(lr, e)] = a.num_tokens_per_expert[(dest_node * Rn + lr) * L + e];
  }
  if (threadIdx.x == 0) meta[0] = a.num_tokens;
  // Node-mates read the record after the flag below (own node); the forwarder of node dest_node after
  // the put's signal (the fence also orders these stores before the NIC reads them).
  __threadfence_system();
  __syncthreads();

  // The send-side handle rows of node dest_node: inclusive prefixes over channels.
  if (warp == 0) {
    int carry = 0;
    for (int c0 = 0; c0 < C; c0 += 32) {
      const int c = c0 + lane;
      const int v = c < C ? meta[l.meta_node_count(c)] : 0;
      const int inclusive = warp_inclusive_scan(v) + carry;
      if (c < C) a.rdma_channel_prefix_matrix[dest_node * C + c] = inclusive;
      carry = __shfl_sync(0xffffffffu, inclusive, 31);
    }
  }
  for (int lr = warp - 1; warp > 0 && lr < Rn; lr += kNumWarps - 1) {
    int carry = 0;
    for (int c0 = 0; c0 < C; c0 += 32) {
      const int c = c0 + lane;
      const int v = c < C ? meta[l.meta_rank_count(lr, c)] : 0;
      const int inclusive = warp_inclusive_scan(v) + carry;
      if (c < C) a.gbl_channel_prefix_matrix[(dest_node * Rn + lr) * C + c] = inclusive;
      carry = __shfl_sync(0xffffffffu, inclusive, 31);
    }
  }

  if (warp == 0) {
    if (to_self) {
      if (lane == 0) device::st_release_sys(ctx.flag(ctx.p.rank, l.flag_meta_ready(ctx.node)), int64_t(epoch) + 1);
    } else {
      // Another node: staged in meta_send (written by every warp before the barrier above) and put.
      // signal_meta(my node) on the forwarder: one add per op, after the record's bytes.
      ctx.net.put_with_signal(ctx.rank_of(dest_node, ctx.local), l.meta_offset + int64_t(ctx.node) * l.meta_bytes(),
                              l.meta_send_offset + int64_t(dest_node) * l.meta_bytes(), l.meta_bytes(),
                              l.signal_meta(ctx.node), 1);
    }
  }
}

template <typename Transport>
__device__ void receive_counts(const Ctx<Transport>& ctx, const NotifyArgs& a, int epoch) {
  const Layout& l = ctx.l;
  const int R = ctx.p.num_ranks, N = l.num_nodes, C = l.num_channels;
  const int warp = threadIdx.x / 32, lane = device::lane_id();
  const int L = a.num_experts / R;
  __shared__ int total_from[kMaxInternodeRanks];
  __shared__ int expert_count[kMaxLocalExperts];
  __shared__ int node_total[kMaxInternodeNodes];
  for (int i = threadIdx.x; i < L; i += blockDim.x) expert_count[i] = 0;

  // Relay: records from other nodes arrive as transport signals; node-mates poll flags.
  for (int n = threadIdx.x; n < N; n += blockDim.x) {
    if (n == ctx.node) continue;
    if (ctx.wait_signal_once(l.signal_meta(n), Phase::kInternodeNotify, ctx.rank_of(n, ctx.local), -1))
      device::st_release_sys(ctx.flag(ctx.p.rank, l.flag_meta_ready(n)), int64_t(epoch) + 1);
  }
  __syncthreads();

  // Source s = (n, lr) reaches this node through forwarder (my node, lr): its record is there, slot n.
  for (int s = warp; s < R; s += kNumWarps) {
    const int n = s / l.num_ranks_per_node, lr = s % l.num_ranks_per_node;
    const int forwarder = ctx.rank_of(ctx.node, lr);
    bool ok = true;
    if (lane == 0) ok = ctx.wait_flag(ctx.flag(forwarder, l.flag_meta_ready(n)), int64_t(epoch) + 1,
                                      Phase::kInternodeNotify, s, -1);
    ok = __shfl_sync(0xffffffffu, ok, 0);
    const int* meta = ctx.meta(forwarder, n);
    int carry = 0;
    for (int c0 = 0; c0 < C; c0 += 32) {
      const int c = c0 + lane;
      const int v = (ok && c < C) ? __ldcg(meta + l.meta_rank_count(ctx.local, c)) : 0;
      const int inclusive = warp_inclusive_scan(v) + carry;
      if (c < C) a.recv_gbl_channel_prefix_matrix[s * C + c] = inclusive;
      carry = __shfl_sync(0xffffffffu, inclusive, 31);
    }
    if (lane == 0) total_from[s] = carry;
    if (ok)
      for (int e = lane; e < L; e += 32) atomicAdd(&expert_count[e], __ldcg(meta + l.meta_expert_count(ctx.local, e)));
  }
  // As forwarder: rows this rank receives from each source node, per channel.
  for (int n = warp; n < N; n += kNumWarps) {
    bool ok = true;
    if (lane == 0) ok = ctx.wait_flag(ctx.flag(ctx.p.rank, l.flag_meta_ready(n)), int64_t(epoch) + 1,
                                      Phase::kInternodeNotify, ctx.rank_of(n, ctx.local), -1);
    ok = __shfl_sync(0xffffffffu, ok, 0);
    const int* meta = ctx.meta(ctx.p.rank, n);
    int carry = 0;
    for (int c0 = 0; c0 < C; c0 += 32) {
      const int c = c0 + lane;
      const int v = (ok && c < C) ? __ldcg(meta + l.meta_node_count(c)) : 0;
      const int inclusive = warp_inclusive_scan(v) + carry;
      if (c < C) a.recv_rdma_channel_prefix_matrix[n * C + c] = inclusive;
      carry = __shfl_sync(0xffffffffu, inclusive, 31);
    }
    if (lane == 0) node_total[n] = carry;
  }
  __syncthreads();

  int* published = ctx.own_published();
  if (threadIdx.x == 0) {
    int sum = 0;
    for (int s = 0; s < R; ++s) {
      sum += total_from[s];
      a.recv_gbl_rank_prefix_sum[s] = sum;
    }
    int node_sum = 0;
    for (int n = 0; n < N; ++n) {
      node_sum += node_total[n];
      a.recv_rdma_rank_prefix_sum[n] = node_sum;
    }
    *a.host.num_recv_tokens = sum;
    *a.host.num_rdma_recv_tokens = node_sum;
  }
  // The forwarders of this node build send_nvl_head from the published copy.
  for (int i = threadIdx.x; i < R * C; i += blockDim.x) published[i] = a.recv_gbl_channel_prefix_matrix[i];
  for (int e = threadIdx.x; e < L; e += blockDim.x) {
    const int aligned = (expert_count[e] + a.expert_alignment - 1) / a.expert_alignment * a.expert_alignment;
    a.host.num_recv_tokens_per_expert[e] = aligned;
  }
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x == 0) {
    device::st_release_sys(ctx.flag(ctx.p.rank, l.flag_published()), int64_t(epoch) + 1);
    *a.host.ready = a.host.epoch;
    __threadfence_system();
  }
}

// Kernel names are V1's (profiles and users' kernel-name filters read them): notify_dispatch for a
// non-cached dispatch, cached_notify before a cached dispatch or a combine.
template <typename Transport>
__global__ void __launch_bounds__(kNumThreads, 1) notify_dispatch(Peers peers, Layout layout,
                                                                  const __grid_constant__ Transport net,
                                                                  NotifyArgs args) {
  const Ctx<Transport> ctx(peers, layout, net);
  const int epoch = begin_op(ctx);
  if (static_cast<int>(blockIdx.x) < layout.num_nodes) {
    send_counts(ctx, args, epoch, blockIdx.x);
  } else {
    receive_counts(ctx, args, epoch);
  }
  end_op(ctx);
}

template <typename Transport>
void launch(const Peers& peers, const Layout& layout, const Transport& net, const NotifyArgs& args,
            cudaStream_t stream) {
  DEEP_EP_CHECK(layout.num_ranks_per_node <= 32 && layout.num_nodes <= kMaxInternodeNodes &&
                    peers.num_ranks <= kMaxInternodeRanks,
                "internode notify supports at most 32 ranks per node, ", kMaxInternodeNodes, " nodes and ",
                kMaxInternodeRanks, " ranks");
  notify_dispatch<Transport><<<layout.num_nodes + 1, kNumThreads, 0, stream>>>(peers, layout, net, args);
  DEEP_EP_CUDA_CHECK(cudaGetLastError());
}

// The start barrier alone: waits until every rank has finished the previous op. It counts no op (the
// main kernel after it does), so the main kernel's own begin_op then finds the barrier passed at once.
template <typename Transport>
__global__ void __launch_bounds__(32, 1) cached_notify(Peers peers, Layout layout, const __grid_constant__ Transport net) {
  const Ctx<Transport> ctx(peers, layout, net);
  begin_op(ctx);
}

template <typename Transport>
void launch_barrier(const Peers& peers, const Layout& layout, const Transport& net, cudaStream_t stream) {
  cached_notify<Transport><<<1, 32, 0, stream>>>(peers, layout, net);
  DEEP_EP_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

// The transports notify is built for.
void launch_notify(const Peers& peers, const Layout& layout, const NotifyArgs& args, cudaStream_t stream) {
  launch(peers, layout, p2p_transport(peers, layout), args, stream);
}

void launch_cached_notify(const Peers& peers, const Layout& layout, cudaStream_t stream) {
  launch_barrier(peers, layout, p2p_transport(peers, layout), stream);
}

#if defined(DEEP_EP_ENABLE_GIN) && DEEP_EP_ENABLE_GIN
void launch_notify(const Peers& peers, const Layout& layout, const NotifyArgs& args,
                   const transport::GinTransport& gin, cudaStream_t stream) {
  launch(peers, layout, gin, args, stream);
}

void launch_cached_notify(const Peers& peers, const Layout& layout, const transport::GinTransport& gin,
                          cudaStream_t stream) {
  launch_barrier(peers, layout, gin, stream);
}
#endif

}  // namespace deep_ep::internode
