"""Segmentation losses shared by the methods.

All losses reduce per image first and then average over the batch, so a batch split
across DDP processes (gradients averaged) gives the same gradient as the whole batch
in one process, as long as every process holds the same number of images. Pixels
labelled ``ignore_index`` count nowhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _valid_onehot(logits: Tensor, target: Tensor, ignore_index: int):
    k = logits.shape[1]
    valid = target != ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target)).long()
    onehot = F.one_hot(safe, k).movedim(-1, 1).to(logits.dtype)
    vmask = valid.unsqueeze(1).to(logits.dtype)
    return onehot * vmask, vmask


def cross_entropy(logits: Tensor, target: Tensor, ignore_index: int = 255, weight: Tensor | None = None) -> Tensor:
    """Mean over the valid pixels of each image, then over images (an image with no valid pixel adds 0)."""
    per_px = F.cross_entropy(logits.float(), target.long(), weight=weight, ignore_index=ignore_index, reduction="none")
    b = per_px.shape[0]
    valid = (target != ignore_index).reshape(b, -1).float()
    per_px = per_px.reshape(b, -1)
    if weight is None:
        denom = valid.sum(1)
    else:
        safe = torch.where(target != ignore_index, target, torch.zeros_like(target)).long()
        denom = (weight[safe].reshape(b, -1) * valid).sum(1)
    return (per_px.sum(1) / denom.clamp_min(1e-12)).mean()


def soft_dice_loss(logits: Tensor, target: Tensor, ignore_index: int = 255, include_background: bool = True,
                   smooth: float = 1.0) -> Tensor:
    """``1 - mean_k (2|P_k G_k| + s) / (|P_k| + |G_k| + s)`` per image (softmax probabilities), mean over images."""
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
    """Soft Jaccard index ``(|P G| + s) / (|P| + |G| - |P G| + s)``, per image and class, mean over both."""
    prob = logits.float().softmax(1)
    onehot, vmask = _valid_onehot(prob, target, ignore_index)
    prob = prob * vmask
    dims = tuple(range(2, prob.dim()))
    inter = (prob * onehot).sum(dims)
    union = prob.sum(dims) + onehot.sum(dims) - inter
    return ((inter + smooth) / (union + smooth)).mean()


def focal_loss(logits: Tensor, target: Tensor, ignore_index: int = 255, gamma: float = 2.0,
               alpha: Tensor | None = None) -> Tensor:
    """Multi-class focal loss (Lin et al.): ``-alpha_t (1 - p_t)^gamma log p_t``, mean over valid pixels per image."""
    logp = F.log_softmax(logits.float(), 1)
    valid = target != ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target)).long()
    logpt = logp.gather(1, safe.unsqueeze(1)).squeeze(1)
    pt = logpt.exp()
    loss = -((1 - pt) ** gamma) * logpt
    if alpha is not None:
        loss = loss * alpha.to(loss)[safe]
    b = loss.shape[0]
    v = valid.reshape(b, -1).float()
    return ((loss.reshape(b, -1) * v).sum(1) / v.sum(1).clamp_min(1)).mean()


def mse(pred: Tensor, target: Tensor) -> Tensor:
    return F.mse_loss(pred.float(), target.to(pred.device).float())
