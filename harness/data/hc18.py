"""HC18 (van den Heuvel et al., PLoS ONE 2018): fetal head circumference in 2D ultrasound.

Layout (official)::

    <root>/training_set/NNN_HC.png               800x540 grey (also NNN_2HC.png, NNN_3HC.png)
    <root>/training_set/NNN_HC_Annotation.png    ellipse outline, 0/255 (grey or RGB)
    <root>/training_set_pixel_size_and_HC.csv    filename, pixel size(mm), head circumference (mm)

The annotation is a thin closed outline: the head mask is the outline with its inside
filled (``scipy.ndimage.binary_fill_holes``); an annotation that is already a filled
ellipse is used as it is; an outline that does not close (the fill adds nothing and the
region is thin) is an error. Classes: background 0, head 1. ``spacing`` is the CSV pixel
size for both axes; ``sample["hc_mm"]`` is the CSV head circumference. A pixel size that
is not a finite size in mm (:data:`~.io.SPACING_RANGE`), or a file listed twice with
different values, is an error naming the CSV line.

Only the training set has annotations. Splits: ``all``, or a deterministic
70/10/20 ``train``/``val``/``test`` split of the file names (:func:`ratio_split`, seed 0).
"""

from __future__ import annotations

import re

import numpy as np
from scipy import ndimage

from .base import SegmentationDataset, file_record, ratio_split, register_dataset
from .io import (DatasetError, check_same_size, check_spacing, check_values, keyed_rows, list_folder, read_csv,
                 read_image, read_label, require_file, require_folder)

_NAME = re.compile(r"^(\d+)_(\d+)?HC\.png$")
FRACTIONS = {"train": 0.7, "val": 0.1, "test": 0.2}


def read_pixel_size_csv(path) -> dict[str, tuple[float, float | None]]:
    """filename -> (pixel size in mm, head circumference in mm or None)."""
    rows = read_csv(path, "pixel-size CSV")
    if not rows:
        raise DatasetError(path, "CSV is empty")
    header = [h.lower() for h in rows[0][1]]
    try:
        i_name = header.index("filename")
        i_px = next(i for i, h in enumerate(header) if h.startswith("pixel size"))
    except (ValueError, StopIteration):
        raise DatasetError(path, f"CSV header {rows[0][1]} lacks 'filename' and 'pixel size(mm)'") from None
    i_hc = next((i for i, h in enumerate(header) if h.startswith("head circumference")), None)
    entries = []
    for n, row in rows[1:]:
        try:
            px = float(row[i_px])
            hc = float(row[i_hc]) if i_hc is not None else None
            name = row[i_name]
        except (ValueError, IndexError):
            raise DatasetError(path, f"line {n}: cannot parse {row}") from None
        check_spacing([px], path, f"line {n}: pixel size")
        entries.append((n, name, (px, hc)))
    return keyed_rows(path, entries, "CSV")


def fill_outline(outline: np.ndarray, path="<array>") -> np.ndarray:
    """Binary ellipse annotation -> filled head mask (outline included).

    The official annotations are thin closed outlines, filled here with
    ``scipy.ndimage.binary_fill_holes``. Copies whose ellipses are already filled are
    accepted unchanged (a solid region: two 3x3 erosions keep over half of it). An
    outline that does not close (filling adds nothing and the region is thin) is an error.
    """
    outline = np.asarray(outline, bool)
    nz = np.nonzero(outline)
    if nz[0].size == 0:
        raise DatasetError(path, "annotation has no foreground pixels")
    box = tuple(slice(max(int(a.min()) - 1, 0), int(a.max()) + 2) for a in nz)
    sub = outline[box]
    filled_sub = ndimage.binary_fill_holes(sub)
    n_sub = int(sub.sum())
    if int(filled_sub.sum()) <= n_sub:
        solid = int(ndimage.binary_erosion(sub, np.ones((3, 3), bool), iterations=2).sum())
        if solid <= 0.5 * n_sub:
            raise DatasetError(path, "ellipse outline is not closed: filling it adds no pixels")
        # else: the annotation is already a filled ellipse
    filled = np.zeros_like(outline)
    filled[box] = filled_sub
    return filled


@register_dataset("hc18")
class HC18(SegmentationDataset):
    name = "hc18"
    splits = ("train", "val", "test", "all")
    num_classes = 2
    class_names = ("background", "head")

    def __init__(self, root, split="train", *, seed: int = 0, **kw):
        self.seed = int(seed)
        super().__init__(root, split, **kw)

    def layout_hint(self):
        return "<root>/training_set/NNN_HC.png + NNN_HC_Annotation.png, <root>/training_set_pixel_size_and_HC.csv"

    def _index(self):
        folder = require_folder(self.root / "training_set", "HC18 training_set folder")
        csv_path = require_file(self.root / "training_set_pixel_size_and_HC.csv", "HC18 pixel-size CSV")
        table = read_pixel_size_csv(csv_path)
        records = []
        for p in list_folder(folder, "HC18 training_set folder"):
            if not _NAME.match(p.name):
                continue
            rec = file_record(p.stem, {"image": (p, "image"), "mask": (p.with_name(p.stem + "_Annotation.png"), "annotation")})
            if p.name in table:
                rec["pixel_mm"], rec["hc_mm"] = table[p.name]
            else:
                rec.setdefault("error", (str(csv_path), f"no pixel size for {p.name}"))
            records.append(rec)
        return records

    def assign_splits(self, records):
        return ratio_split([r["case_id"] for r in records], FRACTIONS, self.seed)

    def _load(self, rec):
        img = read_image(rec["image"])
        if img.ndim == 3:
            img = img[..., :3].mean(axis=2).astype(img.dtype) if img.shape[2] > 1 else img[..., 0]
        ann = read_label(rec["mask"], "annotation")
        check_same_size(img.shape, ann.shape, rec["image"], rec["mask"])
        check_values(ann, (0, 255), rec["mask"], "annotation")
        mask = fill_outline(ann > 127, rec["mask"])
        extra = {"hc_mm": float(rec["hc_mm"])} if rec.get("hc_mm") is not None else {}
        return self.sample(rec, img, mask, spacing=[rec["pixel_mm"]] * 2, **extra)
