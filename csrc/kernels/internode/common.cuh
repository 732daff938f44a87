// Device side shared by the internode kernels: where each rank's areas are, the bounded waits on
// flags and signals, and the op bracket (wait for every rank's previous op; count this op done). The
// kernels are templates over the transport (transport.cuh) that carries the bytes between nodes.
//
// Reach. A kernel dereferences bases[r] only for this rank and the ranks of its node (load/store over
// NVLink, or the own GPU); with GIN, bases of other nodes are null. Every byte and signal for another
// node goes through the transport: stored through direct_ptr where it maps the peer (P2P), else
// staged in this rank's window and put. The own window is reached through the own base, which is the
// transport's local_ptr.
//
// Memory-ordering contract of the flags (int64, NVLink area): a flag is written only by its owner,
// with st.release.sys of the op's epoch + 1, after the writer's data is fenced at system scope; readers
// of the owner's node poll it with ld.acquire.sys and then read the data it covers at L2 (.cg).
// Values only grow between ops, so a flag left from an earlier op never satisfies a later wait. Flags
// that count inside an op hold (epoch + 1) << 32 | count (tagged / count_of below): a value of an
// earlier op reads as 0.
// Transport signals are counters inside an op: meta and the done signal take one add, the ring signals
// (rows, credits) one add per batch with the batch's row count. The owner knows each counter's total
// for the op and resets it once it has read that total, so no add of this op can follow; the next
// add comes after the next op's start barrier, which follows that reset.
#pragma once

#include <cstdint>

#include "kernels/common/device_utils.cuh"
#include "kernels/internode/internode.hpp"
#include "protocol/control_region.hpp"
#include "transport/transport.cuh"

namespace deep_ep::internode {

// A count tagged with the op's epoch, and the count back (0 when the tag is another op's).
__device__ __forceinline__ int64_t tagged(int epoch, int count) { return (int64_t(epoch) + 1) << 32 | count; }
__device__ __forceinline__ int count_of(int64_t value, int epoch) {
  return (value >> 32) == int64_t(epoch) + 1 ? static_cast<int>(value & 0xffffffff) : 0;
}
// rows_scanned value of a receiver that has all its rows from a ring: it holds no position back.
constexpr int kScanDone = 0x7fffffff;

// The P2P transport of an op, built on the host from the mapped bases (every rank's buffer is mapped
// here; its signals live at the start of each rank's window).
inline transport::P2pTransport p2p_transport(const Peers& peers, const Layout& layout) {
  return transport::P2pTransport{peers.bases, peers.rdma_offset, layout.signals_offset, peers.rank};
}

template <typename Transport>
struct Ctx {
  Peers peers;
  Layout layout;
  // Every access to another node's window or signals. The kernel's __grid_constant__ parameter: read
  // in place, never copied (GIN keeps references into it for the whole kernel).
  const Transport& net;
  int node, local;  // this rank's node and index inside it

  __device__ __forceinline__ Ctx(const Peers& op_peers, const Layout& op_layout, const Transport& transport)
      : peers(op_peers), layout(op_layout), net(transport) {
    node = peers.rank / layout.num_ranks_per_node;
    local = peers.rank % layout.num_ranks_per_node;
  }
  __device__ __forceinline__ int rank_of(int node_idx, int local_rank) const {
    return node_idx * layout.num_ranks_per_node + local_rank;
  }

