"""LiTS (Liver Tumor Segmentation challenge): abdominal CT, liver and tumour.

Layout (official, any sub-folders such as ``Training Batch 1``/``2``)::

    <root>/**/volume-N.nii          CT in Hounsfield units
    <root>/**/segmentation-N.nii    0 background, 1 liver, 2 tumour

(``.nii.gz`` is accepted as well.) ``mode="2d"`` (default) yields axial slices: the index
holds one record per slice, built from the NIfTI headers (cached, see ``cache_dir``); a
slice is read lazily from disk (for uncompressed ``.nii`` only that slice's bytes).
``mode="3d"`` yields whole volumes.

``image``: ``(1, H, W)`` / ``(1, D, H, W)``: HU clipped to ``hu_window`` (default
[-200, 250]) and scaled to [0, 1]. Voxel order of the file, ``(Z, Y, X)`` -> ``(D, H, W)``.
``target="liver"`` (default, CMU-Net): 0 background, 1 liver (tumour counts as liver);
``target="liver_tumour"``: 0/1/2. ``presence``: the per-class presence vector, so
``presence[1]`` is CMU-Net's image-level organ label ``C = max(Y)``.
``spacing``: ``(sy, sx)`` in 2D, ``(sz, sy, sx)`` in 3D, from the header.

Splits: by volume (no slice of a volume crosses splits). Default: 70/10/20 ``train``/
``val``/``test`` (:func:`ratio_split`, ``seed`` 0); ``all`` takes every volume. With
``scans`` (a fixed protocol such as CMU-Net's 17 scans split 10/2/5,
``configs/_base/lits.yaml``): ``{"train": [volume numbers], "val": [...], "test": [...]}``;
only the listed volumes are read (``all`` = all of them), each must be in the folder, and
no volume may be in two splits. :meth:`LiTS.slice_counts` gives the slices per split.
"""

from __future__ import annotations

import os
import re
from typing import Optional

import numpy as np

from .base import SegmentationDataset, file_record, ratio_split, register_dataset
from .io import (DatasetError, as_integer_labels, check_same_size, check_values, load_nifti, nifti_data,
                 nifti_spacing, volume_to_dhw, walk_files)

FRACTIONS = {"train": 0.7, "val": 0.1, "test": 0.2}
_VOL = re.compile(r"^volume-(\d+)\.nii(\.gz)?$")


