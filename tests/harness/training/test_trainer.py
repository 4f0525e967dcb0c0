"""Trainer: resume = uninterrupted (bitwise), atomic checkpoints, data order, schedules, AMP, clipping, logs."""

import os

import pytest
import torch

from .helpers import tiny_config
from mtseg_harness.runs import build_trainer, load_config
from mtseg_harness.training import StepBatchSampler, build_scheduler, save_atomic
from mtseg_harness.training.checkpoint import load_checkpoint


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("method,amp", [("baseline", "off"), ("hog_mtl", "off"), ("tdsnet", "off"), ("cmunet", "off"),
                                        ("baseline", "bf16")])
def test_resume_after_interrupt_is_bitwise_identical(tmp_path, capsys, method, amp):
    extra = {"method": {"name": method}, "train": {"steps": 6, "val_every": 3, "log_every": 1, "amp": amp},
             "sched": {"name": "step", "step_size": 3, "gamma": 0.5}}  # a decay after the resume point
    full = build_trainer(tiny_config(tmp_path / "full", **extra))
    full.fit()
    a = _weights(full.model)

    part = build_trainer(tiny_config(tmp_path / "part", **extra))
    part.fit(stop_at=4)  # "interrupted" after step 4: last.pt written there
    assert load_checkpoint(tmp_path / "part" / "last.pt")["step"] == 4
    del part
    capsys.readouterr()
    resumed = build_trainer(tiny_config(tmp_path / "part", **{**extra, "train": {**extra["train"], "resume": True}}))
    assert resumed.step == 4
    assert capsys.readouterr().err.strip() == f"resuming {tmp_path / 'part' / 'last.pt'} at step 4 of 6"
    resumed.fit()
    _same(a, _weights(resumed.model))
    assert resumed.optimizer.param_groups[0]["lr"] == full.optimizer.param_groups[0]["lr"]
    # the logs of the resumed run read like the uninterrupted one (same steps, same losses)
    import pandas as pd

    la, lb = pd.read_csv(tmp_path / "full" / "train_log.csv"), pd.read_csv(tmp_path / "part" / "train_log.csv")
    assert la["step"].tolist() == lb["step"].tolist() == [1, 2, 3, 4, 5, 6]
    assert la["loss"].tolist() == lb["loss"].tolist()
    assert resumed.best == full.best and resumed.best_step == full.best_step


def _run_files(folder):
    return {n: (folder / n).read_bytes() for n in ("config.yaml", "last.pt", "train_log.csv")}


def test_resume_refuses_another_config_and_continues_a_longer_step_budget(tmp_path, capsys):
    """Resuming into a folder trained with another lr or another model is refused in one line
    naming the keys and the way out, leaving the folder as it was; a larger step budget
    continues, bitwise as if the run had had that budget from the start."""
    from mtseg_harness.config import ConfigError

    extra = {"train": {"steps": 4, "resume": True}, "sched": {"name": "step", "step_size": 3, "gamma": 0.5}}
    run = tmp_path / "run"
    build_trainer(tiny_config(run, **extra)).fit()
    before = _run_files(run)
    for change, key in ((["optim", "lr", 2e-3], "optim.lr 0.001 -> 0.002"),
                        (["model", "options", "base_channels", 8], "model.options.base_channels 4 -> 8")):
        cfg = tiny_config(run, **extra)
        node = cfg
        for k in change[:-2]:
            node = node[k]
        node[change[-2]] = change[-1]
        with pytest.raises(ConfigError) as info:
            build_trainer(cfg)
        text = str(info.value)
        assert "\n" not in text and str(run / "last.pt") in text and key in text, text
        assert "train.out_dir" in text and "train.resume=false" in text
        assert _run_files(run) == before  # neither config.yaml nor the checkpoint rewritten
    with pytest.raises(ConfigError, match=r"at step 4, past train.steps=3"):
        build_trainer(tiny_config(run, **{**extra, "train": {"steps": 3, "resume": True}}))
    assert _run_files(run) == before

    capsys.readouterr()
    longer = build_trainer(tiny_config(run, **{**extra, "train": {"steps": 7, "resume": True}}))
    assert "resuming" in capsys.readouterr().err and longer.step == 4
    longer.fit()
    assert yaml_steps(run) == 7
    straight = build_trainer(tiny_config(tmp_path / "straight", **{**extra, "train": {"steps": 7}}))
    straight.fit()
    _same(_weights(straight.model), _weights(longer.model))


def yaml_steps(folder):
    import yaml

    return yaml.safe_load((folder / "config.yaml").read_text())["train"]["steps"]


def test_starting_anew_replaces_the_earlier_runs_checkpoints(tmp_path, capsys):
    """resume=false (or nothing to resume) in a folder of another run: its best.pt and last.pt
    go, so that neither passes for this run's (mtseg eval picks best.pt first)."""
    build_trainer(tiny_config(tmp_path, train={"steps": 2, "val_every": 2})).fit()
    assert (tmp_path / "best.pt").is_file()
    capsys.readouterr()
    tr = build_trainer(tiny_config(tmp_path, optim={"lr": 5e-3}, train={"steps": 1, "val_every": 0}))
    assert tr.step == 0
    tr.fit()
    assert "removed last.pt, best.pt of an earlier run" in capsys.readouterr().err
    assert not (tmp_path / "best.pt").exists()
    assert load_checkpoint(tmp_path / "last.pt")["config"]["optim"]["lr"] == 5e-3


