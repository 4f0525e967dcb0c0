"""The shared trainer: loop, AMP, schedules, checkpoints, logs, DDP (see :mod:`.trainer`).

The pieces it trains are assembled by :mod:`mtseg_harness.runs` (``build_trainer``).
"""

from .checkpoint import CheckpointError, load_checkpoint, model_weights, save_atomic, save_checkpoint
from .data import StepBatchSampler, eval_loader, train_loader
from .trainer import Trainer, amp_dtype_for, build_optimizer, build_scheduler, resolve_device, seed_everything

__all__ = ["CheckpointError", "Trainer", "StepBatchSampler", "amp_dtype_for", "build_optimizer", "build_scheduler",
           "eval_loader", "load_checkpoint", "model_weights", "resolve_device", "save_atomic", "save_checkpoint",
           "seed_everything", "train_loader"]
