"""TDSNet's reports in the paper's form on fixture data with known answers: REFUGE disc
(rim + cup) and cup Dice; BraTS ET/TC/WT Dice and HD95 (surface distances of regions)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dataset_writers as W
from mtseg_harness.data import create_dataset
from mtseg_harness.data.transforms import collate
from mtseg_harness.evaluation import evaluate


class _Identity(torch.nn.Module):
    def forward(self, x):
        return x


def _eval_with(pred, batch, ds, hd=False):
    segment = lambda model, image, b, out_size=None: pred  # noqa: E731  (a given prediction)
    return evaluate(_Identity(), segment, [batch], "cpu", num_classes=ds.num_classes, ignore_index=ds.ignore_index,
                    class_names=ds.class_names, hd=hd, pad_multiple=1, extra_metrics=ds.extra_metrics,
                    background_classes=ds.background_classes)


def test_refuge_reports_disc_as_rim_plus_cup_and_cup(tmp_path):
    raw = W.write_refuge(tmp_path)
    ds = create_dataset("refuge", tmp_path, "val")
    assert ds.class_names == ("background", "rim", "cup")
    batch = collate([ds[i] for i in range(len(ds))])
    masks = {k: m for k, (_, m) in raw.items()}
    # prediction: a disc of radius^2 < 25 (not 49), all of it called rim except a cup of radius^2 < 4 (not 9)
    h, w = batch["mask"].shape[1:]
    yy, xx = np.mgrid[:h, :w]
    r2 = (yy - h / 2) ** 2 + (xx - w / 2) ** 2
    p = np.zeros((h, w), np.int64)
    p[r2 < 25] = 1
    p[r2 < 4] = 2
    pred = torch.from_numpy(np.stack([p] * len(ds)))
    table, summary, _ = _eval_with(pred, batch, ds)
    for i, cid in enumerate(batch["case_id"]):
        gt = masks[cid]
        gt_disc, gt_cup = gt != 255, gt == 0           # the raw file: 255 background, 128 rim, 0 cup
        pd_disc, pd_cup = r2 < 25, r2 < 4
        disc = 2 * (gt_disc & pd_disc).sum() / (gt_disc.sum() + pd_disc.sum())
        cup = 2 * (gt_cup & pd_cup).sum() / (gt_cup.sum() + pd_cup.sum())
        assert table["dice_disc"][i] == pytest.approx(disc)
        assert table["dice_cup"][i] == pytest.approx(cup)
        assert table["dice_disc"][i] != pytest.approx(table["dice_rim"][i])  # the disc is not the rim class
    assert summary["dice_disc"] == pytest.approx(table["dice_disc"].mean())


def test_region_hd95_is_the_surface_distance_of_the_region_masks():
    """BraTS regions on a 1 x 1 x 12 line, spacing 2 mm: HD95 of WT/TC/ET by hand."""
    from mtseg_harness.data import RegionMetrics
    from mtseg_harness.data.brats import REGIONS

    class DS:
        num_classes, ignore_index = 4, 255
        class_names = ("background", "necrotic", "oedema", "enhancing")
        background_classes = (0,)
        extra_metrics = (RegionMetrics(REGIONS),)

    t = torch.tensor([[[[0, 0, 2, 2, 1, 3, 3, 1, 2, 0, 0, 0]]]])
    p = torch.tensor([[[[0, 0, 0, 2, 1, 3, 1, 1, 2, 2, 2, 0]]]])
    batch = {"image": torch.zeros(1, 1, 1, 1, 12), "mask": t, "spacing": torch.tensor([[2.0, 2.0, 2.0]]),
             "case_id": ["c"]}
    table, _, _ = _eval_with(p, batch, DS, hd=True)

    def hd95(a, b):  # 1D line in a 1 x 1 x L volume: every foreground voxel is surface (MONAI's definition)
        xa, xb = np.flatnonzero(a), np.flatnonzero(b)
        d_ab = np.abs(xa[:, None] - xb[None]).min(1)
        d_ba = np.abs(xb[:, None] - xa[None]).min(1)
        return 2.0 * max(np.percentile(d_ab, 95), np.percentile(d_ba, 95)), 2.0 * max(d_ab.max(), d_ba.max())

    tt, pp = t.numpy().ravel(), p.numpy().ravel()
    for name, classes in REGIONS:
        want95, want_hd = hd95(np.isin(tt, classes), np.isin(pp, classes))
        assert table[f"hd95_{name}"][0] == pytest.approx(want95), name
        assert table[f"hd_{name}"][0] == pytest.approx(want_hd), name
    # by hand: WT target x 2..8, prediction x 3..10: prediction -> target distances (0 x6, 1, 2),
    # 95th percentile 1.65 voxels = 3.3 mm; HD 2 voxels = 4 mm. TC identical (x 4..7): 0
    assert table["hd95_WT"][0] == pytest.approx(3.3) and table["hd_WT"][0] == pytest.approx(4.0)
    assert table["hd95_TC"][0] == pytest.approx(0.0)
    assert table["dice_ET"][0] == pytest.approx(2 * 1 / 3)
