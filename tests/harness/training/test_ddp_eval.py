"""Past one process: sharded evaluation and batch norm over 2 gloo processes equal one process.

* ``evaluate(..., gather=True)`` on each rank's shard returns what one process returns on
  the whole set (table, means, counts, per-group mIoU, examples), shards of unequal size;
* the CPU :class:`~mtseg_harness.training.distributed.SyncBatchNorm` gives the output,
  the gradients and the running statistics of ``nn.BatchNorm2d`` on the global batch;
* ``torchrun ... mtseg eval`` writes the tables one process writes;
* a 2-process training run with Adam and synchronised batch norm (and its sharded
  validation) ends where a 1-process run on the same global batch ends.
"""

from __future__ import annotations

import math
import os
import pickle
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .helpers import REPO, SAMPLE, tiny_config
from mtseg_harness.data import GroupReport, collate
from mtseg_harness.evaluation import evaluate, shard_range
from mtseg_harness.runs import build_trainer, load_config, run_eval
from mtseg_harness.training.checkpoint import load_checkpoint
from mtseg_harness.training.distributed import SyncBatchNorm, convert_sync_batchnorm

WORLD = 2
N_IMAGES = 5  # shards of 2 and 3 images


def _samples():
    """Seeded label maps with per-image spacing, ignored pixels, a class missing from one prediction (inf)."""
    g = torch.Generator().manual_seed(7)
    out = []
    for i in range(N_IMAGES):
        target = torch.zeros(20, 24, dtype=torch.int64)
        target[3 + i:12 + i, 4:14] = 1
        target[10:18, 12 + i:20 + i // 2] = 2
        target[0, :5] = 255
        pred = target.clone()
        noise = torch.rand(20, 24, generator=g) < 0.08
        pred[noise] = torch.randint(0, 3, (int(noise.sum()),), generator=g)
        pred[target == 255] = 1  # predictions at ignored pixels must count nowhere
        if i == 3:
            pred[pred == 2] = 0  # class 2 missed: HD inf, Dice 0
        out.append({"image": torch.rand(1, 20, 24, generator=g), "mask": target, "pred": pred,
                    "spacing": torch.tensor([0.5 + 0.1 * i, 0.8], dtype=torch.float32), "case_id": f"c{i}",
                    "video": torch.tensor(i % 2), "presence": torch.ones(3)})
    return out


class _Given(torch.nn.Module):
    def forward(self, x):
        return x


def _segment(model, image, batch, out_size=None):
    return batch["pred"]


def _evaluate(indices, gather):
    samples = _samples()
    batches = [collate([samples[j] for j in list(indices)[k:k + 2]]) for k in range(0, len(indices), 2)]
    return evaluate(_Given(), _segment, batches, "cpu", num_classes=3, ignore_index=255, class_names=("bg", "a", "b"),
                    hd=True, pad_multiple=1, keep_examples=4, extra_metrics=(GroupReport("video"),), gather=gather)


def _bn_case():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 5, 6, generator=g, dtype=torch.float64) * 2 + 1
    w = torch.randn(4, 3, 5, 6, generator=g, dtype=torch.float64)  # weights of a loss sum(w * bn(x))
    return x, w


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        result = {"eval": _evaluate(shard_range(N_IMAGES, rank, WORLD), gather=True)}
        x, w = _bn_case()
        bn = convert_sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(3))).double()
        # DDP accepts it on the CPU (it refuses torch's SyncBatchNorm there)
        torch.nn.parallel.DistributedDataParallel(torch.nn.Sequential(SyncBatchNorm(2)))
        with torch.no_grad():
            bn[0].weight.copy_(torch.tensor([1.5, 0.5, -1.0]))
            bn[0].bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
        part = slice(2 * rank, 2 * rank + 2)
        xr = x[part].clone().requires_grad_(True)
        for _ in range(2):  # two steps: the running statistics move twice
            y = bn(xr)
        # every rank's loss is its share of the global mean; DDP would average the parameter grads
        (y * w[part]).sum().backward()
        result["bn"] = {"type": type(bn[0]).__name__, "y": y.detach(), "grad_x": xr.grad, "grad_w": bn[0].weight.grad,
                        "grad_b": bn[0].bias.grad, "mean": bn[0].running_mean, "var": bn[0].running_var}
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(result, f)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(_worker, args=(str(out / "init"), str(out)), nprocs=WORLD, join=True)
    return [pickle.loads((out / f"rank{r}.pkl").read_bytes()) for r in range(WORLD)]


def _same_summary(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], dict):
            _same_summary(a[k], b[k])
        elif isinstance(a[k], float) and math.isnan(a[k]):
            assert math.isnan(b[k]), k
        else:
            assert a[k] == b[k], k


def test_shards_are_contiguous_and_cover_the_set():
    assert [list(shard_range(5, r, 2)) for r in range(2)] == [[0, 1], [2, 3, 4]]
    assert [list(shard_range(7, r, 3)) for r in range(3)] == [[0, 1], [2, 3], [4, 5, 6]]
    assert [len(shard_range(1, r, 3)) for r in range(3)] == [0, 0, 1]
    with pytest.raises(ValueError, match="rank"):
        shard_range(5, 2, 2)


