// Buffer::internode_dispatch / internode_combine: validation (docs/design.md decision 7), the transport
// and co-residency checks (decisions 4 and 5), the GPU-to-CPU count handshake, output allocation and
// the kernel launches (csrc/kernels/internode/).
#include <algorithm>
#include <cstdlib>

#include "deep_ep/buffer.hpp"
#include "deep_ep/error.hpp"
#include "kernels/internode/internode.hpp"
#include "runtime/buffer_internals.hpp"
#include "runtime/internode_rings.hpp"
#include "runtime/internode_warps.hpp"
#include "runtime/normal_inputs.hpp"
#include "runtime/transport_launch.hpp"
#include "util/cuda_check.hpp"

namespace deep_ep {

namespace {

internode::Peers peers_of(const Buffer& b, Buffer::Internals& in) {
  return {in.peer_bases_device, in.nvl_payload_offset,  in.rdma_payload_offset,  b.rank(),     b.num_ranks(),
          b.num_nodes(),        b.num_ranks_per_node(), in.device_diagnostics(), in.timeout_ns};
}

void check_co_residency(const Buffer& b, int blocks, const char* op) {
  const int needed = blocks * b.num_ranks_per_device();
  const int capacity = b.num_device_sms() * internode::max_resident_blocks_per_sm();
  DEEP_EP_CHECK(needed <= capacity, op, ": config.num_sms=", blocks, " for each of the ", b.num_ranks_per_device(),
                " ranks sharing cuda:", b.device(), " needs ", needed, " resident blocks, but the GPU holds at most ",
                capacity, "; use a smaller num_sms");
}

void check_fits(const Buffer& b, const internode::Layout& layout, int64_t nvl_needed, const Config& config,
                const char* op) {
  DEEP_EP_CHECK(layout.rdma_bytes <= b.options().num_rdma_bytes, op, " needs ", layout.rdma_bytes,
                " bytes of RDMA buffer (num_sms=", config.num_sms,
                ", num_max_rdma_chunked_recv_tokens=", config.num_max_rdma_chunked_recv_tokens, ", rows of ",
                layout.row_stride, " bytes) but the Buffer has num_rdma_bytes=", b.options().num_rdma_bytes,
                "; size it with Config.get_rdma_buffer_size_hint");
  DEEP_EP_CHECK(nvl_needed <= b.options().num_nvl_bytes, op, " needs ", nvl_needed,
                " bytes of NVLink buffer but the Buffer has num_nvl_bytes=", b.options().num_nvl_bytes,
                "; size it with Config.get_nvl_buffer_size_hint");
}

void check_handle(const InternodeHandle& h, int R, int N, int Rn, int device, int64_t T, int C) {
  check_tensor(h.is_token_in_rank, "handle[0] (is_token_in_rank)", {DType::kBool, {T, R}, true, device});
  check_tensor(h.rdma_channel_prefix_matrix, "handle[1] (rdma_channel_prefix_matrix)",
               {DType::kInt32, {N, C}, true, device});
  check_tensor(h.gbl_channel_prefix_matrix, "handle[2] (gbl_channel_prefix_matrix)",
               {DType::kInt32, {R, C}, true, device});
  check_tensor(h.recv_rdma_channel_prefix_matrix, "handle[3] (recv_rdma_channel_prefix_matrix)",
               {DType::kInt32, {N, C}, true, device});
  check_tensor(h.recv_rdma_rank_prefix_sum, "handle[4] (recv_rdma_rank_prefix_sum)",
               {DType::kInt32, {N}, true, device});
  check_tensor(h.recv_gbl_channel_prefix_matrix, "handle[5] (recv_gbl_channel_prefix_matrix)",
               {DType::kInt32, {R, C}, true, device});
  check_tensor(h.recv_gbl_rank_prefix_sum, "handle[6] (recv_gbl_rank_prefix_sum)", {DType::kInt32, {R}, true, device});
  check_tensor(h.recv_src_meta, "handle[7] (recv_src_meta)", {DType::kInt32, {kAnySize, 2}, true, device});
  check_tensor(h.send_rdma_head, "handle[8] (send_rdma_head)", {DType::kInt32, {T, N}, true, device});
  check_tensor(h.send_nvl_head, "handle[9] (send_nvl_head)", {DType::kInt32, {kAnySize, Rn}, true, device});
}

// The handle's channel count is the dispatch's num_sms. Ring sizes are free: a handle holds stream
// positions, which do not depend on them.
void check_config_matches_handle(const InternodeHandle& h, const Config& config, const char* op) {
  const int64_t C = h.rdma_channel_prefix_matrix.dim() == 2 ? h.rdma_channel_prefix_matrix.size(1) : -1;
  DEEP_EP_CHECK(C == config.num_channels(), "config.num_sms=", config.num_sms, " differs from the handle's ", C,
                " channels: ", op, " must use the num_sms of the dispatch that made the handle");
}

// The warp roles of this op's blocks (DEEP_EP_INTERNODE_WARPS may override the defaults; read per call).
internode::WarpSplit warp_split(int num_ranks_per_node) {
  return internode_warp_split(num_ranks_per_node, std::getenv("DEEP_EP_INTERNODE_WARPS"));
}

void check_ring_slots(const Config& config, const char* op) {
  DEEP_EP_CHECK(config.num_max_rdma_chunked_recv_tokens >= internode::kMinRingSlots, op,
                " needs config.num_max_rdma_chunked_recv_tokens >= ", internode::kMinRingSlots,
                " (the rows of each channel's ring per node), got ", config.num_max_rdma_chunked_recv_tokens);
}

}  // namespace

void Buffer::prepare_internode_state(cudaStream_t stream, const char* op) {
  auto& in = *internals_;
  DEEP_EP_CHECK(!in.ll_receive_pending[0] && !in.ll_receive_pending[1], op,
                ": a low-latency result still waits for "
                "its receive hook, and this op reuses the RDMA buffer it is in; call the hook first");
  if (in.rdma_payload_users.internode_state_needs_reset()) {
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    DEEP_EP_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
    DEEP_EP_CHECK(capture == cudaStreamCaptureStatusNone, op, ": the first internode op after low-latency ops (or ",
                  "clean_low_latency_buffer) restores the internode state between group barriers, which a CUDA graph "
                  "cannot capture; run one internode op before capturing");
    // Nobody may still write into this rank's payload (low-latency puts), and nobody may signal before
    // every rank has restored its signals.
    DEEP_EP_CUDA_CHECK(cudaDeviceSynchronize());
    group_->barrier();
    if (!in.uses_gin()) {
      // P2P signals are memory the low-latency ops overwrote. Between ops every signal is zero but the
      // done signal, which counts num_ranks per op finished (common.cuh); internode_ops counts the same
      // ops and the NVLink flags are tagged with it, so it stays and the done signal is rebuilt from it.
      // GIN signals are NCCL's, in a range of their own (gin_signals.hpp): the low-latency ops left them alone.
      const auto layout = internode::Layout::make(num_nodes(), num_ranks_per_node(), num_device_sms_, 1, 16);
      char* signals = in.local_base + in.rdma_payload_offset + layout.signals_offset;
      const int64_t bytes =
          std::min<int64_t>(8 * int64_t(layout.num_signals()), options_.num_rdma_bytes - layout.signals_offset);
      int ops = 0;
      DEEP_EP_CUDA_CHECK(cudaMemcpy(&ops, &reinterpret_cast<ControlRegion*>(in.local_base)->internode_ops, sizeof(ops),
                                    cudaMemcpyDeviceToHost));
      const uint64_t done = static_cast<uint64_t>(ops) * num_ranks_;
      DEEP_EP_CUDA_CHECK(cudaMemset(signals, 0, bytes));
      DEEP_EP_CUDA_CHECK(cudaMemcpy(signals + 8 * layout.signal_done(), &done, sizeof(done), cudaMemcpyHostToDevice));
      DEEP_EP_CUDA_CHECK(cudaDeviceSynchronize());
    }
    group_->barrier();
    in.rdma_payload_users.internode_state_reset();
  }
  in.rdma_payload_users.internode_op_launched();
}

IntranodeDispatchResult Buffer::internode_dispatch(const InternodeDispatchArgs& a, const Allocator& allocate,
                                                   cudaStream_t stream) {
  check_device_errors();
  auto& in = *internals_;
  const int R = num_ranks_, N = num_nodes(), Rn = num_ranks_per_node(), device = options_.device;
  DEEP_EP_CHECK(N > 1, "internode dispatch needs ranks on several nodes; this group has one node: use dispatch");
  const Config& config = a.config;
  const int C = config.num_channels(), capacity = config.num_max_rdma_chunked_recv_tokens;
  const NormalDispatchShape shape = check_normal_dispatch_inputs(a.x, a.x_scales, a.topk_idx, a.topk_weights,
                                                                 a.num_worst_tokens, a.expert_alignment, device);
  const bool fp8 = shape.fp8;
  const int64_t T = shape.num_tokens, H = shape.hidden, row_bytes = shape.row_bytes;
  const int num_scales = shape.num_scales, num_topk = shape.num_topk;
  const int64_t scale_token_stride = shape.scale_token_stride, scale_channel_stride = shape.scale_channel_stride;
  // Channels are equal token ranges streamed through rings of `capacity` rows: any token count fits.
  check_ring_slots(config, "internode dispatch");
  DEEP_EP_CHECK(T <= INT32_MAX / 2, "internode dispatch takes at most ", INT32_MAX / 2, " tokens per rank, got ", T);

  // ---- routing: layout (non-cached) or handle (cached) ------------------------------------------------
  const bool cached = a.handle.has_value();
  int num_experts = 0;
  if (cached) {
    DEEP_EP_CHECK(!a.topk_idx, "cached dispatch (with a handle) takes no topk_idx/topk_weights");
    DEEP_EP_CHECK(!a.num_tokens_per_rank && !a.num_tokens_per_expert,
                  "cached dispatch (with a handle) takes no layout arguments");
    check_config_matches_handle(*a.handle, config, "cached dispatch");
    check_handle(*a.handle, R, N, Rn, device, T, C);
  } else {
    DEEP_EP_CHECK(a.num_tokens_per_rank && a.is_token_in_rank && a.num_tokens_per_expert,
                  "dispatch without a handle needs num_tokens_per_rank, is_token_in_rank and num_tokens_per_expert "
                  "(from get_dispatch_layout)");
    check_tensor(*a.num_tokens_per_rank, "num_tokens_per_rank", {DType::kInt32, {R}, true, device});
    if (a.num_tokens_per_rdma_rank)
      check_tensor(*a.num_tokens_per_rdma_rank, "num_tokens_per_rdma_rank", {DType::kInt32, {N}, true, device});
    check_tensor(*a.is_token_in_rank, "is_token_in_rank", {DType::kBool, {T, R}, true, device});
    DEEP_EP_CHECK(a.num_tokens_per_expert->dim() == 1, "num_tokens_per_expert must be 1-D, got ",
                  a.num_tokens_per_expert->describe());
    num_experts = static_cast<int>(a.num_tokens_per_expert->size(0));
    check_tensor(*a.num_tokens_per_expert, "num_tokens_per_expert", {DType::kInt32, {num_experts}, true, device});
    DEEP_EP_CHECK(num_experts > 0 && num_experts % R == 0 && num_experts / R <= kMaxLocalExperts,
                  "num_tokens_per_expert must have num_experts entries, a multiple of num_ranks=", R, " with at most ",
                  kMaxLocalExperts, " per rank; got ", num_experts);
    DEEP_EP_CHECK(a.num_worst_tokens == 0 || a.topk_idx, "num_worst_tokens > 0 requires topk_idx and topk_weights");
  }
  DEEP_EP_CHECK(N <= internode::kMaxInternodeNodes && R <= internode::kMaxInternodeRanks && Rn <= 32,
                "internode mode supports at most ", internode::kMaxInternodeNodes, " nodes, ",
                internode::kMaxInternodeRanks, " ranks and 32 ranks per node; got ", N, " nodes of ", Rn);

  const auto row = internode::RowLayout::make(row_bytes, num_scales, num_topk);
  // The buffer holds the config's rings (the size hints say so); the op may cycle through fewer of their rows.
  const auto config_layout = internode::Layout::make(N, Rn, C, capacity, row.stride);
  check_fits(*this, config_layout, config_layout.nvl_fixed_bytes, config, "internode dispatch");
  const InternodeDispatchRing ring = internode_dispatch_ring(in.max_ranks_per_device, capacity, N, C, row.stride,
                                                             config.num_max_rdma_chunked_send_tokens, in.min_l2_bytes);
  const auto layout = internode::Layout::make(N, Rn, C, ring.num_rows, row.stride);
  internals_->require_reach(rank(), "internode dispatch");
  check_co_residency(*this, std::max(C, N + 1), "internode dispatch");
  DEEP_EP_CUDA_CHECK(cudaSetDevice(device));
  const auto peers = peers_of(*this, in);
  prepare_internode_state(stream, "internode dispatch");  // after every check: it may be collective

  IntranodeDispatchResult result;
  InternodeHandle h;
  int64_t num_rdma_rows = 0;  // rows this rank receives over the network, as its node's forwarder
  if (cached) {
    h = *a.handle;
    result.num_rows = static_cast<int>(h.recv_src_meta.size(0));
    num_rdma_rows = h.send_nvl_head.size(0);
    transport_launch::internode_cached_notify(in, peers, layout, stream);
  } else {
    h.is_token_in_rank = *a.is_token_in_rank;
    h.rdma_channel_prefix_matrix = allocate("rdma_channel_prefix_matrix", DType::kInt32, {N, C});
    h.gbl_channel_prefix_matrix = allocate("gbl_channel_prefix_matrix", DType::kInt32, {R, C});
    h.recv_rdma_channel_prefix_matrix = allocate("recv_rdma_channel_prefix_matrix", DType::kInt32, {N, C});
    h.recv_rdma_rank_prefix_sum = allocate("recv_rdma_rank_prefix_sum", DType::kInt32, {N});
    h.recv_gbl_channel_prefix_matrix = allocate("recv_gbl_channel_prefix_matrix", DType::kInt32, {R, C});
    h.recv_gbl_rank_prefix_sum = allocate("recv_gbl_rank_prefix_sum", DType::kInt32, {R});
    h.send_rdma_head = allocate("send_rdma_head", DType::kInt32, {T, N});
    internode::NotifyArgs n{};
    n.is_token_in_rank = a.is_token_in_rank->ptr<bool>();
    n.num_tokens_per_expert = a.num_tokens_per_expert->ptr<int>();
    n.num_tokens = static_cast<int>(T);
    n.num_experts = num_experts;
    n.expert_alignment = a.expert_alignment;
    n.rdma_channel_prefix_matrix = h.rdma_channel_prefix_matrix.ptr<int>();
    n.gbl_channel_prefix_matrix = h.gbl_channel_prefix_matrix.ptr<int>();
    n.recv_rdma_channel_prefix_matrix = h.recv_rdma_channel_prefix_matrix.ptr<int>();
    n.recv_rdma_rank_prefix_sum = h.recv_rdma_rank_prefix_sum.ptr<int>();
    n.recv_gbl_channel_prefix_matrix = h.recv_gbl_channel_prefix_matrix.ptr<int>();
    n.recv_gbl_rank_prefix_sum = h.recv_gbl_rank_prefix_sum.ptr<int>();
    n.host = in.next_host_counts();
    transport_launch::internode_notify(in, peers, layout, n, stream);
    if (a.num_worst_tokens > 0) {
      result.num_rows = a.num_worst_tokens;
      // Every row this forwarder receives goes to some rank of its node, and each of them receives at most
      // num_worst_tokens rows: a bound known without waiting for the counts.
      num_rdma_rows = int64_t(Rn) * a.num_worst_tokens;
    } else {
      in.wait_for_notify_counts(*this, "internode dispatch");
      result.num_rows = in.host->num_recv_tokens;
      num_rdma_rows = in.host->num_rdma_recv_tokens;
      const int L = num_experts / R;
      result.num_recv_tokens_per_expert.assign(in.host->num_recv_tokens_per_expert,
                                               in.host->num_recv_tokens_per_expert + L);
    }
    h.send_nvl_head = allocate("send_nvl_head", DType::kInt32, {num_rdma_rows, Rn});
  }
  const int64_t rows = result.num_rows;
  TensorView recv_x = allocate("recv_x", a.x.dtype, {rows, H});
  TensorView recv_x_scales, recv_topk_idx, recv_topk_weights;
  if (fp8) recv_x_scales = allocate("recv_x_scales", DType::kFloat32, {rows, num_scales});
  if (num_topk) {
    recv_topk_idx = allocate("recv_topk_idx", DType::kInt64, {rows, num_topk});
    recv_topk_weights = allocate("recv_topk_weights", DType::kFloat32, {rows, num_topk});
  }
  if (!cached) h.recv_src_meta = allocate("recv_src_meta", DType::kInt32, {rows, 2});
  if (a.num_worst_tokens > 0 && !cached) {
    // Rows past the real count: top-k ids -1 and weights 0 (docs/compatibility.md section 6); source meta -1.
    if (num_topk) {
      DEEP_EP_CUDA_CHECK(cudaMemsetAsync(recv_topk_idx.data, 0xff, rows * num_topk * sizeof(int64_t), stream));
      DEEP_EP_CUDA_CHECK(cudaMemsetAsync(recv_topk_weights.data, 0, rows * num_topk * sizeof(float), stream));
    }
    DEEP_EP_CUDA_CHECK(cudaMemsetAsync(h.recv_src_meta.data, 0xff, rows * 2 * sizeof(int), stream));
  }

  // Own-node push where the node's ranks export their outputs to each other (the in-place combine's exports, made on
  // every rank or none) and DEEP_EP_INTERNODE_OWN_NODE_PUSH asks for it for this dtype (the same on every rank): the
  // senders store rows for the own node straight into recv_x, exported here (or staged, and copied out after the
  // kernel).
  const bool push_requested =
      in.internode_own_node_push == OwnNodePush::kAll || (in.internode_own_node_push == OwnNodePush::kBf16 && !fp8);
  const bool own_node_push = push_requested && in.input_exports != nullptr && Rn <= kNumMaxNvlPeers;
  void* pushed_outputs[kNumPushOutputs] = {recv_x.data, nullptr, nullptr, nullptr, nullptr};
  const size_t pushed_bytes[kNumPushOutputs] = {static_cast<size_t>(rows * row_bytes), 0, 0, 0, 0};
  OutputPlacement placement{};
  if (own_node_push)
    placement = in.export_outputs_or_poison("internode dispatch", pushed_outputs, pushed_bytes, stream);

  internode::DispatchArgs d{};
  d.x = a.x.ptr<uint8_t>();
  d.x_scales = fp8 ? a.x_scales->ptr<float>() : nullptr;
  d.scale_token_stride = scale_token_stride;
  d.scale_channel_stride = scale_channel_stride;
  d.topk_idx = num_topk ? a.topk_idx->ptr<int64_t>() : nullptr;
  d.topk_weights = num_topk ? a.topk_weights->ptr<float>() : nullptr;
  d.is_token_in_rank = h.is_token_in_rank.ptr<bool>();
  d.rdma_channel_prefix_matrix = h.rdma_channel_prefix_matrix.ptr<int>();
  d.gbl_channel_prefix_matrix = h.gbl_channel_prefix_matrix.ptr<int>();
  d.recv_rdma_channel_prefix_matrix = h.recv_rdma_channel_prefix_matrix.ptr<int>();
  d.recv_gbl_channel_prefix_matrix = h.recv_gbl_channel_prefix_matrix.ptr<int>();
  d.recv_gbl_rank_prefix_sum = h.recv_gbl_rank_prefix_sum.ptr<int>();
  d.recv_rdma_rank_prefix_sum = h.recv_rdma_rank_prefix_sum.ptr<int>();
  d.send_chunk = ring.round_tokens;
  d.num_sender_warps = warp_split(Rn).dispatch_senders;
  d.num_rdma_rows = static_cast<int>(num_rdma_rows);
  d.num_tokens = static_cast<int>(T);
  d.row_bytes = static_cast<int>(row_bytes);
  d.num_scales = num_scales;
  d.num_topk = num_topk;
  d.num_experts = num_experts;
  d.cached = cached;
  d.num_rows = static_cast<int>(rows);
  d.recv_x = own_node_push ? static_cast<uint8_t*>(placement.local[kPushRecvX]) : recv_x.ptr<uint8_t>();
  d.recv_x_scales = fp8 ? recv_x_scales.ptr<float>() : nullptr;
  d.recv_topk_idx = num_topk ? recv_topk_idx.ptr<int64_t>() : nullptr;
  d.recv_topk_weights = num_topk ? recv_topk_weights.ptr<float>() : nullptr;
  d.recv_src_meta = h.recv_src_meta.ptr<int>();
  d.send_rdma_head = h.send_rdma_head.ptr<int>();
  d.send_nvl_head = h.send_nvl_head.ptr<int>();
  d.own_node_push = own_node_push;
  if (own_node_push) {
    d.own_recv_x = placement.refs[kPushRecvX];
    d.imports = in.input_exports->device_imports();
    d.resolved_bases = in.input_exports->device_resolved_bases();
  }
  LaunchShape launch_shape;
  launch_shape.num_blocks = layout.num_channels;  // one block per channel
  transport_launch::internode_dispatch(in, peers, layout, d, launch_shape, stream);
  if (own_node_push) in.input_exports->copy_staged_outputs(placement, pushed_outputs, pushed_bytes, stream);
  last_dispatch_pushed_ = own_node_push;
  return result;
}

void Buffer::internode_combine(const InternodeCombineArgs& a, const Allocator& allocate, cudaStream_t stream) {
  check_device_errors();
  auto& in = *internals_;
  const int R = num_ranks_, N = num_nodes(), Rn = num_ranks_per_node(), device = options_.device;
  DEEP_EP_CHECK(N > 1, "internode combine needs ranks on several nodes; this group has one node: use combine");
  const Config& config = a.config;
  const int C = config.num_channels(), capacity = config.num_max_rdma_chunked_recv_tokens;
  const InternodeHandle& h = a.handle;
  DEEP_EP_CHECK(h.is_token_in_rank.dim() == 2, "handle[0] (is_token_in_rank) must be 2-D, got ",
                h.is_token_in_rank.describe());
  const int64_t T = h.is_token_in_rank.size(0);
  check_config_matches_handle(h, config, "combine");
  check_handle(h, R, N, Rn, device, T, C);
  check_ring_slots(config, "internode combine");
  const NormalCombineShape shape = check_normal_combine_inputs(a.x, a.topk_weights, a.bias_0, a.bias_1, T, device);
  const int64_t rows = shape.num_rows, H = shape.hidden;
  const int num_topk = shape.num_topk;
  DEEP_EP_CHECK(rows == h.recv_src_meta.size(0), "x must have one row per row of the dispatch's outputs (",
                h.recv_src_meta.size(0), "), got ", rows);

  const int ring_slots = config.num_max_nvl_chunked_recv_tokens;
  DEEP_EP_CHECK(ring_slots >= 16,
                "internode combine needs config.num_max_nvl_chunked_recv_tokens >= 16 (its ring "
                "rows per channel and local rank), got ",
                ring_slots);
  const int64_t stride = internode::combine_row_stride(H, num_topk);
  const auto layout = internode::Layout::make(N, Rn, C, capacity, stride);
  check_fits(*this, layout, layout.nvl_fixed_bytes + internode::combine_ring_bytes(C, Rn, ring_slots, stride), config,
             "internode combine");
  internals_->require_reach(rank(), "internode combine");
  check_co_residency(*this, C, "internode combine");
  DEEP_EP_CUDA_CHECK(cudaSetDevice(device));

  TensorView combined_x = allocate("combined_x", DType::kBFloat16, {T, H});
  TensorView combined_topk_weights;
  if (num_topk) combined_topk_weights = allocate("combined_topk_weights", DType::kFloat32, {T, num_topk});

  internode::CombineArgs c{};
  c.x = a.x.ptr<uint16_t>();
  c.topk_weights = num_topk ? a.topk_weights->ptr<float>() : nullptr;
  c.bias_0 = a.bias_0 ? a.bias_0->ptr<uint16_t>() : nullptr;
  c.bias_1 = a.bias_1 ? a.bias_1->ptr<uint16_t>() : nullptr;
  c.recv_rdma_channel_prefix_matrix = h.recv_rdma_channel_prefix_matrix.ptr<int>();
  c.recv_gbl_channel_prefix_matrix = h.recv_gbl_channel_prefix_matrix.ptr<int>();
  c.recv_gbl_rank_prefix_sum = h.recv_gbl_rank_prefix_sum.ptr<int>();
  c.recv_rdma_rank_prefix_sum = h.recv_rdma_rank_prefix_sum.ptr<int>();
  c.num_rdma_rows = static_cast<int>(h.send_nvl_head.size(0));
  c.ring_slots = ring_slots;
  const internode::WarpSplit split = warp_split(Rn);
  c.num_producer_warps = split.combine_producers;
  c.num_forward_warps = split.combine_forwarders;
  const int min_ring_slots = internode_combine_min_ring_slots(split);
  DEEP_EP_CHECK(capacity >= min_ring_slots,
                "internode combine needs config.num_max_rdma_chunked_recv_tokens >= ", min_ring_slots,
                " with its warp split, got ", capacity);
  c.ring_chunk = config.num_max_nvl_chunked_send_tokens;
  c.send_rdma_head = h.send_rdma_head.ptr<int>();
  c.send_nvl_head = h.send_nvl_head.ptr<int>();
  c.num_tokens = static_cast<int>(T);
  c.num_rows = static_cast<int>(rows);
  c.hidden = static_cast<int>(H);
  c.num_topk = num_topk;
  c.combined_x = combined_x.ptr<uint16_t>();
  c.combined_topk_weights = num_topk ? combined_topk_weights.ptr<float>() : nullptr;
  // In place where the buffer made the node's input exports (the same on every rank of a node): this call's
  // inputs are exported, or staged, here; the forwarders of the node find them without the host.
  c.in_place = in.internode_in_place && in.input_exports != nullptr && stride >= internode::kInPlaceEntryBytes;
  // The state first: its barrier (after low-latency ops) must be met by every rank, whatever the export does.
  prepare_internode_state(stream, "internode combine");
  if (c.in_place) {
    c.imports = in.input_exports->device_imports();
    c.resolved_bases = in.input_exports->device_resolved_bases();
    c.own_input = in.export_or_poison("internode combine", a.x.data, static_cast<size_t>(rows * H * 2),
                                      num_topk ? a.topk_weights->data : nullptr,
                                      static_cast<size_t>(rows * num_topk * 4), rows > 0, stream);
  }
  last_combine_in_place_ = c.in_place;
  const auto peers = peers_of(*this, in);
  transport_launch::internode_cached_notify(in, peers, layout, stream);
  LaunchShape launch_shape;
  launch_shape.num_blocks = layout.num_channels;  // one block per channel
  transport_launch::internode_combine(in, peers, layout, c, launch_shape, stream);
}

}  // namespace deep_ep
