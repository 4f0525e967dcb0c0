// CPU kernels of the presence operators. Input (B, K, N) is cut into chunks of voxels;
// every (image, chunk) is one work item that turns the logits into probabilities for all
// K classes at once (max-subtracted softmax, or a stable sigmoid), reduces each class
// over the chunk, and leaves a partial result. Partials are merged per (image, class) in
// chunk order, so results do not depend on the number of threads. The backward
// recomputes the probabilities chunk by chunk from the input and the (B, K, 2)
// statistics of the forward: nothing of size B*K*N is stored between the two.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "mtseg/cpu.h"
#include "mtseg/presence.h"

namespace mtseg {
namespace presence {
namespace {

constexpr int64_t kChunk = 2048;  // voxels per work item

// Index flags as wide as T, so that no vector loop mixes widths.
template <typename T>
using index_t = std::conditional_t<std::is_same_v<T, float>, int32_t, int64_t>;

MTSEG_ALWAYS_INLINE float exp_(float x) { return cpu::exp(x); }
MTSEG_ALWAYS_INLINE double exp_(double x) { return std::exp(x); }
MTSEG_ALWAYS_INLINE float log_(float x) { return cpu::log(x); }
MTSEG_ALWAYS_INLINE double log_(double x) { return std::log(x); }

// log(1 + y) from log(1 + y) rounded: exact to a few ulp even where 1 + y rounds to 1
// (the correction y / ((1 + y) - 1) of Goldberg, "What every computer scientist should
// know about floating-point arithmetic", Theorem 4).
// The division is computed on every lane, with a safe denominator, so that the select
// needs no branch (GCC does not speculate a possibly trapping division into a select).
template <typename T>
MTSEG_ALWAYS_INLINE T log1p_(T y) {
  const T u = T(1) + y;
  const T d = u - T(1);
  const T l = log_(u) * (y / (d == T(0) ? T(1) : d));
  return d == T(0) ? y : l;
}

// What probabilities() writes into L next to the probabilities P.
enum class Extra { None, Log, Complement };

// Probabilities of all K classes of one chunk: P[k * len + x]. With Extra::Log, also
// L = log(1 - P), with Extra::Complement L = 1 - P, both without cancellation: for the
// winning class of a voxel (softmax) from the sum of the other classes, for sigmoid from
// exp(-|z|) (log: -softplus(z)).
template <typename T, Activation A, Extra E>
MTSEG_ALWAYS_INLINE void probabilities_impl(const T* __restrict z, int64_t stride, int64_t K, int64_t len,
                                            T* __restrict P, T* __restrict L, T* __restrict zmax,
                                            T* __restrict others, index_t<T>* __restrict winner) {
  if constexpr (A == Activation::Softmax) {
    for (int64_t x = 0; x < len; ++x) {
      zmax[x] = z[x];
      winner[x] = 0;
      others[x] = T(0);
    }
    for (int64_t k = 1; k < K; ++k) {
      const T* zk = z + k * stride;
      for (int64_t x = 0; x < len; ++x) {
        const T v = zk[x];
        const bool gt = v > zmax[x];
        zmax[x] = gt ? v : zmax[x];
        winner[x] = gt ? static_cast<index_t<T>>(k) : winner[x];
      }
    }
    for (int64_t k = 0; k < K; ++k) {
      const T* zk = z + k * stride;
      T* pk = P + k * len;
      for (int64_t x = 0; x < len; ++x) {
        const T e = exp_(zk[x] - zmax[x]);
        pk[x] = e;
        others[x] += winner[x] == static_cast<index_t<T>>(k) ? T(0) : e;
      }
    }
    // zmax is no longer needed: it holds 1 / (1 + others) from here on, and others holds
    // log(1 - p) of the winning class, others / (1 + others).
    for (int64_t x = 0; x < len; ++x) zmax[x] = T(1) / (T(1) + others[x]);
    if constexpr (E == Extra::Log)
      for (int64_t x = 0; x < len; ++x) others[x] = log_(others[x] * zmax[x]);
    if constexpr (E == Extra::Complement)
      for (int64_t x = 0; x < len; ++x) others[x] = others[x] * zmax[x];
    for (int64_t k = 0; k < K; ++k) {
      T* pk = P + k * len;
      T* lk = L + k * len;
      for (int64_t x = 0; x < len; ++x) {
        const T p = pk[x] * zmax[x];
        pk[x] = p;
        if constexpr (E == Extra::Log) lk[x] = winner[x] == static_cast<index_t<T>>(k) ? others[x] : log1p_(-p);
        if constexpr (E == Extra::Complement) lk[x] = winner[x] == static_cast<index_t<T>>(k) ? others[x] : T(1) - p;
      }
    }
  } else if constexpr (A == Activation::Sigmoid) {
    for (int64_t k = 0; k < K; ++k) {
      const T* zk = z + k * stride;
      T* pk = P + k * len;
      T* lk = L + k * len;
      for (int64_t x = 0; x < len; ++x) {
        const T v = zk[x];
        const T a = exp_(-std::abs(v));
        const T d = T(1) + a;
        pk[x] = (v >= T(0) ? T(1) : a) / d;
        if constexpr (E == Extra::Log) lk[x] = -((v > T(0) ? v : T(0)) + log1p_(a));
        if constexpr (E == Extra::Complement) lk[x] = (v >= T(0) ? a : T(1)) / d;
      }
    }
  } else {
    for (int64_t k = 0; k < K; ++k) {
      const T* zk = z + k * stride;
      T* pk = P + k * len;
      T* lk = L + k * len;
      for (int64_t x = 0; x < len; ++x) {
        pk[x] = zk[x];
        if constexpr (E == Extra::Log) lk[x] = log1p_(-zk[x]);
        if constexpr (E == Extra::Complement) lk[x] = T(1) - zk[x];
      }
    }
  }
}

// Backward through the activation: from G = dLoss/dP (K rows of len) to dLoss/dz.
template <typename T, Activation A>
MTSEG_ALWAYS_INLINE void activation_backward_impl(const T* __restrict z, int64_t stride, int64_t K, int64_t len,
                                                  const T* __restrict P, const T* __restrict G, T* __restrict dot,
                                                  T* __restrict out, int64_t out_stride) {
  if constexpr (A == Activation::Softmax) {
    for (int64_t x = 0; x < len; ++x) dot[x] = T(0);
    for (int64_t k = 0; k < K; ++k)
      for (int64_t x = 0; x < len; ++x) dot[x] += P[k * len + x] * G[k * len + x];
    for (int64_t k = 0; k < K; ++k) {
      T* ok = out + k * out_stride;
      for (int64_t x = 0; x < len; ++x) ok[x] = P[k * len + x] * (G[k * len + x] - dot[x]);
    }
  } else if constexpr (A == Activation::Sigmoid) {
    for (int64_t k = 0; k < K; ++k) {
      const T* zk = z + k * stride;
      T* ok = out + k * out_stride;
      for (int64_t x = 0; x < len; ++x) {
        const T v = zk[x];
        const T a = exp_(-std::abs(v));
        const T q = (v >= T(0) ? a : T(1)) / (T(1) + a);  // 1 - p without cancellation
        ok[x] = G[k * len + x] * P[k * len + x] * q;
      }
    }
  } else {
    for (int64_t k = 0; k < K; ++k) {
      T* ok = out + k * out_stride;
      for (int64_t x = 0; x < len; ++x) ok[x] = G[k * len + x];
    }
  }
}

// Arg-max over the classes of every voxel of a chunk (the argmax mode): the class of the
// largest input, the first one on ties; NaN counts as the largest value (the first NaN
// wins), as in torch.argmax. Independent of the activation: softmax and sigmoid are
// increasing, so the arg-max of the input is that of the exact probabilities.
template <typename T>
MTSEG_ALWAYS_INLINE void argmax_impl(const T* __restrict z, int64_t stride, int64_t K, int64_t len, T* __restrict zmax,
                                     index_t<T>* __restrict winner) {
  for (int64_t x = 0; x < len; ++x) {
    zmax[x] = z[x];
    winner[x] = 0;
  }
  for (int64_t k = 1; k < K; ++k) {
    const T* zk = z + k * stride;
    for (int64_t x = 0; x < len; ++x) {
      const T v = zk[x], m = zmax[x];
      const bool take = v > m || (v != v && m == m);
      zmax[x] = take ? v : m;
      winner[x] = take ? static_cast<index_t<T>>(k) : winner[x];
    }
  }
}

// Per-class reductions over one chunk, with `valid` holding 0/1. Elementwise passes are
// plain loops (the compiler vectorises them); the sums and maxima run in 8 lanes of GCC
// vector types, combined in a fixed order at the end, so that they vectorise without
// -ffast-math and the result does not depend on the threads.
template <typename T>
struct Lanes;
template <>
struct Lanes<float> {
  typedef float type __attribute__((vector_size(32)));
};
template <>
struct Lanes<double> {
  typedef double type __attribute__((vector_size(64)));
};
template <typename T>
using lanes_t = typename Lanes<T>::type;
using lanes_d = lanes_t<double>;

template <typename T>
MTSEG_ALWAYS_INLINE lanes_t<T> load_lanes(const T* p) {
  lanes_t<T> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

MTSEG_ALWAYS_INLINE double combine(lanes_d a) {
  return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

// sum over x of double(a[x]).
template <typename T>
MTSEG_ALWAYS_INLINE double sum_as_double(const T* __restrict a, int64_t len) {
  lanes_d acc = {};
  int64_t x = 0;
  for (; x + 8 <= len; x += 8) acc += __builtin_convertvector(load_lanes(a + x), lanes_d);
  double tail = 0;
  for (; x < len; ++x) tail += static_cast<double>(a[x]);
  return combine(acc) + tail;
}

// noisy-or: sum of the finite log(1 - p) in double, number of log(1 - p) = -inf. Rewrites
// l (valid voxels' finite logs, 0 elsewhere).
template <typename T>
MTSEG_ALWAYS_INLINE void noisy_or_sum_impl(T* __restrict l, const T* __restrict valid, int64_t len,
                                           double* __restrict sum, double* __restrict infs) {
  constexpr T ninf = -std::numeric_limits<T>::infinity();
  // three simple loops: GCC vectorises each, not one that both counts and selects
  for (int64_t x = 0; x < len; ++x) l[x] = valid[x] != T(0) ? l[x] : T(0);
  index_t<T> count = 0;
  for (int64_t x = 0; x < len; ++x) count += l[x] == ninf ? 1 : 0;
  if (count > 0)
    for (int64_t x = 0; x < len; ++x) l[x] = l[x] == ninf ? T(0) : l[x];
  *sum = sum_as_double(l, len);
  *infs = static_cast<double>(count);
}

// exp((p - m) / T) as exp((p - m) * inv_t); p = m gives 1 even where 1 / T overflows
// (inv_t = inf, temperatures below ~3e-39 in float), where 0 * inf would be NaN.
template <typename T>
MTSEG_ALWAYS_INLINE T scaled_exp(T p, T m, T inv_t) {
  const T d = p - m;
  return exp_(d == T(0) ? T(0) : d * inv_t);
}

// smooth max: the chunk's largest valid p (NaN if one is NaN) and sum exp((p - m) / T)
// in double. `scratch` holds len values of T.
template <typename T>
MTSEG_ALWAYS_INLINE void smooth_max_sum_impl(const T* __restrict p, const T* __restrict valid, int64_t len, T inv_t,
                                             T* __restrict scratch, T* __restrict m_out, double* __restrict s_out) {
  constexpr T ninf = -std::numeric_limits<T>::infinity();
  for (int64_t x = 0; x < len; ++x) scratch[x] = valid[x] != T(0) ? p[x] : ninf;
  index_t<T> nans = 0;
  for (int64_t x = 0; x < len; ++x) nans += scratch[x] != scratch[x] ? 1 : 0;
  if (nans > 0) {
    *m_out = std::numeric_limits<T>::quiet_NaN();
    *s_out = 0;
    return;
  }
  lanes_t<T> mx;
  for (int j = 0; j < 8; ++j) mx[j] = ninf;
  int64_t x = 0;
  for (; x + 8 <= len; x += 8) {
    const lanes_t<T> v = load_lanes(scratch + x);
    mx = v > mx ? v : mx;
  }
  T m = ninf;
  for (int j = 0; j < 8; ++j) m = mx[j] > m ? mx[j] : m;
  for (; x < len; ++x) m = scratch[x] > m ? scratch[x] : m;
  *m_out = m;
  if (!(m > ninf)) {  // no valid voxel
    *s_out = 0;
    return;
  }
  for (int64_t y = 0; y < len; ++y) {
    const T e = scaled_exp(p[y], m, inv_t);
    scratch[y] = valid[y] != T(0) ? e : T(0);
  }
  *s_out = sum_as_double(scratch, len);
}

// max: the voxel of the largest valid p; among equal p the smallest complement c (exact
// 1 - p); then the first voxel. Returns its index (-1 without a valid non-NaN voxel) and
// sets *nan when a valid p is NaN. `scratch` holds len values of T.
template <typename T>
MTSEG_ALWAYS_INLINE int64_t max_reduce_impl(const T* __restrict p, const T* __restrict c, const T* __restrict valid,
                                            int64_t len, T* __restrict scratch, T* __restrict best_out,
                                            T* __restrict best_c_out, bool* __restrict nan) {
  constexpr T ninf = -std::numeric_limits<T>::infinity(), pinf = std::numeric_limits<T>::infinity();
  for (int64_t x = 0; x < len; ++x) scratch[x] = valid[x] != T(0) ? p[x] : ninf;
  index_t<T> nans = 0, n_valid = 0;
  for (int64_t x = 0; x < len; ++x) nans += scratch[x] != scratch[x] ? 1 : 0;
  for (int64_t x = 0; x < len; ++x) n_valid += valid[x] != T(0) ? 1 : 0;
  *nan = nans > 0;
  if (n_valid == nans) return -1;
  lanes_t<T> mx;  // NaN never wins: v > mx is false for it
  for (int j = 0; j < 8; ++j) mx[j] = ninf;
  int64_t x = 0;
  for (; x + 8 <= len; x += 8) {
    const lanes_t<T> v = load_lanes(scratch + x);
    mx = v > mx ? v : mx;
  }
  T best = ninf;
  for (int j = 0; j < 8; ++j) best = mx[j] > best ? mx[j] : best;
  for (; x < len; ++x) best = scratch[x] > best ? scratch[x] : best;
  for (int64_t y = 0; y < len; ++y) scratch[y] = (valid[y] != T(0)) & (p[y] == best) ? c[y] : pinf;
  lanes_t<T> mn;
  for (int j = 0; j < 8; ++j) mn[j] = pinf;
  for (x = 0; x + 8 <= len; x += 8) {
    const lanes_t<T> v = load_lanes(scratch + x);
    mn = v < mn ? v : mn;
  }
  T best_c = pinf;
  for (int j = 0; j < 8; ++j) best_c = mn[j] < best_c ? mn[j] : best_c;
  for (; x < len; ++x) best_c = scratch[x] < best_c ? scratch[x] : best_c;
  *best_out = best;
  *best_c_out = best_c;
  for (int64_t y = 0; y < len; ++y)
    if (valid[y] != T(0) && p[y] == best && c[y] == best_c) return y;
  return -1;  // not reached: some valid voxel holds (best, best_c)
}

// hard: number of valid voxels with p > t.
template <typename T>
MTSEG_ALWAYS_INLINE int64_t count_above_impl(const T* __restrict p, const T* __restrict valid, int64_t len, T t) {
  index_t<T> n = 0;
  for (int64_t x = 0; x < len; ++x) n += (valid[x] != T(0)) & (p[x] > t) ? 1 : 0;
  return n;
}

// dPresence/dp of one class over a chunk, written over G (which holds L on entry).
// noisy-or from the complements (L = 1 - p): g exp(S) / (1 - p_x).
template <typename T>
MTSEG_ALWAYS_INLINE void noisy_or_grad_complement_impl(T* __restrict G, const T* __restrict valid, int64_t len,
                                                       T gp) {
  for (int64_t x = 0; x < len; ++x) {
    const T d = gp / G[x];
    G[x] = valid[x] != T(0) ? d : T(0);
  }
}

// noisy-or from the logs (L = log(1 - p)), no voxel with p = 1: g exp(S - log(1 - p_x)).
template <typename T>
MTSEG_ALWAYS_INLINE void noisy_or_grad_log_impl(T* __restrict G, const T* __restrict valid, int64_t len, T g, T S) {
  for (int64_t x = 0; x < len; ++x) {
    const T d = g * exp_(S - G[x]);
    G[x] = valid[x] != T(0) ? d : T(0);
  }
}

// smooth max: g / s * exp((p_x - m) / T).
template <typename T>
MTSEG_ALWAYS_INLINE void smooth_max_grad_impl(T* __restrict G, const T* __restrict p, const T* __restrict valid,
                                              int64_t len, T gs, T m, T inv_t) {
  for (int64_t x = 0; x < len; ++x) {
    const T d = gs * scaled_exp(p[x], m, inv_t);
    G[x] = valid[x] != T(0) ? d : T(0);
  }
}

// float copies for each instruction set; double (gradcheck, reference precision) stays scalar.
#define MTSEG_DEFINE_PROBABILITIES(NAME, A, LOG)                                                                    \
  MTSEG_CPU_CLONES void NAME(const float* __restrict z, int64_t stride, int64_t K, int64_t len, float* __restrict P, \
                             float* __restrict L, float* __restrict zmax, float* __restrict others,                 \
                             int32_t* __restrict winner) {                                                           \
    probabilities_impl<float, A, LOG>(z, stride, K, len, P, L, zmax, others, winner);                                \
  }
MTSEG_DEFINE_PROBABILITIES(probabilities_softmax, Activation::Softmax, Extra::None)
MTSEG_DEFINE_PROBABILITIES(probabilities_softmax_log, Activation::Softmax, Extra::Log)
MTSEG_DEFINE_PROBABILITIES(probabilities_softmax_complement, Activation::Softmax, Extra::Complement)
MTSEG_DEFINE_PROBABILITIES(probabilities_sigmoid, Activation::Sigmoid, Extra::None)
MTSEG_DEFINE_PROBABILITIES(probabilities_sigmoid_log, Activation::Sigmoid, Extra::Log)
MTSEG_DEFINE_PROBABILITIES(probabilities_sigmoid_complement, Activation::Sigmoid, Extra::Complement)
#undef MTSEG_DEFINE_PROBABILITIES

#define MTSEG_DEFINE_ACTIVATION_BACKWARD(NAME, A)                                                                  \
  MTSEG_CPU_CLONES void NAME(const float* __restrict z, int64_t stride, int64_t K, int64_t len,                    \
                             const float* __restrict P, const float* __restrict G, float* __restrict dot,          \
                             float* __restrict out, int64_t out_stride) {                                          \
    activation_backward_impl<float, A>(z, stride, K, len, P, G, dot, out, out_stride);                              \
  }
MTSEG_DEFINE_ACTIVATION_BACKWARD(activation_backward_softmax, Activation::Softmax)
MTSEG_DEFINE_ACTIVATION_BACKWARD(activation_backward_sigmoid, Activation::Sigmoid)
#undef MTSEG_DEFINE_ACTIVATION_BACKWARD

MTSEG_CPU_CLONES void argmax_winners(const float* __restrict z, int64_t stride, int64_t K, int64_t len,
                                     float* __restrict zmax, int32_t* __restrict winner) {
  argmax_impl<float>(z, stride, K, len, zmax, winner);
}
MTSEG_CPU_CLONES void noisy_or_sum(float* __restrict l, const float* __restrict valid, int64_t len,
                                   double* __restrict sum, double* __restrict infs) {
  noisy_or_sum_impl<float>(l, valid, len, sum, infs);
}
MTSEG_CPU_CLONES void smooth_max_sum(const float* __restrict p, const float* __restrict valid, int64_t len,
                                     float inv_t, float* __restrict scratch, float* __restrict m,
                                     double* __restrict s) {
  smooth_max_sum_impl<float>(p, valid, len, inv_t, scratch, m, s);
}
MTSEG_CPU_CLONES int64_t max_reduce(const float* __restrict p, const float* __restrict c,
                                    const float* __restrict valid, int64_t len, float* __restrict scratch,
                                    float* __restrict best, float* __restrict best_c, bool* __restrict nan) {
  return max_reduce_impl<float>(p, c, valid, len, scratch, best, best_c, nan);
}
MTSEG_CPU_CLONES int64_t count_above(const float* __restrict p, const float* __restrict valid, int64_t len, float t) {
  return count_above_impl<float>(p, valid, len, t);
}
MTSEG_CPU_CLONES void noisy_or_grad_complement(float* __restrict G, const float* __restrict valid, int64_t len,
                                               float gp) {
  noisy_or_grad_complement_impl<float>(G, valid, len, gp);
}
MTSEG_CPU_CLONES void noisy_or_grad_log(float* __restrict G, const float* __restrict valid, int64_t len, float g,
                                        float S) {
  noisy_or_grad_log_impl<float>(G, valid, len, g, S);
}
MTSEG_CPU_CLONES void smooth_max_grad(float* __restrict G, const float* __restrict p, const float* __restrict valid,
                                      int64_t len, float gs, float m, float inv_t) {
  smooth_max_grad_impl<float>(G, p, valid, len, gs, m, inv_t);
}
// The double versions are the templates themselves.
void argmax_winners(const double* z, int64_t stride, int64_t K, int64_t len, double* zmax, int64_t* winner) {
  argmax_impl<double>(z, stride, K, len, zmax, winner);
}
void noisy_or_sum(double* l, const double* valid, int64_t len, double* sum, double* infs) {
  noisy_or_sum_impl<double>(l, valid, len, sum, infs);
}
void smooth_max_sum(const double* p, const double* valid, int64_t len, double inv_t, double* scratch, double* m,
                    double* s) {
  smooth_max_sum_impl<double>(p, valid, len, inv_t, scratch, m, s);
}
int64_t max_reduce(const double* p, const double* c, const double* valid, int64_t len, double* scratch, double* best,
                   double* best_c, bool* nan) {
  return max_reduce_impl<double>(p, c, valid, len, scratch, best, best_c, nan);
}
int64_t count_above(const double* p, const double* valid, int64_t len, double t) {
  return count_above_impl<double>(p, valid, len, t);
}
void noisy_or_grad_complement(double* G, const double* valid, int64_t len, double gp) {
  noisy_or_grad_complement_impl<double>(G, valid, len, gp);
}
void noisy_or_grad_log(double* G, const double* valid, int64_t len, double g, double S) {
  noisy_or_grad_log_impl<double>(G, valid, len, g, S);
}
void smooth_max_grad(double* G, const double* p, const double* valid, int64_t len, double gs, double m, double inv_t) {
  smooth_max_grad_impl<double>(G, p, valid, len, gs, m, inv_t);
}

template <typename T, Extra E>
void probabilities_for(Activation A, const T* z, int64_t stride, int64_t K, int64_t len, T* P, T* L, T* zmax, T* others,
                       index_t<T>* winner) {
  if constexpr (std::is_same_v<T, float>) {
    constexpr bool log = E == Extra::Log, none = E == Extra::None;
    if (A == Activation::Softmax)
      return (log ? probabilities_softmax_log : none ? probabilities_softmax : probabilities_softmax_complement)(
          z, stride, K, len, P, L, zmax, others, winner);
    if (A == Activation::Sigmoid)
      return (log ? probabilities_sigmoid_log : none ? probabilities_sigmoid : probabilities_sigmoid_complement)(
          z, stride, K, len, P, L, zmax, others, winner);
  } else {
    if (A == Activation::Softmax)
      return probabilities_impl<T, Activation::Softmax, E>(z, stride, K, len, P, L, zmax, others, winner);
    if (A == Activation::Sigmoid)
      return probabilities_impl<T, Activation::Sigmoid, E>(z, stride, K, len, P, L, zmax, others, winner);
  }
  probabilities_impl<T, Activation::None, E>(z, stride, K, len, P, L, zmax, others, winner);
}

template <typename T>
void probabilities(Activation A, Extra E, const T* z, int64_t stride, int64_t K, int64_t len, T* P, T* L, T* zmax,
                   T* others, index_t<T>* winner) {
  switch (E) {
    case Extra::None: return probabilities_for<T, Extra::None>(A, z, stride, K, len, P, L, zmax, others, winner);
    case Extra::Log: return probabilities_for<T, Extra::Log>(A, z, stride, K, len, P, L, zmax, others, winner);
    case Extra::Complement:
      return probabilities_for<T, Extra::Complement>(A, z, stride, K, len, P, L, zmax, others, winner);
  }
}

template <typename T>
void activation_backward(Activation A, const T* z, int64_t stride, int64_t K, int64_t len, const T* P, const T* G,
                         T* dot, T* out, int64_t out_stride) {
  if constexpr (std::is_same_v<T, float>) {
    if (A == Activation::Softmax) return activation_backward_softmax(z, stride, K, len, P, G, dot, out, out_stride);
    if (A == Activation::Sigmoid) return activation_backward_sigmoid(z, stride, K, len, P, G, dot, out, out_stride);
  } else {
    if (A == Activation::Softmax)
      return activation_backward_impl<T, Activation::Softmax>(z, stride, K, len, P, G, dot, out, out_stride);
    if (A == Activation::Sigmoid)
      return activation_backward_impl<T, Activation::Sigmoid>(z, stride, K, len, P, G, dot, out, out_stride);
  }
  activation_backward_impl<T, Activation::None>(z, stride, K, len, P, G, dot, out, out_stride);
}

// Per-chunk scratch: probabilities and logs of K classes, per-voxel terms, validity.
template <typename T>
struct Scratch {
  std::vector<T> P, L, zmax, others, valid;
  std::vector<index_t<T>> winner;
  Scratch(int64_t K, int64_t len) : P(K * len), L(K * len), zmax(len), others(len), valid(len), winner(len) {}
};

// One class's reduction over a chunk, merged across chunks in order.
struct Partial {
  double a = 0, b = 0;  // see the statistics layout in mtseg/presence.h
  int64_t index = -1;   // max: the voxel holding the maximum (first of exact ties)
  bool nan = false;     // max: a NaN probability was seen (NaN wins, as in torch.amax)
};

struct Problem {
  Mode mode;
  Activation act;
  double temperature, threshold;
  int64_t B, K, N, n_chunks;
};

// Validity of the chunk's voxels as 0/1 in T (all 1 without a mask); returns their count.
template <typename T>
int64_t load_valid(const bool* mask, int64_t len, T* valid) {
  if (mask == nullptr) {
    std::fill(valid, valid + len, T(1));
    return len;
  }
  int64_t n = 0;
  for (int64_t x = 0; x < len; ++x) {
    valid[x] = mask[x] ? T(1) : T(0);
    n += mask[x] ? 1 : 0;
  }
  return n;
}

// 1 / T in the working type (inf where it overflows: see scaled_exp).
template <typename T>
T inverse_temperature(double temperature) {
  return static_cast<T>(1.0 / temperature);
}

template <typename T>
Partial reduce_class(const Problem& pr, const T* p, T* l, const T* valid, T* scratch, int64_t x0, int64_t len) {
  Partial out;
  switch (pr.mode) {
    case Mode::Max: {
      // The largest p; among voxels whose p rounds to the same value (common near 1), the
      // smallest complement 1 - p (l holds it, exact), so that the chosen voxel is the true
      // maximum, not the first of a rounding tie. Any finite or infinite value (activation
      // 'none') can be the maximum; NaN is flagged and never chosen.
      T best, best_c;
      const int64_t at = max_reduce(p, l, valid, len, scratch, &best, &best_c, &out.nan);
      out.index = at < 0 ? -1 : x0 + at;
      out.a = at < 0 ? -std::numeric_limits<double>::infinity() : static_cast<double>(best);
      out.b = at < 0 ? std::numeric_limits<double>::infinity() : static_cast<double>(best_c);
      break;
    }
    case Mode::NoisyOr:
      noisy_or_sum(l, valid, len, &out.a, &out.b);
      break;
    case Mode::SmoothMax: {
      T m;
      smooth_max_sum(p, valid, len, inverse_temperature<T>(pr.temperature), l, &m, &out.b);  // l: scratch
      out.a = static_cast<double>(m);
      break;
    }
    case Mode::Hard:
      out.a = count_above(p, valid, len, static_cast<T>(pr.threshold)) > 0 ? 1 : 0;
      break;
    case Mode::Argmax:  // reduced for all classes at once in the forward kernel
      break;
  }
  return out;
}

void merge(Mode mode, double temperature, Partial& into, const Partial& next) {
  switch (mode) {
    case Mode::Max:
      into.nan |= next.nan;
      if (next.index >= 0 && (into.index < 0 || next.a > into.a || (next.a == into.a && next.b < into.b))) {
        into.a = next.a;
        into.b = next.b;
        into.index = next.index;
      }
      break;
    case Mode::NoisyOr:
      into.a += next.a;
      into.b += next.b;
      break;
    case Mode::SmoothMax: {
      // (m, s) pairs merge like the running max and sum of an online softmax.
      if (next.a != next.a || into.a != into.a) {
        into.a = std::numeric_limits<double>::quiet_NaN();
      } else if (next.b > 0) {
        if (into.b <= 0) {
          into = next;
        } else {
          const double m = std::max(into.a, next.a);
          into.b = into.b * std::exp((into.a - m) / temperature) + next.b * std::exp((next.a - m) / temperature);
          into.a = m;
        }
      }
      break;
    }
    case Mode::Hard:
    case Mode::Argmax:
      into.a = std::max(into.a, next.a);
      break;
  }
}

// (presence, stats) of one (image, class) from its merged partial; n = valid voxels.
template <typename T>
void finish(const Problem& pr, const Partial& r, int64_t n, T* presence, double* stats) {
  constexpr double nan = std::numeric_limits<double>::quiet_NaN();
  switch (pr.mode) {
    case Mode::Max:
      *presence = static_cast<T>(r.nan ? nan : (r.index >= 0 ? r.a : 0.0));
      stats[0] = static_cast<double>(r.index);
      stats[1] = r.index >= 0 ? r.b : 1.0;
      break;
    case Mode::NoisyOr:  // 1 - prod(1 - p) = -expm1(sum log(1 - p)); any p = 1 makes it 1
      *presence = static_cast<T>(r.b > 0 ? (r.a != r.a ? nan : 1.0) : -std::expm1(r.a));
      stats[0] = r.a;
      stats[1] = r.b;
      break;
    case Mode::SmoothMax:
      *presence = static_cast<T>(n == 0 ? 0.0 : r.a + pr.temperature * (std::log(r.b) - std::log(double(n))));
      stats[0] = r.a;
      stats[1] = r.b;
      break;
    case Mode::Hard:
    case Mode::Argmax:
      *presence = static_cast<T>(r.a);
      stats[0] = stats[1] = 0;
      break;
  }
}

template <typename T>
void soft_presence_forward_kernel(const Problem& pr, const T* in, const bool* mask, T* presence, double* stats) {
  const int64_t B = pr.B, K = pr.K, N = pr.N, C = pr.n_chunks;
  std::vector<Partial> partials(B * C * K);
  std::vector<int64_t> valid_counts(B * C, 0);
  const Extra extra =
      pr.mode == Mode::NoisyOr ? Extra::Log : (pr.mode == Mode::Max ? Extra::Complement : Extra::None);
  at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> s(K, std::min(kChunk, N));
    std::vector<char> hit(pr.mode == Mode::Argmax ? K : 0);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / C, x0 = (task % C) * kChunk, len = std::min(kChunk, N - x0);
      const T* z = in + b * K * N + x0;
      valid_counts[task] = load_valid(mask == nullptr ? nullptr : mask + b * N + x0, len, s.valid.data());
      if (pr.mode == Mode::Argmax) {  // the classes that win the arg-max at a valid voxel
        argmax_winners(z, N, K, len, s.zmax.data(), s.winner.data());
        std::fill(hit.begin(), hit.end(), 0);
        for (int64_t x = 0; x < len; ++x)
          if (s.valid[x] != T(0)) hit[s.winner[x]] = 1;
        for (int64_t k = 0; k < K; ++k) partials[task * K + k].a = hit[k];
        continue;
      }
      probabilities<T>(pr.act, extra, z, N, K, len, s.P.data(), s.L.data(), s.zmax.data(), s.others.data(),
                       s.winner.data());
      for (int64_t k = 0; k < K; ++k)
        partials[task * K + k] = reduce_class(pr, s.P.data() + k * len, s.L.data() + k * len, s.valid.data(),
                                              s.zmax.data(), x0, len);  // zmax: free after probabilities
    }
  });
  at::parallel_for(0, B * K, 64, [&](int64_t begin, int64_t end) {
    for (int64_t bk = begin; bk < end; ++bk) {
      const int64_t b = bk / K, k = bk % K;
      Partial r = partials[(b * C) * K + k];
      int64_t n = valid_counts[b * C];
      for (int64_t c = 1; c < C; ++c) {
        merge(pr.mode, pr.temperature, r, partials[(b * C + c) * K + k]);
        n += valid_counts[b * C + c];
      }
      finish(pr, r, n, presence + bk, stats + 2 * bk);
    }
  });
}

// max: the voxel index of every (image, class) in stats, checked before any is used: a
// raw caller may pass stats that do not come from the forward of this input.
void check_max_stats(const double* stats, int64_t B, int64_t K, int64_t N, const char* op) {
  for (int64_t bk = 0; bk < B * K; ++bk) {
    const double x = stats[2 * bk];
    TORCH_CHECK_VALUE(x == std::floor(x) && x >= -1 && x < static_cast<double>(N), op,
                      ": stats[..., 0] of mode 'max' must hold the arg-max voxel index of the forward, an integer in "
                      "[-1, ", N, ") for this input; got ", x, " at (image, class) = (", bk / K, ", ", bk % K, ")");
  }
}

// max: the gradient of each (image, class) goes to the single voxel holding the maximum.
template <typename T>
void max_backward_kernel(const Problem& pr, const T* grad, const T* in, const double* stats, T* out) {
  const int64_t K = pr.K, N = pr.N;
  at::parallel_for(0, pr.B, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> p(K);
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t k = 0; k < K; ++k) {
        const int64_t x = static_cast<int64_t>(stats[2 * (b * K + k)]);  // in [-1, N): check_max_stats
        const T g = grad[b * K + k];
        if (x < 0 || g == T(0)) continue;
        const T* z = in + b * K * N + x;
        T* o = out + b * K * N + x;
        if (pr.act == Activation::Softmax) {
          T m = z[0];
          for (int64_t j = 1; j < K; ++j) m = std::max(m, z[j * N]);
          T sum = 0, others = 0;
          for (int64_t j = 0; j < K; ++j) {
            sum += (p[j] = std::exp(z[j * N] - m));
            others += j == k ? T(0) : p[j];
          }
          for (int64_t j = 0; j < K; ++j) p[j] /= sum;
          // dp_k/dz_j = p_k (delta_jk - p_j); for j = k, 1 - p_k is the other classes' share,
          // summed directly: near p_k = 1 the difference would round to 0.
          for (int64_t j = 0; j < K; ++j) o[j * N] += g * p[k] * (j == k ? others / sum : -p[j]);
        } else if (pr.act == Activation::Sigmoid) {
          const T v = z[k * N];
          const T a = std::exp(-std::abs(v));
          o[k * N] += g * a / ((T(1) + a) * (T(1) + a));  // sigmoid'(v) = p (1 - p)
        } else {
          o[k * N] += g;
        }
      }
    }
  });
}

