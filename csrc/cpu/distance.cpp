// CPU kernels of the distance operators: edt, connected_components, levelset_grow,
// grow_instances. The per-line math is in mtseg/distance.h (shared with CUDA); this file
// lays out the passes so that memory is read along the contiguous axis:
//  1. the first spatial axis (rows of a 2D mask, slices of a 3D one) by forward and
//     backward sweeps over whole rows/planes at once (vectorised over the contiguous axis);
//  2. (3D) the middle axis: blocks of kBlock adjacent columns are gathered into
//     contiguous lines, enveloped, and scattered back;
//  3. the last (contiguous) axis: the envelope line by line, writing the output (and its
//     square root) directly.
// Scheduling: under 2^21 voxels everything runs on one thread; a batch of at least as
// many images as threads hands out whole images (all passes of an image on one thread,
// one parallel region); otherwise each pass is parallel over its lines.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <numeric>
#include <vector>

#include "mtseg/distance.h"
#include "mtseg/distance_host.h"

namespace mtseg {
namespace distance {
namespace {

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(__CUDACC__)
#define MTSEG_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MTSEG_CPU_CLONES
#endif

constexpr int64_t kSweepChunk = 2048;  // columns of the first pass handled per task
constexpr int64_t kBlock = 16;         // adjacent columns gathered per task in the middle pass
constexpr int64_t kSerialVoxels = int64_t{1} << 21;  // below this, one thread (a few ms of work)

// Last byte equal to 1 in [p, p + n), or null: glibc's memrchr where it exists.
inline const unsigned char* last_set(const unsigned char* p, int64_t n) {
#if defined(__GLIBC__)
  return static_cast<const unsigned char*>(memrchr(p, 1, static_cast<size_t>(n)));
#else
  for (int64_t i = n - 1; i >= 0; --i)
    if (p[i] == 1) return p + i;
  return nullptr;
#endif
}

int64_t grain(int64_t work_per_item) { return std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(1, work_per_item)); }

// Runs body(scratch, i) for i in [0, n), images handed out one at a time from a shared
// counter (dynamic scheduling): when another process takes a core, the thread still
// running takes the remaining images instead of waiting for a fixed half to finish.
// make_scratch() builds each thread's scratch once.
template <typename MakeScratch, typename Body>
void for_each_image(int64_t n, MakeScratch&& make_scratch, Body&& body) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(n, at::get_num_threads()));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    auto scratch = make_scratch();
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) body(scratch, i);
  });
}

// Pass 1 over `n0` rows of `r` contiguous values each (one image): squared distance
// along the first axis to the nearest voxel with (mask ^ invert) == 0.
template <typename T>
MTSEG_CPU_CLONES void sweep_rows(const bool* __restrict mask, bool invert, int64_t n0, int64_t r, int64_t x0,
                                 int64_t x1, double spacing, T* __restrict work, T* __restrict next) {
  const int64_t len = x1 - x0;
  {
    const bool* __restrict m = mask + x0;
    T* __restrict w = work + x0;
    for (int64_t x = 0; x < len; ++x) w[x] = sweep_forward<T>(m[x] != invert, inf_value<T>());
  }
  for (int64_t y = 1; y < n0; ++y) {
    const bool* __restrict m = mask + y * r + x0;
    const T* __restrict prev = work + (y - 1) * r + x0;
    T* __restrict w = work + y * r + x0;
    for (int64_t x = 0; x < len; ++x) w[x] = sweep_forward<T>(m[x] != invert, prev[x]);
  }
  for (int64_t x = 0; x < len; ++x) next[x] = inf_value<T>();
  for (int64_t y = n0 - 1; y >= 0; --y) {
    T* __restrict w = work + y * r + x0;
    if (spacing == 1.0) {
      for (int64_t x = 0; x < len; ++x) {
        const T c = sweep_backward<T>(w[x], next[x]);
        next[x] = c;
        w[x] = c * c;  // exact: integer counts (inf stays inf)
      }
    } else {
      for (int64_t x = 0; x < len; ++x) {
        const T c = sweep_backward<T>(w[x], next[x]);
        next[x] = c;
        w[x] = sweep_square<T>(c, spacing);
      }
    }
  }
}

