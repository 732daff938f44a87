// LogFMT row codec of low-latency combine (kernels/low_latency/logfmt.hpp): the documented error
// bound, zero and clamped-range handling, and the byte layout the device kernels must reproduce.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "deep_ep/error.hpp"
#include "kernels/low_latency/logfmt.hpp"

using namespace deep_ep::low_latency;

namespace {

struct GroupHeader {
  float lmin, step;
};

GroupHeader read_header(const std::vector<uint8_t>& row, int64_t group_idx) {
  GroupHeader h;
  std::memcpy(&h.lmin, row.data() + group_idx * kLogfmtGroupBytes, sizeof(float));
  std::memcpy(&h.step, row.data() + group_idx * kLogfmtGroupBytes + sizeof(float), sizeof(float));
  return h;
}

// The bound stated in logfmt.hpp, evaluated in double so that the check adds no rounding of its own.
double error_bound(float x, float group_max_abs, float step) {
  const double relative = std::exp2(static_cast<double>(step) / 2.0) - 1.0 + kLogfmtSlack;
  const double absolute = (1.0 + kLogfmtSlack) * std::exp2(-(static_cast<double>(kLogfmtRange) + 1.0));
  return relative * std::fabs(static_cast<double>(x)) + absolute * group_max_abs;
}

std::vector<uint8_t> encode(const std::vector<float>& x) {
  std::vector<uint8_t> row(logfmt_row_bytes(static_cast<int64_t>(x.size())));
  logfmt_encode_row(x.data(), static_cast<int64_t>(x.size()), row.data());
  return row;
}

std::vector<float> decode(const std::vector<uint8_t>& row, int64_t hidden) {
  std::vector<float> out(hidden);
  logfmt_decode_row(row.data(), hidden, out.data());
  return out;
}

// Checks every element of x against the bound and returns the decoded row.
std::vector<float> expect_round_trip_within_bound(const std::vector<float>& x) {
  const int64_t hidden = static_cast<int64_t>(x.size());
  const auto row = encode(x);
  const auto y = decode(row, hidden);
  for (int64_t group_idx = 0; group_idx < hidden / kLogfmtGroup; ++group_idx) {
    const GroupHeader h = read_header(row, group_idx);
    float group_max_abs = 0.0f;
    for (int i = 0; i < kLogfmtGroup; ++i)
      group_max_abs = std::max(group_max_abs, std::fabs(x[group_idx * kLogfmtGroup + i]));
    for (int i = 0; i < kLogfmtGroup; ++i) {
      const int64_t idx = group_idx * kLogfmtGroup + i;
      const double err = std::fabs(static_cast<double>(y[idx]) - static_cast<double>(x[idx]));
      const double bound = error_bound(x[idx], group_max_abs, h.step);
      if (!(err <= bound)) {
        ADD_FAILURE() << "element " << idx << ": x=" << x[idx] << " decoded=" << y[idx] << " error=" << err
                      << " bound=" << bound << " (group max " << group_max_abs << ", step " << h.step << ")";
        return y;
      }
    }
  }
  return y;
}

}  // namespace

TEST(Logfmt, RowBytesAre88PerGroupOf64Channels) {
  EXPECT_EQ(logfmt_row_bytes(64), 88);
  EXPECT_EQ(logfmt_row_bytes(128), 176);
  EXPECT_EQ(logfmt_row_bytes(7168), 9856);
}

TEST(Logfmt, RandomNormalRowsStayWithinDocumentedBound) {
  const float scales[] = {1.0f, 1e-3f, 4096.0f};
  for (uint32_t seed : {1u, 2u, 3u}) {
    for (int64_t hidden : {128, 7168}) {
      SCOPED_TRACE(testing::Message() << "seed " << seed << ", hidden " << hidden);
      std::mt19937 rng(seed);
      std::normal_distribution<float> normal(0.0f, scales[seed - 1]);
      std::vector<float> x(hidden);
      for (auto& v : x) v = normal(rng);
      const auto row = encode(x);
      for (int64_t group_idx = 0; group_idx < hidden / kLogfmtGroup; ++group_idx)
        ASSERT_LE(read_header(row, group_idx).step, kLogfmtRange / (kLogfmtLevels - 1) * (1.0f + 1e-6f));
      expect_round_trip_within_bound(x);
    }
  }
}

