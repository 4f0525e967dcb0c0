"""The method interface: what a paper adds to the shared trainer.

A method decides the model heads it needs, derives its auxiliary labels on the device
inside the training step (after augmentation), computes its loss, and may hook into the
trainer (e.g. label updates every N steps). The trainer owns everything else: data,
optimiser, schedule, AMP, DDP, checkpoints and logs; what a hook may use of it comes in
a :class:`TrainContext` (the training set, an ordered pass over it, a predictor, where to
write), so methods import neither the trainer nor the evaluation code.

Methods are registered by name (:func:`register_method`) and built with
:func:`create_method` from the ``method`` section of a config.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.heads import Heads
from . import losses


@dataclass
class TrainContext:
    """What the trainer lends a method's hooks (:meth:`Method.setup`, :meth:`Method.after_step`).

    Attributes:
        step: optimiser steps done so far.
        total_steps: the run's step budget.
        dataset: the training set (as wrapped by :meth:`Method.wrap_dataset`).
        batches: ``batches(batch_size)`` -> the training set in order, collated, on the
            CPU, without augmentation.
        predict: ``predict(image, segment)`` -> label maps ``(B, *S)`` on the run's device
            for a batch of images ``(B, C, *S)`` (any device): the model in eval mode, without
            gradients, under the run's AMP setting, the images resized to
            ``data.input_size`` and padded as in evaluation; ``segment`` is a
            :meth:`Method.segment`-like callable.
        out_dir: the run folder on the main process, ``None`` on the others.
        save_table: ``save_table(name, rows, plot=None)`` writes ``<out_dir>/<name>.csv``
            (main process only) and, with ``plot={"y": column, "title": ...}`` and more than
            one row, ``<name>.png``.
        rank: this process's rank (0 in a one-process run).
        work_dir: the run folder on every process (per-rank scratch files go there), or
            ``None`` (a method then uses a temporary folder).
    """

    step: int
    total_steps: int
    dataset: Any
    batches: Callable[[int], Iterable[dict]]
    predict: Callable[..., Tensor]
    out_dir: Optional[Path]
    save_table: Callable[..., None]
    rank: int = 0
    work_dir: Optional[Path] = None


def resize_logits(logits: Tensor, size=None) -> Tensor:
    """Float logits ``(B, K, *S)``, resized (bilinearly) to ``size`` when given and different."""
    logits = logits.float()
    if size is not None and tuple(logits.shape[2:]) != tuple(size):
        logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
    return logits

_REGISTRY: dict[str, type] = {}


def register_method(*names: str):
    def deco(cls):
        for n in names:
            _REGISTRY[n.lower()] = cls
        cls.name = names[0]
        return cls

    return deco


def list_methods() -> list[str]:
    return sorted(_REGISTRY)


def create_method(name: str, num_classes: int, ignore_index: int = 255, **options) -> "Method":
    try:
        cls = _REGISTRY[name.lower()]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(list_methods())}") from None
    return cls(num_classes, ignore_index=ignore_index, **options)


def method_class(name: str) -> type:
    try:
        return _REGISTRY[name.lower()]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(list_methods())}") from None


#: Segmentation losses of :meth:`Method.seg_loss`.
SegLoss = Literal["ce", "dice_ce", "ce_iou", "dice"]


@dataclass
class NoOptions:
    """A method without options."""


class Method:
    """Base class. Subclasses declare their options as a dataclass ``Options`` (names, types,
    ranges, defaults: what a config's ``method`` section is checked against) and override
    the hooks; ``self.options`` is the dict of option values, ``defaults`` the dataclass's
    defaults as a dict.

    ``config_defaults`` holds config sections the method's paper prescribes (e.g.
    HOG-MTL's optimiser and schedule); a user config overrides them.
    """

    name = "base"
    Options: type = NoOptions
    defaults: dict[str, Any] = {}
    config_defaults: dict[str, Any] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "Options" in vars(cls):
            cls.defaults = {f.name: getattr(cls.Options(), f.name) for f in fields(cls.Options)}

    def __init__(self, num_classes: int, ignore_index: int = 255, **options):
        unknown = set(options) - set(self.defaults)
        if unknown:
            raise ValueError(f"method {self.name!r}: unknown option(s) {sorted(unknown)}; known: {sorted(self.defaults)}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.options = {**self.defaults, **options}

    # ------------------------------------------------------------------ set-up
    def heads(self) -> Heads:
        """Model heads this method needs (``create_model(heads=...)``)."""
        return Heads()

    def wrap_dataset(self, dataset, split: str):
        """Give the method a chance to add labels to a dataset (e.g. weak labels)."""
        return dataset

    def setup(self, ctx: TrainContext) -> None:
        """Called once by the trainer before training (after resume)."""

    # ------------------------------------------------------------------ step
    def before_augment(self, batch: dict) -> dict:
        """Change a batch on the device before resizing and augmentation (e.g. swap in current labels)."""
        return batch

    def targets(self, batch: dict) -> dict:
        """Add auxiliary labels to a batch already on the device and augmented."""
        return batch

    def loss(self, out, batch: dict, step: int, total_steps: int) -> tuple[Tensor, dict[str, float]]:
        raise NotImplementedError

    def after_step(self, ctx: TrainContext) -> None:
        """Called after every optimiser step; ``ctx.step`` is the 1-based number of steps done."""

    # ------------------------------------------------------------------ inference
    def predict(self, out) -> Tensor:
        """Segmentation logits ``(B, K, *S)`` from the model output."""
        return out.seg

    def segment(self, model, image: Tensor, batch: dict | None = None, out_size=None) -> Tensor:
        """Label map ``(B, *S)`` for evaluation (the recursive method grows it once more).

        A method that finds the objects itself returns ``(labels, instances)`` instead
        (both ``(B, *S)``, instances int64 ids, 0 = none): the object metrics (GlaS) then
        use those instances, not connected components rebuilt from the labels.

        ``out_size``: spatial size of the labels when the model ran on a resized image
        (logits are resized bilinearly before the argmax).
        """
        return resize_logits(self.predict(model(image)), out_size).argmax(1)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    # ------------------------------------------------------------------ helpers
    def seg_loss(self, out, mask: Tensor, kind: str = "ce") -> tuple[Tensor, dict[str, float]]:
        """Segmentation loss over the main output and every side output (U2Net: 7 terms).

        ``kind``: ``ce``, ``dice_ce`` (Dice + CE, equal weights), ``ce_iou``
        (TDSNet: ``CE + (1 - soft IoU)``) or ``dice`` (soft Dice alone: CMU-Net's U-Net baseline).
        """
        outputs = (out.seg,) + tuple(out.side)
        total = 0.0
        logs = {}
        for i, logits in enumerate(outputs):
            if kind == "dice":
                term = losses.soft_dice_loss(logits, mask, self.ignore_index)
            else:
                term = losses.cross_entropy(logits, mask, self.ignore_index)
            if kind == "dice_ce":
                term = term + losses.soft_dice_loss(logits, mask, self.ignore_index)
            elif kind == "ce_iou":
                term = term + (1 - losses.soft_iou(logits, mask, self.ignore_index))
            elif kind not in ("ce", "dice"):
                raise ValueError(f"segmentation loss must be 'ce', 'dice_ce', 'ce_iou' or 'dice', got {kind!r}")
            total = total + term
            if i == 0:
                logs["seg"] = float(term.detach())
        if len(outputs) > 1:
            logs["seg_all"] = float(total.detach())
        return total, logs
