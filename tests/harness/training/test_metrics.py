"""Metrics against hand-computed cases and scipy references."""

import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.spatial.distance import directed_hausdorff

from mtseg_harness.evaluation import metrics as M
from mtseg_harness.evaluation.evaluate import summarize


def test_dice_iou_hand_case():
    target = torch.tensor([[[0, 0, 1, 1],
                            [0, 1, 1, 1],
                            [2, 2, 255, 255]]])
    pred = torch.tensor([[[0, 1, 1, 1],
                          [0, 1, 0, 1],
                          [2, 0, 1, 2]]])
    dice, iou = M.dice_iou(pred, target, 3, ignore_index=255)
    # class 0: target {00,01,10}, pred {00,10,11,21} -> inter 2, |p| 4, |t| 3
    # class 1: target {02,03,11,12,13}, pred {01,02,03,11,13} (22 ignored) -> inter 4, |p| 5, |t| 5
    # class 2: target {20,21}, pred {20} (23 ignored) -> inter 1, |p| 1, |t| 2
    assert dice[0].tolist() == pytest.approx([4 / 7, 8 / 10, 2 / 3])
    assert iou[0].tolist() == pytest.approx([2 / 5, 4 / 6, 1 / 2])


def test_dice_nan_when_absent_from_both_and_zero_when_missed():
    target = torch.zeros(2, 4, 4, dtype=torch.long)
    target[1, :2] = 1
    pred = torch.zeros_like(target)
    dice, iou = M.dice_iou(pred, target, 2)
    assert math.isnan(dice[0, 1]) and math.isnan(iou[0, 1])
    assert dice[1, 1] == 0 and iou[1, 1] == 0
    assert dice[0, 0] == 1


def test_confusion_matrix_and_dataset_miou():
    target = torch.tensor([[0, 0, 1, 1, 255]])
    pred = torch.tensor([[0, 1, 1, 1, 0]])
    cm = M.confusion_matrix(pred, target, 2, 255)
    assert cm.tolist() == [[1, 1], [0, 2]]
    iou, dice = M.miou_from_confusion(cm)
    assert iou.tolist() == pytest.approx([1 / 2, 2 / 3])
    assert dice.tolist() == pytest.approx([2 / 3, 4 / 5])


def test_dice_matches_numpy_on_random_maps():
    rng = np.random.default_rng(0)
    t = rng.integers(0, 4, (3, 17, 23))
    p = rng.integers(0, 4, (3, 17, 23))
    t[:, :2] = 255
    dice, _ = M.dice_iou(torch.from_numpy(p), torch.from_numpy(t), 4, 255)
    for b in range(3):
        valid = t[b] != 255
        for k in range(4):
            pk, tk = (p[b] == k) & valid, (t[b] == k) & valid
            assert dice[b, k] == pytest.approx(2 * (pk & tk).sum() / (pk.sum() + tk.sum()))


def test_summarize_hausdorff_counts_inf():
    import pandas as pd

    table = pd.DataFrame({"case_id": ["a", "b", "c"], "dice_bg": [1.0, 1.0, 1.0], "dice_fg": [0.5, float("nan"), 1.0],
                          "hd95_fg": [2.0, float("inf"), 4.0]})
    s = summarize(table, ["bg", "fg"])
    assert s["dice_fg"] == pytest.approx(0.75)
    assert s["hd95_fg"] == pytest.approx(3.0) and s["hd95_fg_n_inf"] == 1


def _blob(shape, centre, r):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= r * r


def test_object_dice_hand_cases():
    g = np.zeros((20, 20), int)
    g[2:6, 2:6] = 1          # 16 px
    g[10:18, 10:18] = 2      # 64 px
    assert M.object_dice(g, g) == pytest.approx(1.0)
    s = np.zeros_like(g)
    s[2:6, 2:6] = 5          # the small object found exactly, the big one missed
    # G side: w = 16/80 * 1 + 64/80 * 0; S side: one object, Dice 1 -> 0.5 * (0.2 + 1) = 0.6
    assert M.object_dice(s, g) == pytest.approx(0.6)
    s2 = np.zeros_like(g)
    s2[2:6, 2:4] = 1         # half of the small object
    # G side: 16/80 * Dice(16 px, 8 px inside) = 0.2 * 16/24; S side: 1 * 16/24
    assert M.object_dice(s2, g) == pytest.approx(0.5 * (0.2 * 16 / 24 + 16 / 24))
    assert M.object_dice(np.zeros_like(g), np.zeros_like(g)) == 1.0
    assert M.object_dice(np.zeros_like(g), g) == 0.0


