// LogFMT: the lossy 10-bit logarithmic row format that low-latency combine may put on the wire
// instead of bf16. The value codec and the octet packing are shared by the device kernels and by the
// host reference and tests, so this header compiles with nvcc and with a plain C++17 compiler.
//
// Wire layout of one row of `hidden` values (hidden % 64 == 0): hidden / 64 groups of 88 bytes each,
//   [0, 4)    float32 lmin   log2 of the smallest magnitude the group can represent
//   [4, 8)    float32 step   log2 distance between two neighbouring magnitude levels
//   [8, 88)   64 codes of 10 bits, as 8 octets of 10 bytes; octet i holds channels 8i..8i+7, and
//             code j of an octet sits at bits [10j, 10j + 10) of its 80-bit little-endian field.
// An octet is exactly what one lane holds after one 16-byte load of bf16, so 8 lanes encode a group
// and each writes its own 10 bytes with no cross-lane bit merging.
//
// Code: bit 9 is the sign, bits 0..8 the magnitude level m. m == 0 is zero; m in [1, 511] decodes to
// exp2(lmin + (m - 1) * step). The group keeps at most kLogfmtRange octaves below its maximum.
//
// Error bound. For x in a group whose largest magnitude is gmax and whose header holds `step`:
//   |decode(encode(x)) - x| <= (2^(step / 2) - 1 + kLogfmtSlack) * |x|
//                              + (1 + kLogfmtSlack) * 2^-(kLogfmtRange + 1) * gmax
// Why: a magnitude inside [2^lmin, gmax] is rounded to the nearest level in the log domain, so it
// moves by at most step / 2 octaves. A magnitude below 2^lmin exists only when the range was
// clamped, i.e. lmin = log2(gmax) - kLogfmtRange; one in [2^(lmin - 1), 2^lmin) snaps up to 2^lmin
// and one below 2^(lmin - 1) is flushed to zero, each missing by at most 2^(lmin - 1), which is
// 2^-(kLogfmtRange + 1) * gmax. kLogfmtSlack = 2^-15 absorbs float rounding: with every log2 value
// bounded by 149 in magnitude (the float range, subnormals included), log2f (1 ulp), the four
// subtract/divide/multiply/add roundings and exp2f (2 ulp) together move a result by less than
// 2.2e-5 relative. step never exceeds kLogfmtRange / 510 = 0.0392, so the worst relative term is
// 2^0.0196 - 1 = 1.37% (plus the slack); groups spanning fewer octaves have proportionally less.
// Host and device may disagree in the last ulp of log2f/exp2f, so a value sitting on a rounding
// midpoint can get neighbouring codes on the two sides: compare results against this bound, not
// bytewise. Non-finite inputs (inf, NaN) are not supported, and device builds are assumed to keep
// subnormals (no flush-to-zero), as the bound relies on IEEE log2f/exp2f.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "deep_ep/error.hpp"

#ifndef DEEP_EP_HOST_DEVICE
#if defined(__CUDACC__)
#define DEEP_EP_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DEEP_EP_HOST_DEVICE inline
#endif
#endif

namespace deep_ep::low_latency {

constexpr int kLogfmtGroup = 64;  // channels sharing one (lmin, step) header
constexpr int kLogfmtOctet = 8;   // codes per 10-byte octet, one lane's load
constexpr int kLogfmtOctetBytes = 10;
constexpr int kLogfmtHeaderBytes = 8;  // float lmin, float step
constexpr int kLogfmtGroupBytes = kLogfmtHeaderBytes + kLogfmtGroup / kLogfmtOctet * kLogfmtOctetBytes;
constexpr float kLogfmtRange = 20.0f;  // octaves kept below the group maximum
constexpr int kLogfmtLevels = 511;     // nonzero magnitude levels, m in [1, 511]
constexpr uint32_t kLogfmtSignBit = 1u << 9;
constexpr uint32_t kLogfmtMagnitudeMask = kLogfmtSignBit - 1;
constexpr uint32_t kLogfmtCodeMask = kLogfmtSignBit | kLogfmtMagnitudeMask;
constexpr float kLogfmtSlack = 0x1p-15f;  // float rounding allowance of the error bound
static_assert(kLogfmtGroupBytes == 88, "the wire format fixes a group at 88 bytes");

DEEP_EP_HOST_DEVICE int64_t logfmt_row_bytes(int64_t hidden) { return hidden / kLogfmtGroup * kLogfmtGroupBytes; }

// max_abs == 0 marks an all-zero group; min_abs_nonzero is then ignored.
DEEP_EP_HOST_DEVICE void logfmt_group_params(float max_abs, float min_abs_nonzero, float& lmin, float& step) {
  if (max_abs == 0.0f) {
    lmin = 0.0f;
    step = 0.0f;
    return;
  }
  const float lmax = log2f(max_abs);
  // Spending the levels on more than kLogfmtRange octaves would coarsen the large values, which
  // dominate the combine sum, to preserve ones too small to matter.
  lmin = fmaxf(log2f(min_abs_nonzero), lmax - kLogfmtRange);
  step = lmax > lmin ? (lmax - lmin) / static_cast<float>(kLogfmtLevels - 1) : 0.0f;
}

// Rounds to the nearest level with rintf, i.e. half to even under the default rounding mode.
DEEP_EP_HOST_DEVICE uint32_t logfmt_encode_value(float x, float lmin, float step) {
  // Zero, and every flushed value, is code 0 whatever its sign, so a zero has a single encoding.
  if (x == 0.0f) return 0;
  const float log_abs = log2f(fabsf(x));
  // At |x| = 2^(lmin - 1) flushing to 0 and snapping up to 2^lmin miss by the same amount, so
  // splitting there keeps the absolute error of clamped-away values below 2^(lmin - 1).
  if (log_abs < lmin - 1.0f) return 0;
  float m = 1.0f;
  if (step != 0.0f) {
    m = 1.0f + rintf((log_abs - lmin) / step);
    m = fminf(fmaxf(m, 1.0f), static_cast<float>(kLogfmtLevels));
  }
  return static_cast<uint32_t>(m) | (x < 0.0f ? kLogfmtSignBit : 0u);
}

DEEP_EP_HOST_DEVICE float logfmt_decode_value(uint32_t code, float lmin, float step) {
  const uint32_t m = code & kLogfmtMagnitudeMask;
  if (m == 0) return 0.0f;
  const float magnitude = exp2f(lmin + static_cast<float>(m - 1) * step);
  return (code & kLogfmtSignBit) ? -magnitude : magnitude;
}

// Byte stores only: octets start at 10-byte offsets, so no wider alignment can be assumed.
DEEP_EP_HOST_DEVICE void logfmt_pack_octet(const uint32_t (&codes)[8], uint8_t* out10) {
  uint32_t bits = 0;
  int num_bits = 0, byte_idx = 0;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int j = 0; j < kLogfmtOctet; ++j) {
    // Masked so that a stray high bit cannot spill into the neighbouring code.
    bits |= (codes[j] & kLogfmtCodeMask) << num_bits;
    num_bits += 10;
    while (num_bits >= 8) {
      out10[byte_idx++] = static_cast<uint8_t>(bits & 0xffu);
      bits >>= 8;
      num_bits -= 8;
    }
  }
}

