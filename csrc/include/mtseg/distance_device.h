// Host side of the distance operators on a GPU (edt, connected_components,
// levelset_grow, grow_instances): argument checks, buffers, and the sequence of
// launches. Templated on the executor, so that the same sequence runs as CUDA launches
// (csrc/cuda/distance.cu) and as their CPU emulation (csrc/cpu/distance_emulated.cpp,
// the private torch.ops.mtseg.*_emulated operators that CI tests). An executor provides
//   threads(n, K)                  K(i) for every i in [0, n)
//   warps(n, workspace_bytes, K)   K(warp, w, workspace) for every w in [0, n)
//   steps(n, K)                    K.begin(i, state), then K.step(state) until true
// (mtseg/launch.h). Between launches the executor orders memory (a CUDA stream, or
// program order). Only ATen operations that exist on both devices appear here.
//
// Host synchronisation: edt, connected_components and levelset_grow never wait for the
// device (output sizes are known; per-image boxes stay on the device). grow_instances
// reads two small tables back (the number of distinct seeds, then the sizes of their
// boxes) to size its per-seed work, so it synchronises twice per call.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "mtseg/components.h"
#include "mtseg/distance_host.h"
#include "mtseg/distance_lines.h"

namespace mtseg {
namespace distance {
namespace device {

using lines::BoxLines;
using lines::BoxTask;
using lines::DenseLines;
using lines::kPrefixCols;

inline const uint8_t* bytes_of(const at::Tensor& t) { return static_cast<const uint8_t*>(t.data_ptr()); }
inline uint8_t* bytes_of(at::Tensor& t) { return static_cast<uint8_t*>(t.data_ptr()); }
inline BoxTask* tasks_of(const at::Tensor& t) { return reinterpret_cast<BoxTask*>(t.data_ptr<int64_t>()); }

// The sizes (depth, height, width) of a geometry and the axis of its first pass.
struct Axes {
  int64_t dims[3];
  int first;  // 0 (3D) or 1 (2D: depth is 1)
  explicit Axes(const Geometry& g) : dims{g.depth, g.height, g.width}, first(g.spatial == 3 ? 0 : 1) {}
  int64_t inner(int axis) const {
    int64_t r = 1;
    for (int a = axis + 1; a < 3; ++a) r *= dims[a];
    return r;
  }
};

template <typename Backend, typename Lines, typename T, typename O>
void envelope_pass(Backend& be, const Lines& lines, int64_t count, int64_t max_n, const T* in, O* out, double s2,
                   bool take_sqrt, double out_scale, const at::TensorOptions& opts) {
  using K = lines::EnvelopeKernel<Lines, T, O>;
  be.warps(count, K::workspace_bytes(max_n), K{lines, in, out, s2, take_sqrt, out_scale, max_n}, opts);
}

// Squared distances (or distances) of a batch of images: the layout of edt_batch on the
// CPU. `work` (T) holds the passes, `out` (O) the result; they may be the same memory.
// As on the CPU, the passes run with g.work_spacing (in units of g.work_scale) and the
// last one multiplies its results by out_scale (work_scale, or its square when squared).
template <typename Backend, typename T, typename O>
void edt_dense(Backend& be, const uint8_t* mask, bool invert, const Geometry& g, T* work, O* out, bool take_sqrt,
               double out_scale, const at::TensorOptions& opts) {
  const int64_t total = g.batch * g.voxels();
  if (total == 0) return;
  const Axes ax(g);
  const int a0 = ax.first;
  const auto& ws = g.work_spacing;
  const DenseLines cols{ax.dims[a0], ax.inner(a0), total / ax.dims[a0]};
  be.threads(cols.count, lines::SweepKernel<DenseLines, T>{cols, mask, invert, ws[a0], work});
  if (g.spatial == 3) {
    const DenseLines mid{ax.dims[1], ax.inner(1), total / ax.dims[1]};
    envelope_pass(be, mid, mid.count, mid.n, static_cast<const T*>(work), work, ws[1] * ws[1], false, 1.0, opts);
  }
  const DenseLines rows{ax.dims[2], 1, total / ax.dims[2]};
  envelope_pass(be, rows, rows.count, rows.n, static_cast<const T*>(work), out, ws[2] * ws[2], take_sqrt, out_scale,
                opts);
}

// Squared distances, in units of g.work_scale, on the boxes of tasks [t0, t1) packed in
// an arena (as edt_batch on each box, batch 1); `launch[a]` bounds the lines along axis a
// (exact or an upper bound; lines past the device-side total return at once), `max_n`
// the box sizes.
template <typename Backend, typename T>
void edt_boxes(Backend& be, const BoxTask* tasks, const int64_t* prefix, int64_t t0, int64_t t1,
               const int64_t launch[3], const Axes& ax, const Geometry& g, const uint8_t* mask, bool invert, T* work,
               const at::TensorOptions& opts) {
  const int a0 = ax.first;
  const auto& ws = g.work_spacing;
  be.threads(launch[a0], lines::SweepKernel<BoxLines, T>{BoxLines{tasks, prefix, t0, t1, a0}, mask, invert, ws[a0],
                                                           work});
  for (int axis = a0 + 1; axis < 3; ++axis) {
    envelope_pass(be, BoxLines{tasks, prefix, t0, t1, axis}, launch[axis], ax.dims[axis], static_cast<const T*>(work),
                  work, ws[axis] * ws[axis], false, 1.0, opts);
  }
}

template <typename Backend>
at::Tensor edt_of(Backend& be, const at::Tensor& mask, bool invert, const Geometry& g, at::ScalarType out_dtype,
                  bool take_sqrt) {
  auto out = at::empty(mask.sizes(), mask.options().dtype(out_dtype));
  const uint8_t* m = bytes_of(mask);
  const double out_scale = take_sqrt ? g.work_scale : g.work_scale * g.work_scale;
  if (out_dtype == at::kDouble) {
    double* o = out.data_ptr<double>();
    edt_dense<Backend, double, double>(be, m, invert, g, o, o, take_sqrt, out_scale, mask.options());
  } else if (work_in_double(g, out_dtype)) {
    auto work = at::empty(mask.sizes(), mask.options().dtype(at::kDouble));
    edt_dense<Backend, double, float>(be, m, invert, g, work.data_ptr<double>(), out.data_ptr<float>(), take_sqrt,
                                      out_scale, mask.options());
  } else {
    float* o = out.data_ptr<float>();
    edt_dense<Backend, float, float>(be, m, invert, g, o, o, take_sqrt, out_scale, mask.options());
  }
  return out;
}

template <typename Backend>
at::Tensor edt(Backend& be, const at::Tensor& mask_in, std::optional<at::ArrayRef<double>> spacing, bool squared,
               bool is_signed, std::optional<at::ScalarType> dtype) {
  const auto g = mask_geometry(mask_in, spacing, "edt", "mask");
  const auto out_dtype = edt_dtype(dtype);
  check_edt_range(g, out_dtype, squared);
  const auto mask = as_bool(mask_in, "edt", "mask");
  if (!is_signed) return edt_of(be, mask, false, g, out_dtype, !squared);
  auto inside = edt_of(be, mask, false, g, out_dtype, !squared);
  auto outside = edt_of(be, mask, true, g, out_dtype, !squared);
  return outside.sub_(inside);
}

// ---------------------------------------------------------------------------------
// Connected components
// ---------------------------------------------------------------------------------

// Union-find over the foreground of `mask` (B x V bytes): afterwards parent[v] is the
// root of v's component (its first voxel, image-local index) for every foreground v;
// roots[v] (optional) flags the roots.
template <typename Backend>
void component_roots(Backend& be, const uint8_t* mask, const components::Grid& grid, int32_t* parent, uint8_t* roots) {
  const int64_t rows = grid.batch * grid.depth * grid.height;
  be.warps(rows * grid.segments(), 0, components::InitKernel{mask, parent, grid}, at::TensorOptions());
  const int64_t total = grid.batch * grid.voxels();
  be.steps(total, components::MergeKernel{mask, parent, grid});
  be.threads(total, components::CompressKernel{mask, parent, roots, grid.voxels()});
}

inline components::Grid component_grid(const Geometry& g, int order) {
  return components::Grid{g.batch, g.depth, g.height, g.width, g.spatial, order};
}

template <typename Backend>
std::tuple<at::Tensor, at::Tensor> connected_components(Backend& be, const at::Tensor& mask_in,
                                                        int64_t connectivity) {
  const char* op = "connected_components";
  const auto g = mask_geometry(mask_in, std::nullopt, op, "mask");
  const int order = connectivity_order(connectivity, g.spatial, op);
  TORCH_CHECK_VALUE(g.voxels() < (int64_t{1} << 31), op, ": an image of ", g.voxels(),
                    " voxels does not fit int32 labels (at most 2^31 - 1 voxels per image)");
  const auto mask = as_bool(mask_in, op, "mask");
  auto counts = at::zeros({g.batch}, mask.options().dtype(at::kLong));
  const int64_t V = g.voxels();
  if (g.batch == 0 || V == 0) return {at::empty(mask.sizes(), mask.options().dtype(at::kInt)), counts};
  const auto grid = component_grid(g, order);
  auto parent = at::empty({g.batch * V}, mask.options().dtype(at::kInt));
  auto roots = at::empty({g.batch, V}, mask.options().dtype(at::kByte));
  component_roots(be, bytes_of(mask), grid, parent.data_ptr<int32_t>(), bytes_of(roots));
  // rank of every root in raster order, per image (inclusive): the label of its component
  auto rank = at::cumsum(roots, 1, at::kInt);
  be.threads(g.batch * V, components::FinalKernel{bytes_of(mask), parent.data_ptr<int32_t>(), rank.data_ptr<int32_t>(),
                                                  counts.data_ptr<int64_t>(), V});
  return {rank.view(mask.sizes()), counts};
}

// ---------------------------------------------------------------------------------
// Level-set growth (one box per image, on the device)
// ---------------------------------------------------------------------------------

// First and last true index of each row of a (B, n) bool tensor (0 and -1... when none:
// the caller masks rows without any).
inline std::pair<at::Tensor, at::Tensor> first_last(const at::Tensor& any) {
  const int64_t n = any.size(1);
  auto u = any.to(at::kByte);
  auto first = u.argmax(1);
  auto last = (n - 1) - u.flip({1}).argmax(1);
  return {first, last};
}

template <typename Backend, typename T>
void levelset_boxes(Backend& be, const at::Tensor& a, const at::Tensor& s, const Geometry& g, double lam,
                    at::Tensor& out) {
  const int64_t B = g.batch, V = g.voxels();
  const auto opts = a.options();
  const Axes ax(g);
  // Bounding box of A | S per image, on the device.
  auto m = at::logical_or(a.view(at::kByte), s.view(at::kByte)).view({B, g.depth, g.height, g.width});
  auto rows = m.any(3);  // (B, D, H)
  auto [z0, z1] = first_last(rows.any(2));
  auto [y0, y1] = first_last(rows.any(1));
  auto [x0, x1] = first_last(m.view({B, g.depth * g.height, g.width}).any(1));
  auto lo = at::stack({z0, y0, x0}, 1).contiguous();
  auto hi = at::stack({z1, y1, x1}, 1).contiguous();
  auto has = rows.view({B, -1}).any(1).contiguous();
  auto tasks = at::empty({B, 8}, opts.dtype(at::kLong));
  auto sizes = at::empty({B, kPrefixCols}, opts.dtype(at::kLong));
  be.threads(B, lines::ImageBoxKernel{lo.data_ptr<int64_t>(), hi.data_ptr<int64_t>(), has.data_ptr<bool>(),
                                      tasks_of(tasks), sizes.data_ptr<int64_t>(), g.depth, g.height, g.width});
  auto prefix = at::cat({at::zeros({1, kPrefixCols}, sizes.options()), sizes.cumsum(0)}).contiguous();
  const int64_t* pre = prefix.data_ptr<int64_t>();
  const BoxTask* tk = tasks_of(tasks);
  // Arena: box b at its prefix offset; at most B * V voxels, lines at most those of the
  // full images (launch bounds; the device-side totals cut them).
  const int64_t cap = B * V;
  auto a_ar = at::empty({cap}, opts.dtype(at::kByte));
  auto s_ar = at::empty({cap}, opts.dtype(at::kByte));
  auto dA2 = at::empty({cap}, opts.dtype(c10::CppTypeToScalarType<T>::value));
  auto dS2 = at::empty({cap}, opts.dtype(c10::CppTypeToScalarType<T>::value));
  const lines::ArenaIndex arena{tk, pre, 0, B, g.height, g.width, V};
  be.threads(cap, lines::ImageArenaKernel{arena, bytes_of(a), bytes_of(s), bytes_of(a_ar), bytes_of(s_ar)});
  const int64_t launch[3] = {cap / ax.dims[0], cap / ax.dims[1], cap / ax.dims[2]};
  edt_boxes<Backend, T>(be, tk, pre, 0, B, launch, ax, g, bytes_of(a_ar), true, dA2.template data_ptr<T>(), opts);
  edt_boxes<Backend, T>(be, tk, pre, 0, B, launch, ax, g, bytes_of(s_ar), false, dS2.template data_ptr<T>(), opts);
  be.threads(cap, lines::LevelsetRuleKernel<T>{arena, bytes_of(a_ar), dA2.template data_ptr<T>(),
                                               dS2.template data_ptr<T>(), lam, out.data_ptr<bool>()});
}

template <typename Backend>
at::Tensor levelset_grow(Backend& be, const at::Tensor& approx_in, const at::Tensor& seg_in, double lam,
                         std::optional<at::ArrayRef<double>> spacing) {
  const auto g = mask_geometry(approx_in, spacing, "levelset_grow", "approx");
  mask_geometry(seg_in, spacing, "levelset_grow", "seg");
  check_same_shape(approx_in, seg_in, "levelset_grow", "approx", "seg");
  check_lambda(lam, "levelset_grow");
  const auto a = as_bool(approx_in, "levelset_grow", "approx");
  const auto s = as_bool(seg_in, "levelset_grow", "seg");
  auto out = at::zeros(a.sizes(), a.options().dtype(at::kBool));
  if (out.numel() == 0) return out;
  if (work_in_double(g, at::kFloat)) {
    levelset_boxes<Backend, double>(be, a, s, g, lam, out);
  } else {
    levelset_boxes<Backend, float>(be, a, s, g, lam, out);
  }
  return out;
}

// ---------------------------------------------------------------------------------
// Multi-object growth (the CPU's steps 1-5, see csrc/cpu/distance.cpp)
// ---------------------------------------------------------------------------------
// arena_budget: voxels of box arena per round (0: max(B * V, 2^24)); the emulation
// tests small budgets, which split the seeds into many rounds.
template <typename Backend>
at::Tensor grow_instances(Backend& be, const at::Tensor& seeds_in, const at::Tensor& seg_in, double lam,
                          std::optional<at::ArrayRef<double>> spacing, int64_t connectivity,
                          int64_t arena_budget = 0) {
  const char* op = "grow_instances";
  const auto g = mask_geometry(seeds_in, spacing, op, "seeds");
  mask_geometry(seg_in, spacing, op, "seg");
  check_same_shape(seeds_in, seg_in, op, "seeds", "seg");
  check_lambda(lam, op);
  TORCH_CHECK_TYPE(seeds_in.scalar_type() == at::kBool || at::isIntegralType(seeds_in.scalar_type(), false), op,
                   ": seeds must hold integer instance ids (0 = no seed), got ", seeds_in.scalar_type());
  if (connectivity == 0) connectivity = g.spatial == 2 ? 4 : 6;
  const int order = connectivity_order(connectivity, g.spatial, op);
  const int64_t B = g.batch, V = g.voxels(), total = B * V;
  TORCH_CHECK_VALUE(V < (int64_t{1} << 31), op, ": an image of ", V, " voxels is too large (at most 2^31 - 1)");
  // Bool seeds: any non-zero byte is seed 1 (a non-canonical bool must not become 2).
  const auto seeds = (seeds_in.scalar_type() == at::kBool ? seeds_in.view(at::kByte).ne(0) : seeds_in)
                         .to(at::kLong)
                         .contiguous();
  const auto seg = as_bool(seg_in, op, "seg");
  const auto opts = seeds.options();
  auto out = at::zeros(seeds.sizes(), opts);
  if (total == 0) return out;
  const int64_t* sd = seeds.data_ptr<int64_t>();

  // 1. The distinct seed ids of every image, ascending: one task each. Candidates are
  // the starts of runs of one id along rows (few), sorted by (image, id).
  auto start = at::empty({total}, opts.dtype(at::kByte));
  be.threads(total, lines::IdRunKernel{sd, bytes_of(start), g.width});
  auto rank = start.cumsum(0, at::kLong);
  const auto summary = at::stack({rank[total - 1], seeds.min()}).to(at::kCPU);  // host sync
  const int64_t n_runs = summary[0].item<int64_t>(), min_id = summary[1].item<int64_t>();
  TORCH_CHECK_VALUE(min_id >= 0, op, ": seed ids must be >= 0 (0 = no seed), got ", min_id);
  if (n_runs == 0) return out;
  auto run_image = at::empty({n_runs}, opts);
  auto run_id = at::empty({n_runs}, opts);
  be.threads(total, lines::IdPackKernel{sd, bytes_of(start), rank.data_ptr<int64_t>(), run_image.data_ptr<int64_t>(),
                                        run_id.data_ptr<int64_t>(), V});
  start = at::Tensor();
  rank = at::Tensor();
  {
    auto by_id = std::get<1>(run_id.sort(std::optional<bool>(true), 0));
    run_image = run_image.index_select(0, by_id);
    run_id = run_id.index_select(0, by_id);
    auto by_image = std::get<1>(run_image.sort(std::optional<bool>(true), 0));
    run_image = run_image.index_select(0, by_image).contiguous();
    run_id = run_id.index_select(0, by_image).contiguous();
  }
  // At most n_runs tasks; the unused tail has image B (after every image) and an empty box.
  const int64_t n_tasks = n_runs;
  auto first = at::empty({n_runs}, opts.dtype(at::kByte));
  be.threads(n_runs, lines::FirstPairKernel{run_image.data_ptr<int64_t>(), run_id.data_ptr<int64_t>(), bytes_of(first)});
  auto task_rank = first.cumsum(0, at::kLong);
  auto tasks = at::zeros({n_tasks, 8}, opts);
  tasks.select(1, 6).fill_(B);
  be.threads(n_runs, lines::TaskKernel{run_image.data_ptr<int64_t>(), run_id.data_ptr<int64_t>(),
                                       task_rank.data_ptr<int64_t>(), tasks_of(tasks)});
  auto image_start =
      at::searchsorted(tasks.select(1, 6).contiguous(), at::arange(B + 1, opts)).contiguous();  // first task of b
  run_image = at::Tensor();
  run_id = at::Tensor();

  // 2. Components of S; the seed of each component.
  const uint8_t* sg = bytes_of(seg);
  auto parent = at::empty({total}, opts.dtype(at::kInt));
  component_roots(be, sg, component_grid(g, order), parent.data_ptr<int32_t>(), nullptr);
  auto comp_seed = at::zeros({total}, opts);
  be.threads(total, lines::ComponentSeedKernel{sd, sg, parent.data_ptr<int32_t>(), comp_seed.data_ptr<int64_t>(), V});

  // 3. Owners: the component's seed, else the nearest seed voxel's (feature transform,
  // in the images that need it).
  auto need = at::zeros({B}, opts.dtype(at::kByte));
  be.threads(total, lines::NeedNearestKernel{sg, parent.data_ptr<int32_t>(), comp_seed.data_ptr<int64_t>(),
                                             bytes_of(need), V});
  auto work = at::empty({total}, opts.dtype(at::kDouble));
  auto feat = at::empty({total}, opts);
  be.threads(total, lines::FeatureInitKernel{sd, work.data_ptr<double>(), feat.data_ptr<int64_t>(), V});
  const Axes ax(g);
  for (int axis = 3 - g.spatial; axis < 3; ++axis) {
    const DenseLines l{ax.dims[axis], ax.inner(axis), total / ax.dims[axis]};
    using K = lines::FeatureKernel<DenseLines>;
    be.warps(l.count, K::workspace_bytes(l.n),
             K{l, work.data_ptr<double>(), feat.data_ptr<int64_t>(), g.work_spacing[axis] * g.work_spacing[axis], l.n,
               bytes_of(need), V},
             opts);
  }
  work = at::Tensor();
  auto owner = at::empty({total}, opts);
  be.threads(total, lines::OwnerKernel{sd, sg, parent.data_ptr<int32_t>(), comp_seed.data_ptr<int64_t>(),
                                       feat.data_ptr<int64_t>(), owner.data_ptr<int64_t>(), V});
  parent = at::Tensor();
  comp_seed = at::Tensor();
  feat = at::Tensor();

  // 4. Each seed's box (its voxels and its part, padded by one voxel), their sizes.
  auto box = at::empty({n_tasks, 6}, opts.dtype(at::kInt));
  box.narrow(1, 0, 3).fill_(std::numeric_limits<int32_t>::max());
  box.narrow(1, 3, 3).fill_(-1);
  const int64_t segments = B * g.depth * g.height * ((g.width + launch::kWarpSize - 1) / launch::kWarpSize);
  be.warps(segments, lines::SeedBoxKernel::kWorkspaceBytes,
           lines::SeedBoxKernel{sd, owner.data_ptr<int64_t>(), tasks_of(tasks), image_start.data_ptr<int64_t>(),
                                box.data_ptr<int32_t>(), g.depth, g.height, g.width},
           opts);
  auto sizes = at::empty({n_tasks, kPrefixCols}, opts);
  be.threads(n_tasks, lines::SeedBoxFinishKernel{box.data_ptr<int32_t>(), tasks_of(tasks), sizes.data_ptr<int64_t>(),
                                                 g.depth, g.height, g.width});
  auto prefix = at::cat({at::zeros({1, kPrefixCols}, opts), sizes.cumsum(0)}).contiguous();
  const auto host_prefix = prefix.to(at::kCPU);  // host sync: sizes the arenas
  const int64_t* hp = host_prefix.data_ptr<int64_t>();

  // 5. Grow every seed in its box; boxes are packed in arenas of at most `budget` voxels
  // (a larger box gets an arena of its own).
  const int64_t budget = arena_budget > 0 ? arena_budget : std::max<int64_t>(total, int64_t{1} << 24);
  const BoxTask* tk = tasks_of(tasks);
  const int64_t* pre = prefix.data_ptr<int64_t>();
  for (int64_t t0 = 0; t0 < n_tasks;) {
    int64_t t1 = t0 + 1;
    while (t1 < n_tasks && hp[(t1 + 1) * kPrefixCols] - hp[t0 * kPrefixCols] <= budget) ++t1;
    const int64_t voxels = hp[t1 * kPrefixCols] - hp[t0 * kPrefixCols];
    int64_t launch[3];
    for (int a = 0; a < 3; ++a) launch[a] = hp[t1 * kPrefixCols + 1 + a] - hp[t0 * kPrefixCols + 1 + a];
    auto a_ar = at::empty({voxels}, opts.dtype(at::kByte));
    auto s_ar = at::empty({voxels}, opts.dtype(at::kByte));
    auto dA2 = at::empty({voxels}, opts.dtype(at::kDouble));
    auto dS2 = at::empty({voxels}, opts.dtype(at::kDouble));
    const lines::ArenaIndex arena{tk, pre, t0, t1, g.height, g.width, V};
    be.threads(voxels, lines::SeedArenaKernel{arena, sd, owner.data_ptr<int64_t>(), bytes_of(a_ar), bytes_of(s_ar)});
    edt_boxes<Backend, double>(be, tk, pre, t0, t1, launch, ax, g, bytes_of(a_ar), true, dA2.data_ptr<double>(), opts);
    edt_boxes<Backend, double>(be, tk, pre, t0, t1, launch, ax, g, bytes_of(s_ar), false, dS2.data_ptr<double>(),
                               opts);
    be.threads(voxels, lines::SeedGrowKernel{arena, bytes_of(a_ar), bytes_of(s_ar), dA2.data_ptr<double>(),
                                             dS2.data_ptr<double>(), lam, out.data_ptr<int64_t>()});
    t0 = t1;
  }
  return out;
}

}  // namespace device
}  // namespace distance
}  // namespace mtseg
