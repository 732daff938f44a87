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
#include "util/cuda_check.hpp"

namespace deep_ep::internode {

namespace {

constexpr int kNumWarps = kNumThreads / 32;

template <typename Transport>
__device__ void send_counts(const Ctx<Transport>& ctx, const NotifyArgs& args, int epoch, int dest_node) {
  const Layout& layout = ctx.layout;
  const int num_ranks = ctx.peers.num_ranks, num_ranks_per_node = layout.num_ranks_per_node;
  const int num_channels = layout.num_channels;
  const int warp = threadIdx.x / 32, lane = device::lane_id();
  const bool to_self = dest_node == ctx.node;
  int* meta = to_self ? ctx.meta(ctx.peers.rank, ctx.node) : ctx.meta_send(dest_node);
  for (int channel = warp; channel < num_channels; channel += kNumWarps) {
    int begin, end;
    device::channel_range(channel, num_channels, args.num_tokens, begin, end);
    int node_count = 0;
    int rank_count[32];
    for (int local_rank = 0; local_rank < num_ranks_per_node; ++local_rank) rank_count[local_rank] = 0;
    for (int token = begin + lane; token < end; token += 32) {
      const bool* row =
          args.is_token_in_rank + static_cast<int64_t>(token) * num_ranks + dest_node * num_ranks_per_node;
      bool any = false;
      for (int local_rank = 0; local_rank < num_ranks_per_node; ++local_rank) {
        rank_count[local_rank] += row[local_rank];
        any |= row[local_rank];
      }
      node_count += any;
    }
    node_count = __reduce_add_sync(0xffffffffu, node_count);
    if (lane == 0) meta[layout.meta_node_count(channel)] = node_count;
    for (int local_rank = 0; local_rank < num_ranks_per_node; ++local_rank) {
      const int count = __reduce_add_sync(0xffffffffu, rank_count[local_rank]);
      if (lane == 0) meta[layout.meta_rank_count(local_rank, channel)] = count;
    }
  }
  const int num_local_experts = args.num_experts / num_ranks;
  for (int i = threadIdx.x; i < num_ranks_per_node * num_local_experts; i += blockDim.x) {
    const int local_rank = i / num_local_experts, local_expert = i % num_local_experts;
    meta[layout.meta_expert_count(local_rank, local_expert)] =
        args.num_tokens_per_expert[(dest_node * num_ranks_per_node + local_rank) * num_local_experts + local_expert];
  }
  if (threadIdx.x == 0) meta[0] = args.num_tokens;
  // Node-mates read the record after the flag below (own node); the forwarder of node dest_node after
  // the put's signal (the fence also orders these stores before the NIC reads them).
  __threadfence_system();
  __syncthreads();

  // The send-side handle rows of node dest_node: inclusive prefixes over channels.
  if (warp == 0) {
    int carry = 0;
    for (int first_channel = 0; first_channel < num_channels; first_channel += 32) {
      const int channel = first_channel + lane;
      const int count = channel < num_channels ? meta[layout.meta_node_count(channel)] : 0;
      const int inclusive = warp_inclusive_scan(count) + carry;
      if (channel < num_channels) args.rdma_channel_prefix_matrix[dest_node * num_channels + channel] = inclusive;
      carry = __shfl_sync(0xffffffffu, inclusive, 31);
    }
  }
  for (int local_rank = warp - 1; warp > 0 && local_rank < num_ranks_per_node; local_rank += kNumWarps - 1) {
    int carry = 0;
    for (int first_channel = 0; first_channel < num_channels; first_channel += 32) {
      const int channel = first_channel + lane;
      const int count = channel < num_channels ? meta[layout.meta_rank_count(local_rank, channel)] : 0;
      const int inclusive = warp_inclusive_scan(count) + carry;
      if (channel < num_channels)
        args.gbl_channel_prefix_matrix[(dest_node * num_ranks_per_node + local_rank) * num_channels + channel] =
            inclusive;
      carry = __shfl_sync(0xffffffffu, inclusive, 31);
    }
  }

  if (warp == 0) {
    if (to_self) {
      if (lane == 0)
        device::st_release_sys(ctx.flag(ctx.peers.rank, layout.flag_meta_ready(ctx.node)), int64_t(epoch) + 1);
    } else {
      // Another node: staged in meta_send (written by every warp before the barrier above) and put.
      // signal_meta(my node) on the forwarder: one add per op, after the record's bytes.
      ctx.net.put_with_signal(ctx.rank_of(dest_node, ctx.local),
                              layout.meta_offset + int64_t(ctx.node) * layout.meta_bytes(),
                              layout.meta_send_offset + int64_t(dest_node) * layout.meta_bytes(), layout.meta_bytes(),
                              layout.signal_meta(ctx.node), 1);
    }
  }
}

template <typename Transport>
__device__ void receive_counts(const Ctx<Transport>& ctx, const NotifyArgs& args, int epoch) {
  const Layout& layout = ctx.layout;
  const int num_ranks = ctx.peers.num_ranks, num_nodes = layout.num_nodes, num_channels = layout.num_channels;
  const int warp = threadIdx.x / 32, lane = device::lane_id();
  const int num_local_experts = args.num_experts / num_ranks;
  __shared__ int total_from[kMaxInternodeRanks];
  __shared__ int expert_count[kMaxLocalExperts];
  __shared__ int node_total[kMaxInternodeNodes];
  for (int i = threadIdx.x; i < num_local_experts; i += blockDim.x) expert_count[i] = 0;

  // Relay: records from other nodes arrive as transport signals; node-mates poll flags.
  for (int node = threadIdx.x; node < num_nodes; node += blockDim.x) {
    if (node == ctx.node) continue;
    if (ctx.wait_signal_once(layout.signal_meta(node), Phase::kInternodeNotify, ctx.rank_of(node, ctx.local), -1))
      device::st_release_sys(ctx.flag(ctx.peers.rank, layout.flag_meta_ready(node)), int64_t(epoch) + 1);
  }
  __syncthreads();

  // Source rank (source_node, local_rank) reaches this node through forwarder (my node, local_rank): its
  // record is there, slot source_node.
  for (int source = warp; source < num_ranks; source += kNumWarps) {
    const int source_node = source / layout.num_ranks_per_node, local_rank = source % layout.num_ranks_per_node;
    const int forwarder = ctx.rank_of(ctx.node, local_rank);
    bool ok = true;
    if (lane == 0)
      ok = ctx.wait_flag(ctx.flag(forwarder, layout.flag_meta_ready(source_node)), int64_t(epoch) + 1,
                         Phase::kInternodeNotify, source, -1);
    ok = __shfl_sync(0xffffffffu, ok, 0);
    const int* meta = ctx.meta(forwarder, source_node);
    int carry = 0;
    for (int first_channel = 0; first_channel < num_channels; first_channel += 32) {
      const int channel = first_channel + lane;
      const int count = (ok && channel < num_channels) ? __ldcg(meta + layout.meta_rank_count(ctx.local, channel)) : 0;
      const int inclusive = warp_inclusive_scan(count) + carry;
      if (channel < num_channels) args.recv_gbl_channel_prefix_matrix[source * num_channels + channel] = inclusive;
      carry = __shfl_sync(0xffffffffu, inclusive, 31);
    }
    if (lane == 0) total_from[source] = carry;
    if (ok)
      for (int local_expert = lane; local_expert < num_local_experts; local_expert += 32)
        atomicAdd(&expert_count[local_expert], __ldcg(meta + layout.meta_expert_count(ctx.local, local_expert)));
  }
  // As forwarder: rows this rank receives from each source node, per channel.
  for (int node = warp; node < num_nodes; node += kNumWarps) {
    bool ok = true;
    if (lane == 0)
      ok = ctx.wait_flag(ctx.flag(ctx.peers.rank, layout.flag_meta_ready(node)), int64_t(epoch) + 1,
                         Phase::kInternodeNotify, ctx.rank_of(node, ctx.local), -1);
    ok = __shfl_sync(0xffffffffu, ok, 0);
    const int* meta = ctx.meta(ctx.peers.rank, node);
    int carry = 0;
    for (int first_channel = 0; first_channel < num_channels; first_channel += 32) {
      const int channel = first_channel + lane;
      const int count = (ok && channel < num_channels) ? __ldcg(meta + layout.meta_node_count(channel)) : 0;
      const int inclusive = warp_inclusive_scan(count) + carry;
      if (channel < num_channels) args.recv_rdma_channel_prefix_matrix[node * num_channels + channel] = inclusive;
      carry = __shfl_sync(0xffffffffu, inclusive, 31);
    }
    if (lane == 0) node_total[node] = carry;
  }
  __syncthreads();

  int* published = ctx.own_published();
  if (threadIdx.x == 0) {
    int sum = 0;
    for (int source = 0; source < num_ranks; ++source) {
      sum += total_from[source];
      args.recv_gbl_rank_prefix_sum[source] = sum;
    }
    int node_sum = 0;
    for (int node = 0; node < num_nodes; ++node) {
      node_sum += node_total[node];
      args.recv_rdma_rank_prefix_sum[node] = node_sum;
    }
    *args.host.num_recv_tokens = sum;
    *args.host.num_rdma_recv_tokens = node_sum;
  }
  // The forwarders of this node build send_nvl_head from the published copy.
  for (int i = threadIdx.x; i < num_ranks * num_channels; i += blockDim.x)
    published[i] = args.recv_gbl_channel_prefix_matrix[i];
  for (int local_expert = threadIdx.x; local_expert < num_local_experts; local_expert += blockDim.x) {
    const int aligned =
        (expert_count[local_expert] + args.expert_alignment - 1) / args.expert_alignment * args.expert_alignment;
    args.host.num_recv_tokens_per_expert[local_expert] = aligned;
  }
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x == 0) {
    device::st_release_sys(ctx.flag(ctx.peers.rank, layout.flag_published()), int64_t(epoch) + 1);
    *args.host.ready = args.host.epoch;
    __threadfence_system();
  }
}

// Kernel names are V1's (profiles and users' kernel-name filters read them): notify_dispatch for a
// non-cached dispatch, cached_notify before a cached dispatch or a combine.
template <typename Transport>
__global__ void __launch_bounds__(kNumThreads, 1)
    notify_dispatch(Peers peers, Layout layout, const __grid_constant__ Transport net, NotifyArgs args) {
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
__global__ void __launch_bounds__(32, 1)
    cached_notify(Peers peers, Layout layout, const __grid_constant__ Transport net) {
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
void launch_notify(const Peers& peers, const Layout& layout, const NotifyArgs& args, const transport::GinTransport& gin,
                   cudaStream_t stream) {
  launch(peers, layout, gin, args, stream);
}

void launch_cached_notify(const Peers& peers, const Layout& layout, const transport::GinTransport& gin,
                          cudaStream_t stream) {
  launch_barrier(peers, layout, gin, stream);
}
#endif

}  // namespace deep_ep::internode
