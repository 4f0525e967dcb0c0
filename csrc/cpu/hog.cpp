// CPU kernels of the HOG operators. The math is in mtseg/hog.h (shared with CUDA);
// this file only lays out the loops: parallel over images x cell rows (cells) or
// images x blocks (normalisation), with no allocation inside the per-pixel loops.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <cstdlib>
#include <limits>
#include <atomic>
#include <cmath>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "mtseg/cpu.h"
#include "mtseg/hog.h"
#include "mtseg/hog_host.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

namespace mtseg {
namespace hog {
namespace {

// Work items of about this many pixels keep the parallel overhead small.
constexpr int64_t kPixelsPerTask = 1 << 14;

int64_t grain_for(int64_t pixels_per_item) { return std::max<int64_t>(1, kPixelsPerTask / std::max<int64_t>(1, pixels_per_item)); }

template <typename scalar_t>
ImageView<scalar_t> image_view(const at::Tensor& images, int64_t b) {
  return ImageView<scalar_t>{images.data_ptr<scalar_t>() + b * images.stride(0),
                             images.size(1),
                             images.size(2),
                             images.size(3),
                             images.stride(1),
                             images.stride(2),
                             images.stride(3)};
}

// ---------------------------------------------------------------------------------
// Cells. Per (image, cell row) the needed image rows are converted once into row
// buffers of the working type T (float for float32/float16/bfloat16 images and uint8
// without transform_sqrt, whose differences are exact small integers; double for
// float64, and for uint8 with transform_sqrt, as skimage computes those in double).
// Each pixel row then goes through loops over columns that the compiler vectorises:
// channel choice, magnitude, orientation bins, per-bin column sums. Each loop is a
// certified fast test; the rare pixels it cannot decide are flagged and redone with
// hog.h's scalar rule, so the result is the exact one:
//  * channel choice: by T's g_row^2 + g_col^2; a pixel whose best channels are within
//    rounding of each other (or both tiny, or overflowing) is redone with hog.h's
//    magnitude and selection_key, skimage's own key (float32 hypot for float images,
//    glibc's double hypot for uint8 and float64);
//  * magnitude: sqrt of T's sum of squares, redone in double where that sum could
//    overflow or underflow (float32 pixels above ~1e19, issue of a near-uniform result);
//  * bins: the step-1 test of hog.h in T lanes (for float with float's own error bound);
//    undecided pixels get hog.h's orientation_bin_exact (double test, then exact).
// ---------------------------------------------------------------------------------

// Flags as wide as T, so that no loop mixes vector widths.
template <typename T>
using flag_t = std::conditional_t<std::is_same_v<T, float>, int32_t, int64_t>;

template <typename T>
struct SelectMargins;
template <>
struct SelectMargins<float> {  // float squares: relative error about 2^-23
  static constexpr float lo = 1.0f - 1.0f / (1 << 19), hi = 1.0f + 1.0f / (1 << 19), tiny = 1e-30f;
};
template <>
struct SelectMargins<double> {  // double squares against glibc's hypot (< 1 ulp)
  static constexpr double lo = 1.0 - 1.0 / (1LL << 44), hi = 1.0 + 1.0 / (1LL << 44), tiny = 1e-290;
};

// The step-1 edge test in T lanes. For double it is hog.h's edge_test_fast. For float:
// cos/sin rounded to float are within 2^-24.9 of the true values, the products and the
// difference add 2^-23 of |g_row| + |g_col|, an underflowing product 2^-150: the error
// stays under (|g_row| + |g_col|) 2^-22.4 + 2^-149, a fifth of this margin.
template <typename T>
struct EdgeBound;
template <>
struct EdgeBound<float> {
  static constexpr float coef = 0x1p-20f, tiny = 0x1p-140f, finite_max = 3.4028234663852886e38f;
  // s = g_row^2 + g_col^2 in float is within 2^-23 of exact (and sqrt of it 1.5 ulp)
  // inside [2^-100, 2^100]; outside it the magnitude is taken in double.
  static constexpr float sq_lo = 0x1p-100f, sq_hi = 0x1p100f;
};
template <>
struct EdgeBound<double> {
  static constexpr double coef = kEdgeErrorCoef, tiny = kEdgeErrorTiny, finite_max = 1.7976931348623157e308;
  static constexpr double sq_lo = 0x1p-1000, sq_hi = 0x1p1000;
};

// Edges of one orientation count in T, split into the inexact ones (step-1 test with a
// margin) and the exact ones (45, 90, 135 degrees: plain sign test).
template <typename T>
struct EdgeLanes {
  std::vector<T> cos_inexact, sin_inexact, cos_exact, sin_exact, inclusive;
  explicit EdgeLanes(const std::vector<Edge>& edges) {
    for (const Edge& e : edges) {
      if (e.exact) {
        cos_exact.push_back(static_cast<T>(e.cos_phi));
        sin_exact.push_back(static_cast<T>(e.sin_phi));
        inclusive.push_back(static_cast<T>(e.inclusive));
      } else {
        cos_inexact.push_back(static_cast<T>(e.cos_phi));
        sin_inexact.push_back(static_cast<T>(e.sin_phi));
      }
    }
  }
};

// Channel choice for one pixel row. `mid` points at column 0 of the pixel row in
// channel 0's buffer plane; rows are `row_stride` apart, planes `plane_stride`. A pixel
// whose best channels are not clearly apart, or both tiny, is flagged `ambiguous`; the
// flag is conservative: a channel near the final winner is near the running best when
// the later of the two is compared. Returns whether any pixel was flagged.
template <typename T>
MTSEG_ALWAYS_INLINE flag_t<T> select_channel_row_impl(const T* __restrict mid, int64_t channels, int64_t plane_stride,
                                                      int64_t row_stride, int64_t n_cols, T* __restrict g_row,
                                                      T* __restrict g_col, T* __restrict best_sq,
                                                      flag_t<T>* __restrict ambiguous, flag_t<T>* __restrict winner) {
  constexpr T lo = SelectMargins<T>::lo, hi = SelectMargins<T>::hi, tiny_sq = SelectMargins<T>::tiny;
  const T* __restrict up0 = mid + row_stride;
  const T* __restrict down0 = mid - row_stride;
  for (int64_t x = 0; x < n_cols; ++x) {
    // The mirrored border (see load_rows) makes both differences exactly 0 there.
    const T gr = up0[x] - down0[x], gc = mid[x + 1] - mid[x - 1];
    g_row[x] = gr;
    g_col[x] = gc;
    best_sq[x] = gr * gr + gc * gc;
    ambiguous[x] = 0;
    winner[x] = 0;
  }
  flag_t<T> any_ambiguous = 0;
  for (int64_t k = 1; k < channels; ++k) {
    const T* __restrict up = mid + k * plane_stride + row_stride;
    const T* __restrict down = mid + k * plane_stride - row_stride;
    const T* __restrict m = mid + k * plane_stride;
    for (int64_t x = 0; x < n_cols; ++x) {
      const T gr = up[x] - down[x], gc = m[x + 1] - m[x - 1];
      const T sq = gr * gr + gc * gc;
      const T best = best_sq[x], best_r = g_row[x], best_c = g_col[x];
      // The same components up to sign and order have the very same magnitude in any
      // rounding: an exact tie, which the lower channel keeps, so no second look is needed.
      const T agr = std::fabs(gr), agc = std::fabs(gc), abr = std::fabs(best_r), abc = std::fabs(best_c);
      const bool identical = ((agr == abr) & (agc == abc)) | ((agr == abc) & (agc == abr));
      // Not "apart" also when a sum overflowed (inf vs inf) or is not a number.
      const bool apart = (sq < best * lo) | (sq > best * hi);
      const bool tiny = (sq < tiny_sq) & (best < tiny_sq);
      const flag_t<T> flag = static_cast<flag_t<T>>((!identical) & ((!apart) | tiny));
      ambiguous[x] |= flag;
      any_ambiguous |= flag;
      const bool take = sq > best;  // strict: the lowest channel keeps a tie
      g_row[x] = take ? gr : best_r;
      g_col[x] = take ? gc : best_c;
      best_sq[x] = take ? sq : best;
      winner[x] = take ? static_cast<flag_t<T>>(k) : winner[x];
    }
  }
  return any_ambiguous;
}

// Magnitudes and step-1 bins of one pixel row. `undecided` flags pixels whose bin the
// test could not tell (or with a non-finite difference), `rescale` those whose
// magnitude needs double; the return value has bit 0 / bit 1 set if any pixel has.
template <typename T>
MTSEG_ALWAYS_INLINE flag_t<T> bin_row_impl(const T* __restrict g_row, const T* __restrict g_col, int64_t n_cols,
                                           const T* __restrict cos_inexact, const T* __restrict sin_inexact,
                                           int64_t n_inexact, const T* __restrict cos_exact,
                                           const T* __restrict sin_exact, const T* __restrict inclusive,
                                           int64_t n_exact, T* __restrict up_row, T* __restrict up_col,
                                           T* __restrict err, T* __restrict mag, flag_t<T>* __restrict bin,
                                           flag_t<T>* __restrict undecided, flag_t<T>* __restrict rescale) {
  using B = EdgeBound<T>;
  flag_t<T> any_rescale = 0;
  for (int64_t x = 0; x < n_cols; ++x) {
    const T r = g_row[x], c = g_col[x];
    const T sq = r * r + c * c;
    mag[x] = std::sqrt(sq);
    const flag_t<T> bad_mag =  // outside the accurate range, including squares that underflowed to 0
        static_cast<flag_t<T>>(!((sq >= B::sq_lo) & (sq <= B::sq_hi)) & ((r != T(0)) | (c != T(0))));
    rescale[x] = bad_mag;
    any_rescale |= bad_mag;
    const bool flip = r < T(0);
    const T ur = flip ? -r : r, uc = flip ? -c : c;
    up_row[x] = ur;
    up_col[x] = uc;
    const T ar = std::fabs(r), ac = std::fabs(c);
    err[x] = ar * B::coef + ac * B::coef + B::tiny;
    bin[x] = 0;
    undecided[x] = static_cast<flag_t<T>>(!((ar <= B::finite_max) & (ac <= B::finite_max)));
  }
  for (int64_t i = 0; i < n_inexact; ++i) {
    const T co = cos_inexact[i], si = sin_inexact[i];
    for (int64_t x = 0; x < n_cols; ++x) {
      const T d = up_row[x] * co - up_col[x] * si;
      const bool past = d > err[x], before = d < -err[x];
      bin[x] += static_cast<flag_t<T>>(past);
      undecided[x] |= static_cast<flag_t<T>>(!(past | before));
    }
  }
  for (int64_t i = 0; i < n_exact; ++i) {
    const T co = cos_exact[i], si = sin_exact[i];
    const bool incl = inclusive[i] != T(0);
    for (int64_t x = 0; x < n_cols; ++x) {
      const T d = up_row[x] * co - up_col[x] * si;  // exact sign: co, si are 0 or +-1
      bin[x] += static_cast<flag_t<T>>((d > T(0)) | ((d == T(0)) & incl));
    }
  }
  flag_t<T> any_undecided = 0;
  for (int64_t x = 0; x < n_cols; ++x) {
    const bool on_axis = g_row[x] == T(0);  // theta = 0 or 180: bin 0
    bin[x] = on_axis ? 0 : bin[x];
    undecided[x] = on_axis ? 0 : undecided[x];
    any_undecided |= undecided[x];
  }
  return (any_undecided != 0 ? 1 : 0) | (any_rescale != 0 ? 2 : 0);
}

// Per-bin column sums of one pixel row's magnitudes.
template <typename T>
MTSEG_ALWAYS_INLINE void histogram_row_impl(const T* __restrict mag, const flag_t<T>* __restrict bin, int64_t n_cols,
                                            int64_t n, T* __restrict column_sums) {
  for (int64_t o = 0; o < n; ++o) {
    T* __restrict sums = column_sums + o * n_cols;
    const flag_t<T> oo = static_cast<flag_t<T>>(o);
    for (int64_t x = 0; x < n_cols; ++x) sums[x] += bin[x] == oo ? mag[x] : T(0);
  }
}

// Finishes a converted row (`row[0..W)`, with one padding slot on each side): checks
// the values, applies transform_sqrt, and mirrors the border columns. Returns 1 if a
// value is not finite (or negative with transform_sqrt), else 0.
template <typename T>
MTSEG_ALWAYS_INLINE flag_t<T> finish_row_impl(T* __restrict row, int64_t width, bool transform_sqrt) {
  flag_t<T> bad = 0;
  if (transform_sqrt) {
    for (int64_t x = 0; x < width; ++x) {
      const T v = row[x];
      bad |= static_cast<flag_t<T>>(!(v - v == T(0))) | static_cast<flag_t<T>>(v < T(0));
      row[x] = std::sqrt(v);
    }
  } else {
    for (int64_t x = 0; x < width; ++x) bad |= static_cast<flag_t<T>>(!(row[x] - row[x] == T(0)));
  }
  // Column -1 mirrors column 1 and column W mirrors column W - 2, so the central
  // differences at the first and last column are exactly 0 (skimage's border rule).
  row[-1] = width > 1 ? row[1] : T(0);
  row[width] = width > 1 ? row[width - 2] : T(0);
  return bad;
}

// The vector loops, compiled once per instruction set and picked at load time.
#define MTSEG_DEFINE_ROW_KERNELS(T)                                                                               \
  MTSEG_CPU_CLONES flag_t<T> select_channel_row(const T* __restrict mid, int64_t channels, int64_t plane_stride, \
                                                int64_t row_stride, int64_t n_cols, T* __restrict g_row,           \
                                                T* __restrict g_col, T* __restrict best_sq,                        \
                                                flag_t<T>* __restrict ambiguous, flag_t<T>* __restrict winner) {   \
    return select_channel_row_impl<T>(mid, channels, plane_stride, row_stride, n_cols, g_row, g_col, best_sq,     \
                                      ambiguous, winner);                                                          \
  }                                                                                                                \
  MTSEG_CPU_CLONES flag_t<T> bin_row(const T* __restrict g_row, const T* __restrict g_col, int64_t n_cols,        \
                                     const T* __restrict cos_inexact, const T* __restrict sin_inexact,             \
                                     int64_t n_inexact, const T* __restrict cos_exact,                             \
                                     const T* __restrict sin_exact, const T* __restrict inclusive,                 \
                                     int64_t n_exact, T* __restrict up_row, T* __restrict up_col,                  \
                                     T* __restrict err, T* __restrict mag, flag_t<T>* __restrict bin,              \
                                     flag_t<T>* __restrict undecided, flag_t<T>* __restrict rescale) {             \
    return bin_row_impl<T>(g_row, g_col, n_cols, cos_inexact, sin_inexact, n_inexact, cos_exact, sin_exact,       \
                           inclusive, n_exact, up_row, up_col, err, mag, bin, undecided, rescale);                 \
  }                                                                                                                \
  MTSEG_CPU_CLONES void histogram_row(const T* __restrict mag, const flag_t<T>* __restrict bin, int64_t n_cols,   \
                                      int64_t n, T* __restrict column_sums) {                                      \
    histogram_row_impl<T>(mag, bin, n_cols, n, column_sums);                                                       \
  }                                                                                                                \
  MTSEG_CPU_CLONES flag_t<T> finish_row(T* __restrict row, int64_t width, bool transform_sqrt) {                 \
    return finish_row_impl<T>(row, width, transform_sqrt);                                                         \
  }
MTSEG_DEFINE_ROW_KERNELS(float)
MTSEG_DEFINE_ROW_KERNELS(double)
#undef MTSEG_DEFINE_ROW_KERNELS

// Exact-path counters (pixels whose bin the vector test left to hog.h's scalar rule, and
// those of them that needed the integer test), for benchmarks/README.md; see
// hog_fallback_counts().
std::atomic<int64_t> g_scalar_bins{0}, g_exact_bins{0};
// Cell rows that took the fused AVX-512 pass (tests check which pass ran).
std::atomic<int64_t> g_fused_rows{0};

// Per-thread state of the cells loops: row buffers, per-column scratch, and the
// orientation edges (with scratch for hog.h's exact test).
template <typename T>
struct RowScratch {
  std::vector<T> rows;                       // C planes x (cell_rows + 2) rows x (W + 2) cols
  std::vector<T> g_row, g_col, best_sq;      // winning channel's differences, per column
  std::vector<flag_t<T>> ambiguous, winner;  // flagged pixels; winning channel
  std::vector<T> mag, up_row, up_col, err;   // magnitude; gradient in the upper half plane; step-1 margin
  std::vector<flag_t<T>> bin, undecided, rescale;
  std::vector<T> column_sums;                // n x covered columns, summed over the cell row's pixel rows
  const std::vector<Edge>& edges;
  const EdgeLanes<T>& lanes;
  std::vector<uint32_t> exact_scratch;
  int64_t scalar_bins = 0, exact_bins = 0, fused_rows = 0;
  RowScratch(int64_t channels, int64_t buf_rows, int64_t row_stride, int64_t n_cols, int64_t n,
             const std::vector<Edge>& edges_, const EdgeLanes<T>& lanes_)
      : rows(channels * buf_rows * row_stride), g_row(n_cols), g_col(n_cols), best_sq(n_cols), ambiguous(n_cols),
        winner(n_cols), mag(n_cols), up_row(n_cols), up_col(n_cols), err(n_cols), bin(n_cols), undecided(n_cols),
        rescale(n_cols), column_sums(n * n_cols), edges(edges_), lanes(lanes_),
        exact_scratch(static_cast<size_t>(exact_scratch_limbs(n))) {}
  ~RowScratch() {
    if (scalar_bins) g_scalar_bins += scalar_bins;
    if (exact_bins) g_exact_bins += exact_bins;
    if (fused_rows) g_fused_rows += fused_rows;
  }
};

// Converts image rows [y_first - 1, y_first + n_rows - 1) of every channel into T
// buffers of W + 2 columns. Outside the image the buffer mirrors the image without
// repeating the edge (row -1 = row 1, row H = row H - 2), so the central differences at
// the border are exactly 0, with no masks in the vector loops.
// Returns false if a value is not finite (or, with transform_sqrt, negative).
template <typename T, typename scalar_t>
bool load_rows(const ImageView<scalar_t>& img, int64_t y_first, int64_t n_rows, bool transform_sqrt, T* rows) {
  const int64_t W = img.width, H = img.height, row_stride = W + 2;
  flag_t<T> bad = 0;
  for (int64_t k = 0; k < img.channels; ++k) {
    T* plane = rows + k * n_rows * row_stride;
    for (int64_t j = 0; j < n_rows; ++j) {
      const int64_t y = y_first - 1 + j;
      if (y < 0 || y >= H) continue;  // mirrored below
      T* dst = plane + j * row_stride + 1;
      const scalar_t* src = img.data + k * img.stride_c + y * img.stride_h;
      const int64_t sw = img.stride_w;
      if (std::is_same_v<scalar_t, T> && sw == 1) {
        std::memcpy(dst, src, W * sizeof(T));
      } else if (sw == 1) {
        for (int64_t x = 0; x < W; ++x) dst[x] = static_cast<T>(src[x]);
      } else {
        for (int64_t x = 0; x < W; ++x) dst[x] = static_cast<T>(src[x * sw]);
      }
      bad |= finish_row(dst, W, transform_sqrt);
    }
    for (int64_t j = 0; j < n_rows; ++j) {
      const int64_t y = y_first - 1 + j;
      if (y >= 0 && y < H) continue;
      const int64_t mirror = y < 0 ? 1 : H - 2;  // the row whose difference must cancel
      T* dst = plane + j * row_stride;
      if (H > 1) {
        const T* src = plane + (mirror - (y_first - 1)) * row_stride;
        std::copy(src, src + row_stride, dst);
      } else {
        std::fill(dst, dst + row_stride, T(0));
      }
    }
  }
  return bad == 0;
}

// Exact channel choice for one flagged pixel: pixel_gradient's rule (hog.h's
// magnitude and selection_key in grad_t, lowest channel on ties) on the row buffers,
// which hold the very values skimage differentiates.
template <typename T, typename grad_t>
void redo_channel_choice(const T* mid, int64_t channels, int64_t plane_stride, int64_t row_stride, int64_t x,
                         RowScratch<T>& t) {
  grad_t best_key = grad_t(-1);
  for (int64_t k = 0; k < channels; ++k) {
    const T* m = mid + k * plane_stride;
    const grad_t gr = static_cast<grad_t>(m[x + row_stride] - m[x - row_stride]);
    const grad_t gc = static_cast<grad_t>(m[x + 1] - m[x - 1]);
    const grad_t key = selection_key(gr, magnitude(gr, gc));
    if (key > best_key) {
      best_key = key;
      t.g_row[x] = static_cast<T>(gr);
      t.g_col[x] = static_cast<T>(gc);
      t.winner[x] = static_cast<flag_t<T>>(k);
    }
  }
}

// One pixel row through the vector loops: the winning channel (t.winner) and its
// differences (t.g_row, t.g_col), the magnitude (t.mag) and exact bin (t.bin) of every
// covered column; with `column_sums`, the magnitudes are also added to the per-bin sums.
template <typename T, typename grad_t>
void orient_pixel_row(RowScratch<T>& t, const T* mid, int64_t channels, int64_t plane_stride, int64_t row_stride,
                      int64_t n_cols, int64_t n, T* column_sums) {
  if (select_channel_row(mid, channels, plane_stride, row_stride, n_cols, t.g_row.data(), t.g_col.data(),
                         t.best_sq.data(), t.ambiguous.data(), t.winner.data())) {
    for (int64_t x = 0; x < n_cols; ++x)
      if (t.ambiguous[x]) redo_channel_choice<T, grad_t>(mid, channels, plane_stride, row_stride, x, t);
  }
  const auto& L = t.lanes;
  const flag_t<T> redo = bin_row(t.g_row.data(), t.g_col.data(), n_cols, L.cos_inexact.data(), L.sin_inexact.data(),
                                 static_cast<int64_t>(L.cos_inexact.size()), L.cos_exact.data(), L.sin_exact.data(),
                                 L.inclusive.data(), static_cast<int64_t>(L.cos_exact.size()), t.up_row.data(),
                                 t.up_col.data(), t.err.data(), t.mag.data(), t.bin.data(), t.undecided.data(),
                                 t.rescale.data());
  if (redo & 1) {
    for (int64_t x = 0; x < n_cols; ++x) {
      if (!t.undecided[x]) continue;
      const auto d = orientation_bin_exact(static_cast<double>(t.g_row[x]), static_cast<double>(t.g_col[x]),
                                           t.edges.data(), n, t.exact_scratch.data(),
                                           static_cast<int64_t>(t.exact_scratch.size()));
      TORCH_INTERNAL_ASSERT(d.path >= 0, "hog: exact orientation test out of scratch");
      t.bin[x] = static_cast<flag_t<T>>(d.bin);
      ++t.scalar_bins;
      t.exact_bins += d.path;
    }
  }
  if (redo & 2) {
    for (int64_t x = 0; x < n_cols; ++x)
      if (t.rescale[x]) t.mag[x] = static_cast<T>(magnitude(static_cast<grad_t>(t.g_row[x]), static_cast<grad_t>(t.g_col[x])));
  }
  if (column_sums != nullptr) histogram_row(t.mag.data(), t.bin.data(), n_cols, n, column_sums);
}

// ---------------------------------------------------------------------------------
// Fused AVX-512 cells pass (float32 and uint8 images, no transform_sqrt, unit column
// stride): one pass over the image per cell row, 16 columns at a time, with the pixel
// rows of the cell row as the inner loop, so that the per-bin sums of the 16 columns
// stay in registers. Per 16 pixels: the differences of every channel straight from
// the image (no row copy; the first/last row and column get 0 by masks), the channel
// choice by float squares, the magnitude, the certified float edge tests of
// bin_row_impl, and the histogram. The same rules as the loops above, in the same
// float operations (no FMA), so both give the very same cells; lanes the float tests
// cannot decide (channels within rounding of a tie, a bin within rounding of an edge,
// squares outside the accurate range) are redone with the scalar rules, as above.
// The cells backward takes the same per-pixel routine (fused_pixels16) for its pass 1.
// CPUs with AVX2 but no AVX-512 take the 8-lane twin of the forward (further below);
// fused_pass_selected() picks, MTSEG_HOG_SIMD overrides (tests compare every pass with
// the row loops, forward and backward).
// ---------------------------------------------------------------------------------
#if defined(__x86_64__) && defined(__GNUC__)
#define MTSEG_HOG_FUSED 1
#define MTSEG_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))

// Which fused pass the cells take (the AVX2 one only where AVX-512 is absent, or asked
// for): MTSEG_HOG_SIMD=0 in the environment selects the row loops, =avx2 / =avx512 that
// pass where the CPU has it (else the row loops); unset, the widest the CPU has.
enum class FusedPass { kNone, kAvx2, kAvx512 };

FusedPass fused_pass_selected() {
  static const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                             __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  static const bool avx2 = __builtin_cpu_supports("avx2");
  const char* env = std::getenv("MTSEG_HOG_SIMD");
  const std::string want = env == nullptr ? "" : env;
  if (want == "0") return FusedPass::kNone;
  if (want == "avx2") return avx2 ? FusedPass::kAvx2 : FusedPass::kNone;
  if (want == "avx512") return avx512 ? FusedPass::kAvx512 : FusedPass::kNone;
  return avx512 ? FusedPass::kAvx512 : avx2 ? FusedPass::kAvx2 : FusedPass::kNone;
}

MTSEG_AVX512 inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
MTSEG_AVX512 inline __m512i load16i(const uint8_t* p, __mmask16 m) {
  return _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, p));
}
MTSEG_AVX512 inline __m512 abs16(__m512 v) { return _mm512_abs_ps(v); }

// Edges as the fused pass reads them: the inexact ones (float test with a margin) and
// the exact ones (45/90/135 degrees, plain sign test, `inclusive` on the edge).
struct FusedEdges {
  std::vector<float> cos_phi, sin_phi;  // edge i + 1 of n, rounded to float
  std::vector<int> exact, inclusive;    // as in hog.h's Edge
  explicit FusedEdges(const std::vector<Edge>& edges) {
    for (const Edge& e : edges) {
      cos_phi.push_back(static_cast<float>(e.cos_phi));
      sin_phi.push_back(static_cast<float>(e.sin_phi));
      exact.push_back(e.exact);
      inclusive.push_back(e.inclusive);
    }
  }
};

// Exact channel choice of one pixel straight from the image: pixel_gradient's rule
// (hog.h's magnitude and selection_key in grad_t, lowest channel on ties) on the values
// the fused pass differentiates. Returns the winning channel.
template <typename scalar_t, typename grad_t>
int32_t redo_channel_choice_direct(const scalar_t* img, int64_t channels, int64_t stride_c, int64_t stride_h,
                                   int64_t height, int64_t width, int64_t y, int64_t x, float& g_row, float& g_col) {
  const bool row_inside = y > 0 && y < height - 1, col_inside = x > 0 && x < width - 1;
  grad_t best_key = grad_t(-1);
  int32_t winner = 0;
  for (int64_t k = 0; k < channels; ++k) {
    const scalar_t* p = img + k * stride_c + y * stride_h + x;
    const float gr = row_inside ? static_cast<float>(p[stride_h]) - static_cast<float>(p[-stride_h]) : 0.0f;
    const float gc = col_inside ? static_cast<float>(p[1]) - static_cast<float>(p[-1]) : 0.0f;
    const grad_t key = selection_key(static_cast<grad_t>(gr), magnitude(static_cast<grad_t>(gr), static_cast<grad_t>(gc)));
    if (key > best_key) {
      best_key = key;
      g_row = gr;
      g_col = gc;
      winner = static_cast<int32_t>(k);
    }
  }
  return winner;
}

// Lanes 8 h .. 8 h + 7 of v in double.
MTSEG_AVX512 inline __m512d half_to_double(__m512 v, int h) {
  return _mm512_cvtps_pd(h == 0 ? _mm512_castps512_ps256(v) : _mm512_extractf32x8_ps(v, 1));
}

// The comparison of skimage's channel keys for float32 gradients (hog.h's
// selection_key(float, magnitude): float(sqrt(r^2 + c^2)), the sum in double) of a new
// channel (r, c) against the running best (br, bc), in the 8 double lanes of half h:
// the lanes where the new key is larger. Float keys are monotone in the double sum s,
// and two sums more than a relative 2^-22 apart have different keys (a float spans at
// most a relative 2^-23 of its root; 2^-40 absorbs the double roundings): there the
// sums decide. Closer sums, and sums whose keys leave the normal float range, take the
// keys themselves (two double roots).
MTSEG_AVX512 inline __mmask8 key_greater8(__m512 r, __m512 c, __m512 br, __m512 bc, int h) {
  const __m512d nr = half_to_double(r, h), nc = half_to_double(c, h), pr = half_to_double(br, h),
                pc = half_to_double(bc, h);
  const __m512d s_new = _mm512_add_pd(_mm512_mul_pd(nr, nr), _mm512_mul_pd(nc, nc));
  const __m512d s_best = _mm512_add_pd(_mm512_mul_pd(pr, pr), _mm512_mul_pd(pc, pc));
  const __m512d lo = _mm512_min_pd(s_new, s_best), hi = _mm512_max_pd(s_new, s_best);
  const __m512d margin = _mm512_set1_pd(1.0 + 0x1p-22 + 0x1p-40);
  const __mmask8 apart = _mm512_cmp_pd_mask(hi, _mm512_mul_pd(lo, margin), _CMP_GT_OQ) &
                         _mm512_cmp_pd_mask(lo, _mm512_set1_pd(0x1p-250), _CMP_GE_OQ) &
                         _mm512_cmp_pd_mask(hi, _mm512_set1_pd(0x1p254), _CMP_LT_OQ);
  // The roots are taken whether or not a lane needs them: a branch on `apart` costs more
  // in mispredictions than the two roots (measured).
  const __m256 k_new = _mm512_cvtpd_ps(_mm512_sqrt_pd(s_new)), k_best = _mm512_cvtpd_ps(_mm512_sqrt_pd(s_best));
  return static_cast<__mmask8>((_mm512_cmp_pd_mask(s_new, s_best, _CMP_GT_OQ) & apart) |
                               (_mm256_cmp_ps_mask(k_new, k_best, _CMP_GT_OQ) & ~apart));
}

// What the fused pass needs of one call: the image layout, the edges, scratch for the
// exact test, and the per-thread counters of hog_fallback_counts().
struct FusedContext {
  int64_t channels, stride_c, stride_h, height, width, n_cols, n;
  int64_t prefetch_offset;  // bytes from a pixel to the one a cell row plus one row below
  const FusedEdges& E;
  const std::vector<Edge>& edges;
  uint32_t* exact_scratch;
  int64_t exact_capacity;
  int64_t& scalar_bins;
  int64_t& exact_bins;
};

// The context of one image for the forward and the backward fused passes.
template <typename scalar_t, typename T>
FusedContext fused_context(const ImageView<scalar_t>& img, const CellGeometry& g, int64_t channels, int64_t n_cols,
                           int64_t n, const FusedEdges& E, const std::vector<Edge>& edges, RowScratch<T>& t) {
  return {channels, img.stride_c, img.stride_h, g.height, g.width, n_cols, n,
          (g.cell_rows + 1) * img.stride_h * static_cast<int64_t>(sizeof(scalar_t)),
          E, edges, t.exact_scratch.data(), static_cast<int64_t>(t.exact_scratch.size()), t.scalar_bins,
          t.exact_bins};
}

// The scalar rules for the lanes of `redo` (bit l: column x0 + l of pixel row y) that a
// fused pass's vector tests left: the channel choice again where `ambiguous`, then the
// magnitude in grad_t where the float square is outside its accurate range, and the
// exact bin. s_*: the lanes' winning differences, magnitude, bin and channel, updated in
// place. Returns false if a lane holds a NaN (the call then raises; nothing to decide).
template <typename scalar_t, typename grad_t>
bool redo_lanes(const scalar_t* img, FusedContext& c, int64_t y, int64_t x0, uint32_t redo, uint32_t ambiguous,
                float* s_row, float* s_col, float* s_mag, int32_t* s_bin, int32_t* s_win) {
  using B = EdgeBound<float>;
  bool finite = true;
  for (int l = 0; redo >> l; ++l) {
    if (!((redo >> l) & 1)) continue;
    const int64_t x = x0 + l;
    if ((ambiguous >> l) & 1)
      s_win[l] = redo_channel_choice_direct<scalar_t, grad_t>(img, c.channels, c.stride_c, c.stride_h, c.height,
                                                              c.width, y, x, s_row[l], s_col[l]);
    const float r = s_row[l], cc = s_col[l];
    if (std::isnan(r) || std::isnan(cc)) {
      finite = false;
      continue;
    }
    const float sq = r * r + cc * cc;
    s_mag[l] = std::sqrt(sq);
    if (!((sq >= B::sq_lo) && (sq <= B::sq_hi)) && (r != 0.0f || cc != 0.0f))
      s_mag[l] = static_cast<float>(magnitude(static_cast<grad_t>(r), static_cast<grad_t>(cc)));
    const auto d = orientation_bin_exact(static_cast<double>(r), static_cast<double>(cc), c.edges.data(), c.n,
                                         c.exact_scratch, c.exact_capacity);
    TORCH_INTERNAL_ASSERT(d.path >= 0, "hog: exact orientation test out of scratch");
    s_bin[l] = d.bin;
    ++c.scalar_bins;
    c.exact_bins += d.path;
  }
  return finite;
}

// Where the float squares of two channels decide skimage's channel choice (the float32
// input of the fused pass). A float square is within 1.5 of its own ulps of the double
// sum s (two rounded products and a rounded sum), so two squares more than 16 ulps apart
// have sums more than 13 ulps apart: a relative 13 x 2^-24 for normal squares, 13 x
// 2^-149 against at most 2^23 of those for denormal ones; either way more than the 2^-22
// beyond which keys differ (see key_greater8), in the same order. Squares that overflow
// are inf, within 1 ulp of the largest float; sums so small that their keys are denormal
// floats (below 2^-252) round to square 0: both are near ties.
constexpr int32_t kNearTieUlps = 16;

// The 16 pixels (y, x0 .. x0 + 15) of one pixel row.
struct Pixels16 {
  __m512 g_row, g_col;  // the winning channel's differences
  __m512 mag;           // its magnitude, 0 in lanes outside m_valid
  __m512i bin;          // exact orientation bin
  __m512i winner;       // winning channel (only computed with kWinner)
};

// One pixel row of 16 columns: channel choice, magnitude and exact bin, with the rules
// of select_channel_row_impl / bin_row_impl in the same float operations, so that both
// passes agree bit for bit. `bad` collects the lanes of non-finite values read (float
// input: every value of row y + 1 in m_valid, the row the caller has not seen yet).
// N: the number of bins when known at compile time; 6 and 9 fold the half plane (below).
template <typename scalar_t, typename grad_t, int N, bool kWinner>
MTSEG_AVX512 MTSEG_ALWAYS_INLINE Pixels16 fused_pixels16(const scalar_t* img, FusedContext& c, int64_t y,
                                                         int64_t x0, __mmask16 m_valid, __mmask16 m_col,
                                                         __mmask16& bad) {
  constexpr bool kFloatInput = std::is_same_v<scalar_t, float>;
  using B = EdgeBound<float>;
  const __m512 zero = _mm512_setzero_ps();
  const __m512i one = _mm512_set1_epi32(1);
  const bool row_inside = y > 0 && y < c.height - 1;
  const __mmask16 m_row = row_inside ? m_valid : __mmask16(0);
  const __mmask16 m_below = y + 1 < c.height ? m_valid : __mmask16(0);  // read (and checked) whenever it exists
  __m512 best = zero, br = zero, bc = zero;
  __m512i win = _mm512_setzero_si512();
  __mmask16 ambiguous = 0;  // uint8 lanes whose channel choice is redone
  for (int64_t k = 0; k < c.channels; ++k) {
    const scalar_t* mid = img + k * c.stride_c + y * c.stride_h + x0;
    __m512 gr, gc;
    if constexpr (kFloatInput) {
      const __m512 up = load16(mid + c.stride_h, m_below), down = load16(mid - c.stride_h, m_row);
      bad |= _mm512_fpclass_ps_mask(up, 0x99);  // NaN, +Inf, -Inf
      gr = _mm512_maskz_sub_ps(m_row, up, down);
      gc = _mm512_sub_ps(load16(mid + 1, m_col), load16(mid - 1, m_col));
    } else {  // the same exact differences, taken in int32 (one conversion instead of two)
      const __m512i up = load16i(mid + c.stride_h, m_below), down = load16i(mid - c.stride_h, m_row);
      gr = _mm512_cvtepi32_ps(_mm512_maskz_sub_epi32(m_row, up, down));
      gc = _mm512_cvtepi32_ps(_mm512_sub_epi32(load16i(mid + 1, m_col), load16i(mid - 1, m_col)));
    }
    // The same columns of the next cell row, which the caller reads next: fetched into
    // L2 now, so that its first loads do not wait on memory. (A prefetch never faults,
    // so the address may lie past the image; it is formed as an integer.)
    _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(mid) + c.prefetch_offset), _MM_HINT_T1);
    const __m512 sq = _mm512_add_ps(_mm512_mul_ps(gr, gr), _mm512_mul_ps(gc, gc));
    if (k == 0) {
      best = sq, br = gr, bc = gc;
      continue;
    }
    // The same components as the running best up to sign and order: an exact tie (the
    // same magnitude in any rounding), which the lower channel keeps.
    __mmask16 take = _mm512_cmp_ps_mask(sq, best, _CMP_GT_OQ);  // strict: the lowest channel keeps a tie
    if constexpr (kFloatInput) {
      // Squares within 16 ulps: skimage's keys decide, from the double sums (and the
      // roots where even those are too close).
      const __m512 agr = abs16(gr), agc = abs16(gc), abr = abs16(br), abc = abs16(bc);
      const __mmask16 same = (_mm512_cmp_ps_mask(agr, abr, _CMP_EQ_OQ) & _mm512_cmp_ps_mask(agc, abc, _CMP_EQ_OQ)) |
                             (_mm512_cmp_ps_mask(agr, abc, _CMP_EQ_OQ) & _mm512_cmp_ps_mask(agc, abr, _CMP_EQ_OQ));
      const __m512i ulps = _mm512_abs_epi32(_mm512_sub_epi32(_mm512_castps_si512(sq), _mm512_castps_si512(best)));
      const __mmask16 flagged =
          static_cast<__mmask16>(_mm512_cmple_epi32_mask(ulps, _mm512_set1_epi32(kNearTieUlps)) & ~same & m_valid);
      if (flagged != 0) {
        __mmask16 greater = 0;
        if (flagged & 0x00ff) greater |= key_greater8(gr, gc, br, bc, 0);
        if (flagged & 0xff00) greater |= static_cast<__mmask16>(key_greater8(gr, gc, br, bc, 1)) << 8;
        take = static_cast<__mmask16>((take & ~flagged) | (greater & flagged));
      }
    } else {
      // uint8: exact integers, so only equal squares are near, and equal squares with
      // equal |g_row g_col| have the same components up to sign and order: the rest
      // (different components, the same magnitude) are redone with skimage's hypot.
      const __mmask16 same =
          _mm512_cmp_ps_mask(abs16(_mm512_mul_ps(gr, gc)), abs16(_mm512_mul_ps(br, bc)), _CMP_EQ_OQ);
      ambiguous |= static_cast<__mmask16>(_mm512_cmp_ps_mask(sq, best, _CMP_EQ_OQ) & ~same);
    }
    best = _mm512_mask_mov_ps(best, take, sq);
    br = _mm512_mask_mov_ps(br, take, gr);
    bc = _mm512_mask_mov_ps(bc, take, gc);
    if constexpr (kWinner) win = _mm512_mask_mov_epi32(win, take, _mm512_set1_epi32(static_cast<int32_t>(k)));
  }
  ambiguous &= m_valid;
  // Magnitude, and (float input) lanes whose square is outside float's accurate range.
  __m512 mag = _mm512_sqrt_ps(best);
  __mmask16 rescale = 0;
  if constexpr (kFloatInput) {  // uint8 squares are 0 or integers in [1, 2 x 255^2]
    const __mmask16 nonzero = _mm512_cmp_ps_mask(br, zero, _CMP_NEQ_UQ) | _mm512_cmp_ps_mask(bc, zero, _CMP_NEQ_UQ);
    rescale = static_cast<__mmask16>(~(_mm512_cmp_ps_mask(best, _mm512_set1_ps(B::sq_lo), _CMP_GE_OQ) &
                                       _mm512_cmp_ps_mask(best, _mm512_set1_ps(B::sq_hi), _CMP_LE_OQ)) &
                                     nonzero);
  }
  // Bins of the gradient turned into the upper half plane, (|g_row|, +-g_col).
  const __m512 ar = abs16(br), ac = abs16(bc);
  // bin_row_impl's margin, with |g_row| + |g_col| rounded once more (2^-24 relative,
  // far inside the factor 5 of the bound).
  const __m512 err = _mm512_add_ps(_mm512_mul_ps(_mm512_add_ps(ar, ac), _mm512_set1_ps(B::coef)), _mm512_set1_ps(B::tiny));
  __m512i bin = _mm512_setzero_si512();
  __m512 nearest = _mm512_set1_ps(std::numeric_limits<float>::infinity());  // smallest |D_i| of the inexact edges
  if constexpr (N > 0) {
    // N = 6, 9 (no edge at 45 or 135 degrees): fold the angle into [0, 90] degrees,
    // theta' = atan2(|g_row|, |g_col|), and test only the edges below 90; a gradient with
    // g_row, g_col of opposite signs has theta = 180 - theta', which is past edge N - i
    // exactly when theta' is not past edge i (equality is impossible there: irrational).
    // The same certified test with the same rounded cos/sin, so the same exact bins.
    static_assert(N % 4 != 0, "the fold needs the 45 and 135 degree edges absent");
    constexpr int kBelow90 = (N - 1) / 2;
#pragma GCC unroll 8
    for (int i = 0; i < kBelow90; ++i) {
      const __m512 d = _mm512_sub_ps(_mm512_mul_ps(ar, _mm512_set1_ps(c.E.cos_phi[i])),
                                     _mm512_mul_ps(ac, _mm512_set1_ps(c.E.sin_phi[i])));
      bin = _mm512_mask_add_epi32(bin, _mm512_cmp_ps_mask(d, zero, _CMP_GT_OQ), bin, one);
      nearest = _mm512_min_ps(abs16(d), nearest);
    }
    // theta = 90 exactly (g_col = 0): bin N / 2 for even N if skimage's 90 degree edge
    // is inclusive (as bin_row_impl's exact edge), bin (N - 1) / 2 for odd N either way.
    const __mmask16 col_zero = _mm512_cmp_ps_mask(bc, zero, _CMP_EQ_OQ);
    const __mmask16 incl90 = (N % 2 == 0 && c.E.inclusive[N / 2 - 1]) ? __mmask16(0xffff) : __mmask16(0);
    const __mmask16 mirror = static_cast<__mmask16>(
        (_mm512_movepi32_mask(_mm512_castps_si512(_mm512_xor_ps(br, bc))) & ~col_zero) | (col_zero & incl90));
    bin = _mm512_mask_sub_epi32(bin, mirror, _mm512_set1_epi32(N - 1), bin);
  } else {
    const __mmask16 flip = _mm512_cmp_ps_mask(br, zero, _CMP_LT_OQ);
    const __m512 uc = _mm512_mask_sub_ps(bc, flip, zero, bc);
    for (int64_t i = 0; i < c.n - 1; ++i) {
      const __m512 d = _mm512_sub_ps(_mm512_mul_ps(ar, _mm512_set1_ps(c.E.cos_phi[i])),
                                     _mm512_mul_ps(uc, _mm512_set1_ps(c.E.sin_phi[i])));
      if (c.E.exact[i]) {  // 45/90/135 degrees: the sign is exact; on the edge, skimage's side
        const __mmask16 past =
            c.E.inclusive[i] ? _mm512_cmp_ps_mask(d, zero, _CMP_GE_OQ) : _mm512_cmp_ps_mask(d, zero, _CMP_GT_OQ);
        bin = _mm512_mask_add_epi32(bin, past, bin, one);
      } else {
        bin = _mm512_mask_add_epi32(bin, _mm512_cmp_ps_mask(d, zero, _CMP_GT_OQ), bin, one);
        nearest = _mm512_min_ps(abs16(d), nearest);
      }
    }
  }
  const __mmask16 on_axis = _mm512_cmp_ps_mask(br, zero, _CMP_EQ_OQ);  // theta 0 or 180: bin 0
  bin = _mm512_maskz_mov_epi32(static_cast<__mmask16>(~on_axis), bin);
  // Undecided: within the margin of an edge, or an infinite difference (then err is
  // infinite; nearest never is NaN: min returns its second operand for a NaN).
  const __mmask16 undecided = static_cast<__mmask16>(~on_axis & _mm512_cmp_ps_mask(nearest, err, _CMP_LE_OQ));
  const __mmask16 redo = (ambiguous | rescale | undecided) & m_valid;
  if (redo != 0 && !(kFloatInput && bad != 0)) {  // rare: the scalar rules, lane by lane
    alignas(64) float s_row[16], s_col[16], s_mag[16];
    alignas(64) int32_t s_bin[16], s_win[16];
    _mm512_store_ps(s_row, br);
    _mm512_store_ps(s_col, bc);
    _mm512_store_ps(s_mag, mag);
    _mm512_store_epi32(s_bin, bin);
    _mm512_store_epi32(s_win, win);
    if (!redo_lanes<scalar_t, grad_t>(img, c, y, x0, redo, ambiguous, s_row, s_col, s_mag, s_bin, s_win)) bad = 1;
    br = _mm512_load_ps(s_row);
    bc = _mm512_load_ps(s_col);
    mag = _mm512_load_ps(s_mag);
    bin = _mm512_load_epi32(s_bin);
    win = _mm512_load_epi32(s_win);
  }
  return Pixels16{br, bc, _mm512_maskz_mov_ps(m_valid, mag), bin, win};
}

