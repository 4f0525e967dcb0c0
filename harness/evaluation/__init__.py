"""Metrics, the evaluation loop and reports (CSV tables, curves and overlays as PNG)."""

from .metrics import (confusion_matrix, dice_iou, miou_from_confusion, object_dice, object_hausdorff,
                      object_instances, overlap_counts, region_dice, region_masks, surface_distances)
from .evaluate import evaluate, predict_batch, resize_image, summarize

__all__ = ["confusion_matrix", "dice_iou", "miou_from_confusion", "object_dice", "object_hausdorff",
           "object_instances", "overlap_counts", "region_dice", "region_masks", "surface_distances",
           "evaluate", "predict_batch", "resize_image", "summarize"]
