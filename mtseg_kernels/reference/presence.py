"""Plain-PyTorch presence and sync loss: softmax (or sigmoid) over classes, then a reduction
over space, all in float64, with autograd from torch. Slow and memory-hungry (it keeps the
full probability tensor), obviously right: the oracle of ``mtseg_kernels.ops.presence``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F


def class_counts(labels: Tensor, num_classes: int, ignore_index: int = -100) -> Tensor:
    """``(B, K)`` int64 counts by a loop over classes; raises on labels outside ``[0, K)``."""
    flat = labels.reshape(labels.shape[0], -1).long()
    kept = flat != ignore_index
    bad = kept & ((flat < 0) | (flat >= num_classes))
    if bad.any():
        raise ValueError(f"label {flat[bad][0].item()} outside [0, {num_classes})")
    return torch.stack([((flat == k) & kept).sum(1) for k in range(num_classes)], dim=1)


def probabilities(input: Tensor, activation: str) -> Tensor:
    x = input.double()
    if activation == "softmax":
        return torch.softmax(x, dim=1)
    if activation == "sigmoid":
        return torch.sigmoid(x)
    return x


def soft_presence(
    input: Tensor,
    mode: str = "max",
    activation: str = "softmax",
    temperature: float = 0.1,
    threshold: float = 0.5,
    valid_mask: Tensor | None = None,
) -> Tensor:
    """``(B, K)`` float64 presence; same modes and conventions as the operator."""
    if mode == "argmax":
        return argmax_presence(input, valid_mask)
    p = probabilities(input, activation).flatten(2)
    if valid_mask is None:
        valid = torch.ones_like(p[:, :1], dtype=torch.bool)
    else:
        valid = valid_mask.reshape(p.shape[0], 1, -1)
    n = valid.sum(2).expand(p.shape[:2])
    empty = n == 0
    if mode == "max":
        # Above 1/2, max p = 1 - min (1 - p) with 1 - p formed exactly: near 1 (confident
        # networks) float64 p itself ties, and where the maximum is (and its gradient goes)
        # would be lost. Below 1/2, p itself is the precise quantity.
        c = complement(input, activation).flatten(2)
        by_p = torch.where(valid, p, torch.full_like(p, -torch.inf)).amax(2)
        by_c = 1 - torch.where(valid, c, torch.full_like(c, 2.0)).amin(2)
        out = torch.where(by_p > 0.5, by_c, by_p)
    elif mode == "noisy_or":
        out = -torch.expm1(torch.where(valid, torch.log1p(-p), torch.zeros_like(p)).sum(2))
    elif mode == "smooth_max":
        scaled = torch.where(valid, p / temperature, torch.full_like(p, -torch.inf))
        out = temperature * (torch.logsumexp(scaled, 2) - torch.log(n.clamp(min=1).double()))
    elif mode == "hard":
        out = ((p > threshold) & valid).any(2).double()
    else:
        raise ValueError(mode)
    return torch.where(empty, torch.zeros_like(out), out)


def argmax_presence(input: Tensor, valid_mask: Tensor | None = None) -> Tensor:
    """``(B, K)`` float64: 1 where class k wins numpy's arg-max over classes (first maximum,
    NaN counts as the largest) at some valid voxel: TDSNet's hard presence."""
    x = input.detach().double().cpu().numpy()
    B, K = x.shape[:2]
    winners = np.argmax(x, axis=1).reshape(B, -1)
    valid = np.ones_like(winners, dtype=bool) if valid_mask is None else valid_mask.cpu().numpy().reshape(B, -1)
    out = np.zeros((B, K))
    for b in range(B):
        out[b, np.unique(winners[b][valid[b]])] = 1.0
    return torch.from_numpy(out)


def complement(input: Tensor, activation: str) -> Tensor:
    """``1 - p`` per class and voxel without cancellation, float64: for softmax the sum of
    the other classes' probabilities, for sigmoid ``sigmoid(-z)``."""
    x = input.double()
    if activation == "softmax":
        p = torch.softmax(x, dim=1)
        others = 1 - torch.eye(p.shape[1], dtype=p.dtype).reshape(1, p.shape[1], p.shape[1], *([1] * (p.dim() - 2)))
        return (p.unsqueeze(1) * others).sum(2)  # [b, k] = sum over j != k of p_j
    if activation == "sigmoid":
        return torch.sigmoid(-x)
    return 1 - x


def presence_log_complement(
    input: Tensor, mode: str, activation: str = "softmax", temperature: float = 0.1, valid_mask: Tensor | None = None
) -> Tensor:
    """``log(1 - soft_presence)`` of max and noisy-or from the per-voxel complements (exact
    where the presence is within rounding of 1); ``log1p(-presence)`` for the other modes."""
    c = complement(input, activation).flatten(2)
    valid = torch.ones_like(c[:, :1], dtype=torch.bool) if valid_mask is None else valid_mask.reshape(c.shape[0], 1, -1)
    if mode == "max":  # 1 - max p = min (1 - p)
        out = torch.where(valid, c, torch.full_like(c, 2.0)).amin(2)
        return torch.log(torch.where(out > 1, torch.ones_like(out), out))
    if mode == "noisy_or":  # prod (1 - p)
        return torch.where(valid, torch.log(c), torch.zeros_like(c)).sum(2)
    return torch.log1p(-soft_presence(input, mode, activation, temperature, 0.5, valid_mask))


def _bce_log(x: Tensor, exact_log: Tensor) -> Tensor:
    """Value max(exact_log, -100), gradient 1 / max(exp(exact_log), 1e-12): torch's BCE clamps."""
    slope = 1 / torch.exp(exact_log).clamp_min(1e-12)
    return exact_log.clamp_min(-100).detach() + (x - x.detach()) * slope.detach()


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
    """The sync loss written out in float64: ``F.binary_cross_entropy_with_logits`` for the
    class side; for the segmentation side ``-(t log q + (1 - t) log(1 - q))`` with
    ``log(1 - q)`` from :func:`presence_log_complement`, logs clamped at -100 and their
    gradients at 1e12 as torch's BCE clamps them."""
    seg = seg_logits if direction != "seg_to_class" else seg_logits.detach()
    q = soft_presence(seg, mode, activation, temperature, threshold, valid_mask)
    c = class_logits.double()
    w = None if weight is None else weight.double().unsqueeze(0)
    loss = torch.zeros_like(q)
    if direction in ("seg_to_class", "both"):
        loss = loss + F.binary_cross_entropy_with_logits(c, q.detach(), weight=w, reduction="none")
    if direction in ("class_to_seg", "both"):
        t = torch.sigmoid(c).detach()
        log_c = presence_log_complement(seg.detach(), mode, activation, temperature, valid_mask)
        term = -(t * _bce_log(q, torch.log(q.detach())) + (1 - t) * _bce_log(1 - q, log_c))
        loss = loss + (term if w is None else term * w)
    return {"mean": loss.mean, "sum": loss.sum, "none": lambda: loss}[reduction]()
