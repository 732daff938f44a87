// Buffer's low-latency ops (docs/compatibility.md section 8): validation (docs/design.md decision 7), the choice of
// buffer half, output allocation, the grid sized for the ranks sharing the GPU (decision 5), and the send / receive
// launches. Nothing here waits on the GPU, so every op can be captured in a CUDA graph.
#include <algorithm>

#include "deep_ep/buffer.hpp"
#include "deep_ep/error.hpp"
#include "kernels/low_latency/low_latency.hpp"
#include "runtime/buffer_internals.hpp"
#include "runtime/transport_launch.hpp"
#include "util/cuda_check.hpp"

namespace deep_ep {

namespace {

constexpr int kMaxSharedBytes = 160 * 1024;

// A receive half waiting for its launch. It carries everything the kernel needs, so that it can be
// launched on whatever stream is current when the caller completes it.
struct PendingReceive final : LowLatencyPendingReceive {
  bool is_dispatch = true;
  low_latency::Peers peers{};
  low_latency::HalfLayout layout{};
  low_latency::DispatchArgs dispatch{};
  low_latency::CombineArgs combine{};
  int num_blocks = 0;
  bool launched = false;
  const Buffer* owner = nullptr;

  void launch(int phases, cudaStream_t stream) const {
    const Buffer::Internals& in = owner->internals();
    LaunchShape shape;
    shape.num_blocks = num_blocks;
    shape.phases = phases;
    if (is_dispatch) {
      transport_launch::low_latency_dispatch(in, peers, layout, dispatch, shape, stream);
    } else {
      transport_launch::low_latency_combine(in, peers, layout, combine, shape, stream);
    }
  }
};

// Launches the send, and the receive too unless the caller asked for a hook; then the pending receive
// is returned and its half stays reserved until it is launched.
std::shared_ptr<LowLatencyPendingReceive> start(std::shared_ptr<PendingReceive> pending, bool return_recv_hook,
                                                Buffer::Internals& in, int device, cudaStream_t stream) {
  DEEP_EP_CUDA_CHECK(cudaSetDevice(device));
  in.rdma_payload_users.low_latency_op_launched();
  if (!return_recv_hook) {
    pending->launch(low_latency::kSendAndReceive, stream);
    return nullptr;
  }
  pending->launch(low_latency::kSend, stream);
  in.ll_receive_pending[pending->peers.half] = true;
  return pending;
}

struct Geometry {
  int R, L, M, H, E;
  int64_t S;
  low_latency::HalfLayout layout;
};

Geometry check_geometry(const Buffer& b, int M, int H, int E, const char* op) {
  const int R = b.num_ranks();
  DEEP_EP_CHECK(b.options().low_latency_mode, op, " needs a Buffer created with low_latency_mode=True");
  DEEP_EP_CHECK(R <= kMaxLowLatencyRanks, op, " supports up to ", kMaxLowLatencyRanks,
                " ranks over load/store peers in this build, the group has ", R);
  // Peers on other nodes (or all peers without NVLink) go through the transport.
  b.internals().require_reach(b.rank(), op);
  DEEP_EP_CHECK(M > 0, op, ": num_max_dispatch_tokens_per_rank must be positive, got ", M);
  DEEP_EP_CHECK(static_cast<int64_t>(R) * M % 4 == 0, op, ": num_ranks * num_max_dispatch_tokens_per_rank must be a ",
                "multiple of 4, got ", R, " * ", M);
  DEEP_EP_CHECK(H > 0 && H % 128 == 0, op, ": hidden must be a positive multiple of 128, got ", H);
  DEEP_EP_CHECK(E > 0 && E % R == 0, op, ": num_experts must be a positive multiple of num_ranks=", R, ", got ", E);
  DEEP_EP_CHECK(E / R <= kMaxLocalExperts, op, ": at most ", kMaxLocalExperts, " local experts, got ", E / R);
  Geometry g{R, E / R, M, H, E, static_cast<int64_t>(R) * M, low_latency::HalfLayout::make(M, H, R, E)};
  const int64_t needed = 2 * g.layout.bytes;
  DEEP_EP_CHECK(b.options().num_rdma_bytes >= needed, op, " with num_max_dispatch_tokens_per_rank=", M, ", hidden=", H,
                ", num_experts=", E, " needs num_rdma_bytes >= ", needed, " (Buffer.get_low_latency_rdma_size_hint)",
                ", the Buffer has ", b.options().num_rdma_bytes);
  return g;
}

void check_topk(const TensorView& topk_idx, const char* arg, int64_t T, const Geometry& g, int device) {
  check_tensor(topk_idx, arg, {DType::kInt64, {T, kAnySize}, true, device});
  const int64_t K = topk_idx.size(1);
  DEEP_EP_CHECK(K >= 1 && K <= g.layout.combine_slots_per_token, arg, " must have between 1 and min(num_experts, ",
                kNumMaxTopk, ") = ", g.layout.combine_slots_per_token, " columns, got ", K);
}

void check_handle(const LowLatencyHandle& h, const Geometry& g, int device) {
  check_tensor(h.src_info, "handle[0] (src_info)", {DType::kInt32, {g.L, g.S}, true, device});
  check_tensor(h.layout_range, "handle[1] (layout_range)", {DType::kInt64, {g.L, g.R}, true, device});
}

// Blocks per rank: the GPU's SMs shared by its ranks, one block of each rank per SM at most, all of
// them resident together (the receive of one rank spins on the send of another). The occupancy query
// behind it runs once per process (kernels/common/occupancy.cuh).
int num_blocks_of(Buffer& b) {
  const int per_device = b.num_ranks_per_device();
  const int capacity = b.num_device_sms() * std::max(1, low_latency::max_resident_blocks_per_sm());
  const int blocks = std::min(std::min(b.num_device_sms(), capacity) / per_device, low_latency::kMaxLowLatencyBlocks);
  DEEP_EP_CHECK(blocks >= 1, "low-latency kernels need one resident block per rank: ", per_device,
                " ranks share cuda:", b.device(), ", which holds ", capacity, " blocks");
  return blocks;
}

low_latency::Peers peers_of(const Buffer& b, Buffer::Internals& in, const Geometry& g, int half) {
  low_latency::Peers p{};
  p.bases = in.peer_bases_device;
  p.half_offset = in.rdma_payload_offset + half * g.layout.bytes;
  p.rank = b.rank();
  p.num_ranks = b.num_ranks();
  p.transport_peers = low_latency::transport_peer_mask(b.rank(), b.num_ranks(), b.num_ranks_per_node(),
                                                       b.options().allow_nvlink_for_low_latency_mode);
  p.half = half;
  p.enable_shrink = b.options().enable_shrink;
  p.diagnostics = in.device_diagnostics();
  p.timeout_ns = in.timeout_ns;
  return p;
}

// Takes the next half; refuses when that half still has a receive to launch.
int take_half(Buffer::Internals& in, const char* op) {
  const int half = in.ll_next_half;
  DEEP_EP_CHECK(!in.ll_receive_pending[half], op, ": buffer half ", half, " still holds a result whose receive hook ",
                "has not been called; call that hook first (at most two low-latency results may be pending)");
  in.ll_next_half ^= 1;
  return half;
}

}  // namespace

std::shared_ptr<LowLatencyPendingReceive> Buffer::low_latency_dispatch(const LowLatencyDispatchArgs& a,
                                                                       const Allocator& allocate, cudaStream_t stream) {
  check_device_errors();
  auto& in = *internals_;
  const int device = options_.device;
  DEEP_EP_CHECK(a.x.dim() == 2, "x must be 2-D [num_tokens, hidden], got ", a.x.describe());
  check_tensor(a.x, "x", {DType::kBFloat16, {kAnySize, kAnySize}, true, device});
  const int64_t T = a.x.size(0);
  DEEP_EP_CHECK(a.x.size(1) <= (1 << 20), "x: hidden is too large, got ", a.x.size(1));
  const Geometry g = check_geometry(*this, a.num_max_dispatch_tokens_per_rank, static_cast<int>(a.x.size(1)),
                                    a.num_experts, "low_latency_dispatch");
  in.rdma_payload_users.check_low_latency_op("low_latency_dispatch");
  DEEP_EP_CHECK(T <= g.M, "x has ", T, " tokens, more than num_max_dispatch_tokens_per_rank=", g.M);
  DEEP_EP_CHECK(a.topk_idx.dim() == 2, "topk_idx must be 2-D [num_tokens, num_topk], got ", a.topk_idx.describe());
  check_topk(a.topk_idx, "topk_idx", T, g, device);
  const int K = static_cast<int>(a.topk_idx.size(1));
  const int num_blocks = num_blocks_of(*this);
  const int shared = low_latency::dispatch_shared_bytes(static_cast<int>(T), K, g.L, g.R, num_blocks);
  DEEP_EP_CHECK(shared <= kMaxSharedBytes, "low_latency_dispatch: num_tokens * num_topk = ", T * K,
                " top-k entries need ", shared, " bytes of shared memory per block, more than ", kMaxSharedBytes);
  if (a.use_fp8 && a.use_ue8m0) {
    DEEP_EP_CHECK(a.round_scale, "use_ue8m0=True requires round_scale=True");
    DEEP_EP_CHECK(g.H % 512 == 0, "use_ue8m0=True requires hidden % 512 == 0, got hidden=", g.H);
  }
  if (a.cumulative_local_expert_recv_stats)
    check_tensor(*a.cumulative_local_expert_recv_stats, "cumulative_local_expert_recv_stats",
                 {DType::kInt32, {g.L}, true, device});
  if (a.dispatch_wait_recv_cost_stats)
    check_tensor(*a.dispatch_wait_recv_cost_stats, "dispatch_wait_recv_cost_stats",
                 {DType::kInt64, {g.R}, true, device});

  const bool fp8 = a.use_fp8;
  const bool ue8m0 = fp8 && a.use_ue8m0;
  TensorView recv_x = allocate("recv_x", fp8 ? DType::kFloat8E4M3 : DType::kBFloat16, {g.L, g.S, g.H});
  TensorView recv_scales;
  if (fp8) {
    recv_scales = ue8m0 ? allocate("recv_x_scales", DType::kInt32, {g.L, g.H / 512, g.S})
                        : allocate("recv_x_scales", DType::kFloat32, {g.L, g.H / 128, g.S});
  }
  TensorView recv_count = allocate("recv_count", DType::kInt32, {g.L});
  TensorView src_info = allocate("src_info", DType::kInt32, {2, g.L, g.S});
  TensorView layout_range = allocate("layout_range", DType::kInt64, {g.L, g.R});
  // Only now, when nothing can fail before the launch: every rank must take the same half.
  const int half = take_half(in, "low_latency_dispatch");

  auto pending = std::make_shared<PendingReceive>();
  pending->is_dispatch = true;
  pending->owner = this;
  pending->peers = peers_of(*this, in, g, half);
  pending->layout = g.layout;
  pending->num_blocks = num_blocks;
  auto& d = pending->dispatch;
  d.x = a.x.ptr<const uint16_t>();
  d.topk_idx = a.topk_idx.ptr<const int64_t>();
  d.num_tokens = static_cast<int>(T);
  d.num_topk = K;
  d.hidden = g.H;
  d.num_experts = g.E;
  d.num_local_experts = g.L;
  d.num_max_tokens = g.M;
  d.use_fp8 = fp8;
  d.round_scale = fp8 && a.round_scale;
  d.use_ue8m0 = ue8m0;
  d.recv_x = recv_x.data;
  d.recv_scales = fp8 ? recv_scales.data : nullptr;
  d.recv_count = recv_count.ptr<int>();
  d.src_info = src_info.ptr<int>();
  d.layout_range = layout_range.ptr<int64_t>();
  d.cumulative_recv_stats =
      a.cumulative_local_expert_recv_stats ? a.cumulative_local_expert_recv_stats->ptr<int>() : nullptr;
  d.wait_recv_cost_stats = a.dispatch_wait_recv_cost_stats ? a.dispatch_wait_recv_cost_stats->ptr<int64_t>() : nullptr;

  return start(std::move(pending), a.return_recv_hook, in, device, stream);
}

std::shared_ptr<LowLatencyPendingReceive> Buffer::low_latency_combine(const LowLatencyCombineArgs& a,
                                                                      const Allocator& allocate, cudaStream_t stream) {
  check_device_errors();
  auto& in = *internals_;
  const int device = options_.device;
  const LowLatencyHandle& h = a.handle;
  const Geometry g =
      check_geometry(*this, h.num_max_dispatch_tokens_per_rank, h.hidden, h.num_experts, "low_latency_combine");
  in.rdma_payload_users.check_low_latency_op("low_latency_combine");
  check_handle(h, g, device);
  DEEP_EP_CHECK(a.x.dim() == 3, "x must be 3-D [num_local_experts, num_ranks * num_max_dispatch_tokens_per_rank, ",
                "hidden], got ", a.x.describe());
  check_tensor(a.x, "x", {DType::kBFloat16, {g.L, g.S, g.H}, false, device});
  DEEP_EP_CHECK(a.x.strides[2] == 1 && a.x.strides[1] % 8 == 0 && a.x.strides[0] % 8 == 0 &&
                    reinterpret_cast<uintptr_t>(a.x.data) % 16 == 0,
                "x rows must be contiguous and 16-byte aligned (strides multiple of 8 elements), got ", a.x.describe());
  // zero_copy (V1): the rows were already written into get_next_low_latency_combine_buffer(handle); x
  // only gives the shape, and the send reads that buffer.
  const uint16_t* rows = a.x.ptr<const uint16_t>();
  int64_t expert_stride = a.x.strides[0], row_stride = a.x.strides[1];
  if (a.zero_copy) {
    const auto buffer = next_low_latency_combine_buffer(h);
    rows = static_cast<const uint16_t*>(buffer.first);
    row_stride = buffer.second;
    expert_stride = g.S * row_stride;
  }
  DEEP_EP_CHECK(a.topk_idx.dim() == 2, "topk_idx must be 2-D [num_tokens, num_topk], got ", a.topk_idx.describe());
  const int64_t T = a.topk_idx.size(0);
  DEEP_EP_CHECK(T <= g.M, "topk_idx has ", T, " tokens, more than num_max_dispatch_tokens_per_rank=", g.M);
  check_topk(a.topk_idx, "topk_idx", T, g, device);
  const int64_t K = a.topk_idx.size(1);
  check_tensor(a.topk_weights, "topk_weights", {DType::kFloat32, {T, K}, true, device});
  if (a.out) check_tensor(*a.out, "out", {DType::kBFloat16, {T, g.H}, true, device});
  if (a.combine_wait_recv_cost_stats)
    check_tensor(*a.combine_wait_recv_cost_stats, "combine_wait_recv_cost_stats", {DType::kInt64, {g.R}, true, device});

  const int combine_shared = low_latency::combine_shared_bytes(g.L, g.R);
  DEEP_EP_CHECK(combine_shared <= kMaxSharedBytes, "low_latency_combine: ", g.L, " local experts x ", g.R,
                " ranks need ", combine_shared, " bytes of shared memory per block, more than ", kMaxSharedBytes);
  TensorView combined = a.out ? *a.out : allocate("combined_x", DType::kBFloat16, {T, g.H});
  const int half = take_half(in, "low_latency_combine");  // last: every rank must take the same half

  auto pending = std::make_shared<PendingReceive>();
  pending->is_dispatch = false;
  pending->owner = this;
  pending->peers = peers_of(*this, in, g, half);
  pending->layout = g.layout;
  pending->num_blocks = num_blocks_of(*this);
  auto& c = pending->combine;
  c.x = rows;
  c.x_expert_stride = expert_stride;
  c.x_row_stride = row_stride;
  c.src_info = h.src_info.ptr<const int>();
  c.layout_range = h.layout_range.ptr<const int64_t>();
  c.topk_idx = a.topk_idx.ptr<const int64_t>();
  c.topk_weights = a.topk_weights.ptr<const float>();
  c.num_tokens = static_cast<int>(T);
  c.num_topk = static_cast<int>(K);
  c.hidden = g.H;
  c.num_experts = g.E;
  c.num_local_experts = g.L;
  c.num_max_tokens = g.M;
  c.use_logfmt = a.use_logfmt;
  c.combined_x = combined.ptr<uint16_t>();
  c.wait_recv_cost_stats = a.combine_wait_recv_cost_stats ? a.combine_wait_recv_cost_stats->ptr<int64_t>() : nullptr;

  return start(std::move(pending), a.return_recv_hook, in, device, stream);
}

void Buffer::low_latency_receive(LowLatencyPendingReceive& pending_base, cudaStream_t stream) {
  auto* pending = dynamic_cast<PendingReceive*>(&pending_base);
  DEEP_EP_CHECK(pending != nullptr && pending->owner == this, "low_latency_receive: the pending receive belongs to ",
                "another Buffer");
  DEEP_EP_RUNTIME_CHECK(!pending->launched, "the receive hook of this low-latency call was already called");
  check_device_errors();
  DEEP_EP_CUDA_CHECK(cudaSetDevice(options_.device));
  pending->launch(low_latency::kReceive, stream);
  pending->launched = true;
  internals_->ll_receive_pending[pending->peers.half] = false;
}

std::pair<void*, int64_t> Buffer::next_low_latency_combine_buffer(const LowLatencyHandle& h) const {
  const Geometry g = check_geometry(*this, h.num_max_dispatch_tokens_per_rank, h.hidden, h.num_experts,
                                    "get_next_low_latency_combine_buffer");
  // The dispatch slots of the next half: a zero-copy combine reads its rows there while its own rows
  // go to the peers' combine regions, and no peer dispatches into this half before that combine's
  // send is done (a peer's next dispatch here waits for this rank's later sends).
  char* slots = internals_->local_base + internals_->rdma_payload_offset + internals_->ll_next_half * g.layout.bytes +
                g.layout.dispatch_offset;
  return {slots, g.layout.dispatch_slot_bytes / 2};
}

void Buffer::clean_low_latency_buffer(int num_max_dispatch_tokens_per_rank, int hidden, int num_experts) {
  check_device_errors();
  const Geometry g =
      check_geometry(*this, num_max_dispatch_tokens_per_rank, hidden, num_experts, "clean_low_latency_buffer");
  auto& in = *internals_;
  DEEP_EP_CUDA_CHECK(cudaSetDevice(options_.device));
  // Nobody may still be writing into this rank's halves, and nobody may send before all are clean.
  DEEP_EP_CUDA_CHECK(cudaDeviceSynchronize());
  group_->barrier();
  auto* control = reinterpret_cast<ControlRegion*>(in.local_base);
  DEEP_EP_CUDA_CHECK(cudaMemset(&control->ll_epoch, 0, sizeof(control->ll_epoch)));
  DEEP_EP_CUDA_CHECK(cudaMemset(&control->ll_arrivals, 0, sizeof(control->ll_arrivals)));
  DEEP_EP_CUDA_CHECK(cudaMemset(&control->ll_combine_rows_done, 0, sizeof(control->ll_combine_rows_done)));
  for (int half = 0; half < 2; ++half) {
    char* base = in.local_base + in.rdma_payload_offset + half * g.layout.bytes;
    DEEP_EP_CUDA_CHECK(cudaMemset(base + g.layout.signals_offset, 0, g.layout.bytes - g.layout.signals_offset));
  }
  // Transport signals of GIN peers are NCCL's, not memory: they count across ops like the memory above.
  transport_launch::reset_low_latency_transport_signals(in, nullptr);
  DEEP_EP_CUDA_CHECK(cudaDeviceSynchronize());
  in.ll_next_half = 0;
  in.ll_receive_pending[0] = in.ll_receive_pending[1] = false;
  in.rdma_payload_users.low_latency_buffer_cleaned();
  group_->barrier();
}

void Buffer::low_latency_update_mask(int rank_to_mask, bool mask, cudaStream_t stream) {
  check_device_errors();
  DEEP_EP_CHECK(options_.enable_shrink,
                "low_latency_update_mask_buffer needs a Buffer created with enable_shrink=True");
  DEEP_EP_CHECK(rank_to_mask >= 0 && rank_to_mask < num_ranks_, "rank_to_mask must be in [0, ", num_ranks_, "), got ",
                rank_to_mask);
  DEEP_EP_CUDA_CHECK(cudaSetDevice(options_.device));
  low_latency::launch_update_mask(internals_->local_base, rank_to_mask, mask ? 1 : 0, num_ranks_, stream);
}

void Buffer::low_latency_query_mask(const TensorView& mask_status, cudaStream_t stream) {
  check_device_errors();
  DEEP_EP_CHECK(options_.enable_shrink, "low_latency_query_mask_buffer needs a Buffer created with enable_shrink=True");
  check_tensor(mask_status, "mask_status", {DType::kInt32, {num_ranks_}, true, options_.device});
  DEEP_EP_CUDA_CHECK(cudaSetDevice(options_.device));
  low_latency::launch_query_mask(internals_->local_base, mask_status.ptr<int>(), num_ranks_, stream);
}

void Buffer::low_latency_clean_mask(cudaStream_t stream) {
  check_device_errors();
  DEEP_EP_CHECK(options_.enable_shrink, "low_latency_clean_mask_buffer needs a Buffer created with enable_shrink=True");
  DEEP_EP_CUDA_CHECK(cudaSetDevice(options_.device));
  low_latency::launch_update_mask(internals_->local_base, -1, 0, num_ranks_, stream);
}

}  // namespace deep_ep
