// Host-side helpers of the distance operators (edt, connected_components,
// levelset_grow, grow_instances), shared by the CPU and CUDA implementations:
// argument validation with messages that say what was expected and what was given,
// and the geometry of a batch of masks.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/OptionalArrayRef.h>

#include <array>
#include <optional>

namespace mtseg {
namespace distance {

// A batch of masks (B, H, W) or (B, D, H, W); 2D masks have depth 1. spacing is per
// axis (D, H, W), 1 for the depth of 2D masks.
struct Geometry {
  int64_t batch = 0, depth = 1, height = 0, width = 0;
  int spatial = 2;
  std::array<double, 3> spacing{1.0, 1.0, 1.0};
  bool unit_spacing = true;
  int64_t voxels() const { return depth * height * width; }
  // The largest finite squared distance, in voxel units: sum of (n - 1)^2 over the axes.
  double max_squared_extent() const {
    const double d = static_cast<double>(depth - 1), h = static_cast<double>(height - 1),
                 w = static_cast<double>(width - 1);
    return d * d + h * h + w * w;
  }
};

// Validates a mask (B, H, W) / (B, D, H, W) of bool, integer or floating dtype (non-zero
// means foreground; NaN is rejected) and the spacing (one positive finite value per
// spatial axis, or none). `name` is the argument's name in messages.
Geometry mask_geometry(const at::Tensor& mask, std::optional<at::ArrayRef<double>> spacing, const char* op,
                       const char* name);

// The mask as a contiguous bool tensor (mask != 0), on the mask's device.
at::Tensor as_bool(const at::Tensor& mask, const char* op, const char* name);

// Raises unless `other` has the shape and device of `mask`.
void check_same_shape(const at::Tensor& mask, const at::Tensor& other, const char* op, const char* name_a,
                      const char* name_b);

// The output dtype of edt: float32 unless float64 is asked for.
at::ScalarType edt_dtype(std::optional<at::ScalarType> dtype);

// Exact working type for float32 output: float holds the squared distances of unit
// spacing exactly while they stay below 2^24; otherwise double.
bool needs_double(const Geometry& g, at::ScalarType out_dtype);

// Validates connectivity for the mask's number of spatial axes (2D: 4 or 8; 3D: 6, 18 or
// 26) and returns the largest number of non-zero offsets of a neighbour (1, 2 or 3).
int connectivity_order(int64_t connectivity, int spatial, const char* op);

void check_lambda(double lam, const char* op);

}  // namespace distance
}  // namespace mtseg
