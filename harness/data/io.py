"""Checked file readers: every failure names the file and says what was wrong.

All readers raise :class:`DatasetError` (or its subclass :class:`MissingFileError`)
instead of the library's own exception, so adapters can either stop with a clear
message or, with ``on_error="skip"``, count and report the bad sample.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np


class DatasetError(ValueError):
    """A data file (or dataset root) is missing, unreadable or holds values outside its encoding."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class MissingFileError(DatasetError, FileNotFoundError):
    """A file or folder the official layout requires is not there."""


def require_file(path, what: str = "file") -> Path:
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(path, f"{what} not found")
    return path


# --------------------------------------------------------------------------- 2D images


def read_image(path, what: str = "image", palette: str = "index") -> np.ndarray:
    """Read a PNG/BMP/JPEG/TIFF fully (so truncation is detected) as ``(H, W)`` or ``(H, W, C)``.

    Palette images (PIL mode ``P``) give their index values with ``palette="index"``
    (label maps stored with a palette) or their colours with ``palette="rgb"`` (images,
    colour-coded labels). 16-bit images keep their range.
    """
    from PIL import Image, UnidentifiedImageError

    path = require_file(path, what)
    try:
        with Image.open(path) as im:
            im.load()  # decodes every byte: a truncated file fails here, not later
            if im.mode in ("P", "PA") and palette == "rgb":
                im = im.convert("RGB")
            if im.mode in ("I;16", "I;16B", "I;16L"):
                arr = np.array(im, dtype=np.uint16)
            elif im.mode in ("RGBA", "LA") and what != "image":
                arr = np.array(im)[..., :-1]
            elif im.mode == "CMYK":
                arr = np.array(im.convert("RGB"))
            else:
                arr = np.array(im)
    except UnidentifiedImageError as exc:
        raise DatasetError(path, f"{what} is not a readable image file ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(path, f"{what} is truncated or corrupt ({exc})") from None
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if arr.ndim not in (2, 3) or arr.size == 0:
        raise DatasetError(path, f"{what} has unexpected shape {arr.shape}")
    return arr


def read_rgb(path, what: str = "image") -> np.ndarray:
    """``(H, W, 3)`` uint8: grey images are repeated, an alpha channel is dropped."""
    arr = read_image(path, what, palette="rgb")
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    elif arr.shape[2] == 4:
        arr = arr[..., :3]
    elif arr.shape[2] == 2:
        arr = np.repeat(arr[..., :1], 3, axis=2)
    return arr


def read_label(path, what: str = "label map") -> np.ndarray:
    """A single-channel label map ``(H, W)``; a 3-channel file must have identical channels."""
    arr = read_image(path, what)
    if arr.ndim == 3:
        if arr.shape[2] == 1 or all(np.array_equal(arr[..., 0], arr[..., c]) for c in range(1, arr.shape[2])):
            arr = arr[..., 0]
        else:
            raise DatasetError(path, f"{what} has {arr.shape[2]} channels that differ; expected one label per pixel")
    return arr


def image_to_tensor(arr: np.ndarray):
    """``(H, W[, C])`` uint8/uint16 -> float32 ``(C, H, W)`` scaled to [0, 1]."""
    import torch

    if arr.ndim == 2:
        arr = arr[..., None]
    scale = 65535.0 if arr.dtype == np.uint16 else 255.0 if arr.dtype == np.uint8 else 1.0
    t = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).float()
    return t / scale if scale != 1.0 else t


# --------------------------------------------------------------------------- checks


def check_values(arr: np.ndarray, allowed: Iterable[int], path, what: str = "label map") -> None:
    """Raise, listing the offending values and their pixel counts, if ``arr`` has values outside ``allowed``."""
    allowed = np.asarray(sorted(set(int(v) for v in allowed)))
    if arr.dtype in (np.uint8, np.uint16):  # a histogram is much faster than sorting
        hist = np.bincount(arr.ravel())
        values = np.nonzero(hist)[0]
        counts = hist[values]
    else:
        values, counts = np.unique(arr, return_counts=True)
    bad = ~np.isin(values, allowed)
    if bad.any():
        shown = ", ".join(f"{v} ({c} px)" for v, c in zip(values[bad][:8].tolist(), counts[bad][:8].tolist()))
        raise DatasetError(
            path, f"{what} holds values outside the encoding {allowed.tolist()}: {shown}"
        )


