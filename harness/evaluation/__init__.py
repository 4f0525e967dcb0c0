"""Metrics, the evaluation loop and reports (CSV tables, curves and overlays as PNG)."""

from .metrics import (confusion_matrix, dice_iou, miou_from_confusion, object_dice, object_hausdorff,
                      object_instances, overlap_counts, region_dice, region_masks, surface_distances)
from .evaluate import evaluate, foreground, predict_batch, resize_image, shard_range, summarize, summary_line
from .sliding import SlidingWindow, window_starts

__all__ = ["confusion_matrix", "dice_iou", "miou_from_confusion", "object_dice", "object_hausdorff",
           "object_instances", "overlap_counts", "region_dice", "region_masks", "surface_distances",
           "evaluate", "foreground", "predict_batch", "resize_image", "shard_range", "summarize", "summary_line",
           "SlidingWindow", "window_starts"]
