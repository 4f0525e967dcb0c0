"""TDSNet's sync term uses the arg-max presence of the segmentation (hand-computed values)."""

from __future__ import annotations

import math

import pytest
import torch

from mtseg_harness.methods import create_method
from mtseg_harness.models import ModelOutput

IGNORE = 255


def _out(seg, cls):
    return ModelOutput(seg=seg, side=(), hog=(), presence=cls, scene=None, approx=None)


def _sp(x):  # softplus, by hand: BCE(logit c, y=1) = log(1 + e^-c), BCE(c, y=0) = log(1 + e^c)
    return math.log1p(math.exp(x))


# One image, 1 x 2 pixels, 3 classes.
# pixel 0: logits (0.5, 0.4, 0.0): class 0 wins with p = e^.5 / (e^.5 + e^.4 + 1) = 0.378 < 0.5
# pixel 1: logits (0, 0, 3):       class 2 wins with p = e^3 / (e^3 + 2) = 0.909
SEG = torch.tensor([[0.5, 0.0], [0.4, 0.0], [0.0, 3.0]]).view(1, 3, 1, 2)
CLS = torch.tensor([[1.0, -2.0, 0.5]])


@pytest.mark.parametrize("mode,mask,presence", [
    # arg-max map holds classes 0 and 2 -> presence (1, 0, 1)
    ("argmax", [[0, 2]], (1, 0, 1)),
    # p > 0.5 only at pixel 1 (class 2) -> (0, 0, 1): the authors' code's rule
    ("hard", [[0, 2]], (0, 0, 1)),
    # pixel 1 ignored: only pixel 0 counts -> (1, 0, 0)
    ("argmax", [[0, IGNORE]], (1, 0, 0)),
])
def test_sync_term_against_hand_computed_bce(mode, mask, presence):
    m = create_method("tdsnet", 3, w_cls=1.0, w_sync=0.5, **({} if mode == "argmax" else {"sync_mode": mode}))
    batch = m.targets({"mask": torch.tensor([mask])})
    out = _out(SEG, CLS)
    l1, _ = m.loss(out, batch, 0, 3)  # stage 1: no sync
    l2, logs = m.loss(out, batch, 1, 3)  # stage 2: + w_sync * sync
    c = CLS[0].tolist()
    expected = sum(_sp(-ci) if y else _sp(ci) for ci, y in zip(c, presence)) / 3
    assert logs["stage"] == 2
    assert logs["sync"] == pytest.approx(expected, rel=1e-5)
    assert (l2 - l1).item() == pytest.approx(0.5 * expected, rel=1e-5)


def test_default_sync_presence_is_the_argmax_map():
    m = create_method("tdsnet", 3)
    assert m.options["sync_mode"] == "argmax" and m.options["sync_direction"] == "seg_to_class"
    # presence (1, 0, 1): (log(1+e^-1) + log(1+e^-2) + log(1+e^-.5)) / 3 = 0.3048; p > 0.5 would give 0.638
    batch = m.targets({"mask": torch.tensor([[[0, 2]]])})
    _, logs = m.loss(_out(SEG, CLS), batch, 2, 3)
    assert logs["sync"] == pytest.approx(0.30476, abs=1e-4)
