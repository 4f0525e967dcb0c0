"""CaDIS (Grammatikopoulou et al., MedIA 2021): cataract surgery, 36 classes, three tasks.

Layout (official)::

    <root>/VideoNN/Images/VideoN_frameNNNNNN.png   960x540 RGB
    <root>/VideoNN/Labels/VideoN_frameNNNNNN.png   label value = class id 0..35

Tasks (the CaDIS paper's experiments; ``ignore`` = 255):

* task 1 (8 classes): 0-6 kept, 7-35 -> 7 (instrument).
* task 2 (17 classes): 0-6 kept, 7<-{7,8,10,20,27,32}, 8<-{9,22}, 9<-{11,33},
  10<-{12,28}, 11<-{13,21}, 12<-{14,24}, 13<-{15,18}, 14<-{16,23}, 15<-{17}, 16<-{19},
  the rest (25,26,29,30,31,34,35) -> ignore.
* task 3 (25 classes): 0-24 kept, 25-35 -> ignore.

``rare_as_class=True`` is the HOG-MTL variant: the classes that the official mapping
ignores become one extra class (index 17 in task 2, 25 in task 3), so tasks 2/3 have
18/26 classes. A pixel value 255 in a label file (the corrected CaDIS labels use it for
unlabelled pixels) stays ``ignore`` in every task and variant. Any other value (36..254)
is an error.

Split (official, by video): val = videos 5, 7, 16; test = 2, 12, 22; train = the rest.
``split="all"`` takes every video.

Every class is a structure (class 0 is the pupil): ``background_classes`` is empty, so
the foreground means (``dice_fg``, ``hd95_fg``) and checkpoint selection count class 0.

``images=False`` reads labels only (``image`` is then absent): used for the label-only
real-data sample in the tests and for label statistics.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .base import IGNORE_INDEX, SegmentationDataset, file_record, register_dataset, table_split
from .io import check_same_size, list_folder, lut_remap, read_label, read_rgb

VAL_VIDEOS = (5, 7, 16)
TEST_VIDEOS = (2, 12, 22)

CLASS_NAMES_36 = (
    "Pupil", "Surgical Tape", "Hand", "Eye Retractors", "Iris", "Skin", "Cornea",
    "Hydrodissection Cannula", "Viscoelastic Cannula", "Capsulorhexis Cystotome",
    "Rycroft Cannula", "Bonn Forceps", "Primary Knife", "Phacoemulsifier Handpiece",
    "Lens Injector", "I/A Handpiece", "Secondary Knife", "Micromanipulator",
    "I/A Handpiece Handle", "Capsulorhexis Forceps", "Rycroft Cannula Handle",
    "Phacoemulsifier Handpiece Handle", "Capsulorhexis Cystotome Handle",
    "Secondary Knife Handle", "Lens Injector Handle", "Suture Needle", "Needle Holder",
    "Charleux Cannula", "Primary Knife Handle", "Vitrectomy Handpiece", "Mendez Ring",
    "Marker", "Hydrodissection Cannula Handle", "Troutman Forceps", "Cotton", "Iris Hooks",
)

TASK2_GROUPS = {
    7: (7, 8, 10, 20, 27, 32), 8: (9, 22), 9: (11, 33), 10: (12, 28), 11: (13, 21),
    12: (14, 24), 13: (15, 18), 14: (16, 23), 15: (17,), 16: (19,),
}
TASK2_NAMES = (
    "Pupil", "Surgical Tape", "Hand", "Eye Retractors", "Iris", "Skin", "Cornea",
    "Cannula", "Cap. Cystotome", "Tissue Forceps", "Primary Knife", "Ph. Handpiece",
    "Lens Injector", "I/A Handpiece", "Secondary Knife", "Micromanipulator", "Cap. Forceps",
)


def cadis_lut(task: int, rare_as_class: bool = False) -> tuple[np.ndarray, int]:
    """Lookup table (length 256, -1 = not in the encoding) and number of classes."""
    lut = np.full(256, -1, dtype=np.int64)
    lut[255] = IGNORE_INDEX
    if task == 1:
        lut[:7] = np.arange(7)
        lut[7:36] = 7
        return lut, 8
    if task == 2:
        lut[:36] = IGNORE_INDEX
        lut[:7] = np.arange(7)
        for new, olds in TASK2_GROUPS.items():
            lut[list(olds)] = new
        k = 17
    elif task == 3:
        lut[:36] = IGNORE_INDEX
        lut[:25] = np.arange(25)
        k = 25
    else:
        raise ValueError(f"CaDIS task must be 1, 2 or 3, got {task!r}")
    if rare_as_class:
        rare = (lut[:36] == IGNORE_INDEX)
        lut[:36][rare] = k
        k += 1
    return lut, k


_NAME = re.compile(r"^Video(\d+)_frame(\d+)\.png$", re.IGNORECASE)


@register_dataset("cadis")
class CaDIS(SegmentationDataset):
    name = "cadis"
    splits = ("train", "val", "test", "all")
    split_by = "video"
    background_classes = ()  # class 0 is the pupil, a structure like any other

    def __init__(self, root, split="train", *, task: int = 2, rare_as_class: bool = False,
                 images: bool = True, **kw):
        self.task = int(task)
        self.rare_as_class = bool(rare_as_class)
        self.read_images = bool(images)
        self.lut, self.num_classes = cadis_lut(self.task, self.rare_as_class)
        if self.task == 1:
            names = CLASS_NAMES_36[:7] + ("Instrument",)
        elif self.task == 2:
            names = TASK2_NAMES
        else:
            names = CLASS_NAMES_36[:25]
        self.class_names = names + (("Rare",) if self.rare_as_class else ())
        super().__init__(root, split, **kw)

    def layout_hint(self):
        return "<root>/VideoNN/{Images,Labels}/VideoN_frameNNNNNN.png"

    def index_options(self):
        return (self.read_images,)

    def _index(self):
        records = []
        for vdir in list_folder(self.root, "CaDIS folder"):
            m = re.match(r"^Video(\d+)$", vdir.name)
            if not m or not vdir.is_dir():
                continue
            video = int(m.group(1))
            labels = vdir / "Labels"
            images = vdir / "Images"
            names = set()
            if labels.is_dir():
                names |= {p.name for p in list_folder(labels) if _NAME.match(p.name)}
            if self.read_images and images.is_dir():
                names |= {p.name for p in list_folder(images) if _NAME.match(p.name)}
            for n in sorted(names):
                files = {"image": (images / n, "image")} if self.read_images else {}
                files["mask"] = (labels / n, "label map")
                records.append(file_record(Path(n).stem, files, video=video))
        return records

    def assign_splits(self, records):
        return table_split({r["video"] for r in records}, {"val": VAL_VIDEOS, "test": TEST_VIDEOS})

    def remap(self, raw: np.ndarray, path="<array>") -> np.ndarray:
        """Raw CaDIS class ids (0..35, 255) -> this task's training ids."""
        return lut_remap(raw, self.lut, path, "CaDIS label map")

    def _load(self, rec):
        raw = read_label(rec["mask"])
        mask = self.remap(raw, rec["mask"])
        img = None
        if self.read_images:
            img = read_rgb(rec["image"])
            check_same_size(img.shape[:2], raw.shape, rec["image"], rec["mask"])
        return self.sample(rec, img, mask)
