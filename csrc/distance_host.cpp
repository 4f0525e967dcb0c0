#include "mtseg/distance_host.h"
#include "mtseg/checks.h"

#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdlib>
#include <type_traits>

#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#endif

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
    case at::kUInt16:
    case at::kUInt32:
    case at::kUInt64:
    case at::kHalf:
    case at::kBFloat16:
    case at::kFloat:
    case at::kDouble:
      return true;
    default:
      return false;
  }
}

// Mask bytes of `n` values: out[i] = (in[i] != 0); true when a value is NaN.
template <typename V>
bool to_bytes(const V* __restrict in, int64_t n, uint8_t* __restrict out) {
  bool nan = false;
  for (int64_t i = 0; i < n; ++i) {
    const V v = in[i];
    out[i] = v != V(0);
    if constexpr (!std::is_integral_v<V>) nan |= v != v;
  }
  return nan;
}

// Half and bfloat16 as their bits: zero is +0 / -0 (bits & 0x7fff == 0), NaN is an
// all-ones exponent with a non-zero mantissa.
bool half_to_bytes(const uint16_t* __restrict in, int64_t n, uint16_t exponent, uint8_t* __restrict out) {
  bool nan = false;
  for (int64_t i = 0; i < n; ++i) {
    const uint16_t magnitude = in[i] & 0x7fff;
    out[i] = magnitude != 0;
    nan |= magnitude > exponent;
  }
  return nan;
}

void free_zeroed(void* p) { std::free(p); }

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
    double smallest = INFINITY, largest = 0.0;
    for (size_t i = 0; i < s.size(); ++i) {
      TORCH_CHECK_VALUE(std::isfinite(s[i]) && s[i] > 0.0, op, ": spacing must be positive and finite, got ", s[i],
                        " for axis ", i);
      smallest = std::min(smallest, s[i]);
      largest = std::max(largest, s[i]);
    }
    // Beyond this ratio the squares of the scaled spacings would leave double's range.
    TORCH_CHECK_VALUE(!(std::ldexp(largest, -500) > smallest), op,
                      ": the spacing values differ by too much (largest / smallest must be at most 2^500), got ",
                      s);
    for (int i = 0; i < g.spatial; ++i) g.spacing[3 - g.spatial + i] = s[i];
    if (smallest == largest) {
      // isotropic: the transforms run in voxel units (exact integer arithmetic) and the
      // distances are multiplied by the spacing once at the end
      g.work_scale = largest;
    } else {
      int e = 0;
      const double m = std::frexp(largest, &e);  // largest = m * 2^e, m in [0.5, 1)
      g.work_scale = std::ldexp(1.0, m == 0.5 ? e - 1 : e);
    }
    g.unit_work_spacing = true;
    for (int i = 3 - g.spatial; i < 3; ++i) {
      g.work_spacing[i] = g.spacing[i] / g.work_scale;
      g.unit_work_spacing = g.unit_work_spacing && g.work_spacing[i] == 1.0;
    }
  }
  return g;
}

at::Tensor as_bool(const at::Tensor& mask, const char* op, const char* name) {
  if (mask.scalar_type() == at::kBool) {
    // canonical 0/1 bytes: a bool byte of 2 (a uint8 tensor viewed as bool) is foreground
    return mask.view(at::kByte).ne(0).contiguous();
  }
  if (at::isFloatingType(mask.scalar_type()) && mask.numel() > 0) {
    const auto has_nan = at::isnan(mask).any();
    if (mask.is_cpu()) {
      TORCH_CHECK_VALUE(!has_nan.item<bool>(), op, ": ", name,
                        " contains NaN; a mask must be 0 (background) or non-zero (foreground)");
    } else {
      // no .item(): that would synchronise the device on every call
      at::_assert_async(has_nan.logical_not(), "mask contains NaN; a mask must be 0 (background) or non-zero");
    }
  }
  return mask.ne(0).contiguous();
}

