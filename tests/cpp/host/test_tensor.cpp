// TensorView helpers and argument validation messages (docs/design.md decision 7).
#include <gtest/gtest.h>

#include "deep_ep/error.hpp"
#include "deep_ep/tensor.hpp"

using namespace deep_ep;

namespace {
TensorView fake(DType dtype, std::vector<int64_t> shape, int device = 0) {
  static char storage[64];
  return make_contiguous_view(storage, dtype, std::move(shape), device);
}

std::string message_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}
}  // namespace

TEST(TensorView, ContiguousStridesAndSizes) {
  auto t = fake(DType::kBFloat16, {4, 3, 2});
  EXPECT_EQ(t.strides, (std::vector<int64_t>{6, 2, 1}));
  EXPECT_EQ(t.numel(), 24);
  EXPECT_EQ(t.nbytes(), 48);
  EXPECT_TRUE(t.is_contiguous());
  t.strides = {1, 4, 12};
  EXPECT_FALSE(t.is_contiguous());
}

TEST(TensorView, DtypeNamesRoundTrip) {
  for (DType d : {DType::kBool, DType::kUInt8, DType::kInt32, DType::kInt64, DType::kFloat32, DType::kBFloat16,
                  DType::kFloat8E4M3})
    EXPECT_EQ(dtype_from_name(dtype_name(d)), d);
  EXPECT_EQ(dtype_from_name("bfloat16"), DType::kBFloat16);
  EXPECT_THROW(dtype_from_name("torch.float16"), TypeError);
}

TEST(CheckTensor, WrongDtypeIsTypeErrorNamingArgument) {
  auto t = fake(DType::kInt32, {4, 8});
  const auto msg = message_of([&] { check_tensor(t, "topk_idx", {DType::kInt64, {kAnySize, kAnySize}, true, 0}); });
  EXPECT_NE(msg.find("topk_idx"), std::string::npos);
  EXPECT_NE(msg.find("torch.int64"), std::string::npos);
  EXPECT_NE(msg.find("torch.int32"), std::string::npos);
  EXPECT_THROW(check_tensor(t, "topk_idx", {DType::kInt64, {kAnySize, kAnySize}, true, 0}), TypeError);
}

TEST(CheckTensor, WrongShapeIsValueError) {
  auto t = fake(DType::kInt64, {4, 8});
  EXPECT_THROW(check_tensor(t, "topk_idx", {DType::kInt64, {4, 9}, true, 0}), ValueError);
  EXPECT_THROW(check_tensor(t, "topk_idx", {DType::kInt64, {kAnySize}, true, 0}), ValueError);
  EXPECT_NO_THROW(check_tensor(t, "topk_idx", {DType::kInt64, {kAnySize, 8}, true, 0}));
}

TEST(CheckTensor, CpuTensorWhereCudaExpectedIsTypeError) {
  auto t = fake(DType::kInt64, {4, 8}, kCpuDevice);
  const auto msg = message_of([&] { check_tensor(t, "topk_idx", {DType::kInt64, {4, 8}, true, 0}); });
  EXPECT_NE(msg.find("cuda:0"), std::string::npos);
  EXPECT_NE(msg.find("cpu"), std::string::npos);
}

TEST(CheckTensor, NonContiguousIsValueError) {
  auto t = fake(DType::kInt64, {4, 8});
  t.strides = {1, 4};
  EXPECT_THROW(check_tensor(t, "topk_idx", {DType::kInt64, {4, 8}, true, 0}), ValueError);
  EXPECT_NO_THROW(check_tensor(t, "x_scales", {DType::kInt64, {4, 8}, false, 0}));
}
