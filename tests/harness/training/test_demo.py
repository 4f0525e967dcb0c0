"""``mtseg demo``: its configs, its statistics (hand-computed cases), and the README's demo block in step with it."""

from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mtseg_harness.runs import load_config
from mtseg_harness.runs.demo import (RUNS, TABLE_COLUMNS, config_dir, demo_config, format_report, paired_difference,
                                     report_notes, summarize, verdict)

REPO = Path(__file__).resolve().parents[3]


def _tool():
    spec = importlib.util.spec_from_file_location("demo_readme", REPO / "tools" / "demo_readme.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_demo_reads_its_runs_from_configs_that_differ_only_in_the_method(tmp_path):
    assert config_dir() == REPO / "configs"
    cfgs = {name: load_config(REPO / "configs" / f) for name, f in RUNS.items()}
    base = cfgs["baseline"]
    assert base["data"]["name"] == "hc18_tiles" and base["data"]["options"] == {"tile": [80, 80], "image_size": [160, 240]}
    assert base["train"]["resume"] is False  # every demo run trains anew
    same = lambda c: {**c, "sched": {k: v for k, v in c["sched"].items() if k != "step_size"},  # noqa: E731
                      "train": {k: v for k, v in c["train"].items() if k != "out_dir"}}  # (step_size: unused by multistep)
    for name, cfg in cfgs.items():
        for key in ("data", "model", "optim", "sched", "train", "eval", "seed", "device"):
            assert same(cfg)[key] == same(base)[key], (name, key)
    assert [c["method"]["name"] for c in cfgs.values()] == ["baseline", "hog_mtl", "tdsnet", "recursive_approx"]
    # the seg loss of the auxiliary-task runs is the baseline's
    assert base["method"]["loss"] == cfgs["+HOG"]["method"]["seg_loss"] == cfgs["+presence/sync"]["method"]["seg_loss"]
    cfg = demo_config("+HOG", tmp_path, seed=2, steps=40)
    assert cfg["seed"] == 2 and cfg["train"]["out_dir"] == str(tmp_path / "hog" / "seed2")
    assert (cfg["train"]["steps"], cfg["sched"]["milestones"], cfg["train"]["val_every"]) == (40, [30], 8)


def test_paired_difference_of_a_constant_is_that_constant_with_no_width():
    mean, lo, hi = paired_difference(np.full((3, 5), 0.25))
    assert mean == pytest.approx(0.25) and lo == pytest.approx(0.25) and hi == pytest.approx(0.25)
    assert verdict(lo, hi) == "higher" and verdict(-hi, -lo) == "lower" and verdict(-0.1, 0.2) == "within noise"
    assert all(math.isnan(v) for v in paired_difference(np.zeros((0, 3))))
    # an interval that reaches 0 does not exclude it
    assert verdict(*paired_difference(np.zeros((3, 5)))[1:]) == "within noise"
    assert verdict(0.0, 0.1) == verdict(-0.1, 0.0) == "within noise"


def test_paired_difference_interval_matches_the_normal_interval_of_a_mean():
    # one seed, many images: the bootstrap interval of the mean ~ mean +- 1.96 sd / sqrt(n)
    rng = np.random.default_rng(7)
    d = rng.normal(0.01, 0.05, size=(1, 400))
    mean, lo, hi = paired_difference(d, n_boot=4000)
    half = 1.96 * d.std(ddof=1) / math.sqrt(d.size)
    assert mean == pytest.approx(d.mean())
    assert lo == pytest.approx(d.mean() - half, abs=0.25 * half) and hi == pytest.approx(d.mean() + half, abs=0.25 * half)


def test_paired_difference_counts_the_seeds_as_noise():
    # every image gains in seed 0 and loses as much in seed 1: within noise, however many images
    d = np.vstack([np.full(200, 0.05), np.full(200, -0.05)])
    mean, lo, hi = paired_difference(d)
    assert mean == pytest.approx(0.0) and lo < 0 < hi and verdict(lo, hi) == "within noise"


def _frames():
    """Two methods, two seeds, two images, three tiles each: values chosen so that every cell is hand-computed."""
    dice = {("baseline", 0): [0.8, 0.6], ("baseline", 1): [0.7, 0.5], ("+X", 0): [0.9, 0.6], ("+X", 1): [0.7, 0.7]}
    hd95 = {("baseline", 0): [2.0, 4.0], ("baseline", 1): [3.0, math.inf], ("+X", 0): [1.0, 1.0], ("+X", 1): [2.0, 2.0]}
    img, til = [], []
    for (m, s), ds in dice.items():
        for k, dv in enumerate(ds):
            img.append({"method": m, "seed": s, "image_id": f"i{k}", "dice": dv, "iou": dv / (2 - dv),
                        "hd95_mm": hd95[(m, s)][k]})
            # per image: one tile with the head, two without; baseline seed 0 marks head in one head-free tile
            fp = [5, 0] if (m, s, k) == ("baseline", 0, 0) else [0, 0]
            til.append({"method": m, "seed": s, "image_id": f"i{k}", "head": True, "pred_pixels": 30})
            til += [{"method": m, "seed": s, "image_id": f"i{k}", "head": False, "pred_pixels": p} for p in fp]
    return pd.DataFrame(img), pd.DataFrame(til)


def test_summarize_on_a_hand_computed_case():
    table = summarize(*_frames(), ["baseline", "+X"]).set_index("method")
    assert list(table.reset_index().columns) == list(TABLE_COLUMNS)
    # baseline: per-seed means 0.7 and 0.6 -> 0.650 +- 0.0707; +X: 0.75 and 0.70 -> 0.725 +- 0.0354
    assert table.loc["baseline", "Dice"] == "0.650 ± 0.071"
    assert table.loc["+X", "Dice"] == "0.725 ± 0.035"
    # HD95 leaves the infinite image out: baseline seeds 3.0 and 3.0 -> 3.00 +- 0.00
    assert table.loc["baseline", "HD95 (mm)"] == "3.00 ± 0.00" and table.loc["+X", "HD95 (mm)"] == "1.50 ± 0.71"
    # false head: baseline seed 0 has 1 of 4 head-free tiles marked, seed 1 none -> 0.125 +- 0.177
    assert table.loc["baseline", "false head"] == "0.12 ± 0.18" and table.loc["+X", "false head"] == "0.00 ± 0.00"
    # paired differences +X - baseline: seed 0 [0.1, 0.0], seed 1 [0.0, 0.2] -> mean 0.075
    assert table.loc["+X", "ΔDice vs baseline [95% CI]"].startswith("+0.075 [")
    lo, hi = (float(v) for v in re.findall(r"[-+]\d\.\d+", table.loc["+X", "ΔDice vs baseline [95% CI]"])[1:])
    assert 0 <= lo <= 0.075 <= hi <= 0.2
    assert table.loc["baseline", "verdict"] == "—"


def _mask_numbers(text: str) -> str:
    return re.sub(r"\d+", "N", text)


def test_the_readme_demo_block_has_the_demo_format():
    tool = _tool()
    block = tool.readme_block((REPO / "README.md").read_text())
    lines = block.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == list(TABLE_COLUMNS)
    rows = [ln for ln in lines[2:] if ln.startswith("|")]
    assert [r.strip("|").split("|")[0].strip() for r in rows] == list(RUNS)
    for note in report_notes(steps=1, seeds=3, n_images=1, n_tiles=1, n_free=1):
        assert _mask_numbers(f"- {note}") in _mask_numbers(block), note


def test_the_readme_tool_replaces_the_block_with_the_report_body():
    tool = _tool()
    readme = f"intro\n{tool.BEGIN}\nold table\n{tool.END}\nrest\n"
    body = format_report("| method |\n|---|\n| baseline |", ["a note"]) + "\nwall time 3 s"
    out = tool.splice(readme, "# mtseg demo (embedded HC18 sample)\n\n" + body)
    assert out == f"intro\n{tool.BEGIN}\n{body.strip()}\n{tool.END}\nrest\n"
    assert tool.splice(out, "# t\n\n" + body) == out  # idempotent
    with pytest.raises(ValueError, match="markers"):
        tool.splice("no markers", body)
