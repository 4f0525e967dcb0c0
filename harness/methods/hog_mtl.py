"""HOG-MTL (Bhattarai et al., MICCAI-W 2021 / MedIA 2023): regress the HOG of the input.

Targets are ``mtseg_kernels.hog_pseudo_label`` of the *augmented* image, computed on the
device inside the step: resized to 128 x 64, 6 orientations, 2 x 2 blocks, L2-Hys, with
16 x 16 cells (504 values, the default), 12 x 12 (864) or 8 x 8 (2520) by ``dim``; the
model's HOG heads are built with the same length (:meth:`HOGMTL.heads`).
Loss, summed over all heads: ``alpha * sum_o CE(o) + beta * sum_h MSE(h, HOG)`` -- UNet:
one CE and one HOG head at the bottleneck; U2Net: seven CE terms (fused + six side
outputs) and six HOG heads (one per decoder stage). Defaults: alpha = beta = 1; Adam, lr
2e-4, halved every 50k of 150k iterations (``config_defaults``, overridden by the user's
config). Where each value comes from (paper, the authors' code, or our choice) is listed
in ``docs/fidelity/hogmtl.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import NonNegativeFloat

import mtseg_kernels

from ..models.heads import DEFAULT_HOG_DIM, Heads, HOGHeadSpec
from . import losses
from .base import Method, SegLoss, register_method

#: HOG lengths with a preset (``mtseg_kernels.HOG_MTL_PRESETS``)
HOGDim = Literal[tuple(sorted(mtseg_kernels.HOG_MTL_PRESETS))]


@register_method("hog_mtl", "hog")
class HOGMTL(Method):
    @dataclass
    class Options:
        alpha: NonNegativeFloat = 1.0
        beta: NonNegativeFloat = 1.0
        dim: HOGDim = DEFAULT_HOG_DIM
        seg_loss: SegLoss = "ce"
    config_defaults = {
        "optim": {"name": "adam", "lr": 2e-4},
        "sched": {"name": "step", "step_size": 50_000, "gamma": 0.5},
        "train": {"steps": 150_000},
    }

    def heads(self):
        return Heads(hog=HOGHeadSpec(dim=int(self.options["dim"])))

    def targets(self, batch):
        batch["hog"] = mtseg_kernels.hog_pseudo_label(batch["image"].float(), dim=int(self.options["dim"]))
        return batch

    def loss(self, out, batch, step, total_steps):
        seg, logs = self.seg_loss(out, batch["mask"], self.options["seg_loss"])
        if not out.hog:
            raise ValueError("hog_mtl: the model has no HOG head (build it with the method's heads())")
        dim = int(self.options["dim"])
        for h in out.hog:
            if h.shape[-1] != dim:
                raise ValueError(f"hog_mtl: a HOG head predicts {h.shape[-1]} values but method.dim is {dim}; "
                                 f"the head's length follows method.dim (drop model.heads.hog.dim)")
        hog = sum(losses.mse(h, batch["hog"]) for h in out.hog)
        logs["hog"] = float(hog.detach())
        return self.options["alpha"] * seg + self.options["beta"] * hog, logs
