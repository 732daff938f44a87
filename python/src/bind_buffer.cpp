// Bindings of deep_ep::Buffer: construction over a Group, teardown, raw buffer access and the ops.
// Streams travel as integers (torch.cuda.Stream.cuda_stream); tensors as TensorView.
#include <nanobind/ndarray.h>
#include <nanobind/stl/function.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <algorithm>

#include "bindings.hpp"
#include "deep_ep/buffer.hpp"
#include "deep_ep/error.hpp"

namespace deep_ep::python {

namespace {

cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

using ByteTensor = nb::ndarray<nb::pytorch, uint8_t, nb::ndim<1>>;

ByteTensor payload_tensor(nb::handle self, bool use_rdma_buffer) {
  Buffer& b = nb::cast<Buffer&>(self);
  void* ptr = use_rdma_buffer ? b.local_rdma_buffer() : b.local_nvl_buffer();
  const size_t n = static_cast<size_t>(use_rdma_buffer ? b.options().num_rdma_bytes : b.options().num_nvl_bytes);
  // The Python Buffer object owns the memory: the tensor keeps it alive.
  return ByteTensor(ptr, {n}, self, {}, nb::dtype<uint8_t>(), nb::device::cuda::value, b.device());
}

// Python allocator: (name, dtype name, shape) -> TensorView of a tensor the Python side keeps.
using PyAllocator = std::function<TensorView(const std::string&, const std::string&, const std::vector<int64_t>&)>;

Allocator wrap(PyAllocator allocate) {
  return [allocate = std::move(allocate)](const std::string& name, DType dtype, const std::vector<int64_t>& shape) {
    return allocate(name, dtype_name(dtype), shape);
  };
}

std::optional<IntranodeHandle> make_handle(const std::optional<std::vector<TensorView>>& views) {
  if (!views) return std::nullopt;
  DEEP_EP_CHECK(views->size() == 6, "an intranode handle has 6 tensors, got ", views->size());
  const auto& v = *views;
  return IntranodeHandle{v[0], v[1], v[2], v[3], v[4], v[5]};
}

// V1's internode handle: the 10 tensors in InternodeHandle's order.
std::optional<InternodeHandle> make_internode_handle(const std::optional<std::vector<TensorView>>& views) {
  if (!views) return std::nullopt;
  DEEP_EP_CHECK(views->size() == 10, "an internode handle has 10 tensors, got ", views->size());
  const auto& v = *views;
  return InternodeHandle{v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8], v[9]};
}

// V1's low-latency handle arrives from Python as its five elements.
LowLatencyHandle make_low_latency_handle(const TensorView& src_info, const TensorView& layout_range,
                                         int num_max_dispatch_tokens_per_rank, int hidden, int num_experts) {
  return LowLatencyHandle{src_info, layout_range, num_max_dispatch_tokens_per_rank, hidden, num_experts};
}

}  // namespace

