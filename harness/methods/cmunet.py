"""CMU-Net (Moseley et al.): context-aware multitasking with organ presence.

Segmentation loss ``0.5 * Dice + 0.5 * focal`` (focal gamma 2 with per-class weights
``focal_alpha``; default: background 0.25, every other class 0.75 -- our choice in
Lin et al.'s convention, set the paper's table values in the config), plus BCE of the
encoder classification head against the image-level presence ``C = max(Y)``
(``mtseg_kernels.presence_from_labels``) with weight ``w_cls``.

Encoder-pretraining variant (``pretrain_steps > 0``): for the first ``pretrain_steps``
steps only the classification loss trains (encoder + classifier), then the full loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Optional

import torch
import torch.nn.functional as F
from pydantic import Field, NonNegativeFloat, NonNegativeInt

import mtseg_kernels

from ..models.heads import Heads, PresenceHeadSpec
from . import losses
from .base import Method, register_method


@register_method("cmunet", "cmu")
class CMUNet(Method):
    @dataclass
    class Options:
        w_dice: NonNegativeFloat = 0.5
        w_focal: NonNegativeFloat = 0.5
        w_cls: NonNegativeFloat = 1.0
        focal_gamma: NonNegativeFloat = 2.0
        #: one weight per class (default: background 0.25, others 0.75)
        focal_alpha: Optional[list[Annotated[float, Field(ge=0, le=1)]]] = None
        pretrain_steps: NonNegativeInt = 0

    def heads(self):
        return Heads(presence=PresenceHeadSpec())

    def _alpha(self, device):
        a = self.options["focal_alpha"]
        if a is None:
            a = [0.25] + [0.75] * (self.num_classes - 1)
        if len(a) != self.num_classes:
            raise ValueError(f"cmunet: focal_alpha needs {self.num_classes} values, got {a}")
        return torch.tensor(a, dtype=torch.float32, device=device)

    def targets(self, batch):
        batch["presence"] = mtseg_kernels.presence_from_labels(batch["mask"], self.num_classes, self.ignore_index)
        return batch

    def loss(self, out, batch, step, total_steps):
        o = self.options
        cls = F.binary_cross_entropy_with_logits(out.presence.float(), batch["presence"].float())
        logs = {"cls": float(cls.detach())}
        if step < o["pretrain_steps"]:
            logs["stage"] = 0
            # keep every parameter in the graph (DDP), with zero weight on the decoder
            return o["w_cls"] * cls + 0.0 * out.seg.sum(), logs
        mask = batch["mask"]
        total = 0.0
        for logits in (out.seg,) + tuple(out.side):
            dice = losses.soft_dice_loss(logits, mask, self.ignore_index)
            focal = losses.focal_loss(logits, mask, self.ignore_index, o["focal_gamma"], self._alpha(logits.device))
            total = total + o["w_dice"] * dice + o["w_focal"] * focal
        logs.update(stage=1, dice=float(dice.detach()), focal=float(focal.detach()))
        return total + o["w_cls"] * cls, logs