// Lane masks of the 16 columns x0 .. x0 + 15: covered (x < n_cols), and with a column
// difference (0 < x < W - 1).
MTSEG_AVX512 inline void column_masks(int64_t x0, int64_t n_cols, int64_t width, __mmask16& m_valid, __mmask16& m_col) {
  const __m512i xs = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(x0)),
                                      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  m_valid = _mm512_cmplt_epi32_mask(xs, _mm512_set1_epi32(static_cast<int32_t>(n_cols)));
  m_col = m_valid & _mm512_cmpgt_epi32_mask(xs, _mm512_setzero_si512()) &
          _mm512_cmplt_epi32_mask(xs, _mm512_set1_epi32(static_cast<int32_t>(width - 1)));
}

// Non-finite values (float input) among those of rows y0 .. y0 + rows - 1 that
// fused_pixels16 does not check: row 0 (never a row below), and the columns no cell covers.
template <typename scalar_t>
MTSEG_AVX512 __mmask16 check_unread(const scalar_t* img, const FusedContext& c, int64_t y0, int64_t rows) {
  __mmask16 bad = 0;
  if constexpr (std::is_same_v<scalar_t, float>) {
    for (int64_t k = 0; k < c.channels; ++k) {
      if (y0 == 0)
        for (int64_t x0 = 0; x0 < c.n_cols; x0 += 16) {
          const __mmask16 m = _mm512_cmplt_epi32_mask(
              _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(x0)),
                               _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)),
              _mm512_set1_epi32(static_cast<int32_t>(c.n_cols)));
          bad |= _mm512_fpclass_ps_mask(load16(img + k * c.stride_c + x0, m), 0x99);
        }
      for (int64_t y = y0; y < y0 + rows; ++y)
        for (int64_t x = c.n_cols; x < c.width; ++x) {
          const float v = static_cast<float>(img[k * c.stride_c + y * c.stride_h + x]);
          if (!(v - v == 0.0f)) bad = 1;
        }
    }
  }
  return bad;
}

