"""Histogram of Oriented Gradients as a batched, differentiable PyTorch operator.

``hog`` computes :func:`skimage.feature.hog` (scikit-image 0.26 semantics, see
``csrc/include/mtseg/hog.h``) for a whole batch at once, on CPU or CUDA, with a gradient
with respect to the image. Images are channels-first, ``(B, C, H, W)``.

What "exact" means: every pixel goes to the bin of the exact angle of its (float)
gradient against the exact edges ``180 i / n`` degrees -- a certified rounded test for
almost all pixels, exact integer arithmetic for the few within rounding of an edge --
so the bins are the same on every machine, thread count and device. skimage bins a
rounded ``arctan2`` instead and misplaces some near-edge pixels; everywhere else the
result is skimage's to 1e-6 (float64) / 1e-5 (float32, uint8).

Operators (``torch.ops.mtseg``):

* ``hog(images, orientations, pixels_per_cell, cells_per_block, block_norm, transform_sqrt)``
  -> ``(B, n_blocks_row, n_blocks_col, b_row, b_col, orientations)``
* ``hog_cells(images, orientations, pixels_per_cell, transform_sqrt)``
  -> ``(B, n_cells_row, n_cells_col, orientations)``, the cell histograms
* ``hog_blocks(cells, cells_per_block, block_norm)`` -> the normalised blocks
* ``hog_cells_backward`` / ``hog_blocks_backward``: their vector-Jacobian products

``hog == hog_blocks(hog_cells(...))``; all three are differentiable (the orientation bin
and the winning channel are locally constant, so the gradient flows through the
gradient magnitudes and the block normalisation).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = [
    "BLOCK_NORMS",
    "HOG",
    "HOG_MTL_PRESETS",
    "HOGPreset",
    "hog",
    "hog_cells",
    "hog_blocks",
    "hog_output_shape",
    "hog_pseudo_label",
]

BLOCK_NORMS = ("L1", "L1-sqrt", "L2", "L2-Hys")
_MAX_ORIENTATIONS = 1 << 16  # as csrc/hog_host.cpp: beyond it orientations only sizes absurd allocations
_IMAGE_DTYPES = (torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.float64)


class HOGPreset(NamedTuple):
    """HOG parameters of one HOG-MTL configuration (Bhattarai et al.), on 128x64 images."""

    orientations: int
    pixels_per_cell: tuple[int, int]
    cells_per_block: tuple[int, int]
    block_norm: str = "L2-Hys"


#: HOG-MTL configurations by descriptor length, all computed on images resized to
#: 128 x 64 (H x W). 504 (the default), 864 and 2520 (6 orientations with 16, 12 and 8
#: pixel cells) are the sizes this project uses for HOG-MTL (not checked against the
#: paper's text, see docs/fidelity/hogmtl.md); 3780, 1680 and 756 are extra sizes of ours.
HOG_MTL_PRESETS: dict[int, HOGPreset] = {
    504: HOGPreset(6, (16, 16), (2, 2)),
    864: HOGPreset(6, (12, 12), (2, 2)),
    2520: HOGPreset(6, (8, 8), (2, 2)),
    3780: HOGPreset(9, (8, 8), (2, 2)),
    1680: HOGPreset(4, (8, 8), (2, 2)),
    756: HOGPreset(9, (16, 16), (2, 2)),
}
HOG_MTL_SIZE = (128, 64)


# --------------------------------------------------------------------------------------
# Argument normalisation. The values are checked once, by the C++ operators (which
# raise ValueError / TypeError with what was expected and what was given), so direct
# torch.ops.mtseg callers get the same checks.
# --------------------------------------------------------------------------------------
def _pair(name: str, value: int | Sequence[int]) -> list[int]:
    """An int or a pair of ints -> [rows, cols]."""
    if isinstance(value, int) and not isinstance(value, bool):
        return [value, value]
    if (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        return [int(value[0]), int(value[1])]
    raise TypeError(f"hog: {name} must be an int or a pair of ints (rows, cols), got {value!r}")


def _int(name: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"hog: {name} must be an int, got {value!r}")
    return value


def _as_batch(images: Tensor) -> tuple[Tensor, int]:
    """(H, W), (C, H, W) or (B, C, H, W) -> (B, C, H, W), and the input rank."""
    if not isinstance(images, Tensor):
        raise TypeError(f"hog: images must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() == 2:
        return images[None, None], 2
    if images.dim() == 3:
        return images[None], 3
    if images.dim() == 4:
        return images, 4
    raise ValueError(
        f"hog: images must be (H, W), (C, H, W) or (B, C, H, W), got shape {tuple(images.shape)}"
    )


def hog_output_shape(
    image_size: tuple[int, int],
    orientations: int = 9,
    pixels_per_cell: int | Sequence[int] = (8, 8),
    cells_per_block: int | Sequence[int] = (3, 3),
) -> tuple[int, int, int, int, int]:
    """``(n_blocks_row, n_blocks_col, b_row, b_col, orientations)`` for an ``(H, W)`` image."""
    ppc, cpb = _pair("pixels_per_cell", pixels_per_cell), _pair("cells_per_block", cells_per_block)
    if min(*ppc, *cpb) <= 0:
        raise ValueError(f"hog_output_shape: sizes must be positive, got pixels_per_cell={ppc}, cells_per_block={cpb}")
    n_blocks_row = image_size[0] // ppc[0] - cpb[0] + 1
    n_blocks_col = image_size[1] // ppc[1] - cpb[1] + 1
    return (n_blocks_row, n_blocks_col, cpb[0], cpb[1], orientations)


# --------------------------------------------------------------------------------------
# Fake (meta) kernels: shapes and dtypes only, so torch.compile can trace the ops
# --------------------------------------------------------------------------------------
def _cell_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake_check(ok: bool, message: str, error: type[Exception] = ValueError) -> None:
    # The fake kernels check what the C++ operators check, so that a traced graph
    # (torch.compile) fails where the call is, not later inside the compiled code.
    if not ok:
        raise error(message)


def _fake_cells_shape(op, images, orientations, pixels_per_cell, min_cells):
    _fake_check(images.dim() == 4, f"{op}: expected images of shape (B, C, H, W), got shape {tuple(images.shape)}")
    _fake_check(images.dtype in _IMAGE_DTYPES,
                f"{op}: expected uint8, float16, bfloat16, float32 or float64 images, got {images.dtype}", TypeError)
    _fake_check(images.shape[1] > 0, f"{op}: images need at least one channel, got shape {tuple(images.shape)}")
    _fake_check(0 < orientations <= _MAX_ORIENTATIONS,
                f"{op}: orientations must be in [1, {_MAX_ORIENTATIONS}], got {orientations}")
    for name, v in (("pixels_per_cell", pixels_per_cell), ("cells_per_block", min_cells)):
        _fake_check(len(v) == 2 and v[0] > 0 and v[1] > 0, f"{op}: {name} must be positive, got {tuple(v)}")
    batch, _, height, width = images.shape
    rows, cols = height // pixels_per_cell[0], width // pixels_per_cell[1]
    _fake_check(rows >= min_cells[0] and cols >= min_cells[1],
                f"{op}: the image is too small for pixels_per_cell={tuple(pixels_per_cell)} and "
                f"cells_per_block={tuple(min_cells)}: got {height} x {width}")
    return (batch, rows, cols, orientations)


def _fake_blocks_shape(op, cells, cells_per_block, block_norm):
    _fake_check(cells.dim() == 4,
                f"{op}: expected cells of shape (B, n_cells_row, n_cells_col, orientations), got shape "
                f"{tuple(cells.shape)}")
    _fake_check(cells.dtype in (torch.float32, torch.float64),
                f"{op}: expected float32 or float64 cells, got {cells.dtype}", TypeError)
    _fake_check(len(cells_per_block) == 2 and min(cells_per_block) > 0,
                f"{op}: cells_per_block must be positive, got {tuple(cells_per_block)}")
    _fake_check(block_norm in BLOCK_NORMS, f"hog: block_norm must be one of {', '.join(map(repr, BLOCK_NORMS))}, "
                f"got {block_norm!r}")
    batch, rows, cols, n = cells.shape
    _fake_check(n > 0, f"{op}: cells need at least one orientation, got shape {tuple(cells.shape)}")
    b_row, b_col = cells_per_block
    _fake_check(rows >= b_row and cols >= b_col, f"{op}: a block of {b_row} x {b_col} cells does not fit in "
                f"{rows} x {cols} cells")
    return (batch, rows - b_row + 1, cols - b_col + 1, b_row, b_col, n)


@torch.library.register_fake("mtseg::hog_cells")
def _hog_cells_fake(images, orientations, pixels_per_cell, transform_sqrt):
    shape = _fake_cells_shape("hog_cells", images, orientations, pixels_per_cell, (1, 1))
    return images.new_empty(shape, dtype=_cell_dtype(images.dtype))


@torch.library.register_fake("mtseg::hog_blocks")
def _hog_blocks_fake(cells, cells_per_block, block_norm):
    return cells.new_empty(_fake_blocks_shape("hog_blocks", cells, cells_per_block, block_norm))


@torch.library.register_fake("mtseg::hog")
def _hog_fake(images, orientations, pixels_per_cell, cells_per_block, block_norm, transform_sqrt):
    _fake_cells_shape("hog", images, orientations, pixels_per_cell, cells_per_block)
    return _hog_blocks_fake(
        _hog_cells_fake(images, orientations, pixels_per_cell, transform_sqrt), cells_per_block, block_norm
    )


@torch.library.register_fake("mtseg::hog_cells_backward")
def _hog_cells_backward_fake(grad_cells, images, orientations, pixels_per_cell, transform_sqrt):
    shape = _fake_cells_shape("hog_cells_backward", images, orientations, pixels_per_cell, (1, 1))
    _fake_check(tuple(grad_cells.shape) == shape,
                f"hog_cells_backward: grad has shape {tuple(grad_cells.shape)}, expected {shape}")
    return images.new_empty(images.shape, dtype=_cell_dtype(images.dtype))


@torch.library.register_fake("mtseg::hog_blocks_backward")
def _hog_blocks_backward_fake(grad_blocks, cells, cells_per_block, block_norm):
    shape = _fake_blocks_shape("hog_blocks_backward", cells, cells_per_block, block_norm)
    _fake_check(tuple(grad_blocks.shape) == shape,
                f"hog_blocks_backward: grad has shape {tuple(grad_blocks.shape)}, which does not match the blocks")
    return torch.empty_like(cells, memory_format=torch.contiguous_format)


# --------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------
def _image_grad(grad: Tensor, images: Tensor) -> Tensor:
    return grad.to(images.dtype)


def _hog_cells_setup(ctx, inputs, output):
    images, orientations, pixels_per_cell, transform_sqrt = inputs
    ctx.save_for_backward(images)
    ctx.params = (orientations, pixels_per_cell, transform_sqrt)


def _hog_cells_backward(ctx, grad):
    (images,) = ctx.saved_tensors
    orientations, ppc, tsqrt = ctx.params
    grad_images = torch.ops.mtseg.hog_cells_backward(grad, images, orientations, ppc, tsqrt)
    return _image_grad(grad_images, images), None, None, None


def _hog_blocks_setup(ctx, inputs, output):
    cells, cells_per_block, block_norm = inputs
    ctx.save_for_backward(cells)
    ctx.params = (cells_per_block, block_norm)


def _hog_blocks_backward(ctx, grad):
    (cells,) = ctx.saved_tensors
    return torch.ops.mtseg.hog_blocks_backward(grad, cells, *ctx.params), None, None


def _hog_setup(ctx, inputs, output):
    images, orientations, pixels_per_cell, cells_per_block, block_norm, transform_sqrt = inputs
    ctx.save_for_backward(images)
    ctx.params = (orientations, pixels_per_cell, cells_per_block, block_norm, transform_sqrt)


def _hog_backward(ctx, grad):
    # The cells are recomputed rather than saved: one pass over the image, and no
    # activation memory kept between forward and backward.
    (images,) = ctx.saved_tensors
    orientations, ppc, cpb, norm, tsqrt = ctx.params
    cells = torch.ops.mtseg.hog_cells(images, orientations, ppc, tsqrt)
    grad_cells = torch.ops.mtseg.hog_blocks_backward(grad, cells, cpb, norm)
    grad_images = torch.ops.mtseg.hog_cells_backward(grad_cells, images, orientations, ppc, tsqrt)
    return _image_grad(grad_images, images), None, None, None, None, None


torch.library.register_autograd("mtseg::hog_cells", _hog_cells_backward, setup_context=_hog_cells_setup)
torch.library.register_autograd("mtseg::hog_blocks", _hog_blocks_backward, setup_context=_hog_blocks_setup)
torch.library.register_autograd("mtseg::hog", _hog_backward, setup_context=_hog_setup)


# --------------------------------------------------------------------------------------
# Functional API
# --------------------------------------------------------------------------------------
def hog(
    images: Tensor,
    orientations: int = 9,
    pixels_per_cell: int | Sequence[int] = (8, 8),
    cells_per_block: int | Sequence[int] = (3, 3),
    block_norm: str = "L2-Hys",
    transform_sqrt: bool = False,
    feature_vector: bool = True,
) -> Tensor:
    """Histogram of Oriented Gradients of a batch of images, as ``skimage.feature.hog``.

    Args:
        images: ``(B, C, H, W)``, ``(C, H, W)`` or ``(H, W)``; uint8, float16, bfloat16,
            float32 or float64; any strides (channels-last included). With several
            channels, each pixel uses the channel of largest gradient magnitude.
        orientations: number of orientation bins over [0, 180) degrees.
        pixels_per_cell: cell size ``(rows, cols)`` (an int means square).
        cells_per_block: block size in cells ``(rows, cols)``; blocks step by one cell.
        block_norm: ``"L1"``, ``"L1-sqrt"``, ``"L2"`` or ``"L2-Hys"``.
        transform_sqrt: take the square root of the image first (needs images >= 0).
        feature_vector: flatten each image's descriptor.

    Returns:
        float32 (float64 for float64 images). ``(B, D)`` if ``feature_vector`` else
        ``(B, n_blocks_row, n_blocks_col, b_row, b_col, orientations)``, with
        ``n_blocks = H // cell - block + 1`` per axis; unbatched input drops ``B``.

    Raises:
        ValueError: image smaller than one block, unknown ``block_norm``, non-positive
            sizes, NaN/Inf pixels, negative pixels with ``transform_sqrt`` (CPU). On CUDA
            no check synchronises the device: such an image gets an all-NaN descriptor
            (and gradient) instead; CUDA takes at most 64 orientations.
        TypeError: a non-tensor, or an unsupported dtype.

    Example:
        >>> images = torch.rand(16, 3, 128, 64)
        >>> hog(images, 6, (16, 16), (2, 2)).shape
        torch.Size([16, 504])
    """
    ppc, cpb = _pair("pixels_per_cell", pixels_per_cell), _pair("cells_per_block", cells_per_block)
    batch, rank = _as_batch(images)
    out = torch.ops.mtseg.hog(batch, _int("orientations", orientations), ppc, cpb, block_norm, bool(transform_sqrt))
    if feature_vector:
        out = out.flatten(1)
    return out if rank == 4 else out[0]


def hog_cells(
    images: Tensor,
    orientations: int = 9,
    pixels_per_cell: int | Sequence[int] = (8, 8),
    transform_sqrt: bool = False,
) -> Tensor:
    """Un-normalised cell histograms ``(B, n_cells_row, n_cells_col, orientations)``.

    Each value is the sum of the gradient magnitudes of the cell's pixels in that
    orientation bin, divided by the cell area (skimage's ``orientation_histogram``).
    Accepts the same images as :func:`hog`.
    """
    ppc = _pair("pixels_per_cell", pixels_per_cell)
    batch, rank = _as_batch(images)
    out = torch.ops.mtseg.hog_cells(batch, _int("orientations", orientations), ppc, bool(transform_sqrt))
    return out if rank == 4 else out[0]


def hog_blocks(cells: Tensor, cells_per_block: int | Sequence[int] = (3, 3), block_norm: str = "L2-Hys") -> Tensor:
    """Block-normalised descriptor ``(B, n_blocks_row, n_blocks_col, b_row, b_col, n)`` from cells."""
    if not isinstance(cells, Tensor):
        raise TypeError(f"hog_blocks: cells must be a torch.Tensor, got {type(cells).__name__}")
    return torch.ops.mtseg.hog_blocks(cells, _pair("cells_per_block", cells_per_block), block_norm)


def hog_pseudo_label(images: Tensor, dim: int = 504, size: tuple[int, int] = HOG_MTL_SIZE) -> Tensor:
    """HOG-MTL regression target: resize to 128 x 64 and take the HOG of the preset.

    Args:
        images: ``(B, C, H, W)`` (or ``(C, H, W)``), on any device; uint8 images are
            scaled to [0, 1]. Call it inside the training step, after augmentation.
        dim: descriptor length, one of :data:`HOG_MTL_PRESETS` (504, 864, 2520; extras 3780, 1680, 756).
        size: resize target ``(H, W)``; 128 x 64 by default (HOG-MTL's input size).

    Returns:
        ``(B, dim)`` float32 targets (float64 for float64 images), without gradient.
    """
    if dim not in HOG_MTL_PRESETS:
        raise ValueError(f"hog_pseudo_label: dim must be one of {sorted(HOG_MTL_PRESETS)}, got {dim}")
    preset = HOG_MTL_PRESETS[dim]
    batch, rank = _as_batch(images)
    if batch.dtype == torch.uint8:
        batch = batch.float() / 255.0
    elif batch.dtype in (torch.float16, torch.bfloat16):
        batch = batch.float()
    elif batch.dtype not in (torch.float32, torch.float64):  # resizing needs floats
        raise TypeError(f"hog_pseudo_label: images must be uint8 or floating point, got {batch.dtype}")
    with torch.no_grad():
        resized = F.interpolate(batch, size=size, mode="bilinear", align_corners=False, antialias=True)
        # Bilinear resampling with antialiasing can overshoot slightly below 0 near edges;
        # HOG does not need non-negative input (no transform_sqrt here).
        out = hog(resized, preset.orientations, preset.pixels_per_cell, preset.cells_per_block, preset.block_norm)
    return out if rank == 4 else out[0]


class HOG(nn.Module):
    """Module form of :func:`hog`; parameters fixed at construction.

    Shape:
        - Input: ``(B, C, H, W)``, ``(C, H, W)`` or ``(H, W)``
        - Output: ``(B, D)`` (``feature_vector=True``) or ``(B, n_blocks_row, n_blocks_col, b_row, b_col, n)``

    Example:
        >>> HOG(orientations=6, pixels_per_cell=16, cells_per_block=2)(torch.rand(4, 3, 128, 64)).shape
        torch.Size([4, 504])
    """

    def __init__(
        self,
        orientations: int = 9,
        pixels_per_cell: int | Sequence[int] = (8, 8),
        cells_per_block: int | Sequence[int] = (3, 3),
        block_norm: str = "L2-Hys",
        transform_sqrt: bool = False,
        feature_vector: bool = True,
    ) -> None:
        super().__init__()
        self.orientations = _int("orientations", orientations)
        self.pixels_per_cell = tuple(_pair("pixels_per_cell", pixels_per_cell))
        self.cells_per_block = tuple(_pair("cells_per_block", cells_per_block))
        self.block_norm = block_norm
        self.transform_sqrt = transform_sqrt
        self.feature_vector = feature_vector

    def forward(self, images: Tensor) -> Tensor:
        return hog(
            images,
            self.orientations,
            self.pixels_per_cell,
            self.cells_per_block,
            self.block_norm,
            self.transform_sqrt,
            self.feature_vector,
        )

    def extra_repr(self) -> str:
        return (
            f"orientations={self.orientations}, pixels_per_cell={self.pixels_per_cell}, "
            f"cells_per_block={self.cells_per_block}, block_norm={self.block_norm!r}, "
            f"transform_sqrt={self.transform_sqrt}, feature_vector={self.feature_vector}"
        )
