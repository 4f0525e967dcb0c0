"""Sliding-window inference: run a model trained on crops over a whole image or volume.

A network trained on fixed-size crops (TDSNet's BraTS network: 19 x 144 x 144) is applied
at evaluation to windows of that size that tile the whole input; each voxel's logits are
the mean over the windows that cover it (equal weights). Windows advance by
``floor(window * (1 - overlap))`` voxels per axis (at least 1) and the last window of an
axis is placed flush with the end, so every voxel is covered; an axis shorter than the
window is zero-padded up to it and the padding cropped from the output.
"""

from __future__ import annotations

import itertools
from typing import Sequence

import torch
import torch.nn.functional as F


def window_starts(size: int, window: int, overlap: float) -> list[int]:
    """Start offsets of the windows along one axis of ``size`` voxels (``size >= window``)."""
    if window < 1 or size < window:
        raise ValueError(f"window_starts: need 1 <= window <= size, got window {window}, size {size}")
    if not 0 <= overlap < 1:
        raise ValueError(f"window overlap must be in [0, 1), got {overlap}")
    step = max(1, int(window * (1 - overlap)))
    starts = list(range(0, size - window + 1, step))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


class SlidingWindow(torch.nn.Module):
    """Wraps a model: ``forward(x)`` runs it on windows of ``window`` (spatial size, one per
    spatial axis of ``x``) and returns its :class:`ModelOutput` with ``seg`` (and ``approx``
    when the model has it) averaged over the windows at the input's size; the per-image
    heads (presence, scene, HOG) and side outputs are dropped (``None`` / empty), as
    evaluation reads the segmentation only.

    Args:
        model: returns a ``ModelOutput`` for ``(B, C, *window)`` inputs.
        window: spatial window size, e.g. ``(19, 144, 144)`` (D, H, W).
        overlap: fraction of a window shared with the next one along each axis, in [0, 1).
    """

    def __init__(self, model: torch.nn.Module, window: Sequence[int], overlap: float = 0.5):
        super().__init__()
        self.model = model
        self.window = tuple(int(w) for w in window)
        self.overlap = float(overlap)
        if any(w < 1 for w in self.window):
            raise ValueError(f"window sizes must be >= 1, got {self.window}")
        if not 0 <= self.overlap < 1:
            raise ValueError(f"window overlap must be in [0, 1), got {self.overlap}")

    def forward(self, x: torch.Tensor):
        spatial = tuple(x.shape[2:])
        if len(spatial) != len(self.window):
            raise ValueError(f"sliding window {self.window} has {len(self.window)} axes, the input "
                             f"{tuple(x.shape)} has {len(spatial)} spatial axes")
        padded = tuple(max(s, w) for s, w in zip(spatial, self.window))
        if padded != spatial:
            pad = []
            for s, p in zip(reversed(spatial), reversed(padded)):
                pad += [0, p - s]
            x = F.pad(x, pad)
        starts = [window_starts(s, w, self.overlap) for s, w in zip(padded, self.window)]
        sums: dict[str, torch.Tensor] = {}
        count = torch.zeros((1, 1) + padded, device=x.device, dtype=torch.float32)
        first = None
        for corner in itertools.product(*starts):
            sl = (slice(None), slice(None)) + tuple(slice(c, c + w) for c, w in zip(corner, self.window))
            out = self.model(x[sl])
            first = out if first is None else first
            for name in ("seg", "approx"):
                t = getattr(out, name)
                if t is None:
                    continue
                if name not in sums:
                    sums[name] = torch.zeros(t.shape[:2] + padded, device=t.device, dtype=torch.float32)
                sums[name][sl] += t.float()
            count[sl] += 1
        crop = (slice(None), slice(None)) + tuple(slice(0, s) for s in spatial)
        avg = {name: (t / count)[crop] for name, t in sums.items()}
        return first._replace(seg=avg["seg"], approx=avg.get("approx"), side=(), hog=(), presence=None, scene=None)
