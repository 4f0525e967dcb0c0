"""Raw-op fuzzers of the distance ops (edt, connected_components, levelset_grow,
grow_instances, the test-only ``_edt_query``) and of their CPU emulations of the CUDA launches (``_*_emulated``).

A result is checked against scipy (``mtseg_kernels/reference/distance.py``,
``scipy.ndimage.label``) or, for ``grow_instances`` with several seeds, against the
properties its docstring promises.
"""

from __future__ import annotations

import numpy as np
import torch
from fuzzing import (
    ALL_DTYPES,
    call,
    floats_at_limits,
    foreground,
    fuzz_settings,
    ints_at_limits,
    mostly,
    shapes,
    spacings,
    tensors,
    to_numpy,
)
from hypothesis import given
from hypothesis import strategies as st
from scipy import ndimage as ndi

from mtseg_kernels.reference.distance import edt_reference, levelset_grow_reference, signed_edt_reference

# connectivity argument -> scipy's generate_binary_structure order
CONNECTIVITY = {2: {4: 1, 8: 2}, 3: {6: 1, 18: 2, 26: 3}}

# The emulations' launch order (0-3) and its random seed (any int64).
SCHEDULES = mostly(st.integers(0, 3), ints_at_limits(), 0.1)
SEEDS = mostly(st.integers(-(2**63), 2**63 - 1), ints_at_limits(), 0.3)


@st.composite
def mask_shapes(draw):
    """Mostly (B, H, W) / (B, D, H, W), sometimes any rank from 1 to 5."""
    return draw(mostly(shapes(3, 4, max_side=6), shapes(1, 5, max_side=4), 0.15))


def spatial_of(shape) -> int:
    return len(shape) - 1


def usable(spacing, spatial: int) -> bool:
    """A spacing an oracle comparison makes sense for (the op may still reject it)."""
    return spacing is None or (len(spacing) == spatial and all(0 < s < 1e100 and s > 1e-100 for s in spacing))


@st.composite
def edt_args(draw):
    shape = draw(mask_shapes())
    mask = draw(tensors(shape=shape))
    spacing = draw(spacings(spatial_of(shape)))
    dtype = draw(mostly(st.sampled_from([None, torch.float32, torch.float64]), st.sampled_from([torch.float16, torch.int64, torch.bool])))
    return mask, spacing, draw(st.booleans()), draw(st.booleans()), dtype


def check_edt(out, mask, spacing, squared, signed, dtype):
    if out is None:
        return
    assert mask.dim() in (3, 4), f"edt accepted a {mask.dim()}-D mask"
    assert out.shape == mask.shape and out.dtype == (dtype or torch.float32)
    if not usable(spacing, mask.dim() - 1):
        assert not out.isnan().any(), "edt returned NaN"
        return
    fg = foreground(mask)
    want = signed_edt_reference(fg, spacing) if signed else edt_reference(fg, spacing)
    if squared:
        want = np.sign(want) * want * want
    got = out.double().numpy()
    rtol = 1e-12 if out.dtype == torch.float64 else 2e-6
    np.testing.assert_allclose(got, want, rtol=rtol, atol=0, err_msg="edt differs from scipy")


@fuzz_settings
@given(edt_args())
def test_edt(args):
    check_edt(call("edt", *args), *args)


@fuzz_settings
@given(edt_args(), SCHEDULES, SEEDS)
def test_edt_emulated(args, schedule, seed):
    check_edt(call("_edt_emulated", *args, schedule, seed), *args)


@st.composite
def edt_query_args(draw):
    shape = draw(mask_shapes())
    mask = draw(tensors(shape=shape))
    # mostly a query of the same shape, sometimes any other tensor
    query = draw(mostly(tensors(shape=shape), tensors(shape=draw(mask_shapes())), 0.1))
    spacing = draw(spacings(spatial_of(shape)))
    dtype = draw(mostly(st.sampled_from([None, torch.float32, torch.float64]), st.sampled_from([torch.float16, torch.int64])))
    return mask, query, spacing, draw(st.booleans()), dtype


def check_edt_query(out, mask, query, spacing, query_invert, dtype):
    """Exact squared distances on the queried voxels, upper bounds elsewhere."""
    if out is None:
        return
    assert mask.dim() in (3, 4) and query.shape == mask.shape, "_edt_query accepted mismatched or bad shapes"
    assert out.shape == mask.shape and out.dtype == (dtype or torch.float64)
    if not usable(spacing, mask.dim() - 1):
        assert not out.isnan().any(), "_edt_query returned NaN"
        return
    want = edt_reference(foreground(mask), spacing) ** 2
    got = out.double().numpy()
    asked = foreground(query) != query_invert
    rtol = 1e-12 if out.dtype == torch.float64 else 2e-6
    np.testing.assert_allclose(got[asked], want[asked], rtol=rtol, atol=0, err_msg="queried voxels differ from scipy")
    assert (got[~asked] >= want[~asked] * (1 - rtol)).all(), "a voxel outside the query is below its distance"


@fuzz_settings
@given(edt_query_args())
def test_edt_query(args):
    # test-only op: no fake kernel, torch.compile never sees it
    check_edt_query(call("_edt_query", *args, meta=False), *args)


@st.composite
def cc_args(draw):
    shape = draw(mask_shapes())
    mask = draw(tensors(shape=shape))
    good = list(CONNECTIVITY.get(spatial_of(shape), {4: 1}))
    conn = draw(mostly(st.sampled_from(good), st.one_of(st.sampled_from([0, 1, 2, 3, 4, 6, 8, 18, 26]), ints_at_limits())))
    return mask, conn