template <typename T>
struct LineScratch {
  std::vector<int64_t> v;
  std::vector<double> zn, zd;
  std::vector<T> fv;
  explicit LineScratch(int64_t n) : v(n), zn(n), zd(n), fv(n) {}
};

// Squared distances (or distances) of every image of the batch: `work` (T, B x voxels)
// holds the passes, `out` (O) the result; they may be the same memory when T == O.
template <typename T, typename O>
void edt_batch(const bool* mask, bool invert, const Geometry& g, T* work, O* out, bool take_sqrt) {
  const int64_t V = g.voxels(), B = g.batch;
  if (B == 0 || V == 0) return;
  const bool is3d = g.spatial == 3;
  const int64_t n0 = is3d ? g.depth : g.height;
  const int64_t r = is3d ? g.height * g.width : g.width;
  const double sp0 = is3d ? g.spacing[0] : g.spacing[1];
  const int64_t H = g.height, W = g.width;
  const int64_t chunks = (r + kSweepChunk - 1) / kSweepChunk;       // pass-1 items per image
  const int64_t blocks = (W + kBlock - 1) / kBlock;                  // pass-2 items per plane
  const int64_t rows = V / W;                                        // last-pass items per image
  // Pass 1: sweeps along the first axis, vectorised over the rest.
  auto pass1 = [&](int64_t begin, int64_t end) {
    std::vector<T> next(kSweepChunk);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / chunks, c = item % chunks;
      const int64_t x0 = c * kSweepChunk, x1 = std::min(r, x0 + kSweepChunk);
      sweep_rows<T>(mask + b * V, invert, n0, r, x0, x1, sp0, work + b * V, next.data());
    }
  };
  // Pass 2 (3D): the middle axis, kBlock columns at a time through contiguous lines.
  auto pass2 = [&](int64_t begin, int64_t end) {
    const double s2 = g.spacing[1] * g.spacing[1];
    LineScratch<T> s(H);
    std::vector<T> buf(H * kBlock);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t plane = item / blocks, x0 = (item % blocks) * kBlock;
      const int64_t nb = std::min(kBlock, W - x0);
      T* p = work + plane * H * W + x0;
      for (int64_t y = 0; y < H; ++y)
        for (int64_t c = 0; c < nb; ++c) buf[c * H + y] = p[y * W + c];
      for (int64_t c = 0; c < nb; ++c) {
        T* line = buf.data() + c * H;
        envelope_line_runs<T, T>(line, 1, H, s2, s.v.data(), s.zn.data(), s.zd.data(), s.fv.data(), line, 1, false);
      }
      for (int64_t y = 0; y < H; ++y)
        for (int64_t c = 0; c < nb; ++c) p[y * W + c] = buf[c * H + y];
    }
  };
  // Last pass: the contiguous axis, writing the output.
  auto pass3 = [&](int64_t begin, int64_t end) {
    const double s2 = g.spacing[2] * g.spacing[2];
    LineScratch<T> s(W);
    for (int64_t line = begin; line < end; ++line) {
      envelope_line_runs<T, O>(work + line * W, 1, W, s2, s.v.data(), s.zn.data(), s.zd.data(), s.fv.data(), out + line * W, 1,
                               take_sqrt);
    }
  };
  if (B * V < kSerialVoxels) {
    // Small work: a parallel region costs more than it saves, and far more when the
    // machine is busy (the region waits for a descheduled thread).
    pass1(0, B * chunks);
    if (is3d) pass2(0, B * g.depth * blocks);
    pass3(0, B * rows);
    return;
  }
  if (B > 1 && B >= at::get_num_threads()) {
    // Many images: one parallel region, each image done whole by one thread (it stays in
    // cache between the passes, and there is one barrier instead of three).
    for_each_image(
        B, [] { return 0; },
        [&](int, int64_t b) {
          pass1(b * chunks, (b + 1) * chunks);
          if (is3d) pass2(b * g.depth * blocks, (b + 1) * g.depth * blocks);
          pass3(b * rows, (b + 1) * rows);
        });
    return;
  }
  at::parallel_for(0, B * chunks, grain(n0 * kSweepChunk), pass1);
  if (is3d) at::parallel_for(0, B * g.depth * blocks, grain(H * kBlock * 8), pass2);
  at::parallel_for(0, B * rows, grain(W * 8), pass3);
}

