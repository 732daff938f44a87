// Number formats of the CPU reference: bf16 and float8_e4m3fn conversions, the per-128-channel FP8
// quantization of low-latency dispatch, and the UE8M0 exponent byte. The GPU kernels must reproduce
// these bit for bit, so every rounding step is spelled out rather than left to a library.
#include <cmath>
#include <cstring>

#include "deep_ep/error.hpp"
#include "deep_ep/reference.hpp"

namespace deep_ep::reference {
namespace {

constexpr float kE4m3Max = 448.0f;
constexpr float kMinAmax = 1e-4f;
constexpr int kScaleGroup = 128;

uint32_t float_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

float bits_float(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

// Rounds a non-negative double to the nearest integer, ties to even. Written
// out so the result never depends on the floating-point environment's rounding mode.
double round_half_even(double value) {
  double floor_value = std::floor(value);
  double fraction = value - floor_value;
  if (fraction > 0.5) return floor_value + 1.0;
  if (fraction < 0.5) return floor_value;
  return std::fmod(floor_value, 2.0) == 0.0 ? floor_value : floor_value + 1.0;
}

}  // namespace

float bf16_to_float(uint16_t bits) { return bits_float(static_cast<uint32_t>(bits) << 16); }

uint16_t float_to_bf16(float value) {
  uint32_t bits = float_bits(value);
  // A NaN keeps its sign and top payload bits; the quiet bit guarantees the truncated payload is not
  // all zero (which would turn it into an infinity).
  if (std::isnan(value)) return static_cast<uint16_t>((bits >> 16) | 0x0040u);
  // Adding 0x7FFF plus the lowest kept bit rounds to nearest, ties to even; a carry out of the
  // mantissa correctly bumps the exponent, up to infinity.
  uint32_t lowest_kept_bit = (bits >> 16) & 1u;
  return static_cast<uint16_t>((bits + 0x7FFFu + lowest_kept_bit) >> 16);
}

uint8_t float_to_e4m3(float value) {
  // e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits; no infinities, 0x7F/0xFF are NaN, the
  // largest finite value is 448 (0x7E). Subnormals are m * 2^-9 for m in 1..7.
  if (std::isnan(value)) return 0x7F;
  uint8_t sign = std::signbit(value) ? 0x80 : 0x00;
  double magnitude = std::fabs(static_cast<double>(value));
  // SATFINITE: everything at or beyond the largest finite value (infinities included) clamps to it.
  // Anything below 448 rounds to at most 448, so the normal path below never overflows.
  if (magnitude >= kE4m3Max) return static_cast<uint8_t>(sign | 0x7E);

  if (magnitude < std::ldexp(1.0, -6)) {
    // Subnormal range: count units of 2^-9. A count of 8 is the smallest normal 2^-6, whose
    // encoding 0x08 is exactly the count, so no special case is needed.
    double units = round_half_even(std::ldexp(magnitude, 9));
    return static_cast<uint8_t>(sign | static_cast<uint8_t>(units));
  }

  int exponent;  // magnitude = fraction * 2^exponent, fraction in [0.5, 1)
  double fraction = std::frexp(magnitude, &exponent);
  int unbiased = exponent - 1;                                      // magnitude = (2 * fraction) * 2^unbiased
  double mantissa = round_half_even((2.0 * fraction - 1.0) * 8.0);  // exact in double before rounding
  if (mantissa == 8.0) {                                            // rounded up into the next binade
    mantissa = 0.0;
    ++unbiased;
  }
  return static_cast<uint8_t>(sign | ((unbiased + 7) << 3) | static_cast<int>(mantissa));
}

float e4m3_to_float(uint8_t bits) {
  int exponent_field = (bits >> 3) & 0xF;
  int mantissa = bits & 0x7;
  if (exponent_field == 0xF && mantissa == 0x7) return std::nanf("");
  float magnitude = exponent_field == 0 ? std::ldexp(static_cast<float>(mantissa), -9)
                                        : std::ldexp(1.0f + static_cast<float>(mantissa) / 8.0f, exponent_field - 7);
  return (bits & 0x80) ? -magnitude : magnitude;
}

void quantize_row_fp8(const float* x, int hidden, bool round_scale, uint8_t* out, float* scale_invs) {
  DEEP_EP_CHECK(hidden >= 0 && hidden % kScaleGroup == 0, "quantize_row_fp8: hidden must be a non-negative ",
                "multiple of ", kScaleGroup, ", got ", hidden);
  for (int group = 0; group < hidden / kScaleGroup; ++group) {
    const float* group_x = x + group * kScaleGroup;
    float amax = kMinAmax;
    for (int c = 0; c < kScaleGroup; ++c) amax = std::fmax(amax, std::fabs(group_x[c]));

    float scale_inv = amax / kE4m3Max;  // float32 division, not a multiply by 1/448
    if (round_scale) {
      // Smallest power of two >= scale_inv, from the exact binary exponent: frexp gives
      // scale_inv = fraction * 2^exponent with fraction in [0.5, 1); fraction 0.5 is already a power of two.
      int exponent;
      float fraction = std::frexp(scale_inv, &exponent);
      scale_inv = std::ldexp(1.0f, fraction == 0.5f ? exponent - 1 : exponent);
    }
    // The multiplier is the float32 reciprocal of the reported scale, so dequantizing with
    // scale_inv recovers x up to e4m3 rounding; the GPU kernel computes the same `inv`.
    float inv = 1.0f / scale_inv;
    for (int c = 0; c < kScaleGroup; ++c) out[group * kScaleGroup + c] = float_to_e4m3(group_x[c] * inv);
    scale_invs[group] = scale_inv;
  }
}

uint8_t ue8m0_exponent(float power_of_two_scale) {
  return static_cast<uint8_t>((float_bits(power_of_two_scale) >> 23) & 0xFFu);
}

}  // namespace deep_ep::reference
