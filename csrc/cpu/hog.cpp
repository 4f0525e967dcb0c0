// CPU kernels of the HOG operators. The math is in mtseg/hog.h (shared with CUDA);
// this file only lays out the loops: parallel over images x cell rows (cells) or
// images x blocks (normalisation), with no allocation inside the per-pixel loops.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "mtseg/cpu.h"
#include "mtseg/hog.h"
#include "mtseg/hog_host.h"

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
// channel choice, orientation bins, per-bin column sums. The channel choice follows
// skimage's rule exactly in two ways: for float32/float16/bfloat16 images by its key,
// float32 hypot, computed in the vector loop (select_channel_row_by_key); where the key
// is glibc's double hypot (uint8, float64), which no vector loop reproduces, by
// g_row^2 + g_col^2, whose order agrees with hypot's except where two channels are within
// rounding of each other: those pixels are flagged and redone with hog.h's magnitude and
// selection_key (select_channel_row, then redo_channel_choice).
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
      const bool identical = (gr == best_r) & (gc == best_c);
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

// Channel choice for float rows by skimage's own key, float32 hypot, computed as glibc
// does (sqrt of the double sum of squares, rounded to float; hog.h's selection_key), so
// no pixel needs a second look. Used where the rule is float32 hypot (float32, float16,
// bfloat16 images); uint8 images, decided by double hypot, use select_channel_row.
MTSEG_CPU_CLONES void select_channel_row_by_key(const float* __restrict mid, int64_t channels, int64_t plane_stride,
                                                int64_t row_stride, int64_t n_cols, float* __restrict g_row,
                                                float* __restrict g_col, float* __restrict best_key,
                                                int32_t* __restrict winner) {
  for (int64_t x = 0; x < n_cols; ++x) best_key[x] = -1.0f;
  for (int64_t k = 0; k < channels; ++k) {
    const float* __restrict up = mid + k * plane_stride + row_stride;
    const float* __restrict down = mid + k * plane_stride - row_stride;
    const float* __restrict m = mid + k * plane_stride;
    for (int64_t x = 0; x < n_cols; ++x) {
      const float gr = up[x] - down[x], gc = m[x + 1] - m[x - 1];
      const float key = selection_key(gr, magnitude(gr, gc));
      const float best = best_key[x], best_r = g_row[x], best_c = g_col[x];
      const bool take = key > best;  // strict: the lowest channel keeps a tie
      g_row[x] = take ? gr : best_r;
      g_col[x] = take ? gc : best_c;
      best_key[x] = take ? key : best;
      winner[x] = take ? static_cast<int32_t>(k) : winner[x];
    }
  }
}