// Distances (take_sqrt) or squared distances of `mask` (contiguous bool) as out_dtype,
// from the voxels with (mask ^ invert) != 0 to the nearest voxel with (mask ^ invert) == 0.
at::Tensor edt_of(const at::Tensor& mask, bool invert, const Geometry& g, at::ScalarType out_dtype, bool take_sqrt) {
  auto out = at::empty(mask.sizes(), mask.options().dtype(out_dtype));
  const bool* m = mask.data_ptr<bool>();
  if (out_dtype == at::kDouble) {
    double* o = out.data_ptr<double>();
    edt_batch<double, double>(m, invert, g, o, o, take_sqrt);
  } else if (needs_double(g, out_dtype)) {
    auto work = at::empty(mask.sizes(), mask.options().dtype(at::kDouble));
    edt_batch<double, float>(m, invert, g, work.data_ptr<double>(), out.data_ptr<float>(), take_sqrt);
  } else {
    float* o = out.data_ptr<float>();
    edt_batch<float, float>(m, invert, g, o, o, take_sqrt);
  }
  return out;
}

at::Tensor edt_cpu(const at::Tensor& mask_in, std::optional<at::ArrayRef<double>> spacing, bool squared, bool is_signed,
                   std::optional<at::ScalarType> dtype) {
  const auto g = mask_geometry(mask_in, spacing, "edt", "mask");
  const auto out_dtype = edt_dtype(dtype);
  const auto mask = as_bool(mask_in, "edt", "mask");
  if (!is_signed) return edt_of(mask, false, g, out_dtype, !squared);
  // Signed: -d(x, background) inside, +d(x, foreground) outside; exactly one is non-zero.
  auto inside = edt_of(mask, false, g, out_dtype, !squared);
  auto outside = edt_of(mask, true, g, out_dtype, !squared);
  return outside.sub_(inside);
}

// ---------------------------------------------------------------------------------
// Connected components: union-find over the runs of each row (label_runs), linking every
// root to the smaller index, so that the root of a component is its first run in raster
// order; a second scan numbers the roots 1..n in that order. Parallel over images.
// ---------------------------------------------------------------------------------
template <typename I>
inline I find_root(I* parent, I p) {
  while (parent[p] != p) {
    parent[p] = parent[parent[p]];
    p = parent[p];
  }
  return p;
}

template <typename I>
inline void unite(I* parent, I a, I b) {
  a = find_root(parent, a);
  b = find_root(parent, b);
  if (a == b) return;
  if (a < b) std::swap(a, b);
  parent[a] = b;
}

// Run-based labelling of one image (what connected_components uses): union-find over
// the runs of foreground voxels of each row rather than over voxels. A run is joined with
// the runs of the already-scanned neighbour rows it overlaps (extended by one voxel where
// the connectivity allows a diagonal step along x). Runs are numbered in raster order and
// every root is the smallest run of its set, so numbering roots in run order gives labels
// 1..n in raster order of first appearance.
struct RunScratch {
  std::vector<int64_t> row_begin;
  std::vector<int32_t> x0, x1, parent, label;
};

struct RowOffset {
  int dz, dy, ext;
};

std::vector<RowOffset> row_offsets(int spatial, int order) {
  std::vector<RowOffset> o;
  o.push_back({0, -1, order >= 2 ? 1 : 0});
  if (spatial == 3) {
    o.push_back({-1, 0, order >= 2 ? 1 : 0});
    if (order >= 2) {
      o.push_back({-1, -1, order >= 3 ? 1 : 0});
      o.push_back({-1, 1, order >= 3 ? 1 : 0});
    }
  }
  return o;
}

