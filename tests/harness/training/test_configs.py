"""YAML configs: loading, base files, overrides, errors; every experiment config in configs/
loads, builds its dataset (on fixture data in the official layout), method and model, and
one config per dataset trains a step."""

from pathlib import Path

import pytest
import torch

from .helpers import REPO, TINY_MODEL
from mtseg_harness.config import ConfigError, apply_overrides, parse_override
from mtseg_harness.methods import method_class
from mtseg_harness.runs import build_run, build_trainer, load_config

import dataset_writers as W

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_overrides_parse_yaml_values():
    assert parse_override("optim.lr=1e-3") == (["optim", "lr"], 1e-3)
    assert parse_override("data.input_size=[80, 128]") == (["data", "input_size"], [80, 128])
    assert parse_override("train.amp=false") == (["train", "amp"], False)
    assert parse_override("train.out_dir=runs/x") == (["train", "out_dir"], "runs/x")
    cfg = apply_overrides({"a": {"b": 1}}, ["a.c.d=2", "a.b=3"])
    assert cfg == {"a": {"b": 3, "c": {"d": 2}}}
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_override("optim.lr")


def test_base_files_merge_and_overrides_win(tmp_path):
    (tmp_path / "a.yaml").write_text("optim: {lr: 1.0e-2, name: sgd}\ntrain: {steps: 5}\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\noptim: {lr: 5e-3}\n")
    cfg = load_config(tmp_path / "b.yaml", ["train.steps=7"])
    assert cfg["optim"]["lr"] == 5e-3 and cfg["optim"]["name"] == "sgd" and cfg["train"]["steps"] == 7
    assert cfg["data"]["name"] == "hc18"  # defaults fill the rest


def test_config_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="unknown config section"):
        load_config(None, ["optimizer.lr=1"])
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(None, ["train.stpes=1"])
    (tmp_path / "bad.yaml").write_text("optim: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(ValueError, match="unknown method"):
        load_config(None, ["method.name=nope"])


def _endovis17(root):
    W.write_endovis17(root, [1, 2, 9], frames=(0, 1))


FIXTURE_WRITERS = {
    "cadis": lambda r: W.write_cadis(r, {1: [10, 20], 5: [30], 2: [40]}),
    "endovis17": _endovis17,
    "endovis18": lambda r: W.write_endovis18(r, (1, 2, 3)),
    "refuge": W.write_refuge,
    "glas": W.write_glas,
    "hc18": lambda r: W.write_hc18(r, n=4, size=(54, 80)),
    "hc18_tiles": lambda r: W.write_hc18(r, n=4, size=(160, 240)),  # the demo's: the embedded sample's size
    "lits": lambda r: W.write_lits(r, n_volumes=17),  # CMU-Net's protocol lists volumes 0-16
    "brats18": lambda r: W.write_brats(r, {"HGG": ["Brats18_A_1", "Brats18_A_2"], "LGG": ["Brats18_B_1"]}),
}


@pytest.fixture(scope="module")
def fixture_roots(tmp_path_factory):
    roots = {}
    for name, writer in FIXTURE_WRITERS.items():
        root = tmp_path_factory.mktemp(name)
        writer(root)
        roots[name] = root
    return roots


def _fixture_config(path, root, out_dir):
    return load_config(path, [f"data.root={root}", "data.splits={train: all, val: null, test: all}",
                              f"train.out_dir={out_dir}", "train.progress=false", "data.num_workers=0",
                              "device=cpu", "train.tensorboard=false"])


def test_there_is_a_config_per_paper_experiment():
    names = {p.stem for p in CONFIGS}
    assert {"cadis_task2_u2net_hog", "cadis_task1_unet_hog", "cadis_task3_u2net_baseline",
            "endovis18_tdsnet_tdsnet", "lits_cmunet_cmunet", "lits_cmunet_baseline",
            "lits_cmunet_punet_pretrain", "lits_cmunet_punet",
            "brats18_unet3d_aniso_cmunet", "hc18_unet_hog"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_experiment_config_builds_on_fixture_data(path, fixture_roots, tmp_path):
    cfg = load_config(path)
    name = cfg["data"]["name"]
    cfg = _fixture_config(path, fixture_roots[name], tmp_path)
    run = build_run(cfg, "train", training=True)
    assert type(run.method) is method_class(cfg["method"]["name"])
    assert run.model.head_config.names() == run.method.heads().names()
    assert sum(p.numel() for p in run.model.parameters()) > 0


ONE_PER_DATASET = {}
for _p in CONFIGS:
    ONE_PER_DATASET.setdefault(load_config(_p)["data"]["name"], _p)


@pytest.mark.parametrize("path", list(ONE_PER_DATASET.values()), ids=list(ONE_PER_DATASET))
def test_one_config_per_dataset_trains_a_step_with_a_tiny_model(path, fixture_roots, tmp_path):
    cfg = load_config(path)
    name = cfg["data"]["name"]
    cfg = _fixture_config(path, fixture_roots[name], tmp_path)
    three_d = name == "brats18"
    cfg["model"] = {"name": "unet", "options": {"base_channels": 4, "depth": 1, **({"spatial_dims": 3} if three_d else {})}}
    cfg["data"].update(batch_size=1, input_size=None if three_d else [32, 48])
    (cfg["data"]["augment"] or {}).pop("crop", None)  # fixture images are smaller than the configs' crops
    if three_d:
        cfg["data"]["options"]["crop_size"] = [8, 16, 16]
    cfg["train"].update(steps=1, epochs=None, val_every=0, checkpoint_every=0)
    tr = build_trainer(cfg)
    tr.fit()
    assert tr.step == 1 and (tmp_path / "last.pt").is_file()
