"""TDSNet's configs run their protocol end to end on fixture data of their dataset: a few
training steps through all three stages (tiny network in place of the paper's), then
``mtseg eval``'s run_eval in the paper's form (BraTS: sliding window over the whole volume,
Dice and HD95 of ET/TC/WT; REFUGE: disc and cup Dice)."""

from __future__ import annotations

from pathlib import Path

import pytest

import dataset_writers as W
from mtseg_harness.evaluation import SlidingWindow
from mtseg_harness.runs import build_trainer, load_config, run_eval

REPO = Path(__file__).resolve().parents[3]
WRITERS = {
    "endovis18": lambda r: W.write_endovis18(r, (1, 2, 3)),
    "refuge": W.write_refuge,
    "brats18": lambda r: W.write_brats(r, {"HGG": ["Brats18_A_1", "Brats18_A_2"], "LGG": ["Brats18_B_1"]}),
}
CONFIGS = ["endovis18_tdsnet_tdsnet", "endovis18_tdsnet_baseline", "refuge_tdsnet_tdsnet", "brats18_unet3d_aniso_tdsnet"]


@pytest.mark.parametrize("name", CONFIGS)
def test_config_trains_through_its_stages_and_reports_in_the_papers_form(name, tmp_path, capsys, monkeypatch):
    path = REPO / "configs" / f"{name}.yaml"
    data = load_config(path)["data"]["name"]
    root = tmp_path / "data"
    WRITERS[data](root)
    cfg = load_config(path, [f"data.root={root}", "data.splits={train: all, val: null, test: all}",
                             f"train.out_dir={tmp_path / 'run'}", "train.progress=false", "data.num_workers=0",
                             "device=cpu", "train.tensorboard=false", "train.steps=3", "train.val_every=0",
                             "train.checkpoint_every=0", "train.log_every=1", "data.batch_size=1",
                             "sched.milestones=[1, 2]"])
    three_d = data == "brats18"
    cfg["model"] = {"name": "unet", "options": {"base_channels": 4, "depth": 1, **({"spatial_dims": 3} if three_d else {})}}
    if three_d:  # the fixture volumes (8 x 16 x 20) are smaller than the paper's crop
        cfg["data"]["augment"]["crop"] = [4, 8, 8]
        cfg["eval"]["window"] = [4, 8, 8]
    else:
        cfg["data"]["input_size"] = [16, 24]
    tr = build_trainer(cfg)
    tr.fit()
    assert tr.step == 3
    # the rate after each milestone is the config's value, not a factor of the previous one
    assert tr.optimizer.param_groups[0]["lr"] == pytest.approx(cfg["sched"]["lr_values"][-1])
    capsys.readouterr()
    windows = []
    forward = SlidingWindow.forward
    monkeypatch.setattr(SlidingWindow, "forward", lambda self, x: windows.append((self.window, x.shape)) or forward(self, x))
    table, summary, _ = run_eval(cfg, split_key="test", keep_examples=0)
    out = capsys.readouterr().out
    if data == "brats18":
        assert {"dice_ET", "dice_TC", "dice_WT", "hd95_ET", "hd95_TC", "hd95_WT"} <= set(table.columns)
        assert "test regions: dice_ET" in out and "hd95_WT" in out
        # the whole volume (D, H, W) = (8, 16, 20) went through 4 x 8 x 8 windows
        assert windows and all(w == (4, 8, 8) and tuple(s[2:]) == (8, 16, 20) for w, s in windows)
    elif data == "refuge":
        assert {"dice_disc", "dice_cup"} <= set(table.columns)
        assert "test regions: dice_disc" in out and "dice_cup" in out
    else:
        assert not windows
    assert len(table) == summary["n_images"] > 0
