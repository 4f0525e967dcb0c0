// Histogram of Oriented Gradients: the per-pixel, per-cell and per-block math shared
// by the CPU kernels (csrc/cpu/hog.cpp) and the CUDA kernels (csrc/cuda/hog.cu).
//
// Semantics follow skimage.feature.hog (scikit-image 0.26) exactly:
//  * gradients are central differences without the factor 1/2, zero on the first and
//    last row (rows) and column (columns);
//  * with several channels the channel of largest magnitude wins (lowest index on ties),
//    compared at the precision skimage uses (float32 hypot for float32 input);
//  * orientation theta = atan2(g_row, g_col) mod 180 degrees, hard-binned: bin i holds
//    180*i/n <= theta < 180*(i+1)/n. We decide the bin with sign tests of the gradient
//    against each boundary direction instead of atan2, so the boundaries that a gradient
//    can hit exactly (0, 45, 90, 135 degrees) are decided exactly;
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
// Orientation boundaries.
//
// The table holds, for each inner boundary i = 1..n-1 at phi_i = 180*i/n degrees,
// cos(phi_i), sin(phi_i) and a flag `inclusive`, laid out as three arrays of n-1
// doubles: [cos..., sin..., inclusive...]. A gradient (g_row, g_col) with g_row > 0 has
// theta >= phi_i exactly when g_row*cos(phi_i) >= g_col*sin(phi_i). Only 45, 90 and 135
// degrees can be hit exactly by a gradient (elsewhere tan(phi) is irrational); those
// entries are built from exact values so the comparison is exact there.
// ---------------------------------------------------------------------------------
constexpr int64_t orientation_table_size(int64_t n) { return 3 * (n - 1); }

// Fills `table` (orientation_table_size(n) doubles). Host only.
inline void fill_orientation_table(int64_t n, double* table) {
  const double pi = 3.14159265358979323846;
  const double half_sqrt2 = 0.70710678118654752440;
  double* cos_t = table;
  double* sin_t = table + (n - 1);
  double* inclusive = table + 2 * (n - 1);
  // skimage compares theta with the double boundary (180.0 / n) * i, which is not
  // always exactly 45, 90 or 135 when those are boundaries (e.g. n = 28). A gradient
  // lying exactly on such a direction then lands on the side skimage puts it.
  const double per_bin = 180.0 / static_cast<double>(n);
  for (int64_t i = 1; i < n; ++i) {
    double c, s, exact;
    if (4 * i == n) {
      c = half_sqrt2, s = half_sqrt2, exact = 45.0;
    } else if (2 * i == n) {
      c = 0.0, s = 1.0, exact = 90.0;
    } else if (4 * i == 3 * n) {
      c = -half_sqrt2, s = half_sqrt2, exact = 135.0;
    } else {
      const double phi = pi * static_cast<double>(i) / static_cast<double>(n);
      c = std::cos(phi), s = std::sin(phi), exact = -1.0;
    }
    cos_t[i - 1] = c;
    sin_t[i - 1] = s;
    inclusive[i - 1] = (exact < 0.0 || per_bin * static_cast<double>(i) <= exact) ? 1.0 : 0.0;
  }
}

// theta >= phi_i for a gradient already turned into the upper half plane (g_row > 0).
// Two rounded products compared, never a fused multiply-add: for the 45 and 135 degree
// boundaries cos = +-sin, so equal inputs give bit-equal products.
MTSEG_HOST_DEVICE int past_boundary(double g_row, double g_col, double cos_i, double sin_i, double inclusive_i) {
  const double a = g_row * cos_i;
  const double b = g_col * sin_i;
  return (a > b) || (a == b && inclusive_i != 0.0);
}