  // Pointers into the buffer of `rank`, which must be this rank or a rank of this node (see "Reach" above).
  __device__ __forceinline__ char* rdma(int rank) const { return peers.bases[rank] + peers.rdma_offset; }
  __device__ __forceinline__ char* nvl(int rank) const { return peers.bases[rank] + peers.nvl_offset; }
  __device__ __forceinline__ int64_t* flag(int rank, int idx) const {
    return reinterpret_cast<int64_t*>(nvl(rank) + layout.flags_offset) + idx;
  }
  __device__ __forceinline__ ControlRegion* control() const {
    return reinterpret_cast<ControlRegion*>(peers.bases[peers.rank]);
  }
  // The published recv_gbl_channel_prefix_matrix [R][C] of `rank`.
  __device__ __forceinline__ const int* published(int rank) const {
    return reinterpret_cast<const int*>(nvl(rank) + layout.published_offset);
  }
  __device__ __forceinline__ int* own_published() const {
    return reinterpret_cast<int*>(nvl(peers.rank) + layout.published_offset);
  }
  __device__ __forceinline__ char* rings(int rank) const { return nvl(rank) + layout.rings_offset; }
  __device__ __forceinline__ char* row(int rank, int64_t slot) const {
    return rdma(rank) + layout.rows_offset + slot * layout.row_stride;
  }
  __device__ __forceinline__ char* send_row(int64_t slot) const {
    return rdma(peers.rank) + layout.send_rows_offset + slot * layout.row_stride;
  }
  __device__ __forceinline__ int* meta(int rank, int source_node) const {
    return reinterpret_cast<int*>(rdma(rank) + layout.meta_offset + source_node * layout.meta_bytes());
  }
  __device__ __forceinline__ int* meta_send(int dest_node) const {
    return reinterpret_cast<int*>(rdma(peers.rank) + layout.meta_send_offset + dest_node * layout.meta_bytes());
  }

  // One thread. Bounded wait until *flag >= target; reports a timeout naming `peer` and `channel`.
  __device__ __forceinline__ bool wait_flag(const int64_t* flag_ptr, int64_t target, Phase phase, int peer,
                                            int channel) const {
    return device::wait_at_least(flag_ptr, target, peers.timeout_ns, peers.diagnostics, phase, peers.rank, peer,
                                 channel);
  }

  // One thread. Waits for one add to this rank's signal `idx`, then resets it (see the contract above).
  __device__ __forceinline__ bool wait_signal_once(int idx, Phase phase, int peer, int channel) const {
    uint64_t observed = 0;
    if (!net.wait_signal(idx, 1, peers.timeout_ns, &peers.diagnostics->abort_waits, &observed)) {
      device::report(peers.diagnostics, phase, true, peers.rank, peer, channel, -1, 1,
                     static_cast<long long>(observed));
      return false;
    }
    net.reset_signal(idx);
    return true;
  }
};

// Start of every internode kernel: the op's epoch, after every rank has finished the previous op
// (each rank adds 1 to every rank's done signal when its kernel ends). The whole block calls it.
template <typename Transport>
__device__ __forceinline__ int begin_op(const Ctx<Transport>& ctx) {
  __shared__ int epoch_shared;
  if (threadIdx.x == 0) {
    const int epoch = *reinterpret_cast<volatile int*>(&ctx.control()->internode_ops);
    uint64_t observed = 0;
    const uint64_t target = static_cast<uint64_t>(epoch) * ctx.peers.num_ranks;
    if (!ctx.net.wait_signal(ctx.layout.signal_done(), target, ctx.peers.timeout_ns,
                             &ctx.peers.diagnostics->abort_waits, &observed)) {
      // The slowest rank is unknown here; name the count instead.
      device::report(ctx.peers.diagnostics, Phase::kInternodeBarrier, true, ctx.peers.rank, -1, -1, -1,
                     static_cast<long long>(target), static_cast<long long>(observed));
    }
    epoch_shared = epoch;
  }
  __syncthreads();
  return epoch_shared;
}

// End of every internode kernel (whole block, after its last access to any rank's memory): the last
// block to arrive bumps the epoch and tells every rank that this rank is done with the op.
//
// Done signal (never reset, so it counts num_ranks per op): every rank, this one included, adds 1 to
// every rank's signal_done once per op, through the transport (its release covers the own signal
// too). Every block fences at system scope before it counts its arrival and the last block adds only
// after seeing every arrival, so a rank that reads epoch * num_ranks in begin_op may overwrite any
// area the previous op used on any rank. That covers put sources too: a peer adds done only after it
// waited for the signals of this rank's puts to it, which arrive after the bytes were read here.
template <typename Transport>
__device__ __forceinline__ void end_op(const Ctx<Transport>& ctx) {
  __shared__ int is_last;
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence_system();
    ControlRegion* control = ctx.control();
    is_last = atomicAdd(&control->internode_arrivals, 1) == static_cast<int>(gridDim.x) - 1;
    if (is_last) {
      control->internode_arrivals = 0;
      atomicAdd(&control->internode_ops, 1);
      __threadfence_system();
    }
  }
  __syncthreads();
  if (!is_last || threadIdx.x >= 32) return;
  // Starting after this rank staggers the ranks' adds over the peers' signals.
  for (int i = 1; i <= ctx.peers.num_ranks; ++i)
    ctx.net.signal_add((ctx.peers.rank + i) % ctx.peers.num_ranks, ctx.layout.signal_done(), 1);
}

