// Launchers of the low-latency kernels. A peer is reached by load/store (NVLink, or ranks sharing one
// GPU) when it is on this rank's node and allow_nvlink_for_low_latency_mode is on; otherwise through
// the transport (docs/design.md decision 4: P2P today, which on emulated nodes stores through the mapped
// pointer as a NIC would write, by staged puts and added signals).
//
// Protocol of one op on buffer half h (no barrier, no reset between calls):
//   send:    every block reads ll_epoch[h][op] of its own rank; the op's tag is that value + 1. Rows
//            go into the receivers' half h: plain stores to load/store peers; staged, then put with
//            an add to an arrivals signal, to transport peers. After a system fence, one warp per
//            (receiver, expert) or per receiver sets a 64-bit count signal to (tag << 32 | rows): a
//            release store for load/store peers, an add of the difference to the last value it set
//            for transport peers.
//   receive: waits, bounded, until each unmasked peer's count signal carries the tag; for a transport
//            peer then until its arrivals cover the announced rows; then reads the rows.
// Tags grow by one per op on a half, on every rank alike, so a stale signal never matches and nothing
// needs zeroing between calls. A receive uses the tag of its own send (the fused kernel keeps it;
// a hooked receive reads ll_epoch, which its send bumped).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/common/launch_shape.hpp"
#include "protocol/diagnostics.hpp"
#include "protocol/low_latency_layout.hpp"

namespace deep_ep::low_latency {

enum Phases : int { kSend = 1, kReceive = 2, kSendAndReceive = 3 };

// The peers `rank` reaches through the transport, as bits: those on another node (nodes are runs of
// num_ranks_per_node ranks), or every other rank when allow_nvlink is off (V1's
// allow_nvlink_for_low_latency_mode). One word: the low-latency ops take at most 32 ranks.
inline uint32_t transport_peer_mask(int rank, int num_ranks, int num_ranks_per_node, bool allow_nvlink) {
  uint32_t mask = 0;
  for (int peer = 0; peer < num_ranks && peer < 32; ++peer) {
    const bool other_node = peer / num_ranks_per_node != rank / num_ranks_per_node;
    if (peer != rank && (!allow_nvlink || other_node)) mask |= 1u << peer;
  }
  return mask;
}

struct Peers {
  char** bases;         // device array [R]: each rank's allocation (control region first)
  int64_t half_offset;  // where the active half starts inside each allocation
  int rank, num_ranks;
  uint32_t transport_peers;  // bit r: rank r is reached through the transport (transport_peer_mask)
  int half;                  // 0 or 1
  bool enable_shrink;        // a peer that times out is masked instead of reported
  DeviceDiagnostics* diagnostics;
  int64_t timeout_ns;
};

struct DispatchArgs {
  const uint16_t* x;        // bf16 [T, H]
  const int64_t* topk_idx;  // [T, K]
  int num_tokens, num_topk, hidden, num_experts, num_local_experts, num_max_tokens;
  bool use_fp8, round_scale, use_ue8m0;
  void* recv_x;                   // [L, S, H] bf16 or e4m3
  void* recv_scales;              // [L, H / 128, S] float32, or [L, H / 512, S] int32 (ue8m0), or null
  int* recv_count;                // [L]
  int* src_info;                  // [2, L, S]: token, then top-k slot
  int64_t* layout_range;          // [L, R]
  int* cumulative_recv_stats;     // [L] or null
  int64_t* wait_recv_cost_stats;  // [R] or null
};

struct CombineArgs {
  const uint16_t* x;  // bf16 [L, S, H] rows with the strides below (elements)
  int64_t x_expert_stride, x_row_stride;
  const int* src_info;          // [2, L, S]
  const int64_t* layout_range;  // [L, R]
  const int64_t* topk_idx;      // [T, K]
  const float* topk_weights;    // [T, K]
  int num_tokens, num_topk, hidden, num_experts, num_local_experts, num_max_tokens;
  bool use_logfmt;
  uint16_t* combined_x;           // [T, H]
  int64_t* wait_recv_cost_stats;  // [R] or null
};

// Grid and shared memory: `num_blocks` blocks of kThreads threads, one block per SM at most.
constexpr int kThreads = 512;
int dispatch_shared_bytes(int num_tokens, int num_topk, int num_local_experts, int num_ranks, int num_blocks);
// shape.num_blocks blocks (those that fit), shape.phases the halves that run.
void launch_dispatch(const Peers& peers, const HalfLayout& layout, const DispatchArgs& args, const LaunchShape& shape,
                     cudaStream_t stream);
int combine_shared_bytes(int num_local_experts, int num_ranks);
void launch_combine(const Peers& peers, const HalfLayout& layout, const CombineArgs& args, const LaunchShape& shape,
                    cudaStream_t stream);
// Sets (1) or clears (0) ll_mask[rank] of this rank, or all entries with rank == -1.
void launch_update_mask(char* own_base, int rank, int value, int num_ranks, cudaStream_t stream);
void launch_query_mask(const char* own_base, int* mask_status, int num_ranks, cudaStream_t stream);
int max_resident_blocks_per_sm();

}  // namespace deep_ep::low_latency
