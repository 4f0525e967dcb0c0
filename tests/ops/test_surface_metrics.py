"""Surface metrics (``mtseg_kernels.metrics``): HD, percentile HD, ASSD and the
accumulating ``SurfaceDistanceMetric``.

Oracles, none sharing code with what they check: MONAI itself (``compute_hausdorff_distance``,
``compute_average_surface_distance``, ``HausdorffDistanceMetric``, ``do_metric_reduction``),
the scipy/numpy formulas of ``mtseg_kernels.reference.distance``, and hand-computed cases.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch
from distance_testing import cadis_label_maps, hc18_masks
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import ndimage as ndi

import mtseg_kernels as mk
from mtseg_kernels.reference.distance import surface_metrics_reference

FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# MONAI computes in float32: its values carry float32 rounding.
MONAI_TOL = dict(rtol=2e-6, atol=2e-5)


def blobs(rng, shape, density=0.01, iterations=3):
    """Random blob masks: dilated sparse seeds (some images may come out empty)."""
    return ndi.binary_dilation(rng.random(shape) < density, iterations=iterations)


def values(m: mk.SurfaceMetrics) -> np.ndarray:
    return np.stack([v.cpu().numpy() for v in m])


# --------------------------------------------------------------------------------------
# Definitions, on binary masks (moved from test_distance.py)
# --------------------------------------------------------------------------------------
def test_surface_metrics_offset_squares():
    """Two k x k squares offset by d pixels along x: HD = d exactly, in any spacing."""
    for d in (1, 2, 5):
        p = torch.zeros(1, 30, 40, dtype=torch.bool)
        t = torch.zeros_like(p)
        p[0, 10:20, 5:15] = True
        t[0, 10:20, 5 + d : 15 + d] = True
        m = mk.surface_metrics(p, t, spacing=(1.0, 0.5))
        assert m.hausdorff.item() == pytest.approx(0.5 * d)
        ref = surface_metrics_reference(p[0].numpy(), t[0].numpy(), (1.0, 0.5))
        np.testing.assert_allclose([m.hausdorff.item(), m.hausdorff_percentile.item(), m.assd.item()], ref, atol=1e-9)
    same = mk.surface_metrics(p, p)
    assert same.hausdorff.item() == 0 and same.assd.item() == 0


def test_surface_metrics_hand_computed_assd_and_percentile():
    """A 1x4 bar against the same bar shifted by one row (spacing 2 along y): every
    surface voxel of one is 2 from the other's, except none; HD = HD50 = ASSD = 2."""
    p = torch.zeros(1, 6, 8, dtype=torch.uint8)
    p[0, 2, 2:6] = 1
    t = p.roll(1, dims=1)
    m = mk.surface_metrics(p, t, spacing=(2.0, 1.0), percentile=50)
    assert values(m).ravel().tolist() == [2.0, 2.0, 2.0]
    # a 3x3 square against its centre pixel: the 8 ring voxels of pred lie at 1 (4 of them)
    # and sqrt(2) (4) from the centre, the centre at 1 from the ring: ASSD = (4 + 4 sqrt2 + 1) / 9
    sq = torch.zeros(1, 7, 7, dtype=torch.bool)
    sq[0, 2:5, 2:5] = True
    centre = torch.zeros_like(sq)
    centre[0, 3, 3] = True
    m = mk.surface_metrics(sq, centre, percentile=50)
    assert m.hausdorff.item() == pytest.approx(2**0.5)
    assert m.assd.item() == pytest.approx((4 + 4 * 2**0.5 + 1) / 9)
    # percentile over d_pt (4 x 1, 4 x sqrt2): the median interpolates between them
    assert m.hausdorff_percentile.item() == pytest.approx((1 + 2**0.5) / 2)


def test_surface_metrics_empty_policy():
    full = torch.zeros(3, 8, 8, dtype=torch.bool)
    full[:, 2:5, 2:5] = True
    empty = torch.zeros_like(full)
    pred = torch.stack([full[0], empty[0], empty[0]])
    target = torch.stack([empty[0], full[0], empty[0]])
    m = mk.surface_metrics(pred, target)
    for v in m:
        assert torch.isinf(v[0]) and torch.isinf(v[1]) and torch.isnan(v[2])