// Rows of `channel` in a [*, num_channels] inclusive prefix row.
__device__ __forceinline__ int channel_count(const int* prefix_row, int channel) {
  return prefix_row[channel] - (channel > 0 ? prefix_row[channel - 1] : 0);
}

// Warp-collective. Puts stream positions [first, first + count) of this rank's ring (my node, channel) on
// `peer`, staged in this rank's send_rows at the same positions of (staged_node, channel), then adds
// `count` to the peer's `signal_idx` after the bytes. The positions may wrap around the ring once: one
// put per contiguous run.
template <typename Transport>
__device__ __forceinline__ void put_ring_range(const Ctx<Transport>& ctx, int peer, int staged_node, int channel,
                                               int first, int count, int signal_idx) {
  const Layout& layout = ctx.layout;
  const int64_t first_slot = layout.slot(ctx.node, channel, first) - layout.slot(ctx.node, channel, 0);
  const int head_run = static_cast<int>(min(static_cast<int64_t>(count), layout.capacity - first_slot));
  const int64_t dst = layout.rows_offset + layout.slot(ctx.node, channel, first) * layout.row_stride;
  const int64_t src = layout.send_rows_offset + layout.slot(staged_node, channel, first) * layout.row_stride;
  if (head_run < count) {
    ctx.net.put(peer, dst, src, static_cast<int64_t>(head_run) * layout.row_stride);
    ctx.net.put_with_signal(peer, layout.rows_offset + layout.slot(ctx.node, channel, 0) * layout.row_stride,
                            layout.send_rows_offset + layout.slot(staged_node, channel, 0) * layout.row_stride,
                            static_cast<int64_t>(count - head_run) * layout.row_stride, signal_idx,
                            static_cast<uint64_t>(count));
  } else {
    ctx.net.put_with_signal(peer, dst, src, static_cast<int64_t>(count) * layout.row_stride, signal_idx,
                            static_cast<uint64_t>(count));
  }
}

__device__ __forceinline__ int warp_inclusive_scan(int value) {
  const int lane = device::lane_id();
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const int u = __shfl_up_sync(0xffffffffu, value, d);
    if (lane >= d) value += u;
  }
  return value;
}

// Idle-time bookkeeping of a polling loop: true once `timeout_ns` passed without progress (or another
// thread reported an error), checked every kPollsPerSlowCheck polls; every poll that found nothing pauses first.
struct IdleClock {
  uint64_t since = device::global_timer_ns();
  int polls = 0;
  __device__ __forceinline__ void progressed() { since = device::global_timer_ns(); }
  __device__ __forceinline__ bool expired(const Peers& peers) {
    device::poll_pause();
    if (++polls % device::kPollsPerSlowCheck != 0) return false;
    return device::error_reported(peers.diagnostics) ||
           device::global_timer_ns() - since > static_cast<uint64_t>(peers.timeout_ns);
  }
};

}  // namespace deep_ep::internode