// write_cells for the fused pass, the same double sums in the same order, eight at a
// time: `column_sums` (n x n_cols, n_cols = n_cells_col x cell_cols) is read as a
// (n n_cells_col) x cell_cols matrix whose row j = o n_cells_col + c holds the columns
// of cell c, bin o; lane l of a vector sums row j0 + l along its columns (a gather per
// column), then divides by the area as cell_mean does. `means`: n n_cells_col floats.
// Needs n x n_cols < 2^31 (int32 gather indices).
MTSEG_AVX512 void write_cells_fused(const float* column_sums, const CellGeometry& g, float* means, float* out) {
  const int64_t n = g.orientations, n_cells = g.n_cells_col, rows = n * n_cells, cols = g.cell_cols;
  const __m512d area = _mm512_set1_pd(static_cast<double>(g.area()));
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t j0 = 0; j0 < rows; j0 += 8) {
    const __mmask8 m = rows - j0 >= 8 ? __mmask8(0xff) : static_cast<__mmask8>((1u << (rows - j0)) - 1);
    __m256i at = _mm256_mullo_epi32(_mm256_add_epi32(_mm256_set1_epi32(static_cast<int32_t>(j0)), lane),
                                    _mm256_set1_epi32(static_cast<int32_t>(cols)));
    __m512d total = _mm512_setzero_pd();
    for (int64_t x = 0; x < cols; ++x, at = _mm256_add_epi32(at, _mm256_set1_epi32(1)))
      total = _mm512_add_pd(
          total, _mm512_cvtps_pd(_mm256_mmask_i32gather_ps(_mm256_setzero_ps(), m, at, column_sums, 4)));
    _mm256_mask_storeu_ps(means + j0, m, _mm512_cvtpd_ps(_mm512_div_pd(total, area)));
  }
  for (int64_t c = 0; c < n_cells; ++c)
    for (int64_t o = 0; o < n; ++o) out[c * n + o] = means[o * n_cells + c];
}

