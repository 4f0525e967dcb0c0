"""CMU-Net's loss, PU-Net's pre-training phase and the U-Net baseline's Dice loss, against hand-computed values.

The batch (K = 2, two images of 1 x 2 pixels):

* image 1: mask [1, 1] (the organ is there); segmentation logits per pixel [0, 0] and
  [0, ln 3], i.e. p = (1/2, 1/2) and (1/4, 3/4); class logit 0 (q = 1/2).
  Dice per class (smoothing 1): background (0 + 1) / (3/4 + 0 + 1) = 4/7,
  organ (2 * 5/4 + 1) / (5/4 + 2 + 1) = 14/17.
* image 2: mask [0, 0] (no organ); logits [0, 0] at both pixels, p = (1/2, 1/2);
  class logit ln 3 (q = 3/4). Dice: background (2 + 1) / (1 + 2 + 1) = 3/4, organ 1/2.

Soft Dice loss = 1 - (4/7 + 14/17 + 3/4 + 1/2) / 4.
Focal (gamma 2) with weights pos / neg, mean over the two images:
image 1: -pos (1 - 1/2)^2 ln(1/2) = pos ln2 / 4; image 2: -neg (3/4)^2 ln(1/4) = neg 9 ln2 / 8.
"""

import math

import pytest
import torch

from mtseg_harness.methods import create_method
from mtseg_harness.models import ModelOutput

LN2, LN3 = math.log(2), math.log(3)
DICE = 1 - (4 / 7 + 14 / 17 + 3 / 4 + 1 / 2) / 4


def focal(pos, neg):
    return (pos * LN2 / 4 + neg * 9 * LN2 / 8) / 2


def _batch(requires_grad=False):
    seg = torch.zeros(2, 2, 1, 2, dtype=torch.float64)
    seg[0, 1, 0, 1] = LN3
    seg.requires_grad_(requires_grad)
    presence = torch.tensor([[5.0, 0.0], [-7.0, LN3]], dtype=torch.float64)  # background logits unused
    mask = torch.tensor([[[1, 1]], [[0, 0]]])
    out = ModelOutput(seg=seg, side=(), hog=(), presence=presence, scene=None, approx=None)
    return out, {"mask": mask}


def test_cmunet_loss_is_half_dice_plus_half_focal_with_weights_08_02():
    m = create_method("cmunet", 2)
    out, batch = _batch()
    batch = m.targets(batch)
    assert batch["presence"][:, 1].tolist() == [1.0, 0.0]
    loss, logs = m.loss(out, batch, 0, 10)
    expected = 0.5 * DICE + 0.5 * focal(0.8, 0.2)
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert logs["dice"] == pytest.approx(DICE, rel=1e-6) and logs["cls"] == pytest.approx(focal(0.8, 0.2), rel=1e-6)
    # the weights are not symmetric here: swapping them changes the value
    assert abs(focal(0.2, 0.8) - focal(0.8, 0.2)) > 0.1


def test_pretrain_phase_is_the_classification_focal_alone_and_leaves_the_decoder_untouched():
    m = create_method("cmunet", 2, phase="pretrain", focal_pos=0.5, focal_neg=0.5)
    out, batch = _batch(requires_grad=True)
    loss, logs = m.loss(out, m.targets(batch), 0, 10)
    assert float(loss.detach()) == pytest.approx(focal(0.5, 0.5), rel=1e-6)
    assert "dice" not in logs
    loss.backward()
    assert torch.count_nonzero(out.seg.grad) == 0


def test_unet_baseline_dice_only():
    m = create_method("baseline", 2, loss="dice")
    out, batch = _batch()
    loss, _ = m.loss(out, batch, 0, 10)
    assert float(loss) == pytest.approx(DICE, rel=1e-6)


def test_ignored_pixels_count_neither_in_dice_nor_in_the_slice_label():
    """Image 2 with its pixels ignored: its organ label stays 0, its Dice terms are both 1 (loss 0 for it)."""
    m = create_method("cmunet", 2, ignore_index=255)
    out, batch = _batch()
    batch["mask"] = torch.tensor([[[1, 1]], [[255, 255]]])
    batch = m.targets(batch)
    assert batch["presence"][:, 1].tolist() == [1.0, 0.0]
    loss, logs = m.loss(out, batch, 0, 10)
    dice = 1 - (4 / 7 + 14 / 17 + 1 + 1) / 4
    assert logs["dice"] == pytest.approx(dice, rel=1e-6)
