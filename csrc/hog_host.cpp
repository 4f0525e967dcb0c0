// Argument checks of the HOG operators (the only ones: the Python wrappers only
// normalise arguments) and the composite `hog`, registered once for every backend.
#include "mtseg/hog_host.h"
#include "mtseg/checks.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <c10/util/safe_numerics.h>

#include <limits>


namespace mtseg {
namespace hog {

namespace {

// Each pixel's bin search is linear in the bins and the output holds `orientations`
// values per cell: beyond this an argument would only size an absurd allocation or loop.
constexpr int64_t kMaxOrientations = int64_t{1} << 16;

void check_pair(at::IntArrayRef v, const char* name, const char* op) {
  TORCH_CHECK_VALUE(v.size() == 2, op, ": ", name, " must have two entries (rows, cols), got ", v.size());
  TORCH_CHECK_VALUE(v[0] > 0 && v[1] > 0, op, ": ", name, " must be positive, got (", v[0], ", ", v[1], ")");
}

}  // namespace

CellGeometry cell_geometry(const at::Tensor& images, int64_t orientations, at::IntArrayRef pixels_per_cell,
                           at::IntArrayRef min_cells, const char* op) {
  TORCH_CHECK_VALUE(images.dim() == 4, op, ": expected images of shape (B, C, H, W), got a ", images.dim(),
                    "-d tensor of shape ", shape_of(images));
  const auto dtype = images.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kByte || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat ||
                       dtype == at::kDouble,
                   op, ": expected uint8, float16, bfloat16, float32 or float64 images, got ", dtype,
                   at::isFloatingType(dtype) || at::isComplexType(dtype) ? "" : " (convert integer images to float first)");
  TORCH_CHECK_VALUE(images.size(1) > 0, op, ": images need at least one channel, got shape ", shape_of(images));
  TORCH_CHECK_VALUE(orientations > 0 && orientations <= kMaxOrientations, op, ": orientations must be in [1, ",
                    kMaxOrientations, "], got ", orientations);
  check_pair(pixels_per_cell, "pixels_per_cell", op);
  check_pair(min_cells, "cells_per_block", op);

