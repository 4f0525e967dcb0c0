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
from hypothesis import HealthCheck, example, given, settings
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
@example(seed=311, lam=1.5)  # a voxel with d_A = 2, d_S = 1 joined A through the old query path
def test_levelset_matches_formula(seed, lam):
    approx, seg = growth_case(np.random.default_rng(seed), (2, 40, 50))
    got = mk.levelset_grow(torch.from_numpy(approx), torch.from_numpy(seg), lam).numpy()
    np.testing.assert_array_equal(got, levelset_grow_reference(approx, seg, lam))


# The query path of the CPU EDT (what levelset_grow runs): exact squared distances on the
# queried voxels, upper bounds elsewhere. Cases that stress it: long runs along the last
# axis (blobs), sparse queried voxels (many clusters per run, whose stretches of
# parabolas reach back over each other), a short spacing along the last axis (wide
# stretches), float32 and float64 work.
def query_cases(rng, spatial, count):
    for _ in range(count):
        dims = [int(rng.integers(2, 9))] if spatial == 3 else []
        dims += [int(rng.integers(8, 48)), int(rng.integers(8, 64))]
        shape = (int(rng.integers(1, 3)), *dims)
        mask = ndi.binary_dilation(rng.random(shape) < 0.02, iterations=int(rng.integers(1, 6)))
        if rng.random() < 0.4:  # scattered zeros: neighbouring columns of very different depth
            mask = rng.random(shape) < rng.choice([0.9, 0.97, 0.99])
        query = rng.random(shape) < rng.choice([0.03, 0.15, 0.3, 0.7])
        spacing = None
        if rng.random() < 0.6:
            spacing = [float(x) for x in rng.choice([0.25, 0.5, 0.9375, 1.0, 1.5, 3.0], size=spatial)]
        yield mask, query, spacing, bool(rng.random() < 0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("spatial", [2, 3])
def test_edt_query_path_matches_scipy(spatial, dtype):
    rng = np.random.default_rng(100 * spatial + (dtype == torch.float64))
    rtol = 1e-6 if dtype == torch.float32 else 1e-12
    for mask, query, spacing, invert in query_cases(rng, spatial, 60):
        got = torch.ops.mtseg._edt_query(torch.from_numpy(mask), torch.from_numpy(query), spacing, invert, dtype)
        got = got.double().numpy()
        ref = edt_reference(mask, spacing) ** 2
        wanted = query != invert
        np.testing.assert_allclose(got[wanted], ref[wanted], rtol=rtol, atol=1e-9,
                                   err_msg=f"queried voxels, shape {mask.shape}, spacing {spacing}")
        assert (got >= ref * (1 - rtol) - 1e-9).all(), f"below the distance, shape {mask.shape}, spacing {spacing}"


def test_edt_query_path_checks_its_arguments():
    mask = torch.ones(1, 4, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="same shape"):
        torch.ops.mtseg._edt_query(mask, torch.ones(1, 4, 6, dtype=torch.bool))
    with pytest.raises(TypeError, match="float32 or float64"):
        torch.ops.mtseg._edt_query(mask, mask, None, False, torch.int32)


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


# --------------------------------------------------------------------------------------
# Mask dtypes: unsigned integers and bool tensors whose bytes are not 0/1
# --------------------------------------------------------------------------------------
UNSIGNED = (torch.uint16, torch.uint32, torch.uint64)


def _as_unsigned(mask: np.ndarray, dtype: torch.dtype, rng) -> torch.Tensor:
    """The mask as ``dtype`` with random non-zero values in the foreground, the top bit alone among them."""
    np_dtype = {torch.uint16: np.uint16, torch.uint32: np.uint32, torch.uint64: np.uint64}[dtype]
    top = np.iinfo(np_dtype).max // 2 + 1
    values = rng.integers(1, np.iinfo(np_dtype).max, size=mask.shape, dtype=np_dtype, endpoint=True)
    values.reshape(-1)[:: 7] = top
    return torch.from_numpy(np.where(mask, values, 0).astype(np_dtype))


@pytest.mark.parametrize("dtype", UNSIGNED)
def test_unsigned_masks_match_scipy(dtype):
    rng = np.random.default_rng(12)
    mask = random_masks(rng, (2, 33, 41), 0.7)
    mask[:, 0, 0] = True
    t = _as_unsigned(mask, dtype, rng)
    assert t.dtype == dtype
    np.testing.assert_allclose(mk.edt(t, (1.0, 0.5)).numpy(), edt_reference(mask, (1.0, 0.5)), rtol=0, atol=TOL)
    labels, counts = mk.connected_components(t, 8)
    for i, m in enumerate(mask):
        ref, n = ndi.label(m, np.ones((3, 3)))
        np.testing.assert_array_equal(labels[i].numpy(), ref)
        assert counts[i].item() == n
    approx, seg = growth_case(rng, (2, 30, 36))
    got = mk.levelset_grow(_as_unsigned(approx, dtype, rng), _as_unsigned(seg, dtype, rng), 1.5).numpy()
    np.testing.assert_array_equal(got, levelset_grow_reference(approx, seg, 1.5))
    # 3D volumes too
    vol = random_masks(rng, (1, 9, 12, 10), 0.6)
    np.testing.assert_allclose(mk.edt(_as_unsigned(vol, dtype, rng)).numpy(), edt_reference(vol), rtol=0, atol=TOL)


@pytest.mark.parametrize("dtype", UNSIGNED)
def test_grow_instances_unsigned_seeds_and_seg(dtype):
    seeds, seg = instance_case(np.random.default_rng(4))
    expected = mk.grow_instances(torch.from_numpy(seeds), torch.from_numpy(seg), 2.0).instances
    got = mk.grow_instances(torch.from_numpy(seeds).to(dtype), torch.from_numpy(seg).to(dtype), 2.0)
    assert got.instances.dtype == torch.int64
    torch.testing.assert_close(got.instances, expected, rtol=0, atol=0)
    # the growth itself against scipy: one seed per image equals levelset_grow's reference
    one = (seeds == seeds.max(axis=(1, 2), keepdims=True)) & (seeds > 0)
    got = mk.grow_instances(torch.from_numpy(one).to(dtype) * 9, torch.from_numpy(seg).to(dtype), 2.0).instances
    np.testing.assert_array_equal(got.numpy(), levelset_grow_reference(one, seg, 2.0) * 9)


def test_uint64_seed_ids_beyond_int64_are_rejected():
    seeds = torch.zeros(1, 4, 4, dtype=torch.uint64)
    seeds[0, 1, 1] = 2**63
    seg = torch.ones(1, 4, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="below 2\\^63"):
        torch.ops.mtseg.grow_instances(seeds, seg, 1.0)
    seeds[0, 1, 1] = 2**63 - 1  # the largest id that fits int64 is kept as it is
    got = mk.grow_instances(seeds, seg, 1e6).instances
    assert got.unique().tolist() == [2**63 - 1]


def _bool_view(raw: np.ndarray) -> torch.Tensor:
    """A bool tensor whose bytes are ``raw`` (any 0-255 values), as ``uint8.view(bool)`` makes."""
    return torch.from_numpy(raw.astype(np.uint8)).view(torch.bool)


def test_noncanonical_bools_count_every_nonzero_byte():
    """Issue reproducer: bytes of 2 in a bool tensor are foreground everywhere, as in torch."""
    raw = np.zeros((1, 5, 9), np.uint8)
    raw[0, 2, 1:4] = 1
    raw[0, 2, 5:8] = 2  # a second component made of 2s
    mask = _bool_view(raw)
    assert (mask.sum() == 6).item()  # torch reads them as True
    labels, counts = mk.connected_components(mask, 4)
    assert counts.tolist() == [2]
    np.testing.assert_array_equal(labels[0].numpy(), ndi.label(raw[0] != 0)[0])
    approx = _bool_view(raw * (np.arange(9) < 4))  # A = the first run
    seg = _bool_view(raw)  # S covers both runs
    grown = mk.levelset_grow(approx, seg, 1e6).numpy()
    np.testing.assert_array_equal(grown, raw != 0)  # lam -> inf: A | S, the 2s included


@pytest.mark.parametrize("width", [1, 7, 8, 9, 31, 32, 33, 70])
def test_noncanonical_bools_random_bytes(width):
    """Rows of every length around the 8- and 32-byte steps of the byte scans, with bytes
    of any value (0x80 and 0xff included), against scipy on raw != 0."""
    rng = np.random.default_rng(width)
    raw = rng.integers(0, 256, size=(3, 11, width)).astype(np.uint8)
    raw[rng.random(raw.shape) < 0.45] = 0
    raw[0, :, : width // 2] = rng.choice([0x80, 0xFF, 2], size=(11, width // 2))  # high bits set
    mask = _bool_view(raw)
    ref = raw != 0
    np.testing.assert_allclose(mk.edt(mask).numpy(), edt_reference(ref), rtol=0, atol=TOL)
    np.testing.assert_allclose(mk.signed_edt(mask).numpy(), signed_edt_reference(ref), rtol=0, atol=TOL)
    for conn in (4, 8):
        labels, counts = mk.connected_components(mask, conn)
        for i in range(3):
            expected, n = ndi.label(ref[i], ndi.generate_binary_structure(2, STRUCTURES[conn][1]))
            np.testing.assert_array_equal(labels[i].numpy(), expected)
            assert counts[i].item() == n
    approx = ref & (rng.random(ref.shape) < 0.1)
    got = mk.levelset_grow(_bool_view(raw * approx), mask, 1.5).numpy()
    np.testing.assert_array_equal(got, levelset_grow_reference(approx, ref, 1.5))
    seeds = np.stack([ndi.label(a)[0] for a in approx])
    got = mk.grow_instances(torch.from_numpy(seeds), mask, 1e6).instances.numpy()
    expected = mk.grow_instances(torch.from_numpy(seeds), torch.from_numpy(ref), 1e6).instances.numpy()
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_nan_in_float_masks_is_rejected(dtype):
    mask = torch.ones(2, 6, 7, dtype=dtype)
    mask[1, 3, 4] = float("nan")
    for call in (
        lambda: torch.ops.mtseg.edt(mask),
        lambda: torch.ops.mtseg.connected_components(mask, 4),
        lambda: torch.ops.mtseg.levelset_grow(mask, torch.ones_like(mask), 1.0),
        lambda: torch.ops.mtseg.levelset_grow(torch.ones_like(mask), mask, 1.0),
        lambda: torch.ops.mtseg.grow_instances(torch.ones(2, 6, 7, dtype=torch.long), mask, 1.0),
    ):
        with pytest.raises(ValueError, match="NaN"):
            call()
    # -0.0 is background and inf foreground, as mask != 0 says
    mask = torch.tensor([[[0.0, -0.0, float("inf"), 1.0, -float("inf")]]], dtype=dtype)
    np.testing.assert_allclose(mk.edt(mask).numpy(), [[[0, 0, 1, 2, 3]]])


# --------------------------------------------------------------------------------------
# Spacing at the limits of floating point
# --------------------------------------------------------------------------------------
def test_grow_instances_huge_spacing_reproducer():
    """Issue reproducer: spacing (1e300, 1) used to overflow, index with -1 and corrupt the heap."""
    s = torch.zeros(2, 8, 8, dtype=torch.long)
    s[0, -1, -1] = 10**9
    s[1, 0, 0] = 1
    g = torch.ones(2, 8, 8, dtype=torch.bool)
    g[1, :, 3] = False
    for _ in range(5):
        with pytest.raises(ValueError, match="differ by too much"):
            torch.ops.mtseg.grow_instances(s, g, 1.0, [1e300, 1.0])
        with pytest.raises(ValueError, match="differ by too much"):
            mk.grow_instances(s, g, 1.0, spacing=[1e300, 1.0])
    # a ratio within 2^500 keeps working, and equal spacings of any size give the unit result
    unit = mk.grow_instances(s, g, 1.0).instances
    for c in (1e300, 1e200, 1e-300, 5e-324):
        torch.testing.assert_close(mk.grow_instances(s, g, 1.0, spacing=[c, c]).instances, unit, rtol=0, atol=0)
    wide = mk.grow_instances(s, g, 1.0, spacing=[1e150, 1e10]).instances
    assert wide[0, -1, -1] == 10**9 and wide[1, 0, 0] == 1


@pytest.mark.parametrize("spacing", [(1e150, 0.7), (3.0, 1e-140), (2.0**500, 1.0)])
def test_levelset_with_spacing_ratio_near_the_limit(spacing):
    """A tiny spacing along x makes the reach of a parabola, in voxels, overflow int64;
    it used to become negative and cut the envelope short."""
    approx, seg = growth_case(np.random.default_rng(8), (2, 24, 30))
    a, s = torch.from_numpy(approx), torch.from_numpy(seg)
    for lam in (0.5, 2.0):
        np.testing.assert_array_equal(
            mk.levelset_grow(a, s, lam, spacing).numpy(), levelset_grow_reference(approx, seg, lam, spacing)
        )


@pytest.mark.parametrize("c", [1e300, 1e160, 1e-160, 1e-300])
def test_levelset_and_components_with_extreme_equal_spacing(c):
    approx, seg = growth_case(np.random.default_rng(8), (2, 24, 30))
    a, s = torch.from_numpy(approx), torch.from_numpy(seg)
    for lam in (0.5, 2.0):
        np.testing.assert_array_equal(
            mk.levelset_grow(a, s, lam, (c, c)).numpy(), levelset_grow_reference(approx, seg, lam)
        )
    vol = torch.from_numpy(growth_case(np.random.default_rng(9), (1, 8, 12, 10))[1])
    got = mk.levelset_grow(vol & (torch.rand(vol.shape, generator=torch.Generator().manual_seed(0)) < 0.05), vol, 1.0,
                           (c, c, c))
    assert got.dtype == torch.bool


def test_edt_extreme_spacing_is_exact_or_rejected():
    mask = random_masks(np.random.default_rng(6), (1, 20, 25), 0.9)
    t = torch.from_numpy(mask)
    unit = edt_reference(mask)
    for c in (1e300, 1e-300, 2.0**-1000):
        got = mk.edt(t, (c, c), dtype=torch.float64).numpy()
        np.testing.assert_allclose(got, unit * c, rtol=1e-15, atol=0)
    # a spacing of a power of two only scales: bitwise the unit result times it
    np.testing.assert_array_equal(mk.edt(t, (2.0**600, 2.0**600), dtype=torch.float64).numpy(),
                                  mk.edt(t, dtype=torch.float64).numpy() * 2.0**600)
    # uneven spacing within 2^500 in double: the tiny axis still counts
    got = mk.edt(t, (1.0, 1e-13), dtype=torch.float64).numpy()
    np.testing.assert_allclose(got, ndi.distance_transform_edt(mask[0], sampling=(1.0, 1e-13))[None], rtol=1e-12)
    got32 = mk.edt(t, (1.0, 1e-13)).numpy()
    np.testing.assert_allclose(got32, ndi.distance_transform_edt(mask[0], sampling=(1.0, 1e-13))[None], rtol=1e-6)
    # distances that do not fit the output dtype are refused, not turned into inf or 0
    for spacing, dtype, squared in (((1e300, 1e300), torch.float32, False), ((1e200, 1e200), torch.float64, True),
                                    ((1e-30, 1e-30), torch.float32, True), ((1e-160, 1e-160), torch.float64, True)):
        with pytest.raises(ValueError, match="do not fit"):
            torch.ops.mtseg.edt(t, list(spacing), squared, False, dtype)
        with pytest.raises(ValueError, match="do not fit"):
            mk.edt(t, spacing, squared=squared, dtype=dtype)


# --------------------------------------------------------------------------------------
# Sizes: ids never size allocations; huge expanded inputs fail before any copy
# --------------------------------------------------------------------------------------
def test_seed_classes_with_huge_ids():
    """Issue reproducer: an id of 2^31 made a (B, 2^31 + 1) table (17 GB); ids are keys now."""
    seeds = torch.zeros(2, 8, 8, dtype=torch.long)
    seeds[0, 1, 1] = 2**31
    seeds[0, 6, 6] = 2**62
    seeds[1, 2, 2] = 2**31  # the same id in another image, another class
    classes = torch.zeros_like(seeds)
    classes[0, 1, 1], classes[0, 6, 6], classes[1, 2, 2] = 3, 5, 7
    seg = torch.ones(2, 8, 8, dtype=torch.bool)
    got = mk.grow_instances(seeds, seg, 1e6, seed_classes=classes)
    inst, cls = got.instances, got.classes
    assert set(inst[0].unique().tolist()) == {2**31, 2**62} and inst[1].unique().tolist() == [2**31]
    assert (cls[0][inst[0] == 2**31] == 3).all() and (cls[0][inst[0] == 2**62] == 5).all()
    assert (cls[1] == 7).all()


def test_seed_classes_largest_class_and_checks():
    seeds = torch.zeros(1, 6, 6, dtype=torch.int32)
    seeds[0, 1, 1:3] = 4  # one seed over two classes: the larger wins
    classes = torch.zeros(1, 6, 6, dtype=torch.int64)
    classes[0, 1, 1], classes[0, 1, 2] = 2, 9
    seg = torch.zeros(1, 6, 6, dtype=torch.bool)
    seg[0, :3, :4] = True
    got = mk.grow_instances(seeds, seg, 1e6, seed_classes=classes)
    assert (got.classes == 9 * (got.instances == 4)).all()
    with pytest.raises(ValueError, match="seed_classes must be an integer tensor"):
        mk.grow_instances(seeds, seg, 1.0, seed_classes=classes.float())
    with pytest.raises(ValueError, match="seed_classes must be an integer tensor"):
        mk.grow_instances(seeds, seg, 1.0, seed_classes=classes[:, :3])


def test_huge_expanded_inputs_fail_before_copying():
    """A stride-0 view of 2^40 voxels: the ops refuse it at once instead of copying it."""
    huge = torch.ones(1, 1, 1, dtype=torch.bool).expand(1, 2**20, 2**20)
    for call in (
        lambda: torch.ops.mtseg.edt(huge),
        lambda: torch.ops.mtseg.edt(torch.ones(1, 1, 1).expand(1, 2**20, 2**20)),
        lambda: torch.ops.mtseg.levelset_grow(huge, huge, 1.0),
        lambda: torch.ops.mtseg.connected_components(huge[:, : 2**15, : 2**15].expand(2**12, 2**15, 2**15), 4),
    ):
        with pytest.raises(ValueError, match="more than this machine's"):
            call()


# --------------------------------------------------------------------------------------
# Fake kernels check like the real ones (bad input fails while torch.compile traces)
# --------------------------------------------------------------------------------------
def _fake(*tensors):
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    return mode, [mode.from_tensor(t) for t in tensors]


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda m, s: torch.ops.mtseg.edt(m, [1.0, 1.0, 1.0]), ValueError, "one value per spatial axis"),
        (lambda m, s: torch.ops.mtseg.edt(m, [0.0, 1.0]), ValueError, "positive"),
        (lambda m, s: torch.ops.mtseg.edt(m, [1e300, 1.0]), ValueError, "differ by too much"),
        (lambda m, s: torch.ops.mtseg.edt(m, None, False, False, torch.float16), TypeError, "float32 or torch.float64"),
        (lambda m, s: torch.ops.mtseg.edt(m, [1e300, 1e300]), ValueError, "do not fit"),
        (lambda m, s: torch.ops.mtseg.edt(m[0]), ValueError, r"\(B, H, W\) or \(B, D, H, W\)"),
        (lambda m, s: torch.ops.mtseg.edt(m.to(torch.complex64)), TypeError, "dtype"),
        (lambda m, s: torch.ops.mtseg.connected_components(m, 6), ValueError, "connectivity"),
        (lambda m, s: torch.ops.mtseg.levelset_grow(m, s[:, :3], 1.0), ValueError, "same shape"),
        (lambda m, s: torch.ops.mtseg.levelset_grow(m, s, -1.0), ValueError, "lam"),
        (lambda m, s: torch.ops.mtseg.levelset_grow(m, s, 1.0, [1.0]), ValueError, "one value per spatial axis"),
        (lambda m, s: torch.ops.mtseg.grow_instances(s.float(), m, 1.0), TypeError, "integer"),
        (lambda m, s: torch.ops.mtseg.grow_instances(s, m, 1.0, None, 26), ValueError, "connectivity"),
        (lambda m, s: torch.ops.mtseg.grow_instances(s, m[:, :2], 1.0), ValueError, "same shape"),
    ],
)
def test_fake_kernels_check_arguments(call, error, match):
    mask = torch.ones(2, 5, 6, dtype=torch.bool)
    seeds = torch.ones(2, 5, 6, dtype=torch.int64)
    with pytest.raises(error, match=match):  # the real kernel
        call(mask, seeds)
    mode, (fm, fs) = _fake(mask, seeds)
    with mode, pytest.raises(error, match=match):  # and the fake one, as torch.compile traces it
        call(fm, fs)


