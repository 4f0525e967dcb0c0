"""The recursive-approximation paper's comparisons (SL-only, GrabCut pseudo-labels), its HC18
and GlaS configs on fixture data, and GlaS Part A / Part B reported separately."""

import logging

import numpy as np
import pytest
import torch

from .helpers import REPO
from mtseg_harness.data import WeakLabels, strong_indices
from mtseg_harness.data.base import create_dataset
from mtseg_harness.evaluation import evaluate
from mtseg_harness.methods.recursive_baselines import grabcut_init, grabcut_labels
from mtseg_harness.runs import build_run, build_trainer, load_config, run_eval
from mtseg_harness.training.data import eval_loader

import dataset_writers as W

PAPER_CONFIGS = ["hc18_unet_recursive_approx", "hc18_unet_sl_only", "hc18_unet_grabcut_pseudo",
                 "glas_unet_recursive_approx", "glas_unet_sl_only", "glas_unet_grabcut_pseudo"]


def _ellipse(shape, c, axes):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return ((yy - c[0]) / axes[0]) ** 2 + ((xx - c[1]) / axes[1]) ** 2 <= 1


def _dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


# ----------------------------------------------------------------------------- strong images


def test_strong_indices_count_fraction_and_prefix():
    assert len(strong_indices(85, 0.1)) == 8              # round(8.5) = 8
    assert len(strong_indices(699, strong_count=25)) == 25
    assert strong_indices(100, strong_count=10) < strong_indices(100, strong_count=11)  # one draw, prefixes
    assert strong_indices(100, 0.2) == strong_indices(100, strong_count=20)
    assert len(strong_indices(4, 0.1)) == 1 and strong_indices(4, 0.0) == set()  # a positive fraction keeps one
    assert strong_indices(100, strong_count=20) != strong_indices(100, strong_count=20, seed=1)
    assert all(0 <= i < 100 for i in strong_indices(100, strong_count=100))
    with pytest.raises(ValueError, match="strong_count"):
        strong_indices(10, strong_count=-1)


def test_strong_count_above_the_images_warns_and_takes_all(caplog):
    with caplog.at_level(logging.WARNING):
        assert strong_indices(3, strong_count=25) == {0, 1, 2}
    assert "strong_count 25 exceeds the 3 training images" in caplog.text


# ----------------------------------------------------------------------------- GrabCut


def test_grabcut_recovers_a_contrasted_object_from_its_weak_region():
    rng = np.random.default_rng(0)
    truth = _ellipse((120, 160), (60, 80), (40, 55))
    img = np.clip(0.25 + 0.5 * truth + 0.08 * rng.standard_normal(truth.shape), 0, 1).astype(np.float32)
    weak = np.zeros(truth.shape, np.int64)
    weak[_ellipse(truth.shape, (60, 80), (15, 20))] = 1
    weak[0, :5] = 255                                     # ignored pixels stay ignored
    out = grabcut_labels(torch.from_numpy(img)[None], torch.from_numpy(weak)).numpy()
    assert _dice(weak == 1, truth) < 0.3                  # the weak label alone is far from the mask
    assert _dice(out == 1, truth) > 0.97
    assert (out[weak == 1] == 1).all()                    # the weak region is sure foreground
    assert (out[0, :5] == 255).all() and set(np.unique(out)) == {0, 1, 255}


def test_grabcut_on_a_downscaled_copy_of_a_large_image():
    rng = np.random.default_rng(2)
    truth = _ellipse((540, 800), (270, 400), (180, 260))
    img = np.clip(0.25 + 0.5 * truth + 0.08 * rng.standard_normal(truth.shape), 0, 1).astype(np.float32)
    weak = np.zeros(truth.shape, np.int64)
    weak[_ellipse(truth.shape, (270, 400), (70, 100))] = 1
    weak[100, 100] = 1                                    # a one-pixel weak region survives the downscale
    out = grabcut_labels(torch.from_numpy(img)[None], torch.from_numpy(weak), max_side=128).numpy()
    assert out.shape == truth.shape
    assert _dice(out == 1, truth) > 0.97
    assert (out[weak == 1] == 1).all()


