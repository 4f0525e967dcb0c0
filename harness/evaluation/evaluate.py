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
import torch.nn.functional as F

from ..data import GroupReport, ObjectMetrics, RegionMetrics
from . import metrics as M


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
                  amp_dtype=None, input_size=None) -> torch.Tensor:
    """Label maps ``(B, *S)`` at the images' own size.

    ``segment(model, image, batch, out_size=None)`` turns the model's output into labels
    (:meth:`~mtseg_harness.methods.Method.segment`). With ``input_size`` the model sees
    images resized to it and its logits are resized back; the input is zero-padded to a
    multiple of ``pad_multiple`` and the output cropped.
    """
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


def _extra_columns(extra_metrics, pred: torch.Tensor, batch: dict, ignore_index) -> list[dict]:
    """Per-image columns of the dataset's declared extras (one dict per image)."""
    rows = [{} for _ in range(len(pred))]
    for spec in extra_metrics:
        if isinstance(spec, ObjectMetrics):
            if "instances" not in batch:
                continue
            pred_inst = M.object_instances(pred, spec.connectivity).numpy()
            for i, (pi, gi) in enumerate(zip(pred_inst, batch["instances"].numpy())):
                rows[i]["object_dice"] = M.object_dice(pi, gi)
                rows[i]["object_hausdorff"] = M.object_hausdorff(pi, gi)
        elif isinstance(spec, RegionMetrics):
            dice = M.region_dice(pred, batch["mask"], spec.regions, ignore_index)
            for i in range(len(pred)):
                for k, (name, _) in enumerate(spec.regions):
                    rows[i][f"dice_{name}"] = float(dice[i, k])
        elif isinstance(spec, GroupReport):
            values = batch[spec.key]
            for i in range(len(pred)):
                v = values[i]
                rows[i][spec.key] = v.item() if isinstance(v, torch.Tensor) else v
        else:
            raise TypeError(f"unknown evaluation extra {spec!r}")
    return rows


@torch.no_grad()
def evaluate(model, segment, loader, device, *, num_classes: int, ignore_index: int, class_names=None,
             hd: bool = True, pad_multiple: int = 32, keep_examples: int = 0, max_batches: int | None = None,
             amp_dtype=None, input_size=None, extra_metrics=()):
    """Per-image metric table and the mean of every column.

    ``segment``: see :func:`predict_batch`. ``extra_metrics``: the dataset's declared
    extras (``dataset.extra_metrics``; empty for a quick validation).

    Returns ``(table, summary, examples)``: ``table`` a DataFrame with one row per image
    (``case_id``, ``dice_<class>``, ``iou_<class>``, and with ``hd=True`` ``hd95_<class>``,
    ``hd_<class>`` in the spacing's units, i.e. mm; the extras' columns), ``summary`` a
    dict of column means (``nanmean``; Hausdorff means over finite values, with the count
    of infinite ones) plus ``dice_fg`` / ``iou_fg`` (mean over foreground classes),
    dataset-level ``miou``, and per group ``by_<key>`` (:class:`GroupReport`);
    ``examples``: up to ``keep_examples`` (image, target, prediction) numpy triples.
    Batches whose samples were all skipped (``on_error="skip"``) are passed over.
    """
    names = list(class_names) if class_names else [str(k) for k in range(num_classes)]
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
            pred = predict_batch(model, segment, image, batch, pad_multiple, amp_dtype, input_size).cpu()
            cm += M.confusion_matrix(pred, target, num_classes, ignore_index)
            dice, iou = M.dice_iou(pred, target, num_classes, ignore_index)
            surf = None
            if hd:
                surf = M.surface_distances(pred, target, num_classes, batch.get("spacing"), ignore_index)
            extra = _extra_columns(extra_metrics, pred, batch, ignore_index)
            ids = batch.get("case_id", [f"{bi}_{i}" for i in range(len(pred))])
            for i in range(len(pred)):
                row = {"case_id": ids[i]}
                for k, n in enumerate(names):
                    row[f"dice_{n}"] = float(dice[i, k])
                    row[f"iou_{n}"] = float(iou[i, k])
                if surf is not None:
                    for k, n in enumerate(names[1:]):
                        row[f"hd95_{n}"] = float(surf["hd95"][i, k])
                        row[f"hd_{n}"] = float(surf["hd"][i, k])
                        row[f"assd_{n}"] = float(surf["assd"][i, k])
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
    table = pd.DataFrame(rows)
    summary = summarize(table, names, skip=groups)
    summary["miou"] = _miou(cm)
    for key in groups:
        summary[f"by_{key}"] = {}
        for value, sub in table.groupby(key, sort=True):
            part = summarize(sub, names, skip=groups)
            part["miou"] = _miou(group_cm[(key, value)])
            summary[f"by_{key}"][value.item() if hasattr(value, "item") else value] = part
    return table, summary, examples


def _miou(cm: torch.Tensor) -> float:
    iou, _ = M.miou_from_confusion(cm)
    return float(np.nanmean(iou.numpy()))


def summarize(table: pd.DataFrame, names, skip=()) -> dict:
    """Column means of a per-image table (``case_id`` and the columns in ``skip`` left out)."""
    out: dict = {"n_images": int(len(table))}
    for col in table.columns:
        if col == "case_id" or col in skip:
            continue
        v = table[col].to_numpy(dtype=float)
        finite = v[np.isfinite(v)]
        out[col] = float(finite.mean()) if finite.size else float("nan")
        if col.startswith(("hd", "assd", "object_hausdorff")):
            out[col + "_n_inf"] = int(np.isinf(v).sum())
    fg = names[1:] if len(names) > 1 else names
    for m in ("dice", "iou"):
        cols = [f"{m}_{n}" for n in fg if f"{m}_{n}" in table]
        if cols:
            out[f"{m}_fg"] = float(np.nanmean([out[c] for c in cols]))
    cols = [f"hd95_{n}" for n in fg if f"hd95_{n}" in table]
    if cols:
        out["hd95_fg"] = float(np.nanmean([out[c] for c in cols]))
    return out
