// Per-line math of the exact Euclidean distance transform, shared by the CPU (.cpp)
// and CUDA (.cu) kernels, so that the CPU tests exercise what the GPU runs.
//
// The transform is separable (Felzenszwalb & Huttenlocher, "Distance Transforms of
// Sampled Functions", ToC 2012): squared distances are computed one axis at a time.
//  * first axis: distance along the line to the nearest zero voxel, by a forward and a
//    backward sweep (sweep_forward / sweep_backward / sweep_square);
//  * every further axis: the lower envelope of the parabolas
//        y = s2 * (q - p)^2 + f[p]   (s2 = spacing^2 of that axis)
//    of the previous pass's values f, evaluated at every q (envelope_line). Lines whose f
//    is +inf everywhere (no zero voxel reachable yet) stay +inf.
// Parabola intersections are compared in double from the stored values, as fractions
// (no division): with unit spacing those are integers and the comparisons exact, so the
// envelope is exact; with spacing, each pass rounds once to the working type.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "mtseg/macros.h"

namespace mtseg {
namespace distance {

template <typename T>
MTSEG_HOST_DEVICE T inf_value() {
  return static_cast<T>(INFINITY);
}

// Forward sweep step of the first axis: the count of steps since the last zero voxel
// (+inf before the first one). `foreground` is true for voxels whose distance is wanted.
template <typename T>
MTSEG_HOST_DEVICE T sweep_forward(bool foreground, T previous) {
  return foreground ? previous + T(1) : T(0);
}

// Backward sweep step: the nearer of the forward count and the count from the next voxel.
template <typename T>
MTSEG_HOST_DEVICE T sweep_backward(T forward, T next) {
  const T from_next = next + T(1);
  return from_next < forward ? from_next : forward;
}

// Squared physical distance of a step count along the first axis.
template <typename T>
MTSEG_HOST_DEVICE T sweep_square(T count, double spacing) {
  if (!(count < inf_value<T>())) return inf_value<T>();
  const double d = static_cast<double>(count) * spacing;
  return static_cast<T>(d * d);
}

// Scratch of envelope_line for a line of up to n values (n entries each): pv holds the
// positions of the parabolas kept, pc their c = f + s2 * p^2 and pf their f.
template <typename T>
struct EnvelopeScratch {
  double* pv;
  double* pc;
  T* pf;
};

// Lower envelope of the parabolas s2 * (q - p)^2 + f[p] over p, at every q of a line of
// n values (f[p * f_stride]); out[q * out_stride] receives the minimum (its square root
// when take_sqrt) times out_scale. Points with f = +inf carry no parabola; a line
// without any finite value gives +inf everywhere. When arg is not null,
// arg[q * arg_stride] receives the minimising p (-1 for an all-inf line; ties go to the
// smaller p).
//
// Parabola k of the stack starts where it meets parabola k - 1, at
// (pc[k] - pc[k-1]) / (2 s2 (pv[k] - pv[k-1])). That fraction is never formed:
// intersections are compared by cross-multiplying, where the common factor 2 s2
// cancels, which is exact for unit spacing (integer products far below 2^53). The values
// are kept in the scratch, so out may alias f.
template <typename T, typename O>
MTSEG_HOST_DEVICE void envelope_line(const T* f, int64_t f_stride, int64_t n, double s2, EnvelopeScratch<T> s,
                                     O* out, int64_t out_stride, bool take_sqrt, double out_scale = 1.0,
                                     int64_t* arg = nullptr, int64_t arg_stride = 0) {
  double* pv = s.pv;
  double* pc = s.pc;
  int64_t k = -1;
  for (int64_t q = 0; q < n; ++q) {
    const T fq = f[q * f_stride];
    if (!(fq < inf_value<T>())) continue;
    const double dq = static_cast<double>(q);
    const double cq = static_cast<double>(fq) + s2 * dq * dq;
    // Drop the top parabola while the new one meets it at or left of the top's start
    // (parabola 0 starts at -inf and is never dropped).
    while (k > 0 && (cq - pc[k]) * (pv[k] - pv[k - 1]) <= (pc[k] - pc[k - 1]) * (dq - pv[k])) --k;
    ++k;
    pv[k] = dq;
    pc[k] = cq;
    s.pf[k] = fq;
  }
  if (k < 0) {
    for (int64_t q = 0; q < n; ++q) {
      out[q * out_stride] = inf_value<O>();
      if (arg != nullptr) arg[q * arg_stride] = -1;
    }
    return;
  }
  const double s2x2 = 2.0 * s2;
  int64_t j = 0;
  for (int64_t q = 0; q < n; ++q) {
    const double dq = static_cast<double>(q);
    // move on while the next parabola starts left of q
    while (j < k && pc[j + 1] - pc[j] < s2x2 * dq * (pv[j + 1] - pv[j])) ++j;
    const double dx = dq - pv[j];
    const double d2 = s2 * dx * dx + static_cast<double>(s.pf[j]);
    out[q * out_stride] = static_cast<O>((take_sqrt ? sqrt(d2) : d2) * out_scale);
    if (arg != nullptr) arg[q * arg_stride] = static_cast<int64_t>(pv[j]);
  }
}

// envelope_line for unit spacing and integer values (the squared distances of unit
// spacing are sums of squared integer steps): the same envelope in int64 arithmetic,
// exact and without conversions, for lines of n values with n^3 far below 2^62 (the
// caller checks). Scratch: pv, pc, zn, zd of n + 1 entries each; parabola k has
// c = pc[k] and starts at zn[k] / (2 zd[k]). The top of the stack is kept in registers.
// out may alias f.
// The envelope at q of envelope_line_unit's stack, moving j (the parabola of the
// previous q) right while the next parabola starts left of q.
MTSEG_HOST_DEVICE int64_t unit_envelope_at(int64_t q, int64_t& j, const int64_t* pv, const int64_t* pc,
                                           const int64_t* zn, const int64_t* zd) {
  while (zn[j + 1] < 2 * q * zd[j + 1]) ++j;
  const int64_t dx = q - pv[j];
  return dx * dx + pc[j] - pv[j] * pv[j];  // (q - v)^2 + f[v]
}

template <typename T, typename O>
MTSEG_HOST_DEVICE void envelope_line_unit(const T* f, int64_t n, int64_t* pv, int64_t* pc, int64_t* zn, int64_t* zd,
                                          O* out, bool take_sqrt, double out_scale) {
  int64_t k = -1, tv = 0, tc = 0, tzn = 0, tzd = 1;  // top: position, c, start as a fraction
  for (int64_t q = 0; q < n; ++q) {
    const T fq = f[q];
    if (!(fq < inf_value<T>())) continue;
    const int64_t cq = static_cast<int64_t>(fq) + q * q;
    int64_t num = -1, den = 0;  // the new start: -inf for the first parabola
    while (k >= 0) {
      num = cq - tc;
      den = q - tv;
      if (k == 0 || num * tzd > tzn * den) break;  // meets the top right of the top's start
      --k;
      tv = pv[k], tc = pc[k], tzn = zn[k], tzd = zd[k];
    }
    ++k;
    pv[k] = tv = q;
    pc[k] = tc = cq;
    zn[k] = tzn = num;
    zd[k] = tzd = den;
  }
  if (k < 0) {
    for (int64_t q = 0; q < n; ++q) out[q] = inf_value<O>();
    return;
  }
  zn[k + 1] = INT64_MAX / 4;  // a start beyond every q: the scan never passes parabola k
  zd[k + 1] = 1;
  int64_t j = 0;
  if (take_sqrt && out_scale == 1.0 && sizeof(O) == 4) {
    // float output: a float square root of the exact integer is the correctly rounded
    // distance (below 2^24 the integer is exact in float; otherwise, double first)
    for (int64_t q = 0; q < n; ++q) {
      const int64_t d2 = unit_envelope_at(q, j, pv, pc, zn, zd);
      out[q] = static_cast<O>(d2 < (int64_t{1} << 24) ? sqrtf(static_cast<float>(d2)) : sqrt(static_cast<double>(d2)));
    }
  } else {
    for (int64_t q = 0; q < n; ++q) {
      const double d = static_cast<double>(unit_envelope_at(q, j, pv, pc, zn, zd));
      out[q] = static_cast<O>((take_sqrt ? sqrt(d) : d) * out_scale);
    }
  }
}

// envelope_line for lines whose zeros are zero voxels (f = 0 exactly there, f > 0
// elsewhere), as after the first pass: a zero voxel's parabola lies below every parabola
// beyond it, so each run of non-zero values only needs the envelope of itself and its two
// bounding zeros. Zero voxels are written as 0 without any envelope work, so the cost
// follows the foreground, not the line. Same result as envelope_line; out may alias f.
template <typename T, typename O>
MTSEG_HOST_DEVICE void envelope_line_runs(const T* f, int64_t f_stride, int64_t n, double s2, EnvelopeScratch<T> s,
                                          O* out, int64_t out_stride, bool take_sqrt, double out_scale = 1.0) {
  // In place (out is f), zero voxels already hold their result.
  const bool in_place = static_cast<const void*>(out) == static_cast<const void*>(f) && out_stride == f_stride;
  int64_t q = 0;
  while (q < n) {
    if (f[q * f_stride] == T(0)) {
      // skip a run of zeros, four at a time (one branch per four voxels)
      int64_t e = q + 1;
      while (e + 4 <= n && (f[e * f_stride] == T(0)) & (f[(e + 1) * f_stride] == T(0)) &
                               (f[(e + 2) * f_stride] == T(0)) & (f[(e + 3) * f_stride] == T(0)))
        e += 4;
      while (e < n && f[e * f_stride] == T(0)) ++e;
      if (!in_place)
        for (int64_t i = q; i < e; ++i) out[i * out_stride] = O(0);
      q = e;
      continue;
    }
    int64_t e = q + 1;
    while (e < n && f[e * f_stride] != T(0)) ++e;
    const int64_t l = q > 0 ? q - 1 : 0;  // the zero before the run, if any
    const int64_t r = e < n ? e : n - 1;  // the zero after it, if any
    envelope_line<T, O>(f + l * f_stride, f_stride, r - l + 1, s2, s, out + l * out_stride, out_stride, take_sqrt,
                        out_scale);
    q = r + 1;
  }
}

// The level-set growth rule of Ke et al.: x joins A when phi(x) = d(x, A) - lam *
// d(x, complement(S)) <= 0, from the squared distances dA2 = d(x, A)^2 (0 on A, +inf when
// A is empty) and dS2 = d(x, complement(S))^2 (0 outside S, +inf when S is everything).
// Conventions that keep it well defined: x in A always stays (phi = 0 there, whatever
// lam * inf would give); lam = 0 adds nothing; an empty A grows nothing.
MTSEG_HOST_DEVICE bool levelset_inside(bool in_a, double dA2, double dS2, double lam) {
  // Branch-free (the CPU loop vectorises it). lam = 0: lam * d is 0 or NaN, so only A
  // passes; outside S, d(x, complement(S)) = 0, so only A passes; an infinite d(x, A)
  // (empty A) never passes. phi is formed as d_A - lam * d_S, as the reference does.
  const double da = sqrt(dA2), ds = sqrt(dS2);
  return in_a | ((da < INFINITY) & (da - lam * ds <= 0.0));
}

}  // namespace distance
}  // namespace mtseg
