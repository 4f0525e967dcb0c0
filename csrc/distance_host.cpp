#include "mtseg/distance_host.h"
#include "mtseg/checks.h"

#include <c10/util/Exception.h>

#include <cmath>

namespace mtseg {
namespace distance {

namespace {

bool supported_dtype(at::ScalarType t) {
  switch (t) {
    case at::kBool:
    case at::kByte:
    case at::kChar:
    case at::kShort:
    case at::kInt:
    case at::kLong:
    case at::kHalf:
    case at::kBFloat16:
    case at::kFloat:
    case at::kDouble:
      return true;
    default:
      return false;
  }
}

}  // namespace

Geometry mask_geometry(const at::Tensor& mask, std::optional<at::ArrayRef<double>> spacing, const char* op,
                       const char* name) {
  TORCH_CHECK_VALUE(mask.dim() == 3 || mask.dim() == 4, op, ": expected ", name,
                    " of shape (B, H, W) or (B, D, H, W), got a ", mask.dim(), "-d tensor of shape ", shape_of(mask));
  TORCH_CHECK_TYPE(supported_dtype(mask.scalar_type()), op, ": expected ", name,
                   " of dtype bool, an integer type or a floating type (non-zero = foreground), got ",
                   mask.scalar_type());
  Geometry g;
  g.spatial = static_cast<int>(mask.dim()) - 1;
  g.batch = mask.size(0);
  if (g.spatial == 3) g.depth = mask.size(1);
  g.height = mask.size(-2);
  g.width = mask.size(-1);
  if (spacing.has_value()) {
    const auto s = *spacing;
    TORCH_CHECK_VALUE(static_cast<int>(s.size()) == g.spatial, op, ": spacing must have one value per spatial axis (",
                      g.spatial, " for ", name, " of shape ", shape_of(mask), "), got ", s.size());
    for (size_t i = 0; i < s.size(); ++i) {
      TORCH_CHECK_VALUE(std::isfinite(s[i]) && s[i] > 0.0, op, ": spacing must be positive and finite, got ", s[i],
                        " for axis ", i);
    }
    for (int i = 0; i < g.spatial; ++i) g.spacing[3 - g.spatial + i] = s[i];
    g.unit_spacing = true;
    for (double v : s) g.unit_spacing = g.unit_spacing && v == 1.0;
  }
  return g;
}

at::Tensor as_bool(const at::Tensor& mask, const char* op, const char* name) {
  if (mask.scalar_type() == at::kBool) return mask.contiguous();
  if (at::isFloatingType(mask.scalar_type()) && mask.numel() > 0) {
    TORCH_CHECK_VALUE(!at::isnan(mask).any().item<bool>(), op, ": ", name,
                      " contains NaN; a mask must be 0 (background) or non-zero (foreground)");
  }
  return mask.ne(0).contiguous();
}

void check_same_shape(const at::Tensor& a, const at::Tensor& b, const char* op, const char* name_a,
                      const char* name_b) {
  TORCH_CHECK_VALUE(a.sizes() == b.sizes(), op, ": ", name_a, " and ", name_b, " must have the same shape, got ",
                    shape_of(a), " and ", shape_of(b));
  TORCH_CHECK_VALUE(a.device() == b.device(), op, ": ", name_a, " and ", name_b,
                    " must be on the same device, got ", a.device(), " and ", b.device());
}

at::ScalarType edt_dtype(std::optional<at::ScalarType> dtype) {
  if (!dtype.has_value()) return at::kFloat;
  TORCH_CHECK_TYPE(*dtype == at::kFloat || *dtype == at::kDouble,
                   "edt: dtype must be torch.float32 or torch.float64, got ", *dtype);
  return *dtype;
}

bool needs_double(const Geometry& g, at::ScalarType out_dtype) {
  if (out_dtype == at::kDouble) return true;
  return g.unit_spacing && g.max_squared_extent() >= 16777216.0;
}

int connectivity_order(int64_t connectivity, int spatial, const char* op) {
  if (spatial == 2) {
    TORCH_CHECK_VALUE(connectivity == 4 || connectivity == 8, op,
                      ": connectivity for 2D masks (B, H, W) must be 4 or 8, got ", connectivity);
    return connectivity == 4 ? 1 : 2;
  }
  TORCH_CHECK_VALUE(connectivity == 6 || connectivity == 18 || connectivity == 26, op,
                    ": connectivity for 3D masks (B, D, H, W) must be 6, 18 or 26, got ", connectivity);
  return connectivity == 6 ? 1 : (connectivity == 18 ? 2 : 3);
}

void check_lambda(double lam, const char* op) {
  TORCH_CHECK_VALUE(std::isfinite(lam) && lam >= 0.0, op, ": lam must be finite and >= 0, got ", lam);
}

}  // namespace distance
}  // namespace mtseg
