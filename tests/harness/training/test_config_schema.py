"""Every key of every config section is checked against the schema (a typo names the
nearest valid key), values are type- and range-checked, ``base:`` cycles are refused,
the method's, model's, dataset's and augmentation's keyword options are checked against
what they configure, every config in configs/ resolves, and ``mtseg config`` / ``train
--print-config`` print the resolved config (issue 11, finding 3); ``data.num_workers:
auto`` follows the CPUs available (finding 10)."""

import warnings

import pytest
import torch
import yaml

from .helpers import REPO
from mtseg_harness.cli import main
from mtseg_harness.config import DEFAULTS, ConfigError, dump, yaml_load
from mtseg_harness.runs import build_run, load_config
from mtseg_harness.training.data import default_num_workers, eval_loader, train_loader

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def _error(overrides, path=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    text = str(info.value)
    assert "\n" not in text
    return text


def _suggests(overrides, unknown: str, suggestion: str) -> str:
    """The one-line error of ``overrides``, checked to name ``unknown`` and suggest ``suggestion``."""
    text = _error(overrides)
    assert unknown in text and f"did you mean {suggestion}?" in text, text
    return text


# --------------------------------------------------------------------------- unknown keys


@pytest.mark.parametrize("override,typo,suggestion", [
    ("data.batchsize=2", "data.batchsize", "data.batch_size"),            # the case: trained at batch 8
    ("train.stpes=5", "train.stpes", "train.steps"),
    ("optim.weight_decy=0.1", "optim.weight_decy", "optim.weight_decay"),
    ("sched.milestone=[5]", "sched.milestone", "sched.milestones"),
    ("eval.pad_multiples=8", "eval.pad_multiples", "eval.pad_multiple"),
    ("data.splits.trian=all", "data.splits.trian", "data.splits.train"),
    ("model.option.base_channels=4", "model.option", "model.options"),     # the case: a 64-wide UNet was built
    ("optimizer.lr=1", "optimizer", "optim"),
    ("sede=3", "sede", "seed"),
    ("data.InputSize=[8,8]", "data.InputSize", "data.input_size"),
])
def test_an_unknown_key_in_any_section_names_the_nearest_valid_one(override, typo, suggestion):
    text = _suggests([override], f"unknown {'config section' if '.' not in typo else 'key'} '{typo}'", suggestion)
    assert "--set" in text  # what to do


@pytest.mark.parametrize("overrides,typo,suggestion", [
    (["method.name=hog_mtl", "method.alpah=2"], "method.alpah", "method.alpha"),
    (["method.name=recursive_approx", "method.update_evry=5"], "method.update_evry", "method.update_every"),
    (["model.options.base_channel=4"], "model.options.base_channel", "model.options.base_channels"),
    (["model.name=u2net", "model.options.confg=lite"], "model.options.confg", "model.options.config"),
    (["data.name=cadis", "data.options.tsak=3"], "data.options.tsak", "data.options.task"),
    (["data.augment.rotat=5"], "data.augment.rotat", "data.augment.rotate"),
    (["model.heads.presense=true"], "model.heads.presense", "model.heads.presence"),
])
def test_an_unknown_option_of_a_method_model_dataset_or_augmentation_names_the_nearest(overrides, typo, suggestion):
    _suggests(overrides, f"unknown key '{typo}'", suggestion)


def test_options_a_component_does_not_take_are_refused_not_ignored():
    # u2net has no base_channels: today a TypeError at build time, or silently ignored
    text = _error(["model.name=u2net", "model.options.base_channels=4"])
    assert "'model.options.base_channels'" in text and "valid here: config, spatial_dims" in text
    # what the assembly passes itself is not an option
    assert "'model.options.in_channels'" in _error(["model.options.in_channels=3"])
    assert "'data.options.root'" in _error(["data.options.root=/x"])
    assert "'data.augment.seed'" in _error(["data.augment.seed=1"])


@pytest.mark.parametrize("name,typo,suggestion", [
    ("method.name=hog_mlt", "'hog_mlt'", "hog_mtl"),
    ("model.name=unet_bilinaer", "'unet_bilinaer'", "unet_bilinear"),
    ("data.name=cadsi", "'cadsi'", "cadis"),
])
def test_an_unknown_method_model_or_dataset_name_names_the_nearest(name, typo, suggestion):
    _suggests([name], f"unknown {name.split('.')[0].replace('data', 'dataset')} {typo}", suggestion)


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize("override,key,given", [
    ("train.steps=abc", "train.steps", "'abc'"),
    ("optim.lr=fast", "optim.lr", "'fast'"),
    ("optim.betas=0.9", "optim.betas", "0.9"),
    ("data.batch_size=0", "data.batch_size", "0"),           # today: ZeroDivisionError in the sampler
    ("data.batch_size=-2", "data.batch_size", "-2"),         # today: a 137-sample first batch, then empty ones
    ("train.steps=-5", "train.steps", "-5"),                 # today: exit 0, 'trained 0 steps'
    ("train.steps=1.7", "train.steps", "1.7"),               # today: runs 1 step
    ("data.input_size=[0,0]", "data.input_size[0]", "0"),    # today: a RuntimeError from interpolate
    ("data.input_size=[64]", "data.input_size", "[64]"),
    ("optim.betas=[0.9,1.5]", "optim.betas[1]", "1.5"),
    ("optim.lr=.nan", "optim.lr", "nan"),
    ("optim.name=adan", "optim.name", "'adan'"),
    ("sched.gamma=0", "sched.gamma", "0"),
    ("train.amp=fp17", "train.amp", "'fp17'"),
    ("data.num_workers=-1", "data.num_workers", "-1"),
    ("device=gpu", "device", "'gpu'"),
    ("eval.split=testing", "eval.split", "'testing'"),
    ("seed=-1", "seed", "-1"),
    ("data=5", "data", "5"),
])
def test_bad_values_name_the_key_what_was_expected_and_what_was_given(override, key, given):
    text = _error([override])
    assert text.startswith(f"{key}: expected ")
    assert f"given {given}" in text
    assert text.endswith("fix it in the config file or with --set KEY=VALUE")


@pytest.mark.parametrize("overrides,key", [
    (["method.name=hog_mtl", "method.dim=500"], "method.dim"),               # no HOG preset of 500 values
    (["method.name=tdsnet", "method.stages=[0,0.5,1.5]"], "method.stages[2]"),
    (["method.name=tdsnet", "method.sync_mode=soft"], "method.sync_mode"),
    (["method.name=cmunet", "method.focal_pos=1.3"], "method.focal_pos"),
    (["method.name=recursive_approx", "method.strong_fraction=1.5"], "method.strong_fraction"),
    (["method.loss=dice_iou"], "method.loss"),
    (["model.options.depth=1.5"], "model.options.depth"),
    (["model.options.channels=[8,16,abc]"], "model.options.channels[2]"),
    (["data.name=cadis", "data.options.task=two"], "data.options.task"),
    (["data.augment.flip_prob=often"], "data.augment.flip_prob"),
])
def test_option_values_are_checked_against_the_option_dataclass_or_signature(overrides, key):
    assert _error(overrides).startswith(f"{key}: expected ")


def test_head_options_are_checked_against_the_head_specs():
    assert "head 'presence' has no option(s) ['hiden']" in _error(["model.heads.presence={hiden: 3}"])
    assert load_config(None, ["model.heads.presence={hidden: 3}"])["model"]["heads"] == {"presence": {"hidden": 3}}


def test_several_bad_values_are_named_in_one_line():
    text = _error(["train.steps=abc", "optim.lr=0", "data.batchsize=2"])
    assert "train.steps:" in text and "optim.lr:" in text and "'data.batchsize'" in text


def test_valid_values_pass_and_come_back_as_plain_yaml_values():
    cfg = load_config(None, ["optim.name=Adam", "train.amp=off", "data.options=null", "eval.overlays=0",
                             "train.val_every=0", "train.out_dir=2024", "data.input_size=[32,48]",
                             "data.augment={flip_axes: [-1], scale: [0.9, 1.1]}",
                             "model.options={channels: [4, 8, 16]}"])
    assert cfg["optim"]["name"] == "adam" and cfg["train"]["amp"] is False and cfg["data"]["options"] == {}
    assert cfg["train"]["out_dir"] == "2024" and cfg["data"]["input_size"] == [32, 48]
    assert cfg["data"]["augment"] == {"flip_prob": 0.5, "flip_axes": [-1], "scale": [0.9, 1.1]}
    # tuples from Python become lists: the config reads back the same from its YAML
    tup = load_config(None, base={"model": {"options": {"channels": (4, 8)}}, "method": {"name": "tdsnet",
                                                                                         "stages": (0, 0.5, 0.75)}})
    assert tup["model"]["options"]["channels"] == [4, 8] and tup["method"]["stages"] == [0.0, 0.5, 0.75]


def test_the_option_that_was_ignored_now_builds_what_it_says():
    cfg = load_config(None, ["model.options={base_channels: 4, depth: 1}", "device=cpu"])
    model = build_run(cfg, "train").model
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs[0].out_channels == 4


# --------------------------------------------------------------------------- base files


def test_a_base_that_includes_itself_is_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("base: a.yaml\ntrain: {steps: 2}\n")
    text = _error([], tmp_path / "a.yaml")  # today: RecursionError
    assert "include it again" in text and "a.yaml -> " in text


def test_a_base_cycle_through_other_files_is_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: [common.yaml, c.yaml]\n")
    (tmp_path / "common.yaml").write_text("seed: 1\n")
    (tmp_path / "c.yaml").write_text("base: ./a.yaml\n")
    text = _error([], tmp_path / "a.yaml")
    assert "a.yaml -> " in text and "b.yaml -> " in text and "c.yaml -> " in text


def _base_chain(folder, files: int):
    """``c0.yaml`` with base ``c1.yaml`` ... with base ``c{files-1}.yaml`` (which sets train.steps)."""
    for i in range(files - 1):
        (folder / f"c{i}.yaml").write_text(f"base: c{i + 1}.yaml\n")
    (folder / f"c{files - 1}.yaml").write_text("train: {steps: 7}\n")
    return folder / "c0.yaml"


def test_a_base_chain_is_bounded_and_the_error_names_it(tmp_path):
    from mtseg_harness.config import MAX_BASE_DEPTH

    assert MAX_BASE_DEPTH == 32
    assert load_config(_base_chain(tmp_path, 32))["train"]["steps"] == 7  # the longest chain allowed
    (tmp_path / "long").mkdir()
    text = _error([], _base_chain(tmp_path / "long", 2000))  # today: RecursionError
    assert "longer than 32 files" in text and str(tmp_path / "long" / "c0.yaml") in text
    assert "(c0.yaml -> c1.yaml -> " in text and "c31.yaml -> c32.yaml)" in text


def test_a_base_shared_by_two_files_is_not_a_cycle(tmp_path):
    (tmp_path / "common.yaml").write_text("train: {steps: 3}\n")
    (tmp_path / "x.yaml").write_text("base: common.yaml\noptim: {lr: 0.5}\n")
    (tmp_path / "y.yaml").write_text("base: [common.yaml, x.yaml]\n")
    cfg = load_config(tmp_path / "y.yaml")
    assert cfg["train"]["steps"] == 3 and cfg["optim"]["lr"] == 0.5


def test_a_missing_base_file_names_the_file_that_asked_for_it(tmp_path):
    (tmp_path / "a.yaml").write_text("base: nope.yaml\n")
    text = _error([], tmp_path / "a.yaml")
    assert "nope.yaml" in text and "a base: of" in text and "a.yaml" in text


# --------------------------------------------------------------------------- configs/ and printing


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_config_resolves_and_reads_back_the_same_from_its_dump(path):
    cfg = load_config(path)
    assert set(cfg) == set(DEFAULTS)
    again = load_config(None, [], base=yaml_load(dump(cfg)))
    assert again == cfg


def test_mtseg_config_prints_the_resolved_config(capsys):
    path = REPO / "configs" / "cadis_task2_unet_hog.yaml"
    assert main(["config", "--config", str(path), "--set", "optim.lr=0.5", "train.steps=7"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == load_config(path, ["optim.lr=0.5", "train.steps=7"])
    # the file, its base files, the method's paper defaults, the defaults and the overrides are all in it
    assert printed["data"]["options"] == {"task": 2, "rare_as_class": True}
    assert printed["data"]["root"] == "data/CaDIS" and printed["data"]["num_workers"] == "auto"
    assert printed["sched"] == {**DEFAULTS["sched"], "name": "step", "step_size": 50_000, "gamma": 0.5}
    assert printed["eval"]["overlays"] == 4 and printed["train"]["steps"] == 7 and printed["optim"]["lr"] == 0.5


def test_train_print_config_prints_and_does_not_train(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--print-config", "--set", f"train.out_dir={out}", "data.batch_size=3"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["batch_size"] == 3 and printed["train"]["out_dir"] == str(out)
    assert not out.exists()


def test_mtseg_config_of_a_bad_config_is_one_line_and_exit_2(capsys):
    assert main(["config", "--set", "data.batchsize=2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did you mean data.batch_size?" in err


# --------------------------------------------------------------------------- num_workers


@pytest.mark.parametrize("cpus,local,expected", [(1, None, 0), (2, None, 1), (3, None, 2), (16, None, 4),
                                                 (4, "2", 1), (2, "2", 0)])
def test_default_num_workers_follows_the_cpus_available(monkeypatch, cpus, local, expected):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    if local is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
    assert default_num_workers() == expected


@pytest.mark.parametrize("path", [REPO / "configs" / "hc18_unet_baseline.yaml", None], ids=["configs", "defaults"])
def test_loaders_of_a_config_do_not_warn_on_a_two_core_machine(monkeypatch, path):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    cfg = load_config(path)
    assert cfg["data"]["num_workers"] == "auto"
    data = list(range(64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when num_workers exceeds the CPUs available
        loaders = [train_loader(data, cfg), eval_loader(data, cfg)]
    assert [ld.num_workers for ld in loaders] == [1, 1]


def test_an_explicit_num_workers_is_kept():
    cfg = load_config(None, ["data.num_workers=0"])
    assert train_loader(list(range(16)), cfg).num_workers == 0


@pytest.mark.parametrize("overrides,match", [
    (["sched.name=piecewise", "sched.milestones=[10, 20]", "sched.lr_values=[1e-4]"], "one lr_values entry"),
    (["sched.name=piecewise", "sched.lr_values=[1e-4]"], "one lr_values entry"),
    (["sched.name=piecewise", "sched.milestones=[20, 10]", "sched.lr_values=[1e-4, 1e-5]"], "must increase"),
])
def test_piecewise_schedule_needs_a_rate_per_increasing_milestone(overrides, match):
    text = _error(overrides)
    assert text.startswith("sched: ") and match in text
