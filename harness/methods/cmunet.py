"""CMU-Net (Moseley et al.): a U-Net whose encoder also classifies the slice (organ present or not).

Loss (``phase: joint``, CMU-Net)::

    total = w_dice * Dice(segmentation) + w_cls * focal(classification head)

with ``w_dice = w_cls = 0.5``: soft Dice of the segmentation logits
(:func:`~.losses.soft_dice_loss`) and the sigmoid focal loss of the encoder's class head
(:func:`~.losses.binary_focal_loss`, weight ``focal_pos`` on positive slices, ``focal_neg``
on negative ones: 0.8 / 0.2). Nothing else: no pixel focal term, no third weight.

``phase: pretrain`` is the first phase of PU-Net (the pre-trained U-Net): the encoder and
its classifier learn the slice classification alone (the focal term, weights 0.5 / 0.5 in
``configs/lits_punet_pretrain.yaml``); the decoder gets no gradient. The second phase is a
plain U-Net trained on Dice alone (method ``baseline``, ``loss: dice``) from that encoder
(``model.init_from``).

The class label of a slice is the image-level presence ``C = max(Y)`` of each foreground
class (``mtseg_kernels.presence_from_labels``, columns ``1..K-1``; background, present in
every slice, is not a label); for LiTS liver (K = 2) that is one label, "the liver is in
this slice". The presence head's background logit is not used. Values and their sources:
``docs/fidelity/cmunet.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from pydantic import Field, NonNegativeFloat

import mtseg_kernels

from ..models.heads import Heads, PresenceHeadSpec
from . import losses
from .base import Method, register_method

Weight = Annotated[float, Field(ge=0, le=1)]


@register_method("cmunet", "cmu")
class CMUNet(Method):
    @dataclass
    class Options:
        w_dice: NonNegativeFloat = 0.5
        w_cls: NonNegativeFloat = 0.5
        focal_gamma: NonNegativeFloat = 2.0
        #: weight of the focal terms of positive slices (the organ is there) / of negative slices
        focal_pos: Weight = 0.8
        focal_neg: Weight = 0.2
        #: ``joint``: CMU-Net's loss; ``pretrain``: the classification term alone (PU-Net, phase 1)
        phase: Literal["joint", "pretrain"] = "joint"

    def heads(self):
        return Heads(presence=PresenceHeadSpec())

    def targets(self, batch):
        batch["presence"] = mtseg_kernels.presence_from_labels(batch["mask"], self.num_classes, self.ignore_index)
        return batch

    def classification_loss(self, presence_logits: torch.Tensor, presence: torch.Tensor) -> torch.Tensor:
        """Focal loss of the foreground classes' slice labels: logits and presence ``(B, K)``."""
        o = self.options
        return losses.binary_focal_loss(presence_logits[:, 1:].float(), presence[:, 1:].float(), o["focal_gamma"],
                                        pos_weight=o["focal_pos"], neg_weight=o["focal_neg"])

    def loss(self, out, batch, step, total_steps):
        o = self.options
        cls = self.classification_loss(out.presence, batch["presence"])
        logs = {"cls": float(cls.detach())}
        if o["phase"] == "pretrain":
            # every parameter stays in the graph (DDP), the decoder with weight 0: it learns nothing
            return cls + 0.0 * out.seg.sum(), logs
        dice = 0.0
        for logits in (out.seg,) + tuple(out.side):  # one output for the UNet family
            dice = dice + losses.soft_dice_loss(logits, batch["mask"], self.ignore_index)
        logs["dice"] = float(dice.detach())
        return o["w_dice"] * dice + o["w_cls"] * cls, logs
