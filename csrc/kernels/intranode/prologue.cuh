// Cross-rank barrier and counter reset shared by the intranode prologue and notify kernels.
#pragma once

#include "kernels/common/device_utils.cuh"
#include "kernels/intranode/intranode.hpp"
#include "protocol/control_region.hpp"

namespace deep_ep::intranode {

__device__ __forceinline__ ControlRegion* control_of(const Peers& peers, int rank) {
  return reinterpret_cast<ControlRegion*>(peers.bases[rank]);
}

// Block-wide barrier with every rank (single-block kernels only): thread j < R signals rank j and waits
// for rank j's signal. Signal: st.release.sys of the new epoch into barrier_signal[my rank] of the
// peer; wait: ld.acquire.sys of my barrier_signal[j] until it reaches the epoch. Every rank runs the
// same sequence of barriers, so epochs agree. Returns false (on every thread) if any wait failed.
__device__ __forceinline__ bool rank_barrier(const Peers& peers) {
  __shared__ int epoch;
  __syncthreads();
  if (threadIdx.x == 0) {
    int* counter = &control_of(peers, peers.rank)->barrier_epoch;
    epoch = *counter + 1;
    *counter = epoch;
  }
  __syncthreads();
  bool ok = true;
  if (threadIdx.x < peers.num_ranks) {
    device::st_release_sys(&control_of(peers, threadIdx.x)->barrier_signal[peers.rank], epoch);
    ok = device::wait_at_least(&control_of(peers, peers.rank)->barrier_signal[threadIdx.x], epoch, peers.timeout_ns,
                               peers.diagnostics, Phase::kBarrier, peers.rank, threadIdx.x, -1);
  }
  return !__syncthreads_or(!ok);
}

// Zero this rank's queue counters. Only called between the two barriers of a prologue: no peer reads
// or writes them then.
__device__ __forceinline__ void reset_queue_counters(const Peers& peers) {
  ControlRegion* mine = control_of(peers, peers.rank);
  constexpr int kCounters = kMaxChannels * kNumMaxNvlPeers;
  for (int i = threadIdx.x; i < kCounters; i += blockDim.x) {
    (&mine->dispatch_tail[0][0])[i] = 0;
    (&mine->dispatch_head[0][0])[i] = 0;
    (&mine->combine_tail[0][0])[i] = 0;
    (&mine->combine_head[0][0])[i] = 0;
  }
}

// First output row, at rank `dest`, of the tokens rank `source` sends it (rank_prefix_matrix is inclusive
// over senders).
__device__ __forceinline__ int rank_begin(const int* rank_prefix_matrix, int source, int dest, int num_ranks) {
  return source > 0 ? rank_prefix_matrix[(source - 1) * num_ranks + dest] : 0;
}

// The rows rank `rank` received from `source` in `channel`: [first_row, first_row + num_rows) of its
// outputs.
__device__ __forceinline__ void received_channel_rows(const int* rank_prefix_matrix,
                                                      const int* recv_channel_prefix_matrix, int source, int rank,
                                                      int channel, int num_channels, int num_ranks, int& first_row,
                                                      int& num_rows) {
  const int source_begin = rank_begin(rank_prefix_matrix, source, rank, num_ranks);
  const int channel_begin = recv_channel_prefix_matrix[source * num_channels + channel];
  const int channel_end = channel + 1 < num_channels ? recv_channel_prefix_matrix[source * num_channels + channel + 1]
                                                     : rank_prefix_matrix[source * num_ranks + rank] - source_begin;
  first_row = source_begin + channel_begin;
  num_rows = channel_end - channel_begin;
}

}  // namespace deep_ep::intranode
