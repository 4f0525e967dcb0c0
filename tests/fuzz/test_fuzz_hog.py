"""Raw-op fuzzers of the HOG ops: hog, hog_cells, hog_blocks and their backwards.

Oracles, all from ``mtseg_kernels/reference/hog.py`` (float64, skimage's formulas):

* a cell's total over orientations is the mean gradient magnitude of its pixels, which
  does not depend on the binning: ``cells.sum(-1)`` equals the reference with one bin;
* blocks are the reference normalisation of the given cells (no binning involved);
* with a cell gradient that is the same for every orientation, ``hog_cells_backward``
  is the gradient of that total, again independent of the binning;
* ``hog_blocks_backward`` is autograd through the reference normalisation.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fuzzing import FLOAT_DTYPES, call, fuzz_settings, ints_at_limits, is_finite, mostly, shapes, tensors, to_numpy
from hypothesis import given
from hypothesis import strategies as st

from mtseg_kernels.reference.hog import hog_blocks_reference, hog_cells_reference

BLOCK_NORMS = ("L1", "L1-sqrt", "L2", "L2-Hys")
IMAGE_DTYPES = [torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.float64]
ANY_DTYPE = [torch.bool, torch.int8, torch.int32, torch.int64, torch.uint16, torch.complex64]
# Cells and their gradients: mostly the float32 / float64 the ops take, sometimes anything.
CELL_DTYPES = [torch.float32, torch.float64] * 8 + FLOAT_DTYPES + ANY_DTYPE


def pairs(low=1, high=4):
    """An int[2]: mostly small positive, sometimes zero, negative, huge or of the wrong length."""
    good = st.tuples(st.integers(low, high), st.integers(low, high)).map(list)
    bad = st.one_of(
        st.tuples(ints_at_limits(), ints_at_limits()).map(list),
        st.lists(st.integers(1, 3), min_size=0, max_size=4).filter(lambda v: len(v) != 2),
    )
    return mostly(good, bad)


def norms():
    return mostly(st.sampled_from(BLOCK_NORMS), st.sampled_from(["", "l2", "L2-hys", "L2\0", "max", "L1 "]), 0.1)


def orientation_counts():
    return mostly(st.integers(1, 12), ints_at_limits(), 0.15)


@st.composite
def images(draw):
    shape = draw(mostly(shapes(4, 4, max_side=3).flatmap(_grow_hw), shapes(1, 5, max_side=4), 0.15))
    dtypes = draw(mostly(st.just(IMAGE_DTYPES), st.just(ANY_DTYPE), 0.15))
    return draw(tensors(shape=shape, dtypes=dtypes, low=0, high=255, kinds=("small", "small", "hostile")))


def _grow_hw(shape):
    """(B, C, h, w) with h, w up to 3 -> H, W up to 12: room for a few cells and blocks."""
    return st.tuples(st.integers(0, 10), st.integers(0, 10)).map(lambda hw: (*shape[:2], hw[0] + shape[2], hw[1] + shape[3]))


def cell_dtype(images: torch.Tensor) -> torch.dtype:
    return torch.float64 if images.dtype == torch.float64 else torch.float32


def tolerance(dtype: torch.dtype) -> float:
    return 1e-11 if dtype == torch.float64 else 3e-5


def assert_close_scaled(got: torch.Tensor, want: torch.Tensor, rtol: float, what: str):
    """|got - want| <= rtol * max|want| (+ rtol elementwise): float32 sums lose relative
    precision on small entries next to large ones; NaN and inf must sit in the same places."""
    got, want = got.double(), want.double()
    assert torch.equal(got.isnan(), want.isnan()), f"{what}: NaN where the reference has none (or vice versa)"
    finite = torch.isfinite(want)
    assert torch.equal(got[~finite & ~want.isnan()], want[~finite & ~want.isnan()]), f"{what}: infinities differ"
    if finite.any():
        scale = want[finite].abs().max()
        err = (got[finite] - want[finite]).abs()
        bound = rtol * (scale + want[finite].abs())
        assert (err <= bound).all(), f"{what}: max error {err.max().item():.3g} at scale {scale.item():.3g}"


def cell_mass(images: torch.Tensor, ppc, tsqrt: bool) -> np.ndarray:
    """Per cell the mean gradient magnitude of the winning channel (skimage's rule), in
    float64 with ``np.hypot``, which does not overflow where the squares would: the
    total of a cell over its orientation bins, whatever the binning."""
    x = to_numpy(images).astype(np.float64)
    if tsqrt:
        x = np.sqrt(x)
    g_row, g_col = np.zeros_like(x), np.zeros_like(x)
    g_row[..., 1:-1, :] = x[..., 2:, :] - x[..., :-2, :]
    g_col[..., :, 1:-1] = x[..., :, 2:] - x[..., :, :-2]
    mag = np.hypot(g_row, g_col).max(axis=1)
    B, H, W = mag.shape
    r, c = ppc
    R, C = H // r, W // c
    return (mag[:, : R * r, : C * c] / (r * c)).reshape(B, R, r, C, c).sum(axis=(2, 4))


def check_cells(cells, images, orientations, ppc, tsqrt):
    if cells is None:
        return
    assert images.dim() == 4 and images.dtype in IMAGE_DTYPES and images.shape[1] > 0
    B, _, H, W = images.shape
    assert orientations > 0 and min(ppc) > 0 and len(ppc) == 2
    assert cells.shape == (B, H // ppc[0], W // ppc[1], orientations) and cells.dtype == cell_dtype(images)
    mass = torch.from_numpy(cell_mass(images, ppc, tsqrt))
    if cells.dtype == torch.float32:
        mass = torch.where(mass.abs() > torch.finfo(torch.float32).max, mass * torch.inf, mass)  # float32 overflow
    assert_close_scaled(cells.sum(-1), mass, tolerance(cells.dtype) * max(1, orientations), "hog_cells mass")


@st.composite
def cells_args(draw):
    return draw(images()), draw(orientation_counts()), draw(pairs()), draw(st.booleans())


@fuzz_settings
@given(cells_args())
def test_hog_cells(args):
    check_cells(call("hog_cells", *args), *args)


@st.composite
def cells_tensors(draw):
    """Cells (B, rows, cols, n): mostly float32/64 and >= 0 like real cells, sometimes anything."""
    shape = draw(mostly(shapes(4, 4, max_side=5), shapes(1, 5, max_side=4), 0.15))
    cells = draw(tensors(shape=shape, dtypes=CELL_DTYPES))
    if cells.dtype.is_floating_point and draw(st.integers(0, 3)):
        cells = cells.abs()
    return cells


def check_blocks(blocks, cells, cpb, norm):
    if blocks is None:
        return
    assert cells.dim() == 4 and cells.dtype in (torch.float32, torch.float64) and norm in BLOCK_NORMS
    B, R, C, n = cells.shape
    assert n > 0 and len(cpb) == 2 and 0 < cpb[0] <= R and 0 < cpb[1] <= C
    assert blocks.shape == (B, R - cpb[0] + 1, C - cpb[1] + 1, cpb[0], cpb[1], n) and blocks.dtype == cells.dtype
    want = hog_blocks_reference(cells.double(), tuple(cpb), norm)
    assert_close_scaled(blocks, want, tolerance(cells.dtype), f"hog_blocks {norm}")


@fuzz_settings
@given(cells_tensors(), pairs(), norms())
def test_hog_blocks(cells, cpb, norm):
    check_blocks(call("hog_blocks", cells, cpb, norm), cells, cpb, norm)


@fuzz_settings
@given(cells_args(), pairs(), norms())
def test_hog(args, cpb, norm):
    imgs, orientations, ppc, tsqrt = args
    out = call("hog", imgs, orientations, ppc, cpb, norm, tsqrt)
    if out is None:
        return
    # The composite is hog_blocks(hog_cells): both pieces are checked on their own above.
    cells = call("hog_cells", imgs, orientations, ppc, tsqrt)
    assert cells is not None, "hog returned where hog_cells raised"
    check_cells(cells, imgs, orientations, ppc, tsqrt)
    check_blocks(out, cells, cpb, norm)


@st.composite
def cells_backward_args(draw):
    imgs, orientations, ppc, tsqrt = draw(cells_args())
    grad_kind = draw(mostly(st.just("uniform"), st.sampled_from(["random", "wrong_shape"]), 0.3))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    if imgs.dim() == 4 and min(ppc + [1]) > 0 and len(ppc) == 2 and orientations > 0 and orientations < 64:
        shape = (imgs.shape[0], imgs.shape[2] // ppc[0], imgs.shape[3] // ppc[1], orientations)
    else:
        shape = (1, 1, 1, 1)
    if grad_kind == "wrong_shape":
        grad = draw(tensors(shape=draw(shapes(0, 5, max_side=3))))
    elif grad_kind == "random":
        grad = draw(tensors(shape=shape))
    else:
        grad = torch.randn(shape[:3], generator=gen, dtype=torch.float64).unsqueeze(-1).expand(shape)
        grad = grad.to(draw(st.sampled_from([torch.float32, torch.float64])))
    return grad, imgs, orientations, ppc, tsqrt


@fuzz_settings
@given(cells_backward_args())
def test_hog_cells_backward(args):
    grad, imgs, orientations, ppc, tsqrt = args
    out = call("hog_cells_backward", *args)
    if out is None:
        return
    assert imgs.dim() == 4 and imgs.dtype in IMAGE_DTYPES and orientations > 0
    assert grad.shape == (imgs.shape[0], imgs.shape[2] // ppc[0], imgs.shape[3] // ppc[1], orientations)
    assert out.shape == imgs.shape and out.dtype == cell_dtype(imgs)
    uniform = grad.numel() == 0 or bool((grad == grad[..., :1]).all())
    moderate = imgs.numel() == 0 or float(imgs.abs().max()) < 1e100  # the reference squares the differences
    if not (uniform and moderate and is_finite(grad)) or tsqrt or imgs.dtype != torch.float64:
        return  # the oracle below needs a binning-free gradient, moderate values and float64 rounding
    x = imgs.detach().double().requires_grad_(True)
    mass = hog_cells_reference(x, 1, tuple(ppc), False)[..., 0]
    (want,) = torch.autograd.grad((mass * grad[..., 0].double()).sum(), x, allow_unused=True)
    want = torch.zeros_like(x) if want is None else want
    assert_close_scaled(out, want, 1e-9, "hog_cells_backward")


@st.composite
def blocks_backward_args(draw):
    cells = draw(cells_tensors())
    cpb, norm = draw(pairs()), draw(norms())
    if cells.dim() == 4 and len(cpb) == 2 and 0 < cpb[0] <= cells.shape[1] and 0 < cpb[1] <= cells.shape[2]:
        B, R, C, n = cells.shape
        shape = (B, R - cpb[0] + 1, C - cpb[1] + 1, cpb[0], cpb[1], n)
    else:
        shape = draw(shapes(6, 6, max_side=2))
    if draw(st.integers(0, 5)) == 0:
        shape = draw(shapes(0, 6, max_side=3))  # a grad that matches no blocks
    grad = draw(tensors(shape=shape, dtypes=CELL_DTYPES, kinds=("small",)))
    return grad, cells, cpb, norm


@fuzz_settings
@given(blocks_backward_args())
def test_hog_blocks_backward(args):
    grad, cells, cpb, norm = args
    out = call("hog_blocks_backward", *args)
    if out is None:
        return
    assert cells.dim() == 4 and cells.dtype in (torch.float32, torch.float64) and norm in BLOCK_NORMS
    assert out.shape == cells.shape and out.dtype == cells.dtype
    B, R, C, n = cells.shape
    assert grad.shape == (B, R - cpb[0] + 1, C - cpb[1] + 1, cpb[0], cpb[1], n)
    # autograd of sqrt / abs / min is ambiguous at 0 and at the clip: only cells > 0 clear of it
    if cells.dtype != torch.float64 or not is_finite(cells) or not is_finite(grad) or not bool((cells > 1e-3).all()):
        return
    x = cells.detach().clone().requires_grad_(True)
    blocks = hog_blocks_reference(x, tuple(cpb), norm)
    if norm == "L2-Hys" and bool(((blocks.detach() - 0.2).abs() < 1e-9).any()):
        return
    (want,) = torch.autograd.grad((blocks * grad.double()).sum(), x, allow_unused=True)
    want = torch.zeros_like(x) if want is None else want
    assert_close_scaled(out, want, 1e-9, f"hog_blocks_backward {norm}")


def test_hostile_orientations_are_rejected_without_allocating():
    """orientations sizes the output and each pixel's bin search: 2^31 bins used to ask
    the allocator for 32 GiB (4 cells), 2^24 to run for half a minute, and 2^62 on an
    empty batch to fail with torch's "Stride calculation overflowed"; now a clear error
    from the op and from its fake kernel."""
    for img in (torch.rand(1, 1, 8, 8), torch.rand(0, 1, 8, 8)):
        for n in (2**17, 2**24, 2**31, 2**40, 2**62):
            for meta in (False, True):
                images = img.to("meta") if meta else img
                for op, args in (
                    ("hog_cells", (images, n, [4, 4], False)),
                    ("hog", (images, n, [4, 4], [1, 1], "L2", False)),
                    ("hog_cells_backward", (torch.zeros(img.shape[0], 2, 2, 1), images, n, [4, 4], False)),
                ):
                    with pytest.raises(ValueError, match=rf"{op}: orientations must be in \[1, 65536\], got {n}"):
                        getattr(torch.ops.mtseg, op)(*args)
    assert call("hog_cells", torch.rand(1, 1, 8, 8), 2**16, [4, 4], False).shape == (1, 2, 2, 2**16)


def test_hostile_float_pixels():
    """Every hostile float in every HOG image dtype: a clear error or the reference mass."""
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        for v in (1e20, 3.4e38, 1e300, float("inf"), float("nan"), 5e-324):
            img = torch.rand(1, 2, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
            img[0, 1, 3, 3] = v
            img = img.to(dtype)
            check_cells(call("hog_cells", img, 9, [4, 4], False), img, 9, [4, 4], False)
