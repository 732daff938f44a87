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

#include "kernels/common/control_region.hpp"
#include "kernels/common/device_utils.cuh"
#include "kernels/internode/internode.hpp"
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
inline transport::P2pTransport p2p_transport(const Peers& p, const Layout& l) {
  return transport::P2pTransport{p.bases, p.rdma_offset, l.signals_offset, p.rank};
}

template <typename Transport>
struct Ctx {
  Peers p;
  Layout l;
  // Every access to another node's window or signals. The kernel's __grid_constant__ parameter: read
  // in place, never copied (GIN keeps references into it for the whole kernel).
  const Transport& net;
  int node, local;  // this rank's node and index inside it

  __device__ __forceinline__ Ctx(const Peers& peers, const Layout& layout, const Transport& transport)
      : p(peers), l(layout), net(transport) {
    node = p.rank / l.num_ranks_per_node;
    local = p.rank % l.num_ranks_per_node;
  }
  __device__ __forceinline__ int rank_of(int n, int lr) const { return n * l.num_ranks_per_node + lr; }

  // Pointers into rank r's buffer: r must be this rank or a rank of this node (see "Reach" above).
  __device__ __forceinline__ char* rdma(int r) const { return p.bases[r] + p.rdma_offset; }
  __device__ __forceinline__ char* nvl(int r) const { return p.bases[r] + p.nvl_offset; }
  __device__ __forceinline__ int64_t* flag(int r, int idx) const {
    return reinterpret_cast<int64_t*>(nvl(r) + l.flags_offset) + idx;
  }
  __device__ __forceinline__ ControlRegion* control() const { return reinterpret_cast<ControlRegion*>(p.bases[p.rank]); }
  // Rank r's published recv_gbl_channel_prefix_matrix [R][C].
  __device__ __forceinline__ const int* published(int r) const {
    return reinterpret_cast<const int*>(nvl(r) + l.published_offset);
  }
  __device__ __forceinline__ int* own_published() const { return reinterpret_cast<int*>(nvl(p.rank) + l.published_offset); }
  __device__ __forceinline__ char* rings(int r) const { return nvl(r) + l.rings_offset; }
  __device__ __forceinline__ char* row(int r, int64_t slot) const { return rdma(r) + l.rows_offset + slot * l.row_stride; }
  __device__ __forceinline__ char* send_row(int64_t slot) const {
    return rdma(p.rank) + l.send_rows_offset + slot * l.row_stride;
  }
  __device__ __forceinline__ int* meta(int r, int n) const {
    return reinterpret_cast<int*>(rdma(r) + l.meta_offset + n * l.meta_bytes());
  }
  __device__ __forceinline__ int* meta_send(int n) const {
    return reinterpret_cast<int*>(rdma(p.rank) + l.meta_send_offset + n * l.meta_bytes());
  }

  // One thread. Bounded wait until *flag >= target; reports a timeout naming `peer` and `channel`.
  __device__ __forceinline__ bool wait_flag(const int64_t* flag_ptr, int64_t target, Phase phase, int peer,
                                            int channel) const {
    return device::wait_at_least(flag_ptr, target, p.timeout_ns, p.diagnostics, phase, p.rank, peer, channel);
  }

  // One thread. Waits for one add to this rank's signal `idx`, then resets it (see the contract above).
  __device__ __forceinline__ bool wait_signal_once(int idx, Phase phase, int peer, int channel) const {
    uint64_t observed = 0;
    if (!net.wait_signal(idx, 1, p.timeout_ns, &p.diagnostics->claimed, &observed)) {
      device::report(p.diagnostics, phase, true, p.rank, peer, channel, -1, 1, static_cast<long long>(observed));
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
    const uint64_t target = static_cast<uint64_t>(epoch) * ctx.p.num_ranks;
    if (!ctx.net.wait_signal(ctx.l.signal_done(), target, ctx.p.timeout_ns, &ctx.p.diagnostics->claimed, &observed)) {
      // The slowest rank is unknown here; name the count instead.
      device::report(ctx.p.diagnostics, Phase::kInternodeBarrier, true, ctx.p.rank, -1, -1, -1,
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
  for (int i = 1; i <= ctx.p.num_ranks; ++i)
    ctx.net.signal_add((ctx.p.rank + i) % ctx.p.num_ranks, ctx.l.signal_done(), 1);
}

__device__ __forceinline__ int warp_inclusive_scan(int v) {
  const int lane = device::lane_id();
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const int u = __shfl_up_sync(0xffffffffu, v, d);
    if (lane >= d) v += u;
  }
  return v;
}

}  // namespace deep_ep::internode
