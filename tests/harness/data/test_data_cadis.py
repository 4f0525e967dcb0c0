"""CaDIS: the three task remappings on the 40 real label maps, and a fixture in the official layout."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from dataset_writers import truncate, write_cadis, write_png
from mtseg_harness.data import CaDIS, DatasetError, MissingFileError, cadis_lut, collate, create_dataset

IGN = 255

# The CaDIS tasks' class mapping (the CaDIS paper's task definitions), written out by hand (raw class -> training class).
TASK1 = {**{c: c for c in range(7)}, **{c: 7 for c in range(7, 36)}, 255: IGN}
TASK2 = {0: 0, 1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 6,
         7: 7, 8: 7, 10: 7, 20: 7, 27: 7, 32: 7,
         9: 8, 22: 8, 11: 9, 33: 9, 12: 10, 28: 10, 13: 11, 21: 11,
         14: 12, 24: 12, 15: 13, 18: 13, 16: 14, 23: 14, 17: 15, 19: 16,
         25: IGN, 26: IGN, 29: IGN, 30: IGN, 31: IGN, 34: IGN, 35: IGN, 255: IGN}
TASK2_HOG = {**TASK2, 25: 17, 26: 17, 29: 17, 30: 17, 31: 17, 34: 17, 35: 17}
TASK3 = {**{c: c for c in range(25)}, **{c: IGN for c in range(25, 36)}, 255: IGN}
TASK3_HOG = {**TASK3, **{c: 25 for c in range(25, 36)}}

# Hand-checked class sets of the 40 real maps. Raw values present: 0-8, 10-15, 17-20, 25,
# 33, 35 (the maps are L, RGB or RGBA; the 255 in the RGBA files is the alpha channel).
REAL_RAW = {0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 14, 15, 17, 18, 19, 20, 25, 33, 35}
EXPECTED_SETS = {
    (1, False): {0, 1, 2, 3, 4, 5, 6, 7},
    (2, False): {0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 15, 16, IGN},      # 25, 35 -> ignore
    (2, True): {0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 15, 16, 17},        # 25, 35 -> rare class 17
    (3, False): {0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 14, 15, 17, 18, 19, 20, IGN},
    (3, True): {0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 14, 15, 17, 18, 19, 20, 25},
}
TABLES = {(1, False): TASK1, (2, False): TASK2, (2, True): TASK2_HOG, (3, False): TASK3, (3, True): TASK3_HOG}
N_CLASSES = {(1, False): 8, (2, False): 17, (2, True): 18, (3, False): 25, (3, True): 26}


def _by_hand(raw: np.ndarray, table: dict) -> np.ndarray:
    lut = np.full(256, -1, np.int64)
    for src, dst in table.items():
        lut[src] = dst
    out = lut[raw]
    assert (out >= 0).all(), "raw value missing from the hand table"
    return out


@pytest.fixture(scope="module")
def real_cadis(shared_data, tmp_path_factory):
    """The 40 real label maps, linked into the official VideoNN/Labels layout."""
    src = shared_data / "cadis" / "relabelled"
    files = sorted(src.glob("Video*_frame*.png"))
    if len(files) != 40:
        pytest.skip(f"expected 40 CaDIS label maps in {src}, found {len(files)}")
    root = tmp_path_factory.mktemp("cadis_real")
    for f in files:
        video = int(f.name.split("_")[0][5:])
        dst = root / f"Video{video:02d}" / "Labels" / f.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(f, dst)
    return root, files


def test_real_raw_values(real_cadis):
    from PIL import Image

    _, files = real_cadis
    seen = set()
    for f in files:
        a = np.array(Image.open(f))
        seen |= set(np.unique(a[..., 0] if a.ndim == 3 else a).tolist())
    assert seen == REAL_RAW


@pytest.fixture(scope="module")
def real_raw(real_cadis):
    from PIL import Image

    raw = {}
    for f in real_cadis[1]:  # most maps are RGB (equal channels), some L or RGBA
        a = np.array(Image.open(f))
        raw[f.stem] = a[..., 0] if a.ndim == 3 else a
    return raw


def test_real_adapter_task2_hogmtl(real_cadis, real_raw):
    """The full adapter path (file -> checked label map -> remap -> presence) on all 40 maps."""
    ds = CaDIS(real_cadis[0], split="all", task=2, rare_as_class=True, images=False)
    assert len(ds) == 40 and ds.num_classes == 18 == len(ds.class_names)
    union = set()
    for i in range(len(ds)):
        s = ds[i]
        expected = _by_hand(real_raw[s["case_id"]], TASK2_HOG)
        assert torch.equal(s["mask"], torch.from_numpy(expected)), s["case_id"]
        present = set(np.unique(expected).tolist()) - {IGN}
        assert set(torch.nonzero(s["presence"]).flatten().tolist()) == present
        union |= present
    assert union == EXPECTED_SETS[(2, True)]


@pytest.mark.parametrize("task,rare", sorted(TABLES))
def test_real_remapping(real_cadis, real_raw, task, rare):
    ds = CaDIS(real_cadis[0], split="all", task=task, rare_as_class=rare, images=False)
    assert ds.num_classes == N_CLASSES[(task, rare)] == len(ds.class_names)
    union = set()
    for cid, raw in real_raw.items():
        got = ds.remap(raw, cid)
        assert np.array_equal(got, _by_hand(raw, TABLES[(task, rare)])), cid
        union |= set(np.unique(got).tolist())
    assert union == EXPECTED_SETS[(task, rare)]


def test_real_official_split(real_cadis):
    root, _ = real_cadis
    val = CaDIS(root, split="val", images=False)
    test = CaDIS(root, split="test", images=False)
    train = CaDIS(root, split="train", images=False)
    assert {r["video"] for r in val.records} == {7, 16}  # 5 is not in the sample
    assert {r["video"] for r in test.records} == {12}
    assert {r["video"] for r in train.records} == {8, 10, 14, 17, 19, 20, 21}
    assert len(val) + len(test) + len(train) == 40


# ----------------------------------------------------------------------------- fixture


@pytest.fixture
def cadis_root(tmp_path):
    written = write_cadis(tmp_path / "CaDIS", {1: [10, 20], 5: [30], 2: [40]})
    return tmp_path / "CaDIS", written


def test_fixture_reads_back(cadis_root):
    root, written = cadis_root
    ds = create_dataset("cadis", root, split="all", task=2, rare_as_class=True)
    assert len(ds) == 4
    for i in range(len(ds)):
        s = ds[i]
        img, lab = written[s["case_id"]]
        assert s["image"].shape == (3,) + lab.shape and s["image"].dtype == torch.float32
        assert torch.equal((s["image"] * 255).round().to(torch.uint8), torch.from_numpy(img).permute(2, 0, 1))
        assert torch.equal(s["mask"], torch.from_numpy(_by_hand(lab, TASK2_HOG)))
        assert torch.equal(s["spacing"], torch.ones(2))
    batch = collate([ds[i] for i in range(len(ds))])
    assert batch["image"].shape == (4, 3, 24, 32) and batch["mask"].shape == (4, 24, 32)
    assert batch["presence"].shape == (4, 18) and batch["n_skipped"] == 0


def test_fixture_splits(cadis_root):
    root, _ = cadis_root
    assert [r["video"] for r in CaDIS(root, split="train").records] == [1, 1]
    assert [r["video"] for r in CaDIS(root, split="val").records] == [5]
    assert [r["video"] for r in CaDIS(root, split="test").records] == [2]


def test_missing_root(tmp_path):
    with pytest.raises(MissingFileError, match=r"nope: cadis dataset root not found"):
        CaDIS(tmp_path / "nope")


def test_bad_task(cadis_root):
    with pytest.raises(ValueError, match="task must be 1, 2 or 3"):
        CaDIS(cadis_root[0], task=4)


def test_label_outside_encoding(cadis_root):
    root, written = cadis_root
    path = root / "Video01" / "Labels" / "Video1_frame000010.png"
    lab = written["Video1_frame000010"][1].copy()
    lab[0, 0] = 40
    write_png(path, lab)
    ds = CaDIS(root, split="train")
    with pytest.raises(DatasetError, match=r"Video1_frame000010\.png.*outside the encoding.*40 \(1 px\)"):
        ds[0]


def test_truncated_png_raise_and_skip(cadis_root):
    root, _ = cadis_root
    truncate(root / "Video01" / "Images" / "Video1_frame000020.png", 0.5)
    ds = CaDIS(root, split="train")
    with pytest.raises(DatasetError, match=r"Video1_frame000020\.png: image is truncated or corrupt"):
        ds[1]
    ds = CaDIS(root, split="train", on_error="skip")
    batch = collate([ds[0], ds[1]])
    assert batch["n_skipped"] == 1 and batch["image"].shape[0] == 1
    assert len(ds.skipped) == 1 and "Video1_frame000020.png" in ds.skipped[0][0]
    assert "1 sample(s) skipped" in ds.skip_report()
    assert ds.validate() and len(ds) == 1  # validate() drops the bad sample in skip mode


def test_size_mismatch(cadis_root):
    root, _ = cadis_root
    write_png(root / "Video02" / "Labels" / "Video2_frame000040.png", np.zeros((10, 10), np.uint8))
    with pytest.raises(DatasetError, match=r"Video2_frame000040\.png: size \(10, 10\) does not match \(24, 32\)"):
        CaDIS(root, split="test")[0]


def test_missing_label_file(cadis_root):
    root, _ = cadis_root
    (root / "Video05" / "Labels" / "Video5_frame000030.png").unlink()
    with pytest.raises(DatasetError, match=r"Video5_frame000030\.png: label map not found"):
        CaDIS(root, split="val")
    ds = CaDIS(root, split="all", on_error="skip")
    assert len(ds) == 3 and len(ds.skipped) == 1


def test_disk_index_cache(cadis_root, tmp_path):
    root, _ = cadis_root
    a = CaDIS(root, split="all", cache_dir=tmp_path / "cache")
    files = list((tmp_path / "cache").glob("cadis-index-*.json"))
    assert len(files) == 1
    CaDIS.clear_memory_cache()
    b = CaDIS(root, split="all", cache_dir=tmp_path / "cache")
    assert a.records == b.records
    # A changed download gets a new key, so it is re-indexed.
    write_cadis(root, {3: [1]})
    CaDIS.clear_memory_cache()
    c = CaDIS(root, split="all", cache_dir=tmp_path / "cache")
    assert len(c) == 5 and len(list((tmp_path / "cache").glob("cadis-index-*.json"))) == 2


# ----------------------------------------------------------------------------- every raw id

ALL_RAW = np.array(list(range(36)) + [255], np.uint8)


@pytest.fixture
def every_raw_id(tmp_path):
    """One frame per video whose label map holds every raw id 0..35 and 255 (the real maps lack
    9, 16, 21-24, 26-32 and 34), each id in a 2-pixel column, rows shifted per frame."""
    root = tmp_path / "CaDIS"
    labels = {}
    for v in (1, 2):
        lab = np.tile(np.repeat(np.roll(ALL_RAW, v), 2), (6, 1))
        name = f"Video{v}_frame000001.png"
        write_png(root / f"Video{v:02d}" / "Images" / name, np.zeros(lab.shape + (3,), np.uint8))
        write_png(root / f"Video{v:02d}" / "Labels" / name, lab)
        labels[f"Video{v}_frame000001"] = lab
    return root, labels


@pytest.mark.parametrize("task,rare", sorted(TABLES))
def test_every_raw_id_through_the_adapter(every_raw_id, task, rare):
    root, labels = every_raw_id
    ds = CaDIS(root, split="all", task=task, rare_as_class=rare)
    assert ds.num_classes == N_CLASSES[(task, rare)]
    for i in range(len(ds)):
        s = ds[i]
        raw = labels[s["case_id"]]
        assert set(np.unique(raw).tolist()) == set(ALL_RAW.tolist())
        assert torch.equal(s["mask"], torch.from_numpy(_by_hand(raw, TABLES[(task, rare)]))), (task, rare)
    # the hand tables themselves: every raw id has a target, and task 3 keeps 0..24 (24 included)
    assert set(TABLES[(task, rare)]) == set(ALL_RAW.tolist())
    if task == 3:
        assert [TABLES[(task, rare)][c] for c in range(25)] == list(range(25))


def test_label_table_defaults_and_bad_tasks():
    lut, k = cadis_lut(2)  # the official mapping unless the rare classes are asked for
    assert k == 17 and lut[25] == IGN
    for task in (0, -1, 4):
        with pytest.raises(ValueError, match="task must be 1, 2 or 3"):
            cadis_lut(task)


@pytest.mark.parametrize("task,rare", sorted(TABLES))
def test_raw_values_past_35_are_errors(tmp_path, task, rare):
    """36..254 are no CaDIS class: an error in every task (not ignore, not a class)."""
    root = tmp_path / "CaDIS"
    lab = np.zeros((4, 6), np.uint8)
    lab[1, 2] = 36
    name = "Video1_frame000001.png"
    write_png(root / "Video01" / "Images" / name, np.zeros((4, 6, 3), np.uint8))
    write_png(root / "Video01" / "Labels" / name, lab)
    ds = CaDIS(root, split="all", task=task, rare_as_class=rare)
    with pytest.raises(DatasetError, match="36"):
        ds[0]
    lut, _ = cadis_lut(task, rare)
    assert (lut[36:255] == -1).all()
