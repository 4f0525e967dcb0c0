// Connected components on a GPU: union-find over voxels with atomic linking
// (the label-equivalence family of Oliveira & Lotufo 2010, Playne & Hawick 2018, and the
// decision-tree neighbour choice of Allegretti et al. 2019), in four launches:
//  1. init (a warp per 32 voxels of a row): every voxel points to the first voxel of its
//     run inside the warp's 32-voxel segment (one ballot), so a run needs no union
//     inside a segment and union-find trees start shallow;
//  2. merge (a thread per voxel, step functor): unions with the backward neighbours that
//     the decision tree below keeps; union links the larger root to the smaller
//     (atomicMin), so every tree's root is the first voxel of its component in raster
//     order;
//  3. compress: every voxel stores its root; roots are flagged;
//  4. final (after a prefix sum of the flags per image): label = rank of the root, which
//     numbers components 1..n in raster order of their first voxel, as the CPU kernel
//     and scipy.ndimage.label do. The labels array is int32 per image (local indices).
//
// Invariant of the label array L during merge: L[x] <= x and L[x] lies in x's component
// (for every foreground x); roots have L[r] = r. Links and path compression only lower
// entries (atomicMin), so concurrent finds may read stale but valid ancestors.
#pragma once

#include <cstdint>

#include "mtseg/launch.h"
#include "mtseg/macros.h"

