"""DDP with 2 processes (torchrun, gloo, CPU): it matches a 1-process run on the same global
batch, and a resumed run ends bitwise where an uninterrupted one does."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .helpers import REPO, SAMPLE, tiny_config
from mtseg_harness.runs import build_trainer, load_config
from mtseg_harness.training.checkpoint import load_checkpoint

# CMU-Net: instance norm, so per-image statistics do not depend on how the batch is split
# (batch norm is synchronised over the processes: test_ddp_eval.py).
# SGD rather than Adam: Adam's g / sqrt(v) turns rounding-level gradient differences of
# near-zero gradients (summation order, thread count) into full-size steps.
SETTINGS = [
    "method.name=cmunet", "model.name=cmunet", "model.options={}", "data.input_size=[32,48]",
    "train.steps=3", "train.val_every=0", "train.checkpoint_every=0", "train.progress=false", "train.log_every=1",
    "deterministic=true", "device=cpu", f"data.root={SAMPLE}", "data.augment={flip_prob: 0.5, rotate: 10.0}",
    "optim.name=sgd", "optim.lr=0.05", "train.tensorboard=false",  # SGD: the update is linear in the gradient
]


def test_two_process_ddp_matches_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "mtseg_harness.cli", "train", "--set", *SETTINGS, "data.batch_size=2",
           f"train.out_dir={tmp_path / 'ddp'}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ddp = load_checkpoint(tmp_path / "ddp" / "last.pt")
    assert ddp["world_size"] == 2 and ddp["step"] == 3

    cfg = load_config(None, SETTINGS + ["data.batch_size=4", f"train.out_dir={tmp_path / 'one'}"])
    one = build_trainer(cfg)
    one.fit()
    ref = one.model.state_dict()
    for k, v in ddp["model"].items():
        torch.testing.assert_close(v, ref[k], rtol=1e-4, atol=1e-5, msg=k)
    # and the comparison can tell: one process on half the global batch ends elsewhere
    half = build_trainer(load_config(None, SETTINGS + ["data.batch_size=2", f"train.out_dir={tmp_path / 'half'}"]))
    half.fit()
    assert max((ddp["model"][k] - v).abs().max().item() for k, v in half.model.state_dict().items()
               if v.is_floating_point()) > 1e-3


def test_two_process_ddp_resume_is_bitwise_identical(tmp_path):
    """2 gloo processes, UNet with batch norm, Adam, augmentation: stopped at step 2 and
    resumed (every rank restores rank 0's checkpoint), the run ends where the uninterrupted one does."""
    settings = ["method.name=baseline", "model.options={base_channels: 4, depth: 2}", "data.input_size=[32,48]",
                "train.steps=4", "train.val_every=0", "train.checkpoint_every=0", "train.progress=false",
                "train.log_every=1", "train.tensorboard=false", "deterministic=true", "device=cpu",
                f"data.root={SAMPLE}", "data.batch_size=2",
                "data.augment={flip_prob: 0.5, rotate: 10.0, scale: [0.9, 1.1]}", "optim.name=adam", "optim.lr=0.01"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(Path(__file__).with_name("ddp_resume.py")), str(tmp_path), *settings]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"resuming {tmp_path / 'part' / 'last.pt'} at step 2 of 4" in proc.stderr
    full, resumed = load_checkpoint(tmp_path / "full" / "last.pt"), load_checkpoint(tmp_path / "part" / "last.pt")
    assert full["world_size"] == resumed["world_size"] == 2 and full["step"] == resumed["step"] == 4
    for k, v in full["model"].items():
        assert torch.equal(v, resumed["model"][k]), k
    for i, s in full["optimizer"]["state"].items():
        assert all(torch.equal(v, resumed["optimizer"]["state"][i][n]) for n, v in s.items()), i
    assert torch.equal(full["rng"]["augment"], resumed["rng"]["augment"])