// One cell row (image rows y0 .. y0 + cell_rows - 1) of one image: `column_sums` (n x
// n_cols) receives the per-column, per-bin sums of the magnitudes, 16 columns at a time
// with the pixel rows as the inner loop, so that the sums stay in registers (N = 6, 9;
// in `acc`, 16 n floats, for other n). Returns false if a value read is not finite.
template <typename scalar_t, typename grad_t, int N>
MTSEG_AVX512 bool fused_cell_row(const scalar_t* img, FusedContext& c, int64_t y0, int64_t cell_rows, float* acc,
                                 float* column_sums) {
  __m512 acc_reg[N > 0 ? N : 1];
  __mmask16 bad = check_unread(img, c, y0, cell_rows);
  for (int64_t x0 = 0; x0 < c.n_cols; x0 += 16) {
    __mmask16 m_valid, m_col;
    column_masks(x0, c.n_cols, c.width, m_valid, m_col);
    if constexpr (N > 0) {
#pragma GCC unroll 16
      for (int o = 0; o < N; ++o) acc_reg[o] = _mm512_setzero_ps();
    } else {
      for (int64_t o = 0; o < c.n; ++o) _mm512_storeu_ps(acc + 16 * o, _mm512_setzero_ps());
    }
    for (int64_t y = y0; y < y0 + cell_rows; ++y) {
      const Pixels16 px = fused_pixels16<scalar_t, grad_t, N, false>(img, c, y, x0, m_valid, m_col, bad);
      if constexpr (N > 0) {
#pragma GCC unroll 16
        for (int o = 0; o < N; ++o)
          acc_reg[o] = _mm512_mask_add_ps(acc_reg[o], _mm512_cmpeq_epi32_mask(px.bin, _mm512_set1_epi32(o)),
                                          acc_reg[o], px.mag);
      } else {
        for (int64_t o = 0; o < c.n; ++o) {
          const __mmask16 in_bin = _mm512_cmpeq_epi32_mask(px.bin, _mm512_set1_epi32(static_cast<int32_t>(o)));
          const __m512 a = _mm512_loadu_ps(acc + 16 * o);
          _mm512_storeu_ps(acc + 16 * o, _mm512_mask_add_ps(a, in_bin, a, px.mag));
        }
      }
    }
    if constexpr (N > 0) {
#pragma GCC unroll 16
      for (int o = 0; o < N; ++o) _mm512_mask_storeu_ps(column_sums + o * c.n_cols + x0, m_valid, acc_reg[o]);
    } else {
      for (int64_t o = 0; o < c.n; ++o)
        _mm512_mask_storeu_ps(column_sums + o * c.n_cols + x0, m_valid, _mm512_loadu_ps(acc + 16 * o));
    }
  }
  return bad == 0;
}

// Pass 1 of the cells backward (see cells_backward_kernel) for one cell row, from the
// pixels of fused_pixels16: per covered pixel, G = grad_cells[cell, bin] / area and
// hog.h's stencil_gradient, (G g_row / mag, G g_col / mag) and the winning channel, in
// the same double operations as the row loops (so both give the same bits), 8 lanes at
// a time. `grad_cells` is the cell row's (n_cells_col, n) slice, `cell_base[x]` =
// (x / cell_cols) n; d_row, d_col, channel point at the image's (H, W) planes.
template <typename scalar_t, typename grad_t, int N>
MTSEG_AVX512 bool fused_backward_cell_row(const scalar_t* img, FusedContext& c, int64_t y0, int64_t cell_rows,
                                          const int32_t* cell_base, const float* grad_cells, int64_t area,
                                          float* d_row, float* d_col, int32_t* channel) {
  // Dividing by a power of two and multiplying by its exact inverse round alike.
  const bool area_pow2 = (area & (area - 1)) == 0;
  const __m512d area_d = _mm512_set1_pd(static_cast<double>(area)), inv_area = _mm512_set1_pd(1.0 / static_cast<double>(area));
  const __m512d zero_d = _mm512_setzero_pd();
  __mmask16 bad = check_unread(img, c, y0, cell_rows);
  for (int64_t x0 = 0; x0 < c.n_cols; x0 += 16) {
    __mmask16 m_valid, m_col;
    column_masks(x0, c.n_cols, c.width, m_valid, m_col);
    const __m512i base = _mm512_maskz_loadu_epi32(m_valid, cell_base + x0);
    for (int64_t y = y0; y < y0 + cell_rows; ++y) {
      const Pixels16 px = fused_pixels16<scalar_t, grad_t, N, true>(img, c, y, x0, m_valid, m_col, bad);
      const __m512 g = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m_valid, _mm512_add_epi32(base, px.bin),
                                                grad_cells, 4);
      __m256 out_r[2], out_c[2];
      for (int h = 0; h < 2; ++h) {
        __m512d gd = half_to_double(g, h);
        gd = area_pow2 ? _mm512_mul_pd(gd, inv_area) : _mm512_div_pd(gd, area_d);
        const __m512d md = half_to_double(px.mag, h);
        // stencil_gradient: 0 unless mag > 0 and G != 0 (a NaN G passes, as there)
        const __mmask8 keep = _mm512_cmp_pd_mask(md, zero_d, _CMP_GT_OQ) & _mm512_cmp_pd_mask(gd, zero_d, _CMP_NEQ_UQ);
        out_r[h] = _mm512_cvtpd_ps(_mm512_maskz_div_pd(keep, _mm512_mul_pd(gd, half_to_double(px.g_row, h)), md));
        out_c[h] = _mm512_cvtpd_ps(_mm512_maskz_div_pd(keep, _mm512_mul_pd(gd, half_to_double(px.g_col, h)), md));
      }
      const int64_t at = y * c.width + x0;
      _mm512_mask_storeu_ps(d_row + at, m_valid, _mm512_insertf32x8(_mm512_castps256_ps512(out_r[0]), out_r[1], 1));
      _mm512_mask_storeu_ps(d_col + at, m_valid, _mm512_insertf32x8(_mm512_castps256_ps512(out_c[0]), out_c[1], 1));
      _mm512_mask_storeu_epi32(channel + at, m_valid, px.winner);
    }
  }
  return bad == 0;
}
// transpose_stencil_row for float gradients, 16 columns at a time with lane masks for
// the borders and the last partial vector (no scalar remainder): the same adds in the
// same order, so the same bits.
MTSEG_AVX512 void transpose_stencil_row16(const float* d_row, const float* d_col, const int32_t* channel, int64_t H,
                                          int64_t W, int32_t k, int64_t y, float* out) {
  const float* du = d_row + (y > 0 ? y - 1 : y) * W;
  const int32_t* cu = channel + (y > 0 ? y - 1 : y) * W;
  const float* dd = d_row + (y + 1 < H ? y + 1 : y) * W;
  const int32_t* cd = channel + (y + 1 < H ? y + 1 : y) * W;
  const float* dc = d_col + y * W;
  const int32_t* cc = channel + y * W;
  const __m512i kk = _mm512_set1_epi32(k), k_above = _mm512_set1_epi32(y > 0 ? k : -1),
                k_below = _mm512_set1_epi32(y + 1 < H ? k : -1);
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t x0 = 0; x0 < W; x0 += 16) {
    const __m512i xs = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(x0)), lane);
    const __mmask16 m = _mm512_cmplt_epi32_mask(xs, _mm512_set1_epi32(static_cast<int32_t>(W)));
    const __mmask16 m_left = m & _mm512_cmpgt_epi32_mask(xs, _mm512_setzero_si512());
    const __mmask16 m_right = _mm512_cmplt_epi32_mask(xs, _mm512_set1_epi32(static_cast<int32_t>(W - 1)));
    __m512 v = _mm512_setzero_ps();
    const __mmask16 a = _mm512_mask_cmpeq_epi32_mask(m, _mm512_maskz_loadu_epi32(m, cu + x0), k_above);
    v = _mm512_mask_add_ps(v, a, v, _mm512_maskz_loadu_ps(a, du + x0));
    const __mmask16 b = _mm512_mask_cmpeq_epi32_mask(m, _mm512_maskz_loadu_epi32(m, cd + x0), k_below);
    v = _mm512_mask_sub_ps(v, b, v, _mm512_maskz_loadu_ps(b, dd + x0));
    const __mmask16 l = _mm512_mask_cmpeq_epi32_mask(m_left, _mm512_maskz_loadu_epi32(m_left, cc + x0 - 1), kk);
    v = _mm512_mask_add_ps(v, l, v, _mm512_maskz_loadu_ps(l, dc + x0 - 1));
    const __mmask16 r = _mm512_mask_cmpeq_epi32_mask(m_right, _mm512_maskz_loadu_epi32(m_right, cc + x0 + 1), kk);
    v = _mm512_mask_sub_ps(v, r, v, _mm512_maskz_loadu_ps(r, dc + x0 + 1));
    _mm512_mask_storeu_ps(out + x0, m, v);
  }
}