namespace mtseg {
namespace components {

// A batch of masks (B, D, H, W) (2D: D = 1) and the connectivity's order: the largest
// number of non-zero offsets of a neighbour (1: 4/6, 2: 8/18, 3: 26).
struct Grid {
  int64_t batch, depth, height, width;
  int spatial, order;
  MTSEG_HOST_DEVICE int64_t voxels() const { return depth * height * width; }
  MTSEG_HOST_DEVICE int64_t segments() const { return (width + launch::kWarpSize - 1) / launch::kWarpSize; }
};

// The backward neighbours, grouped by the row (dz, dy) they lie in; `wide` rows take the
// three voxels x-1, x, x+1, the others only x. The left neighbour (0, 0, -1) is
// implicit. Same sets as the CPU's row offsets.
struct RowGroup {
  int dz, dy;
  bool wide;
};

MTSEG_HOST_DEVICE int row_groups(int spatial, int order, RowGroup* out) {
  if (spatial == 2) {
    out[0] = {0, -1, order >= 2};
    return 1;
  }
  out[0] = {0, -1, order >= 2};
  out[1] = {-1, 0, order >= 2};
  if (order == 1) return 2;
  out[2] = {-1, -1, order >= 3};
  out[3] = {-1, 1, order >= 3};
  return 4;
}

constexpr int kMaxTargets = 9;  // the left link + two per row group

// Lane of the first voxel of lane `lane`'s run within a warp's segment, from the
// ballot `fg` of the segment's foreground voxels (bit l = lane l is foreground).
MTSEG_HOST_DEVICE int segment_run_start(uint32_t fg, int lane) {
  const uint32_t gaps = ~fg & launch::lanes_below(lane);
  return gaps == 0 ? 0 : launch::highest_bit(gaps) + 1;
}

// The voxels (image-local indices) that foreground voxel (z, y, x) of image `m` must be
// united with, so that after merge every pair of foreground neighbours is connected:
//  * left (x - 1) only at the first voxel of a segment (inside one, init linked the run);
//  * per row group: the voxel above (x) if set; otherwise, in wide rows, x - 1 and x + 1;
//  * the voxel above is skipped when x - 1 and the voxel above it are both set, and in a
//    wide row x - 1's upper neighbour is skipped when x - 1 is set: in both cases the left
//    voxel has the same row group, unites with (or by the same rule, by induction on x,
//    is connected to) its own upper neighbour, and x ~ x - 1 and the neighbours ~ each
//    other along their rows. x + 1's upper neighbour has no such left partner (the voxel
//    above x is clear), so it is always a target.
MTSEG_HOST_DEVICE int merge_targets(const uint8_t* m, const Grid& g, int64_t z, int64_t y, int64_t x,
                                    int32_t* targets) {
  const int64_t H = g.height, W = g.width;
  auto fg = [&](int64_t zz, int64_t yy, int64_t xx) { return m[(zz * H + yy) * W + xx] != 0; };
  const bool left = x > 0 && fg(z, y, x - 1);
  int n = 0;
  if (left && x % launch::kWarpSize == 0) targets[n++] = static_cast<int32_t>((z * H + y) * W + x - 1);
  RowGroup groups[4];
  const int ng = row_groups(g.spatial, g.order, groups);
  for (int k = 0; k < ng; ++k) {
    const int64_t zz = z + groups[k].dz, yy = y + groups[k].dy;
    if (zz < 0 || yy < 0 || yy >= H) continue;
    const int64_t row = (zz * H + yy) * W;
    if (fg(zz, yy, x)) {
      if (!(left && fg(zz, yy, x - 1))) targets[n++] = static_cast<int32_t>(row + x);
      continue;
    }
    if (!groups[k].wide) continue;
    if (!left && x > 0 && fg(zz, yy, x - 1)) targets[n++] = static_cast<int32_t>(row + x - 1);
    if (x + 1 < W && fg(zz, yy, x + 1)) targets[n++] = static_cast<int32_t>(row + x + 1);  // n - 1 = x is clear
  }
  return n;
}

// union(a, b) of Playne & Hawick as a sequence of steps, each one access to L: find both
// roots with path halving (L[a] lowered to its grandparent by atomicMin), then link the
// larger root to the smaller one by atomicMin; when that root is no longer a root (a
// concurrent link), continue from the value found there.
struct UnionState {
  int32_t a, b, p;
  int phase;
};

enum UnionPhase : int { kReadA = 0, kParentA, kHalveA, kReadB, kParentB, kHalveB, kLink };

MTSEG_HOST_DEVICE UnionState union_start(int32_t a, int32_t b) { return UnionState{a, b, 0, kReadA}; }

// One step of union on the label array L (one image); true when the union is done.
MTSEG_HOST_DEVICE bool union_step(int32_t* L, UnionState& s) {
  switch (s.phase) {
    case kReadA: {
      const int32_t p = launch::load_relaxed(L + s.a);
      if (p == s.a) {
        s.phase = kReadB;
      } else {
        s.p = p;
        s.phase = kParentA;
      }
      return false;
    }
    case kParentA: {
      const int32_t gp = launch::load_relaxed(L + s.p);
      if (gp == s.p) {
        s.a = s.p;
        s.phase = kReadB;
      } else {
        s.p = gp;
        s.phase = kHalveA;
      }
      return false;
    }
    case kHalveA:
      launch::atomic_min(L + s.a, s.p);
      s.a = s.p;
      s.phase = kReadA;
      return false;
    case kReadB: {
      const int32_t p = launch::load_relaxed(L + s.b);
      if (p == s.b) {
        s.phase = kLink;
      } else {
        s.p = p;
        s.phase = kParentB;
      }
      return false;
    }
    case kParentB: {
      const int32_t gp = launch::load_relaxed(L + s.p);
      if (gp == s.p) {
        s.b = s.p;
        s.phase = kLink;
      } else {
        s.p = gp;
        s.phase = kHalveB;
      }
      return false;
    }
    case kHalveB:
      launch::atomic_min(L + s.b, s.p);
      s.b = s.p;
      s.phase = kReadB;
      return false;
    default: {  // kLink
      if (s.a == s.b) return true;
      if (s.a < s.b) {
        const int32_t old = launch::atomic_min(L + s.b, s.a);
        if (old == s.b) return true;
        s.b = old;
      } else {
        const int32_t old = launch::atomic_min(L + s.a, s.b);
        if (old == s.a) return true;
        s.a = old;
      }
      s.phase = kReadA;
      return false;
    }
  }
}

// Root of x with reads only (after merge, when nothing links any more).
MTSEG_HOST_DEVICE int32_t find_root(const int32_t* L, int32_t x) {
  int32_t p = L[x];
  while (p != x) {
    x = p;
    p = L[x];
  }
  return x;
}

// 1. init: warp w covers segment w % segments of row w / segments (rows over the whole
// batch); L[v] = first voxel of v's run in the segment, -1 for background.
struct InitKernel {
  const uint8_t* mask;
  int32_t* labels;
  Grid g;
  template <typename Warp>
  MTSEG_HOST_DEVICE void operator()(Warp& w, int64_t wi, unsigned char*) const {
    const int64_t nseg = g.segments();
    const int64_t row = wi / nseg, x0 = (wi % nseg) * launch::kWarpSize;
    const int64_t rows_per_image = g.depth * g.height;
    const int64_t local_row = row % rows_per_image;
    const uint8_t* m = mask + row * g.width;
    int32_t* L = labels + row * g.width;
    const uint32_t fg = w.ballot([&](int lane) { return x0 + lane < g.width && m[x0 + lane] != 0; });
    w.each([&](int lane) {
      const int64_t x = x0 + lane;
      if (x >= g.width) return;
      L[x] = (fg >> lane & 1u) ? static_cast<int32_t>(local_row * g.width + x0 + segment_run_start(fg, lane)) : -1;
    });
  }
};

// 2. merge: thread i = voxel i of the batch; unions with merge_targets, one after the other.
struct MergeState {
  int32_t* L;  // the image's labels
  int32_t self;
  int32_t targets[kMaxTargets];
  int count, next;
  UnionState u;
};

struct MergeKernel {
  const uint8_t* mask;
  int32_t* labels;
  Grid g;
  using State = MergeState;
  MTSEG_HOST_DEVICE bool begin(int64_t i, State& s) const {
    if (mask[i] == 0) return false;
    const int64_t V = g.voxels(), b = i / V, v = i % V;
    const int64_t x = v % g.width, y = (v / g.width) % g.height, z = v / (g.width * g.height);
    s.count = merge_targets(mask + b * V, g, z, y, x, s.targets);
    if (s.count == 0) return false;
    s.L = labels + b * V;
    s.self = static_cast<int32_t>(v);
    s.next = 1;
    s.u = union_start(s.self, s.targets[0]);
    return true;
  }
  MTSEG_HOST_DEVICE bool step(State& s) const {
    if (!union_step(s.L, s.u)) return false;
    if (s.next == s.count) return true;
    s.u = union_start(s.self, s.targets[s.next++]);
    return false;
  }
};

// 3. compress: L[v] = root(v); roots[v] = 1 for roots (0 elsewhere, background too).
struct CompressKernel {
  const uint8_t* mask;
  int32_t* labels;
  uint8_t* roots;  // may be null (grow_instances needs the roots only)
  int64_t voxels;
  MTSEG_HOST_DEVICE void operator()(int64_t i) const {
    if (mask[i] == 0) {
      if (roots != nullptr) roots[i] = 0;
      return;
    }
    const int64_t b = i / voxels;
    const int32_t v = static_cast<int32_t>(i % voxels);
    int32_t* L = labels + b * voxels;
    const int32_t r = find_root(L, v);
    L[v] = r;
    if (roots != nullptr) roots[i] = r == v;
  }
};

// 4. final, in place on `rank` (the inclusive prefix sum of the root flags per image):
// rank[v] = rank[root(v)] for foreground, 0 for background; counts[b] = rank[last voxel]
// read before it is overwritten. Race-free: the only entries read by other threads are
// those of roots, whose thread writes back the value they hold.
struct FinalKernel {
  const uint8_t* mask;
  const int32_t* labels;
  int32_t* rank;
  int64_t* counts;
  int64_t voxels;
  MTSEG_HOST_DEVICE void operator()(int64_t i) const {
    const int64_t b = i / voxels, v = i % voxels;
    const int32_t value = mask[i] != 0 ? rank[b * voxels + labels[i]] : 0;
    if (v == voxels - 1) counts[b] = rank[i];
    rank[i] = value;
  }
};

}  // namespace components
}  // namespace mtseg
