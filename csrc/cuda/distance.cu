// CUDA kernels of the distance operators: thin launch shells around the per-line math
// in mtseg/distance.h, which the CPU kernels share (and so CPU tests exercise).
//  * first axis: one thread per column, forward and backward sweeps (adjacent threads
//    read adjacent voxels, so loads coalesce);
//  * every further axis: one thread per line running envelope_line_runs, with its scratch
//    (positions, intersections, values) in global memory; threads stride over the lines.
// Exact like the CPU kernels: same working types, intersections in double, no fast math.
// connected_components and grow_instances have no GPU kernel: they raise
// NotImplementedError on CUDA tensors (the Python wrappers say so before dispatch).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "mtseg/distance.h"
#include "mtseg/distance_host.h"

namespace mtseg {
namespace distance {
namespace {

constexpr int kThreads = 128;
constexpr int64_t kScratchBytes = int64_t{256} << 20;  // bounds the scratch memory of an envelope pass

unsigned int blocks_for(int64_t items) {
  return static_cast<unsigned int>(std::max<int64_t>(1, (items + kThreads - 1) / kThreads));
}

template <typename T>
__global__ void sweep_kernel(const bool* mask, bool invert, int64_t batch, int64_t n0, int64_t r, double spacing,
                             T* work) {
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= batch * r) return;
  const int64_t b = idx / r, x = idx % r;
  const bool* m = mask + b * n0 * r + x;
  T* w = work + b * n0 * r + x;
  T c = inf_value<T>();
  for (int64_t y = 0; y < n0; ++y) {
    c = sweep_forward<T>(m[y * r] != invert, c);
    w[y * r] = c;
  }
  T next = inf_value<T>();
  for (int64_t y = n0 - 1; y >= 0; --y) {
    next = sweep_backward<T>(w[y * r], next);
    w[y * r] = sweep_square<T>(next, spacing);
  }
}

// Lines along an axis of length n and element stride `stride`: line l starts at
// (l / inner) * n * inner + l % inner, with inner = stride (the product of later axes).
template <typename T, typename O>
__global__ void envelope_kernel(const T* in, O* out, int64_t lines, int64_t n, int64_t inner, double s2,
                                bool take_sqrt, int64_t threads, int64_t* v, double* zn, double* zd, T* fv) {
  // `threads` scratch slots exist; the grid may round up beyond them.
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (t >= threads) return;
  for (int64_t l = t; l < lines; l += threads) {
    const int64_t base = (l / inner) * n * inner + l % inner;
    envelope_line_runs<T, O>(in + base, inner, n, s2, v + t * n, zn + t * n, zd + t * n, fv + t * n, out + base, inner,
                             take_sqrt);
  }
}

template <typename T, typename O>
void envelope_pass(const T* in, O* out, int64_t lines, int64_t n, int64_t inner, double s2, bool take_sqrt,
                   const at::TensorOptions& opts, cudaStream_t stream) {
  if (lines == 0 || n == 0) return;
  // 32 bytes of scratch per line element and thread (v, zn, zd, fv)
  const int64_t threads = std::min<int64_t>(lines, std::max<int64_t>(1024, kScratchBytes / (32 * n)));
  auto v = at::empty({threads * n}, opts.dtype(at::kLong));
  auto zn = at::empty({threads * n}, opts.dtype(at::kDouble));
  auto zd = at::empty({threads * n}, opts.dtype(at::kDouble));
  auto fv = at::empty({threads * n}, opts.dtype(c10::CppTypeToScalarType<T>::value));
  envelope_kernel<T, O><<<blocks_for(threads), kThreads, 0, stream>>>(
      in, out, lines, n, inner, s2, take_sqrt, threads, v.data_ptr<int64_t>(), zn.data_ptr<double>(), zd.data_ptr<double>(), fv.template data_ptr<T>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename O>
void edt_batch_cuda(const bool* mask, bool invert, const Geometry& g, T* work, O* out, bool take_sqrt,
                    const at::TensorOptions& opts) {
  const int64_t V = g.voxels(), B = g.batch;
  if (B == 0 || V == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const bool is3d = g.spatial == 3;
  const int64_t n0 = is3d ? g.depth : g.height;
  const int64_t r = is3d ? g.height * g.width : g.width;
  sweep_kernel<T><<<blocks_for(B * r), kThreads, 0, stream>>>(mask, invert, B, n0, r,
                                                               is3d ? g.spacing[0] : g.spacing[1], work);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (is3d) {
    envelope_pass<T, T>(work, work, B * g.depth * g.width, g.height, g.width, g.spacing[1] * g.spacing[1], false,
                        opts, stream);
  }
  envelope_pass<T, O>(work, out, B * V / g.width, g.width, 1, g.spacing[2] * g.spacing[2], take_sqrt, opts, stream);
}

at::Tensor edt_of_cuda(const at::Tensor& mask, bool invert, const Geometry& g, at::ScalarType out_dtype,
                       bool take_sqrt) {
  auto out = at::empty(mask.sizes(), mask.options().dtype(out_dtype));
  const bool* m = mask.data_ptr<bool>();
  if (out_dtype == at::kDouble) {
    double* o = out.data_ptr<double>();
    edt_batch_cuda<double, double>(m, invert, g, o, o, take_sqrt, mask.options());
  } else if (needs_double(g, out_dtype)) {
    auto work = at::empty(mask.sizes(), mask.options().dtype(at::kDouble));
    edt_batch_cuda<double, float>(m, invert, g, work.data_ptr<double>(), out.data_ptr<float>(), take_sqrt,
                                  mask.options());
  } else {
    float* o = out.data_ptr<float>();
    edt_batch_cuda<float, float>(m, invert, g, o, o, take_sqrt, mask.options());
  }
  return out;
}

at::Tensor edt_cuda(const at::Tensor& mask_in, std::optional<at::ArrayRef<double>> spacing, bool squared,
                    bool is_signed, std::optional<at::ScalarType> dtype) {
  const auto g = mask_geometry(mask_in, spacing, "edt", "mask");
  const auto out_dtype = edt_dtype(dtype);
  const c10::cuda::CUDAGuard guard(mask_in.device());
  const auto mask = as_bool(mask_in, "edt", "mask");
  if (!is_signed) return edt_of_cuda(mask, false, g, out_dtype, !squared);
  auto inside = edt_of_cuda(mask, false, g, out_dtype, !squared);
  auto outside = edt_of_cuda(mask, true, g, out_dtype, !squared);
  return outside.sub_(inside);
}

template <typename T>
__global__ void levelset_kernel(const bool* a, const T* dA2, const T* dS2, double lam, int64_t n, bool* out) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  out[i] = levelset_inside(a[i], static_cast<double>(dA2[i]), static_cast<double>(dS2[i]), lam);
}

template <typename T>
void levelset_batch_cuda(const at::Tensor& a, const at::Tensor& s, const Geometry& g, double lam, at::Tensor& out) {
  const auto opts = a.options();
  auto dA2 = at::empty(a.sizes(), opts.dtype(c10::CppTypeToScalarType<T>::value));
  auto dS2 = at::empty(a.sizes(), opts.dtype(c10::CppTypeToScalarType<T>::value));
  edt_batch_cuda<T, T>(a.data_ptr<bool>(), true, g, dA2.template data_ptr<T>(), dA2.template data_ptr<T>(), false, opts);
  edt_batch_cuda<T, T>(s.data_ptr<bool>(), false, g, dS2.template data_ptr<T>(), dS2.template data_ptr<T>(), false, opts);
  const int64_t n = a.numel();
  levelset_kernel<T><<<blocks_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      a.data_ptr<bool>(), dA2.template data_ptr<T>(), dS2.template data_ptr<T>(), lam, n, out.data_ptr<bool>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor levelset_grow_cuda(const at::Tensor& approx_in, const at::Tensor& seg_in, double lam,
                              std::optional<at::ArrayRef<double>> spacing) {
  const auto g = mask_geometry(approx_in, spacing, "levelset_grow", "approx");
  mask_geometry(seg_in, spacing, "levelset_grow", "seg");
  check_same_shape(approx_in, seg_in, "levelset_grow", "approx", "seg");
  check_lambda(lam, "levelset_grow");
  const c10::cuda::CUDAGuard guard(approx_in.device());
  const auto a = as_bool(approx_in, "levelset_grow", "approx");
  const auto s = as_bool(seg_in, "levelset_grow", "seg");
  auto out = at::empty(a.sizes(), a.options());
  if (out.numel() == 0) return out;
  if (!g.unit_spacing || needs_double(g, at::kFloat)) {
    levelset_batch_cuda<double>(a, s, g, lam, out);
  } else {
    levelset_batch_cuda<float>(a, s, g, lam, out);
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> connected_components_cuda(const at::Tensor&, int64_t) {
  TORCH_CHECK_NOT_IMPLEMENTED(false,
                              "connected_components: no CUDA kernel yet; call it on a CPU tensor (mask.cpu())");
}

at::Tensor grow_instances_cuda(const at::Tensor&, const at::Tensor&, double, std::optional<at::ArrayRef<double>>,
                               int64_t) {
  TORCH_CHECK_NOT_IMPLEMENTED(false, "grow_instances: no CUDA kernel yet; call it on CPU tensors (.cpu())");
}

}  // namespace

TORCH_LIBRARY_IMPL(mtseg, CUDA, m) {
  m.impl("edt", &edt_cuda);
  m.impl("levelset_grow", &levelset_grow_cuda);
  m.impl("connected_components", &connected_components_cuda);
  m.impl("grow_instances", &grow_instances_cuda);
}

}  // namespace distance
}  // namespace mtseg