def test_fake_kernels_shapes_and_dtypes():
    mask = torch.ones(2, 4, 5, 6, dtype=torch.uint16)
    mode, (fm,) = _fake(mask)
    with mode:
        assert torch.ops.mtseg.edt(fm, [2.0, 1.0, 1.0], True, True, torch.float64).dtype == torch.float64
        labels, counts = torch.ops.mtseg.connected_components(fm, 26)
        assert labels.shape == mask.shape and labels.dtype == torch.int32 and counts.shape == (2,)
        assert torch.ops.mtseg.levelset_grow(fm, fm, 1.0).dtype == torch.bool
        assert torch.ops.mtseg.grow_instances(fm, fm, 1.0, None, 0).dtype == torch.int64


@pytest.mark.cuda
def test_float_masks_do_not_synchronise_the_device():
    """The NaN check of float masks runs on the device (no .item() on every call)."""
    mask = torch.rand(2, 40, 50, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    mask = mask.where(mask > 0.3, 0.0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        d = torch.ops.mtseg.edt(mask)
        grown = torch.ops.mtseg.levelset_grow(mask, mask, 1.0)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    m = (mask != 0).cpu().numpy()
    np.testing.assert_allclose(d.cpu().numpy(), edt_reference(m), rtol=0, atol=TOL)
    np.testing.assert_array_equal(grown.cpu().numpy(), m)
