"""Recursive approximation tasks (Ke et al., IEEE TIP 2021).

A fraction ``strong_fraction`` of the training images (or ``strong_count`` of them) keeps
its full mask ("strong" labels); the others only have weak labels: rough regions inside each object
(:class:`~mtseg_harness.data.WeakLabels`, generated, or read from ``weak_dir``).
The model has a second output, the approximation task (``heads={"approx": K}``):

* segmentation loss: CE of ``out.seg`` on the strongly labelled images only;
* approximation loss: CE of ``out.approx`` against the *current approximation* of every
  image (its weak label at first; the true mask for strong images), weight ``w_approx``.

Every ``update_every`` steps all approximations are recomputed (round ``r``): the model
segments every training image (batched, no augmentation), and each weak image's
approximation grows towards the object boundaries with the exact multi-object level
set ``mtseg_kernels.grow_instances`` (seeds = the current approximation's instances,
``S`` = the predicted foreground, speed ``lam``; objects never merge; each grown region
keeps its seed's class). Strong images keep their true mask. The approximations of every
round are saved (``<out_dir>/approximations/round_RRR.npz``, read with :func:`load_round`)
with their Dice against the true masks (``rounds.csv``, ``rounds.png``) -- the true masks
of weak images are used for this report only, never for training.

Storage: the current approximations live on disk, not in RAM (:class:`ApproxStore`: one
flat memory-mapped file per process, ``<out_dir>/approximations/current.rank<R>.u8``),
so a data set of CaDIS's size at full resolution costs page cache, not process memory.
A checkpoint holds them (as one flat tensor read from the file) and a resumed run writes
them back to the file. The round's segmentation and growth run on the model's device
(``connected_components`` and ``grow_instances`` on CUDA where the build has those kernels);
only the result is copied to the file.

Evaluation ends with a final growth: seeds = the instances of the approximation output,
grown inside the predicted segmentation with ``lam_eval`` (default 10: close to the
boundaries of the predicted objects that hold a seed; parts of S that no seed reaches are
dropped); an image whose approximation output is empty keeps the plain segmentation.
Defaults (``lam`` 1 per round, ``lam_eval`` 10, ``update_every`` 1000, ``w_approx`` 1)
are our choices; the paper's values were not available to us.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from typing import Annotated, Optional
from pathlib import Path

import numpy as np
import torch
from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveInt

from mtseg_kernels import connected_components, grow_instances

from ..data import DatasetWrapper, WeakLabels
from ..models.heads import ApproxHeadSpec, Heads
from . import losses
from .base import Method, TrainContext, register_method, resize_logits


def _on_device(op, *tensors, **kwargs):
    """``op`` on the tensors' device; a build whose op has only CPU kernels runs it on the
    CPU and moves the result back (the op says so with NotImplementedError)."""
    try:
        return op(*tensors, **kwargs)
    except NotImplementedError:
        device = tensors[0].device
        if device.type == "cpu":
            raise
        cpu = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
        out = op(*(t.cpu() for t in tensors), **cpu)
        return type(out)(*(o.to(device) for o in out))


def _instances(classes: torch.Tensor) -> torch.Tensor:
    """Connected components (faces) of each foreground class -> instance ids, batched, on the input's device."""
    out = torch.zeros(classes.shape, dtype=torch.int64, device=classes.device)
    offset = torch.zeros(classes.shape[0], dtype=torch.int64, device=classes.device)
    for c in classes.unique().tolist():
        if c == 0:
            continue
        lab, counts = _on_device(connected_components, (classes == c).to(torch.uint8))
        lab = lab.long()
        shift = offset.view(-1, *([1] * (classes.dim() - 1)))
        out = torch.where(lab > 0, lab + shift, out)
        offset = offset + counts.long()
    return out