// ---------------------------------------------------------------------------------
// The fused cells pass on CPUs with AVX2 but no AVX-512: 8 columns at a time, the same
// rules in the same float operations as fused_pixels16 and the row loops, so again the
// very same cells. Lane masks are vectors; the loads at the image's first and last
// columns and in a partial last vector are put together in registers. The cells
// backward keeps the row loops on these CPUs.
// ---------------------------------------------------------------------------------
#define MTSEG_AVX2 __attribute__((target("avx2")))

// p[lo .. hi) in lanes lo .. hi - 1, 0 in the other lanes, which are not read: floats,
// or uint8 as int32 (differences are taken in int32, as in fused_pixels16). A partial
// vector is put together in registers (a masked load for float, the bytes shifted into
// one integer for uint8): building it in memory and loading it back would stall on
// store forwarding, at every image border.
MTSEG_AVX2 MTSEG_ALWAYS_INLINE __m256 load8(const float* p, int lo, int hi) {
  if (lo == 0 && hi == 8) return _mm256_loadu_ps(p);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i in = _mm256_and_si256(_mm256_cmpgt_epi32(lane, _mm256_set1_epi32(lo - 1)),
                                      _mm256_cmpgt_epi32(_mm256_set1_epi32(hi), lane));
  return _mm256_maskload_ps(p, in);
}
// (For uint8 a partial vector is one 8-byte load inside the row [begin, end) that p
// points into, shifted into place and masked; byte by byte only in rows under 8 bytes.)
MTSEG_AVX2 MTSEG_ALWAYS_INLINE __m256i load8(const uint8_t* p, int lo, int hi, const uint8_t* begin,
                                             const uint8_t* end) {
  uint64_t bytes = 0;
  if (lo == 0 && hi == 8) {
    std::memcpy(&bytes, p, 8);
  } else if (lo < hi) {
    const int64_t before = p - begin, room = end - p;
    if (lo + 8 <= room) {  // bytes p[lo .. lo + 8) to lanes lo ..
      std::memcpy(&bytes, p + lo, 8);
      bytes <<= 8 * lo;
    } else if (before + hi - 8 >= 0) {  // bytes p[hi - 8 .. hi) to lanes .. hi - 1
      std::memcpy(&bytes, p + hi - 8, 8);
      bytes >>= 8 * (8 - hi);
    } else {
      for (int l = lo; l < hi; ++l) bytes |= static_cast<uint64_t>(p[l]) << (8 * l);
    }
    bytes &= (hi == 8 ? ~uint64_t(0) : (uint64_t(1) << (8 * hi)) - 1) & (~uint64_t(0) << (8 * lo));
  }
  return _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<int64_t>(bytes)));
}
// float rows need no bounds: the masked load reads nothing outside [lo, hi).
MTSEG_AVX2 MTSEG_ALWAYS_INLINE __m256 load8(const float* p, int lo, int hi, const float*, const float*) {
  return load8(p, lo, hi);
}
MTSEG_AVX2 MTSEG_ALWAYS_INLINE __m256 sub8(__m256 a, __m256 b) { return _mm256_sub_ps(a, b); }
MTSEG_AVX2 MTSEG_ALWAYS_INLINE __m256 sub8(__m256i a, __m256i b) {
  return _mm256_cvtepi32_ps(_mm256_sub_epi32(a, b));  // exact: |a - b| <= 255
}

MTSEG_AVX2 inline __m256 abs8(__m256 v) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v); }
MTSEG_AVX2 inline uint32_t bits8(__m256 m) { return static_cast<uint32_t>(_mm256_movemask_ps(m)); }
MTSEG_AVX2 inline __m256 as_mask8(uint32_t bits) {
  const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256i b = _mm256_and_si256(_mm256_set1_epi32(static_cast<int32_t>(bits)), lane_bit);
  return _mm256_castsi256_ps(_mm256_cmpeq_epi32(b, lane_bit));
}

// Lanes 4 h .. 4 h + 3 of v in double.
MTSEG_AVX2 inline __m256d half_to_double4(__m256 v, int h) {
  return _mm256_cvtps_pd(h == 0 ? _mm256_castps256_ps128(v) : _mm256_extractf128_ps(v, 1));
}

// key_greater8 on AVX2: of 8 float lanes, in two halves of 4 double lanes, those where
// the new channel's key is larger (bit l for lane l), by the same tests.
MTSEG_AVX2 inline uint32_t key_greater8_avx2(__m256 r, __m256 c, __m256 br, __m256 bc) {
  uint32_t out = 0;
  for (int h = 0; h < 2; ++h) {
    const __m256d nr = half_to_double4(r, h), nc = half_to_double4(c, h), pr = half_to_double4(br, h),
                  pc = half_to_double4(bc, h);
    const __m256d s_new = _mm256_add_pd(_mm256_mul_pd(nr, nr), _mm256_mul_pd(nc, nc));
    const __m256d s_best = _mm256_add_pd(_mm256_mul_pd(pr, pr), _mm256_mul_pd(pc, pc));
    const __m256d lo = _mm256_min_pd(s_new, s_best), hi = _mm256_max_pd(s_new, s_best);
    const __m256d apart = _mm256_and_pd(
        _mm256_and_pd(_mm256_cmp_pd(hi, _mm256_mul_pd(lo, _mm256_set1_pd(1.0 + 0x1p-22 + 0x1p-40)), _CMP_GT_OQ),
                      _mm256_cmp_pd(lo, _mm256_set1_pd(0x1p-250), _CMP_GE_OQ)),
        _mm256_cmp_pd(hi, _mm256_set1_pd(0x1p254), _CMP_LT_OQ));
    const __m128 k_new = _mm256_cvtpd_ps(_mm256_sqrt_pd(s_new)), k_best = _mm256_cvtpd_ps(_mm256_sqrt_pd(s_best));
    const uint32_t apart_bits = static_cast<uint32_t>(_mm256_movemask_pd(apart));
    const uint32_t by_sum = static_cast<uint32_t>(_mm256_movemask_pd(_mm256_cmp_pd(s_new, s_best, _CMP_GT_OQ)));
    const uint32_t by_key = static_cast<uint32_t>(_mm_movemask_ps(_mm_cmp_ps(k_new, k_best, _CMP_GT_OQ)));
    out |= ((by_sum & apart_bits) | (by_key & ~apart_bits & 0xfu)) << (4 * h);
  }
  return out;
}

// The 8 pixels (y, x0 .. x0 + 7) of one pixel row: the winning channel's magnitude (0
// outside the covered columns) and bin. Columns x0 + l, l < n_valid, are covered; those
// with l in [col_lo, col_hi) have a column difference. `bad`: a non-finite value read
// in row y + 1 (float input), as in fused_pixels16.
struct Pixels8 {
  __m256 mag;
  __m256i bin;
};

