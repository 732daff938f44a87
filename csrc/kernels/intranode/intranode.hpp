// Launchers of the intranode normal-mode kernels (ranks reachable by load/store: NVLink peers or ranks
// sharing one GPU). Protocol, per op:
//   1. prologue: barrier (every rank finished its previous op), each rank zeroes its own queue
//      counters, barrier (nobody writes a peer's counters before they are zeroed);
//   2. notify (non-cached dispatch only, fused with the prologue): counts exchanged through the
//      control regions, prefix matrices computed, the received count published to the host;
//   3. dispatch: block c stages its channel's tokens once into its own ring, and pulls from every
//      peer's ring of channel c the slots whose destination mask names it;
//      combine: block c pushes the rows it received from each home rank in channel c back into that
//      rank's ring (c, this rank), and sums the rows of its own tokens arriving from every expert rank.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "deep_ep/config.hpp"
#include "kernels/common/launch_shape.hpp"
#include "protocol/diagnostics.hpp"
#include "protocol/host_counts.hpp"
#include "protocol/intranode_layout.hpp"
#include "protocol/pull_inputs.hpp"
#include "protocol/push_outputs.hpp"

namespace deep_ep::intranode {

struct Peers {
  char** bases;            // device array [R]: each rank's NVLink buffer (control region first)
  int64_t payload_offset;  // where the payload (queues) starts inside each buffer
  int rank, num_ranks;
  DeviceDiagnostics* diagnostics;
  int64_t timeout_ns;
};

// Barrier, reset of this rank's queue counters, barrier.
void launch_prologue(const Peers& peers, bool before_combine, cudaStream_t stream);

struct NotifyArgs {
  const bool* is_token_in_rank;      // [T, R]
  const int* num_tokens_per_rank;    // [R]
  const int* num_tokens_per_expert;  // [E]
  int num_tokens, num_experts, num_channels, expert_alignment;
  int* rank_prefix_matrix;          // out [R, R]
  int* channel_prefix_matrix;       // out [R, C]: first position of channel c among my tokens to rank j
  int* recv_channel_prefix_matrix;  // out [R, C]: first row of (source i, channel c) inside source i's block
  HostCounts host;                  // host-mapped received counts
};

// Prologue + count exchange.
void launch_notify(const Peers& peers, const NotifyArgs& args, cudaStream_t stream);

struct DispatchArgs {
  const uint8_t* x;       // [T, row_bytes]
  const float* x_scales;  // [T, num_scales] with strides below, or null
  int64_t scale_token_stride, scale_channel_stride;
  const int64_t* topk_idx;                // [T, K] or null
  const float* topk_weights;              // [T, K] or null
  const bool* is_token_in_rank;           // [T, R]
  const int* rank_prefix_matrix;          // [R, R]
  const int* channel_prefix_matrix;       // [R, C]
  const int* recv_channel_prefix_matrix;  // [R, C]
  int num_tokens, row_bytes, num_scales, num_topk, num_experts;
  int num_channels, num_slots, send_chunk;
  int num_rows;              // rows allocated in the outputs (N, or num_worst_tokens)
  uint8_t* recv_x;           // [num_rows, row_bytes]
  float* recv_x_scales;      // [num_rows, num_scales] or null
  int64_t* recv_topk_idx;    // [num_rows, K] or null
  float* recv_topk_weights;  // [num_rows, K] or null
  int* recv_src_idx;         // [num_rows]
  int* send_head;            // [T, R]: row of token t in rank j's output, -1 if not sent
};

// shape.wide: the one-block-per-SM shape (more warps); otherwise two blocks per SM. shape.num_blocks:
// one block per channel.
void launch_dispatch(const Peers& peers, const DispatchQueueLayout& layout, const DispatchArgs& args,
                     const LaunchShape& shape, cudaStream_t stream);

struct CombineArgs {
  const uint16_t* x;                      // [N, hidden] bf16, this rank's received rows
  const float* topk_weights;              // [N, K] or null
  const uint16_t* bias_0;                 // [T, hidden] or null
  const uint16_t* bias_1;                 // [T, hidden] or null
  const bool* is_token_in_rank;           // [T, R] of this rank's tokens
  const int* rank_prefix_matrix;          // [R, R]
  const int* recv_channel_prefix_matrix;  // [R, C]
  int num_tokens, num_recv_tokens, hidden, num_topk;
  int num_channels, num_slots, send_chunk;
  uint16_t* combined_x;          // [T, hidden]
  float* combined_topk_weights;  // [T, K] or null
};

void launch_combine(const Peers& peers, const CombineQueueLayout& layout, const CombineArgs& args,
                    const LaunchShape& shape, cudaStream_t stream);

// Pull combine: the home rank reads its tokens' rows straight out of every expert rank's combine
// input (mapped here; pull_combine.cu), one pass over the rows instead of three.
struct PullCombineArgs {
  // Rank j's [N_j, hidden] bf16 combine input and [N_j, K] top-k weights (null without top-k), mapped here.
  // Host-free form (imports != null): only this rank's own entries are given; every other rank's are found at
  // the kernel's start from ControlRegion::pull_inputs and the import table (protocol/pull_inputs.hpp).
  const uint16_t* x[kNumMaxNvlPeers];
  const float* topk_weights[kNumMaxNvlPeers];
  const ImportEntry* imports;  // [kNumMaxNvlPeers][kExportSlots], host-mapped; null: the arrays are complete
  // [kNumMaxNvlPeers][kExportSlots], device memory, zero until a kernel of this process first resolved the slot
  // through `imports`; later calls of the same generation read it here (one L2 hit) instead of crossing PCIe.
  // Each word is tagged with the generation it was resolved for (protocol/pull_inputs.hpp).
  uint64_t* resolved_bases;
  PullInput own_input;               // this rank's export refs, published to every rank (host-free form)
  const uint16_t* bias_0;            // [T, hidden] or null
  const uint16_t* bias_1;            // [T, hidden] or null
  const bool* is_token_in_rank;      // [T, R] of this rank's tokens
  const int* rank_prefix_matrix;     // [R, R]
  const int* channel_prefix_matrix;  // [R, C]: this rank's tokens to rank j before channel c
  int num_tokens, hidden, num_topk, num_channels;
  uint16_t* combined_x;          // [T, hidden]
  float* combined_topk_weights;  // [T, K] or null
};

// shape.num_blocks: in [1, num_channels], resident beside the other ranks' blocks.
void launch_pull_combine(const Peers& peers, const PullCombineArgs& args, const LaunchShape& shape,
                         cudaStream_t stream);

// Push dispatch: each rank reads each of its tokens once and stores it straight into the outputs of every rank it
// goes to (push_dispatch.cu), at the rows the ring dispatch would give; no ring, no receiving warps. Every rank's
// outputs are found at the kernel's start from ControlRegion::push_outputs and the import table, as the host-free
// pull combine finds its inputs.
struct PushDispatchArgs {
  const uint8_t* x;       // [T, row_bytes]
  const float* x_scales;  // [T, num_scales] with strides below, or null
  int64_t scale_token_stride, scale_channel_stride;
  const int64_t* topk_idx;           // [T, K] or null
  const float* topk_weights;         // [T, K] or null
  const bool* is_token_in_rank;      // [T, R]
  const int* rank_prefix_matrix;     // [R, R]
  const int* channel_prefix_matrix;  // [R, C]
  int num_tokens, row_bytes, num_scales, num_topk, num_experts, num_channels;
  int num_rows;  // rows of this rank's outputs (received rows, or num_worst_tokens)
  // This rank's outputs where this rank's kernel and its peers write them (the outputs, or their staging):
  // recv_x [num_rows, row_bytes]; recv_x_scales, recv_topk_idx, recv_topk_weights null when absent; recv_src_idx
  // null in a cached call (the handle holds it).
  uint8_t* recv_x;
  float* recv_x_scales;
  int64_t* recv_topk_idx;
  float* recv_topk_weights;
  int* recv_src_idx;
  int* send_head;              // [T, R] out (null in a cached call: the handle holds it)
  const ImportEntry* imports;  // [kNumMaxNvlPeers][kExportSlots], host-mapped
  uint64_t* resolved_bases;    // as PullCombineArgs::resolved_bases
  PushOutputs own_outputs;     // this rank's export refs, published to every rank
};

// shape.num_blocks: in [1, num_channels], resident beside the other ranks' blocks.
void launch_push_dispatch(const Peers& peers, const PushDispatchArgs& args, const LaunchShape& shape,
                          cudaStream_t stream);

// Resident blocks per SM of a kernel in a shape, for the co-residency check (docs/design.md decision 5).
enum class Kernel { kDispatch, kCombine, kPullCombine, kPushDispatch };
int max_resident_blocks_per_sm(Kernel kernel, const LaunchShape& shape);
// Per kernel, behind max_resident_blocks_per_sm (each next to its kernel).
int max_resident_dispatch_blocks_per_sm(bool wide);
int max_resident_combine_blocks_per_sm(bool wide);
int max_resident_pull_combine_blocks_per_sm();
int max_resident_push_dispatch_blocks_per_sm();

}  // namespace deep_ep::intranode
