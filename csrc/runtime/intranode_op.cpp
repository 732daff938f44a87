// Buffer::intranode_dispatch / intranode_combine: validation (docs/design.md decision 7), the co-residency
// check (decision 5), the GPU-to-CPU count handshake, output allocation, and the kernel launches.
#include <algorithm>
#include <cstdlib>
#include <string>

#include "deep_ep/buffer.hpp"
#include "deep_ep/error.hpp"
#include "kernels/intranode/intranode.hpp"
#include "runtime/buffer_internals.hpp"
#include "runtime/env_switches.hpp"
#include "runtime/intranode_rings.hpp"
#include "runtime/normal_inputs.hpp"
#include "util/cuda_check.hpp"

namespace deep_ep {

namespace {

intranode::Peers peers_of(const Buffer& b, Buffer::Internals& in) {
  return {in.peer_bases_device, in.nvl_payload_offset, b.rank(), b.num_ranks(), in.device_diagnostics(), in.timeout_ns};
}

// DEEP_EP_INTRANODE_SHAPE=narrow (a diagnostic aid): the two-blocks-per-SM shape even where the wide one
// fits, to tell a shape's behaviour from a block count's. Read per call; the same on every rank.
bool narrow_shape_requested() {
  const char* value = std::getenv("DEEP_EP_INTRANODE_SHAPE");
  return value != nullptr && std::string(value) == "narrow";
}

// Every block of every rank sharing the GPU must be resident at once (they spin on each other). Returns
// whether the wide shape fits (else the narrow one); raises if not even the narrow one does.
LaunchShape pick_ring_shape(const Buffer& b, const Config& config, intranode::Kernel kernel, const char* op) {
  LaunchShape shape;
  shape.num_blocks = config.num_channels();
  const int needed = config.num_sms * b.num_ranks_per_device();
  shape.wide = true;
  if (!narrow_shape_requested() && needed <= b.num_device_sms() * intranode::max_resident_blocks_per_sm(kernel, shape))
    return shape;
  shape.wide = false;
  const int per_sm = intranode::max_resident_blocks_per_sm(kernel, shape);
  const int capacity = b.num_device_sms() * per_sm;
  DEEP_EP_CHECK(needed <= capacity, op, ": config.num_sms=", config.num_sms, " for each of the ",
                b.num_ranks_per_device(), " ranks sharing cuda:", b.device(), " needs ", needed,
                " resident blocks, but the GPU holds at most ", capacity, " (", b.num_device_sms(), " SMs x ", per_sm,
                " blocks); use a smaller num_sms");
  return shape;
}

// The intranode switches (switched_on) are read on every call, as tests and benchmarks switch them, so each must be
// the same on every rank at each call.

// The pull combine (pull_combine.cu) runs wherever it can; DEEP_EP_PULL_COMBINE=0 selects the ring combine.
bool pull_combine_requested() { return switched_on("DEEP_EP_PULL_COMBINE"); }

// The push dispatch (push_dispatch.cu) runs wherever it can; DEEP_EP_PUSH_DISPATCH=0 selects the ring dispatch.
bool push_dispatch_requested() { return switched_on("DEEP_EP_PUSH_DISPATCH"); }

// The pull combine finds the other ranks' inputs without the host (input_exports.hpp) unless
// DEEP_EP_HOST_FREE_COMBINE=0, which keeps the per-call host exchange.
bool host_free_combine_requested() { return switched_on("DEEP_EP_HOST_FREE_COMBINE"); }

// Blocks of an in-place kernel (pull combine, push dispatch) per rank: one per channel, fewer where the ranks
// sharing this GPU would not all fit; 0 when not even one does.
int resident_channel_blocks(const Buffer& b, intranode::Kernel kernel, int num_channels) {
  return std::min(num_channels,
                  b.num_device_sms() * intranode::max_resident_blocks_per_sm(kernel, {}) / b.num_ranks_per_device());
}

void check_fits(const Buffer& b, int64_t needed, const Config& config, int64_t row_bytes, const char* op) {
  DEEP_EP_CHECK(needed <= b.options().num_nvl_bytes, op, " needs ", needed,
                " bytes of NVLink buffer (num_sms=", config.num_sms,
                ", num_max_nvl_chunked_recv_tokens=", config.num_max_nvl_chunked_recv_tokens, ", rows of ", row_bytes,
                " bytes) but the Buffer has num_nvl_bytes=", b.options().num_nvl_bytes,
                "; size it with Config.get_nvl_buffer_size_hint");
}

void check_handle(const IntranodeHandle& h, int R, int device, int64_t num_tokens) {
  check_tensor(h.rank_prefix_matrix, "handle[0] (rank_prefix_matrix)", {DType::kInt32, {R, R}, true, device});
  check_tensor(h.channel_prefix_matrix, "handle[1] (channel_prefix_matrix)",
               {DType::kInt32, {R, kAnySize}, true, device});
  const int64_t C = h.channel_prefix_matrix.size(1);
  check_tensor(h.recv_channel_prefix_matrix, "handle[2] (recv_channel_prefix_matrix)",
               {DType::kInt32, {R, C}, true, device});
  check_tensor(h.recv_src_idx, "handle[3] (recv_src_idx)", {DType::kInt32, {kAnySize}, true, device});
  check_tensor(h.is_token_in_rank, "handle[4] (is_token_in_rank)", {DType::kBool, {num_tokens, R}, true, device});
  check_tensor(h.send_head, "handle[5] (send_head)", {DType::kInt32, {num_tokens, R}, true, device});
}

}  // namespace

IntranodeDispatchResult Buffer::intranode_dispatch(const IntranodeDispatchArgs& a, const Allocator& allocate,
                                                   cudaStream_t stream) {
  check_device_errors();
  DEEP_EP_CHECK(num_nodes() == 1, "intranode dispatch needs all ranks in one node; this group has ", num_nodes(),
                " nodes: use internode_dispatch");
  auto& in = *internals_;
  const int R = num_ranks_, device = options_.device;
  const Config& config = a.config;
  const NormalDispatchShape shape = check_normal_dispatch_inputs(a.x, a.x_scales, a.topk_idx, a.topk_weights,
                                                                 a.num_worst_tokens, a.expert_alignment, device);
  const bool fp8 = shape.fp8;
  const int64_t T = shape.num_tokens, H = shape.hidden, row_bytes = shape.row_bytes;
  const int num_scales = shape.num_scales, num_topk = shape.num_topk;
  const int64_t scale_token_stride = shape.scale_token_stride, scale_channel_stride = shape.scale_channel_stride;

  // ---- routing: layout (non-cached) or handle (cached) ------------------------------------------------
  const bool cached = a.handle.has_value();
  int num_experts = 0;
  const IntranodeHandle* handle = cached ? &*a.handle : nullptr;
  if (cached) {
    DEEP_EP_CHECK(!a.topk_idx, "cached dispatch (with a handle) takes no topk_idx/topk_weights");
    DEEP_EP_CHECK(!a.num_tokens_per_rank && !a.num_tokens_per_expert,
                  "cached dispatch (with a handle) takes no layout arguments");
    check_handle(*handle, R, device, T);
    DEEP_EP_CHECK(handle->channel_prefix_matrix.size(1) == config.num_channels(), "config.num_sms=", config.num_sms,
                  " differs from the handle's ", handle->channel_prefix_matrix.size(1),
                  " channels: cached dispatch must use the num_sms of the dispatch that made the handle");
  } else {
    DEEP_EP_CHECK(a.num_tokens_per_rank && a.is_token_in_rank && a.num_tokens_per_expert,
                  "dispatch without a handle needs num_tokens_per_rank, is_token_in_rank and num_tokens_per_expert "
                  "(from get_dispatch_layout)");
    check_tensor(*a.num_tokens_per_rank, "num_tokens_per_rank", {DType::kInt32, {R}, true, device});
    check_tensor(*a.is_token_in_rank, "is_token_in_rank", {DType::kBool, {T, R}, true, device});
    DEEP_EP_CHECK(a.num_tokens_per_expert->dim() == 1, "num_tokens_per_expert must be 1-D, got ",
                  a.num_tokens_per_expert->describe());
    num_experts = static_cast<int>(a.num_tokens_per_expert->size(0));
    check_tensor(*a.num_tokens_per_expert, "num_tokens_per_expert", {DType::kInt32, {num_experts}, true, device});
    DEEP_EP_CHECK(num_experts > 0 && num_experts % R == 0 && num_experts / R <= kMaxLocalExperts &&
                      num_experts <= kMaxIntranodeExperts,
                  "num_tokens_per_expert must have num_experts entries, a multiple of num_ranks=", R, " with at most ",
                  kMaxLocalExperts, " per rank; got ", num_experts);
    DEEP_EP_CHECK(a.num_worst_tokens == 0 || a.topk_idx, "num_worst_tokens > 0 requires topk_idx and topk_weights");
  }

  // The buffer must hold the config's rings (the size hints promise no more); a call may cycle through fewer slots.
  const auto capacity_layout = intranode::DispatchQueueLayout::make(
      config.num_channels(), config.num_max_nvl_chunked_recv_tokens, row_bytes, num_scales, num_topk);
  check_fits(*this, capacity_layout.total_bytes, config, row_bytes, "dispatch");
  DEEP_EP_CUDA_CHECK(cudaSetDevice(device));
  const auto peers = peers_of(*this, in);
  const int C = config.num_channels();
  // Push dispatch, unless switched off: every rank's outputs can be exported to the others (then the buffer made
  // input_exports, on every rank or none), and some of its blocks fit beside the other ranks' on this GPU. Every
  // condition is the same on every rank, so all ranks take the same path.
  const int push_blocks = resident_channel_blocks(*this, intranode::Kernel::kPushDispatch, C);
  const bool push = push_dispatch_requested() && in.input_exports && push_blocks >= 1;
  last_dispatch_pushed_ = false;

  IntranodeDispatchResult result;
  TensorView rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix, send_head;
  int num_recv_tokens = 0;
  if (cached) {
    rank_prefix_matrix = handle->rank_prefix_matrix;
    channel_prefix_matrix = handle->channel_prefix_matrix;
    recv_channel_prefix_matrix = handle->recv_channel_prefix_matrix;
    send_head = handle->send_head;
    result.num_rows = static_cast<int>(handle->recv_src_idx.size(0));
    // The push dispatch's op bracket waits for every rank itself; the ring needs its counters zeroed.
    if (!push) intranode::launch_prologue(peers, /*before_combine=*/false, stream);
  } else {
    rank_prefix_matrix = allocate("rank_prefix_matrix", DType::kInt32, {R, R});
    channel_prefix_matrix = allocate("channel_prefix_matrix", DType::kInt32, {R, C});
    recv_channel_prefix_matrix = allocate("recv_channel_prefix_matrix", DType::kInt32, {R, C});
    send_head = allocate("send_head", DType::kInt32, {T, R});
    intranode::NotifyArgs n{};
    n.is_token_in_rank = a.is_token_in_rank->ptr<bool>();
    n.num_tokens_per_rank = a.num_tokens_per_rank->ptr<int>();
    n.num_tokens_per_expert = a.num_tokens_per_expert->ptr<int>();
    n.num_tokens = static_cast<int>(T);
    n.num_experts = num_experts;
    n.num_channels = C;
    n.expert_alignment = a.expert_alignment;
    n.rank_prefix_matrix = rank_prefix_matrix.ptr<int>();
    n.channel_prefix_matrix = channel_prefix_matrix.ptr<int>();
    n.recv_channel_prefix_matrix = recv_channel_prefix_matrix.ptr<int>();
    n.host = in.next_host_counts();
    intranode::launch_notify(peers, n, stream);
    if (a.num_worst_tokens > 0) {
      result.num_rows = a.num_worst_tokens;
    } else {
      // The GPU-to-CPU handshake: notify publishes the counts in host-mapped memory.
      in.wait_for_notify_counts(*this, "dispatch");
      num_recv_tokens = in.host->num_recv_tokens;
      result.num_rows = num_recv_tokens;
      const int L = num_experts / R;
      result.num_recv_tokens_per_expert.assign(in.host->num_recv_tokens_per_expert,
                                               in.host->num_recv_tokens_per_expert + L);
    }
  }
  const int64_t N = result.num_rows;
  TensorView recv_x = allocate("recv_x", a.x.dtype, {N, H});
  TensorView recv_x_scales, recv_topk_idx, recv_topk_weights, recv_src_idx;
  if (fp8) recv_x_scales = allocate("recv_x_scales", DType::kFloat32, {N, num_scales});
  if (num_topk) {
    recv_topk_idx = allocate("recv_topk_idx", DType::kInt64, {N, num_topk});
    recv_topk_weights = allocate("recv_topk_weights", DType::kFloat32, {N, num_topk});
  }
  if (cached) {
    recv_src_idx = handle->recv_src_idx;
  } else {
    recv_src_idx = allocate("recv_src_idx", DType::kInt32, {N});
  }

  // The fields both dispatch kernels read the same way: the tokens, their routing and the output row count.
  const auto fill_inputs = [&](auto& args) {
    args.x = a.x.ptr<uint8_t>();
    args.x_scales = fp8 ? a.x_scales->ptr<float>() : nullptr;
    args.scale_token_stride = scale_token_stride;
    args.scale_channel_stride = scale_channel_stride;
    args.topk_idx = num_topk ? a.topk_idx->ptr<int64_t>() : nullptr;
    args.topk_weights = num_topk ? a.topk_weights->ptr<float>() : nullptr;
    args.is_token_in_rank = cached ? handle->is_token_in_rank.ptr<bool>() : a.is_token_in_rank->ptr<bool>();
    args.rank_prefix_matrix = rank_prefix_matrix.ptr<int>();
    args.channel_prefix_matrix = channel_prefix_matrix.ptr<int>();
    args.num_tokens = static_cast<int>(T);
    args.row_bytes = static_cast<int>(row_bytes);
    args.num_scales = num_scales;
    args.num_topk = num_topk;
    args.num_experts = num_experts;
    args.num_channels = C;
    args.num_rows = static_cast<int>(N);
  };

  if (push) {
    void* outputs[kNumPushOutputs] = {
        recv_x.data, fp8 ? recv_x_scales.data : nullptr, num_topk ? recv_topk_idx.data : nullptr,
        num_topk ? recv_topk_weights.data : nullptr, cached ? nullptr : recv_src_idx.data};
    const size_t bytes[kNumPushOutputs] = {static_cast<size_t>(N * row_bytes), static_cast<size_t>(N * num_scales * 4),
                                           static_cast<size_t>(N * num_topk * 8), static_cast<size_t>(N * num_topk * 4),
                                           static_cast<size_t>(N * 4)};
    const OutputPlacement placement = in.export_outputs_or_poison("dispatch", outputs, bytes, stream);
    intranode::PushDispatchArgs p{};
    fill_inputs(p);
    p.recv_x = static_cast<uint8_t*>(placement.local[kPushRecvX]);
    p.recv_x_scales = static_cast<float*>(placement.local[kPushRecvScales]);
    p.recv_topk_idx = static_cast<int64_t*>(placement.local[kPushRecvTopkIdx]);
    p.recv_topk_weights = static_cast<float*>(placement.local[kPushRecvTopkWeights]);
    p.recv_src_idx = static_cast<int*>(placement.local[kPushRecvSrcIdx]);
    p.send_head = cached ? nullptr : send_head.ptr<int>();
    p.imports = in.input_exports->device_imports();
    p.resolved_bases = in.input_exports->device_resolved_bases();
    for (int i = 0; i < kNumPushOutputs; ++i) p.own_outputs.refs[i] = placement.refs[i];
    p.own_outputs.num_rows = static_cast<int32_t>(N);
    LaunchShape push_shape;
    push_shape.num_blocks = push_blocks;
    intranode::launch_push_dispatch(peers, p, push_shape, stream);
    in.input_exports->copy_staged_outputs(placement, outputs, bytes, stream);
    last_dispatch_pushed_ = true;
    return result;
  }

  // The ring dispatch: the slots a call cycles through where ranks share the GPU's L2 (intranode_rings.hpp).
  const IntranodeDispatchRing ring =
      intranode_dispatch_ring(in.max_ranks_per_device, config.num_max_nvl_chunked_recv_tokens,
                              config.num_max_nvl_chunked_send_tokens, C, capacity_layout.row_stride, in.min_l2_bytes);
  const auto layout = intranode::DispatchQueueLayout::make(C, ring.num_slots, row_bytes, num_scales, num_topk);
  const LaunchShape launch_shape = pick_ring_shape(*this, config, intranode::Kernel::kDispatch, "dispatch");
  intranode::DispatchArgs d{};
  fill_inputs(d);
  d.recv_channel_prefix_matrix = recv_channel_prefix_matrix.ptr<int>();
  d.num_slots = ring.num_slots;
  d.send_chunk = ring.send_chunk;
  d.recv_x = recv_x.ptr<uint8_t>();
  d.recv_x_scales = fp8 ? recv_x_scales.ptr<float>() : nullptr;
  d.recv_topk_idx = num_topk ? recv_topk_idx.ptr<int64_t>() : nullptr;
  d.recv_topk_weights = num_topk ? recv_topk_weights.ptr<float>() : nullptr;
  d.recv_src_idx = recv_src_idx.ptr<int>();
  d.send_head = send_head.ptr<int>();
  intranode::launch_dispatch(peers, layout, d, launch_shape, stream);
  return result;
}

void Buffer::intranode_combine(const IntranodeCombineArgs& a, const Allocator& allocate, cudaStream_t stream) {
  check_device_errors();
  DEEP_EP_CHECK(num_nodes() == 1, "intranode combine needs all ranks in one node; this group has ", num_nodes(),
                " nodes: use internode_combine");
  auto& in = *internals_;
  const int R = num_ranks_, device = options_.device;
  const Config& config = a.config;
  const IntranodeHandle& h = a.handle;
  DEEP_EP_CHECK(h.is_token_in_rank.dim() == 2, "handle[4] (is_token_in_rank) must be 2-D, got ",
                h.is_token_in_rank.describe());
  const int64_t T = h.is_token_in_rank.size(0);
  check_handle(h, R, device, T);
  const NormalCombineShape shape = check_normal_combine_inputs(a.x, a.topk_weights, a.bias_0, a.bias_1, T, device);
  const int64_t N = shape.num_rows, H = shape.hidden;
  const int num_topk = shape.num_topk;
  DEEP_EP_CHECK(N == h.recv_src_idx.size(0), "x must have one row per row received by the dispatch (",
                h.recv_src_idx.size(0), "), got ", N);
  const int C = static_cast<int>(h.channel_prefix_matrix.size(1));
  DEEP_EP_CHECK(C == config.num_channels(), "config.num_sms=", config.num_sms, " differs from the handle's ", C,
                " channels: combine must use the num_sms of the dispatch that made the handle");

  const auto layout =
      intranode::CombineQueueLayout::make(C, R, config.num_max_nvl_chunked_recv_tokens, H * 2, num_topk);
  check_fits(*this, layout.total_bytes, config, H * 2, "combine");
  const LaunchShape launch_shape = pick_ring_shape(*this, config, intranode::Kernel::kCombine, "combine");
  DEEP_EP_CUDA_CHECK(cudaSetDevice(device));

  TensorView combined_x = allocate("combined_x", DType::kBFloat16, {T, H});
  TensorView combined_topk_weights;
  if (num_topk) combined_topk_weights = allocate("combined_topk_weights", DType::kFloat32, {T, num_topk});

  const auto peers = peers_of(*this, in);
  last_combine_pulled_ = false;
  // Pull combine, unless switched off: every rank reaches every other rank's memory by CUDA IPC (then the
  // buffer made pull_exchange), and some of its blocks fit beside the other ranks' on this GPU. Every
  // condition is the same on every rank, and so is the outcome of the exchange below, so all ranks take
  // the same path.
  const int pull_blocks = resident_channel_blocks(*this, intranode::Kernel::kPullCombine, C);
  const auto pull_args = [&]() {
    intranode::PullCombineArgs pc{};
    pc.bias_0 = a.bias_0 ? a.bias_0->ptr<uint16_t>() : nullptr;
    pc.bias_1 = a.bias_1 ? a.bias_1->ptr<uint16_t>() : nullptr;
    pc.is_token_in_rank = h.is_token_in_rank.ptr<bool>();
    pc.rank_prefix_matrix = h.rank_prefix_matrix.ptr<int>();
    pc.channel_prefix_matrix = h.channel_prefix_matrix.ptr<int>();
    pc.num_tokens = static_cast<int>(T);
    pc.hidden = static_cast<int>(H);
    pc.num_topk = num_topk;
    pc.num_channels = C;
    pc.combined_x = combined_x.ptr<uint16_t>();
    pc.combined_topk_weights = num_topk ? combined_topk_weights.ptr<float>() : nullptr;
    return pc;
  };
  LaunchShape pull_shape;
  pull_shape.num_blocks = pull_blocks;
  if (pull_combine_requested() && host_free_combine_requested() && in.input_exports && pull_blocks >= 1) {
    // Host-free: this rank's inputs are exported (or staged) here; the kernel finds the others'.
    intranode::PullCombineArgs pc = pull_args();
    pc.x[rank_] = a.x.ptr<uint16_t>();
    pc.topk_weights[rank_] = num_topk ? a.topk_weights->ptr<float>() : nullptr;
    pc.imports = in.input_exports->device_imports();
    pc.resolved_bases = in.input_exports->device_resolved_bases();
    pc.own_input = in.export_or_poison("pull combine", a.x.data, static_cast<size_t>(N * H * 2),
                                       num_topk ? a.topk_weights->data : nullptr, static_cast<size_t>(N * num_topk * 4),
                                       N > 0, stream);
    intranode::launch_pull_combine(peers, pc, pull_shape, stream);
    last_combine_pulled_ = true;
    return;
  }
  if (pull_combine_requested() && in.pull_exchange && pull_blocks >= 1) {
    const auto& inputs = in.peer_tensors.map(*in.pull_exchange, rank_, a.x.data,
                                             num_topk ? a.topk_weights->data : nullptr, num_topk > 0, N > 0, stream);
    if (!inputs.x.empty()) {
      intranode::PullCombineArgs pc = pull_args();
      for (int r = 0; r < R; ++r) {
        pc.x[r] = reinterpret_cast<const uint16_t*>(inputs.x[r]);
        pc.topk_weights[r] = num_topk ? reinterpret_cast<const float*>(inputs.weights[r]) : nullptr;
      }
      intranode::launch_pull_combine(peers, pc, pull_shape, stream);
      last_combine_pulled_ = true;
      return;
    }
  }
  intranode::launch_prologue(peers, /*before_combine=*/true, stream);
  intranode::CombineArgs c{};
  c.x = a.x.ptr<uint16_t>();
  c.topk_weights = num_topk ? a.topk_weights->ptr<float>() : nullptr;
  c.bias_0 = a.bias_0 ? a.bias_0->ptr<uint16_t>() : nullptr;
  c.bias_1 = a.bias_1 ? a.bias_1->ptr<uint16_t>() : nullptr;
  c.is_token_in_rank = h.is_token_in_rank.ptr<bool>();
  c.rank_prefix_matrix = h.rank_prefix_matrix.ptr<int>();
  c.recv_channel_prefix_matrix = h.recv_channel_prefix_matrix.ptr<int>();
  c.num_tokens = static_cast<int>(T);
  c.num_recv_tokens = static_cast<int>(N);
  c.hidden = static_cast<int>(H);
  c.num_topk = num_topk;
  c.num_channels = C;
  c.num_slots = config.num_max_nvl_chunked_recv_tokens;
  c.send_chunk = config.num_max_nvl_chunked_send_tokens;
  c.combined_x = combined_x.ptr<uint16_t>();
  c.combined_topk_weights = num_topk ? combined_topk_weights.ptr<float>() : nullptr;
  intranode::launch_combine(peers, layout, c, launch_shape, stream);
}

}  // namespace deep_ep