def test_keyboard_interrupt_saves_last_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path, train={"steps": 5})
    tr = build_trainer(cfg)
    calls = {"n": 0}
    orig = tr.method.after_step

    def boom(ctx):
        orig(ctx)
        if ctx.step == 2:
            raise KeyboardInterrupt

    tr.method.after_step = boom
    with pytest.raises(KeyboardInterrupt):
        tr.fit()
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 2


def test_best_checkpoint_and_logs(tmp_path):
    cfg = tiny_config(tmp_path, train={"steps": 4, "val_every": 2, "checkpoint_every": 2})
    tr = build_trainer(cfg)
    tr.fit()
    assert (tmp_path / "best.pt").is_file() and (tmp_path / "last.pt").is_file()
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["step"] == tr.best_step and best["best"] == tr.best
    assert (tmp_path / "config.yaml").is_file()
    import pandas as pd

    log = pd.read_csv(tmp_path / "train_log.csv")
    assert {"step", "loss", "lr", "img_s", "seg"} <= set(log.columns)
    val = pd.read_csv(tmp_path / "val_log.csv")
    assert val["step"].tolist() == [2, 4]
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_atomic_save_keeps_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "ck.pt"
    save_atomic({"a": 1}, path)

    class Bad:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError):
        save_atomic({"a": Bad()}, path)
    assert torch.load(path, weights_only=True) == {"a": 1}
    assert os.listdir(tmp_path) == ["ck.pt"]


def test_step_sampler_order_is_a_function_of_the_step_and_shards_the_global_batch():
    one = StepBatchSampler(23, 6, seed=3)
    it = iter(one)
    batches = [next(it) for _ in range(9)]
    assert batches == [one.batch_at(s) for s in range(9)]
    # an epoch covers 3 batches of 6 distinct samples (the last 5 samples are dropped, re-drawn next epoch)
    assert len(set(sum(batches[:3], []))) == 18
    later = iter(StepBatchSampler(23, 6, seed=3, start_step=5))
    assert next(later) == batches[5]
    # two processes with 3 each hold the two halves of the 1-process batch of 6
    r0 = iter(StepBatchSampler(23, 3, world_size=2, rank=0, seed=3))
    r1 = iter(StepBatchSampler(23, 3, world_size=2, rank=1, seed=3))
    for s in range(9):
        assert next(r0) + next(r1) == batches[s]
    with pytest.raises(ValueError, match="fewer than one global batch"):
        StepBatchSampler(5, 4, world_size=2)


@pytest.mark.parametrize("sched,expected", [
    ({"name": "step", "step_size": 2, "gamma": 0.5}, [1, 1, 0.5, 0.5, 0.25]),
    ({"name": "multistep", "milestones": [1, 4], "gamma": 0.1}, [1, 0.1, 0.1, 0.1, 0.01]),
    ({"name": "cosine_restarts", "T_0": 2, "T_mult": 1, "eta_min": 0.0}, [1, 0.5, 1, 0.5, 1]),
    ({"name": "none"}, [1, 1, 1, 1, 1]),
    # TDSNet's 1e-4 -> 5e-5 -> 2e-5 as rates on a base of 1: given values, not a constant factor
    ({"name": "piecewise", "milestones": [1, 3], "lr_values": [0.5, 0.2]}, [1, 0.5, 0.5, 0.2, 0.2]),
])
def test_schedules_per_iteration(sched, expected):
    from mtseg_harness.config import DEFAULTS

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    s = build_scheduler(opt, {**DEFAULTS["sched"], **sched})
    got = []
    for _ in range(5):
        got.append(opt.param_groups[0]["lr"])
        opt.step()
        s.step()
    assert got == pytest.approx(expected)


def test_bf16_autocast_and_gradient_clipping_on_cpu(tmp_path):
    cfg = tiny_config(tmp_path, train={"steps": 2, "amp": "bf16", "grad_clip": 0.01})
    tr = build_trainer(cfg)
    assert tr.amp_dtype == torch.bfloat16
    tr.fit()
    assert tr.history[-1]["grad_norm"] > 0
    assert all(p.dtype == torch.float32 for p in tr.model.parameters())


def test_hog_mtl_method_defaults_apply_unless_overridden(tmp_path):
    cfg = load_config(None, ["method.name=hog_mtl"])
    assert cfg["optim"]["name"] == "adam" and cfg["optim"]["lr"] == 2e-4
    assert cfg["sched"] == {**cfg["sched"], "name": "step", "step_size": 50_000, "gamma": 0.5}
    assert cfg["train"]["steps"] == 150_000
    cfg = load_config(None, ["method.name=hog_mtl", "optim.lr=1e-3"])
    assert cfg["optim"]["lr"] == 1e-3