@register_dataset("lits")
class LiTS(SegmentationDataset):
    name = "lits"
    splits = ("train", "val", "test", "all")
    split_by = "scan"  # "volume-N": no slice of a volume crosses splits

    def __init__(self, root, split="train", *, mode: str = "2d", target: str = "liver",
                 hu_window=(-200.0, 250.0), seed: int = 0, scans: Optional[dict[str, list[int]]] = None, **kw):
        if mode not in ("2d", "3d"):
            raise ValueError(f"mode must be '2d' or '3d', got {mode!r}")
        if target not in ("liver", "liver_tumour"):
            raise ValueError(f"target must be 'liver' or 'liver_tumour', got {target!r}")
        lo, hi = (float(v) for v in hu_window)
        if not hi > lo:
            raise ValueError(f"hu_window must be (low, high) with high > low, got {hu_window}")
        self.mode, self.target, self.hu_window, self.seed = mode, target, (lo, hi), int(seed)
        self.scans = None if scans is None else _check_scans(scans)
        self.class_names = ("background", "liver") + (("tumour",) if target == "liver_tumour" else ())
        self.num_classes = len(self.class_names)
        super().__init__(root, split, **kw)

    def layout_hint(self):
        return "<root>/**/volume-N.nii + segmentation-N.nii"

    def index_options(self):
        listed = None if self.scans is None else sorted(self.scans)
        return (self.mode,) if listed is None else (self.mode, tuple(listed))

    def _index(self):
        records = []
        files = walk_files(self.root, "LiTS folder")
        vols = sorted((p for p in files if _VOL.match(p.name)), key=lambda p: int(_VOL.match(p.name).group(1)))
        if self.scans is not None:
            found = {int(_VOL.match(p.name).group(1)) for p in vols}
            missing = sorted(set(self.scans) - found)
            if missing:
                raise DatasetError(self.root, f"data.options.scans lists volume(s) {missing}, not found as "
                                              f"volume-N.nii(.gz) under this folder")
            vols = [p for p in vols if int(_VOL.match(p.name).group(1)) in self.scans]
        for v in vols:
            n = int(_VOL.match(v.name).group(1))
            seg = next((c for c in (v.with_name(f"segmentation-{n}.nii"), v.with_name(f"segmentation-{n}.nii.gz"))
                        if os.path.lexists(c)), v.with_name(f"segmentation-{n}.nii"))
            base = file_record(f"volume-{n}", {"image": (v, "CT volume"), "mask": (seg, "segmentation")},
                               volume=n, scan=f"volume-{n}")
            if "error" in base:
                records.append(base)
                continue
            try:
                shape = load_nifti(v, "CT volume").shape
                sshape = load_nifti(seg, "segmentation").shape
                if len(shape) != 3:
                    raise DatasetError(v, f"CT volume must be 3D, header says shape {shape}")
                check_same_size(shape, sshape, v, seg)
            except DatasetError as exc:
                records.append({**base, "error": (exc.path, exc.reason)})
                continue
            if self.mode == "3d":
                records.append(base)
            else:
                records.extend({**base, "case_id": f"volume-{n}/slice-{z:04d}", "z": z} for z in range(shape[2]))
        return records

    def assign_splits(self, records):
        if self.scans is not None:
            return {f"volume-{n}": split for n, split in self.scans.items()}
        return ratio_split(sorted({r["scan"] for r in records}), FRACTIONS, self.seed)

    def slice_counts(self) -> dict[str, int]:
        """Axial slices (2D samples) per split of the whole index: ``{"train": n, "val": n, "test": n}``."""
        if self.mode != "2d":
            raise ValueError("slice_counts: needs mode='2d'")
        records = self._cached_index()
        assign = self.assign_splits(records)
        counts = {s: 0 for s in ("train", "val", "test")}
        for r in records:
            split = assign.get(r["scan"])
            if split in counts:
                counts[split] += 1
        return counts

    def _load(self, rec):
        vimg = load_nifti(rec["image"], "CT volume")
        simg = load_nifti(rec["mask"], "segmentation")
        check_same_size(vimg.shape, simg.shape, rec["image"], rec["mask"])
        slicer = None if self.mode == "3d" else (slice(None), slice(None), rec["z"])
        ct = nifti_data(vimg, rec["image"], slicer, "CT volume").astype(np.float32)
        seg = as_integer_labels(nifti_data(simg, rec["mask"], slicer, "segmentation"), rec["mask"])
        check_values(seg, (0, 1, 2), rec["mask"], "LiTS segmentation")
        if not np.isfinite(ct).all():
            raise DatasetError(rec["image"], "CT volume holds NaN or Inf")
        if self.target == "liver":
            seg = (seg > 0).astype(np.int64)
        lo, hi = self.hu_window
        ct = (np.clip(ct, lo, hi) - lo) / (hi - lo)
        sx, sy, sz = nifti_spacing(vimg, rec["image"])
        if self.mode == "3d":
            ct, seg, spacing = volume_to_dhw(ct), volume_to_dhw(seg), [sz, sy, sx]
        else:
            ct, seg, spacing = np.ascontiguousarray(ct.T), np.ascontiguousarray(seg.T), [sy, sx]
        return self.sample(rec, ct[None].astype(np.float32), seg, spacing=spacing)


def _check_scans(scans) -> dict[int, str]:
    """``{"train": [n, ...], ...}`` -> ``{n: "train", ...}``; a volume in two splits or a bad entry is an error."""
    if not isinstance(scans, dict):
        raise ValueError(f"scans: expected a mapping of split names to volume numbers, got {scans!r}")
    out: dict[int, str] = {}
    for split, numbers in scans.items():
        if split not in ("train", "val", "test"):
            raise ValueError(f"scans: expected the splits train, val and test, got {split!r}")
        for n in numbers:
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ValueError(f"scans.{split}: expected volume numbers (integers >= 0), got {n!r}")
            if n in out:
                raise ValueError(f"scans: volume-{n} is in {out[n]} and in {split}; a volume belongs to one split")
            out[n] = split
    return out