def test_grabcut_gives_each_object_the_class_of_its_nearest_weak_region():
    rng = np.random.default_rng(1)
    left, right = _ellipse((80, 160), (40, 40), (25, 30)), _ellipse((80, 160), (40, 120), (25, 30))
    img = np.clip(0.2 + 0.6 * (left | right) + 0.05 * rng.standard_normal(left.shape), 0, 1).astype(np.float32)
    img = np.repeat(img[None], 3, axis=0)                 # a colour image
    weak = np.zeros(left.shape, np.int64)
    weak[_ellipse(left.shape, (40, 40), (8, 10))] = 1
    weak[_ellipse(left.shape, (40, 120), (8, 10))] = 2
    out = grabcut_labels(torch.from_numpy(img), torch.from_numpy(weak)).numpy()
    assert _dice(out == 1, left) > 0.95 and _dice(out == 2, right) > 0.95


def test_grabcut_initial_mask_band_around_each_weak_region():
    import cv2

    fg = np.zeros((40, 60), bool)
    fg[10:14, 10:14] = True                  # 16 px: r = sqrt(16 / pi) = 2.257
    fg[20:30, 35:45] = True                  # 100 px: r = 5.642
    gc, _ = grabcut_init(fg, margin=1.0)
    yy, xx = np.mgrid[:40, :60]
    # brute force: distance of every pixel to each square, band radius of the nearer square
    d = [np.min(np.hypot(yy[..., None] - yy[m][None, None], xx[..., None] - xx[m][None, None]), axis=-1)
         for m in (fg & (xx < 30), fg & (xx >= 30))]
    r = np.where(d[0] <= d[1], 2.2568, 5.6419)
    expected = np.where(np.minimum(*d) <= r, cv2.GC_PR_FGD, cv2.GC_PR_BGD)
    expected[fg] = cv2.GC_FGD
    assert np.array_equal(gc, expected)
    assert (grabcut_init(fg, margin=0.0)[0] != cv2.GC_PR_FGD).all()


def test_grabcut_without_weak_region_is_background_and_checks_sizes():
    img = torch.rand(1, 10, 12)
    assert (grabcut_labels(img, torch.zeros(10, 12, dtype=torch.long)) == 0).all()
    with pytest.raises(ValueError, match="differ in size"):
        grabcut_labels(img, torch.zeros(10, 11, dtype=torch.long))
    with pytest.raises(ValueError, match="2D image"):
        grabcut_labels(torch.rand(10, 12), torch.zeros(10, 12, dtype=torch.long))


# ----------------------------------------------------------------------------- configs on fixture data


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("paper")
    W.write_hc18(base / "hc18", n=6, size=(54, 80))
    glas = W.write_glas(base / "glas")
    inst = glas["testB_1"][1].copy()
    inst[inst == 2] = 0                     # Part B: one gland fewer, so the parts' metrics differ
    W.write_png(base / "glas" / "testB_1_anno.bmp", inst, fmt="BMP")
    return {"hc18": base / "hc18", "glas": base / "glas"}


def _config(name, roots, out_dir, *extra):
    path = REPO / "configs" / f"{name}.yaml"
    data = load_config(path)["data"]["name"]
    return load_config(path, [f"data.root={roots[data]}", f"train.out_dir={out_dir}", "train.progress=false",
                              "data.num_workers=0", "device=cpu", "train.tensorboard=false",
                              "model.options={base_channels: 4, depth: 1}", "data.batch_size=1",
                              "data.input_size=[32, 48]", "data.augment={flip_prob: 0.5}",
                              "train.steps=2", "train.val_every=0", "train.checkpoint_every=0",
                              "eval.hd=false", *extra])


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_config_trains_steps_on_fixture_data(name, roots, tmp_path):
    over = ["data.splits={train: all, val: null, test: all}"]
    if name.startswith("hc18"):
        over.append("method.strong_count=2")   # 2 of the 6 fixture images
    if name.endswith("recursive_approx"):
        over.append("method.update_every=1")   # a round of growth after step 1
    tr = build_trainer(_config(name, roots, tmp_path, *over))
    tr.fit()
    assert tr.step == 2 and (tmp_path / "last.pt").is_file()


