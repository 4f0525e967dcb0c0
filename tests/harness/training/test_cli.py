"""The ``mtseg`` command line: help, train with overrides, eval, labels, bench, demo (quick)."""

import os
import subprocess
import sys

import pandas as pd
import pytest
import torch
import yaml

from .helpers import REPO, SAMPLE
from mtseg_harness.cli import main

TINY = ["model.options={base_channels: 4, depth: 2}", "data.input_size=[32,48]", "train.progress=false",
        "train.tensorboard=false", "device=cpu", f"data.root={SAMPLE}", "eval.hd=false"]


def test_help_lists_the_commands():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "mtseg_harness.cli", "--help"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0
    for cmd in ("train", "eval", "labels", "bench", "demo"):
        assert cmd in out.stdout


def test_train_then_eval_from_a_config_file(tmp_path, capsys):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(yaml.safe_dump({"method": {"name": "hog_mtl"}, "data": {"batch_size": 4},
                                   "train": {"steps": 50, "val_every": 2, "out_dir": str(tmp_path / "run")}}))
    assert main(["train", "--config", str(cfg), "--set", "train.steps=2", *TINY]) == 0
    assert "trained 2 steps" in capsys.readouterr().out
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["train"]["steps"] == 2 and saved["optim"]["lr"] == 2e-4  # the hog_mtl method default (the authors' code: lr_seg_net 0.0002)
    assert main(["eval", "--config", str(cfg), *TINY, "--split", "val"]) == 0
    table = pd.read_csv(tmp_path / "run" / "eval_val" / "per_image.csv")
    assert len(table) == 20 and {"dice_head", "iou_head"} <= set(table.columns)
    # eval from the checkpoint alone (its stored config)
    assert main(["eval", "--checkpoint", str(tmp_path / "run" / "best.pt"), "--out", str(tmp_path / "e2")]) == 0
    assert (tmp_path / "e2" / "summary.yaml").is_file()


def test_bad_override_is_a_config_error(capsys):
    assert main(["train", "--set", "train.nope=1"]) == 2
    assert "unknown key" in capsys.readouterr().err


def test_labels_writes_hog_presence_and_weak_labels(tmp_path):
    from mtseg_harness.data import WeakLabels, create_dataset

    assert main(["labels", *TINY, "--out", str(tmp_path), "--split", "val", "--kind", "hog", "presence", "weak"]) == 0
    hog = torch.load(tmp_path / "hog.pt", weights_only=True)
    assert hog["hog"].shape == (20, 504) and len(hog["case_id"]) == 20
    pres = pd.read_csv(tmp_path / "presence.csv")
    assert list(pres.columns) == ["case_id", "background", "head"] and pres["head"].sum() == 20
    ds = create_dataset("hc18", SAMPLE, split="val")
    weak = WeakLabels(ds, weak_dir=tmp_path / "weak")[0]
    assert weak["weak"].shape == weak["mask"].shape
    inside = weak["weak"] > 0
    assert inside.any() and (weak["mask"][inside] == 1).all()  # weak regions lie inside the head


def test_bench_prints_a_table(capsys):
    assert main(["bench", "--size", "32", "48", "--batch", "2", "--repeat", "1", "--base-channels", "4",
                 "--methods", "baseline", "hog_mtl"]) == 0
    out = capsys.readouterr().out
    assert "hog_mtl" in out and "vs_baseline" in out


def test_demo_quick_with_seeds_writes_the_report(tmp_path, capsys):
    assert main(["demo", "--quick", "--steps", "1", "--seeds", "2", "--out", str(tmp_path),
                 "--methods", "+presence/sync"]) == 0
    out = capsys.readouterr().out
    assert "within noise" in out or "higher" in out or "lower" in out
    table = pd.read_csv(tmp_path / "comparison.csv")
    assert table["method"].tolist() == ["baseline", "+presence/sync"]  # the baseline always runs
    per_image = pd.read_csv(tmp_path / "per_image.csv")
    assert sorted(set(per_image["seed"])) == [0, 1] and per_image.groupby(["method", "seed"]).size().eq(40).all()
    assert ((per_image["dice"] >= 0) & (per_image["dice"] <= 1)).all()
    per_tile = pd.read_csv(tmp_path / "per_tile.csv")
    assert per_tile.groupby(["method", "seed"]).size().eq(240).all()
    # only the presence run has a presence head
    assert per_tile[per_tile["method"] == "baseline"]["presence_prob"].isna().all()
    assert per_tile[per_tile["method"] == "+presence/sync"]["presence_prob"].between(0, 1).all()
    for f in ("report.md", "curves.png", "overlays.png"):
        assert (tmp_path / f).is_file()
    assert (tmp_path / "presence_sync" / "seed1" / "best.pt").is_file()


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err  # no traceback
    return lines[0]