  CellGeometry g;
  g.batch = images.size(0);
  g.channels = images.size(1);
  g.height = images.size(2);
  g.width = images.size(3);
  g.cell_rows = pixels_per_cell[0];
  g.cell_cols = pixels_per_cell[1];
  g.n_cells_row = g.height / g.cell_rows;
  g.n_cells_col = g.width / g.cell_cols;
  g.orientations = orientations;
  if (g.n_cells_row < min_cells[0] || g.n_cells_col < min_cells[1]) {
    // cells x pixels can exceed int64 for absurd arguments: say so instead of overflowing.
    auto times = [](int64_t a, int64_t b) {
      int64_t p = 0;
      return c10::mul_overflows(a, b, &p) ? std::string("more than 2^63") : std::to_string(p);
    };
    TORCH_CHECK_VALUE(false, op, ": the image is too small for pixels_per_cell=(", g.cell_rows, ", ", g.cell_cols,
                      ") and cells_per_block=(", min_cells[0], ", ", min_cells[1], "): it needs at least ",
                      times(min_cells[0], g.cell_rows), " rows and ", times(min_cells[1], g.cell_cols), " cols, got ",
                      g.height, " x ", g.width);
  }
  return g;
}

BlockGeometry block_geometry(const at::Tensor& cells, at::IntArrayRef cells_per_block, const char* op) {
  TORCH_CHECK_VALUE(cells.dim() == 4, op, ": expected cells of shape (B, n_cells_row, n_cells_col, orientations), got ",
                    "shape ", shape_of(cells));
  TORCH_CHECK_TYPE(cells.scalar_type() == at::kFloat || cells.scalar_type() == at::kDouble, op,
                   ": expected float32 or float64 cells, got ", cells.scalar_type());
  check_pair(cells_per_block, "cells_per_block", op);
  BlockGeometry g;
  g.batch = cells.size(0);
  g.n_cells_row = cells.size(1);
  g.n_cells_col = cells.size(2);
  g.orientations = cells.size(3);
  TORCH_CHECK_VALUE(g.orientations > 0, op, ": cells need at least one orientation, got shape ", shape_of(cells));
  g.b_row = cells_per_block[0];
  g.b_col = cells_per_block[1];
  g.n_blocks_row = g.n_cells_row - g.b_row + 1;
  g.n_blocks_col = g.n_cells_col - g.b_col + 1;
  TORCH_CHECK_VALUE(g.n_blocks_row > 0 && g.n_blocks_col > 0, op, ": a block of ", g.b_row, " x ", g.b_col,
                    " cells does not fit in ", g.n_cells_row, " x ", g.n_cells_col, " cells");
  return g;
}

BlockNorm parse_block_norm(c10::string_view name) {
  if (name == "L1") return BlockNorm::L1;
  if (name == "L1-sqrt") return BlockNorm::L1Sqrt;
  if (name == "L2") return BlockNorm::L2;
  if (name == "L2-Hys") return BlockNorm::L2Hys;
  TORCH_CHECK_VALUE(false, "hog: block_norm must be one of 'L1', 'L1-sqrt', 'L2', 'L2-Hys', got '", std::string(name),
                    "'");
}

void check_image_values(const at::Tensor& images, bool transform_sqrt, const char* op) {
  TORCH_INTERNAL_ASSERT(images.is_cpu(), "check_image_values would synchronise a ", images.device(), " device");
  if (images.numel() == 0) return;
  if (at::isFloatingType(images.scalar_type())) {
    TORCH_CHECK_VALUE(at::isfinite(images).all().item<bool>(), op,
                      ": images contain NaN or Inf; HOG of non-finite pixels is undefined (images of shape ",
                      shape_of(images), ")");
  }
  if (transform_sqrt && images.scalar_type() != at::kByte) {
    TORCH_CHECK_VALUE(!(images < 0).any().item<bool>(), op,
                      ": transform_sqrt takes the square root of every pixel and needs images >= 0, got a "
                      "minimum of ", images.min().item<double>());
  }
}

std::vector<Edge> orientation_edges(int64_t orientations) {
  std::vector<Edge> edges;
  edges.reserve(static_cast<size_t>(orientations > 1 ? orientations - 1 : 0));
  for (int64_t i = 1; i < orientations; ++i) edges.push_back(edge_direction(i, orientations));
  return edges;
}

at::ScalarType cell_dtype(at::ScalarType image_dtype) {
  return image_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

namespace {

// hog = hog_blocks(hog_cells(images)), through the dispatcher so that each piece runs
// on the images' backend. Every argument is checked before the cells pass.
at::Tensor hog_composite(const at::Tensor& images, int64_t orientations, at::IntArrayRef pixels_per_cell,
                         at::IntArrayRef cells_per_block, c10::string_view block_norm, bool transform_sqrt) {
  cell_geometry(images, orientations, pixels_per_cell, cells_per_block, "hog");
  parse_block_norm(block_norm);
  static auto cells_op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mtseg::hog_cells", "")
                             .typed<at::Tensor(const at::Tensor&, int64_t, at::IntArrayRef, bool)>();
  static auto blocks_op = c10::Dispatcher::singleton()
                              .findSchemaOrThrow("mtseg::hog_blocks", "")
                              .typed<at::Tensor(const at::Tensor&, at::IntArrayRef, c10::string_view)>();
  return blocks_op.call(cells_op.call(images, orientations, pixels_per_cell, transform_sqrt), cells_per_block,
                        block_norm);
}

}  // namespace

}  // namespace hog
}  // namespace mtseg

// One kernel for every backend; autograd is registered in Python (mtseg_kernels/ops/hog.py).
TORCH_LIBRARY_IMPL(mtseg, CompositeExplicitAutograd, m) { m.impl("hog", &mtseg::hog::hog_composite); }
