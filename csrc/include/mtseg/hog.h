// Histogram of Oriented Gradients: the per-pixel, per-cell and per-block math shared
// by the CPU kernels (csrc/cpu/hog.cpp) and the CUDA kernels (csrc/cuda/hog.cu).
//
// Semantics follow skimage.feature.hog (scikit-image 0.26) exactly:
//  * gradients are central differences without the factor 1/2, zero on the first and
//    last row (rows) and column (columns);
//  * with several channels the channel of largest magnitude wins (lowest index on ties),
//    compared at the precision skimage uses (float32 hypot for float32 input);
//  * orientation theta = atan2(g_row, g_col) mod 180 degrees, hard-binned: bin i holds
//    180*i/n <= theta < 180*(i+1)/n, decided for the exact angle of the float gradient
//    (not a rounded atan2): see "Exact orientation bins" below;
//  * cell value = (sum of magnitudes in the bin) / (cell area);
//  * blocks of cells with stride one cell, normalised with eps = 1e-5.
//
// Everything here is a plain function on raw pointers so that the same code runs in a
// CPU loop and in a CUDA thread.
#pragma once

#include <cmath>
#include <cstdint>

#include "mtseg/macros.h"

namespace mtseg {
namespace hog {

enum class BlockNorm : int { L1 = 0, L1Sqrt = 1, L2 = 2, L2Hys = 3 };

// Sizes of one call, passed by value to CUDA kernels.
struct CellGeometry {
  int64_t batch, channels, height, width;
  int64_t cell_rows, cell_cols;
  int64_t n_cells_row, n_cells_col;
  int64_t orientations;
  MTSEG_HOST_DEVICE int64_t area() const { return cell_rows * cell_cols; }
};

struct BlockGeometry {
  int64_t batch, n_cells_row, n_cells_col, orientations;
  int64_t b_row, b_col;
  int64_t n_blocks_row, n_blocks_col;
  MTSEG_HOST_DEVICE int64_t block_len() const { return b_row * b_col * orientations; }
};

constexpr double kNormEps = 1e-5;
constexpr double kHysClip = 0.2;

// ---------------------------------------------------------------------------------
// Exact orientation bins.
//
// A pixel's bin is the one of the exact angle of its gradient: theta = atan2(g_row,
// g_col) mod 180 degrees, with the real (not rounded) atan2 of the float gradient, and
// bin i holds phi_i <= theta < phi_{i+1}, phi_i = 180 i / n degrees ("edges"). A gradient
// with g_row = 0 (theta 0 or 180) is in bin 0; one with g_row < 0 is turned by 180
// degrees first (same orientation). For g_row > 0, theta >= phi_i exactly when
//     D_i = g_row cos(phi_i) - g_col sin(phi_i) >= 0.
// Only the edges at 45, 90 and 135 degrees can hold a gradient exactly (elsewhere
// tan(phi_i) is irrational, Niven); there D_i is g_row - g_col, -g_col or -g_row - g_col,
// whose sign one rounded operation gets right, and a gradient on the edge goes to the
// side skimage puts it: skimage compares its theta (exactly 45/90/135 for such a
// gradient) with the double (180 / n) * i, which for some n (e.g. 28) is a hair above
// 45 (`inclusive`). Every other edge is decided in three steps, each certain:
//  1. D_i in double with rounded cos/sin; it decides when |D_i| > kEdgeErrorCoef *
//     (|g_row| + |g_col|) + kEdgeErrorTiny, a bound on the rounding error of the
//     table and of the arithmetic (proof below);
//  2. otherwise the sign of D_i is decided exactly in integer arithmetic
//     (past_edge_exact): with z = g_col + i g_row scaled to Gaussian integers and
//     phi_i = pi k / m in lowest terms, sin(m theta) = (-1)^k sin(m (theta - phi_i)),
//     so sign(theta - phi_i) = (-1)^k sign(Im z^m) while |m (theta - phi_i)| < pi,
//     which step 1 failing guarantees (|theta - phi_i| < 2^-44 rad). Im z^m is never
//     0 there (tan(phi_i) is irrational).
// Bound of step 1: the table's cos and sin are within 2^-49.5 of the true values
// (libm's cos/sin within 2 ulp, of an argument pi*i/n within 4 ulp of the true one), the
// two products and the difference add at most (|g_row| + |g_col|) 2^-52 more, and an
// underflowing product at most 2^-1075: the total stays under (|g_row| + |g_col|) 2^-49
// + 2^-1073, an eighth of the test's margin. The same bound holds on the GPU (CUDA's
// double cos/sin are within 2 ulp too), so both make the same decision, which is the
// exact one: the rounded table entries never decide a bin, they only make step 1 faster.
// ---------------------------------------------------------------------------------
constexpr double kEdgeErrorCoef = 0x1p-46;
constexpr double kEdgeErrorTiny = 0x1p-1060;

struct Edge {
  double cos_phi, sin_phi;  // rounded; exactly (1, 1), (0, 1), (-1, 1) at 45, 90, 135 degrees
  int32_t exact;            // 1 at 45, 90, 135 degrees: the sign test is exact
  int32_t inclusive;        // exact edges: a gradient lying on the edge is past it
};

// Edge i (1 <= i < n) of n bins, at 180 i / n degrees.
MTSEG_HOST_DEVICE Edge edge_direction(int64_t i, int64_t n) {
  const double per_bin = 180.0 / static_cast<double>(n);
  const double skimage_edge = per_bin * static_cast<double>(i);  // skimage's edge, rounded
  if (4 * i == n) return Edge{1.0, 1.0, 1, skimage_edge <= 45.0 ? 1 : 0};
  if (2 * i == n) return Edge{0.0, 1.0, 1, skimage_edge <= 90.0 ? 1 : 0};
  if (4 * i == 3 * n) return Edge{-1.0, 1.0, 1, skimage_edge <= 135.0 ? 1 : 0};
  const double phi = 3.141592653589793 * static_cast<double>(i) / static_cast<double>(n);
  return Edge{::cos(phi), ::sin(phi), 0, 1};
}

// Step 1 for g_row > 0: 1 if theta >= phi (past the edge), 0 if not, -1 if the rounded
// test cannot tell (only for edges that are not exact).
MTSEG_HOST_DEVICE int edge_test_fast(double g_row, double g_col, const Edge& e) {
  const double d = g_row * e.cos_phi - g_col * e.sin_phi;  // two rounded products (no FMA: -fmad=false)
  if (e.exact) return (d > 0.0 || (d == 0.0 && e.inclusive)) ? 1 : 0;
  const double err = ::fabs(g_row) * kEdgeErrorCoef + ::fabs(g_col) * kEdgeErrorCoef + kEdgeErrorTiny;
  if (d > err) return 1;
  if (d < -err) return 0;
  return -1;
}

// Signed big integers on caller-provided 32-bit limbs (little endian), just enough for
// past_edge_exact: Gaussian integers multiplied by a small one, the sign at the end.
struct BigInt {
  uint32_t* limb;
  int64_t size;  // limbs in use (0 for zero)
  bool negative;
};

MTSEG_HOST_DEVICE void big_trim(BigInt& a) {
  while (a.size > 0 && a.limb[a.size - 1] == 0) --a.size;
  if (a.size == 0) a.negative = false;
}

// out = |a| * s (s: s_size limbs); out must not alias a.
MTSEG_HOST_DEVICE void big_mul_small(const BigInt& a, const uint32_t* s, int64_t s_size, BigInt& out) {
  const int64_t size = a.size + s_size;
  for (int64_t k = 0; k < size; ++k) out.limb[k] = 0;
  for (int64_t j = 0; j < s_size; ++j) {
    uint64_t carry = 0;
    for (int64_t k = 0; k < a.size; ++k) {
      const uint64_t t = static_cast<uint64_t>(a.limb[k]) * s[j] + out.limb[k + j] + carry;
      out.limb[k + j] = static_cast<uint32_t>(t);
      carry = t >> 32;
    }
    out.limb[a.size + j] = static_cast<uint32_t>(carry);
  }
  out.size = size;
  out.negative = false;
  big_trim(out);
}

MTSEG_HOST_DEVICE int big_compare_magnitude(const BigInt& a, const BigInt& b) {
  if (a.size != b.size) return a.size < b.size ? -1 : 1;
  for (int64_t k = a.size - 1; k >= 0; --k)
    if (a.limb[k] != b.limb[k]) return a.limb[k] < b.limb[k] ? -1 : 1;
  return 0;
}

// out = a + (negate_b ? -b : b); out may alias a or b.
MTSEG_HOST_DEVICE void big_add(const BigInt& a, const BigInt& b, bool negate_b, BigInt& out) {
  const bool b_negative = negate_b ? !b.negative : b.negative;
  if (a.negative == b_negative) {
    const int64_t size = a.size > b.size ? a.size : b.size;
    uint64_t carry = 0;
    for (int64_t k = 0; k < size; ++k) {
      const uint64_t t = static_cast<uint64_t>(k < a.size ? a.limb[k] : 0u) + (k < b.size ? b.limb[k] : 0u) + carry;
      out.limb[k] = static_cast<uint32_t>(t);
      carry = t >> 32;
    }
    out.limb[size] = static_cast<uint32_t>(carry);
    out.size = size + 1;
    out.negative = a.negative;
  } else {
    const bool a_larger = big_compare_magnitude(a, b) >= 0;
    const BigInt& big = a_larger ? a : b;
    const BigInt& small = a_larger ? b : a;
    const bool negative = a_larger ? a.negative : b_negative;
    int64_t borrow = 0;
    for (int64_t k = 0; k < big.size; ++k) {
      int64_t t = static_cast<int64_t>(big.limb[k]) - (k < small.size ? small.limb[k] : 0u) - borrow;
      borrow = t < 0 ? 1 : 0;
      out.limb[k] = static_cast<uint32_t>(t + (borrow << 32));
    }
    out.size = big.size;
    out.negative = negative;
  }
  big_trim(out);
}

// |x| = mantissa * 2^exponent with an odd mantissa (x finite, non-zero).
MTSEG_HOST_DEVICE void split_double(double x, uint64_t& mantissa, int& exponent) {
  int e = 0;
  const double f = ::frexp(::fabs(x), &e);  // |x| = f 2^e, f in [0.5, 1)
  mantissa = static_cast<uint64_t>(::ldexp(f, 53));
  exponent = e - 53;
  while ((mantissa & 1u) == 0) mantissa >>= 1, ++exponent;
}

MTSEG_HOST_DEVICE int64_t gcd64(int64_t a, int64_t b) {
  while (b != 0) {
    const int64_t t = a % b;
    a = b;
    b = t;
  }
  return a;
}

// Limbs of scratch past_edge_exact needs for n bins (4 numbers of n factors), for the
// gradients step 1 leaves undecided: there |g_col / g_row| is within a factor 2 of
// |cot(phi_i)| < n, so each factor has at most 53 + log2(n) + 2 bits.
MTSEG_HOST_DEVICE int64_t exact_scratch_limbs(int64_t n) {
  int64_t log2n = 0;
  while ((int64_t(1) << log2n) < n) ++log2n;
  return 4 * ((n * (53 + log2n + 3) + 31) / 32 + 3);
}

// Step 2: whether theta >= phi_i exactly, for g_row > 0, g_col finite, edge i of n not
// exact. Returns -1 only if `capacity` limbs of scratch are too few (then nothing is decided).
MTSEG_HOST_DEVICE int past_edge_exact(double g_row, double g_col, int64_t i, int64_t n, uint32_t* scratch,
                                      int64_t capacity) {
  if (g_col == 0.0) return 2 * i <= n ? 1 : 0;  // theta = 90 exactly, never an inexact edge
  const int64_t g = gcd64(i, n);
  const int64_t k = i / g, m = n / g;
  uint64_t mr, mc;
  int er, ec;
  split_double(g_row, mr, er);
  split_double(g_col, mc, ec);
  const int e0 = er < ec ? er : ec;
  const int shift_r = er - e0, shift_c = ec - e0;
  if (shift_r > 64 || shift_c > 64) return -1;  // unreachable after step 1 (see exact_scratch_limbs)
  // X = |g_col| / 2^e0 and Y = g_row / 2^e0 as 4-limb integers.
  uint32_t x_limbs[4], y_limbs[4];
  auto set_shifted = [](uint32_t* out, uint64_t v, int shift) {
    for (int q = 0; q < 4; ++q) out[q] = 0;
    const int word = shift / 32, bit = shift % 32;
    const uint64_t lo = v << bit;
    const uint64_t hi = bit == 0 ? 0 : (v >> (64 - bit));
    out[word] = static_cast<uint32_t>(lo);
    out[word + 1] = static_cast<uint32_t>(lo >> 32);
    if (word + 2 < 4) out[word + 2] = static_cast<uint32_t>(hi);
  };
  set_shifted(x_limbs, mc, shift_c);
  set_shifted(y_limbs, mr, shift_r);
  int64_t x_size = 4, y_size = 4;
  while (x_size > 0 && x_limbs[x_size - 1] == 0) --x_size;
  while (y_size > 0 && y_limbs[y_size - 1] == 0) --y_size;
  const bool x_negative = g_col < 0.0;
  const int64_t per = capacity / 4;
  const int64_t top = x_size > y_size ? x_size : y_size;
  int64_t factor_bits = 32 * (top - 1);
  for (uint32_t v = x_size > y_size ? x_limbs[top - 1] : y_limbs[top - 1]; v != 0; v >>= 1) ++factor_bits;
  if (x_size == y_size) {
    int64_t b = 32 * (top - 1);
    for (uint32_t v = x_limbs[top - 1]; v != 0; v >>= 1) ++b;
    factor_bits = factor_bits > b ? factor_bits : b;
  }
  if (per < (m * (factor_bits + 1) + 31) / 32 + 3) return -1;  // |z|^m has at most m (factor_bits + 1/2) bits
  // (re + i im) = z^m by m - 1 multiplications by z = X + iY (X signed, Y > 0):
  // re' = re X - im Y, im' = re Y + im X.
  BigInt re{scratch, 0, false}, im{scratch + per, 0, false};
  BigInt t1{scratch + 2 * per, 0, false}, t2{scratch + 3 * per, 0, false};
  for (int64_t q = 0; q < x_size; ++q) re.limb[q] = x_limbs[q];
  re.size = x_size;
  re.negative = x_negative;
  for (int64_t q = 0; q < y_size; ++q) im.limb[q] = y_limbs[q];
  im.size = y_size;
  im.negative = false;
  for (int64_t step = 1; step < m; ++step) {
    big_mul_small(re, x_limbs, x_size, t1);  // re X
    t1.negative = (re.negative != x_negative) && t1.size > 0;
    big_mul_small(im, y_limbs, y_size, t2);  // im Y
    t2.negative = im.negative && t2.size > 0;
    big_add(t1, t2, true, t1);               // t1 = re X - im Y
    big_mul_small(re, y_limbs, y_size, t2);  // re Y
    t2.negative = re.negative && t2.size > 0;
    for (int64_t q = 0; q < t1.size; ++q) re.limb[q] = t1.limb[q];
    re.size = t1.size;
    re.negative = t1.negative;
    big_mul_small(im, x_limbs, x_size, t1);  // im X
    t1.negative = (im.negative != x_negative) && t1.size > 0;
    big_add(t2, t1, false, im);              // im = re Y + im X
  }
  const int sign_im = im.size == 0 ? 0 : (im.negative ? -1 : 1);
  const int sign = (k % 2 == 0) ? sign_im : -sign_im;
  return sign > 0 ? 1 : 0;  // sign_im is never 0 here (tan(phi_i) is irrational)
}

// What one pixel's bin decision took: 0 the rounded test, 1 the exact test; -1 if the
// scratch was too small for the exact test (the bin is then not decided).
struct BinDecision {
  int bin;
  int path;
};

// The exact bin of (g_row, g_col) among n, with edges[i - 1] = edge_direction(i, n).
// An infinite component (an overflowed difference) counts as its limit direction.
MTSEG_HOST_DEVICE BinDecision orientation_bin_exact(double g_row, double g_col, const Edge* edges, int64_t n,
                                                    uint32_t* scratch, int64_t capacity) {
  const bool inf_r = ::fabs(g_row) > 1.7976931348623157e308, inf_c = ::fabs(g_col) > 1.7976931348623157e308;
  if (inf_r || inf_c) {
    g_row = inf_r ? ::copysign(1.0, g_row) : 0.0;
    g_col = inf_c ? ::copysign(1.0, g_col) : 0.0;
  }
  if (g_row == 0.0) return BinDecision{0, 0};  // theta is 0 or 180, and 180 mod 180 = 0
  if (g_row < 0.0) {                             // theta + 180 has the same orientation
    g_row = -g_row;
    g_col = -g_col;
  }
  // Tiny gradients are scaled up by an exact power of two (same angle), so that step 1's
  // bound is relative: then step 1 fails only within 2^-44 rad of an edge, the
  // precondition of step 2 (an absolute underflow margin would let far edges through).
  if (g_row < 0x1p-960 && ::fabs(g_col) < 0x1p-960) {
    g_row = ::ldexp(g_row, 960);
    g_col = ::ldexp(g_col, 960);
  }
  BinDecision out{0, 0};
  for (int64_t i = 1; i < n; ++i) {
    int past = edge_test_fast(g_row, g_col, edges[i - 1]);
    if (past < 0) {
      past = past_edge_exact(g_row, g_col, i, n, scratch, capacity);
      if (past < 0) return BinDecision{0, -1};
      out.path = 1;
    }
    out.bin += past;
  }
  return out;
}

// ---------------------------------------------------------------------------------
// Magnitudes, at the precision skimage uses.
//
// grad_t is the type the gradients are computed in: float for float32/float16/bfloat16
// input (skimage promotes float16 to float32), double for float64 and uint8 input
// (skimage promotes uint8 to float64). For float gradients skimage picks the channel by
// float32 hypot; glibc computes hypotf as sqrt of the double sum of squares, which is
// exact up to the final rounding, and so do we (on the GPU too, where hypotf differs).
// ---------------------------------------------------------------------------------
MTSEG_HOST_DEVICE double magnitude(float g_row, float g_col) {
  const double r = g_row, c = g_col;  // squares of floats are exact in double
  return ::sqrt(r * r + c * c);
}
MTSEG_HOST_DEVICE double magnitude(double g_row, double g_col) { return ::hypot(g_row, g_col); }

MTSEG_HOST_DEVICE float selection_key(float, double mag) { return static_cast<float>(mag); }
MTSEG_HOST_DEVICE double selection_key(double, double mag) { return mag; }

MTSEG_HOST_DEVICE float root(float x) { return ::sqrtf(x); }
MTSEG_HOST_DEVICE double root(double x) { return ::sqrt(x); }

// Cell sums are taken in double and rounded once. skimage keeps a float32 running sum
// (C `float +=`), so its cells can differ from ours by a few float32 ulps; summing in
// double lets the CPU kernel add pixels in any order (vector lanes) and is more exact.
MTSEG_HOST_DEVICE void accumulate(double& total, double mag) { total += mag; }

template <typename cell_t>
MTSEG_HOST_DEVICE cell_t cell_mean(double total, int64_t area) {
  return static_cast<cell_t>(total / static_cast<double>(area));
}

// One image, channels first, arbitrary element strides.
template <typename scalar_t>
struct ImageView {
  const scalar_t* data;
  int64_t channels, height, width;
  int64_t stride_c, stride_h, stride_w;

