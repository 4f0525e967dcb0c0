"""Run a model over a dataset and tabulate per-image, per-class metrics (pandas).

:func:`evaluate` is the one evaluation loop: the trainer's validation and ``mtseg eval``
both call it. The dataset's declared extras (``extra_metrics`` of
:class:`~mtseg_harness.data.SegmentationDataset`: object metrics, region Dice, per-group
reports) are computed here, so this module never asks which dataset it is.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..data import GroupReport, ObjectMetrics, RegionMetrics
from . import metrics as M
from .sliding import SlidingWindow


def _pad(x: torch.Tensor, multiple: int):
    if not multiple or multiple <= 1:
        return x, None
    spatial = x.shape[2:]
    target = [int(math.ceil(s / multiple) * multiple) for s in spatial]
    if list(spatial) == target:
        return x, None
    pad = []
    for s, t in zip(reversed(spatial), reversed(target)):
        pad += [0, t - s]
    return F.pad(x, pad), tuple(slice(0, s) for s in spatial)


def resize_image(image: torch.Tensor, size) -> torch.Tensor:
    """Bilinear, antialiased resize of ``(B, C, H, W)`` images (what the trainer does with ``data.input_size``)."""
    if size is None or tuple(image.shape[2:]) == tuple(size):
        return image
    return F.interpolate(image, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)


@torch.no_grad()
def predict_batch(model, segment, image: torch.Tensor, batch: dict | None = None, pad_multiple: int = 32,
                  amp_dtype=None, input_size=None, window=None, window_overlap: float = 0.5) -> torch.Tensor:
    """Label maps ``(B, *S)`` at the images' own size (or ``(labels, instances)``, see below).

    ``segment(model, image, batch, out_size=None)`` turns the model's output into labels
    (:meth:`~mtseg_harness.methods.Method.segment`); a method that finds objects itself
    (the recursive method's grown instances) returns the pair ``(labels, instances)``,
    passed through unchanged. With ``input_size`` the model sees
    images resized to it and its logits are resized back; the input is zero-padded to a
    multiple of ``pad_multiple`` and the output cropped. With ``window`` (a spatial size)
    the model runs on overlapping windows of that size and their logits are averaged
    (:class:`~mtseg_harness.evaluation.sliding.SlidingWindow`; ``window_overlap``).
    """
    if window is not None:
        model = SlidingWindow(model, window, window_overlap)
    size = tuple(image.shape[2:])
    x = resize_image(image, input_size)
    x, crop = _pad(x, pad_multiple)
    with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        if crop is None and input_size is None:
            labels = segment(model, x, batch)
        else:
            labels = segment(_Cropped(model, crop), x, batch, out_size=size)
    return labels


class _Cropped(torch.nn.Module):
    """Crops every spatial output of a model back to the unpadded size."""

    def __init__(self, model, crop):
        super().__init__()
        self.model, self.crop = model, crop

    def forward(self, x):
        out = self.model(x)
        if self.crop is None:
            return out
        c = (slice(None), slice(None)) + self.crop
        return out._replace(seg=out.seg[c], side=tuple(s[c] for s in out.side),
                            approx=None if out.approx is None else out.approx[c])


def split_segmentation(out) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A ``segment`` result -> ``(labels, instances or None)``, both on the CPU.

    ``instances`` (int64 ids, 0 = none) are the objects the method itself found; without
    them the object metrics use the connected components of the labels.
    """
    if isinstance(out, (tuple, list)):
        labels, instances = out
        if instances is not None and tuple(instances.shape) != tuple(labels.shape):
            raise ValueError(f"segment returned instances of shape {tuple(instances.shape)} "
                             f"for labels of shape {tuple(labels.shape)}")
        return labels.cpu(), None if instances is None else instances.cpu().long()
    return out.cpu(), None


def _extra_columns(extra_metrics, pred: torch.Tensor, batch: dict, ignore_index,
                   pred_instances: torch.Tensor | None = None, hd: bool = False) -> list[dict]:
    """Per-image columns of the dataset's declared extras (one dict per image); with ``hd``
    also the regions' surface distances (``hd95_<region>``, ``hd_<region>``).

    ``pred_instances``: the method's own objects (:func:`split_segmentation`); the object
    metrics use them as they are, else the connected components of ``pred``.
    """
    rows = [{} for _ in range(len(pred))]
    for spec in extra_metrics:
        if isinstance(spec, ObjectMetrics):
            if "instances" not in batch:
                continue
            if pred_instances is not None:
                pred_inst = pred_instances.numpy()
            else:
                pred_inst = M.object_instances(pred, spec.connectivity).numpy()
            for i, (pi, gi) in enumerate(zip(pred_inst, batch["instances"].numpy())):
                rows[i]["object_dice"] = M.object_dice(pi, gi)
                rows[i]["object_hausdorff"] = M.object_hausdorff(pi, gi)
        elif isinstance(spec, RegionMetrics):
            dice = M.region_dice(pred, batch["mask"], spec.regions, ignore_index)
            for i in range(len(pred)):
                for k, (name, _) in enumerate(spec.regions):
                    rows[i][f"dice_{name}"] = float(dice[i, k])
            if hd:
                surf = M.region_surface_distances(pred, batch["mask"], spec.regions, batch.get("spacing"),
                                                  ignore_index)
                for i in range(len(pred)):
                    for k, (name, _) in enumerate(spec.regions):
                        rows[i][f"hd95_{name}"] = float(surf["hd95"][i, k])
                        rows[i][f"hd_{name}"] = float(surf["hd"][i, k])
        elif isinstance(spec, GroupReport):
            values = batch[spec.key]
            for i in range(len(pred)):
                v = values[i]
                rows[i][spec.key] = v.item() if isinstance(v, torch.Tensor) else v
        else:
            raise TypeError(f"unknown evaluation extra {spec!r}")
    return rows


def shard_range(n: int, rank: int, world: int) -> range:
    """The contiguous part of ``range(n)`` that process ``rank`` of ``world`` evaluates.

    Contiguous (not strided) so that concatenating the ranks' rows in rank order gives
    the dataset's order, whatever samples a rank skipped.
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"shard_range: rank must lie in 0..world-1, got rank={rank}, world={world}")
    return range(n * rank // world, n * (rank + 1) // world)


def _gather(obj) -> list:
    """Every rank's ``obj`` in rank order (one process: ``[obj]``). Collective."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def foreground(names, background_classes) -> list[str]:
    """Names of the classes that are not background (every class when all are declared background)."""
    bg = set(int(c) for c in background_classes)
    fg = [n for k, n in enumerate(names) if k not in bg]
    return fg or list(names)


@torch.no_grad()
def evaluate(model, segment, loader, device, *, num_classes: int, ignore_index: int, class_names=None,
             hd: bool = True, pad_multiple: int = 32, keep_examples: int = 0, max_batches: int | None = None,
             amp_dtype=None, input_size=None, extra_metrics=(), background_classes=(0,), gather: bool = False,
             window=None, window_overlap: float = 0.5):
    """Per-image metric table and the mean of every column.

    ``segment``: see :func:`predict_batch`. ``extra_metrics``: the dataset's declared
    extras (``dataset.extra_metrics``; empty for a quick validation).
    ``background_classes``: the dataset's ``background_classes``: left out of the
    foreground means and of the surface distances (``()``: every class counts).
    ``gather``: under ``torch.distributed``, ``loader`` holds this rank's shard
    (:func:`shard_range`); the rows, confusion matrices and examples of every rank are
    gathered in rank order, so every rank returns what one process evaluating the whole
    set returns (a collective call: every rank must make it). ``window``,
    ``window_overlap``: sliding-window inference (:func:`predict_batch`).

    Returns ``(table, summary, examples)``: ``table`` a DataFrame with one row per image
    (``case_id``, ``dice_<class>``, ``iou_<class>``, and with ``hd=True`` ``hd95_<class>``,
    ``hd_<class>``, ``assd_<class>`` of every non-background class in the spacing's
    units, i.e. mm; the extras' columns; ``nan`` where a metric is undefined, ``inf``
    where one mask is empty), ``summary`` (:func:`summarize`: means with the counts of
    undefined and infinite values) plus dataset-level ``miou``, and per group
    ``by_<key>`` (:class:`GroupReport`); ``examples``: up to ``keep_examples``
    (image, target, prediction) numpy triples. Batches whose samples were all skipped
    (``on_error="skip"``) are passed over.
    """
    names = list(class_names) if class_names else [str(k) for k in range(num_classes)]
    bg = {int(c) for c in background_classes}
    measured = [k for k in range(num_classes) if k not in bg] or list(range(num_classes))
    groups = [spec.key for spec in extra_metrics if isinstance(spec, GroupReport)]
    was_training = model.training
    model.eval()
    rows, examples = [], []
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    group_cm: dict[tuple, torch.Tensor] = {}
    try:
        for bi, batch in enumerate(loader):
            if max_batches is not None and bi >= max_batches:
                break
            if "image" not in batch:  # every sample of the batch was skipped
                continue
            image = batch["image"].to(device).float()
            target = batch["mask"]
            pred, pred_instances = split_segmentation(
                predict_batch(model, segment, image, batch, pad_multiple, amp_dtype, input_size, window,
                              window_overlap))
            cm += M.confusion_matrix(pred, target, num_classes, ignore_index)
            dice, iou = M.dice_iou(pred, target, num_classes, ignore_index)
            surf = None
            if hd:
                surf = M.surface_distances(pred, target, num_classes, batch.get("spacing"), ignore_index,
                                           classes=measured)
            extra = _extra_columns(extra_metrics, pred, batch, ignore_index, pred_instances, hd)
            ids = batch.get("case_id", [f"{bi}_{i}" for i in range(len(pred))])
            for i in range(len(pred)):
                row = {"case_id": ids[i]}
                for k, n in enumerate(names):
                    row[f"dice_{n}"] = float(dice[i, k])
                    row[f"iou_{n}"] = float(iou[i, k])
                if surf is not None:
                    for j, k in enumerate(measured):
                        row[f"hd95_{names[k]}"] = float(surf["hd95"][i, j])
                        row[f"hd_{names[k]}"] = float(surf["hd"][i, j])
                        row[f"assd_{names[k]}"] = float(surf["assd"][i, j])
                row.update(extra[i])
                rows.append(row)
                for key in groups:
                    g = (key, row[key])
                    group_cm[g] = group_cm.get(g, 0) + M.confusion_matrix(pred[i:i + 1], target[i:i + 1], num_classes,
                                                                          ignore_index)
                if len(examples) < keep_examples:
                    examples.append((batch["image"][i].numpy(), target[i].numpy(), pred[i].numpy()))
    finally:
        model.train(was_training)
    if gather:
        parts = _gather((rows, cm, group_cm, examples))
        rows = [r for part in parts for r in part[0]]
        cm = sum((part[1] for part in parts), torch.zeros_like(cm))
        group_cm = {}
        for part in parts:
            for g, m in part[2].items():
                group_cm[g] = group_cm.get(g, 0) + m
        examples = [e for part in parts for e in part[3]][:keep_examples]
    table = pd.DataFrame(rows)
    summary = summarize(table, names, skip=groups, background_classes=background_classes)
    summary["miou"] = _miou(cm)
    for key in groups:
        summary[f"by_{key}"] = {}
        for value, sub in table.groupby(key, sort=True):
            part = summarize(sub, names, skip=groups, background_classes=background_classes)
            part["miou"] = _miou(group_cm[(key, value)])
            summary[f"by_{key}"][value.item() if hasattr(value, "item") else value] = part
    return table, summary, examples


def _miou(cm: torch.Tensor) -> float:
    iou, _ = M.miou_from_confusion(cm)
    return float(np.nanmean(iou.numpy()))


#: Columns whose values can be infinite (one mask empty): their means leave those out and say how many.
DISTANCE_PREFIXES = ("hd95_", "hd_", "assd_", "object_hausdorff")


def summarize(table: pd.DataFrame, names, skip=(), background_classes=(0,)) -> dict:
    """Column means of a per-image table (``case_id`` and the columns in ``skip`` left out).

    Every mean is over the images where the metric is finite, and beside every mean
    ``<col>_n_nan`` counts the images where it is undefined (class in neither mask);
    distance columns (Hausdorff, ASSD) also get ``<col>_n_inf``, the images left out
    because exactly one mask is empty. A column with no finite value has mean ``nan``.
    ``dice_fg``, ``iou_fg``, ``hd95_fg``: the mean of the per-class means over the
    classes that are not in ``background_classes`` (classes with no finite value left
    out), with ``_n_nan``/``_n_inf`` summed over those classes (image-class pairs).
    """
    out: dict = {"n_images": int(len(table))}
    for col in table.columns:
        if col == "case_id" or col in skip:
            continue
        v = table[col].to_numpy(dtype=float)
        finite = v[np.isfinite(v)]
        out[col] = float(finite.mean()) if finite.size else float("nan")
        out[col + "_n_nan"] = int(np.isnan(v).sum())
        if col.startswith(DISTANCE_PREFIXES):
            out[col + "_n_inf"] = int(np.isinf(v).sum())
    fg = foreground(names, background_classes)
    for m in ("dice", "iou", "hd95"):
        cols = [f"{m}_{n}" for n in fg if f"{m}_{n}" in table]
        if not cols:
            continue
        means = np.array([out[c] for c in cols])
        out[f"{m}_fg"] = float(np.nanmean(means)) if np.isfinite(means).any() else float("nan")
        out[f"{m}_fg_n_nan"] = int(sum(out[c + "_n_nan"] for c in cols))
        if m == "hd95":
            out[f"{m}_fg_n_inf"] = int(sum(out[c + "_n_inf"] for c in cols))
    return out


def summary_line(summary: dict, keys=("dice_fg", "iou_fg", "miou", "hd95_fg")) -> str:
    """One line of the main means, each with the counts it left out, e.g.
    ``dice_fg 0.9012, miou 0.8801, hd95_fg 3.1416 (2 inf, 1 nan left out)  (40 images)``."""
    parts = []
    for k in keys:
        if k not in summary:
            continue
        left = [f"{summary[k + suffix]} {word}" for suffix, word in (("_n_inf", "inf"), ("_n_nan", "nan"))
                if summary.get(k + suffix)]
        parts.append(f"{k} {summary[k]:.4f}" + (f" ({', '.join(left)} left out)" if left else ""))
    return ", ".join(parts) + f"  ({summary['n_images']} images)"
