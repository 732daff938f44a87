// The host runtime of one rank: its communication buffer, its peers' buffers opened through CUDA IPC,
// host-mapped counters for GPU-to-CPU handshakes, and the ops that launch kernels on a given stream.
// Torch-free: tensors come in as TensorView and outputs are allocated through an Allocator.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "deep_ep/config.hpp"
#include "deep_ep/group.hpp"
#include "deep_ep/low_latency.hpp"
#include "deep_ep/tensor.hpp"

namespace deep_ep {

struct DeviceDiagnostics;
struct HostMapped;

struct BufferOptions {
  int64_t num_nvl_bytes = 0;
  int64_t num_rdma_bytes = 0;
  bool low_latency_mode = false;
  int num_qps_per_rank = 24;
  bool allow_nvlink_for_low_latency_mode = true;
  bool allow_mnnvl = false;
  bool use_fabric = false;
  bool explicitly_destroy = false;
  bool enable_shrink = false;
  int device = 0;        // CUDA ordinal this rank runs on
  double timeout_s = 0;  // bound of every device and host wait; 0 = DEEP_EP_TIMEOUT_S or 60 s
  // A live allocation of the framework's allocator (the Python layer passes a torch tensor's address), or 0. The
  // in-place forms (intranode push dispatch and pull combine, internode combine in place and own-node push) reach
  // framework tensors through CUDA IPC. Where any rank's probe cannot be exported (torch's expandable_segments,
  // cudaMallocAsync pools) every tensor would be staged, an extra pass that makes them slower than the rings, so
  // every rank uses the rings.
  int64_t allocator_probe_address = 0;
  // GIN builds, asked only when a peer is on another host: the address of an ncclComm_t over the group
  // in its rank order (torch's ProcessGroupNCCL), or 0 (or no function) to create one from a unique id
  // sent over the group. Ignored by builds without GIN.
  std::function<int64_t()> nccl_comm_address;
};

// Allocates an output named `name` (e.g. "recv_x") of the given dtype and shape on this rank's device,
// ordered on the stream the op runs on. The Python layer hands out torch tensors.
using Allocator = std::function<TensorView(const std::string& name, DType dtype, const std::vector<int64_t>& shape)>;

struct LayoutOutputs {
  TensorView num_tokens_per_rank;                      // int32 [R]
  std::optional<TensorView> num_tokens_per_rdma_rank;  // int32 [num_nodes] when num_nodes() > 1
  TensorView num_tokens_per_expert;                    // int32 [E]
  TensorView is_token_in_rank;                         // bool [T, R]
};

// Normal-mode intranode dispatch (docs/compatibility.md section 6). Either the layout (non-cached) or the handle
// (cached) is given. Outputs are allocated through the Allocator under the names recv_x,
// recv_x_scales, recv_topk_idx, recv_topk_weights, and (non-cached) the handle's rank_prefix_matrix,
// channel_prefix_matrix, recv_channel_prefix_matrix, recv_src_idx, send_head.
struct IntranodeHandle {
  TensorView rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix, recv_src_idx, is_token_in_rank,
      send_head;
};

struct IntranodeDispatchArgs {
  TensorView x;                        // bf16 [T, H], or e4m3 [T, H] with x_scales
  std::optional<TensorView> x_scales;  // float32 [T, H / 128], any strides
  std::optional<TensorView> topk_idx, topk_weights;
  std::optional<TensorView> num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert;
  std::optional<IntranodeHandle> handle;  // cached mode
  int expert_alignment = 1;
  int num_worst_tokens = 0;
  Config config;
};

struct IntranodeDispatchResult {
  int num_rows = 0;                             // rows of the outputs
  std::vector<int> num_recv_tokens_per_expert;  // empty in cached and num_worst_tokens modes
};

struct IntranodeCombineArgs {
  TensorView x;                              // bf16 [N, H]
  std::optional<TensorView> topk_weights;    // float32 [N, K]
  std::optional<TensorView> bias_0, bias_1;  // bf16 [T, H]
  IntranodeHandle handle;
  Config config;
};

// Normal-mode internode dispatch and combine (docs/compatibility.md sections 6 and 7, internode form): the ranks form
// nodes (deep_ep/topology.hpp); a token crosses to each destination node once, to the rank with the
// source's local index there (its forwarder), and the ranks of that node read it from the forwarder by
// load/store. Combine sums each token's rows inside every node first (on the forwarder, rounded to
// bf16), then across nodes on the token's home rank. With C channels (config.num_sms), N nodes, Rn
// ranks per node and cap = config.num_max_rdma_chunked_recv_tokens, the handle is V1's 10-tuple:
struct InternodeHandle {
  TensorView is_token_in_rank;                 // bool [T, R] (the layout's)
  TensorView rdma_channel_prefix_matrix;       // int32 [N, C]: tokens this rank sends to node n, channels <= c
  TensorView gbl_channel_prefix_matrix;        // int32 [R, C]: tokens this rank sends to rank r, channels <= c
  TensorView recv_rdma_channel_prefix_matrix;  // int32 [N, C]: rows this forwarder got from node n, channels <= c
  TensorView recv_rdma_rank_prefix_sum;        // int32 [N]: rows this forwarder got from nodes <= n
  TensorView recv_gbl_channel_prefix_matrix;   // int32 [R, C]: rows received from rank r, channels <= c
  TensorView recv_gbl_rank_prefix_sum;  // int32 [R]: rows received from ranks <= r (docs/compatibility.md section 6)
  TensorView recv_src_meta;             // int32 [rows, 2]: (source token, forwarder slot) per row
  TensorView send_rdma_head;            // int32 [T, N]: slot of token t in node n's forwarder, or -1
  TensorView send_nvl_head;             // int32 [N * C * cap, Rn]: per forwarder slot, the position of
                                        //   local rank j's row in j's combine stream, or -1
};

// Outputs are allocated under the names recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights and
// (non-cached) the handle's names above, is_token_in_rank excepted.
struct InternodeDispatchArgs {
  TensorView x;
  std::optional<TensorView> x_scales;
  std::optional<TensorView> topk_idx, topk_weights;
  std::optional<TensorView> num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank, num_tokens_per_expert;
  std::optional<InternodeHandle> handle;  // cached mode
  int expert_alignment = 1;
  int num_worst_tokens = 0;
  Config config;
};

struct InternodeCombineArgs {
  TensorView x;                            // bf16 [rows, H]
  std::optional<TensorView> topk_weights;  // float32 [rows, K]
  std::optional<TensorView> bias_0, bias_1;
  InternodeHandle handle;
  Config config;
};

class Buffer {
 public:
  // Collective over `group`.
  Buffer(std::shared_ptr<Group> group, const BufferOptions& options);
  ~Buffer();
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  // Synchronizes the device, barriers with the peers, releases memory. Collective.
  void destroy();
  bool is_available() const { return available_; }