// Below this sum S of log(1 - p), exp(S - log(1 - p_x)) is 0 in T for every voxel (it is
// at most exp(S - log(smallest positive T))): a saturated noisy-or has no gradient.
template <typename T>
constexpr double kSaturatedLog = std::is_same_v<T, float> ? -200.0 : -1500.0;

template <typename T>
void soft_presence_backward_kernel(const Problem& pr, const T* grad, const T* in, const bool* mask,
                                   const double* stats, T* out) {
  const int64_t B = pr.B, K = pr.K, N = pr.N, C = pr.n_chunks;
  if (pr.mode == Mode::Max) return max_backward_kernel(pr, grad, in, stats, out);
  const bool noisy_or = pr.mode == Mode::NoisyOr;
  // Noisy-or: d(1 - prod(1 - p))/dp_x = prod over the other voxels of (1 - p). Where
  // exp(S) (S = sum log(1 - p)) is a normal number of T and no p is 1, it is
  // exp(S) / (1 - p_x), from the complements (no log needed); otherwise
  // exp(S - log(1 - p_x)) from the logs, with the voxels of p = 1 handled apart.
  const double min_log = std::is_same_v<T, float> ? -80.0 : -700.0;
  std::vector<char> by_complement(B, noisy_or);
  // Images whose every class has a zero gradient row (saturated noisy-or, or grad 0).
  std::vector<char> no_gradient(B, noisy_or);
  if (noisy_or)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t k = 0; k < K; ++k) {
        const double S = stats[2 * (b * K + k)], infs = stats[2 * (b * K + k) + 1];
        const T g = grad[b * K + k];
        if (infs != 0 || !(S >= min_log)) by_complement[b] = false;
        if (!(g == T(0) || (infs == 0 && S < kSaturatedLog<T> && std::isfinite(static_cast<double>(g)))))
          no_gradient[b] = false;
      }
  at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> s(K, std::min(kChunk, N));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / C, x0 = (task % C) * kChunk, len = std::min(kChunk, N - x0);
      const T* z = in + b * K * N + x0;
      T* o = out + b * K * N + x0;
      const bool complement = by_complement[b] && pr.act != Activation::None;
      const int64_t n_valid = load_valid(mask == nullptr ? nullptr : mask + b * N + x0, len, s.valid.data());
      // Every dPresence/dp is exactly 0 here; where every voxel is valid the gradient is 0
      // too (with invalid voxels the formula's NaN from a NaN logit there is kept).
      if (no_gradient[b] && n_valid == len) {
        for (int64_t k = 0; k < K; ++k) std::fill(o + k * N, o + k * N + len, T(0));
        continue;
      }
      probabilities<T>(pr.act, !noisy_or ? Extra::None : complement ? Extra::Complement : Extra::Log, z, N, K, len,
                       s.P.data(), s.L.data(), s.zmax.data(), s.others.data(), s.winner.data());
      // dPresence/dp per class, written over L.
      for (int64_t k = 0; k < K; ++k) {
        const double* st = stats + 2 * (b * K + k);
        const T g = grad[b * K + k];
        const T* p = s.P.data() + k * len;
        T* G = s.L.data() + k * len;
        const T* valid = s.valid.data();
        if (noisy_or && complement) {
          noisy_or_grad_complement(G, valid, len, static_cast<T>(static_cast<double>(g) * std::exp(st[0])));
        } else if (noisy_or) {
          const double inf_count = st[1];
          if (inf_count == 0) {
            noisy_or_grad_log(G, valid, len, g, static_cast<T>(st[0]));
          } else {
            const T lone = static_cast<T>(std::exp(st[0]));  // the one voxel with p = 1, when there is one
            constexpr T ninf = -std::numeric_limits<T>::infinity();
            for (int64_t x = 0; x < len; ++x)
              G[x] = valid[x] != T(0) ? g * (inf_count == 1 && G[x] == ninf ? lone : T(0)) : T(0);
          }
        } else {  // smooth max: d(m + T log(s / n))/dp_x = exp((p_x - m) / T) / s
          smooth_max_grad(G, p, valid, len, static_cast<T>(static_cast<double>(g) / st[1]), static_cast<T>(st[0]),
                          inverse_temperature<T>(pr.temperature));
        }
      }
      activation_backward<T>(pr.act, z, N, K, len, s.P.data(), s.L.data(), s.zmax.data(), o, N);
    }
  });
}

