"""Generic adapters for data sets not listed: 2D image/mask folders and NIfTI image/label pairs.

``ImageMaskFolder`` (name ``"folder"``)::

    <root>/<images>/<stem>.<png|jpg|bmp|tif>       (default folder ``images``)
    <root>/<masks>/<stem><mask_suffix>.png          (default folder ``masks``, suffix "")

``NiftiPairs`` (name ``"nifti"``; nnU-Net / Medical Segmentation Decathlon style)::

    <root>/<images>/<case>[_0000].nii[.gz]          (default ``imagesTr``; ``_000K`` = channel K)
    <root>/<labels>/<case>.nii[.gz]                 (default ``labelsTr``)

Label encoding: ``label_values=[v0, v1, ...]`` maps raw value ``v_k`` to class ``k``
(e.g. ``[0, 255]`` for binary masks saved as 0/255), else ``num_classes=K`` accepts raw
values 0..K-1. Anything else in a mask is an error. ``ignore_value`` (optional) maps a raw
value to ``ignore_index`` (255). Splits: the sub-folders are not split by the data set, so
``split="all"`` takes every pair, and ``train``/``val``/``test`` a deterministic 70/10/20
split of the stems (:func:`ratio_split`, ``seed``), or ``split_file=``: a JSON file
``{"train": [stems], "val": [...], "test": [...]}`` (a stem listed in two splits is an
error; stems in no list belong to no split). ``background_classes`` (default ``[0]``, ``[]``
when every class is a structure) are left out of the foreground means.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np

from .base import IGNORE_INDEX, SegmentationDataset, file_record, ratio_split, register_dataset
from .io import (DatasetError, as_integer_labels, check_same_size, list_folder, load_nifti, lut_remap, nifti_data,
                 nifti_spacing, read_image, read_label, read_text, require_folder, volume_to_dhw)

IMAGE_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
FRACTIONS = {"train": 0.7, "val": 0.1, "test": 0.2}


def _label_lut(num_classes, label_values, ignore_value):
    if label_values is None and num_classes is None:
        raise ValueError("give num_classes=K (raw values 0..K-1) or label_values=[raw value of class 0, 1, ...]")
    values = list(range(int(num_classes))) if label_values is None else [int(v) for v in label_values]
    if len(set(values)) != len(values) or min(values) < 0:
        raise ValueError(f"label_values must be distinct non-negative integers, got {values}")
    top = max(values + ([int(ignore_value)] if ignore_value is not None else []))
    lut = np.full(max(top + 1, 256), -1, dtype=np.int64)
    for k, v in enumerate(values):
        lut[v] = k
    if ignore_value is not None:
        lut[int(ignore_value)] = IGNORE_INDEX
    return lut, len(values)


class _PairsBase(SegmentationDataset):
    splits = ("train", "val", "test", "all")

    def __init__(self, root, split="all", *, num_classes=None, label_values=None, ignore_value=None,
                 class_names=None, seed: int = 0, split_file=None, background_classes=(0,), **kw):
        self.background_classes = tuple(int(c) for c in background_classes)
        self.lut, self.num_classes = _label_lut(num_classes, label_values, ignore_value)
        self.class_names = tuple(class_names) if class_names else tuple(f"class{k}" for k in range(self.num_classes))
        if any(not 0 <= c < self.num_classes for c in self.background_classes):
            raise ValueError(f"background_classes must be class ids in 0..{self.num_classes - 1}, "
                             f"got {list(self.background_classes)}")
        self.seed = int(seed)
        self.split_file = split_file
        super().__init__(root, split, **kw)

    def assign_splits(self, records):
        if self.split_file is None:
            return ratio_split([r["case_id"] for r in records], FRACTIONS, self.seed)
        try:
            table = json.loads(read_text(self.split_file, "split file"))
            lists = {name: [str(c) for c in table.get(name, [])] for name in ("train", "val", "test")}
        except (ValueError, AttributeError, TypeError) as exc:
            raise DatasetError(self.split_file, f"split file must be JSON {{\"train\": [stems], ...}} ({exc})") from None
        out = {}
        for name, stems in lists.items():
            for c in stems:
                if out.setdefault(c, name) != name:
                    raise DatasetError(self.split_file, f"case {c!r} is listed in both {out[c]!r} and {name!r}")
        return out

    def _labels(self, raw, path):
        return lut_remap(raw, self.lut, path, "mask")


@register_dataset("folder", "image_folder")
class ImageMaskFolder(_PairsBase):
    name = "folder"

    def __init__(self, root, split="all", *, images="images", masks="masks", mask_suffix="", **kw):
        self.images_dir, self.masks_dir, self.mask_suffix = images, masks, mask_suffix
        super().__init__(root, split, **kw)

    def layout_hint(self):
        return f"<root>/{self.images_dir}/<stem>.png + <root>/{self.masks_dir}/<stem>{self.mask_suffix}.png"

    def index_options(self):
        return (self.images_dir, self.masks_dir, self.mask_suffix)

    def _index(self):
        idir = require_folder(self.root / self.images_dir, "image folder")
        mdir = require_folder(self.root / self.masks_dir, "mask folder")
        masks = {}
        for p in list_folder(mdir):
            if p.suffix.lower() in IMAGE_EXT and p.stem.endswith(self.mask_suffix):
                masks[p.stem[: len(p.stem) - len(self.mask_suffix)] if self.mask_suffix else p.stem] = p
        records = []
        for p in list_folder(idir):
            if p.suffix.lower() not in IMAGE_EXT:
                continue
            mask = masks.get(p.stem, mdir / f"{p.stem}{self.mask_suffix}.png")
            records.append(file_record(p.stem, {"image": (p, "image"), "mask": (mask, "mask")}))
        return records

    def _load(self, rec):
        img = read_image(rec["image"])
        raw = read_label(rec["mask"])
        check_same_size(img.shape[:2], raw.shape, rec["image"], rec["mask"])
        return self.sample(rec, img, self._labels(raw, rec["mask"]))


_NII = re.compile(r"^(.*?)(_(\d{4}))?\.nii(\.gz)?$")


@register_dataset("nifti", "nifti_pairs")
class NiftiPairs(_PairsBase):
    name = "nifti"

    def __init__(self, root, split="all", *, images="imagesTr", labels="labelsTr", normalize: str | None = None, **kw):
        if normalize not in (None, "zscore", "minmax"):
            raise ValueError(f"normalize must be None, 'zscore' or 'minmax', got {normalize!r}")
        self.images_dir, self.labels_dir, self.normalize = images, labels, normalize
        super().__init__(root, split, **kw)

    def layout_hint(self):
        return f"<root>/{self.images_dir}/<case>[_0000].nii.gz + <root>/{self.labels_dir}/<case>.nii.gz"

    def index_options(self):
        return (self.images_dir, self.labels_dir)

    def _index(self):
        idir = require_folder(self.root / self.images_dir, "image folder")
        ldir = require_folder(self.root / self.labels_dir, "label folder")
        cases: dict[str, dict[int, str]] = {}
        for p in list_folder(idir):
            m = _NII.match(p.name)
            if m and not p.name.startswith("."):
                cases.setdefault(m.group(1), {})[int(m.group(3) or 0)] = str(p)
        records = []
        for case in sorted(cases):
            chans = cases[case]
            lab = next((ldir / f"{case}{e}" for e in (".nii.gz", ".nii") if os.path.lexists(ldir / f"{case}{e}")),
                       ldir / f"{case}.nii.gz")
            rec = file_record(case, {"mask": (lab, "label volume")}, images=[chans[k] for k in sorted(chans)])
            if sorted(chans) != list(range(len(chans))):
                rec.setdefault("error", (str(idir / case), f"channels {sorted(chans)} are not 0..{len(chans) - 1}"))
            records.append(rec)
        return records

    def _load(self, rec):
        limg = load_nifti(rec["mask"], "label volume")
        raw = as_integer_labels(nifti_data(limg, rec["mask"], what="label volume"), rec["mask"])
        chans = []
        for path in rec["images"]:
            img = load_nifti(path, "image volume")
            arr = nifti_data(img, path, what="image volume").astype(np.float32)
            if arr.ndim == 4 and len(rec["images"]) == 1:  # MSD: channels in the 4th axis
                parts = [arr[..., c] for c in range(arr.shape[3])]
            else:
                parts = [arr]
            for a in parts:
                check_same_size(raw.shape, a.shape, rec["mask"], path)
                if not np.isfinite(a).all():
                    raise DatasetError(path, "image volume holds NaN or Inf")
                chans.append(a)
        labels = self._labels(raw, rec["mask"])
        spacing = nifti_spacing(limg, rec["mask"])
        if raw.ndim == 3:
            image = np.stack([volume_to_dhw(a) for a in chans])
            labels = volume_to_dhw(labels)
            spacing = spacing[::-1]
        elif raw.ndim == 2:
            image = np.stack([np.ascontiguousarray(a.T) for a in chans])
            labels = np.ascontiguousarray(labels.T)
            spacing = spacing[:2][::-1]
        else:
            raise DatasetError(rec["mask"], f"label volume must be 2D or 3D, got shape {raw.shape}")
        if self.normalize == "zscore":
            image = (image - image.mean(axis=tuple(range(1, image.ndim)), keepdims=True)) / np.maximum(
                image.std(axis=tuple(range(1, image.ndim)), keepdims=True), 1e-6)
        elif self.normalize == "minmax":
            lo = image.min(axis=tuple(range(1, image.ndim)), keepdims=True)
            hi = image.max(axis=tuple(range(1, image.ndim)), keepdims=True)
            image = (image - lo) / np.maximum(hi - lo, 1e-6)
        return self.sample(rec, np.asarray(image, dtype=np.float32), labels, spacing=spacing)
