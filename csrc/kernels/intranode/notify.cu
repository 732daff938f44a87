// Intranode prologue (barrier, counter reset, barrier) and notify: the count exchange of a non-cached
// dispatch, fused with the prologue so the whole handshake is one launch of one block.
#include <algorithm>

#include "kernels/intranode/prologue.cuh"
#include "runtime/cuda_check.hpp"

namespace deep_ep::intranode {

namespace {

constexpr int kThreads = 512;

// Kernel names are V1's (profiles and users' kernel-name filters read them): the prologue runs as
// cached_notify_dispatch before a cached dispatch and as cached_notify_combine before a combine.
__device__ __forceinline__ void prologue(const Peers& p) {
  if (!rank_barrier(p)) return;
  reset_queue_counters(p);
  __threadfence_system();
  rank_barrier(p);
}

__global__ void __launch_bounds__(32, 1) cached_notify_dispatch(Peers p) { prologue(p); }
__global__ void __launch_bounds__(32, 1) cached_notify_combine(Peers p) { prologue(p); }

__global__ void __launch_bounds__(kThreads, 1) notify_dispatch(Peers p, NotifyArgs a) {
  const int R = p.num_ranks, C = a.num_channels, me = p.rank;
  const int L = a.num_experts / R;
  if (!rank_barrier(p)) return;
  reset_queue_counters(p);

  // Publish what this rank sends: read by every peer after the second barrier.
  ControlRegion* mine = control_of(p, me);
  if (threadIdx.x == 0) mine->num_tokens = a.num_tokens;
  for (int j = threadIdx.x; j < R; j += blockDim.x) mine->num_tokens_per_rank[j] = a.num_tokens_per_rank[j];
  for (int e = threadIdx.x; e < a.num_experts; e += blockDim.x) mine->num_tokens_per_expert[e] = a.num_tokens_per_expert[e];
  for (int cj = threadIdx.x; cj < C * R; cj += blockDim.x) {
    const int c = cj / R, j = cj % R;
    int begin, end;
    device::channel_range(c, C, a.num_tokens, begin, end);
    int count = 0;
    for (int t = begin; t < end; ++t) count += a.is_token_in_rank[static_cast<int64_t>(t) * R + j];
    mine->num_tokens_per_channel_rank[c][j] = count;
  }
  __threadfence_system();
  if (!rank_barrier(p)) return;

  // Everything below reads peers' published counts (relaxed loads after the barrier's acquire).
  for (int ij = threadIdx.x; ij < R * R; ij += blockDim.x) {
    const int i = ij / R, j = ij % R;
    int sum = 0;
    for (int k = 0; k <= i; ++k) sum += device::ld_relaxed_sys(&control_of(p, k)->num_tokens_per_rank[j]);
    a.rank_prefix_matrix[i * R + j] = sum;
  }
  for (int ic = threadIdx.x; ic < R * C; ic += blockDim.x) {
    const int i = ic / C, c = ic % C;
    int sent = 0, received = 0;
    for (int c2 = 0; c2 < c; ++c2) {
      sent += mine->num_tokens_per_channel_rank[c2][i];
      received += device::ld_relaxed_sys(&control_of(p, i)->num_tokens_per_channel_rank[c2][me]);
    }
    a.channel_prefix_matrix[i * C + c] = sent;       // i is the destination here
    a.recv_channel_prefix_matrix[i * C + c] = received;  // i is the source here
  }
  for (int l = threadIdx.x; l < L; l += blockDim.x) {
    int count = 0;
    for (int i = 0; i < R; ++i) count += device::ld_relaxed_sys(&control_of(p, i)->num_tokens_per_expert[me * L + l]);
    a.host.num_recv_tokens_per_expert[l] = (count + a.expert_alignment - 1) / a.expert_alignment * a.expert_alignment;
  }
  if (threadIdx.x == 0) {
    int total = 0;
    for (int i = 0; i < R; ++i) total += device::ld_relaxed_sys(&control_of(p, i)->num_tokens_per_rank[me]);
    *a.host.num_recv_tokens = total;
  }
  // The host reads the counts only after it sees ready == epoch.
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x == 0) *a.host.ready = a.host.epoch;
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
