// A torch-free view of a tensor: pointer, dtype, shape, strides (in elements) and device.
// The Python layer builds these from torch tensors; C++ users build them by hand. Validation
// helpers produce the "argument, expected, given" messages of docs/design.md decision 7.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

namespace deep_ep {

enum class DType : int { kBool, kUInt8, kInt32, kInt64, kFloat32, kBFloat16, kFloat8E4M3 };

int dtype_size(DType dtype);
const char* dtype_name(DType dtype);             // torch spelling, e.g. "torch.bfloat16"
DType dtype_from_name(const std::string& name);  // accepts "bfloat16" or "torch.bfloat16"

constexpr int kCpuDevice = -1;

struct TensorView {
  void* data = nullptr;
  DType dtype = DType::kUInt8;
  std::vector<int64_t> shape;
  std::vector<int64_t> strides;  // in elements
  int device = kCpuDevice;       // CUDA ordinal, or kCpuDevice

  int dim() const { return static_cast<int>(shape.size()); }
  int64_t size(int d) const { return shape.at(d < 0 ? d + dim() : d); }
  int64_t numel() const;
  int64_t nbytes() const { return numel() * dtype_size(dtype); }
  bool is_contiguous() const;
  bool is_cuda() const { return device != kCpuDevice; }
  std::string describe() const;  // "torch.int64 [4096, 8] strides [8, 1] on cuda:0"

  template <typename T>
  T* ptr() const {
    return static_cast<T*>(data);
  }
};

TensorView make_contiguous_view(void* data, DType dtype, std::vector<int64_t> shape, int device);

// Sentinel for a shape entry that may take any value.
constexpr int64_t kAnySize = -1;

struct TensorRequirement {
  DType dtype;
  std::vector<int64_t> shape;  // kAnySize entries are free
  bool contiguous = true;
  int device = 0;  // required CUDA ordinal; kCpuDevice for host tensors
};

// Throws TypeError (dtype/device) or ValueError (shape/contiguity) naming `arg`.
void check_tensor(const TensorView& t, const char* arg, const TensorRequirement& req);

}  // namespace deep_ep
