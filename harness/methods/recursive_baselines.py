"""The baselines the recursive-approximation paper (Ke et al., IEEE TIP 2021) compares with.

* ``sl_only``: the segmentation network trained on the strongly labelled images alone
  (the same images :class:`~.recursive.RecursiveApprox` keeps strong: same ``seed``,
  ``strong_fraction`` / ``strong_count``, :func:`~mtseg_harness.data.strong_indices`).
* ``grabcut_pseudo``: the network trained on the strong images' masks plus pseudo-labels
  of the weak images made once from their weak labels with OpenCV's GrabCut
  (:func:`grabcut_labels`); a label-propagation baseline without learning in the loop.

How the GrabCut mask is initialised from a weak label is our choice (the weak region is
sure foreground; a band around it probable foreground; the rest probable background);
see :func:`grabcut_labels`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Optional

import cv2
import numpy as np
import torch
from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveInt
from scipy import ndimage

from ..data import DatasetWrapper, WeakLabels, strong_indices
from .base import Method, SegLoss, register_method


def _grabcut_image(image) -> np.ndarray:
    """``(C, H, W)`` float image in [0, 1] (or any range: min-max scaled) -> ``(H, W, 3)`` uint8."""
    x = image.detach().cpu().float().numpy() if isinstance(image, torch.Tensor) else np.asarray(image, np.float32)
    if x.ndim != 3:
        raise ValueError(f"grabcut_labels: expected a (C, H, W) 2D image, got shape {tuple(x.shape)}")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > 1:
        x = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
    x = np.clip(np.rint(x * 255), 0, 255).astype(np.uint8)
    c = x.shape[0]
    x = np.repeat(x, 3, axis=0) if c == 1 else x[:3] if c >= 3 else np.concatenate([x, x[:1]], axis=0)
    return np.ascontiguousarray(x.transpose(1, 2, 0))


def grabcut_init(fg: np.ndarray, margin: float) -> tuple[np.ndarray, tuple]:
    """GrabCut's initial mask for a weak foreground ``fg`` (bool ``(H, W)``, not empty):
    ``cv2.GC_FGD`` on ``fg``; ``cv2.GC_PR_FGD`` within ``margin`` x r of a connected weak
    region, r = sqrt(area / pi) of that region (the band is measured from the nearest weak
    pixel); ``cv2.GC_PR_BGD`` elsewhere. Also returns the index arrays of each pixel's
    nearest weak pixel."""
    regions, n = ndimage.label(fg)
    radius = np.sqrt(np.bincount(regions.ravel(), minlength=n + 1)[1:] / math.pi)
    dist, nearest = ndimage.distance_transform_edt(~fg, return_indices=True)
    near = tuple(nearest)
    gc = np.full(fg.shape, cv2.GC_PR_BGD, np.uint8)
    gc[dist <= margin * radius[regions[near] - 1]] = cv2.GC_PR_FGD
    gc[fg] = cv2.GC_FGD
    return gc, near


def grabcut_labels(image, weak, *, iterations: int = 5, margin: float = 1.0, max_side: int | None = 256,
                   background: int = 0, ignore_index: int = 255, seed: int = 0) -> torch.Tensor:
    """Pseudo-label of one image from its weak label with OpenCV's GrabCut.

    Initial GrabCut mask: the weak region (every non-background class) is sure
    foreground; pixels within ``margin`` x r of a weak region, r the radius of the disk of
    that region's area (per connected region), are probable foreground; every other
    pixel is probable background. After ``iterations`` GrabCut rounds, each foreground
    pixel takes the class of the nearest weak pixel; pixels ignored in ``weak`` stay
    ``ignore_index``. Without a weak region the label is all background; without a
    probable-background pixel GrabCut cannot fit its background model and the initial
    foreground (weak region + band) is returned. GrabCut's graph cut costs seconds to
    minutes per image at full HC18/GlaS size on a loaded CPU, so it runs on a copy whose
    longer side is ``max_side`` (area-averaged image; a weak region never vanishes) and its
    result is scaled back (nearest); the weak region stays sure foreground at full size.
    ``max_side=None`` runs at full size.

    Args:
        image: ``(C, H, W)`` tensor (grey images are repeated to 3 channels).
        weak: ``(H, W)`` class map.
        seed: OpenCV's RNG seed (GrabCut's k-means), for a reproducible result.
    Returns ``(H, W)`` int64 class map.
    """
    w = weak.cpu().numpy() if isinstance(weak, torch.Tensor) else np.asarray(weak)
    img = _grabcut_image(image)
    if img.shape[:2] != w.shape:
        raise ValueError(f"grabcut_labels: image {img.shape[:2]} and weak label {w.shape} differ in size")
    if iterations < 1 or margin < 0:
        raise ValueError(f"grabcut_labels: iterations must be >= 1 and margin >= 0, got {iterations}, {margin}")
    ignored = w == ignore_index
    fg = (w != background) & ~ignored
    out = np.full(w.shape, background, np.int64)
    out[ignored] = ignore_index
    if not fg.any():
        return torch.from_numpy(out)
    _, nearest = ndimage.distance_transform_edt(~fg, return_indices=True)
    near = tuple(nearest)
    h, w_ = fg.shape
    scale = 1.0 if max_side is None or max(h, w_) <= max_side else max_side / max(h, w_)
    if scale < 1:
        size = (max(int(round(w_ * scale)), 1), max(int(round(h * scale)), 1))  # OpenCV: (width, height)
        img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
        small_fg = cv2.resize(fg.astype(np.float32), size, interpolation=cv2.INTER_AREA) > 0
    else:
        small_fg = fg
    gc, _ = grabcut_init(small_fg, margin)
    if (gc == cv2.GC_PR_BGD).sum() >= 2:
        cv2.setRNGSeed(int(seed))
        bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
        cv2.grabCut(img, gc, None, bgd, fgd, int(iterations), cv2.GC_INIT_WITH_MASK)
    found = (gc == cv2.GC_FGD) | (gc == cv2.GC_PR_FGD)
    if scale < 1:
        found = cv2.resize(found.astype(np.uint8), (w_, h), interpolation=cv2.INTER_NEAREST) > 0
    found = (found | fg) & ~ignored
    out[found] = w[near][found]
    return torch.from_numpy(out)


class _StrongOnly(DatasetWrapper):
    """The strongly labelled images of a training set, in their original order."""

    def __init__(self, dataset, strong: set[int]):
        super().__init__(dataset)
        self.indices = sorted(strong)
        if not self.indices:
            raise ValueError("sl_only: no strongly labelled image (strong_fraction / strong_count select none)")

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, index):
        return self.dataset[self.indices[index]]


class _GrabCutMasks(DatasetWrapper):
    """Weak images get their GrabCut pseudo-label as ``mask``; strong images keep theirs.

    A pseudo-label is computed on a sample's first read and kept (uint8 where the labels
    fit), so every epoch sees the same label; each loader worker keeps its own copy.
    """

    def __init__(self, weak_labels: WeakLabels, iterations: int, margin: float, max_side: int | None = 256):
        super().__init__(weak_labels)
        self.strong = weak_labels.strong
        self.iterations, self.margin, self.max_side = int(iterations), float(margin), max_side
        self.cache: dict[int, np.ndarray] = {}

    def __getitem__(self, index):
        sample = self.dataset[index]
        if sample is None or sample["strong"]:
            return sample
        if index not in self.cache:
            label = grabcut_labels(sample["image"], sample["weak"], iterations=self.iterations, margin=self.margin,
                                   max_side=self.max_side, ignore_index=self.dataset.ignore_index, seed=index)
            a = label.numpy()
            self.cache[index] = a.astype(np.uint8) if a.max(initial=0) <= 255 else a.astype(np.int32)
        sample["mask"] = torch.from_numpy(self.cache[index].astype(np.int64))
        return sample


@dataclass
class _StrongSplitOptions:
    """The options both baselines share: which images are strong (as in ``recursive_approx``) and the loss."""

    strong_fraction: Annotated[float, Field(ge=0, le=1)] = 0.1
    strong_count: Optional[NonNegativeInt] = None
    loss: SegLoss = "ce"


class _StrongSplitBaseline(Method):
    """A segmentation loss on ``batch["mask"]`` (strong masks, or what a baseline puts in their place)."""

    Options = _StrongSplitOptions

    def loss(self, out, batch, step, total_steps):
        return self.seg_loss(out, batch["mask"], self.options["loss"])


@register_method("sl_only")
class StrongOnly(_StrongSplitBaseline):
    """Supervised learning on the strong images alone (the paper's "SL only" comparison)."""

    def wrap_dataset(self, dataset, split):
        if split != "train":
            return dataset
        return _StrongOnly(dataset, strong_indices(len(dataset), self.options["strong_fraction"],
                                                   self.options["strong_count"]))


@register_method("grabcut_pseudo")
class GrabCutPseudo(_StrongSplitBaseline):
    """Strong masks + GrabCut pseudo-labels of the weak images (a pseudo-label baseline)."""

    @dataclass
    class Options(_StrongSplitOptions):
        grabcut_iterations: PositiveInt = 5
        grabcut_margin: NonNegativeFloat = 1.0
        #: GrabCut runs on a copy with this longer side (0 = full size)
        grabcut_max_side: NonNegativeInt = 256
        shrink_ratio: Annotated[float, Field(gt=0, le=1)] = 0.3
        jitter: NonNegativeFloat = 0.3
        smoothness: NonNegativeFloat = 0.15
        weak_dir: Optional[str] = None

    def wrap_dataset(self, dataset, split):
        if split != "train":
            return dataset
        o = self.options
        weak = WeakLabels(dataset, shrink_ratio=o["shrink_ratio"], jitter=o["jitter"], smoothness=o["smoothness"],
                          weak_dir=o["weak_dir"], strong_fraction=o["strong_fraction"], strong_count=o["strong_count"])
        return _GrabCutMasks(weak, o["grabcut_iterations"], o["grabcut_margin"], o["grabcut_max_side"] or None)