Problem make_problem(const at::Tensor& input, Mode mode, Activation act, double temperature, double threshold) {
  Problem pr{mode, act, temperature, threshold, input.size(0), input.size(1), 1, 0};
  for (int64_t d = 2; d < input.dim(); ++d) pr.N *= input.size(d);
  pr.n_chunks = (pr.N + kChunk - 1) / kChunk;
  return pr;
}

// float16/bfloat16 are computed in float32.
at::Tensor working_input(const at::Tensor& input) {
  return input.to(presence_dtype(input.scalar_type())).contiguous();
}

std::tuple<at::Tensor, at::Tensor> soft_presence_forward_cpu(const at::Tensor& input, c10::string_view mode,
                                                             c10::string_view activation, double temperature,
                                                             double threshold,
                                                             const c10::optional<at::Tensor>& valid_mask) {
  const char* op = "soft_presence";
  const Mode m = parse_mode(mode, op);
  const Activation a = parse_activation(activation, op);
  check_soft_presence_args(input, m, temperature, valid_mask, op);
  const at::Tensor x = working_input(input);
  const at::Tensor v = valid_mask.has_value() ? valid_mask->contiguous() : at::Tensor();
  const Problem pr = make_problem(input, m, a, temperature, threshold);
  at::Tensor presence = at::empty({pr.B, pr.K}, x.options());
  at::Tensor stats = at::empty({pr.B, pr.K, 2}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "soft_presence_forward_cpu", [&] {
    soft_presence_forward_kernel<scalar_t>(pr, x.data_ptr<scalar_t>(), v.defined() ? v.data_ptr<bool>() : nullptr,
                                           presence.data_ptr<scalar_t>(), stats.data_ptr<double>());
  });
  return {presence, stats};
}

