// CUDA kernels of the distance operators (edt, connected_components, levelset_grow,
// grow_instances). The kernel bodies are the functors of mtseg/components.h and
// mtseg/distance_lines.h and the sequence of launches is mtseg/distance_device.h; the
// same code runs in CI as a CPU emulation of these launches
// (csrc/cpu/distance_emulated.cpp). This file only maps the executor interface onto
// CUDA launches:
//  * threads(n, K): grid-stride loop, 256 threads a block;
//  * steps(n, K): every thread runs its state machine to the end;
//  * warps(n, bytes, K): a warp per item with `bytes` of shared memory, as many warps a
//    block as fit in kSharedBudget (at most 8); an item needing more than that gets its
//    workspace in global memory instead, for a bounded number of resident warps.
// Exact like the CPU kernels: same working types, intersections in double, no fast math
// (-fmad=false). No operator synchronises the device except grow_instances (two small
// read-backs that size its per-seed work; see distance_device.h).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <map>
#include <mutex>

#include "mtseg/distance_device.h"

namespace mtseg {
namespace distance {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kSharedBudget = 96 * 1024;  // shared memory per block (two blocks fit an SM of sm_80/sm_90)
constexpr int kMaxWarpsPerBlock = 8;

template <typename K>
__global__ void __launch_bounds__(kThreads) threads_kernel(int64_t n, K k) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x)
    k(i);
}

template <typename K>
__global__ void __launch_bounds__(kThreads) steps_kernel(int64_t n, K k) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    typename K::State s;
    if (!k.begin(i, s)) continue;
    while (!k.step(s)) {
    }
  }
}

template <typename K>
__global__ void warps_kernel(int64_t n, K k, unsigned char* global_workspace, int64_t bytes) {
  extern __shared__ __align__(16) unsigned char shared[];
  const int per_block = blockDim.x / launch::kWarpSize, warp = threadIdx.x / launch::kWarpSize;
  const int64_t slot = blockIdx.x * static_cast<int64_t>(per_block) + warp;
  unsigned char* ws = global_workspace != nullptr ? global_workspace + slot * bytes : shared + warp * bytes;
  launch::DeviceWarp w;
  // wi is the same for the 32 lanes, so the loop and the functor's collectives are warp-uniform.
  for (int64_t wi = slot; wi < n; wi += static_cast<int64_t>(gridDim.x) * per_block) k(w, wi, ws);
}

struct CudaExecutor {
  cudaStream_t stream;
  int sms;
  int64_t shared_budget;

  CudaExecutor() {
    stream = c10::cuda::getCurrentCUDAStream();
    const auto& p = properties(c10::cuda::current_device());
    sms = p.sms;
    shared_budget = std::min<int64_t>(kSharedBudget, p.shared_optin);
  }

