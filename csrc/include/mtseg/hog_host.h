// Host-side HOG helpers shared by the CPU and CUDA operator implementations: the
// argument checks (the one place they live: the Python wrappers only normalise
// arguments), output geometry and the orientation edges.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <string>
#include <vector>

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
// CPU only: on CUDA it would synchronise the device (the CUDA kernels flag such images).
void check_image_values(const at::Tensor& images, bool transform_sqrt, const char* op);

// edge_direction(i, n) for i = 1 .. n - 1.
std::vector<Edge> orientation_edges(int64_t orientations);

// Pixels of CPU cells passes since the last reset whose bin the vector test left to
// hog.h's scalar rule, those of them that took its exact integer test, and the cell rows
// computed by a fused pass (AVX-512 or AVX2).
std::array<int64_t, 3> cpu_fallback_counts(bool reset);
// The CPU cells pass float32 and uint8 images without transform_sqrt take now, given
// the CPU and MTSEG_HOG_SIMD: "avx512", "avx2" (fused passes) or "rows".
const char* cpu_cells_pass();

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