at::Tensor soft_presence_backward_cpu(const at::Tensor& grad, const at::Tensor& input, const at::Tensor& stats,
                                      c10::string_view mode, c10::string_view activation, double temperature,
                                      const c10::optional<at::Tensor>& valid_mask) {
  const char* op = "soft_presence_backward";
  const Mode m = parse_mode(mode, op);
  const Activation a = parse_activation(activation, op);
  TORCH_CHECK_VALUE(!is_hard_mode(m), op, ": mode '", mode, "' has no gradient");
  check_soft_presence_args(input, m, temperature, valid_mask, op);
  const Problem pr = make_problem(input, m, a, temperature, 0.0);
  TORCH_CHECK_VALUE(grad.sizes() == at::IntArrayRef({pr.B, pr.K}), op, ": expected grad of shape (B, K) = (", pr.B,
                    ", ", pr.K, "); got ", grad.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(grad.scalar_type()), op, ": expected a floating-point grad; got ",
                   grad.scalar_type());
  TORCH_CHECK_VALUE(stats.sizes() == at::IntArrayRef({pr.B, pr.K, 2}) && stats.scalar_type() == at::kDouble, op,
                    ": expected float64 stats of shape (B, K, 2) from soft_presence_forward; got ",
                    stats.scalar_type(), " ", stats.sizes());
  const at::Tensor x = working_input(input);
  const at::Tensor g = grad.to(x.scalar_type()).contiguous();
  const at::Tensor st = stats.contiguous();
  const at::Tensor v = valid_mask.has_value() ? valid_mask->contiguous() : at::Tensor();
  if (m == Mode::Max) check_max_stats(st.data_ptr<double>(), pr.B, pr.K, pr.N, op);
  at::Tensor out = m == Mode::Max ? at::zeros_like(x) : at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "soft_presence_backward_cpu", [&] {
    soft_presence_backward_kernel<scalar_t>(pr, g.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                                            v.defined() ? v.data_ptr<bool>() : nullptr, st.data_ptr<double>(),
                                            out.data_ptr<scalar_t>());
  });
  return out.to(input.scalar_type());
}

