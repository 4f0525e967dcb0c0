"""EndoVis 2017 Robotic Instrument Segmentation and EndoVis 2018 Robotic Scene Segmentation.

EndoVis 2017 layout (official)::

    <root>/instrument_dataset_K/left_frames/frameNNN.png                 1920x1080 RGB
    <root>/instrument_dataset_K/ground_truth/<Instrument>_labels/frameNNN.png
        one grey mask per instrument: 0 background, 10 shaft, 20 wrist, 30 claspers
        (``Other_labels``: any non-zero value is the object)

Targets (``target=``), as in the challenge (and the widely used ternaus preparation):

* ``"binary"`` (2): instrument vs background; ``Other`` objects are background.
* ``"parts"`` (4): background, shaft, wrist, claspers; ``Other`` objects are background.
* ``"type"`` (8): background, Bipolar Forceps 1, Prograsp Forceps 2, Large Needle Driver 3,
  Vessel Sealer 4, Grasping Retractor 5, Monopolar Curved Scissors 6, Other 7; the type is
  read from the folder name (``Left_``/``Right_``/``Maryland_`` prefixes allowed).

``instances``: one id per instrument folder (sorted folder order, 1-based); where two
masks overlap the later folder wins (for every target). ``crop=True`` (default) takes
rows 28:1052 and cols 320:1600 (the black border removed, 1024x1280).
Splits: ``test`` is videos 9 and 10; ``all`` every video found. ``fold`` 0..3 picks the
validation videos {1,3}, {2,5}, {4,8}, {6,7} and ``train`` is the other videos of 1..8
(cross-validation). ``fold=None`` is HOG-MTL's protocol (train on videos 1..8, test on 9
and 10): ``train`` is every video of 1..8 but the last ``val_frames`` frames of each (by
frame number), which make ``val`` (the checkpoint-selection set; which frames the paper
validated on is not known to us: a choice, see ``docs/fidelity/hogmtl.md``).
Samples carry ``video``; evaluation reports each video separately as well.

EndoVis 2018 layout (official)::

    <root>/seq_N/left_frames/frameNNN.png
    <root>/seq_N/labels/frameNNN.png        RGB colour labels
    labels.json: [{name, color: [r, g, b], classid}, ...]

Colours are decoded by exact RGB match with ``labels.json`` (``labels_json=`` path, else
``<root>/labels.json``, else ``<root>/seq_N/labels.json``, else the 12-class table the
challenge published, built in). An unknown colour is an error. ``scene``: a grouping
of the sequences into three scenes, {1,2,4,5,7} -> 0, {3,10,11,12,16} -> 1,
{6,9,13,14,15} -> 2 (-1 for a sequence outside it). The grouping is this project's
choice: the challenge defines no scenes and the TDSNet paper publishes none. Splits: ``val`` = ``val_sequences`` (default 2, 5, 9, 15,
the split used since ISINet; the challenge released no validation set), ``train`` = the
other sequences, ``all`` every sequence.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from .base import GroupReport, SegmentationDataset, file_record, register_dataset, table_split
from .io import (DatasetError, check_same_size, check_values, file_error, list_folder, read_image, read_label,
                 read_rgb, read_text)

# ----------------------------------------------------------------------------- 2017

FOLDS17 = ((1, 3), (2, 5), (4, 8), (6, 7))
TRAIN17 = (1, 2, 3, 4, 5, 6, 7, 8)
TEST17 = (9, 10)
CROP17 = (slice(28, 1052), slice(320, 1600))
TYPES17 = (
    ("Bipolar_Forceps", 1), ("Prograsp_Forceps", 2), ("Large_Needle_Driver", 3),
    ("Vessel_Sealer", 4), ("Grasping_Retractor", 5), ("Monopolar_Curved_Scissors", 6),
    ("Other", 7),
)
TARGETS17 = {
    "binary": ("background", "instrument"),
    "parts": ("background", "shaft", "wrist", "claspers"),
    "type": ("background", "Bipolar Forceps", "Prograsp Forceps", "Large Needle Driver",
             "Vessel Sealer", "Grasping Retractor", "Monopolar Curved Scissors", "Other"),
}


def frame_number(case_id: str) -> int:
    """``instrument_dataset_K/frameNNN`` -> NNN (frames sort by number, not by name)."""
    m = re.search(r"(\d+)$", case_id)
    return int(m.group(1)) if m else -1


def instrument_type(folder_name: str, path="<folder>") -> int:
    for key, t in TYPES17:
        if key.lower() in folder_name.lower():
            return t
    raise DatasetError(path, f"unknown instrument folder {folder_name!r}; expected one of {[k for k, _ in TYPES17]}")


@register_dataset("endovis17", "endovis2017")
class EndoVis2017(SegmentationDataset):
    name = "endovis17"
    splits = ("train", "val", "test", "all")
    split_by = "video"
    extra_metrics = (GroupReport("video"),)

    def __init__(self, root, split="train", *, target: str = "binary", fold: int | None = 0, crop: bool = True,
                 val_frames: int = 25, **kw):
        if target not in TARGETS17:
            raise ValueError(f"target must be one of {tuple(TARGETS17)}, got {target!r}")
        if fold is not None and (isinstance(fold, bool) or fold not in range(4)):
            raise ValueError(f"fold must be 0..3 or None (train on videos 1..8), got {fold!r}")
        if isinstance(val_frames, bool) or not isinstance(val_frames, int) or val_frames < 0:
            raise ValueError(f"val_frames must be an integer >= 0, got {val_frames!r}")
        self.target, self.fold, self.crop = target, None if fold is None else int(fold), bool(crop)
        self.val_frames = val_frames
        self.class_names = TARGETS17[target]
        self.num_classes = len(self.class_names)
        super().__init__(root, split, **kw)

    def layout_hint(self):
        return "<root>/instrument_dataset_K/{left_frames/frameNNN.png, ground_truth/<Instrument>_labels/frameNNN.png}"

    def _index(self):
        records = []
        for vdir in list_folder(self.root, "EndoVis 2017 folder"):
            m = re.match(r"^instrument_dataset_(\d+)$", vdir.name)
            if not m or not vdir.is_dir():
                continue
            video = int(m.group(1))
            frames = vdir / "left_frames"
            gt = vdir / "ground_truth"
            if not frames.is_dir():
                records.append({"video": video, "case_id": vdir.name, "error": (str(frames), "left_frames folder not found")})
                continue
            folders = [p for p in list_folder(gt) if p.is_dir()] if gt.is_dir() else []
            for f in list_folder(frames):
                if not (f.name.startswith("frame") and f.name.endswith(".png")):
                    continue
                masks = [d / f.name for d in folders]
                rec = file_record(f"{vdir.name}/{f.stem}", {"image": (f, "frame")}, video=video,
                                  masks=[str(q) for q in masks])
                if not folders:
                    rec.setdefault("error", (str(gt), "ground_truth folder missing or empty"))
                for q in masks:
                    err = file_error(q, "instrument mask", "frame")
                    if err is not None:
                        rec.setdefault("error", (err.path, err.reason))
                records.append(rec)
        return records

    def assign_splits(self, records):
        if self.fold is None:
            return table_split({r["video"] for r in records}, {"test": TEST17, "train": TRAIN17}, rest="unused")
        return table_split({r["video"] for r in records}, {"test": TEST17, "val": FOLDS17[self.fold]})

    def _select(self, records, split):
        if self.fold is None and split in ("train", "val"):
            # HOG-MTL protocol: the last ``val_frames`` frames of each training video validate
            held = set()
            for video in TRAIN17:
                frames = sorted((frame_number(r["case_id"]), r["case_id"]) for r in records if r["video"] == video)
                held.update(cid for _, cid in frames[len(frames) - min(self.val_frames, len(frames)):])
            return [r for r in records if r["video"] in TRAIN17 and (r["case_id"] in held) == (split == "val")]
        return super()._select(records, split)

    def _load(self, rec):
        img = read_rgb(rec["image"])
        h, w = img.shape[:2]
        if self.crop and (h, w) != (1080, 1920):
            raise DatasetError(rec["image"], f"crop=True expects 1920x1080 frames, got {w}x{h}")
        mask = np.zeros((h, w), np.int64)
        inst = np.zeros((h, w), np.int64)
        for k, mpath in enumerate(rec["masks"], start=1):
            folder = Path(mpath).parent.name
            t = instrument_type(folder, Path(mpath).parent)
            m = read_label(mpath, "instrument mask")
            check_same_size((h, w), m.shape, rec["image"], mpath)
            if t != 7:
                check_values(m, (0, 10, 20, 30), mpath, "instrument mask")
            on = m > 0
            inst[on] = k
            if self.target == "type":
                mask[on] = t
            elif t != 7:
                if self.target == "binary":
                    mask[on] = 1
                else:
                    mask[on] = m[on] // 10
        if self.crop:
            img, mask, inst = img[CROP17], mask[CROP17], inst[CROP17]
        return self.sample(rec, np.ascontiguousarray(img), mask, instances=inst, video=rec["video"])


# ----------------------------------------------------------------------------- 2018

LABELS18 = (
    ("background-tissue", (0, 0, 0), 0), ("instrument-shaft", (0, 255, 0), 1),
    ("instrument-clasper", (0, 255, 255), 2), ("instrument-wrist", (125, 255, 12), 3),
    ("kidney-parenchyma", (255, 55, 0), 4), ("covered-kidney", (24, 55, 125), 5),
    ("thread", (187, 155, 25), 6), ("clamps", (0, 255, 125), 7),
    ("suturing-needle", (255, 255, 125), 8), ("suction-instrument", (123, 15, 175), 9),
    ("small-intestine", (124, 155, 5), 10), ("ultrasound-probe", (12, 255, 141), 11),
)
#: Scene of each sequence: our choice (see the module docstring), not a published grouping.
SCENES18 = {**{s: 0 for s in (1, 2, 4, 5, 7)}, **{s: 1 for s in (3, 10, 11, 12, 16)},
            **{s: 2 for s in (6, 9, 13, 14, 15)}}
VAL18 = (2, 5, 9, 15)


def read_labels_json(path) -> list[tuple[str, tuple[int, int, int], int]]:
    """``labels.json`` -> [(name, (r, g, b), classid)], checked (ids 0..K-1, unique colours)."""
    try:
        entries = json.loads(read_text(path, "labels.json"))
    except ValueError as exc:
        raise DatasetError(path, f"labels.json is not valid JSON ({exc})") from None
    out = []
    try:
        for e in entries:
            color = tuple(int(c) for c in e["color"])
            if len(color) != 3 or not all(0 <= c <= 255 for c in color):
                raise ValueError(f"bad colour {e['color']}")
            out.append((str(e["name"]), color, int(e["classid"])))
    except (KeyError, TypeError, ValueError) as exc:
        raise DatasetError(path, f"labels.json entries must be {{name, color: [r,g,b], classid}} ({exc})") from None
    ids = sorted(c for _, _, c in out)
    if ids != list(range(len(out))):
        raise DatasetError(path, f"labels.json class ids must be 0..{len(out) - 1}, got {ids}")
    if len({c for _, c, _ in out}) != len(out):
        raise DatasetError(path, "labels.json has duplicate colours")
    return sorted(out, key=lambda e: e[2])


def decode_colour_label(rgb: np.ndarray, table, path="<array>") -> np.ndarray:
    """Exact RGB match -> class ids; any pixel whose colour is not in ``table`` is an error."""
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[..., None], 3, axis=2)
    if rgb.ndim != 3 or rgb.shape[2] < 3 or rgb.dtype != np.uint8:
        raise DatasetError(path, f"colour label must be 8-bit RGB, got shape {rgb.shape} dtype {rgb.dtype}")
    code = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    keys = np.array([(r << 16) | (g << 8) | b for _, (r, g, b), _ in table], dtype=np.int64)
    ids = np.array([c for _, _, c in table], dtype=np.int64)
    order = np.argsort(keys)
    keys, ids = keys[order], ids[order]
    pos = np.clip(np.searchsorted(keys, code), 0, len(keys) - 1)
    hit = keys[pos] == code
    if not hit.all():
        bad, counts = np.unique(code[~hit], return_counts=True)
        shown = ", ".join(f"({v >> 16}, {(v >> 8) & 255}, {v & 255}) x{c}" for v, c in zip(bad[:6].tolist(), counts[:6].tolist()))
        raise DatasetError(path, f"colour(s) not in labels.json: {shown}")
    return ids[pos]


@register_dataset("endovis18", "endovis2018")
class EndoVis2018(SegmentationDataset):
    name = "endovis18"
    splits = ("train", "val", "all")
    scene_names = ("scene-1", "scene-2", "scene-3")
    split_by = "seq"

    def __init__(self, root, split="train", *, labels_json=None, val_sequences=VAL18, **kw):
        self.val_sequences = tuple(int(s) for s in val_sequences)
        root_p = Path(root).expanduser()
        if labels_json is None:
            cands = [root_p / "labels.json"] + sorted(root_p.glob("seq_*/labels.json"))
            labels_json = next((c for c in cands if c.is_file()), None)
        self.labels_json = labels_json
        self.table = list(LABELS18) if labels_json is None else read_labels_json(labels_json)
        self.class_names = tuple(n for n, _, _ in self.table)
        self.num_classes = len(self.table)
        super().__init__(root, split, **kw)

    def layout_hint(self):
        return "<root>/seq_N/{left_frames,labels}/frameNNN.png"

    def _index(self):
        records = []
        for sdir in list_folder(self.root, "EndoVis 2018 folder"):
            m = re.match(r"^seq_(\d+)$", sdir.name)
            if not m or not sdir.is_dir():
                continue
            frames = sdir / "left_frames"
            for f in (list_folder(frames) if frames.is_dir() else []):
                if f.name.startswith("frame") and f.name.endswith(".png"):
                    records.append(file_record(f"{sdir.name}/{f.stem}", {"image": (f, "frame"),
                                               "mask": (sdir / "labels" / f.name, "colour label")}, seq=int(m.group(1))))
        return records

    def assign_splits(self, records):
        return table_split({r["seq"] for r in records}, {"val": self.val_sequences})

    def _load(self, rec):
        img = read_rgb(rec["image"])
        lab = read_image(rec["mask"], "colour label", palette="rgb")
        check_same_size(img.shape[:2], lab.shape[:2], rec["image"], rec["mask"])
        mask = decode_colour_label(lab[..., :3] if lab.ndim == 3 else lab, self.table, rec["mask"])
        return self.sample(rec, img, mask, scene=SCENES18.get(rec["seq"], -1))