// kC: the number of channels when known at compile time (3), else 0. kInner: the caller
// knows that all 8 pixels have both neighbours in the row and in the column (most do),
// so that every load is a full one, with no test.
template <typename scalar_t, typename grad_t, int N, int kC, bool kInner>
MTSEG_AVX2 MTSEG_ALWAYS_INLINE Pixels8 fused_pixels8(const scalar_t* img, FusedContext& c, int64_t y, int64_t x0,
                                                     int n_valid, int col_lo, int col_hi, bool& bad) {
  constexpr bool kFloatInput = std::is_same_v<scalar_t, float>;
  using B = EdgeBound<float>;
  const __m256 zero = _mm256_setzero_ps();
  if constexpr (kInner) n_valid = 8, col_lo = 0, col_hi = 8;
  const bool row_inside = kInner || (y > 0 && y < c.height - 1), has_below = kInner || y + 1 < c.height;
  const uint32_t valid = (1u << n_valid) - 1;
  __m256 best = zero, br = zero, bc = zero;
  uint32_t ambiguous = 0;  // lanes whose channel choice is redone
  __m256 nan_sum = zero;   // float input: NaN where row y + 1 holds a non-finite value
  const int64_t channels = kC > 0 ? kC : c.channels, stride_c = c.stride_c, stride_h = c.stride_h;
  const int64_t prefetch_offset = c.prefetch_offset;
  const int64_t width = c.width;
#pragma GCC unroll 4
  for (int64_t k = 0; k < channels; ++k) {
    const scalar_t* row = img + k * stride_c + y * stride_h;  // row y of channel k, `width` values
    const scalar_t* mid = row + x0;
    __m256 gr = zero;
    if (has_below) {
      const auto up = load8(mid + stride_h, 0, n_valid, row + stride_h, row + stride_h + width);
      if constexpr (kFloatInput) nan_sum = _mm256_add_ps(nan_sum, _mm256_sub_ps(up, up));  // NaN iff inf or NaN
      if (row_inside) gr = sub8(up, load8(mid - stride_h, 0, n_valid, row - stride_h, row - stride_h + width));
    }
    const __m256 gc =
        sub8(load8(mid + 1, col_lo, col_hi, row, row + width), load8(mid - 1, col_lo, col_hi, row, row + width));
    _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(mid) + prefetch_offset), _MM_HINT_T1);
    const __m256 sq = _mm256_add_ps(_mm256_mul_ps(gr, gr), _mm256_mul_ps(gc, gc));
    if (k == 0) {
      best = sq, br = gr, bc = gc;
      continue;
    }
    __m256 take = _mm256_cmp_ps(sq, best, _CMP_GT_OQ);  // strict: the lowest channel keeps a tie
    if constexpr (kFloatInput) {
      // Squares within kNearTieUlps: skimage's keys decide (key_greater8_avx2), unless
      // the components are the same up to sign and order (an exact tie).
      const __m256i ulps = _mm256_abs_epi32(_mm256_sub_epi32(_mm256_castps_si256(sq), _mm256_castps_si256(best)));
      const __m256 near = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(kNearTieUlps + 1), ulps));
      if (bits8(near) != 0) {
        const __m256 agr = abs8(gr), agc = abs8(gc), abr = abs8(br), abc = abs8(bc);
        const __m256 same =
            _mm256_or_ps(_mm256_and_ps(_mm256_cmp_ps(agr, abr, _CMP_EQ_OQ), _mm256_cmp_ps(agc, abc, _CMP_EQ_OQ)),
                         _mm256_and_ps(_mm256_cmp_ps(agr, abc, _CMP_EQ_OQ), _mm256_cmp_ps(agc, abr, _CMP_EQ_OQ)));
        const uint32_t flagged = bits8(_mm256_andnot_ps(same, near)) & valid;
        if (flagged != 0) {
          const uint32_t greater = key_greater8_avx2(gr, gc, br, bc);
          take = as_mask8((bits8(take) & ~flagged) | (greater & flagged));
        }
      }
    } else {
      // uint8: equal squares with different |g_row g_col| (see fused_pixels16); equal
      // zero squares have the same (zero) components.
      const __m256 tie = _mm256_andnot_ps(_mm256_cmp_ps(sq, zero, _CMP_EQ_OQ), _mm256_cmp_ps(sq, best, _CMP_EQ_OQ));
      if (bits8(tie) != 0) {
        const __m256 same = _mm256_cmp_ps(abs8(_mm256_mul_ps(gr, gc)), abs8(_mm256_mul_ps(br, bc)), _CMP_EQ_OQ);
        ambiguous |= bits8(_mm256_andnot_ps(same, tie));
      }
    }
    best = _mm256_blendv_ps(best, sq, take);
    br = _mm256_blendv_ps(br, gr, take);
    bc = _mm256_blendv_ps(bc, gc, take);
  }
  if constexpr (kFloatInput) bad |= bits8(_mm256_cmp_ps(nan_sum, nan_sum, _CMP_UNORD_Q)) != 0;
  ambiguous &= valid;
  __m256 mag = _mm256_sqrt_ps(best);
  uint32_t rescale = 0;
  if constexpr (kFloatInput) {  // uint8 squares are 0 or integers in [1, 2 x 255^2]
    const __m256 nonzero = _mm256_or_ps(_mm256_cmp_ps(br, zero, _CMP_NEQ_UQ), _mm256_cmp_ps(bc, zero, _CMP_NEQ_UQ));
    const __m256 inside = _mm256_and_ps(_mm256_cmp_ps(best, _mm256_set1_ps(B::sq_lo), _CMP_GE_OQ),
                                        _mm256_cmp_ps(best, _mm256_set1_ps(B::sq_hi), _CMP_LE_OQ));
    rescale = bits8(_mm256_andnot_ps(inside, nonzero));
  }
  // Bins as in fused_pixels16 (which see), in the same float operations.
  const __m256 ar = abs8(br), ac = abs8(bc);
  const __m256 err =
      _mm256_add_ps(_mm256_mul_ps(_mm256_add_ps(ar, ac), _mm256_set1_ps(B::coef)), _mm256_set1_ps(B::tiny));
  __m256i bin = _mm256_setzero_si256();  // counts edges passed: a true compare is -1
  __m256 nearest = _mm256_set1_ps(std::numeric_limits<float>::infinity());
  if constexpr (N > 0) {
    static_assert(N % 4 != 0, "the fold needs the 45 and 135 degree edges absent");
    constexpr int kBelow90 = (N - 1) / 2;
#pragma GCC unroll 8
    for (int i = 0; i < kBelow90; ++i) {
      const __m256 d = _mm256_sub_ps(_mm256_mul_ps(ar, _mm256_set1_ps(c.E.cos_phi[i])),
                                     _mm256_mul_ps(ac, _mm256_set1_ps(c.E.sin_phi[i])));
      bin = _mm256_sub_epi32(bin, _mm256_castps_si256(_mm256_cmp_ps(d, zero, _CMP_GT_OQ)));
      nearest = _mm256_min_ps(abs8(d), nearest);
    }
    const __m256 col_zero = _mm256_cmp_ps(bc, zero, _CMP_EQ_OQ);
    const __m256 incl90 = (N % 2 == 0 && c.E.inclusive[N / 2 - 1]) ? as_mask8(0xff) : zero;
    const __m256 opposite = _mm256_castsi256_ps(_mm256_srai_epi32(_mm256_castps_si256(_mm256_xor_ps(br, bc)), 31));
    const __m256 mirror = _mm256_or_ps(_mm256_andnot_ps(col_zero, opposite), _mm256_and_ps(col_zero, incl90));
    bin = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(bin),
                                               _mm256_castsi256_ps(_mm256_sub_epi32(_mm256_set1_epi32(N - 1), bin)),
                                               mirror));
  } else {
    const __m256 flip = _mm256_cmp_ps(br, zero, _CMP_LT_OQ);
    const __m256 uc = _mm256_blendv_ps(bc, _mm256_sub_ps(zero, bc), flip);
    for (int64_t i = 0; i < c.n - 1; ++i) {
      const __m256 d = _mm256_sub_ps(_mm256_mul_ps(ar, _mm256_set1_ps(c.E.cos_phi[i])),
                                     _mm256_mul_ps(uc, _mm256_set1_ps(c.E.sin_phi[i])));
      if (c.E.exact[i]) {
        const __m256 past = c.E.inclusive[i] ? _mm256_cmp_ps(d, zero, _CMP_GE_OQ) : _mm256_cmp_ps(d, zero, _CMP_GT_OQ);
        bin = _mm256_sub_epi32(bin, _mm256_castps_si256(past));
      } else {
        bin = _mm256_sub_epi32(bin, _mm256_castps_si256(_mm256_cmp_ps(d, zero, _CMP_GT_OQ)));
        nearest = _mm256_min_ps(abs8(d), nearest);
      }
    }
  }
  const __m256 on_axis = _mm256_cmp_ps(br, zero, _CMP_EQ_OQ);
  bin = _mm256_andnot_si256(_mm256_castps_si256(on_axis), bin);
  const uint32_t undecided = bits8(_mm256_andnot_ps(on_axis, _mm256_cmp_ps(nearest, err, _CMP_LE_OQ)));
  const uint32_t redo = (ambiguous | rescale | undecided) & valid;
  if (redo != 0 && !(kFloatInput && bad)) {
    alignas(32) float s_row[8], s_col[8], s_mag[8];
    alignas(32) int32_t s_bin[8], s_win[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    _mm256_store_ps(s_row, br);
    _mm256_store_ps(s_col, bc);
    _mm256_store_ps(s_mag, mag);
    _mm256_store_si256(reinterpret_cast<__m256i*>(s_bin), bin);
    if (!redo_lanes<scalar_t, grad_t>(img, c, y, x0, redo, ambiguous, s_row, s_col, s_mag, s_bin, s_win)) bad = true;
    mag = _mm256_load_ps(s_mag);
    bin = _mm256_load_si256(reinterpret_cast<const __m256i*>(s_bin));
  }
  return Pixels8{_mm256_and_ps(mag, as_mask8(valid)), bin};
}

// fused_cell_row on AVX2 (same contract), 8 columns at a time.
template <typename scalar_t, typename grad_t, int N, int kC>
MTSEG_AVX2 bool fused_cell_row_avx2(const scalar_t* img, FusedContext& c, int64_t y0, int64_t cell_rows, float* acc,
                                    float* column_sums) {
  bool bad = false;
  if constexpr (std::is_same_v<scalar_t, float>) {  // what fused_pixels8 does not read as a row below
    for (int64_t k = 0; k < c.channels; ++k)
      for (int64_t y = y0; y < y0 + cell_rows; ++y) {
        const float* row = img + k * c.stride_c + y * c.stride_h;
        for (int64_t x = y == 0 ? 0 : c.n_cols; x < c.width; ++x) bad |= !(row[x] - row[x] == 0.0f);
      }
  }
  __m256 acc_reg[N > 0 ? N : 1];
  for (int64_t x0 = 0; x0 < c.n_cols; x0 += 8) {
    const int n_valid = static_cast<int>(std::min<int64_t>(8, c.n_cols - x0));
    const int col_lo = x0 == 0 ? 1 : 0;
    const int col_hi = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(n_valid, c.width - 1 - x0)));
    if constexpr (N > 0) {
#pragma GCC unroll 16
      for (int o = 0; o < N; ++o) acc_reg[o] = _mm256_setzero_ps();
    } else {
      std::fill(acc, acc + 8 * c.n, 0.0f);
    }
    const bool inner_columns = n_valid == 8 && col_lo == 0 && col_hi == 8;
    for (int64_t y = y0; y < y0 + cell_rows; ++y) {
      const Pixels8 px = inner_columns && y > 0 && y < c.height - 1
                             ? fused_pixels8<scalar_t, grad_t, N, kC, true>(img, c, y, x0, 8, 0, 8, bad)
                             : fused_pixels8<scalar_t, grad_t, N, kC, false>(img, c, y, x0, n_valid, col_lo,
                                                                             col_hi, bad);
      // A pixel adds its magnitude to its bin and +0 to the others (exact: the sums are >= +0).
      if constexpr (N > 0) {
#pragma GCC unroll 16
        for (int o = 0; o < N; ++o)
          acc_reg[o] = _mm256_add_ps(acc_reg[o], _mm256_and_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(
                                                                  px.bin, _mm256_set1_epi32(o))),
                                                              px.mag));
      } else {
        for (int64_t o = 0; o < c.n; ++o) {
          const __m256 in_bin =
              _mm256_castsi256_ps(_mm256_cmpeq_epi32(px.bin, _mm256_set1_epi32(static_cast<int32_t>(o))));
          _mm256_storeu_ps(acc + 8 * o, _mm256_add_ps(_mm256_loadu_ps(acc + 8 * o), _mm256_and_ps(in_bin, px.mag)));
        }
      }
    }
    const __m256i store = _mm256_castps_si256(as_mask8((1u << n_valid) - 1));
    if constexpr (N > 0) {
#pragma GCC unroll 16
      for (int o = 0; o < N; ++o) _mm256_maskstore_ps(column_sums + o * c.n_cols + x0, store, acc_reg[o]);
    } else {
      for (int64_t o = 0; o < c.n; ++o)
        _mm256_maskstore_ps(column_sums + o * c.n_cols + x0, store, _mm256_loadu_ps(acc + 8 * o));
    }
  }
  return !bad;
}
#endif  // fused pass

// Calls f(scalar_t{}, T{}, grad_t{}, cell_t{}) with the CPU kernels' types for an
// image dtype: T is the working type of the row buffers (see the comment on top of the
// cells section), grad_t and cell_t as in dispatch_image_types.
template <typename F>
void dispatch_working_types(at::ScalarType dtype, bool transform_sqrt, F&& f) {
  switch (dtype) {
    case at::kFloat: return f(float{}, float{}, float{}, float{});
    case at::kHalf: return f(at::Half{}, float{}, float{}, float{});
    case at::kBFloat16: return f(at::BFloat16{}, float{}, float{}, float{});
    case at::kDouble: return f(double{}, double{}, double{}, double{});
    case at::kByte:  // exact integer differences in float, unless the sqrt makes them irrational
      return transform_sqrt ? f(uint8_t{}, double{}, double{}, float{}) : f(uint8_t{}, float{}, double{}, float{});
    default: TORCH_CHECK_TYPE(false, "hog: unsupported image dtype ", dtype);
  }
}

// One cell row of cells from the per-bin column sums (n x n_cols) of its pixel rows.
// Each cell adds its columns' sums in double, in column order; the loop runs the n x
// n_cells_col sums side by side (`totals`, one per cell and bin), so that they are
// independent adds rather than one chain of cell_cols dependent ones per cell.
template <typename T, typename cell_t>
MTSEG_ALWAYS_INLINE void write_cells_impl(const T* column_sums, const CellGeometry& g, int64_t n_cols, double* totals,
                                          cell_t* out) {
  const int64_t n = g.orientations, n_cells = g.n_cells_col;
  std::fill(totals, totals + n * n_cells, 0.0);
  for (int64_t x = 0; x < g.cell_cols; ++x)
    for (int64_t o = 0; o < n; ++o) {
      const T* sums = column_sums + o * n_cols + x;
      double* tot = totals + o * n_cells;
      for (int64_t cc = 0; cc < n_cells; ++cc) tot[cc] += static_cast<double>(sums[cc * g.cell_cols]);
    }
  for (int64_t cc = 0; cc < n_cells; ++cc)
    for (int64_t o = 0; o < n; ++o) out[cc * n + o] = cell_mean<cell_t>(totals[o * n_cells + cc], g.area());
}
MTSEG_CPU_CLONES void write_cells(const float* column_sums, const CellGeometry& g, int64_t n_cols, double* totals,
                                  float* out) {
  write_cells_impl(column_sums, g, n_cols, totals, out);
}
MTSEG_CPU_CLONES void write_cells(const double* column_sums, const CellGeometry& g, int64_t n_cols, double* totals,
                                  float* out) {
  write_cells_impl(column_sums, g, n_cols, totals, out);
}
MTSEG_CPU_CLONES void write_cells(const double* column_sums, const CellGeometry& g, int64_t n_cols, double* totals,
                                  double* out) {
  write_cells_impl(column_sums, g, n_cols, totals, out);
}

// The fused pass (see above) cells_kernel takes for these images, if any.
template <typename scalar_t, typename T>
FusedPass fused_pass_for(const at::Tensor& images, const CellGeometry& g, bool transform_sqrt) {
#ifdef MTSEG_HOG_FUSED
  constexpr bool types_ok =
      std::is_same_v<T, float> && (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, uint8_t>);
  // Lane column indices are int32.
  if (types_ok && !transform_sqrt && images.stride(3) == 1 && g.width < (int64_t(1) << 30))
    return fused_pass_selected();
#else
  (void)images, (void)g, (void)transform_sqrt;
#endif
  return FusedPass::kNone;
}

