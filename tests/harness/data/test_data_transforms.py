"""Batched augmentation: image and labels move together, labels keep their values, seeds reproduce."""

from __future__ import annotations

import pytest
import torch

from mtseg_harness.data import BatchAugment, collate


def coordinate_batch(b=3, h=40, w=40, device="cpu"):
    """Image channels = source (row, col, 1); ``instances`` = 1 + row * w + col (a unique id per pixel).

    The channel of ones marks output pixels whose bilinear sample saw only real pixels (< 1
    where the zero padding outside the input took part)."""
    rows = torch.arange(h, dtype=torch.float64).view(h, 1).expand(h, w)
    cols = torch.arange(w, dtype=torch.float64).view(1, w).expand(h, w)
    image = torch.stack([rows, cols, torch.ones_like(rows)]).unsqueeze(0).repeat(b, 1, 1, 1).to(device)
    ids = (1 + rows * w + cols).long().unsqueeze(0).repeat(b, 1, 1).to(device)
    mask = (ids % 5).clone()
    return {"image": image, "instances": ids, "mask": mask}


def _check_alignment(out, h, w):
    """Where the image's bilinear coordinates are away from the border, the nearest-sampled id
    must be the pixel nearest to those coordinates (within half a pixel per axis)."""
    ids = out["instances"]
    r_img, c_img = out["image"][:, 0], out["image"][:, 1]
    valid = (ids > 0) & (out["image"][:, 2] > 1 - 1e-9)
    assert valid.float().mean() > 0.3
    r_id = ((ids - 1) // w).double()
    c_id = ((ids - 1) % w).double()
    assert ((r_id - r_img).abs()[valid] <= 0.5 + 1e-6).all()
    assert ((c_id - c_img).abs()[valid] <= 0.5 + 1e-6).all()
    # mask went through the same transform as the ids
    inside = ids > 0
    assert torch.equal(out["mask"][inside], ((ids - 1 + 1) % 5)[inside])


@pytest.mark.parametrize("shape", [(40, 40), (36, 52)])
def test_geometry_keeps_image_and_labels_aligned(device, shape):
    h, w = shape
    batch = coordinate_batch(4, h, w, device)
    aug = BatchAugment(flip_prob=0.5, rot90=True, rotate=35, scale=(0.8, 1.3), seed=0)
    for _ in range(3):
        out = aug(batch)
        assert out["image"].shape == batch["image"].shape and out["image"].device == batch["image"].device
        _check_alignment(out, h, w)


def test_exact_moves_are_exact(device):
    """Flips, 90 degree rotations and crops move pixels without interpolation: an image that
    encodes the mask equals the transformed mask exactly."""
    batch = coordinate_batch(5, 32, 32, device)
    batch["image"] = batch["mask"].unsqueeze(1).float()
    out = BatchAugment(flip_prob=0.5, rot90=True, crop=(20, 24), seed=3)(batch)
    assert out["image"].shape == (5, 1, 20, 24) and out["mask"].shape == (5, 20, 24)
    assert torch.equal(out["image"][:, 0].long(), out["mask"])
    # the ids are a permutation of a 20x24 window of the source: each id at most once
    for i in range(5):
        assert out["instances"][i].unique().numel() == 20 * 24


def test_label_values_preserved_and_fill():
    batch = coordinate_batch(2, 30, 30)
    batch["mask"] = (batch["instances"] % 7) * 10  # values 0..60
    out = BatchAugment(rotate=45, scale=(0.6, 0.7), seed=1)(batch)
    before = set(batch["mask"].unique().tolist())
    after = set(out["mask"].unique().tolist())
    assert after <= before | {255} and 255 in after  # zoom-out exposes the padding: ignore
    assert 0 in set(out["instances"].unique().tolist())  # instances pad with 0


def test_reproducible_by_seed():
    batch = coordinate_batch(3, 24, 24)
    kw = dict(flip_prob=0.5, rot90=True, rotate=20, scale=(0.9, 1.1), crop=(16, 16), brightness=0.1,
              contrast=0.2, noise_std=0.05)
    a, b, c = BatchAugment(seed=5, **kw), BatchAugment(seed=5, **kw), BatchAugment(seed=6, **kw)
    for _ in range(2):
        oa, ob, oc = a(batch), b(batch), c(batch)
        assert all(torch.equal(oa[k], ob[k]) for k in ("image", "mask", "instances"))
        assert not torch.equal(oa["image"], oc["image"])


def test_intensity_only_touches_the_image():
    batch = coordinate_batch(2, 16, 16)
    aug = BatchAugment(flip_prob=0.0, brightness=0.5, seed=0)
    params = aug.sample_params(2, (16, 16))
    out = aug.apply(batch, params)
    assert torch.equal(out["mask"], batch["mask"]) and torch.equal(out["instances"], batch["instances"])
    shift = params["shift"].view(2, 1, 1, 1)
    assert torch.allclose(out["image"], batch["image"] + shift)


def test_3d_batches(device):
    b, d, h, w = 2, 6, 20, 20
    image = torch.rand(b, 4, d, h, w, device=device)
    mask = torch.randint(0, 4, (b, d, h, w), device=device)
    regions = torch.randint(0, 2, (b, 3, d, h, w), device=device, dtype=torch.uint8)
    aug = BatchAugment(flip_axes=(-3, -2, -1), rot90=True, rotate=30, scale=(0.9, 1.1), crop=(4, 16, 16), seed=0)
    out = aug({"image": image, "mask": mask, "regions": regions})
    assert out["image"].shape == (b, 4, 4, 16, 16) and out["mask"].shape == (b, 4, 16, 16)
    assert out["regions"].shape == (b, 3, 4, 16, 16) and out["regions"].dtype == torch.uint8
    assert set(out["mask"].unique().tolist()) <= {0, 1, 2, 3, 255}
    # 3D coordinate check: a depth-encoding label and image stay in step (rotation is in-plane).
    z = torch.arange(d, device=device).view(1, d, 1, 1).expand(b, d, h, w)
    out = BatchAugment(flip_axes=(-3,), flip_prob=1.0, seed=0)({"image": z.unsqueeze(1).float(), "mask": z.clone()})
    assert torch.equal(out["image"][:, 0].long(), out["mask"]) and int(out["mask"][0, 0, 0, 0]) == d - 1


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"image must be \(B, C, H, W\)"):
        BatchAugment()({"image": torch.zeros(3, 8, 8)})
    with pytest.raises(ValueError, match="spatial sizes must match"):
        BatchAugment(seed=0)({"image": torch.zeros(1, 1, 8, 8), "mask": torch.zeros(1, 8, 9, dtype=torch.long)})
    with pytest.raises(ValueError, match="larger than the images"):
        BatchAugment(crop=(10, 10))({"image": torch.zeros(1, 1, 8, 8)})