def check_same_size(shape_a: Sequence[int], shape_b: Sequence[int], path_a, path_b) -> None:
    if tuple(shape_a) != tuple(shape_b):
        raise DatasetError(
            path_b, f"size {tuple(shape_b)} does not match {tuple(shape_a)} of {path_a}"
        )


def lut_remap(arr: np.ndarray, lut: np.ndarray, path, what: str = "label map") -> np.ndarray:
    """Map values through a lookup table in which -1 marks values that are not in the encoding."""
    arr = np.asarray(arr)
    if arr.dtype.kind not in "ui":
        raise DatasetError(path, f"{what} has dtype {arr.dtype}; expected integers")
    if arr.size and (arr.min() < 0 or arr.max() >= len(lut)):
        check_values(arr, np.nonzero(lut >= 0)[0], path, what)
    out = lut[arr]
    if (out < 0).any():
        check_values(arr, np.nonzero(lut >= 0)[0], path, what)
    return out


# --------------------------------------------------------------------------- NIfTI


def load_nifti(path, what: str = "NIfTI volume"):
    """Open a NIfTI header (data stays on disk) and check that the file holds all its voxels."""
    import nibabel as nib

    path = require_file(path, what)
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises several types for a broken header
        raise DatasetError(path, f"{what} is not a readable NIfTI file ({type(exc).__name__}: {exc})") from None
    name = path.name.lower()
    if name.endswith(".nii") or name.endswith(".img"):
        hdr = img.header
        need = int(hdr.get_data_offset()) + int(np.prod(hdr.get_data_shape())) * np.dtype(hdr.get_data_dtype()).itemsize
        have = os.path.getsize(path)
        if have < need:
            raise DatasetError(path, f"{what} is truncated: {have} bytes, header needs {need}")
    return img


def nifti_data(img, path, slicer=None, what: str = "NIfTI volume") -> np.ndarray:
    """Read the voxels (all, or ``slicer`` of them: a lazy partial read for uncompressed files)."""
    try:
        if slicer is None:
            return np.asanyarray(img.dataobj)
        return np.asanyarray(img.dataobj[slicer])
    except Exception as exc:  # EOFError / zlib.error / ValueError for a truncated .nii.gz
        raise DatasetError(path, f"{what} is truncated or corrupt ({type(exc).__name__}: {exc})") from None


def nifti_spacing(img) -> tuple[float, ...]:
    return tuple(float(z) for z in img.header.get_zooms()[:3])


def volume_to_dhw(arr: np.ndarray) -> np.ndarray:
    """NIfTI voxel order ``(X, Y, Z)`` -> torch order ``(D, H, W)`` = ``(Z, Y, X)`` (no reorientation)."""
    return np.ascontiguousarray(np.transpose(arr, (2, 1, 0)))


def as_integer_labels(arr: np.ndarray, path, what: str = "segmentation") -> np.ndarray:
    """Float-typed label volumes are common in NIfTI; accept them only when every value is integral."""
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise DatasetError(path, f"{what} holds NaN or Inf")
        rounded = np.rint(arr)
        if not np.array_equal(rounded, arr):
            raise DatasetError(path, f"{what} holds non-integer values (e.g. {arr[rounded != arr].flat[0]!r})")
        arr = rounded
    if arr.size and (arr.min() < 0 or arr.max() > 65535):
        raise DatasetError(path, f"{what} holds values outside [0, 65535]: min {arr.min()}, max {arr.max()}")
    return arr.astype(np.int64, copy=False)
