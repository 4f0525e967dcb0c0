// Kernel bodies of the distance operators on a GPU (edt, levelset_grow, grow_instances),
// written once for the CUDA launch and its CPU emulation (mtseg/launch.h). The per-line
// math is mtseg/distance.h, the code the CPU kernels run, with the same working types,
// the same line segments and the same relative coordinates, so results are bitwise the
// CPU's (unit spacing exactly in integers; other spacing with the same roundings).
//
// Exact EDT, one axis at a time (Felzenszwalb & Huttenlocher):
//  * first axis: SweepKernel, a thread per column; adjacent threads read adjacent voxels;
//  * every further axis: EnvelopeKernel, a warp per line: the lanes copy the line into
//    the warp's shared memory (coalesced along the contiguous axis; along a strided axis
//    the warps of a block take adjacent lines, so each 32-byte sector is fetched once into
//    L1 and used by all of them), find the runs of non-zero values with ballots, and
//    envelope the runs in parallel, one lane per run (envelope_line on the run and its two
//    bounding zeros, exactly as envelope_line_runs does on the CPU); runs of the same
//    parity never share a bounding zero, so even runs go first, then odd ones. The scratch
//    of the stack (positions, intersections, values) stays in shared memory, and the
//    results leave it with coalesced stores.
// Lines are addressed through a policy: DenseLines (a batch of same-size images: the
// batch is one more outer axis) or BoxLines (a ragged set of boxes packed in an arena,
// one box per task: a seed of grow_instances, or an image of levelset_grow; a line is
// found by binary search in a prefix sum of line counts that may live on the device).
#pragma once

#include <cstdint>
#include <type_traits>

#include "mtseg/distance.h"
#include "mtseg/launch.h"
#include "mtseg/macros.h"