def test_sl_only_trains_on_the_recursive_methods_strong_images(roots, tmp_path):
    over = ["data.splits={train: all, val: null, test: all}", "method.strong_count=2"]
    sl = build_run(_config("hc18_unet_sl_only", roots, tmp_path, *over), "train", training=True)
    ra = build_run(_config("hc18_unet_recursive_approx", roots, tmp_path, *over), "train", training=True)
    strong = [str(ra.dataset[i]["case_id"]) for i in range(len(ra.dataset)) if ra.dataset[i]["strong"]]
    assert len(sl.dataset) == 2 and len(strong) == 2
    assert sorted(str(sl.dataset[i]["case_id"]) for i in range(2)) == sorted(strong)


def test_grabcut_pseudo_replaces_only_the_weak_images_masks(roots, tmp_path):
    cfg = _config("glas_unet_grabcut_pseudo", roots, tmp_path, "data.splits={train: all, val: null, test: all}",
                  "method.strong_count=1")
    run = build_run(cfg, "train", training=True)
    plain = create_dataset("glas", roots["glas"], "all")
    weak = WeakLabels(plain, strong_count=1)          # the same weak labels the method starts from
    seen = set()
    for i in range(len(run.dataset)):
        s, truth = run.dataset[i], plain[i]["mask"]
        seen.add(bool(s["strong"]))
        if s["strong"]:
            assert torch.equal(s["mask"], truth)
        else:
            assert torch.equal(s["mask"], grabcut_labels(plain[i]["image"],
                                                         weak[i]["weak"], seed=i))
    assert seen == {True, False}


# ----------------------------------------------------------------------------- GlaS Part A / Part B


def test_glas_parts_are_reported_separately_with_known_answers(roots):
    ds = create_dataset("glas", roots["glas"], "test")   # testA_1 and testB_1
    truth = {str(ds[i]["case_id"]): ds[i]["instances"] for i in range(len(ds))}

    def segment(model, image, batch, out_size=None):       # perfect on Part A, empty on Part B
        labels = torch.stack([(truth[c] > 0).long() if c.startswith("testA") else torch.zeros_like(truth[c])
                              for c in batch["case_id"]])
        return labels, torch.stack([truth[c] if c.startswith("testA") else torch.zeros_like(truth[c])
                                    for c in batch["case_id"]])

    cfg = {"data": {"eval_batch_size": 1, "num_workers": 0}}
    _, summary, _ = evaluate(torch.nn.Identity(), segment, eval_loader(ds, cfg), "cpu", num_classes=2,
                             ignore_index=255, class_names=ds.class_names, hd=False, pad_multiple=1,
                             extra_metrics=ds.extra_metrics)
    a, b = summary["by_part"]["testA"], summary["by_part"]["testB"]
    assert a["n_images"] == 1 and b["n_images"] == 1
    assert a["object_dice"] == pytest.approx(1.0) and a["object_hausdorff"] == 0.0 and a["dice_gland"] == 1.0
    assert b["object_dice"] == 0.0 and b["dice_gland"] == 0.0 and b["object_hausdorff_n_inf"] == 1
    assert summary["object_dice"] == pytest.approx(0.5)


def test_mtseg_eval_prints_part_a_and_part_b(roots, tmp_path, capsys):
    cfg = _config("glas_unet_recursive_approx", roots, tmp_path, "method.update_every=0",
                  "data.splits={train: train, val: null, test: test}")
    build_trainer(cfg).fit()
    capsys.readouterr()
    _, summary, _ = run_eval(cfg)
    out = capsys.readouterr().out
    for part in ("testA", "testB"):
        line = next(l for l in out.splitlines() if l.strip().startswith(f"part {part}:"))
        assert f"object_dice {summary['by_part'][part]['object_dice']:.4f}" in line
        assert f"dice_fg {summary['by_part'][part]['dice_fg']:.4f}" in line
        assert "(1 images)" in line
    a, b = summary["by_part"]["testA"], summary["by_part"]["testB"]
    assert a["dice_fg"] != b["dice_fg"]     # the lines would not tell a mix-up of the parts otherwise
