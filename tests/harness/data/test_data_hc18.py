"""HC18: the 200 real pairs (head masks agree with the CSV circumference) and an official-layout fixture."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
from scipy import ndimage

from dataset_writers import truncate, write_hc18, write_png
from mtseg_harness.data import HC18, DatasetError, MissingFileError, create_dataset
from mtseg_harness.data.hc18 import fill_outline


def ellipse_of(mask: np.ndarray):
    """Least-squares ellipse (OpenCV) through the outer contour of a binary mask: semi-axes in px."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    c = max(contours, key=len)
    (_, _), (d1, d2), _ = cv2.fitEllipse(c)
    return d1 / 2, d2 / 2


def ramanujan(a, b):
    h = ((a - b) / (a + b)) ** 2
    return math.pi * (a + b) * (1 + 3 * h / (10 + math.sqrt(4 - 3 * h)))


@pytest.fixture(scope="module")
def real_hc18(shared_data):
    root = shared_data / "hc18"
    if not (root / "training_set_pixel_size_and_HC.csv").is_file():
        pytest.skip(f"HC18 sample not found in {root}")
    return HC18(root, split="all")


def test_real_all_200_masks_match_csv_circumference(real_hc18):
    """Every filled head mask: the perimeter of its fitted ellipse times the pixel size is the
    CSV head circumference within 3%, and the mask's area is that ellipse's area within 3%."""
    ds = real_hc18
    assert len(ds) == 200
    worst_hc, worst_area = 0.0, 0.0
    for i in range(len(ds)):
        s = ds[i]
        mask = s["mask"].numpy()
        assert s["image"].shape == (1,) + mask.shape  # most are 540x800, a few differ
        assert set(np.unique(mask).tolist()) == {0, 1}
        px = float(s["spacing"][0])
        assert float(s["spacing"][1]) == px
        a, b = ellipse_of(mask)
        hc_mask = ramanujan(a, b) * px
        hc_csv = float(s["hc_mm"])
        err_hc = abs(hc_mask - hc_csv) / hc_csv
        err_area = abs(mask.sum() - math.pi * a * b) / (math.pi * a * b)
        worst_hc, worst_area = max(worst_hc, err_hc), max(worst_area, err_area)
        assert err_hc < 0.03, (s["case_id"], hc_mask, hc_csv)
        assert err_area < 0.03, (s["case_id"], mask.sum(), math.pi * a * b)
        # The mask is one solid region (filled, no holes).
        assert ndimage.label(mask)[1] == 1 and np.array_equal(ndimage.binary_fill_holes(mask), mask.astype(bool))


def test_real_outline_fill_restores_mask(real_hc18):
    """The official annotations are thin outlines: the outline of each real head, filled, is the head."""
    ds = real_hc18
    for i in range(0, len(ds), 10):  # 20 of the 200, evenly spaced
        mask = ds[i]["mask"].numpy().astype(bool)
        outline = mask & ~ndimage.binary_erosion(mask)  # 8-connected closed curve
        assert outline.sum() < 0.2 * mask.sum()
        assert np.array_equal(fill_outline(outline), mask)


def test_real_splits_partition(real_hc18):
    root = real_hc18.root
    ids = {s: {r["case_id"] for r in HC18(root, split=s).records} for s in ("train", "val", "test")}
    assert sum(map(len, ids.values())) == 200
    assert not (ids["train"] & ids["val"]) and not (ids["train"] & ids["test"]) and not (ids["val"] & ids["test"])
    assert (len(ids["train"]), len(ids["val"]), len(ids["test"])) == (140, 20, 40)
    assert ids["val"] == {r["case_id"] for r in HC18(root, split="val").records}  # deterministic


# ----------------------------------------------------------------------------- fixture


@pytest.fixture
def hc_root(tmp_path):
    written = write_hc18(tmp_path / "hc18", n=3)
    return tmp_path / "hc18", written


