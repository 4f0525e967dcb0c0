"""Common base of the dataset adapters: file index (built once, cached), splits, samples, errors.

A sample is a dict:

=============  =====================================================================
``image``      float32 ``(C, H, W)`` or ``(C, D, H, W)``
``mask``       int64 ``(H, W)`` / ``(D, H, W)``: class ids ``0..K-1``, ``ignore_index`` (255) for ignored pixels
``presence``   float32 ``(K,)``: 1 where the class occurs in ``mask`` (ignored pixels do not count)
``scene``      int64 scalar: index into ``dataset.scene_names``; -1 where the scene is unknown
``instances``  int64 like ``mask``: 0 background, 1..N object instances (datasets that define them)
``spacing``    float32 ``(2,)`` / ``(3,)``: pixel/voxel size in mm, in the order of the spatial axes
``case_id``    str: the file stem / case name the sample came from
=============  =====================================================================

Keys that a dataset does not define are absent (``scene`` and ``instances``) or filled
with a documented default (``spacing`` = 1 mm per axis where the format has no spacing).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .io import DatasetError, MissingFileError

log = logging.getLogger("mtseg_harness.data")

IGNORE_INDEX = 255
INDEX_VERSION = 1

_MEMORY_INDEX: dict[tuple, list[dict]] = {}
_MEMORY_LOCK = threading.Lock()

_REGISTRY: dict[str, type] = {}


def register_dataset(*names: str):
    """Class decorator: make the adapter available to :func:`create_dataset` under ``names``."""

    def deco(cls):
        for name in names:
            _REGISTRY[name.lower()] = cls
        return cls

    return deco


def list_datasets() -> list[str]:
    return sorted(_REGISTRY)


def create_dataset(name: str, root, split: str = "train", **options) -> "SegmentationDataset":
    """Build the adapter registered as ``name`` on the unmodified download at ``root``.

    Example: ``create_dataset("cadis", "/data/CaDIS", split="val", task=2)``.
    """
    try:
        cls = _REGISTRY[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(list_datasets())}") from None
    return cls(root, split=split, **options)


# --------------------------------------------------------------------------- splits


def ratio_split(
    keys: Sequence[str],
    fractions: dict[str, float],
    seed: int = 0,
    strata: dict[str, Any] | None = None,
) -> dict[str, str]:
    """Deterministic split of ``keys`` by fractions: key -> split name.

    Keys are sorted, then permuted with ``numpy.random.default_rng(seed)``, separately
    within each stratum (e.g. tumour grade) so every split keeps the strata's
    proportions; split ``i`` takes ``round(cumulative fraction * n)`` keys. The result
    depends only on the set of keys, the fractions and the seed (not on listing order).
    """
    total = sum(fractions.values())
    if not np.isclose(total, 1.0):
        raise ValueError(f"split fractions must sum to 1, got {fractions} (sum {total})")
    groups: dict[Any, list[str]] = {}
    for k in sorted(keys):
        groups.setdefault(None if strata is None else strata[k], []).append(k)
    out: dict[str, str] = {}
    for gi, g in enumerate(sorted(groups, key=str)):
        members = groups[g]
        rng = np.random.default_rng([seed, gi])
        order = rng.permutation(len(members))
        bounds = np.round(np.cumsum(list(fractions.values())) * len(members)).astype(int)
        start = 0
        for name, stop in zip(fractions, bounds):
            for j in order[start:stop]:
                out[members[j]] = name
            start = stop
    return out


# --------------------------------------------------------------------------- base class


class SegmentationDataset(Dataset):
    """Base of every adapter. Subclasses define ``_index``, ``_select`` and ``_load``.

    Args:
        root: the dataset folder as downloaded.
        split: one of ``self.splits``.
        on_error: ``"raise"`` (default): a bad file stops with a :class:`DatasetError`
            naming it. ``"skip"``: the bad sample is counted in ``self.skipped`` (with
            file and reason), logged once, and ``__getitem__`` returns ``None``, which
            :func:`collate` drops and counts in ``batch["n_skipped"]``. Call
            :meth:`validate` to find bad samples up front and remove them from the index.
        cache_dir: optional folder for an on-disk copy of the file index, keyed by a
            hash of the root's listing (paths, sizes, mtimes) and the index options, so
            a changed download is re-indexed. The index is always cached in memory per
            (adapter, root, options) for the life of the process.
        transform: optional callable applied to each finished sample dict.
    """

    name = "base"
    splits: tuple[str, ...] = ("all",)
    num_classes: int = 0
    class_names: tuple[str, ...] = ()
    scene_names: tuple[str, ...] | None = None
    ignore_index = IGNORE_INDEX

    def __init__(
        self,
        root,
        split: str = "train",
        *,
        on_error: str = "raise",
        cache_dir=None,
        transform: Callable[[dict], dict] | None = None,
    ):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if split not in self.splits:
            raise ValueError(f"{self.name}: unknown split {split!r}; expected one of {self.splits}")
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise MissingFileError(self.root, f"{self.name} dataset root does not exist or is not a folder")
        self.split = split
        self.on_error = on_error
        self.transform = transform
        self.cache_dir = None if cache_dir is None else Path(cache_dir).expanduser()
        self.skipped: list[tuple[str, str]] = []  # (path, reason)
        self._skipped_paths: set[str] = set()
        records = self._cached_index()
        # Split over all records, bad ones included, so a broken file never moves others between splits.
        chosen = self._select(records, split)
        bad = [r for r in chosen if "error" in r]
        selected = [r for r in chosen if "error" not in r]
        for r in bad:
            path, reason = r["error"]
            if on_error == "raise":
                more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
                raise DatasetError(path, reason + more)
            self._skip(path, reason)
        if not selected:
            raise DatasetError(
                self.root,
                f"no {self.name} samples for split {split!r} ({len(records)} found in total, {len(bad)} bad); "
                f"expected the official layout: {self.layout_hint()}",
            )
        self.records = selected

    # ------------------------------------------------------------------ to override

    def layout_hint(self) -> str:
        return "see the adapter's docstring"

    def index_options(self) -> tuple:
        """Options that change what the index holds (part of the cache key)."""
        return ()

    def _index(self) -> list[dict]:
        """JSON-serialisable records, one per sample; a record with ``error=(path, reason)`` marks a bad sample."""
        raise NotImplementedError

    def _select(self, records: list[dict], split: str) -> list[dict]:
        return records

    def _load(self, record: dict) -> dict:
        raise NotImplementedError

    # ------------------------------------------------------------------ index cache

    def _listing_signature(self) -> str:
        h = hashlib.sha1()
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames.sort()
            for f in sorted(filenames):
                p = os.path.join(dirpath, f)
                try:
                    st = os.stat(p)
                except OSError:
                    continue
                h.update(f"{os.path.relpath(p, self.root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()

    def _cached_index(self) -> list[dict]:
        key = (type(self).__qualname__, str(self.root.resolve()), repr(self.index_options()), INDEX_VERSION)
        with _MEMORY_LOCK:
            hit = _MEMORY_INDEX.get(key)
        if hit is not None:
            return hit
        disk = None
        if self.cache_dir is not None:
            sig = hashlib.sha1((self._listing_signature() + repr(key)).encode()).hexdigest()[:20]
            disk = self.cache_dir / f"{self.name}-index-{sig}.json"
            if disk.is_file():
                try:
                    records = json.loads(disk.read_text())
                    with _MEMORY_LOCK:
                        _MEMORY_INDEX[key] = records
                    return records
                except (OSError, ValueError):
                    pass  # a damaged cache is rebuilt
        records = self._index()
        with _MEMORY_LOCK:
            _MEMORY_INDEX[key] = records
        if disk is not None:
            disk.parent.mkdir(parents=True, exist_ok=True)
            tmp = disk.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(records))
            os.replace(tmp, disk)
        return records

    @staticmethod
    def clear_memory_cache() -> None:
        with _MEMORY_LOCK:
            _MEMORY_INDEX.clear()

    # ------------------------------------------------------------------ samples

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict | None:
        record = self.records[index]
        try:
            sample = self._load(record)
            sample = self._finish(sample, record)
        except DatasetError as exc:
            if self.on_error == "raise":
                raise
            self._skip(exc.path, exc.reason)
            return None
        if self.transform is not None:
            sample = self.transform(sample)
        return sample

    def _finish(self, sample: dict, record: dict) -> dict:
        mask = sample["mask"]
        flat = mask.reshape(-1).numpy()
        if flat.size and flat.min() < 0:
            raise DatasetError(record.get("mask", record.get("case_id", "?")), f"negative label {int(flat.min())}")
        counts = np.bincount(flat, minlength=max(self.num_classes, self.ignore_index + 1)) if flat.size else np.zeros(self.num_classes, np.int64)
        outside = np.nonzero(counts[self.num_classes:])[0] + self.num_classes
        outside = outside[outside != self.ignore_index]
        if outside.size:
            # A safety net behind the adapters' own checks: never hand out a wrong label.
            raise DatasetError(record.get("mask", record.get("case_id", "?")),
                               f"labels {outside[:8].tolist()} outside 0..{self.num_classes - 1} (ignore {self.ignore_index})")
        if "presence" not in sample:
            sample["presence"] = torch.from_numpy((counts[: self.num_classes] > 0).astype(np.float32))
        sample.setdefault("case_id", record.get("case_id", ""))
        if "spacing" not in sample:
            sample["spacing"] = torch.ones(mask.dim(), dtype=torch.float32)
        return sample

    def _skip(self, path, reason: str) -> None:
        path = str(path)
        if path in self._skipped_paths:
            return
        self._skipped_paths.add(path)
        self.skipped.append((path, reason))
        log.warning("%s: skipping %s: %s", self.name, path, reason)

    def validate(self, drop: bool | None = None) -> list[tuple[str, str]]:
        """Load every sample once; return ``[(path, reason)]`` of the bad ones.

        With ``on_error="raise"`` the first bad sample raises. With ``"skip"`` (or
        ``drop=True``) bad samples are removed from this dataset's index, so later
        epochs see only good ones.
        """
        drop = self.on_error == "skip" if drop is None else drop
        bad, keep = [], []
        for rec in self.records:
            try:
                self._finish(self._load(rec), rec)
                keep.append(rec)
            except DatasetError as exc:
                if self.on_error == "raise" and not drop:
                    raise
                bad.append((exc.path, exc.reason))
                self._skip(exc.path, exc.reason)
        if drop:
            self.records = keep
        return bad

    def skip_report(self) -> str:
        if not self.skipped:
            return f"{self.name} ({self.split}): no samples skipped"
        lines = [f"{self.name} ({self.split}): {len(self.skipped)} sample(s) skipped"]
        lines += [f"  {p}: {r}" for p, r in self.skipped]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, n={len(self)})"
