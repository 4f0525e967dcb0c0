"""Segmentation metrics: Dice / IoU per class (ignore index honoured), surface distances in mm,
GlaS object Dice / object Hausdorff, Dice of class unions (BraTS regions).

Conventions (MONAI's vocabulary): metrics are per image and per class, ``(B, K)``; a
class absent from both prediction and target in an image gives ``nan`` (left out of the
mean with ``nanmean``); a class present in only one of them gives Dice/IoU 0 and
Hausdorff ``+inf``. Pixels whose target is ``ignore_index`` are removed from both masks
before anything is counted.

Against MONAI 1.6 on the same one-hot masks (``tests/harness/training/test_metrics_monai.py``):
Dice, IoU, HD, HD95 and symmetric ASSD agree where both are defined; the conventions that
differ are

* a class present only in the prediction: Dice/IoU 0 here, NaN in MONAI's default
  (``ignore_empty=True``; 0 with ``ignore_empty=False``);
* a class in neither mask: NaN here and in MONAI's default (1 with ``ignore_empty=False``);
* exactly one mask empty: HD95 ``inf`` here, NaN in MONAI (HD and ASSD: ``inf`` in both);
* ASSD is symmetric (MONAI's ``compute_average_surface_distance`` needs ``symmetric=True``);
* ignored pixels: removed from both masks here; MONAI's ``ignore_index`` is not used.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.spatial.distance import directed_hausdorff
from torch import Tensor

import mtseg_kernels


# --------------------------------------------------------------------------- overlap

def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int | None = 255) -> Tensor:
    """``(K, K)`` int64 counts, rows = target class, columns = predicted class, over all images."""
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    keep = (target >= 0) & (target < num_classes)
    if ignore_index is not None:
        keep &= target != ignore_index
    p = pred[keep].clamp(0, num_classes - 1)
    return torch.bincount(target[keep] * num_classes + p, minlength=num_classes**2).reshape(num_classes, num_classes)


def overlap_counts(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int | None = 255):
    """Per image and class: (intersection, |pred|, |target|), each ``(B, K)`` int64, ignored pixels removed."""
    b = pred.shape[0]
    pred, target = pred.reshape(b, -1).long(), target.reshape(b, -1).long()
    valid = torch.ones_like(target, dtype=torch.bool) if ignore_index is None else target != ignore_index
    k = torch.arange(num_classes, device=pred.device).view(1, -1, 1)
    p = (pred.unsqueeze(1) == k) & valid.unsqueeze(1)
    t = (target.unsqueeze(1) == k) & valid.unsqueeze(1)
    return (p & t).sum(-1), p.sum(-1), t.sum(-1)


def dice_iou(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int | None = 255) -> tuple[Tensor, Tensor]:
    """Dice and IoU ``(B, K)`` float64 per image and class; ``nan`` where the class is in neither mask."""
    inter, p, t = (x.double() for x in overlap_counts(pred, target, num_classes, ignore_index))
    union = p + t - inter
    both_empty = (p + t) == 0
    dice = torch.where(both_empty, torch.nan, 2 * inter / (p + t).clamp_min(1))
    iou = torch.where(both_empty, torch.nan, inter / union.clamp_min(1))
    return dice, iou


def miou_from_confusion(cm: Tensor) -> tuple[Tensor, Tensor]:
    """Dataset-level IoU and Dice per class from a confusion matrix (``nan`` for classes never seen)."""
    cm = cm.double()
    tp = cm.diag()
    fp, fn = cm.sum(0) - tp, cm.sum(1) - tp
    denom = tp + fp + fn
    iou = torch.where(denom > 0, tp / denom.clamp_min(1), torch.nan)
    dice = torch.where(denom > 0, 2 * tp / (2 * tp + fp + fn).clamp_min(1), torch.nan)
    return iou, dice


# --------------------------------------------------------------------------- surface distances

def surface_distances(pred: Tensor, target: Tensor, num_classes: int, spacing=None, ignore_index: int | None = 255,
                      include_background: bool = False, classes=None) -> dict[str, Tensor]:
    """HD, HD95 and ASSD per image and class (``(B, K')`` float64, in the units of ``spacing``).

    ``classes``: the class ids measured, in this order (default ``1..K-1``, or ``0..K-1``
    with ``include_background``); ``K' = len(classes)``. ``spacing``: one per-axis spacing
    for the batch, or ``(B, ndim)`` (images with different pixel sizes, e.g. HC18).
    Pixels whose target is ``ignore_index`` belong to no class in either map (so a
    prediction there adds no surface), whatever class 0 means. Uses the exact operator
    ``mtseg_kernels.surface_metrics`` (MONAI's definitions) on one-hot masks.
    """
    if classes is None:
        classes = range(0 if include_background else 1, num_classes)
    classes = [int(c) for c in classes]
    pred, target = pred.long(), target.long()
    b = pred.shape[0]
    if not classes:
        empty = torch.empty(b, 0, dtype=torch.float64)
        return {"hd": empty, "hd95": empty.clone(), "assd": empty.clone()}
    ids = torch.tensor(classes, device=pred.device).view(1, -1, *([1] * (pred.dim() - 1)))
    valid = torch.ones_like(target, dtype=torch.bool) if ignore_index is None else target != ignore_index
    p = (pred.unsqueeze(1) == ids) & valid.unsqueeze(1)
    t = (target.unsqueeze(1) == ids) & valid.unsqueeze(1)
    sp = None if spacing is None else torch.as_tensor(spacing, dtype=torch.float64).cpu()
    m = mtseg_kernels.surface_metrics(p, t, sp, 95.0, format="onehot", include_background=True)
    return {"hd": m.hausdorff.cpu(), "hd95": m.hausdorff_percentile.cpu(), "assd": m.assd.cpu()}


# --------------------------------------------------------------------------- GlaS objects

def _hausdorff_np(a: np.ndarray, b: np.ndarray) -> float:
    """Symmetric Hausdorff distance between the pixel sets of two binary masks (the GlaS definition)."""
    pa, pb = np.argwhere(a), np.argwhere(b)
    if len(pa) == 0 or len(pb) == 0:
        return math.inf
    return max(directed_hausdorff(pa, pb)[0], directed_hausdorff(pb, pa)[0])


def _objects(inst: np.ndarray) -> list[int]:
    ids = np.unique(inst)
    return [int(i) for i in ids if i != 0]


def object_dice(pred_inst, gt_inst) -> float:
    """GlaS object-level Dice (Sirinukunwattana et al., MedIA 2017), for one image.

    ``0.5 * [sum_i w_i Dice(G_i, S*(G_i)) + sum_j v_j Dice(G*(S_j), S_j)]`` with ``w_i`` =
    area of ground-truth object G_i over the total ground-truth area, ``v_j`` likewise for
    the segmented objects, and ``S*(G_i)`` the segmented object overlapping G_i most
    (none: Dice 0). Inputs are instance maps (0 = background). Both empty: 1.
    """
    s, g = np.asarray(pred_inst), np.asarray(gt_inst)
    gs, ss = _objects(g), _objects(s)
    if not gs and not ss:
        return 1.0
    if not gs or not ss:
        return 0.0

    def side(a, ids_a, b):
        total = sum(int((a == i).sum()) for i in ids_a)
        acc = 0.0
        for i in ids_a:
            obj = a == i
            hit = b[obj]
            hit = hit[hit != 0]
            if hit.size == 0:
                continue
            j = np.bincount(hit).argmax()
            other = b == j
            acc += obj.sum() / total * 2 * (obj & other).sum() / (obj.sum() + other.sum())
        return acc

    return 0.5 * (side(g, gs, s) + side(s, ss, g))


def object_hausdorff(pred_inst, gt_inst) -> float:
    """GlaS object-level Hausdorff distance for one image (pixels).

    ``0.5 * [sum_i w_i H(G_i, S*(G_i)) + sum_j v_j H(G*(S_j), S_j)]``; an object that
    overlaps nothing is matched with the object of the other map nearest to it in
    Hausdorff distance (the challenge's rule). Both empty: 0; one empty: ``inf``.
    """
    s, g = np.asarray(pred_inst), np.asarray(gt_inst)
    gs, ss = _objects(g), _objects(s)
    if not gs and not ss:
        return 0.0
    if not gs or not ss:
        return math.inf

    def side(a, ids_a, b, ids_b):
        total = sum(int((a == i).sum()) for i in ids_a)
        acc = 0.0
        for i in ids_a:
            obj = a == i
            hit = b[obj]
            hit = hit[hit != 0]
            if hit.size:
                d = _hausdorff_np(obj, b == np.bincount(hit).argmax())
            else:
                d = min(_hausdorff_np(obj, b == j) for j in ids_b)
            acc += obj.sum() / total * d
        return acc

    return 0.5 * (side(g, gs, s, ss) + side(s, ss, g, gs))


def object_instances(pred: Tensor, connectivity: int = 8) -> Tensor:
    """Predicted objects: connected components of the foreground (``pred > 0``) per image,
    ``(B, *S)`` int64 ids (0 background), with ``mtseg_kernels.connected_components``."""
    labels, _ = mtseg_kernels.connected_components((pred > 0).to(torch.uint8).cpu(), connectivity=connectivity)
    return labels.long()


# --------------------------------------------------------------------------- class unions (BraTS regions)


def region_masks(labels: Tensor, regions) -> Tensor:
    """``(B, *S)`` labels -> ``(B, R, *S)`` bool, one mask per region (a union of class ids).

    ``regions``: ``((name, class ids), ...)``, e.g. BraTS ``(("ET", (3,)), ("TC", (1, 3)), ...)``.
    """
    return torch.stack([torch.isin(labels, torch.tensor(classes, device=labels.device)) for _, classes in regions], 1)


def region_dice(pred: Tensor, target: Tensor, regions, ignore_index: int | None = 255) -> Tensor:
    """Dice of each region per image ``(B, R)`` float64; ``nan`` where a region is empty in both.

    Pixels whose target is ``ignore_index`` count nowhere.
    """
    p, t = region_masks(pred, regions), region_masks(target, regions)
    if ignore_index is not None:
        valid = (target != ignore_index).unsqueeze(1)
        p, t = p & valid, t & valid
    dims = tuple(range(2, p.dim()))
    inter = (p & t).sum(dims).double()
    s = p.sum(dims).double() + t.sum(dims).double()
    return torch.where(s == 0, torch.nan, 2 * inter / s.clamp_min(1))


def region_surface_distances(pred: Tensor, target: Tensor, regions, spacing=None,
                             ignore_index: int | None = 255) -> dict[str, Tensor]:
    """HD, HD95 and ASSD of each region per image (``(B, R)`` float64; BraTS: ET, TC, WT).

    As :func:`surface_distances`, on the region masks (:func:`region_masks`) instead of classes.
    """
    valid = torch.ones_like(target, dtype=torch.bool) if ignore_index is None else target != ignore_index
    p = region_masks(pred.long(), regions) & valid.unsqueeze(1)
    t = region_masks(target.long(), regions) & valid.unsqueeze(1)
    sp = None if spacing is None else torch.as_tensor(spacing, dtype=torch.float64).cpu()
    m = mtseg_kernels.surface_metrics(p, t, sp, 95.0, format="onehot", include_background=True)
    return {"hd": m.hausdorff.cpu(), "hd95": m.hausdorff_percentile.cpu(), "assd": m.assd.cpu()}
