"""Helpers shared by the HOG tests: skimage calls, real images, an exact oracle for the
orientation bins, and the parity check.

The oracle is independent of the C++ code: it takes the gradients the way skimage
computes them (numpy, in skimage's precision), finds skimage's own bin for every pixel
(numpy's rounded ``arctan2``, as skimage's Cython loop bins it), and decides the exact
bin with exact arithmetic (``fractions`` for the 45/90/135 degree edges, mpmath at a
precision raised until the sign of ``g_row cos(phi) - g_col sin(phi)`` is certain for
the others) wherever the rounded angle is within 1e-6 degrees of an edge. numpy's
``arctan2`` is accurate to a few ulps, far below 1e-6 degrees, so elsewhere its bin is
the exact one. A pixel whose exact bin differs from skimage's is *proved* misbinned by
skimage; parity tests exempt exactly the blocks holding such a pixel, and report them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import mpmath
import numpy as np
import pytest
from skimage import data as skdata
from skimage.feature import hog as sk_hog

# Degrees within which numpy's rounded angle may sit on the wrong side of an edge.
NEAR_EDGE_DEG = 1e-6


def skimage_hog(image_chw: np.ndarray, orientations, ppc, cpb, norm, transform_sqrt, feature_vector=False):
    """skimage.feature.hog on a channels-first array (grey when C == 1)."""
    if image_chw.shape[0] == 1:
        img, axis = image_chw[0], None
    else:
        img, axis = np.moveaxis(image_chw, 0, -1), -1
    return sk_hog(
        img,
        orientations=orientations,
        pixels_per_cell=ppc,
        cells_per_block=cpb,
        block_norm=norm,
        transform_sqrt=transform_sqrt,
        feature_vector=feature_vector,
        channel_axis=axis,
    )


def _load_skimage(name: str, crop=None) -> np.ndarray:
    try:
        img = getattr(skdata, name)()
    except Exception as exc:  # data fetched on demand by some skimage builds
        pytest.skip(f"skimage.data.{name} is not available offline here: {exc}")
    if crop is not None:
        img = img[crop]
    return img if img.ndim == 2 else img[..., :3]


SKIMAGE_IMAGES = {
    "astronaut": None,
    "camera": None,
    "coins": None,  # 303 x 384: rows not a multiple of 8
    "chelsea": None,
    "coffee": None,
    "immunohistochemistry": None,
    "retina": (slice(350, 850), slice(400, 1003)),  # a 500 x 603 crop of the fundus
}


def skimage_image(name: str) -> np.ndarray:
    """(C, H, W) uint8."""
    img = _load_skimage(name, SKIMAGE_IMAGES[name])
    return img[None] if img.ndim == 2 else np.ascontiguousarray(np.moveaxis(img, -1, 0))


def hc18_images(root: Path, count: int = 4) -> list[np.ndarray]:
    """The first `count` HC18 ultrasound images, (1, 540, 800) uint8."""
    from PIL import Image

    files = sorted((root / "hc18" / "training_set").glob("*_HC.png"))
    if len(files) < count:
        pytest.skip(f"expected HC18 images in {root / 'hc18' / 'training_set'}, found {len(files)}")
    return [np.asarray(Image.open(f).convert("L"))[None] for f in files[:count]]


# --------------------------------------------------------------------------------------
# Gradients and bins as skimage computes them
# --------------------------------------------------------------------------------------
def skimage_precision(dtype: np.dtype) -> type:
    """The float type skimage computes gradients in (uint8 -> float64, float16 -> float32)."""
    return np.float64 if np.dtype(dtype) in (np.uint8, np.float64) else np.float32


def skimage_gradients(image_chw: np.ndarray, transform_sqrt: bool) -> tuple[np.ndarray, np.ndarray]:
    """The winning channel's (g_row, g_col) per pixel, as float64 holding skimage's exact values."""
    x = image_chw.astype(skimage_precision(image_chw.dtype))
    if transform_sqrt:
        x = np.sqrt(x)
    g_row = np.zeros_like(x)
    g_col = np.zeros_like(x)
    g_row[:, 1:-1, :] = x[:, 2:, :] - x[:, :-2, :]
    g_col[:, :, 1:-1] = x[:, :, 2:] - x[:, :, :-2]
    win = np.hypot(g_row, g_col).argmax(axis=0)[None]  # in skimage's precision; first maximum wins
    pick = lambda g: np.take_along_axis(g, win, axis=0)[0].astype(np.float64)  # noqa: E731
    return pick(g_row), pick(g_col)


def skimage_bins(g_row: np.ndarray, g_col: np.ndarray, n: int) -> np.ndarray:
    """skimage's bin per pixel: its rounded angle against (180 / n) * i; -1 where that
    angle is not below (180 / n) * n (skimage then counts the pixel in no bin)."""
    theta = np.rad2deg(np.arctan2(g_row, g_col)) % 180
    per_bin = 180.0 / n
    bins = np.zeros(theta.shape, dtype=np.int64)
    for i in range(1, n):
        bins += theta >= per_bin * i
    bins[theta >= per_bin * n] = -1
    return bins


def _exact_edge_sign(r: Fraction, c: Fraction, i: int, n: int) -> int:
    """sign(theta - 180 i / n) for r > 0, decided with exact or certified arithmetic."""
    deg = Fraction(180 * i, n)
    if deg == 45:
        return (r > c) - (r < c)
    if deg == 90:
        return (c < 0) - (c > 0)
    if deg == 135:
        return (r < -c) - (r > -c)  # D = -(r + c) / sqrt(2)
    bits = 120
    scale = abs(r) + abs(c)
    while True:  # terminates: tan(phi) is irrational here, so the difference is never 0
        with mpmath.workprec(bits):
            phi = mpmath.pi * i / n
            d = mpmath.mpf(r.numerator) / r.denominator * mpmath.cos(phi) - mpmath.mpf(
                c.numerator
            ) / c.denominator * mpmath.sin(phi)
            if abs(d) > mpmath.ldexp(mpmath.mpf(scale.numerator) / scale.denominator, 16 - bits):
                return 1 if d > 0 else -1
        bits *= 2


def exact_bin(g_row: float, g_col: float, n: int) -> int:
    """The bin of the exact angle of (g_row, g_col) mod 180, with skimage's convention on
    the 45/90/135 degree edges (the only ones a gradient can lie on)."""
    if g_row == 0:
        return 0
    r, c = Fraction(g_row), Fraction(g_col)
    if r < 0:
        r, c = -r, -c
    b = 0
    for i in range(1, n):
        s = _exact_edge_sign(r, c, i, n)
        if s == 0:  # on the edge: skimage's theta is exactly 45/90/135 there
            s = 1 if (180.0 / n) * i <= float(Fraction(180 * i, n)) else -1
        b += s > 0
    return b


@dataclass
class BinProof:
    """Per-pixel bins of one image and setting: skimage's, the exact ones, and the pixels
    (row, col) proved misbinned by skimage."""

    skimage: np.ndarray
    exact: np.ndarray
    misbinned: list[tuple[int, int]]
    checked: int  # pixels decided with exact arithmetic


def bin_of_exact_direction(deg: int, n: int) -> int:
    """The bin of a gradient lying exactly at `deg` (45, 90 or 135) degrees."""
    b = 0
    for i in range(1, n):
        edge = Fraction(180 * i, n)
        b += edge < deg or (edge == deg and (180.0 / n) * i <= deg)
    return b


def prove_bins(g_row: np.ndarray, g_col: np.ndarray, n: int) -> BinProof:
    theta = np.rad2deg(np.arctan2(g_row, g_col)) % 180
    edges = (180.0 / n) * np.arange(n + 1)
    near = (np.abs(theta[..., None] - edges).min(-1) < NEAR_EDGE_DEG) & (g_row != 0)
    sk = skimage_bins(g_row, g_col, n)
    exact = np.where(g_row == 0, 0, sk)
    # Gradients exactly at 45/90/135 degrees (comparisons of the exact floats): their
    # bin is known without any arithmetic, so they skip the per-pixel loop below.
    for deg, on in ((45, g_row == g_col), (90, g_col == 0), (135, g_row == -g_col)):
        on &= g_row != 0
        exact[on] = bin_of_exact_direction(deg, n)
        near &= ~on
    misbinned = [(int(y), int(x)) for y, x in zip(*np.nonzero((exact != sk) & (g_row != 0) & ~near))]
    for y, x in zip(*np.nonzero(near)):
        b = exact_bin(float(g_row[y, x]), float(g_col[y, x]), n)
        exact[y, x] = b
        if b != sk[y, x]:
            misbinned.append((int(y), int(x)))
    return BinProof(sk, exact, misbinned, int(near.sum()))


def blocks_holding(pixels, shape_hw, ppc, cpb) -> np.ndarray:
    """(n_blocks_row, n_blocks_col) mask of the blocks whose cells hold any of `pixels`."""
    n_row, n_col = shape_hw[0] // ppc[0], shape_hw[1] // ppc[1]
    nbr, nbc = n_row - cpb[0] + 1, n_col - cpb[1] + 1
    out = np.zeros((nbr, nbc), dtype=bool)
    for y, x in pixels:
        cr, cc = y // ppc[0], x // ppc[1]
        if cr >= n_row or cc >= n_col:
            continue
        out[max(0, cr - cpb[0] + 1) : cr + 1, max(0, cc - cpb[1] + 1) : cc + 1] = True
    return out


# --------------------------------------------------------------------------------------
# A numpy HOG on given bins: the oracle for "every pixel in its exact bin"
# --------------------------------------------------------------------------------------
def cells_from_bins(g_row, g_col, bins, n, ppc) -> np.ndarray:
    """skimage's cell histograms (double hypot magnitudes, sum / area) for the given bins."""
    n_row, n_col = g_row.shape[0] // ppc[0], g_row.shape[1] // ppc[1]
    h, w = n_row * ppc[0], n_col * ppc[1]
    mag = np.hypot(g_row, g_col)[:h, :w]
    b = bins[:h, :w]
    cells = np.zeros((n_row, n_col, n))
    cell_r = (np.arange(h) // ppc[0])[:, None].repeat(w, 1)
    cell_c = (np.arange(w) // ppc[1])[None, :].repeat(h, 0)
    keep = b >= 0
    np.add.at(cells, (cell_r[keep], cell_c[keep], b[keep]), mag[keep])
    return cells / (ppc[0] * ppc[1])


def normalize_blocks(cells: np.ndarray, cpb, norm: str, eps: float = 1e-5) -> np.ndarray:
    """Stride-one blocks of `cells`, normalised like skimage (all blocks at once)."""
    windows = np.lib.stride_tricks.sliding_window_view(cells, tuple(cpb), axis=(0, 1))  # (nbr, nbc, n, br, bc)
    v = np.moveaxis(windows, 2, -1)  # (nbr, nbc, b_row, b_col, n)
    axes = (2, 3, 4)
    if norm == "L1":
        return v / (np.abs(v).sum(axes, keepdims=True) + eps)
    if norm == "L1-sqrt":
        return np.sqrt(v / (np.abs(v).sum(axes, keepdims=True) + eps))
    if norm == "L2":
        return v / np.sqrt((v**2).sum(axes, keepdims=True) + eps**2)
    o = v / np.sqrt((v**2).sum(axes, keepdims=True) + eps**2)
    o = np.minimum(o, 0.2)
    return o / np.sqrt((o**2).sum(axes, keepdims=True) + eps**2)


@dataclass
class ParityReport:
    exempt_blocks: int
    total_blocks: int
    misbinned_pixels: int
    checked_pixels: int


def assert_hog_parity(ours: np.ndarray, image_chw: np.ndarray, orientations, ppc, cpb, norm, tsqrt,
                      atol: float, proof: BinProof | None = None) -> ParityReport:
    """`ours` (nbr, nbc, b_row, b_col, n) must equal, within `atol`:
    * the HOG with every pixel in its exact bin (numpy oracle), in every block; and
    * skimage's HOG in every block except those holding a pixel proved misbinned by skimage.
    Returns how many blocks were exempted from the skimage comparison."""
    if proof is None:
        g_row, g_col = skimage_gradients(image_chw, tsqrt)
        proof = prove_bins(g_row, g_col, orientations)
    else:
        g_row, g_col = skimage_gradients(image_chw, tsqrt)
    exact = normalize_blocks(cells_from_bins(g_row, g_col, proof.exact, orientations, ppc), cpb, norm)
    ref = skimage_hog(image_chw, orientations, ppc, cpb, norm, tsqrt)
    assert ours.shape == ref.shape == exact.shape, (ours.shape, ref.shape, exact.shape)
    diff_exact = np.abs(ours.astype(np.float64) - exact)
    assert not (diff_exact > atol).any(), (
        f"{int((diff_exact > atol).any(axis=(2, 3, 4)).sum())} block(s) differ from the exact-bin HOG by up to "
        f"{diff_exact.max():g} (> {atol})"
    )
    exempt = blocks_holding(proof.misbinned, image_chw.shape[1:], ppc, cpb)
    bad = (np.abs(ours.astype(np.float64) - ref.astype(np.float64)) > atol).any(axis=(2, 3, 4))
    unexplained = bad & ~exempt
    assert not unexplained.any(), (
        f"{int(unexplained.sum())} block(s) differ from skimage by more than {atol} without a pixel "
        "proved misbinned by skimage"
    )
    return ParityReport(int(exempt.sum()), int(exempt.size), len(proof.misbinned), proof.checked)


def compile_header_probe(source: Path, out_dir: Path, *flags: str) -> Path:
    """A C++ probe of csrc/include (no torch), compiled with -O1 and no FMA contraction.

    Skips the calling test when no C++ compiler is on PATH.
    """
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if cxx is None:
        pytest.skip(f"no C++ compiler on PATH to build {source.name}")
    exe = out_dir / "probe"
    include = Path(__file__).resolve().parents[2] / "csrc" / "include"
    subprocess.run([cxx, "-std=c++17", "-O1", *flags, "-ffp-contract=off", f"-I{include}", str(source), "-o", str(exe)],
                   check=True)
    return exe

