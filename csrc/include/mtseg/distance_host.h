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
//
// The kernels (CPU and GPU alike) compute with work_spacing = spacing / work_scale and
// multiply the distances by work_scale at the end, so that squared distances stay far
// from overflow and underflow for any accepted spacing (mask_geometry rejects spacings
// whose ratio exceeds 2^500). Isotropic spacing: work_scale is the spacing, the transforms run in
// voxel units (exact) and the distances are rounded once when scaled. Otherwise
// work_scale is the power of two that brings the largest spacing into (0.5, 1]: scaling
// by it is exact, so the results are those of the unscaled arithmetic.
struct Geometry {
  int64_t batch = 0, depth = 1, height = 0, width = 0;
  int spatial = 2;
  std::array<double, 3> spacing{1.0, 1.0, 1.0};
  std::array<double, 3> work_spacing{1.0, 1.0, 1.0};
  double work_scale = 1.0;
  bool unit_work_spacing = true;
  int64_t voxels() const { return depth * height * width; }
  // The largest finite squared distance, in voxel units: sum of (n - 1)^2 over the axes.
  double max_squared_extent() const {
    const double d = static_cast<double>(depth - 1), h = static_cast<double>(height - 1),
                 w = static_cast<double>(width - 1);
    return d * d + h * h + w * w;
  }
};

// Validates a mask (B, H, W) / (B, D, H, W) of bool, integer (signed or unsigned) or
// floating dtype (non-zero means foreground; NaN is rejected) and the spacing (one
// positive finite value per spatial axis, or none; largest / smallest at most 2^500).
// `name` is the argument's name in messages.
Geometry mask_geometry(const at::Tensor& mask, std::optional<at::ArrayRef<double>> spacing, const char* op,
                       const char* name);

// The mask as a contiguous bool tensor (mask != 0, canonical 0/1 bytes), on the mask's
// device. On CUDA the NaN check is asynchronous (no device synchronisation): a NaN
// raises a device-side assertion at a later synchronising call.
at::Tensor as_bool(const at::Tensor& mask, const char* op, const char* name);

// CPU: the mask's foreground as a contiguous tensor of bytes, 0 = background and any
// other byte = foreground. bool, uint8 and int8 masks are used as they are (no copy when
// contiguous; a bool byte of 2, as from a uint8 tensor viewed as bool, is foreground,
// as in torch); other dtypes are converted in one pass that also rejects NaN.
at::Tensor foreground_bytes(const at::Tensor& mask, const char* op, const char* name);

// CPU: a zero-filled contiguous tensor from calloc: the pages that a kernel never writes
// are never touched (no page faults, no zeroing by this process), which is most of the
// output of a transform or a labelling whose foreground is small. Raises a clear error
// when the memory cannot be had.
at::Tensor zeroed_cpu(at::IntArrayRef sizes, at::ScalarType dtype, const char* op);

// Raises, before anything is allocated or copied, when an operator would need more bytes
// than this machine has memory (e.g. a huge expanded input, which costs nothing until
// it is made contiguous).
void check_memory(double bytes, const at::Tensor& mask, const char* op);

// edt: raises unless every finite distance of this geometry (its square when squared)
// is a normal number of out_dtype: the largest below the type's maximum, the smallest
// step above its smallest normal value.
void check_edt_range(const Geometry& g, at::ScalarType out_dtype, bool squared);

// Raises unless `other` has the shape and device of `mask`.
void check_same_shape(const at::Tensor& mask, const at::Tensor& other, const char* op, const char* name_a,
                      const char* name_b);

// The output dtype of edt: float32 unless float64 is asked for.
at::ScalarType edt_dtype(std::optional<at::ScalarType> dtype);

// Whether a transform of this geometry works in double rather than float (the CPU and
// the GPU kernels both ask this, so that they round alike): for float64 output; for
// unit work spacing once squared distances may reach 2^24 (float holds integers exactly
// below it); for work spacing so uneven that squared steps would come near float's
// smallest normal number.
bool work_in_double(const Geometry& g, at::ScalarType out_dtype);

// Validates connectivity for the mask's number of spatial axes (2D: 4 or 8; 3D: 6, 18 or
// 26) and returns the largest number of non-zero offsets of a neighbour (1, 2 or 3).
int connectivity_order(int64_t connectivity, int spatial, const char* op);

void check_lambda(double lam, const char* op);

}  // namespace distance
}  // namespace mtseg
