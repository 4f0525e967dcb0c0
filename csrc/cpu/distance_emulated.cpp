// CPU emulation of the CUDA distance kernels, for tests: the private operators
//   torch.ops.mtseg._edt_emulated, _connected_components_emulated,
//   _levelset_grow_emulated, _grow_instances_emulated
// take CPU tensors and run exactly the launch sequence of csrc/cuda/distance.cu
// (mtseg/distance_device.h) and its kernel bodies (mtseg/components.h,
// mtseg/distance_lines.h), with every launch replaced by serial loops over its threads,
// warps and lanes. `schedule` picks the order, to replay what a GPU may do:
//   0  threads, warps and lanes in index order;
//   1  all in reverse order;
//   2  a random permutation per launch (and per warp for its lanes), from `seed`;
//   3  as 2, and the union-find steps of all threads of the merge launch interleaved at
//      random, one memory access at a time (the races of concurrent unions).
// Results must not depend on the schedule; the tests check that, and compare with the
// CPU operators and scipy. Slow (one thread, no vectorisation): test-sized inputs only.
// _grow_instances_emulated also takes arena_budget (voxels of seed boxes per round,
// 0 = the CUDA default), so that tests reach the multi-round path with small inputs.
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#include "mtseg/distance_device.h"

namespace mtseg {
namespace distance {
namespace {

enum Schedule : int64_t { kInOrder = 0, kReversed = 1, kPermuted = 2, kInterleaved = 3 };

class EmulatedExecutor {
 public:
  EmulatedExecutor(int64_t schedule, int64_t seed) : schedule_(schedule), rng_(static_cast<uint64_t>(seed)) {
    TORCH_CHECK_VALUE(schedule >= kInOrder && schedule <= kInterleaved,
                      "emulated distance kernels: schedule must be 0 (in order), 1 (reversed), 2 (permuted) or 3 "
                      "(permuted and interleaved), got ",
                      schedule);
  }

  template <typename K>
  void threads(int64_t n, const K& k) {
    for (int64_t i : order(n)) k(i);
  }

  template <typename K>
  void warps(int64_t n, int64_t bytes, const K& k, const at::TensorOptions&) {
    std::vector<std::max_align_t> workspace(static_cast<size_t>(bytes) / sizeof(std::max_align_t) + 1);
    int lanes[launch::kWarpSize];
    launch::HostWarp w{lanes};
    for (int64_t wi : order(n)) {
      lane_order(lanes);
      k(w, wi, reinterpret_cast<unsigned char*>(workspace.data()));
    }
  }

  template <typename K>
  void steps(int64_t n, const K& k) {
    using State = typename K::State;
    if (schedule_ != kInterleaved) {
      for (int64_t i : order(n)) {
        State s;
        if (!k.begin(i, s)) continue;
        while (!k.step(s)) {
        }
      }
      return;
    }
    std::vector<State> running;
    for (int64_t i : order(n)) {
      State s;
      if (k.begin(i, s)) running.push_back(s);
    }
    while (!running.empty()) {
      const size_t j = static_cast<size_t>(rng_() % running.size());
      if (k.step(running[j])) {
        running[j] = running.back();
        running.pop_back();
      }
    }
  }

 private:
  std::vector<int64_t> order(int64_t n) {
    std::vector<int64_t> o(static_cast<size_t>(std::max<int64_t>(n, 0)));
    std::iota(o.begin(), o.end(), int64_t{0});
    if (schedule_ == kReversed) std::reverse(o.begin(), o.end());
    if (schedule_ >= kPermuted) std::shuffle(o.begin(), o.end(), rng_);
    return o;
  }

  void lane_order(int* lanes) {
    std::iota(lanes, lanes + launch::kWarpSize, 0);
    if (schedule_ == kReversed) std::reverse(lanes, lanes + launch::kWarpSize);
    if (schedule_ >= kPermuted) std::shuffle(lanes, lanes + launch::kWarpSize, rng_);
  }

