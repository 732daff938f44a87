// Tests of the reference number formats: bf16 and e4m3 encodings (known values, ties, saturation,
// NaN), exhaustive round trips, per-128-channel FP8 quantization and the UE8M0 exponent byte.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "deep_ep/error.hpp"
#include "deep_ep/reference.hpp"

namespace ref = deep_ep::reference;

namespace {

// Every finite e4m3 value with its encoding, for brute-force nearest-value checks.
struct E4m3Value {
  uint8_t bits;
  double value;
};

std::vector<E4m3Value> all_finite_e4m3() {
  std::vector<E4m3Value> values;
  for (int bits = 0; bits < 256; ++bits) {
    if ((bits & 0x7F) == 0x7F) continue;  // NaN
    values.push_back({static_cast<uint8_t>(bits), ref::e4m3_to_float(static_cast<uint8_t>(bits))});
  }
  return values;
}

}  // namespace

// ---- bf16 -------------------------------------------------------------------------------------

TEST(Bf16, EncodesExactValuesWithoutChange) {
  EXPECT_EQ(ref::float_to_bf16(1.0f), 0x3F80);
  EXPECT_EQ(ref::float_to_bf16(-2.0f), 0xC000);
  EXPECT_EQ(ref::float_to_bf16(0.5f), 0x3F00);
  EXPECT_EQ(ref::float_to_bf16(1.5f), 0x3FC0);
  EXPECT_EQ(ref::float_to_bf16(0.0f), 0x0000);
  EXPECT_EQ(ref::float_to_bf16(-0.0f), 0x8000);
}

TEST(Bf16, DecodesByPlacingBitsInTheHighHalf) {
  EXPECT_EQ(ref::bf16_to_float(0x3F80), 1.0f);
  EXPECT_EQ(ref::bf16_to_float(0xC040), -3.0f);
  EXPECT_EQ(ref::bf16_to_float(0x0001), std::ldexp(1.0f, -133));  // smallest subnormal
  EXPECT_TRUE(std::isinf(ref::bf16_to_float(0xFF80)));
}

TEST(Bf16, RoundsHalfwayCasesToEven) {
  // 1 + 2^-8 lies halfway between 1.0 (even mantissa) and 1 + 2^-7.
  EXPECT_EQ(ref::float_to_bf16(1.0f + std::ldexp(1.0f, -8)), 0x3F80);
  // 1 + 3 * 2^-8 lies halfway between 1 + 2^-7 (odd) and 1 + 2^-6 (even).
  EXPECT_EQ(ref::float_to_bf16(1.0f + 3.0f * std::ldexp(1.0f, -8)), 0x3F82);
  // Just above the halfway point rounds up.
  EXPECT_EQ(ref::float_to_bf16(1.0f + std::ldexp(1.0f, -8) + std::ldexp(1.0f, -20)), 0x3F81);
  // Just below a halfway point rounds down.
  EXPECT_EQ(ref::float_to_bf16(1.0f + 3.0f * std::ldexp(1.0f, -8) - std::ldexp(1.0f, -20)), 0x3F81);
}

TEST(Bf16, OverflowsToInfinityAndKeepsInfinities) {
  EXPECT_EQ(ref::float_to_bf16(std::numeric_limits<float>::max()), 0x7F80);
  EXPECT_EQ(ref::float_to_bf16(std::numeric_limits<float>::infinity()), 0x7F80);
  EXPECT_EQ(ref::float_to_bf16(-std::numeric_limits<float>::infinity()), 0xFF80);
}

TEST(Bf16, PreservesNaNAndItsSign) {
  uint16_t positive = ref::float_to_bf16(std::numeric_limits<float>::quiet_NaN());
  uint16_t negative = ref::float_to_bf16(-std::numeric_limits<float>::quiet_NaN());
  EXPECT_TRUE(std::isnan(ref::bf16_to_float(positive)));
  EXPECT_TRUE(std::isnan(ref::bf16_to_float(negative)));
  EXPECT_EQ(positive & 0x8000, 0);
  EXPECT_EQ(negative & 0x8000, 0x8000);
  // A signalling NaN whose payload lives only in the low 16 bits must not become an infinity.
  uint32_t signalling_bits = 0x7F800001u;
  float signalling;
  std::memcpy(&signalling, &signalling_bits, sizeof(signalling));
  EXPECT_TRUE(std::isnan(ref::bf16_to_float(ref::float_to_bf16(signalling))));
}

TEST(Bf16, RoundTripsEveryNonNaNPattern) {
  for (uint32_t bits = 0; bits <= 0xFFFF; ++bits) {
    float value = ref::bf16_to_float(static_cast<uint16_t>(bits));
    if (std::isnan(value)) continue;
    ASSERT_EQ(ref::float_to_bf16(value), bits) << "bf16 pattern 0x" << std::hex << bits;
  }
}