at::Tensor foreground_bytes(const at::Tensor& mask, const char* op, const char* name) {
  const auto t = mask.scalar_type();
  if (t == at::kBool || t == at::kByte || t == at::kChar) return mask.contiguous();
  const auto in = mask.contiguous();
  auto out = at::empty(in.sizes(), in.options().dtype(at::kByte));
  const int64_t n = in.numel();
  uint8_t* o = out.data_ptr<uint8_t>();
  const void* p = in.const_data_ptr();
  bool nan = false;
  switch (t) {
    case at::kShort: nan = to_bytes(static_cast<const int16_t*>(p), n, o); break;
    case at::kInt: nan = to_bytes(static_cast<const int32_t*>(p), n, o); break;
    case at::kLong: nan = to_bytes(static_cast<const int64_t*>(p), n, o); break;
    case at::kUInt16: nan = to_bytes(static_cast<const uint16_t*>(p), n, o); break;
    case at::kUInt32: nan = to_bytes(static_cast<const uint32_t*>(p), n, o); break;
    case at::kUInt64: nan = to_bytes(static_cast<const uint64_t*>(p), n, o); break;
    case at::kFloat: nan = to_bytes(static_cast<const float*>(p), n, o); break;
    case at::kDouble: nan = to_bytes(static_cast<const double*>(p), n, o); break;
    case at::kHalf: nan = half_to_bytes(static_cast<const uint16_t*>(p), n, 0x7c00, o); break;
    case at::kBFloat16: nan = half_to_bytes(static_cast<const uint16_t*>(p), n, 0x7f80, o); break;
    default: TORCH_CHECK_TYPE(false, op, ": unsupported dtype ", t, " for ", name);
  }
  TORCH_CHECK_VALUE(!nan, op, ": ", name, " contains NaN; a mask must be 0 (background) or non-zero (foreground)");
  return out;
}

at::Tensor zeroed_cpu(at::IntArrayRef sizes, at::ScalarType dtype, const char* op) {
  const int64_t n = c10::multiply_integers(sizes);
  const size_t bytes = static_cast<size_t>(n) * c10::elementSize(dtype);
  void* p = std::calloc(bytes > 0 ? bytes : 1, 1);
  TORCH_CHECK_WITH(OutOfMemoryError, p != nullptr, op, ": could not allocate ", bytes, " bytes for an output of shape ",
                   sizes, " and dtype ", dtype);
  c10::DataPtr data(p, p, &free_zeroed, at::Device(at::kCPU));
  c10::Storage storage(c10::Storage::use_byte_size_t(), bytes, std::move(data), c10::GetCPUAllocator(),
                       /*resizable=*/true);
  return at::empty({0}, at::TensorOptions().dtype(dtype).device(at::kCPU)).set_(storage, 0, sizes);
}

void check_memory(double bytes, const at::Tensor& mask, const char* op) {
#if defined(_SC_PHYS_PAGES) && defined(_SC_PAGESIZE)
  const double total = static_cast<double>(sysconf(_SC_PHYS_PAGES)) * static_cast<double>(sysconf(_SC_PAGESIZE));
  TORCH_CHECK_VALUE(!(total > 0.0) || bytes <= total, op, ": an input of shape ", shape_of(mask), " needs about ",
                    bytes / 1073741824.0, " GiB of memory for its output and working copies, more than this machine's ",
                    total / 1073741824.0, " GiB");
#else
  (void)bytes;
  (void)mask;
  (void)op;
#endif
}

void check_edt_range(const Geometry& g, at::ScalarType out_dtype, bool squared) {
  const double type_max = out_dtype == at::kDouble ? DBL_MAX : FLT_MAX;
  const double type_min = out_dtype == at::kDouble ? DBL_MIN : FLT_MIN;
  // in units of work_scale
  double far = 0.0, step = INFINITY;
  const int64_t n[3] = {g.depth, g.height, g.width};
  for (int i = 3 - g.spatial; i < 3; ++i) {
    const double d = static_cast<double>(std::max<int64_t>(n[i] - 1, 0)) * g.work_spacing[i];
    far += d * d;
    step = std::min(step, g.work_spacing[i]);
  }
  far = std::sqrt(far);
  // log2 of the largest distance and of the smallest, in physical units
  const double log_far = far > 0.0 ? std::log2(far) + std::log2(g.work_scale) : -INFINITY;
  const double log_step = std::log2(step) + std::log2(g.work_scale);
  const double k = squared ? 2.0 : 1.0;
  TORCH_CHECK_VALUE(k * log_far < std::log2(type_max) && k * log_step >= std::log2(type_min),
                    "edt: with spacing ", at::ArrayRef<double>(g.spacing.data() + 3 - g.spatial, g.spatial),
                    " the ", squared ? "squared " : "", "distances of a mask of this size (from about 2^",
                    k * log_step, " to 2^", k * log_far, ") do not fit ", out_dtype,
                    "; use dtype=torch.float64 or a spacing in other units");
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

bool work_in_double(const Geometry& g, at::ScalarType out_dtype) {
  if (out_dtype == at::kDouble) return true;
  if (g.unit_work_spacing) return g.max_squared_extent() >= 16777216.0;
  double smallest = 1.0;
  for (int i = 3 - g.spatial; i < 3; ++i) smallest = std::min(smallest, g.work_spacing[i]);
  return smallest < std::ldexp(1.0, -40);
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