// ---------------------------------------------------------------------------------
// Voxel counts per class from label maps.
// ---------------------------------------------------------------------------------
at::Tensor class_counts_cpu(const at::Tensor& labels, int64_t num_classes, int64_t ignore_index) {
  const char* op = "class_counts";
  check_label_args(labels, num_classes, op);
  const at::Tensor l = labels.contiguous();
  const int64_t B = l.size(0), K = num_classes, N = l.numel() / B;
  const int64_t C = std::max<int64_t>(1, (N + (1 << 16) - 1) >> 16);
  at::Tensor counts = at::zeros({B, K}, l.options().dtype(at::kLong));
  std::vector<int64_t> partial(B * C * K, 0);
  std::vector<int64_t> first_bad(B * C, -1);
  AT_DISPATCH_INTEGRAL_TYPES(l.scalar_type(), "class_counts_cpu", [&] {
    const scalar_t* data = l.data_ptr<scalar_t>();
    at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / C, x0 = (task % C) << 16, x1 = std::min(N, x0 + (int64_t(1) << 16));
        int64_t* hist = partial.data() + task * K;
        for (int64_t x = x0; x < x1; ++x) {
          const int64_t v = static_cast<int64_t>(data[b * N + x]);
          if (v == ignore_index) continue;
          if (v >= 0 && v < K) {
            ++hist[v];
          } else if (first_bad[task] < 0) {
            first_bad[task] = x;
          }
        }
      }
    });
    for (int64_t task = 0; task < B * C; ++task) {
      if (first_bad[task] < 0) continue;
      const int64_t b = task / C;
      TORCH_CHECK_VALUE(false, op, ": image ", b, " holds the label ", static_cast<int64_t>(data[b * N + first_bad[task]]),
                        " (at flat voxel index ", first_bad[task], "); expected values in [0, ", K,
                        ") or ignore_index = ", ignore_index);
    }
  });
  int64_t* c = counts.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < C; ++t)
      for (int64_t k = 0; k < K; ++k) c[b * K + k] += partial[(b * C + t) * K + k];
  return counts;
}

}  // namespace

TORCH_LIBRARY_IMPL(mtseg, CPU, m) {
  m.impl("class_counts", &class_counts_cpu);
  m.impl("soft_presence_forward", &soft_presence_forward_cpu);
  m.impl("soft_presence_backward", &soft_presence_backward_cpu);
}

}  // namespace presence
}  // namespace mtseg