int64_t label_runs(const bool* m, const Geometry& g, const std::vector<RowOffset>& offsets, RunScratch& r,
                   int32_t* labels) {
  const int64_t D = g.depth, H = g.height, W = g.width, rows = D * H;
  r.row_begin.resize(rows + 1);
  r.x0.clear();
  r.x1.clear();
  for (int64_t row = 0; row < rows; ++row) {
    r.row_begin[row] = static_cast<int64_t>(r.x0.size());
    // memchr (vectorised in libc) finds the next set and the next clear byte of the row.
    const auto* line = reinterpret_cast<const unsigned char*>(m + row * W);
    int64_t x = 0;
    while (x < W) {
      const void* hit = std::memchr(line + x, 1, static_cast<size_t>(W - x));
      if (hit == nullptr) break;
      const int64_t start = static_cast<const unsigned char*>(hit) - line;
      const void* stop = std::memchr(line + start, 0, static_cast<size_t>(W - start));
      x = stop == nullptr ? W : static_cast<const unsigned char*>(stop) - line;
      r.x0.push_back(static_cast<int32_t>(start));
      r.x1.push_back(static_cast<int32_t>(x));
    }
  }
  r.row_begin[rows] = static_cast<int64_t>(r.x0.size());
  const int64_t n_runs = r.row_begin[rows];
  r.parent.resize(n_runs);
  for (int64_t i = 0; i < n_runs; ++i) r.parent[i] = static_cast<int32_t>(i);
  int32_t* parent = r.parent.data();
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t z = row / H, y = row % H;
    const int64_t b = r.row_begin[row], e = r.row_begin[row + 1];
    if (b == e) continue;
    for (const auto& off : offsets) {
      const int64_t zz = z + off.dz, yy = y + off.dy;
      if (zz < 0 || yy < 0 || yy >= H) continue;
      const int64_t nrow = zz * H + yy;
      int64_t j = r.row_begin[nrow];
      const int64_t je = r.row_begin[nrow + 1];
      for (int64_t i = b; i < e && j < je; ++i) {
        const int32_t lo = r.x0[i] - off.ext, hi = r.x1[i] + off.ext;  // [lo, hi)
        while (j < je && r.x1[j] <= lo) ++j;
        for (int64_t k = j; k < je && r.x0[k] < hi; ++k)
          unite<int32_t>(parent, static_cast<int32_t>(i), static_cast<int32_t>(k));
      }
    }
  }
  std::memset(labels, 0, sizeof(int32_t) * g.voxels());
  r.label.resize(n_runs);
  int32_t n = 0;
  for (int64_t row = 0; row < rows; ++row) {
    for (int64_t i = r.row_begin[row]; i < r.row_begin[row + 1]; ++i) {
      const int32_t root = find_root<int32_t>(parent, static_cast<int32_t>(i));
      const int32_t l = root == i ? ++n : r.label[root];
      r.label[i] = l;
      std::fill(labels + row * W + r.x0[i], labels + row * W + r.x1[i], l);
    }
  }
  return n;
}

std::tuple<at::Tensor, at::Tensor> connected_components_cpu(const at::Tensor& mask_in, int64_t connectivity) {
  const auto g = mask_geometry(mask_in, std::nullopt, "connected_components", "mask");
  const int order = connectivity_order(connectivity, g.spatial, "connected_components");
  TORCH_CHECK_VALUE(g.voxels() < (int64_t{1} << 31), "connected_components: an image of ", g.voxels(),
                    " voxels does not fit int32 labels (at most 2^31 - 1 voxels per image)");
  const auto mask = as_bool(mask_in, "connected_components", "mask");
  auto labels = at::empty(mask.sizes(), mask.options().dtype(at::kInt));
  auto counts = at::zeros({g.batch}, mask.options().dtype(at::kLong));
  const int64_t V = g.voxels();
  if (g.batch == 0 || V == 0) return {labels, counts};
  const auto offsets = row_offsets(g.spatial, order);
  const bool* m = mask.data_ptr<bool>();
  int32_t* lab = labels.data_ptr<int32_t>();
  int64_t* cnt = counts.data_ptr<int64_t>();
  // Labelling costs about 1 ns a voxel: below 2^22 voxels a parallel region is not worth it.
  if (g.batch * V < (int64_t{1} << 22)) {
    RunScratch scratch;
    for (int64_t b = 0; b < g.batch; ++b) cnt[b] = label_runs(m + b * V, g, offsets, scratch, lab + b * V);
  } else {
    for_each_image(
        g.batch, [] { return RunScratch{}; },
        [&](RunScratch& scratch, int64_t b) { cnt[b] = label_runs(m + b * V, g, offsets, scratch, lab + b * V); });
  }
  return {labels, counts};
}