TEST(Logfmt, ZerosDecodeToExactZeroAndZeroGroupsEncodeToZeroBytes) {
  const int64_t hidden = 256;
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
  std::vector<float> x(hidden);
  for (int64_t i = 0; i < hidden; ++i) {
    const float u = uniform(rng);
    x[i] = u < 0.15f ? 0.0f : (u < 0.3f ? -0.0f : normal(rng));
  }
  for (int i = 0; i < kLogfmtGroup; ++i) x[2 * kLogfmtGroup + i] = (i % 2) ? -0.0f : 0.0f;

  const auto y = expect_round_trip_within_bound(x);
  for (int64_t i = 0; i < hidden; ++i) {
    if (x[i] == 0.0f) {
      EXPECT_EQ(y[i], 0.0f) << "element " << i;
    }
  }
  const auto row = encode(x);
  const GroupHeader h = read_header(row, 2);
  EXPECT_EQ(h.lmin, 0.0f);
  EXPECT_EQ(h.step, 0.0f);
  for (int b = kLogfmtHeaderBytes; b < kLogfmtGroupBytes; ++b)
    EXPECT_EQ(row[2 * kLogfmtGroupBytes + b], 0) << "code byte " << b << " of the all-zero group";
}

TEST(Logfmt, HugeDynamicRangeFlushesOrSnapsValuesBelowTheKeptRange) {
  std::vector<float> x(kLogfmtGroup);
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> moderate(1.0f, 100.0f);
  for (auto& v : x) v = moderate(rng);
  const float big = 1e3f;
  x[0] = big;
  x[1] = 1e-12f;                                  // far below the kept range: flushed
  x[2] = -big * std::exp2(-kLogfmtRange - 0.5f);  // within one octave below it: snapped up to 2^lmin
  x[3] = big * std::exp2(-kLogfmtRange - 1.5f);   // more than one octave below it: flushed
  // Either side of the split at lmin - 1, where the absolute term of the bound is nearly reached.
  x[4] = big * std::exp2(-kLogfmtRange - 1.0f) * 1.001f;
  x[5] = -big * std::exp2(-kLogfmtRange - 1.0f) * 0.999f;

  const auto row = encode(x);
  const GroupHeader h = read_header(row, 0);
  EXPECT_NEAR(h.lmin, std::log2(static_cast<double>(big)) - kLogfmtRange, 1e-5);

  const auto y = expect_round_trip_within_bound(x);
  EXPECT_EQ(y[1], 0.0f);
  EXPECT_EQ(y[3], 0.0f);
  EXPECT_EQ(y[2], -std::exp2(h.lmin));
  EXPECT_EQ(y[4], std::exp2(h.lmin));
  EXPECT_EQ(y[5], 0.0f);
  const double relative = std::exp2(static_cast<double>(h.step) / 2.0) - 1.0 + kLogfmtSlack;
  EXPECT_LE(std::fabs(static_cast<double>(y[0]) - big), relative * big);
}

TEST(Logfmt, EqualMagnitudesUseZeroStepAndKeepSigns) {
  const float magnitudes[] = {3.7f, 1.5e-30f};
  std::vector<float> x(2 * kLogfmtGroup);
  std::mt19937 rng(5);
  for (int g = 0; g < 2; ++g)
    for (int i = 0; i < kLogfmtGroup; ++i) x[g * kLogfmtGroup + i] = (rng() & 1) ? -magnitudes[g] : magnitudes[g];

  const auto row = encode(x);
  for (int g = 0; g < 2; ++g) {
    EXPECT_EQ(read_header(row, g).step, 0.0f);
    EXPECT_NEAR(read_header(row, g).lmin, std::log2(static_cast<double>(magnitudes[g])), 1e-4);
  }
  const auto y = expect_round_trip_within_bound(x);
  for (size_t i = 0; i < x.size(); ++i) EXPECT_EQ(std::signbit(y[i]), std::signbit(x[i])) << "element " << i;
}

TEST(Logfmt, EveryLevelEncodesToItsOwnCode) {
  float lmin, step;
  logfmt_group_params(1000.0f, 0.01f, lmin, step);
  ASSERT_GT(step, 0.0f);
  for (int k = 0; k < kLogfmtLevels; ++k) {
    const float level = std::exp2(lmin + static_cast<float>(k) * step);
    ASSERT_EQ(logfmt_encode_value(level, lmin, step), static_cast<uint32_t>(k + 1)) << "level " << k;
    ASSERT_EQ(logfmt_encode_value(-level, lmin, step), static_cast<uint32_t>(k + 1) | kLogfmtSignBit);
    ASSERT_FLOAT_EQ(logfmt_decode_value(k + 1, lmin, step), level);
  }
}

TEST(Logfmt, EncodeRoundsToTheNearestLevelInLogDomain) {
  float lmin, step;
  logfmt_group_params(1000.0f, 0.01f, lmin, step);
  for (int k = 0; k + 1 < kLogfmtLevels; ++k) {
    const float below_midpoint = std::exp2(lmin + (static_cast<float>(k) + 0.3f) * step);
    const float above_midpoint = std::exp2(lmin + (static_cast<float>(k) + 0.7f) * step);
    ASSERT_EQ(logfmt_encode_value(below_midpoint, lmin, step), static_cast<uint32_t>(k + 1)) << "level " << k;
    ASSERT_EQ(logfmt_encode_value(above_midpoint, lmin, step), static_cast<uint32_t>(k + 2)) << "level " << k;
  }
  // Above the group maximum (only reachable with foreign parameters) the code saturates.
  EXPECT_EQ(logfmt_encode_value(1e6f, lmin, step), static_cast<uint32_t>(kLogfmtLevels));
}

