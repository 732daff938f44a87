// Internode combine, the reverse of dispatch along the same stream positions. Block c of every rank
// runs three warp roles side by side:
//   producers  (CombineArgs::num_producer_warps, each owning the rings of up to 4 local ranks): push this rank's input
//              rows of channel c that forwarder (my node, l) needs into ring (c, l) in this rank's
//              NVLink area, in the order the forwarder sums them: sources (n, l) for n = 0, 1, ...,
//              each in received order;
//   forwarders (CombineArgs::num_forward_warps): for each stream position (source node n, channel c, i) this rank
//   received
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
// producer j's lane 0 with st.release.sys after a __syncwarp that orders every lane's entry stores before
// it (the release is cumulative); ring_head(c, l) on producer j, written by forwarder l with st.release.sys
// after the batch that read the entries (a named barrier).
#include "deep_ep/error.hpp"
#include "kernels/common/bf16.cuh"
#include "kernels/common/import_resolve.cuh"
#include "kernels/common/occupancy.cuh"
#include "kernels/common/role_timer.cuh"
#include "kernels/internode/common.cuh"
#include "kernels/internode/internode_gin.cuh"
#include "util/cuda_check.hpp"

namespace deep_ep::internode {

namespace {

constexpr int kNumWarps = kNumThreads / 32;
constexpr int kMaxRingsPerProducer = kMaxRingsPerProducerWarp;
constexpr int kHomeBarrier = 1;
constexpr int kForwardBarrier = 2;

// Warps: num_producer_warps producers, then num_forward_warps forwarders, home ranks' sums the rest
// (CombineArgs).

using device::add_bf16x8;
using device::pack_bf16x8;

// A ring entry of the in-place form: the row's index in the producer's input, and where that input is in the
// producer's exports (the same for every entry of a call; the forwarder resolves it at the first).
struct InPlaceEntry {
  int64_t row;
  PullInput input;
};
static_assert(sizeof(InPlaceEntry) <= kInPlaceEntryBytes, "an in-place entry must fit kInPlaceEntryBytes");

// Rows [first, first + count) of this rank's input that `source` brought in `channel`.
__device__ __forceinline__ void source_rows(const CombineArgs& args, int source, int channel, int num_channels,
                                            int& first, int& count) {
  const int* prefix = args.recv_gbl_channel_prefix_matrix + source * num_channels;
  const int before = channel > 0 ? prefix[channel - 1] : 0;
  first = (source > 0 ? args.recv_gbl_rank_prefix_sum[source - 1] : 0) + before;
  count = prefix[channel] - before;
}

// Lane-0 helper of an in-place producer: waits until the forwarder `local_rank` of this node has released the
// `pushed` entries of `channel` this rank pushed to it, i.e. finished the sums that read this rank's input rows
// (its ring head is stored st.release.sys after its batch's barrier; this acquire pairs with it). The bound
// counts from the last release seen: a forwarder may stall on remote credits several times on the way. False,
// with the stall reported, when the forwarder stopped releasing.
template <typename Transport>
__device__ bool wait_entries_released(const Ctx<Transport>& ctx, int channel, int local_rank, int pushed, int epoch) {
  const int64_t* head = ctx.flag(ctx.peers.rank, ctx.layout.flag_ring_head(channel, local_rank));
  IdleClock released;
  int seen = count_of(device::ld_acquire_sys(head), epoch);
  while (seen < pushed) {
    const int now = count_of(device::ld_acquire_sys(head), epoch);
    if (now > seen) {
      seen = now;
      released.progressed();
    } else if (released.expired(ctx.peers)) {
      device::report(ctx.peers.diagnostics, Phase::kInternodeCombineStage, true, ctx.peers.rank,
                     ctx.rank_of(ctx.node, local_rank), channel, -1, pushed, seen);
      return false;
    }
  }
  return true;
}

template <typename Transport>
__device__ void produce(const Ctx<Transport>& ctx, const CombineArgs& args, int64_t stride, int epoch, int channel) {
  const Layout& layout = ctx.layout;
  const int num_nodes = layout.num_nodes, num_ranks_per_node = layout.num_ranks_per_node;
  const int num_channels = layout.num_channels, ring_slots = args.ring_slots;
  const int warp = threadIdx.x / 32, lane = device::lane_id();
  const int num_producer_warps = args.num_producer_warps;
  const int row_int4 = args.hidden * 2 / 16;
  // Per owned ring: the source node being pushed, the next row inside its range, rows pushed.
  int node[kMaxRingsPerProducer], offset[kMaxRingsPerProducer], pushed[kMaxRingsPerProducer];
#pragma unroll
  for (int owned = 0; owned < kMaxRingsPerProducer; ++owned) node[owned] = offset[owned] = pushed[owned] = 0;
  IdleClock clock;
  int starved_local_rank = warp;  // the last owned ring found without credits: the one a stall names
  // Buckets: 0 copying rows, 1 reading credits, 2 fencing and publishing.
  device::RoleTimer timer;
  timer.begin();
  for (;;) {
    bool pending = false, progressed = false;
#pragma unroll
    for (int owned = 0; owned < kMaxRingsPerProducer; ++owned) {
      const int local_rank = warp + owned * num_producer_warps;
      if (local_rank >= num_ranks_per_node || node[owned] >= num_nodes) continue;
      pending = true;
      int64_t head_value = 0;
      if (lane == 0)
        head_value = device::ld_acquire_sys(ctx.flag(ctx.peers.rank, layout.flag_ring_head(channel, local_rank)));
      __syncwarp();  // the entry writes below are ordered after lane 0's acquire
      const int free_slots = count_of(__shfl_sync(0xffffffffu, head_value, 0), epoch) + ring_slots - pushed[owned];
      int budget = min(free_slots, args.ring_chunk);
      timer.lap(1);
      if (budget <= 0) {
        starved_local_rank = local_rank;
        continue;
      }
      char* ring = ctx.rings(ctx.peers.rank) +
                   (static_cast<int64_t>(channel) * num_ranks_per_node + local_rank) * ring_slots * stride;
      while (budget > 0 && node[owned] < num_nodes) {
        int first, count;
        source_rows(args, ctx.rank_of(node[owned], local_rank), channel, num_channels, first, count);
        if (offset[owned] >= count) {
          ++node[owned];
          offset[owned] = 0;
          continue;
        }
        const int64_t row = first + offset[owned];
        char* entry = ring + static_cast<int64_t>(pushed[owned] % ring_slots) * stride;
        if (args.in_place) {
          // The forwarder reads the row where it is: the entry carries its index and where the input is.
          if (lane == 0) *reinterpret_cast<InPlaceEntry*>(entry) = InPlaceEntry{row, args.own_input};
        } else {
          // The row's first 32 top-k weights are loaded before it is copied (their round trip overlaps the row's).
          const float* row_weights = args.topk_weights + row * args.num_topk;
          const float weight = lane < args.num_topk ? row_weights[lane] : 0.0f;
          device::warp_copy_in_rounds<8>(reinterpret_cast<int4*>(entry),
                                         reinterpret_cast<const int4*>(args.x + row * args.hidden), row_int4, lane,
                                         device::ld_input);
          float* weights = reinterpret_cast<float*>(entry + args.hidden * 2);
          if (lane < args.num_topk) weights[lane] = weight;
          for (int k = lane + 32; k < args.num_topk; k += 32) weights[k] = row_weights[k];
        }
        ++offset[owned];
        ++pushed[owned];
        --budget;
        progressed = true;
      }
      timer.lap(0);
      // Every lane's entry stores precede lane 0's release through the __syncwarp (a release is cumulative
      // over what its thread observed): no fence per lane.
      __syncwarp();
      if (lane == 0)
        device::st_release_sys(ctx.flag(ctx.rank_of(ctx.node, local_rank), layout.flag_ring_tail(channel, ctx.local)),
                               tagged(epoch, pushed[owned]));
      timer.lap(2);
    }
    if (!pending) {
      // In place, the forwarders read this rank's input itself: the kernel may end only once each has released
      // every entry this rank pushed to it.
      if (args.in_place && lane == 0) {
        for (int owned = 0; owned < kMaxRingsPerProducer; ++owned) {
          const int local_rank = warp + owned * num_producer_warps;
          // No entry pushed: that forwarder reads nothing of this rank here (and may never store a head).
          if (local_rank >= num_ranks_per_node || pushed[owned] == 0) continue;
          if (!wait_entries_released(ctx, channel, local_rank, pushed[owned], epoch)) break;
        }
      }
      __syncwarp();
      timer.report(args.in_place ? "combine" : "combine-pushed", "producer", ctx.peers.rank, num_ranks_per_node, 0);
      return;
    }
    if (progressed) {
      clock.progressed();
    } else if (clock.expired(ctx.peers)) {
      if (lane == 0)
        device::report(ctx.peers.diagnostics, Phase::kInternodeCombineStage, true, ctx.peers.rank,
                       ctx.rank_of(ctx.node, starved_local_rank), channel, -1, 0, 0);
      return;
    }
  }
}

// Per warp: the rows being summed, in summation order (forwarder: entries by local rank, at most 32; home:
// partials by node, at most kMaxInternodeNodes, then up to two biases).
constexpr int kMaxSourcesPerRow = kMaxInternodeNodes + 2;
static_assert(kMaxSourcesPerRow >= 32, "a forwarder sums up to 32 local ranks' entries");
__shared__ const int4* sources_of[kNumWarps][kMaxSourcesPerRow];
// Where each forwarder source's top-k weights are (after the row in a ring entry, or the input's own weights).
__shared__ const float* source_weights_of[kNumWarps][32];

// dst[col] = bf16(the float32 sum over s = 0, 1, ... of sources[s][col]) for every 16-byte column of a row of
// row_int4 columns. A lane keeps kCols columns x kGroup sources of loads in flight: one column per step would
// leave the warp waiting one memory latency per 512 bytes.
// `store` writes each summed column (device::st_output_stream for the combined output, written once).
template <int kCols, int kGroup, typename Store = decltype(&device::st_plain)>
__device__ __forceinline__ void sum_sources(int4* dst, const int4* const* sources, int num_sources, int row_int4,
                                            int lane, Store store = device::st_plain) {
  for (int col0 = lane; col0 < row_int4; col0 += 32 * kCols) {
    float acc[kCols][8];
#pragma unroll
    for (int u = 0; u < kCols; ++u)
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[u][e] = 0.0f;
    for (int s0 = 0; s0 < num_sources; s0 += kGroup) {
      int4 vals[kGroup][kCols];
#pragma unroll
      for (int g = 0; g < kGroup; ++g)
#pragma unroll
        for (int u = 0; u < kCols; ++u)
          if (s0 + g < num_sources && col0 + 32 * u < row_int4) vals[g][u] = __ldcg(sources[s0 + g] + col0 + 32 * u);
#pragma unroll
      for (int g = 0; g < kGroup; ++g)
#pragma unroll
        for (int u = 0; u < kCols; ++u)
          if (s0 + g < num_sources && col0 + 32 * u < row_int4) add_bf16x8(acc[u], vals[g][u]);
    }
#pragma unroll
    for (int u = 0; u < kCols; ++u)
      if (col0 + 32 * u < row_int4) store(dst + col0 + 32 * u, pack_bf16x8(acc[u]));
  }
}

// The float32 sum over s = 0, 1, ... of weights_of(s)[k], in order: the combined top-k weight `k` of a row whose
// sources keep their weights after their hidden values (ring entries, partials) or beside them (in-place inputs).
template <typename WeightsOf>
__device__ __forceinline__ float sum_weights(int num_sources, int k, WeightsOf weights_of) {
  float acc = 0.0f;
  for (int s = 0; s < num_sources; ++s) acc += __ldcg(weights_of(s) + k);
  return acc;
}

// Columns x sources of loads a lane keeps in flight in the sums.
constexpr int kSumCols = 4;
constexpr int kSumGroup = 2;
// Positions a forwarder warp sums per batch: a batch pays the signalling warp's system fence, two barriers,
// the ring-head stores and the signal, whatever its size (about a quarter of a forwarder's time at one position
// per warp). At most half of the smaller ring per batch, so that neither ring can fill with entries of the
// batch that is waiting for them.
constexpr int kMaxPositionsPerWarp = 4;

template <typename Transport>
__device__ void forward(const Ctx<Transport>& ctx, const CombineArgs& args, int64_t stride, int epoch, int channel) {
  const Layout& layout = ctx.layout;
  const int num_nodes = layout.num_nodes, num_ranks_per_node = layout.num_ranks_per_node;
  const int num_channels = layout.num_channels, ring_slots = args.ring_slots, ring_capacity = layout.capacity;
  const int num_producer_warps = args.num_producer_warps, num_forward_warps = args.num_forward_warps;
  const int forward_warp = threadIdx.x / 32 - num_producer_warps, lane = device::lane_id();
  __shared__ const char* ring_of[32];  // ring (channel, my local) of each local rank
  __shared__ int consumed[32];         // per local rank: entries read by the finished batches
  if (forward_warp == 0 && lane < num_ranks_per_node) {
    ring_of[lane] = ctx.rings(ctx.rank_of(ctx.node, lane)) +
                    (static_cast<int64_t>(channel) * num_ranks_per_node + ctx.local) * ring_slots * stride;
    consumed[lane] = 0;
  }
  device::named_barrier(kForwardBarrier, num_forward_warps * 32);
  const int row_int4 = args.hidden * 2 / 16;
  const int positions_per_warp =
      max(1, min(kMaxPositionsPerWarp, min(ring_capacity, ring_slots) / (2 * num_forward_warps)));
  const int batch_width = num_forward_warps * positions_per_warp;
  const Transport& net = ctx.net;
  // In place, lane j's view of local rank j's inputs in this process: this rank's own, or found through the import
  // table at the first entry of rank j that this warp reads (every entry of a call names the same exports).
  const bool own_lane = lane == ctx.local;
  const char* local_x = own_lane ? reinterpret_cast<const char*>(args.x) : nullptr;
  const char* local_weights = own_lane ? reinterpret_cast<const char*>(args.topk_weights) : nullptr;
  // Buckets: 0 waiting for the home rank's credits, 1 waiting for the producers' entries, 2 summing, 3 fencing
  // and signalling.
  device::RoleTimer timer;
  timer.begin();
  // The partial of position (node, channel, i) goes to home rank (node, my local index), ring (my node,
  // channel): written in place for the own node, straight into the home rank's window where the transport
  // maps it, else staged in send_rows at the same slot and put.
  // Whether the forwarders stopped on a failed wait: the same in every forwarder thread, as it only ever comes from
  // a barrier's OR, so that all of them leave the loops at the same barrier.
  bool aborted = false;
  for (int node = 0; node < num_nodes; ++node) {
    const int* prefix = args.recv_rdma_channel_prefix_matrix + node * num_channels;
    const int count = channel_count(prefix, channel);
    const int64_t row_base =
        (node > 0 ? args.recv_rdma_rank_prefix_sum[node - 1] : 0) + (channel > 0 ? prefix[channel - 1] : 0);
    const int home_rank = ctx.rank_of(node, ctx.local);
    const bool staged = node != ctx.node && net.direct_ptr(home_rank, layout.rows_offset) == nullptr;
    for (int batch_begin = 0; batch_begin < count; batch_begin += batch_width) {
      const int batch = min(batch_width, count - batch_begin);
      // combine_credit(node, channel): adds of home rank (node, my local); position i overwrites position
      // i - ring_capacity.
      bool credit_failed = false;
      if (forward_warp == 0 && lane == 0 && batch_begin + batch - ring_capacity > 0) {
        uint64_t observed = 0;
        if (!net.wait_signal(layout.signal_combine_credit(node, channel),
                             static_cast<uint64_t>(batch_begin + batch - ring_capacity), ctx.peers.timeout_ns,
                             &ctx.peers.diagnostics->abort_waits, &observed)) {
          device::report(ctx.peers.diagnostics, Phase::kInternodeCombineSend, true, ctx.peers.rank, home_rank, channel,
                         -1, batch_begin + batch - ring_capacity, static_cast<long long>(observed));
          credit_failed = true;
        }
      }
      aborted = device::named_barrier_or(kForwardBarrier, num_forward_warps * 32, credit_failed);
      timer.lap(0);
      if (aborted) break;
      bool entries_failed = false;  // warp-uniform
      // Warp w sums positions batch_begin + w, + num_forward_warps, ...: each warp's positions in stream order.
      for (int p = 0; p < positions_per_warp; ++p) {
        const int i = batch_begin + p * num_forward_warps + forward_warp;
        if (i >= count) break;
        const int64_t nvl_row = row_base + i;
        __syncwarp();
        const int position = lane < num_ranks_per_node && nvl_row < args.num_rdma_rows
                                 ? args.send_nvl_head[nvl_row * num_ranks_per_node + lane]
                                 : -1;
        // Lane j waits until local rank j has pushed this entry.
        bool ok = true;
        if (position >= 0) {
          const int64_t* tail = ctx.flag(ctx.peers.rank, layout.flag_ring_tail(channel, lane));
          const uint64_t start = device::global_timer_ns();
          for (int polls = 1; count_of(device::ld_acquire_sys(tail), epoch) <= position; ++polls) {
            device::poll_pause();
            if (polls % device::kPollsPerSlowCheck == 0 &&
                (device::error_reported(ctx.peers.diagnostics) ||
                 device::global_timer_ns() - start > static_cast<uint64_t>(ctx.peers.timeout_ns))) {
              device::report(ctx.peers.diagnostics, Phase::kInternodeCombineStage, true, ctx.peers.rank,
                             ctx.rank_of(ctx.node, lane), channel, -1, position + 1,
                             count_of(device::ld_acquire_sys(tail), epoch));
              ok = false;
              break;
            }
          }
          atomicMax(&consumed[lane], position + 1);
        }
        // In place: the entry (read after the tail's acquire above, by the same lane) names the row, and at the
        // first entry of a peer, where its inputs are.
        int64_t in_place_row = 0;
        if (ok && position >= 0 && args.in_place) {
          const InPlaceEntry* entry = reinterpret_cast<const InPlaceEntry*>(
              ring_of[lane] + static_cast<int64_t>(position % ring_slots) * stride);
          in_place_row = __ldcg(&entry->row);
          if (local_x == nullptr) {
            const int peer = ctx.rank_of(ctx.node, lane);
            bool resolved = true;
            local_x = device::resolve_published(device::load_published_ref(&entry->input.x), args.imports,
                                                args.resolved_bases, lane, ctx.peers.timeout_ns, ctx.peers.diagnostics,
                                                Phase::kInternodeCombineMap, ctx.peers.rank, peer, channel, resolved);
            if (args.num_topk > 0)
              local_weights =
                  device::resolve_published(device::load_published_ref(&entry->input.topk_weights), args.imports,
                                            args.resolved_bases, lane, ctx.peers.timeout_ns, ctx.peers.diagnostics,
                                            Phase::kInternodeCombineMap, ctx.peers.rank, peer, channel, resolved);
            ok = resolved && local_x != nullptr && (args.num_topk == 0 || local_weights != nullptr);
          }
        }
        const bool all_ok = __all_sync(0xffffffffu, ok);
        timer.lap(1);
        if (!all_ok) {
          entries_failed = true;
          break;  // this warp's later positions wait on the same producers
        } else {
          // The entries, compacted in local-rank order (the reference's order of additions).
          const unsigned present = __ballot_sync(0xffffffffu, position >= 0);
          const int4** sources = sources_of[threadIdx.x / 32];
          const float** source_weights = source_weights_of[threadIdx.x / 32];
          if (position >= 0) {
            const int index = __popc(present & ((1u << lane) - 1u));
            const char* entry = ring_of[lane] + static_cast<int64_t>(position % ring_slots) * stride;
            if (args.in_place) {
              sources[index] = reinterpret_cast<const int4*>(local_x + in_place_row * args.hidden * 2);
              source_weights[index] = args.num_topk > 0
                                          ? reinterpret_cast<const float*>(local_weights) + in_place_row * args.num_topk
                                          : nullptr;
            } else {
              sources[index] = reinterpret_cast<const int4*>(entry);
              source_weights[index] = reinterpret_cast<const float*>(entry + args.hidden * 2);
            }
          }
          __syncwarp();
          const int num_sources = __popc(present);
          const int64_t home_slot = layout.slot(ctx.node, channel, i);
          char* dst;
          if (node == ctx.node) {
            dst = ctx.row(ctx.peers.rank, home_slot);
          } else if (!staged) {
            dst = net.direct_ptr(home_rank, layout.rows_offset + home_slot * layout.row_stride);
          } else {
            dst = ctx.send_row(layout.slot(node, channel, i));
          }
          sum_sources<kSumCols, kSumGroup>(reinterpret_cast<int4*>(dst), sources, num_sources, row_int4, lane);
          for (int k = lane; k < args.num_topk; k += 32)
            reinterpret_cast<float*>(dst + args.hidden * 2)[k] =
                sum_weights(num_sources, k, [&](int s) { return source_weights[s]; });
          __syncwarp();  // sources_of is rewritten by the warp's next position
        }
        timer.lap(2);
      }
      // The batch's partials (direct stores and staged put sources alike) and its ring reads are ordered
      // before warp 0's releases and signal by the barrier; those are cumulative (transport.cuh), so one
      // fence in the signalling warp covers the batch instead of one per forwarder thread.
      aborted = device::named_barrier_or(kForwardBarrier, num_forward_warps * 32, entries_failed);
      if (aborted) break;
      if (forward_warp == 0) {
        if (lane < num_ranks_per_node)
          device::st_release_sys(ctx.flag(ctx.rank_of(ctx.node, lane), layout.flag_ring_head(channel, ctx.local)),
                                 tagged(epoch, consumed[lane]));
        // combine(my node, channel) on the home rank: one add per batch with its count, after its partials.
        if (!staged) {
          net.signal_add(home_rank, layout.signal_combine(ctx.node, channel), static_cast<uint64_t>(batch));
        } else {
          put_ring_range(ctx, home_rank, node, channel, batch_begin, batch, layout.signal_combine(ctx.node, channel));
        }
      }
      timer.lap(3);
    }
    if (aborted) break;
  }
  timer.report(args.in_place ? "combine" : "combine-pushed", "forwarder", ctx.peers.rank, num_ranks_per_node, 0);
  // Every credit of the op is in once the home ranks summed every partial: then nobody adds to the
  // credit signals any more and they are reset for the next op.
  if (forward_warp == 0 && !aborted) {
    for (int node = lane; node < num_nodes; node += 32) {
      const int count = channel_count(args.recv_rdma_channel_prefix_matrix + node * num_channels, channel);
      uint64_t observed = 0;
      if (count > 0 && !net.wait_signal(layout.signal_combine_credit(node, channel), static_cast<uint64_t>(count),
                                        ctx.peers.timeout_ns, &ctx.peers.diagnostics->abort_waits, &observed)) {
        device::report(ctx.peers.diagnostics, Phase::kInternodeCombineSend, true, ctx.peers.rank,
                       ctx.rank_of(node, ctx.local), channel, -1, count, static_cast<long long>(observed));
        continue;
      }
      net.reset_signal(layout.signal_combine_credit(node, channel));
    }
  }
}

template <typename Transport>
__device__ void home_sums(const Ctx<Transport>& ctx, const CombineArgs& args, int channel, int first_warp) {
  const Layout& layout = ctx.layout;
  const int num_nodes = layout.num_nodes, num_channels = layout.num_channels;
  const int num_home_warps = kNumWarps - first_warp;
  const int warp = threadIdx.x / 32, home_warp = warp - first_warp, lane = device::lane_id();
  const Transport& net = ctx.net;
  __shared__ int used[kMaxInternodeNodes];      // per node: partial positions read by finished rounds
  __shared__ int credited[kMaxInternodeNodes];  // ... and credited back to the forwarder
  __shared__ int home_abort;
  if (home_warp == 0) {
    for (int node = lane; node < num_nodes; node += 32) used[node] = credited[node] = 0;
    if (lane == 0) home_abort = 0;
  }
  device::named_barrier(kHomeBarrier, num_home_warps * 32);
  int begin, end;
  device::channel_range(channel, num_channels, args.num_tokens, begin, end);
  const int row_int4 = args.hidden * 2 / 16;
  const char* partials = ctx.row(ctx.peers.rank, 0);
  // Buckets: 0 waiting for partials, 1 summing, 2 crediting and the round's barriers.
  device::RoleTimer timer;
  timer.begin();
  const auto partial_row = [&](int node, int position) {
    return reinterpret_cast<const int4*>(partials + layout.slot(node, channel, position) * layout.row_stride);
  };
  for (int round_begin = begin; round_begin < end; round_begin += num_home_warps) {
    const int token = round_begin + home_warp;
    if (token < end) {
      __syncwarp();
      const int head = lane < num_nodes ? args.send_rdma_head[static_cast<int64_t>(token) * num_nodes + lane] : -1;
      // Lane j waits for partial `head` of node j: combine(j, channel) counts the partials that have landed.
      bool ok = true;
      if (head >= 0) {
        uint64_t observed = 0;
        ok = net.wait_signal(layout.signal_combine(lane, channel), static_cast<uint64_t>(head) + 1,
                             ctx.peers.timeout_ns, &ctx.peers.diagnostics->abort_waits, &observed);
        if (!ok)
          device::report(ctx.peers.diagnostics, Phase::kInternodeCombineRecv, true, ctx.peers.rank,
                         ctx.rank_of(lane, ctx.local), channel, token, head + 1, static_cast<long long>(observed));
        atomicMax(&used[lane], head + 1);
      }
      const bool all_ok = __all_sync(0xffffffffu, ok);
      __syncwarp();
      timer.lap(0);
      if (!all_ok) {
        home_abort = 1;
      } else {
        // The partials in node order, then the biases (the reference's order of additions).
        const unsigned present = __ballot_sync(0xffffffffu, head >= 0);
        const int num_partials = __popc(present);
        const int4** sources = sources_of[warp];
        if (head >= 0) sources[__popc(present & ((1u << lane) - 1u))] = partial_row(lane, head);
        if (lane == 0) {
          int num = num_partials;
          if (args.bias_0)
            sources[num++] = reinterpret_cast<const int4*>(args.bias_0 + static_cast<int64_t>(token) * args.hidden);
          if (args.bias_1)
            sources[num++] = reinterpret_cast<const int4*>(args.bias_1 + static_cast<int64_t>(token) * args.hidden);
        }
        __syncwarp();
        const int num_sources = num_partials + (args.bias_0 != nullptr) + (args.bias_1 != nullptr);
        sum_sources<kSumCols, kSumGroup>(
            reinterpret_cast<int4*>(args.combined_x + static_cast<int64_t>(token) * args.hidden), sources, num_sources,
            row_int4, lane, device::st_output_stream);
        for (int k = lane; k < args.num_topk; k += 32)
          args.combined_topk_weights[static_cast<int64_t>(token) * args.num_topk + k] =
              sum_weights(num_partials, k, [&](int s) {
                return reinterpret_cast<const float*>(reinterpret_cast<const char*>(sources[s]) + args.hidden * 2);
              });
        __syncwarp();  // sources_of is rewritten by the warp's next token
      }
    }
    timer.lap(1);
    // The round's partials are read: credit their slots back (one add per node that advanced), then
    // let the next round start, so that `used` holds only finished rounds when it is credited.
    device::named_barrier(kHomeBarrier, num_home_warps * 32);
    if (home_abort) return;
    if (home_warp == 0) {
      for (int node = 0; node < num_nodes; ++node) {
        const int delta = used[node] - credited[node];
        if (delta <= 0) continue;
        net.signal_add(ctx.rank_of(node, ctx.local), layout.signal_combine_credit(ctx.node, channel),
                       static_cast<uint64_t>(delta));
        if (lane == 0) credited[node] = used[node];
        __syncwarp();
      }
    }
    device::named_barrier(kHomeBarrier, num_home_warps * 32);
    timer.lap(2);
  }
  timer.report(args.in_place ? "combine" : "combine-pushed", "home", ctx.peers.rank, layout.num_ranks_per_node, 0);
  // Every partial of the op has landed (the token with each node's last position waited for it): no
  // add to combine(node, channel) can follow.
  if (home_warp == 0)
    for (int node = lane; node < num_nodes; node += 32) net.reset_signal(layout.signal_combine(node, channel));
}

// Kernel name: V1's (profiles and users' kernel-name filters read it).
template <typename Transport>
__global__ void __launch_bounds__(kNumThreads, 1)
    combine(Peers peers, Layout layout, const __grid_constant__ Transport net, CombineArgs args, int64_t ring_stride) {
  const Ctx<Transport> ctx(peers, layout, net);
  const int epoch = begin_op(ctx);
  const int channel = blockIdx.x;
  const int warp = threadIdx.x / 32;
  const int num_producer_warps = args.num_producer_warps, num_forward_warps = args.num_forward_warps;
  if (warp < num_producer_warps) {
    produce(ctx, args, ring_stride, epoch, channel);
  } else if (warp < num_producer_warps + num_forward_warps) {
    forward(ctx, args, ring_stride, epoch, channel);
  } else {
    home_sums(ctx, args, channel, num_producer_warps + num_forward_warps);
  }
  end_op(ctx);
}

template <typename Transport>
void launch(const Peers& peers, const Layout& layout, const Transport& net, const CombineArgs& args,
            const LaunchShape& shape, cudaStream_t stream) {
  const int64_t ring_stride = combine_row_stride(args.hidden, args.num_topk);
  combine<Transport><<<shape.num_blocks, kNumThreads, 0, stream>>>(peers, layout, net, args, ring_stride);
  DEEP_EP_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

// The transports combine is built for.
void launch_combine(const Peers& peers, const Layout& layout, const CombineArgs& args, const LaunchShape& shape,
                    cudaStream_t stream) {
  launch(peers, layout, p2p_transport(peers, layout), args, shape, stream);
}

#if defined(DEEP_EP_ENABLE_GIN) && DEEP_EP_ENABLE_GIN
void launch_combine(const Peers& peers, const Layout& layout, const CombineArgs& args,
                    const transport::GinTransport& gin, const LaunchShape& shape, cudaStream_t stream) {
  launch(peers, layout, gin, args, shape, stream);
}
#endif

int max_resident_combine_blocks_per_sm() {
  return device::resident_blocks_per_sm<combine<transport::P2pTransport>>(kNumThreads);
}

}  // namespace deep_ep::internode