// Bin index in [0, n) of the gradient (g_row, g_col).
MTSEG_HOST_DEVICE int orientation_bin(double g_row, double g_col, const double* table, int64_t n) {
  if (g_row == 0.0) return 0;  // theta is 0 or 180, and 180 mod 180 = 0
  if (g_row < 0.0) {           // theta + 180 has the same orientation
    g_row = -g_row;
    g_col = -g_col;
  }
  int bin = 0;
  for (int64_t i = 0; i < n - 1; ++i)
    bin += past_boundary(g_row, g_col, table[i], table[(n - 1) + i], table[2 * (n - 1) + i]);
  return bin;
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
// ---------------------------------------------------------------------------------
template <typename cell_t>
struct BlockView {
  const cell_t* data;
  int64_t row_stride, b_row, b_col, n;
  MTSEG_HOST_DEVICE int64_t size() const { return b_row * b_col * n; }
  // f(k, value) for every element in C order (k = 0 .. size-1), without divisions.
  template <typename F>
  MTSEG_HOST_DEVICE void for_each(F&& f) const {
    const int64_t per_row = b_col * n;
    for (int64_t i = 0, k = 0; i < b_row; ++i) {
      const cell_t* row = data + i * row_stride;
      for (int64_t j = 0; j < per_row; ++j, ++k) f(k, static_cast<double>(row[j]));
    }
  }
};

template <typename cell_t>
MTSEG_HOST_DEVICE double block_sum_abs(const BlockView<cell_t>& v) {
  double s = 0.0;
  v.for_each([&](int64_t, double x) { s += ::fabs(x); });
  return s;
}
template <typename cell_t>
MTSEG_HOST_DEVICE double block_l2(const BlockView<cell_t>& v) {
  double s = 0.0;
  v.for_each([&](int64_t, double x) { s += x * x; });
  return ::sqrt(s + kNormEps * kNormEps);
}
// L2-Hys: clipped L2-normalised value, and the norm of the clipped block.
MTSEG_HOST_DEVICE double hys_clip(double v, double l2) { return ::fmin(v / l2, kHysClip); }
template <typename cell_t>
MTSEG_HOST_DEVICE double block_hys_l2(const BlockView<cell_t>& v, double l2) {
  double s = 0.0;
  v.for_each([&](int64_t, double x) {
    const double o = hys_clip(x, l2);
    s += o * o;
  });
  return ::sqrt(s + kNormEps * kNormEps);
}

template <typename cell_t, typename out_t>
MTSEG_HOST_DEVICE void normalize_block(const BlockView<cell_t>& v, BlockNorm norm, out_t* out) {
  switch (norm) {
    case BlockNorm::L1: {
      const double d = block_sum_abs(v) + kNormEps;
      v.for_each([&](int64_t k, double x) { out[k] = static_cast<out_t>(x / d); });
      break;
    }
    case BlockNorm::L1Sqrt: {
      const double d = block_sum_abs(v) + kNormEps;
      v.for_each([&](int64_t k, double x) { out[k] = static_cast<out_t>(::sqrt(x / d)); });
      break;
    }
    case BlockNorm::L2: {
      const double l2 = block_l2(v);
      v.for_each([&](int64_t k, double x) { out[k] = static_cast<out_t>(x / l2); });
      break;
    }
    case BlockNorm::L2Hys: {
      const double l2 = block_l2(v);
      const double l2_clipped = block_hys_l2(v, l2);
      v.for_each([&](int64_t k, double x) { out[k] = static_cast<out_t>(hys_clip(x, l2) / l2_clipped); });
      break;
    }
  }
}

// Vector-Jacobian product of normalize_block: grad_in[k] = sum_j grad_out[j] d out[j] / d v[k].
// Cells are non-negative, so |v| has derivative 1 where v > 0 (and we take 0 at 0).
template <typename cell_t, typename grad_t>
MTSEG_HOST_DEVICE void normalize_block_backward(const BlockView<cell_t>& v, BlockNorm norm, const grad_t* grad_out,
                                                grad_t* grad_in) {
  switch (norm) {
    case BlockNorm::L1:
    case BlockNorm::L1Sqrt: {
      const double d = block_sum_abs(v) + kNormEps;
      // For L1-sqrt, out = sqrt(u) with u = v / d: chain through d sqrt(u) = 1 / (2 sqrt(u)).
      auto grad_u = [&](int64_t k, double x) -> double {
        const double g = static_cast<double>(grad_out[k]);
        if (norm == BlockNorm::L1) return g;
        const double o = ::sqrt(x / d);
        return o > 0.0 ? g * 0.5 / o : 0.0;
      };
      double q = 0.0;
      v.for_each([&](int64_t k, double x) { q += grad_u(k, x) * x; });
      v.for_each([&](int64_t k, double x) {
        const double sign = x > 0.0 ? 1.0 : (x < 0.0 ? -1.0 : 0.0);
        grad_in[k] = static_cast<grad_t>(grad_u(k, x) / d - sign * q / (d * d));
      });
      break;
    }
    case BlockNorm::L2: {
      const double l2 = block_l2(v);
      double q = 0.0;
      v.for_each([&](int64_t k, double x) { q += static_cast<double>(grad_out[k]) * x; });
      const double l2_cubed = l2 * l2 * l2;
      v.for_each([&](int64_t k, double x) {
        grad_in[k] = static_cast<grad_t>(static_cast<double>(grad_out[k]) / l2 - x * q / l2_cubed);
      });
      break;
    }
    case BlockNorm::L2Hys: {
      // out = o2 / n2, o2 = min(v / n1, 0.2), n1 = |v|_eps, n2 = |o2|_eps.
      const double n1 = block_l2(v);
      const double n2 = block_hys_l2(v, n1);
      double q2 = 0.0;
      v.for_each([&](int64_t k, double x) { q2 += static_cast<double>(grad_out[k]) * hys_clip(x, n1); });
      const double n2_cubed = n2 * n2 * n2;
      // Gradient with respect to o1 = v / n1; the clip passes it where v / n1 <= 0.2.
      auto grad_o1 = [&](int64_t k, double x) -> double {
        const double o1 = x / n1;
        if (o1 > kHysClip) return 0.0;
        return static_cast<double>(grad_out[k]) / n2 - o1 * q2 / n2_cubed;
      };
      double q1 = 0.0;
      v.for_each([&](int64_t k, double x) { q1 += grad_o1(k, x) * x; });
      const double n1_cubed = n1 * n1 * n1;
      v.for_each([&](int64_t k, double x) { grad_in[k] = static_cast<grad_t>(grad_o1(k, x) / n1 - x * q1 / n1_cubed); });
      break;
    }
  }
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
