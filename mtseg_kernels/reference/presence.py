"""Plain-PyTorch presence and sync loss: softmax (or sigmoid) over classes, then a reduction
over space, all in float64, with autograd from torch. Slow and memory-hungry (it keeps the
full probability tensor), obviously right: the oracle of ``mtseg_kernels.ops.presence``.
"""

from __future__ import annotations

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
    p = probabilities(input, activation).flatten(2)
    if valid_mask is None:
        valid = torch.ones_like(p[:, :1], dtype=torch.bool)
    else:
        valid = valid_mask.reshape(p.shape[0], 1, -1)
    n = valid.sum(2).expand(p.shape[:2])
    empty = n == 0
    if mode == "max":
        out = torch.where(valid, p, torch.full_like(p, -1.0)).amax(2)
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
    """The sync loss written out with ``F.binary_cross_entropy(_with_logits)``, in float64."""
    seg = seg_logits if direction != "seg_to_class" else seg_logits.detach()
    q = soft_presence(seg, mode, activation, temperature, threshold, valid_mask)
    c = class_logits.double()
    w = None if weight is None else weight.double().unsqueeze(0)
    loss = torch.zeros_like(q)
    if direction in ("seg_to_class", "both"):
        loss = loss + F.binary_cross_entropy_with_logits(c, q.detach(), weight=w, reduction="none")
    if direction in ("class_to_seg", "both"):
        loss = loss + F.binary_cross_entropy(q, torch.sigmoid(c).detach(), weight=w, reduction="none")
    return {"mean": loss.mean, "sum": loss.sum, "none": lambda: loss}[reduction]()
