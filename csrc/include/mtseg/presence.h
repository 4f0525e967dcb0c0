// Class presence from label maps and from soft masks: argument parsing and validation
// shared by the composite operators (csrc/presence.cpp) and the CPU kernels
// (csrc/cpu/presence.cpp). The CUDA kernels are Triton (mtseg_kernels/triton/presence.py).
//
// soft_presence_forward returns, next to the (B, K) presence, float64 statistics
// (B, K, 2) from which the backward recomputes everything else in one pass:
//   max         [index of the voxel holding the maximum (-1: no valid voxel), its 1 - p]
//   noisy_or    [sum of the finite log(1 - p), number of voxels with log(1 - p) = -inf]
//   smooth_max  [m = max p, s = sum exp((p - m) / T)]    (presence = m + T log(s / n))
//   hard        [unused, unused]
//   argmax      [unused, unused]
// The backward of max uses the index: it checks that every index is -1 or a voxel of the
// input before reading anything (a raw caller may pass any stats).
#pragma once

#include <ATen/ATen.h>

#include <string>

namespace mtseg {
namespace presence {

enum class Mode { Max, NoisyOr, SmoothMax, Hard, Argmax };

// Modes that are a decision per voxel: no gradient flows through them.
inline bool is_hard_mode(Mode m) { return m == Mode::Hard || m == Mode::Argmax; }
enum class Activation { Softmax, Sigmoid, None };

Mode parse_mode(c10::string_view name, const char* op);
Activation parse_activation(c10::string_view name, const char* op);

// Validates input (B, K, *spatial) with 1 to 3 spatial dims, floating point, non-empty,
// the temperature (smooth_max) and the optional valid mask (B, *spatial), bool.
void check_soft_presence_args(const at::Tensor& input, Mode mode, double temperature,
                              const c10::optional<at::Tensor>& valid_mask, const char* op);

// Validates labels (B, *spatial) with 1 to 3 spatial dims, integer, and num_classes.
void check_label_args(const at::Tensor& labels, int64_t num_classes, const char* op);

// float32 for float16/bfloat16/float32 input, float64 for float64.
at::ScalarType presence_dtype(at::ScalarType input_dtype);

}  // namespace presence
}  // namespace mtseg
