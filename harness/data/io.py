"""Checked file readers: every failure names the file and says what was wrong.

All readers raise :class:`DatasetError` (or its subclass :class:`MissingFileError`)
instead of the library's own exception, so adapters can either stop with a clear
message or, with ``on_error="skip"``, count and report the bad sample.

Before any file is opened, :func:`require_file` says why it cannot be read as a
regular file: missing, a broken symbolic link, a symbolic-link loop, a folder, a FIFO
(which would block the reader forever), a socket or device, or no read permission.
"""

from __future__ import annotations

import csv
import errno
import io
import math
import os
import stat
from pathlib import Path
from typing import Iterable, Sequence

import nibabel as nib
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError


class DatasetError(ValueError):
    """A data file (or dataset root) is missing, unreadable or holds values outside its encoding."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class MissingFileError(DatasetError, FileNotFoundError):
    """A file or folder the official layout requires is not there."""


# --------------------------------------------------------------------------- file checks

_NOT_REGULAR = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def path_problem(path, folder: bool = False) -> tuple[str, bool] | None:
    """Why ``path`` cannot be read as a regular file (``folder=True``: as a folder), or ``None``.

    Returns ``(reason, missing)``; ``missing`` is true when nothing is there at all (so
    callers can raise :class:`MissingFileError`). ``os.stat`` follows symbolic links, so a
    link is judged by its target.
    """
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            return f"is a broken symbolic link (to {os.readlink(path)!r})", False
        return "not found", True
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "is a symbolic link loop", False
        if exc.errno == errno.EACCES:
            return "cannot be reached: permission denied on a folder above it", False
        if exc.errno == errno.ENOTDIR:
            return "not found (a part of the path is a file, not a folder)", True
        return f"cannot be read ({exc.strerror or exc})", False
    if folder:
        if not stat.S_ISDIR(st.st_mode):
            return "is a file, expected a folder", False
        if not os.access(path, os.R_OK | os.X_OK):
            return "cannot be listed: permission denied", False
        return None
    if stat.S_ISDIR(st.st_mode):
        return "is a folder, expected a file", False
    for test, kind in _NOT_REGULAR:
        if test(st.st_mode):
            return f"is {kind}, not a regular file", False
    if not os.access(path, os.R_OK):
        return "cannot be read: permission denied", False
    return None


def file_error(path, what: str = "file", partner: str | None = None) -> DatasetError | None:
    """The error for a file that cannot be read (see :func:`path_problem`), or ``None``.

    ``partner``: the file whose presence implies this one ("its image"), named in the
    message of a missing file.
    """
    found = path_problem(path)
    if found is None:
        return None
    reason, missing = found
    if missing:
        return MissingFileError(path, f"{what} {reason}" + (f" (its {partner} exists)" if partner else ""))
    return DatasetError(path, f"{what} {reason}")


def require_file(path, what: str = "file") -> Path:
    err = file_error(path, what)
    if err is not None:
        raise err
    return Path(path)


def require_folder(path, what: str = "folder") -> Path:
    found = path_problem(path, folder=True)
    if found is not None:
        reason, missing = found
        raise (MissingFileError if missing else DatasetError)(path, f"{what} {reason}")
    return Path(path)


def _open_failure(path, what: str, exc: OSError) -> DatasetError:
    """An ``OSError`` of an open/read that :func:`require_file` did not foresee (a race, a mount)."""
    if isinstance(exc, PermissionError):
        return DatasetError(path, f"{what} cannot be read: permission denied")
    if isinstance(exc, IsADirectoryError):
        return DatasetError(path, f"{what} is a folder, expected a file")
    if isinstance(exc, FileNotFoundError):
        return MissingFileError(path, f"{what} not found")
    return DatasetError(path, f"{what} cannot be read ({exc.strerror or exc})")


def list_folder(folder, what: str = "folder") -> list[Path]:
    """The entries of ``folder``, sorted by name, whatever their type (checked later, when read)."""
    require_folder(folder, what)
    try:
        return sorted(Path(folder).iterdir())
    except OSError as exc:
        raise _open_failure(folder, what, exc) from None


def walk_files(root, what: str = "folder") -> list[Path]:
    """Every non-folder entry under ``root`` (sorted; symbolic links to folders are not followed)."""
    require_folder(root, what)
    out = []

    def fail(exc):
        raise _open_failure(exc.filename or root, what, exc)

    for dirpath, dirnames, filenames in os.walk(root, onerror=fail):
        dirnames.sort()
        out += [Path(dirpath) / f for f in filenames]
    return sorted(out)


# --------------------------------------------------------------------------- text files


def read_text(path, what: str = "text file") -> str:
    """A UTF-8 text file (a byte-order mark is dropped); binary content is an error naming the byte."""
    path = require_file(path, what)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise _open_failure(path, what, exc) from None
    nul = data.find(b"\0")
    if nul >= 0:
        raise DatasetError(path, f"{what} is not a text file (a NUL byte at offset {nul})")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetError(path, f"{what} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})") from None


def read_csv(path, what: str = "CSV") -> list[tuple[int, list[str]]]:
    """``(line number, cells)`` of every non-blank row of a CSV file, cells stripped of spaces."""
    text = read_text(path, what)
    try:
        rows = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as exc:
        raise DatasetError(path, f"{what} is not valid CSV ({exc})") from None
    return [(n, [c.strip() for c in row]) for n, row in enumerate(rows, start=1) if "".join(row).strip()]


def keyed_rows(path, pairs: Iterable[tuple[int, str, object]], what: str = "CSV") -> dict:
    """``{key: value}`` from ``(line, key, value)``; a key repeated with another value is an error."""
    out, line_of = {}, {}
    for n, key, value in pairs:
        if key in out and out[key] != value:
            raise DatasetError(path, f"{what} line {n}: {key!r} is already on line {line_of[key]} with other values "
                                     f"({out[key]} vs {value})")
        out.setdefault(key, value)
        line_of.setdefault(key, n)
    return out


#: Accepted pixel/voxel sizes in mm: wide enough for microscopy and CT, narrow enough that
#: float32 spacings and the distances the surface metrics compute stay finite and non-zero.
SPACING_RANGE = (1e-6, 1e6)


def check_spacing(values: Sequence[float], path, what: str = "pixel size") -> tuple[float, ...]:
    """Each value finite and within :data:`SPACING_RANGE` mm, else an error naming the file."""
    lo, hi = SPACING_RANGE
    out = tuple(float(v) for v in values)
    for v in out:
        if not (math.isfinite(v) and lo <= v <= hi):
            raise DatasetError(path, f"{what} must be a finite size in mm within [{lo:g}, {hi:g}], got {v!r}")
    return out


# --------------------------------------------------------------------------- 2D images


def read_image(path, what: str = "image", palette: str = "index") -> np.ndarray:
    """Read a PNG/BMP/JPEG/TIFF fully (so truncation is detected) as ``(H, W)`` or ``(H, W, C)``.

    Palette images (PIL mode ``P``) give their index values with ``palette="index"``
    (label maps stored with a palette) or their colours with ``palette="rgb"`` (images,
    colour-coded labels). 16-bit images keep their range.
    """
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
    except (PermissionError, IsADirectoryError, FileNotFoundError) as exc:
        raise _open_failure(path, what, exc) from None
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
    path = require_file(path, what)
    try:
        img = nib.load(str(path))
    except (PermissionError, IsADirectoryError, FileNotFoundError) as exc:
        raise _open_failure(path, what, exc) from None
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


def nifti_spacing(img, path, axes: int = 3) -> tuple[float, ...]:
    """The header's voxel sizes of the first ``axes`` axes, checked (:func:`check_spacing`)."""
    return check_spacing(img.header.get_zooms()[:axes], path, "voxel size in the header")


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