def test_collate():
    s = [{"image": torch.zeros(1, 4, 4), "mask": torch.zeros(4, 4, dtype=torch.long), "case_id": f"c{i}",
          "scene": torch.tensor(i), "strong": i == 0} for i in range(3)]
    b = collate([s[0], None, s[1], s[2]])
    assert b["image"].shape == (3, 1, 4, 4) and b["case_id"] == ["c0", "c1", "c2"] and b["n_skipped"] == 1
    assert b["scene"].tolist() == [0, 1, 2] and b["strong"].tolist() == [True, False, False]
    s[2]["image"] = torch.zeros(1, 5, 4)
    with pytest.raises(ValueError, match=r"cannot stack 'image'.*cases \['c0', 'c1', 'c2'\]"):
        collate(s)
    assert collate([None, None]) == {"n_skipped": 2}


def test_presence_follows_the_crop():
    mask = torch.zeros(2, 20, 20, dtype=torch.long)
    mask[:, :5, :5] = 2   # only in the top-left corner
    mask[:, 10:, :] = 1
    mask[:, 0, 19] = 255
    presence = torch.tensor([[1.0, 1.0, 1.0]] * 2)
    aug = BatchAugment(flip_prob=0.0, crop=(10, 10), seed=0)
    params = aug.sample_params(2, (20, 20))
    params["crop_start"] = torch.tensor([[10, 10], [0, 0]])
    out = aug.apply({"image": torch.zeros(2, 1, 20, 20), "mask": mask, "presence": presence}, params)
    assert out["presence"].tolist() == [[0.0, 1.0, 0.0], [1.0, 0.0, 1.0]]


def test_brightness_factor_contrast_and_rgb_shift_by_hand():
    """TDSNet's ROBOT18 intensity recipe: out = ((x - mean) * gain + mean) * factor + channel shift."""
    x = torch.tensor([[[[0.0, 0.2], [0.4, 0.6]], [[1.0, 1.0], [0.0, 0.0]], [[0.3, 0.3], [0.3, 0.3]]]])  # (1, 3, 2, 2)
    aug = BatchAugment(flip_prob=0.0, contrast=0.1, brightness_factor=(0.9, 1.1), rgb_shift=0.05, seed=0)
    params = {"flip": {}, "gain": torch.tensor([1.1], dtype=torch.float64),
              "factor": torch.tensor([0.9], dtype=torch.float64),
              "channel_shift": torch.tensor([[0.01, -0.02, 0.03]], dtype=torch.float64)}
    out = aug.apply({"image": x, "mask": torch.zeros(1, 2, 2, dtype=torch.long)}, params)["image"]
    mean = (0.0 + 0.2 + 0.4 + 0.6 + 1.0 + 1.0 + 0.3 * 4) / 12  # over channels and pixels of the image
    expected = torch.stack([((x[0, c] - mean) * 1.1 + mean) * 0.9 + s for c, s in enumerate((0.01, -0.02, 0.03))])
    torch.testing.assert_close(out[0], expected)
    # sampled: factor in [0.9, 1.1], a shift per image and channel within +-0.05
    p = aug.sample_params(64, (2, 2), channels=3)
    assert 0.9 <= p["factor"].min() and p["factor"].max() <= 1.1 and p["factor"].std() > 0.03
    assert p["channel_shift"].shape == (64, 3) and p["channel_shift"].abs().max() <= 0.05
    assert (p["channel_shift"][:, 0] != p["channel_shift"][:, 1]).all()
    with pytest.raises(ValueError, match="brightness_factor"):
        BatchAugment(brightness_factor=(1.1, 0.9))
    with pytest.raises(ValueError, match="rgb_shift"):
        BatchAugment(rgb_shift=-0.1)
    with pytest.raises(ValueError, match="drawn for 3 channels"):
        aug.apply({"image": torch.zeros(1, 1, 2, 2)}, aug.sample_params(1, (2, 2), channels=3))
