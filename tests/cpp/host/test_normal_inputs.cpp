// Validation of the normal-mode ops' tensors: the 16-byte alignment of rows the kernels move in
// 16-byte vectors (views with a storage offset), next to a well-formed call that passes.
#include <gtest/gtest.h>

#include <string>

#include "deep_ep/error.hpp"
#include "deep_ep/tensor.hpp"
#include "runtime/normal_inputs.hpp"
#include "value_error.hpp"

using namespace deep_ep;
using deep_ep::host_tests::value_error_of;

namespace {

alignas(16) char storage[1 << 16];

// A [rows, hidden] view starting `offset_bytes` into 16-byte aligned storage, on cuda:0.
TensorView rows_at(DType dtype, int64_t rows, int64_t hidden, int offset_bytes) {
  return make_contiguous_view(storage + offset_bytes, dtype, {rows, hidden}, 0);
}

}  // namespace

TEST(NormalInputs, DispatchAcceptsAlignedRowsAndNamesAMisalignedX) {
  const auto shape = check_normal_dispatch_inputs(rows_at(DType::kBFloat16, 4, 128, 0), std::nullopt, std::nullopt,
                                                  std::nullopt, 0, 1, 0);
  EXPECT_EQ(shape.row_bytes, 256);
  const std::string text = value_error_of([] {
    check_normal_dispatch_inputs(rows_at(DType::kBFloat16, 4, 128, 2), std::nullopt, std::nullopt, std::nullopt, 0, 1,
                                 0);
  });
  EXPECT_NE(text.find("x must start at a 16-byte aligned address"), std::string::npos) << text;
  EXPECT_NE(text.find("8 elements"), std::string::npos) << text;  // 16 bytes of bf16
  // FP8: one byte per element.
  const std::string fp8 = value_error_of([] {
    const auto scales = make_contiguous_view(storage + 4096, DType::kFloat32, {4, 1}, 0);
    check_normal_dispatch_inputs(rows_at(DType::kFloat8E4M3, 4, 128, 1), scales, std::nullopt, std::nullopt, 0, 1, 0);
  });
  EXPECT_NE(fp8.find("16 elements"), std::string::npos) << fp8;
}

TEST(NormalInputs, CombineNamesAMisalignedXOrBias) {
  const auto x = rows_at(DType::kBFloat16, 6, 64, 0);
  const auto bias = make_contiguous_view(storage + 8192, DType::kBFloat16, {3, 64}, 0);
  EXPECT_EQ(check_normal_combine_inputs(x, std::nullopt, bias, bias, 3, 0).hidden, 64);
  EXPECT_NE(value_error_of([&] {
              check_normal_combine_inputs(rows_at(DType::kBFloat16, 6, 64, 6), std::nullopt, std::nullopt, std::nullopt,
                                          3, 0);
            }).find("x must start at a 16-byte aligned address"),
            std::string::npos);
  const auto bias_off = make_contiguous_view(storage + 8192 + 2, DType::kBFloat16, {3, 64}, 0);
  EXPECT_NE(value_error_of([&] {
              check_normal_combine_inputs(x, std::nullopt, bias, bias_off, 3, 0);
            }).find("bias[1] must start at a 16-byte aligned address"),
            std::string::npos);
  EXPECT_NE(value_error_of([&] {
              check_normal_combine_inputs(x, std::nullopt, bias_off, std::nullopt, 3, 0);
            }).find("bias[0] must start"),
            std::string::npos);
}
