// Presence operators that are compositions of other mtseg operators: registered as
// CompositeImplicitAutograd, so they run on every backend and their gradients come from
// the pieces (soft_presence_forward has its autograd formula in mtseg_kernels/ops/presence.py).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <limits>
#include <tuple>

#include "mtseg/presence.h"

namespace mtseg {
namespace presence {

Mode parse_mode(c10::string_view name, const char* op) {
  if (name == "max") return Mode::Max;
  if (name == "noisy_or") return Mode::NoisyOr;
  if (name == "smooth_max") return Mode::SmoothMax;
  if (name == "hard") return Mode::Hard;
  if (name == "argmax") return Mode::Argmax;
  TORCH_CHECK_VALUE(false, op, ": mode must be one of 'max', 'noisy_or', 'smooth_max', 'hard', 'argmax'; got '", name,
                    "'");
}

Activation parse_activation(c10::string_view name, const char* op) {
  if (name == "softmax") return Activation::Softmax;
  if (name == "sigmoid") return Activation::Sigmoid;
  if (name == "none") return Activation::None;
  TORCH_CHECK_VALUE(false, op, ": activation must be 'softmax' (logits, one class per voxel), 'sigmoid' (logits, ",
                    "multi-label) or 'none' (probabilities); got '", name, "'");
}

namespace {

// check_soft_presence_args with the argument's name in the caller's schema (sync_loss:
// seg_logits), so that an error names what the caller passed.
void check_presence_input(const at::Tensor& input, Mode mode, double temperature,
                          const c10::optional<at::Tensor>& valid_mask, const char* op, const char* input_name) {
  TORCH_CHECK_VALUE(input.dim() >= 3 && input.dim() <= 5, op,
                    ": expected ", input_name,
                    " of shape (B, K, *spatial) with 1 to 3 spatial dims; got shape ", input.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(input.scalar_type()), op,
                   ": expected floating-point logits or probabilities (float16, bfloat16, float32, float64) as ",
                   input_name, "; got ", input.scalar_type());
  TORCH_CHECK_VALUE(input.size(0) > 0 && input.size(1) > 0, op,
                    ": expected at least one image and one class in ", input_name, "; got shape ", input.sizes());
  for (int64_t d = 2; d < input.dim(); ++d)
    TORCH_CHECK_VALUE(input.size(d) > 0, op, ": expected at least one voxel in ", input_name, "; got shape ",
                      input.sizes());
  if (mode == Mode::SmoothMax)
    TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0, op,
                      ": smooth_max needs a finite temperature > 0; got ", temperature);
  if (valid_mask.has_value()) {
    const at::Tensor& v = *valid_mask;
    TORCH_CHECK_TYPE(v.scalar_type() == at::kBool, op, ": valid_mask must be a bool tensor; got ", v.scalar_type());
    std::vector<int64_t> expected{input.size(0)};
    for (int64_t d = 2; d < input.dim(); ++d) expected.push_back(input.size(d));
    TORCH_CHECK_VALUE(v.sizes() == at::IntArrayRef(expected), op, ": valid_mask must have shape (B, *spatial) = ",
                      at::IntArrayRef(expected), "; got ", v.sizes());
    TORCH_CHECK_VALUE(v.device() == input.device(), op, ": valid_mask is on ", v.device(), " but ", input_name, " is on ",
                      input.device());
  }
}

}  // namespace

void check_soft_presence_args(const at::Tensor& input, Mode mode, double temperature,
                              const c10::optional<at::Tensor>& valid_mask, const char* op) {
  check_presence_input(input, mode, temperature, valid_mask, op, "input");
}

void check_label_args(const at::Tensor& labels, int64_t num_classes, const char* op) {
  TORCH_CHECK_VALUE(labels.dim() >= 2 && labels.dim() <= 4, op,
                    ": expected labels of shape (B, *spatial) with 1 to 3 spatial dims; got shape ", labels.sizes());
  TORCH_CHECK_TYPE(at::isIntegralType(labels.scalar_type(), /*includeBool=*/false), op,
                   ": expected integer labels (uint8, int8, int16, int32, int64); got ", labels.scalar_type());
  TORCH_CHECK_VALUE(num_classes >= 1, op, ": num_classes must be >= 1; got ", num_classes);
  TORCH_CHECK_VALUE(labels.size(0) > 0, op, ": expected at least one image; got shape ", labels.sizes());
}

at::ScalarType presence_dtype(at::ScalarType input_dtype) {
  return input_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

namespace {

std::tuple<at::Tensor, at::Tensor> call_forward(const at::Tensor& input, c10::string_view mode,
                                                c10::string_view activation, double temperature, double threshold,
                                                const c10::optional<at::Tensor>& valid_mask) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mtseg::soft_presence_forward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, c10::string_view, c10::string_view,
                                                                 double, double, const c10::optional<at::Tensor>&)>();
  return op.call(input, mode, activation, temperature, threshold, valid_mask);
}

at::Tensor call_class_counts(const at::Tensor& labels, int64_t num_classes, int64_t ignore_index) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mtseg::class_counts", "")
                       .typed<at::Tensor(const at::Tensor&, int64_t, int64_t)>();
  return op.call(labels, num_classes, ignore_index);
}