// ---------------------------------------------------------------------------------
// Level-set growth: two squared EDTs (to A, and to the complement of S), then the rule.
// Unit spacing works in float (exact integer squares); other spacing in double.
// ---------------------------------------------------------------------------------
template <typename T>
MTSEG_CPU_CLONES void levelset_rule(const bool* __restrict a, const T* __restrict dA2, const T* __restrict dS2,
                                   double lam, int64_t n, bool* __restrict out) {
  for (int64_t i = 0; i < n; ++i)
    out[i] = levelset_inside(a[i], static_cast<double>(dA2[i]), static_cast<double>(dS2[i]), lam);
}

// One image: the two transforms are only needed in the bounding box of S | A padded by
// one voxel (clamped to the image): it holds all of A, so d(x, A) there is exact, and by
// clamping, the nearest voxel outside S of any x in it is in it too. Outside the box
// there is neither A nor S, so the result is false.
template <typename T>
void levelset_image(const bool* a, const bool* s, const Geometry& g, double lam, bool* out, std::vector<uint8_t>& ca,
                    std::vector<uint8_t>& cs, std::vector<T>& dA2, std::vector<T>& dS2, std::vector<uint8_t>& co) {
  const int64_t D = g.depth, H = g.height, W = g.width, V = g.voxels();
  int64_t lo[3] = {D, H, W}, hi[3] = {-1, -1, -1};
  for (int64_t z = 0; z < D; ++z)
    for (int64_t y = 0; y < H; ++y) {
      // first and last set byte of the row in A or S (memchr / memrchr are vectorised)
      const auto* ra = reinterpret_cast<const unsigned char*>(a + (z * H + y) * W);
      const auto* rs = reinterpret_cast<const unsigned char*>(s + (z * H + y) * W);
      const auto* fa = static_cast<const unsigned char*>(std::memchr(ra, 1, W));
      const auto* fs = static_cast<const unsigned char*>(std::memchr(rs, 1, W));
      if (fa == nullptr && fs == nullptr) continue;
      const auto* la = last_set(ra, W);
      const auto* ls = last_set(rs, W);
      const int64_t x0 = std::min(fa ? fa - ra : W, fs ? fs - rs : W);
      const int64_t x1 = std::max(la ? la - ra : int64_t{-1}, ls ? ls - rs : int64_t{-1});
      lo[0] = std::min(lo[0], z), hi[0] = std::max(hi[0], z);
      lo[1] = std::min(lo[1], y), hi[1] = std::max(hi[1], y);
      lo[2] = std::min(lo[2], x0), hi[2] = std::max(hi[2], x1);
    }
  std::memset(out, 0, V);
  if (hi[0] < 0) return;
  const int64_t full[3] = {D, H, W};
  int64_t n[3];
  for (int i = 0; i < 3; ++i) {
    lo[i] = std::max<int64_t>(0, lo[i] - 1);
    n[i] = std::min<int64_t>(full[i] - 1, hi[i] + 1) - lo[i] + 1;
  }
  Geometry cg = g;
  cg.batch = 1;
  cg.depth = n[0];
  cg.height = n[1];
  cg.width = n[2];
  const int64_t CV = cg.voxels();
  ca.resize(CV);
  cs.resize(CV);
  co.resize(CV);
  dA2.resize(CV);
  dS2.resize(CV);
  for (int64_t z = 0; z < n[0]; ++z)
    for (int64_t y = 0; y < n[1]; ++y) {
      const int64_t src = ((lo[0] + z) * H + lo[1] + y) * W + lo[2], dst = (z * n[1] + y) * n[2];
      std::memcpy(ca.data() + dst, a + src, n[2]);
      std::memcpy(cs.data() + dst, s + src, n[2]);
    }
  const bool* pa = reinterpret_cast<const bool*>(ca.data());
  edt_batch<T, T>(pa, true, cg, dA2.data(), dA2.data(), false);  // zero set: A
  edt_batch<T, T>(reinterpret_cast<const bool*>(cs.data()), false, cg, dS2.data(), dS2.data(), false);
  bool* po = reinterpret_cast<bool*>(co.data());
  levelset_rule<T>(pa, dA2.data(), dS2.data(), lam, CV, po);
  for (int64_t z = 0; z < n[0]; ++z)
    for (int64_t y = 0; y < n[1]; ++y)
      std::memcpy(out + ((lo[0] + z) * H + lo[1] + y) * W + lo[2], po + (z * n[1] + y) * n[2], n[2]);
}