DEEP_EP_HOST_DEVICE void logfmt_unpack_octet(const uint8_t* in10, uint32_t (&codes)[8]) {
  uint32_t bits = 0;
  int num_bits = 0, byte_idx = 0;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int j = 0; j < kLogfmtOctet; ++j) {
    while (num_bits < 10) {
      bits |= static_cast<uint32_t>(in10[byte_idx++]) << num_bits;
      num_bits += 8;
    }
    codes[j] = bits & kLogfmtCodeMask;
    bits >>= 10;
    num_bits -= 10;
  }
}

// Host reference of a whole row; the device kernels build the same bytes from the primitives above.
inline void logfmt_encode_row(const float* x, int64_t hidden, uint8_t* out) {
  DEEP_EP_CHECK(hidden > 0 && hidden % kLogfmtGroup == 0, "LogFMT needs hidden to be a positive multiple of ",
                kLogfmtGroup, ", got ", hidden);
  for (int64_t group_idx = 0; group_idx < hidden / kLogfmtGroup; ++group_idx) {
    const float* values = x + group_idx * kLogfmtGroup;
    uint8_t* group_out = out + group_idx * kLogfmtGroupBytes;
    float max_abs = 0.0f, min_abs_nonzero = INFINITY;
    for (int i = 0; i < kLogfmtGroup; ++i) {
      const float abs_value = fabsf(values[i]);
      max_abs = fmaxf(max_abs, abs_value);
      if (abs_value != 0.0f) min_abs_nonzero = fminf(min_abs_nonzero, abs_value);
    }
    float lmin, step;
    logfmt_group_params(max_abs, min_abs_nonzero, lmin, step);
    std::memcpy(group_out, &lmin, sizeof(float));
    std::memcpy(group_out + sizeof(float), &step, sizeof(float));
    for (int octet_idx = 0; octet_idx < kLogfmtGroup / kLogfmtOctet; ++octet_idx) {
      uint32_t codes[kLogfmtOctet];
      for (int j = 0; j < kLogfmtOctet; ++j)
        codes[j] = logfmt_encode_value(values[octet_idx * kLogfmtOctet + j], lmin, step);
      logfmt_pack_octet(codes, group_out + kLogfmtHeaderBytes + octet_idx * kLogfmtOctetBytes);
    }
  }
}

inline void logfmt_decode_row(const uint8_t* in, int64_t hidden, float* out) {
  DEEP_EP_CHECK(hidden > 0 && hidden % kLogfmtGroup == 0, "LogFMT needs hidden to be a positive multiple of ",
                kLogfmtGroup, ", got ", hidden);
  for (int64_t group_idx = 0; group_idx < hidden / kLogfmtGroup; ++group_idx) {
    const uint8_t* group_in = in + group_idx * kLogfmtGroupBytes;
    float* values = out + group_idx * kLogfmtGroup;
    float lmin, step;
    std::memcpy(&lmin, group_in, sizeof(float));
    std::memcpy(&step, group_in + sizeof(float), sizeof(float));
    for (int octet_idx = 0; octet_idx < kLogfmtGroup / kLogfmtOctet; ++octet_idx) {
      uint32_t codes[kLogfmtOctet];
      logfmt_unpack_octet(group_in + kLogfmtHeaderBytes + octet_idx * kLogfmtOctetBytes, codes);
      for (int j = 0; j < kLogfmtOctet; ++j)
        values[octet_idx * kLogfmtOctet + j] = logfmt_decode_value(codes[j], lmin, step);
    }
  }
}

}  // namespace deep_ep::low_latency
