"""Recursive approximation tasks (Ke et al., IEEE TIP 2021).

A fraction ``strong_fraction`` of the training images keeps its full mask ("strong"
labels); the others only have weak labels: rough regions inside each object
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
round are saved (``<out_dir>/approximations/round_RRR.npz``) with their Dice against the
true masks (``rounds.csv``, ``rounds.png``) -- the true masks of weak images are used for
this report only, never for training.

Evaluation ends with a final growth: seeds = the instances of the approximation output,
grown inside the predicted segmentation with ``lam_eval`` (default 10: close to the
boundaries of the predicted objects that hold a seed; parts of S that no seed reaches are
dropped); an image whose approximation output is empty keeps the plain segmentation.
Defaults (``lam`` 1 per round, ``lam_eval`` 10, ``update_every`` 1000, ``w_approx`` 1)
are our choices; the paper's values were not available to us.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Optional

import numpy as np
import torch
from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveInt

from mtseg_kernels import connected_components, grow_instances

from ..data import DatasetWrapper, WeakLabels
from ..models.heads import ApproxHeadSpec, Heads
from . import losses
from .base import Method, TrainContext, register_method, resize_logits


def _instances(classes: torch.Tensor) -> torch.Tensor:
    """Connected components (faces) of each foreground class -> instance ids, batched."""
    out = torch.zeros(classes.shape, dtype=torch.int64)
    offset = torch.zeros(classes.shape[0], dtype=torch.int64)
    for c in classes.unique().tolist():
        if c == 0:
            continue
        lab, counts = connected_components((classes == c).to(torch.uint8))
        lab = lab.long()
        shift = offset.view(-1, *([1] * (classes.dim() - 1)))
        out = torch.where(lab > 0, lab + shift, out)
        offset = offset + counts.long()
    return out


def grow(seeds_classes: torch.Tensor, seeds_instances: torch.Tensor | None, seg: torch.Tensor, lam: float) -> torch.Tensor:
    """Grow class-labelled seeds inside ``seg != 0``; returns the grown class map (CPU int64)."""
    seeds_classes = seeds_classes.cpu().long()
    inst = seeds_instances.cpu().long() if seeds_instances is not None else None
    if inst is None or (inst.amax(dim=tuple(range(1, inst.dim()))) == 0).any():
        inst = _instances(seeds_classes)
    inst = torch.where(seeds_classes > 0, inst, torch.zeros_like(inst))
    grown = grow_instances(inst, (seg.cpu() != 0).to(torch.uint8), float(lam), seed_classes=seeds_classes)
    return torch.where(grown.instances > 0, grown.classes, torch.where(seeds_classes > 0, seeds_classes, 0))


@register_method("recursive_approx", "recursive")
class RecursiveApprox(Method):
    @dataclass
    class Options:
        strong_fraction: Annotated[float, Field(ge=0, le=1)] = 0.1
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
        self.current: dict[str, torch.Tensor] = {}   # case_id -> approximation (class map, uint8/int64)
        self.rounds: list[dict] = []
        self.round = 0

    def heads(self):
        return Heads(approx=ApproxHeadSpec(num_classes=self.num_classes))

    def wrap_dataset(self, dataset, split):
        if split != "train":
            return dataset
        o = self.options
        return _TrainSamples(WeakLabels(dataset, shrink_ratio=o["shrink_ratio"], jitter=o["jitter"],
                                        smoothness=o["smoothness"], weak_dir=o["weak_dir"],
                                        strong_fraction=o["strong_fraction"]))

    # ------------------------------------------------------------------ approximations
    def setup(self, ctx: TrainContext) -> None:
        ds = ctx.dataset
        if not self.current:  # (a resumed run has them from its checkpoint)
            dice = []
            for i in range(len(ds)):
                s = ds[i]
                if s is None:
                    continue
                cid = str(s["case_id"])
                self.current[cid] = s["weak"].to(torch.uint8 if self.num_classes <= 255 else torch.int64)
                if not s.get("strong", False):
                    dice.append(self._dice(s["weak"], s["mask"]))
            self._record(ctx, dice)
        if isinstance(ds, _TrainSamples):
            ds.generate = False  # from now on the batches get the current approximations instead

    def _dice(self, approx: torch.Tensor, mask: torch.Tensor) -> float:
        """Foreground Dice of an approximation against the true mask (labels must agree)."""
        a, m = approx.long(), mask.long()
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
        """One round: segment every training image, grow every weak image's approximation."""
        new, dice = {}, []
        for batch in ctx.batches(int(self.options["update_batch_size"])):
            seg = ctx.predict(batch["image"], self.plain_segment)
            cur = torch.stack([self.current[str(c)] for c in batch["case_id"]]).long()
            grown = grow(cur, None, seg, self.options["lam"])
            strong = batch["strong"].bool()
            for i, cid in enumerate(batch["case_id"]):
                new[str(cid)] = (batch["mask"][i] if strong[i] else grown[i]).to(self.current[str(cid)].dtype)
                if not strong[i]:
                    dice.append(self._dice(grown[i], batch["mask"][i]))
        self.current = new
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
            ids = sorted(self.current)
            np.savez_compressed(out / f"round_{self.round:03d}.npz", case_id=np.array(ids),
                                approx=np.stack([self.current[c].numpy() for c in ids]))
            ctx.save_table("rounds", self.rounds, plot={"y": "dice_vs_true",
                                                        "title": "approximations vs true masks (weak images)"})

    # ------------------------------------------------------------------ evaluation
    def plain_segment(self, model, image, batch=None, out_size=None):
        """The arg-max segmentation without the final growth (used by the label updates)."""
        return super().segment(model, image, batch, out_size)

    def segment(self, model, image, batch=None, out_size=None):
        out = model(image)
        seg = resize_logits(out.seg, out_size).argmax(1)
        if not self.options["final_growth"] or out.approx is None:
            return seg
        approx = resize_logits(out.approx, out_size).argmax(1)
        grown = grow(approx, None, seg, self.options["lam_eval"]).to(seg.device)
        # images whose approximation output is empty (no seed) keep the plain segmentation
        seeded = (approx > 0).flatten(1).any(1).view(-1, *([1] * (seg.dim() - 1)))
        return torch.where(seeded, grown, seg)

    def state_dict(self):
        return {"current": self.current, "rounds": self.rounds, "round": self.round}

    def load_state_dict(self, state):
        if state:
            self.current = dict(state["current"])
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
