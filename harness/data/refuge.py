"""REFUGE (retinal fundus: optic disc and cup; glaucoma classification).

Layout (official releases; any nesting of the unzipped folders is accepted)::

    Training400/{Glaucoma,Non-Glaucoma}/{g,n}NNNN.jpg
    Annotation-Training400/Disc_Cup_Masks/{Glaucoma,Non-Glaucoma}/{g,n}NNNN.bmp
    REFUGE-Validation400/VNNNN.jpg      REFUGE-Validation400-GT/Disc_Cup_Masks/VNNNN.bmp
    Test400/TNNNN.jpg                   REFUGE-Test-GT/Disc_Cup_Masks/TNNNN.bmp

Masks are 8-bit with 0 = cup, 128 = disc rim, 255 = background; classes: 0 background,
1 rim (the disc outside the cup), 2 cup. Any other mask value is an error. Evaluation
reports the regions optic disc = rim + cup (``dice_disc``, with ``hd=True`` also
``hd95_disc``) and cup (``dice_cup``): the challenge's and TDSNet's form.
Images and masks are paired by file stem (every ``.bmp`` under a ``Disc_Cup_Masks``
folder, every ``.jpg``/``.png`` elsewhere).

``scene``: 0 normal, 1 glaucoma: from the training folder (``Glaucoma`` /
``Non-Glaucoma``) or the ``g``/``n`` name prefix; for validation/test images from a
label sheet (``labels_file=``: CSV or XLSX with an image-name column and a 0/1 glaucoma
column, e.g. ``Glaucoma_label_and_Fovea_location.xlsx``; XLSX needs openpyxl), else -1.
Splits: ``train`` = Training400 (g/n names), ``val`` = V names, ``test`` = T names, ``all``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .base import RegionMetrics, SegmentationDataset, file_record, register_dataset
from .io import (DatasetError, check_same_size, keyed_rows, lut_remap, read_label, read_rgb, require_file,
                 walk_files)

LUT = np.full(256, -1, dtype=np.int64)
LUT[255], LUT[128], LUT[0] = 0, 1, 2
#: what REFUGE and TDSNet report: the optic disc (rim and cup together) and the cup (class 2
#: itself, so its region columns equal the class columns ``dice_cup``, ``hd95_cup``)
REGIONS = (("disc", (1, 2)), ("cup", (2,)))


def _split_of(stem: str) -> str:
    c = stem[:1].lower()
    return {"g": "train", "n": "train", "v": "val", "t": "test"}.get(c, "train")


def read_glaucoma_sheet(path) -> dict[str, int]:
    path = require_file(path, "glaucoma label sheet")
    try:
        df = pd.read_excel(path) if path.suffix.lower() in (".xlsx", ".xls") else pd.read_csv(path)
    except ImportError as exc:
        raise DatasetError(path, f"cannot read the sheet: {exc} (install openpyxl or convert it to CSV)") from None
    except Exception as exc:
        raise DatasetError(path, f"cannot read the sheet ({exc})") from None
    df.columns = [str(c).strip() for c in df.columns]
    name_col = next((c for c in df.columns if "name" in c.lower()), None)
    lab_col = next((c for c in df.columns if "glaucoma" in c.lower() or c.lower() == "label"), None)
    if name_col is None or lab_col is None:
        raise DatasetError(path, f"sheet needs an image-name column and a glaucoma label column, has {list(df.columns)}")
    entries = []
    for row, (name, lab) in enumerate(zip(df[name_col], df[lab_col]), start=2):
        if str(lab).strip() not in ("0", "1", "0.0", "1.0"):
            raise DatasetError(path, f"glaucoma label of {name} must be 0 or 1, got {lab}")
        entries.append((row, Path(str(name).strip()).stem, int(float(lab))))
    return keyed_rows(path, entries, "glaucoma label sheet")


@register_dataset("refuge")
class REFUGE(SegmentationDataset):
    name = "refuge"
    splits = ("train", "val", "test", "all")
    num_classes = 3
    class_names = ("background", "rim", "cup")
    scene_names = ("normal", "glaucoma")
    extra_metrics = (RegionMetrics(REGIONS),)
    split_by = "split"

    def __init__(self, root, split="train", *, labels_file=None, **kw):
        self.sheet = read_glaucoma_sheet(labels_file) if labels_file is not None else {}
        super().__init__(root, split, **kw)

    def layout_hint(self):
        return "Training400/{Glaucoma,Non-Glaucoma}/*.jpg + Annotation-Training400/Disc_Cup_Masks/**/*.bmp"

    def _index(self):
        masks, images = {}, {}
        for p in walk_files(self.root, "REFUGE folder"):
            suffix = p.suffix.lower()
            if suffix == ".bmp" and "Disc_Cup_Masks" in p.parts:
                masks[p.stem] = p
            elif suffix in (".jpg", ".jpeg", ".png") and "Disc_Cup_Masks" not in p.parts:
                images[p.stem] = p
        records = []
        for stem in sorted(set(images) | set(masks)):
            img, m = images.get(stem), masks.get(stem)
            scene = -1
            parts = [q.lower() for q in (img or m).parts]
            if "non-glaucoma" in parts or stem[:1].lower() == "n":
                scene = 0
            elif "glaucoma" in parts or stem[:1].lower() == "g":
                scene = 1
            if img is None:
                rec = {"case_id": stem, "error": (str(m), "mask has no fundus image with the same name")}
            elif m is None:
                rec = {"case_id": stem, "error": (str(img), "fundus image has no Disc_Cup_Masks/<name>.bmp")}
            else:
                rec = file_record(stem, {"image": (img, "fundus image"), "mask": (m, "disc/cup mask")})
            rec.update(split=_split_of(stem), scene=scene)
            records.append(rec)
        return records

    def _load(self, rec):
        img = read_rgb(rec["image"])
        raw = read_label(rec["mask"], "disc/cup mask")
        check_same_size(img.shape[:2], raw.shape, rec["image"], rec["mask"])
        mask = lut_remap(raw, LUT, rec["mask"], "REFUGE disc/cup mask (0 cup, 128 rim, 255 background)")
        scene = rec["scene"] if rec["scene"] >= 0 else self.sheet.get(rec["case_id"], -1)
        return self.sample(rec, img, mask, scene=scene)