TEST(Logfmt, ZeroHasTheSingleCodeZero) {
  float lmin, step;
  logfmt_group_params(8.0f, 0.5f, lmin, step);
  EXPECT_EQ(logfmt_encode_value(0.0f, lmin, step), 0u);
  EXPECT_EQ(logfmt_encode_value(-0.0f, lmin, step), 0u);
  const float decoded = logfmt_decode_value(kLogfmtSignBit, lmin, step);
  EXPECT_EQ(decoded, 0.0f);
  EXPECT_FALSE(std::signbit(decoded));
}

TEST(Logfmt, PackUnpackRoundTripsRandomCodesAndWritesExactlyTenBytes) {
  std::mt19937 rng(3);
  for (uint8_t sentinel : {uint8_t{0xa5}, uint8_t{0x5a}}) {
    for (int trial = 0; trial < 1000; ++trial) {
      uint32_t codes[8], unpacked[8];
      for (auto& c : codes) c = rng() & kLogfmtCodeMask;
      uint8_t buffer[16];
      std::memset(buffer, sentinel, sizeof(buffer));
      // Offset 3 leaves the octet unaligned, as octets are inside a group.
      logfmt_pack_octet(codes, buffer + 3);
      for (int b : {0, 1, 2, 13, 14, 15}) ASSERT_EQ(buffer[b], sentinel) << "byte " << b << ", trial " << trial;
      logfmt_unpack_octet(buffer + 3, unpacked);
      for (int j = 0; j < 8; ++j) ASSERT_EQ(unpacked[j], codes[j]) << "code " << j << ", trial " << trial;
    }
  }
}

TEST(Logfmt, PackedCodesAreLittleEndianTenBitFields) {
  uint8_t out[10];
  const uint32_t first[8] = {0x3ff, 0, 0, 0, 0, 0, 0, 0};
  logfmt_pack_octet(first, out);
  const uint8_t expected_first[10] = {0xff, 0x03, 0, 0, 0, 0, 0, 0, 0, 0};
  for (int b = 0; b < 10; ++b) EXPECT_EQ(out[b], expected_first[b]) << "byte " << b;

  const uint32_t second_and_last[8] = {0, 1, 0, 0, 0, 0, 0, 0x3ff};
  logfmt_pack_octet(second_and_last, out);
  const uint8_t expected_second_and_last[10] = {0, 0x04, 0, 0, 0, 0, 0, 0, 0xc0, 0xff};
  for (int b = 0; b < 10; ++b) EXPECT_EQ(out[b], expected_second_and_last[b]) << "byte " << b;
}

TEST(Logfmt, RowHoldsHeaderThenOctetsOfConsecutiveChannels) {
  const int64_t hidden = 128;
  std::mt19937 rng(9);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(hidden);
  for (auto& v : x) v = normal(rng);
  const auto row = encode(x);
  for (int64_t group_idx = 0; group_idx < hidden / kLogfmtGroup; ++group_idx) {
    float max_abs = 0.0f, min_abs = INFINITY;
    for (int i = 0; i < kLogfmtGroup; ++i) {
      max_abs = std::max(max_abs, std::fabs(x[group_idx * kLogfmtGroup + i]));
      min_abs = std::min(min_abs, std::fabs(x[group_idx * kLogfmtGroup + i]));
    }
    float lmin, step;
    logfmt_group_params(max_abs, min_abs, lmin, step);
    const GroupHeader h = read_header(row, group_idx);
    EXPECT_EQ(h.lmin, lmin);
    EXPECT_EQ(h.step, step);
    for (int octet_idx = 0; octet_idx < 8; ++octet_idx) {
      uint32_t codes[8];
      logfmt_unpack_octet(row.data() + group_idx * kLogfmtGroupBytes + 8 + 10 * octet_idx, codes);
      for (int j = 0; j < 8; ++j) {
        const float v = x[group_idx * kLogfmtGroup + 8 * octet_idx + j];
        EXPECT_EQ(codes[j], logfmt_encode_value(v, lmin, step))
            << "group " << group_idx << ", channel " << 8 * octet_idx + j;
      }
    }
  }
}

TEST(Logfmt, RowFunctionsRejectHiddenNotMultipleOf64) {
  std::vector<float> x(100, 1.0f), y(100);
  std::vector<uint8_t> row(2 * kLogfmtGroupBytes);
  EXPECT_THROW(logfmt_encode_row(x.data(), 100, row.data()), deep_ep::ValueError);
  EXPECT_THROW(logfmt_decode_row(row.data(), 100, y.data()), deep_ep::ValueError);
}