  int rank() const { return rank_; }
  int num_ranks() const { return num_ranks_; }
  int device() const { return options_.device; }
  int num_device_sms() const { return num_device_sms_; }
  // Ranks of this group whose buffers live on the same GPU as this rank's (this rank included).
  int num_ranks_per_device() const { return num_ranks_per_device_; }
  const BufferOptions& options() const { return options_; }

  // This rank's payload bytes (after the control region), for get_local_buffer_tensor.
  void* local_nvl_buffer() const;
  void* local_rdma_buffer() const;

  // Raises if a kernel reported an error (expert id out of range, timeout) since the last check, or if
  // an earlier timeout poisoned the buffer.
  void check_device_errors();

  // ---- ops ------------------------------------------------------------------------------------
  void get_dispatch_layout(const TensorView& topk_idx, int num_experts, const LayoutOutputs& outputs,
                           cudaStream_t stream);

  // Allocates through `allocate` on this rank's device; kernels run on `stream`. Stores each token straight into the
  // outputs of the ranks it goes to where it can (README: "Dispatch and combine in place"), else runs the ring
  // dispatch.
  IntranodeDispatchResult intranode_dispatch(const IntranodeDispatchArgs& args, const Allocator& allocate,
                                             cudaStream_t stream);
  // Allocates combined_x [T, H] and, with topk_weights, combined_topk_weights [T, K]. Pulls each token's
  // rows straight out of the expert ranks' x where it can (README: "Dispatch and combine in place"), else runs the ring
  // combine.
  void intranode_combine(const IntranodeCombineArgs& args, const Allocator& allocate, cudaStream_t stream);
  // Whether the last dispatch pushed: intranode, the push dispatch ran (not the ring); internode, the own node's rows
  // went straight into its ranks' outputs (not through the own ring). False before the first dispatch.
  bool last_dispatch_pushed() const { return last_dispatch_pushed_; }
  // Whether the last intranode_combine pulled (false before the first, or when it ran the ring combine).
  bool last_combine_pulled() const { return last_combine_pulled_; }
  // Whether the last internode combine read the node's inputs in place (DEEP_EP_INTERNODE_IN_PLACE).
  bool last_combine_in_place() const { return last_combine_in_place_; }
  // Whether CUDA IPC exported every rank's allocator probe (BufferOptions::allocator_probe_address); where not, no
  // op takes the in-place forms.
  bool tensors_exportable() const;

