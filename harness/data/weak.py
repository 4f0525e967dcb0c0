"""Weak labels for the recursive-approximation method (Ke et al., IEEE TIP 2021).

The paper's weak annotations are rough regions drawn *inside* each object, well away
from its boundary. :func:`make_weak_labels` imitates them from full labels, per instance:

1. ``d`` = Euclidean distance of each instance pixel to the nearest pixel outside the
   instance (``scipy.ndimage.distance_transform_edt``; the image border counts as
   outside). Boundary pixels have ``d = 1``.
2. Eligible pixels: ``d >= 2`` (the weak region never contains a boundary pixel, i.e. is
   at distance >= 1 px from the true boundary).
3. Score = ``d / max(d)`` + ``jitter`` x smooth random field (Gaussian-filtered noise,
   ``smoothness`` = its sigma as a fraction of the instance size), which gives the
   region an irregular, hand-drawn outline.
4. The top-scoring eligible pixels, ``shrink_ratio`` x instance area of them (ties go
   to the pixels nearest the centroid), form the region; its largest connected component is kept. With ``jitter = 0`` the region is a
   level set of the distance (a shrunken copy of the instance).

``shrink_ratio`` is the target area of the weak region as a fraction of the instance's
area. An instance with no eligible pixel (thinner than 3 px) gets no weak region; every
other instance gets a non-empty one. Results are reproducible: the random field of the
instance with id ``i`` comes from ``numpy.random.default_rng([seed, i])``.

:class:`WeakLabels` adds ``weak`` (class map, 0 where nothing is annotated) and
``weak_instances`` to the samples of any dataset; :func:`read_weak_labels` /
``WeakLabels(weak_dir=...)`` read user-provided weak labels from files instead.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from .io import (DatasetError, as_integer_labels, check_same_size, load_nifti, nifti_data, read_label, require_folder,
                 volume_to_dhw)
from .wrappers import DatasetWrapper


def instances_from_mask(mask: np.ndarray, ignore_index: int = 255, background: int = 0) -> tuple[np.ndarray, dict[int, int]]:
    """Connected components of each foreground class -> (instance map, {instance id: class})."""
    inst = np.zeros(mask.shape, np.int64)
    classes = {}
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    nxt = 1
    for c in np.unique(mask):
        if c in (background, ignore_index):
            continue
        lab, n = ndimage.label(mask == c, structure=structure)
        on = lab > 0
        inst[on] = lab[on] + (nxt - 1)
        for i in range(nxt, nxt + n):
            classes[i] = int(c)
        nxt += n
    return inst, classes


def _smooth_noise(shape, sigma, rng) -> np.ndarray:
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=sigma, mode="reflect")
    m = np.abs(noise).max()
    return noise / m if m > 0 else noise


def weak_region(obj: np.ndarray, shrink_ratio: float = 0.3, jitter: float = 0.3, smoothness: float = 0.15,
                rng: np.random.Generator | None = None) -> np.ndarray:
    """Weak region of one binary object (see the module docstring). Returns a bool array."""
    obj = np.asarray(obj, bool)
    if not 0 < shrink_ratio <= 1:
        raise ValueError(f"shrink_ratio must be in (0, 1], got {shrink_ratio}")
    if jitter < 0:
        raise ValueError(f"jitter must be >= 0, got {jitter}")
    out = np.zeros(obj.shape, bool)
    area = int(obj.sum())
    if area == 0:
        return out
    # Bounding box with a one-pixel margin; outside the image counts as outside the object.
    nz = np.nonzero(obj)
    box = tuple(slice(max(int(a.min()) - 1, 0), int(a.max()) + 2) for a in nz)
    sub = np.pad(obj[box], 1, constant_values=False)
    d = ndimage.distance_transform_edt(sub)
    eligible = d >= 2
    n_el = int(eligible.sum())
    if n_el == 0:
        return out
    score = d / d.max()
    if jitter > 0:
        rng = np.random.default_rng() if rng is None else rng
        size = max(sub.shape)
        score = score + jitter * _smooth_noise(sub.shape, max(smoothness * size, 0.5), rng)
    k = min(max(int(round(shrink_ratio * area)), 1), n_el)
    # Top-k eligible pixels by score; ties (plateaus of the distance in boxy shapes) go to
    # the pixels nearest the object's centroid, so the region has exactly k pixels.
    idx = np.nonzero(eligible)
    centroid = [a.mean() for a in np.nonzero(sub)]
    r2 = sum((a - c) ** 2 for a, c in zip(idx, centroid))
    order = np.lexsort((r2, -score[idx]))[:k]
    region = np.zeros(sub.shape, bool)
    region[tuple(a[order] for a in idx)] = True
    lab, n = ndimage.label(region, structure=ndimage.generate_binary_structure(obj.ndim, 1))
    if n > 1:
        sizes = np.bincount(lab.ravel())[1:]
        region = lab == (int(np.argmax(sizes)) + 1)
    inner = region[tuple(slice(1, -1) for _ in range(obj.ndim))]
    out[box] = inner
    return out


def make_weak_labels(mask, instances=None, *, shrink_ratio: float = 0.3, jitter: float = 0.3,
                     smoothness: float = 0.15, seed: int = 0, ignore_index: int = 255, background: int = 0):
    """Weak labels from full labels: ``(weak class map, weak instance map)``.

    Args:
        mask: ``(H, W)`` or ``(D, H, W)`` class map (numpy or tensor).
        instances: optional instance map of the same shape (0 = none); without it the
            instances are the 4-/6-connected components of each foreground class.
        shrink_ratio: target area of each weak region / area of its instance.
        jitter: amplitude of the random field that roughens the region (0 = none).
        smoothness: sigma of that field as a fraction of the instance's bounding box.
        seed: the random field of instance ``i`` uses ``default_rng([seed, i])``.
    Returns the weak class map (``background`` where not annotated; pixels ignored in
    ``mask`` stay ``ignore_index``) and the weak instance map (ids of ``instances``).
    """
    is_tensor = isinstance(mask, torch.Tensor)
    m = mask.cpu().numpy() if is_tensor else np.asarray(mask)
    if instances is None:
        inst, classes = instances_from_mask(m, ignore_index, background)
    else:
        inst = instances.cpu().numpy() if isinstance(instances, torch.Tensor) else np.asarray(instances)
        if inst.shape != m.shape:
            raise ValueError(f"instances shape {inst.shape} != mask shape {m.shape}")
        classes = {}
        for i in np.unique(inst):
            if i == 0:
                continue
            vals = m[inst == i]
            vals = vals[(vals != ignore_index) & (vals != background)]
            if vals.size:
                classes[int(i)] = int(np.bincount(vals.astype(np.int64)).argmax())
    weak = np.full(m.shape, background, np.int64)
    weak[m == ignore_index] = ignore_index
    weak_inst = np.zeros(m.shape, np.int64)
    for i, c in sorted(classes.items()):
        rng = np.random.default_rng([int(seed), int(i)])
        region = weak_region(inst == i, shrink_ratio, jitter, smoothness, rng)
        weak[region] = c
        weak_inst[region] = i
    if is_tensor:
        return torch.from_numpy(weak), torch.from_numpy(weak_inst)
    return weak, weak_inst


def read_weak_labels(path, shape=None, num_classes: int | None = None, ignore_index: int = 255) -> torch.Tensor:
    """A user-provided weak label file (PNG/BMP class map or NIfTI) -> int64 tensor.

    Checked against ``shape`` (the sample's mask shape) and ``num_classes``
    (values 0..K-1 or ``ignore_index``). NIfTI volumes are returned as ``(D, H, W)``.
    """
    path = Path(path)
    name = path.name.lower()
    if name.endswith(".nii") or name.endswith(".nii.gz"):
        img = load_nifti(path, "weak label volume")
        arr = as_integer_labels(nifti_data(img, path, what="weak label volume"), path, "weak label volume")
        arr = volume_to_dhw(arr) if arr.ndim == 3 else np.ascontiguousarray(arr.T)
    else:
        arr = read_label(path, "weak label map").astype(np.int64)
    if shape is not None:
        check_same_size(tuple(shape), arr.shape, "<its sample's mask>", path)
    if num_classes is not None:
        bad = (arr >= num_classes) & (arr != ignore_index)
        if bad.any():
            raise DatasetError(path, f"weak label values {sorted(set(arr[bad].tolist()))[:8]} outside 0..{num_classes - 1} (or {ignore_index})")
    return torch.from_numpy(arr)


def strong_indices(n: int, strong_fraction: float = 0.0, strong_count: int | None = None, seed: int = 0) -> set[int]:
    """The training images that keep their full mask: a deterministic draw (by ``seed``) of
    ``strong_count`` images, or, without a count, ``round(strong_fraction * n)`` of them
    (at least one when the fraction is positive).

    The draw is a prefix of one permutation of ``range(n)``, so the SL-only and pseudo-label
    baselines train on exactly the images the recursive method holds strong. A count above
    ``n`` (a small or partial copy of the data) makes every image strong, with a warning.
    """
    n = int(n)
    if strong_count is not None:
        k = int(strong_count)
        if k < 0:
            raise ValueError(f"strong_count must be >= 0, got {k}")
        if k > n:
            logging.getLogger(__name__).warning(
                "strong_count %d exceeds the %d training images: every image keeps its full mask", k, n)
            k = n
    else:
        if not 0 <= strong_fraction <= 1:
            raise ValueError(f"strong_fraction must lie in [0, 1], got {strong_fraction}")
        k = int(round(strong_fraction * n))
        if strong_fraction > 0 and n > 0:
            k = max(k, 1)  # a positive fraction of a small set still keeps one strong image
    order = np.random.default_rng([int(seed), 7]).permutation(n)
    return set(order[:k].tolist())


class WeakLabels(DatasetWrapper):
    """Wrap a dataset: add ``weak`` and ``weak_instances`` to every sample.

    Generated (default): :func:`make_weak_labels` with ``seed + index`` as the seed, so
    every epoch and every worker sees the same weak label for a sample.
    From files: ``weak_dir=<folder>`` with ``<case_id><suffix>`` files (``/`` in
    case ids becomes ``__``); a missing or bad file is an error naming it.
    ``strong_fraction``: this deterministic fraction of samples (by ``seed``) keeps its
    full mask as the weak label too, and is flagged ``sample["strong"] = True``: the
    method's "strong labels for a small fraction"; ``strong_count`` (when given) is the
    number of such images instead (:func:`strong_indices`).
    """

    def __init__(self, dataset, *, shrink_ratio=0.3, jitter=0.3, smoothness=0.15, seed=0,
                 weak_dir=None, suffix=".png", strong_fraction: float = 0.0, strong_count: int | None = None):
        super().__init__(dataset)
        self.kw = dict(shrink_ratio=shrink_ratio, jitter=jitter, smoothness=smoothness)
        self.seed = int(seed)
        self.weak_dir = None if weak_dir is None else require_folder(Path(weak_dir).expanduser(), "weak label folder")
        self.suffix = suffix
        self.strong = strong_indices(len(dataset), strong_fraction, strong_count, self.seed)

    def __getitem__(self, index):
        sample = self.dataset[index]
        if sample is None:
            return None
        ignore = self.dataset.ignore_index
        if index in self.strong:
            sample["weak"] = sample["mask"].clone()
            sample["weak_instances"] = sample.get("instances", torch.zeros_like(sample["mask"])).clone()
            sample["strong"] = True
            return sample
        sample["strong"] = False
        if self.weak_dir is not None:
            cid = str(sample["case_id"]).replace("/", "__")
            path = self.weak_dir / f"{cid}{self.suffix}"
            sample["weak"] = read_weak_labels(path, sample["mask"].shape, self.dataset.num_classes, ignore)
            sample["weak_instances"] = torch.from_numpy(instances_from_mask(sample["weak"].numpy(), ignore)[0])
            return sample
        weak, weak_inst = make_weak_labels(sample["mask"], sample.get("instances"), seed=self.seed * 1_000_003 + index,
                                           ignore_index=ignore, **self.kw)
        sample["weak"], sample["weak_instances"] = weak, weak_inst
        return sample
