// Shared declarations of the nanobind module deep_ep._C: the only code that knows Python exists.
#pragma once

#include <nanobind/nanobind.h>

#include <cstdint>
#include <vector>

#include "deep_ep/tensor.hpp"

namespace deep_ep::python {

namespace nb = nanobind;

void bind_core(nb::module_& m);       // TensorView, Config, groups, errors
void bind_buffer(nb::module_& m);     // Buffer and its ops
void bind_reference(nb::module_& m);  // CPU reference

// A view from the Python side's (data_ptr, dtype name, shape, strides, device) description.
TensorView make_view(uintptr_t data, const std::string& dtype, const std::vector<int64_t>& shape,
                     const std::vector<int64_t>& strides, int device);

}  // namespace deep_ep::python