// ---- e4m3 -------------------------------------------------------------------------------------

TEST(E4m3, EncodesKnownValues) {
  EXPECT_EQ(ref::float_to_e4m3(448.0f), 0x7E);
  EXPECT_EQ(ref::float_to_e4m3(-448.0f), 0xFE);
  EXPECT_EQ(ref::float_to_e4m3(1.0f), 0x38);
  EXPECT_EQ(ref::float_to_e4m3(-1.0f), 0xB8);
  EXPECT_EQ(ref::float_to_e4m3(1.125f), 0x39);
  EXPECT_EQ(ref::float_to_e4m3(0.5f), 0x30);
  EXPECT_EQ(ref::float_to_e4m3(240.0f), 0x77);
  EXPECT_EQ(ref::float_to_e4m3(std::ldexp(1.0f, -6)), 0x08);  // smallest normal
  EXPECT_EQ(ref::float_to_e4m3(std::ldexp(1.0f, -9)), 0x01);  // smallest subnormal
  EXPECT_EQ(ref::float_to_e4m3(std::ldexp(7.0f, -9)), 0x07);  // largest subnormal
  EXPECT_EQ(ref::float_to_e4m3(0.0f), 0x00);
  EXPECT_EQ(ref::float_to_e4m3(-0.0f), 0x80);
}

TEST(E4m3, DecodesKnownPatterns) {
  EXPECT_EQ(ref::e4m3_to_float(0x7E), 448.0f);
  EXPECT_EQ(ref::e4m3_to_float(0xFE), -448.0f);
  EXPECT_EQ(ref::e4m3_to_float(0x38), 1.0f);
  EXPECT_EQ(ref::e4m3_to_float(0x3A), 1.25f);
  EXPECT_EQ(ref::e4m3_to_float(0x08), std::ldexp(1.0f, -6));
  EXPECT_EQ(ref::e4m3_to_float(0x01), std::ldexp(1.0f, -9));
  EXPECT_EQ(ref::e4m3_to_float(0x85), -std::ldexp(5.0f, -9));
  EXPECT_TRUE(std::isnan(ref::e4m3_to_float(0x7F)));
  EXPECT_TRUE(std::isnan(ref::e4m3_to_float(0xFF)));
}

TEST(E4m3, RoundsHalfwayCasesToEven) {
  EXPECT_EQ(ref::float_to_e4m3(1.0625f), 0x38);  // between 1.0 (m=0) and 1.125 (m=1)
  EXPECT_EQ(ref::float_to_e4m3(1.1875f), 0x3A);  // between 1.125 (m=1) and 1.25 (m=2)
  EXPECT_EQ(ref::float_to_e4m3(-1.1875f), 0xBA);
  EXPECT_EQ(ref::float_to_e4m3(15.5f), 0x58);  // between 15 (m=7) and 16: carries into the exponent
  EXPECT_EQ(ref::float_to_e4m3(1.07f), 0x39);  // above the halfway point
}

TEST(E4m3, RoundsSubnormalsExactly) {
  const float unit = std::ldexp(1.0f, -9);
  EXPECT_EQ(ref::float_to_e4m3(0.5f * unit), 0x00);  // halfway to the smallest subnormal: even is zero
  EXPECT_EQ(ref::float_to_e4m3(-0.5f * unit), 0x80);
  EXPECT_EQ(ref::float_to_e4m3(0.51f * unit), 0x01);
  EXPECT_EQ(ref::float_to_e4m3(1.5f * unit), 0x02);  // halfway between 1 and 2 units
  EXPECT_EQ(ref::float_to_e4m3(2.5f * unit), 0x02);  // halfway between 2 and 3 units
  EXPECT_EQ(ref::float_to_e4m3(7.5f * unit), 0x08);  // rounds up into the smallest normal
  EXPECT_EQ(ref::float_to_e4m3(1e-30f), 0x00);
}

TEST(E4m3, SaturatesToLargestFiniteValue) {
  EXPECT_EQ(ref::float_to_e4m3(449.0f), 0x7E);
  EXPECT_EQ(ref::float_to_e4m3(464.0f), 0x7E);  // halfway to 480, which e4m3fn cannot hold
  EXPECT_EQ(ref::float_to_e4m3(1e9f), 0x7E);
  EXPECT_EQ(ref::float_to_e4m3(-1e9f), 0xFE);
  EXPECT_EQ(ref::float_to_e4m3(std::numeric_limits<float>::infinity()), 0x7E);
  EXPECT_EQ(ref::float_to_e4m3(-std::numeric_limits<float>::infinity()), 0xFE);
}