def test_train_again_with_another_lr_or_model_refuses_in_one_line(tmp_path, capsys):
    """common.yaml's resume: true, a second run into the same out_dir with another lr (or model):
    one line with the differing keys and the way out, exit 2, the folder as it was."""
    run = tmp_path / "run"
    args = ["train", *TINY, "train.steps=2", "train.val_every=0", "train.resume=true", f"train.out_dir={run}"]
    assert main(args) == 0
    saved = {n: (run / n).read_bytes() for n in ("config.yaml", "last.pt")}
    capsys.readouterr()
    assert main(args + ["optim.lr=0.01"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("mtseg: config error: cannot resume") and "optim.lr 0.001 -> 0.01" in line
    assert "train.out_dir" in line and "train.resume=false" in line
    assert main(args + ["model.options={base_channels: 8, depth: 2}"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "model.options.base_channels 4 -> 8" in line
    assert {n: (run / n).read_bytes() for n in saved} == saved
    # the step budget may change: it resumes and says so
    assert main(args[:-4] + ["train.steps=3", "train.val_every=0", "train.resume=true", f"train.out_dir={run}"]) == 0
    out = capsys.readouterr()
    assert f"resuming {run / 'last.pt'} at step 2 of 3 (step budget 2 -> 3)" in out.err
    assert "trained 3 steps" in out.out


def test_eval_builds_the_network_the_checkpoint_was_trained_with(tmp_path, capsys):
    """--config with another model width (and input size) than the run in train.out_dir: the
    network comes from the checkpoint, one line says so, and the numbers equal an evaluation
    with the run's own config."""
    run = tmp_path / "run"
    assert main(["train", *TINY, "train.steps=2", "train.val_every=0", f"train.out_dir={run}"]) == 0
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({"model": {"options": {"base_channels": 8, "depth": 3}},
                                     "data": {"input_size": [64, 96]}}))
    capsys.readouterr()
    assert main(["eval", "--config", str(other), *TINY[2:], "--set", f"train.out_dir={run}",
                 "--split", "val", "--out", str(tmp_path / "e_other")]) == 0
    err = capsys.readouterr().err
    assert "model.options.base_channels 8 -> 4" in err and "model.options.depth 3 -> 2" in err
    assert "data.input_size [64, 96] -> [32, 48]" in err
    assert main(["eval", *TINY, "--set", f"train.out_dir={run}", "--split", "val", "--out", str(tmp_path / "e_own")]) == 0
    assert "differs" not in capsys.readouterr().err
    a = pd.read_csv(tmp_path / "e_other" / "per_image.csv")
    b = pd.read_csv(tmp_path / "e_own" / "per_image.csv")
    pd.testing.assert_frame_equal(a, b)


def test_a_damaged_checkpoint_is_one_line_naming_the_file(tmp_path, capsys):
    bad = tmp_path / "best.pt"
    bad.write_bytes(b"\x00" * 100)
    assert main(["eval", "--checkpoint", str(bad)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"mtseg: checkpoint {bad}") and "corrupted" in line


def test_demo_recursive_run_evaluates_its_tiles(tmp_path):
    """The recursive method's segment returns (labels, instances); the demo's tile
    evaluation takes the labels (it indexed the pair as a batch and crashed)."""
    assert main(["demo", "--quick", "--steps", "1", "--seeds", "1", "--out", str(tmp_path),
                 "--methods", "recursive approx. (10% strong)"]) == 0
    per_image = pd.read_csv(tmp_path / "per_image.csv")
    assert per_image.groupby("method").size().eq(40).all() and len(set(per_image["method"])) == 2
    assert ((per_image["dice"] >= 0) & (per_image["dice"] <= 1)).all()
