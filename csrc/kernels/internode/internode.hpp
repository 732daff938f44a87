// Launchers of the internode normal-mode kernels (hierarchical: the network between nodes, load/store
// inside a node). Every op's main kernel starts by waiting until every rank has finished the previous
// op (the `done` signal), so an op may overwrite any area the previous op used. Tokens stream through
// the bounded rings of protocol/internode_layout.hpp, so a call carries any number of tokens.
//   notify_dispatch (non-cached dispatch): each rank sends every node's forwarder (the rank with its own
//            local index there) its per-channel counts; every rank then derives the handle's prefix
//            matrices and publishes its received counts to the host.
//   cached_notify (cached dispatch, combine): the op's start barrier on its own, so that the main
//            kernel's blocks find every rank ready.
//   dispatch block c: senders write channel c's tokens once per destination node into the ring of the
//            forwarder there, a batch at a time as credits allow; the forwarder relays arrivals to its
//            node and credits back what every rank of its node has read; receivers copy, from the
//            forwarders of their node, the rows of channel c whose mask names them.
//   combine  block c of every rank pushes its channel-c rows into rings its node's forwarders read;
//            the forwarder sums, per stream position of channel c, the rows of its node's ranks (in
//            local-rank order, rounded to bf16) and sends the partials, a batch at a time, into the
//            home rank's ring; the home rank sums the partials of its channel-c tokens in node order.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/common/launch_shape.hpp"
#include "protocol/diagnostics.hpp"
#include "protocol/host_counts.hpp"
#include "protocol/internode_layout.hpp"
#include "protocol/pull_inputs.hpp"

