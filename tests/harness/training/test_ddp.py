"""A 2-process DDP run (torchrun, gloo, CPU) matches a 1-process run on the same global batch."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, SAMPLE, tiny_config
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
