"""hc18_tiles: HC18 cut into a grid of tiles (the demo's data): crops, per-tile presence, splits by image, stitching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dataset_writers import write_hc18
from mtseg_harness.data import HC18, DatasetError, create_dataset, stitch


@pytest.fixture
def root(tmp_path):
    write_hc18(tmp_path, n=12, size=(54, 80))  # ellipse centred at (row 27, col 40)
    return tmp_path


def test_tiles_are_the_crops_of_each_image_with_their_own_presence(root):
    whole = {s["case_id"]: s for s in (HC18(root, "all")[i] for i in range(12))}
    tiles = create_dataset("hc18_tiles", root, split="all", tile=[27, 20], image_size=[54, 80])
    assert len(tiles) == 12 * 2 * 4
    seen = set()
    for i in range(len(tiles)):
        t = tiles[i]
        r, c = t["tile_origin"].tolist()
        full = whole[t["image_id"]]
        assert t["case_id"] == f"{t['image_id']}@{r}x{c}"
        assert torch.equal(t["image"], full["image"][:, r:r + 27, c:c + 20])
        m = full["mask"].numpy()[r:r + 27, c:c + 20]
        assert np.array_equal(t["mask"].numpy(), m)
        assert t["presence"].tolist() == [float((m == 0).any()), float((m == 1).any())]
        assert "hc_mm" not in t
        seen.add((t["image_id"], r, c))
    assert len(seen) == len(tiles)
    presence = torch.stack([tiles[i]["presence"] for i in range(len(tiles))])
    # the corner tiles miss the small central ellipse: presence of the head varies
    assert 0 < presence[:, 1].sum() < len(tiles)


def test_a_split_holds_every_tile_of_its_images_and_no_other(root):
    for split in ("train", "val", "test"):
        images = {HC18(root, split)[i]["case_id"] for i in range(len(HC18(root, split)))}
        tiles = create_dataset("hc18_tiles", root, split=split, tile=[27, 40], image_size=[54, 80])
        ids = [tiles[i]["image_id"] for i in range(len(tiles))]
        assert set(ids) == images and len(ids) == 4 * len(images)


def test_the_tiles_of_an_image_stitch_back_to_it(root):
    tiles = create_dataset("hc18_tiles", root, split="all", tile=[18, 40], image_size=[54, 80])
    mine = [tiles[i] for i in range(len(tiles)) if tiles[i]["image_id"] == "001_HC"]
    full = [s for s in (HC18(root, "all")[i] for i in range(12)) if s["case_id"] == "001_HC"][0]
    origins = [t["tile_origin"].tolist() for t in mine]
    assert torch.equal(stitch([t["mask"] for t in mine], origins, (54, 80)), full["mask"])
    assert torch.equal(stitch([t["image"] for t in mine], origins, (54, 80)), full["image"])


def test_stitch_refuses_gaps_overlaps_and_tiles_outside():
    t = torch.ones(2, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match="cover 4 pixels of the image zero times and 0 more"):
        stitch([t], [(0, 0)], (2, 4))
    with pytest.raises(ValueError, match="cover 0 pixels of the image zero times and 4 more than once"):
        stitch([t, t, t], [(0, 0), (0, 2), (0, 1)], (2, 4))
    with pytest.raises(ValueError, match="does not fit"):
        stitch([t, t], [(0, 0), (0, 3)], (2, 4))
    with pytest.raises(ValueError, match="as many origins"):
        stitch([t], [], (2, 2))


def test_sizes_that_do_not_tile_are_clear_errors(root):
    with pytest.raises(ValueError, match="multiple of tile"):
        create_dataset("hc18_tiles", root, split="all", tile=[25, 40], image_size=[54, 80])
    with pytest.raises(ValueError, match="two positive sizes"):
        create_dataset("hc18_tiles", root, split="all", tile=[0, 40], image_size=[54, 80])
    ds = create_dataset("hc18_tiles", root, split="all", tile=[27, 40], image_size=[54, 40])  # the files are 54 x 80
    with pytest.raises(DatasetError, match="54 x 80"):
        ds[0]
