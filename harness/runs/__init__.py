"""Runs: what a config becomes, and the commands built on it (train, eval, labels, bench, demo).

The top layer below the CLI: ``cli -> runs -> training -> {methods, models, data,
evaluation}``. :mod:`.assemble` turns a config into a dataset, a method and a model (the
one assembly path), :mod:`.evaluate` evaluates a trained run, and :mod:`.demo`,
:mod:`.labels`, :mod:`.bench` are the other commands.
"""

from .assemble import (Run, build_dataset, build_method, build_model, build_run, build_trainer, check_components,
                       load_config)
from ..config import ConfigError, dump
from ..data import DatasetError
from ..training import distributed
from ..training.checkpoint import CheckpointError
from .bench import StepRunner, bench_report, synthetic_batch, time_steps
from .demo import run_demo
from .evaluate import config_from_checkpoint, run_eval
from .labels import precompute_labels
from .repeats import eval_seeds, mean_sd, seed_config, train_seeds


def train(cfg: dict):
    """Train ``cfg``; returns ``(trainer, result)`` (:meth:`~mtseg_harness.training.Trainer.fit`).

    Under ``torchrun`` the process group is left when training ends.
    """
    trainer = build_trainer(cfg)
    try:
        return trainer, trainer.fit()
    finally:
        distributed.cleanup()


__all__ = ["CheckpointError", "ConfigError", "DatasetError", "Run", "StepRunner", "bench_report", "build_dataset",
           "build_method", "build_model", "build_run", "build_trainer", "check_components", "config_from_checkpoint",
           "dump", "eval_seeds", "load_config", "mean_sd", "precompute_labels", "run_demo", "run_eval",
           "seed_config", "synthetic_batch", "time_steps", "train", "train_seeds"]