// log(1 - presence) without cancellation, float64 (B, K), no gradient: noisy-or from
// the statistics (the exact sum of log(1 - p)); max from the logits at the arg-max voxel
// (softmax: logsumexp of the other classes minus logsumexp of all; sigmoid: log
// sigmoid(-z)); the other modes as log1p(-presence) (smooth max is a soft mean and rarely
// within rounding of 1).
at::Tensor presence_log_complement(const at::Tensor& input, const at::Tensor& presence, const at::Tensor& stats,
                                   Mode mode, Activation act) {
  at::NoGradGuard no_grad;
  constexpr double ninf = -std::numeric_limits<double>::infinity();
  if (mode == Mode::NoisyOr)
    return at::where(stats.select(2, 1).gt(0), at::full_like(stats.select(2, 0), ninf), stats.select(2, 0));
  if (mode != Mode::Max) return at::log1p(-presence.detach().to(at::kDouble));
  const int64_t B = input.size(0), K = input.size(1);
  const at::Tensor index = stats.select(2, 0).to(at::kLong);  // (B, K), -1: no valid voxel
  const at::Tensor where = index.clamp_min(0).unsqueeze(1).expand({B, K, K});
  // z[b, j, k]: logit of class j at the arg-max voxel of class k
  const at::Tensor z = input.detach().reshape({B, K, -1}).gather(2, where).to(at::kDouble);
  at::Tensor out;
  if (act == Activation::Softmax) {
    const at::Tensor self = at::eye(K, z.options().dtype(at::kBool)).unsqueeze(0);
    out = at::logsumexp(z.masked_fill(self, ninf), {1}) - at::logsumexp(z, {1});
  } else {
    const at::Tensor own = at::diagonal(z, 0, 1, 2);
    out = act == Activation::Sigmoid ? at::log_sigmoid(-own) : at::log1p(-own);
  }
  return at::where(index.ge(0), out, at::zeros_like(out));  // no valid voxel: presence 0
}

// log(x) whose value is `value` (float64, clamped at -100 as torch's BCE clamps its logs)
// and whose gradient with respect to x is 1 / max(x_exact, 1e-12), torch's BCE clamp of the
// denominator. x_exact = exp(value); x carries the autograd graph.
at::Tensor clamped_log(const at::Tensor& x, const at::Tensor& value) {
  at::Tensor slope, v;
  {
    at::NoGradGuard no_grad;
    slope = at::reciprocal(at::clamp_min(at::exp(value), 1e-12)).to(x.scalar_type());
    v = at::clamp_min(value, -100).to(x.scalar_type());
  }
  return v + (x - x.detach()) * slope;
}

// The hard rules are comparisons: like `p > t` or `argmax` in torch, their result carries no
// gradient.
at::Tensor soft_presence(const at::Tensor& input, c10::string_view mode, c10::string_view activation,
                         double temperature, double threshold, const c10::optional<at::Tensor>& valid_mask) {
  const Mode m = parse_mode(mode, "soft_presence");
  return std::get<0>(
      call_forward(is_hard_mode(m) ? input.detach() : input, mode, activation, temperature, threshold, valid_mask));
}

at::Tensor presence_from_labels(const at::Tensor& labels, int64_t num_classes, int64_t ignore_index,
                                int64_t min_count) {
  // Checked here too, so that an error names this op rather than class_counts.
  check_label_args(labels, num_classes, "presence_from_labels");
  TORCH_CHECK_VALUE(min_count >= 1, "presence_from_labels: min_count must be >= 1; got ", min_count);
  return call_class_counts(labels, num_classes, ignore_index).ge(min_count).to(at::kFloat);
}

