"""Distance operators (edt, connected_components, levelset_grow, grow_instances) against
scipy.ndimage and against their contracts.

References are independent of our kernels: scipy's distance_transform_edt / label /
binary_erosion, and the formulas written out in numpy (mtseg_kernels.reference.distance).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from distance_testing import cadis_label_maps, hc18_masks
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import ndimage as ndi

import mtseg_kernels as mk
from mtseg_kernels.reference.distance import (
    edt_reference,
    levelset_grow_reference,
    signed_edt_reference,
)

TOL = 1e-4
FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def random_masks(rng, shape, p_fg=0.8):
    return rng.random(shape) < p_fg


@st.composite
def mask_cases(draw, spatial=None):
    spatial = draw(st.sampled_from([2, 3])) if spatial is None else spatial
    dims = [draw(st.integers(1, 24 if spatial == 3 else 48)) for _ in range(spatial)]
    batch = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    p = draw(st.sampled_from([0.3, 0.8, 0.97, 1.0]))
    spacing = draw(
        st.one_of(st.none(), st.lists(st.floats(0.2, 4.0, allow_nan=False), min_size=spatial, max_size=spatial))
    )
    mask = np.random.default_rng(seed).random([batch, *dims]) < p
    return mask, spacing


# --------------------------------------------------------------------------------------
# edt
# --------------------------------------------------------------------------------------
@FAST
@given(mask_cases())
def test_edt_matches_scipy_random(case):
    mask, spacing = case
    ref = edt_reference(mask, spacing)
    for dtype in (torch.float32, torch.float64):
        got = mk.edt(torch.from_numpy(mask), spacing, dtype=dtype)
        assert got.dtype == dtype
        np.testing.assert_allclose(got.numpy(), ref, rtol=0, atol=TOL)


@FAST
@given(mask_cases())
def test_edt_squared_and_signed_random(case):
    mask, spacing = case
    ref = edt_reference(mask, spacing)
    sq = mk.edt(torch.from_numpy(mask), spacing, squared=True, dtype=torch.float64).numpy()
    np.testing.assert_allclose(sq, ref**2, rtol=1e-12, atol=1e-9)
    signed = mk.signed_edt(torch.from_numpy(mask), spacing).numpy()
    np.testing.assert_allclose(signed, signed_edt_reference(mask, spacing), rtol=0, atol=TOL)


@pytest.mark.parametrize("spacing", [None, (0.5, 1.7), (3.0, 0.25)])
def test_edt_large_2d(spacing):
    mask = random_masks(np.random.default_rng(0), (2, 301, 257), 0.995)
    got = mk.edt(torch.from_numpy(mask), spacing).numpy()
    np.testing.assert_allclose(got, edt_reference(mask, spacing), rtol=0, atol=TOL)


@pytest.mark.parametrize("spacing", [None, (2.5, 0.9, 1.1)])
def test_edt_3d_volume(spacing):
    mask = np.zeros((2, 31, 45, 38), dtype=bool)
    mask[0, 3:28, 5:40, 4:30] = True
    mask[1] = ndi.binary_dilation(np.random.default_rng(1).random((31, 45, 38)) < 0.01, iterations=4)
    got = mk.edt(torch.from_numpy(mask), spacing).numpy()
    np.testing.assert_allclose(got, edt_reference(mask, spacing), rtol=0, atol=TOL)


def test_edt_real_hc18_masks(shared_data):
    masks, pixel = hc18_masks(shared_data, 4)
    got = mk.edt(torch.from_numpy(masks)).numpy()
    np.testing.assert_allclose(got, edt_reference(masks), rtol=0, atol=TOL)
    for m, s in zip(masks, pixel):  # physical units with the image's pixel size
        got = mk.edt(torch.from_numpy(m[None]), (s, s), dtype=torch.float64).numpy()[0]
        np.testing.assert_allclose(got, ndi.distance_transform_edt(m, sampling=(s, s)), rtol=0, atol=1e-9)


def test_edt_real_cadis_class_masks(shared_data):
    labels = cadis_label_maps(shared_data, 3)
    masks = np.concatenate([labels == c for c in (0, 4, 7)])
    got = mk.edt(torch.from_numpy(masks), (1.0, 0.5)).numpy()
    np.testing.assert_allclose(got, edt_reference(masks, (1.0, 0.5)), rtol=0, atol=TOL)


def test_edt_special_masks():
    zeros = torch.zeros(2, 9, 11, dtype=torch.bool)
    assert (mk.edt(zeros) == 0).all()
    ones = torch.ones(1, 4, 5, 6)
    assert torch.isinf(mk.edt(ones)).all() and (mk.edt(ones) > 0).all()
    assert (mk.signed_edt(ones) == -torch.inf).all()
    assert (mk.signed_edt(zeros) == torch.inf).all()
    single = np.zeros((1, 13, 17), dtype=bool)
    single[0, 6, 8] = True
    np.testing.assert_allclose(mk.edt(torch.from_numpy(single)).numpy(), edt_reference(single), atol=TOL)
    hole = ~single  # one zero voxel
    np.testing.assert_allclose(mk.edt(torch.from_numpy(hole), (2.0, 0.5)).numpy(), edt_reference(hole, (2.0, 0.5)), atol=TOL)
    # one all-ones image in a batch does not affect its neighbours
    batch = np.stack([np.ones((8, 8), bool), single[0, :8, :8]])
    got = mk.edt(torch.from_numpy(batch)).numpy()
    assert np.isinf(got[0]).all()
    np.testing.assert_allclose(got[1], ndi.distance_transform_edt(batch[1]), atol=TOL)


def test_edt_dtypes_and_layouts():
    rng = np.random.default_rng(3)
    mask = random_masks(rng, (3, 40, 50), 0.9)
    ref = edt_reference(mask)
    t = torch.from_numpy(mask)
    for variant in (t.to(torch.uint8), t.to(torch.int64) * 7, t.float() * 0.5, t.to(torch.float16), t.double()):
        np.testing.assert_allclose(mk.edt(variant).numpy(), ref, atol=TOL)
    # strided / non-contiguous input
    wide = torch.from_numpy(random_masks(rng, (3, 50, 80), 0.9))
    view = wide.transpose(1, 2)[:, ::2, 5:45]
    np.testing.assert_allclose(mk.edt(view).numpy(), edt_reference(view.numpy()), atol=TOL)
    # batch of one and many give the same images
    many = torch.from_numpy(random_masks(rng, (9, 21, 23), 0.8))
    full = mk.edt(many)
    for i in (0, 4, 8):
        torch.testing.assert_close(mk.edt(many[i : i + 1])[0], full[i], rtol=0, atol=0)


def test_edt_empty_batch():
    assert mk.edt(torch.zeros(0, 5, 6, dtype=torch.bool)).shape == (0, 5, 6)
    assert mk.edt(torch.zeros(2, 0, 6, dtype=torch.bool)).shape == (2, 0, 6)


def test_edt_module_and_isotropic_spacing_number():
    mask = torch.from_numpy(random_masks(np.random.default_rng(5), (2, 20, 30), 0.9))
    torch.testing.assert_close(mk.EDT(spacing=0.5)(mask), mk.edt(mask, (0.5, 0.5)))
    torch.testing.assert_close(mk.edt(mask, 0.5), mk.edt(mask) * 0.5, rtol=1e-6, atol=1e-6)


def test_edt_bad_input():
    good = torch.ones(1, 4, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"\(B, H, W\) or \(B, D, H, W\)"):
        mk.edt(torch.ones(4, 4))
    with pytest.raises(TypeError, match="dtype"):
        mk.edt(torch.ones(1, 4, 4, dtype=torch.complex64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        mk.edt(np.ones((1, 4, 4)))
    with pytest.raises(ValueError, match="one value per spatial axis"):
        mk.edt(good, (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="positive"):
        mk.edt(good, (1.0, -2.0))
    with pytest.raises(ValueError, match="positive"):
        mk.edt(good, (1.0, float("nan")))
    with pytest.raises(TypeError, match="float32 or torch.float64"):
        mk.edt(good, dtype=torch.int32)
    bad = torch.zeros(1, 4, 4)
    bad[0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        mk.edt(bad)
    # the C++ operator checks on its own, for direct callers
    with pytest.raises(ValueError, match="spacing"):
        torch.ops.mtseg.edt(good, [0.0, 1.0])
    with pytest.raises(ValueError, match="shape"):
        torch.ops.mtseg.edt(torch.ones(2, 2, 2, 2, 2))
    with pytest.raises(TypeError, match="float32 or torch.float64"):
        torch.ops.mtseg.edt(good, None, False, False, torch.float16)


def test_edt_not_differentiable():
    mask = torch.rand(1, 6, 6, requires_grad=True)
    assert not mk.edt(mask).requires_grad
    assert not mk.levelset_grow(mask, mask, 1.0).requires_grad
    out = torch.ops.mtseg.edt(mask)
    with pytest.raises(RuntimeError, match="not differentiable"):
        out.sum().backward()


def test_edt_opcheck():
    mask = torch.from_numpy(random_masks(np.random.default_rng(2), (2, 9, 13), 0.8))
    torch.library.opcheck(torch.ops.mtseg.edt.default, (mask, [1.0, 2.0], False, True, torch.float64))
    torch.library.opcheck(torch.ops.mtseg.edt.default, (mask[:, None].expand(2, 3, 9, 13).contiguous(), None))


def test_edt_compile_fullgraph():
    def level_set(mask):
        return torch.tanh(mk.edt(mask, (1.0, 2.0), signed=True) / 4.0)

    compiled = torch.compile(level_set, fullgraph=True, backend="aot_eager")
    mask = torch.from_numpy(random_masks(np.random.default_rng(4), (2, 16, 20), 0.5))
    torch.testing.assert_close(compiled(mask), level_set(mask))


# --------------------------------------------------------------------------------------
# connected_components
# --------------------------------------------------------------------------------------
STRUCTURES = {4: (2, 1), 8: (2, 2), 6: (3, 1), 18: (3, 2), 26: (3, 3)}


def assert_same_labels(mask, connectivity):
    labels, counts = mk.connected_components(torch.from_numpy(mask), connectivity)
    assert labels.dtype == torch.int32 and counts.dtype == torch.int64
    rank, order = STRUCTURES[connectivity]
    for i, m in enumerate(mask):
        ref, n = ndi.label(m, ndi.generate_binary_structure(rank, order))
        # scipy numbers components in raster order of their first voxel too
        np.testing.assert_array_equal(labels[i].numpy(), ref)
        assert counts[i].item() == n


@pytest.mark.parametrize("connectivity", [4, 8, 6, 18, 26])
@FAST
@given(seed=st.integers(0, 2**31 - 1), p=st.sampled_from([0.2, 0.45, 0.6, 0.9]))
def test_components_match_scipy(connectivity, seed, p):
    rng = np.random.default_rng(seed)
    shape = (2, 17, 23) if connectivity in (4, 8) else (2, 9, 11, 13)
    assert_same_labels(rng.random(shape) < p, connectivity)


def test_components_real_masks(shared_data):
    labels = cadis_label_maps(shared_data, 2)
    masks = np.concatenate([labels == c for c in (3, 4, 5, 7)])
    for connectivity in (4, 8):
        assert_same_labels(masks, connectivity)


def test_components_edge_cases():
    labels, counts = mk.connected_components(torch.zeros(2, 5, 5, dtype=torch.bool))
    assert (labels == 0).all() and counts.tolist() == [0, 0]
    labels, counts = mk.connected_components(torch.ones(1, 3, 4, 5))
    assert (labels == 1).all() and counts.tolist() == [1]
    # diagonal chain: 4-connectivity splits it, 8 keeps it
    eye = torch.eye(6, dtype=torch.bool)[None]
    assert mk.connected_components(eye, 4)[1].item() == 6
    assert mk.connected_components(eye, 8)[1].item() == 1


def test_components_bad_input_and_opcheck():
    with pytest.raises(ValueError, match="must be one of"):
        mk.connected_components(torch.ones(1, 4, 4), 6)
    with pytest.raises(ValueError, match="must be one of"):
        mk.connected_components(torch.ones(1, 2, 4, 4), 8)
    with pytest.raises(ValueError, match="must be 4 or 8"):
        torch.ops.mtseg.connected_components(torch.ones(1, 4, 4), 5)
    with pytest.raises(ValueError, match="batched"):
        mk.connected_components(torch.ones(4, 4, 4, 4, 4))
    mask = torch.from_numpy(random_masks(np.random.default_rng(0), (2, 8, 9), 0.5))
    torch.library.opcheck(torch.ops.mtseg.connected_components.default, (mask, 8))


# --------------------------------------------------------------------------------------
# levelset_grow
# --------------------------------------------------------------------------------------
def growth_case(rng, shape, n_blobs=6):
    seg = ndi.binary_dilation(rng.random(shape) < n_blobs / np.prod(shape[1:]), iterations=4)
    approx = seg & (rng.random(shape) < 0.02)
    approx[0, 0, 0] = True  # a piece of A outside S
    return approx, seg


@FAST
@given(seed=st.integers(0, 2**31 - 1), lam=st.sampled_from([0.0, 0.3, 0.5, 1.0, 1.5, 2.0, 7.0]))
def test_levelset_matches_formula(seed, lam):
    approx, seg = growth_case(np.random.default_rng(seed), (2, 40, 50))
    got = mk.levelset_grow(torch.from_numpy(approx), torch.from_numpy(seg), lam).numpy()
    np.testing.assert_array_equal(got, levelset_grow_reference(approx, seg, lam))


def test_levelset_with_spacing_and_3d():
    rng = np.random.default_rng(7)
    approx, seg = growth_case(rng, (2, 12, 30, 28))
    spacing = (2.0, 0.75, 1.25)
    for lam in (0.5, 1.3, 3.0):
        got = mk.levelset_grow(torch.from_numpy(approx), torch.from_numpy(seg), lam, spacing).numpy()
        ref = levelset_grow_reference(approx, seg, lam, spacing)
        # with spacing, phi = 0 ties are decided after rounding: allow them only
        d_a = np.stack([ndi.distance_transform_edt(~a, sampling=spacing) for a in approx])
        d_s = np.stack([ndi.distance_transform_edt(s, sampling=spacing) for s in seg])
        tie = np.abs(d_a - lam * d_s) < 1e-9
        assert not ((got != ref) & ~tie).any()


def test_levelset_properties():
    approx, seg = growth_case(np.random.default_rng(11), (3, 60, 70))
    a, s = torch.from_numpy(approx), torch.from_numpy(seg)
    assert torch.equal(mk.levelset_grow(a, s, 0.0), a)
    previous = a
    for lam in (0.1, 0.5, 1.0, 2.0, 5.0, 20.0):
        grown = mk.levelset_grow(a, s, lam)
        assert (grown >= a).all(), "the result contains A"
        assert (grown <= (a | s)).all(), "the result lies in A | S"
        assert (grown >= previous).all(), "monotone in lam"
        previous = grown
    assert torch.equal(mk.levelset_grow(a, s, 1e6), a | s)
    empty = torch.zeros_like(a)
    assert not mk.levelset_grow(empty, s, 5.0).any(), "empty A grows nothing"
    assert mk.levelset_grow(a, torch.ones_like(s), 1.0).all(), "S = everything: all of it"
    assert mk.LevelSetGrow(2.0)(a, s).equal(mk.levelset_grow(a, s, 2.0))


def test_levelset_real_hc18(shared_data):
    masks, _ = hc18_masks(shared_data, 3)
    approx = ndi.binary_erosion(masks, np.ones((1, 31, 31), bool))
    for lam in (0.5, 2.0):
        got = mk.levelset_grow(torch.from_numpy(approx), torch.from_numpy(masks), lam).numpy()
        np.testing.assert_array_equal(got, levelset_grow_reference(approx, masks, lam))


def test_levelset_bad_input_and_opcheck():
    a = torch.ones(1, 5, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="lam"):
        mk.levelset_grow(a, a, -1.0)
    with pytest.raises(ValueError, match="lam"):
        torch.ops.mtseg.levelset_grow(a, a, float("inf"))
    with pytest.raises(ValueError, match="same shape"):
        mk.levelset_grow(a, torch.ones(1, 5, 6), 1.0)
    with pytest.raises(ValueError, match="same shape"):
        torch.ops.mtseg.levelset_grow(a, torch.ones(1, 5, 6), 1.0)
    with pytest.raises(TypeError, match="lam"):
        mk.levelset_grow(a, a, "1")
    approx, seg = growth_case(np.random.default_rng(1), (2, 10, 12))
    torch.library.opcheck(
        torch.ops.mtseg.levelset_grow.default, (torch.from_numpy(approx), torch.from_numpy(seg), 1.5, [1.0, 2.0])
    )


# --------------------------------------------------------------------------------------
# grow_instances
# --------------------------------------------------------------------------------------
def instance_case(rng, shape=(2, 48, 56)):
    seg = ndi.binary_dilation(rng.random(shape) < 8 / np.prod(shape[1:]), iterations=5)
    seed_mask = seg & (rng.random(shape) < 0.01)
    seeds = np.stack([ndi.label(m)[0] * 3 for m in seed_mask])  # ids 3, 6, 9, ... (not consecutive)
    return seeds, seg


@FAST
@given(seed=st.integers(0, 2**31 - 1), lam=st.sampled_from([0.5, 1.0, 2.0, 50.0]))
def test_grow_instances_contract(seed, lam):
    seeds, seg = instance_case(np.random.default_rng(seed))
    got = mk.grow_instances(torch.from_numpy(seeds), torch.from_numpy(seg), lam).instances.numpy()
    for i in range(seeds.shape[0]):
        ids = set(np.unique(seeds[i])) - {0}
        assert set(np.unique(got[i])) - {0} == ids, "every seed is kept, no new ids"
        assert (got[i][seeds[i] > 0] == seeds[i][seeds[i] > 0]).all(), "seed voxels keep their id"
        assert ((got[i] > 0) <= ((seg[i]) | (seeds[i] > 0))).all(), "growth stays in S"
        # each grown object is contained in the single-object growth of its own seed in S
        union = levelset_grow_reference(seeds[i : i + 1] > 0, seg[i : i + 1], lam)[0]
        assert ((got[i] > 0) <= union).all()
    # no two seeds merge: in a component of S holding several seeds, every grown voxel
    # belongs to a nearest seed (the mid-line cut), measured independently with scipy
    for i in range(seeds.shape[0]):
        comp, n = ndi.label(seg[i])
        ids = sorted(set(np.unique(seeds[i])) - {0})
        if len(ids) < 2:
            continue
        dist = np.stack([ndi.distance_transform_edt(seeds[i] != k) for k in ids])
        nearest = dist.min(0)
        for c in range(1, n + 1):
            in_c = comp == c
            if len(set(np.unique(seeds[i][in_c])) - {0}) < 2:
                continue
            grown = in_c & (got[i] > 0)
            own = dist[np.searchsorted(ids, got[i][grown]), np.nonzero(grown)[0], np.nonzero(grown)[1]]
            np.testing.assert_allclose(own, nearest[grown], atol=1e-9)


def test_grow_instances_one_seed_equals_levelset():
    rng = np.random.default_rng(3)
    _, seg = instance_case(rng)
    approx = seg & (rng.random(seg.shape) < 0.01)
    for lam in (0.0, 0.5, 1.0, 3.0, 1e6):
        got = mk.grow_instances(torch.from_numpy(approx.astype(np.int16) * 5), torch.from_numpy(seg), lam)
        expected = levelset_grow_reference(approx, seg, lam)
        np.testing.assert_array_equal(got.instances.numpy(), expected * 5)


def test_grow_instances_split_between_two_seeds():
    """One bar touched by two seeds: cut at the mid-line, the two never merge."""
    seg = np.zeros((1, 9, 41), bool)
    seg[0, 2:7, :] = True
    seeds = np.zeros(seg.shape, np.int64)
    seeds[0, 4, 5] = 1
    seeds[0, 4, 25] = 2
    got = mk.grow_instances(torch.from_numpy(seeds), torch.from_numpy(seg), 1e6).instances.numpy()[0]
    assert (got[2:7, :15] == 1).all() and (got[2:7, 16:] == 2).all()
    assert (got[2:7, 15] == 1).all()  # the mid-line column goes to the nearer seed, ties to the first
    assert (got[:2] == 0).all() and (got[7:] == 0).all()
    # a separate component with one seed is grown whole by that seed, even where
    # another seed is nearer
    seg2 = np.zeros((1, 20, 20), bool)
    seg2[0, 2:18, 2:6] = True
    seg2[0, 2:18, 8:18] = True
    s2 = np.zeros(seg2.shape, np.int64)
    s2[0, 17, 3] = 1
    s2[0, 2, 17] = 2
    got2 = mk.grow_instances(torch.from_numpy(s2), torch.from_numpy(seg2), 1e6).instances.numpy()[0]
    assert (got2[2:18, 2:6] == 1).all() and (got2[2:18, 8:18] == 2).all()
    # a component without a seed goes voxel by voxel to the nearest seed (as the single-
    # object rule grows it from A), here all of it to seed 2
    seg3 = seg2.copy()
    seg3[0, 8:12, 19] = True
    s3 = s2.copy()
    s3[0, 2:18, 8:18] = 0
    s3[0, 10, 12] = 2
    got3 = mk.grow_instances(torch.from_numpy(s3), torch.from_numpy(seg3), 1e6).instances.numpy()[0]
    assert (got3[8:12, 19] == 2).all()


def test_grow_instances_classes_and_3d():
    rng = np.random.default_rng(9)
    seeds, seg = instance_case(rng, (1, 10, 24, 26))
    classes = (seeds % 2 + 1) * (seeds > 0)
    got = mk.grow_instances(torch.from_numpy(seeds), torch.from_numpy(seg), 2.0, (2.0, 1.0, 1.0), 26,
                            seed_classes=torch.from_numpy(classes))
    inst, cls = got.instances.numpy(), got.classes.numpy()
    assert ((inst > 0) == (cls > 0)).all()
    for i in np.unique(inst[inst > 0]):
        assert (cls[inst == i] == (i % 2 + 1)).all()


def test_grow_instances_bad_input_and_opcheck():
    s = torch.ones(1, 5, 5, dtype=torch.int64)
    with pytest.raises(TypeError, match="integer"):
        mk.grow_instances(torch.ones(1, 5, 5), s, 1.0)
    with pytest.raises(ValueError, match=">= 0"):
        torch.ops.mtseg.grow_instances(-s, s, 1.0)
    with pytest.raises(ValueError, match="lam"):
        mk.grow_instances(s, s, -0.5)
    with pytest.raises(ValueError, match="connectivity"):
        mk.grow_instances(s, s, 1.0, connectivity=6)
    seeds, seg = instance_case(np.random.default_rng(0), (2, 12, 14))
    torch.library.opcheck(
        torch.ops.mtseg.grow_instances.default, (torch.from_numpy(seeds), torch.from_numpy(seg), 1.0, None, 8)
    )