// Images in parallel, each whole on one thread (a single image runs its passes in parallel).
template <typename T>
void levelset_batch(const bool* a, const bool* s, const Geometry& g, double lam, bool* out) {
  const int64_t V = g.voxels();
  Geometry one = g;
  one.batch = 1;
  struct Scratch {
    std::vector<uint8_t> ca, cs, co;
    std::vector<T> dA2, dS2;
  };
  for_each_image(
      g.batch, [] { return Scratch{}; },
      [&](Scratch& t, int64_t b) {
        levelset_image<T>(a + b * V, s + b * V, one, lam, out + b * V, t.ca, t.cs, t.dA2, t.dS2, t.co);
      });
}

at::Tensor levelset_grow_cpu(const at::Tensor& approx_in, const at::Tensor& seg_in, double lam,
                             std::optional<at::ArrayRef<double>> spacing) {
  const auto g = mask_geometry(approx_in, spacing, "levelset_grow", "approx");
  mask_geometry(seg_in, spacing, "levelset_grow", "seg");
  check_same_shape(approx_in, seg_in, "levelset_grow", "approx", "seg");
  check_lambda(lam, "levelset_grow");
  const auto a = as_bool(approx_in, "levelset_grow", "approx");
  const auto s = as_bool(seg_in, "levelset_grow", "seg");
  auto out = at::empty(a.sizes(), a.options());
  if (out.numel() == 0) return out;
  const bool use_double = !g.unit_spacing || needs_double(g, at::kFloat);
  if (use_double) {
    levelset_batch<double>(a.data_ptr<bool>(), s.data_ptr<bool>(), g, lam, out.data_ptr<bool>());
  } else {
    levelset_batch<float>(a.data_ptr<bool>(), s.data_ptr<bool>(), g, lam, out.data_ptr<bool>());
  }
  return out;
}


// ---------------------------------------------------------------------------------
// Multi-object growth (DESIGN 3.3). Per image:
//  1. seed ids (any positive integers) are numbered 0..K-1;
//  2. connected components of S = (seg != 0);
//  3. every voxel x of S gets an owner seed: the only seed in its component when the
//     component holds voxels of exactly one seed; otherwise (a component with several
//     seeds, or none) the seed of the nearest seed voxel (exact Euclidean feature
//     transform), which cuts a shared component along the mid-lines between its seeds;
//  4. each seed k grows inside its part P_k = {x in S : owner(x) = k} by the single-object
//     rule, A_k union {x in P_k : d(x, A_k) - lam * d(x, complement(P_k)) <= 0}, computed
//     exactly in the bounding box of P_k and A_k padded by one voxel;
//  5. the parts are disjoint, so the grown seeds are written without conflict.
// Parallel over images for steps 1-3, over (image, seed) pairs for step 4.
// ---------------------------------------------------------------------------------

// Nearest voxel of `zero` (flat index, -1 when there is none) for every voxel of one
// image, by one envelope pass per axis carrying the minimiser along.
void feature_transform(const bool* zero, const Geometry& g, std::vector<double>& work, std::vector<int64_t>& feat) {
  const int64_t V = g.voxels();
  work.resize(V);
  feat.resize(V);
  for (int64_t p = 0; p < V; ++p) {
    work[p] = zero[p] ? 0.0 : inf_value<double>();
    feat[p] = zero[p] ? p : -1;
  }
  const int64_t dims[3] = {g.depth, g.height, g.width};
  const int64_t strides[3] = {g.height * g.width, g.width, 1};
  const int64_t nmax = std::max({g.depth, g.height, g.width});
  LineScratch<double> s(nmax);
  std::vector<double> f(nmax), d(nmax);
  std::vector<int64_t> fi(nmax), arg(nmax);
  for (int axis = 3 - g.spatial; axis < 3; ++axis) {
    const int64_t n = dims[axis], st = strides[axis];
    const double s2 = g.spacing[axis] * g.spacing[axis];
    for (int64_t start = 0; start < V; ++start) {
      if ((start / st) % n != 0) continue;  // not the first voxel of a line along this axis
      for (int64_t q = 0; q < n; ++q) {
        f[q] = work[start + q * st];
        fi[q] = feat[start + q * st];
      }
      envelope_line<double, double>(f.data(), 1, n, s2, s.v.data(), s.zn.data(), s.zd.data(), s.fv.data(), d.data(), 1, false,
                                    arg.data(), 1);
      for (int64_t q = 0; q < n; ++q) {
        work[start + q * st] = d[q];
        feat[start + q * st] = arg[q] >= 0 ? fi[arg[q]] : -1;
      }
    }
  }
}

