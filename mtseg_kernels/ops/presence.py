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
  (T -> 0), always in [0, 1].
* ``hard``: ``any_x p > threshold`` as 0/1: the TDSNet rule. It is a comparison and, like
  ``p > t`` in torch, its result carries no gradient.

An image with no valid voxel has presence 0 in every mode. NaN in the input gives NaN
presence (``hard``: NaN is not above the threshold, as in torch).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = [
    "PRESENCE_MODES",
    "SYNC_DIRECTIONS",
    "SoftPresence",
    "SyncLoss",
    "class_counts",
    "presence_from_labels",
    "soft_presence",
    "sync_loss",
    "valid_mask_from_labels",
]

PRESENCE_MODES = ("max", "noisy_or", "smooth_max", "hard")
ACTIVATIONS = ("softmax", "sigmoid", "none")
SYNC_DIRECTIONS = ("seg_to_class", "class_to_seg", "both")
REDUCTIONS = ("mean", "sum", "none")


def _presence_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------
# Argument checks shared by the wrappers and the Triton launchers (the C++ operators
# check again, for direct torch.ops callers on CPU)
# --------------------------------------------------------------------------------------
def check_soft_presence_args(
    input: Tensor, mode: str, activation: str, temperature: float, valid_mask: Tensor | None, op: str
) -> None:
    if mode not in PRESENCE_MODES:
        raise ValueError(f"{op}: mode must be one of {PRESENCE_MODES}; got {mode!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: activation must be one of {ACTIVATIONS}; got {activation!r}")
    if not isinstance(input, Tensor):
        raise TypeError(f"{op}: expected a tensor (B, K, *spatial); got {type(input).__name__}")
    if not 3 <= input.dim() <= 5:
        raise ValueError(
            f"{op}: expected input of shape (B, K, *spatial) with 1 to 3 spatial dims; got shape {tuple(input.shape)}"
        )
    if not input.is_floating_point():
        raise TypeError(f"{op}: expected floating-point logits or probabilities; got {input.dtype}")
    if input.numel() == 0:
        raise ValueError(f"{op}: expected at least one image, class and voxel; got shape {tuple(input.shape)}")
    if mode == "smooth_max" and not (temperature > 0 and temperature < float("inf")):
        raise ValueError(f"{op}: smooth_max needs a finite temperature > 0; got {temperature}")
    if valid_mask is not None:
        expected = (input.shape[0], *input.shape[2:])
        if not isinstance(valid_mask, Tensor) or valid_mask.dtype != torch.bool:
            got = valid_mask.dtype if isinstance(valid_mask, Tensor) else type(valid_mask).__name__
            raise TypeError(f"{op}: valid_mask must be a bool tensor; got {got}")
        if tuple(valid_mask.shape) != expected:
            raise ValueError(
                f"{op}: valid_mask must have shape (B, *spatial) = {expected}; got {tuple(valid_mask.shape)}"
            )
        if valid_mask.device != input.device:
            raise ValueError(f"{op}: valid_mask is on {valid_mask.device} but input is on {input.device}")


def check_label_args(labels: Tensor, num_classes: int, op: str) -> None:
    if not isinstance(labels, Tensor):
        raise TypeError(f"{op}: expected a tensor (B, *spatial); got {type(labels).__name__}")
    if not 2 <= labels.dim() <= 4:
        raise ValueError(
            f"{op}: expected labels of shape (B, *spatial) with 1 to 3 spatial dims; got shape {tuple(labels.shape)}"
        )
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"{op}: expected integer labels (uint8, int8, int16, int32, int64); got {labels.dtype}")
    if num_classes < 1:
        raise ValueError(f"{op}: num_classes must be >= 1; got {num_classes}")
    if labels.shape[0] == 0:
        raise ValueError(f"{op}: expected at least one image; got shape {tuple(labels.shape)}")


# --------------------------------------------------------------------------------------
# Fake kernels (shapes and dtypes for torch.compile and meta tensors)
# --------------------------------------------------------------------------------------
@torch.library.register_fake("mtseg::class_counts")
def _class_counts_fake(labels, num_classes, ignore_index=-100):
    return labels.new_empty((labels.shape[0], num_classes), dtype=torch.int64)


@torch.library.register_fake("mtseg::soft_presence_forward")
def _soft_presence_forward_fake(input, mode, activation, temperature, threshold, valid_mask):
    batch, classes = input.shape[:2]
    dtype = _presence_dtype(input.dtype)
    return input.new_empty((batch, classes), dtype=dtype), input.new_empty((batch, classes, 2), dtype=torch.float64)


@torch.library.register_fake("mtseg::soft_presence_backward")
def _soft_presence_backward_fake(grad, input, stats, mode, activation, temperature, valid_mask):
    return torch.empty_like(input)


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
    if mode == "hard":
        raise RuntimeError(
            "soft_presence: mode='hard' is a threshold and has no gradient; detach its input "
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
        mode: ``'max'``, ``'noisy_or'``, ``'smooth_max'`` or ``'hard'`` (see the module docs).
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
    weight: Tensor | None = None,
    activation: str = "softmax",
    temperature: float = 0.1,
    threshold: float = 0.5,
    valid_mask: Tensor | None = None,
) -> Tensor:
    """Binary cross-entropy between a class head and the presence of the segmentation output.

    With ``q = soft_presence(seg_logits, mode, ...)`` and ``c = class_logits``:

    * ``seg_to_class`` (TDSNet's sync loss, the default with ``mode='hard'``):
      ``BCEWithLogits(c, target=q.detach())``; only the class head is trained.
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
        weight: optional ``(K,)`` per-class weight of the BCE terms.
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
    if direction != "seg_to_class" and mode == "hard":
        raise ValueError(
            f"sync_loss: mode='hard' has no gradient, so direction {direction!r} cannot train the segmentation; "
            "use mode 'max', 'noisy_or' or 'smooth_max', or direction 'seg_to_class'"
        )
    expected = tuple(seg_logits.shape[:2])
    if not isinstance(class_logits, Tensor) or tuple(class_logits.shape) != expected:
        got = tuple(class_logits.shape) if isinstance(class_logits, Tensor) else type(class_logits).__name__
        raise ValueError(f"sync_loss: expected class_logits of shape (B, K) = {expected}; got {got}")
    if weight is not None and (weight.dim() != 1 or weight.shape[0] != expected[1]):
        raise ValueError(f"sync_loss: expected weight of shape (K,) = ({expected[1]},); got {tuple(weight.shape)}")
    return torch.ops.mtseg.sync_loss(
        seg_logits, class_logits, mode, direction, reduction, weight, activation, temperature, threshold, valid_mask
    )


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
        weight: Tensor | None = None,
        activation: str = "softmax",
        temperature: float = 0.1,
        threshold: float = 0.5,
    ) -> None:
        super().__init__()
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


# The Triton kernels register themselves as the CUDA implementation on import.
from .. import triton as _triton_pkg  # noqa: E402

if _triton_pkg.HAS_TRITON:
    from ..triton import presence as _triton_presence  # noqa: E402,F401
