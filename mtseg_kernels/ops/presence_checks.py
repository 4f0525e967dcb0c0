"""Names and argument checks of the presence operators, shared by the Python wrappers and
fake kernels (``mtseg_kernels.ops.presence``) and the Triton launchers
(``mtseg_kernels.triton.presence``). A leaf module: it imports only torch, so the two
can both depend on it without depending on each other. The C++ operators check the same
things again for direct ``torch.ops.mtseg`` callers on the CPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

PRESENCE_MODES = ("max", "noisy_or", "smooth_max", "hard", "argmax")
# Modes that decide per voxel (a comparison, an arg-max): no gradient flows through them.
HARD_MODES = ("hard", "argmax")
ACTIVATIONS = ("softmax", "sigmoid", "none")
SYNC_DIRECTIONS = ("seg_to_class", "class_to_seg", "both")
REDUCTIONS = ("mean", "sum", "none")


def presence_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 input, float32 for every other float dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_soft_presence_args(
    input: Tensor, mode: str, activation: str, temperature: float, valid_mask: Tensor | None, op: str
) -> None:
    """``input (B, K, *spatial)`` with 1 to 3 spatial dims, floating point, non-empty; a known
    mode and activation; a finite temperature > 0 for smooth_max; ``valid_mask (B, *spatial)``
    bool on the input's device. Reads only metadata: works on fake and meta tensors."""
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


def check_backward_args(grad: Tensor, input: Tensor, stats: Tensor, mode: str, op: str) -> None:
    """``grad (B, K)`` floating point and ``stats (B, K, 2)`` float64, both on the input's
    device, for a mode that has a gradient (call after :func:`check_soft_presence_args`)."""
    if mode in HARD_MODES:
        raise ValueError(f"{op}: mode {mode!r} has no gradient")
    expected = tuple(input.shape[:2])
    if not isinstance(grad, Tensor) or tuple(grad.shape) != expected:
        got = tuple(grad.shape) if isinstance(grad, Tensor) else type(grad).__name__
        raise ValueError(f"{op}: expected grad of shape (B, K) = {expected}; got {got}")
    if not grad.is_floating_point():
        raise TypeError(f"{op}: expected a floating-point grad; got {grad.dtype}")
    if not isinstance(stats, Tensor) or tuple(stats.shape) != (*expected, 2) or stats.dtype != torch.float64:
        got = f"{stats.dtype} {tuple(stats.shape)}" if isinstance(stats, Tensor) else type(stats).__name__
        raise ValueError(
            f"{op}: expected float64 stats of shape (B, K, 2) = {(*expected, 2)} from soft_presence_forward; got {got}"
        )
    for name, t in (("grad", grad), ("stats", stats)):
        if t.device != input.device:
            raise ValueError(f"{op}: {name} is on {t.device} but input is on {input.device}")


def check_label_args(labels: Tensor, num_classes: int, op: str) -> None:
    """``labels (B, *spatial)`` integer (not bool) with 1 to 3 spatial dims, ``num_classes >= 1``."""
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
