"""Epoch-based training: ``train.epochs``, validation/checkpoints per epoch, schedules counted in epochs."""

import math

import pandas as pd
import pytest
import torch

from .helpers import tiny_config
from mtseg_harness.runs import build_trainer
from mtseg_harness.training import build_scheduler


def test_epochs_set_the_step_budget_and_validation_runs_at_every_epoch_end(tmp_path):
    cfg = tiny_config(tmp_path, train={"epochs": 3, "val_every": "epoch", "checkpoint_every": "epoch"},
                      data={"batch_size": 3})
    tr = build_trainer(cfg)
    n = len(tr.train_set)
    per_epoch = n // 3  # the sampler drops the last incomplete batch
    assert per_epoch >= 2
    assert tr.steps_per_epoch == per_epoch and tr.total_steps == 3 * per_epoch
    tr.fit()
    assert tr.step == 3 * per_epoch
    val = pd.read_csv(tmp_path / "val_log.csv")
    assert val["step"].tolist() == [per_epoch, 2 * per_epoch, 3 * per_epoch]
    assert (tmp_path / "best.pt").exists() and tr.best_step in val["step"].tolist()


def test_epochs_need_one_global_batch(tmp_path):
    from mtseg_harness.config import ConfigError

    cfg = tiny_config(tmp_path, train={"epochs": 1}, data={"batch_size": 500})
    with pytest.raises((ConfigError, ValueError), match="batch"):
        build_trainer(cfg)


def test_warm_restarts_counted_in_epochs_restart_on_epoch_boundaries():
    """cosine_restarts with interval=epoch, T_0 = 2 epochs of 3 steps: lr(s) = lr0 (1 + cos(pi (s mod 6) / 6)) / 2."""
    w = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([w], lr=0.01)
    sched = build_scheduler(opt, {"name": "cosine_restarts", "T_0": 2, "T_mult": 1, "eta_min": 0.0,
                                  "step_size": 1, "gamma": 0.1, "milestones": [], "interval": "epoch"},
                            steps_per_epoch=3)
    for s in range(1, 14):
        opt.step()
        sched.step()
        expected = 0.01 * (1 + math.cos(math.pi * (s % 6) / 6)) / 2
        assert opt.param_groups[0]["lr"] == pytest.approx(expected, abs=1e-12), s


def test_step_schedule_counted_in_epochs():
    w = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([w], lr=1.0)
    sched = build_scheduler(opt, {"name": "multistep", "milestones": [1, 3], "gamma": 0.5, "step_size": 1,
                                  "T_0": 1, "T_mult": 1, "eta_min": 0.0, "interval": "epoch"}, steps_per_epoch=4)
    lrs = []
    for _ in range(13):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == [1.0] * 3 + [0.5] * 8 + [0.25] * 2
