"""Every method end to end: a few training steps and an evaluation, on the embedded HC18
sample, on the real HC18 images of the real-data folder, and on fixture data of every dataset adapter."""

import math

import pytest
import torch

from .helpers import SAMPLE, tiny_config
from mtseg_harness.methods import create_method, losses
from mtseg_harness.models import ModelOutput
from mtseg_harness.runs import build_trainer, run_eval

import dataset_writers as W

METHODS = ["baseline", "hog_mtl", "tdsnet", "cmunet"]


def _train(cfg):
    tr = build_trainer(cfg)
    result = tr.fit()
    assert result["step"] == cfg["train"]["steps"]
    assert all(math.isfinite(r["loss"]) for r in tr.history)
    return tr


@pytest.mark.parametrize("method", METHODS)
def test_method_on_embedded_sample_trains_and_evaluates(tmp_path, method):
    cfg = tiny_config(tmp_path, method={"name": method}, train={"steps": 3, "val_every": 3})
    tr = _train(cfg)
    assert (tmp_path / "best.pt").is_file()
    table, summary, _ = run_eval(cfg, split_key="test", out_dir=tmp_path / "eval", keep_examples=2, quiet=True)
    assert len(table) == 40 and 0 <= summary["dice_head"] <= 1
    assert (tmp_path / "eval" / "per_class.csv").is_file() and (tmp_path / "eval" / "overlays.png").is_file()


@pytest.mark.parametrize("method", METHODS)
def test_method_on_real_hc18(tmp_path, shared_data, method):
    cfg = tiny_config(tmp_path, method={"name": method}, data={"root": str(shared_data / "hc18")},
                      train={"steps": 2})
    tr = _train(cfg)
    assert tr.train_set[0]["image"].shape[-2:] == (540, 800)  # the full-size files, resized in the step


def _cadis(root):
    W.write_cadis(root, {1: [10, 20], 3: [5]})


def _endovis17(root):
    W.write_endovis17(root, [1], frames=(0, 1, 2), size=(24, 32))