namespace deep_ep::internode {

// Everything a kernel needs to reach the other ranks. Peers on other nodes are reached only through
// the transport; peers of this node by load/store through their bases. The launchers below drive the
// P2P transport (every rank's buffer is mapped here, also for emulated nodes); internode_gin.cuh
// declares the GIN ones.
struct Peers {
  // Device array [R]: each rank's buffer (control region first) as mapped here. Only this rank's and
  // its node's entries are dereferenced; with GIN the other nodes' entries are null.
  char** bases;
  int64_t nvl_offset;   // where the NVLink payload starts inside each buffer
  int64_t rdma_offset;  // where the RDMA payload (the transport window) starts
  int rank, num_ranks, num_nodes, num_ranks_per_node;
  DeviceDiagnostics* diagnostics;
  int64_t timeout_ns;
};

struct NotifyArgs {
  const bool* is_token_in_rank;      // [T, R]
  const int* num_tokens_per_expert;  // [E]
  int num_tokens, num_experts, expert_alignment;
  // Outputs (the handle), all inclusive prefixes over channels or ranks.
  int* rdma_channel_prefix_matrix;       // [N, C]
  int* gbl_channel_prefix_matrix;        // [R, C]
  int* recv_rdma_channel_prefix_matrix;  // [N, C]
  int* recv_rdma_rank_prefix_sum;        // [N]
  int* recv_gbl_channel_prefix_matrix;   // [R, C]
  int* recv_gbl_rank_prefix_sum;         // [R]
  HostCounts host;                       // host-mapped received counts (rows, rows per expert, rows received over RDMA)
};

void launch_notify(const Peers& peers, const Layout& layout, const NotifyArgs& args, cudaStream_t stream);
// The start barrier of a cached dispatch or a combine (one block).
void launch_cached_notify(const Peers& peers, const Layout& layout, cudaStream_t stream);

struct DispatchArgs {
  const uint8_t* x;       // [T, row_bytes]
  const float* x_scales;  // [T, num_scales] with strides below, or null
  int64_t scale_token_stride, scale_channel_stride;
  const int64_t* topk_idx;                     // [T, K] or null
  const float* topk_weights;                   // [T, K] or null
  const bool* is_token_in_rank;                // [T, R]
  const int* rdma_channel_prefix_matrix;       // [N, C]
  const int* gbl_channel_prefix_matrix;        // [R, C]
  const int* recv_rdma_channel_prefix_matrix;  // [N, C]
  const int* recv_gbl_channel_prefix_matrix;   // [R, C]
  const int* recv_gbl_rank_prefix_sum;         // [R]
  const int* recv_rdma_rank_prefix_sum;        // [N]
  int num_tokens, row_bytes, num_scales, num_topk, num_experts;
  int send_chunk;            // tokens a sender writes between credit checks (rdma send chunk)
  int num_sender_warps;      // of the block's 16: senders, then one forwarder, then receivers
  bool cached;               // send_rdma_head is given and send_nvl_head is not rebuilt
  int num_rows;              // rows allocated in the outputs
  int num_rdma_rows;         // rows of send_nvl_head
  uint8_t* recv_x;           // [num_rows, row_bytes]
  float* recv_x_scales;      // [num_rows, num_scales] or null
  int64_t* recv_topk_idx;    // [num_rows, K] or null
  float* recv_topk_weights;  // [num_rows, K] or null
  int* recv_src_meta;        // [num_rows, 2]
  int* send_rdma_head;       // [T, N]: position in the (node, channel) stream, or -1 (computed unless cached)
  int* send_nvl_head;        // [num_rdma_rows, Rn]: position in the combine ring stream, or -1
  // Own-node push (own_node_push): the senders store the payload of rows for this node's ranks straight into those
  // ranks' recv_x, found through the node's output exports (runtime/input_exports.hpp), instead of into the own
  // forwarder's ring, which then carries only the rows' metadata; the receivers skip those rows' payload copy. It
  // saves a write and a read of every such row, where the payload was staged and read back on the same GPU.
  bool own_node_push;
  InputRef own_recv_x;         // where recv_x (or its staging copy) is in this rank's exports
  const ImportEntry* imports;  // [local rank][kExportSlots], host-mapped
  uint64_t* resolved_bases;    // [local rank][kExportSlots], this process's cache of resolved addresses
};

// shape.num_blocks: one block per channel (layout.num_channels).
void launch_dispatch(const Peers& peers, const Layout& layout, const DispatchArgs& args, const LaunchShape& shape,
                     cudaStream_t stream);

struct CombineArgs {
  const uint16_t* x;                           // [rows, hidden] bf16
  const float* topk_weights;                   // [rows, K] or null
  const uint16_t* bias_0;                      // [T, hidden] or null
  const uint16_t* bias_1;                      // [T, hidden] or null
  const int* recv_rdma_channel_prefix_matrix;  // [N, C]
  const int* recv_gbl_channel_prefix_matrix;   // [R, C]
  const int* recv_gbl_rank_prefix_sum;         // [R]
  const int* recv_rdma_rank_prefix_sum;        // [N]
  const int* send_rdma_head;                   // [T, N]
  const int* send_nvl_head;                    // [num_rdma_rows, Rn]
  int num_tokens, num_rows, hidden, num_topk, num_rdma_rows;
  int ring_slots, ring_chunk;                 // Q = num_max_nvl_chunked_recv_tokens, push chunk = ..._send_tokens
  int num_producer_warps, num_forward_warps;  // of the block's 16; the rest sum for the home rank
  uint16_t* combined_x;                       // [T, hidden]
  float* combined_topk_weights;               // [T, K] or null
  // In-place form (in_place): the node's ranks export their inputs to each other (runtime/input_exports.hpp, over
  // the node's ranks). Producers push, instead of rows, each row's index with where this rank's x and top-k weights
  // are in its exports (own_input); forwarders find them in this process through the import table and read the rows
  // where they are; a producer ends only once its forwarders have released every entry (so no input is freed or
  // retired while read).
  bool in_place;  // only where a ring entry holds kInPlaceEntryBytes (combine_row_stride)
  PullInput own_input;
  const ImportEntry* imports;  // [local rank][kExportSlots], host-mapped
  uint64_t* resolved_bases;    // [local rank][kExportSlots], this process's cache of resolved addresses
};

// The ring entry of the in-place combine: a row index and the producer's PullInput.
constexpr int64_t kInPlaceEntryBytes = 48;

// shape.num_blocks: one block per channel (layout.num_channels).
void launch_combine(const Peers& peers, const Layout& layout, const CombineArgs& args, const LaunchShape& shape,
                    cudaStream_t stream);

constexpr int kNumThreads = 512;
constexpr int kMaxRingsPerProducerWarp = 4;  // combine: rings (local ranks) one producer warp serves

// How the 16 warps of a block split into roles. The defaults suit 8 ranks per node; a testing aid
// (DEEP_EP_INTERNODE_WARPS="senders,producers,forwarders", read by the runtime) overrides them.
struct WarpSplit {
  int dispatch_senders = 4;
  int combine_producers = 4;
  int combine_forwarders = 6;
};
// Resident blocks per SM of the dispatch and combine kernels, for the co-residency check.
int max_resident_blocks_per_sm();
int max_resident_combine_blocks_per_sm();

}  // namespace deep_ep::internode