void bind_buffer(nb::module_& m) {
  // Bound without constructor or methods: Python only carries it from a low-latency op to
  // low_latency_receive (the deep_ep.Buffer hook), so it needs a type but no interface.
  nb::class_<LowLatencyPendingReceive>(m, "LowLatencyPendingReceive");

  nb::class_<Buffer>(m, "Buffer")
      .def(
          "__init__",
          [](Buffer* self, std::shared_ptr<Group> group, int64_t num_nvl_bytes, int64_t num_rdma_bytes,
             bool low_latency_mode, int num_qps_per_rank, bool allow_nvlink_for_low_latency_mode, bool allow_mnnvl,
             bool use_fabric, bool explicitly_destroy, bool enable_shrink, int device, double timeout_s,
             std::function<int64_t()> nccl_comm_address, int64_t allocator_probe_address) {
            BufferOptions o;
            o.num_nvl_bytes = num_nvl_bytes;
            o.num_rdma_bytes = num_rdma_bytes;
            o.low_latency_mode = low_latency_mode;
            o.num_qps_per_rank = num_qps_per_rank;
            o.allow_nvlink_for_low_latency_mode = allow_nvlink_for_low_latency_mode;
            o.allow_mnnvl = allow_mnnvl;
            o.use_fabric = use_fabric;
            o.explicitly_destroy = explicitly_destroy;
            o.enable_shrink = enable_shrink;
            o.device = device;
            o.timeout_s = timeout_s;
            o.nccl_comm_address = std::move(nccl_comm_address);
            o.allocator_probe_address = allocator_probe_address;
            new (self) Buffer(std::move(group), o);
          },
          nb::arg("group"), nb::arg("num_nvl_bytes"), nb::arg("num_rdma_bytes"), nb::arg("low_latency_mode"),
          nb::arg("num_qps_per_rank"), nb::arg("allow_nvlink_for_low_latency_mode"), nb::arg("allow_mnnvl"),
          nb::arg("use_fabric"), nb::arg("explicitly_destroy"), nb::arg("enable_shrink"), nb::arg("device"),
          nb::arg("timeout_s") = 0.0, nb::arg("nccl_comm_address") = nb::none(), nb::arg("allocator_probe_address") = 0)
      .def("destroy", &Buffer::destroy, nb::call_guard<nb::gil_scoped_release>())
      .def("is_available", &Buffer::is_available)
      .def_prop_ro("rank", &Buffer::rank)
      .def_prop_ro("num_ranks", &Buffer::num_ranks)
      .def_prop_ro("device", &Buffer::device)
      .def_prop_ro("num_device_sms", &Buffer::num_device_sms)
      .def_prop_ro("num_ranks_per_device", &Buffer::num_ranks_per_device)
      .def("check_device_errors", &Buffer::check_device_errors)
      .def("payload_tensor", &payload_tensor, nb::arg("use_rdma_buffer"))
      .def(
          "get_dispatch_layout",
          // The outputs are the package's own fresh contiguous tensors, passed as addresses: a TensorView each
          // would cost more host time than the kernel takes (the call is host-bound when made eagerly).
          [](Buffer& b, const TensorView& topk_idx, int num_experts, uintptr_t num_tokens_per_rank,
             uintptr_t num_tokens_per_rdma_rank, uintptr_t num_tokens_per_expert, uintptr_t is_token_in_rank,
             uintptr_t stream) {
            const int device = b.device(), num_ranks = b.num_ranks();
            const int64_t num_tokens = topk_idx.dim() == 2 ? topk_idx.size(0) : 0;
            const auto contiguous = [&](uintptr_t address, DType dtype, std::vector<int64_t> shape) {
              return make_contiguous_view(reinterpret_cast<void*>(address), dtype, std::move(shape), device);
            };
            std::optional<TensorView> per_rdma_rank;
            if (num_tokens_per_rdma_rank)
              per_rdma_rank = contiguous(num_tokens_per_rdma_rank, DType::kInt32, {b.num_nodes()});
            b.get_dispatch_layout(topk_idx, num_experts,
                                  {contiguous(num_tokens_per_rank, DType::kInt32, {num_ranks}), per_rdma_rank,
                                   contiguous(num_tokens_per_expert, DType::kInt32, {std::max(num_experts, 0)}),
                                   contiguous(is_token_in_rank, DType::kBool, {num_tokens, num_ranks})},
                                  as_stream(stream));
          },
          nb::arg("topk_idx"), nb::arg("num_experts"), nb::arg("num_tokens_per_rank"),
          nb::arg("num_tokens_per_rdma_rank"), nb::arg("num_tokens_per_expert"), nb::arg("is_token_in_rank"),
          nb::arg("stream"),
          "Outputs: device addresses of contiguous tensors of the documented shapes (0: no num_tokens_per_rdma_rank).")
      .def(
          "intranode_dispatch",
          [](Buffer& b, const TensorView& x, std::optional<TensorView> x_scales, std::optional<TensorView> topk_idx,
             std::optional<TensorView> topk_weights, std::optional<TensorView> num_tokens_per_rank,
             std::optional<TensorView> is_token_in_rank, std::optional<TensorView> num_tokens_per_expert,
             std::optional<std::vector<TensorView>> handle, int expert_alignment, int num_worst_tokens,
             const Config& config, PyAllocator allocate, uintptr_t stream) {
            IntranodeDispatchArgs a;
            a.x = x;
            a.x_scales = x_scales;
            a.topk_idx = topk_idx;
            a.topk_weights = topk_weights;
            a.num_tokens_per_rank = num_tokens_per_rank;
            a.is_token_in_rank = is_token_in_rank;
            a.num_tokens_per_expert = num_tokens_per_expert;
            a.handle = make_handle(handle);
            a.expert_alignment = expert_alignment;
            a.num_worst_tokens = num_worst_tokens;
            a.config = config;
            auto result = b.intranode_dispatch(a, wrap(std::move(allocate)), as_stream(stream));
            return std::make_pair(result.num_rows, result.num_recv_tokens_per_expert);
          },
          nb::arg("x"), nb::arg("x_scales").none(), nb::arg("topk_idx").none(), nb::arg("topk_weights").none(),
          nb::arg("num_tokens_per_rank").none(), nb::arg("is_token_in_rank").none(),
          nb::arg("num_tokens_per_expert").none(), nb::arg("handle").none(), nb::arg("expert_alignment"),
          nb::arg("num_worst_tokens"), nb::arg("config"), nb::arg("allocate"), nb::arg("stream"))
      .def(
          "intranode_combine",
          [](Buffer& b, const TensorView& x, std::optional<TensorView> topk_weights, std::optional<TensorView> bias_0,
             std::optional<TensorView> bias_1, std::vector<TensorView> handle, const Config& config,
             PyAllocator allocate, uintptr_t stream) {
            IntranodeCombineArgs a;
            a.x = x;
            a.topk_weights = topk_weights;
            a.bias_0 = bias_0;
            a.bias_1 = bias_1;
            a.handle = *make_handle(handle);
            a.config = config;
            b.intranode_combine(a, wrap(std::move(allocate)), as_stream(stream));
          },
          nb::arg("x"), nb::arg("topk_weights").none(), nb::arg("bias_0").none(), nb::arg("bias_1").none(),
          nb::arg("handle"), nb::arg("config"), nb::arg("allocate"), nb::arg("stream"))
      .def("num_nodes", &Buffer::num_nodes)
      .def("last_dispatch_pushed", &Buffer::last_dispatch_pushed)
      .def("tensors_exportable", &Buffer::tensors_exportable)
      .def("last_combine_pulled", &Buffer::last_combine_pulled)
      .def("last_combine_in_place", &Buffer::last_combine_in_place)
      .def("num_ranks_per_node", &Buffer::num_ranks_per_node)
      .def(
          "internode_dispatch",
          [](Buffer& b, const TensorView& x, std::optional<TensorView> x_scales, std::optional<TensorView> topk_idx,
             std::optional<TensorView> topk_weights, std::optional<TensorView> num_tokens_per_rank,
             std::optional<TensorView> num_tokens_per_rdma_rank, std::optional<TensorView> is_token_in_rank,
             std::optional<TensorView> num_tokens_per_expert, std::optional<std::vector<TensorView>> handle,
             int expert_alignment, int num_worst_tokens, const Config& config, PyAllocator allocate, uintptr_t stream) {
            InternodeDispatchArgs a;
            a.x = x;
            a.x_scales = x_scales;
            a.topk_idx = topk_idx;
            a.topk_weights = topk_weights;
            a.num_tokens_per_rank = num_tokens_per_rank;
            a.num_tokens_per_rdma_rank = num_tokens_per_rdma_rank;
            a.is_token_in_rank = is_token_in_rank;
            a.num_tokens_per_expert = num_tokens_per_expert;
            a.handle = make_internode_handle(handle);
            a.expert_alignment = expert_alignment;
            a.num_worst_tokens = num_worst_tokens;
            a.config = config;
            auto result = b.internode_dispatch(a, wrap(std::move(allocate)), as_stream(stream));
            return std::make_pair(result.num_rows, result.num_recv_tokens_per_expert);
          },
          nb::arg("x"), nb::arg("x_scales").none(), nb::arg("topk_idx").none(), nb::arg("topk_weights").none(),
          nb::arg("num_tokens_per_rank").none(), nb::arg("num_tokens_per_rdma_rank").none(),
          nb::arg("is_token_in_rank").none(), nb::arg("num_tokens_per_expert").none(), nb::arg("handle").none(),
          nb::arg("expert_alignment"), nb::arg("num_worst_tokens"), nb::arg("config"), nb::arg("allocate"),
          nb::arg("stream"))
      .def(
          "internode_combine",
          [](Buffer& b, const TensorView& x, std::optional<TensorView> topk_weights, std::optional<TensorView> bias_0,
             std::optional<TensorView> bias_1, std::vector<TensorView> handle, const Config& config,
             PyAllocator allocate, uintptr_t stream) {
            InternodeCombineArgs a;
            a.x = x;
            a.topk_weights = topk_weights;
            a.bias_0 = bias_0;
            a.bias_1 = bias_1;
            a.handle = *make_internode_handle(handle);
            a.config = config;
            b.internode_combine(a, wrap(std::move(allocate)), as_stream(stream));
          },
          nb::arg("x"), nb::arg("topk_weights").none(), nb::arg("bias_0").none(), nb::arg("bias_1").none(),
          nb::arg("handle"), nb::arg("config"), nb::arg("allocate"), nb::arg("stream"))
      // Low-latency ops return the pending receive with return_recv_hook, None otherwise. They keep
      // the GIL: the allocator calls back into Python, and the launches do not wait.
      .def(
          "low_latency_dispatch",
          [](Buffer& b, const TensorView& x, const TensorView& topk_idx, int num_max_dispatch_tokens_per_rank,
             int num_experts, std::optional<TensorView> cumulative_local_expert_recv_stats,
             std::optional<TensorView> dispatch_wait_recv_cost_stats, bool use_fp8, bool round_scale, bool use_ue8m0,
             bool return_recv_hook, PyAllocator allocate, uintptr_t stream) {
            const LowLatencyDispatchArgs a{x,
                                           topk_idx,
                                           num_max_dispatch_tokens_per_rank,
                                           num_experts,
                                           cumulative_local_expert_recv_stats,
                                           dispatch_wait_recv_cost_stats,
                                           use_fp8,
                                           round_scale,
                                           use_ue8m0,
                                           return_recv_hook};
            return b.low_latency_dispatch(a, wrap(std::move(allocate)), as_stream(stream));
          },
          nb::arg("x"), nb::arg("topk_idx"), nb::arg("num_max_dispatch_tokens_per_rank"), nb::arg("num_experts"),
          nb::arg("cumulative_local_expert_recv_stats").none(), nb::arg("dispatch_wait_recv_cost_stats").none(),
          nb::arg("use_fp8"), nb::arg("round_scale"), nb::arg("use_ue8m0"), nb::arg("return_recv_hook"),
          nb::arg("allocate"), nb::arg("stream"))
      .def(
          "low_latency_combine",
          [](Buffer& b, const TensorView& x, const TensorView& topk_idx, const TensorView& topk_weights,
             const TensorView& src_info, const TensorView& layout_range, int num_max_dispatch_tokens_per_rank,
             int hidden, int num_experts, bool use_logfmt, bool zero_copy, bool return_recv_hook,
             std::optional<TensorView> out, std::optional<TensorView> combine_wait_recv_cost_stats,
             PyAllocator allocate, uintptr_t stream) {
            const LowLatencyCombineArgs a{
                x,
                topk_idx,
                topk_weights,
                make_low_latency_handle(src_info, layout_range, num_max_dispatch_tokens_per_rank, hidden, num_experts),
                use_logfmt,
                zero_copy,
                return_recv_hook,
                out,
                combine_wait_recv_cost_stats};
            return b.low_latency_combine(a, wrap(std::move(allocate)), as_stream(stream));
          },
          nb::arg("x"), nb::arg("topk_idx"), nb::arg("topk_weights"), nb::arg("src_info"), nb::arg("layout_range"),
          nb::arg("num_max_dispatch_tokens_per_rank"), nb::arg("hidden"), nb::arg("num_experts"), nb::arg("use_logfmt"),
          nb::arg("zero_copy"), nb::arg("return_recv_hook"), nb::arg("out").none(),
          nb::arg("combine_wait_recv_cost_stats").none(), nb::arg("allocate"), nb::arg("stream"))
      .def(
          "low_latency_receive",
          [](Buffer& b, LowLatencyPendingReceive& pending, uintptr_t stream) {
            b.low_latency_receive(pending, as_stream(stream));
          },
          nb::arg("pending"), nb::arg("stream"))
      .def(
          "next_low_latency_combine_buffer",
          [](const Buffer& b, const TensorView& src_info, const TensorView& layout_range,
             int num_max_dispatch_tokens_per_rank, int hidden, int num_experts) {
            auto [ptr, row_stride] = b.next_low_latency_combine_buffer(
                make_low_latency_handle(src_info, layout_range, num_max_dispatch_tokens_per_rank, hidden, num_experts));
            return std::make_pair(reinterpret_cast<uintptr_t>(ptr), row_stride);
          },
          nb::arg("src_info"), nb::arg("layout_range"), nb::arg("num_max_dispatch_tokens_per_rank"), nb::arg("hidden"),
          nb::arg("num_experts"))
      // Collective and synchronizing: while it waits on the device and the peers, other Python threads
      // (ranks run as threads, callback groups' collectives) must be able to run.
      .def("clean_low_latency_buffer", &Buffer::clean_low_latency_buffer, nb::arg("num_max_dispatch_tokens_per_rank"),
           nb::arg("hidden"), nb::arg("num_experts"), nb::call_guard<nb::gil_scoped_release>())
      .def(
          "low_latency_update_mask",
          [](Buffer& b, int rank_to_mask, bool mask, uintptr_t stream) {
            b.low_latency_update_mask(rank_to_mask, mask, as_stream(stream));
          },
          nb::arg("rank_to_mask"), nb::arg("mask"), nb::arg("stream"))
      .def(
          "low_latency_query_mask",
          [](Buffer& b, const TensorView& mask_status, uintptr_t stream) {
            b.low_latency_query_mask(mask_status, as_stream(stream));
          },
          nb::arg("mask_status"), nb::arg("stream"))
      .def(
          "low_latency_clean_mask", [](Buffer& b, uintptr_t stream) { b.low_latency_clean_mask(as_stream(stream)); },
          nb::arg("stream"));
}

}  // namespace deep_ep::python
