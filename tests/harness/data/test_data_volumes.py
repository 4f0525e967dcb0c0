"""BraTS 2018, LiTS and generic NIfTI pairs on fixtures in the official layouts (NIfTI with spacing)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dataset_writers import truncate, write_brats, write_lits, write_nifti
from mtseg_harness.data import BraTS, DatasetError, LiTS, MissingFileError, NiftiPairs, collate, create_dataset


def dhw(a):
    return np.transpose(a, (2, 1, 0))


# ----------------------------------------------------------------------------- BraTS


@pytest.fixture
def brats_root(tmp_path):
    cases = {"HGG": ["Brats18_TCIA01_001_1", "Brats18_TCIA01_002_1"], "LGG": ["Brats18_TCIA09_003_1"]}
    written = write_brats(tmp_path / "MICCAI_BraTS_2018_Data_Training", cases, spacing=(1.0, 1.0, 1.0))
    return tmp_path / "MICCAI_BraTS_2018_Data_Training", written


def test_brats_reads_back(brats_root):
    root, written = brats_root
    ds = create_dataset("brats18", root, split="all", normalize=False)
    assert len(ds) == 3 and ds.num_classes == 4
    for i, rec in enumerate(ds.records):
        s = ds[i]
        mods, seg = written[rec["case_id"]]
        assert s["image"].shape == (4, 8, 16, 20)
        for c, m in enumerate(("flair", "t1", "t1ce", "t2")):
            assert torch.equal(s["image"][c], torch.from_numpy(dhw(mods[m])))
        expected = dhw(seg).astype(np.int64)
        expected[expected == 4] = 3
        assert torch.equal(s["mask"], torch.from_numpy(expected))
        assert set(torch.unique(s["mask"]).tolist()) == {0, 1, 2, 3}
        et, tc, wt = s["regions"]
        assert torch.equal(et.bool(), torch.from_numpy(dhw(seg) == 4))
        assert torch.equal(tc.bool(), torch.from_numpy(np.isin(dhw(seg), (1, 4))))
        assert torch.equal(wt.bool(), torch.from_numpy(np.isin(dhw(seg), (1, 2, 4))))
        assert int(s["scene"]) == (1 if rec["case_id"].startswith("Brats18_TCIA09") else 0)
        assert torch.equal(s["spacing"], torch.ones(3))


def test_brats_new_convention_normalize_crop(tmp_path):
    root = tmp_path / "b"
    written = write_brats(root, {"HGG": ["c1"]}, enhancing=3, spacing=(1.0, 1.0, 2.0))
    s = BraTS(root, split="all", crop_size=(4, 6, 10))[0]
    assert s["image"].shape == (4, 4, 6, 10) and s["mask"].shape == (4, 6, 10)
    assert torch.equal(s["spacing"], torch.tensor([2.0, 1.0, 1.0]))
    full = BraTS(root, split="all", label_convention="2021")[0]
    assert set(torch.unique(full["mask"]).tolist()) == {0, 1, 2, 3}
    brain = full["image"][0] != 0
    assert abs(float(full["image"][0][brain].mean())) < 1e-4 and abs(float(full["image"][0][brain].std()) - 1) < 1e-2
    # Brain bbox (Z 1:7, Y 2:14, X 2:18) -> centre (4, 8, 10); crop (4, 6, 10) starts at (2, 5, 5).
    assert torch.equal(s["mask"], full["mask"][2:6, 5:11, 5:15])
    with pytest.raises(DatasetError, match=r"c1_seg\.nii\.gz: segmentation holds values \[3\] outside the BraTS encoding \[0, 1, 2, 4\]"):
        BraTS(root, split="all", label_convention="2018")[0]


def test_brats_bad_inputs(brats_root):
    root, written = brats_root
    cid = "Brats18_TCIA01_002_1"
    seg = written[cid][1].copy()
    seg[0, 0, 0] = 3  # both 3 and 4
    write_nifti(root / "HGG" / cid / f"{cid}_seg.nii.gz", seg)
    with pytest.raises(DatasetError, match=r"_seg\.nii\.gz: segmentation holds both 3 and 4"):
        BraTS(root, split="all")[1]
    truncate(root / "HGG" / "Brats18_TCIA01_001_1" / "Brats18_TCIA01_001_1_t2.nii.gz", 0.5)
    with pytest.raises(DatasetError, match=r"_t2\.nii\.gz: t2 volume (is truncated or corrupt|is not a readable NIfTI)"):
        BraTS(root, split="all")[0]
    write_nifti(root / "LGG" / "Brats18_TCIA09_003_1" / "Brats18_TCIA09_003_1_t1.nii.gz", np.zeros((5, 5, 5), np.float32))
    with pytest.raises(DatasetError, match=r"_t1\.nii\.gz: size \(5, 5, 5\) does not match \(20, 16, 8\)"):
        BraTS(root, split="all")[2]
    (root / "LGG" / "Brats18_TCIA09_003_1" / "Brats18_TCIA09_003_1_flair.nii.gz").unlink()
    BraTS.clear_memory_cache()
    with pytest.raises(DatasetError, match=r"_flair\.nii\.gz: flair volume not found"):
        BraTS(root, split="all")
    BraTS.clear_memory_cache()
    ds = BraTS(root, split="all", on_error="skip")
    assert len(ds) == 2 and ds[0] is None and ds[1] is None and len(ds.skipped) == 3


def test_brats_split_stratified(tmp_path):
    root = tmp_path / "b"
    for g, n in (("HGG", 10), ("LGG", 10)):
        for i in range(n):
            (root / g / f"{g}_{i}").mkdir(parents=True)  # split needs the names only
    splits = {}
    for s in ("train", "val", "test"):
        ds = BraTS.__new__(BraTS)
        ds.seed = 0
        recs = [{"case_id": f"{g}_{i}", "grade": k} for k, g in enumerate(("HGG", "LGG")) for i in range(10)]
        splits[s] = {r["case_id"] for r in ds._select(recs, s)}
    assert [len(splits[s]) for s in ("train", "val", "test")] == [14, 2, 4]
    for s in splits:
        assert sum(c.startswith("HGG") for c in splits[s]) == len(splits[s]) // 2
    assert not (splits["train"] & splits["test"]) and not (splits["train"] & splits["val"])


# ----------------------------------------------------------------------------- LiTS


@pytest.fixture
def lits_root(tmp_path):
    return tmp_path / "LiTS", write_lits(tmp_path / "LiTS", n_volumes=3)


def test_lits_slices(lits_root):
    root, written = lits_root
    ds = LiTS(root, split="all")
    assert len(ds) == 15 and ds.num_classes == 2
    for i, rec in enumerate(ds.records):
        s = ds[i]
        ct, seg = written[rec["volume"]]
        z = rec["z"]
        exp = (np.clip(ct[:, :, z].T.astype(np.float32), -200, 250) + 200) / 450
        assert s["image"].shape == (1, 12, 16)
        assert torch.allclose(s["image"][0], torch.from_numpy(exp), atol=1e-6)
        assert torch.equal(s["mask"], torch.from_numpy((seg[:, :, z].T > 0).astype(np.int64)))
        assert float(s["presence"][1]) == float(seg[:, :, z].any())  # CMU-Net organ presence
        assert torch.allclose(s["spacing"], torch.tensor([0.8, 0.7]))
        assert s["case_id"] == f"volume-{rec['volume']}/slice-{z:04d}"
    three = LiTS(root, split="all", target="liver_tumour")
    assert int(three[2]["mask"].max()) == 2 and three.num_classes == 3


def test_lits_3d_and_split_by_volume(lits_root, tmp_path):
    root, written = lits_root
    v = LiTS(root, split="all", mode="3d")
    assert len(v) == 3
    s = v[1]
    assert s["image"].shape == (1, 5, 12, 16) and torch.allclose(s["spacing"], torch.tensor([2.5, 0.8, 0.7]))
    assert torch.equal(s["mask"], torch.from_numpy((dhw(written[1][1]) > 0).astype(np.int64)))
    parts = [{r["volume"] for r in LiTS(root, split=sp, cache_dir=tmp_path / "c").records} for sp in ("train", "test")]
    assert parts[0].isdisjoint(parts[1]) and parts[0] | parts[1] == {0, 1, 2}


def test_lits_bad_inputs(lits_root):
    root, written = lits_root
    seg = written[1][1].copy()
    seg[0, 0, 0] = 5
    write_nifti(root / "Training Batch 1" / "segmentation-1.nii", seg)
    ds = LiTS(root, split="all")
    with pytest.raises(DatasetError, match=r"segmentation-1\.nii: LiTS segmentation holds values outside the encoding \[0, 1, 2\]: 5"):
        ds[5]
    truncate(root / "Training Batch 2" / "volume-2.nii", 0.5)
    LiTS.clear_memory_cache()
    with pytest.raises(DatasetError, match=r"volume-2\.nii: CT volume is truncated: \d+ bytes, header needs \d+"):
        LiTS(root, split="all")
    LiTS.clear_memory_cache()
    ok = LiTS(root, split="all", on_error="skip")
    assert len(ok) == 10 and "volume-2.nii" in ok.skipped[0][0]


# ----------------------------------------------------------------------------- generic NIfTI pairs


def test_nifti_pairs(tmp_path):
    root = tmp_path / "Task01"
    r = np.random.default_rng(0)
    for case in ("case_a", "case_b"):
        for ch in range(2):
            write_nifti(root / "imagesTr" / f"{case}_{ch:04d}.nii.gz", r.normal(size=(6, 5, 4)).astype(np.float32), (0.5, 0.6, 3.0))
        write_nifti(root / "labelsTr" / f"{case}.nii.gz", r.integers(0, 3, (6, 5, 4)).astype(np.uint8), (0.5, 0.6, 3.0))
    ds = create_dataset("nifti", root, split="all", num_classes=3)
    b = collate([ds[0], ds[1]])
    assert b["image"].shape == (2, 2, 4, 5, 6) and b["mask"].shape == (2, 4, 5, 6)
    assert torch.allclose(b["spacing"][0], torch.tensor([3.0, 0.6, 0.5]))
    with pytest.raises(DatasetError, match=r"case_a\.nii\.gz: mask holds values outside the encoding \[0, 1\]: 2"):
        NiftiPairs(root, split="all", num_classes=2)[0]
    (root / "labelsTr" / "case_b.nii.gz").unlink()
    NiftiPairs.clear_memory_cache()
    with pytest.raises(MissingFileError):
        NiftiPairs(tmp_path / "missing", num_classes=2)
    with pytest.raises(DatasetError, match=r"labelsTr/case_b\.nii\.gz: label volume not found"):
        NiftiPairs(root, split="all", num_classes=3)


def test_lits_nan_and_float_labels(tmp_path):
    root = tmp_path / "L"
    ct = np.zeros((8, 6, 3), np.float32)
    ct[1, 1, 0] = np.nan
    write_nifti(root / "volume-0.nii", ct)
    write_nifti(root / "segmentation-0.nii", np.ones((8, 6, 3), np.float32))  # float labels: accepted if integral
    ds = LiTS(root, split="all")
    with pytest.raises(DatasetError, match=r"volume-0\.nii: CT volume holds NaN or Inf"):
        ds[0]
    assert int(ds[1]["mask"].sum()) == 48
    write_nifti(root / "segmentation-0.nii", np.full((8, 6, 3), 0.5, np.float32))
    with pytest.raises(DatasetError, match=r"segmentation-0\.nii: segmentation holds non-integer values"):
        ds[1]
