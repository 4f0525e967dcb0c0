"""HC18 (van den Heuvel et al., PLoS ONE 2018): fetal head circumference in 2D ultrasound.

Layout (official)::

    <root>/training_set/NNN_HC.png               800x540 grey (also NNN_2HC.png, NNN_3HC.png)
    <root>/training_set/NNN_HC_Annotation.png    ellipse outline, 0/255 (grey or RGB)
    <root>/training_set_pixel_size_and_HC.csv    filename, pixel size(mm), head circumference (mm)

The annotation is a thin closed outline: the head mask is the outline with its inside
filled (``scipy.ndimage.binary_fill_holes``); an annotation that is already a filled
ellipse is used as it is; an outline that does not close (the fill adds nothing and the
region is thin) is an error. Classes: background 0, head 1. ``spacing`` is the CSV pixel
size for both axes; ``sample["hc_mm"]`` is the CSV head circumference.

Only the training set has annotations. Splits: ``all``, or a deterministic
70/10/20 ``train``/``val``/``test`` split of the file names (:func:`ratio_split`, seed 0).
"""

from __future__ import annotations

import csv
import re

import numpy as np
import torch
from scipy import ndimage

from .base import SegmentationDataset, ratio_split, register_dataset
from .io import DatasetError, MissingFileError, check_same_size, check_values, image_to_tensor, read_image, read_label

_NAME = re.compile(r"^(\d+)_(\d+)?HC\.png$")
FRACTIONS = {"train": 0.7, "val": 0.1, "test": 0.2}


def read_pixel_size_csv(path) -> dict[str, tuple[float, float | None]]:
    """filename -> (pixel size in mm, head circumference in mm or None)."""
    out = {}
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except OSError as exc:
        raise DatasetError(path, f"cannot read CSV ({exc})") from None
    if not rows:
        raise DatasetError(path, "CSV is empty")
    header = [h.strip().lower() for h in rows[0]]
    try:
        i_name = header.index("filename")
        i_px = next(i for i, h in enumerate(header) if h.startswith("pixel size"))
    except (ValueError, StopIteration):
        raise DatasetError(path, f"CSV header {rows[0]} lacks 'filename' and 'pixel size(mm)'") from None
    i_hc = next((i for i, h in enumerate(header) if h.startswith("head circumference")), None)
    for n, row in enumerate(rows[1:], start=2):
        if not row or not "".join(row).strip():
            continue
        try:
            px = float(row[i_px])
            hc = float(row[i_hc]) if i_hc is not None else None
        except (ValueError, IndexError):
            raise DatasetError(path, f"line {n}: cannot parse {row}") from None
        if not px > 0:
            raise DatasetError(path, f"line {n}: pixel size must be > 0, got {px}")
        out[row[i_name].strip()] = (px, hc)
    return out


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
        folder = self.root / "training_set"
        csv_path = self.root / "training_set_pixel_size_and_HC.csv"
        if not folder.is_dir():
            raise MissingFileError(folder, "HC18 training_set folder not found")
        if not csv_path.is_file():
            raise MissingFileError(csv_path, "HC18 pixel-size CSV not found")
        table = read_pixel_size_csv(csv_path)
        records = []
        for p in sorted(folder.iterdir()):
            if not _NAME.match(p.name):
                continue
            ann = p.with_name(p.stem + "_Annotation.png")
            rec = {"case_id": p.stem, "image": str(p), "mask": str(ann)}
            if p.name not in table:
                rec["error"] = (str(csv_path), f"no pixel size for {p.name}")
            else:
                rec["pixel_mm"], rec["hc_mm"] = table[p.name]
            if not ann.is_file():
                rec["error"] = (str(ann), "annotation not found (its image exists)")
            records.append(rec)
        return records

    def _select(self, records, split):
        if split == "all":
            return records
        assign = ratio_split([r["case_id"] for r in records], FRACTIONS, self.seed)
        return [r for r in records if assign[r["case_id"]] == split]

    def _load(self, rec):
        img = read_image(rec["image"])
        if img.ndim == 3:
            img = img[..., :3].mean(axis=2).astype(img.dtype) if img.shape[2] > 1 else img[..., 0]
        ann = read_label(rec["mask"], "annotation")
        check_same_size(img.shape, ann.shape, rec["image"], rec["mask"])
        check_values(ann, (0, 255), rec["mask"], "annotation")
        mask = fill_outline(ann > 127, rec["mask"]).astype(np.int64)
        px = float(rec["pixel_mm"])
        sample = {
            "image": image_to_tensor(img),
            "mask": torch.from_numpy(mask),
            "spacing": torch.tensor([px, px], dtype=torch.float32),
            "case_id": rec["case_id"],
        }
        if rec.get("hc_mm") is not None:
            sample["hc_mm"] = torch.tensor(float(rec["hc_mm"]), dtype=torch.float32)
        return sample
