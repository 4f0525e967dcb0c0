// Calls hog.h's host-device functions from the command line, so that Python tests can
// check them on the CPU against independent references (tests/ops/test_hog.py).
//   bin N ROW COL          -> "BIN PATH" from orientation_bin_exact (hex floats in)
//   grad H W C / d_row d_col (hex floats) / channel -> input_gradient for every (k, y, x)
#include <cstdio>
#include <cstring>
#include <vector>

#include "mtseg/hog.h"

using namespace mtseg::hog;

int main() {
  char cmd[16];
  while (std::scanf("%15s", cmd) == 1) {
    if (std::strcmp(cmd, "bin") == 0) {
      long long n;
      double r, c;
      if (std::scanf("%lld %la %la", &n, &r, &c) != 3) return 2;
      std::vector<Edge> edges;
      for (long long i = 1; i < n; ++i) edges.push_back(edge_direction(i, n));
      std::vector<uint32_t> scratch(static_cast<size_t>(exact_scratch_limbs(n)));
      const BinDecision d = orientation_bin_exact(r, c, edges.data(), n, scratch.data(),
                                                  static_cast<int64_t>(scratch.size()));
      std::printf("%d %d\n", d.bin, d.path);
    } else if (std::strcmp(cmd, "grad") == 0) {
      long long H, W, C;
      if (std::scanf("%lld %lld %lld", &H, &W, &C) != 3) return 2;
      std::vector<double> d_row(H * W), d_col(H * W);
      std::vector<int32_t> channel(H * W);
      for (auto& v : d_row) if (std::scanf("%la", &v) != 1) return 2;
      for (auto& v : d_col) if (std::scanf("%la", &v) != 1) return 2;
      for (auto& v : channel) if (std::scanf("%d", &v) != 1) return 2;
      for (long long k = 0; k < C; ++k)
        for (long long y = 0; y < H; ++y)
          for (long long x = 0; x < W; ++x)
            std::printf("%a\n", input_gradient(d_row.data(), d_col.data(), channel.data(), H, W, k, y, x));
    } else {
      return 3;
    }
  }
  return 0;
}
