// Internode dispatch. Block c owns channel c (a contiguous range of this rank's tokens) and runs three
// warp roles side by side, so that a call streams any number of tokens through bounded rings:
//   senders    write the channel's tokens, a round of send_chunk tokens at a time, once per destination
//              node into the ring (my node, c) of the forwarder there (the rank with this rank's local
//              index): in place for the own node, through the transport's direct pointer where it maps
//              the forwarder's window (P2P), else into this rank's send_rows followed by puts; a round
//              first waits until the forwarder has credited the ring slots it overwrites, and ends with
//              one signal per node carrying the round's row count. With own_node_push, a row for the own
//              node goes straight into recv_x of each of its ranks the token goes to (rows as the
//              receivers number them), and the own ring carries only its metadata;
//   forwarder  (one warp) relays each source node's arrivals to its node (rows_ready flags), records
//              in send_nvl_head (non-cached) where each row sits in the combine streams of the node's
//              ranks, and credits each source the positions every rank of the node has scanned;
//   receivers  for every source rank, scan the ring of the forwarder of this node that carries it,
//              copy the rows whose mask names this rank into the outputs at the positions the prefix
//              matrices give (only their metadata where the sender pushed the payload), and publish how
//              far they have scanned (rows_scanned).
// Senders wait only for credits, which depend only on arrivals being scanned; receivers and the
// forwarder wait only for arrivals. So every ring drains whatever its size.
#include "deep_ep/error.hpp"
#include "kernels/common/import_resolve.cuh"
#include "kernels/common/occupancy.cuh"
#include "kernels/common/role_timer.cuh"
#include "kernels/internode/common.cuh"
#include "kernels/internode/internode_gin.cuh"
#include "util/cuda_check.hpp"

