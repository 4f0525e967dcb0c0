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

The scaffold every adapter shares:

* **folder walk** -- :func:`~.io.list_folder` / :func:`~.io.walk_files` list the
  entries (whatever their type, so a folder or FIFO in place of a file is reported when
  read, not skipped), :func:`file_record` pairs the files of one sample and marks the
  record bad, with the reason, when one of them cannot be read;
* **split selection** -- an adapter names the record key its splits assign
  (``split_by``: a case, a video, a scan) and how (:meth:`SegmentationDataset.assign_splits`,
  with :func:`ratio_split` or :func:`table_split`); ``all`` and unions of splits are
  handled here;
* **read-check-build** -- ``_load`` reads with the checked readers of :mod:`.io`, checks
  sizes and encodings, and builds the dict with :meth:`SegmentationDataset.sample`;
  :meth:`SegmentationDataset.__getitem__` then checks the labels and fills ``presence``.

A dataset also declares the evaluation extras that make sense for it
(``extra_metrics``: :class:`ObjectMetrics`, :class:`RegionMetrics`,
:class:`GroupReport`); :mod:`mtseg_harness.evaluation` computes them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .io import DatasetError, check_spacing, file_error, image_to_tensor, require_folder

log = logging.getLogger("mtseg_harness.data")

IGNORE_INDEX = 255
INDEX_VERSION = 2

_MEMORY_INDEX: dict[tuple, list[dict]] = {}
_MEMORY_LOCK = threading.Lock()

_REGISTRY: dict[str, type] = {}

#: ``root: builtin:<name>`` names a dataset shipped with the package (``assets/<name>``).
BUILTIN_PREFIX = "builtin:"
ASSETS = Path(__file__).resolve().parent.parent / "assets"


def resolve_root(root) -> Path:
    """A dataset root: ``builtin:<name>`` (e.g. ``builtin:hc18_sample``) or a path (``~`` expanded)."""
    root = str(root)
    if root.startswith(BUILTIN_PREFIX):
        return ASSETS / root[len(BUILTIN_PREFIX):]
    return Path(root).expanduser()


def register_dataset(*names: str):
    """Class decorator: make the adapter available to :func:`create_dataset` under ``names``."""

    def deco(cls):
        for name in names:
            _REGISTRY[name.lower()] = cls
        return cls

    return deco


def list_datasets() -> list[str]:
    return sorted(_REGISTRY)


def dataset_class(name: str) -> type:
    """The adapter class registered as ``name`` (its ``__init__`` keywords are the ``data.options``)."""
    try:
        return _REGISTRY[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(list_datasets())}") from None


def create_dataset(name: str, root, split: str = "train", **options) -> "SegmentationDataset":
    """Build the adapter registered as ``name`` on the unmodified download at ``root``.

    Example: ``create_dataset("cadis", "/data/CaDIS", split="val", task=2)``;
    ``root="builtin:hc18_sample"`` is the HC18 sample shipped with the package.
    """
    return dataset_class(name)(resolve_root(root), split=split, **options)


# --------------------------------------------------------------------------- evaluation extras


@dataclass(frozen=True)
class ObjectMetrics:
    """Object-level Dice and Hausdorff (GlaS), against ``sample["instances"]``: the predicted
    objects are those the method returns with its labels (the recursive method's grown
    instances), else the connected components (``connectivity``) of the predicted foreground."""

    connectivity: int = 8


@dataclass(frozen=True)
class RegionMetrics:
    """Dice of unions of classes (BraTS: ET, TC, WT): ``regions`` = ((name, class ids), ...)."""

    regions: tuple[tuple[str, tuple[int, ...]], ...]


@dataclass(frozen=True)
class GroupReport:
    """Means per group of images (a video, a GlaS part): ``key`` is the sample key holding the group."""

    key: str


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


