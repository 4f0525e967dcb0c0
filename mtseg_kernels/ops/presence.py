"""Class presence from label maps and from soft masks, and the TDSNet sync loss.

Image-level labels derived from segmentation: which classes occur in an image (CMU-Net's
``C = max(Y)``, TDSNet's class task), and a differentiable presence computed from the
segmentation output, which the sync loss ties to a class head.

Operators (``torch.ops.mtseg``):

* ``class_counts(labels, num_classes, ignore_index)`` -> ``(B, K)`` int64 voxel counts
* ``presence_from_labels(labels, num_classes, ignore_index, min_count)`` -> ``(B, K)`` 0/1 float32
* ``soft_presence(input, mode, activation, temperature, threshold, valid_mask)`` -> ``(B, K)``
* ``sync_loss(seg_logits, class_logits, mode, direction, reduction, weight, activation,
  temperature, threshold, valid_mask)`` -> loss
* ``soft_presence_forward`` / ``soft_presence_backward``: the kernels behind
  ``soft_presence``; the forward also returns ``(B, K, 2)`` float64 statistics, all the
  backward needs besides the input (see ``csrc/include/mtseg/presence.h``).

Soft presence, for each image b and class k, from probabilities ``p`` over the valid voxels:

* ``max``: ``max_x p``; the gradient goes to the voxel holding the maximum (where p
  rounds to the same value at several voxels, as it does near 1, the one with the smallest
  exact 1 - p; the first in raster order among exact ties).
* ``noisy_or``: ``1 - prod_x (1 - p)``, computed as ``-expm1(sum_x log(1 - p))`` with
  ``log(1 - p)`` formed without cancellation (from the other classes' mass for the winning
  class of a voxel, ``-softplus(z)`` for sigmoid), so it stays exact for 10^7 voxels and
  for probabilities of exactly 0 or 1.
* ``smooth_max``: ``T * log(mean_x exp(p / T))``, between the mean (T -> inf) and the max
  (T -> 0), in [0, 1] for probabilities. Any finite T > 0 works, down to 1e-300 (the max).

Two hard modes give 0/1 and, like ``p > t`` or ``argmax`` in torch, carry no gradient:

* ``argmax``: class k is present when it wins the arg-max over classes at some valid
  voxel, i.e. when the segmentation's arg-max map contains it: the hard presence of the
  TDSNet paper (Ren et al.). The arg-max is taken over the input, which for softmax and
  sigmoid is that of the exact probabilities (the activation does not matter); ties go to
  the lowest class and NaN counts as the largest value, as in ``torch.argmax``.
* ``hard``: ``any_x p > threshold``, a threshold rule (with ``activation='softmax'`` and
  ``threshold=0.5``, a class that wins with p > 1/2 somewhere; unlike ``argmax``, a class
  that wins only with p <= 1/2 is absent).

An image with no valid voxel has presence 0 in every mode. NaN in the input gives NaN
presence in the soft modes (under softmax, a NaN logit makes every class NaN at its
voxel); ``hard``: NaN is not above the threshold, as in torch.

On CUDA the kernels are Triton (``mtseg_kernels.triton.presence``); without the
``triton`` package the operators fail on CUDA tensors with a RuntimeError that says so
(there is no silent fallback to the CPU). ``class_counts`` checks the labels inside the
CUDA kernel without synchronising the device: an out-of-range label raises ValueError at
the next presence call after the kernel has finished, or at :func:`check_label_errors`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .. import triton as _triton_pkg
from .presence_checks import (
    ACTIVATIONS,
    HARD_MODES,
    PRESENCE_MODES,
    REDUCTIONS,
    SYNC_DIRECTIONS,
    check_backward_args,
    check_label_args,
    check_soft_presence_args,
    presence_dtype,
)

__all__ = [
    "PRESENCE_MODES",
    "SYNC_DIRECTIONS",
    "SoftPresence",
    "SyncLoss",
    "check_label_errors",
    "class_counts",
    "presence_from_labels",
    "soft_presence",
    "sync_loss",
    "valid_mask_from_labels",
]


# --------------------------------------------------------------------------------------
# Fake kernels (shapes and dtypes for torch.compile and meta tensors): the same argument
# checks as the real kernels, and the same contiguous outputs.
# --------------------------------------------------------------------------------------
@torch.library.register_fake("mtseg::class_counts")
def _class_counts_fake(labels, num_classes, ignore_index=-100):
    check_label_args(labels, num_classes, "class_counts")
    return labels.new_empty((labels.shape[0], num_classes), dtype=torch.int64)


@torch.library.register_fake("mtseg::soft_presence_forward")
def _soft_presence_forward_fake(input, mode, activation, temperature, threshold, valid_mask):
    check_soft_presence_args(input, mode, activation, temperature, valid_mask, "soft_presence")
    batch, classes = input.shape[:2]
    dtype = presence_dtype(input.dtype)
    return input.new_empty((batch, classes), dtype=dtype), input.new_empty((batch, classes, 2), dtype=torch.float64)


@torch.library.register_fake("mtseg::soft_presence_backward")
def _soft_presence_backward_fake(grad, input, stats, mode, activation, temperature, valid_mask):
    check_soft_presence_args(input, mode, activation, temperature, valid_mask, "soft_presence_backward")
    check_backward_args(grad, input, stats, mode, "soft_presence_backward")
    return input.new_empty(input.shape)  # contiguous, like the kernels' output


# --------------------------------------------------------------------------------------
# Autograd: soft_presence_forward saves the input (already alive: it is the network's
# output) and its (B, K, 2) statistics; the backward recomputes the probabilities.
# --------------------------------------------------------------------------------------
def _soft_presence_setup(ctx, inputs, output):
    input, mode, activation, temperature, _threshold, valid_mask = inputs
    _presence, stats = output
    ctx.save_for_backward(input, stats, valid_mask)
    ctx.params = (mode, activation, temperature)


def _soft_presence_backward(ctx, grad_presence, _grad_stats):
    input, stats, valid_mask = ctx.saved_tensors
    mode, activation, temperature = ctx.params
    if mode in HARD_MODES:
        raise RuntimeError(
            f"soft_presence: mode={mode!r} is a decision per voxel and has no gradient; detach its input "
            "(torch.ops.mtseg.soft_presence does) or use 'max', 'noisy_or' or 'smooth_max'"
        )
    grad_input = torch.ops.mtseg.soft_presence_backward(
        grad_presence, input, stats, mode, activation, temperature, valid_mask
    )
    return grad_input, None, None, None, None, None


torch.library.register_autograd(
    "mtseg::soft_presence_forward", _soft_presence_backward, setup_context=_soft_presence_setup
)


# --------------------------------------------------------------------------------------
# Functional API
# --------------------------------------------------------------------------------------
def class_counts(labels: Tensor, num_classes: int, ignore_index: int = -100) -> Tensor:
    """Voxel count of every class in every image.

    Args:
        labels: ``(B, *spatial)`` integer label map, 1 to 3 spatial dims.
        num_classes: K; labels must lie in ``[0, K)`` or equal ``ignore_index``.
        ignore_index: label value that is not counted.

    Returns:
        ``(B, K)`` int64.

    Raises:
        ValueError: naming the first label value outside ``[0, K)`` that is not ``ignore_index``.
            For CUDA labels the check runs in the kernel without synchronising the device:
            the error comes from a later presence call or :func:`check_label_errors`.

    Example:
        >>> class_counts(torch.tensor([[0, 2, 2, 255]]), 3, ignore_index=255)
        tensor([[1, 0, 2]])
    """
    check_label_args(labels, num_classes, "class_counts")
    return torch.ops.mtseg.class_counts(labels, num_classes, ignore_index)


def presence_from_labels(labels: Tensor, num_classes: int, ignore_index: int = -100, min_count: int = 1) -> Tensor:
    """Hard presence ``(B, K)`` (float32 0/1): class k has at least ``min_count`` voxels.

    ``min_count=1`` is CMU-Net's ``C = max(Y)`` over one-hot labels; a larger value drops
    classes that only touch an image in a few voxels. See :func:`class_counts`.
    """
    check_label_args(labels, num_classes, "presence_from_labels")
    if min_count < 1:
        raise ValueError(f"presence_from_labels: min_count must be >= 1; got {min_count}")
    return torch.ops.mtseg.presence_from_labels(labels, num_classes, ignore_index, min_count)


def valid_mask_from_labels(labels: Tensor, ignore_index: int) -> Tensor:
    """``(B, *spatial)`` bool mask of the voxels whose label is not ``ignore_index``."""
    return labels != ignore_index


def check_label_errors(wait: bool = True) -> None:
    """Raises the first out-of-range label seen by earlier CUDA ``class_counts`` /
    ``presence_from_labels`` calls (they check inside the kernel and do not wait for it).
    With ``wait`` it first waits for those kernels (a device synchronisation); without,
    it reports only the checks that have finished. A no-op without CUDA calls."""
    if _triton_pkg.HAS_TRITON:
        from ..triton import presence as triton_presence  # noqa: PLC0415  (optional dependency)

        triton_presence.check_label_errors(wait)


def soft_presence(
    input: Tensor,
    mode: str = "max",
    activation: str = "softmax",
    temperature: float = 0.1,
    threshold: float = 0.5,
    valid_mask: Tensor | None = None,
) -> Tensor:
    """Differentiable class presence from a segmentation output.

    Args:
        input: ``(B, K, *spatial)`` logits (``activation='softmax'`` or ``'sigmoid'``) or
            probabilities (``'none'``), 1 to 3 spatial dims, any float dtype (float16 and
            bfloat16 are computed in float32).
        mode: ``'max'``, ``'noisy_or'``, ``'smooth_max'``, ``'hard'`` or ``'argmax'`` (see the
            module docs; the last two are 0/1 without gradient).
        activation: ``'softmax'`` over K (one class per voxel), ``'sigmoid'`` (multi-label)
            or ``'none'``.
        temperature: T of ``smooth_max``.
        threshold: t of ``hard``.
        valid_mask: optional ``(B, *spatial)`` bool; voxels where it is False are ignored
            (e.g. :func:`valid_mask_from_labels`).

    Returns:
        ``(B, K)``, float32 (float64 for float64 input).

    Example:
        >>> soft_presence(torch.randn(2, 4, 64, 64), mode="noisy_or").shape
        torch.Size([2, 4])
    """
    check_soft_presence_args(input, mode, activation, temperature, valid_mask, "soft_presence")
    return torch.ops.mtseg.soft_presence(input, mode, activation, temperature, threshold, valid_mask)


def sync_loss(
    seg_logits: Tensor,
    class_logits: Tensor,
    mode: str = "hard",
    direction: str = "seg_to_class",
    reduction: str = "mean",
    weight: Tensor | Sequence[float] | None = None,
    activation: str = "softmax",
    temperature: float = 0.1,
    threshold: float = 0.5,
    valid_mask: Tensor | None = None,
) -> Tensor:
    """Binary cross-entropy between a class head and the presence of the segmentation output.

    With ``q = soft_presence(seg_logits, mode, ...)`` and ``c = class_logits``:

    * ``seg_to_class`` (TDSNet's sync loss): ``BCEWithLogits(c, target=q.detach())``; only
      the class head is trained. The paper's presence is ``mode='argmax'`` (a class is
      present when the arg-max map contains it); the default ``mode='hard'`` is the
      threshold rule ``any p > threshold``.
    * ``class_to_seg``: ``BCE(q, target=sigmoid(c).detach())``; only the segmentation is
      trained. Needs a differentiable mode. ``log(1 - q)`` is taken from its exact value
      (noisy-or: the kernel's sum of ``log(1 - p)``; max: the other classes' share at the
      arg-max voxel), so a confident segmentation, whose ``q`` rounds to 1, still gets the
      right loss and gradient; logs are clamped at -100 and slopes at 1e12, as in torch's BCE.
    * ``both``: the sum of the two (the two-way loss the paper names as future work).

    The presence is one fused pass over the voxels; its backward keeps only ``(B, K, 2)``
    statistics, never the ``(B, K, *spatial)`` softmax.

    Args:
        seg_logits: ``(B, K, *spatial)``.
        class_logits: ``(B, K)``.
        weight: optional ``(K,)`` per-class weight of the BCE terms: a tensor, or a sequence
            of K numbers (made a tensor on ``seg_logits``' device).
        reduction: ``'mean'`` over B*K, ``'sum'`` or ``'none'`` (``(B, K)``).
        mode, activation, temperature, threshold, valid_mask: as in :func:`soft_presence`.

    Example:
        >>> seg, cls = torch.randn(2, 4, 32, 32, requires_grad=True), torch.randn(2, 4, requires_grad=True)
        >>> sync_loss(seg, cls, mode="max", direction="both").backward()
    """
    check_soft_presence_args(seg_logits, mode, activation, temperature, valid_mask, "sync_loss")
    if direction not in SYNC_DIRECTIONS:
        raise ValueError(f"sync_loss: direction must be one of {SYNC_DIRECTIONS}; got {direction!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"sync_loss: reduction must be one of {REDUCTIONS}; got {reduction!r}")
    if direction != "seg_to_class" and mode in HARD_MODES:
        raise ValueError(
            f"sync_loss: mode={mode!r} has no gradient, so direction {direction!r} cannot train the segmentation; "
            "use mode 'max', 'noisy_or' or 'smooth_max', or direction 'seg_to_class'"
        )
    expected = tuple(seg_logits.shape[:2])
    if not isinstance(class_logits, Tensor) or tuple(class_logits.shape) != expected:
        got = tuple(class_logits.shape) if isinstance(class_logits, Tensor) else type(class_logits).__name__
        raise ValueError(f"sync_loss: expected class_logits of shape (B, K) = {expected}; got {got}")
    weight = _as_weight(weight, seg_logits, "sync_loss")
    if weight is not None and (weight.dim() != 1 or weight.shape[0] != expected[1]):
        raise ValueError(f"sync_loss: expected weight of shape (K,) = ({expected[1]},); got {tuple(weight.shape)}")
    return torch.ops.mtseg.sync_loss(
        seg_logits, class_logits, mode, direction, reduction, weight, activation, temperature, threshold, valid_mask
    )


def _as_weight(weight, like: Tensor | None, op: str) -> Tensor | None:
    """A per-class weight as a floating tensor: tensors pass through, sequences of numbers
    become a tensor (on ``like``'s device, in its presence dtype)."""
    if weight is None or isinstance(weight, Tensor):
        if weight is not None and not weight.is_floating_point():
            raise TypeError(f"{op}: weight must be floating point; got {weight.dtype}")
        return weight
    if isinstance(weight, Sequence) and not isinstance(weight, (str, bytes)):
        try:
            values = [float(w) for w in weight]
        except (TypeError, ValueError):
            raise TypeError(f"{op}: weight must be a (K,) tensor or a sequence of K numbers; got {weight!r}") from None
        dtype = presence_dtype(like.dtype) if like is not None else torch.float32
        return torch.tensor(values, dtype=dtype, device=like.device if like is not None else None)
    raise TypeError(f"{op}: weight must be a (K,) tensor or a sequence of K numbers; got {type(weight).__name__}")


# --------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------
class SoftPresence(nn.Module):
    """Module form of :func:`soft_presence`.

    Shape:
        - Input: ``(B, K, *spatial)``; optional ``valid_mask`` ``(B, *spatial)``
        - Output: ``(B, K)``

    Example:
        >>> SoftPresence("smooth_max", temperature=0.05)(torch.randn(2, 3, 16, 16, 8)).shape
        torch.Size([2, 3])
    """

    def __init__(
        self, mode: str = "max", activation: str = "softmax", temperature: float = 0.1, threshold: float = 0.5
    ) -> None:
        super().__init__()
        if mode not in PRESENCE_MODES:
            raise ValueError(f"SoftPresence: mode must be one of {PRESENCE_MODES}; got {mode!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"SoftPresence: activation must be one of {ACTIVATIONS}; got {activation!r}")
        self.mode, self.activation, self.temperature, self.threshold = mode, activation, temperature, threshold

    def forward(self, input: Tensor, valid_mask: Tensor | None = None) -> Tensor:
        return soft_presence(input, self.mode, self.activation, self.temperature, self.threshold, valid_mask)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, activation={self.activation!r}, temperature={self.temperature}, threshold={self.threshold}"


class SyncLoss(nn.Module):
    """Module form of :func:`sync_loss`; ``weight`` is a buffer (moves with ``.to()``).

    Shape:
        - Input: ``seg_logits (B, K, *spatial)``, ``class_logits (B, K)``, optional ``valid_mask (B, *spatial)``
        - Output: scalar, or ``(B, K)`` with ``reduction='none'``

    Example:
        >>> loss = SyncLoss(mode="noisy_or", direction="both")
        >>> loss(torch.randn(2, 3, 16, 16), torch.randn(2, 3)).shape
        torch.Size([])
    """

    def __init__(
        self,
        mode: str = "hard",
        direction: str = "seg_to_class",
        reduction: str = "mean",
        weight: Tensor | Sequence[float] | None = None,
        activation: str = "softmax",
        temperature: float = 0.1,
        threshold: float = 0.5,
    ) -> None:
        super().__init__()
        weight = _as_weight(weight, None, "SyncLoss")
        if direction not in SYNC_DIRECTIONS:
            raise ValueError(f"SyncLoss: direction must be one of {SYNC_DIRECTIONS}; got {direction!r}")
        if mode not in PRESENCE_MODES:
            raise ValueError(f"SyncLoss: mode must be one of {PRESENCE_MODES}; got {mode!r}")
        self.mode, self.direction, self.reduction = mode, direction, reduction
        self.activation, self.temperature, self.threshold = activation, temperature, threshold
        self.register_buffer("weight", weight)

    def forward(self, seg_logits: Tensor, class_logits: Tensor, valid_mask: Tensor | None = None) -> Tensor:
        return sync_loss(
            seg_logits,
            class_logits,
            self.mode,
            self.direction,
            self.reduction,
            self.weight,
            self.activation,
            self.temperature,
            self.threshold,
            valid_mask,
        )

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, direction={self.direction!r}, reduction={self.reduction!r}"


# --------------------------------------------------------------------------------------
# CUDA implementation: the Triton launchers, or, without triton, a clear error
# --------------------------------------------------------------------------------------
def _triton_missing(op: str):
    def fail(*args, **kwargs):
        raise RuntimeError(
            f"mtseg::{op} on CUDA tensors runs Triton kernels, and the 'triton' package is not installed "
            "(CUDA builds of torch ship it: `pip install triton` matching your torch). Install it, or call the "
            "op on CPU tensors; there is no automatic fallback to the CPU."
        )

    return fail


if _triton_pkg.HAS_TRITON:
    from ..triton import presence as _triton_presence

    _CUDA_KERNELS = {
        "class_counts": _triton_presence.class_counts,
        "soft_presence_forward": _triton_presence.soft_presence_forward,
        "soft_presence_backward": _triton_presence.soft_presence_backward,
    }
else:  # pragma: no cover - exercised in a subprocess that hides triton (tests/ops/test_presence.py)
    _CUDA_KERNELS = {op: _triton_missing(op) for op in ("class_counts", "soft_presence_forward",
                                                        "soft_presence_backward")}

_cuda_lib = torch.library.Library("mtseg", "IMPL")
for _op, _kernel in _CUDA_KERNELS.items():
    _cuda_lib.impl(_op, _kernel, "CUDA")