namespace deep_ep::internode {

namespace {

// Warps: senders [0, S), the forwarder S, receivers (S, 16); S = DispatchArgs::num_sender_warps.
constexpr int kSendBarrier = 1;
// Tokens per sender round at most (send_chunk above it is split): the own-node push keeps a round's rows in shared
// memory.
constexpr int kMaxRoundTokens = 128;
// 16-byte words per lane a sender loads before storing them: a row takes ceil(row words / (32 x this)) dependent
// load round trips (a 7 KB FP8 row one, a 14 KB BF16 row two).
constexpr int kSendRoundWords = 16;
// (token, node) routes a sender round keeps in shared memory: a round has at most kRouteEntries / num_nodes tokens.
constexpr int kRouteEntries = 1024;

// Where a token goes for one destination node: its stream position there (or -1), and the node's ranks it is for.
struct Route {
  int head;
  uint32_t mask;
};

// Whether `token` goes to any rank of `node`, and the mask of those ranks (bit = local rank).
__device__ __forceinline__ uint32_t node_mask(const bool* is_token_in_rank, int num_ranks, int num_ranks_per_node,
                                              int token, int node) {
  const bool* row = is_token_in_rank + static_cast<int64_t>(token) * num_ranks + node * num_ranks_per_node;
  uint32_t mask = 0;
  for (int local_rank = 0; local_rank < num_ranks_per_node; ++local_rank)
    mask |= static_cast<uint32_t>(row[local_rank]) << local_rank;
  return mask;
}

// Own-node push, block 0, thread t < ranks per node: tells local rank t where this rank's recv_x is and at which
// of its rows t's tokens start (recv_gbl_rank_prefix_sum: rows from lower ranks). The record is stored before the
// release of node_outputs_ready, which t's senders acquire.
template <typename Transport>
__device__ void publish_outputs(const Ctx<Transport>& ctx, const DispatchArgs& args, int epoch, int t) {
  const int peer = ctx.rank_of(ctx.node, t);
  if (peer == ctx.peers.rank) return;  // the own senders read args
  ControlRegion* control = reinterpret_cast<ControlRegion*>(ctx.peers.bases[peer]);
  control->node_recv_x[ctx.local] = args.own_recv_x;
  control->node_num_rows[ctx.local] = args.num_rows;
  control->node_first_row[ctx.local] = peer > 0 ? args.recv_gbl_rank_prefix_sum[peer - 1] : 0;
  device::st_release_sys(&control->node_outputs_ready[ctx.local], static_cast<int64_t>(epoch) + 1);
}

// Own-node push: where each rank of this node keeps this channel's rows from this rank.
struct NodeOutputs {
  uint8_t* x[kNumMaxNvlPeers];     // recv_x as mapped here, or null (no rows)
  int num_rows[kNumMaxNvlPeers];   // rows allocated there: a row past them is dropped (the owner reports it)
  int first_row[kNumMaxNvlPeers];  // row of this channel's first token there
};

// Lane l of one warp: local rank l's outputs, after its publication for this op (bounded wait). False on a
// timeout or a mapping that did not come (reported).
template <typename Transport>
__device__ bool resolve_node_outputs(const Ctx<Transport>& ctx, const DispatchArgs& args, int epoch, int channel, int l,
                                     NodeOutputs& out) {
  const int dest = ctx.rank_of(ctx.node, l);
  uint8_t* x = args.recv_x;
  int num_rows = args.num_rows;
  int first_row = ctx.peers.rank > 0 ? args.recv_gbl_rank_prefix_sum[ctx.peers.rank - 1] : 0;
  bool ok = true;
  if (dest != ctx.peers.rank) {
    ControlRegion* control = ctx.control();
    ok = ctx.wait_flag(&control->node_outputs_ready[l], static_cast<int64_t>(epoch) + 1,
                       Phase::kInternodeDispatchOutputs, dest, channel);
    // Rank `dest` wrote them: read at L2 after the acquire above.
    num_rows = __ldcg(&control->node_num_rows[l]);
    first_row = __ldcg(&control->node_first_row[l]);
    x = reinterpret_cast<uint8_t*>(const_cast<char*>(device::resolve_published(
        device::load_published_ref(&control->node_recv_x[l]), args.imports, args.resolved_bases, l,
        ctx.peers.timeout_ns, ctx.peers.diagnostics, Phase::kPushDispatchMap, ctx.peers.rank, dest, channel, ok)));
  }
  out.x[l] = x;
  out.num_rows[l] = ok && x != nullptr ? num_rows : 0;
  // This rank's earlier channels to `dest`: the sender side of dest's recv_gbl_channel_prefix_matrix.
  out.first_row[l] =
      first_row + (channel > 0 ? args.gbl_channel_prefix_matrix[dest * ctx.layout.num_channels + channel - 1] : 0);
  return ok;
}

template <typename Transport>
__device__ void send(const Ctx<Transport>& ctx, const DispatchArgs& args, const RowLayout& row_layout, int epoch,
                     int channel) {
  const Layout& layout = ctx.layout;
  const int num_ranks = ctx.peers.num_ranks, num_nodes = layout.num_nodes;
  const int num_ranks_per_node = layout.num_ranks_per_node, ring_capacity = layout.capacity;
  const int warp = threadIdx.x / 32, lane = device::lane_id();
  const int kNumSenderWarps = args.num_sender_warps;
  __shared__ int sent[kMaxInternodeNodes];        // stream positions written per destination node
  __shared__ int round_sent[kMaxInternodeNodes];  // ... once the current round is written
  __shared__ int send_failed;
  __shared__ NodeOutputs node_outputs;
  // Own-node push: row of each token of the current round at each local rank, or -1 (written by the last sender
  // warp before the round's first barrier, read by every sender warp before its second).
  __shared__ int round_rows[kMaxRoundTokens][kNumMaxNvlPeers];
  // The current round's routes, [token - round_begin][node] (written by every sender warp at the round's start,
  // read after its first barrier).
  __shared__ Route round_routes[kRouteEntries];
  const bool own_node_push = args.own_node_push;
  const int round_tokens = min(min(args.send_chunk, kMaxRoundTokens), kRouteEntries / num_nodes);
  int begin, end;
  device::channel_range(channel, layout.num_channels, args.num_tokens, begin, end);

  // Stream positions: the rank of each token among the channel's tokens for `node` (as the combine's
  // home rank reads them back). Computed once, kept in the handle.
  if (!args.cached) {
    for (int node = warp; node < num_nodes; node += kNumSenderWarps) {
      int running = 0;
      for (int batch_begin = begin; batch_begin < end; batch_begin += 32) {
        const int token = batch_begin + lane;
        const bool mine =
            token < end && node_mask(args.is_token_in_rank, num_ranks, num_ranks_per_node, token, node) != 0;
        const uint32_t ballot = __ballot_sync(0xffffffffu, mine);
        if (token < end)
          args.send_rdma_head[static_cast<int64_t>(token) * num_nodes + node] =
              mine ? running + __popc(ballot & ((1u << lane) - 1)) : -1;
        running += __popc(ballot);
      }
    }
    __threadfence_block();
  }
  if (warp == 0) {
    for (int node = lane; node < num_nodes; node += 32) sent[node] = 0;
    if (lane == 0) send_failed = 0;
  }
  device::named_barrier(kSendBarrier, kNumSenderWarps * 32);
  // The last sender warp resolves the node's outputs and keeps each round's rows there.
  const int table_warp = kNumSenderWarps - 1;
  if (own_node_push) {
    if (warp == table_warp && lane < num_ranks_per_node &&
        !resolve_node_outputs(ctx, args, epoch, channel, lane, node_outputs))
      send_failed = 1;
    device::named_barrier(kSendBarrier, kNumSenderWarps * 32);
    if (send_failed) return;
  }
  // Own-node push, table warp, lane l: rows this channel has given local rank l so far.
  int own_sent = 0;

  const Transport& net = ctx.net;
  // Buckets: 0 loading the round's routes and waiting for credits (warp 0; the others at the barrier), 1 copying
  // rows, 2 fencing and signalling.
  device::RoleTimer timer;
  timer.begin();
  for (int round_begin = begin; round_begin < end; round_begin += round_tokens) {
    const int round_end = min(end, round_begin + round_tokens);
    // The round's routes, loaded by all sender threads at once: one memory round trip per round, where a warp
    // walking its tokens would wait for one per token (a sender is bound by such waits, not by bandwidth).
    const int num_routes = (round_end - round_begin) * num_nodes;
    for (int r = threadIdx.x; r < num_routes; r += kNumSenderWarps * 32) {
      const int token = round_begin + r / num_nodes, node = r % num_nodes;
      round_routes[r] = {args.send_rdma_head[static_cast<int64_t>(round_begin) * num_nodes + r],
                         node_mask(args.is_token_in_rank, num_ranks, num_ranks_per_node, token, node)};
    }
    device::named_barrier(kSendBarrier, kNumSenderWarps * 32);
    const auto route_of = [&](int token, int node) -> const Route& {
      return round_routes[(token - round_begin) * num_nodes + node];
    };
    // The round's rows at each local rank, as its receivers number them: after the rows of earlier tokens.
    if (own_node_push && warp == table_warp) {
      for (int first = round_begin; first < round_end; first += 32) {
        const int token = first + lane;
        const uint32_t mask = token < round_end ? route_of(token, ctx.node).mask : 0u;
        for (int l = 0; l < num_ranks_per_node; ++l) {
          const bool hit = (mask >> l) & 1u;
          const uint32_t ballot = __ballot_sync(0xffffffffu, hit);
          const int sent_before = __shfl_sync(0xffffffffu, own_sent, l);
          if (token < round_end)
            round_rows[token - round_begin][l] =
                hit ? node_outputs.first_row[l] + sent_before + __popc(ballot & ((1u << lane) - 1)) : -1;
          if (lane == l) own_sent += __popc(ballot);
        }
      }
    }
    // Warp 0, lane `node`: the positions this round writes for `node`, and the credit they need: position
    // i overwrites the slot of position i - ring_capacity, which every rank of `node` must have scanned.
    if (warp == 0) {
      for (int node = lane; node < num_nodes; node += 32) {
        int need = sent[node];
        for (int token = round_begin; token < round_end; ++token) {
          const int head = route_of(token, node).head;
          if (head >= 0) need = head + 1;
        }
        round_sent[node] = need;
        if (need - ring_capacity > 0) {
          uint64_t observed = 0;
          // dispatch_credit(node, channel): adds of forwarder (node, my local), acquired here before the
          // overwrite.
          if (!net.wait_signal(layout.signal_dispatch_credit(node, channel),
                               static_cast<uint64_t>(need - ring_capacity), ctx.peers.timeout_ns,
                               &ctx.peers.diagnostics->abort_waits, &observed)) {
            device::report(ctx.peers.diagnostics, Phase::kInternodeDispatchSend, true, ctx.peers.rank,
                           ctx.rank_of(node, ctx.local), channel, -1, need - ring_capacity,
                           static_cast<long long>(observed));
            send_failed = 1;
          }
        }
      }
    }
    device::named_barrier(kSendBarrier, kNumSenderWarps * 32);
    timer.lap(0);
    if (send_failed) return;

    // A row for `node` lands in forwarder (node, my local index), ring (my node, channel). The token's row is
    // loaded once, in predicated rounds of kSendRoundWords words per lane, and each round is
    // stored to every node the token goes to; lane n finds node n's destination and writes its metadata.
    for (int token = round_begin + warp; token < round_end; token += kNumSenderWarps) {
      const int64_t* topk = args.topk_idx ? args.topk_idx + static_cast<int64_t>(token) * args.num_topk : nullptr;
      // The token's first 64 scales and 32 top-k slots, loaded before its row (their round trips overlap the row's)
      // and stored after it.
      const int64_t scale_base = token * args.scale_token_stride;
      float scale_lo = 0.0f, scale_hi = 0.0f, weight = 0.0f;
      int expert = -1;
      if (lane < args.num_scales) scale_lo = args.x_scales[scale_base + lane * args.scale_channel_stride];
      if (lane + 32 < args.num_scales) scale_hi = args.x_scales[scale_base + (lane + 32) * args.scale_channel_stride];
      if (topk && lane < args.num_topk) {
        expert = static_cast<int>(topk[lane]);
        weight = args.topk_weights[static_cast<int64_t>(token) * args.num_topk + lane];
      }
      char* node_dst = nullptr;  // lane n < num_nodes: node n's destination row, or null
      if (lane < num_nodes) {
        const int head = route_of(token, lane).head;
        if (head >= 0) {
          const int64_t slot = layout.slot(ctx.node, channel, head);
          if (lane == ctx.node) {
            node_dst = ctx.row(ctx.peers.rank, slot);
          } else if (char* direct =
                         net.direct_ptr(ctx.rank_of(lane, ctx.local), layout.rows_offset + slot * layout.row_stride)) {
            node_dst = direct;
          } else {
            node_dst = ctx.send_row(layout.slot(lane, channel, head));
          }
        }
      }
      const unsigned dst_lanes = __ballot_sync(0xffffffffu, node_dst != nullptr);
      if (dst_lanes == 0) continue;  // a token routed to no rank: nothing to read
      // Own-node push: lane l < ranks per node holds local rank l's output row of the token, or -1; the own
      // node's ring slot then takes only the metadata below.
      // (A row index, not a pointer: the stores below rebuild the address from shared memory, sparing registers.)
      int out_row = -1;
      if (own_node_push && lane < num_ranks_per_node) {
        out_row = round_rows[token - round_begin][lane];
        if (out_row >= node_outputs.num_rows[lane]) out_row = -1;
      }
      const unsigned out_lanes = __ballot_sync(0xffffffffu, out_row >= 0);
      const unsigned ring_lanes = own_node_push ? dst_lanes & ~(1u << ctx.node) : dst_lanes;
      const auto dst_of = [&](int node) {
        return reinterpret_cast<char*>(__shfl_sync(0xffffffffu, reinterpret_cast<unsigned long long>(node_dst), node));
      };
      const auto out_of = [&](int l) {
        return reinterpret_cast<int4*>(node_outputs.x[l] +
                                       static_cast<int64_t>(__shfl_sync(0xffffffffu, out_row, l)) * args.row_bytes);
      };
      const int4* row = reinterpret_cast<const int4*>(args.x + static_cast<int64_t>(token) * args.row_bytes);
      const int row_int4 = static_cast<int>(args.row_bytes / 16);
      // The bound is the same for every lane (the stores shuffle destinations); each word's predicate stays its own.
      for (int round = 0; round < row_int4; round += 32 * kSendRoundWords) {
        const int base = round + lane;
        int4 v[kSendRoundWords];
#pragma unroll
        for (int u = 0; u < kSendRoundWords; ++u)
          if (base + 32 * u < row_int4) v[u] = device::ld_input(row + base + 32 * u);
        // Ring rows stay in L2 for the receivers that read them back soon; output rows are written once.
        for (unsigned pending = ring_lanes; pending != 0; pending &= pending - 1) {
          int4* dst = reinterpret_cast<int4*>(dst_of(__ffs(pending) - 1));
#pragma unroll
          for (int u = 0; u < kSendRoundWords; ++u)
            if (base + 32 * u < row_int4) dst[base + 32 * u] = v[u];
        }
        for (unsigned pending = out_lanes; pending != 0; pending &= pending - 1) {
          int4* dst = out_of(__ffs(pending) - 1);
#pragma unroll
          for (int u = 0; u < kSendRoundWords; ++u)
            if (base + 32 * u < row_int4) device::st_output_stream(dst + base + 32 * u, v[u]);
        }
      }
      for (unsigned pending = dst_lanes; pending != 0; pending &= pending - 1) {
        char* dst = dst_of(__ffs(pending) - 1);
        float* scales = reinterpret_cast<float*>(dst + row_layout.scales_offset);
        if (lane < args.num_scales) scales[lane] = scale_lo;
        if (lane + 32 < args.num_scales) scales[lane + 32] = scale_hi;
        for (int k = lane + 64; k < args.num_scales; k += 32)
          scales[k] = args.x_scales[scale_base + k * args.scale_channel_stride];
        int* topk_dst = reinterpret_cast<int*>(dst + row_layout.topk_idx_offset);
        float* weights_dst = reinterpret_cast<float*>(dst + row_layout.topk_weights_offset);
        if (topk && lane < args.num_topk) {
          topk_dst[lane] = expert;
          weights_dst[lane] = weight;
        }
        for (int k = lane + 32; topk && k < args.num_topk; k += 32) {
          topk_dst[k] = static_cast<int>(topk[k]);
          weights_dst[k] = args.topk_weights[static_cast<int64_t>(token) * args.num_topk + k];
        }
      }
      if (node_dst != nullptr) {
        *reinterpret_cast<int*>(node_dst + row_layout.src_token_offset) = token;
        *reinterpret_cast<uint32_t*>(node_dst + row_layout.mask_offset) = route_of(token, lane).mask;
      }
    }
    timer.lap(1);
    // In-place and direct stores count as puts once ordered before the signalling warp by the barrier
    // (its fence and release are cumulative: transport.cuh); staged rows are a put's source, written
    // before the barrier. One fence per round in the signalling warp, not one per sender thread. The own-node
    // pushed rows ride on the own node's signal: the forwarder relays it with a release, and a receiver copies
    // the rows' metadata only after acquiring that, so it ends only after the rows are in its recv_x.
    device::named_barrier(kSendBarrier, kNumSenderWarps * 32);

    // dispatch(my node, channel) on forwarder (node, my local): one add per round with the round's rows,
    // after them.
    if (warp == 0) {
      for (int node = 0; node < num_nodes; ++node) {
        const int first = sent[node], count = round_sent[node] - first;
        if (count == 0) continue;
        const int forwarder = ctx.rank_of(node, ctx.local);
        if (node == ctx.node || net.direct_ptr(forwarder, layout.rows_offset) != nullptr) {
          net.signal_add(forwarder, layout.signal_dispatch(ctx.node, channel), static_cast<uint64_t>(count));
        } else {
          // Staged at the same ring slots.
          put_ring_range(ctx, forwarder, node, channel, first, count, layout.signal_dispatch(ctx.node, channel));
        }
        if (lane == 0) sent[node] = round_sent[node];
        __syncwarp();
      }
    }
    timer.lap(2);
  }
  timer.report(args.num_scales > 0 ? "dispatch-fp8" : "dispatch", "sender", ctx.peers.rank, num_ranks_per_node, 0);

  // Every credit of the op is in once each node's ranks scanned every row: then nobody adds to the
  // credit signals any more and they are reset for the next op.
  if (warp == 0) {
    for (int node = lane; node < num_nodes; node += 32) {
      uint64_t observed = 0;
      if (sent[node] > 0 &&
          !net.wait_signal(layout.signal_dispatch_credit(node, channel), static_cast<uint64_t>(sent[node]),
                           ctx.peers.timeout_ns, &ctx.peers.diagnostics->abort_waits, &observed)) {
        device::report(ctx.peers.diagnostics, Phase::kInternodeDispatchSend, true, ctx.peers.rank,
                       ctx.rank_of(node, ctx.local), channel, -1, sent[node], static_cast<long long>(observed));
        continue;
      }
      net.reset_signal(layout.signal_dispatch_credit(node, channel));
    }
  }
}

template <typename Transport>
__device__ void forward(const Ctx<Transport>& ctx, const DispatchArgs& args, const RowLayout& row_layout, int epoch,
                        int channel) {
  const Layout& layout = ctx.layout;
  const int num_nodes = layout.num_nodes, num_ranks_per_node = layout.num_ranks_per_node;
  const int num_channels = layout.num_channels;
  const int lane = device::lane_id();
  const Transport& net = ctx.net;
  // Per (source node, local rank): the next position in that rank's combine ring stream (channel, my
  // local).
  __shared__ int nvl_position[kMaxInternodeNodes][32];

  // send_nvl_head: for each received row and each rank j of the node, the position of j's row in j's
  // combine ring (channel, my local index), whose stream is j's rows from sources (0, my local),
  // (1, my local), ... in `channel` (from j's published prefixes, written by notify, which ended with
  // epoch == this op's).
  if (!args.cached && lane < num_ranks_per_node) {
    const int j = ctx.rank_of(ctx.node, lane);
    int base = 0;
    const bool ok =
        ctx.wait_flag(ctx.flag(j, layout.flag_published()), epoch, Phase::kInternodeDispatchForward, j, channel);
    const int* channel_prefix = ctx.published(j);
    for (int node = 0; node < num_nodes; ++node) {
      nvl_position[node][lane] = base;
      const int* prefix_row = channel_prefix + ctx.rank_of(node, ctx.local) * num_channels;
      if (ok) base += __ldcg(prefix_row + channel) - (channel > 0 ? __ldcg(prefix_row + channel - 1) : 0);
    }
  }
  __syncwarp();

  // Lane `node` keeps that node's ring (node, channel): rows expected, arrived, recorded in send_nvl_head,
  // credited.
  const int node = lane;
  const int total =
      node < num_nodes ? channel_count(args.recv_rdma_channel_prefix_matrix + node * num_channels, channel) : 0;
  const int row_base =
      node < num_nodes ? (node > 0 ? args.recv_rdma_rank_prefix_sum[node - 1] : 0) +
                             (channel > 0 ? args.recv_rdma_channel_prefix_matrix[node * num_channels + channel - 1] : 0)
                       : 0;
  int arrived = 0, recorded = 0, credited = 0;
  bool reset = node >= num_nodes;
  if (!args.cached && node < num_nodes && row_base + total > args.num_rdma_rows) {
    // num_worst_tokens bounded send_nvl_head below the rows this forwarder receives: those rows get none.
    device::report(ctx.peers.diagnostics, Phase::kInternodeTooManyRows, false, ctx.peers.rank,
                   ctx.rank_of(node, ctx.local), channel, -1, args.num_rdma_rows, row_base + total);
  }
  IdleClock clock;
  while (!__all_sync(0xffffffffu, reset)) {
    bool progressed = false;
    // Arrivals: dispatch(node, channel) counts rows of ring (node, channel) that have landed here; relayed
    // to the node.
    if (node < num_nodes && arrived < total) {
      const int now =
          static_cast<int>(min(static_cast<uint64_t>(total), net.read_signal(layout.signal_dispatch(node, channel))));
      if (now > arrived) {
        arrived = now;
        device::st_release_sys(ctx.flag(ctx.peers.rank, layout.flag_rows_ready(node, channel)), tagged(epoch, arrived));
        progressed = true;
      }
    }
    // send_nvl_head of the rows that arrived since the last pass, node by node with the whole warp. Lane n's
    // signal read (acquire) is ordered before the other lanes' reads of node n's rows by the __syncwarp.
    __syncwarp();
    if (!args.cached) {
      for (int source_node = 0; source_node < num_nodes; ++source_node) {
        const int from = __shfl_sync(0xffffffffu, recorded, source_node);
        const int to = __shfl_sync(0xffffffffu, arrived, source_node);
        const int source_row_base = __shfl_sync(0xffffffffu, row_base, source_node);
        for (int i0 = from; i0 < to; i0 += 32) {
          const int i = i0 + lane;
          const uint32_t mask =
              i < to ? __ldcg(reinterpret_cast<const uint32_t*>(
                           ctx.row(ctx.peers.rank, layout.slot(source_node, channel, i)) + row_layout.mask_offset))
                     : 0u;
          for (int local_rank = 0; local_rank < num_ranks_per_node; ++local_rank) {
            const bool hit = (mask >> local_rank) & 1u;
            const uint32_t ballot = __ballot_sync(0xffffffffu, hit);
            const int position = nvl_position[source_node][local_rank];
            const int64_t row = static_cast<int64_t>(source_row_base) + i;
            if (i < to && row < args.num_rdma_rows)
              args.send_nvl_head[row * num_ranks_per_node + local_rank] =
                  hit ? position + __popc(ballot & ((1u << lane) - 1)) : -1;
            __syncwarp();
            if (lane == 0) nvl_position[source_node][local_rank] = position + __popc(ballot);
            __syncwarp();
          }
        }
        if (lane == source_node) recorded = to;
      }
    } else {
      recorded = arrived;
    }
    // Credits: positions every rank of the node has scanned, and this warp has recorded.
    int consumable = 0;
    if (node < num_nodes) {
      consumable = recorded;
      for (int local_rank = 0; local_rank < num_ranks_per_node; ++local_rank)
        consumable = min(consumable, count_of(device::ld_acquire_sys(ctx.flag(
                                                  ctx.peers.rank, layout.flag_rows_scanned(node, channel, local_rank))),
                                              epoch));
    }
    for (int source_node = 0; source_node < num_nodes; ++source_node) {
      const int delta = __shfl_sync(0xffffffffu, consumable - credited, source_node);
      if (delta <= 0) continue;
      // dispatch_credit(my node, channel) on source (source_node, my local): the scans above were acquired
      // by this warp.
      net.signal_add(ctx.rank_of(source_node, ctx.local), layout.signal_dispatch_credit(ctx.node, channel),
                     static_cast<uint64_t>(delta));
      if (lane == source_node) credited += delta;
      progressed = true;
    }
    // Every row of ring (node, channel) arrived: no add to dispatch(node, channel) can follow this op's
    // last.
    if (!reset && arrived == total && credited == total) {
      net.reset_signal(layout.signal_dispatch(node, channel));
      reset = true;
    }
    if (progressed) {
      clock.progressed();
    } else if (clock.expired(ctx.peers)) {
      if (!reset) {
        const bool waits_rows = arrived < total;
        device::report(ctx.peers.diagnostics, Phase::kInternodeDispatchForward, true, ctx.peers.rank,
                       ctx.rank_of(node, ctx.local), channel, -1, total, waits_rows ? arrived : consumable);
      }
      return;
    }
  }
}

template <typename Transport>
__device__ void receive(const Ctx<Transport>& ctx, const DispatchArgs& args, const RowLayout& row_layout, int epoch,
                        int channel) {
  const Layout& layout = ctx.layout;
  const int num_channels = layout.num_channels, num_ranks_per_node = layout.num_ranks_per_node;
  const int num_ranks = ctx.peers.num_ranks;
  const int kNumReceiverWarps = kNumThreads / 32 - args.num_sender_warps - 1;
  const int receive_warp = threadIdx.x / 32 - args.num_sender_warps - 1, lane = device::lane_id();
  const int num_local_experts = args.num_experts > 0 ? args.num_experts / num_ranks : 0;
  const int first_expert = ctx.peers.rank * num_local_experts;
  // Per source rank (owned by warp source % kNumReceiverWarps): positions scanned, rows found.
  __shared__ int scanned[kMaxInternodeRanks], found[kMaxInternodeRanks];
  for (int source = receive_warp; source < num_ranks; source += kNumReceiverWarps) {
    const int expected = channel_count(args.recv_gbl_channel_prefix_matrix + source * num_channels, channel);
    if (lane == 0) {
      scanned[source] = 0;
      found[source] = 0;
      // A source with nothing for this rank holds nothing back in its ring.
      if (expected == 0)
        device::st_release_sys(ctx.flag(ctx.rank_of(ctx.node, source % num_ranks_per_node),
                                        layout.flag_rows_scanned(source / num_ranks_per_node, channel, ctx.local)),
                               tagged(epoch, kScanDone));
    }
  }
  __syncwarp();
  IdleClock clock;
  // Buckets: 0 polling without rows to copy, 1 copying rows and publishing the scan.
  device::RoleTimer timer;
  timer.begin();
  for (;;) {
    timer.lap(0);
    bool pending = false, progressed = false;
    for (int source = receive_warp; source < num_ranks; source += kNumReceiverWarps) {
      const int* prefix = args.recv_gbl_channel_prefix_matrix + source * num_channels;
      const int expected = channel_count(prefix, channel);
      int got = found[source];
      if (got >= expected) continue;
      pending = true;
      const int source_node = source / num_ranks_per_node;
      const int forwarder = ctx.rank_of(ctx.node, source % num_ranks_per_node);
      // The source's sender stored these rows' payload here itself (own-node push): only metadata is copied.
      const bool payload_pushed = args.own_node_push && source_node == ctx.node;
      int64_t ready_value = 0;
      if (lane == 0)
        ready_value = device::ld_acquire_sys(ctx.flag(forwarder, layout.flag_rows_ready(source_node, channel)));
      __syncwarp();  // the other lanes' ring reads below follow lane 0's acquire
      const int ready = count_of(__shfl_sync(0xffffffffu, ready_value, 0), epoch);
      int position = scanned[source];
      if (ready <= position) continue;
      const int base =
          (source > 0 ? args.recv_gbl_rank_prefix_sum[source - 1] : 0) + (channel > 0 ? prefix[channel - 1] : 0);
      for (; position < ready && got < expected; position += 32) {
        const int lane_position = position + lane;
        const char* lane_row = ctx.row(forwarder, layout.slot(source_node, channel, lane_position));
        const bool hit =
            lane_position < ready &&
            ((__ldcg(reinterpret_cast<const uint32_t*>(lane_row + row_layout.mask_offset)) >> ctx.local) & 1u);
        uint32_t ballot = __ballot_sync(0xffffffffu, hit);
        while (ballot != 0 && got < expected) {
          const int src_lane = __ffs(ballot) - 1;
          ballot &= ballot - 1;
          const int src_position = position + src_lane;
          const char* src = ctx.row(forwarder, layout.slot(source_node, channel, src_position));
          const int64_t row = base + got;
          ++got;
          if (row >= args.num_rows) {
            // num_worst_tokens too small: drop the row, say so.
            if (lane == 0)
              device::report(ctx.peers.diagnostics, Phase::kInternodeTooManyRows, false, ctx.peers.rank, source,
                             channel, -1, args.num_rows, row + 1);
            continue;
          }
          // The row's first 64 scales, 32 top-k slots and source token are loaded before it is copied and stored
          // after it (their round trips overlap the row's).
          const float* scales = reinterpret_cast<const float*>(src + row_layout.scales_offset);
          const int* topk = reinterpret_cast<const int*>(src + row_layout.topk_idx_offset);
          const float* weights = reinterpret_cast<const float*>(src + row_layout.topk_weights_offset);
          const bool with_topk = args.num_topk > 0 && args.recv_topk_idx;
          float scale_lo = 0.0f, scale_hi = 0.0f, weight = 0.0f;
          int expert = -1;
          if (lane < args.num_scales) scale_lo = __ldcg(scales + lane);
          if (lane + 32 < args.num_scales) scale_hi = __ldcg(scales + lane + 32);
          if (with_topk && lane < args.num_topk) {
            expert = __ldcg(topk + lane);
            weight = __ldcg(weights + lane);
          }
          const int src_token = lane == 0 ? __ldcg(reinterpret_cast<const int*>(src + row_layout.src_token_offset)) : 0;
          // Streaming stores: the received rows, written once, would otherwise push ring slots out of L2.
          if (!payload_pushed)
            device::warp_copy_in_rounds<8>(reinterpret_cast<int4*>(args.recv_x + row * args.row_bytes),
                                           reinterpret_cast<const int4*>(src), args.row_bytes / 16, lane,
                                           device::ld_queue, device::st_output_stream);
          float* row_scales = args.recv_x_scales + row * args.num_scales;
          if (lane < args.num_scales) row_scales[lane] = scale_lo;
          if (lane + 32 < args.num_scales) row_scales[lane + 32] = scale_hi;
          for (int k = lane + 64; k < args.num_scales; k += 32) row_scales[k] = __ldcg(scales + k);
          if (with_topk) {
            auto store_topk = [&](int k, int slot_expert, float slot_weight) {
              const bool local = slot_expert >= first_expert && slot_expert < first_expert + num_local_experts;
              args.recv_topk_idx[row * args.num_topk + k] = local ? slot_expert - first_expert : -1;
              args.recv_topk_weights[row * args.num_topk + k] = local ? slot_weight : 0.0f;
            };
            if (lane < args.num_topk) store_topk(lane, expert, weight);
            for (int k = lane + 32; k < args.num_topk; k += 32) store_topk(k, __ldcg(topk + k), __ldcg(weights + k));
          }
          if (lane == 0) {
            args.recv_src_meta[row * 2] = src_token;
            args.recv_src_meta[row * 2 + 1] = src_position;
          }
        }
      }
      position = min(position, ready);
      // rows_scanned(source_node, channel, my local) on the forwarder: after this warp's reads of the
      // scanned slots (the __syncwarp orders every lane's loads before lane 0's release).
      __syncwarp();
      if (lane == 0) {
        scanned[source] = position;
        found[source] = got;
        device::st_release_sys(ctx.flag(forwarder, layout.flag_rows_scanned(source_node, channel, ctx.local)),
                               tagged(epoch, got >= expected ? kScanDone : position));
      }
      __syncwarp();
      progressed = true;
      timer.lap(1);
    }
    if (!pending) {
      timer.report(args.num_scales > 0 ? "dispatch-fp8" : "dispatch", "receiver", ctx.peers.rank, num_ranks_per_node,
                   0);
      return;
    }
    if (progressed) {
      clock.progressed();
    } else if (clock.expired(ctx.peers)) {
      // Name the first source still short of rows.
      for (int source = receive_warp; source < num_ranks; source += kNumReceiverWarps) {
        const int expected = channel_count(args.recv_gbl_channel_prefix_matrix + source * num_channels, channel);
        if (found[source] < expected) {
          if (lane == 0)
            device::report(ctx.peers.diagnostics, Phase::kInternodeDispatchRecv, true, ctx.peers.rank, source, channel,
                           -1, expected, found[source]);
          break;
        }
      }
      return;
    }
  }
}

// Kernel name: V1's (profiles and users' kernel-name filters read it).
template <typename Transport>
__global__ void __launch_bounds__(kNumThreads, 1)
    dispatch(Peers peers, Layout layout, const __grid_constant__ Transport net, DispatchArgs args) {
  const Ctx<Transport> ctx(peers, layout, net);
  const int epoch = begin_op(ctx);
  const RowLayout row_layout = RowLayout::make(args.row_bytes, args.num_scales, args.num_topk);
  const int channel = blockIdx.x;
  const int warp = threadIdx.x / 32;
  if (args.own_node_push && blockIdx.x == 0 && threadIdx.x < layout.num_ranks_per_node)
    publish_outputs(ctx, args, epoch, threadIdx.x);
  if (warp < args.num_sender_warps) {
    send(ctx, args, row_layout, epoch, channel);
  } else if (warp == args.num_sender_warps) {
    forward(ctx, args, row_layout, epoch, channel);
  } else {
    receive(ctx, args, row_layout, epoch, channel);
  }
  end_op(ctx);
}

template <typename Transport>
void launch(const Peers& peers, const Layout& layout, const Transport& net, const DispatchArgs& args,
            const LaunchShape& shape, cudaStream_t stream) {
  dispatch<Transport><<<shape.num_blocks, kNumThreads, 0, stream>>>(peers, layout, net, args);
  DEEP_EP_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

// The transports dispatch is built for.
void launch_dispatch(const Peers& peers, const Layout& layout, const DispatchArgs& args, const LaunchShape& shape,
                     cudaStream_t stream) {
  launch(peers, layout, p2p_transport(peers, layout), args, shape, stream);
}

#if defined(DEEP_EP_ENABLE_GIN) && DEEP_EP_ENABLE_GIN
void launch_dispatch(const Peers& peers, const Layout& layout, const DispatchArgs& args,
                     const transport::GinTransport& gin, const LaunchShape& shape, cudaStream_t stream) {
  launch(peers, layout, gin, args, shape, stream);
}
#endif

int max_resident_blocks_per_sm() {
  const int dispatch_blocks = device::resident_blocks_per_sm<dispatch<transport::P2pTransport>>(kNumThreads);
  const int combine_blocks = max_resident_combine_blocks_per_sm();
  return dispatch_blocks < combine_blocks ? dispatch_blocks : combine_blocks;
}

}  // namespace deep_ep::internode
