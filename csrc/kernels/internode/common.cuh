// Device side shared by the internode kernels: where each rank's areas are, the bounded waits on
// flags and signals, and the op bracket (wait for every rank's previous op; count this op done).
//
// Memory-ordering contract of the flags (int64, NVLink area): a flag is written only by its owner,
// with st.release.sys of the op's epoch + 1, after the writer's data is fenced at system scope; readers
// of the owner's node poll it with ld.acquire.sys and then read the data it covers at L2 (.cg).
// Values only grow between ops, so a flag left from an earlier op never satisfies a later wait.
// Transport signals (RDMA window) carry exactly one add per op and are reset by their owner right after
// its wait; the next add comes after the next op's start barrier, which follows that reset.
#pragma once

#include <cstdint>

#include "kernels/common/control_region.hpp"
#include "kernels/common/device_utils.cuh"
#include "kernels/internode/internode.hpp"
#include "transport/transport.cuh"

namespace deep_ep::internode {

using Transport = transport::P2pTransport;

struct Ctx {
  Peers p;
  Layout l;
  int node, local;  // this rank's node and index inside it

  __device__ __forceinline__ Ctx(const Peers& peers, const Layout& layout) : p(peers), l(layout) {
    node = p.rank / l.num_ranks_per_node;
    local = p.rank % l.num_ranks_per_node;
  }
  __device__ __forceinline__ Transport transport() const {
    return Transport{p.bases, p.rdma_offset, l.signals_offset, p.rank};
  }
  __device__ __forceinline__ int rank_of(int n, int lr) const { return n * l.num_ranks_per_node + lr; }
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
    const Transport t = transport();
    uint64_t observed = 0;
    if (!t.wait_signal(idx, 1, p.timeout_ns, &p.diagnostics->claimed, &observed)) {
      device::report(p.diagnostics, phase, true, p.rank, peer, channel, -1, 1, static_cast<long long>(observed));
      return false;
    }
    t.reset_signal(idx);
    return true;
  }
};

// Start of every internode kernel: the op's epoch, after every rank has finished the previous op
// (each rank adds 1 to every rank's done signal when its kernel ends). The whole block calls it.
__device__ __forceinline__ int begin_op(const Ctx& ctx) {
  __shared__ int epoch_shared;
  if (threadIdx.x == 0) {
    const int epoch = *reinterpret_cast<volatile int*>(&ctx.control()->internode_ops);
    const Transport t = ctx.transport();
    uint64_t observed = 0;
    const uint64_t target = static_cast<uint64_t>(epoch) * ctx.p.num_ranks;
    if (!t.wait_signal(ctx.l.signal_done(), target, ctx.p.timeout_ns, &ctx.p.diagnostics->claimed, &observed)) {
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
__device__ __forceinline__ void end_op(const Ctx& ctx) {
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
  const Transport t = ctx.transport();
  for (int r = 0; r < ctx.p.num_ranks; ++r) {
    if (r != ctx.p.rank) {
      t.signal_add(r, ctx.l.signal_done(), 1);
    } else if (device::lane_id() == 0) {
      // This rank's own signal: a release add through the local pointer, as a peer's would be.
      transport::detail::red_add_release_sys(
          reinterpret_cast<uint64_t*>(ctx.rdma(r) + ctx.l.signals_offset) + ctx.l.signal_done(), 1);
    }
  }
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