// Binary cross-entropy between the class head and the presence of the segmentation
// output. Each direction is a BCE whose prediction is the receiving side and whose
// target is the detached sending side; `both` is the sum of the two.
at::Tensor sync_loss(const at::Tensor& seg_logits, const at::Tensor& class_logits, c10::string_view mode,
                     c10::string_view direction, c10::string_view reduction, const c10::optional<at::Tensor>& weight,
                     c10::string_view activation, double temperature, double threshold,
                     const c10::optional<at::Tensor>& valid_mask) {
  const char* op = "sync_loss";
  const Mode m = parse_mode(mode, op);
  const bool to_class = direction == "seg_to_class" || direction == "both";
  const bool to_seg = direction == "class_to_seg" || direction == "both";
  TORCH_CHECK_VALUE(to_class || to_seg, op, ": direction must be 'seg_to_class' (the paper: the segmentation side is ",
                    "detached), 'class_to_seg' or 'both'; got '", direction, "'");
  TORCH_CHECK_VALUE(!(to_seg && is_hard_mode(m)), op, ": mode='", mode, "' has no gradient, so direction '",
                    direction, "' cannot train the segmentation; use mode 'max', 'noisy_or' or 'smooth_max', or ",
                    "direction 'seg_to_class'");
  int64_t red;
  if (reduction == "mean") red = at::Reduction::Mean;
  else if (reduction == "sum") red = at::Reduction::Sum;
  else if (reduction == "none") red = at::Reduction::None;
  else TORCH_CHECK_VALUE(false, op, ": reduction must be 'mean', 'sum' or 'none'; got '", reduction, "'");

  // All of seg_logits here, under this op's name: soft_presence would report them as its own.
  check_presence_input(seg_logits, m, temperature, valid_mask, op, "seg_logits");
  TORCH_CHECK_VALUE(class_logits.dim() == 2 && class_logits.size(0) == seg_logits.size(0) &&
                        class_logits.size(1) == seg_logits.size(1),
                    op, ": expected class_logits of shape (B, K) = (", seg_logits.size(0), ", ", seg_logits.size(1),
                    "); got ", class_logits.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(class_logits.scalar_type()), op,
                   ": expected floating-point class_logits; got ", class_logits.scalar_type());
  TORCH_CHECK_VALUE(class_logits.device() == seg_logits.device(), op, ": class_logits is on ", class_logits.device(),
                    " but seg_logits is on ", seg_logits.device());
  at::Tensor w;
  if (weight.has_value()) {
    TORCH_CHECK_VALUE(weight->dim() == 1 && weight->size(0) == seg_logits.size(1), op,
                      ": expected weight of shape (K,) = (", seg_logits.size(1), ",); got ", weight->sizes());
    TORCH_CHECK_VALUE(weight->device() == seg_logits.device(), op, ": weight is on ", weight->device(),
                      " but seg_logits is on ", seg_logits.device());
    w = weight->unsqueeze(0);
  }

  const at::Tensor seg = to_seg ? seg_logits : seg_logits.detach();
  at::Tensor presence, stats;
  std::tie(presence, stats) = call_forward(is_hard_mode(m) ? seg.detach() : seg, mode, activation, temperature,
                                           threshold, valid_mask);
  const at::Tensor cls = class_logits.to(presence.scalar_type());
  at::Tensor loss;
  if (to_class) {
    loss = at::binary_cross_entropy_with_logits(cls, presence.detach(), w, c10::nullopt, at::Reduction::None);
  }
  if (to_seg) {
    // BCE(q, t) = -(t log q + (1 - t) log(1 - q)) with log(1 - q) from its exact value: a
    // confident segmentation has q within float rounding of 1, where 1 - q formed from q
    // is 0 and torch's BCE would take log(0). Logs clamped at -100 and gradients at
    // 1 / 1e-12 as torch's BCE does.
    const at::Tensor target = at::sigmoid(cls).detach();
    const at::Tensor log_c_exact =
        presence_log_complement(seg_logits, presence, stats, m, parse_activation(activation, op));
    at::Tensor log_q_exact;
    {
      at::NoGradGuard no_grad;
      log_q_exact = at::log(presence.detach().to(at::kDouble));
    }
    const at::Tensor log_q = clamped_log(presence, log_q_exact);
    const at::Tensor log_c = clamped_log(1 - presence, log_c_exact);
    at::Tensor term = -(target * log_q + (1 - target) * log_c);
    if (w.defined()) term = term * w;
    loss = loss.defined() ? loss + term : term;
  }
  if (red == at::Reduction::Mean) return loss.mean();
  if (red == at::Reduction::Sum) return loss.sum();
  return loss;
}

}  // namespace

TORCH_LIBRARY_IMPL(mtseg, CompositeImplicitAutograd, m) {
  m.impl("soft_presence", &soft_presence);
  m.impl("presence_from_labels", &presence_from_labels);
  m.impl("sync_loss", &sync_loss);
}

}  // namespace presence
}  // namespace mtseg