@FAST
@given(seed=st.integers(0, 2**31 - 1), conn=st.sampled_from([1, 2]), q=st.sampled_from([50.0, 95.0, 100.0]))
def test_surface_metrics_match_reference_random(seed, conn, q):
    rng = np.random.default_rng(seed)
    pred = blobs(rng, (3, 30, 34))
    target = blobs(rng, (3, 30, 34))
    spacing = (1.5, 0.7)
    m = mk.surface_metrics(torch.from_numpy(pred), torch.from_numpy(target), spacing, q, conn)
    for i in range(3):
        ref = surface_metrics_reference(pred[i], target[i], spacing, q, conn)
        np.testing.assert_allclose(values(m)[:, i], ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("connectivity", [1, 2, 3])
def test_surface_metrics_3d(connectivity):
    rng = np.random.default_rng(5)
    pred = blobs(rng, (2, 12, 20, 22), 0.005)
    target = blobs(rng, (2, 12, 20, 22), 0.005)
    spacing = (2.0, 1.0, 0.8)
    m = mk.surface_metrics(torch.from_numpy(pred), torch.from_numpy(target), spacing, connectivity=connectivity,
                           format="mask")
    for i in range(2):
        ref = surface_metrics_reference(pred[i], target[i], spacing, 95.0, connectivity)
        np.testing.assert_allclose(values(m)[:, i], ref, rtol=1e-9)


def test_surface_metrics_real_cadis_label_maps(shared_data):
    """Real CaDIS label maps, per class: a map against its shifted copy."""
    labels = cadis_label_maps(shared_data, 2)[:, ::4, ::4].astype(np.int64)
    shifted = np.roll(labels, 3, axis=2)
    classes = int(max(labels.max(), shifted.max())) + 1
    m = mk.surface_metrics(torch.from_numpy(labels), torch.from_numpy(shifted), num_classes=classes)
    assert m.hausdorff.shape == (2, classes - 1)
    for i in range(2):
        for c in range(1, classes):
            ref = surface_metrics_reference(labels[i] == c, shifted[i] == c)
            np.testing.assert_allclose(values(m)[:, i, c - 1], ref, rtol=1e-9)
    hd = mk.hausdorff_distance(torch.from_numpy(labels), torch.from_numpy(shifted), num_classes=classes)
    torch.testing.assert_close(hd, m.hausdorff, equal_nan=True)
    module = mk.SurfaceDistance(num_classes=classes)
    hd95 = module(torch.from_numpy(labels), torch.from_numpy(shifted)).hausdorff_percentile
    torch.testing.assert_close(hd95, m.hausdorff_percentile, equal_nan=True)


def test_surface_metrics_real_hc18(shared_data):
    masks, pixel = hc18_masks(shared_data, 3)
    pred = ndi.binary_erosion(masks, np.ones((1, 9, 9), bool))
    s = pixel[0]
    m = mk.surface_metrics(torch.from_numpy(pred), torch.from_numpy(masks), (s, s))
    for i in range(3):
        ref = surface_metrics_reference(pred[i], masks[i], (s, s))
        np.testing.assert_allclose(values(m)[:, i], ref, rtol=1e-9)
    assd = mk.average_surface_distance(torch.from_numpy(pred), torch.from_numpy(masks), (s, s))
    torch.testing.assert_close(assd, m.assd)
    # each image with its own pixel size, in one call
    per_image = mk.surface_metrics(torch.from_numpy(pred), torch.from_numpy(masks), [[p, p] for p in pixel])
    for i, p in enumerate(pixel):
        ref = surface_metrics_reference(pred[i], masks[i], (p, p))
        np.testing.assert_allclose(values(per_image)[:, i], ref, rtol=1e-9)


# --------------------------------------------------------------------------------------
# Against MONAI itself
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def monai_metrics():
    return pytest.importorskip("monai.metrics",
                               reason="MONAI (a test dependency, requirements-ci.txt) is not installed")


def monai_values(monai_metrics, pred_onehot, target_onehot, spacing, include_background, percentile=95.0):
    """(HD, percentile HD, symmetric ASD) from MONAI, float64 numpy ``(3, B, K)``."""
    p = torch.as_tensor(pred_onehot, dtype=torch.float32)
    t = torch.as_tensor(target_onehot, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns about every empty mask
        hd = monai_metrics.compute_hausdorff_distance(p, t, include_background, spacing=spacing)
        hdp = monai_metrics.compute_hausdorff_distance(p, t, include_background, percentile=percentile,
                                                       spacing=spacing)
        asd = monai_metrics.compute_average_surface_distance(p, t, include_background, symmetric=True,
                                                             spacing=spacing)
    return np.stack([hd.double().numpy(), hdp.double().numpy(), asd.double().numpy()])


def assert_equals_monai(ours: np.ndarray, theirs: np.ndarray, pred_onehot, target_onehot, include_background):
    """Equal to MONAI, except the one documented difference: exactly one mask empty gives
    inf for the percentile HD here, nan in MONAI."""
    first = 0 if include_background else 1
    axes = tuple(range(2, pred_onehot.ndim))
    p_any = np.asarray(pred_onehot).any(axis=axes)[:, first:]
    t_any = np.asarray(target_onehot).any(axis=axes)[:, first:]
    one = p_any != t_any
    assert np.isnan(theirs[1][one]).all()
    expected = theirs.copy()
    expected[1][one] = np.inf
    assert np.isinf(ours[:, one]).all() and np.isnan(ours[:, ~p_any & ~t_any]).all()
    np.testing.assert_allclose(ours, expected, **MONAI_TOL)


@st.composite
def onehot_cases(draw):
    spatial = draw(st.sampled_from([2, 3]))
    dims = [draw(st.integers(6, 14 if spatial == 3 else 40)) for _ in range(spatial)]
    batch, channels = draw(st.integers(1, 2)), draw(st.integers(2, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    spacing = draw(st.one_of(st.none(), st.lists(st.floats(0.3, 3.0), min_size=spatial, max_size=spatial)))
    density = draw(st.sampled_from([0.0, 0.003, 0.02, 0.1]))  # 0: empty masks
    rng = np.random.default_rng(seed)
    pred = blobs(rng, (batch, channels, *dims), density, 2)
    target = blobs(rng, (batch, channels, *dims), density, 2)
    target[:, -1] = False  # the last class is never in the target: inf / nan cases every time
    return pred, target, spacing


@pytest.mark.parametrize("include_background", [False, True])
@FEW
@given(case=onehot_cases())
def test_onehot_matches_monai(monai_metrics, case, include_background):
    pred, target, spacing = case
    ours = mk.surface_metrics(torch.from_numpy(pred), torch.from_numpy(target), spacing, 95.0,
                              include_background=include_background, format="onehot")
    theirs = monai_values(monai_metrics, pred, target, spacing, include_background)
    assert_equals_monai(values(ours), theirs, pred, target, include_background)


@pytest.mark.parametrize("spatial", [2, 3])
@pytest.mark.parametrize("percentile", [50.0, 95.0, 99.0])
def test_label_maps_match_monai_onehot(monai_metrics, spatial, percentile):
    """Label maps with num_classes against MONAI on their one-hot form, anisotropic spacing."""
    rng = np.random.default_rng(spatial * 100 + int(percentile))
    shape = (3, 40, 48) if spatial == 2 else (2, 14, 18, 20)
    classes = 4
    target = np.zeros(shape, np.int64)
    pred = np.zeros(shape, np.int64)
    for c in range(1, classes):
        target[blobs(rng, shape, 0.004, 3)] = c
        pred[blobs(rng, shape, 0.004, 3)] = c
    spacing = (1.7, 0.6) if spatial == 2 else (2.5, 0.8, 1.1)
    onehot = lambda x: np.moveaxis(np.eye(classes, dtype=bool)[x], -1, 1)  # noqa: E731
    for include_background in (False, True):
        ours = mk.surface_metrics(torch.from_numpy(pred), torch.from_numpy(target), spacing, percentile,
                                  num_classes=classes, include_background=include_background)
        theirs = monai_values(monai_metrics, onehot(pred), onehot(target), spacing, include_background, percentile)
        assert_equals_monai(values(ours), theirs, onehot(pred), onehot(target), include_background)


def test_per_image_spacing_matches_monai(monai_metrics):
    rng = np.random.default_rng(3)
    pred = blobs(rng, (4, 2, 30, 36), 0.004, 3)
    target = blobs(rng, (4, 2, 30, 36), 0.004, 3)
    spacing = [[0.5, 0.5], [1.0, 2.0], [0.5, 0.5], [3.0, 3.0]]  # (B, ndim)
    # a row of one value is isotropic (MONAI accepts that only when every row has one value)
    ours = mk.surface_metrics(torch.from_numpy(pred), torch.from_numpy(target), spacing[:3] + [[3.0]],
                              format="onehot", include_background=True)
    theirs = monai_values(monai_metrics, pred, target, spacing, True)
    assert_equals_monai(values(ours), theirs, pred, target, True)
    # a (B, ndim) tensor works as well, and so do label maps
    as_tensor = mk.surface_metrics(torch.from_numpy(pred), torch.from_numpy(target),
                                   torch.tensor([[0.5, 0.5], [1.0, 2.0], [0.5, 0.5], [3.0, 3.0]]), format="onehot",
                                   include_background=True)
    np.testing.assert_array_equal(values(as_tensor), values(ours))


def test_empty_cases_against_monai(monai_metrics):
    """Every empty combination, in the same batch as non-empty classes."""
    pred = np.zeros((2, 3, 10, 12), bool)
    target = np.zeros_like(pred)
    pred[0, 0, 2:5, 2:6] = target[0, 0, 3:6, 2:6] = True  # both present
    pred[0, 1, 1:4, 1:4] = True  # target empty
    target[1, 1, 5:9, 5:9] = True  # pred empty
    pred[1, 2, :, :] = target[1, 2, :, :] = True  # full images: surface = the image border
    ours = mk.surface_metrics(torch.from_numpy(pred), torch.from_numpy(target), (1.0, 2.0), format="onehot",
                              include_background=True)
    theirs = monai_values(monai_metrics, pred, target, (1.0, 2.0), True)
    assert_equals_monai(values(ours), theirs, pred, target, True)
    assert values(ours)[:, 1, 2].tolist() == [0.0, 0.0, 0.0]


# --------------------------------------------------------------------------------------
# Input formats and their checks
# --------------------------------------------------------------------------------------
def test_four_d_input_needs_a_format():
    """(B, C, H, W) one-hot used to be read silently as a 3D volume."""
    rng = np.random.default_rng(0)
    x = torch.from_numpy(blobs(rng, (2, 3, 20, 24), 0.01, 2))
    y = torch.from_numpy(blobs(rng, (2, 3, 20, 24), 0.01, 2))
    with pytest.raises(ValueError, match="ambiguous.*format='mask' or format='onehot'"):
        mk.surface_metrics(x, y)
    onehot = mk.surface_metrics(x, y, format="onehot", include_background=True)
    assert onehot.hausdorff.shape == (2, 3)
    for b in range(2):
        for c in range(3):
            ref = surface_metrics_reference(x[b, c].numpy(), y[b, c].numpy())
            np.testing.assert_allclose(values(onehot)[:, b, c], ref, rtol=1e-9)
    volume = mk.surface_metrics(x, y, format="mask")
    assert volume.hausdorff.shape == (2,)
    for b in range(2):
        np.testing.assert_allclose(values(volume)[:, b], surface_metrics_reference(x[b].numpy(), y[b].numpy()),
                                   rtol=1e-9)
    # a spacing with one value per spatial axis tells the two apart
    np.testing.assert_array_equal(values(mk.surface_metrics(x, y, (1.0, 1.0, 1.0))), values(volume))
    np.testing.assert_array_equal(values(mk.surface_metrics(x, y, (1.0, 1.0), include_background=True)),
                                  values(onehot))
    # 5-d input can only be one-hot
    assert mk.surface_metrics(x[:, :, None], y[:, :, None]).hausdorff.shape == (2, 2)
    assert mk.surface_metrics(x[:, :, None], y[:, :, None], num_classes=3).hausdorff.shape == (2, 2)
    # integer one-hot with num_classes = C looks like label volumes of depth C: asked, not guessed
    xi, yi = x.long(), y.long()
    with pytest.raises(ValueError, match="num_classes=3 is ambiguous.*format='labels' or format='onehot'"):
        mk.surface_metrics(xi, yi, num_classes=3)
    np.testing.assert_array_equal(values(mk.surface_metrics(xi, yi, num_classes=3, format="onehot",
                                                            include_background=True)), values(onehot))
    np.testing.assert_array_equal(values(mk.surface_metrics(xi, yi, (1.0, 1.0), num_classes=3,
                                                            include_background=True)), values(onehot))
    volume_labels = mk.surface_metrics(xi, yi, (1.0, 1.0, 1.0), num_classes=3)  # depth 3, labels 0/1
    np.testing.assert_array_equal(values(volume_labels)[:, :, 0], values(volume))
    assert mk.surface_metrics(xi, yi, num_classes=2).hausdorff.shape == (2, 1)  # depth 3 != 2 classes: labels


def test_onehot_drops_channel_zero_unless_asked():
    rng = np.random.default_rng(1)
    x = torch.from_numpy(blobs(rng, (2, 3, 16, 16), 0.02, 2))
    y = torch.from_numpy(blobs(rng, (2, 3, 16, 16), 0.02, 2))
    full = mk.surface_metrics(x, y, format="onehot", include_background=True)
    fg = mk.surface_metrics(x, y, format="onehot")
    torch.testing.assert_close(fg.assd, full.assd[:, 1:], equal_nan=True)
    with pytest.raises(ValueError, match="leaves no class"):
        mk.surface_metrics(x[:, :1], y[:, :1], format="onehot")
    with pytest.raises(ValueError, match="3 channels"):
        mk.surface_metrics(x, y, format="onehot", num_classes=4)


def test_probabilities_and_nan_are_rejected():
    probs = torch.rand(2, 12, 12, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="only 0 and 1.*threshold"):
        mk.surface_metrics(probs, probs > 0.5)
    with pytest.raises(ValueError, match="only 0 and 1"):
        mk.surface_metrics(probs[:, None], probs[:, None] > 0.5, format="onehot", include_background=True)
    with pytest.raises(ValueError, match="only 0 and 1"):
        mk.surface_metrics(probs, probs, format="mask")  # explicit format: floats still must be binary
    nan = (probs > 0.5).float()
    nan[1, 3, 4] = float("nan")
    with pytest.raises(ValueError, match="pred contains NaN"):
        mk.surface_metrics(nan, nan)
    with pytest.raises(ValueError, match="target contains NaN"):
        mk.surface_metrics((probs > 0.5).half(), nan.half(), format="mask")
    # binarized floats of every width are fine and equal to bool
    mask = probs > 0.5
    ref = values(mk.surface_metrics(mask, mask.flip(1)))
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        got = mk.surface_metrics(mask.to(dtype), mask.flip(1).to(dtype))
        np.testing.assert_array_equal(values(got), ref)


def test_integer_masks_need_0_1_or_an_explicit_format():
    rng = np.random.default_rng(2)
    mask = torch.from_numpy(blobs(rng, (2, 20, 20), 0.02, 2))
    other = torch.from_numpy(blobs(rng, (2, 20, 20), 0.02, 2))
    ref = values(mk.surface_metrics(mask, other))
    # 0/255 PNG masks: a label map or a mask? auto refuses, format='mask' reads non-zero
    with pytest.raises(ValueError, match="found 255.*num_classes"):
        mk.surface_metrics(mask.to(torch.uint8) * 255, other.to(torch.uint8))
    got = mk.surface_metrics(mask.to(torch.uint8) * 255, other.to(torch.int32) * 7, format="mask")
    np.testing.assert_array_equal(values(got), ref)
    with pytest.raises(ValueError, match="only 0 and 1"):
        mk.surface_metrics(mask.long()[:, None] * 2, other.long()[:, None], format="onehot", include_background=True)


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64, torch.int8, torch.int16])
def test_unsigned_and_narrow_integer_dtypes(dtype):
    rng = np.random.default_rng(4)
    labels = torch.from_numpy(rng.integers(0, 3, (2, 18, 20)))
    other = torch.from_numpy(rng.integers(0, 3, (2, 18, 20)))
    ref = values(mk.surface_metrics(labels, other, num_classes=3))
    np.testing.assert_array_equal(values(mk.surface_metrics(labels.to(dtype), other.to(dtype), num_classes=3)), ref)
    m, o = labels == 1, other == 1
    ref_mask = values(mk.surface_metrics(m, o))
    np.testing.assert_array_equal(values(mk.surface_metrics(m.to(dtype), o.to(dtype))), ref_mask)
    oh = torch.nn.functional.one_hot(labels, 3).movedim(-1, 1)
    oh_other = torch.nn.functional.one_hot(other, 3).movedim(-1, 1)
    np.testing.assert_array_equal(values(mk.surface_metrics(oh.to(dtype), oh_other.to(dtype), format="onehot")), ref)


def test_labels_outside_num_classes_are_rejected():
    """Issue 15 item 8: labels >= num_classes used to be ignored silently."""
    good = torch.zeros(2, 8, 8, dtype=torch.int64)
    bad = good.clone()
    bad[1, 3, 3] = 9
    bad[0, 2, 2] = 4
    with pytest.raises(ValueError, match=r"pred holds label 9, outside 0\.\.2 \(num_classes=3\)"):
        mk.surface_metrics(bad, good, num_classes=3)
    with pytest.raises(ValueError, match="pred holds label 3, outside"):  # the first label too many
        mk.surface_metrics(good + 3, good, num_classes=3)
    with pytest.raises(ValueError, match="target holds label 255"):
        mk.surface_metrics(good, good.masked_fill(good == 0, 255), num_classes=3)
    with pytest.raises(ValueError, match="holds label -1"):
        mk.surface_metrics(good - 1, good, num_classes=3)
    huge = good.to(torch.uint64)
    huge[0, 0, 0] = 2**63 + 5
    with pytest.raises(ValueError, match=f"holds label {2**63 + 5}"):
        mk.surface_metrics(huge, good.to(torch.uint64), num_classes=3)
    with pytest.raises(ValueError, match="holds label 65535"):
        mk.surface_metrics(good.to(torch.uint16), (good - 1).to(torch.uint16), num_classes=3)
    with pytest.raises(ValueError, match="leaves no class"):
        mk.surface_metrics(good, good, num_classes=1)
    with pytest.raises(TypeError, match="num_classes must be an int"):
        mk.surface_metrics(good, good, num_classes=2.0)


def test_zero_size_inputs():
    """Issue 15: zero-size dims gave raw reshape/amax errors."""
    for shape in [(2, 0, 5), (1, 4, 0), (1, 3, 0, 5)]:
        z = torch.zeros(shape, dtype=torch.bool)
        with pytest.raises(ValueError, match=r"must be non-empty, got shape"):
            mk.surface_metrics(z, z, format="mask")
    with pytest.raises(ValueError, match="must be non-empty"):
        mk.surface_metrics(torch.zeros(1, 0, 5, 5), torch.zeros(1, 0, 5, 5), format="onehot", include_background=True)
    z = torch.zeros(1, 5, 0, dtype=torch.long)
    with pytest.raises(ValueError, match="must be non-empty"):
        mk.surface_metrics(z, z, num_classes=3)
    # an empty batch is a batch: empty results of the right shape
    z = torch.zeros(0, 6, 7, dtype=torch.long)
    assert mk.surface_metrics(z.bool(), z.bool()).hausdorff.shape == (0,)
    m = mk.surface_metrics(z, z, num_classes=4)
    assert all(v.shape == (0, 3) and v.dtype == torch.float64 for v in m)
    assert mk.surface_metrics(z[:, None].expand(0, 5, 6, 7), z[:, None].expand(0, 5, 6, 7),
                              format="onehot").assd.shape == (0, 4)


def test_bad_arguments():
    a = torch.ones(1, 5, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="percentile"):
        mk.surface_metrics(a, a, percentile=101)
    with pytest.raises(ValueError, match="percentile"):
        mk.surface_metrics(a, a, percentile=float("nan"))
    with pytest.raises(ValueError, match="connectivity"):
        mk.surface_metrics(a, a, connectivity=3)
    with pytest.raises(ValueError, match="same shape"):
        mk.surface_metrics(a, torch.ones(1, 5, 4))
    with pytest.raises(TypeError, match="integer"):
        mk.surface_metrics(a.float(), a.float(), num_classes=3)
    with pytest.raises(TypeError, match="integer"):
        mk.surface_metrics(a, a, num_classes=2)
    with pytest.raises(TypeError, match="torch.Tensor"):
        mk.surface_metrics(a.numpy(), a)
    with pytest.raises(TypeError, match="dtype"):
        mk.surface_metrics(a.to(torch.complex64), a.to(torch.complex64))
    with pytest.raises(ValueError, match="format must be one of"):
        mk.surface_metrics(a, a, format="one-hot")
    with pytest.raises(ValueError, match="num_classes is for"):
        mk.surface_metrics(a, a, num_classes=2, format="mask")
    with pytest.raises(ValueError, match=r"\(B, H, W\) or \(B, D, H, W\)"):
        mk.surface_metrics(a[0], a[0])
    with pytest.raises(ValueError, match="format='onehot' expects"):
        mk.surface_metrics(a, a, format="onehot")
    # spacing: per axis, per image, and what is wrong with it
    with pytest.raises(ValueError, match="one row per image"):
        mk.surface_metrics(a, a, [[1.0, 1.0], [2.0, 2.0]])
    with pytest.raises(ValueError, match="one value per spatial axis"):
        mk.surface_metrics(a, a, [[1.0, 1.0, 1.0]])
    with pytest.raises(ValueError, match="positive"):
        mk.surface_metrics(a, a, [[1.0, -1.0]])
    with pytest.raises(ValueError, match="positive"):
        mk.surface_metrics(a, a, (1.0, float("inf")))
    with pytest.raises(TypeError, match="spacing must be"):
        mk.surface_metrics(a, a, [["1mm", 1.0]])


def test_results_carry_no_gradient_history():
    x = torch.zeros(1, 6, 6)
    x[0, 2:4, 2:4] = 1
    x.requires_grad_()
    m = mk.surface_metrics(x, x.detach().roll(1, 1))
    assert not any(v.requires_grad for v in m) and m.hausdorff.item() == 1.0


# --------------------------------------------------------------------------------------
# SurfaceDistanceMetric: accumulate, reduce, reset
# --------------------------------------------------------------------------------------
def label_batches(seed, sizes, classes=4, shape=(24, 28)):
    """Label-map batches (pred, target) of the given batch sizes; some classes empty."""
    rng = np.random.default_rng(seed)
    out = []
    for b in sizes:
        pair = []
        for _ in range(2):
            lab = np.zeros((b, *shape), np.int64)
            for c in range(1, classes):
                lab[blobs(rng, (b, *shape), 0.004, 2)] = c
            pair.append(torch.from_numpy(lab))
        out.append(tuple(pair))
    return out


def test_metric_accumulates_like_one_call():
    batches = label_batches(0, [2, 3, 1])
    metric = mk.SurfaceDistanceMetric(num_classes=4, reduction="none")
    per_batch = [metric(p, t) for p, t in batches]
    whole = mk.surface_metrics(torch.cat([p for p, _ in batches]), torch.cat([t for _, t in batches]), num_classes=4)
    for got, ref in zip(metric.get_buffer(), whole):
        torch.testing.assert_close(got, ref, equal_nan=True)
    for got, ref in zip(metric.aggregate(), whole):
        torch.testing.assert_close(got, ref, equal_nan=True)
    torch.testing.assert_close(per_batch[1].assd, whole.assd[2:5], equal_nan=True)
    metric.reset()
    assert metric.get_buffer().hausdorff.numel() == 0
    with pytest.raises(RuntimeError, match="no batch seen"):
        metric.aggregate()
    metric.update(*batches[0])
    assert metric.get_buffer().hausdorff.shape == (2, 3)
    # one-hot batches with another number of channels cannot join the buffer
    onehot = mk.SurfaceDistanceMetric(format="onehot")
    onehot(*(torch.nn.functional.one_hot(x, 4).movedim(-1, 1) for x in batches[1]))
    with pytest.raises(ValueError, match="call reset"):
        onehot(*(torch.nn.functional.one_hot(x, 5).movedim(-1, 1) for x in batches[1]))
    with pytest.raises(ValueError, match="reduction must be one of"):
        mk.SurfaceDistanceMetric(reduction="average")


def test_metric_per_batch_spacing():
    batches = label_batches(1, [2, 2])
    metric = mk.SurfaceDistanceMetric(spacing=(0.5, 0.5), num_classes=4, reduction="none")
    metric(*batches[0])
    metric(*batches[1], spacing=[[1.0, 2.0], [3.0, 3.0]])  # per image, for this batch only
    buf = metric.get_buffer()
    for i, (sp, (p, t), row) in enumerate([((0.5, 0.5), batches[0], 0), ((0.5, 0.5), batches[0], 1),
                                           ((1.0, 2.0), batches[1], 0), ((3.0, 3.0), batches[1], 1)]):
        for c in range(1, 4):
            ref = surface_metrics_reference(p[row].numpy() == c, t[row].numpy() == c, sp)
            np.testing.assert_allclose(values(buf)[:, i, c - 1], ref, rtol=1e-9)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum", "mean_batch", "sum_batch", "mean_channel", "sum_channel"])
def test_metric_reductions_match_monai(monai_metrics, reduction):
    """Per-image values from MONAI, reduced by MONAI's do_metric_reduction, against ours."""
    from monai.metrics.utils import do_metric_reduction

    batches = label_batches(2, [3, 2, 4])
    p0, t0 = batches[0]
    t0[0][t0[0] == 3] = 0  # class 3 only in the prediction of image 0: inf
    p0[1][p0[1] == 2] = 0  # class 2 in neither map of image 1: nan
    t0[1][t0[1] == 2] = 0
    ours = mk.SurfaceDistanceMetric(num_classes=4, reduction=reduction, get_not_nans=True, include_background=True)
    theirs = []
    for p, t in batches:
        ours(p, t)
        onehot = lambda x: torch.nn.functional.one_hot(x, 4).movedim(-1, 1)  # noqa: E731
        theirs.append(monai_values(monai_metrics, onehot(p), onehot(t), None, True))
    theirs = np.concatenate(theirs, axis=1)  # (3, N, K)
    # the one documented difference (one mask empty: HD95 inf here, nan in MONAI) would make the
    # reductions differ by design: compare HD and ASSD, and HD95 where no mask is empty
    values_, counts = ours.aggregate()
    for name, k in (("hausdorff", 0), ("assd", 2)):
        ref, ref_n = do_metric_reduction(torch.from_numpy(theirs[k]).float(), reduction)
        got = getattr(values_, name)
        # MONAI's "mean" and "sum" come as shape (1,) or (), ours as ()
        assert got.shape == (ref.shape if ref.dim() > 1 or reduction.endswith(("_batch", "_channel")) else ()), name
        np.testing.assert_allclose(got.numpy(), ref.double().numpy().reshape(got.shape), **MONAI_TOL)
        np.testing.assert_array_equal(getattr(counts, name).numpy(), ref_n.numpy().reshape(got.shape))
    assert np.isinf(theirs[0]).any() and np.isnan(theirs[0]).any(), "the case covers inf and nan values"


def test_metric_mean_against_monai_class(monai_metrics):
    """MONAI's own HausdorffDistanceMetric(percentile=95, reduction='mean'), batch by batch."""
    batches = label_batches(7, [2, 3], classes=3, shape=(40, 40))
    # no empty masks, so no convention differs: every class present in every image
    batches = [(p.clamp(max=2), t.clamp(max=2)) for p, t in batches]
    for p, t in batches:
        p[:, :3, :3] = 1
        p[:, -3:, -3:] = 2
        t[:, :4, :4] = 1
        t[:, -4:, -4:] = 2
    theirs = monai_metrics.HausdorffDistanceMetric(include_background=False, percentile=95, reduction="mean_batch")
    ours = mk.SurfaceDistanceMetric(num_classes=3, reduction="mean_batch")
    for p, t in batches:
        onehot = lambda x: torch.nn.functional.one_hot(x, 3).movedim(-1, 1)  # noqa: E731
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # MONAI's own deprecation notice
            theirs(onehot(p), onehot(t))
        ours(p, t)
    np.testing.assert_allclose(ours.aggregate().hausdorff_percentile.numpy(), theirs.aggregate().numpy(), **MONAI_TOL)


def test_metric_reduction_without_values_is_nan():
    """MONAI returns 0 for a mean over nothing; here it is nan (documented)."""
    empty = torch.zeros(2, 8, 8, dtype=torch.bool)
    metric = mk.SurfaceDistanceMetric(reduction="mean", get_not_nans=True)
    metric(empty, empty)
    vals, counts = metric.aggregate()
    assert vals.hausdorff.isnan().item() and counts.hausdorff.item() == 0
    assert metric.aggregate("sum")[0].assd.item() == 0.0
    # masks (no class axis): shapes of every reduction
    full = empty.clone()
    full[:, 2:5, 2:5] = True
    metric(full, full.roll(1, 1))
    shapes = {r: tuple(metric.aggregate(r)[0].hausdorff.shape) for r in
              ("none", "mean", "sum", "mean_batch", "sum_batch", "mean_channel", "sum_channel")}
    assert shapes == {"none": (4,), "mean": (), "sum": (), "mean_batch": (), "sum_batch": (),
                      "mean_channel": (4,), "sum_channel": (4,)}
    assert metric.aggregate("mean")[0].hausdorff.item() == 1.0


# --------------------------------------------------------------------------------------
# SurfaceDistanceMetric under torch.distributed (2 gloo processes, CPU)
# --------------------------------------------------------------------------------------
DDP_SIZES = {"uneven": ([2, 3, 1], [2]), "one_rank_idle": ([1, 2], [])}


def _ddp_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for scenario, sizes in DDP_SIZES.items():
            metric = mk.SurfaceDistanceMetric(num_classes=4, reduction="mean_batch", get_not_nans=True)
            for p, t in label_batches(10 + rank, sizes[rank]):
                metric(p, t)
            values_, counts = metric.aggregate()
            torch.save({"buffer": tuple(metric.get_buffer()), "values": tuple(values_), "counts": tuple(counts)},
                       os.path.join(out_dir, f"{scenario}-rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_metric_gathers_across_two_gloo_ranks(tmp_path):
    """Rank 0 sees 3 batches and rank 1 one ("uneven"), or none ("one_rank_idle"): every rank
    gets what one process computes over all the batches, rank 0's first."""
    import torch.multiprocessing as mp

    mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="spawn")
    for scenario, sizes in DDP_SIZES.items():
        single = mk.SurfaceDistanceMetric(num_classes=4, reduction="mean_batch", get_not_nans=True)
        for rank in (0, 1):
            for p, t in label_batches(10 + rank, sizes[rank]):
                single(p, t)
        ref_buffer, (ref_values, ref_counts) = single.get_buffer(), single.aggregate()
        assert ref_buffer.hausdorff.shape == (sum(map(sum, sizes)), 3)
        for rank in (0, 1):
            got = torch.load(tmp_path / f"{scenario}-rank{rank}.pt")
            for a, b in zip(got["buffer"], ref_buffer):
                torch.testing.assert_close(a, b, equal_nan=True, rtol=0, atol=0)
            for a, b in zip(got["values"], ref_values):
                torch.testing.assert_close(a, b, equal_nan=True)
            for a, b in zip(got["counts"], ref_counts):
                torch.testing.assert_close(a, b)