  // Nodes of this group (1 = every op is intranode). Internode ops need num_nodes() > 1.
  int num_nodes() const;
  int num_ranks_per_node() const;
  IntranodeDispatchResult internode_dispatch(const InternodeDispatchArgs& args, const Allocator& allocate,
                                             cudaStream_t stream);
  void internode_combine(const InternodeCombineArgs& args, const Allocator& allocate, cudaStream_t stream);

  // ---- low-latency mode (docs/compatibility.md section 8): needs low_latency_mode and num_rdma_bytes >= the hint ----
  // Each call uses the next of the two buffer halves. With return_recv_hook the call launches only
  // the send and returns the pending receive; otherwise it launches both and returns nullptr.
  std::shared_ptr<LowLatencyPendingReceive> low_latency_dispatch(const LowLatencyDispatchArgs& args,
                                                                 const Allocator& allocate, cudaStream_t stream);
  std::shared_ptr<LowLatencyPendingReceive> low_latency_combine(const LowLatencyCombineArgs& args,
                                                                const Allocator& allocate, cudaStream_t stream);
  // Launches a pending receive on `stream`; a second call for the same receive raises.
  void low_latency_receive(LowLatencyPendingReceive& pending, cudaStream_t stream);
  // The bf16 [L, S, H] rows a zero-copy combine of `handle` reads: the pointer and the row stride in
  // elements (expert stride = S * row stride). They lie in the half the next low-latency call uses.
  std::pair<void*, int64_t> next_low_latency_combine_buffer(const LowLatencyHandle& handle) const;
  // Resets the signalling state of both halves (collective; synchronizes the device). Needed after
  // internode normal ops on the same buffer (a low-latency op refuses to run otherwise) and after a
  // masked rank rejoins.
  void clean_low_latency_buffer(int num_max_dispatch_tokens_per_rank, int hidden, int num_experts);
  // enable_shrink only. A masked rank is neither sent to nor waited for; ops run on `stream`.
  void low_latency_update_mask(int rank_to_mask, bool mask, cudaStream_t stream);
  void low_latency_query_mask(const TensorView& mask_status, cudaStream_t stream);  // int32 [R], 1 = masked
  void low_latency_clean_mask(cudaStream_t stream);

  // Internal access for op implementations (csrc/runtime/*_op.cpp).
  struct Internals;
  Internals& internals() { return *internals_; }
  const Internals& internals() const { return *internals_; }

 private:
  void release(bool collective);
  // Before an internode op's first launch: refuses while a low-latency receive hook is pending, and
  // after low-latency ops restores the internode state they overwrote (collective; see
  // runtime/rdma_payload_users.hpp).
  void prepare_internode_state(cudaStream_t stream, const char* op);

  std::shared_ptr<Group> group_;
  BufferOptions options_;
  int rank_ = 0, num_ranks_ = 1;
  int num_device_sms_ = 0;
  int num_ranks_per_device_ = 1;
  bool last_dispatch_pushed_ = false;
  bool last_combine_pulled_ = false;
  bool last_combine_in_place_ = false;
  bool available_ = false;
  std::unique_ptr<Internals> internals_;
};

}  // namespace deep_ep