// Orientation bins of one pixel row, and their magnitudes added to per-bin column sums.
template <typename T>
MTSEG_ALWAYS_INLINE void bin_row_impl(const T* __restrict g_row, const T* __restrict g_col, int64_t n_cols,
                                      const double* __restrict table, int64_t n, double* __restrict up_row,
                                      double* __restrict up_col, double* __restrict mag, int32_t* __restrict bin,
                                      double* __restrict column_sums) {
  // Magnitude in T: for float, a float sqrt (16 lanes; double sqrt is 4x slower) within
  // 2 float32 ulps of hog.h's magnitude(float, float), so float32 cells stay
  // float32-accurate; for double, within an ulp of hog.h's hypot.
  for (int64_t x = 0; x < n_cols; ++x) mag[x] = static_cast<double>(std::sqrt(g_row[x] * g_row[x] + g_col[x] * g_col[x]));
  for (int64_t x = 0; x < n_cols; ++x) {
    const double r = g_row[x], c = g_col[x];
    const bool flip = r < 0.0;
    up_row[x] = flip ? -r : r;
    up_col[x] = flip ? -c : c;
    bin[x] = 0;
  }
  for (int64_t i = 0; i < n - 1; ++i) {
    const double c = table[i], s = table[(n - 1) + i], inclusive = table[2 * (n - 1) + i];
    for (int64_t x = 0; x < n_cols; ++x) bin[x] += past_boundary(up_row[x], up_col[x], c, s, inclusive);
  }
  for (int64_t x = 0; x < n_cols; ++x) bin[x] = g_row[x] == T(0) ? 0 : bin[x];  // theta = 0 or 180
  if (column_sums == nullptr) return;  // the backward needs only the bins
  for (int64_t o = 0; o < n; ++o) {
    double* sums = column_sums + o * n_cols;
    for (int64_t x = 0; x < n_cols; ++x) sums[x] += bin[x] == o ? mag[x] : 0.0;
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
  MTSEG_CPU_CLONES void bin_row(const T* __restrict g_row, const T* __restrict g_col, int64_t n_cols,             \
                                const double* __restrict table, int64_t n, double* __restrict up_row,              \
                                double* __restrict up_col, double* __restrict mag, int32_t* __restrict bin,        \
                                double* __restrict column_sums) {                                                  \
    bin_row_impl<T>(g_row, g_col, n_cols, table, n, up_row, up_col, mag, bin, column_sums);                       \
  }                                                                                                                \
  MTSEG_CPU_CLONES flag_t<T> finish_row(T* __restrict row, int64_t width, bool transform_sqrt) {                 \
    return finish_row_impl<T>(row, width, transform_sqrt);                                                         \
  }
MTSEG_DEFINE_ROW_KERNELS(float)
MTSEG_DEFINE_ROW_KERNELS(double)
#undef MTSEG_DEFINE_ROW_KERNELS

template <typename T>
struct RowScratch {
  std::vector<T> rows;                       // C planes x (cell_rows + 2) rows x (W + 2) cols
  std::vector<T> g_row, g_col, best_sq;      // winning channel's differences, per column
  std::vector<flag_t<T>> ambiguous, winner;  // flagged pixels; winning channel
  std::vector<double> mag, up_row, up_col;   // magnitude; gradient turned into the upper half plane
  std::vector<int32_t> bin;
  std::vector<double> column_sums;           // n x covered columns, summed over the cell row's pixel rows
  RowScratch(int64_t channels, int64_t buf_rows, int64_t row_stride, int64_t n_cols, int64_t n)
      : rows(channels * buf_rows * row_stride), g_row(n_cols), g_col(n_cols), best_sq(n_cols), ambiguous(n_cols),
        winner(n_cols), mag(n_cols), up_row(n_cols), up_col(n_cols), bin(n_cols), column_sums(n * n_cols) {}
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
// differences (t.g_row, t.g_col), the magnitude (t.mag) and bin (t.bin) of every
// covered column; with `column_sums`, the magnitudes are also added to the per-bin sums.
template <typename T, typename grad_t>
void orient_pixel_row(RowScratch<T>& t, const T* mid, int64_t channels, int64_t plane_stride, int64_t row_stride,
                      int64_t n_cols, const double* table, int64_t n, double* column_sums) {
  bool by_key = false;
  if constexpr (std::is_same_v<T, float> && std::is_same_v<grad_t, float>) {
    // float32 hypot is the rule: compute it (winner is flag_t<float> = int32_t here)
    if (channels > 1) {
      select_channel_row_by_key(mid, channels, plane_stride, row_stride, n_cols, t.g_row.data(), t.g_col.data(),
                                t.best_sq.data(), t.winner.data());
      by_key = true;
    }
  }
  if (!by_key && select_channel_row(mid, channels, plane_stride, row_stride, n_cols, t.g_row.data(), t.g_col.data(),
                                    t.best_sq.data(), t.ambiguous.data(), t.winner.data())) {
    for (int64_t x = 0; x < n_cols; ++x)
      if (t.ambiguous[x]) redo_channel_choice<T, grad_t>(mid, channels, plane_stride, row_stride, x, t);
  }
  bin_row(t.g_row.data(), t.g_col.data(), n_cols, table, n, t.up_row.data(), t.up_col.data(), t.mag.data(),
          t.bin.data(), column_sums);
}

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

// T: working type of the row buffers; grad_t: hog.h's gradient type for this image
// dtype (the exact rule the flagged pixels are redone with); cell_t: output type.
template <typename scalar_t, typename T, typename grad_t, typename cell_t>
void cells_kernel(const at::Tensor& images, const CellGeometry& g, bool transform_sqrt, const double* table,
                  cell_t* cells) {
  const int64_t n = g.orientations, W = g.width, C = g.channels;
  const int64_t n_cols = g.n_cells_col * g.cell_cols, buf_rows = g.cell_rows + 2, row_stride = W + 2;
  std::atomic<bool> all_valid{true};
  at::parallel_for(0, g.batch * g.n_cells_row, grain_for(g.cell_rows * g.width), [&](int64_t begin, int64_t end) {
    RowScratch<T> t(C, buf_rows, row_stride, n_cols, n);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / g.n_cells_row, cell_row = item % g.n_cells_row;
      const int64_t y0 = cell_row * g.cell_rows;
      const auto img = image_view<scalar_t>(images, b);
      if (!load_rows<T>(img, y0, buf_rows, transform_sqrt, t.rows.data())) {
        all_valid = false;
        continue;
      }
      std::fill(t.column_sums.begin(), t.column_sums.end(), 0.0);
      for (int64_t y = y0; y < y0 + g.cell_rows; ++y) {
        const T* mid = t.rows.data() + (y - y0 + 1) * row_stride + 1;
        orient_pixel_row<T, grad_t>(t, mid, C, buf_rows * row_stride, row_stride, n_cols, table, n,
                                    t.column_sums.data());
      }
      cell_t* out = cells + item * g.n_cells_col * n;
      for (int64_t cc = 0; cc < g.n_cells_col; ++cc) {
        for (int64_t o = 0; o < n; ++o) {
          const double* sums = t.column_sums.data() + o * n_cols + cc * g.cell_cols;
          double total = 0.0;
          for (int64_t x = 0; x < g.cell_cols; ++x) total += sums[x];
          out[cc * n + o] = cell_mean<cell_t>(total, g.area());
        }
      }
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
  const auto table = orientation_table(orientations, images.device());
  const double* tab = table.data_ptr<double>();
  // The kernel checks the rows it reads; rows below the last cell row's neighbour are checked here.
  const int64_t first_unread = g.n_cells_row * g.cell_rows + 1;
  if (first_unread < g.height)
    check_image_values(images.narrow(2, first_unread, g.height - first_unread), transform_sqrt, "hog_cells");
  dispatch_working_types(images.scalar_type(), transform_sqrt, [&](auto scalar, auto working, auto grad, auto cell) {
    using cell_t = decltype(cell);
    cells_kernel<decltype(scalar), decltype(working), decltype(grad)>(images, g, transform_sqrt, tab,
                                                                        cells.data_ptr<cell_t>());
  });
  return cells;
}

at::Tensor hog_blocks_cpu(const at::Tensor& cells_in, at::IntArrayRef cells_per_block, c10::string_view block_norm) {
  const auto g = block_geometry(cells_in, cells_per_block, "hog_blocks");
  const auto norm = parse_block_norm(block_norm);
  const auto cells = cells_in.contiguous();
  auto out = at::empty({g.batch, g.n_blocks_row, g.n_blocks_col, g.b_row, g.b_col, g.orientations}, cells.options());
  const int64_t n_blocks = g.n_blocks_row * g.n_blocks_col;
  AT_DISPATCH_FLOATING_TYPES(cells.scalar_type(), "hog_blocks_cpu", [&] {
    const scalar_t* c = cells.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, g.batch * n_blocks, grain_for(g.block_len()), [&](int64_t begin, int64_t end) {
      for (int64_t idx = begin; idx < end; ++idx) {
        const int64_t b = idx / n_blocks, r = (idx % n_blocks) / g.n_blocks_col, col = idx % g.n_blocks_col;
        const BlockView<scalar_t> v{c + ((b * g.n_cells_row + r) * g.n_cells_col + col) * g.orientations,
                                    g.n_cells_col * g.orientations, g.b_row, g.b_col, g.orientations};
        normalize_block(v, norm, o + idx * g.block_len());
      }
    });
  });
  return out;
}

at::Tensor hog_cpu(const at::Tensor& images, int64_t orientations, at::IntArrayRef pixels_per_cell,
                   at::IntArrayRef cells_per_block, c10::string_view block_norm, bool transform_sqrt) {
  // Validate everything before any work, so a bad block_norm fails before the cells pass.
  cell_geometry(images, orientations, pixels_per_cell, cells_per_block, "hog");
  parse_block_norm(block_norm);
  return hog_blocks_cpu(hog_cells_cpu(images, orientations, pixels_per_cell, transform_sqrt), cells_per_block,
                        block_norm);
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
  auto grad_blocks = at::empty_like(grad);
  auto grad_cells = at::empty_like(cells);
  const int64_t n_blocks = g.n_blocks_row * g.n_blocks_col;
  AT_DISPATCH_FLOATING_TYPES(cells.scalar_type(), "hog_blocks_backward_cpu", [&] {
    const scalar_t* c = cells.data_ptr<scalar_t>();
    const scalar_t* go = grad.data_ptr<scalar_t>();
    scalar_t* gb = grad_blocks.data_ptr<scalar_t>();
    at::parallel_for(0, g.batch * n_blocks, grain_for(g.block_len()), [&](int64_t begin, int64_t end) {
      for (int64_t idx = begin; idx < end; ++idx) {
        const int64_t b = idx / n_blocks, r = (idx % n_blocks) / g.n_blocks_col, col = idx % g.n_blocks_col;
        const BlockView<scalar_t> v{c + ((b * g.n_cells_row + r) * g.n_cells_col + col) * g.orientations,
                                    g.n_cells_col * g.orientations, g.b_row, g.b_col, g.orientations};
        normalize_block_backward(v, norm, go + idx * g.block_len(), gb + idx * g.block_len());
      }
    });
    scalar_t* gc = grad_cells.data_ptr<scalar_t>();
    const int64_t row_len = g.n_cells_col * g.orientations;
    at::parallel_for(0, g.batch * g.n_cells_row, grain_for(row_len * g.b_row * g.b_col), [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t b = item / g.n_cells_row, r = item % g.n_cells_row;
        const scalar_t* gb_b = gb + b * n_blocks * g.block_len();
        for (int64_t col = 0; col < g.n_cells_col; ++col)
          for (int64_t o = 0; o < g.orientations; ++o)
            gc[item * row_len + col * g.orientations + o] = static_cast<scalar_t>(gather_cell_gradient(
                gb_b, g.n_blocks_row, g.n_blocks_col, g.b_row, g.b_col, g.orientations, r, col, o));
      }
    });
  });
  return grad_cells;
}

// hog.h's input_gradient for a whole row (y, x = 0..W-1) of channel k, as four
// branch-free loops the compiler vectorises, in the gradient's own type (one vector
// width per loop).
template <typename acc_t>
MTSEG_ALWAYS_INLINE void transpose_stencil_row_impl(const acc_t* __restrict d_row, const acc_t* __restrict d_col,
                                                    const int32_t* __restrict channel, int64_t H, int64_t W,
                                                    int32_t k, int64_t y, acc_t* __restrict out) {
  for (int64_t x = 0; x < W; ++x) out[x] = acc_t(0);
  if (y > 0) {  // +d_row of the pixel above
    const acc_t* d = d_row + (y - 1) * W;
    const int32_t* ch = channel + (y - 1) * W;
    for (int64_t x = 0; x < W; ++x) {
      const acc_t v = d[x];  // loaded unconditionally, so the select vectorises
      out[x] += ch[x] == k ? v : acc_t(0);
    }
  }
  if (y + 1 < H) {  // -d_row of the pixel below
    const acc_t* d = d_row + (y + 1) * W;
    const int32_t* ch = channel + (y + 1) * W;
    for (int64_t x = 0; x < W; ++x) {
      const acc_t v = d[x];
      out[x] += ch[x] == k ? -v : acc_t(0);  // (written as an add so the select vectorises)
    }
  }
  const acc_t* d = d_col + y * W;
  const int32_t* ch = channel + y * W;
  for (int64_t x = 1; x < W; ++x) {  // +d_col of the pixel to the left
    const acc_t v = d[x - 1];
    out[x] += ch[x - 1] == k ? v : acc_t(0);
  }
  for (int64_t x = 0; x < W - 1; ++x) {  // -d_col of the pixel to the right
    const acc_t v = d[x + 1];
    out[x] += ch[x + 1] == k ? -v : acc_t(0);
  }
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
void cells_backward_kernel(const at::Tensor& images, const CellGeometry& g, bool transform_sqrt, const double* table,
                           const acc_t* grad_cells, acc_t* d_row, acc_t* d_col, int32_t* channel, acc_t* grad_images) {
  const int64_t n = g.orientations, H = g.height, W = g.width, C = g.channels;
  const int64_t n_cols = g.n_cells_col * g.cell_cols, buf_rows = g.cell_rows + 2, row_stride = W + 2;
  std::atomic<bool> all_valid{true};
  at::parallel_for(0, g.batch * g.n_cells_row, grain_for(g.cell_rows * W), [&](int64_t begin, int64_t end) {
    RowScratch<T> t(C, buf_rows, row_stride, n_cols, n);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / g.n_cells_row, cell_row = item % g.n_cells_row;
      const int64_t y0 = cell_row * g.cell_rows;
      if (!load_rows<T>(image_view<scalar_t>(images, b), y0, buf_rows, transform_sqrt, t.rows.data())) {
        all_valid = false;
        continue;
      }
      const acc_t* gcells = grad_cells + item * g.n_cells_col * n;
      for (int64_t y = y0; y < y0 + g.cell_rows; ++y) {
        const T* mid = t.rows.data() + (y - y0 + 1) * row_stride + 1;
        orient_pixel_row<T, grad_t>(t, mid, C, buf_rows * row_stride, row_stride, n_cols, table, n, nullptr);
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
  at::parallel_for(0, g.batch * C * H, grain_for(W), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> out(W);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / (C * H), k = (item / H) % C, y = item % H;
      const int64_t plane = b * H * W;
      transpose_stencil_row(d_row + plane, d_col + plane, channel + plane, H, W, static_cast<int32_t>(k), y,
                            out.data());
      if (transform_sqrt) {
        const auto img = image_view<scalar_t>(images, b);
        for (int64_t x = 0; x < W; ++x)
          out[x] = static_cast<acc_t>(sqrt_chain(out[x], img.template load<double>(k, y, x, false)));
      }
      std::copy(out.begin(), out.end(), grad_images + item * W);
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
  // Zero outside the cells (rows and columns no cell covers), written by pass 1 inside.
  auto d_row = at::zeros({g.batch, g.height, g.width}, opts);
  auto d_col = at::zeros({g.batch, g.height, g.width}, opts);
  auto channel = at::zeros({g.batch, g.height, g.width}, opts.dtype(at::kInt));
  const auto table = orientation_table(orientations, images.device());
  const double* tab = table.data_ptr<double>();
  // Same working types as the forward, so the backward sees the forward's winners and bins.
  dispatch_working_types(images.scalar_type(), transform_sqrt, [&](auto scalar, auto working, auto grad, auto acc) {
    using acc_t = decltype(acc);
    cells_backward_kernel<decltype(scalar), decltype(working), decltype(grad), acc_t>(
        images, g, transform_sqrt, tab, grad_cells.data_ptr<acc_t>(), d_row.data_ptr<acc_t>(),
        d_col.data_ptr<acc_t>(), channel.data_ptr<int32_t>(), grad_images.data_ptr<acc_t>());
  });
  return grad_images;
}

}  // namespace

TORCH_LIBRARY_IMPL(mtseg, CPU, m) {
  m.impl("hog", &hog_cpu);
  m.impl("hog_cells", &hog_cells_cpu);
  m.impl("hog_blocks", &hog_blocks_cpu);
  m.impl("hog_cells_backward", &hog_cells_backward_cpu);
  m.impl("hog_blocks_backward", &hog_blocks_backward_cpu);
}

}  // namespace hog
}  // namespace mtseg