def test_object_hausdorff_against_scipy():
    g = np.zeros((30, 30), int)
    g[_blob(g.shape, (8, 8), 5)] = 1
    g[_blob(g.shape, (20, 20), 6)] = 2
    s = np.zeros_like(g)
    s[_blob(g.shape, (9, 8), 5)] = 1
    s[_blob(g.shape, (20, 22), 5)] = 2

    def h(a, b):
        pa, pb = np.argwhere(a), np.argwhere(b)
        return max(directed_hausdorff(pa, pb)[0], directed_hausdorff(pb, pa)[0])

    a1, a2 = (g == 1).sum(), (g == 2).sum()
    b1, b2 = (s == 1).sum(), (s == 2).sum()
    d1, d2 = h(g == 1, s == 1), h(g == 2, s == 2)
    expected = 0.5 * ((a1 * d1 + a2 * d2) / (a1 + a2) + (b1 * d1 + b2 * d2) / (b1 + b2))
    assert M.object_hausdorff(s, g) == pytest.approx(expected)
    assert M.object_hausdorff(g, g) == 0.0
    assert M.object_hausdorff(np.zeros_like(g), g) == math.inf


def test_brats_regions_dice():
    from mtseg_harness.data.brats import REGIONS

    t = torch.tensor([[0, 1, 2, 3, 3, 0]])
    p = torch.tensor([[0, 1, 2, 3, 0, 2]])
    d = M.region_dice(p, t, REGIONS)
    # ET: t {3,4}, p {3} -> 2/3; TC: t {1,3,4}, p {1,3} -> 4/5; WT: t {1,2,3,4}, p {1,2,3,5} -> 6/8
    assert d[0].tolist() == pytest.approx([2 / 3, 4 / 5, 6 / 8])
    empty = M.region_dice(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long), REGIONS)
    assert torch.isnan(empty).all()
    # pixels ignored in the target count nowhere: the 2 at position 5 is left out of WT
    t[0, 5] = 255
    assert M.region_dice(p, t, REGIONS)[0, 2] == pytest.approx(6 / 7)


def test_object_instances_are_scipys_8_connected_components():
    rng = np.random.default_rng(3)
    pred = torch.from_numpy(rng.integers(0, 3, (2, 23, 31)) * (rng.random((2, 23, 31)) < 0.35))
    got = M.object_instances(pred, 8)
    for i in range(2):
        ref, n = ndimage.label(pred[i].numpy() > 0, np.ones((3, 3)))
        assert n > 5 and np.array_equal(got[i].numpy(), ref)  # the same ids, raster order


def _scipy_hd(pred, target, spacing, q):
    def surface(m):
        return m & ~ndimage.binary_erosion(m, ndimage.generate_binary_structure(2, 1), border_value=0)

    sp, st = surface(pred), surface(target)
    dt_t = ndimage.distance_transform_edt(~st, sampling=spacing)
    dt_p = ndimage.distance_transform_edt(~sp, sampling=spacing)
    a, b = dt_t[sp], dt_p[st]
    return max(a.max(), b.max()), max(np.percentile(a, q), np.percentile(b, q))


