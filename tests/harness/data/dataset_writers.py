"""Writers of tiny dataset copies in the exact official layouts (names, extensions, encodings).

Each writer returns what it wrote (raw arrays) so tests can check the adapters read it
back exactly. Image content is random but seeded; label maps use the official values.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image


def rng(seed=0):
    return np.random.default_rng(seed)


def write_png(path, arr, fmt=None):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr)).save(path, format=fmt)
    return path


def truncate(path, fraction=0.5):
    path = Path(path)
    data = path.read_bytes()
    path.write_bytes(data[: max(int(len(data) * fraction), 1)])


def random_labels(shape, values, seed):
    """Blocky label map (4x4 blocks) drawn from ``values``: every value appears for big enough maps."""
    r = rng(seed)
    h, w = shape
    small = r.choice(np.asarray(values), size=((h + 3) // 4, (w + 3) // 4))
    flat = small.reshape(-1)
    flat[: len(values)] = values[: flat.size]  # make sure each value occurs
    return np.kron(small, np.ones((4, 4), small.dtype))[:h, :w]


# ----------------------------------------------------------------------------- CaDIS


def write_cadis(root, frames, size=(24, 32)):
    """frames: {video: [frame numbers]}; labels use every raw class 0..35 and 255."""
    root = Path(root)
    out = {}
    values = list(range(36)) + [255]
    for v, nums in frames.items():
        for k, n in enumerate(nums):
            name = f"Video{v}_frame{n:06d}.png"
            img = rng(100 * v + k).integers(0, 256, size + (3,), dtype=np.uint8)
            lab = random_labels(size, np.array(values, np.uint8), 100 * v + k)
            write_png(root / f"Video{v:02d}" / "Images" / name, img)
            write_png(root / f"Video{v:02d}" / "Labels" / name, lab)
            out[f"Video{v}_frame{n:06d}"] = (img, lab)
    return out


# ----------------------------------------------------------------------------- EndoVis 2017


def write_endovis17(root, videos, frames=(0, 1), size=(1080, 1920), instruments=None):
    """instruments: folder names of ground_truth/ (default: two instruments and Other)."""
    root = Path(root)
    instruments = instruments or ["Left_Prograsp_Forceps_labels", "Maryland_Bipolar_Forceps_labels", "Other_labels"]
    out = {}
    h, w = size
    for v in videos:
        vdir = root / f"instrument_dataset_{v}"
        for f in frames:
            name = f"frame{f:03d}.png"
            img = np.zeros((h, w, 3), np.uint8)
            img[..., 0] = (np.arange(w) % 256)[None, :]
            img[..., 1] = (np.arange(h) % 256)[:, None]
            img[..., 2] = (v * 10 + f) % 256
            write_png(vdir / "left_frames" / name, img)
            masks = {}
            for i, inst in enumerate(instruments):
                m = np.zeros((h, w), np.uint8)
                r0 = 30 + 60 * i
                if "Other" in inst:
                    m[r0:r0 + 40, 330:400] = 40
                else:
                    m[r0:r0 + 40, 330:360] = 10
                    m[r0:r0 + 40, 360:380] = 20
                    m[r0:r0 + 40, 380:400] = 30
                write_png(vdir / "ground_truth" / inst / name, m)
                masks[inst] = m
            out[(v, f)] = (img, masks)
    return out


# ----------------------------------------------------------------------------- EndoVis 2018

LABELS18_JSON = [
    {"name": "background-tissue", "color": [0, 0, 0], "classid": 0},
    {"name": "instrument-shaft", "color": [0, 255, 0], "classid": 1},
    {"name": "instrument-clasper", "color": [0, 255, 255], "classid": 2},
    {"name": "instrument-wrist", "color": [125, 255, 12], "classid": 3},
    {"name": "kidney-parenchyma", "color": [255, 55, 0], "classid": 4},
    {"name": "covered-kidney", "color": [24, 55, 125], "classid": 5},
    {"name": "thread", "color": [187, 155, 25], "classid": 6},
    {"name": "clamps", "color": [0, 255, 125], "classid": 7},
    {"name": "suturing-needle", "color": [255, 255, 125], "classid": 8},
    {"name": "suction-instrument", "color": [123, 15, 175], "classid": 9},
    {"name": "small-intestine", "color": [124, 155, 5], "classid": 10},
    {"name": "ultrasound-probe", "color": [12, 255, 141], "classid": 11},
]


def write_endovis18(root, seqs, frames=(0, 1), size=(16, 20), table=LABELS18_JSON):
    root = Path(root)
    colours = np.array([e["color"] for e in table], np.uint8)
    out = {}
    for s in seqs:
        for f in frames:
            name = f"frame{f:03d}.png"
            img = rng(10 * s + f).integers(0, 256, size + (3,), dtype=np.uint8)
            ids = random_labels(size, np.arange(len(table)), 10 * s + f)
            write_png(root / f"seq_{s}" / "left_frames" / name, img)
            write_png(root / f"seq_{s}" / "labels" / name, colours[ids])
            out[(s, f)] = (img, ids)
    return out


# ----------------------------------------------------------------------------- NIfTI


def write_nifti(path, arr, spacing=(1.0, 1.0, 1.0), dtype=None):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.asarray(arr if dtype is None else np.asarray(arr).astype(dtype))
    affine = np.diag(list(spacing)[: arr.ndim] + [1.0] * (4 - min(arr.ndim, 3)))
    img = nib.Nifti1Image(arr, affine)
    img.header.set_zooms(tuple(spacing)[: arr.ndim])
    nib.save(img, str(path))
    return path


def write_brats(root, cases, shape=(20, 16, 8), spacing=(1.0, 1.0, 1.0), enhancing=4):
    """cases: {"HGG": [ids], "LGG": [ids]}; returns {id: (modalities dict, seg)} in file order (X, Y, Z)."""
    root = Path(root)
    out = {}
    for grade, ids in cases.items():
        for j, cid in enumerate(ids):
            r = rng(sum(map(ord, cid)))
            brain = np.zeros(shape, bool)
            brain[2:-2, 2:-2, 1:-1] = True
            mods = {}
            for m in ("t1", "t1ce", "t2", "flair"):
                vol = np.where(brain, r.normal(100, 20, shape), 0).astype(np.float32)
                write_nifti(root / grade / cid / f"{cid}_{m}.nii.gz", vol, spacing)
                mods[m] = vol
            seg = np.zeros(shape, np.uint8)
            seg[5:12, 5:10, 2:6] = 2
            seg[6:10, 6:9, 3:5] = 1
            seg[7:9, 7:8, 3:5] = enhancing
            write_nifti(root / grade / cid / f"{cid}_seg.nii.gz", seg, spacing)
            out[cid] = (mods, seg)
    return out


def write_lits(root, n_volumes=3, shape=(16, 12, 5), spacing=(0.7, 0.8, 2.5), gz=False):
    root = Path(root)
    out = {}
    ext = ".nii.gz" if gz else ".nii"
    for n in range(n_volumes):
        batch = "Training Batch 1" if n < 2 else "Training Batch 2"
        r = rng(n)
        ct = r.integers(-1000, 1000, shape).astype(np.int16)
        seg = np.zeros(shape, np.uint8)
        seg[3:12, 2:9, 1:4] = 1
        seg[5:8, 4:6, 2] = 2
        write_nifti(root / batch / f"volume-{n}{ext}", ct, spacing)
        write_nifti(root / batch / f"segmentation-{n}{ext}", seg, spacing)
        out[n] = (ct, seg)
    return out


# ----------------------------------------------------------------------------- REFUGE


def write_refuge(root, size=(20, 24)):
    """Training400 (one glaucoma, one normal) and Validation400 (two) with 0/128/255 BMP masks."""
    root = Path(root)
    out = {}
    items = [("Training400/Glaucoma/g0001.jpg", "Annotation-Training400/Disc_Cup_Masks/Glaucoma/g0001.bmp"),
             ("Training400/Non-Glaucoma/n0001.jpg", "Annotation-Training400/Disc_Cup_Masks/Non-Glaucoma/n0001.bmp"),
             ("REFUGE-Validation400/V0001.jpg", "REFUGE-Validation400-GT/Disc_Cup_Masks/V0001.bmp"),
             ("REFUGE-Validation400/V0002.jpg", "REFUGE-Validation400-GT/Disc_Cup_Masks/V0002.bmp")]
    h, w = size
    yy, xx = np.mgrid[:h, :w]
    for k, (img_rel, mask_rel) in enumerate(items):
        img = np.full((h, w, 3), 60 + 40 * k, np.uint8)
        r2 = (yy - h / 2) ** 2 + (xx - w / 2) ** 2
        mask = np.full((h, w), 255, np.uint8)
        mask[r2 < 49] = 128
        mask[r2 < 9] = 0
        write_png(root / img_rel, img, fmt="JPEG")
        write_png(root / mask_rel, mask, fmt="BMP")
        out[Path(img_rel).stem] = (img, mask)
    return out


# ----------------------------------------------------------------------------- GlaS

GRADE_CSV = """name, patient ID, grade (GlaS), grade (Sirinukunwattana et al. 2015)
testA_1, 4, malignant, adenomatous
testB_1, 7, benign, healthy
train_1, 2, malignant, moderately differentiated
train_2, 3, benign, healthy
"""


def write_glas(root, size=(24, 30)):
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "Grade.csv").write_text(GRADE_CSV)
    out = {}
    for k, stem in enumerate(["train_1", "train_2", "testA_1", "testB_1"]):
        img = rng(k).integers(0, 256, size + (3,), dtype=np.uint8)
        inst = np.zeros(size, np.uint8)
        inst[2:10, 3:12] = 1
        inst[12:20, 5:25] = 2
        inst[2:8, 16:28] = 3 + k
        write_png(root / f"{stem}.bmp", img, fmt="BMP")
        write_png(root / f"{stem}_anno.bmp", inst, fmt="BMP")
        out[stem] = (img, inst)
    return out


# ----------------------------------------------------------------------------- HC18


def write_hc18(root, n=3, size=(54, 80), filled=False):
    """Ellipse outlines (official) or filled ellipses, and the pixel-size CSV."""
    import cv2

    root = Path(root)
    rows = ["filename,pixel size(mm),head circumference (mm)"]
    out = {}
    names = [f"{i:03d}_HC.png" for i in range(n - 1)] + [f"{n - 1:03d}_2HC.png"]
    for i, name in enumerate(names):
        img = rng(i).integers(0, 256, size, dtype=np.uint8)
        ann = np.zeros(size + (3,), np.uint8)
        cv2.ellipse(ann, (40, 27), (20 + i, 12), 15 * i, 0, 360, (255, 255, 255), -1 if filled else 1)
        write_png(root / "training_set" / name, img)
        write_png(root / "training_set" / name.replace(".png", "_Annotation.png"), ann)
        rows.append(f"{name},{0.1 + 0.01 * i},{50 + i}")
        out[name[:-4]] = (img, ann)
    (root / "training_set_pixel_size_and_HC.csv").write_text("\n".join(rows) + "\n")
    return out
