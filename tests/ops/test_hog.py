"""torch.ops.mtseg.hog against scikit-image, its own reference, and its contracts.

Parity is checked per precision: float64 input against skimage fed float64, float32
against skimage fed float32 (skimage keeps float32 in float32). Comparing across
precisions is no parity test: in near-empty blocks the normalisation divides by about
eps = 1e-5, so input rounding is amplified ~1e5 times.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hog_testing import assert_hog_parity, hc18_images, skimage_hog, skimage_image
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from skimage.filters import gaussian

import mtseg_kernels as mk
from mtseg_kernels.ops.hog import HOG_MTL_PRESETS
from mtseg_kernels.reference.hog import hog_cells_reference, hog_reference

NORMS = ["L1", "L1-sqrt", "L2", "L2-Hys"]
# (orientations, pixels_per_cell, cells_per_block): skimage's default, the HOG-MTL
# preset, and an odd non-square one
SETTINGS = [(9, (8, 8), (3, 3)), (6, (16, 16), (2, 2)), (7, (5, 7), (2, 3))]
TOL = {np.float64: 1e-6, np.float32: 1e-5}


def ours(image_chw: np.ndarray, orientations, ppc, cpb, norm, tsqrt) -> np.ndarray:
    out = mk.hog(torch.from_numpy(image_chw), orientations, ppc, cpb, norm, tsqrt, feature_vector=False)
    return out.numpy()


# --------------------------------------------------------------------------------------
# Parity with skimage on real images
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["astronaut", "camera", "coins", "retina"])
@pytest.mark.parametrize("precision", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("tsqrt", [False, True], ids=["linear", "sqrt"])
def test_parity_skimage_images(name, precision, tsqrt):
    image = skimage_image(name).astype(precision) / precision(255)
    for orientations, ppc, cpb in SETTINGS:
        for norm in NORMS:
            expected = skimage_hog(image, orientations, ppc, cpb, norm, tsqrt)
            got = ours(image, orientations, ppc, cpb, norm, tsqrt)
            assert got.dtype == precision
            assert_hog_parity(got, expected, TOL[precision], image, orientations, ppc, cpb, tsqrt)


@pytest.mark.parametrize("tsqrt", [False, True], ids=["linear", "sqrt"])
def test_parity_uint8_images(tsqrt):
    """uint8 in, as skimage takes it (it promotes to float64); our output is float32."""
    for name in ["astronaut", "coins"]:
        image = skimage_image(name)
        for orientations, ppc, cpb in SETTINGS:
            expected = skimage_hog(image, orientations, ppc, cpb, "L2-Hys", tsqrt)
            got = ours(image, orientations, ppc, cpb, "L2-Hys", tsqrt)
            assert got.dtype == np.float32
            assert_hog_parity(got, expected, 1e-5, image.astype(np.float64), orientations, ppc, cpb, tsqrt)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_parity_half_precision(dtype):
    """Half inputs compute in float32, like skimage does for float16."""
    image = torch.from_numpy(skimage_image("astronaut")[:, :200, :240].astype(np.float32) / 255).to(dtype)
    as_float = image.float().numpy()
    for orientations, ppc, cpb in SETTINGS:
        expected = skimage_hog(as_float, orientations, ppc, cpb, "L2-Hys", False)
        got = mk.hog(image, orientations, ppc, cpb, feature_vector=False).numpy()
        assert got.dtype == np.float32
        assert_hog_parity(got, expected, 1e-5, as_float, orientations, ppc, cpb, False)


def test_parity_hc18_ultrasound(shared_data):
    """Real fetal-head ultrasound (grey, 540 x 800) from ../shared/data/hc18."""
    for image in hc18_images(shared_data):
        for precision in (np.float64, np.float32):
            img = image.astype(precision) / precision(255)
            for orientations, ppc, cpb in SETTINGS:
                for norm in ("L2-Hys", "L1-sqrt"):
                    expected = skimage_hog(img, orientations, ppc, cpb, norm, False)
                    got = ours(img, orientations, ppc, cpb, norm, False)
                    assert_hog_parity(got, expected, TOL[precision], img, orientations, ppc, cpb, False)


def test_float32_cells_match_skimage_to_rounding():
    """Cells are summed in double: within a few float32 ulps of skimage's float32 sum."""
    image = skimage_image("astronaut").astype(np.float32) / np.float32(255)
    cells = mk.hog_cells(torch.from_numpy(image), 9, (8, 8)).numpy()
    # With 1x1 blocks and L1 norm skimage's output is the cell histogram scaled per cell.
    expected = skimage_hog(image, 9, (8, 8), (1, 1), "L1", False)[:, :, 0, 0, :]
    scaled = cells / (cells.sum(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(scaled, expected, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------
# Property-based: random shapes, parameters and data
# --------------------------------------------------------------------------------------
@st.composite
def hog_cases(draw):
    ppc = (draw(st.integers(1, 6)), draw(st.integers(1, 6)))
    cpb = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    height = draw(st.integers(cpb[0] * ppc[0], cpb[0] * ppc[0] + 12))
    width = draw(st.integers(cpb[1] * ppc[1], cpb[1] * ppc[1] + 12))
    channels = draw(st.sampled_from([1, 2, 3, 4]))
    orientations = draw(st.sampled_from([1, 2, 3, 4, 6, 8, 9, 12, 14, 28]))
    norm = draw(st.sampled_from(NORMS))
    tsqrt = draw(st.booleans())
    # Small integers put many gradients exactly on 0/45/90/135 degrees and make
    # channel ties common; uniform floats cover everything else.
    kind = draw(st.sampled_from(["integers", "uniform"]))
    seed = draw(st.integers(0, 2**31 - 1))
    return ppc, cpb, (channels, height, width), orientations, norm, tsqrt, kind, seed


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hog_cases())
def test_random_cases_match_skimage(case):
    ppc, cpb, shape, orientations, norm, tsqrt, kind, seed = case
    rng = np.random.default_rng(seed)
    if kind == "integers":
        image = rng.integers(0, 4, size=shape).astype(np.float64)
    else:
        image = rng.random(shape)
    expected = skimage_hog(image, orientations, ppc, cpb, norm, tsqrt)
    got = ours(image, orientations, ppc, cpb, norm, tsqrt)
    assert_hog_parity(got, expected, 1e-6, image, orientations, ppc, cpb, tsqrt)
    image32 = image.astype(np.float32)
    expected32 = skimage_hog(image32, orientations, ppc, cpb, norm, tsqrt)
    got32 = ours(image32, orientations, ppc, cpb, norm, tsqrt)
    assert_hog_parity(got32, expected32, 1e-5, image32, orientations, ppc, cpb, tsqrt)


@pytest.mark.parametrize("precision", [np.float64, np.float32, np.uint8], ids=["float64", "float32", "uint8"])
def test_channel_ties_follow_skimage(precision):
    """Channels whose gradients differ but whose magnitudes tie ((3, 4) vs (0, 5) vs
    (5, 0), scaled) go to the lowest channel, as numpy's argmax does in skimage; and the
    near-ties that float32 rounding creates are decided at skimage's precision."""
    rng = np.random.default_rng(7)
    image = np.zeros((3, 40, 48))
    rows, cols = np.mgrid[:40, :48]
    image[0] = 2.5 * rows  # gradient (5, 0): rows
    image[1] = 1.5 * rows + 2.0 * cols  # (3, 4)
    image[2] = 2.5 * cols  # (0, 5)
    image = image[rng.permutation(3)] + rng.integers(0, 2, size=(3, 40, 48))  # some exact, some broken ties
    if precision == np.uint8:
        image = image.astype(np.uint8)
    else:
        image = (image / 255).astype(precision)
    for orientations in (4, 9):
        expected = skimage_hog(image, orientations, (4, 4), (2, 2), "L1", False)
        got = ours(image, orientations, (4, 4), (2, 2), "L1", False)
        assert_hog_parity(got, expected, 1e-5, image.astype(np.float64), orientations, (4, 4), (2, 2), False)


@pytest.mark.parametrize("orientations", [4, 8, 12, 14, 20, 28, 36, 44])
def test_exact_boundary_directions(orientations):
    """Gradients exactly at 0/45/90/135 degrees land in skimage's bin for every n,
    including n where skimage's boundary (180/n)*i is not exactly 45/90/135."""
    rng = np.random.default_rng(orientations)
    image = rng.integers(0, 3, size=(3, 48, 40)).astype(np.float64)
    expected = skimage_hog(image, orientations, (4, 4), (1, 1), "L1", False)
    got = ours(image, orientations, (4, 4), (1, 1), "L1", False)
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------
# Behaviours skimage's own tests check
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("rotation", [0, 1, 2, 3])
def test_step_edge_energy_in_expected_bin(rotation):
    image = np.zeros((64, 64))
    image[:, 32:] = 1.0  # vertical edge: gradient along columns, theta = 0
    image = np.rot90(image, rotation).copy()
    orientations = 6
    cells = mk.hog_cells(torch.from_numpy(image), orientations, (8, 8)).numpy()
    # 0 and 180 degrees fall in bin 0; 90 and 270 (rows) in the bin starting at 90
    expected_bin = 0 if rotation % 2 == 0 else orientations // 2
    energy = cells.sum(axis=(0, 1))
    assert energy[expected_bin] > 0
    assert np.count_nonzero(energy) == 1


def test_blurred_circle_has_equal_energy_per_orientation():
    """skimage's criterion: each orientation's mean is within 0.1 of the overall mean."""
    width = height = 100
    yy, xx = np.mgrid[:height, :width]
    image = 100.0 * (((yy - height // 2) ** 2 + (xx - width // 2) ** 2) < (width // 3) ** 2)
    image = gaussian(image, sigma=2, preserve_range=True)
    for orientations in range(2, 15):
        out = mk.hog(torch.from_numpy(image), orientations, (8, 8), (1, 1), "L1", feature_vector=False).numpy()
        per_orientation = out.reshape(-1, orientations).mean(axis=0)
        np.testing.assert_array_less(np.abs(per_orientation - out.mean()), 0.1)
        # The circle is symmetric up to rounding: many gradients lie within an ulp of 45 or
        # 135 degrees, where skimage's rounded atan2 and our exact test may disagree.
        expected = skimage_hog(image[None], orientations, (8, 8), (1, 1), "L1", False)
        assert_hog_parity(out, expected, 1e-6, image[None], orientations, (8, 8), (1, 1), False)


def test_rolling_channels_does_not_change_result():
    """Without exact channel ties the winning channel's gradient does not depend on the
    channel order. (With ties, e.g. astronaut's saturated regions, the lowest channel
    wins and the order matters -- in skimage too.)"""
    image = np.random.default_rng(3).random((3, 96, 88))
    base = ours(image, 9, (8, 8), (3, 3), "L2-Hys", False)
    for shift in (1, 2):
        rolled = np.ascontiguousarray(np.roll(image, shift, axis=0))
        np.testing.assert_array_equal(ours(rolled, 9, (8, 8), (3, 3), "L2-Hys", False), base)


def test_too_small_image_raises_like_skimage():
    image = np.random.default_rng(0).random((1, 23, 40))
    with pytest.raises(ValueError, match="too small"):
        skimage_hog(image, 9, (8, 8), (3, 3), "L2-Hys", False)
    with pytest.raises(ValueError, match=r"too small.*at least 24 rows and 24 cols, got 23 x 40"):
        ours(image, 9, (8, 8), (3, 3), "L2-Hys", False)


# --------------------------------------------------------------------------------------
# Batching, layouts, ranks
# --------------------------------------------------------------------------------------
def test_batch_equals_per_image(device, dtype):
    images = torch.rand(5, 3, 70, 53, dtype=dtype, device=device)
    batch = mk.hog(images, 9, 8, 2, "L2-Hys")
    single = torch.stack([mk.hog(img, 9, 8, 2, "L2-Hys") for img in images])
    torch.testing.assert_close(batch, single, rtol=0, atol=0)


def test_layouts_equal_contiguous(device):
    base = torch.rand(4, 3, 96, 80, device=device)
    expected = mk.hog(base, 6, 16, 2)
    torch.testing.assert_close(mk.hog(base.to(memory_format=torch.channels_last), 6, 16, 2), expected, rtol=0, atol=0)
    big = torch.rand(4, 5, 200, 170, device=device)
    strided = big[:, 1:4, 10:106, ::2][..., :80]  # non-contiguous in every dimension
    torch.testing.assert_close(mk.hog(strided, 6, 16, 2), mk.hog(strided.contiguous(), 6, 16, 2), rtol=0, atol=0)
    flipped = base.flip(-1)  # negative stride
    torch.testing.assert_close(mk.hog(flipped, 6, 16, 2), mk.hog(flipped.contiguous(), 6, 16, 2), rtol=0, atol=0)


def test_ranks_and_shapes():
    image = torch.rand(3, 64, 48)
    assert mk.hog(image, 9, 8, 3).shape == (1 * 6 * 4 * 3 * 3 * 9,)
    assert mk.hog(image[0], 9, 8, 3).shape == (6 * 4 * 3 * 3 * 9,)
    assert mk.hog(image[None], 9, 8, 3, feature_vector=False).shape == (1, 6, 4, 3, 3, 9)
    assert mk.hog_output_shape((64, 48), 9, 8, 3) == (6, 4, 3, 3, 9)
    assert mk.hog_cells(image, 9, 8).shape == (8, 6, 9)
    for dim, preset in HOG_MTL_PRESETS.items():
        shape = mk.hog_output_shape((128, 64), preset.orientations, preset.pixels_per_cell, preset.cells_per_block)
        assert int(np.prod(shape)) == dim


def test_hog_equals_blocks_of_cells(dtype):
    images = torch.rand(2, 3, 50, 60, dtype=dtype)
    cells = mk.hog_cells(images, 7, (5, 6))
    for norm in NORMS:
        torch.testing.assert_close(
            mk.hog_blocks(cells, (2, 3), norm), mk.hog(images, 7, (5, 6), (2, 3), norm, feature_vector=False)
        )


# --------------------------------------------------------------------------------------
# The pure-torch reference agrees (values and gradients)
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", NORMS)
def test_matches_reference(norm):
    images = torch.rand(3, 2, 45, 38, dtype=torch.float64)
    torch.testing.assert_close(
        mk.hog(images, 8, (6, 5), (2, 2), norm, feature_vector=False), hog_reference(images, 8, (6, 5), (2, 2), norm)
    )
    torch.testing.assert_close(mk.hog_cells(images, 8, (6, 5)), hog_cells_reference(images, 8, (6, 5)))


@pytest.mark.parametrize("norm", ["L1", "L2", "L2-Hys"])
@pytest.mark.parametrize("tsqrt", [False, True], ids=["linear", "sqrt"])
def test_backward_matches_autograd_through_reference(norm, tsqrt):
    # (L1-sqrt is left to gradcheck: autograd through the reference is NaN at empty bins.)
    torch.manual_seed(0)
    images = (torch.rand(2, 3, 40, 36, dtype=torch.float64) + 0.05).requires_grad_()
    out = mk.hog(images, 9, 8, 3, norm, tsqrt, feature_vector=False)
    upstream = torch.randn_like(out)
    (ours_grad,) = torch.autograd.grad((out * upstream).sum(), images)
    (ref_grad,) = torch.autograd.grad((hog_reference(images, 9, (8, 8), (3, 3), norm, tsqrt) * upstream).sum(), images)
    torch.testing.assert_close(ours_grad, ref_grad, rtol=1e-9, atol=1e-12)


def test_float32_backward_matches_reference():
    """The float32 kernels (float lanes, float32-hypot channel choice) give the float64
    reference's gradient to float32 accuracy. Random pixels: no channel ties, which
    float32 and float64 may break differently (skimage's float32 rule is tested above)."""
    images = torch.rand(2, 3, 96, 64, generator=torch.Generator().manual_seed(5)).requires_grad_()
    out = mk.hog(images, 6, 16, 2, "L2-Hys", feature_vector=False)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    (ours_grad,) = torch.autograd.grad((out * upstream).sum(), images)
    ref_in = images.detach().double().requires_grad_()
    (ref_grad,) = torch.autograd.grad((hog_reference(ref_in, 6, (16, 16), (2, 2)) * upstream.double()).sum(), ref_in)
    torch.testing.assert_close(ours_grad.double(), ref_grad, rtol=1e-3, atol=1e-5)


# --------------------------------------------------------------------------------------
# Gradients, opcheck, torch.compile
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("tsqrt", [False, True], ids=["linear", "sqrt"])
def test_gradcheck(norm, tsqrt):
    # Random values away from 0 keep the sqrt smooth; ties and bin edges have measure 0.
    torch.manual_seed(1)
    images = (torch.rand(2, 3, 14, 13, dtype=torch.float64) + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: mk.hog(x, 5, (4, 3), (2, 2), norm, tsqrt), (images,))


def test_gradcheck_pieces():
    torch.manual_seed(2)
    images = (torch.rand(1, 2, 12, 12, dtype=torch.float64) + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: mk.hog_cells(x, 6, (4, 4)), (images,))
    cells = (torch.rand(2, 4, 5, 3, dtype=torch.float64) + 0.01).requires_grad_()
    for norm in NORMS:
        assert torch.autograd.gradcheck(lambda c, n=norm: mk.hog_blocks(c, (2, 3), n), (cells,))


def test_gradient_dtype_follows_input():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        images = torch.rand(2, 3, 32, 32).to(dtype).requires_grad_()
        mk.hog(images, 9, 8, 2).sum().backward()
        assert images.grad.dtype == dtype and torch.isfinite(images.grad.float()).all()


def test_opcheck():
    images = torch.rand(2, 3, 33, 26, dtype=torch.float64, requires_grad=True)
    ops = torch.ops.mtseg
    torch.library.opcheck(ops.hog.default, (images, 6, [8, 8], [2, 2], "L2-Hys", False))
    torch.library.opcheck(ops.hog.default, (images.detach().float(), 6, [8, 8], [2, 2], "L1", True))
    torch.library.opcheck(ops.hog_cells.default, (images, 6, [8, 8], False))
    cells = torch.rand(2, 4, 3, 6, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(ops.hog_blocks.default, (cells, [2, 2], "L1-sqrt"))
    grad = torch.rand(2, 3, 2, 2, 2, 6, dtype=torch.float64)
    torch.library.opcheck(ops.hog_blocks_backward.default, (grad, cells.detach(), [2, 2], "L2"))
    torch.library.opcheck(
        ops.hog_cells_backward.default, (torch.rand(2, 4, 3, 6, dtype=torch.float64), images.detach(), 6, [8, 8], False)
    )


def test_torch_compile_fullgraph_training_step():
    """A loss that uses HOG targets and HOG of a prediction compiles without graph breaks."""
    torch._dynamo.reset()

    def step(images, prediction):
        target = mk.hog_pseudo_label(images)
        pred_hog = mk.hog(prediction, 6, (16, 16), (2, 2))
        return torch.nn.functional.mse_loss(pred_hog, target)

    images = torch.rand(4, 3, 128, 64)
    prediction = torch.rand(4, 3, 128, 64, requires_grad=True)
    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    loss = compiled(images, prediction)
    loss.backward()
    grad = prediction.grad.clone()
    prediction.grad = None
    eager = step(images, prediction)
    eager.backward()
    torch.testing.assert_close(loss, eager)
    torch.testing.assert_close(grad, prediction.grad)


# --------------------------------------------------------------------------------------
# Module and HOG-MTL preset
# --------------------------------------------------------------------------------------
def test_module_matches_function():
    module = mk.HOG(orientations=6, pixels_per_cell=16, cells_per_block=2)
    images = torch.rand(3, 3, 128, 64)
    torch.testing.assert_close(module(images), mk.hog(images, 6, 16, 2))
    assert "orientations=6" in repr(module)


@pytest.mark.parametrize("dim", sorted(HOG_MTL_PRESETS))
def test_pseudo_label_presets_match_skimage(dim):
    preset = HOG_MTL_PRESETS[dim]
    images = torch.rand(2, 3, 256, 256)
    labels = mk.hog_pseudo_label(images, dim)
    assert labels.shape == (2, dim) and labels.dtype == torch.float32 and not labels.requires_grad
    resized = torch.nn.functional.interpolate(images, size=(128, 64), mode="bilinear", antialias=True)
    for i in range(2):
        expected = skimage_hog(
            resized[i].numpy(), preset.orientations, preset.pixels_per_cell, preset.cells_per_block, "L2-Hys", False,
            feature_vector=True,
        )
        np.testing.assert_allclose(labels[i].numpy(), expected, atol=1e-5, rtol=0)


def test_pseudo_label_uint8_is_scaled():
    images = (torch.rand(2, 3, 200, 100) * 255).to(torch.uint8)
    torch.testing.assert_close(mk.hog_pseudo_label(images), mk.hog_pseudo_label(images.float() / 255))


# --------------------------------------------------------------------------------------
# Bad input: clear errors, never a crash or a silent wrong answer
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(block_norm="L3"), ValueError, "block_norm must be one of"),
        (dict(pixels_per_cell=(0, 8)), ValueError, "pixels_per_cell must be positive"),
        (dict(cells_per_block=(-1, 2)), ValueError, "cells_per_block must be positive"),
        (dict(orientations=0), ValueError, "orientations must be positive"),
        (dict(orientations=2.5), TypeError, "orientations must be an int"),
        (dict(pixels_per_cell=(8, 8, 8)), TypeError, "pair of ints"),
    ],
)
def test_bad_parameters(kwargs, error, match):
    with pytest.raises(error, match=match):
        mk.hog(torch.rand(1, 3, 64, 64), **kwargs)


def test_bad_images():
    with pytest.raises(ValueError, match=r"\(H, W\), \(C, H, W\) or \(B, C, H, W\)"):
        mk.hog(torch.rand(1, 1, 3, 64, 64))
    with pytest.raises(TypeError, match="int32"):
        mk.hog(torch.zeros(1, 3, 64, 64, dtype=torch.int32))
    with pytest.raises(TypeError, match="torch.Tensor"):
        mk.hog(np.zeros((64, 64)))
    with pytest.raises(ValueError, match="at least one channel"):
        mk.hog(torch.rand(1, 0, 64, 64))
    with pytest.raises(ValueError, match="too small"):
        mk.hog(torch.rand(2, 3, 64, 10))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_pixels_raise(dtype, bad):
    images = torch.rand(2, 3, 70, 66, dtype=dtype)
    images[1, 2, 33, 40] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        mk.hog(images, 9, 8, 2)
    # also in the trailing rows that no cell covers
    images = torch.rand(1, 1, 70, 66, dtype=dtype)
    images[0, 0, 69, 3] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        mk.hog(images, 9, 8, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_negative_pixels_with_sqrt_raise(dtype):
    images = torch.rand(1, 3, 40, 40, dtype=dtype) - 0.5
    with pytest.raises(ValueError, match="transform_sqrt"):
        mk.hog(images, 9, 8, 2, transform_sqrt=True)
    mk.hog(images, 9, 8, 2, transform_sqrt=False)  # negative values are fine without sqrt


def test_empty_batch_gives_empty_result():
    out = mk.hog(torch.rand(0, 3, 64, 64), 9, 8, 3)
    assert out.shape == (0, 6 * 6 * 3 * 3 * 9)


def test_direct_operator_calls_validate():
    ops = torch.ops.mtseg
    with pytest.raises(ValueError, match=r"expected images of shape \(B, C, H, W\)"):
        ops.hog(torch.rand(3, 64, 64), 9, [8, 8], [3, 3], "L2-Hys", False)
    with pytest.raises(ValueError, match="block_norm must be one of"):
        ops.hog(torch.rand(1, 3, 64, 64), 9, [8, 8], [3, 3], "max", False)
    with pytest.raises(ValueError, match="too small"):
        ops.hog(torch.rand(1, 3, 20, 64), 9, [8, 8], [3, 3], "L2", False)
    with pytest.raises(TypeError, match="expected uint8, float16, bfloat16, float32 or float64"):
        ops.hog_cells(torch.zeros(1, 1, 16, 16, dtype=torch.int64), 9, [8, 8], False)
    with pytest.raises(ValueError, match="does not match the blocks"):
        ops.hog_blocks_backward(torch.rand(1, 3, 3, 2, 2, 9), torch.rand(1, 3, 3, 9), [2, 2], "L2")