def check_components(res, mask, conn):
    if res is None:
        return
    labels, counts = res
    spatial = mask.dim() - 1
    assert spatial in CONNECTIVITY and conn in CONNECTIVITY[spatial], f"accepted connectivity {conn} in {spatial}D"
    assert labels.dtype == torch.int32 and counts.dtype == torch.int64
    assert labels.shape == mask.shape and counts.shape == (mask.shape[0],)
    structure = ndi.generate_binary_structure(spatial, CONNECTIVITY[spatial][conn])
    for b, m in enumerate(foreground(mask)):
        want, n = ndi.label(m, structure=structure) if m.size else (np.zeros(m.shape, np.int32), 0)
        np.testing.assert_array_equal(labels[b].numpy(), want, err_msg=f"labels of image {b}")
        assert counts[b].item() == n


@fuzz_settings
@given(cc_args())
def test_connected_components(args):
    check_components(call("connected_components", *args), *args)


@fuzz_settings
@given(cc_args(), SCHEDULES, SEEDS)
def test_connected_components_emulated(args, schedule, seed):
    check_components(call("_connected_components_emulated", *args, schedule, seed), *args)


@st.composite
def pair_shapes(draw):
    """The shape of the first tensor and that of its companion: mostly equal."""
    shape = draw(mask_shapes())
    other = draw(mostly(st.just(shape), mask_shapes(), 0.1))
    return shape, other


def lams():
    return mostly(st.sampled_from([0.0, 0.5, 1.0, 2.0, 50.0]), floats_at_limits())


@st.composite
def levelset_args(draw):
    shape, other = draw(pair_shapes())
    approx = draw(tensors(shape=shape))
    seg = draw(tensors(shape=other))
    return approx, seg, draw(lams()), draw(spacings(spatial_of(shape)))


def check_levelset(out, approx, seg, lam, spacing):
    if out is None:
        return
    assert approx.dim() in (3, 4) and approx.shape == seg.shape, "levelset_grow accepted mismatched/odd shapes"
    assert out.dtype == torch.bool and out.shape == approx.shape
    assert lam >= 0, f"levelset_grow accepted lam={lam}"
    a, s = foreground(approx), foreground(seg)
    got = out.numpy()
    assert (got >= a).all() and (got <= (a | s)).all(), "result not between A and A | S"
    if usable(spacing, approx.dim() - 1) and np.isfinite(lam):
        np.testing.assert_array_equal(got, levelset_grow_reference(a, s, lam, spacing), err_msg="levelset_grow vs scipy")


@fuzz_settings
@given(levelset_args())
def test_levelset_grow(args):
    check_levelset(call("levelset_grow", *args), *args)


@fuzz_settings
@given(levelset_args(), SCHEDULES, SEEDS)
def test_levelset_grow_emulated(args, schedule, seed):
    check_levelset(call("_levelset_grow_emulated", *args, schedule, seed), *args)


# Seed ids: mostly integers (few distinct ones), sometimes any dtype.
mostly_ints = [torch.int64] * 6 + [torch.int32, torch.uint8, torch.uint64, torch.bool] * 2 + ALL_DTYPES


@st.composite
def grow_args(draw):
    shape, other = draw(pair_shapes())
    # Seed ids: few distinct small ones, or hostile ones (negative, 2^31, 2^62, ...).
    seeds = draw(tensors(shape=shape, dtypes=mostly_ints, low=0, high=4))
    if seeds.dtype == torch.int64 and draw(st.booleans()):
        seeds = seeds.clone() * draw(st.sampled_from([1, 2**30, 2**31, 2**40, -1]))  # huge (or negative) ids
    seg = draw(tensors(shape=other))
    spatial = spatial_of(shape)
    conn = draw(mostly(st.sampled_from([0, *CONNECTIVITY.get(spatial, {4: 1})]), ints_at_limits()))
    return seeds, seg, draw(lams()), draw(spacings(spatial)), conn


def check_grow(out, seeds, seg, lam, spacing, conn):
    if out is None:
        return
    assert seeds.dim() in (3, 4) and seeds.shape == seg.shape, "grow_instances accepted mismatched/odd shapes"
    assert out.dtype == torch.int64 and out.shape == seeds.shape
    assert lam >= 0, f"grow_instances accepted lam={lam}"
    assert not (seeds.dtype.is_floating_point or seeds.dtype.is_complex), f"grow_instances accepted {seeds.dtype} seeds"
    ids, got = to_numpy(seeds).astype(np.int64), out.numpy()
    assert (ids >= 0).all(), "grow_instances accepted negative (or >= 2^63) seed ids"
    s = foreground(seg)
    assert (got[ids > 0] == ids[ids > 0]).all(), "a seed voxel lost its id"
    assert ((got == 0) | (ids > 0) | s).all(), "growth outside S"
    for b in range(ids.shape[0]):
        present = set(np.unique(ids[b]).tolist()) | {0}
        assert set(np.unique(got[b]).tolist()) <= present, f"image {b}: an id that is no seed"
        distinct = present - {0}
        # One seed: the union rule, exactly (the docstring's promise).
        if len(distinct) == 1 and usable(spacing, ids.ndim - 1) and np.isfinite(lam):
            (k,) = distinct
            want = levelset_grow_reference(ids[b : b + 1] > 0, s[b : b + 1], lam, spacing)[0]
            np.testing.assert_array_equal(got[b], np.where(want, k, 0), err_msg=f"one-seed growth, image {b}")


@fuzz_settings
@given(grow_args())
def test_grow_instances(args):
    check_grow(call("grow_instances", *args), *args)


@fuzz_settings
@given(grow_args(), SCHEDULES, SEEDS, mostly(st.integers(0, 64), ints_at_limits()))
def test_grow_instances_emulated(args, schedule, seed, arena_budget):
    check_grow(call("_grow_instances_emulated", *args, schedule, seed, arena_budget), *args)
