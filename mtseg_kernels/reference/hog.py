"""Reference HOG in plain PyTorch, written to mirror ``skimage.feature.hog`` line by line.

Slow (it materialises one-hot bins), float64 throughout, and differentiable through
autograd, so tests use it as a second oracle: for values (beside skimage itself) and
for gradients (autograd through this vs. the fused backward of ``torch.ops.mtseg.hog``).
Unlike the kernels it uses ``atan2``, like skimage.
"""

from __future__ import annotations


import torch
from torch import Tensor

EPS = 1e-5


def _central_differences(x: Tensor) -> tuple[Tensor, Tensor]:
    """skimage's _hog_channel_gradient on (..., H, W): no 1/2, zero first/last row/column."""
    g_row = torch.zeros_like(x)
    g_col = torch.zeros_like(x)
    g_row[..., 1:-1, :] = x[..., 2:, :] - x[..., :-2, :]
    g_col[..., :, 1:-1] = x[..., :, 2:] - x[..., :, :-2]
    return g_row, g_col


def _magnitude(g_row: Tensor, g_col: Tensor) -> Tensor:
    """``sqrt(g_row**2 + g_col**2)`` without overflow or underflow, zero gradient where it is 0.

    Both components are divided by the larger magnitude first (a constant for autograd),
    so nothing squared exceeds 2: squaring in float64 directly gives inf for |g| > 1e154
    and flushes |g| < 1e-162 to 0. An infinite component gives inf; NaN gives 0 (as before).
    """
    scale = torch.maximum(g_row.abs(), g_col.abs()).detach()
    nonzero, finite = scale > 0, torch.isfinite(scale)
    ok = nonzero & finite
    # where the scaled branch is not taken it reads 0 / 1: its gradient there (0 * inf at
    # sqrt(0)) stops at the torch.where on g_row / g_col, which passes zero
    zero, one = torch.zeros_like(scale), torch.ones_like(scale)
    s = torch.where(ok, scale, one)
    r, c = torch.where(ok, g_row, zero) / s, torch.where(ok, g_col, zero) / s
    mag = torch.where(finite, s * (r * r + c * c).sqrt(), scale)
    return torch.where(nonzero, mag, zero)


def orientation_bins(g_row: Tensor, g_col: Tensor, orientations: int) -> Tensor:
    """Bin index of each pixel, by skimage's rule: degrees(atan2) mod 180 against (180/n)*i.

    Same shape as ``g_row``, values in 0..n: ``n`` marks a pixel in no bin. skimage's
    rounded ``theta mod 180`` is exactly 180 for a tiny negative angle (e.g. gradient
    (-1e-20, 1)), and its histogram takes bin i only for (180/n)*i <= theta < (180/n)*(i+1),
    so such a pixel votes nowhere.
    """
    theta = torch.rad2deg(torch.atan2(g_row, g_col)).remainder(180.0)
    per_bin = 180.0 / orientations
    bounds = torch.tensor([per_bin * i for i in range(1, orientations)], dtype=theta.dtype, device=theta.device)
    bins = (theta.unsqueeze(-1) >= bounds).sum(-1)
    return torch.where(theta < 180.0, bins, torch.full_like(bins, orientations))


def hog_cells_reference(
    images: Tensor, orientations: int, pixels_per_cell: tuple[int, int], transform_sqrt: bool = False
) -> Tensor:
    """(B, C, H, W) -> (B, n_cells_row, n_cells_col, orientations), float64."""
    x = images.to(torch.float64)
    if transform_sqrt:
        x = x.sqrt()
    g_row, g_col = _central_differences(x)
    mag_c = torch.hypot(g_row.detach(), g_col.detach())
    winner = mag_c.argmax(dim=1, keepdim=True)  # first maximum: the lowest channel wins ties
    g_row = g_row.gather(1, winner)[:, 0]
    g_col = g_col.gather(1, winner)[:, 0]
    mag = _magnitude(g_row, g_col)
    bins = orientation_bins(g_row.detach(), g_col.detach(), orientations)

    c_row, c_col = pixels_per_cell
    batch, height, width = mag.shape
    n_row, n_col = height // c_row, width // c_col
    mag = mag[:, : n_row * c_row, : n_col * c_col]
    bins = bins[:, : n_row * c_row, : n_col * c_col]
    # (B, H', W', n); the extra class n (pixels in no bin) is dropped
    one_hot = torch.nn.functional.one_hot(bins, orientations + 1)[..., :orientations].to(mag.dtype)
    votes = one_hot * mag.unsqueeze(-1)
    cells = votes.reshape(batch, n_row, c_row, n_col, c_col, orientations).sum(dim=(2, 4))
    return cells / (c_row * c_col)


def _normalize(block: Tensor, method: str) -> Tensor:
    """skimage's _hog_normalize_block over the last three dims of (..., b_row, b_col, n)."""
    dims = (-3, -2, -1)
    if method == "L1":
        return block / (block.abs().sum(dims, keepdim=True) + EPS)
    if method == "L1-sqrt":
        return torch.sqrt(block / (block.abs().sum(dims, keepdim=True) + EPS))
    if method == "L2":
        return block / torch.sqrt((block**2).sum(dims, keepdim=True) + EPS**2)
    if method == "L2-Hys":
        out = block / torch.sqrt((block**2).sum(dims, keepdim=True) + EPS**2)
        out = torch.minimum(out, torch.full_like(out, 0.2))
        return out / torch.sqrt((out**2).sum(dims, keepdim=True) + EPS**2)
    raise ValueError(f"unknown block norm {method!r}")


def hog_blocks_reference(cells: Tensor, cells_per_block: tuple[int, int], block_norm: str) -> Tensor:
    """(B, rows, cols, n) -> (B, n_blocks_row, n_blocks_col, b_row, b_col, n)."""
    b_row, b_col = cells_per_block
    blocks = cells.unfold(1, b_row, 1).unfold(2, b_col, 1)  # (B, nbr, nbc, n, b_row, b_col)
    blocks = blocks.permute(0, 1, 2, 4, 5, 3)
    return _normalize(blocks, block_norm)


def hog_reference(
    images: Tensor,
    orientations: int = 9,
    pixels_per_cell: tuple[int, int] = (8, 8),
    cells_per_block: tuple[int, int] = (3, 3),
    block_norm: str = "L2-Hys",
    transform_sqrt: bool = False,
) -> Tensor:
    """(B, C, H, W) -> (B, n_blocks_row, n_blocks_col, b_row, b_col, orientations), float64."""
    cells = hog_cells_reference(images, orientations, pixels_per_cell, transform_sqrt)
    return hog_blocks_reference(cells, cells_per_block, block_norm)


__all__ = [
    "hog_blocks_reference",
    "hog_cells_reference",
    "hog_reference",
    "orientation_bins",
]
