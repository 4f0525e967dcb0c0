"""Evaluation that cannot mislead: background classes as the dataset declares them, counts of
undefined / infinite values beside every mean, no blank CSV cells, distances in mm, masks
honoured at ignored pixels, the GlaS unmatched-object rule, and gradient clipping that clips.

Each test here caught a bug planted in the code it checks (see docs/testing.md).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import ndimage
from scipy.spatial.distance import directed_hausdorff

from .helpers import tiny_config
from dataset_writers import write_nifti
from mtseg_harness.data import CaDIS, GroupReport
from mtseg_harness.evaluation import evaluate, foreground, metrics as M, summarize
from mtseg_harness.evaluation.report import per_class_table, write_table
from mtseg_harness.runs import build_trainer, run_eval


def _scipy_surface(mask):
    return mask & ~ndimage.binary_erosion(mask, ndimage.generate_binary_structure(mask.ndim, 1), border_value=0)


def _scipy_hd(pred, target, spacing):
    """HD, HD95 of two non-empty binary masks, from scipy's distance transform (MONAI's definition)."""
    sp, st = _scipy_surface(pred), _scipy_surface(target)
    a = ndimage.distance_transform_edt(~st, sampling=spacing)[sp]
    b = ndimage.distance_transform_edt(~sp, sampling=spacing)[st]
    return max(a.max(), b.max()), max(np.percentile(a, 95), np.percentile(b, 95))


# ------------------------------------------------------------------ ignored pixels, GlaS rule


def test_surface_distances_ignore_predictions_at_ignored_pixels():
    target = torch.zeros(1, 30, 30, dtype=torch.long)
    target[0, 10:20, 10:20] = 1
    target[0, :, 25:] = 255                      # an ignored band
    pred = torch.where(target == 255, 0, target)
    pred[0, 2:6, 26:29] = 1                      # a false object, but inside the ignored band
    out = M.surface_distances(pred, target, 2, [1.0, 1.0], 255)
    assert float(out["hd"][0, 0]) == 0.0 and float(out["hd95"][0, 0]) == 0.0
    # an object outside the band is a real error
    pred2 = pred.clone()
    pred2[0, 2:6, 21:24] = 1
    valid = target[0].numpy() != 255
    hd, _ = _scipy_hd((pred2[0].numpy() == 1) & valid, target[0].numpy() == 1, [1.0, 1.0])
    assert float(M.surface_distances(pred2, target, 2, [1.0, 1.0], 255)["hd"][0, 0]) == pytest.approx(hd) and hd > 5


def test_surface_distances_of_class_0_when_it_is_a_structure():
    """Ignored pixels must not join class 0 when class 0 is measured (CaDIS's pupil)."""
    target = torch.ones(1, 20, 20, dtype=torch.long)
    target[0, 5:10, 5:10] = 0
    target[0, 15:, :] = 255
    pred = target.clone()
    pred[0, 15:, :] = 0                          # prediction says class 0 everywhere it is ignored
    out = M.surface_distances(pred, target, 2, None, 255, classes=[0, 1])
    assert out["hd"][0].tolist() == [0.0, 0.0]


def test_object_hausdorff_unmatched_object_takes_the_nearest_other_object():
    g = np.zeros((40, 40), int)
    g[5:10, 5:10] = 1                            # near the stray object
    g[30:36, 30:36] = 2                          # far from it
    s = g.copy()
    s[5:10, 14:17] = 3                           # a segmented object touching no gland
    h = lambda a, b: max(directed_hausdorff(np.argwhere(a), np.argwhere(b))[0],  # noqa: E731
                         directed_hausdorff(np.argwhere(b), np.argwhere(a))[0])
    near, far = h(s == 3, g == 1), h(s == 3, g == 2)
    assert near < far
    a1, a2, b3 = (g == 1).sum(), (g == 2).sum(), (s == 3).sum()
    # glands matched exactly (0); the stray object's term uses the nearest gland (min, not max)
    expected = 0.5 * (0.0 + b3 / (a1 + a2 + b3) * near)
    assert M.object_hausdorff(s, g) == pytest.approx(expected)


# ------------------------------------------------------------------ background classes and counts


def _given_eval(batches, names, background, hd=True, groups=()):
    preds = iter([b.pop("pred") for b in batches])
    segment = lambda model, image, batch, out_size=None: next(preds)  # noqa: E731
    return evaluate(torch.nn.Identity(), segment, batches, "cpu", num_classes=len(names), ignore_index=255,
                    class_names=names, hd=hd, pad_multiple=1, background_classes=background, extra_metrics=groups)


def _three_images():
    t = torch.zeros(3, 12, 12, dtype=torch.long)
    t[:, 2:6, 2:6] = 1
    t[:2, 7:11, 7:11] = 2                        # class 2 absent from image 2's target
    p = t.clone()
    p[0, 2:6, 6] = 1                             # image 0: class 1 one column too wide
    p[1][p[1] == 2] = 0                          # image 1: class 2 missed -> HD inf
    return {"image": torch.zeros(3, 1, 12, 12), "mask": t, "pred": p, "case_id": ["i0", "i1", "i2"]}


def test_class_0_counts_when_the_dataset_has_no_background():
    names = ("Pupil", "a", "b")
    table, summary, _ = _given_eval([_three_images()], names, background=())
    assert "hd95_Pupil" in table and "hd_Pupil" in table
    per_class = [summary[f"dice_{n}"] for n in names]
    assert summary["dice_fg"] == pytest.approx(np.mean(per_class))
    table_bg, summary_bg, _ = _given_eval([_three_images()], names, background=(0,))
    assert "hd95_Pupil" not in table_bg
    assert summary_bg["dice_fg"] == pytest.approx(np.mean(per_class[1:]))
    assert summary["dice_fg"] != summary_bg["dice_fg"]
    assert CaDIS.background_classes == () and foreground(names, CaDIS.background_classes) == list(names)


def test_every_mean_has_its_nan_and_inf_counts():
    names = ("bg", "a", "b")
    table, s, _ = _given_eval([_three_images()], names, background=(0,))
    # class b: image 0 exact (0), image 1 missed (inf), image 2 in neither (nan)
    assert table["hd95_b"].tolist()[0] == 0 and math.isinf(table["hd95_b"][1]) and math.isnan(table["hd95_b"][2])
    assert s["hd95_b"] == 0 and s["hd95_b_n_inf"] == 1 and s["hd95_b_n_nan"] == 1
    assert s["dice_b"] == pytest.approx(0.5) and s["dice_b_n_nan"] == 1
    assert s["hd95_a_n_inf"] == 0 and s["hd95_a_n_nan"] == 0 and s["hd95_a"] > 0
    assert s["hd95_fg_n_inf"] == 1 and s["hd95_fg_n_nan"] == 1 and s["dice_fg_n_nan"] == 1
    every = [c for c in table.columns if c != "case_id"]
    assert all(f"{c}_n_nan" in s for c in every)
    assert all(f"{c}_n_inf" in s for c in every if c.startswith(("hd", "assd")))


def test_per_class_csv_writes_nan_inf_and_counts_never_blank(tmp_path):
    names = ("bg", "a", "b")
    table, s, _ = _given_eval([_three_images()], names, background=(0,))
    per_class = per_class_table(s, names, (0,))
    assert per_class["role"].tolist() == ["background", "class", "class"]
    write_table(per_class, tmp_path / "per_class.csv")
    write_table(table, tmp_path / "per_image.csv")
    for name in ("per_class.csv", "per_image.csv"):
        text = (tmp_path / name).read_text()
        rows = [line.split(",") for line in text.strip().splitlines()]
        assert all(cell != "" for row in rows for cell in row), name
    back = pd.read_csv(tmp_path / "per_class.csv")
    b = back[back["class"] == "b"].iloc[0]
    assert b["hd95_n_inf"] == 1 and b["hd95_n_nan"] == 1 and b["dice_n_nan"] == 1
    assert "inf" in (tmp_path / "per_image.csv").read_text()
    # an all-inf column: its mean is written as nan, with the count beside it
    s2 = summarize(pd.DataFrame({"case_id": ["x"], "hd95_a": [math.inf]}), ["bg", "a"])
    assert math.isnan(s2["hd95_a"]) and s2["hd95_a_n_inf"] == 1


def test_group_means_carry_counts_too():
    batch = _three_images()
    batch["video"] = torch.tensor([1, 1, 2])
    _, s, _ = _given_eval([batch], ("bg", "a", "b"), background=(0,), groups=(GroupReport("video"),))
    assert s["by_video"][1]["hd95_b_n_inf"] == 1 and s["by_video"][2]["hd95_b_n_nan"] == 1


# ------------------------------------------------------------------ mtseg eval: distances in mm


def _nifti_pairs(root, n=6, shape=(24, 32), spacing=(0.5, 2.0)):
    """2D NIfTI image/label pairs with anisotropic pixels; a bright disk per image is class 1."""
    rng = np.random.default_rng(0)
    for i in range(n):
        yy, xx = np.mgrid[: shape[0], : shape[1]]
        disk = (yy - 10 - i) ** 2 + (xx - 14 - i) ** 2 <= 36
        image = disk * 0.8 + rng.random(shape) * 0.2
        write_nifti(root / "imagesTr" / f"case{i}_0000.nii.gz", image.T.astype(np.float32), spacing=spacing)
        write_nifti(root / "labelsTr" / f"case{i}.nii.gz", disk.T.astype(np.uint8), spacing=spacing)


def test_mtseg_eval_reports_surface_distances_in_mm(tmp_path):
    _nifti_pairs(tmp_path / "data")
    cfg = tiny_config(tmp_path / "run", data={"name": "nifti", "root": str(tmp_path / "data"), "input_size": None,
                                              "options": {"num_classes": 2}, "batch_size": 2, "eval_batch_size": 3,
                                              "splits": {"train": "all", "val": "all", "test": "all"}},
                      optim={"name": "adam", "lr": 0.02}, train={"steps": 25}, eval={"hd": True, "pad_multiple": 8})
    build_trainer(cfg).fit()
    table, summary, examples = run_eval(cfg, split_key="test", out_dir=tmp_path / "eval", keep_examples=6, quiet=True)
    assert len(examples) == len(table) == 6
    checked = 0
    for (_, target, pred), hd, hd95 in zip(examples, table["hd_class1"], table["hd95_class1"]):
        p, t = pred == 1, target == 1
        if not p.any():
            assert math.isinf(hd)
            continue
        ref_hd, ref_hd95 = _scipy_hd(p, t, [2.0, 0.5])  # (rows, columns) = (Y, X) spacing
        assert hd == pytest.approx(ref_hd) and hd95 == pytest.approx(ref_hd95)
        px_hd, _ = _scipy_hd(p, t, [1.0, 1.0])
        checked += ref_hd != pytest.approx(px_hd)
    assert checked >= 3  # images where mm and pixels differ
    written = pd.read_csv(tmp_path / "eval" / "per_image.csv")
    np.testing.assert_allclose(written["hd_class1"], table["hd_class1"])


# ------------------------------------------------------------------ gradient clipping


def test_gradient_clipping_limits_the_update(tmp_path):
    """SGD without momentum: the update is lr times the clipped gradient, so its norm is lr * clip."""
    clip, lr = 1e-3, 0.5
    cfg = tiny_config(tmp_path, optim={"name": "sgd", "lr": lr, "momentum": 0.0},
                      train={"steps": 1, "grad_clip": clip}, data={"augment": {}})
    tr = build_trainer(cfg)
    before = [p.detach().clone() for p in tr.model.parameters()]
    tr.fit()
    step = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(tr.model.parameters(), before)))
    assert tr.history[-1]["grad_norm"] > 10 * clip  # the raw gradient was larger than the limit
    assert float(step) == pytest.approx(lr * clip, rel=1e-3)