namespace mtseg {
namespace distance {
namespace lines {

// A line: n values at base + q * stride.
struct LineRef {
  int64_t base, stride, n;
};

// Lines of length n along an axis with `inner` = product of the later axes' sizes, over
// `count` lines in total (the batch and the earlier axes flattened).
struct DenseLines {
  int64_t n, inner, count;
  MTSEG_HOST_DEVICE bool line(int64_t li, LineRef& r) const {
    if (li >= count) return false;
    r.base = (li / inner) * n * inner + li % inner;
    r.stride = inner;
    r.n = n;
    return true;
  }
};

// One box of a ragged batch: its origin and size in its image (depth, height, width; 2D
// images have depth 1), the image, and the seed id it grows (grow_instances).
struct BoxTask {
  int64_t lo[3], n[3];
  int64_t image, id;
};
static_assert(sizeof(BoxTask) == 8 * sizeof(int64_t), "BoxTask is stored as 8 int64 per task");

// Columns of the per-task prefix table: box voxels, then lines along axes 0, 1, 2.
constexpr int kPrefixCols = 4;

// Last t in [t0, t1) with prefix[t * kPrefixCols + col] <= g (prefix non-decreasing in t).
MTSEG_HOST_DEVICE int64_t find_task(const int64_t* prefix, int col, int64_t t0, int64_t t1, int64_t g) {
  int64_t lo = t0, hi = t1;  // answer in [lo, hi)
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (prefix[mid * kPrefixCols + col] <= g) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// Lines along `axis` of the boxes of tasks [t0, t1), whose voxels are packed one box
// after the other from the arena's start (box t at prefix[t][0] - prefix[t0][0]).
struct BoxLines {
  const BoxTask* tasks;
  const int64_t* prefix;  // (tasks + 1) x kPrefixCols exclusive prefix sums
  int64_t t0, t1;
  int axis;
  MTSEG_HOST_DEVICE bool line(int64_t li, LineRef& r) const {
    const int col = 1 + axis;
    const int64_t g = prefix[t0 * kPrefixCols + col] + li;
    if (g >= prefix[t1 * kPrefixCols + col]) return false;
    const int64_t t = find_task(prefix, col, t0, t1, g);
    const BoxTask& box = tasks[t];
    const int64_t local = g - prefix[t * kPrefixCols + col];
    int64_t inner = 1;
    for (int a = axis + 1; a < 3; ++a) inner *= box.n[a];
    const int64_t n = box.n[axis];
    r.base = prefix[t * kPrefixCols] - prefix[t0 * kPrefixCols] + (local / inner) * n * inner + local % inner;
    r.stride = inner;
    r.n = n;
    return true;
  }
};

// Box voxel j of the arena (tasks [t0, t1)): its task and its flat index in the image.
struct BoxVoxel {
  int64_t task, image_index;
};

MTSEG_HOST_DEVICE bool box_voxel(const BoxTask* tasks, const int64_t* prefix, int64_t t0, int64_t t1, int64_t j,
                                 int64_t height, int64_t width, BoxVoxel& out) {
  const int64_t g = prefix[t0 * kPrefixCols] + j;
  if (g >= prefix[t1 * kPrefixCols]) return false;
  const int64_t t = find_task(prefix, 0, t0, t1, g);
  const BoxTask& box = tasks[t];
  const int64_t c = g - prefix[t * kPrefixCols];
  const int64_t x = c % box.n[2], y = (c / box.n[2]) % box.n[1], z = c / (box.n[2] * box.n[1]);
  out.task = t;
  out.image_index = ((box.lo[0] + z) * height + box.lo[1] + y) * width + box.lo[2] + x;
  return true;
}

// The arena of tasks [t0, t1) seen from its voxels: what the per-voxel kernels of
// levelset_grow and grow_instances share.
struct ArenaIndex {
  const BoxTask* tasks;
  const int64_t* prefix;
  int64_t t0, t1;
  int64_t height, width, voxels;  // of one image
  // Arena voxel j: its task and its flat index in the batch; false past the last box.
  MTSEG_HOST_DEVICE bool at(int64_t j, int64_t& task, int64_t& index) const {
    BoxVoxel bv;
    if (!box_voxel(tasks, prefix, t0, t1, j, height, width, bv)) return false;
    task = bv.task;
    index = tasks[bv.task].image * voxels + bv.image_index;
    return true;
  }
};

// ---------------------------------------------------------------------------------
// EDT passes
// ---------------------------------------------------------------------------------

// First axis: squared distance along the column to the nearest voxel with
// (mask != 0) == invert (the zero set), as sweep_rows does on the CPU.
template <typename Lines, typename T>
struct SweepKernel {
  Lines lines;
  const uint8_t* mask;  // same layout as work
  bool invert;
  double spacing;
  T* work;
  MTSEG_HOST_DEVICE void operator()(int64_t li) const {
    LineRef r;
    if (!lines.line(li, r)) return;
    const uint8_t* m = mask + r.base;
    T* w = work + r.base;
    T c = inf_value<T>();
    for (int64_t y = 0; y < r.n; ++y) {
      c = sweep_forward<T>((m[y * r.stride] != 0) != invert, c);
      w[y * r.stride] = c;
    }
    T next = inf_value<T>();
    for (int64_t y = r.n - 1; y >= 0; --y) {
      next = sweep_backward<T>(w[y * r.stride], next);
      w[y * r.stride] = sweep_square<T>(next, spacing);
    }
  }
};

// Every further axis: the lower envelope of each run of non-zero values and its
// bounding zeros (envelope_line_runs), a warp per line. `in` and `out` may be the same
// memory: each warp reads its whole line before writing it.
template <typename Lines, typename T, typename O>
struct EnvelopeKernel {
  static constexpr bool kSeparateOut = !std::is_same<T, O>::value;
  Lines lines;
  const T* in;
  O* out;
  double s2;
  bool take_sqrt;
  double out_scale;  // the results are multiplied by it (as envelope_line's out_scale)
  int64_t max_n;     // the longest line: the workspace is cut for it

  MTSEG_HOST_DEVICE static int64_t workspace_bytes(int64_t n) {
    launch::Carve c{nullptr};
    carve(c, n);
    return c.used;
  }

  template <typename Warp>
  MTSEG_HOST_DEVICE void operator()(Warp& w, int64_t wi, unsigned char* workspace) const {
    LineRef r;
    if (!lines.line(wi, r)) return;
    launch::Carve c{workspace};
    T* f;
    O* o;
    double *zn, *zd;
    T* fv;
    carve(c, max_n, &f, &o, &zn, &zd, &fv);
    const int64_t n = r.n;
    const T* src = in + r.base;
    w.each([&](int lane) {
      for (int64_t q = lane; q < n; q += launch::kWarpSize) f[q] = src[q * r.stride];
    });
    w.sync();
    if constexpr (kSeparateOut) {
      w.each([&](int lane) {
        for (int64_t q = lane; q < n; q += launch::kWarpSize)
          if (f[q] == T(0)) o[q] = O(0);
      });
      w.sync();  // before a run writes its bounding zeros
    }
    for (int parity = 0; parity < 2; ++parity) {
      int64_t runs = 0;  // runs started before this chunk (warp-uniform)
      for (int64_t c0 = 0; c0 < n; c0 += launch::kWarpSize) {
        const uint32_t starts = w.ballot([&](int lane) {
          const int64_t q = c0 + lane;
          return q < n && f[q] != T(0) && (q == 0 || f[q - 1] == T(0));
        });
        if (starts == 0) continue;
        w.each([&](int lane) {
          if (!(starts >> lane & 1u)) return;
          if (((runs + launch::popcount32(starts & launch::lanes_below(lane))) & 1) != parity) return;
          const int64_t q = c0 + lane;
          int64_t e = q + 1;
          while (e < n && f[e] != T(0)) ++e;
          const int64_t l = q > 0 ? q - 1 : 0, rr = e < n ? e : n - 1;
          O* dst;
          if constexpr (kSeparateOut) {
            dst = o;
          } else {
            dst = f;
          }
          envelope_line<T, O>(f + l, 1, rr - l + 1, s2, EnvelopeScratch<T>{zn + l, zd + l, fv + l}, dst + l, 1,
                              take_sqrt, out_scale);
        });
        runs += launch::popcount32(starts);
        w.sync();
      }
    }
    O* dst = out + r.base;
    w.each([&](int lane) {
      for (int64_t q = lane; q < n; q += launch::kWarpSize) {
        if constexpr (kSeparateOut) {
          dst[q * r.stride] = o[q];
        } else {
          dst[q * r.stride] = f[q];
        }
      }
    });
  }

 private:
  // The line, the separate output (when O is not T), and envelope_line's scratch.
  MTSEG_HOST_DEVICE static void carve(launch::Carve& c, int64_t n, T** f = nullptr, O** o = nullptr,
                                      double** zn = nullptr, double** zd = nullptr, T** fv = nullptr) {
    T* pf = c.take<T>(n);
    O* po = kSeparateOut ? c.take<O>(n) : nullptr;
    double* pzn = c.take<double>(n);
    double* pzd = c.take<double>(n);
    T* pfv = c.take<T>(n);
    if (f != nullptr) {
      *f = pf;
      *o = po;
      *zn = pzn;
      *zd = pzd;
      *fv = pfv;
    }
  }
};

// ---------------------------------------------------------------------------------
// Feature transform of grow_instances: the nearest seed voxel of every voxel, as the
// CPU's feature_transform computes it (envelope_line over whole lines, every axis, in
// double, carrying the minimiser), so that ties go the same way. A warp per line; one
// lane envelopes it (a whole line is one sequential envelope).
// ---------------------------------------------------------------------------------
struct FeatureInitKernel {
  const int64_t* seeds;
  double* work;
  int64_t* feat;
  int64_t voxels;
  MTSEG_HOST_DEVICE void operator()(int64_t i) const {
    const bool zero = seeds[i] > 0;
    work[i] = zero ? 0.0 : inf_value<double>();
    feat[i] = zero ? i % voxels : -1;
  }
};

template <typename Lines>
struct FeatureKernel {
  Lines lines;
  double* work;
  int64_t* feat;
  double s2;
  int64_t max_n;
  const uint8_t* need;  // per image: 0 when no voxel needs its nearest seed (lines skipped)
  int64_t voxels;

  MTSEG_HOST_DEVICE static int64_t workspace_bytes(int64_t n) {
    launch::Carve c{nullptr};
    carve(c, n);
    return c.used;
  }

  template <typename Warp>
  MTSEG_HOST_DEVICE void operator()(Warp& w, int64_t wi, unsigned char* workspace) const {
    LineRef r;
    if (!lines.line(wi, r) || need[r.base / voxels] == 0) return;
    launch::Carve c{workspace};
    double *f, *zn, *zd, *fv;
    int64_t *fi, *arg;
    carve(c, max_n, &f, &fi, &zn, &zd, &fv, &arg);
    const int64_t n = r.n;
    w.each([&](int lane) {
      for (int64_t q = lane; q < n; q += launch::kWarpSize) {
        f[q] = work[r.base + q * r.stride];
        fi[q] = feat[r.base + q * r.stride];
      }
    });
    w.sync();
    w.each([&](int lane) {
      if (lane == 0) envelope_line<double, double>(f, 1, n, s2, EnvelopeScratch<double>{zn, zd, fv}, f, 1, false, 1.0, arg, 1);
    });
    w.sync();
    w.each([&](int lane) {
      for (int64_t q = lane; q < n; q += launch::kWarpSize) {
        work[r.base + q * r.stride] = f[q];
        feat[r.base + q * r.stride] = arg[q] >= 0 ? fi[arg[q]] : -1;
      }
    });
  }

 private:
  MTSEG_HOST_DEVICE static void carve(launch::Carve& c, int64_t n, double** f = nullptr, int64_t** fi = nullptr,
                                      double** zn = nullptr, double** zd = nullptr, double** fv = nullptr,
                                      int64_t** arg = nullptr) {
    double* pf = c.take<double>(n);
    int64_t* pfi = c.take<int64_t>(n);
    double* pzn = c.take<double>(n);
    double* pzd = c.take<double>(n);
    double* pfv = c.take<double>(n);
    int64_t* parg = c.take<int64_t>(n);
    if (f != nullptr) {
      *f = pf;
      *fi = pfi;
      *zn = pzn;
      *zd = pzd;
      *fv = pfv;
      *arg = parg;
    }
  }
};

// ---------------------------------------------------------------------------------
// grow_instances: owners, seed tasks, boxes, growth
// ---------------------------------------------------------------------------------
constexpr int64_t kSeveralSeeds = -1;  // comp_seed of a component holding several seed ids

// comp_seed[root] of each component of S: 0 none, the id when all its seed voxels carry
// one id, kSeveralSeeds otherwise. Only seed voxels inside S count (as on the CPU).
struct ComponentSeedKernel {
  const int64_t* seeds;
  const uint8_t* seg;
  const int32_t* labels;  // roots after compress
  int64_t* comp_seed;
  int64_t voxels;
  MTSEG_HOST_DEVICE void operator()(int64_t i) const {
    const int64_t id = seeds[i];
    if (id <= 0 || seg[i] == 0) return;
    int64_t* cs = comp_seed + (i / voxels) * voxels + labels[i];
    const int64_t seen = launch::load_relaxed(cs);
    if (seen == id || seen == kSeveralSeeds) return;
    const int64_t old = launch::atomic_cas(cs, 0, id);
    if (old != 0 && old != id) launch::atomic_store(cs, kSeveralSeeds);
  }
};

// need[b] = 1 when a voxel of S in image b lies in a component without exactly one
// seed id (so its owner is its nearest seed voxel's): the CPU's need_nearest.
struct NeedNearestKernel {
  const uint8_t* seg;
  const int32_t* labels;
  const int64_t* comp_seed;
  uint8_t* need;
  int64_t voxels;
  MTSEG_HOST_DEVICE void operator()(int64_t i) const {
    if (seg[i] == 0) return;
    const int64_t b = i / voxels;
    if (comp_seed[b * voxels + labels[i]] <= 0) need[b] = 1;  // every writer stores the same value
  }
};

// owner[i]: the seed id voxel i of S grows into (0 outside S, or when no seed exists):
// the component's only seed id, else the id of the nearest seed voxel.
struct OwnerKernel {
  const int64_t* seeds;
  const uint8_t* seg;
  const int32_t* labels;
  const int64_t* comp_seed;
  const int64_t* feat;  // nearest seed voxel (image-local), -1 none
  int64_t* owner;
  int64_t voxels;
  MTSEG_HOST_DEVICE void operator()(int64_t i) const {
    if (seg[i] == 0) {
      owner[i] = 0;
      return;
    }
    const int64_t base = (i / voxels) * voxels;
    const int64_t cs = comp_seed[base + labels[i]];
    if (cs > 0) {
      owner[i] = cs;
      return;
    }
    // A feature index < 0 happens only when every distance overflowed: no owner then.
    owner[i] = feat[i] >= 0 ? seeds[base + feat[i]] : 0;
  }
};

// start[i] = 1 where a run of one seed id begins along a row (x = 0 or another id on
// the left): every distinct id of an image has at least one, and there are few.
struct IdRunKernel {
  const int64_t* seeds;
  uint8_t* start;
  int64_t width;
  MTSEG_HOST_DEVICE void operator()(int64_t i) const {
    const int64_t id = seeds[i];
    start[i] = id > 0 && (i % width == 0 || seeds[i - 1] != id);
  }
};

// The (image, id) of every run start, packed in order (rank: inclusive prefix sum of start).
struct IdPackKernel {
  const int64_t* seeds;
  const uint8_t* start;
  const int64_t* rank;
  int64_t* image;
  int64_t* id;
  int64_t voxels;
  MTSEG_HOST_DEVICE void operator()(int64_t i) const {
    if (start[i] == 0) return;
    const int64_t j = rank[i] - 1;
    image[j] = i / voxels;
    id[j] = seeds[i];
  }
};

// tasks[t] = (image, id) for the first of every equal pair of the (image, id) list sorted
// by image then id, so tasks are ordered as on the CPU; slot t = rank - 1.
struct TaskKernel {
  const int64_t* image;
  const int64_t* id;
  const int64_t* rank;  // inclusive prefix sum of the first-of-pair flags
  BoxTask* tasks;
  MTSEG_HOST_DEVICE void operator()(int64_t j) const {
    if (j > 0 && image[j] == image[j - 1] && id[j] == id[j - 1]) return;
    BoxTask& t = tasks[rank[j] - 1];
    t.image = image[j];
    t.id = id[j];
  }
};

struct FirstPairKernel {
  const int64_t* image;
  const int64_t* id;
  uint8_t* first;
  MTSEG_HOST_DEVICE void operator()(int64_t j) const {
    first[j] = j == 0 || image[j] != image[j - 1] || id[j] != id[j - 1];
  }
};

// The task of seed `id` in image b: binary search among the image's (ascending) ids.
MTSEG_HOST_DEVICE int64_t task_of(const BoxTask* tasks, const int64_t* image_start, int64_t b, int64_t id) {
  int64_t lo = image_start[b], hi = image_start[b + 1];
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (tasks[mid].id < id) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// Bounding box of every seed's voxels and part: a voxel counts for its seed id if it is a
// seed voxel, else for its owner (the CPU's rule). box[t] = (lo z, y, x, hi z, y, x).
// A warp per 32-voxel segment of a row (as components::InitKernel): when the whole
// segment counts for one seed, which is the common case, one lane does six atomics for
// it, instead of six per voxel on the same six addresses.
struct SeedBoxKernel {
  const int64_t* seeds;
  const int64_t* owner;
  const BoxTask* tasks;
  const int64_t* image_start;
  int32_t* box;
  int64_t depth, height, width;

  static constexpr int64_t kWorkspaceBytes = launch::kWarpSize * sizeof(int64_t);

  template <typename Warp>
  MTSEG_HOST_DEVICE void operator()(Warp& w, int64_t wi, unsigned char* workspace) const {
    const int64_t nseg = (width + launch::kWarpSize - 1) / launch::kWarpSize;
    const int64_t row = wi / nseg, x0 = (wi % nseg) * launch::kWarpSize;
    const int64_t b = row / (depth * height), z = (row / height) % depth, y = row % height;
    int64_t* ids = reinterpret_cast<int64_t*>(workspace);
    w.each([&](int lane) {
      const int64_t x = x0 + lane, i = row * width + x;
      ids[lane] = x >= width ? 0 : (seeds[i] > 0 ? seeds[i] : owner[i]);
    });
    w.sync();
    const int64_t id0 = ids[0];
    const uint32_t same = w.ballot([&](int lane) { return x0 + lane >= width || ids[lane] == id0; });
    w.each([&](int lane) {
      const int64_t id = ids[lane];
      if (id <= 0) return;
      int32_t hi_x = static_cast<int32_t>(x0 + lane);
      if (same == 0xffffffffu) {
        if (lane != 0) return;
        const int64_t end = x0 + launch::kWarpSize < width ? x0 + launch::kWarpSize : width;
        hi_x = static_cast<int32_t>(end - 1);
      }
      int32_t* bx = box + 6 * task_of(tasks, image_start, b, id);
      launch::atomic_min(bx + 0, static_cast<int32_t>(z));
      launch::atomic_min(bx + 1, static_cast<int32_t>(y));
      launch::atomic_min(bx + 2, static_cast<int32_t>(x0 + lane));
      launch::atomic_max(bx + 3, static_cast<int32_t>(z));
      launch::atomic_max(bx + 4, static_cast<int32_t>(y));
      launch::atomic_max(bx + 5, hi_x);
    });
    w.sync();  // ids is read above before the next segment overwrites it
  }
};

// Pads a box by one voxel, clamped to the image (what the CPU computes in), and writes
// the task's sizes row: voxels, lines along axes 0, 1, 2. An empty box (hi < lo) gets
// size 0.
MTSEG_HOST_DEVICE void finish_box(const int64_t lo_in[3], const int64_t hi_in[3], const int64_t full[3], BoxTask& t,
                                  int64_t* sizes) {
  bool empty = false;
  for (int a = 0; a < 3; ++a) empty = empty || hi_in[a] < lo_in[a];
  int64_t vol = 1;
  for (int a = 0; a < 3; ++a) {
    if (empty) {
      t.lo[a] = 0;
      t.n[a] = 0;
      continue;
    }
    t.lo[a] = lo_in[a] > 0 ? lo_in[a] - 1 : 0;
    const int64_t hi = hi_in[a] + 1 < full[a] - 1 ? hi_in[a] + 1 : full[a] - 1;
    t.n[a] = hi - t.lo[a] + 1;
    vol *= t.n[a];
  }
  if (empty) vol = 0;
  sizes[0] = vol;
  for (int a = 0; a < 3; ++a) sizes[1 + a] = vol == 0 ? 0 : vol / t.n[a];
}

struct SeedBoxFinishKernel {
  const int32_t* box;
  BoxTask* tasks;
  int64_t* sizes;  // tasks x kPrefixCols
  int64_t depth, height, width;
  MTSEG_HOST_DEVICE void operator()(int64_t t) const {
    const int64_t lo[3] = {box[6 * t], box[6 * t + 1], box[6 * t + 2]};
    const int64_t hi[3] = {box[6 * t + 3], box[6 * t + 4], box[6 * t + 5]};
    const int64_t full[3] = {depth, height, width};
    finish_box(lo, hi, full, tasks[t], sizes + kPrefixCols * t);
  }
};

// Arena masks of tasks [t0, t1): a = the seed's voxels, s = its part of S.
struct SeedArenaKernel {
  ArenaIndex arena;
  const int64_t* seeds;
  const int64_t* owner;
  uint8_t* a;
  uint8_t* s;
  MTSEG_HOST_DEVICE void operator()(int64_t j) const {
    int64_t t, i;
    if (!arena.at(j, t, i)) return;
    const int64_t id = arena.tasks[t].id;
    a[j] = seeds[i] == id;
    s[j] = owner[i] == id;
  }
};

// Growth of each seed inside its part (levelset_inside, as on the CPU); parts and seeds
// are disjoint between tasks, so the writes never collide.
struct SeedGrowKernel {
  ArenaIndex arena;
  const uint8_t* a;
  const uint8_t* s;
  const double* dA2;
  const double* dS2;
  double lam;
  int64_t* out;
  MTSEG_HOST_DEVICE void operator()(int64_t j) const {
    int64_t t, i;
    if (!arena.at(j, t, i)) return;
    if (a[j] == 0 && s[j] == 0) return;
    if (levelset_inside(a[j] != 0, dA2[j], dS2[j], lam)) out[i] = arena.tasks[t].id;
  }
};

// ---------------------------------------------------------------------------------
// levelset_grow: one box per image (the bounding box of A | S, padded), as on the CPU
// ---------------------------------------------------------------------------------
struct ImageBoxKernel {
  const int64_t* lo;  // B x 3, from the first set index per axis
  const int64_t* hi;  // B x 3
  const bool* any;    // B
  BoxTask* tasks;
  int64_t* sizes;
  int64_t depth, height, width;
  MTSEG_HOST_DEVICE void operator()(int64_t b) const {
    const int64_t full[3] = {depth, height, width};
    int64_t l[3], h[3];
    for (int a = 0; a < 3; ++a) {
      l[a] = any[b] ? lo[3 * b + a] : 1;
      h[a] = any[b] ? hi[3 * b + a] : 0;
    }
    tasks[b].image = b;
    tasks[b].id = 1;
    finish_box(l, h, full, tasks[b], sizes + kPrefixCols * b);
  }
};

struct ImageArenaKernel {
  ArenaIndex arena;
  const uint8_t* approx;
  const uint8_t* seg;
  uint8_t* a;
  uint8_t* s;
  MTSEG_HOST_DEVICE void operator()(int64_t j) const {
    int64_t t, i;
    if (!arena.at(j, t, i)) return;
    a[j] = approx[i] != 0;
    s[j] = seg[i] != 0;
  }
};

template <typename T>
struct LevelsetRuleKernel {
  ArenaIndex arena;
  const uint8_t* a;
  const T* dA2;
  const T* dS2;
  double lam;
  bool* out;
  MTSEG_HOST_DEVICE void operator()(int64_t j) const {
    int64_t t, i;
    if (!arena.at(j, t, i)) return;
    out[i] = levelset_inside(a[j] != 0, static_cast<double>(dA2[j]), static_cast<double>(dS2[j]), lam);
  }
};

}  // namespace lines
}  // namespace distance
}  // namespace mtseg
