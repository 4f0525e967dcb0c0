"""GlaS (MICCAI 2015 Gland Segmentation challenge, Warwick-QU): colon histology, gland instances.

Layout (official, one flat folder)::

    <root>/train_N.bmp   train_N_anno.bmp      (85 training images)
    <root>/testA_N.bmp   testA_N_anno.bmp      (60)
    <root>/testB_N.bmp   testB_N_anno.bmp      (20)
    <root>/Grade.csv     name, patient ID, grade (GlaS), grade (Sirinukunwattana et al. 2015)

``*_anno.bmp`` holds instance ids (0 background, 1..N glands). ``instances`` is that map,
``mask`` is ``instances > 0`` (0 background, 1 gland). ``scene`` is the GlaS grade:
0 benign, 1 malignant. ``Grade.csv`` has spaces after the commas in both header and
values: they are stripped; an image missing from it, or an unknown grade, is an error.
Splits: ``train``, ``testA``, ``testB``, ``test`` (A and B), ``all``.
"""

from __future__ import annotations

import csv
import re

import numpy as np
import torch

from .base import SegmentationDataset, register_dataset
from .io import DatasetError, MissingFileError, check_same_size, image_to_tensor, read_label, read_rgb

GRADES = ("benign", "malignant")
_NAME = re.compile(r"^(train|testA|testB)_(\d+)\.bmp$")


def read_grade_csv(path) -> dict[str, int]:
    try:
        with open(path, newline="") as f:
            rows = [[c.strip() for c in row] for row in csv.reader(f) if row]
    except OSError as exc:
        raise MissingFileError(path, f"cannot read Grade.csv ({exc})") from None
    if not rows:
        raise DatasetError(path, "Grade.csv is empty")
    header = [h.lower() for h in rows[0]]
    try:
        i_name = header.index("name")
        i_grade = header.index("grade (glas)")
    except ValueError:
        raise DatasetError(path, f"Grade.csv header {rows[0]} lacks 'name' and 'grade (GlaS)'") from None
    out = {}
    for n, row in enumerate(rows[1:], start=2):
        g = row[i_grade].lower() if len(row) > i_grade else ""
        if g not in GRADES:
            raise DatasetError(path, f"line {n}: grade {g!r} is not one of {GRADES}")
        out[row[i_name]] = GRADES.index(g)
    return out


@register_dataset("glas")
class GlaS(SegmentationDataset):
    name = "glas"
    splits = ("train", "testA", "testB", "test", "all")
    num_classes = 2
    class_names = ("background", "gland")
    scene_names = GRADES

    def layout_hint(self):
        return "<root>/{train,testA,testB}_N.bmp + _N_anno.bmp, <root>/Grade.csv"

    def _index(self):
        grade_csv = self.root / "Grade.csv"
        if not grade_csv.is_file():
            raise MissingFileError(grade_csv, "GlaS Grade.csv not found")
        grades = read_grade_csv(grade_csv)
        records = []
        for p in sorted(self.root.iterdir(), key=lambda q: (q.name.split("_")[0], [int(x) for x in re.findall(r"\d+", q.name)])):
            m = _NAME.match(p.name)
            if not m:
                continue
            anno = p.with_name(p.stem + "_anno.bmp")
            rec = {"case_id": p.stem, "part": m.group(1), "image": str(p), "mask": str(anno)}
            if p.stem not in grades:
                rec["error"] = (str(grade_csv), f"no grade for {p.stem}")
            else:
                rec["scene"] = grades[p.stem]
            if not anno.is_file():
                rec["error"] = (str(anno), "annotation not found (its image exists)")
            records.append(rec)
        return records

    def _select(self, records, split):
        if split == "all":
            return records
        if split == "test":
            return [r for r in records if r["part"] in ("testA", "testB")]
        return [r for r in records if r["part"] == split]

    def _load(self, rec):
        img = read_rgb(rec["image"])
        inst = read_label(rec["mask"], "instance annotation").astype(np.int64)
        check_same_size(img.shape[:2], inst.shape, rec["image"], rec["mask"])
        return {
            "image": image_to_tensor(img),
            "mask": torch.from_numpy((inst > 0).astype(np.int64)),
            "instances": torch.from_numpy(inst),
            "scene": torch.tensor(rec["scene"], dtype=torch.int64),
            "case_id": rec["case_id"],
        }
