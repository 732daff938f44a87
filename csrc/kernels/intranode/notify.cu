// Intranode prologue (barrier, counter reset, barrier) and notify: the count exchange of a non-cached
// dispatch, fused with the prologue so the whole handshake is one launch of one block.
#include <algorithm>

#include "kernels/intranode/prologue.cuh"
#include "util/cuda_check.hpp"

namespace deep_ep::intranode {

namespace {

constexpr int kThreads = 512;

// Kernel names are V1's (profiles and users' kernel-name filters read them): the prologue runs as
// cached_notify_dispatch before a cached dispatch and as cached_notify_combine before a combine.
__device__ __forceinline__ void prologue(const Peers& peers) {
  if (!rank_barrier(peers)) return;
  reset_queue_counters(peers);
  __threadfence_system();
  rank_barrier(peers);
}

__global__ void __launch_bounds__(32, 1) cached_notify_dispatch(Peers peers) { prologue(peers); }
__global__ void __launch_bounds__(32, 1) cached_notify_combine(Peers peers) { prologue(peers); }

__global__ void __launch_bounds__(kThreads, 1) notify_dispatch(Peers peers, NotifyArgs args) {
  const int num_ranks = peers.num_ranks, num_channels = args.num_channels, rank = peers.rank;
  const int num_local_experts = args.num_experts / num_ranks;
  if (!rank_barrier(peers)) return;
  reset_queue_counters(peers);

  // Publish what this rank sends: read by every peer after the second barrier.
  ControlRegion* mine = control_of(peers, rank);
  if (threadIdx.x == 0) mine->num_tokens = args.num_tokens;
  for (int j = threadIdx.x; j < num_ranks; j += blockDim.x) mine->num_tokens_per_rank[j] = args.num_tokens_per_rank[j];
  for (int expert = threadIdx.x; expert < args.num_experts; expert += blockDim.x)
    mine->num_tokens_per_expert[expert] = args.num_tokens_per_expert[expert];
  for (int channel_rank = threadIdx.x; channel_rank < num_channels * num_ranks; channel_rank += blockDim.x) {
    const int channel = channel_rank / num_ranks, j = channel_rank % num_ranks;
    int begin, end;
    device::channel_range(channel, num_channels, args.num_tokens, begin, end);
    int count = 0;
    for (int token = begin; token < end; ++token)
      count += args.is_token_in_rank[static_cast<int64_t>(token) * num_ranks + j];
    mine->num_tokens_per_channel_rank[channel][j] = count;
  }
  __threadfence_system();
  if (!rank_barrier(peers)) return;

  // Everything below reads peers' published counts (relaxed loads after the barrier's acquire).
  for (int rank_pair = threadIdx.x; rank_pair < num_ranks * num_ranks; rank_pair += blockDim.x) {
    const int i = rank_pair / num_ranks, j = rank_pair % num_ranks;
    int sum = 0;
    for (int k = 0; k <= i; ++k) sum += device::ld_relaxed_sys(&control_of(peers, k)->num_tokens_per_rank[j]);
    args.rank_prefix_matrix[i * num_ranks + j] = sum;
  }
  for (int rank_channel = threadIdx.x; rank_channel < num_ranks * num_channels; rank_channel += blockDim.x) {
    const int i = rank_channel / num_channels, channel = rank_channel % num_channels;
    int sent = 0, received = 0;
    for (int earlier_channel = 0; earlier_channel < channel; ++earlier_channel) {
      sent += mine->num_tokens_per_channel_rank[earlier_channel][i];
      received += device::ld_relaxed_sys(&control_of(peers, i)->num_tokens_per_channel_rank[earlier_channel][rank]);
    }
    args.channel_prefix_matrix[i * num_channels + channel] = sent;           // i is the destination here
    args.recv_channel_prefix_matrix[i * num_channels + channel] = received;  // i is the source here
  }
  for (int local_expert = threadIdx.x; local_expert < num_local_experts; local_expert += blockDim.x) {
    int count = 0;
    for (int i = 0; i < num_ranks; ++i) {
      count +=
          device::ld_relaxed_sys(&control_of(peers, i)->num_tokens_per_expert[rank * num_local_experts + local_expert]);
    }
    args.host.num_recv_tokens_per_expert[local_expert] =
        (count + args.expert_alignment - 1) / args.expert_alignment * args.expert_alignment;
  }
  if (threadIdx.x == 0) {
    int total = 0;
    for (int i = 0; i < num_ranks; ++i)
      total += device::ld_relaxed_sys(&control_of(peers, i)->num_tokens_per_rank[rank]);
    *args.host.num_recv_tokens = total;
  }
  // The host reads the counts only after it sees ready == epoch.
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x == 0) *args.host.ready = args.host.epoch;
}

}  // namespace

void launch_prologue(const Peers& peers, bool before_combine, cudaStream_t stream) {
  if (before_combine) {
    cached_notify_combine<<<1, 32, 0, stream>>>(peers);
  } else {
    cached_notify_dispatch<<<1, 32, 0, stream>>>(peers);
  }
  DEEP_EP_CUDA_CHECK(cudaGetLastError());
}

void launch_notify(const Peers& peers, const NotifyArgs& args, cudaStream_t stream) {
  notify_dispatch<<<1, kThreads, 0, stream>>>(peers, args);
  DEEP_EP_CUDA_CHECK(cudaGetLastError());
}

}  // namespace deep_ep::intranode
