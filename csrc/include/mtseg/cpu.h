// CPU-only helpers shared by the csrc/cpu kernels: multi-versioned loops and float
// exp/log that the compiler can vectorise.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

// Loops marked MTSEG_CPU_CLONES are compiled for AVX-512, AVX2 and the baseline; the
// loader picks the best copy for the machine (GCC function multi-versioning).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(__CUDACC__)
#define MTSEG_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MTSEG_CPU_CLONES
#endif
#define MTSEG_ALWAYS_INLINE inline __attribute__((always_inline))
// For a lambda handed to an inlined helper inside a MTSEG_CPU_CLONES loop: a lambda the
// compiler does not inline is a function of its own, compiled for the baseline ISA only
// (SSE2), whichever clone calls it.
#if defined(__GNUC__)
#define MTSEG_LAMBDA_INLINE __attribute__((always_inline))
#else
#define MTSEG_LAMBDA_INLINE
#endif

namespace mtseg {
namespace cpu {

// exp and log in float, written as straight-line arithmetic and bit operations so that
// loops calling them vectorise (libm's expf/logf are calls, which GCC vectorises only
// under -ffast-math, and -ffast-math is off for exactness elsewhere). The polynomials are
// the minimax ones of the Cephes library; both are within 2 ulp of the true value over
// the range used here. exp flushes results below FLT_MIN (x < -87.33) to 0 and returns
// +inf for x > 88.37; log handles 0 (-inf), negative input (NaN), denormals and +inf.
// NaN propagates through both.

MTSEG_ALWAYS_INLINE float bits_as_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}

MTSEG_ALWAYS_INLINE int32_t float_as_bits(float f) {
  int32_t i;
  std::memcpy(&i, &f, sizeof i);
  return i;
}

MTSEG_ALWAYS_INLINE float exp(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  // NaN goes down the path of 0 (a float -> int conversion of NaN is undefined) and is
  // returned as it came.
  const float xc = x < -87.33654f ? -87.33654f : (x > 88.3762626f ? 88.3762626f : (x == x ? x : 0.0f));
  const float n = (xc * kLog2e + kRound) - kRound;
  const float r = (xc - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const float scale = bits_as_float((static_cast<int32_t>(n) + 127) << 23);
  const float y = p * scale;
  return x < -87.33654f ? 0.0f : (x > 88.3762626f ? std::numeric_limits<float>::infinity() : (x == x ? y : x));
}

MTSEG_ALWAYS_INLINE float log(float x) {
  constexpr float kSqrtHalf = 0.707106781186547524f;
  constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  constexpr float kMinNormal = 1.17549435e-38f;
  const bool denormal = x < kMinNormal;
  const float xs = denormal ? x * 8388608.0f : x;  // 2^23 lifts denormals to normal
  const int32_t bits = float_as_bits(xs);
  float e = static_cast<float>(((bits >> 23) & 0xff) - 126) - (denormal ? 23.0f : 0.0f);
  float m = bits_as_float((bits & 0x007fffff) | 0x3f000000);  // in [0.5, 1)
  const bool low = m < kSqrtHalf;
  e = low ? e - 1.0f : e;
  m = low ? m + m - 1.0f : m - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y = y + e * kLn2Lo;
  y = y - 0.5f * z;
  float result = (m + y) + e * kLn2Hi;
  result = x == 0.0f ? -std::numeric_limits<float>::infinity() : result;
  result = x < 0.0f ? std::numeric_limits<float>::quiet_NaN() : result;
  result = x == std::numeric_limits<float>::infinity() ? x : result;
  return x != x ? x : result;
}

}  // namespace cpu
}  // namespace mtseg
