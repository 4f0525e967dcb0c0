"""EndoVis 2017 (per-instrument masks, crop, folds) and EndoVis 2018 (labels.json colours, scenes)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dataset_writers import LABELS18_JSON, truncate, write_endovis17, write_endovis18, write_png
from mtseg_harness.data import (DatasetError, EndoVis2017, EndoVis2018, collate, create_dataset,
                                decode_colour_label, read_labels_json)
from mtseg_harness.data.endovis import LABELS18

# ----------------------------------------------------------------------------- 2018 real labels.json


def test_real_labels_json(shared_data):
    path = shared_data / "endovis18" / "labels.json"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    table = read_labels_json(path)
    assert len(table) == 12
    assert table[0] == ("background-tissue", (0, 0, 0), 0)
    assert table[3] == ("instrument-wrist", (125, 255, 12), 3)
    assert table[11] == ("ultrasound-probe", (12, 255, 141), 11)
    assert table == list(LABELS18)  # the built-in fallback is the published table
    # Decode an image holding every colour of the file, in a known layout.
    colours = np.array([c for _, c, _ in table], np.uint8)
    ids = np.arange(12).reshape(3, 4).repeat(2, 0).repeat(2, 1)
    assert np.array_equal(decode_colour_label(colours[ids], table), ids)
    # One channel off by one is not a near match: it is an error that names the colour.
    bad = colours[ids].copy()
    bad[0, 0] = (125, 255, 13)
    with pytest.raises(DatasetError, match=r"colour\(s\) not in labels.json: \(125, 255, 13\) x1"):
        decode_colour_label(bad, table, "x.png")


def test_endovis18_fixture_reads_back(tmp_path):
    root = tmp_path / "ev18"
    written = write_endovis18(root, seqs=(1, 2, 3, 6))
    (root / "labels.json").write_text(json.dumps(LABELS18_JSON))
    ds = create_dataset("endovis18", root, split="all")
    assert ds.num_classes == 12 and len(ds) == 8
    scenes = {1: 0, 2: 0, 3: 1, 6: 2}
    for i, rec in enumerate(ds.records):
        s = ds[i]
        img, ids = written[(rec["seq"], int(rec["case_id"][-3:]))]
        assert torch.equal(s["mask"], torch.from_numpy(ids))
        assert torch.equal((s["image"] * 255).round().to(torch.uint8), torch.from_numpy(img).permute(2, 0, 1))
        assert int(s["scene"]) == scenes[rec["seq"]]
        assert s["presence"].sum() > 0
    assert {r["seq"] for r in EndoVis2018(root, split="val").records} == {2}
    assert {r["seq"] for r in EndoVis2018(root, split="train").records} == {1, 3, 6}
    assert {r["seq"] for r in EndoVis2018(root, split="val", val_sequences=(3, 6)).records} == {3, 6}


def test_endovis18_unknown_colour_and_skip(tmp_path):
    root = tmp_path / "ev18"
    written = write_endovis18(root, seqs=(1,))
    lab = np.array(LABELS18_JSON[0]["color"], np.uint8)[None, None].repeat(16, 0).repeat(20, 1)
    lab[3, 4] = (1, 2, 3)
    write_png(root / "seq_1" / "labels" / "frame001.png", lab)
    ds = EndoVis2018(root, split="all")
    with pytest.raises(DatasetError, match=r"seq_1/labels/frame001\.png: colour\(s\) not in labels.json: \(1, 2, 3\) x1"):
        ds[1]
    ds = EndoVis2018(root, split="all", on_error="skip")
    assert ds[0] is not None and ds[1] is None
    assert collate([ds[0], ds[1]])["n_skipped"] == 1


def test_endovis18_bad_labels_json(tmp_path):
    root = tmp_path / "ev18"
    write_endovis18(root, seqs=(1,))
    (root / "labels.json").write_text(json.dumps([{"name": "a", "color": [0, 0, 0], "classid": 1}]))
    with pytest.raises(DatasetError, match=r"labels.json: labels.json class ids must be 0..0"):
        EndoVis2018(root)


# ----------------------------------------------------------------------------- 2017


@pytest.fixture(scope="module")
def ev17(tmp_path_factory):
    root = tmp_path_factory.mktemp("ev17")
    written = write_endovis17(root, videos=(1, 2, 9), frames=(0,))
    return root, written


@pytest.mark.parametrize("target", ["binary", "parts", "type"])
def test_endovis17_targets_and_crop(ev17, target):
    root, written = ev17
    ds = EndoVis2017(root, split="all", target=target)
    s = ds[0]
    img, masks = written[(1, 0)]
    assert s["image"].shape == (3, 1024, 1280) and s["mask"].shape == (1024, 1280)
    assert torch.equal((s["image"] * 255).round().to(torch.uint8),
                       torch.from_numpy(img[28:1052, 320:1600]).permute(2, 0, 1))
    m = s["mask"].numpy()
    # Folders sorted: Left_Prograsp_Forceps (rows 30:70), Maryland_Bipolar_Forceps (90:130), Other (150:190)
    # in full-frame rows; the crop moves rows by -28 and columns by -320.
    pro, bip, oth = (slice(2, 42), slice(62, 102), slice(122, 162))
    shaft, wrist, clasp = slice(10, 40), slice(40, 60), slice(60, 80)
    if target == "binary":
        assert (m[pro, 10:80] == 1).all() and (m[bip, 10:80] == 1).all() and (m[oth, 10:80] == 0).all()
        assert m.sum() == 2 * 40 * 70
    elif target == "parts":
        for rows in (pro, bip):
            assert (m[rows, shaft] == 1).all() and (m[rows, wrist] == 2).all() and (m[rows, clasp] == 3).all()
        assert (m[oth] == 0).all()
    else:
        assert (m[pro, 10:80] == 2).all() and (m[bip, 10:80] == 1).all() and (m[oth, 10:80] == 7).all()
    inst = s["instances"].numpy()
    assert (inst[pro, 10:80] == 1).all() and (inst[bip, 10:80] == 2).all() and (inst[oth, 10:80] == 3).all()
    assert (inst > 0).sum() == 3 * 40 * 70
    assert ds.num_classes == {"binary": 2, "parts": 4, "type": 8}[target]


def test_endovis17_folds_and_test_videos(ev17):
    root, _ = ev17
    assert {r["video"] for r in EndoVis2017(root, split="val", fold=0).records} == {1}
    assert {r["video"] for r in EndoVis2017(root, split="train", fold=0).records} == {2}
    assert {r["video"] for r in EndoVis2017(root, split="val", fold=1).records} == {2}
    assert {r["video"] for r in EndoVis2017(root, split="train", fold=1).records} == {1}
    assert {r["video"] for r in EndoVis2017(root, split="test").records} == {9}
    with pytest.raises(DatasetError, match="no endovis17 samples for split 'val'"):
        EndoVis2017(root, split="val", fold=2)  # videos 4 and 8 are not in the fixture


def test_endovis17_bad_inputs(tmp_path):
    root = tmp_path / "ev17"
    write_endovis17(root, videos=(1,), frames=(0, 1, 2), size=(60, 420),
                    instruments=["Bipolar_Forceps_labels", "Weird_Tool_labels"])
    ds = EndoVis2017(root, split="all", crop=False)
    with pytest.raises(DatasetError, match="unknown instrument folder 'Weird_Tool_labels'"):
        ds[0]
    root2 = tmp_path / "ev17b"
    write_endovis17(root2, videos=(1,), frames=(0, 1, 2), size=(60, 420), instruments=["Bipolar_Forceps_labels"])
    gt = root2 / "instrument_dataset_1" / "ground_truth" / "Bipolar_Forceps_labels"
    bad = np.zeros((60, 420), np.uint8)
    bad[5, 5] = 15
    write_png(gt / "frame000.png", bad)
    write_png(gt / "frame001.png", np.zeros((30, 420), np.uint8))
    truncate(root2 / "instrument_dataset_1" / "left_frames" / "frame002.png", 0.3)
    ds = EndoVis2017(root2, split="all", crop=False)
    with pytest.raises(DatasetError, match=r"frame000\.png: instrument mask holds values outside the encoding \[0, 10, 20, 30\]: 15"):
        ds[0]
    with pytest.raises(DatasetError, match=r"frame001\.png: size \(30, 420\) does not match \(60, 420\)"):
        ds[1]
    with pytest.raises(DatasetError, match=r"left_frames/frame002\.png: image is truncated or corrupt"):
        ds[2]
    with pytest.raises(DatasetError, match=r"left_frames/frame000\.png: crop=True expects 1920x1080 frames, got 420x60"):
        EndoVis2017(root2, split="all")[0]
    skip = EndoVis2017(root2, split="all", crop=False, on_error="skip")
    assert skip.validate() and len(skip) == 0 and len(skip.skipped) == 3


def test_endovis18_palette_png_labels_decode_by_colour(tmp_path):
    """A colour label saved as a palette PNG is decoded by its colours, not its palette indices."""
    from PIL import Image

    root = tmp_path / "ev18"
    written = write_endovis18(root, seqs=(4,), frames=(0,))
    ids = written[(4, 0)][1]
    colours = np.array([e["color"] for e in LABELS18_JSON], np.uint8)
    pal = Image.fromarray(colours[ids]).quantize(colors=12, method=Image.Quantize.MEDIANCUT)
    assert pal.mode == "P"
    pal.save(root / "seq_4" / "labels" / "frame000.png")
    assert torch.equal(EndoVis2018(root, split="all")[0]["mask"], torch.from_numpy(ids))


def test_endovis17_hogmtl_protocol_trains_on_videos_1_to_8_and_tests_on_9_10(tmp_path):
    # fold=None: videos 1..8 train, their last val_frames frames (by number) validate; 9, 10 test
    root = tmp_path / "ev17"
    write_endovis17(root, videos=(1, 8, 9, 10), frames=(0, 2, 999, 1000), size=(60, 420))
    ds = lambda split, **kw: EndoVis2017(root, split=split, crop=False, fold=None, **kw)  # noqa: E731
    # by name frame1000 sorts before frame999: the split must go by frame number
    val = sorted(r["case_id"] for r in ds("val", val_frames=1).records)
    assert val == ["instrument_dataset_1/frame1000", "instrument_dataset_8/frame1000"]
    val = sorted(r["case_id"] for r in ds("val", val_frames=2).records)
    assert val == ["instrument_dataset_1/frame1000", "instrument_dataset_1/frame999",
                   "instrument_dataset_8/frame1000", "instrument_dataset_8/frame999"]
    train = sorted(r["case_id"] for r in ds("train", val_frames=2).records)
    assert train == ["instrument_dataset_1/frame000", "instrument_dataset_1/frame002",
                     "instrument_dataset_8/frame000", "instrument_dataset_8/frame002"]
    assert {r["video"] for r in ds("test").records} == {9, 10} and len(ds("test").records) == 8
    assert len(ds("train", val_frames=0).records) == 8  # every frame of 1..8 trains
    assert len(ds("val", val_frames=9).records) == 8 and len(ds("all").records) == 16
    with pytest.raises(ValueError, match="fold must be 0..3 or None"):
        EndoVis2017(root, fold=4)
    with pytest.raises(ValueError, match="val_frames must be an integer >= 0"):
        EndoVis2017(root, fold=None, val_frames=-1)