TEST(E4m3, MapsNaNTo0x7F) {
  EXPECT_EQ(ref::float_to_e4m3(std::numeric_limits<float>::quiet_NaN()), 0x7F);
  EXPECT_EQ(ref::float_to_e4m3(-std::numeric_limits<float>::quiet_NaN()), 0x7F);
}

TEST(E4m3, RoundTripsEveryFinitePattern) {
  for (const E4m3Value& v : all_finite_e4m3())
    EXPECT_EQ(ref::float_to_e4m3(static_cast<float>(v.value)), v.bits) << "pattern " << int(v.bits);
}

TEST(E4m3, PicksTheNearestFiniteValueForRandomInputs) {
  const std::vector<E4m3Value> table = all_finite_e4m3();
  for (uint32_t seed : {1u, 2u, 3u}) {
    std::mt19937 rng(seed);
    std::uniform_real_distribution<float> wide(-500.0f, 500.0f);
    std::uniform_real_distribution<float> exponent(-12.0f, 9.0f);
    for (int i = 0; i < 20000; ++i) {
      float x = (i % 2) ? wide(rng) : std::copysign(std::exp2(exponent(rng)), wide(rng));
      double clamped = std::fmax(-448.0, std::fmin(448.0, static_cast<double>(x)));
      // Nearest by brute force; on a tie the encoding with an even mantissa (bit 0 clear) wins.
      const E4m3Value* best = nullptr;
      for (const E4m3Value& v : table) {
        if (std::signbit(v.value) != std::signbit(x)) continue;
        double d = std::fabs(v.value - clamped);
        double best_d = best ? std::fabs(best->value - clamped) : INFINITY;
        if (d < best_d || (d == best_d && (v.bits & 1) == 0)) best = &v;
      }
      ASSERT_NE(best, nullptr);
      ASSERT_EQ(ref::float_to_e4m3(x), best->bits) << "x = " << x << " seed " << seed;
    }
  }
}

// ---- FP8 quantization -------------------------------------------------------------------------

TEST(Fp8Quantization, ScaleIsGroupAmaxOver448) {
  std::vector<float> x(128, 0.0f);
  x[0] = 1.0f;
  x[7] = -3.5f;  // the group's largest magnitude
  x[9] = 0.875f;
  std::vector<uint8_t> out(128);
  float scale_inv = 0.0f;
  ref::quantize_row_fp8(x.data(), 128, false, out.data(), &scale_inv);
  EXPECT_EQ(scale_inv, 3.5f / 448.0f);
  EXPECT_EQ(out[7], 0xFE);  // the amax element maps to -448
  EXPECT_EQ(out[0], 0x70);  // 1.0 * 128 = 128 = 1.0 * 2^7
  EXPECT_EQ(out[9], 0x6E);  // 0.875 * 128 = 112 = 1.75 * 2^6
  EXPECT_EQ(out[1], 0x00);
}

TEST(Fp8Quantization, RoundScaleUsesNextPowerOfTwoAtOrAboveAmaxOver448) {
  struct Case {
    float amax;
    float expected_scale_inv;
  };
  const Case cases[] = {
      {448.0f, 1.0f},  // exactly a power of two: kept
      {449.0f, 2.0f},  // just above: next power
      {300.0f, 1.0f}, {224.0f, 0.5f}, {56.0f, 0.125f}, {57.0f, 0.25f},
  };
  for (const Case& c : cases) {
    std::vector<float> x(128, 0.0f);
    x[5] = c.amax;
    std::vector<uint8_t> out(128);
    float scale_inv = 0.0f;
    ref::quantize_row_fp8(x.data(), 128, true, out.data(), &scale_inv);
    EXPECT_EQ(scale_inv, c.expected_scale_inv) << "amax " << c.amax;
    EXPECT_EQ(out[5], ref::float_to_e4m3(c.amax * (1.0f / c.expected_scale_inv))) << "amax " << c.amax;
  }
}

TEST(Fp8Quantization, AllZeroGroupUsesMinimumAmax) {
  std::vector<float> x(128, 0.0f);
  std::vector<uint8_t> out(128, 0xAA);
  float scale_inv = 0.0f;
  ref::quantize_row_fp8(x.data(), 128, false, out.data(), &scale_inv);
  EXPECT_EQ(scale_inv, 1e-4f / 448.0f);
  for (uint8_t b : out) EXPECT_EQ(b, 0x00);
}

