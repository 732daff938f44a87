// Bindings of TensorView, Config and the bootstrap groups.
#include <nanobind/stl/function.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "bindings.hpp"
#include "deep_ep/config.hpp"
#include "deep_ep/error.hpp"
#include "deep_ep/group.hpp"
#include "deep_ep/transport.hpp"

namespace deep_ep::python {

TensorView make_view(uintptr_t data, const std::string& dtype, const std::vector<int64_t>& shape,
                     const std::vector<int64_t>& strides, int device) {
  DEEP_EP_CHECK(shape.size() == strides.size(), "tensor view: shape and strides differ in length");
  TensorView v;
  v.data = reinterpret_cast<void*>(data);
  v.dtype = dtype_from_name(dtype);
  v.shape = shape;
  v.strides = strides;
  v.device = device;
  return v;
}

namespace {

// A Group whose collectives are Python callables (torch.distributed or mpi4py adapters in
// deep_ep/groups.py). Called with the GIL held: Buffer construction does not release it.
class CallbackGroup : public Group {
 public:
  using AllGather = std::function<std::vector<nb::bytes>(nb::bytes)>;
  CallbackGroup(int rank, int size, AllGather all_gather, std::function<void()> barrier)
      : rank_(rank), size_(size), all_gather_(std::move(all_gather)), barrier_(std::move(barrier)) {
    DEEP_EP_CHECK(size > 0 && rank >= 0 && rank < size, "group rank ", rank, " / size ", size, " are inconsistent");
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::vector<std::string> all_gather(const std::string& bytes) override {
    nb::gil_scoped_acquire gil;
    auto parts = all_gather_(nb::bytes(bytes.data(), bytes.size()));
    std::vector<std::string> result;
    result.reserve(parts.size());
    for (auto& p : parts) result.emplace_back(p.c_str(), p.size());
    return result;
  }
  void barrier() override {
    nb::gil_scoped_acquire gil;
    barrier_();
  }

 private:
  int rank_, size_;
  AllGather all_gather_;
  std::function<void()> barrier_;
};

}  // namespace

void bind_core(nb::module_& m) {
  nb::class_<TensorView>(m, "TensorView")
      .def_prop_ro("data_ptr", [](const TensorView& v) { return reinterpret_cast<uintptr_t>(v.data); })
      .def_prop_ro("shape", [](const TensorView& v) { return v.shape; })
      .def("__repr__", &TensorView::describe);
  m.def("make_view", &make_view, nb::arg("data_ptr"), nb::arg("dtype"), nb::arg("shape"), nb::arg("strides"),
        nb::arg("device"));

  nb::class_<Config>(m, "Config")
      .def(nb::init<int, int, int, int, int>(), nb::arg("num_sms") = 20, nb::arg("num_max_nvl_chunked_send_tokens") = 6,
           nb::arg("num_max_nvl_chunked_recv_tokens") = 256, nb::arg("num_max_rdma_chunked_send_tokens") = 6,
           nb::arg("num_max_rdma_chunked_recv_tokens") = 256)
      .def_ro("num_sms", &Config::num_sms)
      .def_ro("num_max_nvl_chunked_send_tokens", &Config::num_max_nvl_chunked_send_tokens)
      .def_ro("num_max_nvl_chunked_recv_tokens", &Config::num_max_nvl_chunked_recv_tokens)
      .def_ro("num_max_rdma_chunked_send_tokens", &Config::num_max_rdma_chunked_send_tokens)
      .def_ro("num_max_rdma_chunked_recv_tokens", &Config::num_max_rdma_chunked_recv_tokens)
      // num_ranks_per_node: ranks of one node (an NVLink domain); 8 as in V1.
      .def("get_nvl_buffer_size_hint", &Config::get_nvl_buffer_size_hint, nb::arg("hidden_bytes"), nb::arg("num_ranks"),
           nb::arg("num_ranks_per_node") = kNumMaxNvlPeers)
      .def("get_rdma_buffer_size_hint", &Config::get_rdma_buffer_size_hint, nb::arg("hidden_bytes"),
           nb::arg("num_ranks"), nb::arg("num_ranks_per_node") = kNumMaxNvlPeers)
      .def("__repr__", [](const Config& c) {
        return detail::concat("Config(num_sms=", c.num_sms,
                              ", num_max_nvl_chunked_send_tokens=", c.num_max_nvl_chunked_send_tokens,
                              ", num_max_nvl_chunked_recv_tokens=", c.num_max_nvl_chunked_recv_tokens,
                              ", num_max_rdma_chunked_send_tokens=", c.num_max_rdma_chunked_send_tokens,
                              ", num_max_rdma_chunked_recv_tokens=", c.num_max_rdma_chunked_recv_tokens, ")");
      });
  m.def("get_dispatch_config", &get_dispatch_config, nb::arg("num_ranks"), nb::arg("num_sms"));
  m.def("get_combine_config", &get_combine_config, nb::arg("num_ranks"), nb::arg("num_sms"));
  m.def("compiled_cuda_architectures", &compiled_cuda_architectures);
  m.def("is_sm90_compiled", &is_sm90_compiled);
  m.def("gin_compiled", &gin_compiled);
  m.def("get_low_latency_rdma_size_hint", &get_low_latency_rdma_size_hint, nb::arg("num_max_dispatch_tokens_per_rank"),
        nb::arg("hidden"), nb::arg("num_ranks"), nb::arg("num_experts"));

  nb::class_<Group>(m, "Group")
      .def_prop_ro("rank", &Group::rank)
      .def_prop_ro("size", &Group::size)
      .def("all_gather",
           [](Group& g, nb::bytes b) {
             std::vector<std::string> parts;
             {
               // Callback groups take the GIL back themselves; file groups wait without it.
               std::string mine(b.c_str(), b.size());
               nb::gil_scoped_release release;
               parts = g.all_gather(mine);
             }
             std::vector<nb::bytes> out;
             for (auto& p : parts) out.emplace_back(p.data(), p.size());
             return out;
           })
      .def("barrier", &Group::barrier, nb::call_guard<nb::gil_scoped_release>());
  nb::class_<CallbackGroup, Group>(m, "CallbackGroup")
      .def(nb::init<int, int, CallbackGroup::AllGather, std::function<void()>>(), nb::arg("rank"), nb::arg("size"),
           nb::arg("all_gather"), nb::arg("barrier"));
  nb::class_<FileGroup, Group>(m, "FileGroup")
      .def(nb::init<std::string, int, int, double>(), nb::arg("dir"), nb::arg("rank"), nb::arg("size"),
           nb::arg("timeout_s") = 120.0);
}

}  // namespace deep_ep::python
