"""CMU-Net's LiTS protocol end to end on fixture data: the 10/2/5 scan split, PU-Net's two
phases (the second starting from the first's encoder), and repeated runs with mean +- sd."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import dataset_writers as W
from .helpers import REPO, SAMPLE
from mtseg_harness.cli import main
from mtseg_harness.config import ConfigError
from mtseg_harness.data import DatasetError, LiTS
from mtseg_harness.runs import build_trainer, load_config, mean_sd
from mtseg_harness.training import load_checkpoint

CONFIGS = REPO / "configs"
PROTOCOL = {"train": list(range(10)), "val": [10, 11], "test": [12, 13, 14, 15, 16]}


@pytest.fixture(scope="module")
def lits_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("lits")
    W.write_lits(root, n_volumes=18)  # volume-17 is not in the protocol
    return root


def test_scan_protocol_reads_the_listed_volumes_only_and_counts_their_slices(lits_root):
    ds = LiTS(lits_root, split="all", scans=PROTOCOL)
    assert sorted({r["scan"] for r in ds.records}) == sorted(f"volume-{n}" for n in range(17))
    assert ds.slice_counts() == {"train": 50, "val": 10, "test": 25}  # 5 slices per fixture volume
    for split, numbers in PROTOCOL.items():
        scans = {r["scan"] for r in LiTS(lits_root, split=split, scans=PROTOCOL).records}
        assert scans == {f"volume-{n}" for n in numbers}


def test_scan_protocol_errors(lits_root):
    with pytest.raises(DatasetError, match=r"volume\(s\) \[40\]"):
        LiTS(lits_root, split="train", scans={"train": [0, 40]})
    with pytest.raises(ValueError, match="volume-3 is in train and in test"):
        LiTS(lits_root, split="train", scans={"train": [3], "test": [3]})
    with pytest.raises(ValueError, match="expected the splits"):
        LiTS(lits_root, split="train", scans={"training": [3]})


def test_the_configs_use_the_17_scan_protocol():
    for name in ("baseline", "cmunet", "punet_pretrain", "punet"):
        cfg = load_config(CONFIGS / f"lits_cmunet_{name}.yaml")
        assert cfg["data"]["options"]["scans"] == PROTOCOL
        assert cfg["train"]["epochs"] == 100


TINY = ["model.options={channels: [4, 8]}", "data.input_size=[16, 16]", "train.epochs=1", "train.progress=false",
        "train.tensorboard=false", "device=cpu", "data.num_workers=0", "eval.hd=false", "eval.pad_multiple=4"]


def _cfg(name, root, out_dir, *more):
    return load_config(CONFIGS / f"lits_cmunet_{name}.yaml",
                       TINY + [f"data.root={root}", f"train.out_dir={out_dir}", *more])


def test_punet_second_phase_starts_from_the_first_phases_encoder(lits_root, tmp_path):
    pre = build_trainer(_cfg("punet_pretrain", lits_root, tmp_path / "pre"))
    fresh = {k: v.clone() for k, v in pre.model.state_dict().items()}
    pre.fit()
    assert pre.step == 5  # one epoch: 50 training slices / batch 10
    phase1 = load_checkpoint(tmp_path / "pre" / "last.pt")["model"]
    enc = [k for k in phase1 if k.startswith("encoder.")]
    dec = [k for k in phase1 if k.startswith(("decoder.", "out."))]
    assert enc and dec
    assert any(not torch.equal(phase1[k], fresh[k]) for k in enc)  # the encoder learned
    assert all(torch.equal(phase1[k], fresh[k]) for k in dec)  # the decoder did not

    cfg2 = _cfg("punet", lits_root, tmp_path / "seg", f"model.init_from={tmp_path / 'pre' / 'last.pt'}")
    assert cfg2["method"] == {"name": "baseline", "loss": "dice"}
    seg = build_trainer(cfg2)
    state = seg.model.state_dict()
    assert "presence_head" not in " ".join(state)  # segmentation alone: no class head
    for k in enc:
        torch.testing.assert_close(state[k], phase1[k], rtol=0, atol=0)
    seg.fit()
    assert (tmp_path / "seg" / "best.pt").is_file()


def test_init_from_refuses_weights_it_cannot_copy(lits_root, tmp_path):
    pre = build_trainer(_cfg("punet_pretrain", lits_root, tmp_path / "pre", "train.epochs=null", "train.steps=1"))
    pre.fit()
    ckpt = tmp_path / "pre" / "last.pt"
    with pytest.raises(ConfigError, match="no weight"):
        build_trainer(_cfg("punet", lits_root, tmp_path / "a", f"model.init_from={ckpt}", "model.init_prefixes=[enc.]"))
    with pytest.raises(ConfigError, match="other shape"):
        build_trainer(_cfg("punet", lits_root, tmp_path / "b", f"model.init_from={ckpt}",
                           "model.options={channels: [4, 16]}"))


def test_cmunet_config_trains_an_epoch_and_selects_on_validation(lits_root, tmp_path):
    cfg = _cfg("cmunet", lits_root, tmp_path, "train.epochs=2")
    tr = build_trainer(cfg)
    assert tr.steps_per_epoch == 50 // 6
    tr.fit()
    val = (tmp_path / "val_log.csv").read_text().splitlines()
    assert [int(line.split(",")[0]) for line in val[1:]] == [8, 16]
    assert tr.history[-1]["cls"] >= 0 and "dice" in tr.history[-1]


def test_mean_sd_by_hand():
    mean, sd, n = mean_sd([1.0, 2.0, 3.0, 4.0, float("nan")])
    assert (mean, n) == (2.5, 4) and sd == pytest.approx(math.sqrt(5 / 3))
    assert math.isnan(mean_sd([0.7])[1])


def test_seeds_train_one_run_each_and_eval_reports_mean_and_sd_across_them(tmp_path, capsys):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(yaml.safe_dump({"method": {"name": "baseline"}, "data": {"batch_size": 4, "root": str(SAMPLE)},
                                   "model": {"options": {"base_channels": 4, "depth": 2}},
                                   "train": {"steps": 2, "val_every": 2, "out_dir": str(tmp_path / "run")}}))
    common = ["data.input_size=[32,48]", "train.progress=false", "train.tensorboard=false", "device=cpu",
              "eval.hd=false"]
    assert main(["train", "--config", str(cfg), "--seeds", "0", "3", "--set", *common]) == 0
    for s in (0, 3):
        saved = yaml.safe_load((tmp_path / "run" / f"seed-{s}" / "config.yaml").read_text())
        assert saved["seed"] == s
    capsys.readouterr()
    assert main(["eval", "--config", str(cfg), "--seeds", "0", "3", "--split", "val", "--set", *common]) == 0
    printed = capsys.readouterr().out
    per_run = [yaml.safe_load((tmp_path / "run" / f"seed-{s}" / "eval_val" / "summary.yaml").read_text())["dice_fg"]
               for s in (0, 3)]
    summary = yaml.safe_load((tmp_path / "run" / "seeds_val.yaml").read_text())
    assert summary["seeds"] == [0, 3]
    assert summary["dice_fg"]["values"] == pytest.approx(per_run)
    assert summary["dice_fg"]["mean"] == pytest.approx(np.mean(per_run))
    assert summary["dice_fg"]["sd"] == pytest.approx(np.std(per_run, ddof=1))
    assert f"val dice_fg: {np.mean(per_run):.4f} ± {np.std(per_run, ddof=1):.4f} (2 runs)" in printed
