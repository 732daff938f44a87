// Entry point of deep_ep._C and its exception translation: deep_ep's C++ exceptions become the
// Python exceptions of the same meaning (ValueError, TypeError, TimeoutError, RuntimeError).
#include <nanobind/nanobind.h>

#include "bindings.hpp"
#include "deep_ep/error.hpp"

namespace nb = nanobind;

NB_MODULE(_C, m) {
  m.doc() = "deep_ep core: expert-parallel dispatch/combine runtime, kernels and CPU reference";
  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const deep_ep::TypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what());
    } catch (const deep_ep::TimeoutError& e) {
      PyErr_SetString(PyExc_TimeoutError, e.what());
    }
  });
  deep_ep::python::bind_core(m);
  deep_ep::python::bind_buffer(m);
  deep_ep::python::bind_reference(m);
}
