// hog.h's per-block normalisation (the function the CUDA kernels call per block, with
// each block's norm parts computed on the fly) from the command line, so that
// tests/ops/test_hog_blocks.py can compare the CPU operator's bits with it.
//   fwd|bwd f32|f64 NORM B NCR NCC N BR BC, then B*NCR*NCC*N cells (hex floats) and, for
//   bwd, the upstream gradient of every block -> every block's output, hex, C order.
#include <cstdio>
#include <cstring>
#include <vector>

#include "mtseg/hog.h"

using namespace mtseg::hog;

template <typename T>
int run(bool backward, int norm, long long B, long long ncr, long long ncc, long long n, long long br, long long bc) {
  std::vector<T> cells(B * ncr * ncc * n);
  for (auto& v : cells) {
    double x;
    if (std::scanf("%la", &x) != 1) return 2;
    v = static_cast<T>(x);
  }
  const long long nbr = ncr - br + 1, nbc = ncc - bc + 1, len = br * bc * n;
  std::vector<T> grad(backward ? B * nbr * nbc * len : 0), out(B * nbr * nbc * len);
  for (auto& v : grad) {
    double x;
    if (std::scanf("%la", &x) != 1) return 2;
    v = static_cast<T>(x);
  }
  for (long long b = 0; b < B; ++b)
    for (long long r = 0; r < nbr; ++r)
      for (long long c = 0; c < nbc; ++c) {
        const BlockView<T> v{cells.data() + ((b * ncr + r) * ncc + c) * n, ncc * n, br, bc, n};
        const long long at = ((b * nbr + r) * nbc + c) * len;
        if (backward)
          normalize_block_backward(v, static_cast<BlockNorm>(norm), grad.data() + at, out.data() + at);
        else
          normalize_block(v, static_cast<BlockNorm>(norm), out.data() + at);
      }
  for (const T v : out) std::printf("%a\n", static_cast<double>(v));
  return 0;
}

int main() {
  char dir[8], type[8];
  int norm;
  long long B, ncr, ncc, n, br, bc;
  if (std::scanf("%7s %7s %d %lld %lld %lld %lld %lld %lld", dir, type, &norm, &B, &ncr, &ncc, &n, &br, &bc) != 9)
    return 2;
  const bool backward = std::strcmp(dir, "bwd") == 0;
  return std::strcmp(type, "f32") == 0 ? run<float>(backward, norm, B, ncr, ncc, n, br, bc)
                                       : run<double>(backward, norm, B, ncr, ncc, n, br, bc);
}
