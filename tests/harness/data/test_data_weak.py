"""Weak labels for the recursive-approximation method: inside, off the boundary, reproducible, sized."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from scipy import ndimage

from dataset_writers import write_glas, write_png
from mtseg_harness.data import DatasetError, GlaS, WeakLabels, make_weak_labels, read_weak_labels, weak_region


def scene():
    """Instances: a big ellipse, a rectangle touching the image border, two touching squares, a 2-px strip."""
    inst = np.zeros((64, 80), np.int64)
    yy, xx = np.mgrid[:64, :80]
    inst[((yy - 20) / 14) ** 2 + ((xx - 25) / 18) ** 2 <= 1] = 1
    inst[40:64, 0:20] = 2          # touches the image border
    inst[40:56, 30:46] = 3
    inst[40:56, 46:62] = 4         # touches instance 3
    inst[5:7, 55:78] = 5           # 2 px thick: too thin for an inner region
    mask = np.where(inst == 0, 0, np.where(inst % 2 == 0, 2, 1))
    return mask, inst


def boundary8(obj):
    """Object pixels with an 8-neighbour outside the object (the image border counts as outside)."""
    padded = np.pad(obj, 1, constant_values=False)
    inner = ndimage.binary_erosion(padded, np.ones((3, 3), bool))[1:-1, 1:-1]
    return obj & ~inner


@pytest.mark.parametrize("jitter", [0.0, 0.4])
@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_inside_never_touching_boundary_and_nonempty(jitter, ratio):
    mask, inst = scene()
    weak, weak_inst = make_weak_labels(mask, inst, shrink_ratio=ratio, jitter=jitter, seed=3)
    for i in range(1, 6):
        obj = inst == i
        region = weak_inst == i
        assert (region <= obj).all()                       # inside its own instance
        assert not (region & boundary8(obj)).any()         # never on its boundary
        d = ndimage.distance_transform_edt(np.pad(obj, 1))[1:-1, 1:-1]
        assert (d[region] >= 2).all()                      # >= 1 px between region and boundary
        if i == 5:
            assert not region.any()                        # too thin
        else:
            assert region.any()
            assert ndimage.label(region)[1] == 1           # one connected blob
            assert (weak[region] == mask[obj][0]).all()    # keeps its class
    assert (weak[weak_inst == 0] == 0).all()


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.6])
def test_shrink_ratio_respected(ratio):
    mask, inst = scene()
    for jitter, tol in ((0.0, 0.03), (0.3, 0.08)):
        _, weak_inst = make_weak_labels(mask, inst, shrink_ratio=ratio, jitter=jitter, seed=1)
        for i in (1, 2, 3):  # instances whose eligible interior is larger than the target
            got = (weak_inst == i).sum() / (inst == i).sum()
            assert abs(got - ratio) <= tol, (i, jitter, got)


def test_reproducible_by_seed():
    mask, inst = scene()
    a = make_weak_labels(mask, inst, jitter=0.5, seed=7)
    b = make_weak_labels(mask, inst, jitter=0.5, seed=7)
    c = make_weak_labels(mask, inst, jitter=0.5, seed=8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[1], c[1])


def test_instances_from_class_mask_and_tensors_and_3d():
    mask, inst = scene()
    weak, weak_inst = make_weak_labels(torch.from_numpy(mask), seed=0, jitter=0.2)
    assert isinstance(weak, torch.Tensor) and weak.dtype == torch.int64
    # Squares 3 and 4 touch and share no class (1 vs 2) -> separate components; all regions inside the mask.
    assert ((weak > 0) <= torch.from_numpy(mask > 0)).all()
    vol = np.zeros((12, 20, 20), np.int64)
    vol[2:10, 3:15, 4:16] = 1
    w3, i3 = make_weak_labels(vol, shrink_ratio=0.3, jitter=0.3, seed=0)
    d = ndimage.distance_transform_edt(np.pad(vol, 1))[1:-1, 1:-1, 1:-1]
    assert i3.any() and (d[i3 > 0] >= 2).all()
    ignore = mask.copy()
    ignore[0, :] = 255
    assert (make_weak_labels(ignore, seed=0)[0][0] == 255).all()


def test_weak_region_arguments():
    with pytest.raises(ValueError, match="shrink_ratio"):
        weak_region(np.ones((5, 5), bool), shrink_ratio=0)
    assert not weak_region(np.zeros((5, 5), bool)).any()


def test_wrapper_generated_and_from_files(tmp_path):
    root = tmp_path / "glas"
    write_glas(root)
    base = GlaS(root, split="train")
    ds = WeakLabels(base, shrink_ratio=0.3, seed=2)
    s1, s2 = ds[0], ds[0]
    assert torch.equal(s1["weak"], s2["weak"]) and s1["strong"] is False
    assert ((s1["weak_instances"] > 0) <= (s1["instances"] > 0)).all()
    assert ds.num_classes == 2  # attributes pass through
    strong = WeakLabels(base, strong_fraction=1.0)
    assert strong[1]["strong"] is True and torch.equal(strong[1]["weak"], strong[1]["mask"])

    wdir = tmp_path / "weak"
    w = np.zeros((24, 30), np.uint8)
    w[4:7, 5:9] = 1
    write_png(wdir / "train_1.png", w)
    write_png(wdir / "train_2.png", np.zeros((10, 10), np.uint8))
    from_files = WeakLabels(base, weak_dir=wdir)
    got = from_files[0]
    assert torch.equal(got["weak"], torch.from_numpy(w.astype(np.int64)))
    assert int(got["weak_instances"].max()) == 1
    with pytest.raises(DatasetError, match=r"train_2\.png: size \(10, 10\) does not match \(24, 30\)"):
        from_files[1]
    w[0, 0] = 7
    write_png(wdir / "bad.png", w)
    with pytest.raises(DatasetError, match=r"bad\.png: weak label values \[7\] outside 0..1"):
        read_weak_labels(wdir / "bad.png", (24, 30), num_classes=2)
    with pytest.raises(DatasetError, match=r"nope\.png: weak label map not found"):
        read_weak_labels(wdir / "nope.png")


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), ratio=st.floats(0.05, 0.9), jitter=st.floats(0.0, 1.0))
def test_property_random_blobs(seed, ratio, jitter):
    """Random blobby instance maps: every weak region is inside its instance, off its boundary,
    and present whenever the instance has an interior (a pixel at distance >= 2 from outside)."""
    r = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(r.standard_normal((40, 48)), 3)
    inst, _ = ndimage.label(field > 0.05)
    _, weak_inst = make_weak_labels((inst > 0).astype(np.int64), inst, shrink_ratio=ratio, jitter=jitter, seed=seed)
    for i in range(1, int(inst.max()) + 1):
        obj = inst == i
        region = weak_inst == i
        d = ndimage.distance_transform_edt(np.pad(obj, 1))[1:-1, 1:-1]
        assert (region <= obj).all() and (d[region] >= 2).all()
        assert region.any() == (d >= 2).any()
