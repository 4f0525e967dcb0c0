"""REFUGE, GlaS and the generic image/mask folder on fixtures in the official layouts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dataset_writers import truncate, write_glas, write_png, write_refuge
from mtseg_harness.data import GlaS, REFUGE, DatasetError, ImageMaskFolder, MissingFileError, create_dataset

# ----------------------------------------------------------------------------- REFUGE


@pytest.fixture
def refuge_root(tmp_path):
    return tmp_path / "REFUGE", write_refuge(tmp_path / "REFUGE")


def test_refuge_reads_back(refuge_root):
    root, written = refuge_root
    ds = create_dataset("refuge", root, split="all")
    assert [r["case_id"] for r in ds.records] == ["V0001", "V0002", "g0001", "n0001"]
    for i, rec in enumerate(ds.records):
        s = ds[i]
        img, raw = written[rec["case_id"]]
        expected = np.select([raw == 255, raw == 128, raw == 0], [0, 1, 2], -1)
        assert torch.equal(s["mask"], torch.from_numpy(expected))
        assert set(np.unique(expected).tolist()) == {0, 1, 2}
        assert s["image"].shape == (3,) + raw.shape
        # JPEG is lossy: a flat colour comes back within a couple of grey levels.
        assert torch.allclose(s["image"] * 255, torch.from_numpy(img).permute(2, 0, 1).float(), atol=3)
    scenes = {r["case_id"]: int(ds[i]["scene"]) for i, r in enumerate(ds.records)}
    assert scenes == {"g0001": 1, "n0001": 0, "V0001": -1, "V0002": -1}
    assert [r["case_id"] for r in REFUGE(root, split="train").records] == ["g0001", "n0001"]
    assert [r["case_id"] for r in REFUGE(root, split="val").records] == ["V0001", "V0002"]


def test_refuge_label_sheet(refuge_root, tmp_path):
    root, _ = refuge_root
    sheet = tmp_path / "labels.csv"
    sheet.write_text("ImgName,Glaucoma Label\nV0001.jpg,1\nV0002.jpg,0\n")
    ds = REFUGE(root, split="val", labels_file=sheet)
    assert [int(ds[i]["scene"]) for i in range(2)] == [1, 0]


def test_refuge_bad_inputs(refuge_root):
    root, written = refuge_root
    mask_path = root / "REFUGE-Validation400-GT" / "Disc_Cup_Masks" / "V0001.bmp"
    raw = written["V0001"][1].copy()
    raw[0, 0] = 200
    write_png(mask_path, raw, fmt="BMP")
    ds = REFUGE(root, split="val")
    with pytest.raises(DatasetError, match=r"V0001\.bmp: REFUGE disc/cup mask .* outside the encoding \[0, 128, 255\]: 200 \(1 px\)"):
        ds[0]
    truncate(root / "REFUGE-Validation400" / "V0002.jpg", 0.4)
    with pytest.raises(DatasetError, match=r"V0002\.jpg: image is truncated or corrupt"):
        ds[1]
    (root / "Annotation-Training400" / "Disc_Cup_Masks" / "Glaucoma" / "g0001.bmp").unlink()
    REFUGE.clear_memory_cache()
    with pytest.raises(DatasetError, match=r"g0001\.jpg: fundus image has no Disc_Cup_Masks"):
        REFUGE(root, split="train")
    REFUGE.clear_memory_cache()
    assert len(REFUGE(root, split="train", on_error="skip")) == 1


# ----------------------------------------------------------------------------- GlaS


@pytest.fixture
def glas_root(tmp_path):
    return tmp_path / "Warwick QU Dataset (Released 2016_07_08)", write_glas(tmp_path / "Warwick QU Dataset (Released 2016_07_08)")


def test_glas_reads_back(glas_root):
    root, written = glas_root
    ds = create_dataset("glas", root, split="all")
    grades = {"train_1": 1, "train_2": 0, "testA_1": 1, "testB_1": 0}  # Grade.csv, spaces stripped
    for i, rec in enumerate(ds.records):
        s = ds[i]
        img, inst = written[rec["case_id"]]
        assert torch.equal(s["instances"], torch.from_numpy(inst.astype(np.int64)))
        assert torch.equal(s["mask"], torch.from_numpy((inst > 0).astype(np.int64)))
        assert torch.equal((s["image"] * 255).round().to(torch.uint8), torch.from_numpy(img).permute(2, 0, 1))
        assert int(s["scene"]) == grades[rec["case_id"]]
    assert [r["case_id"] for r in GlaS(root, split="train").records] == ["train_1", "train_2"]
    assert [r["case_id"] for r in GlaS(root, split="testA").records] == ["testA_1"]
    assert [r["case_id"] for r in GlaS(root, split="test").records] == ["testA_1", "testB_1"]


def test_glas_bad_inputs(glas_root):
    root, _ = glas_root
    (root / "Grade.csv").write_text("name, patient ID, grade (GlaS)\ntrain_1, 2, malignant\ntrain_2, 3, sort of\n")
    with pytest.raises(DatasetError, match=r"Grade.csv: line 3: grade 'sort of' is not one of"):
        GlaS(root, split="train")
    (root / "Grade.csv").write_text("name, patient ID, grade (GlaS)\ntrain_1, 2, malignant\n")
    GlaS.clear_memory_cache()
    with pytest.raises(DatasetError, match="no grade for train_2"):
        GlaS(root, split="train")
    (root / "Grade.csv").unlink()
    GlaS.clear_memory_cache()
    with pytest.raises(MissingFileError, match="Grade.csv not found"):
        GlaS(root)


def test_glas_rgb_anno_with_different_channels_is_an_error(glas_root):
    root, written = glas_root
    inst = written["train_1"][1]
    rgb = np.stack([inst, inst, inst * 0], -1).astype(np.uint8)
    write_png(root / "train_1_anno.bmp", rgb, fmt="BMP")
    with pytest.raises(DatasetError, match=r"train_1_anno\.bmp: instance annotation has 3 channels that differ"):
        GlaS(root, split="train")[0]


# ----------------------------------------------------------------------------- generic folders


def test_image_mask_folder(tmp_path):
    root = tmp_path / "d"
    r = np.random.default_rng(0)
    for k in range(4):
        write_png(root / "images" / f"img{k}.png", r.integers(0, 256, (8, 10, 3), dtype=np.uint8))
        write_png(root / "masks" / f"img{k}_mask.png", (r.integers(0, 2, (8, 10)) * 255).astype(np.uint8))
    ds = ImageMaskFolder(root, split="all", mask_suffix="_mask", label_values=[0, 255])
    assert len(ds) == 4 and set(torch.unique(ds[0]["mask"]).tolist()) <= {0, 1}
    parts = [len(ImageMaskFolder(root, split=s, mask_suffix="_mask", label_values=[0, 255])) for s in ("train", "test")]
    assert sum(parts) == 4
    with pytest.raises(DatasetError, match=r"img0_mask\.png: mask holds values outside the encoding \[0, 1\]: 255"):
        ImageMaskFolder(root, split="all", mask_suffix="_mask", num_classes=2)[0]
    with pytest.raises(ValueError, match="give num_classes"):
        ImageMaskFolder(root, split="all", mask_suffix="_mask")


def test_datasets_pickle_for_dataloader_workers(glas_root):
    import pickle

    from mtseg_harness.data import WeakLabels, collate

    root, _ = glas_root
    ds = WeakLabels(GlaS(root, split="all"), seed=1)
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[0]["weak"], ds[0]["weak"])
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate)
    batch = next(iter(loader))
    assert batch["weak"].shape == (2, 24, 30) and batch["scene"].tolist() == [1, 0]