  int64_t schedule_;
  std::mt19937_64 rng_;
};

void check_cpu(const at::Tensor& t, const char* op) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": the emulated GPU kernels take CPU tensors, got one on ", t.device());
}

at::Tensor edt_emulated(const at::Tensor& mask, std::optional<at::ArrayRef<double>> spacing, bool squared,
                        bool is_signed, std::optional<at::ScalarType> dtype, int64_t schedule, int64_t seed) {
  check_cpu(mask, "_edt_emulated");
  EmulatedExecutor ex(schedule, seed);
  return device::edt(ex, mask, spacing, squared, is_signed, dtype);
}

std::tuple<at::Tensor, at::Tensor> connected_components_emulated(const at::Tensor& mask, int64_t connectivity,
                                                                 int64_t schedule, int64_t seed) {
  check_cpu(mask, "_connected_components_emulated");
  EmulatedExecutor ex(schedule, seed);
  return device::connected_components(ex, mask, connectivity);
}

at::Tensor levelset_grow_emulated(const at::Tensor& approx, const at::Tensor& seg, double lam,
                                  std::optional<at::ArrayRef<double>> spacing, int64_t schedule, int64_t seed) {
  check_cpu(approx, "_levelset_grow_emulated");
  check_cpu(seg, "_levelset_grow_emulated");
  EmulatedExecutor ex(schedule, seed);
  return device::levelset_grow(ex, approx, seg, lam, spacing);
}

at::Tensor grow_instances_emulated(const at::Tensor& seeds, const at::Tensor& seg, double lam,
                                   std::optional<at::ArrayRef<double>> spacing, int64_t connectivity,
                                   int64_t schedule, int64_t seed, int64_t arena_budget) {
  check_cpu(seeds, "_grow_instances_emulated");
  check_cpu(seg, "_grow_instances_emulated");
  TORCH_CHECK_VALUE(arena_budget >= 0, "_grow_instances_emulated: arena_budget must be >= 0 (0 = automatic), got ",
                    arena_budget);
  EmulatedExecutor ex(schedule, seed);
  return device::grow_instances(ex, seeds, seg, lam, spacing, connectivity, arena_budget);
}

// Meta kernels: shapes and dtypes only, so the private operators trace under FakeTensor.
at::Tensor edt_emulated_meta(const at::Tensor& mask, std::optional<at::ArrayRef<double>>, bool, bool,
                             std::optional<at::ScalarType> dtype, int64_t, int64_t) {
  return at::empty(mask.sizes(), mask.options().dtype(edt_dtype(dtype)));
}

std::tuple<at::Tensor, at::Tensor> connected_components_emulated_meta(const at::Tensor& mask, int64_t, int64_t,
                                                                      int64_t) {
  TORCH_CHECK_VALUE(mask.dim() == 3 || mask.dim() == 4, "_connected_components_emulated: expected (B, H, W) or "
                    "(B, D, H, W), got a ", mask.dim(), "-d tensor");
  return {at::empty(mask.sizes(), mask.options().dtype(at::kInt)),
          at::empty({mask.size(0)}, mask.options().dtype(at::kLong))};
}

at::Tensor levelset_grow_emulated_meta(const at::Tensor& approx, const at::Tensor&, double,
                                       std::optional<at::ArrayRef<double>>, int64_t, int64_t) {
  return at::empty(approx.sizes(), approx.options().dtype(at::kBool));
}

at::Tensor grow_instances_emulated_meta(const at::Tensor& seeds, const at::Tensor&, double,
                                        std::optional<at::ArrayRef<double>>, int64_t, int64_t, int64_t, int64_t) {
  return at::empty(seeds.sizes(), seeds.options().dtype(at::kLong));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mtseg, m) {
  // Private: the CUDA distance kernels emulated on the CPU (tests only; see above).
  m.def(
      "_edt_emulated(Tensor mask, float[]? spacing=None, bool squared=False, bool signed=False, "
      "ScalarType? dtype=None, int schedule=0, int seed=0) -> Tensor");
  m.def("_connected_components_emulated(Tensor mask, int connectivity, int schedule=0, int seed=0) -> (Tensor, Tensor)");
  m.def(
      "_levelset_grow_emulated(Tensor approx, Tensor seg, float lam, float[]? spacing=None, int schedule=0, "
      "int seed=0) -> Tensor");
  m.def(
      "_grow_instances_emulated(Tensor seeds, Tensor seg, float lam, float[]? spacing=None, int connectivity=0, "
      "int schedule=0, int seed=0, int arena_budget=0) -> Tensor");
}

TORCH_LIBRARY_IMPL(mtseg, CPU, m) {
  m.impl("_edt_emulated", &edt_emulated);
  m.impl("_connected_components_emulated", &connected_components_emulated);
  m.impl("_levelset_grow_emulated", &levelset_grow_emulated);
  m.impl("_grow_instances_emulated", &grow_instances_emulated);
}

TORCH_LIBRARY_IMPL(mtseg, Meta, m) {
  m.impl("_edt_emulated", &edt_emulated_meta);
  m.impl("_connected_components_emulated", &connected_components_emulated_meta);
  m.impl("_levelset_grow_emulated", &levelset_grow_emulated_meta);
  m.impl("_grow_instances_emulated", &grow_instances_emulated_meta);
}

}  // namespace distance
}  // namespace mtseg