def grow_objects(seeds_classes: torch.Tensor, seeds_instances: torch.Tensor | None, seg: torch.Tensor,
                 lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Grow class-labelled seeds inside ``seg != 0``: ``(classes, instances)``, int64 on ``seg``'s device.

    ``seeds_instances`` (or, when it is ``None`` or an image has none, the face-connected
    components of each class of ``seeds_classes``) are the objects; ``instances`` holds
    their grown regions (every seed voxel keeps its id), ``classes`` their seed's class.
    """
    device = seg.device
    seeds_classes = seeds_classes.to(device).long()
    inst = seeds_instances.to(device).long() if seeds_instances is not None else None
    if inst is None or (inst.amax(dim=tuple(range(1, inst.dim()))) == 0).any():
        inst = _instances(seeds_classes)
    inst = torch.where(seeds_classes > 0, inst, torch.zeros_like(inst))
    grown = _on_device(grow_instances, inst, (seg != 0).to(torch.uint8), float(lam), seed_classes=seeds_classes)
    classes = torch.where(grown.instances > 0, grown.classes, torch.where(seeds_classes > 0, seeds_classes, 0))
    instances = torch.where(grown.instances > 0, grown.instances, inst)
    return classes, instances


def grow(seeds_classes: torch.Tensor, seeds_instances: torch.Tensor | None, seg: torch.Tensor, lam: float) -> torch.Tensor:
    """Grow class-labelled seeds inside ``seg != 0``; returns the grown class map (int64, on ``seg``'s device)."""
    return grow_objects(seeds_classes, seeds_instances, seg, lam)[0]


class ApproxStore:
    """The current approximation of every training image, in one flat memory-mapped file.

    Images may differ in size: image ``i`` is ``array[offset[i]:offset[i] + prod(shape[i])]``.
    Reads return tensors (copies); writes go to the file. Built by :meth:`write`, which
    streams the images to the file one at a time (nothing dataset-sized in RAM).

    Attributes:
        path: the file; ``ids``: case ids in order; ``shapes``: ``(N, ndim)`` int64.
    """

    def __init__(self, path, ids, shapes, dtype):
        self.path, self.ids, self.dtype = Path(path), list(ids), np.dtype(dtype)
        self.shapes = np.asarray(shapes, dtype=np.int64).reshape(len(self.ids), -1)
        sizes = np.prod(self.shapes, axis=1) if len(self.ids) else np.zeros(0, np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.index = {c: i for i, c in enumerate(self.ids)}
        total = int(self.offsets[-1])
        self.array = np.memmap(self.path, dtype=self.dtype, mode="r+", shape=(max(total, 1),))[:total]

    @classmethod
    def write(cls, path, items, dtype) -> "ApproxStore":
        """A store of ``items``, an iterable of ``(case_id, label map)`` (tensors or arrays)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        ids, shapes = [], []
        with open(path, "wb") as f:
            for cid, labels in items:
                a = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
                f.write(np.ascontiguousarray(a, dtype=dtype).tobytes())
                ids.append(str(cid))
                shapes.append(a.shape)
            if not ids:
                f.write(b"\0")
        return cls(path, ids, shapes, dtype)

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, cid) -> bool:
        return str(cid) in self.index

    def __iter__(self):
        return iter(self.ids)

    def _slice(self, cid):
        i = self.index[str(cid)]
        return self.array[self.offsets[i]:self.offsets[i + 1]], tuple(self.shapes[i])

    def __getitem__(self, cid) -> torch.Tensor:
        flat, shape = self._slice(cid)
        return torch.from_numpy(np.array(flat).reshape(shape))

    def __setitem__(self, cid, labels) -> None:
        flat, shape = self._slice(cid)
        a = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        if tuple(a.shape) != shape:
            raise ValueError(f"ApproxStore: {cid} holds a {shape} map, got {tuple(a.shape)}")
        flat[:] = a.reshape(-1)

    def state(self) -> dict:
        """Tensors and plain types for a checkpoint; the flat tensor shares the file's pages."""
        self.array.flush()
        return {"case_id": list(self.ids), "shape": torch.from_numpy(self.shapes.copy()),
                "approx": torch.from_numpy(self.array) if len(self.array) else torch.zeros(0, dtype=torch.uint8)}

    @classmethod
    def from_state(cls, path, state: dict, dtype) -> "ApproxStore":
        """Write a checkpoint's approximations (:meth:`state`) to a new file."""
        flat = state["approx"]
        shapes = np.asarray(state["shape"], dtype=np.int64)
        sizes = np.prod(shapes, axis=1) if len(shapes) else np.zeros(0, np.int64)
        bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        return cls.write(path, ((c, flat[bounds[i]:bounds[i + 1]].reshape(tuple(shapes[i])))
                                for i, c in enumerate(state["case_id"])), dtype)


def load_round(path) -> dict[str, np.ndarray]:
    """A saved round (``approximations/round_RRR.npz``): case id -> approximation (class map)."""
    with np.load(path) as z:
        ids, shapes, flat = z["case_id"].tolist(), z["shape"], z["approx"]
    bounds = np.concatenate([[0], np.cumsum(np.prod(shapes, axis=1))]).astype(np.int64)
    return {c: flat[bounds[i]:bounds[i + 1]].reshape(tuple(shapes[i])) for i, c in enumerate(ids)}


@register_method("recursive_approx", "recursive")
class RecursiveApprox(Method):
    @dataclass
    class Options:
        strong_fraction: Annotated[float, Field(ge=0, le=1)] = 0.1
        #: the number of strongly labelled images (instead of ``strong_fraction``)
        strong_count: Optional[NonNegativeInt] = None
        w_seg: NonNegativeFloat = 1.0
        w_approx: NonNegativeFloat = 1.0
        #: steps between label updates; 0 = never
        update_every: NonNegativeInt = 1000
        lam: NonNegativeFloat = 1.0
        lam_eval: NonNegativeFloat = 10.0
        final_growth: bool = True
        shrink_ratio: Annotated[float, Field(gt=0, le=1)] = 0.3
        jitter: NonNegativeFloat = 0.3
        smoothness: NonNegativeFloat = 0.15
        #: read weak labels from here instead of generating them
        weak_dir: Optional[str] = None
        update_batch_size: PositiveInt = 16
        save_rounds: bool = True

    def __init__(self, num_classes, ignore_index=255, **options):
        super().__init__(num_classes, ignore_index, **options)
        # case_id -> approximation (class map): an ApproxStore on disk once setup() ran
        self.current: ApproxStore | dict = {}
        self.rounds: list[dict] = []
        self.round = 0
        self._restored: dict | None = None  # a checkpoint's approximations, written to disk by setup()
        self._scratch = None  # a temporary folder when the trainer lends no work_dir

    @property
    def label_dtype(self):
        """The smallest dtype that holds every class and the ignore index."""
        return np.uint8 if max(self.num_classes - 1, self.ignore_index) <= 255 else np.int32

    def heads(self):
        return Heads(approx=ApproxHeadSpec(num_classes=self.num_classes))

    def wrap_dataset(self, dataset, split):
        if split != "train":
            return dataset
        o = self.options
        return _TrainSamples(WeakLabels(dataset, shrink_ratio=o["shrink_ratio"], jitter=o["jitter"],
                                        smoothness=o["smoothness"], weak_dir=o["weak_dir"],
                                        strong_fraction=o["strong_fraction"], strong_count=o["strong_count"]))

    # ------------------------------------------------------------------ approximations
    def _store_path(self, ctx: TrainContext) -> Path:
        folder = ctx.work_dir
        if folder is None:
            self._scratch = self._scratch or tempfile.TemporaryDirectory(prefix="mtseg-approx-")
            folder = Path(self._scratch.name)
        return Path(folder) / "approximations" / f"current.rank{ctx.rank}.{np.dtype(self.label_dtype).name}"

    def setup(self, ctx: TrainContext) -> None:
        ds = ctx.dataset
        path = self._store_path(ctx)
        if self._restored is not None:  # a resumed run: its checkpoint's approximations, to disk
            self.current = ApproxStore.from_state(path, self._restored, self.label_dtype)
            self._restored = None
        elif not len(self.current):
            dice = []

            def weak_labels():
                for i in range(len(ds)):
                    s = ds[i]
                    if s is None:
                        continue
                    if not s.get("strong", False):
                        dice.append(self._dice(s["weak"], s["mask"]))
                    yield str(s["case_id"]), s["weak"]

            self.current = ApproxStore.write(path, weak_labels(), self.label_dtype)
            self._record(ctx, dice)
        if isinstance(ds, _TrainSamples):
            ds.generate = False  # from now on the batches get the current approximations instead

    def _dice(self, approx: torch.Tensor, mask: torch.Tensor) -> float:
        """Foreground Dice of an approximation against the true mask (labels must agree)."""
        a, m = approx.long(), mask.long().to(approx.device)
        valid = m != self.ignore_index
        fg_a, fg_m = (a > 0) & valid, (m > 0) & valid
        denom = int(fg_a.sum()) + int(fg_m.sum())
        return 2 * int((fg_a & fg_m & (a == m)).sum()) / denom if denom else 1.0

    def before_augment(self, batch):
        ids = batch.get("case_id")
        if ids and all(str(c) in self.current for c in ids):
            approx = torch.stack([self.current[str(c)] for c in ids]).to(batch["mask"].device).long()
            batch["weak"] = approx
            batch.pop("weak_instances", None)
        return batch

    def loss(self, out, batch, step, total_steps):
        o = self.options
        strong = batch["strong"].to(batch["mask"].device).bool() if "strong" in batch else torch.ones(
            batch["mask"].shape[0], dtype=torch.bool, device=batch["mask"].device)
        shape = (-1,) + (1,) * (batch["mask"].dim() - 1)
        seg_target = torch.where(strong.view(shape), batch["mask"], torch.full_like(batch["mask"], self.ignore_index))
        seg = 0.0
        for logits in (out.seg,) + tuple(out.side):
            seg = seg + losses.cross_entropy(logits, seg_target, self.ignore_index)
        if out.approx is None:
            raise ValueError("recursive_approx: the model has no approximation head (heads={'approx': K})")
        approx = losses.cross_entropy(out.approx, batch["weak"], self.ignore_index)
        logs = {"seg": float(seg.detach()), "approx": float(approx.detach()), "round": self.round}
        return o["w_seg"] * seg + o["w_approx"] * approx, logs

    def after_step(self, ctx: TrainContext) -> None:
        every = int(self.options["update_every"] or 0)
        if every and ctx.step % every == 0 and ctx.step < ctx.total_steps:
            self.update(ctx)

    @torch.no_grad()
    def update(self, ctx: TrainContext) -> None:
        """One round: segment every training image, grow every weak image's approximation.

        Segmentation and growth run on the device ``ctx.predict`` returns labels on; each
        image's approximation is read before it is overwritten and no image reads
        another's, so the round writes in place.
        """
        dice = []
        for batch in ctx.batches(int(self.options["update_batch_size"])):
            seg = ctx.predict(batch["image"], self.plain_segment)
            cur = torch.stack([self.current[str(c)] for c in batch["case_id"]]).to(seg.device).long()
            grown = grow(cur, None, seg, self.options["lam"])
            strong = batch["strong"].bool().tolist()
            for i, cid in enumerate(batch["case_id"]):
                if strong[i]:
                    self.current[str(cid)] = batch["mask"][i]
                else:
                    self.current[str(cid)] = grown[i]
                    dice.append(self._dice(grown[i], batch["mask"][i]))
        self.round += 1
        self._record(ctx, dice)

    def _record(self, ctx: TrainContext, dice: list) -> None:
        """Log the round (mean Dice of the weak images' approximations vs their true masks); save it."""
        row = {"round": self.round, "step": ctx.step, "dice_vs_true": float(np.mean(dice)) if dice else float("nan"),
               "n_weak": len(dice)}
        self.rounds.append(row)
        if ctx.out_dir is not None and self.options["save_rounds"]:
            out = ctx.out_dir / "approximations"
            out.mkdir(parents=True, exist_ok=True)
            if isinstance(self.current, ApproxStore):
                state = self.current.state()
                np.savez_compressed(out / f"round_{self.round:03d}.npz", case_id=np.array(state["case_id"]),
                                    shape=state["shape"].numpy(), approx=self.current.array)
            ctx.save_table("rounds", self.rounds, plot={"y": "dice_vs_true",
                                                        "title": "approximations vs true masks (weak images)"})

    # ------------------------------------------------------------------ evaluation
    def plain_segment(self, model, image, batch=None, out_size=None):
        """The arg-max segmentation without the final growth (used by the label updates)."""
        return super().segment(model, image, batch, out_size)

    def segment(self, model, image, batch=None, out_size=None):
        """``(labels, instances)`` after the final growth: the instances are the grown
        objects themselves (what the object metrics measure); an image whose approximation
        output is empty keeps the plain segmentation, its objects then being that
        segmentation's face-connected components per class. Without the final growth: the
        plain labels (the evaluation then takes connected components)."""
        out = model(image)
        seg = resize_logits(out.seg, out_size).argmax(1)
        if not self.options["final_growth"] or out.approx is None:
            return seg
        approx = resize_logits(out.approx, out_size).argmax(1)
        classes, instances = grow_objects(approx, None, seg, self.options["lam_eval"])
        seeded = (approx > 0).flatten(1).any(1).view(-1, *([1] * (seg.dim() - 1))).to(seg.device)
        labels = torch.where(seeded, classes.to(seg.device), seg)
        instances = torch.where(seeded, instances.to(seg.device), _instances(seg))
        return labels, instances

    def state_dict(self):
        if isinstance(self.current, ApproxStore):
            current = self.current.state()
        elif self._restored is not None:
            current = self._restored
        else:
            current = {"case_id": [], "shape": torch.zeros(0, 2, dtype=torch.int64), "approx": torch.zeros(0, dtype=torch.uint8)}
        return {"current": current, "rounds": self.rounds, "round": self.round}

    def load_state_dict(self, state):
        """Restore the rounds; the approximations reach the disk in :meth:`setup` (evaluation never needs them)."""
        if state:
            current = state["current"]
            if "case_id" not in current:  # an older checkpoint: case id -> tensor
                ids = list(current)
                current = {"case_id": ids, "shape": torch.tensor([list(current[c].shape) for c in ids]),
                           "approx": torch.cat([current[c].reshape(-1) for c in ids]) if ids else torch.zeros(0)}
            self._restored = dict(current) if len(current["case_id"]) else None
            self.rounds = list(state["rounds"])
            self.round = int(state["round"])


class _TrainSamples(DatasetWrapper):
    """The training set of the method: weak labels while the approximations are initialised,
    then the plain samples (+ ``strong``), since :meth:`RecursiveApprox.before_augment`
    swaps in the current approximation (no weak-label generation per step)."""

    def __init__(self, weak_labels):
        super().__init__(weak_labels.dataset)
        self.weak_labels = weak_labels
        self.strong = weak_labels.strong
        self.generate = True

    def __getitem__(self, index):
        if self.generate:
            return self.weak_labels[index]
        sample = self.dataset[index]
        if sample is not None:
            sample["strong"] = index in self.strong
        return sample