FIXTURES = {
    # name: (writer, adapter options, number of scenes or None, model options)
    "cadis": (_cadis, {"task": 2, "rare_as_class": True}, None),
    "endovis17": (_endovis17, {"target": "parts", "crop": False}, None),
    "endovis18": (lambda r: W.write_endovis18(r, (1, 3)), {}, 3),
    "refuge": (W.write_refuge, {}, 2),
    "glas": (W.write_glas, {}, 2),
    "hc18": (lambda r: W.write_hc18(r, n=3), {}, None),
    "lits": (W.write_lits, {}, None),
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", list(FIXTURES))
def test_method_on_adapter_fixture(tmp_path, name, method):
    writer, options, scenes = FIXTURES[name]
    root = tmp_path / name
    root.mkdir()
    writer(root)
    mopts = {"name": method}
    if method == "tdsnet" and scenes:
        mopts["num_scenes"] = scenes
    cfg = tiny_config(tmp_path / "run", method=mopts,
                      data={"name": name, "root": str(root), "options": options, "batch_size": 2, "input_size": [16, 24],
                            "splits": {"train": "all", "val": None}},
                      train={"steps": 2 if method != "tdsnet" else 3})
    tr = _train(cfg)
    if method == "tdsnet" and scenes:
        assert tr.model(torch.zeros(1, tr.train_set[0]["image"].shape[0], 16, 24)).scene.shape == (1, scenes)
        assert "scene" in tr.history[-1]


@pytest.mark.parametrize("method", ["baseline", "tdsnet", "cmunet"])
def test_method_on_3d_brats_fixture(tmp_path, method):
    root = tmp_path / "brats"
    W.write_brats(root, {"HGG": ["Brats18_A_1", "Brats18_A_2"], "LGG": ["Brats18_B_1"]})
    mopts = {"name": method, **({"num_scenes": 2} if method == "tdsnet" else {})}
    cfg = tiny_config(tmp_path / "run", method=mopts,
                      data={"name": "brats18", "root": str(root), "batch_size": 1, "input_size": None,
                            "splits": {"train": "all", "val": None}, "augment": {"flip_prob": 0.5}},
                      model={"name": "unet", "options": {"spatial_dims": 3, "depth": 1, "base_channels": 4}},
                      train={"steps": 3})
    _train(cfg)


# ----------------------------------------------------------------------------- loss definitions


def _out(seg, **kw):
    fields = dict(seg=seg, side=(), hog=(), presence=None, scene=None, approx=None)
    fields.update(kw)
    return ModelOutput(**fields)


def test_hog_mtl_loss_is_alpha_ce_plus_beta_mse_over_all_heads():
    torch.manual_seed(0)
    m = create_method("hog_mtl", 3, alpha=0.7, beta=2.0)
    image = torch.rand(2, 1, 64, 48)
    mask = torch.randint(0, 3, (2, 64, 48))
    batch = m.targets({"image": image, "mask": mask})
    import mtseg_kernels

    assert torch.equal(batch["hog"], mtseg_kernels.hog_pseudo_label(image))
    seg, sides = torch.randn(2, 3, 64, 48), tuple(torch.randn(2, 3, 64, 48) for _ in range(6))
    hogs = tuple(torch.randn(2, 504) for _ in range(6))
    loss, logs = m.loss(_out(seg, side=sides, hog=hogs), batch, 0, 10)
    ce = sum(torch.nn.functional.cross_entropy(o, mask) for o in (seg,) + sides)  # seven CE terms
    mse = sum(torch.nn.functional.mse_loss(h, batch["hog"]) for h in hogs)         # six HOG heads
    torch.testing.assert_close(loss, 0.7 * ce + 2.0 * mse)


def test_tdsnet_three_stage_schedule_and_terms():
    m = create_method("tdsnet", 3, num_scenes=2, w_cls=0.5, w_sync=0.25, w_scene=2.0)
    mask = torch.tensor([[[0, 1], [1, 255]], [[0, 0], [2, 2]]])
    batch = m.targets({"mask": mask, "scene": torch.tensor([1, -1])})
    assert batch["presence"].tolist() == [[1, 1, 0], [1, 0, 1]]
    seg = torch.randn(2, 3, 2, 2)
    out = _out(seg, presence=torch.randn(2, 3), scene=torch.randn(2, 2))
    stages = [m.stage(s, 9) for s in range(9)]
    assert stages == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    l1, logs1 = m.loss(out, batch, 0, 9)
    l2, logs2 = m.loss(out, batch, 4, 9)
    l3, logs3 = m.loss(out, batch, 8, 9)
    assert "sync" not in logs1 and "scene" not in logs2 and "scene" in logs3
    seg_term = losses.cross_entropy(seg, mask) + 1 - losses.soft_iou(seg, mask)
    cls = torch.nn.functional.binary_cross_entropy_with_logits(out.presence, batch["presence"])
    torch.testing.assert_close(l1, seg_term + 0.5 * cls)
    import mtseg_kernels

    sync = mtseg_kernels.sync_loss(seg, out.presence, mode="argmax", valid_mask=mask != 255)  # the default
    torch.testing.assert_close(l2, l1 + 0.25 * sync)
    scene = torch.nn.functional.cross_entropy(out.scene[:1], torch.tensor([1]), reduction="sum") / 2
    torch.testing.assert_close(l3, l2 + 2.0 * scene)


def test_focal_loss_with_gamma_zero_is_cross_entropy():
    logits, mask = torch.randn(3, 4, 5, 6), torch.randint(0, 4, (3, 5, 6))
    mask[0, 0] = 255
    torch.testing.assert_close(losses.focal_loss(logits, mask, gamma=0.0), losses.cross_entropy(logits, mask))


def test_unknown_method_option_is_an_error():
    with pytest.raises(ValueError, match="unknown option"):
        create_method("hog_mtl", 2, alpah=1.0)


def test_eval_adds_glas_object_metrics_and_brats_regions(tmp_path):
    root = tmp_path / "glas"
    W.write_glas(root)
    cfg = tiny_config(tmp_path / "g", data={"name": "glas", "root": str(root), "batch_size": 2, "eval_batch_size": 1,
                                            "input_size": [16, 24], "splits": {"train": "all", "val": None, "test": "all"}},
                      train={"steps": 1})
    _train(cfg)
    table, summary, _ = run_eval(cfg, split_key="test", out_dir=tmp_path / "ge", quiet=True)
    assert {"object_dice", "object_hausdorff"} <= set(table.columns)
    assert ((table["object_dice"] >= 0) & (table["object_dice"] <= 1)).all()

    root = tmp_path / "brats"
    W.write_brats(root, {"HGG": ["Brats18_A_1", "Brats18_A_2"], "LGG": ["Brats18_B_1"]})
    cfg = tiny_config(tmp_path / "b", data={"name": "brats18", "root": str(root), "batch_size": 1, "input_size": None,
                                            "eval_batch_size": 1, "augment": {"flip_prob": 0.5},
                                            "splits": {"train": "all", "val": None, "test": "all"}},
                      model={"name": "unet", "options": {"spatial_dims": 3, "depth": 1, "base_channels": 4}},
                      train={"steps": 1}, eval={"pad_multiple": 2})
    _train(cfg)
    table, summary, _ = run_eval(cfg, split_key="test", out_dir=tmp_path / "be", quiet=True)
    assert {"dice_ET", "dice_TC", "dice_WT"} <= set(table.columns) and len(table) == 3


def test_hog_mtl_on_u2net_lite_trains_seven_ce_terms_and_six_hog_heads(tmp_path):
    cfg = tiny_config(tmp_path, method={"name": "hog_mtl"}, data={"input_size": [64, 96]}, train={"steps": 2})
    cfg["model"] = {"name": "u2net_lite", "options": {}}
    tr = _train(cfg)
    out = tr.model(torch.zeros(2, 1, 64, 96))
    assert len(out.side) == 6 and len(out.hog) == 6
    assert tr.history[-1]["seg_all"] > tr.history[-1]["seg"]  # fused + six side CE terms
