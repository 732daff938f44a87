// bf16 arithmetic of the combine kernels: eight bf16 values travel as one int4; sums run in float32
// and round once to bf16, to nearest even (the CPU reference's rule).
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

namespace deep_ep::device {

__device__ __forceinline__ float bf16_bits_to_float(uint32_t bits16) { return __uint_as_float(bits16 << 16); }

__device__ __forceinline__ uint32_t float_to_bf16_bits(float f) {
  return static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(f)));
}

// acc[i] += the i-th bf16 of v.
__device__ __forceinline__ void add_bf16x8(float (&acc)[8], const int4& v) {
  const uint32_t w[4] = {static_cast<uint32_t>(v.x), static_cast<uint32_t>(v.y), static_cast<uint32_t>(v.z),
                         static_cast<uint32_t>(v.w)};
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    acc[2 * q] += bf16_bits_to_float(w[q] & 0xffffu);
    acc[2 * q + 1] += bf16_bits_to_float(w[q] >> 16);
  }
}

__device__ __forceinline__ int4 pack_bf16x8(const float (&acc)[8]) {
  uint32_t w[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) w[q] = float_to_bf16_bits(acc[2 * q]) | (float_to_bf16_bits(acc[2 * q + 1]) << 16);
  return make_int4(static_cast<int>(w[0]), static_cast<int>(w[1]), static_cast<int>(w[2]), static_cast<int>(w[3]));
}

}  // namespace deep_ep::device
