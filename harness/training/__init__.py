"""The shared trainer: loop, AMP, schedules, checkpoints, logs, DDP (see :mod:`.trainer`)."""

from .checkpoint import load_checkpoint, model_weights, save_atomic
from .data import StepBatchSampler, build_dataset, eval_loader, train_loader
from .trainer import Trainer, amp_dtype_for, build_optimizer, build_scheduler, resolve_device, seed_everything

__all__ = ["Trainer", "StepBatchSampler", "amp_dtype_for", "build_dataset", "build_optimizer", "build_scheduler",
           "eval_loader", "load_checkpoint", "model_weights", "resolve_device", "save_atomic", "seed_everything",
           "train_loader"]
