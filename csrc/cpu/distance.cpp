// CPU kernels of the distance operators: edt, connected_components, levelset_grow,
// grow_instances. The per-line math is in mtseg/distance.h (shared with CUDA); this file
// lays out the passes so that memory is read along the contiguous axis:
//  1. the first spatial axis (rows of a 2D mask, slices of a 3D one) by forward and
//     backward sweeps over whole rows/planes at once (vectorised over the contiguous axis);
//  2. (3D) the middle axis: blocks of kBlock adjacent columns are gathered into
//     contiguous lines, enveloped, and scattered back (only the rows of a block between
//     its first and last foreground voxel);
//  3. the last (contiguous) axis: the envelope of each run of foreground voxels (found in
//     the mask's bytes) with its two bounding zeros, writing the output directly.
// Outputs come zero-filled from calloc and the passes write only what is not zero: a
// page that holds no foreground is never touched.
// Masks are read as bytes: 0 is background and every other byte foreground (so a bool
// tensor holding a byte 2 reads as torch reads it).
// Scheduling: under 2^21 voxels everything runs on one thread; a batch of at least as
// many images as threads hands out whole images (all passes of an image on one thread,
// one parallel region); otherwise each pass is parallel over its lines.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#include "mtseg/cpu.h"
#include "mtseg/distance.h"
#include "mtseg/distance_host.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace mtseg {
namespace distance {
namespace {

constexpr int64_t kSweepChunk = 2048;  // columns of the first pass handled per task
constexpr int64_t kBlock = 16;         // adjacent columns gathered per task in the middle pass
constexpr int64_t kSerialVoxels = int64_t{1} << 21;  // below this, one thread (a few ms of work)

// ---------------------------------------------------------------------------------
// Mask bytes, eight at a time (SWAR): the first non-zero / zero byte of a range.
// ---------------------------------------------------------------------------------
#if defined(__GNUC__) && defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define MTSEG_SWAR 1
inline uint64_t load_word(const uint8_t* p) {
  uint64_t w;
  std::memcpy(&w, p, sizeof w);
  return w;
}
// High bits flagging the zero bytes of w: the lowest flag is exactly w's first zero byte
// (a borrow can flag a non-zero byte, but only above a zero byte).
inline uint64_t zero_flags(uint64_t w) {
  constexpr uint64_t kOnes = 0x0101010101010101ull, kHighs = 0x8080808080808080ull;
  return (w - kOnes) & ~w & kHighs;
}
inline int64_t byte_index(uint64_t bits) { return __builtin_ctzll(bits) >> 3; }
#endif

// First index in [x, n) whose byte is non-zero, n if none.
inline int64_t next_set(const uint8_t* p, int64_t x, int64_t n) {
#ifdef MTSEG_SWAR
  for (; x + 32 <= n; x += 32) {  // long background runs: 32 bytes a step
    const uint64_t a = load_word(p + x), b = load_word(p + x + 8), c = load_word(p + x + 16),
                   d = load_word(p + x + 24);
    if ((a | b | c | d) == 0) continue;
    if (a != 0) return x + byte_index(a);
    if (b != 0) return x + 8 + byte_index(b);
    if (c != 0) return x + 16 + byte_index(c);
    return x + 24 + byte_index(d);
  }
  for (; x + 8 <= n; x += 8) {
    const uint64_t w = load_word(p + x);
    if (w != 0) return x + byte_index(w);
  }
#endif
  for (; x < n; ++x)
    if (p[x] != 0) return x;
  return n;
}

// First index in [x, n) whose byte is zero, n if none.
inline int64_t next_clear(const uint8_t* p, int64_t x, int64_t n) {
#ifdef MTSEG_SWAR
  for (; x + 8 <= n; x += 8) {
    const uint64_t z = zero_flags(load_word(p + x));
    if (z != 0) return x + byte_index(z);
  }
#endif
  for (; x < n; ++x)
    if (p[x] == 0) return x;
  return n;
}

// Last index in [0, n) whose byte is non-zero, -1 if none.
inline int64_t last_set(const uint8_t* p, int64_t n) {
#ifdef MTSEG_SWAR
  int64_t x = n;
  for (; x >= 8; x -= 8) {
    const uint64_t w = load_word(p + x - 8);
    if (w != 0) return x - 1 - (__builtin_clzll(w) >> 3);
  }
  for (--x; x >= 0; --x)
    if (p[x] != 0) return x;
  return -1;
#else
  for (int64_t x = n - 1; x >= 0; --x)
    if (p[x] != 0) return x;
  return -1;
#endif
}

// The voxels whose distance is wanted ("foreground" of a pass) are those with
// (byte != 0) != invert; the others are the zero set.
inline int64_t next_fg(const uint8_t* p, int64_t x, int64_t n, bool invert) {
  return invert ? next_clear(p, x, n) : next_set(p, x, n);
}
inline int64_t next_zero_set(const uint8_t* p, int64_t x, int64_t n, bool invert) {
  return invert ? next_set(p, x, n) : next_clear(p, x, n);
}
inline bool any_fg(const uint8_t* p, int64_t n, bool invert) { return next_fg(p, 0, n, invert) < n; }

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

// ---------------------------------------------------------------------------------
// Exact EDT
// ---------------------------------------------------------------------------------
// Pass 1 over `n0` rows of `r` contiguous values each (one image), columns [x0, x1):
// squared distance along the first axis to the nearest zero-set voxel. With `zeroed`
// (work is zero on entry) a row without foreground is not written at all (it is 0).
template <typename T>
MTSEG_CPU_CLONES void sweep_rows(const uint8_t* __restrict mask, bool invert, int64_t n0, int64_t r, int64_t x0,
                                 int64_t x1, double spacing, T* __restrict work, T* __restrict next,
                                 uint8_t* __restrict empty, bool zeroed) {
  const int64_t len = x1 - x0;
  const uint8_t flip = invert ? 1 : 0;
  for (int64_t y = 0; y < n0; ++y) {
    const uint8_t* __restrict m = mask + y * r + x0;
    empty[y] = zeroed && !any_fg(m, len, invert);
    if (empty[y]) continue;
    T* __restrict w = work + y * r + x0;
    if (y == 0) {
      for (int64_t x = 0; x < len; ++x) w[x] = sweep_forward<T>((m[x] != 0) != flip, inf_value<T>());
    } else {
      const T* __restrict prev = work + (y - 1) * r + x0;  // 0 where that row was skipped
      for (int64_t x = 0; x < len; ++x) w[x] = sweep_forward<T>((m[x] != 0) != flip, prev[x]);
    }
  }
  for (int64_t x = 0; x < len; ++x) next[x] = inf_value<T>();
  bool next_zero = false;
  for (int64_t y = n0 - 1; y >= 0; --y) {
    if (empty[y]) {  // all zero set: the count restarts from 0
      if (!next_zero)
        for (int64_t x = 0; x < len; ++x) next[x] = T(0);
      next_zero = true;
      continue;
    }
    next_zero = false;
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

// Envelope of lines of up to n values, with its scratch: int64 arithmetic for unit
// spacing (exact, the common case), double otherwise (see mtseg/distance.h).
template <typename T>
struct LineEnvelope {
  bool unit;
  double s2;
  std::vector<double> pv, pc;
  std::vector<T> pf;
  std::vector<int64_t> iv, ic, izn, izd;
  LineEnvelope(int64_t n, bool unit_spacing, double spacing) : unit(unit_spacing), s2(spacing * spacing) {
    if (unit) {
      iv.resize(n + 1);
      ic.resize(n + 1);
      izn.resize(n + 1);
      izd.resize(n + 1);
    } else {
      pv.resize(n);
      pc.resize(n);
      pf.resize(n);
    }
  }
  template <typename O>
  void line(const T* f, int64_t n, O* out, bool take_sqrt, double out_scale) {
    if (unit) {
      envelope_line_unit<T, O>(f, n, iv.data(), ic.data(), izn.data(), izd.data(), out, take_sqrt, out_scale);
    } else {
      envelope_line<T, O>(f, 1, n, s2, EnvelopeScratch<T>{pv.data(), pc.data(), pf.data()}, out, 1, take_sqrt,
                          out_scale);
    }
  }
  // In place, over a line whose zeros are zero voxels: each run of non-zero values with
  // its bounding zeros (as envelope_line_runs).
  void runs(T* f, int64_t n) {
    for (int64_t q = 0; q < n;) {
      if (f[q] == T(0)) {
        ++q;
        continue;
      }
      int64_t e = q + 1;
      while (e < n && f[e] != T(0)) ++e;
      const int64_t l = q > 0 ? q - 1 : 0, r = e < n ? e : n - 1;
      line<T>(f + l, r - l + 1, f + l, false, 1.0);
      q = r + 1;
    }
  }
};

// Whether lines of the geometry take the int64 envelope: unit spacing, and lines short
// enough for its products (4 n^3 below 2^62).
bool unit_envelope(const Geometry& g) {
  return g.unit_work_spacing && std::max({g.depth, g.height, g.width}) < (int64_t{1} << 19);
}

// The first and last row of a block of `nb` adjacent columns of one plane (H rows of
// W bytes) that hold foreground; hi < lo when there is none.
inline void block_rows(const uint8_t* plane, int64_t H, int64_t W, int64_t nb, bool invert, int64_t& lo,
                       int64_t& hi) {
  lo = 0;
  while (lo < H && !any_fg(plane + lo * W, nb, invert)) ++lo;
  hi = H - 1;
  while (hi > lo && !any_fg(plane + hi * W, nb, invert)) --hi;
  if (lo == H) hi = -1;
}

// Squared distances (or distances) of every image of the batch, in units of
// g.work_scale, times out_scale: `work` (T, B x voxels) holds the passes, `out` (O) the
// result. Either out is work (in place), or both are zero-filled on entry (`zeroed`).
// With `zeroed`, only what is not zero is written.
//
// `query` (optional, one byte per voxel): only the voxels with (query != 0) != query_invert
// need exact values; the last pass then envelopes, of each run, only the stretches of
// parabolas those voxels can reach. The others get upper bounds of their distances: they
// keep the previous pass's value (so the query path runs in place, with out_scale 1).
template <typename T, typename O>
void edt_batch(const uint8_t* mask, bool invert, const Geometry& g, T* work, O* out, bool take_sqrt,
               double out_scale, bool zeroed, const uint8_t* query = nullptr, bool query_invert = false) {
  TORCH_INTERNAL_ASSERT(query == nullptr || (static_cast<void*>(work) == static_cast<void*>(out) && !take_sqrt &&
                                             out_scale == 1.0),
                        "edt_batch: the query path runs in place on squared distances");
  const int64_t V = g.voxels(), B = g.batch;
  if (B == 0 || V == 0) return;
  const bool is3d = g.spatial == 3;
  const int64_t n0 = is3d ? g.depth : g.height;
  const int64_t r = is3d ? g.height * g.width : g.width;
  const double sp0 = is3d ? g.work_spacing[0] : g.work_spacing[1];
  const int64_t H = g.height, W = g.width;
  const int64_t chunks = (r + kSweepChunk - 1) / kSweepChunk;       // pass-1 items per image
  const int64_t blocks = (W + kBlock - 1) / kBlock;                  // pass-2 items per plane
  const int64_t rows = V / W;                                        // last-pass items per image
  // Pass 1: sweeps along the first axis, vectorised over the rest.
  auto pass1 = [&](int64_t begin, int64_t end) {
    std::vector<T> next(kSweepChunk);
    std::vector<uint8_t> empty(n0);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / chunks, c = item % chunks;
      const int64_t x0 = c * kSweepChunk, x1 = std::min(r, x0 + kSweepChunk);
      sweep_rows<T>(mask + b * V, invert, n0, r, x0, x1, sp0, work + b * V, next.data(), empty.data(), zeroed);
    }
  };
  // Pass 2 (3D): the middle axis, kBlock columns at a time through contiguous lines.
  const bool unit = unit_envelope(g);
  auto pass2 = [&](int64_t begin, int64_t end) {
    LineEnvelope<T> env(H, unit, g.work_spacing[1]);
    std::vector<T> buf(H * kBlock);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t plane = item / blocks, x0 = (item % blocks) * kBlock;
      const int64_t nb = std::min(kBlock, W - x0);
      int64_t lo, hi;
      block_rows(mask + plane * H * W + x0, H, W, nb, invert, lo, hi);
      if (hi < lo) continue;  // no foreground: every value is 0
      // outside [lo, hi] the block is zero set, so rows lo - 1 and hi + 1 bound its runs
      lo = std::max<int64_t>(0, lo - 1);
      hi = std::min<int64_t>(H - 1, hi + 1);
      const int64_t n = hi - lo + 1;
      T* p = work + plane * H * W + lo * W + x0;
      for (int64_t y = 0; y < n; ++y)
        for (int64_t c = 0; c < nb; ++c) buf[c * n + y] = p[y * W + c];
      for (int64_t c = 0; c < nb; ++c) env.runs(buf.data() + c * n, n);
      for (int64_t y = 0; y < n; ++y)
        for (int64_t c = 0; c < nb; ++c) p[y * W + c] = buf[c * n + y];
    }
  };
  // Last pass: the contiguous axis, each run of foreground with its bounding zeros.
  // The run [b, e) of one line (zeros at l = b - 1 and rr = e where they exist): the
  // minimiser of a voxel q lies within rad(q) of it, where rad(q) is at most its distance
  // to either zero and sqrt(f[q]) / spacing (its own parabola), so a cluster [c, ce) of
  // queried voxels needs the parabolas of [c - R, ce - 1 + R] only.
  // The stretches are enveloped in place, so no stretch may read a voxel another one has
  // written: an envelope value g[p] = s2 (p - p')^2 + f[p'] read again as a parabola
  // height gives s2 ((q - p)^2 + (p - p')^2), less than s2 (q - p')^2 (a bent path),
  // e.g. d^2 = 2 for a true 4. A cluster with a large R can reach back over stretches of
  // earlier clusters, so all stretches of the run are collected and merged into disjoint
  // ones first (a stack: each new stretch absorbs the stacked ones it overlaps), and only
  // then enveloped.
  const double sp3 = g.work_spacing[2];
  auto query_line = [&](LineEnvelope<T>& env, std::vector<int64_t>& spans, T* f, O* o, const uint8_t* qm, int64_t l,
                        int64_t b, int64_t e, int64_t rr, int64_t W) {
    spans.clear();  // disjoint stretches, (lo, hi) pairs in increasing order
    for (int64_t c = next_fg(qm, b, e, query_invert); c < e;) {
      const int64_t ce = next_zero_set(qm, c + 1, e, query_invert);
      T fmax = T(0);
      for (int64_t q = c; q < ce; ++q) fmax = std::max(fmax, f[q]);
      int64_t R = W;
      // the radius in voxels can exceed int64 (a tiny spacing along x): then it is W
      const double reach = std::ceil(std::sqrt(static_cast<double>(fmax)) / sp3);
      if (reach < static_cast<double>(W)) R = static_cast<int64_t>(reach) + 1;
      if (b > 0) R = std::min(R, ce - 1 - l);
      if (e < W) R = std::min(R, rr - c);
      int64_t lo = std::max(l, c - R), hi = std::min(rr, ce - 1 + R);
      while (!spans.empty() && lo <= spans.back()) {  // overlaps the last stacked stretch
        hi = std::max(hi, spans.back());
        spans.pop_back();
        lo = std::min(lo, spans.back());
        spans.pop_back();
      }
      spans.push_back(lo);
      spans.push_back(hi);
      c = next_fg(qm, ce, e, query_invert);
    }
    for (size_t i = 0; i < spans.size(); i += 2)
      env.line(f + spans[i], spans[i + 1] - spans[i] + 1, o + spans[i], take_sqrt, out_scale);
  };
  auto pass3 = [&](int64_t begin, int64_t end) {
    LineEnvelope<T> env(W, unit, g.work_spacing[2]);
    std::vector<int64_t> spans;
    for (int64_t line = begin; line < end; ++line) {
      const uint8_t* m = mask + line * W;
      T* f = work + line * W;
      O* o = out + line * W;
      for (int64_t x = 0;;) {
        const int64_t b = next_fg(m, x, W, invert);
        if (b >= W) break;
        const int64_t e = next_zero_set(m, b + 1, W, invert);
        const int64_t l = b > 0 ? b - 1 : b, rr = e < W ? e : W - 1;
        if (query == nullptr) {
          env.line(f + l, rr - l + 1, o + l, take_sqrt, out_scale);
        } else {
          query_line(env, spans, f, o, query + line * W, l, b, e, rr, W);
        }
        x = e;
      }
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

bool used_in_place(const at::Tensor& mask) {
  const auto t = mask.scalar_type();
  return (t == at::kBool || t == at::kByte || t == at::kChar) && mask.is_contiguous();
}

// Distances (take_sqrt) or squared distances of `mask` (contiguous bytes) as out_dtype,
// from the voxels with (mask != 0) != invert to the nearest voxel where that is false.
at::Tensor edt_of(const at::Tensor& mask, bool invert, const Geometry& g, at::ScalarType out_dtype, bool take_sqrt) {
  auto out = zeroed_cpu(mask.sizes(), out_dtype, "edt");
  const auto* m = static_cast<const uint8_t*>(mask.const_data_ptr());
  const double out_scale = take_sqrt ? g.work_scale : g.work_scale * g.work_scale;
  if (out_dtype == at::kDouble) {
    double* o = out.data_ptr<double>();
    edt_batch<double, double>(m, invert, g, o, o, take_sqrt, out_scale, true);
  } else if (work_in_double(g, out_dtype)) {
    auto work = zeroed_cpu(mask.sizes(), at::kDouble, "edt");
    edt_batch<double, float>(m, invert, g, work.data_ptr<double>(), out.data_ptr<float>(), take_sqrt, out_scale, true);
  } else {
    float* o = out.data_ptr<float>();
    edt_batch<float, float>(m, invert, g, o, o, take_sqrt, out_scale, true);
  }
  return out;
}

at::Tensor edt_cpu(const at::Tensor& mask_in, std::optional<at::ArrayRef<double>> spacing, bool squared, bool is_signed,
                   std::optional<at::ScalarType> dtype) {
  const auto g = mask_geometry(mask_in, spacing, "edt", "mask");
  const auto out_dtype = edt_dtype(dtype);
  check_edt_range(g, out_dtype, squared);
  const double n = static_cast<double>(mask_in.numel());
  const double out_bytes = static_cast<double>(c10::elementSize(out_dtype));
  check_memory(n * ((is_signed ? 2.0 : 1.0) * out_bytes + (work_in_double(g, out_dtype) && out_dtype != at::kDouble ? 8.0 : 0.0) +
                    (used_in_place(mask_in) ? 0.0 : 1.0)),
               mask_in, "edt");
  const auto mask = foreground_bytes(mask_in, "edt", "mask");
  if (!is_signed) return edt_of(mask, false, g, out_dtype, !squared);
  // Signed: -d(x, background) inside, +d(x, foreground) outside; exactly one is non-zero.
  auto inside = edt_of(mask, false, g, out_dtype, !squared);
  auto outside = edt_of(mask, true, g, out_dtype, !squared);
  return outside.sub_(inside);
}

// ---------------------------------------------------------------------------------
// Connected components: union-find over the runs of foreground voxels of each row
// (label_runs), linking every root to the smaller run index, so that the root of a
// component is its first run in raster order; one more scan numbers the roots 1..n in
// that order. Parallel over images.
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

// The already-scanned rows whose runs a run of row (z, y) touches, relative to it; `ext`
// = 1 where the connectivity allows a diagonal step along x (the touching range of a run
// [x0, x1) is then [x0 - 1, x1 + 1)). The left neighbour is inside the row's own run.
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

// A row as bits (bit x % 64 of word x / 64 = voxel x is foreground), 64 voxels a word,
// with one zero word past the end so that "bit x + 1" is always readable. `start` flags
// the first voxel of each run; `base[w]` is the image-wide index of the first run that
// starts in word w, so the run holding foreground voxel x is
// base[x / 64] + (starts at or below x in its word) - 1.
struct BitRow {
  uint64_t* fg;
  uint64_t* start;
  int32_t* base;
};

// Rows kept while scanning, the current one and the neighbours it can touch: in 2D the
// previous row (slot y % 2), in 3D the previous plane (slot (z % 2) * H + y). Grown, never
// shrunk, so a thread's scratch allocates only for its first (or a larger) image.
struct RunScratch {
  std::vector<uint64_t> words;
  std::vector<int32_t> bases;
  std::vector<int32_t> runs;    // runs of each kept row
  std::vector<int32_t> first;   // index of the first run of each row of the image, then the total
  std::vector<int32_t> parent;  // union-find over runs, then (in place) their labels
  int64_t stride = 0;
  BitRow slot(int64_t s) {
    return BitRow{words.data() + 2 * s * stride, words.data() + (2 * s + 1) * stride, bases.data() + s * stride};
  }
};

inline uint64_t low_bits_through(int b) { return (uint64_t{2} << b) - 1; }  // bits 0..b (b = 63: all)

// Bits of 64 bytes (any non-zero byte is foreground).
MTSEG_ALWAYS_INLINE uint64_t bits_of_64(const uint8_t* p) {
#if defined(__SSE2__)
  const __m128i zero = _mm_setzero_si128();
  uint64_t word = 0;
  for (int k = 0; k < 4; ++k) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * k));
    const auto zeros = static_cast<uint32_t>(_mm_movemask_epi8(_mm_cmpeq_epi8(v, zero)));
    word |= static_cast<uint64_t>(~zeros & 0xFFFFu) << (16 * k);
  }
  return word;
#else
  uint64_t word = 0;
  for (int k = 0; k < 64; ++k) word |= static_cast<uint64_t>(p[k] != 0) << k;
  return word;
#endif
}

// fg bits of the W bytes of `line` into words[0 .. nw], the last (padding) word zero;
// returns whether the row has foreground.
MTSEG_ALWAYS_INLINE bool row_to_bits(const uint8_t* line, int64_t W, uint64_t* words) {
  const int64_t full = W / 64, nw = (W + 63) / 64;
  uint64_t any = 0;
  for (int64_t w = 0; w < full; ++w) any |= words[w] = bits_of_64(line + 64 * w);
  if (nw > full) {
    uint8_t tail[64] = {};  // the partial last word, zero-padded
    std::memcpy(tail, line + 64 * full, static_cast<size_t>(W - 64 * full));
    any |= words[full] = bits_of_64(tail);
  }
  words[nw] = 0;
  return any != 0;
}

// Unions of the runs of row `a` with the runs of the earlier row `b` they touch, each
// touching pair once (from the voxel where it first touches): with ext = 0, a pair
// (i, k) overlaps from max(i0, k0), which is the start of i or of k; with ext = 1 it
// touches from max(i0, k0 - 1): the start of i (touching the run through x, or if x is
// clear the runs through x - 1 and x + 1) or the voxel just before the start of k.
MTSEG_ALWAYS_INLINE void unite_rows(const BitRow& a, const BitRow& b, int ext, int64_t nw, int32_t* parent) {
  auto run_at = [](const BitRow& r, int64_t x) {
    const int64_t w = x >> 6;
    return r.base[w] + static_cast<int32_t>(__builtin_popcountll(r.start[w] & low_bits_through(x & 63))) - 1;
  };
  auto bit = [](const uint64_t* words, int64_t x) { return (words[x >> 6] >> (x & 63)) & 1u; };
  for (int64_t w = 0; w < nw; ++w) {
    const uint64_t fa = a.fg[w], fb = b.fg[w];
    if (fa == 0) continue;
    const uint64_t sa = a.start[w], sb = b.start[w];
    const int64_t x0 = 64 * w;
    if (ext == 0) {
      for (uint64_t e = fa & fb & (sa | sb); e != 0; e &= e - 1) {
        const int64_t x = x0 + __builtin_ctzll(e);
        unite(parent, run_at(a, x), run_at(b, x));
      }
      continue;
    }
    const uint64_t prev = w > 0 ? b.fg[w - 1] >> 63 : 0, next = b.fg[w + 1] << 63;
    const uint64_t near = fb | (fb << 1) | prev | (fb >> 1) | next;       // b set at x - 1, x or x + 1
    const uint64_t enters = (sb >> 1) | (b.start[w + 1] << 63);          // a run of b starts at x + 1
    for (uint64_t e = sa & near; e != 0; e &= e - 1) {
      const int64_t x = x0 + __builtin_ctzll(e);
      const int32_t i = run_at(a, x);
      if (bit(b.fg, x)) {
        unite(parent, i, run_at(b, x));
        continue;
      }
      if (x > 0 && bit(b.fg, x - 1)) unite(parent, i, run_at(b, x - 1));
      if (bit(b.fg, x + 1)) unite(parent, i, run_at(b, x + 1));
    }
    for (uint64_t e = fa & ~sa & enters; e != 0; e &= e - 1) {
      const int64_t x = x0 + __builtin_ctzll(e);
      unite(parent, run_at(a, x), run_at(b, x + 1));
    }
  }
}

// Upper bound of a RunScratch's memory for one image of `g`: at most one run per two
// voxels (plus one), a run index per row, and the kept rows' bits and bases.
double run_scratch_bytes(const Geometry& g) {
  const double kept = g.spatial == 3 ? 2.0 * static_cast<double>(g.height) : 2.0;
  const double stride = static_cast<double>((g.width + 63) / 64 + 1);
  return 4.0 * (static_cast<double>(g.voxels()) / 2.0 + 1.0) + 4.0 * static_cast<double>(g.depth * g.height + 1) +
         kept * stride * 20.0;
}

// Labels one image (labels are zero on entry: only the runs are written); returns the
// number of components. Two scans of the rows: the first finds the runs (as bits) and
// unites them with the runs they touch in the kept neighbour rows; the second numbers the
// runs in raster order, where a root (parent[i] == i) opens label n + 1 and any other run
// takes the label already stored at its parent (parent[i] < i was numbered before it).
// Cloned per ISA for the popcnt instruction (the baseline x86-64 calls libgcc for it).
MTSEG_CPU_CLONES int64_t label_runs(const uint8_t* m, const Geometry& g, const std::vector<RowOffset>& offsets, RunScratch& r,
                   int32_t* labels) {
  const int64_t D = g.depth, H = g.height, W = g.width, rows = D * H;
  const int64_t nw = (W + 63) / 64;
  r.stride = nw + 1;
  const int64_t slots = g.spatial == 3 ? 2 * H : 2;
  if (static_cast<int64_t>(r.words.size()) < 2 * slots * r.stride) r.words.resize(2 * slots * r.stride);
  if (static_cast<int64_t>(r.bases.size()) < slots * r.stride) r.bases.resize(slots * r.stride);
  r.runs.assign(slots, 0);
  r.first.resize(rows + 1);
  auto slot_of = [&](int64_t z, int64_t y) { return g.spatial == 3 ? (z & 1) * H + y : (y & 1); };
  auto& parent = r.parent;
  parent.clear();
  int32_t n_runs = 0;
  for (int64_t z = 0; z < D; ++z) {
    for (int64_t y = 0; y < H; ++y) {
      const int64_t s = slot_of(z, y);
      BitRow a = r.slot(s);
      r.first[z * H + y] = n_runs;
      if (!row_to_bits(m + (z * H + y) * W, W, a.fg)) {
        r.runs[s] = 0;
        continue;
      }
      int32_t count = n_runs;
      uint64_t carry = 0;  // bit 63 of the previous word
      for (int64_t w = 0; w < nw; ++w) {
        const uint64_t f = a.fg[w];
        a.start[w] = f & ~((f << 1) | carry);
        carry = f >> 63;
        a.base[w] = count;
        count += static_cast<int32_t>(__builtin_popcountll(a.start[w]));
      }
      a.start[nw] = 0;
      r.runs[s] = count - n_runs;
      if (count == n_runs) continue;
      parent.resize(count);
      for (int32_t i = n_runs; i < count; ++i) parent[i] = i;
      n_runs = count;
      for (const auto& off : offsets) {
        const int64_t zz = z + off.dz, yy = y + off.dy;
        if (zz < 0 || yy < 0 || yy >= H) continue;
        const int64_t ns = slot_of(zz, yy);
        if (r.runs[ns] != 0) unite_rows(a, r.slot(ns), off.ext, nw, parent.data());
      }
    }
  }
  r.first[rows] = n_runs;
  int32_t* p = parent.data();
  int32_t n = 0;
  for (int64_t row = 0; row < rows; ++row) {
    const uint8_t* line = m + row * W;
    int32_t* out = labels + row * W;
    int64_t x = 0;
    for (int32_t i = r.first[row]; i < r.first[row + 1]; ++i) {
      x = next_set(line, x, W);
      const int64_t stop = next_clear(line, x + 1, W);
      const int32_t l = p[i] == i ? ++n : p[p[i]];
      p[i] = l;
      std::fill(out + x, out + stop, l);
      x = stop;
    }
  }
  return n;
}

std::tuple<at::Tensor, at::Tensor> connected_components_cpu(const at::Tensor& mask_in, int64_t connectivity) {
  const char* op = "connected_components";
  const auto g = mask_geometry(mask_in, std::nullopt, op, "mask");
  const int order = connectivity_order(connectivity, g.spatial, op);
  TORCH_CHECK_VALUE(g.voxels() < (int64_t{1} << 31), op, ": an image of ", g.voxels(),
                    " voxels does not fit int32 labels (at most 2^31 - 1 voxels per image)");
  check_memory(static_cast<double>(mask_in.numel()) * (4.0 + (used_in_place(mask_in) ? 0.0 : 1.0)) +
                   static_cast<double>(std::min<int64_t>(g.batch, at::get_num_threads())) * run_scratch_bytes(g),
               mask_in, op);
  const auto mask = foreground_bytes(mask_in, op, "mask");
  auto labels = zeroed_cpu(mask.sizes(), at::kInt, op);
  auto counts = at::zeros({g.batch}, mask.options().dtype(at::kLong));
  const int64_t V = g.voxels();
  if (g.batch == 0 || V == 0) return {labels, counts};
  const auto offsets = row_offsets(g.spatial, order);
  const auto* m = static_cast<const uint8_t*>(mask.const_data_ptr());
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

// Private, for tests: squared distances from edt_batch's query path (in place, as
// levelset_grow runs it): exact where (query != 0) != query_invert, an upper bound of the
// squared distance elsewhere. float32 or float64 work (the two types levelset_grow uses).
at::Tensor edt_query_cpu(const at::Tensor& mask_in, const at::Tensor& query_in,
                         std::optional<at::ArrayRef<double>> spacing, bool query_invert,
                         std::optional<at::ScalarType> dtype) {
  const char* op = "_edt_query";
  const auto g = mask_geometry(mask_in, spacing, op, "mask");
  mask_geometry(query_in, spacing, op, "query");
  check_same_shape(mask_in, query_in, op, "mask", "query");
  const auto t = dtype.value_or(at::kDouble);
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kDouble, op, ": dtype must be float32 or float64, got ", t);
  check_memory(static_cast<double>(mask_in.numel()) * (c10::elementSize(t) + 2.0), mask_in, op);
  const auto mask = foreground_bytes(mask_in, op, "mask");
  const auto query = foreground_bytes(query_in, op, "query");
  auto out = zeroed_cpu(mask.sizes(), t, op);
  const auto* m = static_cast<const uint8_t*>(mask.const_data_ptr());
  const auto* q = static_cast<const uint8_t*>(query.const_data_ptr());
  // out_scale 1: the voxels the last pass skips keep their work values (work units)
  if (t == at::kDouble) {
    double* o = out.data_ptr<double>();
    edt_batch<double, double>(m, false, g, o, o, false, 1.0, false, q, query_invert);
  } else {
    float* o = out.data_ptr<float>();
    edt_batch<float, float>(m, false, g, o, o, false, 1.0, false, q, query_invert);
  }
  return g.work_scale == 1.0 ? out : out.mul_(g.work_scale * g.work_scale);
}

// ---------------------------------------------------------------------------------
// Level-set growth: two squared EDTs (to A, and to the complement of S), then the rule.
// The transforms work in float unless work_in_double says otherwise (as edt's).
// ---------------------------------------------------------------------------------
template <typename T>
MTSEG_CPU_CLONES void levelset_rule(const uint8_t* __restrict a, const T* __restrict dA2, const T* __restrict dS2,
                                   double lam, int64_t n, uint8_t* __restrict out) {
  for (int64_t i = 0; i < n; ++i)
    out[i] = levelset_inside(a[i] != 0, static_cast<double>(dA2[i]), static_cast<double>(dS2[i]), lam);
}

// One image: the two transforms are only needed in the bounding box of S | A padded by
// one voxel (clamped to the image): it holds all of A, so d(x, A) there is exact, and by
// clamping, the nearest voxel outside S of any x in it is in it too. Outside the box
// there is neither A nor S, so the result is false (`out` is zero on entry).
template <typename T>
void levelset_image(const uint8_t* a, const uint8_t* s, const Geometry& g, double lam, uint8_t* out,
                    std::vector<uint8_t>& ca, std::vector<uint8_t>& cs, std::vector<T>& dA2, std::vector<T>& dS2,
                    std::vector<uint8_t>& co) {
  const int64_t D = g.depth, H = g.height, W = g.width;
  int64_t lo[3] = {D, H, W}, hi[3] = {-1, -1, -1};
  for (int64_t z = 0; z < D; ++z)
    for (int64_t y = 0; y < H; ++y) {
      // first and last foreground byte of the row in A or S
      const uint8_t* ra = a + (z * H + y) * W;
      const uint8_t* rs = s + (z * H + y) * W;
      const int64_t x0 = std::min(next_set(ra, 0, W), next_set(rs, 0, W));
      if (x0 == W) continue;
      const int64_t x1 = std::max(last_set(ra, W), last_set(rs, W));
      lo[0] = std::min(lo[0], z), hi[0] = std::max(hi[0], z);
      lo[1] = std::min(lo[1], y), hi[1] = std::max(hi[1], y);
      lo[2] = std::min(lo[2], x0), hi[2] = std::max(hi[2], x1);
    }
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
  // squared distances in units of work_scale: the rule is the same in any units.
  // The rule needs exact distances only in S minus A: A passes whatever its values, and
  // outside S d(x, complement(S)) = 0 exactly, so x fails there as long as d(x, A) > 0,
  // which the upper bounds the query path leaves elsewhere keep. d(x, complement(S))
  // takes the query path (its runs are rows of S, and A's part of them is skipped);
  // d(x, A) does not: S fills most of its runs, so the stretches cover nearly all of them
  // and the query's own work made it slower (callgrind, 8 HC18 update masks: 22.2 M
  // instructions in full, 25.2 M queried, while the query saved 37.4 -> 34.3 M on d_S).
  edt_batch<T, T>(ca.data(), true, cg, dA2.data(), dA2.data(), false, 1.0, false);  // zero set: A
  edt_batch<T, T>(cs.data(), false, cg, dS2.data(), dS2.data(), false, 1.0, false, ca.data(), true);  // zero set: not S
  levelset_rule<T>(ca.data(), dA2.data(), dS2.data(), lam, CV, co.data());
  for (int64_t z = 0; z < n[0]; ++z)
    for (int64_t y = 0; y < n[1]; ++y)
      std::memcpy(out + ((lo[0] + z) * H + lo[1] + y) * W + lo[2], co.data() + (z * n[1] + y) * n[2], n[2]);
}

// Images in parallel, each whole on one thread (a single image runs its passes in parallel).
template <typename T>
void levelset_batch(const uint8_t* a, const uint8_t* s, const Geometry& g, double lam, uint8_t* out) {
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
  const char* op = "levelset_grow";
  const auto g = mask_geometry(approx_in, spacing, op, "approx");
  mask_geometry(seg_in, spacing, op, "seg");
  check_same_shape(approx_in, seg_in, op, "approx", "seg");
  check_lambda(lam, op);
  check_memory(static_cast<double>(approx_in.numel()) *
                   (1.0 + (used_in_place(approx_in) ? 0.0 : 1.0) + (used_in_place(seg_in) ? 0.0 : 1.0)),
               approx_in, op);
  const auto a = foreground_bytes(approx_in, op, "approx");
  const auto s = foreground_bytes(seg_in, op, "seg");
  auto out = zeroed_cpu(a.sizes(), at::kBool, op);
  if (out.numel() == 0) return out;
  const auto* pa = static_cast<const uint8_t*>(a.const_data_ptr());
  const auto* ps = static_cast<const uint8_t*>(s.const_data_ptr());
  auto* po = static_cast<uint8_t*>(out.data_ptr());
  if (work_in_double(g, at::kFloat)) {
    levelset_batch<double>(pa, ps, g, lam, po);
  } else {
    levelset_batch<float>(pa, ps, g, lam, po);
  }
  return out;
}

// ---------------------------------------------------------------------------------
// Multi-object growth. Per image:
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

// Nearest voxel of `zero` (flat index; -1 only when the image has no zero voxel) for
// every voxel of one image, by one envelope pass per axis carrying the minimiser along.
void feature_transform(const uint8_t* zero, const Geometry& g, std::vector<double>& work,
                       std::vector<int64_t>& feat) {
  const int64_t V = g.voxels();
  work.resize(V);
  feat.resize(V);
  for (int64_t p = 0; p < V; ++p) {
    work[p] = zero[p] != 0 ? 0.0 : inf_value<double>();
    feat[p] = zero[p] != 0 ? p : -1;
  }
  const int64_t dims[3] = {g.depth, g.height, g.width};
  const int64_t strides[3] = {g.height * g.width, g.width, 1};
  const int64_t nmax = std::max({g.depth, g.height, g.width});
  std::vector<double> pv(nmax), pc(nmax), pf(nmax), f(nmax), d(nmax);
  std::vector<int64_t> fi(nmax), arg(nmax);
  for (int axis = 3 - g.spatial; axis < 3; ++axis) {
    const int64_t n = dims[axis], st = strides[axis];
    const double s2 = g.work_spacing[axis] * g.work_spacing[axis];
    // lines along the axis start at outer * n * st + inner, inner < st
    for (int64_t outer = 0; outer < V / (n * st); ++outer)
      for (int64_t inner = 0; inner < st; ++inner) {
        const int64_t start = outer * n * st + inner;
        for (int64_t q = 0; q < n; ++q) {
          f[q] = work[start + q * st];
          fi[q] = feat[start + q * st];
        }
        envelope_line<double, double>(f.data(), 1, n, s2, EnvelopeScratch<double>{pv.data(), pc.data(), pf.data()},
                                      d.data(), 1, false, 1.0, arg.data(), 1);
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

// Seed ids as a contiguous int64 tensor, in one pass that checks them: negative ids and
// uint64 ids of 2^63 or more are rejected (no .min().item(), which unsigned types lack);
// a bool seed map gives id 1 for every non-zero byte.
template <typename V>
int64_t copy_ids(const V* in, int64_t n, int64_t* out, bool& too_large) {
  int64_t lowest = 0;
  for (int64_t i = 0; i < n; ++i) {
    const V v = in[i];
    if constexpr (std::is_same_v<V, uint64_t>) too_large |= v > static_cast<uint64_t>(INT64_MAX);
    out[i] = static_cast<int64_t>(v);
    lowest = std::min(lowest, out[i]);
  }
  return lowest;
}

at::Tensor seed_ids(const at::Tensor& seeds_in, const char* op) {
  const auto t = seeds_in.scalar_type();
  const auto in = seeds_in.contiguous();
  auto out = at::empty(in.sizes(), in.options().dtype(at::kLong));
  const int64_t n = in.numel();
  int64_t* o = out.data_ptr<int64_t>();
  const void* p = in.const_data_ptr();
  bool too_large = false;
  int64_t lowest = 0;
  switch (t) {
    case at::kBool: {
      const auto* b = static_cast<const uint8_t*>(p);
      for (int64_t i = 0; i < n; ++i) o[i] = b[i] != 0;
      break;
    }
    case at::kByte: lowest = copy_ids(static_cast<const uint8_t*>(p), n, o, too_large); break;
    case at::kChar: lowest = copy_ids(static_cast<const int8_t*>(p), n, o, too_large); break;
    case at::kShort: lowest = copy_ids(static_cast<const int16_t*>(p), n, o, too_large); break;
    case at::kInt: lowest = copy_ids(static_cast<const int32_t*>(p), n, o, too_large); break;
    case at::kLong: lowest = copy_ids(static_cast<const int64_t*>(p), n, o, too_large); break;
    case at::kUInt16: lowest = copy_ids(static_cast<const uint16_t*>(p), n, o, too_large); break;
    case at::kUInt32: lowest = copy_ids(static_cast<const uint32_t*>(p), n, o, too_large); break;
    case at::kUInt64: lowest = copy_ids(static_cast<const uint64_t*>(p), n, o, too_large); break;
    default:
      TORCH_CHECK_TYPE(false, op, ": seeds must hold integer instance ids (0 = no seed), got ", t);
  }
  TORCH_CHECK_VALUE(!too_large, op, ": seed ids must be below 2^63 (they are returned as int64)");
  TORCH_CHECK_VALUE(lowest >= 0, op, ": seed ids must be >= 0 (0 = no seed), got ", lowest);
  return out;
}

at::Tensor grow_instances_cpu(const at::Tensor& seeds_in, const at::Tensor& seg_in, double lam,
                              std::optional<at::ArrayRef<double>> spacing, int64_t connectivity) {
  const char* op = "grow_instances";
  const auto g = mask_geometry(seeds_in, spacing, op, "seeds");
  mask_geometry(seg_in, spacing, op, "seg");
  check_same_shape(seeds_in, seg_in, op, "seeds", "seg");
  check_lambda(lam, op);
  const auto t = seeds_in.scalar_type();
  TORCH_CHECK_TYPE(!at::isFloatingType(t), op, ": seeds must hold integer instance ids (0 = no seed), got ", t);
  if (connectivity == 0) connectivity = g.spatial == 2 ? 4 : 6;
  const int order = connectivity_order(connectivity, g.spatial, op);
  const int64_t V = g.voxels();
  TORCH_CHECK_VALUE(V < (int64_t{1} << 31), op, ": an image of ", V, " voxels is too large (at most 2^31 - 1)");
  // output, ids, owners, one byte of S, and per thread an image of components, distances
  // and features
  check_memory(static_cast<double>(seeds_in.numel()) * 21.0 + static_cast<double>(V) * 20.0, seeds_in, op);
  const auto seeds = seed_ids(seeds_in, op);
  const auto seg = foreground_bytes(seg_in, op, "seg");
  auto out = zeroed_cpu(seeds.sizes(), at::kLong, op);
  if (g.batch == 0 || V == 0) return out;
  const int64_t* sd = seeds.data_ptr<int64_t>();
  const auto* sg = static_cast<const uint8_t*>(seg.const_data_ptr());
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
      const uint8_t* m = sg + b * V;
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
      std::fill(comp.begin(), comp.end(), 0);  // label_runs writes only the runs
      const int64_t n_comp = label_runs(m, one, offsets, runs, comp.data());
      // Seed of each component: -1 none, k the only one, -2 several.
      std::vector<int32_t> comp_seed(n_comp + 1, -1);
      for (int64_t p = 0; p < V; ++p) {
        if (s[p] <= 0 || m[p] == 0) continue;
        const int32_t k = index_of(s[p]);
        int32_t& cs = comp_seed[comp[p]];
        cs = (cs == -1 || cs == k) ? k : -2;
      }
      bool need_nearest = false;
      for (int64_t p = 0; p < V && !need_nearest; ++p) need_nearest = m[p] != 0 && comp_seed[comp[p]] < 0;
      if (need_nearest) {
        std::vector<uint8_t> z8(V);
        for (int64_t p = 0; p < V; ++p) z8[p] = s[p] > 0;
        feature_transform(z8.data(), one, work, feat);  // the image has a seed: no -1
      }
      auto& bx = boxes[b];
      bx.assign(id.size(), Box{});
      for (int64_t p = 0; p < V; ++p) {
        int32_t k = -1;
        if (m[p] != 0) {
          const int32_t cs = comp_seed[comp[p]];
          k = cs >= 0 ? cs : (feat[p] >= 0 ? index_of(s[feat[p]]) : -1);
          own[p] = k;
        }
        if (s[p] > 0) k = index_of(s[p]);
        if (k >= 0) bx[k].add(p / (g.height * g.width), (p / g.width) % g.height, p % g.width);
      }
    }
  });
  // Step 4: grow every seed inside its part (squared distances in units of work_scale:
  // the rule is the same in any units).
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
      edt_batch<double, double>(a.data(), true, cg, dA2.data(), dA2.data(), false, 1.0, false);
      edt_batch<double, double>(s.data(), false, cg, dS2.data(), dS2.data(), false, 1.0, false);
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

TORCH_LIBRARY_FRAGMENT(mtseg, m) {
  // Private (tests only): the query path of the CPU EDT that levelset_grow uses.
  m.def("_edt_query(Tensor mask, Tensor query, float[]? spacing=None, bool query_invert=False, "
        "ScalarType? dtype=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(mtseg, CPU, m) {
  m.impl("edt", &edt_cpu);
  m.impl("connected_components", &connected_components_cpu);
  m.impl("levelset_grow", &levelset_grow_cpu);
  m.impl("grow_instances", &grow_instances_cpu);
  m.impl("_edt_query", &edt_query_cpu);
}


}  // namespace distance
}  // namespace mtseg