// T: working type of the row buffers; grad_t: hog.h's gradient type for this image
// dtype (the exact rule the flagged pixels are redone with); cell_t: output type.
template <typename scalar_t, typename T, typename grad_t, typename cell_t>
void cells_kernel(const at::Tensor& images, const CellGeometry& g, bool transform_sqrt, cell_t* cells) {
  const int64_t n = g.orientations, W = g.width, C = g.channels;
  const int64_t n_cols = g.n_cells_col * g.cell_cols, buf_rows = g.cell_rows + 2, row_stride = W + 2;
  const auto edges = orientation_edges(n);
  const EdgeLanes<T> lanes(edges);
  std::atomic<bool> all_valid{true};
  const FusedPass pass = fused_pass_for<scalar_t, T>(images, g, transform_sqrt);
  const bool fused = pass != FusedPass::kNone;
#ifdef MTSEG_HOG_FUSED
  const FusedEdges fused_edges(edges);
#endif
  at::parallel_for(0, g.batch * g.n_cells_row, grain_for(g.cell_rows * g.width), [&](int64_t begin, int64_t end) {
    RowScratch<T> t(fused ? 0 : C, buf_rows, row_stride, n_cols, n, edges, lanes);
    std::vector<float> acc(fused ? 16 * n : 0);
    std::vector<double> totals(n * g.n_cells_col);
    std::vector<float> means(fused ? n * g.n_cells_col : 0);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / g.n_cells_row, cell_row = item % g.n_cells_row;
      const int64_t y0 = cell_row * g.cell_rows;
      const auto img = image_view<scalar_t>(images, b);
#ifdef MTSEG_HOG_FUSED
      if constexpr (std::is_same_v<T, float> && (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, uint8_t>)) {
        if (fused) {
          // The presets' bin counts with the sums in registers, any other n with them in memory.
          const bool wide = pass == FusedPass::kAvx512;
          auto* const row_fn = wide ? (n == 6   ? &fused_cell_row<scalar_t, grad_t, 6>
                                       : n == 9 ? &fused_cell_row<scalar_t, grad_t, 9>
                                                : &fused_cell_row<scalar_t, grad_t, 0>)
                             : C == 3 ? (n == 6   ? &fused_cell_row_avx2<scalar_t, grad_t, 6, 3>
                                         : n == 9 ? &fused_cell_row_avx2<scalar_t, grad_t, 9, 3>
                                                  : &fused_cell_row_avx2<scalar_t, grad_t, 0, 3>)
                                      : (n == 6   ? &fused_cell_row_avx2<scalar_t, grad_t, 6, 0>
                                         : n == 9 ? &fused_cell_row_avx2<scalar_t, grad_t, 9, 0>
                                                  : &fused_cell_row_avx2<scalar_t, grad_t, 0, 0>);
          FusedContext ctx = fused_context(img, g, C, n_cols, n, fused_edges, edges, t);
          if (!row_fn(img.data, ctx, y0, g.cell_rows, acc.data(), t.column_sums.data())) {
            all_valid = false;
            continue;
          }
          cell_t* out = cells + item * g.n_cells_col * n;
          bool written = false;
          if constexpr (std::is_same_v<cell_t, float>) {  // always, for the fused pass's input types
            if (wide && n * n_cols < (int64_t(1) << 31)) {
              write_cells_fused(t.column_sums.data(), g, means.data(), out);
              written = true;
            }
          }
          if (!written) write_cells(t.column_sums.data(), g, n_cols, totals.data(), out);
          ++t.fused_rows;
          continue;
        }
      }
#endif
      if (!load_rows<T>(img, y0, buf_rows, transform_sqrt, t.rows.data())) {
        all_valid = false;
        continue;
      }
      std::fill(t.column_sums.begin(), t.column_sums.end(), T(0));
      for (int64_t y = y0; y < y0 + g.cell_rows; ++y) {
        const T* mid = t.rows.data() + (y - y0 + 1) * row_stride + 1;
        orient_pixel_row<T, grad_t>(t, mid, C, buf_rows * row_stride, row_stride, n_cols, n, t.column_sums.data());
      }
      write_cells(t.column_sums.data(), g, n_cols, totals.data(), cells + item * g.n_cells_col * n);
    }
  });
  TORCH_CHECK_VALUE(all_valid.load(), "hog_cells: images contain NaN or Inf",
                    transform_sqrt ? " or negative values (transform_sqrt needs images >= 0)" : "",
                    "; HOG of such pixels is undefined");
}

at::Tensor hog_cells_cpu(const at::Tensor& images, int64_t orientations, at::IntArrayRef pixels_per_cell,
                         bool transform_sqrt) {
  const int64_t one_cell[2] = {1, 1};
  const auto g = cell_geometry(images, orientations, pixels_per_cell, one_cell, "hog_cells");
  auto cells = at::empty({g.batch, g.n_cells_row, g.n_cells_col, g.orientations},
                         images.options().dtype(cell_dtype(images.scalar_type())));
  if (cells.numel() == 0) return cells;
  // The kernel checks the rows it reads as middle rows (the fused pass) or at all; rows below
  // the last cell row are checked here (the one just below is read, only as a neighbour).
  const int64_t first_unread = g.n_cells_row * g.cell_rows;
  if (first_unread < g.height)
    check_image_values(images.narrow(2, first_unread, g.height - first_unread), transform_sqrt, "hog_cells");
  dispatch_working_types(images.scalar_type(), transform_sqrt, [&](auto scalar, auto working, auto grad, auto cell) {
    using cell_t = decltype(cell);
    cells_kernel<decltype(scalar), decltype(working), decltype(grad)>(images, g, transform_sqrt,
                                                                        cells.data_ptr<cell_t>());
  });
  return cells;
}

// ---------------------------------------------------------------------------------
// Blocks. Pass 1 computes every cell's norm part once (hog.h's cell_norm_part); pass 2
// normalises a row of blocks at a time, each block's norm summed from the cached parts
// in hog.h's order and its values copied contiguously (BlockView::flat), so the bits
// equal hog.h's normalize_block (the CUDA kernels').
// ---------------------------------------------------------------------------------
template <typename cell_t>
void cell_norm_parts(const cell_t* cells, const BlockGeometry& g, BlockNorm norm, double* parts) {
  const int64_t n = g.orientations;
  at::parallel_for(0, g.batch * g.n_cells_row * g.n_cells_col, grain_for(n), [&](int64_t begin, int64_t end) {
    for (int64_t cell = begin; cell < end; ++cell) parts[cell] = cell_norm_part(cells + cell * n, n, norm);
  });
}

// 1 / norm of block (r, c) of the image whose parts start at `parts`.
MTSEG_ALWAYS_INLINE double cached_inv_norm(const double* parts, const BlockGeometry& g, BlockNorm norm, int64_t r,
                                           int64_t c) {
  const double* p = parts + r * g.n_cells_col + c;
  return block_inv_norm(block_norm_sum(g.b_row, g.b_col, [&](int64_t i, int64_t j) { return p[i * g.n_cells_col + j]; }),
                        norm);
}

// Scratch of one thread for a row of blocks: one block copied contiguously as doubles
// (the backward), or the whole row of blocks so copied with their two inverse norms (the
// forward), so that every pass over a block is one flat loop (BlockView::flat) instead
// of b_row short ones.
struct BlockScratch {
  std::vector<double> blocks, inv, inv2;
  BlockScratch(const BlockGeometry& g, bool whole_row)
      : blocks((whole_row ? g.n_blocks_col : 1) * g.block_len()),
        inv(whole_row ? g.n_blocks_col : 0),
        inv2(whole_row ? g.n_blocks_col : 0) {}
};

// Block (r, c) of one image (cells: the image's) copied contiguously in C order, as doubles.
template <typename cell_t>
MTSEG_ALWAYS_INLINE void copy_block(const cell_t* cells, const BlockGeometry& g, int64_t r, int64_t c,
                                    double* block) {
  const int64_t row_len = g.n_cells_col * g.orientations, per_row = g.b_col * g.orientations;
  const cell_t* first = cells + r * row_len + c * g.orientations;
  for (int64_t i = 0; i < g.b_row; ++i)
    for (int64_t k = 0; k < per_row; ++k) block[i * per_row + k] = static_cast<double>(first[i * row_len + k]);
}

// Calls f(c, flat view of block (r, c)) for every block of row r of one image (cells:
// the image's), each block copied into `block` in turn.
template <typename cell_t, typename F>
MTSEG_ALWAYS_INLINE void for_each_flat_block(const cell_t* cells, const BlockGeometry& g, int64_t r, double* block,
                                             F&& f) {
  const BlockView<double> flat{block, g.block_len(), 1, 1, g.block_len()};
  for (int64_t c = 0; c < g.n_blocks_col; ++c) {
    copy_block(cells, g, r, c, block);
    f(c, flat);
  }
}

// Row r of blocks of one image (cells, parts: the image's); out: that row's blocks. In
// three passes over the row (copies and first inverse norms, second inverse norms,
// outputs) rather than block after block: each block's sums, roots and divisions are a
// chain of dependent operations, and only blocks side by side let them overlap.
template <typename cell_t>
MTSEG_ALWAYS_INLINE void blocks_row_impl(const cell_t* cells, const double* parts, const BlockGeometry& g,
                                         BlockNorm norm, int64_t r, BlockScratch& t, cell_t* out) {
  const int64_t len = g.block_len();
  auto flat = [&](int64_t c) MTSEG_LAMBDA_INLINE {
    return BlockView<double>{t.blocks.data() + c * len, len, 1, 1, len};
  };
  for (int64_t c = 0; c < g.n_blocks_col; ++c) {
    copy_block(cells, g, r, c, t.blocks.data() + c * len);
    t.inv[c] = cached_inv_norm(parts, g, norm, r, c);
  }
  for (int64_t c = 0; c < g.n_blocks_col; ++c) t.inv2[c] = block_second_inv(flat(c), norm, t.inv[c]);
  for (int64_t c = 0; c < g.n_blocks_col; ++c) normalize_block_apply(flat(c), norm, t.inv[c], t.inv2[c], out + c * len);
}
MTSEG_CPU_CLONES void blocks_row(const float* cells, const double* parts, const BlockGeometry& g, BlockNorm norm,
                                 int64_t r, BlockScratch& t, float* out) {
  blocks_row_impl(cells, parts, g, norm, r, t, out);
}
MTSEG_CPU_CLONES void blocks_row(const double* cells, const double* parts, const BlockGeometry& g, BlockNorm norm,
                                 int64_t r, BlockScratch& t, double* out) {
  blocks_row_impl(cells, parts, g, norm, r, t, out);
}

// Vector-Jacobian products of row r of blocks (grad_out, grad_blocks: that row's).
template <typename cell_t>
MTSEG_ALWAYS_INLINE void blocks_backward_row_impl(const cell_t* cells, const double* parts, const BlockGeometry& g,
                                                  BlockNorm norm, int64_t r, double* block,
                                                  const cell_t* grad_out, cell_t* grad_blocks) {
  for_each_flat_block(cells, g, r, block, [&](int64_t c, const BlockView<double>& v) MTSEG_LAMBDA_INLINE {
    normalize_block_backward_scaled(v, norm, cached_inv_norm(parts, g, norm, r, c), grad_out + c * g.block_len(),
                                    grad_blocks + c * g.block_len());
  });
}
MTSEG_CPU_CLONES void blocks_backward_row(const float* cells, const double* parts, const BlockGeometry& g,
                                          BlockNorm norm, int64_t r, double* block,
                                          const float* grad_out, float* grad_blocks) {
  blocks_backward_row_impl(cells, parts, g, norm, r, block, grad_out, grad_blocks);
}
MTSEG_CPU_CLONES void blocks_backward_row(const double* cells, const double* parts, const BlockGeometry& g,
                                          BlockNorm norm, int64_t r, double* block,
                                          const double* grad_out, double* grad_blocks) {
  blocks_backward_row_impl(cells, parts, g, norm, r, block, grad_out, grad_blocks);
}

// Row r of one image's cell gradients from its block gradients (n_blocks_row, n_blocks_col,
// b_row, b_col, n): hog.h's gather_cell_gradient for every (c, o) of the row, the same
// additions in the same order (block (r - i, c - j) for i, then j, ascending), vectorised
// over the row. acc: n_cells_col * n doubles of scratch.
template <typename cell_t>
MTSEG_ALWAYS_INLINE void gather_cells_row_impl(const cell_t* grad_blocks, const BlockGeometry& g, int64_t r,
                                               double* acc, cell_t* grad_cells) {
  const int64_t n = g.orientations, len = g.block_len(), row_len = g.n_cells_col * n;
  for (int64_t k = 0; k < row_len; ++k) acc[k] = 0.0;
  for (int64_t i = 0; i < g.b_row; ++i) {
    const int64_t br = r - i;
    if (br < 0 || br >= g.n_blocks_row) continue;
    for (int64_t j = 0; j < g.b_col; ++j) {
      // Cells c = bc + j for the blocks bc of row br: c in [j, j + n_blocks_col).
      const cell_t* src = grad_blocks + br * g.n_blocks_col * len + (i * g.b_col + j) * n;
      double* dst = acc + j * n;
      for (int64_t bc = 0; bc < g.n_blocks_col; ++bc)
        for (int64_t o = 0; o < n; ++o) dst[bc * n + o] += static_cast<double>(src[bc * len + o]);
    }
  }
  for (int64_t k = 0; k < row_len; ++k) grad_cells[k] = static_cast<cell_t>(acc[k]);
}
MTSEG_CPU_CLONES void gather_cells_row(const float* grad_blocks, const BlockGeometry& g, int64_t r, double* acc,
                                       float* grad_cells) {
  gather_cells_row_impl(grad_blocks, g, r, acc, grad_cells);
}
MTSEG_CPU_CLONES void gather_cells_row(const double* grad_blocks, const BlockGeometry& g, int64_t r, double* acc,
                                       double* grad_cells) {
  gather_cells_row_impl(grad_blocks, g, r, acc, grad_cells);
}

at::Tensor hog_blocks_cpu(const at::Tensor& cells_in, at::IntArrayRef cells_per_block, c10::string_view block_norm) {
  const auto g = block_geometry(cells_in, cells_per_block, "hog_blocks");
  const auto norm = parse_block_norm(block_norm);
  const auto cells = cells_in.contiguous();
  auto out = at::empty({g.batch, g.n_blocks_row, g.n_blocks_col, g.b_row, g.b_col, g.orientations}, cells.options());
  if (out.numel() == 0) return out;
  auto parts = at::empty({g.batch, g.n_cells_row, g.n_cells_col}, cells.options().dtype(at::kDouble));
  const int64_t image_cells = g.n_cells_row * g.n_cells_col, row_len = g.n_blocks_col * g.block_len();
  AT_DISPATCH_FLOATING_TYPES(cells.scalar_type(), "hog_blocks_cpu", [&] {
    const scalar_t* c = cells.data_ptr<scalar_t>();
    const double* p = parts.data_ptr<double>();
    scalar_t* o = out.data_ptr<scalar_t>();
    cell_norm_parts(c, g, norm, parts.data_ptr<double>());
    at::parallel_for(0, g.batch * g.n_blocks_row, grain_for(row_len), [&](int64_t begin, int64_t end) {
      BlockScratch t(g, true);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t b = item / g.n_blocks_row, r = item % g.n_blocks_row;
        blocks_row(c + b * image_cells * g.orientations, p + b * image_cells, g, norm, r, t, o + item * row_len);
      }
    });
  });
  return out;
}

