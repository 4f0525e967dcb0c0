"""BraTS 2018 (multimodal brain tumour segmentation), 3D.

Layout (official)::

    <root>/{HGG,LGG}/<id>/<id>_{t1,t1ce,t2,flair,seg}.nii.gz     240x240x155, 1 mm

``image``: ``(4, D, H, W)`` float32 in the channel order ``modalities`` (default
flair, t1, t1ce, t2), voxel order ``(Z, Y, X)`` of the file (no reorientation), each
modality z-scored over its non-zero (brain) voxels when ``normalize=True`` (default).

``mask``: 0 background, 1 necrotic / non-enhancing core, 2 oedema, 3 enhancing tumour.
Evaluation adds the Dice of the regions (:data:`REGIONS`: ET, TC, WT).
The 2018 files encode enhancing as 4, newer releases as 3; both are accepted
(``label_convention="auto"``; a file holding both 3 and 4 is an error), or force
``"2018"`` (0/1/2/4) / ``"2021"`` (0/1/2/3). ``regions``: uint8 ``(3, D, H, W)`` =
ET {enhancing}, TC {necrotic, enhancing}, WT {necrotic, oedema, enhancing}.
``scene``: 0 HGG, 1 LGG. ``spacing``: from the NIfTI header, ``(sz, sy, sx)``.

``crop_size=(d, h, w)``: a crop of that size centred on the bounding box of the brain
(non-zero voxels of any modality), zero-padded where the volume is smaller (e.g.
``(19, 144, 144)`` for the anisotropic 3D UNet, or ``(155, 160, 192)``); ``None`` keeps
the full volume. Volumes are opened only when a sample is read.

Splits: the 2018 validation/test releases have no public labels, so the labelled
training set is split per case, stratified by grade, 70/10/20 ``train``/``val``/``test``
(:func:`ratio_split`, ``seed`` 0); ``all`` takes every case.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from .base import RegionMetrics, SegmentationDataset, file_record, ratio_split, register_dataset
from .io import (DatasetError, as_integer_labels, check_same_size, list_folder, load_nifti, nifti_data, nifti_spacing,
                 volume_to_dhw)

GRADES = ("HGG", "LGG")
#: BraTS evaluation regions as unions of the adapter's classes (1 necrotic/non-enhancing, 2 oedema, 3 enhancing).
REGIONS = (("ET", (3,)), ("TC", (1, 3)), ("WT", (1, 2, 3)))
MODALITIES = ("flair", "t1", "t1ce", "t2")
FRACTIONS = {"train": 0.7, "val": 0.1, "test": 0.2}


def brats_labels(seg: np.ndarray, path, convention: str = "auto") -> np.ndarray:
    """Raw BraTS labels -> 0..3 (3 = enhancing)."""
    values = set(np.unique(seg).tolist())
    if convention == "auto":
        if {3, 4} <= values:
            raise DatasetError(path, "segmentation holds both 3 and 4: neither BraTS convention (0/1/2/4 or 0/1/2/3)")
        allowed = {0, 1, 2, 4} if 4 in values else {0, 1, 2, 3}
    elif convention == "2018":
        allowed = {0, 1, 2, 4}
    elif convention == "2021":
        allowed = {0, 1, 2, 3}
    else:
        raise ValueError(f"label_convention must be 'auto', '2018' or '2021', got {convention!r}")
    bad = values - allowed
    if bad:
        raise DatasetError(path, f"segmentation holds values {sorted(bad)} outside the BraTS encoding {sorted(allowed)}")
    out = seg.astype(np.int64, copy=True)
    out[seg == 4] = 3
    return out


def brats_regions(labels: torch.Tensor) -> torch.Tensor:
    """0..3 labels -> uint8 ``(3, ...)`` ET, TC, WT (:data:`REGIONS`)."""
    return torch.stack([torch.isin(labels, torch.tensor(classes)) for _, classes in REGIONS]).to(torch.uint8)


def center_crop_box(shape, center, size):
    """Per-axis (source slice, destination slice) of a ``size`` crop centred at ``center``."""
    src, dst = [], []
    for n, c, s in zip(shape, center, size):
        start = int(round(c - s / 2))
        a, b = max(start, 0), min(start + s, n)
        src.append(slice(a, b))
        dst.append(slice(a - start, a - start + (b - a)))
    return tuple(src), tuple(dst)


@register_dataset("brats", "brats18", "brats2018")
class BraTS(SegmentationDataset):
    name = "brats"
    splits = ("train", "val", "test", "all")
    num_classes = 4
    class_names = ("background", "necrotic/non-enhancing", "oedema", "enhancing")
    scene_names = GRADES
    extra_metrics = (RegionMetrics(REGIONS),)

    def __init__(self, root, split="train", *, modalities=MODALITIES, normalize: bool = True,
                 crop_size=None, label_convention: str = "auto", seed: int = 0, **kw):
        bad = [m for m in modalities if m not in MODALITIES]
        if bad or not modalities:
            raise ValueError(f"modalities must be a non-empty subset of {MODALITIES}, got {modalities}")
        if label_convention not in ("auto", "2018", "2021"):
            raise ValueError(f"label_convention must be 'auto', '2018' or '2021', got {label_convention!r}")
        self.modalities = tuple(modalities)
        self.normalize = bool(normalize)
        self.crop_size = None if crop_size is None else tuple(int(s) for s in crop_size)
        self.label_convention = label_convention
        self.seed = int(seed)
        super().__init__(root, split, **kw)

    def layout_hint(self):
        return "<root>/{HGG,LGG}/<id>/<id>_{t1,t1ce,t2,flair,seg}.nii.gz"

    def _index(self):
        records = []
        for g, grade in enumerate(GRADES):
            gdir = self.root / grade
            if not gdir.is_dir():
                continue
            for cdir in (p for p in list_folder(gdir, f"BraTS {grade} folder") if p.is_dir()):
                cid = cdir.name
                files = {}
                for kind in MODALITIES + ("seg",):
                    cands = [cdir / f"{cid}_{kind}.nii.gz", cdir / f"{cid}_{kind}.nii"]
                    role = "mask" if kind == "seg" else kind
                    files[role] = (next((c for c in cands if os.path.lexists(c)), cands[0]), f"{kind} volume")
                records.append(file_record(cid, files, grade=g))
        return records

    def assign_splits(self, records):
        return ratio_split([r["case_id"] for r in records], FRACTIONS, self.seed,
                           strata={r["case_id"]: r["grade"] for r in records})

    def _load(self, rec):
        seg_img = load_nifti(rec["mask"], "segmentation")
        seg = as_integer_labels(nifti_data(seg_img, rec["mask"], what="segmentation"), rec["mask"])
        labels = volume_to_dhw(brats_labels(seg, rec["mask"], self.label_convention))
        chans = []
        for m in self.modalities:
            img = load_nifti(rec[m], f"{m} volume")
            arr = nifti_data(img, rec[m], what=f"{m} volume").astype(np.float32)
            check_same_size(seg.shape, arr.shape, rec["mask"], rec[m])
            if not np.isfinite(arr).all():
                raise DatasetError(rec[m], f"{m} volume holds NaN or Inf")
            chans.append(volume_to_dhw(arr))
        image = np.stack(chans)
        if self.normalize:
            for c in range(image.shape[0]):
                brain = image[c] != 0
                if brain.any():
                    v = image[c][brain]
                    image[c][brain] = (v - v.mean()) / max(float(v.std()), 1e-6)
        sx, sy, sz = nifti_spacing(seg_img, rec["mask"])
        if self.crop_size is not None:
            nz = np.nonzero((image != 0).any(axis=0))
            if nz[0].size:
                center = [(a.min() + a.max() + 1) / 2 for a in nz]
            else:
                center = [n / 2 for n in labels.shape]
            src, dst = center_crop_box(labels.shape, center, self.crop_size)
            out_img = np.zeros((image.shape[0],) + self.crop_size, np.float32)
            out_lab = np.zeros(self.crop_size, np.int64)
            out_img[(slice(None),) + dst] = image[(slice(None),) + src]
            out_lab[dst] = labels[src]
            image, labels = out_img, out_lab
        sample = self.sample(rec, image, labels, scene=rec["grade"], spacing=[sz, sy, sx])
        sample["regions"] = brats_regions(sample["mask"])
        return sample