TEST(Fp8Quantization, ScalesEachGroupOf128ChannelsIndependently) {
  std::vector<float> x(256, 0.0f);
  x[3] = 1.0f;      // group 0 amax 1
  x[130] = 100.0f;  // group 1 amax 100
  x[131] = 1.0f;
  std::vector<uint8_t> out(256);
  float scale_invs[2];
  ref::quantize_row_fp8(x.data(), 256, false, out.data(), scale_invs);
  EXPECT_EQ(scale_invs[0], 1.0f / 448.0f);
  EXPECT_EQ(scale_invs[1], 100.0f / 448.0f);
  EXPECT_EQ(out[3], 0x7E);
  EXPECT_EQ(out[130], 0x7E);
  EXPECT_EQ(out[131], ref::float_to_e4m3(1.0f * (1.0f / (100.0f / 448.0f))));
}

TEST(Fp8Quantization, EncodesProductWithFloatReciprocalOfScale) {
  for (uint32_t seed : {11u, 12u}) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> normal(0.0f, 3.0f);
    for (bool round_scale : {false, true}) {
      std::vector<float> x(384);
      for (float& v : x) v = normal(rng);
      std::vector<uint8_t> out(384);
      float scale_invs[3];
      ref::quantize_row_fp8(x.data(), 384, round_scale, out.data(), scale_invs);
      for (int c = 0; c < 384; ++c) {
        const float inv = 1.0f / scale_invs[c / 128];
        ASSERT_EQ(out[c], ref::float_to_e4m3(x[c] * inv)) << "channel " << c;
      }
    }
  }
}

TEST(Fp8Quantization, MultipliesByReciprocalOfScaleRatherThanDividing) {
  // An input where x * (1 / scale_inv) and x / scale_inv land on opposite sides of an e4m3 rounding
  // tie: the contract (shared with the GPU kernel) is the multiply.
  const float amax = 0x1.e9504p+4f;
  const float x_value = 0x1.29154cp-4f;
  std::vector<float> x(128, 0.0f);
  x[0] = amax;
  x[1] = x_value;
  std::vector<uint8_t> out(128);
  float scale_inv = 0.0f;
  ref::quantize_row_fp8(x.data(), 128, false, out.data(), &scale_inv);
  ASSERT_EQ(scale_inv, amax / 448.0f);
  ASSERT_EQ(ref::float_to_e4m3(x_value / scale_inv), 0x38);  // what a division would give
  EXPECT_EQ(out[1], 0x39);
}

TEST(Fp8Quantization, DequantizesWithinOneSixteenthOfGroupMax) {
  for (uint32_t seed : {21u, 22u, 23u}) {
    std::mt19937 rng(seed);
    std::uniform_real_distribution<float> log_magnitude(-6.0f, 6.0f);
    std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
    for (bool round_scale : {false, true}) {
      const int hidden = 512;
      std::vector<float> x(hidden);
      for (int g = 0; g < hidden / 128; ++g) {
        const float magnitude = std::exp2(log_magnitude(rng));  // a different range per group
        for (int c = 0; c < 128; ++c) x[g * 128 + c] = magnitude * uniform(rng);
      }
      std::vector<uint8_t> out(hidden);
      std::vector<float> scale_invs(hidden / 128);
      ref::quantize_row_fp8(x.data(), hidden, round_scale, out.data(), scale_invs.data());
      for (int g = 0; g < hidden / 128; ++g) {
        float amax = 1e-4f;
        for (int c = 0; c < 128; ++c) amax = std::fmax(amax, std::fabs(x[g * 128 + c]));
        for (int c = 0; c < 128; ++c) {
          const float restored = ref::e4m3_to_float(out[g * 128 + c]) * scale_invs[g];
          ASSERT_LE(std::fabs(restored - x[g * 128 + c]), amax / 16.0f)
              << "seed " << seed << " group " << g << " channel " << c;
        }
      }
    }
  }
}

TEST(Fp8Quantization, RejectsHiddenNotMultipleOf128) {
  std::vector<float> x(200, 1.0f);
  std::vector<uint8_t> out(200);
  float scale_invs[2];
  EXPECT_THROW(ref::quantize_row_fp8(x.data(), 200, false, out.data(), scale_invs), deep_ep::ValueError);
}

// ---- UE8M0 ------------------------------------------------------------------------------------

TEST(Ue8m0, IsTheBiasedFloat32ExponentOfAPowerOfTwo) {
  EXPECT_EQ(ref::ue8m0_exponent(0.125f), 124);  // 2^-3
  EXPECT_EQ(ref::ue8m0_exponent(1.0f), 127);
  EXPECT_EQ(ref::ue8m0_exponent(2.0f), 128);
  EXPECT_EQ(ref::ue8m0_exponent(std::ldexp(1.0f, -126)), 1);
  EXPECT_EQ(ref::ue8m0_exponent(std::ldexp(1.0f, 127)), 254);
}