  // Pixel value in the gradient type (c10::Half and c10::BFloat16 convert through float).
  template <typename grad_t>
  MTSEG_HOST_DEVICE grad_t load(int64_t c, int64_t y, int64_t x, bool transform_sqrt) const {
    const grad_t v = static_cast<grad_t>(data[c * stride_c + y * stride_h + x * stride_w]);
    return transform_sqrt ? root(v) : v;
  }
};

template <typename grad_t>
struct PixelGradient {
  grad_t g_row;
  grad_t g_col;
  double mag;   // magnitude of the winning channel, in double
  int64_t channel;
};

// Gradient of the winning channel at pixel (y, x).
template <typename grad_t, typename scalar_t>
MTSEG_HOST_DEVICE PixelGradient<grad_t> pixel_gradient(const ImageView<scalar_t>& img, int64_t y, int64_t x,
                                                       bool transform_sqrt) {
  const bool row_inside = y > 0 && y < img.height - 1;
  const bool col_inside = x > 0 && x < img.width - 1;
  PixelGradient<grad_t> best{grad_t(0), grad_t(0), 0.0, 0};
  grad_t best_key = grad_t(-1);
  for (int64_t c = 0; c < img.channels; ++c) {
    const grad_t g_row = row_inside ? grad_t(img.template load<grad_t>(c, y + 1, x, transform_sqrt) -
                                             img.template load<grad_t>(c, y - 1, x, transform_sqrt))
                                    : grad_t(0);
    const grad_t g_col = col_inside ? grad_t(img.template load<grad_t>(c, y, x + 1, transform_sqrt) -
                                             img.template load<grad_t>(c, y, x - 1, transform_sqrt))
                                    : grad_t(0);
    const double mag = magnitude(g_row, g_col);
    const grad_t key = selection_key(g_row, mag);
    if (key > best_key) {  // strict: the lowest channel wins a tie, like numpy's argmax
      best = PixelGradient<grad_t>{g_row, g_col, mag, c};
      best_key = key;
    }
  }
  return best;
}

// ---------------------------------------------------------------------------------
// Block normalisation. `block` points at cell (r, c, 0) of a (n_cells_row, n_cells_col,
// n) array whose rows are `row_stride` elements apart; the block spans b_row x b_col
// cells. `out` receives the b_row*b_col*n normalised values, C order.
//
// Every sum has one fixed order, so the result has the same bits at any thread count,
// with or without SIMD, on CPU and CUDA:
//  * the norm's sum s adds the block's cells' "parts" in C order (cell_norm_part: the
//    sum over the cell's bins, in bin order, of |v| for L1/L1-sqrt, v^2 for L2/L2-Hys).
//    A part is the same in every block holding the cell, so the CPU computes it once
//    per cell and each of the (up to b_row*b_col) blocks reuses it; CUDA recomputes it.
//  * the other sums over a block (L2-Hys's clipped norm, the backward's dot products)
//    are lane sums: element k of the block (C order) goes to partial sum
//    k % kBlockLanes, in order of k, and the partials are added pairwise at the end.
//    Each partial is a plain sequential sum, so a vector unit working on a contiguous
//    copy of the block (the CPU's BlockView::flat) computes exactly what CUDA's scalar
//    loop does on the strided block.
// One reciprocal per block replaces the per-element divisions (each value is within a
// few ulp of skimage's quotient).
// ---------------------------------------------------------------------------------
#if defined(__CUDACC__) || defined(__HIPCC__)
#define MTSEG_BLOCK_INLINE __host__ __device__ __forceinline__
#else
// Forced so that the CPU's multi-versioned block loops (csrc/cpu/hog.cpp) get these
// loops inlined and vectorised for their own instruction set.
#define MTSEG_BLOCK_INLINE inline __attribute__((always_inline))
#endif

constexpr int kBlockLanes = 8;

MTSEG_BLOCK_INLINE bool is_l1(BlockNorm norm) { return norm == BlockNorm::L1 || norm == BlockNorm::L1Sqrt; }

template <typename cell_t>
MTSEG_BLOCK_INLINE double cell_norm_part(const cell_t* cell, int64_t n, BlockNorm norm) {
  double s = 0.0;
  if (is_l1(norm)) {
    for (int64_t o = 0; o < n; ++o) s += ::fabs(static_cast<double>(cell[o]));
  } else {
    for (int64_t o = 0; o < n; ++o) {
      const double x = static_cast<double>(cell[o]);
      s += x * x;
    }
  }
  return s;
}

// s of a block from its cells' parts, part(i, j) for cell (i, j) of the block.
template <typename F>
MTSEG_BLOCK_INLINE double block_norm_sum(int64_t b_row, int64_t b_col, F&& part) {
  double s = 0.0;
  for (int64_t i = 0; i < b_row; ++i)
    for (int64_t j = 0; j < b_col; ++j) s += part(i, j);
  return s;
}

// 1 / the block's norm: 1 / (s + eps) for L1 and L1-sqrt, 1 / sqrt(s + eps^2) for L2 and L2-Hys.
MTSEG_BLOCK_INLINE double block_inv_norm(double s, BlockNorm norm) {
  return is_l1(norm) ? 1.0 / (s + kNormEps) : 1.0 / ::sqrt(s + kNormEps * kNormEps);
}

template <typename cell_t>
struct BlockView {
  const cell_t* data;
  int64_t row_stride, b_row, b_col, n;
  MTSEG_BLOCK_INLINE int64_t size() const { return b_row * b_col * n; }
  MTSEG_BLOCK_INLINE int64_t per_row() const { return b_col * n; }
  // f(k, value) for every element in C order (k = 0 .. size-1); rows are contiguous.
  template <typename F>
  MTSEG_BLOCK_INLINE void for_each(F&& f) const {
    const int64_t len = per_row();
    for (int64_t i = 0; i < b_row; ++i) {
      const cell_t* row = data + i * row_stride;
      const int64_t k0 = i * len;
      for (int64_t j = 0; j < len; ++j) f(k0 + j, static_cast<double>(row[j]));
    }
  }
  // The lane sum of f(k, value) over the block (see above).
  template <typename F>
  MTSEG_BLOCK_INLINE double lane_sum(F&& f) const {
    double acc[kBlockLanes] = {};
    if (b_row == 1) {  // one contiguous row: whole chunks of kBlockLanes, which vector units take at once
      const int64_t len = per_row();
      int64_t k = 0;
      for (; k + kBlockLanes <= len; k += kBlockLanes)
        for (int l = 0; l < kBlockLanes; ++l) acc[l] += f(k + l, static_cast<double>(data[k + l]));
      for (int l = 0; k + l < len; ++l) acc[l] += f(k + l, static_cast<double>(data[k + l]));
    } else {
      for_each([&](int64_t k, double x) { acc[k % kBlockLanes] += f(k, x); });
    }
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  }
  // The same block as one contiguous row (b_row = b_col = 1, n = size) over `values`,
  // which hold the block's values in C order: the same lane sums and outputs (its
  // norm_sum is not the block's: take the norm from this view or the cached parts).
  MTSEG_BLOCK_INLINE BlockView<double> flat(const double* values) const { return {values, size(), 1, 1, size()}; }
  // s of the block, its cells' parts computed here.
  MTSEG_BLOCK_INLINE double norm_sum(BlockNorm norm) const {
    return block_norm_sum(b_row, b_col,
                          [&](int64_t i, int64_t j) { return cell_norm_part(data + i * row_stride + j * n, n, norm); });
  }
};
static_assert(kBlockLanes == 8, "BlockView::lane_sum adds eight partials");

// L2-Hys's clip of v / |v| (inv_l2 = 1 / |v|). A NaN cell stays NaN, as in skimage's
// np.minimum (fmin would return the clip).
MTSEG_BLOCK_INLINE double hys_clip(double v, double inv_l2) {
  const double o = v * inv_l2;
  return o > kHysClip ? kHysClip : o;
}
// 1 / the norm of the clipped block.
template <typename cell_t>
MTSEG_BLOCK_INLINE double block_hys_inv_norm(const BlockView<cell_t>& v, double inv_l2) {
  const double s = v.lane_sum([&](int64_t, double x) {
    const double o = hys_clip(x, inv_l2);
    return o * o;
  });
  return 1.0 / ::sqrt(s + kNormEps * kNormEps);
}

// The second factor of a block's normalisation, given inv = block_inv_norm of its
// norm_sum: L2-Hys's 1 / the norm of the clipped block; unused (1) for the other norms.
template <typename cell_t>
MTSEG_BLOCK_INLINE double block_second_inv(const BlockView<cell_t>& v, BlockNorm norm, double inv) {
  return norm == BlockNorm::L2Hys ? block_hys_inv_norm(v, inv) : 1.0;
}

// The block normalised, given inv and inv2 = block_second_inv (the CPU computes both for
// a row of blocks before it writes any, so that their sums and roots overlap).
template <typename cell_t, typename out_t>
MTSEG_BLOCK_INLINE void normalize_block_apply(const BlockView<cell_t>& v, BlockNorm norm, double inv, double inv2,
                                              out_t* out) {
  switch (norm) {
    case BlockNorm::L1:
    case BlockNorm::L2:
      v.for_each([&](int64_t k, double x) { out[k] = static_cast<out_t>(x * inv); });
      break;
    case BlockNorm::L1Sqrt:
      v.for_each([&](int64_t k, double x) { out[k] = static_cast<out_t>(::sqrt(x * inv)); });
      break;
    case BlockNorm::L2Hys:
      v.for_each([&](int64_t k, double x) { out[k] = static_cast<out_t>(hys_clip(x, inv) * inv2); });
      break;
  }
}

// The block normalised, given inv = block_inv_norm of its norm_sum (normalize_block
// computes it from the cells, the CPU from cached parts).
template <typename cell_t, typename out_t>
MTSEG_BLOCK_INLINE void normalize_block_scaled(const BlockView<cell_t>& v, BlockNorm norm, double inv, out_t* out) {
  normalize_block_apply(v, norm, inv, block_second_inv(v, norm, inv), out);
}

template <typename cell_t, typename out_t>
MTSEG_HOST_DEVICE void normalize_block(const BlockView<cell_t>& v, BlockNorm norm, out_t* out) {
  normalize_block_scaled(v, norm, block_inv_norm(v.norm_sum(norm), norm), out);
}

// Vector-Jacobian product of normalize_block: grad_in[k] = sum_j grad_out[j] d out[j] / d v[k],
// given inv as normalize_block_scaled. Cells are non-negative, so |v| has derivative 1
// where v > 0 (and we take 0 at 0).
template <typename cell_t, typename grad_t>
MTSEG_BLOCK_INLINE void normalize_block_backward_scaled(const BlockView<cell_t>& v, BlockNorm norm, double inv,
                                                        const grad_t* grad_out, grad_t* grad_in) {
  switch (norm) {
    case BlockNorm::L1: {
      // out = v / d, d = |v|_1 + eps = 1 / inv.
      const double q = v.lane_sum([&](int64_t k, double x) { return static_cast<double>(grad_out[k]) * x; });
      const double c = q * inv * inv;
      v.for_each([&](int64_t k, double x) {
        const double sign = x > 0.0 ? 1.0 : (x < 0.0 ? -1.0 : 0.0);
        grad_in[k] = static_cast<grad_t>(static_cast<double>(grad_out[k]) * inv - sign * c);
      });
      break;
    }
    case BlockNorm::L1Sqrt: {
      // out = sqrt(u), u = v / d: d sqrt(u) = 1 / (2 sqrt(u)), 0 where u = 0.
      // grad_out[k] is read whatever the branch: GCC 12's loop vectoriser (-O3, AVX2
      // target, no trapping math) turns a load under the condition into a masked load
      // that gives wrong sums (tests/ops/test_hog_blocks.py's float64 backward cases).
      auto grad_u = [&](int64_t k, double x) -> double {
        const double o = ::sqrt(x * inv), g = static_cast<double>(grad_out[k]);
        return o > 0.0 ? g * 0.5 / o : 0.0;
      };
      const double q = v.lane_sum([&](int64_t k, double x) { return grad_u(k, x) * x; });
      const double c = q * inv * inv;
      v.for_each([&](int64_t k, double x) {
        const double sign = x > 0.0 ? 1.0 : (x < 0.0 ? -1.0 : 0.0);
        grad_in[k] = static_cast<grad_t>(grad_u(k, x) * inv - sign * c);
      });
      break;
    }
    case BlockNorm::L2: {
      // out = v / n, n = |v|_eps = 1 / inv.
      const double q = v.lane_sum([&](int64_t k, double x) { return static_cast<double>(grad_out[k]) * x; });
      const double c = q * inv * inv * inv;
      v.for_each([&](int64_t k, double x) {
        grad_in[k] = static_cast<grad_t>(static_cast<double>(grad_out[k]) * inv - x * c);
      });
      break;
    }
    case BlockNorm::L2Hys: {
      // out = o2 / n2, o2 = min(v / n1, 0.2), n1 = |v|_eps = 1 / inv, n2 = |o2|_eps.
      const double inv2 = block_hys_inv_norm(v, inv);
      const double q2 =
          v.lane_sum([&](int64_t k, double x) { return static_cast<double>(grad_out[k]) * hys_clip(x, inv); });
      const double c2 = q2 * inv2 * inv2 * inv2;
      // Gradient with respect to o1 = v / n1; the clip passes it where v / n1 <= 0.2.
      auto grad_o1 = [&](int64_t k, double x) -> double {  // grad_out[k] read always, as in grad_u
        const double o1 = x * inv, g = static_cast<double>(grad_out[k]);
        return o1 > kHysClip ? 0.0 : g * inv2 - o1 * c2;
      };
      const double q1 = v.lane_sum([&](int64_t k, double x) { return grad_o1(k, x) * x; });
      const double c1 = q1 * inv * inv * inv;
      v.for_each([&](int64_t k, double x) { grad_in[k] = static_cast<grad_t>(grad_o1(k, x) * inv - x * c1); });
      break;
    }
  }
}

template <typename cell_t, typename grad_t>
MTSEG_HOST_DEVICE void normalize_block_backward(const BlockView<cell_t>& v, BlockNorm norm, const grad_t* grad_out,
                                                grad_t* grad_in) {
  normalize_block_backward_scaled(v, norm, block_inv_norm(v.norm_sum(norm), norm), grad_out, grad_in);
}

// Gradient of one cell entry (r, c, o) from the per-block input gradients
// `grad_blocks` of one image, shaped (n_blocks_row, n_blocks_col, b_row, b_col, n):
// the sum over every block that contains the cell. A gather, so no atomics are needed.
template <typename grad_t>
MTSEG_HOST_DEVICE double gather_cell_gradient(const grad_t* grad_blocks, int64_t n_blocks_row, int64_t n_blocks_col,
                                              int64_t b_row, int64_t b_col, int64_t n, int64_t r, int64_t c,
                                              int64_t o) {
  double g = 0.0;
  const int64_t block_len = b_row * b_col * n;
  for (int64_t i = 0; i < b_row; ++i) {
    const int64_t br = r - i;
    if (br < 0 || br >= n_blocks_row) continue;
    for (int64_t j = 0; j < b_col; ++j) {
      const int64_t bc = c - j;
      if (bc < 0 || bc >= n_blocks_col) continue;
      g += static_cast<double>(grad_blocks[(br * n_blocks_col + bc) * block_len + (i * b_col + j) * n + o]);
    }
  }
  return g;
}

// ---------------------------------------------------------------------------------
// Backward through the cells to the image.
//
// Pass 1, per pixel p: with G = dL/dcell[cell(p), bin(p)] / area (0 outside the cells),
// the gradient with respect to the winning channel's central differences is
// (G * g_row / mag, G * g_col / mag) (0 where mag = 0).
// Pass 2, per input element (k, y, x): the transpose of the central-difference stencil,
// summing the neighbours whose winning channel is k.
// ---------------------------------------------------------------------------------
template <typename grad_t>
struct StencilGradient {
  double d_row;
  double d_col;
  int64_t channel;
};

template <typename grad_t>
MTSEG_HOST_DEVICE StencilGradient<grad_t> stencil_gradient(const PixelGradient<grad_t>& px, double grad_mag) {
  if (px.mag > 0.0 && grad_mag != 0.0) {
    return {grad_mag * static_cast<double>(px.g_row) / px.mag, grad_mag * static_cast<double>(px.g_col) / px.mag,
            px.channel};
  }
  return {0.0, 0.0, px.channel};
}

// d_row/d_col/channel: per-pixel pass-1 results of one image, (H, W) row-major.
template <typename acc_t>
MTSEG_HOST_DEVICE double input_gradient(const acc_t* d_row, const acc_t* d_col, const int32_t* channel,
                                        int64_t height, int64_t width, int64_t k, int64_t y, int64_t x) {
  double g = 0.0;
  // g_row(y') = v(y'+1) - v(y'-1): v(y) appears with +1 at y' = y-1 and -1 at y' = y+1.
  if (y > 0 && channel[(y - 1) * width + x] == k) g += static_cast<double>(d_row[(y - 1) * width + x]);
  if (y + 1 < height && channel[(y + 1) * width + x] == k) g -= static_cast<double>(d_row[(y + 1) * width + x]);
  if (x > 0 && channel[y * width + x - 1] == k) g += static_cast<double>(d_col[y * width + x - 1]);
  if (x + 1 < width && channel[y * width + x + 1] == k) g -= static_cast<double>(d_col[y * width + x + 1]);
  return g;
}

// Chain rule through transform_sqrt (v = sqrt(image)): dv/dimage = 1 / (2 sqrt(image)).
// A zero upstream gradient stays zero (no 0 * inf = nan at black pixels).
MTSEG_HOST_DEVICE double sqrt_chain(double grad_v, double image_value) {
  return grad_v == 0.0 ? 0.0 : grad_v / (2.0 * ::sqrt(image_value));
}

}  // namespace hog
}  // namespace mtseg