def test_sharded_evaluation_equals_one_process(two_ranks):
    table, summary, examples = _evaluate(range(N_IMAGES), gather=False)
    assert summary["hd95_b_n_inf"] == 1 and summary["dice_b"] < 1  # the case holds an inf and errors
    for rank in range(WORLD):
        t, s, ex = two_ranks[rank]["eval"]
        pd.testing.assert_frame_equal(t, table)
        _same_summary(s, summary)
        assert len(ex) == len(examples) == 4
        for got, want in zip(ex, examples):
            assert all(np.array_equal(g, w) for g, w in zip(got, want))
    # and the comparison can tell: one rank's shard alone gives other means
    alone, _, _ = _evaluate(shard_range(N_IMAGES, 1, WORLD), gather=False)
    assert len(alone) == 3 and alone["dice_a"].mean() != table["dice_a"].mean()


def test_cpu_sync_batchnorm_equals_batchnorm_on_the_global_batch(two_ranks):
    x, w = _bn_case()
    bn = torch.nn.BatchNorm2d(3).double()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.5, 0.5, -1.0]))
        bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    xg = x.clone().requires_grad_(True)
    for _ in range(2):
        y = bn(xg)
    (y * w).sum().backward()
    r0, r1 = two_ranks[0]["bn"], two_ranks[1]["bn"]
    assert r0["type"] == "SyncBatchNorm"
    torch.testing.assert_close(torch.cat([r0["y"], r1["y"]]), y.detach())
    torch.testing.assert_close(torch.cat([r0["grad_x"], r1["grad_x"]]), xg.grad)
    # DDP averages the parameter gradients of the ranks; the global loss is their sum here
    torch.testing.assert_close(r0["grad_w"] + r1["grad_w"], bn.weight.grad)
    torch.testing.assert_close(r0["grad_b"] + r1["grad_b"], bn.bias.grad)
    for r in (r0, r1):
        torch.testing.assert_close(r["mean"], bn.running_mean)
        torch.testing.assert_close(r["var"], bn.running_var)
    # per-process statistics (no sync) would differ
    local = torch.nn.BatchNorm2d(3).double()
    assert not torch.allclose(local(x[:2]) * 1.5 + 0.1, y.detach()[:2])


def _torchrun(args, tmp_path, timeout=400):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
           "-m", "mtseg_harness.cli", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_mtseg_eval_under_torchrun_writes_the_one_process_tables(tmp_path):
    cfg = tiny_config(tmp_path / "run", train={"steps": 2}, eval={"hd": True, "pad_multiple": 4})
    build_trainer(cfg).fit()
    run_eval(cfg, split_key="test", out_dir=tmp_path / "one", quiet=True)
    proc = _torchrun(["eval", "--set", f"data.root={SAMPLE}", "model.options={base_channels: 4, depth: 2}",
                      "data.input_size=[32,48]", "data.eval_batch_size=20", "eval.hd=true", "eval.pad_multiple=4",
                      "device=cpu", f"train.out_dir={tmp_path / 'run'}", "--split", "test", "--out",
                      str(tmp_path / "two")], tmp_path)
    assert proc.stdout.count("tables in") == 1  # rank 0 alone reports
    for name in ("per_image.csv", "per_class.csv"):
        assert (tmp_path / "two" / name).read_text() == (tmp_path / "one" / name).read_text(), name
    one = pd.read_csv(tmp_path / "one" / "per_image.csv")
    assert len(one) == 40 and "hd95_head" in one


# Adam (rounding-level differences of near-zero gradients become visible steps, so the
# comparison has a tolerance) and batch norm synchronised over the 2 CPU processes.
SETTINGS = [
    "method.name=baseline", "model.name=unet", "model.options={base_channels: 4, depth: 2}", "data.input_size=[32,48]",
    "train.steps=3", "train.val_every=2", "train.checkpoint_every=0", "train.progress=false", "train.log_every=1",
    "deterministic=true", "device=cpu", f"data.root={SAMPLE}", "data.augment={flip_prob: 0.5, rotate: 10.0}",
    "optim.name=adam", "optim.lr=0.001", "train.tensorboard=false", "train.sync_bn=true", "data.eval_batch_size=8",
]


def test_two_process_adam_batchnorm_and_validation_match_one_process(tmp_path):
    _torchrun(["train", "--set", *SETTINGS, "data.batch_size=2", f"train.out_dir={tmp_path / 'ddp'}"], tmp_path)
    ddp = load_checkpoint(tmp_path / "ddp" / "last.pt")
    assert ddp["world_size"] == 2 and ddp["step"] == 3
    one = build_trainer(load_config(None, SETTINGS + ["data.batch_size=4", f"train.out_dir={tmp_path / 'one'}"]))
    one.fit()
    ref = one.model.state_dict()
    assert any("running_var" in k for k in ref)
    for k, v in ddp["model"].items():
        if v.is_floating_point():
            torch.testing.assert_close(v, ref[k], rtol=1e-3, atol=1e-4, msg=k)
        else:
            assert torch.equal(v, ref[k]), k
    # sharded validation (10 + 10 images) gives the one-process scores
    v_ddp, v_one = pd.read_csv(tmp_path / "ddp" / "val_log.csv"), pd.read_csv(tmp_path / "one" / "val_log.csv")
    assert v_ddp["step"].tolist() == v_one["step"].tolist() == [2, 3]
    np.testing.assert_allclose(v_ddp["dice_fg"], v_one["dice_fg"], atol=2e-3)