def test_tensorboard_event_file_when_installed(tmp_path):
    pytest.importorskip("tensorboard")
    cfg = tiny_config(tmp_path, train={"steps": 2, "tensorboard": True, "val_every": 2})
    build_trainer(cfg).fit()
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert {"train/loss", "val/dice_fg"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2]


def test_loader_workers_and_memory_cache_do_not_change_the_result(tmp_path):
    a = build_trainer(tiny_config(tmp_path / "a", train={"steps": 3}))
    a.fit()
    b = build_trainer(tiny_config(tmp_path / "b", train={"steps": 3}, data={"num_workers": 2}))
    b.fit()
    _same(_weights(a.model), _weights(b.model))
    c = build_trainer(tiny_config(tmp_path / "c", train={"steps": 3}, data={"cache_in_memory": True}))
    c.fit()
    _same(_weights(a.model), _weights(c.model))
    assert len(c.train_set.cache) > 0


#: A run whose step hook keeps a caught exception in a reference cycle (as plotting code
#: may), then a loader whose worker runs a full garbage collection: the training iterator
#: must not be left to that collection (the demo printed "can only test a child process").
_WORKER_GC_SCRIPT = """
import gc, sys
from torch.utils.data import DataLoader, Dataset
from mtseg_harness.runs import build_trainer, load_config

cfg = load_config(None, [], base={
    "seed": 0, "device": "cpu",
    "data": {"name": "hc18", "root": sys.argv[1], "batch_size": 4, "input_size": [32, 48], "num_workers": 1},
    "model": {"name": "unet", "options": {"base_channels": 4, "depth": 2}},
    "train": {"steps": 2, "val_every": 0, "checkpoint_every": 0, "progress": False, "out_dir": sys.argv[2],
              "tensorboard": False}})
trainer = build_trainer(cfg)

def keeps_a_cycle(ctx):
    try:
        raise RuntimeError("kept")
    except RuntimeError as e:
        kept = e  # exception -> traceback -> this frame -> kept: a cycle that holds the caller frames

trainer.method.after_step = keeps_a_cycle
gc.collect()
gc.disable()  # the parent does not collect before the next loader forks its worker
trainer.fit()

class Collects(Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        gc.collect()
        return i

print("items", sum(1 for _ in DataLoader(Collects(), num_workers=1)))
"""


def test_the_training_loader_is_shut_down_by_fit_not_by_a_later_worker(tmp_path):
    import subprocess
    import sys

    from .helpers import SAMPLE

    done = subprocess.run([sys.executable, "-c", _WORKER_GC_SCRIPT, str(SAMPLE), str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "items 2" in done.stdout
    assert "can only test a child process" not in done.stderr and "Exception ignored" not in done.stderr, done.stderr


def test_on_error_skip_trains_and_evaluates_when_the_first_sample_is_bad(tmp_path):
    """A bad file at index 0 with on_error=skip: the model's channels come from the first
    sample that reads, training and evaluation pass over the bad sample (it used to crash)."""
    import dataset_writers as W
    import pandas as pd

    from mtseg_harness.runs import run_eval

    root = tmp_path / "hc18"
    W.write_hc18(root, n=6)
    W.truncate(root / "training_set" / "000_HC.png", 0.5)  # index 0 of every split that holds it
    cfg = tiny_config(tmp_path / "run", data={"root": str(root), "batch_size": 2, "options": {"on_error": "skip"},
                                              "splits": {"train": "all", "val": None, "test": "all"}},
                      train={"steps": 3})
    tr = build_trainer(cfg)
    assert tr.train_set[0] is None and tr.model.in_channels == 1
    tr.fit()
    assert tr.step == 3
    table, summary, _ = run_eval(cfg, split_key="test", out_dir=tmp_path / "eval", quiet=True)
    assert table["case_id"].tolist() == ["001_HC", "002_HC", "003_HC", "004_HC", "005_2HC"]
    assert summary["n_images"] == 5
    assert len(pd.read_csv(tmp_path / "eval" / "per_image.csv")) == 5


@pytest.mark.parametrize("select", ["miou", "dice_fg"])
def test_best_checkpoint_follows_the_selection_metric(tmp_path, monkeypatch, select):
    # HOG-MTL keeps the checkpoint of the best validation mIoU; the default is foreground Dice.
    # Scripted validation scores whose maxima fall on different steps (miou: step 2, dice_fg: step 3).
    import mtseg_harness.training.trainer as T

    scores = iter([(0.5, 0.1), (0.9, 0.2), (0.7, 0.8), (0.6, 0.3)])

    def scripted(*args, **kwargs):
        miou, dice = next(scores)
        return None, {"miou": miou, "dice_fg": dice, "dice_fg_n_nan": 0, "n_images": 1}, []

    monkeypatch.setattr(T, "evaluate", scripted)
    cfg = tiny_config(tmp_path, train={"steps": 4, "val_every": 1, "select_metric": select})
    tr = build_trainer(cfg)
    tr.fit()
    want_step, want = {"miou": (2, 0.9), "dice_fg": (3, 0.8)}[select]
    assert tr.best_step == want_step and tr.best == pytest.approx(want)
    assert load_checkpoint(tmp_path / "best.pt")["step"] == want_step