def test_surface_distances_in_mm_match_scipy_per_image_spacing():
    t = np.stack([_blob((40, 50), (20, 25), 10), _blob((40, 50), (15, 20), 8)])
    p = np.stack([_blob((40, 50), (22, 27), 9), _blob((40, 50), (16, 24), 9)])
    spacing = torch.tensor([[0.5, 0.5], [0.3, 0.7]], dtype=torch.float64)
    out = M.surface_distances(torch.from_numpy(p.astype(np.int64)), torch.from_numpy(t.astype(np.int64)), 2, spacing)
    for i in range(2):
        hd, hd95 = _scipy_hd(p[i], t[i], spacing[i].tolist(), 95)
        assert float(out["hd"][i, 0]) == pytest.approx(hd)
        assert float(out["hd95"][i, 0]) == pytest.approx(hd95)


# ------------------------------------------------------------------ the dataset's declared extras in evaluate()
class _Fixed(torch.nn.Module):
    """A 'model' whose segmentation is given: the batch's ``pred`` (read by the segment callable)."""

    def forward(self, x):
        return x


def _evaluate(batches, extra_metrics, num_classes=3, names=("bg", "a", "b")):
    from mtseg_harness.evaluation import evaluate

    preds = iter([b.pop("pred") for b in batches])
    segment = lambda model, image, batch, out_size=None: next(preds)  # noqa: E731
    return evaluate(_Fixed(), segment, batches, "cpu", num_classes=num_classes, ignore_index=255, class_names=names,
                    hd=False, pad_multiple=1, extra_metrics=extra_metrics)


def test_group_report_means_and_miou_per_video_by_hand():
    from mtseg_harness.data import GroupReport

    t = torch.tensor([[[0, 1, 1, 2]], [[0, 0, 1, 1]], [[2, 2, 0, 0]]])
    p = torch.tensor([[[0, 1, 2, 2]], [[0, 1, 1, 1]], [[2, 0, 0, 0]]])
    batch = {"image": torch.zeros(3, 1, 1, 4), "mask": t, "pred": p, "video": torch.tensor([9, 9, 10]),
             "case_id": ["x", "y", "z"]}
    table, summary, _ = _evaluate([batch], (GroupReport("video"),))
    assert table["video"].tolist() == [9, 9, 10]
    v9, v10 = summary["by_video"][9], summary["by_video"][10]
    assert v9["n_images"] == 2 and v10["n_images"] == 1
    # video 9, class a: image x 2*1/(1+2) = 2/3, image y 2*2/(3+2) = 4/5
    assert v9["dice_a"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    # video 9 confusion (rows target): bg {0: 2, a: 1}, a {a: 3, b: 1}, b {b: 1}
    # IoU bg 2/3, a 3/5, b 1/2 -> mIoU over the video's pixels
    assert v9["miou"] == pytest.approx((2 / 3 + 3 / 5 + 1 / 2) / 3)
    # video 10: bg 2/3, b 1/2; class a never seen -> left out
    assert v10["miou"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert "video" not in summary  # the group key is not averaged


def test_object_metrics_count_8_connected_predicted_objects():
    from mtseg_harness.data import ObjectMetrics

    gt = np.zeros((1, 8, 8), np.int64)
    gt[0, 1:3, 1:3] = 1
    gt[0, 3:5, 3:5] = 2          # touches object 1 at a corner only
    pred = torch.from_numpy((gt > 0).astype(np.int64))
    batch = {"image": torch.zeros(1, 1, 8, 8), "mask": pred.clone(), "instances": torch.from_numpy(gt),
             "pred": pred, "case_id": ["g"]}
    table, _, _ = _evaluate([batch], (ObjectMetrics(connectivity=8),), num_classes=2, names=("bg", "gland"))
    # 8-connected, the prediction is one object of 8 px covering both glands of 4 px
    one = (gt[0] > 0).astype(np.int64)
    assert table["object_dice"][0] == pytest.approx(M.object_dice(one, gt[0]))
    # glands side: each 4/8 x Dice(G_i, S) = 8/12; object side: Dice(S, G_1) = 8/12 (tie -> first id)
    assert table["object_dice"][0] == pytest.approx(2 / 3)
    batch["pred"] = pred
    table4, _, _ = _evaluate([batch], (ObjectMetrics(connectivity=4),), num_classes=2, names=("bg", "gland"))
    assert table4["object_dice"][0] == pytest.approx(1.0)  # 4-connected: the two glands exactly
