// The op bracket of the intranode kernels that touch other ranks' tensors in place (the pull combine reads the
// expert ranks' inputs, the push dispatch writes the destination ranks' outputs). Every rank's side must be in
// place before anyone touches it, and must stay so until everyone has finished.
//
// Counters (ControlRegion, pull_*): block 0 of rank i publishes where its tensors live (the caller's `publish`),
// then stores pull_ready[i] = epoch + 1 into every rank's region (st.release.sys after a system fence: the kernels
// that made rank i's tensors precede this one in its stream, and the fence orders the published refs before the
// flag); every block waits for pull_ready[j] >= epoch + 1 of all j (ld.acquire.sys). The last block of rank i to
// finish stores pull_done[i] = epoch + 1 everywhere the same way, after a system fence over every block's
// accesses, and waits for all pull_done[j]: the kernel ends only after every rank has finished with rank i's
// tensors (and, for the push dispatch, after every write into them is visible here). Then it bumps pull_epoch.
// Values only grow, so a flag of an earlier op never satisfies a later wait, in CUDA graph replays too. Every rank
// runs the same sequence of bracketed ops, so the epochs agree.
#pragma once

#include "kernels/common/device_utils.cuh"
#include "kernels/intranode/prologue.cuh"
#include "protocol/control_region.hpp"

namespace deep_ep::intranode {

// One thread: waits for flags[j] >= target for every rank j.
__device__ __forceinline__ bool wait_every_rank(const Peers& peers, const int* flags, int target, Phase phase,
                                                int channel) {
  for (int j = 0; j < peers.num_ranks; ++j)
    if (!device::wait_at_least(&flags[j], target, peers.timeout_ns, peers.diagnostics, phase, peers.rank, j, channel))
      return false;
  return true;
}

// Thread 0 of every block. Returns whether every rank became ready; *epoch: this op's epoch, for the close.
// publish(peer): block 0 stores this rank's refs into rank peer's region (before the fence).
template <typename Publish>
__device__ __forceinline__ bool open_op_bracket(const Peers& peers, Phase ready_phase, int* epoch, Publish publish) {
  ControlRegion* mine = control_of(peers, peers.rank);
  *epoch = *reinterpret_cast<volatile int*>(&mine->pull_epoch);
  if (blockIdx.x == 0) {
    for (int peer = 0; peer < peers.num_ranks; ++peer) publish(control_of(peers, peer));
    __threadfence_system();
    for (int peer = 0; peer < peers.num_ranks; ++peer)
      device::st_release_sys(&control_of(peers, peer)->pull_ready[peers.rank], *epoch + 1);
  }
  return wait_every_rank(peers, mine->pull_ready, *epoch + 1, ready_phase, blockIdx.x);
}

// Thread 0 of every block, after a __syncthreads that follows every access of the block to other ranks' tensors.
__device__ __forceinline__ void close_op_bracket(const Peers& peers, int epoch, Phase done_phase) {
  ControlRegion* mine = control_of(peers, peers.rank);
  __threadfence_system();
  if (atomicAdd(&mine->pull_arrivals, 1) == static_cast<int>(gridDim.x) - 1) {
    mine->pull_arrivals = 0;
    for (int peer = 0; peer < peers.num_ranks; ++peer)
      device::st_release_sys(&control_of(peers, peer)->pull_done[peers.rank], epoch + 1);
    wait_every_rank(peers, mine->pull_done, epoch + 1, done_phase, -1);
    mine->pull_epoch = epoch + 1;
    __threadfence();
  }
}

}  // namespace deep_ep::intranode
