// TensorView helpers and argument validation (docs/design.md decision 7).
#include "deep_ep/tensor.hpp"

#include "deep_ep/error.hpp"

namespace deep_ep {

int dtype_size(DType dtype) {
  switch (dtype) {
    case DType::kBool:
    case DType::kUInt8:
    case DType::kFloat8E4M3:
      return 1;
    case DType::kBFloat16:
      return 2;
    case DType::kInt32:
    case DType::kFloat32:
      return 4;
    case DType::kInt64:
      return 8;
  }
  return 0;
}

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kBool:
      return "torch.bool";
    case DType::kUInt8:
      return "torch.uint8";
    case DType::kInt32:
      return "torch.int32";
    case DType::kInt64:
      return "torch.int64";
    case DType::kFloat32:
      return "torch.float32";
    case DType::kBFloat16:
      return "torch.bfloat16";
    case DType::kFloat8E4M3:
      return "torch.float8_e4m3fn";
  }
  return "unknown";
}

DType dtype_from_name(const std::string& raw) {
  const std::string name = raw.rfind("torch.", 0) == 0 ? raw.substr(6) : raw;
  if (name == "bool") return DType::kBool;
  if (name == "uint8") return DType::kUInt8;
  if (name == "int32") return DType::kInt32;
  if (name == "int64") return DType::kInt64;
  if (name == "float32") return DType::kFloat32;
  if (name == "bfloat16") return DType::kBFloat16;
  if (name == "float8_e4m3fn") return DType::kFloat8E4M3;
  throw TypeError("unsupported dtype " + raw +
                  " (deep_ep takes bool, uint8, int32, int64, float32, "
                  "bfloat16, float8_e4m3fn)");
}

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  return n;
}

bool TensorView::is_contiguous() const {
  int64_t expected = 1;
  for (int d = dim() - 1; d >= 0; --d) {
    if (shape[d] != 1 && strides[d] != expected) return false;
    expected *= shape[d];
  }
  return true;
}

static std::string join(const std::vector<int64_t>& v) {
  std::string out = "[";
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) out += ", ";
    out += v[i] == kAnySize ? std::string("*") : std::to_string(v[i]);
  }
  return out + "]";
}

std::string TensorView::describe() const {
  return detail::concat(dtype_name(dtype), " ", join(shape), " strides ", join(strides), " on ",
                        device == kCpuDevice ? std::string("cpu") : "cuda:" + std::to_string(device));
}

TensorView make_contiguous_view(void* data, DType dtype, std::vector<int64_t> shape, int device) {
  TensorView t;
  t.data = data;
  t.dtype = dtype;
  t.shape = std::move(shape);
  t.strides.assign(t.shape.size(), 1);
  for (int d = static_cast<int>(t.shape.size()) - 2; d >= 0; --d) t.strides[d] = t.strides[d + 1] * t.shape[d + 1];
  t.device = device;
  return t;
}

void check_tensor(const TensorView& t, const char* arg, const TensorRequirement& req) {
  DEEP_EP_TYPE_CHECK(t.dtype == req.dtype, arg, " must be ", dtype_name(req.dtype), ", got ", t.describe());
  if (req.device == kCpuDevice) {
    DEEP_EP_TYPE_CHECK(!t.is_cuda(), arg, " must be a CPU tensor, got ", t.describe());
  } else {
    DEEP_EP_TYPE_CHECK(t.device == req.device, arg, " must be on cuda:", req.device, ", got ", t.describe());
  }
  bool shape_ok = t.dim() == static_cast<int>(req.shape.size());
  for (int d = 0; shape_ok && d < t.dim(); ++d) shape_ok = req.shape[d] == kAnySize || req.shape[d] == t.shape[d];
  DEEP_EP_CHECK(shape_ok, arg, " must have shape ", join(req.shape), ", got ", t.describe());
  DEEP_EP_CHECK(!req.contiguous || t.is_contiguous(), arg, " must be contiguous, got ", t.describe());
  DEEP_EP_CHECK(t.numel() == 0 || t.data != nullptr, arg, " has a null data pointer: ", t.describe());
}

}  // namespace deep_ep
