// Calls hog.h's host-device functions from the command line, so that Python tests can
// check them on the CPU against independent references (tests/ops/test_hog.py).
//   bin N ROW COL          -> "BIN PATH" from orientation_bin_exact (hex floats in)
//   grad H W C / d_row d_col (hex floats) / channel -> input_gradient for every (k, y, x)
//   add A B NEGATE_B ALIAS -> big_add(A, B, NEGATE_B) into fresh storage (ALIAS 0), into A's
//                             (1) or into B's (2); a number is "NEGATIVE SIZE LIMB..." (limbs
//                             little endian, decimal), printed in the same form
#include <cstdio>
#include <cstring>
#include <vector>

#include "mtseg/hog.h"

using namespace mtseg::hog;

namespace {
bool read_big(std::vector<uint32_t>& limbs, BigInt& out) {
  int negative;
  long long size;
  if (std::scanf("%d %lld", &negative, &size) != 2 || size < 0 || size > 64) return false;
  limbs.assign(66, 0u);  // room for any sum of two
  for (long long k = 0; k < size; ++k)
    if (std::scanf("%u", &limbs[k]) != 1) return false;
  out = BigInt{limbs.data(), size, negative != 0};
  return true;
}
}  // namespace

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
    } else if (std::strcmp(cmd, "add") == 0) {
      std::vector<uint32_t> a_limbs, b_limbs;
      BigInt a{}, b{};
      int negate_b, alias;
      if (!read_big(a_limbs, a) || !read_big(b_limbs, b) || std::scanf("%d %d", &negate_b, &alias) != 2) return 2;
      std::vector<uint32_t> fresh_limbs(66, 0u);
      BigInt fresh{fresh_limbs.data(), 0, false};
      BigInt& out = alias == 1 ? a : alias == 2 ? b : fresh;  // aliasing as past_edge_exact does
      big_add(a, b, negate_b != 0, out);
      std::printf("%d %lld", out.negative ? 1 : 0, static_cast<long long>(out.size));
      for (int64_t k = 0; k < out.size; ++k) std::printf(" %u", out.limb[k]);
      std::printf("\n");
    } else {
      return 3;
    }
  }
  return 0;
}
