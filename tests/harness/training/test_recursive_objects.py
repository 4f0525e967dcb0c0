"""The object metrics of the recursive method are computed on the instances it grows
(``grow_instances``), not on connected components rebuilt from its labels."""

import math

import pytest
import torch

from mtseg_harness.data import ObjectMetrics
from mtseg_harness.evaluation import evaluate
from mtseg_harness.evaluation.evaluate import split_segmentation
from mtseg_harness.methods import create_method
from mtseg_harness.models import ModelOutput


class _Fixed(torch.nn.Module):
    """Returns fixed logits: the whole 10 x 20 image is foreground; the approximation
    output holds two seeds of class 1, one in each half."""

    def forward(self, x):
        b = x.shape[0]
        seg = torch.zeros(b, 2, 10, 20)
        seg[:, 1] = 1.0
        approx = torch.zeros(b, 2, 10, 20)
        approx[:, 0] = 1.0
        approx[:, 1, 4:6, 4:6] = 2.0    # seed A: columns 4-5
        approx[:, 1, 4:6, 14:16] = 2.0  # seed B: columns 14-15
        return ModelOutput(seg=seg, side=(), hog=(), presence=None, scene=None, approx=approx)


def _batch():
    inst = torch.zeros(1, 10, 20, dtype=torch.long)
    inst[0, :, :10] = 1   # two touching glands, 100 px each
    inst[0, :, 10:] = 2
    return {"image": torch.zeros(1, 3, 10, 20), "mask": (inst > 0).long(), "instances": inst, "case_id": ["a"]}


def _run(final_growth):
    m = create_method("recursive_approx", 2, lam_eval=1e6, final_growth=final_growth)
    table, _, _ = evaluate(_Fixed(), m.segment, [_batch()], "cpu", num_classes=2, ignore_index=255, hd=False,
                           pad_multiple=1, extra_metrics=(ObjectMetrics(connectivity=8),))
    return table.iloc[0]


def test_object_metrics_use_the_grown_instances():
    # The nearest-seed cut between columns 5 and 14 falls between columns 9 and 10, so the
    # two grown objects are the two glands: object Dice 1, object Hausdorff 0.
    row = _run(final_growth=True)
    assert row["object_dice"] == 1.0
    assert row["object_hausdorff"] == 0.0
    assert row["dice_1"] == 1.0


def test_connected_components_would_merge_the_touching_glands():
    # Without the final growth the labels' single component (200 px) is the one object:
    # every Dice term is 2 * 100 / (100 + 200) = 2/3; every Hausdorff term 10 px.
    row = _run(final_growth=False)
    assert row["object_dice"] == pytest.approx(2 / 3)
    assert row["object_hausdorff"] == pytest.approx(10.0)


def test_segment_returns_labels_and_instances():
    m = create_method("recursive_approx", 2, lam_eval=1e6)
    labels, inst = m.segment(_Fixed(), torch.zeros(1, 3, 10, 20))
    assert torch.equal(labels, torch.ones(1, 10, 20, dtype=torch.long))
    assert len(inst.unique()) == 2 and (inst > 0).all()
    assert (inst[0, :, :10] == inst[0, 0, 0]).all() and (inst[0, :, 10:] == inst[0, 0, 19]).all()


def test_an_image_without_seed_keeps_its_segmentation_and_its_components():
    class NoSeed(_Fixed):
        def forward(self, x):
            out = super().forward(x)
            out.approx[:, 1] = -1.0
            return out

    m = create_method("recursive_approx", 2, lam_eval=1e6)
    labels, inst = m.segment(NoSeed(), torch.zeros(1, 3, 10, 20))
    assert torch.equal(labels, torch.ones(1, 10, 20, dtype=torch.long))
    assert torch.equal(inst, torch.ones(1, 10, 20, dtype=torch.long))


def test_split_segmentation_checks_shapes():
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    assert split_segmentation(labels)[1] is None
    with pytest.raises(ValueError, match="instances of shape"):
        split_segmentation((labels, torch.zeros(1, 4, 5, dtype=torch.long)))
    assert not math.isnan(float(split_segmentation((labels, labels))[1].sum()))