at::Tensor hog_blocks_backward_cpu(const at::Tensor& grad_in, const at::Tensor& cells_in,
                                   at::IntArrayRef cells_per_block, c10::string_view block_norm) {
  const auto g = block_geometry(cells_in, cells_per_block, "hog_blocks_backward");
  const auto norm = parse_block_norm(block_norm);
  TORCH_CHECK_VALUE(grad_in.sizes() == at::IntArrayRef({g.batch, g.n_blocks_row, g.n_blocks_col, g.b_row, g.b_col,
                                                        g.orientations}),
                    "hog_blocks_backward: grad has shape ", grad_in.sizes(), ", which does not match the blocks");
  const auto cells = cells_in.contiguous();
  const auto grad = grad_in.to(cells.scalar_type()).contiguous();
  auto grad_cells = at::empty_like(cells);
  if (grad.numel() == 0) return grad_cells.zero_();
  auto grad_blocks = at::empty_like(grad);
  auto parts = at::empty({g.batch, g.n_cells_row, g.n_cells_col}, cells.options().dtype(at::kDouble));
  const int64_t image_cells = g.n_cells_row * g.n_cells_col, row_len = g.n_blocks_col * g.block_len();
  const int64_t cells_row_len = g.n_cells_col * g.orientations;
  AT_DISPATCH_FLOATING_TYPES(cells.scalar_type(), "hog_blocks_backward_cpu", [&] {
    const scalar_t* c = cells.data_ptr<scalar_t>();
    const double* p = parts.data_ptr<double>();
    const scalar_t* go = grad.data_ptr<scalar_t>();
    scalar_t* gb = grad_blocks.data_ptr<scalar_t>();
    cell_norm_parts(c, g, norm, parts.data_ptr<double>());
    at::parallel_for(0, g.batch * g.n_blocks_row, grain_for(row_len), [&](int64_t begin, int64_t end) {
      BlockScratch t(g, false);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t b = item / g.n_blocks_row, r = item % g.n_blocks_row;
        blocks_backward_row(c + b * image_cells * g.orientations, p + b * image_cells, g, norm, r, t.blocks.data(),
                            go + item * row_len, gb + item * row_len);
      }
    });
    scalar_t* gc = grad_cells.data_ptr<scalar_t>();
    const int64_t image_blocks_len = g.n_blocks_row * row_len;
    at::parallel_for(0, g.batch * g.n_cells_row, grain_for(cells_row_len * g.b_row * g.b_col),
                     [&](int64_t begin, int64_t end) {
                       std::vector<double> acc(cells_row_len);
                       for (int64_t item = begin; item < end; ++item) {
                         const int64_t b = item / g.n_cells_row, r = item % g.n_cells_row;
                         gather_cells_row(gb + b * image_blocks_len, g, r, acc.data(), gc + item * cells_row_len);
                       }
                     });
  });
  return grad_cells;
}

// hog.h's input_gradient for a whole row (y, x = 0..W-1) of channel k in the gradient's
// own type: one branch-free loop over the inner columns that the compiler vectorises,
// adding the four neighbours' terms in input_gradient's order (above, below, left,
// right). A missing row above or below contributes through a row whose channel never
// matches (-1): adding +0 changes nothing, as the sum is never -0.
template <typename acc_t>
MTSEG_ALWAYS_INLINE void transpose_stencil_row_impl(const acc_t* __restrict d_row, const acc_t* __restrict d_col,
                                                    const int32_t* __restrict channel, int64_t H, int64_t W,
                                                    int32_t k, int64_t y, acc_t* __restrict out) {
  const int64_t above = y > 0 ? y - 1 : y, below = y + 1 < H ? y + 1 : y;
  const int32_t k_above = y > 0 ? k : -1, k_below = y + 1 < H ? k : -1;
  const acc_t* __restrict du = d_row + above * W;  // +d_row of the pixel above
  const int32_t* __restrict cu = channel + above * W;
  const acc_t* __restrict dd = d_row + below * W;  // -d_row of the pixel below
  const int32_t* __restrict cd = channel + below * W;
  const acc_t* __restrict dc = d_col + y * W;  // +d_col of the pixel to the left, -d_col of the one to the right
  const int32_t* __restrict cc = channel + y * W;
  auto vertical = [&](int64_t x) {
    acc_t v = acc_t(0);
    v += cu[x] == k_above ? du[x] : acc_t(0);  // loaded unconditionally, so the selects vectorise
    v += cd[x] == k_below ? -dd[x] : acc_t(0);
    return v;
  };
  for (int64_t x = 1; x < W - 1; ++x) {
    acc_t v = vertical(x);
    v += cc[x - 1] == k ? dc[x - 1] : acc_t(0);
    v += cc[x + 1] == k ? -dc[x + 1] : acc_t(0);
    out[x] = v;
  }
  acc_t first = vertical(0);
  if (W > 1) {
    first += cc[1] == k ? -dc[1] : acc_t(0);
    acc_t last = vertical(W - 1);
    last += cc[W - 2] == k ? dc[W - 2] : acc_t(0);
    out[W - 1] = last;
  }
  out[0] = first;
}
MTSEG_CPU_CLONES void transpose_stencil_row(const float* __restrict d_row, const float* __restrict d_col,
                                            const int32_t* __restrict channel, int64_t H, int64_t W, int32_t k,
                                            int64_t y, float* __restrict out) {
  transpose_stencil_row_impl<float>(d_row, d_col, channel, H, W, k, y, out);
}
MTSEG_CPU_CLONES void transpose_stencil_row(const double* __restrict d_row, const double* __restrict d_col,
                                            const int32_t* __restrict channel, int64_t H, int64_t W, int32_t k,
                                            int64_t y, double* __restrict out) {
  transpose_stencil_row_impl<double>(d_row, d_col, channel, H, W, k, y, out);
}

// Backward of the cells. Pass 1 runs the forward's row loops again (same winning
// channel, differences, magnitude and bin as the forward) and turns dL/dcell into
// hog.h's stencil_gradient per covered pixel; pixels outside the cells keep 0.
// Pass 2 is hog.h's input_gradient, the transpose of the difference stencil, a row at a
// time (transpose_stencil_row).
template <typename scalar_t, typename T, typename grad_t, typename acc_t>
void cells_backward_kernel(const at::Tensor& images, const CellGeometry& g, bool transform_sqrt, const acc_t* grad_cells,
                           acc_t* d_row, acc_t* d_col, int32_t* channel, acc_t* grad_images) {
  const int64_t n = g.orientations, H = g.height, W = g.width, C = g.channels;
  const int64_t n_cols = g.n_cells_col * g.cell_cols, buf_rows = g.cell_rows + 2, row_stride = W + 2;
  const auto edges = orientation_edges(n);
  const EdgeLanes<T> lanes(edges);
  std::atomic<bool> all_valid{true};
  // (The gather of pass 1 takes int32 indices into a cell row.)
  const bool fused = fused_pass_for<scalar_t, T>(images, g, transform_sqrt) == FusedPass::kAvx512 &&
                     g.n_cells_col * n < (int64_t(1) << 30);
#ifdef MTSEG_HOG_FUSED
  const FusedEdges fused_edges(edges);
  std::vector<int32_t> cell_base(fused ? n_cols + 16 : 0);  // (x / cell_cols) n, padded for 16-lane loads
  for (int64_t x = 0; x < static_cast<int64_t>(cell_base.size()) && x < n_cols; ++x)
    cell_base[x] = static_cast<int32_t>((x / g.cell_cols) * n);
#endif
  at::parallel_for(0, g.batch * g.n_cells_row, grain_for(g.cell_rows * W), [&](int64_t begin, int64_t end) {
    RowScratch<T> t(fused ? 0 : C, buf_rows, row_stride, n_cols, n, edges, lanes);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / g.n_cells_row, cell_row = item % g.n_cells_row;
      const int64_t y0 = cell_row * g.cell_rows;
#ifdef MTSEG_HOG_FUSED
      if constexpr (std::is_same_v<T, float> && std::is_same_v<acc_t, float> &&
                    (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, uint8_t>)) {
        if (fused) {
          const auto img = image_view<scalar_t>(images, b);
          FusedContext ctx = fused_context(img, g, C, n_cols, n, fused_edges, edges, t);
          auto* const row_fn = n == 6   ? &fused_backward_cell_row<scalar_t, grad_t, 6>
                               : n == 9 ? &fused_backward_cell_row<scalar_t, grad_t, 9>
                                        : &fused_backward_cell_row<scalar_t, grad_t, 0>;
          const int64_t plane = b * H * W;
          if (!row_fn(img.data, ctx, y0, g.cell_rows, cell_base.data(), grad_cells + item * g.n_cells_col * n,
                      g.area(), d_row + plane, d_col + plane, channel + plane))
            all_valid = false;
          ++t.fused_rows;
          continue;
        }
      }
#endif
      if (!load_rows<T>(image_view<scalar_t>(images, b), y0, buf_rows, transform_sqrt, t.rows.data())) {
        all_valid = false;
        continue;
      }
      const acc_t* gcells = grad_cells + item * g.n_cells_col * n;
      for (int64_t y = y0; y < y0 + g.cell_rows; ++y) {
        const T* mid = t.rows.data() + (y - y0 + 1) * row_stride + 1;
        orient_pixel_row<T, grad_t>(t, mid, C, buf_rows * row_stride, row_stride, n_cols, n, nullptr);
        const int64_t row = (b * H + y) * W;
        for (int64_t x = 0; x < n_cols; ++x) {
          const double grad_mag =
              static_cast<double>(gcells[(x / g.cell_cols) * n + t.bin[x]]) / static_cast<double>(g.area());
          const PixelGradient<T> px{t.g_row[x], t.g_col[x], t.mag[x], static_cast<int64_t>(t.winner[x])};
          const auto st = stencil_gradient(px, grad_mag);
          d_row[row + x] = static_cast<acc_t>(st.d_row);
          d_col[row + x] = static_cast<acc_t>(st.d_col);
          channel[row + x] = static_cast<int32_t>(st.channel);
        }
      }
    }
  });
  TORCH_CHECK_VALUE(all_valid.load(), "hog_cells_backward: images contain NaN or Inf",
                    transform_sqrt ? " or negative values (transform_sqrt needs images >= 0)" : "");
  // Items in (image, row, channel) order, so the channels of a row reuse its d rows from L1.
  at::parallel_for(0, g.batch * H * C, grain_for(W), [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / (H * C), y = (item / C) % H, k = item % C;
      const int64_t plane = b * H * W;
      acc_t* out = grad_images + ((b * C + k) * H + y) * W;
#ifdef MTSEG_HOG_FUSED
      if constexpr (std::is_same_v<acc_t, float>) {
        if (fused) {
          transpose_stencil_row16(d_row + plane, d_col + plane, channel + plane, H, W, static_cast<int32_t>(k), y, out);
        } else {
          transpose_stencil_row(d_row + plane, d_col + plane, channel + plane, H, W, static_cast<int32_t>(k), y, out);
        }
      } else
#endif
      {
        transpose_stencil_row(d_row + plane, d_col + plane, channel + plane, H, W, static_cast<int32_t>(k), y, out);
      }
      if (transform_sqrt) {
        const auto img = image_view<scalar_t>(images, b);
        for (int64_t x = 0; x < W; ++x)
          out[x] = static_cast<acc_t>(sqrt_chain(out[x], img.template load<double>(k, y, x, false)));
      }
    }
  });
}

at::Tensor hog_cells_backward_cpu(const at::Tensor& grad_cells_in, const at::Tensor& images, int64_t orientations,
                                  at::IntArrayRef pixels_per_cell, bool transform_sqrt) {
  const int64_t one_cell[2] = {1, 1};
  const auto g = cell_geometry(images, orientations, pixels_per_cell, one_cell, "hog_cells_backward");
  TORCH_CHECK_VALUE(grad_cells_in.sizes() == at::IntArrayRef({g.batch, g.n_cells_row, g.n_cells_col, orientations}),
                    "hog_cells_backward: grad has shape ", grad_cells_in.sizes(), ", expected (", g.batch, ", ",
                    g.n_cells_row, ", ", g.n_cells_col, ", ", orientations, ")");
  const auto acc_dtype = cell_dtype(images.scalar_type());
  const auto grad_cells = grad_cells_in.to(acc_dtype).contiguous();
  auto grad_images = at::empty(images.sizes(), images.options().dtype(acc_dtype));
  if (grad_images.numel() == 0) return grad_images;
  const auto opts = images.options().dtype(acc_dtype);
  // Pass 1 writes every covered pixel; only the rows and columns no cell covers are zeroed.
  auto d_row = at::empty({g.batch, g.height, g.width}, opts);
  auto d_col = at::empty({g.batch, g.height, g.width}, opts);
  auto channel = at::empty({g.batch, g.height, g.width}, opts.dtype(at::kInt));
  const int64_t rows_covered = g.n_cells_row * g.cell_rows, cols_covered = g.n_cells_col * g.cell_cols;
  for (at::Tensor* plane : {&d_row, &d_col, &channel}) {
    if (rows_covered < g.height) plane->narrow(1, rows_covered, g.height - rows_covered).zero_();
    if (cols_covered < g.width) plane->narrow(2, cols_covered, g.width - cols_covered).zero_();
  }
  // Same working types as the forward, so the backward sees the forward's winners and bins.
  dispatch_working_types(images.scalar_type(), transform_sqrt, [&](auto scalar, auto working, auto grad, auto acc) {
    using acc_t = decltype(acc);
    cells_backward_kernel<decltype(scalar), decltype(working), decltype(grad), acc_t>(
        images, g, transform_sqrt, grad_cells.data_ptr<acc_t>(), d_row.data_ptr<acc_t>(),
        d_col.data_ptr<acc_t>(), channel.data_ptr<int32_t>(), grad_images.data_ptr<acc_t>());
  });
  return grad_images;
}

}  // namespace

std::array<int64_t, 3> cpu_fallback_counts(bool reset) {
  if (reset) return {g_scalar_bins.exchange(0), g_exact_bins.exchange(0), g_fused_rows.exchange(0)};
  return {g_scalar_bins.load(), g_exact_bins.load(), g_fused_rows.load()};
}

const char* cpu_cells_pass() {
#ifdef MTSEG_HOG_FUSED
  switch (fused_pass_selected()) {
    case FusedPass::kAvx512: return "avx512";
    case FusedPass::kAvx2: return "avx2";
    case FusedPass::kNone: break;
  }
#endif
  return "rows";
}

TORCH_LIBRARY_IMPL(mtseg, CPU, m) {
  m.impl("hog_cells", &hog_cells_cpu);
  m.impl("hog_blocks", &hog_blocks_cpu);
  m.impl("hog_cells_backward", &hog_cells_backward_cpu);
  m.impl("hog_blocks_backward", &hog_blocks_backward_cpu);
}

}  // namespace hog
}  // namespace mtseg
