// One body of kernel code for two executors: a CUDA launch, and a CPU emulation of that
// launch (serial loops over the threads, warps and lanes of the grid, in the same phases).
// The CPU emulation is what CI runs without a GPU (the private torch.ops.mtseg.*_emulated
// operators), so the per-element code here is exactly what a GPU runs.
//
// Kernel bodies are functors with MTSEG_HOST_DEVICE members, of three kinds:
//  * thread functors: operator()(int64_t i), one call per thread index;
//  * warp functors: operator()(W& warp, int64_t w, unsigned char* workspace), one call
//    per warp index, where W is DeviceWarp (real lanes) or HostWarp (a loop over lanes);
//    lane-private values live in `typename W::template Var<T>`, collectives are
//    warp.each / warp.ballot / warp.sync; `workspace` is the warp's scratch (shared
//    memory on the GPU when it fits);
//  * step functors: begin(i, State&) then step(State&) until it returns true, where each
//    step does at most one access to memory that other threads write. The GPU runs
//    every thread's steps to completion; the emulation can interleave the steps of all
//    threads at random, which replays the races a GPU may produce.
// Memory accesses that race with other threads go through the atomic_* / load_relaxed
// helpers below; in the (single-threaded) emulation they are plain accesses, each of
// which is indivisible with respect to the emulated interleaving.
#pragma once

#include <cstdint>

#include "mtseg/macros.h"

namespace mtseg {
namespace launch {

constexpr int kWarpSize = 32;

MTSEG_HOST_DEVICE int popcount32(uint32_t x) {
#ifdef __CUDA_ARCH__
  return __popc(x);
#else
  return __builtin_popcount(x);
#endif
}

// Index of the highest set bit of x (x != 0).
MTSEG_HOST_DEVICE int highest_bit(uint32_t x) {
#ifdef __CUDA_ARCH__
  return 31 - __clz(x);
#else
  return 31 - __builtin_clz(x);
#endif
}

// Bits of the lanes below `lane`.
MTSEG_HOST_DEVICE uint32_t lanes_below(int lane) { return lane == 0 ? 0u : (0xffffffffu >> (32 - lane)); }

// Reads a value that other threads may change concurrently (bypassing the GPU's
// non-coherent L1, so a stale copy cannot be served indefinitely).
MTSEG_HOST_DEVICE int32_t load_relaxed(const int32_t* p) {
#ifdef __CUDA_ARCH__
  return __ldcg(p);
#else
  return *p;
#endif
}

MTSEG_HOST_DEVICE int64_t load_relaxed(const int64_t* p) {
#ifdef __CUDA_ARCH__
  return static_cast<int64_t>(__ldcg(reinterpret_cast<const long long*>(p)));
#else
  return *p;
#endif
}

// *p = min(*p, v) atomically; returns the previous value.
MTSEG_HOST_DEVICE int32_t atomic_min(int32_t* p, int32_t v) {
#ifdef __CUDA_ARCH__
  return atomicMin(p, v);
#else
  const int32_t old = *p;
  if (v < old) *p = v;
  return old;
#endif
}

MTSEG_HOST_DEVICE int32_t atomic_max(int32_t* p, int32_t v) {
#ifdef __CUDA_ARCH__
  return atomicMax(p, v);
#else
  const int32_t old = *p;
  if (v > old) *p = v;
  return old;
#endif
}

// if (*p == expected) *p = desired, atomically; returns the previous value.
MTSEG_HOST_DEVICE int64_t atomic_cas(int64_t* p, int64_t expected, int64_t desired) {
#ifdef __CUDA_ARCH__
  return static_cast<int64_t>(atomicCAS(reinterpret_cast<unsigned long long*>(p),
                                        static_cast<unsigned long long>(expected),
                                        static_cast<unsigned long long>(desired)));
#else
  const int64_t old = *p;
  if (old == expected) *p = desired;
  return old;
#endif
}

MTSEG_HOST_DEVICE void atomic_store(int64_t* p, int64_t v) {
#ifdef __CUDA_ARCH__
  atomicExch(reinterpret_cast<unsigned long long*>(p), static_cast<unsigned long long>(v));
#else
  *p = v;
#endif
}

// Scratch of a warp functor cut into 16-byte aligned arrays; the same sequence of
// take() calls on a null base gives the bytes a warp needs.
struct Carve {
  unsigned char* p;
  int64_t used = 0;
  template <typename T>
  MTSEG_HOST_DEVICE T* take(int64_t n) {
    used = (used + 15) & ~int64_t{15};
    T* r = p == nullptr ? nullptr : reinterpret_cast<T*>(p + used);
    used += n * static_cast<int64_t>(sizeof(T));
    return r;
  }
};

#if defined(__CUDACC__)
// The lanes of a real warp: each lane runs the functor once with its own lane index;
// every member is called by all 32 lanes together (warp-uniform control flow).
struct DeviceWarp {
  template <typename T>
  struct Var {
    T v;
    MTSEG_HOST_DEVICE T& operator[](int) { return v; }
  };
  MTSEG_HOST_DEVICE int lane() const {
#ifdef __CUDA_ARCH__
    return static_cast<int>(threadIdx.x & 31);
#else
    return 0;
#endif
  }
  template <typename F>
  MTSEG_HOST_DEVICE void each(F&& f) {
    f(lane());
  }
  template <typename F>
  MTSEG_HOST_DEVICE uint32_t ballot(F&& pred) {
#ifdef __CUDA_ARCH__
    return __ballot_sync(0xffffffffu, pred(lane()));
#else
    return pred(0) ? 1u : 0u;
#endif
  }
  MTSEG_HOST_DEVICE void sync() {
#ifdef __CUDA_ARCH__
    __syncwarp();
#endif
  }
};
#endif

// The lanes of an emulated warp, run one after the other in `order` (a permutation of
// 0..31) between collectives, which is one of the orders a GPU may produce.
struct HostWarp {
  template <typename T>
  struct Var {
    T v[kWarpSize];
    T& operator[](int lane) { return v[lane]; }
  };
  const int* order;
  template <typename F>
  void each(F&& f) {
    for (int i = 0; i < kWarpSize; ++i) f(order[i]);
  }
  template <typename F>
  uint32_t ballot(F&& pred) {
    uint32_t bits = 0;
    for (int i = 0; i < kWarpSize; ++i)
      if (pred(order[i])) bits |= 1u << order[i];
    return bits;
  }
  void sync() {}
};

}  // namespace launch
}  // namespace mtseg
