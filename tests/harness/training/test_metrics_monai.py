"""The harness's evaluation metrics against MONAI itself (a pinned test dependency), same inputs.

MONAI gets one-hot masks with the ignored pixels removed from both (MONAI's own
``ignore_index`` reads label maps differently, so the removal is done before either sees
them). Every convention that differs is asserted here and listed in
``harness/evaluation/metrics.py`` and docs/testing.md:

* Dice/IoU of a class present only in the prediction: 0 here; MONAI's default
  (``ignore_empty=True``) NaN; with ``ignore_empty=False`` MONAI gives 0 too;
* Dice/IoU of a class in neither mask: NaN here; MONAI NaN by default, 1 with
  ``ignore_empty=False``;
* percentile Hausdorff with exactly one mask empty: inf here, NaN in MONAI (HD and ASSD:
  inf in both);
* ASSD is symmetric here (MONAI: ``symmetric=True``, not its default).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

monai_metrics = pytest.importorskip("monai.metrics")

from mtseg_harness.evaluation import metrics as M  # noqa: E402

K = 4
pytestmark = pytest.mark.filterwarnings("ignore:the (prediction|ground truth) of class:UserWarning")


def _case():
    """Label maps (3, 40, 44) with ignored pixels; class 3 only in image 0's prediction, class 2 in
    neither mask of image 1, class 1 in image 2's target only."""
    g = np.random.default_rng(5)
    yy, xx = np.mgrid[:40, :44]
    target = np.zeros((3, 40, 44), np.int64)
    pred = np.zeros_like(target)
    for b in range(3):
        c = (12 + 3 * b, 15 + 2 * b)
        target[b][(yy - c[0]) ** 2 + (xx - c[1]) ** 2 <= 64] = 1
        target[b][(yy - 28) ** 2 + (xx - 30 + b) ** 2 <= 36] = 2
        pred[b][(yy - c[0] - 1) ** 2 + (xx - c[1] + 2) ** 2 <= 70] = 1
        pred[b][(yy - 27) ** 2 + (xx - 31) ** 2 <= 30] = 2
        flip = g.random((40, 44)) < 0.03
        pred[b][flip] = g.integers(0, 3, int(flip.sum()))
        target[b, :3, :] = 255
    pred[0, 30:34, 2:6] = 3
    target[1][target[1] == 2] = 0
    pred[1][pred[1] == 2] = 0
    pred[2][pred[2] == 1] = 0
    return torch.from_numpy(pred), torch.from_numpy(target)


def _onehot_valid(labels, target):
    valid = (target != 255).unsqueeze(1)
    ids = torch.arange(K).view(1, K, 1, 1)
    return ((labels.unsqueeze(1) == ids) & valid).float()


def test_dice_and_iou_equal_monai_and_the_conventions_that_differ():
    pred, target = _case()
    dice, iou = M.dice_iou(pred, target, K, 255)
    yp, y = _onehot_valid(pred, target), _onehot_valid(target, target)
    m_dice = monai_metrics.compute_dice(yp, y, include_background=True)
    m_iou = monai_metrics.compute_iou(yp, y, include_background=True)
    defined = ~torch.isnan(m_dice)
    assert defined.sum() >= 6
    torch.testing.assert_close(dice[defined].float(), m_dice[defined].float())
    torch.testing.assert_close(iou[defined].float(), m_iou[defined].float())
    # class 3 only in image 0's prediction: 0 here, NaN in MONAI's default
    assert dice[0, 3] == 0 and iou[0, 3] == 0 and torch.isnan(m_dice[0, 3]) and torch.isnan(m_iou[0, 3])
    # class 2 in neither mask of image 1: NaN here and in MONAI's default
    assert torch.isnan(dice[1, 2]) and torch.isnan(m_dice[1, 2])
    # ignore_empty=False: MONAI scores the prediction-only class 0 as here, the absent one 1
    m_all = monai_metrics.compute_dice(yp, y, include_background=True, ignore_empty=False)
    assert m_all[0, 3] == 0 and m_all[1, 2] == 1
    both_defined = ~torch.isnan(dice)
    torch.testing.assert_close(dice[both_defined].float(), m_all[both_defined].float())


def test_surface_distances_equal_monai_in_mm():
    pred, target = _case()
    spacing = [0.6, 1.7]
    ours = M.surface_distances(pred, target, K, spacing, 255)  # classes 1..3
    yp, y = _onehot_valid(pred, target), _onehot_valid(target, target)
    hd = monai_metrics.compute_hausdorff_distance(yp, y, include_background=False, spacing=spacing)
    hd95 = monai_metrics.compute_hausdorff_distance(yp, y, include_background=False, percentile=95, spacing=spacing)
    assd = monai_metrics.compute_average_surface_distance(yp, y, include_background=False, symmetric=True,
                                                          spacing=spacing)
    finite = torch.isfinite(hd) & ~torch.isnan(hd)
    assert finite.sum() >= 4
    for mine, theirs in ((ours["hd"], hd), (ours["hd95"], hd95), (ours["assd"], assd)):
        torch.testing.assert_close(mine[finite], theirs[finite].double(), rtol=1e-5, atol=1e-5)
    # one mask empty (class 3 of image 0: prediction only; class 1 of image 2: target only)
    for b, j in ((0, 2), (2, 0)):
        assert torch.isinf(ours["hd"][b, j]) and torch.isinf(hd[b, j])
        assert torch.isinf(ours["assd"][b, j]) and torch.isinf(assd[b, j])
        assert torch.isinf(ours["hd95"][b, j]) and torch.isnan(hd95[b, j])  # MONAI: NaN for the percentile
    # both empty (class 2 of image 1): NaN in both
    assert torch.isnan(ours["hd"][1, 1]) and torch.isnan(hd[1, 1])


def test_per_image_spacing_equals_monai_per_image():
    pred, target = _case()
    rows = [[0.5, 0.5], [0.3, 0.9], [1.2, 0.4]]
    ours = M.surface_distances(pred, target, K, torch.tensor(rows), 255)
    for b, sp in enumerate(rows):
        yp, y = _onehot_valid(pred[b:b + 1], target[b:b + 1]), _onehot_valid(target[b:b + 1], target[b:b + 1])
        ref = monai_metrics.compute_hausdorff_distance(yp, y, include_background=False, percentile=95, spacing=sp)
        ok = torch.isfinite(ref[0])
        torch.testing.assert_close(ours["hd95"][b][ok], ref[0][ok].double(), rtol=1e-5, atol=1e-5)
