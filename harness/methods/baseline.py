"""Single-task segmentation: cross-entropy, Dice + cross-entropy (equal weights), or Dice alone.

Over U2Net's fused and six side outputs the loss is summed (seven terms), as in Qin et al.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import Method, SegLoss, register_method


@register_method("baseline")
class Baseline(Method):
    @dataclass
    class Options:
        loss: SegLoss = "ce"

    def loss(self, out, batch, step, total_steps):
        loss, logs = self.seg_loss(out, batch["mask"], self.options["loss"])
        return loss, logs