def test_fixture_outline_filled(hc_root):
    root, written = hc_root
    ds = create_dataset("hc18", root, split="all")
    assert [r["case_id"] for r in ds.records] == ["000_HC", "001_HC", "002_2HC"]
    for i, (cid, (img, ann)) in enumerate(written.items()):
        s = ds[i]
        assert s["case_id"] == cid
        assert torch.equal((s["image"][0] * 255).round().to(torch.uint8), torch.from_numpy(img))
        outline = ann[..., 0] > 0
        filled = np.zeros(img.shape, np.uint8)
        cv2.ellipse(filled, (40, 27), (20 + i, 12), 15 * i, 0, 360, 1, -1)
        mask = s["mask"].numpy().astype(bool)
        assert (mask >= outline).all()  # outline included
        assert np.array_equal(mask, ndimage.binary_fill_holes(outline))
        iou = (mask & filled.astype(bool)).sum() / (mask | filled.astype(bool)).sum()
        assert iou > 0.9
        assert torch.allclose(s["spacing"], torch.tensor([0.1 + 0.01 * i] * 2))
        assert float(s["hc_mm"]) == 50 + i


def test_fixture_filled_annotations_accepted(tmp_path):
    write_hc18(tmp_path / "hc", n=2, filled=True)
    s = HC18(tmp_path / "hc", split="all")[0]
    assert s["mask"].sum() > 500


def test_open_outline_is_an_error(hc_root):
    root, written = hc_root
    ann = written["001_HC"][1].copy()
    ann[:, 38:43] = 0  # cut the ellipse: it no longer closes
    write_png(root / "training_set" / "001_HC_Annotation.png", ann)
    with pytest.raises(DatasetError, match=r"001_HC_Annotation\.png: ellipse outline is not closed"):
        HC18(root, split="all")[1]


def test_annotation_value_outside_encoding(hc_root):
    root, written = hc_root
    ann = written["000_HC"][1].copy()
    ann[0, 0] = 128
    write_png(root / "training_set" / "000_HC_Annotation.png", ann)
    with pytest.raises(DatasetError, match=r"000_HC_Annotation\.png: annotation holds values outside the encoding \[0, 255\]: 128"):
        HC18(root, split="all")[0]


def test_missing_annotation_csv_row_and_truncation(hc_root):
    root, _ = hc_root
    (root / "training_set" / "002_2HC_Annotation.png").unlink()
    with pytest.raises(DatasetError, match=r"002_2HC_Annotation\.png: annotation not found"):
        HC18(root, split="all")
    HC18.clear_memory_cache()
    ds = HC18(root, split="all", on_error="skip")
    assert len(ds) == 2 and len(ds.skipped) == 1
    truncate(root / "training_set" / "000_HC.png", 0.6)
    assert ds[0] is None and len(ds.skipped) == 2
    assert "000_HC.png" in ds.skip_report()


def test_missing_csv(tmp_path):
    write_hc18(tmp_path / "h", n=2)
    (tmp_path / "h" / "training_set_pixel_size_and_HC.csv").unlink()
    with pytest.raises(MissingFileError, match="pixel-size CSV not found"):
        HC18(tmp_path / "h", split="all")


def test_size_mismatch(hc_root):
    root, _ = hc_root
    write_png(root / "training_set" / "000_HC_Annotation.png", np.zeros((10, 10), np.uint8))
    with pytest.raises(DatasetError, match=r"000_HC_Annotation\.png: size \(10, 10\) does not match \(54, 80\)"):
        HC18(root, split="all")[0]


def test_split_does_not_move_when_a_file_breaks(tmp_path):
    root = tmp_path / "h"
    write_hc18(root, n=12)
    before = {s: [r["case_id"] for r in HC18(root, split=s).records] for s in ("train", "val", "test")}
    victim = before["test"][0]
    (root / "training_set" / f"{victim}_Annotation.png").unlink()
    HC18.clear_memory_cache()
    for s in ("train", "val", "test"):
        ds = HC18(root, split=s, on_error="skip")
        assert [r["case_id"] for r in ds.records] == [c for c in before[s] if c != victim]
        assert len(ds.skipped) == (s == "test")
