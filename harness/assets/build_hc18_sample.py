"""Rebuild the embedded HC18 sample (``hc18_sample/``) from a copy of the HC18 training set.

    python -m mtseg_harness.assets.build_hc18_sample /path/to/hc18 [out_dir]

Every 800 x 540 image (others are skipped) is shrunk by 10/3 with an antialiased (Lanczos) resize to
240 x 162 and the middle 160 rows are kept (240 x 160, a multiple of 16 for UNets),
so pixels stay square: the new pixel size is the CSV pixel size x 10/3. The filled
head mask is shrunk by area averaging and thresholded at 1/2. Files keep the official
layout, so the ``hc18`` dataset adapter reads the sample like the full download; the
CSV's head circumference column is copied unchanged (measured on the full image).
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from mtseg_harness.data.hc18 import fill_outline

SCALE = 10 / 3          # 800 x 540 -> 240 x 162
SIZE = (240, 162)       # PIL (width, height)
ROWS = (1, 161)         # keep 160 rows


def _fill(ann: np.ndarray) -> np.ndarray:
    return fill_outline(ann > 127)


def build(src, out) -> int:
    src, out = Path(src), Path(out)
    (out / "training_set").mkdir(parents=True, exist_ok=True)
    with open(src / "training_set_pixel_size_and_HC.csv", newline="") as f:
        rows = list(csv.reader(f))
    header, table = rows[0], {r[0].strip(): r for r in rows[1:] if r}
    kept = []
    for img_path in sorted((src / "training_set").glob("*HC.png")):
        name = img_path.name
        if name not in table:
            continue
        img = Image.open(img_path).convert("L")
        if img.size != (800, 540):
            continue
        ann = np.asarray(Image.open(img_path.with_name(img_path.stem + "_Annotation.png")).convert("L"))
        mask = _fill(ann).astype(np.float32)
        small = np.asarray(img.resize(SIZE, Image.LANCZOS))[ROWS[0]:ROWS[1]]
        m = np.asarray(Image.fromarray(mask).resize(SIZE, Image.BOX))[ROWS[0]:ROWS[1]] >= 0.5
        Image.fromarray(small).save(out / "training_set" / name, optimize=True)
        Image.fromarray((m * 255).astype(np.uint8)).save(out / "training_set" / (img_path.stem + "_Annotation.png"), optimize=True)
        row = list(table[name])
        row[1] = f"{float(row[1]) * SCALE:.9g}"
        kept.append(row)
    with open(out / "training_set_pixel_size_and_HC.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(kept)
    return len(kept)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    dest = sys.argv[2] if len(sys.argv) > 2 else Path(__file__).resolve().parent / "hc18_sample"
    print(f"wrote {build(sys.argv[1], dest)} cases to {dest}")