  // Device attributes, read once per device (no driver call per operator call, none
  // while a CUDA graph is being captured after a first call).
  struct Properties {
    int sms = 0, shared_optin = 0;
  };
  static const Properties& properties(int device) {
    static std::mutex mutex;
    static std::map<int, Properties> cache;
    const std::lock_guard<std::mutex> lock(mutex);
    auto it = cache.find(device);
    if (it == cache.end()) {
      Properties p;
      C10_CUDA_CHECK(cudaDeviceGetAttribute(&p.sms, cudaDevAttrMultiProcessorCount, device));
      C10_CUDA_CHECK(cudaDeviceGetAttribute(&p.shared_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
      it = cache.emplace(device, p).first;
    }
    return it->second;
  }

  // Raises the dynamic shared memory limit of warps_kernel<K> on this device once, to
  // the largest size asked for so far.
  template <typename K>
  static void allow_shared(size_t bytes) {
    static std::mutex mutex;
    static std::map<int, size_t> allowed;
    const int device = c10::cuda::current_device();
    const std::lock_guard<std::mutex> lock(mutex);
    size_t& a = allowed[device];
    if (bytes <= a) return;
    C10_CUDA_CHECK(
        cudaFuncSetAttribute(warps_kernel<K>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
    a = bytes;
  }

  unsigned int blocks(int64_t items, int64_t per_block, int64_t per_sm) const {
    const int64_t b = (items + per_block - 1) / per_block;
    return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(b, per_sm * sms)));
  }

  template <typename K>
  void threads(int64_t n, const K& k) {
    if (n <= 0) return;
    threads_kernel<K><<<blocks(n, kThreads, 32), kThreads, 0, stream>>>(n, k);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <typename K>
  void steps(int64_t n, const K& k) {
    if (n <= 0) return;
    steps_kernel<K><<<blocks(n, kThreads, 32), kThreads, 0, stream>>>(n, k);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <typename K>
  void warps(int64_t n, int64_t bytes, const K& k, const at::TensorOptions& opts) {
    if (n <= 0) return;
    bytes = (bytes + 15) & ~int64_t{15};
    if (bytes <= shared_budget) {
      const int per_block =
          bytes == 0 ? kMaxWarpsPerBlock
                     : static_cast<int>(std::clamp<int64_t>(shared_budget / bytes, 1, kMaxWarpsPerBlock));
      const size_t shared = static_cast<size_t>(per_block * bytes);
      if (shared > 48 * 1024) allow_shared<K>(shared);
      warps_kernel<K><<<blocks(n, per_block, 64 / per_block), per_block * launch::kWarpSize, shared, stream>>>(
          n, k, nullptr, bytes);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    // Long lines: workspaces in global memory for a bounded number of resident warps.
    constexpr int per_block = 4;
    const unsigned int grid = blocks(n, per_block, 8);
    auto workspace = at::empty({static_cast<int64_t>(grid) * per_block * bytes}, opts.dtype(at::kByte));
    warps_kernel<K><<<grid, per_block * launch::kWarpSize, 0, stream>>>(
        n, k, static_cast<unsigned char*>(workspace.data_ptr()), bytes);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

// The device of `t` when it is a CUDA tensor; otherwise none, so that the argument checks
// report the device mismatch (a CUDA kernel reached with one CPU argument).
struct DeviceGuard {
  c10::cuda::OptionalCUDAGuard guard;
  explicit DeviceGuard(const at::Tensor& t) {
    if (t.is_cuda()) guard.set_device(t.device());
  }
};

at::Tensor edt_cuda(const at::Tensor& mask, std::optional<at::ArrayRef<double>> spacing, bool squared, bool is_signed,
                    std::optional<at::ScalarType> dtype) {
  DeviceGuard guard(mask);
  CudaExecutor ex;
  return device::edt(ex, mask, spacing, squared, is_signed, dtype);
}

std::tuple<at::Tensor, at::Tensor> connected_components_cuda(const at::Tensor& mask, int64_t connectivity) {
  DeviceGuard guard(mask);
  CudaExecutor ex;
  return device::connected_components(ex, mask, connectivity);
}

at::Tensor levelset_grow_cuda(const at::Tensor& approx, const at::Tensor& seg, double lam,
                              std::optional<at::ArrayRef<double>> spacing) {
  DeviceGuard guard(approx);
  CudaExecutor ex;
  return device::levelset_grow(ex, approx, seg, lam, spacing);
}

at::Tensor grow_instances_cuda(const at::Tensor& seeds, const at::Tensor& seg, double lam,
                               std::optional<at::ArrayRef<double>> spacing, int64_t connectivity) {
  DeviceGuard guard(seeds);
  CudaExecutor ex;
  return device::grow_instances(ex, seeds, seg, lam, spacing, connectivity);
}

}  // namespace

TORCH_LIBRARY_IMPL(mtseg, CUDA, m) {
  m.impl("edt", &edt_cuda);
  m.impl("connected_components", &connected_components_cuda);
  m.impl("levelset_grow", &levelset_grow_cuda);
  m.impl("grow_instances", &grow_instances_cuda);
}

}  // namespace distance
}  // namespace mtseg
