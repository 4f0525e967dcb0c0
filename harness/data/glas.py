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
Splits: ``train``, ``testA``, ``testB``, ``test`` (A and B), ``all``. Samples carry
``part`` (``train``, ``testA`` or ``testB``); evaluation adds the object-level Dice and
Hausdorff of the GlaS challenge and reports Part A and Part B separately.
"""

from __future__ import annotations

import re

import numpy as np

from .base import GroupReport, ObjectMetrics, SegmentationDataset, file_record, register_dataset
from .io import DatasetError, check_same_size, keyed_rows, list_folder, read_csv, read_label, read_rgb, require_file

GRADES = ("benign", "malignant")
_NAME = re.compile(r"^(train|testA|testB)_(\d+)\.bmp$")


def read_grade_csv(path) -> dict[str, int]:
    rows = read_csv(require_file(path, "GlaS Grade.csv"), "Grade.csv")
    if not rows:
        raise DatasetError(path, "Grade.csv is empty")
    header = [h.lower() for h in rows[0][1]]
    try:
        i_name = header.index("name")
        i_grade = header.index("grade (glas)")
    except ValueError:
        raise DatasetError(path, f"Grade.csv header {rows[0][1]} lacks 'name' and 'grade (GlaS)'") from None
    entries = []
    for n, row in rows[1:]:
        g = row[i_grade].lower() if len(row) > i_grade else ""
        if g not in GRADES:
            raise DatasetError(path, f"line {n}: grade {g!r} is not one of {GRADES}")
        entries.append((n, row[i_name], GRADES.index(g)))
    return keyed_rows(path, entries, "Grade.csv")


@register_dataset("glas")
class GlaS(SegmentationDataset):
    name = "glas"
    splits = ("train", "testA", "testB", "test", "all")
    num_classes = 2
    class_names = ("background", "gland")
    scene_names = GRADES
    extra_metrics = (ObjectMetrics(connectivity=8), GroupReport("part"))
    split_by = "part"
    split_unions = {"test": ("testA", "testB")}

    def layout_hint(self):
        return "<root>/{train,testA,testB}_N.bmp + _N_anno.bmp, <root>/Grade.csv"

    def _index(self):
        grade_csv = self.root / "Grade.csv"
        grades = read_grade_csv(grade_csv)
        records = []
        entries = list_folder(self.root, "GlaS folder")
        for p in sorted(entries, key=lambda q: (q.name.split("_")[0], [int(x) for x in re.findall(r"\d+", q.name)])):
            m = _NAME.match(p.name)
            if not m:
                continue
            rec = file_record(p.stem, {"image": (p, "image"), "mask": (p.with_name(p.stem + "_anno.bmp"), "annotation")},
                              part=m.group(1))
            if p.stem in grades:
                rec["scene"] = grades[p.stem]
            else:
                rec.setdefault("error", (str(grade_csv), f"no grade for {p.stem}"))
            records.append(rec)
        return records

    def _load(self, rec):
        img = read_rgb(rec["image"])
        inst = read_label(rec["mask"], "instance annotation").astype(np.int64)
        check_same_size(img.shape[:2], inst.shape, rec["image"], rec["mask"])
        return self.sample(rec, img, inst > 0, instances=inst, scene=rec["scene"], part=rec["part"])
