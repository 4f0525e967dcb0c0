"""``mtseg labels``: precompute auxiliary labels to disk, for users who prefer offline labels.

* ``hog``: ``<out>/hog.pt``: ``{"case_id": [...], "hog": (N, dim) float32, "dim": dim}``,
  ``mtseg_kernels.hog_pseudo_label`` of the *unaugmented* images (HOG-MTL computes them
  in the step after augmentation; offline targets only match when augmentation is off).
* ``presence``: ``<out>/presence.csv``, one row per case, one 0/1 column per class
  (``mtseg_kernels.presence_from_labels``).
* ``weak``: ``<out>/weak/<case_id>.png``, the generated weak class maps
  (:func:`mtseg_harness.data.make_weak_labels` with the method's options), readable
  back with ``WeakLabels(dataset, weak_dir=<out>/weak)``. The PNGs are palette images:
  each pixel's value is its class id (0, 1, ..., 255 = ignored), exactly as read by
  ``numpy.array(PIL.Image.open(path))``, and the palette shows the classes in colour
  (class 0 black, the others bright, ignored white), so a 0/1 map is not a black image
  in a viewer. (Converting to RGB, e.g. ``Image.open(path).convert("RGB")``, gives the
  colours instead of the ids.)

A progress bar (stderr) counts the samples.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

import mtseg_kernels

from ..data import make_weak_labels
from ..evaluation.report import label_palette
from ..training.logs import progress_bar
from ..models import DEFAULT_HOG_DIM
from .assemble import build_dataset


def precompute_labels(cfg: dict, out, kinds=("hog", "presence", "weak"), split_key: str = "train") -> dict:
    """Write the ``kinds`` of labels of ``cfg``'s split to ``out``; returns ``{kind: path}``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ds = build_dataset(cfg, split_key)
    k, ignore = ds.num_classes, ds.ignore_index
    dim = int(cfg["method"].get("dim", DEFAULT_HOG_DIM))
    wopts = {key: cfg["method"][key] for key in ("shrink_ratio", "jitter", "smoothness") if key in cfg["method"]}
    ids, hogs, pres = [], [], []
    written = {}
    if "weak" in kinds:
        (out / "weak").mkdir(exist_ok=True)
    palette = label_palette(k, ignore)
    bar = progress_bar(total=len(ds), desc=f"labels ({', '.join(kinds)})")
    for i in range(len(ds)):
        bar.update(1)
        s = ds[i]
        if s is None:
            continue
        cid = str(s["case_id"])
        ids.append(cid)
        if "hog" in kinds and s["image"].dim() == 3:
            hogs.append(mtseg_kernels.hog_pseudo_label(s["image"][None].float(), dim=dim)[0])
        if "presence" in kinds:
            pres.append(mtseg_kernels.presence_from_labels(s["mask"][None], k, ignore)[0].numpy())
        if "weak" in kinds:
            weak, _ = make_weak_labels(s["mask"], s.get("instances"), seed=int(cfg["seed"]) * 1_000_003 + i,
                                       ignore_index=ignore, **wopts)
            arr = weak.numpy()
            if arr.ndim != 2 or arr.max() > 255:
                raise ValueError(f"labels: weak labels of {cid} are not a 2D 8-bit map; use 2D datasets")
            png = Image.frombytes("P", (arr.shape[1], arr.shape[0]), np.ascontiguousarray(arr, dtype=np.uint8).tobytes())
            png.putpalette(palette)
            png.save(out / "weak" / (cid.replace("/", "__") + ".png"))
    bar.close()
    if "hog" in kinds:
        if not hogs:
            raise ValueError("labels: HOG targets need 2D images")
        torch.save({"case_id": ids, "hog": torch.stack(hogs), "dim": dim}, out / "hog.pt")
        written["hog"] = out / "hog.pt"
    if "presence" in kinds:
        names = list(ds.class_names) or [str(c) for c in range(k)]
        df = pd.DataFrame(np.stack(pres).astype(int), columns=names)
        df.insert(0, "case_id", ids)
        df.to_csv(out / "presence.csv", index=False)
        written["presence"] = out / "presence.csv"
    if "weak" in kinds:
        written["weak"] = out / "weak"
    return written