struct Box {
  int64_t lo[3] = {INT64_MAX, INT64_MAX, INT64_MAX}, hi[3] = {-1, -1, -1};
  void add(int64_t z, int64_t y, int64_t x) {
    const int64_t c[3] = {z, y, x};
    for (int i = 0; i < 3; ++i) {
      lo[i] = std::min(lo[i], c[i]);
      hi[i] = std::max(hi[i], c[i]);
    }
  }
};

struct SeedTask {
  int64_t image, seed_id;
  int32_t index;
  Box box;
};

at::Tensor grow_instances_cpu(const at::Tensor& seeds_in, const at::Tensor& seg_in, double lam,
                              std::optional<at::ArrayRef<double>> spacing, int64_t connectivity) {
  const char* op = "grow_instances";
  const auto g = mask_geometry(seeds_in, spacing, op, "seeds");
  mask_geometry(seg_in, spacing, op, "seg");
  check_same_shape(seeds_in, seg_in, op, "seeds", "seg");
  check_lambda(lam, op);
  TORCH_CHECK_TYPE(seeds_in.scalar_type() == at::kBool || at::isIntegralType(seeds_in.scalar_type(), false), op,
                   ": seeds must hold integer instance ids (0 = no seed), got ", seeds_in.scalar_type());
  if (connectivity == 0) connectivity = g.spatial == 2 ? 4 : 6;
  const int order = connectivity_order(connectivity, g.spatial, op);
  const int64_t V = g.voxels();
  TORCH_CHECK_VALUE(V < (int64_t{1} << 31), op, ": an image of ", V, " voxels is too large (at most 2^31 - 1)");
  const auto seeds = seeds_in.to(at::kLong).contiguous();
  if (seeds.numel() > 0) {
    TORCH_CHECK_VALUE(seeds.min().item<int64_t>() >= 0, op, ": seed ids must be >= 0 (0 = no seed), got ",
                      seeds.min().item<int64_t>());
  }
  const auto seg = as_bool(seg_in, op, "seg");
  auto out = at::zeros(seeds.sizes(), seeds.options());
  if (g.batch == 0 || V == 0) return out;
  const int64_t* sd = seeds.data_ptr<int64_t>();
  const bool* sg = seg.data_ptr<bool>();
  int64_t* o = out.data_ptr<int64_t>();
  const auto offsets = row_offsets(g.spatial, order);
  Geometry one = g;
  one.batch = 1;
  // Steps 1-3: owners (seed index per voxel, -1 none) and each seed's bounding box.
  std::vector<int32_t> owner(g.batch * V, -1);
  std::vector<std::vector<int64_t>> ids(g.batch);
  std::vector<std::vector<Box>> boxes(g.batch);
  at::parallel_for(0, g.batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> comp(V);
    RunScratch runs;
    std::vector<double> work;
    std::vector<int64_t> feat;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t* s = sd + b * V;
      const bool* m = sg + b * V;
      int32_t* own = owner.data() + b * V;
      auto& id = ids[b];
      for (int64_t p = 0; p < V; ++p)
        if (s[p] > 0) id.push_back(s[p]);
      std::sort(id.begin(), id.end());
      id.erase(std::unique(id.begin(), id.end()), id.end());
      if (id.empty()) continue;
      auto index_of = [&](int64_t v) {
        return static_cast<int32_t>(std::lower_bound(id.begin(), id.end(), v) - id.begin());
      };
      const int64_t n_comp = label_runs(m, one, offsets, runs, comp.data());
      // Seed of each component: -1 none, k the only one, -2 several.
      std::vector<int32_t> comp_seed(n_comp + 1, -1);
      for (int64_t p = 0; p < V; ++p) {
        if (s[p] <= 0 || !m[p]) continue;
        const int32_t k = index_of(s[p]);
        int32_t& cs = comp_seed[comp[p]];
        cs = (cs == -1 || cs == k) ? k : -2;
      }
      bool need_nearest = false;
      for (int64_t p = 0; p < V && !need_nearest; ++p) need_nearest = m[p] && comp_seed[comp[p]] < 0;
      if (need_nearest) {
        std::vector<uint8_t> z8(V);
        for (int64_t p = 0; p < V; ++p) z8[p] = s[p] > 0;
        feature_transform(reinterpret_cast<const bool*>(z8.data()), one, work, feat);
      }
      auto& bx = boxes[b];
      bx.assign(id.size(), Box{});
      for (int64_t p = 0; p < V; ++p) {
        int32_t k = -1;
        if (m[p]) {
          const int32_t cs = comp_seed[comp[p]];
          k = cs >= 0 ? cs : index_of(s[feat[p]]);
          own[p] = k;
        }
        if (s[p] > 0) k = index_of(s[p]);
        if (k >= 0) bx[k].add(p / (g.height * g.width), (p / g.width) % g.height, p % g.width);
      }
    }
  });
  // Step 4: grow every seed inside its part.
  std::vector<SeedTask> tasks;
  for (int64_t b = 0; b < g.batch; ++b)
    for (size_t k = 0; k < ids[b].size(); ++k) tasks.push_back({b, ids[b][k], static_cast<int32_t>(k), boxes[b][k]});
  const int64_t full[3] = {g.depth, g.height, g.width};
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> a, s;
    std::vector<double> dA2, dS2;
    for (int64_t t = begin; t < end; ++t) {
      const auto& task = tasks[t];
      int64_t lo[3], n[3];
      for (int i = 0; i < 3; ++i) {
        lo[i] = std::max<int64_t>(0, task.box.lo[i] - 1);
        n[i] = std::min<int64_t>(full[i] - 1, task.box.hi[i] + 1) - lo[i] + 1;
      }
      Geometry cg = one;
      cg.depth = n[0];
      cg.height = n[1];
      cg.width = n[2];
      const int64_t CV = cg.voxels();
      a.assign(CV, 0);
      s.assign(CV, 0);
      dA2.resize(CV);
      dS2.resize(CV);
      const int64_t* sdb = sd + task.image * V;
      const int32_t* own = owner.data() + task.image * V;
      for (int64_t z = 0; z < n[0]; ++z)
        for (int64_t y = 0; y < n[1]; ++y)
          for (int64_t x = 0; x < n[2]; ++x) {
            const int64_t p = ((lo[0] + z) * g.height + lo[1] + y) * g.width + lo[2] + x;
            const int64_t c = (z * n[1] + y) * n[2] + x;
            a[c] = sdb[p] == task.seed_id;
            s[c] = own[p] == task.index;
          }
      edt_batch<double, double>(reinterpret_cast<const bool*>(a.data()), true, cg, dA2.data(), dA2.data(), false);
      edt_batch<double, double>(reinterpret_cast<const bool*>(s.data()), false, cg, dS2.data(), dS2.data(), false);
      int64_t* ob = o + task.image * V;
      for (int64_t z = 0; z < n[0]; ++z)
        for (int64_t y = 0; y < n[1]; ++y)
          for (int64_t x = 0; x < n[2]; ++x) {
            const int64_t c = (z * n[1] + y) * n[2] + x;
            if (!a[c] && !s[c]) continue;
            if (levelset_inside(a[c] != 0, dA2[c], dS2[c], lam))
              ob[((lo[0] + z) * g.height + lo[1] + y) * g.width + lo[2] + x] = task.seed_id;
          }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mtseg, CPU, m) {
  m.impl("edt", &edt_cpu);
  m.impl("connected_components", &connected_components_cpu);
  m.impl("levelset_grow", &levelset_grow_cpu);
  m.impl("grow_instances", &grow_instances_cpu);
}

}  // namespace distance
}  // namespace mtseg
