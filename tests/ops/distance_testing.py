"""Real masks for the distance tests and benchmarks: filled HC18 head outlines, CaDIS label maps."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi


def hc18_masks(root: Path, count: int = 4) -> tuple[np.ndarray, list[float]]:
    """The first `count` HC18 head masks (count, 540, 800) bool, filled from the ellipse
    outline with ``binary_fill_holes``, and their pixel sizes in mm."""
    from PIL import Image

    folder = root / "hc18" / "training_set"
    files = sorted(folder.glob("*_HC_Annotation.png"))
    if len(files) < count:
        pytest.skip(f"expected HC18 annotations in {folder}, found {len(files)}")
    sizes = {}
    with open(root / "hc18" / "training_set_pixel_size_and_HC.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            sizes[row["filename"].strip()] = float(row["pixel size(mm)"])
    masks, spacing = [], []
    for f in files[:count]:
        outline = np.asarray(Image.open(f).convert("L")) > 127
        masks.append(ndi.binary_fill_holes(outline))
        spacing.append(sizes.get(f.name.replace("_Annotation", ""), 1.0))
    return np.stack(masks), spacing


def cadis_label_maps(root: Path, count: int = 4) -> np.ndarray:
    """The first `count` CaDIS label maps (count, 540, 960) uint8 (class ids 0-35, 255)."""
    from PIL import Image

    files = sorted((root / "cadis" / "relabelled").glob("*.png"))
    if len(files) < count:
        pytest.skip(f"expected CaDIS label maps in {root / 'cadis' / 'relabelled'}, found {len(files)}")
    return np.stack([np.asarray(Image.open(f))[..., 0] for f in files[:count]])