def table_split(units, table: Mapping[str, Sequence], rest: str = "train") -> dict:
    """unit -> split from fixed lists (``{"val": (5, 7, 16), "test": (2, 12, 22)}``); others go to ``rest``.

    The first list holding a unit wins.
    """
    out = {}
    for u in units:
        out[u] = next((name for name, members in table.items() if u in members), rest)
    return out


# --------------------------------------------------------------------------- folder walk


def file_record(case_id: str, files: Mapping[str, tuple[Any, str]], **meta) -> dict:
    """An index record pairing the files of one sample.

    ``files``: role (the record key, e.g. ``"image"``, ``"mask"``) -> ``(path, what)``. The
    record holds ``case_id``, every role's path as a string and ``meta``; when a file
    cannot be read it also holds ``error = (path, reason)`` for the first such file, the
    reason naming a present partner file ("annotation not found (its image exists)").
    """
    rec = {"case_id": case_id, **{role: str(path) for role, (path, _) in files.items()}, **meta}
    present = [what for path, what in files.values() if os.path.lexists(path)]
    for path, what in files.values():
        partner = next((w for w in present if w != what), None)
        err = file_error(path, what, partner)
        if err is not None:
            rec["error"] = (err.path, err.reason)
            break
    return rec


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
    #: Classes that are background (left out of the foreground means ``dice_fg``/``hd95_fg``,
    #: of the surface-distance columns and so of checkpoint selection); ``()`` when every
    #: class is a structure of interest (CaDIS: class 0 is the pupil).
    background_classes: tuple[int, ...] = (0,)
    #: Evaluation extras (:class:`ObjectMetrics`, :class:`RegionMetrics`, :class:`GroupReport`).
    extra_metrics: tuple = ()
    #: Record key of the unit that splits assign (a case, a video, a scan); see :meth:`assign_splits`.
    split_by: str = "case_id"
    #: Splits made of others, e.g. GlaS ``{"test": ("testA", "testB")}``.
    split_unions: Mapping[str, tuple[str, ...]] = {}

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
        self.root = resolve_root(root)
        require_folder(self.root, f"{self.name} dataset root")
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

    def assign_splits(self, records: list[dict]) -> dict:
        """unit (``record[split_by]``) -> split name, over all records. Default: the unit names its split."""
        return {r[self.split_by]: r[self.split_by] for r in records}

    def _select(self, records: list[dict], split: str) -> list[dict]:
        if split == "all":
            return records
        assign = self.assign_splits(records)
        wanted = self.split_unions.get(split, (split,))
        return [r for r in records if assign.get(r[self.split_by]) in wanted]

    def _load(self, record: dict) -> dict:
        raise NotImplementedError

    def sample(self, rec: dict, image, mask, **extra) -> dict:
        """Build a sample dict from what an adapter read and checked.

        ``image``: an integer ``(H, W)`` / ``(H, W, C)`` array from :func:`~.io.read_image`
        (scaled to [0, 1], channels first) or a float32 ``(C, *S)`` array (kept as it is);
        ``mask``: integer class ids. ``extra``: ``spacing`` (checked, float32), ``scene``
        (int64), other numbers (float32), arrays (tensors), tensors and strings as they are.
        """
        if isinstance(image, np.ndarray):
            image = image_to_tensor(image) if image.dtype.kind in "ui" else torch.from_numpy(np.ascontiguousarray(image))
        out = {"image": image} if image is not None else {}
        out["mask"] = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.int64))
        for key, value in extra.items():
            if key == "spacing":
                value = torch.tensor(check_spacing(value, rec.get("mask", rec["case_id"])), dtype=torch.float32)
            elif key == "scene":
                value = torch.tensor(int(value), dtype=torch.int64)
            elif isinstance(value, np.ndarray):
                value = torch.from_numpy(np.ascontiguousarray(value))
            elif isinstance(value, float):
                value = torch.tensor(value, dtype=torch.float32)
            out[key] = value
        out["case_id"] = rec["case_id"]
        return out

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
