"""Metrics, evaluation loops and reports (CSV tables, curves and overlays as PNG)."""

from .metrics import (BRATS_REGIONS, brats_dice, brats_region_masks, confusion_matrix, dice_iou,
                      miou_from_confusion, object_dice, object_hausdorff, overlap_counts, surface_distances)
from .evaluate import evaluate, predict_batch, summarize

__all__ = ["BRATS_REGIONS", "brats_dice", "brats_region_masks", "confusion_matrix", "dice_iou",
           "miou_from_confusion", "object_dice", "object_hausdorff", "overlap_counts", "surface_distances",
           "evaluate", "predict_batch", "summarize"]
