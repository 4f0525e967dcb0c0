"""Progress and reports a researcher reads: a throttled progress bar in log files, validation
lines, ``mtseg labels`` progress, weak-label PNGs that show their classes, overlays with a
legend and per-image Dice (also for a prediction covering the whole image), loss curves
that say when methods' losses are different sums."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from .helpers import tiny_config
from mtseg_harness.data import WeakLabels, create_dataset
from mtseg_harness.evaluation.report import label_palette, overlay_figure, plot_curves
from mtseg_harness.runs import build_trainer, precompute_labels


def test_progress_bar_in_a_log_file_is_throttled(tmp_path, capsys):
    tr = build_trainer(tiny_config(tmp_path, train={"steps": 12, "progress": True}))
    capsys.readouterr()
    tr.fit()
    err = capsys.readouterr().err
    # stderr is not a terminal here: the first draw and the last state only, not one per step
    assert 1 <= err.count("\r") <= 3, err
    assert "12/12" in err


def test_validation_metrics_are_printed(tmp_path, capsys):
    tr = build_trainer(tiny_config(tmp_path, train={"steps": 4, "val_every": 2}))
    tr.fit()
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "validation:" in ln]
    assert len(lines) == 2 and lines[0].startswith("step 2/4 validation: dice_fg")
    assert f"{tr.val_history[0]['dice_fg']:.4f}" in lines[0] and "miou" in lines[0] and "(20 images)" in lines[0]


def test_labels_progress_and_weak_pngs_that_show_their_classes(tmp_path, capsys):
    cfg = tiny_config(tmp_path / "run", method={"name": "recursive_approx"})
    written = precompute_labels(cfg, tmp_path / "labels", kinds=("weak",), split_key="val")
    assert "20/20" in capsys.readouterr().err
    files = sorted(written["weak"].glob("*.png"))
    assert len(files) == 20
    ds = create_dataset("hc18", cfg["data"]["root"], split="val")
    back = WeakLabels(ds, weak_dir=written["weak"])
    for i in range(3):
        png = Image.open(written["weak"] / f"{ds[i]['case_id']}.png")
        assert png.mode == "P"
        ids = np.array(png)
        assert set(np.unique(ids).tolist()) == {0, 1}                     # the values are the class ids
        assert np.array_equal(back[i]["weak"].numpy(), ids)               # and read back as such
        rgb = np.array(png.convert("RGB"))
        assert rgb[ids == 1].max(axis=1).min() == 255                    # class 1 is bright
        assert rgb[ids == 0].max() == 0                                            # background black
    pal = np.array(label_palette(18)).reshape(256, 3)
    assert len({tuple(c) for c in pal[:18]}) == 18 and tuple(pal[255]) == (255, 255, 255)


def _layer(ax) -> np.ndarray:
    return np.asarray(ax.get_images()[-1].get_array())


def test_overlays_legend_dice_and_a_prediction_covering_the_image():
    img = np.zeros((1, 20, 30), np.float32)
    tgt = np.zeros((20, 30), np.int64)
    tgt[5:15, 5:20] = 1
    tgt[0, :] = 255
    full = np.ones_like(tgt)
    half = np.zeros_like(tgt)
    half[5:15, 5:12] = 1
    fig = overlay_figure({"run": [(img, tgt, full), (img, tgt, half)]})
    ax_full, ax_half = fig.axes[0], fig.axes[1]
    red = lambda layer: (layer[..., 0] == 1) & (layer[..., 1] == 0) & (layer[..., 3] == 1)  # noqa: E731
    layer = _layer(ax_full)
    edge = red(layer)
    # the whole-image prediction is outlined along the border (not on the ignored top row)
    assert edge[-1].all() and edge[1:, 0].all() and edge[1:, -1].all() and not edge[0].any()
    assert not edge[3:-3, 3:-3].any()
    valid = tgt != 255
    d_full = 2 * ((tgt == 1) & valid).sum() / (((tgt == 1) & valid).sum() + valid.sum())
    d_half = 2 * 70 / (150 + 70)
    assert f"Dice {d_full:.3f}" in ax_full.get_title() and f"Dice {d_half:.3f}" in ax_half.get_title()
    green = (layer[..., 1] == 1) & (layer[..., 0] == 0)
    assert green[5, 5:20].all() and not green[8:12, 8:17].any()  # target outline, interior empty
    texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert texts == ["ground truth outline", "prediction outline"]
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_loss_curves_say_when_losses_are_different_sums(tmp_path):
    for name, cols in (("a", {"seg": [1.0, 0.5]}), ("b", {"seg": [1.0, 0.4], "hog": [0.3, 0.2]})):
        (tmp_path / name).mkdir()
        pd.DataFrame({"step": [1, 2], "loss": [1.0, 0.5], **cols, "lr": [1e-3, 1e-3]}).to_csv(
            tmp_path / name / "train_log.csv", index=False)
    import matplotlib.pyplot as plt

    shown = {}
    real_save = plt.Figure.savefig

    def keep(fig, *a, **k):
        ax = fig.axes[0]
        shown.update(title=ax.get_title(), labels=[t.get_text() for t in ax.get_legend().get_texts()])
        return real_save(fig, *a, **k)

    plt.Figure.savefig = keep
    try:
        plot_curves({"base": tmp_path / "a", "hog": tmp_path / "b"}, tmp_path / "c.png")
        assert "not comparable" in shown["title"]
        assert shown["labels"] == ["base: seg", "hog: seg + hog"]
        plot_curves({"base": tmp_path / "a", "again": tmp_path / "a"}, tmp_path / "d.png")
        assert "not comparable" not in shown["title"]
    finally:
        plt.Figure.savefig = real_save
