// Host-side HOG helpers shared by the CPU and CUDA operator implementations:
// argument validation (with messages that say what was expected and what was given),
// output geometry and the orientation table.
#pragma once

#include <ATen/ATen.h>

#include <string>

#include "mtseg/hog.h"

namespace mtseg {
namespace hog {

// Validates images (B, C, H, W) and the cell parameters; `min_cells` is the number of
// cells per axis the caller needs (cells_per_block for the full descriptor).
CellGeometry cell_geometry(const at::Tensor& images, int64_t orientations, at::IntArrayRef pixels_per_cell,
                           at::IntArrayRef min_cells, const char* op);

// Validates cells (B, n_cells_row, n_cells_col, orientations) and the block size.
BlockGeometry block_geometry(const at::Tensor& cells, at::IntArrayRef cells_per_block, const char* op);

BlockNorm parse_block_norm(c10::string_view name);

// Raises if an image holds NaN or Inf, or (with transform_sqrt) a negative value.
// One reduction per condition; on CUDA each is a device sync.
void check_image_values(const at::Tensor& images, bool transform_sqrt, const char* op);

// (3 * (n - 1),) float64 table for orientation_bin on `device` (at least one element).
at::Tensor orientation_table(int64_t orientations, const at::Device& device);

// Cells are float32 except for float64 images; the descriptor follows the cells.
at::ScalarType cell_dtype(at::ScalarType image_dtype);

// Calls f(scalar_t{}, grad_t{}, cell_t{}) for the image dtype: the input type, hog.h's
// gradient type (double for float64 and uint8, as skimage promotes them), and the cell type.
template <typename F>
void dispatch_image_types(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kByte: return f(uint8_t{}, double{}, float{});
    case at::kHalf: return f(at::Half{}, float{}, float{});
    case at::kBFloat16: return f(at::BFloat16{}, float{}, float{});
    case at::kFloat: return f(float{}, float{}, float{});
    case at::kDouble: return f(double{}, double{}, double{});
    default: TORCH_CHECK_TYPE(false, "hog: unsupported image dtype ", dtype);
  }
}

}  // namespace hog
}  // namespace mtseg
