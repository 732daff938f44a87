// Bindings of the CPU reference (csrc/reference) for the GPU tests. Arrays cross as flat numpy arrays
// (copied): bf16 as uint16 bit patterns, FP8 as uint8, bool as uint8. Python reshapes.
#include <nanobind/ndarray.h>
#include <nanobind/stl/vector.h>

#include "bindings.hpp"
#include "deep_ep/reference.hpp"

namespace deep_ep::python {

namespace {

namespace ref = deep_ep::reference;

template <typename T>
nb::ndarray<nb::numpy, T, nb::ndim<1>> to_numpy(const std::vector<T>& v) {
  auto* heap = new std::vector<T>(v);
  nb::capsule owner(heap, [](void* p) noexcept { delete static_cast<std::vector<T>*>(p); });
  return nb::ndarray<nb::numpy, T, nb::ndim<1>>(heap->data(), {heap->size()}, owner);
}

template <typename T>
std::vector<T> from_numpy(const nb::ndarray<T, nb::c_contig, nb::device::cpu>& a) {
  return std::vector<T>(a.data(), a.data() + a.size());
}

// Exposes a std::vector<T> member as a flat numpy property (copy in, copy out).
template <typename Class, typename T>
void vector_field(nb::class_<Class>& cls, const char* name, std::vector<T> Class::*member) {
  cls.def_prop_rw(
      name, [member](const Class& c) { return to_numpy(c.*member); },
      [member](Class& c, const nb::ndarray<T, nb::c_contig, nb::device::cpu>& a) { c.*member = from_numpy(a); },
      nb::for_getter(nb::rv_policy::automatic));
}

}  // namespace

void bind_reference(nb::module_& m) {
  auto r = m.def_submodule("reference", "CPU reference of every deep_ep operation (global view)");

  r.def("float_to_bf16", &ref::float_to_bf16);
  r.def("bf16_to_float", &ref::bf16_to_float);
  r.def("float_to_e4m3", &ref::float_to_e4m3);
  r.def("e4m3_to_float", &ref::e4m3_to_float);

  nb::class_<ref::DispatchLayout> layout(r, "DispatchLayout");
  vector_field(layout, "num_tokens_per_rank", &ref::DispatchLayout::num_tokens_per_rank);
  vector_field(layout, "num_tokens_per_rdma_rank", &ref::DispatchLayout::num_tokens_per_rdma_rank);
  vector_field(layout, "num_tokens_per_expert", &ref::DispatchLayout::num_tokens_per_expert);
  vector_field(layout, "is_token_in_rank", &ref::DispatchLayout::is_token_in_rank);
  r.def(
      "get_dispatch_layout",
      [](const nb::ndarray<int64_t, nb::c_contig, nb::device::cpu, nb::ndim<2>>& topk_idx, int num_ranks,
         int num_experts) {
        return ref::get_dispatch_layout(topk_idx.data(), static_cast<int>(topk_idx.shape(0)),
                                        static_cast<int>(topk_idx.shape(1)), num_ranks, num_experts);
      },
      nb::arg("topk_idx"), nb::arg("num_ranks"), nb::arg("num_experts"));

  nb::class_<ref::NormalDispatchInput> ndi(r, "NormalDispatchInput");
  ndi.def(nb::init<>()).def_rw("num_tokens", &ref::NormalDispatchInput::num_tokens);
  vector_field(ndi, "x", &ref::NormalDispatchInput::x);
  vector_field(ndi, "x_scales", &ref::NormalDispatchInput::x_scales);
  vector_field(ndi, "topk_idx", &ref::NormalDispatchInput::topk_idx);
  vector_field(ndi, "topk_weights", &ref::NormalDispatchInput::topk_weights);
  vector_field(ndi, "is_token_in_rank", &ref::NormalDispatchInput::is_token_in_rank);

  nb::class_<ref::NormalDispatchOutput> ndo(r, "NormalDispatchOutput");
  ndo.def_ro("num_recv_tokens", &ref::NormalDispatchOutput::num_recv_tokens)
      .def_ro("num_rows", &ref::NormalDispatchOutput::num_rows);
  vector_field(ndo, "recv_x", &ref::NormalDispatchOutput::recv_x);
  vector_field(ndo, "recv_x_scales", &ref::NormalDispatchOutput::recv_x_scales);
  vector_field(ndo, "recv_topk_idx", &ref::NormalDispatchOutput::recv_topk_idx);
  vector_field(ndo, "recv_topk_weights", &ref::NormalDispatchOutput::recv_topk_weights);
  vector_field(ndo, "num_recv_tokens_per_expert", &ref::NormalDispatchOutput::num_recv_tokens_per_expert);
  vector_field(ndo, "rank_prefix_matrix", &ref::NormalDispatchOutput::rank_prefix_matrix);
  vector_field(ndo, "recv_src_idx", &ref::NormalDispatchOutput::recv_src_idx);

  nb::class_<ref::NormalDispatchArgs>(r, "NormalDispatchArgs")
      .def(nb::init<>())
      .def_rw("num_ranks", &ref::NormalDispatchArgs::num_ranks)
      .def_rw("num_experts", &ref::NormalDispatchArgs::num_experts)
      .def_rw("row_bytes", &ref::NormalDispatchArgs::row_bytes)
      .def_rw("num_scales", &ref::NormalDispatchArgs::num_scales)
      .def_rw("num_topk", &ref::NormalDispatchArgs::num_topk)
      .def_rw("expert_alignment", &ref::NormalDispatchArgs::expert_alignment)
      .def_rw("num_worst_tokens", &ref::NormalDispatchArgs::num_worst_tokens)
      .def_rw("only_rank", &ref::NormalDispatchArgs::only_rank);
  r.def("normal_dispatch", &ref::normal_dispatch, nb::arg("inputs"), nb::arg("args"));

  nb::class_<ref::NormalCombineInput> nci(r, "NormalCombineInput");
  nci.def(nb::init<>());
  vector_field(nci, "x", &ref::NormalCombineInput::x);
  vector_field(nci, "topk_weights", &ref::NormalCombineInput::topk_weights);
  vector_field(nci, "bias_0", &ref::NormalCombineInput::bias_0);
  vector_field(nci, "bias_1", &ref::NormalCombineInput::bias_1);
  nb::class_<ref::NormalCombineOutput> nco(r, "NormalCombineOutput");
  vector_field(nco, "combined_x", &ref::NormalCombineOutput::combined_x);
  vector_field(nco, "combined_topk_weights", &ref::NormalCombineOutput::combined_topk_weights);
  r.def("normal_combine", &ref::normal_combine, nb::arg("dispatch_inputs"), nb::arg("dispatch_outputs"),
        nb::arg("inputs"), nb::arg("hidden"), nb::arg("num_topk"), nb::arg("num_ranks_per_node") = 0,
        nb::arg("only_rank") = -1);

  nb::class_<ref::LowLatencyDispatchInput> ldi(r, "LowLatencyDispatchInput");
  ldi.def(nb::init<>()).def_rw("num_tokens", &ref::LowLatencyDispatchInput::num_tokens);
  vector_field(ldi, "x", &ref::LowLatencyDispatchInput::x);
  vector_field(ldi, "topk_idx", &ref::LowLatencyDispatchInput::topk_idx);
  nb::class_<ref::LowLatencyDispatchArgs>(r, "LowLatencyDispatchArgs")
      .def(nb::init<>())
      .def_rw("num_ranks", &ref::LowLatencyDispatchArgs::num_ranks)
      .def_rw("num_experts", &ref::LowLatencyDispatchArgs::num_experts)
      .def_rw("hidden", &ref::LowLatencyDispatchArgs::hidden)
      .def_rw("num_topk", &ref::LowLatencyDispatchArgs::num_topk)
      .def_rw("num_max_dispatch_tokens_per_rank", &ref::LowLatencyDispatchArgs::num_max_dispatch_tokens_per_rank)
      .def_rw("use_fp8", &ref::LowLatencyDispatchArgs::use_fp8)
      .def_rw("round_scale", &ref::LowLatencyDispatchArgs::round_scale)
      .def_rw("use_ue8m0", &ref::LowLatencyDispatchArgs::use_ue8m0);
  nb::class_<ref::LowLatencyDispatchOutput> ldo(r, "LowLatencyDispatchOutput");
  vector_field(ldo, "recv_x_bf16", &ref::LowLatencyDispatchOutput::recv_x_bf16);
  vector_field(ldo, "recv_x_fp8", &ref::LowLatencyDispatchOutput::recv_x_fp8);
  vector_field(ldo, "recv_scales", &ref::LowLatencyDispatchOutput::recv_scales);
  vector_field(ldo, "recv_scales_ue8m0", &ref::LowLatencyDispatchOutput::recv_scales_ue8m0);
  vector_field(ldo, "recv_count", &ref::LowLatencyDispatchOutput::recv_count);
  vector_field(ldo, "src_info", &ref::LowLatencyDispatchOutput::src_info);
  vector_field(ldo, "layout_range", &ref::LowLatencyDispatchOutput::layout_range);
  r.def("low_latency_dispatch", &ref::low_latency_dispatch, nb::arg("inputs"), nb::arg("args"));
  nb::class_<ref::LowLatencyCombineInput> lci(r, "LowLatencyCombineInput");
  lci.def(nb::init<>());
  vector_field(lci, "x", &ref::LowLatencyCombineInput::x);
  vector_field(lci, "topk_weights", &ref::LowLatencyCombineInput::topk_weights);
  r.def(
      "low_latency_combine",
      [](const std::vector<ref::LowLatencyDispatchInput>& di, const std::vector<ref::LowLatencyDispatchOutput>& dout,
         const std::vector<ref::LowLatencyCombineInput>& ci, const ref::LowLatencyDispatchArgs& args,
         const std::vector<uint8_t>& masked) {
        std::vector<nb::ndarray<nb::numpy, uint16_t, nb::ndim<1>>> out;
        for (auto& v : ref::low_latency_combine(di, dout, ci, args, masked)) out.push_back(to_numpy(v));
        return out;
      },
      nb::arg("dispatch_inputs"), nb::arg("dispatch_outputs"), nb::arg("inputs"), nb::arg("args"),
      nb::arg("masked_ranks") = std::vector<uint8_t>{});
}

}  // namespace deep_ep::python
