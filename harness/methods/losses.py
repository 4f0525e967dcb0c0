"""Losses shared by the methods.

Segmentation losses take logits ``(B, K, *S)`` and a label map ``(B, *S)`` of class ids in
``[0, K)`` or ``ignore_index``; image-level losses take logits ``(B, P)``. Each loss reduces
per image first and then averages over the batch, so a batch split across DDP processes
(gradients averaged) gives the same gradient as the whole batch in one process, as long as
every process holds the same number of images. Pixels labelled ``ignore_index`` count
nowhere: not in a numerator, not in a denominator, not in a union.

=========================  ==============================================================
``cross_entropy``          ``sum_i w_{y_i} CE_i / sum_i w_{y_i}`` over the valid pixels
``soft_dice_loss``         ``1 - mean_k (2 |P_k G_k| + s) / (|P_k| + |G_k| + s)``
``soft_iou``               ``mean_k (|P_k G_k| + s) / (|P_k| + |G_k| - |P_k G_k| + s)``
``focal_loss``             ``-alpha_{y} (1 - p_y)^gamma log p_y``, mean over valid pixels
``binary_cross_entropy``   ``-[y log q + (1 - y) log(1 - q)]``, ``q = sigmoid(logit)``
``binary_focal_loss``      ``-[w_pos y (1 - q)^gamma log q + w_neg (1 - y) q^gamma log(1 - q)]``
``scene_cross_entropy``    softmax CE of a scene label, images of unknown scene add 0
``mse``                    mean squared error
=========================  ==============================================================

``P_k`` are the softmax probabilities of class ``k`` and ``G_k`` its one-hot labels, both
zeroed at ignored pixels; ``|.|`` sums over the image, ``s`` is the smoothing term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "binary_cross_entropy",
    "binary_focal_loss",
    "cross_entropy",
    "focal_loss",
    "mse",
    "scene_cross_entropy",
    "soft_dice_loss",
    "soft_iou",
]


# --------------------------------------------------------------------------------------
# Argument checks: a wrong label must be a clear error, never a CUDA device assert
# --------------------------------------------------------------------------------------
def _check_segmentation(who: str, logits: Tensor, target: Tensor, ignore_index: int) -> None:
    if not isinstance(logits, Tensor) or not isinstance(target, Tensor):
        raise TypeError(f"{who}: expected tensors (logits, target), got {type(logits).__name__}, {type(target).__name__}")
    if logits.dim() < 3 or not logits.is_floating_point():
        raise ValueError(f"{who}: expected float logits (B, K, *S), got {logits.dtype} of shape {tuple(logits.shape)}")
    expected = (logits.shape[0],) + tuple(logits.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(f"{who}: expected a label map of shape (B, *S) = {expected}, got {tuple(target.shape)}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"{who}: expected integer class ids, got {target.dtype}")
    k = logits.shape[1]
    bad = (target != ignore_index) & ((target < 0) | (target >= k))
    if bool(bad.any()):
        values = sorted(int(v) for v in torch.unique(target[bad])[:5])
        raise ValueError(f"{who}: labels must lie in [0, {k}) or equal ignore_index={ignore_index}; got {values}")


def _check_image_level(who: str, logits: Tensor, target: Tensor) -> None:
    if not isinstance(logits, Tensor) or not isinstance(target, Tensor):
        raise TypeError(f"{who}: expected tensors (logits, target), got {type(logits).__name__}, {type(target).__name__}")
    if logits.dim() < 1 or not logits.is_floating_point():
        raise ValueError(f"{who}: expected float logits (B, ...), got {logits.dtype} of shape {tuple(logits.shape)}")
    if tuple(target.shape) != tuple(logits.shape):
        raise ValueError(f"{who}: expected targets of the logits' shape {tuple(logits.shape)}, got {tuple(target.shape)}")


def _class_weight(who: str, weight: Tensor | None, k: int, like: Tensor) -> Tensor | None:
    if weight is None:
        return None
    weight = torch.as_tensor(weight)
    if weight.shape != (k,):
        raise ValueError(f"{who}: expected one weight per class, shape ({k},), got {tuple(weight.shape)}")
    return weight.to(device=like.device, dtype=like.dtype)


def _valid_onehot(prob: Tensor, target: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """One-hot labels ``(B, K, *S)`` and the valid mask ``(B, 1, *S)``, both 0 at ignored pixels."""
    valid = target != ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target)).long()
    onehot = F.one_hot(safe, prob.shape[1]).movedim(-1, 1).to(prob.dtype)
    vmask = valid.unsqueeze(1).to(prob.dtype)
    return onehot * vmask, vmask


def _per_image_mean(values: Tensor, valid: Tensor) -> Tensor:
    """Mean of ``values`` over the valid entries of each image, then over images (an empty image adds 0)."""
    b = values.shape[0]
    v = valid.reshape(b, -1).to(values.dtype)
    return ((values.reshape(b, -1) * v).sum(1) / v.sum(1).clamp_min(1)).mean()


# --------------------------------------------------------------------------------------
# Segmentation losses
# --------------------------------------------------------------------------------------
def cross_entropy(logits: Tensor, target: Tensor, ignore_index: int = 255, weight: Tensor | None = None) -> Tensor:
    """Softmax cross-entropy, averaged over the valid pixels of each image, then over images.

    With class weights ``w`` (``(K,)``) an image's mean is ``sum_i w_{y_i} CE_i / sum_i w_{y_i}``
    (torch's weighted mean, per image). An image with no valid pixel adds 0.

    Shapes: logits ``(B, K, *S)``, target ``(B, *S)``; returns a scalar.
    """
    _check_segmentation("cross_entropy", logits, target, ignore_index)
    logits = logits.float()
    weight = _class_weight("cross_entropy", weight, logits.shape[1], logits)
    per_px = F.cross_entropy(logits, target.long(), weight=weight, ignore_index=ignore_index, reduction="none")
    b = per_px.shape[0]
    valid = (target != ignore_index).reshape(b, -1).float()
    if weight is None:
        denom = valid.sum(1)
    else:
        safe = torch.where(target != ignore_index, target, torch.zeros_like(target)).long()
        denom = (weight[safe].reshape(b, -1) * valid).sum(1)
    return (per_px.reshape(b, -1).sum(1) / denom.clamp_min(1e-12)).mean()


def soft_dice_loss(logits: Tensor, target: Tensor, ignore_index: int = 255, include_background: bool = True,
                   smooth: float = 1.0) -> Tensor:
    """Soft Dice loss ``1 - mean_k (2 |P_k G_k| + s) / (|P_k| + |G_k| + s)``.

    Per image and class on the softmax probabilities, then the mean over classes (all, or
    ``1..K-1`` without background) and images. Ignored pixels are removed from ``P`` and
    ``G``. The smoothing ``s`` keeps a class absent from both at Dice 1 (loss 0).

    Shapes: logits ``(B, K, *S)``, target ``(B, *S)``; returns a scalar.
    """
    _check_segmentation("soft_dice_loss", logits, target, ignore_index)
    prob = logits.float().softmax(1)
    onehot, vmask = _valid_onehot(prob, target, ignore_index)
    prob = prob * vmask
    dims = tuple(range(2, prob.dim()))
    inter = (prob * onehot).sum(dims)
    denom = prob.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + smooth) / (denom + smooth)
    if not include_background:
        dice = dice[:, 1:]
    return 1 - dice.mean()


def soft_iou(logits: Tensor, target: Tensor, ignore_index: int = 255, smooth: float = 1.0) -> Tensor:
    """Soft Jaccard index ``(|P_k G_k| + s) / (|P_k| + |G_k| - |P_k G_k| + s)`` (not a loss: 1 is best).

    Per image and class on the softmax probabilities, mean over classes and images; ignored
    pixels are removed from ``P`` and ``G``. TDSNet's loss term is ``1 - soft_iou``.

    Shapes: logits ``(B, K, *S)``, target ``(B, *S)``; returns a scalar.
    """
    _check_segmentation("soft_iou", logits, target, ignore_index)
    prob = logits.float().softmax(1)
    onehot, vmask = _valid_onehot(prob, target, ignore_index)
    prob = prob * vmask
    dims = tuple(range(2, prob.dim()))
    inter = (prob * onehot).sum(dims)
    union = prob.sum(dims) + onehot.sum(dims) - inter
    return ((inter + smooth) / (union + smooth)).mean()


def focal_loss(logits: Tensor, target: Tensor, ignore_index: int = 255, gamma: float = 2.0,
               alpha: Tensor | None = None) -> Tensor:
    """Multi-class (softmax) focal loss of Lin et al., ``-alpha_y (1 - p_y)^gamma log p_y``.

    ``alpha`` (``(K,)``, optional) weighs each pixel by its true class; the sum is divided by
    the number of valid pixels (not by the sum of weights), per image, then averaged over
    images. ``gamma = 0`` and no ``alpha`` is :func:`cross_entropy`.

    Shapes: logits ``(B, K, *S)``, target ``(B, *S)``; returns a scalar.
    """
    _check_segmentation("focal_loss", logits, target, ignore_index)
    if gamma < 0:
        raise ValueError(f"focal_loss: gamma must be >= 0, got {gamma}")
    logp = F.log_softmax(logits.float(), 1)
    alpha = _class_weight("focal_loss", alpha, logits.shape[1], logp)
    valid = target != ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target)).long()
    logpt = logp.gather(1, safe.unsqueeze(1)).squeeze(1)
    loss = -((1 - logpt.exp()) ** gamma) * logpt
    if alpha is not None:
        loss = loss * alpha[safe]
    return _per_image_mean(loss, valid)


# --------------------------------------------------------------------------------------
# Image-level losses (class presence, slice classification, scene)
# --------------------------------------------------------------------------------------
def binary_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Sigmoid cross-entropy of multi-label logits, the mean over each image's labels, then images.

    Shapes: logits ``(B, P)`` (or ``(B, ...)``), target of the same shape, values in [0, 1].
    """
    _check_image_level("binary_cross_entropy", logits, target)
    per = F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none")
    return per.reshape(per.shape[0], -1).mean(1).mean()


def binary_focal_loss(logits: Tensor, target: Tensor, gamma: float = 2.0, pos_weight: float = 1.0,
                      neg_weight: float = 1.0) -> Tensor:
    """Sigmoid focal loss with separate weights for positive and negative labels.

    Per label, with ``q = sigmoid(logit)`` and target ``y``:
    ``-pos_weight * y * (1 - q)^gamma * log q - neg_weight * (1 - y) * q^gamma * log(1 - q)``.
    ``pos_weight`` weighs the terms of positive labels (``y = 1``: "the class is there"),
    ``neg_weight`` those of negative labels; Lin et al.'s ``alpha`` is
    ``pos_weight = alpha, neg_weight = 1 - alpha``. CMU-Net's classification loss is this
    with weights 0.8 / 0.2 (0.5 / 0.5 for encoder pre-training). ``gamma = 0`` with unit
    weights is :func:`binary_cross_entropy`. Logs come from ``logsigmoid`` (no overflow).

    Shapes: logits ``(B, P)`` (or ``(B, ...)``), target of the same shape; returns a scalar
    (mean over each image's labels, then over images).
    """
    _check_image_level("binary_focal_loss", logits, target)
    if gamma < 0:
        raise ValueError(f"binary_focal_loss: gamma must be >= 0, got {gamma}")
    x = logits.float()
    y = target.to(x.dtype)
    q = torch.sigmoid(x)
    pos = -pos_weight * y * (1 - q) ** gamma * F.logsigmoid(x)
    neg = -neg_weight * (1 - y) * q**gamma * F.logsigmoid(-x)
    per = pos + neg
    return per.reshape(per.shape[0], -1).mean(1).mean()


def scene_cross_entropy(logits: Tensor, scene: Tensor) -> Tensor:
    """Softmax cross-entropy of a scene label per image (TDSNet's scene task).

    Images whose scene is unknown (a negative label, e.g. -1) add 0; the sum is divided by
    the batch size, so the value does not depend on how a batch is split across processes.

    Shapes: logits ``(B, S)``, scene ``(B,)`` integer in ``[0, S)`` or negative; returns a scalar.
    """
    if not isinstance(logits, Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"scene_cross_entropy: expected float logits (B, S), got {got}")
    if not isinstance(scene, Tensor) or tuple(scene.shape) != (logits.shape[0],) or scene.is_floating_point():
        got = (tuple(scene.shape), scene.dtype) if isinstance(scene, Tensor) else type(scene).__name__
        raise ValueError(f"scene_cross_entropy: expected integer scene labels of shape ({logits.shape[0]},), got {got}")
    s = logits.shape[1]
    if bool((scene >= s).any()):
        raise ValueError(f"scene_cross_entropy: scene labels must be < {s} (or negative: unknown), got {scene.tolist()}")
    known = scene >= 0
    per = F.cross_entropy(logits.float(), scene.clamp_min(0).long(), reduction="none")
    return (per * known).sum() / scene.shape[0]


def mse(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error over every element (HOG-MTL's regression loss). Shapes: equal, any."""
    target = target.to(pred.device)
    if tuple(pred.shape) != tuple(target.shape):
        raise ValueError(f"mse: prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    return F.mse_loss(pred.float(), target.float())
