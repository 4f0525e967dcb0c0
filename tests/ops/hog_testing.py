"""Helpers shared by the HOG tests: skimage calls, real images, and the parity check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from skimage import data as skdata
from skimage.feature import hog as sk_hog

from mtseg_kernels.reference.hog import bin_boundary_distance


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
    "astronaut": (None,),
    "camera": (None,),
    "coins": (None,),  # 303 x 384: rows not a multiple of 8
    "retina": ((slice(350, 850), slice(400, 1003)),),  # a 500 x 603 crop of the fundus
}


def skimage_image(name: str) -> np.ndarray:
    """(C, H, W) uint8."""
    img = _load_skimage(name, *SKIMAGE_IMAGES[name])
    return img[None] if img.ndim == 2 else np.ascontiguousarray(np.moveaxis(img, -1, 0))


def hc18_images(root: Path, count: int = 4) -> list[np.ndarray]:
    """The first `count` HC18 ultrasound images, (1, 540, 800) uint8."""
    from PIL import Image

    files = sorted((root / "hc18" / "training_set").glob("*_HC.png"))
    if len(files) < count:
        pytest.skip(f"expected HC18 images in {root / 'hc18' / 'training_set'}, found {len(files)}")
    return [np.asarray(Image.open(f).convert("L"))[None] for f in files[:count]]


def boundary_blocks(image_chw: np.ndarray, orientations, ppc, cpb, transform_sqrt, tol_deg=1e-9) -> np.ndarray:
    """Blocks (n_blocks_row, n_blocks_col) holding a pixel whose orientation lies within
    `tol_deg` of a bin boundary, computed the way skimage does (winning channel, atan2):
    the only places where two exact implementations may bin a pixel differently."""
    x = torch.from_numpy(image_chw.astype(np.float64))
    if transform_sqrt:
        x = x.sqrt()
    g_row = torch.zeros_like(x)
    g_col = torch.zeros_like(x)
    g_row[:, 1:-1] = x[:, 2:] - x[:, :-2]
    g_col[:, :, 1:-1] = x[:, :, 2:] - x[:, :, :-2]
    win = torch.hypot(g_row, g_col).argmax(0, keepdim=True)
    near = bin_boundary_distance(g_row.gather(0, win)[0], g_col.gather(0, win)[0], orientations) < tol_deg
    near &= torch.hypot(g_row.gather(0, win)[0], g_col.gather(0, win)[0]) > 0
    n_row, n_col = x.shape[1] // ppc[0], x.shape[2] // ppc[1]
    cells = near[: n_row * ppc[0], : n_col * ppc[1]].reshape(n_row, ppc[0], n_col, ppc[1]).any(3).any(1)
    nbr, nbc = n_row - cpb[0] + 1, n_col - cpb[1] + 1
    out = np.zeros((nbr, nbc), dtype=bool)
    for i in range(cpb[0]):
        for j in range(cpb[1]):
            out |= cells[i : i + nbr, j : j + nbc].numpy()
    return out


def assert_hog_parity(ours: np.ndarray, ref: np.ndarray, atol: float, image_chw, orientations, ppc, cpb, tsqrt):
    """ours/ref: (nbr, nbc, b_row, b_col, n). Equal within `atol`, except in blocks where
    a pixel sits exactly on a bin boundary (a tie both implementations may break)."""
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    bad = np.abs(ours.astype(np.float64) - ref.astype(np.float64)) > atol
    if not bad.any():
        return
    bad_blocks = bad.any(axis=(2, 3, 4))
    allowed = boundary_blocks(image_chw, orientations, ppc, cpb, tsqrt)
    unexplained = bad_blocks & ~allowed
    worst = np.abs(ours.astype(np.float64) - ref)[bad].max()
    assert not unexplained.any(), (
        f"{unexplained.sum()} block(s) differ from skimage by up to {worst:g} (> {atol}) "
        "without a pixel on a bin boundary"
    )
